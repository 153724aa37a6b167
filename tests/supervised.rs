//! Supervised opens: read-only opens the tracer performs itself through the
//! seccomp listener, and those it sends back to ptrace. Each event is held
//! against what the kernel told the program (its descriptor's fstat, its
//! errno, the bytes it read), for the tracer's own user, for a workload
//! under `--uid 1000` (the tracer takes on its credentials), and for a
//! tracer that is itself uid 1000.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use common::{fixture, retval, users, Run, Trace};

fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// A directory anyone may enter and write, holding a copy of `program`.
fn workspace(program: &str) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
    let copy = dir.path().join(program);
    let status = std::process::Command::new("install").arg("-m755").arg(fixture(program)).arg(&copy).status().unwrap();
    assert!(status.success());
    (dir, copy)
}

fn run(flags: &[&str], tracer_uid: Option<u32>, dir: &Path, command: &[&std::ffi::OsStr]) -> Run {
    let flags = [flags, &["--stats"]].concat();
    let mut trace = Trace::with_flags(&flags, command);
    if let Some(uid) = tracer_uid {
        trace = trace.run_by_user(uid, dir);
    }
    trace.run()
}

fn lines(run: &Run) -> std::collections::HashMap<&str, Vec<&str>> {
    run.stdout.lines().map(|l| l.split_once(' ').unwrap()).map(|(k, v)| (k, v.split(' ').collect())).collect()
}

fn number(event: &serde_json::Value, field: &str) -> u64 {
    event["open"][field].as_str().unwrap_or_else(|| panic!("{field} in {event:#}")).parse().unwrap()
}

#[test]
fn supervised_and_bounced_calls_report_what_the_kernel_did() {
    let (dir, program) = workspace("supervised");
    let file = dir.path().join("data");
    std::fs::write(&file, "data").unwrap();
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
    let file_path = common::real_path(file.to_str().unwrap());
    let dir_path = common::real_path(dir.path().join("x").to_str().unwrap());
    let dir_path = dir_path.strip_suffix("/x").unwrap();
    for (flags, tracer_uid) in users() {
        for (mode, switch) in [(&[][..], None), (&[][..], Some("off")), (&["--disable-seccomp"][..], None)] {
            let _ = std::fs::remove_file(dir.path().join("fifo"));
            let args = [program.as_os_str(), file.as_os_str(), dir.path().as_os_str(), "300".as_ref()];
            let mut trace = Trace::with_flags(&[flags, mode, &["--stats"]].concat(), &args);
            if let Some(uid) = tracer_uid {
                trace = trace.run_by_user(uid, dir.path());
            }
            if let Some(switch) = switch {
                trace.command().env("CWS_INSTRUMENTATION_SUPERVISED_OPENS", switch);
            }
            let run = trace.run();
            let context = format!("{flags:?} tracer uid {tracer_uid:?} {mode:?} {switch:?}: {}", run.stderr);
            assert_eq!(run.code(), Some(0), "{context}");
            let made = lines(&run);
            let opens = run.of("open");
            let of = |path: &str| -> Vec<&serde_json::Value> {
                opens.iter().copied().filter(|e| e["open"]["path"] == path).collect()
            };
            // Two opens of the file before the loop, each named and identified
            // as the descriptor the program got.
            let file_opens = of(&file_path);
            for (label, event) in ["file", "at"].iter().zip(&file_opens) {
                let [fd, dev, ino] = [0, 1, 2].map(|i| made[label][i].parse::<i64>().unwrap());
                assert_eq!(retval(event), fd, "{context}: {event:#}");
                assert_eq!((number(event, "device"), number(event, "inode")), (dev as u64, ino as u64), "{context}");
                assert!(event.get("unverified").is_none(), "{context}: {event:#}");
            }
            // The loop's 300 opens of the file, each reported once, and
            // openat2's three of it.
            assert_eq!(file_opens.len(), 2 + 300 + 3, "{context}");
            let missing = of(&format!("{dir_path}/missing"));
            assert_eq!(missing.len(), 1, "{context}");
            assert_eq!(retval(missing[0]), -made["missing"][0].parse::<i64>().unwrap(), "{context}");
            assert_eq!(made["missing"], ["2"], "{context}");
            // /dev/null goes through ptrace, and the register the tracer
            // marks it with comes back as the program left it.
            assert_eq!(made["null"][1], "kept", "{context}");
            let null_fd: i64 = made["null"][0].parse().unwrap();
            assert!(null_fd >= 0, "{context}");
            assert!(of("/dev/null").iter().any(|e| retval(e) == null_fd), "{context}");
            assert_eq!(made["fifo"][1], "fifo", "{context}");
            let fifo = of(&format!("{dir_path}/fifo"));
            assert_eq!(fifo.len(), 1, "{context}");
            assert_eq!(retval(fifo[0]), made["fifo"][0].parse::<i64>().unwrap(), "{context}");
            // "self" is the program, never the tracer.
            let pid = made["pid"][0];
            assert_eq!(made["status"][1], pid, "{context}");
            let status = of(&format!("/proc/{pid}/status"));
            assert_eq!(status.len(), 1, "{context}: {opens:#?}");
            assert_eq!(retval(status[0]), made["status"][0].parse::<i64>().unwrap(), "{context}");
            check_creating_opens(&made, &of, dir_path, &context);
            let openat2: Vec<_> = opens.iter().copied().filter(|e| e["syscall"] == "openat2").collect();
            check_openat2(&made, &openat2, &file_path, dir_path, &context);
            // No open failed with EINTR for a signal whose handler has no
            // SA_RESTART: natively, these opens cannot be interrupted.
            assert_eq!(made["eintr"], ["0", "0", "1"], "{context}");
            // No call the tracer made for the thread was made again when a
            // signal ended the thread's wait before the answer.
            assert_eq!(made["twice"], ["0"], "{context}");
            assert_eq!(of("/dev/null").len(), 1 + 300, "{context}");
            let supervised = run.stat("supervised_calls");
            match (mode.is_empty(), switch) {
                (true, None) => {
                    // The file's opens and the failed one, the creating and
                    // writing ones; /dev/null's, the FIFO, /proc and the
                    // dangling symlink's bounced.
                    assert!(supervised >= 303 + 5, "{context}");
                    assert!(run.stat("bounced_calls") >= 301 + 3, "{context}");
                }
                _ => assert_eq!(supervised, 0, "{context}"),
            }
        }
    }
}

