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
        let exec = run.one("exec", "path", &common::real_path("/bin/true"));
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

#[test]
fn loader_variables_past_many_others_are_reported_for_a_failed_exec_too() {
    in_both_modes(&[fixture("envexec")], |run| {
        assert_eq!(run.code(), Some(0), "{}", run.stderr);
        let failed = run.one("exec", "path", "/nonexistent/program");
        assert_eq!(retval(failed), -(libc::ENOENT as i64));
        assert_eq!(failed["exec"]["envs"][0], "LD_PRELOAD=/evil.so");
        assert_eq!(failed["exec"]["envs"][1], "V0000=x");
        assert_eq!(failed["exec"]["envs_truncated"], true);
    });
}

/// An event's timestamp ("YYYY-MM-DDTHH:MM:SS[.f]+00:00", 0 to 9 fraction
/// digits, UTC) as a key that orders as time does.
fn time_key(event: &serde_json::Value) -> (String, u64) {
    let text = event["timestamp"].as_str().unwrap();
    let text = text.strip_suffix("+00:00").or_else(|| text.strip_suffix('Z')).unwrap();
    let (date, time) = text.split_once('T').unwrap();
    let (clock, fraction) = time.split_once('.').unwrap_or((time, ""));
    let seconds = clock.split(':').fold(0, |total, part| total * 60 + part.parse::<u64>().unwrap());
    let nanos: u64 = format!("{fraction:0<9}").parse().unwrap();
    (date.to_owned(), seconds * 1_000_000_000 + nanos)
}

#[test]
fn no_event_of_a_child_is_stamped_before_its_fork() {
    in_both_modes(&[fixture("vforks")], |run| {
        assert_eq!(run.code(), Some(0), "{}", run.stderr);
        let forks = run.of("fork");
        assert_eq!(forks.len(), 40);
        for fork in forks {
            let child = fork["fork"]["child_pid"].as_i64().unwrap();
            let events: Vec<_> = run.events.iter().filter(|e| pid_of(e) == child).collect();
            assert!(events.len() >= 2, "{events:#?}");
            for event in events {
                assert!(time_key(event) >= time_key(fork), "{event:#}\nbefore its fork\n{fork:#}");
            }
        }
    });
}

#[test]
fn the_parent_is_the_one_at_the_time_of_the_call() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("fifo");
    in_both_modes(&[fixture("orphan").to_str().unwrap(), fifo.to_str().unwrap()], |run| {
        let _ = std::fs::remove_file(&fifo);
        assert_eq!(run.code(), Some(0), "{}", run.stderr);
        let ids: Vec<i64> =
            run.stdout.trim().split(' ').map(|kv| kv.split_once('=').unwrap().1.parse().unwrap()).collect();
        let (parent, child) = (ids[0], ids[1]);
        let opens: Vec<_> = run.of("open").into_iter().filter(|e| pid_of(e) == child).collect();
        assert_eq!(opens.len(), 1, "{opens:#?}");
        assert_eq!(opens[0]["open"]["path"], fifo.to_str().unwrap());
        assert!(retval(opens[0]) >= 0);
        // The open was entered while its parent lived, and returned after its death.
        assert_eq!(opens[0]["ppid"].as_i64(), Some(parent));
        let exit = run.of("exit").into_iter().find(|e| pid_of(e) == child).unwrap();
        assert_ne!(exit["ppid"].as_i64(), Some(parent), "by its exit, the parent is gone");
    });
}

#[test]
fn a_restarted_call_is_reported_once_and_eintr_only_when_the_program_gets_it() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("fifo");
    in_both_modes(&[fixture("restart").to_str().unwrap(), fifo.to_str().unwrap()], |run| {
        let _ = std::fs::remove_file(&fifo);
        assert_eq!((run.code(), run.stdout.as_str()), (Some(0), "0 0 -4\n"), "{}", run.stderr);
        let parent = pid_of(run.of("exec")[0]);
        let opens: Vec<i64> = run
            .opens_of(fifo.to_str().unwrap())
            .into_iter()
            .filter(|e| pid_of(e) == parent)
            .map(|e| retval(e).min(0))
            .collect();
        assert_eq!(opens, [0, 0, -(libc::EINTR as i64)]);
    });
}

