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

/// The count `name=N` of the `--stats` line.
fn stat(run: &Run, name: &str) -> u64 {
    let line = run.stderr.lines().find(|l| l.contains("stats:")).unwrap_or_else(|| panic!("{}", run.stderr));
    let value = line.split_whitespace().find_map(|w| w.strip_prefix(&format!("{name}=")));
    value.unwrap_or_else(|| panic!("no {name} in {line}")).parse().unwrap()
}

fn lines(run: &Run) -> std::collections::HashMap<&str, Vec<&str>> {
    run.stdout.lines().map(|l| l.split_once(' ').unwrap()).map(|(k, v)| (k, v.split(' ').collect())).collect()
}

fn number(event: &serde_json::Value, field: &str) -> u64 {
    event["open"][field].as_str().unwrap_or_else(|| panic!("{field} in {event:#}")).parse().unwrap()
}

#[test]
fn supervised_and_bounced_opens_report_what_the_kernel_did() {
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
            // The loop's 300 opens of the file, each reported once.
            assert_eq!(file_opens.len(), 2 + 300, "{context}");
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
            // No open failed with EINTR for a signal whose handler has no
            // SA_RESTART: natively, these opens cannot be interrupted.
            assert_eq!(made["eintr"], ["0", "0", "1"], "{context}");
            assert_eq!(of("/dev/null").len(), 1 + 300, "{context}");
            let supervised = stat(&run, "supervised_opens");
            match (mode.is_empty(), switch) {
                (true, None) => {
                    assert!(supervised >= 302, "{context}");
                    assert!(stat(&run, "bounced_opens") >= 302, "{context}");
                }
                _ => assert_eq!(supervised, 0, "{context}"),
            }
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
            assert!(stat(&run, "supervised_opens") > 0, "{}", run.stderr);
        }
    }
}

#[test]
fn an_open_names_the_file_the_kernel_opened_whatever_a_sibling_writes_in_its_path() {
    const COUNT: usize = 500;
    let (dir, program) = workspace("attack_paths");
    for (user, (flags, tracer_uid)) in users().into_iter().enumerate() {
        // Each user's own files: the fixture makes them readable by their owner only.
        let files = dir.path().join(format!("files-{user}"));
        std::fs::create_dir_all(&files).unwrap();
        std::fs::set_permissions(&files, std::fs::Permissions::from_mode(0o777)).unwrap();
        let count = COUNT.to_string();
        let args = [program.as_os_str(), files.as_os_str(), count.as_ref(), "read".as_ref()];
        let run = run(flags, tracer_uid, dir.path(), &args);
        let context = format!("{flags:?} tracer uid {tracer_uid:?}: {}", run.stderr);
        assert_eq!(run.code(), Some(0), "{context}");
        let opened: Vec<&str> = run.stdout.lines().collect();
        let path_of = |name: &str| common::real_path(files.join(name).to_str().unwrap());
        let inode_of = |name: &str| std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(files.join(name)).unwrap());
        let events: Vec<_> = run
            .of("open")
            .into_iter()
            .filter(|e| e["open"]["flags"] == libc::O_CLOEXEC)
            .filter(|e| ["a", "b"].iter().any(|n| e["open"]["path"] == path_of(n).as_str()))
            .collect();
        assert_eq!(events.len(), COUNT, "{context}");
        for (event, name) in events.iter().zip(&opened) {
            assert_eq!(event["open"]["path"], path_of(name).as_str(), "{context}: {event:#}");
            assert_eq!(number(event, "inode"), inode_of(name), "{context}: {event:#}");
            assert!(event.get("unverified").is_none(), "{context}: {event:#}");
        }
        let flips = opened.iter().filter(|n| **n == "b").count();
        eprintln!("{context}: {flips} of {COUNT} opens reached b");
        assert!(stat(&run, "supervised_opens") >= COUNT as u64, "{context}");
    }
}