/// The fixture's creating and writing opens, each event held against what
/// the kernel told the program.
fn check_creating_opens<'a>(
    made: &std::collections::HashMap<&str, Vec<&str>>,
    of: &dyn Fn(&str) -> Vec<&'a serde_json::Value>,
    dir: &str,
    context: &str,
) {
    let numbers = |label: &str| -> Vec<i64> {
        made[label].iter().map(|w| w.parse().unwrap_or_else(|_| panic!("{label} {w}: {context}"))).collect()
    };
    // The file is the caller's, with the mode it asked for less its mask.
    let created = numbers("created");
    assert_eq!(made["created"][3], "640", "{context}");
    assert_eq!(created[4], created[5], "owner and euid: {context}");
    let events = of(&format!("{dir}/made"));
    let (first, rest) = events.split_first().unwrap_or_else(|| panic!("no open of made: {context}"));
    assert_eq!(retval(first), created[0], "{context}: {first:#}");
    assert_eq!((number(first, "device"), number(first, "inode")), (created[1] as u64, created[2] as u64), "{context}");
    assert_eq!(first["open"]["flags"], libc::O_WRONLY | libc::O_CREAT | libc::O_TRUNC, "{context}: {first:#}");
    assert_eq!(first["open"]["mode"], 0o666, "{context}: {first:#}");
    assert!(first.get("unverified").is_none(), "{context}: {first:#}");
    // O_EXCL on the existing file, then the same file truncated.
    assert_eq!(made["excl"], ["17"], "{context}");
    let [excl, trunc] = rest else { panic!("{context}: {rest:#?}") };
    assert_eq!(retval(excl), -17, "{context}: {excl:#}");
    let truncated = numbers("trunc");
    assert_eq!(&truncated[1..], [created[1], created[2], 0, 1, 0], "{context}");
    assert_eq!(retval(trunc), truncated[0], "{context}: {trunc:#}");
    assert_eq!(number(trunc, "inode"), created[2] as u64, "{context}");
    // A dangling symlink: its target made, and named.
    let dangling = numbers("dangling");
    assert_eq!(dangling[3], 1, "{context}");
    let target = of(&format!("{dir}/target"));
    assert_eq!(target.len(), 1, "{context}");
    assert_eq!(retval(target[0]), dangling[0], "{context}: {:#}", target[0]);
    assert_eq!(number(target[0], "inode"), dangling[2] as u64, "{context}");
    assert_eq!(made["dircreat"], ["21"], "{context}");
    let dircreat: Vec<_> = of(dir).into_iter().filter(|e| e["open"]["flags"] == libc::O_CREAT).collect();
    assert_eq!(dircreat.iter().map(|e| retval(e)).collect::<Vec<_>>(), [-21], "{context}");
    assert_eq!(made["nodir"], ["2"], "{context}");
    assert_eq!(of(&format!("{dir}/none/x")).iter().map(|e| retval(e)).collect::<Vec<_>>(), [-2], "{context}");
    let created = numbers("creat");
    let creat = of(&format!("{dir}/made3"));
    let [creat] = creat.as_slice() else { panic!("{context}: {creat:#?}") };
    assert_eq!((&creat["syscall"], retval(creat)), (&serde_json::json!("creat"), created[0]), "{context}");
    assert_eq!(number(creat, "inode"), created[2] as u64, "{context}: {creat:#}");
    assert_eq!(made["creat"][3], "640", "{context}");
}

/// The fixture's openat2 calls: each event held against what the kernel
/// returned, with the flags and mode of the `open_how` it acted on.
fn check_openat2(
    made: &std::collections::HashMap<&str, Vec<&str>>,
    events: &[&serde_json::Value],
    file: &str,
    dir: &str,
    context: &str,
) {
    let numbers = |label: &str| -> Vec<i64> {
        let words = &made[label];
        let fd = words[0].parse().unwrap();
        let rest = words[1..3].iter().map(|w| w.parse().unwrap());
        std::iter::once(fd).chain(rest).chain([i64::from_str_radix(words[3], 8).unwrap()]).collect()
    };
    // (label, path, flags, mode, errno natively)
    let cases = [
        ("o2read", file.to_owned(), libc::O_RDONLY, 0, None),
        ("o2create", format!("{dir}/made2"), libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL, 0o660, None),
        ("o2nosym", format!("{dir}/dangling"), libc::O_RDONLY, 0, Some(libc::ELOOP)),
        ("o2beneath", format!("{dir}/../x"), libc::O_RDONLY, 0, Some(libc::EXDEV)),
        ("o2size", file.to_owned(), libc::O_RDONLY, 0, Some(libc::EINVAL)),
        ("o2mode", file.to_owned(), libc::O_RDONLY, 0o600, Some(libc::EINVAL)),
    ];
    let mut events = events.iter();
    for (label, path, flags, mode, errno) in cases {
        let got = numbers(label);
        let event = events.next().unwrap_or_else(|| panic!("no openat2 event for {label}: {context}"));
        assert_eq!(retval(event), got[0], "{label} {context}: {event:#}");
        match errno {
            Some(errno) => assert_eq!(got[0], -i64::from(errno), "{label} {context}"),
            None => {
                assert!(got[0] >= 0, "{label} {context}");
                assert_eq!(event["open"]["path"], path.as_str(), "{label} {context}: {event:#}");
                assert_eq!(number(event, "inode"), got[2] as u64, "{label} {context}: {event:#}");
                assert!(event.get("unverified").is_none(), "{label} {context}: {event:#}");
            }
        }
        // Flags and mode as the kernel took them: the size-16 call's open_how
        // is not the kernel's to read whole, and is not reported as fact.
        if label != "o2size" {
            assert_eq!(event["open"]["flags"], flags, "{label} {context}: {event:#}");
        }
        if flags & libc::O_CREAT != 0 {
            assert_eq!(event["open"]["mode"], mode, "{label} {context}: {event:#}");
            assert_eq!(got[3], 0o640, "{label}: 0660 under the mask 027: {context}");
        }
    }
}