#[test]
fn a_restarted_call_of_an_i386_program_is_reported_once_too() {
    let Some(program) = common::fixture_i386("restart") else { return };
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("fifo");
    // Without SA_SIGINFO the kernel builds a sigframe_ia32, with it an rt_sigframe_ia32.
    for handler in ["plain", "siginfo"] {
        in_both_modes(&[program.to_str().unwrap(), fifo.to_str().unwrap(), handler], |run| {
            let _ = std::fs::remove_file(&fifo);
            assert_eq!((run.code(), run.stdout.as_str()), (Some(0), "0 0 -4\n"), "{}", run.stderr);
            let parent = pid_of(run.of("exec")[0]);
            let opens: Vec<_> =
                run.opens_of(fifo.to_str().unwrap()).into_iter().filter(|e| pid_of(e) == parent).collect();
            assert!(opens.iter().all(|e| e["abi"] == "ABI_I386"), "{opens:#?}");
            let results: Vec<i64> = opens.iter().map(|e| retval(e).min(0)).collect();
            assert_eq!(results, [0, 0, -(libc::EINTR as i64)], "{handler}");
        });
    }
}

#[test]
fn a_script_reports_the_caller_s_argv_and_the_interpreter_the_kernel_ran() {
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().canonicalize().unwrap().join("script.sh");
    std::fs::write(&script, "#!/bin/sh -e\necho \"$0|$1|$2\"\n").unwrap();
    std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let path = script.to_str().unwrap();
    let command = ["bash", "-c", "exec -a chosen-name \"$1\" one 'two words'", "bash", path];
    in_both_modes(&command, |run| {
        assert_eq!((run.code(), run.stdout.clone()), (Some(0), format!("{path}|one|two words\n")), "{}", run.stderr);
        let exec = run.one("exec", "path", script.to_str().unwrap());
        assert_eq!(exec["exec"]["args"], json!(["chosen-name", "one", "two words"]));
        assert_eq!(exec["exec"]["interpreter"], json!(["/bin/sh", "-e", path]));
        assert_eq!(exec.get("partial"), None);
        // A program's own exec has no interpreter.
        assert_eq!(run.of("exec")[0]["exec"].get("interpreter"), None);
    });
}

#[test]
fn paths_are_resolved_as_the_kernel_resolves_them() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().canonicalize().unwrap().to_str().unwrap().to_owned();
    for flags in [&[] as &[&str], &["--disable-seccomp"]] {
        for entry in std::fs::read_dir(&base).unwrap() {
            let entry = entry.unwrap().path();
            let _ = std::fs::remove_dir_all(&entry).or_else(|_| std::fs::remove_file(&entry));
        }
        let run = Trace::with_flags(flags, &[fixture("resolve").to_str().unwrap(), &base]).run();
        assert_eq!(
            (run.code(), run.stdout.as_str()),
            (Some(0), "unlink 0\nexec -1\nunlink 0\njailed 0\n"),
            "{}",
            run.stderr
        );
        let unlinks: Vec<(&str, i64)> = run
            .of("file")
            .iter()
            .filter(|e| e["file"]["operation"] == "FILE_OPERATION_UNLINK")
            .map(|e| (e["file"]["path"].as_str().unwrap(), retval(e)))
            .collect();
        let at = |path: &str| format!("{base}/{path}");
        assert_eq!(
            unlinks,
            [
                // The symlink is followed before `..`, as the kernel does.
                (at("real/victim").as_str(), 0),
                // The working directory's ancestor was renamed meanwhile.
                (at("moved/b/f").as_str(), 0),
                // "/secret" in a chroot is a file in the jail.
                (at("jail/secret").as_str(), 0),
            ],
            "{flags:?}"
        );
        let failed = run.one("exec", "path", &at("real/missing"));
        assert_eq!(retval(failed), -(libc::ENOENT as i64));
    }
}

