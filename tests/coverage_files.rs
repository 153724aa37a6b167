//! Issue 11's file calls (the utime family, truncate, xattr changes, mknod,
//! memfd_create) and setgroups: `tests/fixtures/filecalls.c` makes each,
//! succeeding and failing, through the x86_64 ABI and through i386's
//! `int 0x80`, and prints after each what the kernel then has (stat,
//! getxattr, getgroups, /proc/self/fd). Every event is checked against that
//! line, with seccomp and with `--disable-seccomp`.

mod common;

use std::collections::HashMap;

use common::{fixture, retval, Trace};
use serde_json::Value;

const CAP_MKNOD: (u32, &str) = (27, "CAP_MKNOD");
const CAP_SETFCAP: (u32, &str) = (31, "CAP_SETFCAP");

/// One line of the fixture: the call, its result, and `key=value` facts.
#[derive(Debug)]
struct Truth {
    syscall: String,
    retval: i64,
    facts: HashMap<String, String>,
}

impl Truth {
    fn fact(&self, key: &str) -> Option<&str> {
        self.facts.get(key).map(String::as_str)
    }
}

/// `NAME RET key=value...`; a value runs up to the next ` key=` (memfd
/// paths hold a space).
fn truths(stdout: &str) -> Vec<Truth> {
    stdout
        .lines()
        .map(|line| {
            let mut words = line.split(' ');
            let syscall = words.next().unwrap().to_owned();
            let retval = words.next().unwrap().parse().unwrap();
            let mut facts: HashMap<String, String> = HashMap::new();
            let mut last = String::new();
            for word in words {
                match word.split_once('=') {
                    Some((key, value)) => {
                        facts.insert(key.to_owned(), value.to_owned());
                        last = key.to_owned();
                    }
                    None => facts.get_mut(&last).unwrap().push_str(&format!(" {word}")),
                }
            }
            Truth { syscall, retval, facts }
        })
        .collect()
}

fn number(value: &Value) -> Option<i64> {
    value.as_i64().or_else(|| value.as_str().and_then(|s| s.parse().ok()))
}

/// `seconds.nanoseconds` as the fixture prints stat times.
fn time_text(time: &Value) -> String {
    format!("{}.{:09}", number(&time["seconds"]).unwrap_or(0), number(&time["nanos"]).unwrap_or(0))
}

fn check_times(event: &Value, truth: &Truth, previous: Option<&Truth>) {
    let file = &event["file"];
    for (field, fact) in [("access_time", "atime"), ("modification_time", "mtime")] {
        let time = &file[field];
        let Some(now) = truth.fact(fact) else {
            // A failed call: what was asked is all there is (utime(NULL) is now).
            assert_eq!(time["now"], true, "{field} of {truth:?}");
            continue;
        };
        let before = previous.and_then(|p| p.fact(fact));
        if time["now"] == true {
            assert_ne!(Some(now), before, "{field} is the time of the call: it changed ({truth:?})");
        } else if time["omit"] == true {
            assert_eq!(Some(now), before, "{field} omitted: unchanged ({truth:?})");
        } else {
            assert_eq!(time_text(time), now, "{field} of {truth:?}");
        }
    }
}

/// What a `security.capability` value grants, decoded by hand from the
/// bytes getxattr gives (little-endian words).
fn capabilities(hex: &str) -> Value {
    let bytes: Vec<u8> = (0..hex.len()).step_by(2).map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap()).collect();
    let word = |i: usize| u64::from(u32::from_le_bytes(bytes[i * 4..i * 4 + 4].try_into().unwrap()));
    let mut decoded = serde_json::json!({
        "version": word(0) >> 24,
        "permitted": (word(1) | word(3) << 32).to_string(),
        "inheritable": (word(2) | word(4) << 32).to_string(),
        "effective": word(0) & 1 == 1,
    });
    // protojson leaves zero values out.
    decoded.as_object_mut().unwrap().retain(|_, v| *v != "0" && *v != false);
    decoded
}