#[test]
fn a_workload_is_granted_and_refused_opens_by_its_own_credentials() {
    if !is_root() {
        return common::skip("needs root to make files of other owners");
    }
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let secret = dir.path().join("secret");
    let shared = dir.path().join("shared");
    for (file, mode, gid) in [(&secret, 0o600, 0), (&shared, 0o640, 1000)] {
        std::fs::write(file, "x").unwrap();
        std::fs::set_permissions(file, std::fs::Permissions::from_mode(mode)).unwrap();
        std::os::unix::fs::chown(file, Some(0), Some(gid)).unwrap();
    }
    for (flags, expected) in [(&[][..], [0, 0]), (&["--uid", "1000", "--gid", "1000"][..], [1, 0])] {
        for file in [&secret, &shared] {
            let run = run(flags, None, dir.path(), &["cat".as_ref(), file.as_os_str()]);
            let wanted = expected[usize::from(file == &shared)];
            assert_eq!(run.code(), Some(wanted), "{flags:?} {file:?}: {}", run.stderr);
            let path = common::real_path(file.to_str().unwrap());
            let opens = run.opens_of(&path);
            assert_eq!(opens.len(), 1, "{flags:?}: {:#?}", run.of("open"));
            match wanted {
                0 => assert!(retval(opens[0]) >= 0, "{flags:?}: {:#}", opens[0]),
                _ => assert_eq!(retval(opens[0]), -libc::EACCES as i64, "{flags:?}: {:#}", opens[0]),
            }
            assert!(run.stat("supervised_calls") > 0, "{}", run.stderr);
        }
    }
}

/// Each workload user: the tracer's flags for it, and setpriv's to run a
/// command natively as it.
const WORKLOAD_USERS: [(&[&str], &[&str]); 2] =
    [(&[], &[]), (&["--uid", "1000", "--gid", "1000"], &["--reuid", "1000", "--regid", "1000", "--clear-groups"])];

/// `sh -c COMMAND PATH` run natively as `native_as`: its exit code.
fn natively(native_as: &[&str], command: &str, path: &Path) -> Option<i32> {
    natively_printing(native_as, command, path).0
}

/// `sh -c COMMAND PATH` run natively as `native_as`: its exit code (128 +
/// the signal that killed it, as the tracer exits) and what it printed.
fn natively_printing(native_as: &[&str], command: &str, path: &Path) -> (Option<i32>, String) {
    use std::os::unix::process::ExitStatusExt;
    let output = std::process::Command::new("setpriv").args(native_as).args(["sh", "-c", command]).arg(path).output();
    let output = output.unwrap();
    let code = output.status.code().or(output.status.signal().map(|signal| 128 + signal));
    (code, String::from_utf8(output.stdout).unwrap())
}

/// `sh -c COMMAND PATH` traced with `flags`.
fn traced(flags: &[&str], dir: &Path, command: &str, path: &Path) -> Run {
    run(flags, None, dir, &["sh".as_ref(), "-c".as_ref(), command.as_ref(), path.as_os_str()])
}

/// One call of a fixture that prints its errno, held against native: `sh -c
/// COMMAND PATH` run natively as `native_as` and traced with `flags`, each
/// from `prepare`'s state, must end alike (exit code, output, `state`). Its
/// one event of `syscall` (on `path` unless None) must return the errno
/// printed (EFBIG when the program was killed before printing: SIGXFSZ) and
/// carry no mark. Returns that event.
#[allow(clippy::too_many_arguments)]
fn held_against_native<S: PartialEq + std::fmt::Debug>(
    (flags, native_as): (&[&str], &[&str]),
    dir: &Path,
    command: &str,
    path: &Path,
    prepare: impl Fn(),
    state: impl Fn() -> S,
    syscall: &str,
    event_path: Option<&str>,
) -> serde_json::Value {
    prepare();
    let (code, printed) = natively_printing(native_as, command, path);
    let native = (code, printed.as_str(), state());
    prepare();
    let run = traced(flags, dir, command, path);
    let context = format!("{flags:?} {command} {path:?}: {}", run.stderr);
    assert_eq!((run.code(), run.stdout.as_str(), state()), native, "{context}");
    let events: Vec<_> = run
        .of("file")
        .into_iter()
        .filter(|e| e["syscall"] == syscall && event_path.is_none_or(|p| e["file"]["path"] == p))
        .collect();
    assert_eq!(events.len(), 1, "{context}: {:#?}", run.events);
    let errno: i64 = run.stdout.trim().parse().unwrap_or(libc::EFBIG.into());
    assert_eq!(retval(events[0]), -errno, "{context}: {:#}", events[0]);
    assert!(events[0].get("unverified").is_none(), "{context}: {:#}", events[0]);
    assert!(run.stat("supervised_calls") > 0, "{context}");
    events[0].clone()
}