#[test]
fn root_mount_and_namespace_changes_are_reported() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().canonicalize().unwrap().to_str().unwrap().to_owned();
    let own_mnt = std::fs::read_link("/proc/self/ns/mnt").unwrap();
    for flags in [&[] as &[&str], &["--disable-seccomp"]] {
        for name in ["mnt", "jail"] {
            let _ = std::fs::remove_dir(format!("{base}/{name}"));
        }
        let run = Trace::with_flags(flags, &[fixture("namespaces").to_str().unwrap(), &base]).run();
        assert_eq!(run.code(), Some(0), "{}", run.stderr);
        let changes: Vec<serde_json::Value> = run
            .of("namespace")
            .iter()
            .map(|e| {
                let mut ns = e["namespace"].clone();
                ns["syscall"] = e["syscall"].clone();
                ns["retval"] = e["retval"].clone();
                ns
            })
            .collect();
        assert_eq!(changes.len(), 6, "{changes:#?}");
        let mounted = format!("{base}/mnt");
        let (newns, private) = (libc::CLONE_NEWNS as u64, libc::MS_REC | libc::MS_PRIVATE);
        assert_eq!(
            changes[0],
            json!({"syscall": "unshare", "retval": "0", "flags": newns.to_string(), "flag_names": ["CLONE_NEWNS"]})
        );
        assert_eq!(
            changes[1],
            json!({"syscall": "mount", "retval": "0", "path": "/", "source": "none", "flags": private.to_string(),
                   "flag_names": ["MS_REC", "MS_PRIVATE"]})
        );
        assert_eq!(
            changes[2],
            json!({"syscall": "mount", "retval": "0", "path": mounted, "source": "tmpfs", "fstype": "tmpfs"})
        );
        assert_eq!(changes[3], json!({"syscall": "umount2", "retval": "0", "path": mounted}));
        // The namespace the descriptor names is the new one, not the tracer's.
        let setns = &changes[4];
        assert_eq!((&setns["syscall"], &setns["retval"]), (&json!("setns"), &json!("0")));
        assert!(setns["namespace"].as_str().unwrap().starts_with("mnt:["));
        assert_ne!(setns["namespace"].as_str().unwrap(), own_mnt.to_str().unwrap());
        assert_eq!(setns["flags"], newns.to_string());
        assert_eq!(changes[5], json!({"syscall": "chroot", "retval": "0", "path": format!("{base}/jail")}));
    }
}

#[test]
fn paths_deeper_than_path_max_are_reported_whole() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().canonicalize().unwrap().to_str().unwrap().to_owned();
    let deep = format!("{base}{}/f", format!("/{}", "d".repeat(200)).repeat(30));
    for flags in [&[] as &[&str], &["--disable-seccomp"]] {
        let _ = std::fs::remove_dir_all(format!("{base}/{}", "d".repeat(200)));
        let run = Trace::with_flags(flags, &[fixture("deep").to_str().unwrap(), &base]).run();
        assert_eq!(run.code(), Some(0), "{}", run.stderr);
        let created = run.opens_of(&deep);
        assert_eq!(created.len(), 1, "{:#?}", run.of("open"));
        assert!(retval(created[0]) >= 0);
        let unlink = run.one("file", "operation", "FILE_OPERATION_UNLINK");
        assert_eq!(unlink["file"]["path"], deep.as_str(), "{flags:?}");
        assert_eq!(unlink.get("partial"), None);
        let exec = run.one("exec", "path", "/nonexistent/program");
        assert_eq!(exec["exec"]["cwd"], deep.strip_suffix("/f").unwrap());
    }
}

#[test]
fn file_events_identify_the_file_whatever_its_name() {
    use std::os::unix::fs::MetadataExt;
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().canonicalize().unwrap().to_str().unwrap().to_owned();
    // rm through a symlink and `..`, then through a private bind mount.
    let script = r#"cd "$1" && rm link/../victim && unshare -m sh -c 'mount --make-rprivate / && mount --bind real view && rm view/bound'"#;
    for flags in [&[] as &[&str], &["--disable-seccomp"]] {
        for path in ["real", "view", "link"] {
            let _ = std::fs::remove_dir_all(format!("{base}/{path}"))
                .or_else(|_| std::fs::remove_file(format!("{base}/{path}")));
        }
        std::fs::create_dir_all(format!("{base}/real/sub")).unwrap();
        std::fs::create_dir(format!("{base}/view")).unwrap();
        std::os::unix::fs::symlink("real/sub", format!("{base}/link")).unwrap();
        let files: Vec<std::fs::Metadata> = ["victim", "bound"]
            .iter()
            .map(|name| {
                std::fs::write(format!("{base}/real/{name}"), "x").unwrap();
                std::fs::metadata(format!("{base}/real/{name}")).unwrap()
            })
            .collect();
        let run = Trace::with_flags(flags, &["sh", "-c", script, "sh", &base]).run();
        assert_eq!(run.code(), Some(0), "{}", run.stderr);
        let unlinks: Vec<_> =
            run.of("file").into_iter().filter(|e| e["file"]["operation"] == "FILE_OPERATION_UNLINK").collect();
        assert_eq!(unlinks.len(), 2, "{unlinks:#?}");
        for (unlink, file) in unlinks.iter().zip(&files) {
            assert_eq!(unlink["file"]["device"], file.dev().to_string(), "{unlink:#}");
            assert_eq!(unlink["file"]["inode"], file.ino().to_string(), "{unlink:#}");
            assert!(unlink["file"]["mount_id"].as_str().unwrap().parse::<u64>().is_ok());
        }
        assert_eq!(unlinks[0]["file"]["path"], format!("{base}/real/victim"));
        // Through the bind mount: the name it had there, and the same file.
        assert_eq!(unlinks[1]["file"]["path"], format!("{base}/view/bound"));
    }
}