fn check_xattr(event: &Value, truth: &Truth) {
    let file = &event["file"];
    let name = truth.fact("name").unwrap();
    assert_eq!(file["name"], name);
    let value = truth.fact("value").unwrap();
    let set = truth.syscall.contains("setxattr");
    if set && truth.retval == 0 {
        assert_eq!(number(&file["value_size"]), Some(value.len() as i64 / 2), "{truth:?}");
        if name == "security.capability" {
            assert_eq!(file["capabilities"], capabilities(value), "{truth:?}");
        }
    } else if truth.retval == 0 {
        assert_eq!(value, (-libc::ENODATA).to_string(), "removed: {truth:?}");
    }
    if !set {
        assert!(file.get("value_size").is_none(), "{truth:?}");
    }
    // setxattrat's XATTR_* flags (from its struct) join its AT_* ones.
    let flags = match (truth.syscall.as_str(), name) {
        ("setxattrat", "user.at") if truth.retval == 0 => libc::AT_SYMLINK_NOFOLLOW | libc::XATTR_CREATE,
        ("setxattrat", "security.capability") => libc::AT_EMPTY_PATH,
        ("lsetxattr", "user.l") => libc::XATTR_CREATE,
        ("setxattrat", _) => libc::XATTR_CREATE,
        _ => 0,
    };
    assert_eq!(file["flags"].as_u64().unwrap_or(0), flags as u64, "{truth:?}");
}

fn check_node(event: &Value, truth: &Truth) {
    let file = &event["file"];
    let asked = file["mode"].as_u64().unwrap() as u32;
    let Some(mode) = truth.fact("mode") else {
        assert_eq!(file["file_type"], "FILE_TYPE_FIFO", "{truth:?}");
        return;
    };
    let mode = u32::from_str_radix(mode, 8).unwrap();
    assert_eq!(asked & libc::S_IFMT, mode & libc::S_IFMT, "{truth:?}");
    let device = mode & libc::S_IFMT == libc::S_IFCHR;
    let expected_type = if device { "FILE_TYPE_CHARACTER_DEVICE" } else { "FILE_TYPE_FIFO" };
    assert_eq!(file["file_type"], expected_type);
    if device {
        assert_eq!(file["device_major"].to_string(), truth.fact("major").unwrap());
        assert_eq!(file["device_minor"].to_string(), truth.fact("minor").unwrap());
    } else {
        assert!(file.get("device_major").is_none(), "{truth:?}");
    }
}

fn check_groups(event: &Value, truth: &Truth) {
    let credentials = &event["credentials"];
    let groups: Vec<String> =
        credentials["credentials"]["groups"].as_array().map_or(vec![], |g| g.iter().map(|g| g.to_string()).collect());
    assert_eq!(groups.join(","), truth.fact("groups").unwrap(), "groups after the call");
    let requested: Vec<i64> =
        credentials["requested"].as_array().map_or(vec![], |r| r.iter().filter_map(number).collect());
    let expected: &[i64] = match (truth.syscall.as_str(), truth.retval) {
        (_, r) if r < 0 => &[],
        ("setgroups32", _) => &[70000, 5],
        _ => &[7, 8, 9],
    };
    assert_eq!(requested, expected, "{truth:?}");
}