/// Files and directories a workload creates are its own (owner, the
/// directory's set-group-id group, its mask), and it is refused what the
/// kernel refuses it: each traced shell's `: >> FILE` and `mkdir DIR` held
/// against the same run natively as the same user, from the same state.
#[test]
fn a_workload_creates_files_as_itself_and_is_refused_what_the_kernel_refuses_it() {
    use std::os::unix::fs::MetadataExt;
    if !is_root() {
        return common::skip("needs root to make directories of other owners");
    }
    // An open(FILE, O_WRONLY|O_CREAT|O_APPEND, 0666) failing the shell if it
    // fails, and a mkdir(DIR, 0777); the event of each: (kind, syscall).
    // Both under a mask of the shell's own, not the tracer's.
    let commands = [("umask 027; : >> \"$0\"", ("open", "openat")), ("umask 027; mkdir \"$0\"", ("file", "mkdir"))];
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    // (directory, its mode, its group; the name touched, the owner of a file already there)
    let cases = [
        ("closed", 0o755, 0, "new", None),
        ("group", 0o2777, 4242, "new", None),
        ("sticky", 0o1777, 0, "theirs", Some(2000)),
    ];
    let prepare = || {
        for (name, mode, gid, file, existing) in cases {
            let sub = dir.path().join(name);
            let _ = std::fs::remove_dir_all(&sub);
            std::fs::create_dir(&sub).unwrap();
            std::os::unix::fs::chown(&sub, Some(0), Some(gid)).unwrap();
            std::fs::set_permissions(&sub, std::fs::Permissions::from_mode(mode)).unwrap();
            if let Some(owner) = existing {
                std::fs::write(sub.join(file), "").unwrap();
                std::fs::set_permissions(sub.join(file), std::fs::Permissions::from_mode(0o666)).unwrap();
                std::os::unix::fs::chown(sub.join(file), Some(owner), Some(owner)).unwrap();
            }
        }
    };
    let outcome = |path: &Path, code: Option<i32>| {
        let meta = std::fs::metadata(path).ok().map(|m| (m.uid(), m.gid(), m.mode() & 0o7777));
        (code, meta)
    };
    for (flags, native_as) in WORKLOAD_USERS {
        for ((name, _, _, file, existing), (command, (kind, syscall))) in
            cases.into_iter().flat_map(|case| commands.map(|command| (case, command)))
        {
            if existing.is_some() && kind == "file" {
                continue;
            }
            let path = dir.path().join(name).join(file);
            prepare();
            let native = outcome(&path, natively(native_as, command, &path));
            prepare();
            let run = traced(flags, dir.path(), command, &path);
            let context = format!("{flags:?} {command} {path:?}: {}", run.stderr);
            assert_eq!(outcome(&path, run.code()), native, "{context}");
            let real = common::real_path(path.to_str().unwrap());
            let events: Vec<_> = run
                .of(kind)
                .into_iter()
                .filter(|e| e["syscall"] == syscall && e[kind]["path"] == real.as_str())
                .collect();
            assert_eq!(events.len(), 1, "{context}: {:#?}", run.events);
            match native.0 {
                Some(0) => assert!(retval(events[0]) >= 0, "{context}: {:#}", events[0]),
                _ => assert_eq!(retval(events[0]), -libc::EACCES as i64, "{context}: {:#}", events[0]),
            }
            assert!(events[0].get("unverified").is_none(), "{context}: {:#}", events[0]);
            assert!(run.stat("supervised_calls") > 0, "{context}");
        }
    }
}

#[test]
fn an_open_names_the_file_the_kernel_opened_whatever_a_sibling_writes_in_its_path() {
    const COUNT: usize = 500;
    let (dir, program) = workspace("attack_paths");
    // Opening one of two files, and creating one of two.
    let modes =
        [("read", libc::O_CLOEXEC), ("create", libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL | libc::O_CLOEXEC)];
    for (user, (flags, tracer_uid)) in users().into_iter().enumerate() {
        for (mode, open_flags) in modes {
            // Each user's own files: the fixture makes them readable by their owner only.
            let files = dir.path().join(format!("files-{user}-{mode}"));
            std::fs::create_dir_all(&files).unwrap();
            std::fs::set_permissions(&files, std::fs::Permissions::from_mode(0o777)).unwrap();
            let count = COUNT.to_string();
            let args = [program.as_os_str(), files.as_os_str(), count.as_ref(), mode.as_ref()];
            let run = run(flags, tracer_uid, dir.path(), &args);
            let context = format!("{mode} {flags:?} tracer uid {tracer_uid:?}: {}", run.stderr);
            assert_eq!(run.code(), Some(0), "{context}");
            let path_of = |name: &str| common::real_path(files.join(name).to_str().unwrap());
            let inode_of =
                |name: &str| std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(files.join(name)).unwrap());
            // What the kernel did: the name opened or made, and the inode.
            let done: Vec<(&str, u64)> = run
                .stdout
                .lines()
                .map(|line| match line.split_once(' ') {
                    Some((name, inode)) => (name, inode.parse().unwrap()),
                    None => (line, inode_of(line)),
                })
                .collect();
            let events: Vec<_> = run
                .of("open")
                .into_iter()
                .filter(|e| e["open"]["flags"] == open_flags)
                .filter(|e| ["a", "b"].iter().any(|n| e["open"]["path"] == path_of(n).as_str()))
                .collect();
            assert_eq!(events.len(), COUNT, "{context}");
            for (event, (name, inode)) in events.iter().zip(&done) {
                assert_eq!(event["open"]["path"], path_of(name).as_str(), "{context}: {event:#}");
                assert_eq!(number(event, "inode"), *inode, "{context}: {event:#}");
                assert!(event.get("unverified").is_none(), "{context}: {event:#}");
            }
            let flips = done.iter().filter(|(n, _)| *n == "b").count();
            eprintln!("{context}: {flips} of {COUNT} opens reached b");
            assert!(run.stat("supervised_calls") >= COUNT as u64, "{context}");
        }
    }
}

