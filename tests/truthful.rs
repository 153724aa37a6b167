//! Issue 10, truthful events: facts a workload can bend without any race
//! (names that are bytes, loader variables far down the environment, which
//! thread exec'd, when a child was born, who its parent was, restarted
//! calls) are reported as the kernel has them, in both tracing modes.

mod common;

use common::{fixture, pid_of, retval, Run, Trace};
use cws_instrumentation::text;
use serde_json::json;

/// Runs `command` with the seccomp filter and with `--disable-seccomp`;
/// `check` must hold for both runs.
fn in_both_modes<S: AsRef<std::ffi::OsStr>>(command: &[S], check: impl Fn(&Run)) {
    for flags in [&[] as &[&str], &["--disable-seccomp"]] {
        let run = Trace::with_flags(flags, command).run();
        eprintln!("mode {flags:?}");
        check(&run);
    }
}

#[test]
fn names_that_differ_only_in_invalid_bytes_are_reported_differently() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().canonicalize().unwrap().to_str().unwrap().to_owned();
    in_both_modes(&[fixture("names").to_str().unwrap(), &base], |run| {
        assert_eq!(run.code(), Some(0), "{}", run.stderr);
        let names = [r"\xff", r"\xfe", "\u{fffd}", r"a\\xff"];
        let expected: Vec<String> = names.iter().map(|n| format!("{base}/{n}")).collect();
        let opened: Vec<&str> = run
            .of("open")
            .into_iter()
            .map(|e| e["open"]["path"].as_str().unwrap())
            .filter(|p| p.starts_with(&base))
            .collect();
        assert_eq!(opened, expected);
        let unlinked: Vec<&str> = run.of("file").iter().map(|e| e["file"]["path"].as_str().unwrap()).collect();
        assert_eq!(unlinked, expected);
        // The escaping reverses to the bytes the files had.
        let raw: [&[u8]; 4] = [b"\xff", b"\xfe", "\u{fffd}".as_bytes(), br"a\xff"];
        for (text, raw) in unlinked.iter().zip(raw) {
            assert_eq!(text::bytes(text).unwrap(), [format!("{base}/").as_bytes(), raw].concat());
        }
        let exec = run.one("exec", "path", "/bin/true");
        assert_eq!(exec["exec"]["args"], json!(["true", r"\xff", "\u{fffd}", r"a\\b"]));
    });
}

#[test]
fn a_process_name_that_is_not_utf8_does_not_blind_the_tracer() {
    in_both_modes(&[fixture("comm")], |run| {
        assert_eq!(run.code(), Some(0), "{}", run.stderr);
        let uid = nix::unistd::getuid().as_raw();
        let gid = nix::unistd::getgid().as_raw();
        let parent = pid_of(run.of("exec")[0]);
        let changes = run.of("credentials");
        assert_eq!(changes.len(), 2, "{changes:#?}");
        let (setresuid, setresgid) = (changes[0], changes[1]);
        assert_eq!((setresuid["syscall"].as_str(), retval(setresuid)), (Some("setresuid"), 0));
        assert_eq!(setresuid.get("partial"), None);
        assert_eq!(setresuid["credentials"]["credentials"]["uid"], uid);
        assert_eq!(setresuid["credentials"]["credentials"]["suid"], uid);
        assert_eq!(pid_of(setresuid), parent);
        // The child inherited the name: its parent and credentials are read all the same.
        assert_eq!(setresgid["syscall"], "setresgid");
        assert_eq!(setresgid.get("partial"), None);
        assert_eq!(setresgid["credentials"]["credentials"]["gid"], gid);
        assert_eq!(setresgid["ppid"].as_i64(), Some(parent));
        let fork = &run.of("fork")[0];
        assert_eq!(fork["fork"]["child_pid"].as_i64(), Some(pid_of(setresgid)));
    });
}

#[test]
fn loader_variables_past_a_large_environment_are_reported() {
    // Command orders the environment by name: 300 KiB of variables come first.
    let filler: Vec<(String, String)> = (0..300).map(|i| (format!("A{i:03}"), "v".repeat(1020))).collect();
    for flags in [&[] as &[&str], &["--disable-seccomp"]] {
        let mut trace = Trace::with_flags(flags, &["/bin/true"]);
        let command = trace.command().env_clear().envs(filler.iter().cloned());
        command.env("LD_PRELOAD", "libc.so.6").env("PATH", "/usr/bin:/bin").env("ZZ", "last");
        let run = trace.run();
        assert_eq!(run.code(), Some(0), "{}", run.stderr);
        let exec = &run.of("exec")[0]["exec"];
        assert_eq!(exec["envs"][0], "LD_PRELOAD=libc.so.6", "{flags:?}");
        assert_eq!(exec["envs"][1], "PATH=/usr/bin:/bin");
        assert_eq!(exec["envs"][2].as_str().unwrap()[..10], *"A000=vvvvv");
        assert_eq!(exec["envs_truncated"], true);
    }
}