fn check(event: &Value, truth: &Truth, previous: Option<&Truth>, abi: &str) {
    assert_eq!((event["syscall"].as_str().unwrap(), retval(event)), (truth.syscall.as_str(), truth.retval));
    assert_eq!(event["abi"], if abi == "32" { "ABI_I386" } else { "ABI_X86_64" });
    assert!(event.get("partial").is_none(), "{event}");
    if truth.syscall.starts_with("setgroups") {
        return check_groups(event, truth);
    }
    let file = &event["file"];
    assert_eq!(file["path"].as_str().unwrap_or(""), truth.fact("path").unwrap(), "{truth:?}");
    // The file acted on, whatever its name; none where there is none.
    assert_eq!(number(&file["inode"]), truth.fact("ino").map(|i| i.parse().unwrap()), "{truth:?}");
    let operation = file["operation"].as_str().unwrap().trim_start_matches("FILE_OPERATION_");
    match truth.syscall.as_str() {
        "utime" | "utimes" | "futimesat" | "utimensat" | "utimensat_time64" => {
            assert_eq!(operation, "UTIMES");
            check_times(event, truth, previous);
        }
        "truncate" | "ftruncate" | "truncate64" | "ftruncate64" => {
            assert_eq!(operation, "TRUNCATE");
            let expected = truth.fact("size").map_or(1, |s| s.parse().unwrap());
            assert_eq!(number(&file["length"]), Some(expected), "{truth:?}");
        }
        name if name.contains("setxattr") => {
            assert_eq!(operation, "SETXATTR");
            check_xattr(event, truth);
        }
        name if name.contains("removexattr") => {
            assert_eq!(operation, "REMOVEXATTR");
            check_xattr(event, truth);
        }
        "mknod" | "mknodat" => {
            assert_eq!(operation, "MKNOD");
            check_node(event, truth);
        }
        "memfd_create" => {
            assert_eq!(operation, "MEMFD_CREATE");
            let (name, flags) = if truth.retval >= 0 { ("fixture", libc::MFD_CLOEXEC) } else { ("bad", 0x1000) };
            assert_eq!((file["name"].as_str(), file["flags"].as_u64()), (Some(name), Some(u64::from(flags))));
        }
        other => panic!("no check for {other}"),
    }
}

#[test]
fn file_calls_and_setgroups_report_what_the_kernel_then_has_from_both_abis() {
    let needed = [CAP_MKNOD, CAP_SETFCAP, common::CAP_SETGID];
    if !common::require_root(&needed, "make a device, set file capabilities and change groups") {
        return;
    }
    for abi in ["64", "32"] {
        for flags in [&[] as &[&str], &["--disable-seccomp"]] {
            let dir = tempfile::tempdir().unwrap();
            let base = dir.path().canonicalize().unwrap().to_str().unwrap().to_owned();
            let run = Trace::with_flags(flags, &[fixture("filecalls").to_str().unwrap(), &base, abi]).run();
            assert_eq!(run.code(), Some(0), "{}", run.stderr);
            let truths = truths(&run.stdout);
            // The fixture's own set-up makes a symlink.
            let events: Vec<&Value> = run
                .events
                .iter()
                .filter(|e| e.get("credentials").is_some() || e.get("file").is_some() && e["syscall"] != "symlink")
                .collect();
            let calls = |names: Vec<(&str, i64)>| names.iter().map(|(n, r)| format!("{n}={r}")).collect::<Vec<_>>();
            assert_eq!(
                calls(events.iter().map(|e| (e["syscall"].as_str().unwrap(), retval(e))).collect()),
                calls(truths.iter().map(|t| (t.syscall.as_str(), t.retval)).collect()),
                "abi {abi} {flags:?}"
            );
            for (i, (event, truth)) in events.iter().zip(&truths).enumerate() {
                let previous = i.checked_sub(1).map(|p| &truths[p]);
                check(event, truth, previous, abi);
            }
        }
    }
}

/// The value of attribute `name` of `path`, as the kernel has it.
fn xattr(path: &str, name: &str) -> Vec<u8> {
    let (path, name) = (std::ffi::CString::new(path).unwrap(), std::ffi::CString::new(name).unwrap());
    let mut value = vec![0u8; 64];
    // SAFETY: both names are NUL-terminated and `value` is writable for its length.
    let len = unsafe { libc::getxattr(path.as_ptr(), name.as_ptr(), value.as_mut_ptr().cast(), value.len()) };
    assert!(len >= 0, "getxattr {name:?}: {}", std::io::Error::last_os_error());
    value.truncate(len as usize);
    value
}