/// A hard link made through a symlink to /proc/self/fd/N links one of the
/// workload's own files, never one of the tracer's: the tracer leaves
/// AT_SYMLINK_FOLLOW to the workload's own call (under ptrace).
#[test]
fn a_link_through_proc_self_links_the_workload_s_files_never_the_tracer_s() {
    use std::os::unix::fs::MetadataExt;
    let dir = tempfile::tempdir().unwrap();
    let program = fixture("link_follow");
    let mut trace = Trace::with_flags(&["--stats"], &[program.as_os_str(), dir.path().as_os_str()]);
    let child = trace.spawn();
    let run = trace.finish(child);
    assert_eq!(run.code(), Some(0), "{}", run.stderr);
    let events_file = std::fs::metadata(trace.events_path()).unwrap();
    let mut links = 0;
    for entry in std::fs::read_dir(dir.path()).unwrap() {
        let entry = entry.unwrap();
        if entry.file_name().to_string_lossy().starts_with("link-") {
            let meta = entry.metadata().unwrap();
            assert_ne!((meta.dev(), meta.ino()), (events_file.dev(), events_file.ino()), "{entry:?}");
            links += 1;
        }
    }
    eprintln!("{links} of the workload's own files linked");
    let linkats = run.events.iter().filter(|e| e["syscall"] == "linkat").count();
    assert_eq!(linkats, 64, "{}", run.stderr);
}

/// chmod and chown change what the kernel lets the workload change, and
/// the file its name leads to (a symlink followed, or not for `chown -h`):
/// each traced command held against the same command run natively as the
/// same user, from the same state, by the modes and owners left behind.
#[test]
fn a_workload_changes_modes_and_owners_as_itself() {
    use std::os::unix::fs::MetadataExt;
    if !is_root() {
        return common::skip("needs root to make files of other owners");
    }
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
    let at = |name: &str| dir.path().join(name);
    let prepare = || {
        for name in ["mine", "theirs", "to-mine", "to-theirs"] {
            let _ = std::fs::remove_file(at(name));
        }
        for (name, owner) in [("mine", 1000), ("theirs", 2000)] {
            std::fs::write(at(name), "").unwrap();
            std::fs::set_permissions(at(name), std::fs::Permissions::from_mode(0o644)).unwrap();
            std::os::unix::fs::chown(at(name), Some(owner), Some(owner)).unwrap();
        }
        std::os::unix::fs::symlink("mine", at("to-mine")).unwrap();
        std::os::unix::fs::symlink("theirs", at("to-theirs")).unwrap();
    };
    // What each file and symlink is left with.
    let state = || {
        ["mine", "theirs", "to-mine", "to-theirs"].map(|name| {
            let meta = std::fs::symlink_metadata(at(name)).unwrap();
            (meta.uid(), meta.gid(), meta.mode() & 0o7777)
        })
    };
    // (command, the name it acts on, the syscall its event has)
    let commands = [
        ("chmod 600 \"$0\"", "theirs", "fchmodat"),
        ("chmod 600 \"$0\"", "to-mine", "fchmodat"),
        ("chown 2000 \"$0\"", "mine", "fchownat"),
        ("chgrp 1000 \"$0\"", "to-mine", "fchownat"),
        ("chown -h 1000 \"$0\"", "to-theirs", "fchownat"),
    ];
    for (flags, native_as) in WORKLOAD_USERS {
        for (command, name, syscall) in commands {
            let path = at(name);
            prepare();
            let native = (natively(native_as, command, &path), state());
            prepare();
            let run = traced(flags, dir.path(), command, &path);
            let context = format!("{flags:?} {command} {name}: {}", run.stderr);
            assert_eq!((run.code(), state()), native, "{context}");
            let real = common::real_path(path.to_str().unwrap());
            let events: Vec<_> = run
                .of("file")
                .into_iter()
                .filter(|e| e["syscall"] == syscall && e["file"]["path"] == real.as_str())
                .collect();
            assert_eq!(events.len(), 1, "{context}: {:#?}", run.events);
            let expected = if native.0 == Some(0) { 0 } else { -i64::from(libc::EPERM) };
            assert_eq!(retval(events[0]), expected, "{context}: {:#}", events[0]);
            assert!(events[0].get("unverified").is_none(), "{context}: {:#}", events[0]);
            assert!(run.stat("supervised_calls") > 0, "{context}");
        }
    }
}

/// truncate and ftruncate cut what the kernel lets the workload cut, and
/// are refused what it refuses: each call held against the same call made
/// natively as the same user, from the same state, by what it returned,
/// how the program ended (SIGXFSZ past its file size limit) and the length
/// left. A lease the call must break is the thread's to wait for, never
/// the tracer's: the truncate completes once the holder gives it up.
#[test]
fn a_workload_truncates_files_as_itself() {
    if !is_root() {
        return common::skip("needs root to make files of other owners");
    }
    let (dir, program) = workspace("truncates");
    let at = |name: &str| dir.path().join(name);
    let prepare = || {
        for (name, owner) in [("mine", 1000), ("theirs", 2000)] {
            std::fs::write(at(name), "0123456789").unwrap();
            std::fs::set_permissions(at(name), std::fs::Permissions::from_mode(0o644)).unwrap();
            std::os::unix::fs::chown(at(name), Some(owner), Some(owner)).unwrap();
        }
        std::fs::create_dir_all(at("dir")).unwrap();
        let _ = std::fs::remove_file(at("fifo"));
        nix::unistd::mkfifo(&at("fifo"), nix::sys::stat::Mode::from_bits_truncate(0o666)).unwrap();
    };
    let lengths = || ["mine", "theirs"].map(|name| std::fs::metadata(at(name)).unwrap().len());
    // (the fixture's mode, the name, the length, a shell prefix, the syscall its event has)
    let cases = [
        ("path", "mine", "3", "", "truncate"),
        ("path", "theirs", "3", "", "truncate"),
        ("path", "dir", "0", "", "truncate"),
        ("path", "fifo", "0", "", "truncate"),
        ("path", "missing/x", "0", "", "truncate"),
        ("path", "mine", "-1", "", "truncate"),
        ("path", "mine", "100000", "ulimit -f 1; ", "truncate"),
        ("fd", "mine", "3", "", "ftruncate"),
        ("fd-ro", "theirs", "3", "", "ftruncate"),
        ("fd", "mine", "100000", "ulimit -f 1; ", "ftruncate"),
        ("lease", "mine", "3", "", "truncate"),
    ];
    let real = |name: &str| format!("{}/{name}", common::real_path(dir.path().to_str().unwrap()));
    for user in WORKLOAD_USERS {
        for (mode, name, length, prefix, syscall) in cases {
            let command = format!("{prefix}exec '{}' {mode} \"$0\" {length}", program.display());
            let event = held_against_native(
                user,
                dir.path(),
                &command,
                &at(name),
                prepare,
                lengths,
                syscall,
                Some(&real(name)),
            );
            assert_eq!(event["file"]["length"].as_str(), Some(length), "{command}: {event:#}");
        }
    }
}

/// Extended attributes are set and removed as the kernel lets the workload
/// (user.* with write permission, trusted.* and security.capability with
/// the capability, never user.* on a symlink, XATTR_CREATE and
/// XATTR_REPLACE, on a symlink itself for the l* forms), and the event
/// names the attribute and file changed: each call held against the same
/// call made natively as the same user, from the same state, by what it
/// returned and the attributes left on every file.
#[test]
fn a_workload_sets_attributes_as_itself() {
    if !is_root() {
        return common::skip("needs root to make files of other owners and trusted attributes");
    }
    let (dir, program) = workspace("xattrs");
    let at = |name: &str| dir.path().join(name);
    let prepare = || {
        for name in ["mine", "theirs", "to-mine"] {
            let _ = std::fs::remove_file(at(name));
        }
        for (name, owner) in [("mine", 1000), ("theirs", 2000)] {
            std::fs::write(at(name), "").unwrap();
            std::fs::set_permissions(at(name), std::fs::Permissions::from_mode(0o644)).unwrap();
            rustix::fs::setxattr(at(name), "user.old", b"0", rustix::fs::XattrFlags::empty()).unwrap();
            std::os::unix::fs::chown(at(name), Some(owner), Some(owner)).unwrap();
        }
        std::os::unix::fs::symlink("mine", at("to-mine")).unwrap();
        rustix::fs::lsetxattr(at("to-mine"), "trusted.old", b"0", rustix::fs::XattrFlags::empty()).unwrap();
    };
    const ATTRIBUTES: [&str; 7] =
        ["user.x", "user.y", "user.z", "user.old", "trusted.x", "trusted.old", "security.capability"];
    // Every attribute of every file (of the symlink itself for to-mine).
    let state = || {
        ["mine", "theirs", "to-mine"].map(|name| {
            ATTRIBUTES.map(|attribute| {
                let mut value = vec![0u8; 256];
                let size = rustix::fs::lgetxattr(at(name), attribute, &mut value).ok()?;
                value.truncate(size);
                Some(value)
            })
        })
    };
    // (the fixture's mode, the file, the attribute, the value, the syscall its event has)
    let cases = [
        ("set", "mine", "user.x", "1", "setxattr"),
        ("set", "theirs", "user.x", "1", "setxattr"),
        ("set", "mine", "trusted.x", "1", "setxattr"),
        ("set", "mine", "security.capability", "caps", "setxattr"),
        ("set", "to-mine", "user.x", "1", "setxattr"),
        ("lset", "to-mine", "trusted.x", "1", "lsetxattr"),
        ("lset", "to-mine", "user.x", "1", "lsetxattr"),
        ("create", "mine", "user.old", "2", "setxattr"),
        ("replace", "mine", "user.y", "2", "setxattr"),
        ("set", "mine", "long", "1", "setxattr"),
        ("set", "mine", "user.z", "large", "setxattr"),
        ("fset", "mine", "user.x", "3", "fsetxattr"),
        ("remove", "mine", "user.old", "", "removexattr"),
        ("remove", "theirs", "user.old", "", "removexattr"),
        ("lremove", "to-mine", "trusted.old", "", "lremovexattr"),
        ("fremove", "mine", "user.old", "", "fremovexattr"),
    ];
    let real = |name: &str| format!("{}/{name}", common::real_path(dir.path().to_str().unwrap()));
    for user in WORKLOAD_USERS {
        for (mode, name, attribute, value, syscall) in cases {
            let command = format!("exec '{}' {mode} \"$0\" {attribute} {value}", program.display());
            let event =
                held_against_native(user, dir.path(), &command, &at(name), prepare, state, syscall, Some(&real(name)));
            if attribute != "long" {
                assert_eq!(event["file"]["name"], attribute, "{command}: {event:#}");
            }
        }
    }
}