#[test]
fn touch_truncate_setcap_mknod_and_mkfifo_are_reported_as_the_kernel_did_them() {
    let needed = [CAP_MKNOD, CAP_SETFCAP];
    if !common::require_root(&needed, "make a device and set file capabilities") {
        return;
    }
    if std::process::Command::new("setcap").arg("-v").output().is_err() {
        common::skip("needs setcap (Debian: libcap2-bin)");
        return;
    }
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    for flags in [&[] as &[&str], &["--disable-seccomp"]] {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().canonicalize().unwrap().to_str().unwrap().to_owned();
        let at = |name: &str| format!("{base}/{name}");
        let script = format!(
            "cd {base} && touch f && truncate -s 777 f && touch -d @1234567890.5 f && setcap cap_net_raw+ep f \
             && mknod n c 1 7 && mkfifo p && touch -d @1 missing/x; true"
        );
        let run = Trace::with_flags(flags, &["sh", "-c", &script]).run();
        assert_eq!(run.code(), Some(0), "{}", run.stderr);
        let of = |operation: &str| -> Vec<&Value> {
            run.of("file").into_iter().filter(|e| e["file"]["operation"] == operation).collect()
        };
        let f = std::fs::metadata(at("f")).unwrap();

        let times = of("FILE_OPERATION_UTIMES");
        let stamped: Vec<_> = times.iter().filter(|e| e["file"]["access_time"]["now"].is_null()).collect();
        assert_eq!(stamped.len(), 2, "touch -d, twice: {times:#?}");
        let (set, failed) = (stamped[0], stamped[1]);
        assert_eq!(set["file"]["path"], at("f"));
        let stat_times = [(f.atime(), f.atime_nsec()), (f.mtime(), f.mtime_nsec())].map(|(s, n)| format!("{s}.{n:09}"));
        assert_eq!([&set["file"]["access_time"], &set["file"]["modification_time"]].map(time_text), stat_times);
        assert_eq!(stat_times[0], "1234567890.500000000");
        assert_eq!(
            (retval(failed), failed["file"]["path"].as_str()),
            (-libc::ENOENT as i64, Some(at("missing/x").as_str()))
        );

        let truncated = of("FILE_OPERATION_TRUNCATE");
        assert_eq!(truncated.len(), 1, "{truncated:#?}");
        assert_eq!(number(&truncated[0]["file"]["length"]), Some(f.len() as i64));
        assert_eq!(truncated[0]["file"]["path"], at("f"));

        let caps: Vec<_> = of("FILE_OPERATION_SETXATTR");
        let caps: Vec<_> = caps.iter().filter(|e| e["file"]["name"] == "security.capability").collect();
        assert_eq!(caps.len(), 1, "{caps:#?}");
        let hex: String = xattr(&at("f"), "security.capability").iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(caps[0]["file"]["capabilities"], capabilities(&hex));
        assert_eq!(caps[0]["file"]["capabilities"]["permitted"], (1u64 << 13).to_string(), "CAP_NET_RAW");

        let nodes = of("FILE_OPERATION_MKNOD");
        let node =
            |name: &str| nodes.iter().find(|e| e["file"]["path"] == at(name)).unwrap_or_else(|| panic!("{nodes:#?}"));
        let device = std::fs::symlink_metadata(at("n")).unwrap();
        assert!(device.file_type().is_char_device());
        let rdev = device.rdev();
        assert_eq!(node("n")["file"]["file_type"], "FILE_TYPE_CHARACTER_DEVICE");
        assert_eq!(
            (node("n")["file"]["device_major"].as_u64(), node("n")["file"]["device_minor"].as_u64()),
            (Some(u64::from(libc::major(rdev))), Some(u64::from(libc::minor(rdev))))
        );
        assert!(std::fs::symlink_metadata(at("p")).unwrap().file_type().is_fifo());
        assert_eq!(node("p")["file"]["file_type"], "FILE_TYPE_FIFO");
        assert_eq!(number(&node("p")["file"]["inode"]), Some(std::fs::symlink_metadata(at("p")).unwrap().ino() as i64));
    }
}