/// The utime family sets the times the kernel lets the workload set (its
/// own files' to any time, others' it may write to now only), on a symlink
/// itself with AT_SYMLINK_NOFOLLOW, and answers before any lookup what the
/// kernel answers so (invalid times, both omitted): each call held against
/// the same call made natively as the same user, from the same state, by
/// what it returned and the times left on every file.
#[test]
fn a_workload_sets_times_as_itself() {
    use std::os::unix::fs::MetadataExt;
    if !is_root() {
        return common::skip("needs root to make files of other owners");
    }
    let (dir, program) = workspace("utimes");
    let at = |name: &str| dir.path().join(name);
    const LONG_AGO: rustix::fs::Timespec = rustix::fs::Timespec { tv_sec: 600_000_000, tv_nsec: 0 };
    let prepare = || {
        for name in ["mine", "theirs", "shared", "to-mine"] {
            let _ = std::fs::remove_file(at(name));
        }
        for (name, owner, mode) in [("mine", 1000, 0o644), ("theirs", 2000, 0o644), ("shared", 2000, 0o666)] {
            std::fs::write(at(name), "").unwrap();
            std::fs::set_permissions(at(name), std::fs::Permissions::from_mode(mode)).unwrap();
            std::os::unix::fs::chown(at(name), Some(owner), Some(owner)).unwrap();
        }
        std::os::unix::fs::symlink("mine", at("to-mine")).unwrap();
        let long_ago = rustix::fs::Timestamps { last_access: LONG_AGO, last_modification: LONG_AGO };
        for name in ["mine", "theirs", "shared", "to-mine"] {
            let nofollow = rustix::fs::AtFlags::SYMLINK_NOFOLLOW;
            rustix::fs::utimensat(rustix::fs::CWD, at(name), &long_ago, nofollow).unwrap();
        }
    };
    // The times of every file (of the symlink itself for to-mine); a time
    // set to now is only "now": the native and the traced call differ.
    let state = || {
        let time = |seconds: i64, nanos: i64| if seconds > 1_500_000_000 { None } else { Some((seconds, nanos)) };
        ["mine", "theirs", "shared", "to-mine"].map(|name| {
            let meta = std::fs::symlink_metadata(at(name)).unwrap();
            (time(meta.atime(), meta.atime_nsec()), time(meta.mtime(), meta.mtime_nsec()))
        })
    };
    // (the fixture's mode, the file, the syscall its event has)
    let cases = [
        ("utimensat", "mine", "utimensat"),
        ("utimensat", "theirs", "utimensat"),
        ("utimensat", "shared", "utimensat"),
        ("now", "theirs", "utimensat"),
        ("now", "shared", "utimensat"),
        ("utimensat", "to-mine", "utimensat"),
        ("lutimensat", "to-mine", "utimensat"),
        ("omit-access", "mine", "utimensat"),
        ("omit-both", "missing", "utimensat"),
        ("utimensat", "missing", "utimensat"),
        ("invalid", "mine", "utimensat"),
        ("futimens", "mine", "utimensat"),
        ("futimens", "theirs", "utimensat"),
        ("utimes", "mine", "utimes"),
        ("utime", "mine", "utime"),
    ];
    let real = |name: &str| format!("{}/{name}", common::real_path(dir.path().to_str().unwrap()));
    for user in WORKLOAD_USERS {
        for (mode, name, syscall) in cases {
            let command = format!("exec '{}' {mode} \"$0\"", program.display());
            // A name the kernel never looked up has no path to report as fact.
            let path = (mode != "omit-both").then(|| real(name));
            held_against_native(user, dir.path(), &command, &at(name), prepare, state, syscall, path.as_deref());
        }
    }
}

/// A workload that confines itself with Landlock stays confined: the
/// tracer, outside its domain, stops making its calls (they go to ptrace,
/// where the kernel runs the workload's own), so each is refused as
/// natively. Held against the same program run natively.
#[test]
fn a_landlocked_workload_stays_confined() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("file");
    std::fs::write(&file, "x").unwrap();
    let program = fixture("landlock");
    let args = [program.as_os_str(), file.as_os_str(), dir.path().as_os_str()];
    let native = std::process::Command::new(&program).args(&args[1..]).output().unwrap();
    if native.status.code() == Some(4) {
        return common::skip("needs a kernel with Landlock");
    }
    let native = String::from_utf8(native.stdout).unwrap();
    assert!(native.lines().all(|l| l.ends_with(" 13")), "natively every call is refused: {native}");
    for name in ["made", "new", "victim"] {
        let _ = std::fs::remove_dir(dir.path().join(name));
        let _ = std::fs::remove_file(dir.path().join(name));
    }
    let run = Trace::with_flags(&["--stats"], &args).run();
    assert_eq!(run.code(), Some(0), "{}", run.stderr);
    assert_eq!(run.stdout, native, "{}", run.stderr);
    assert!(run.stderr.contains("confined itself with Landlock"), "{}", run.stderr);
    for (syscall, path) in [("mkdir", "made"), ("unlink", "victim")] {
        let path = common::real_path(dir.path().join(path).to_str().unwrap());
        let events: Vec<_> =
            run.events.iter().filter(|e| e["syscall"] == syscall && e["file"]["path"] == path.as_str()).collect();
        assert_eq!(events.iter().map(|e| retval(e)).collect::<Vec<_>>(), [-i64::from(libc::EACCES)], "{}", run.stderr);
    }
}

/// A workload that reads the marker of a sibling's bounced call and puts it
/// on a call of its own does not get that call past the tracer's own
/// making of it: the marker is taken off and the call is supervised.
#[test]
fn a_marker_a_workload_forges_buys_it_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let program = fixture("forged_marker");
    let run = Trace::with_flags(&["--stats"], &[program.as_os_str(), dir.path().as_os_str()]).run();
    assert_eq!(run.code(), Some(0), "{}", run.stderr);
    let said = lines(&run);
    assert_ne!(said["marker"], ["0"], "the bounced open's marker was in /proc: {}", run.stdout);
    assert_eq!(said["mkdir"], ["0"], "{}", run.stderr);
    assert!(run.stderr.contains("carried the tracer's marker"), "{}", run.stderr);
    let made = common::real_path(dir.path().join("made").to_str().unwrap());
    let mkdirs: Vec<_> = run.events.iter().filter(|e| e["syscall"] == "mkdirat").collect();
    assert_eq!(mkdirs.len(), 1, "{:#?}", run.events);
    assert_eq!((&mkdirs[0]["file"]["path"], retval(mkdirs[0])), (&serde_json::json!(made), 0), "{:#}", mkdirs[0]);
    // A marked O_TMPFILE open is reported as any other: the marker hides
    // no call.
    let tmpfile: i64 = said["tmpfile"][0].parse().unwrap();
    assert!(tmpfile >= 0, "{}", run.stdout);
    let tmpfiles: Vec<_> = run
        .of("open")
        .into_iter()
        .filter(|e| {
            e["open"]["flags"].as_i64().is_some_and(|f| f & i64::from(libc::O_TMPFILE) == i64::from(libc::O_TMPFILE))
        })
        .collect();
    assert_eq!(tmpfiles.iter().map(|e| retval(e)).collect::<Vec<_>>(), [tmpfile], "{:#?}", run.events);
}

/// A workload with a fanotify group of permission events opens its files
/// itself: the tracer stops making its calls (its own open would wait on the
/// workload's answer, with every tracee). The kernel names the opener.
#[test]
fn a_workload_s_fanotify_permission_group_sees_its_own_opens() {
    if !common::require_root(&[common::CAP_SYS_ADMIN], "make a fanotify group with permission events") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("file");
    std::fs::write(&file, "x").unwrap();
    let program = fixture("fanotify_perm");
    let run = Trace::with_flags(&["--stats"], &[program.as_os_str(), file.as_os_str()]).run();
    if run.code() == Some(4) {
        return common::skip("needs a kernel with fanotify permission events");
    }
    assert_eq!(run.code(), Some(0), "{}", run.stderr);
    let said = lines(&run);
    assert_eq!(said["opener"], said["child"], "{}", run.stdout);
    assert!(run.stderr.contains("made a fanotify group with permission events"), "{}", run.stderr);
}

/// An exec can change a process's credentials (a set-user-id program): the
/// new program's opens are made with the credentials it has after the exec,
/// not those the tracer knew its shell (and so the forked child) to have.
/// Each run held against the same run natively: a set-user-id root `cat`
/// reads a root-only file for user 1000, a set-user-id 1000 one cannot for
/// root.
#[test]
fn a_set_user_id_program_opens_with_the_credentials_its_exec_gave_it() {
    use std::os::unix::fs::chown;
    if !is_root() {
        return common::skip("needs root to make set-user-id programs");
    }
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let secret = dir.path().join("secret");
    std::fs::write(&secret, "x").unwrap();
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
    for (owner, (flags, native_as)) in [(0, WORKLOAD_USERS[1]), (1000, WORKLOAD_USERS[0])] {
        let program = dir.path().join(format!("cat-{owner}"));
        std::fs::copy("/bin/cat", &program).unwrap();
        chown(&program, Some(owner), Some(owner)).unwrap();
        std::fs::set_permissions(&program, std::fs::Permissions::from_mode(0o4755)).unwrap();
        let native = std::process::Command::new("setpriv").args(native_as).arg(&program).arg(&secret).status();
        let native = native.unwrap().code();
        assert_eq!(native, Some(if owner == 0 { 0 } else { 1 }), "{program:?} natively");
        // Forked by a shell that made opens of its own first.
        let command = "\"$0\" \"$1\"; exit $?";
        let args = ["sh".as_ref(), "-c".as_ref(), command.as_ref(), program.as_os_str(), secret.as_os_str()];
        let run = run(flags, None, dir.path(), &args);
        assert_eq!(run.code(), native, "{program:?}: {}", run.stderr);
        let opens = run.opens_of(&common::real_path(secret.to_str().unwrap()));
        assert_eq!(opens.len(), 1, "{program:?}: {:#?}", run.of("open"));
        match native {
            Some(0) => assert!(retval(opens[0]) >= 0, "{program:?}: {:#}", opens[0]),
            _ => assert_eq!(retval(opens[0]), -libc::EACCES as i64, "{program:?}: {:#}", opens[0]),
        }
        assert!(run.stat("supervised_calls") > 0, "{}", run.stderr);
    }
}

/// A child cloned into a mount namespace of its own is not in the tracer's:
/// the tracer does not take on what it knew of the parent for it, and the
/// child's open is its own (sent back to ptrace), on its own namespace's
/// mount, as the child's descriptor says (statx's mount id), where the
/// parent's, made before, was the tracer's to make.
#[test]
fn a_child_cloned_into_its_own_mount_namespace_opens_on_its_own_mounts() {
    if !common::require_root(&[common::CAP_SYS_ADMIN], "clone(CLONE_NEWNS)") {
        return;
    }
    let (dir, program) = workspace("clone_ns");
    let file = dir.path().join("file");
    std::fs::write(&file, "x").unwrap();
    let run = run(&[], None, dir.path(), &[program.as_os_str(), file.as_os_str()]);
    assert_eq!(run.code(), Some(0), "{}", run.stderr);
    let said: Vec<(u32, u64)> = run
        .stdout
        .lines()
        .map(|l| l.split(' ').collect::<Vec<_>>())
        .map(|w| (w[0].parse().unwrap(), w[1].parse().unwrap()))
        .collect();
    let [(parent, parent_mount), (child, child_mount)] = said[..] else { panic!("{}", run.stdout) };
    // A new namespace's mounts are new mounts: the same id would be a file
    // the tracer opened in its own namespace and handed to the child.
    assert_ne!(parent_mount, child_mount, "the child's file is on the tracer's mount: {}", run.stderr);
    let opens = run.opens_of(&common::real_path(file.to_str().unwrap()));
    for (pid, mount) in [(parent, parent_mount), (child, child_mount)] {
        let of: Vec<_> = opens.iter().filter(|e| e["pid"] == pid).collect();
        assert_eq!(of.len(), 1, "{pid}: {opens:#?}");
        assert_eq!(of[0]["open"]["mount_id"], mount.to_string(), "{pid}: {:#}", of[0]);
    }
    assert!(run.stat("supervised_calls") > 0 && run.stat("bounced_calls") > 0, "{}", run.stderr);
}
