//! A workload that knows the tracer and attacks it: one attacker program
//! per threat class (tests/fixtures/attack_*.c), run under the real tracer,
//! checked against what the kernel answered the attacker.

mod common;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use common::{fixture, pid_of, retval, users, Run, Trace};

const MODES: [&[&str]; 2] = [&[], &["--disable-seccomp"]];

fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// A directory anyone may enter, for files an unprivileged workload reads.
fn open_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    dir
}

/// A copy of `program` that user nobody can run (the build tree may not be
/// open to it).
fn runnable_by_anyone(dir: &Path, program: &Path) -> PathBuf {
    let copy = dir.join(program.file_name().unwrap());
    // Written by another process: a descriptor open for writing in this one
    // would be inherited by the programs other tests fork meanwhile, and
    // make running the copy fail with ETXTBSY until they exec.
    let status = std::process::Command::new("install").arg("-m755").arg(program).arg(&copy).status().unwrap();
    assert!(status.success());
    copy
}

fn ptrace_events(run: &Run) -> Vec<(String, i64, i64)> {
    run.of("ptrace")
        .into_iter()
        .map(|e| {
            let name = e["ptrace"]["request_name"].as_str().unwrap().to_owned();
            (name, e["ptrace"]["pid"].as_str().map_or(0, |p| p.parse().unwrap()), retval(e))
        })
        .collect()
}

#[test]
fn a_workload_gets_no_seccomp_listener_to_run_calls_unseen() {
    let dir = open_dir();
    let marker = dir.path().join("marker");
    std::fs::write(&marker, "x").unwrap();
    let program = runnable_by_anyone(dir.path(), &fixture("attack_notify"));
    let users: &[&[&str]] = if is_root() { &[&[], &["--uid", "65534", "--gid", "65534"]] } else { &[&[]] };
    for user in users {
        for mode in MODES {
            let flags = [*user, mode].concat();
            let run = Trace::with_flags(&flags, &[&program, &marker]).run();
            assert_eq!(run.code(), Some(0), "{flags:?}: {}", run.stderr);
            let seccomp = run.one("seccomp", "operation_name", "SECCOMP_SET_MODE_FILTER");
            assert_eq!(seccomp["seccomp"]["flags"], "8", "SECCOMP_FILTER_FLAG_NEW_LISTENER");
            assert_eq!(seccomp["seccomp"]["instructions"], 4);
            if mode.is_empty() {
                // The tracer's filter holds the only listener the kernel allows.
                assert_eq!(run.stdout, "listener: EBUSY\nopen: ok\n", "{flags:?}");
                assert_eq!(retval(seccomp), -i64::from(libc::EBUSY));
            } else {
                // Without a filter of the tracer's, the workload gets its
                // listener; the syscall-entry stop still comes first.
                assert_eq!(run.stdout, "listener: granted\nopen: ok\n", "{flags:?}");
                assert!(retval(seccomp) >= 0);
            }
            let opens = run.opens_of(marker.to_str().unwrap());
            assert_eq!(opens.len(), 1, "{flags:?}: the open is seen: {:#?}", run.events);
            assert!(retval(opens[0]) >= 0);
        }
    }
}

#[test]
fn a_workload_cannot_attach_to_the_tracer_or_touch_its_memory() {
    let expected = "tracer: found\nthreads: EPERM\nattach: EPERM\nmem: EACCES\nprocess_vm_readv: EPERM\n";
    let dir = open_dir();
    let program = runnable_by_anyone(dir.path(), &fixture("attack_tracer"));
    // A root tracer and workload with every capability (CAP_SYS_PTRACE
    // included); and a tracer that is not root, whose workload has its uid.
    let tracers: &[Option<u32>] = if is_root() { &[None, Some(65534)] } else { &[None] };
    for &tracer_uid in tracers {
        for mode in MODES {
            let mut trace = Trace::with_flags(mode, &[&program]);
            if let Some(uid) = tracer_uid {
                trace = trace.run_by_user(uid, dir.path());
            }
            let child = trace.spawn();
            let tracer = i64::from(child.id());
            let run = trace.finish(child);
            let context = format!("tracer uid {tracer_uid:?}, {mode:?}: {}", run.stderr);
            assert_eq!((run.code(), run.stdout.as_str()), (Some(0), expected), "{context}");
            // Every attempt is an event, and the kernel refused each.
            let attempts = ptrace_events(&run);
            assert!(attempts.iter().all(|(_, _, rv)| *rv == -i64::from(libc::EPERM)), "{attempts:?}");
            // Each of the tracer's threads, the tracer process among them.
            let seized: Vec<i64> = attempts.iter().filter(|(n, _, _)| n == "PTRACE_SEIZE").map(|a| a.1).collect();
            assert!(seized.contains(&tracer), "{attempts:?}");
            // TracerPid names the thread that owns the ptrace calls.
            let (_, tracer_thread, _) = attempts.iter().find(|(n, _, _)| n == "PTRACE_ATTACH").unwrap();
            assert!(seized.contains(tracer_thread), "{attempts:?}");
            let mem = run.opens_of(&format!("/proc/{tracer_thread}/mem"));
            assert_eq!((mem.len(), mem.first().map(|e| retval(e))), (1, Some(-i64::from(libc::EACCES))), "{context}");
        }
    }
}

#[test]
fn the_workload_runs_without_cap_sys_ptrace() {
    const CAP_SYS_PTRACE: u64 = 1 << 19;
    let run = Trace::new(&["grep", "-E", "^Cap(Prm|Eff|Bnd|Amb)", "/proc/self/status"]).run();
    assert_eq!(run.code(), Some(0), "{}", run.stderr);
    let own = std::fs::read_to_string("/proc/self/status").unwrap();
    let mask = |text: &str, key: &str| {
        let line = text.lines().find(|l| l.starts_with(key)).unwrap();
        u64::from_str_radix(line.split_whitespace().nth(1).unwrap(), 16).unwrap()
    };
    for key in ["CapPrm:", "CapEff:", "CapBnd:", "CapAmb:"] {
        let workload = mask(&run.stdout, key);
        assert_eq!(workload & CAP_SYS_PTRACE, 0, "{key} {workload:#x}");
        // Nothing else is taken away.
        assert_eq!(workload, mask(&own, key) & !CAP_SYS_PTRACE, "{key}");
    }
}

#[test]
fn the_filter_leaves_the_workload_s_speculation_controls_as_they_were() {
    // Kernels whose default forces the speculative store bypass mitigation
    // on seccomp-filtered tasks would slow the workload down (and make it
    // differ from itself untraced) without SECCOMP_FILTER_FLAG_SPEC_ALLOW.
    let run = Trace::new(&["grep", "^Speculation", "/proc/self/status"]).run();
    let own = std::fs::read_to_string("/proc/self/status").unwrap();
    let expected: String = own.lines().filter(|l| l.starts_with("Speculation")).map(|l| format!("{l}\n")).collect();
    assert_eq!((run.code(), run.stdout), (Some(0), expected));
}

#[test]
fn userfaultfd_is_refused_and_reported() {
    let device = Path::new("/dev/userfaultfd").exists();
    for mode in MODES {
        let run = Trace::with_flags(mode, &[fixture("attack_uffd")]).run();
        assert_eq!(run.code(), Some(0), "{}", run.stderr);
        let expected =
            if device { "userfaultfd: EPERM\nioctl: EPERM\n" } else { "userfaultfd: EPERM\nioctl: no device\n" };
        assert_eq!(run.stdout, expected, "{mode:?}");
        let refused: Vec<(&str, i64, &str, &str)> = run
            .of("userfaultfd")
            .into_iter()
            .map(|e| {
                let flags = e["userfaultfd"]["flags"].as_str().unwrap_or("0");
                (e["syscall"].as_str().unwrap(), retval(e), e["denied"].as_str().unwrap(), flags)
            })
            .collect();
        let reason = "userfaultfd is refused to traced workloads";
        let cloexec = libc::O_CLOEXEC.to_string();
        let mut expected = vec![("userfaultfd", -i64::from(libc::EPERM), reason, cloexec.as_str())];
        if device {
            expected.push(("ioctl", -i64::from(libc::EPERM), reason, cloexec.as_str()));
        }
        assert_eq!(refused, expected, "{mode:?}");
        assert!(run.of("userfaultfd").iter().all(|e| pid_of(e) == pid_of(run.of("exec")[0])));
    }
}

#[test]
fn a_connect_reports_the_peer_the_kernel_reached_whatever_a_sibling_writes() {
    // Two listeners that accept everything; a sibling thread flips the
    // port of the connect's address between them.
    let listeners: Vec<std::net::TcpListener> =
        (0..2).map(|_| std::net::TcpListener::bind("127.0.0.1:0").unwrap()).collect();
    let ports: Vec<String> = listeners.iter().map(|l| l.local_addr().unwrap().port().to_string()).collect();
    for listener in listeners {
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                drop(stream);
            }
        });
    }
    const COUNT: usize = 300;
    for mode in MODES {
        let count = COUNT.to_string();
        let run =
            Trace::with_flags(mode, &[fixture("attack_connect").to_str().unwrap(), &ports[0], &ports[1], &count]).run();
        assert_eq!(run.code(), Some(0), "{}", run.stderr);
        let reached: Vec<&str> = run.stdout.lines().collect();
        assert_eq!(reached.len(), COUNT);
        let connects: Vec<_> =
            run.of("connect").into_iter().filter(|e| e["connect"]["family"] == "ADDRESS_FAMILY_INET").collect();
        assert_eq!(connects.len(), COUNT);
        let mut corrected = 0;
        for (event, port) in connects.iter().zip(&reached) {
            // Every event names the port the kernel connected to.
            assert_eq!(retval(event), 0);
            assert_eq!(event["connect"]["port"].to_string(), *port, "{event:#?}");
            if event["unverified"].is_string() {
                corrected += 1;
            }
        }
        eprintln!("{mode:?}: {corrected} of {COUNT} connects had their address changed after the tracer read it");
    }
}

/// A unix connect whose address a sibling flips between two listeners:
/// an abstract name is the kernel's answer whenever it differs from the
/// one read (the event names the peer), a path that differs is marked;
/// an event without a mark names the listener the kernel connected to.
#[test]
fn a_unix_connect_reports_the_peer_the_kernel_connected_or_is_marked() {
    const COUNT: usize = 200;
    for kind in ["abstract", "path"] {
        for mode in MODES {
            let dir = open_dir();
            let dir_path = dir.path().canonicalize().unwrap();
            let count = COUNT.to_string();
            let program = fixture("attack_unix");
            let args = [program.as_os_str(), dir_path.as_os_str(), count.as_ref(), kind.as_ref()];
            let run = Trace::with_flags(mode, &args).run();
            let context = format!("{kind} {mode:?}: {}", run.stderr);
            assert_eq!(run.code(), Some(0), "{context}");
            let reached: Vec<&str> = run.stdout.lines().collect();
            assert_eq!(reached.len(), COUNT, "{context}");
            let connects: Vec<_> =
                run.of("connect").into_iter().filter(|e| e["connect"]["family"] == "ADDRESS_FAMILY_UNIX").collect();
            assert_eq!(connects.len(), COUNT, "{context}");
            let pid = pid_of(run.of("exec")[0]);
            let name = |which: &str| match kind {
                "abstract" => format!("@cws-{which}-{pid}"),
                _ => format!("{}/{which}.sock", dir_path.display()),
            };
            let mut marked = 0;
            for (event, which) in connects.iter().zip(&reached) {
                assert_eq!(retval(event), 0, "{context}: {event:#?}");
                let address = event["connect"]["address"].as_str().unwrap();
                match (event["unverified"].as_str(), kind) {
                    (None, _) | (Some(_), "abstract") => assert_eq!(address, name(which), "{context}: {event:#?}"),
                    // Marked: the name read, one of the two the sibling writes.
                    (Some(_), _) => {
                        assert!([name("a"), name("b")].contains(&address.to_owned()), "{context}: {event:#?}")
                    }
                }
                marked += usize::from(event["unverified"].is_string());
            }
            eprintln!("{context}: {marked} of {COUNT} unix connects marked");
        }
    }
}

#[test]
fn an_open_names_the_file_the_kernel_opened_whatever_a_sibling_puts_at_its_descriptor() {
    const COUNT: usize = 200;
    let dir = open_dir();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
    let (existing, decoy) = (dir.path().join("real"), dir.path().join("decoy"));
    for file in [&existing, &decoy] {
        std::fs::write(file, "x").unwrap();
        std::fs::set_permissions(file, std::fs::Permissions::from_mode(0o666)).unwrap();
    }
    let created = dir.path().join("created");
    let program = runnable_by_anyone(dir.path(), &fixture("attack_fdswap"));
    let decoy_path = common::real_path(decoy.to_str().unwrap());
    let cases = [
        ("plain", &existing, libc::O_RDONLY | libc::O_NOCTTY | libc::O_CLOEXEC),
        ("excl", &created, libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL | libc::O_CLOEXEC),
    ];
    for (flags, tracer_uid) in users() {
        for mode in MODES {
            for (kind, real, open_flags) in cases {
                let count = COUNT.to_string();
                let args = [program.as_os_str(), real.as_os_str(), decoy.as_os_str(), count.as_ref(), kind.as_ref()];
                let mut trace = Trace::with_flags(&[flags, mode].concat(), &args);
                if let Some(uid) = tracer_uid {
                    trace = trace.run_by_user(uid, dir.path());
                }
                let run = trace.run();
                let context = format!("{flags:?} tracer uid {tracer_uid:?} {mode:?} {kind}: {}", run.stderr);
                assert_eq!(run.code(), Some(0), "{context}");
                let outcomes: Vec<&str> = run.stdout.lines().collect();
                assert_eq!(outcomes.len(), COUNT, "{context}");
                let opens: Vec<_> = run.of("open").into_iter().filter(|e| e["open"]["flags"] == open_flags).collect();
                assert_eq!(opens.len(), COUNT, "{context}");
                let real_path = common::real_path(real.to_str().unwrap());
                let mut unverified = 0;
                for (event, outcome) in opens.iter().zip(&outcomes) {
                    assert!(retval(event) >= 0, "{event:#?}");
                    let path = event["open"]["path"].as_str().unwrap();
                    match (event["unverified"].as_str(), *outcome) {
                        // Reported as fact: it must be the file the kernel opened.
                        (None, _) => assert_eq!(path, real_path, "{context}: {event:#?}"),
                        // The decoy came in time: the event names it, and says it could not be confirmed.
                        (Some(why), "swapped") => {
                            assert_eq!(path, decoy_path, "{context}: {event:#?}");
                            assert!(why.contains(&real_path), "{why}");
                            unverified += 1;
                        }
                        // No other file was ever at the descriptor: nothing to doubt.
                        (Some(_), outcome) => panic!("{context}: {outcome}: {event:#?}"),
                    }
                }
                let swapped = outcomes.iter().filter(|o| **o == "swapped").count();
                eprintln!("{context}: {swapped} of {COUNT} descriptors swapped, {unverified} events unverified");
            }
        }
    }
}

#[test]
fn a_path_a_sibling_rewrites_during_the_call_is_reported_as_the_kernel_used_it_or_marked() {
    const COUNT: usize = 200;
    let program_dir = open_dir();
    let program = runnable_by_anyone(program_dir.path(), &fixture("attack_paths"));
    // (mode, the syscall its events have, what follows the kernel's choice
    // in the path, who flips: a sibling thread, or another process through
    // a shared mapping, which the tracer cannot see share anything). Under
    // ptrace, a truncate by another process's path is the residual README
    // states (no effect on names to look for): in seccomp mode only.
    let cases = [
        ("unlink", "unlink", "", "thread"),
        ("mkdir", "mkdir", "", "thread"),
        ("open", "openat", "/x", "thread"),
        ("dirfd", "unlinkat", "/victim", "thread"),
        ("chmod", "chmod", "", "thread"),
        ("fchmod", "fchmod", "", "thread"),
        ("truncate", "truncate", "", "thread"),
        ("ftruncate", "ftruncate", "", "thread"),
        ("setxattr", "setxattr", "", "thread"),
        ("utimensat", "utimensat", "", "thread"),
        ("unlink", "unlink", "", "process"),
        ("mkdir", "mkdir", "", "process"),
        ("truncate", "truncate", "", "process"),
    ];
    let expected_retval = |kind: &str, choice: &str| match (kind, choice) {
        ("open", "n") => -i64::from(libc::ENOENT),
        ("open", _) => -i64::from(libc::ENOTDIR),
        _ => 0,
    };
    for (flags, tracer_uid) in users() {
        for mode in MODES {
            for (kind, syscall, rest, by) in cases {
                if (kind, by, mode.is_empty()) == ("truncate", "process", false) {
                    continue;
                }
                let dir = open_dir();
                std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
                let dir_path = dir.path().canonicalize().unwrap();
                let count = COUNT.to_string();
                let args = [program.as_os_str(), dir_path.as_os_str(), count.as_ref(), kind.as_ref(), by.as_ref()];
                let mut trace = Trace::with_flags(&[flags, mode, &["--stats"]].concat(), &args);
                if let Some(uid) = tracer_uid {
                    trace = trace.run_by_user(uid, program_dir.path());
                }
                let run = trace.run();
                let context = format!("{flags:?} tracer uid {tracer_uid:?} {mode:?} {kind} by {by}: {}", run.stderr);
                assert_eq!(run.code(), Some(0), "{context}");
                let choices: Vec<&str> = run.stdout.lines().collect();
                assert_eq!(choices.len(), COUNT, "{context}");
                let calls: Vec<_> = run
                    .events
                    .iter()
                    .filter(|e| e["syscall"] == syscall)
                    .filter(|e| {
                        kind != "open" || e["open"]["flags"] == libc::O_RDONLY | libc::O_NOCTTY | libc::O_CLOEXEC
                    })
                    .collect();
                assert_eq!(calls.len(), COUNT, "{context}");
                let mut unverified = 0;
                for (event, choice) in calls.iter().zip(&choices) {
                    assert_eq!(retval(event), expected_retval(kind, choice), "{context}: {event:#?}");
                    if event["unverified"].is_string() {
                        unverified += 1;
                        continue;
                    }
                    // Reported as fact: it must be what the kernel acted on.
                    let payload = if kind == "open" { &event["open"] } else { &event["file"] };
                    let expected = format!("{}/{choice}{rest}", dir_path.display());
                    assert_eq!(payload["path"], expected.as_str(), "{context}: {event:#?}");
                }
                eprintln!("{context}: {unverified} of {COUNT} events unverified");
                // In seccomp mode the tracer makes these calls itself, on the
                // names it read: nothing is left to doubt.
                if mode.is_empty() {
                    assert!(run.stat("supervised_calls") >= COUNT as u64, "{context}");
                    assert_eq!(unverified, 0, "{context}");
                }
            }
        }
    }
}

#[test]
fn a_process_whose_tables_are_its_own_gets_no_unverified_mark() {
    // No other task shares its memory or descriptor table: what the tracer
    // reads after the call is what the kernel saw.
    let dir = tempfile::tempdir().unwrap();
    let script = "mkdir d && echo x > d/f && mv d/f d/g && ln d/g d/h && ln -s g d/s && chmod 600 d/g \
                  && cat d/s && rm d/g d/h d/s && rmdir d && cat missing";
    for mode in MODES {
        let mut trace = Trace::with_flags(mode, &["sh", "-c", script]);
        trace.command().current_dir(dir.path());
        let run = trace.run();
        assert_eq!((run.code(), run.stdout.as_str()), (Some(1), "x\n"), "{}", run.stderr);
        assert!(run.of("file").len() >= 7, "{:#?}", run.events);
        let marked: Vec<_> = run.events.iter().filter(|e| e.get("unverified").is_some()).collect();
        assert!(marked.is_empty(), "{mode:?}: {marked:#?}");
    }
}

#[test]
fn an_unnamed_file_linked_from_its_descriptor_is_confirmed() {
    // linkat(fd, "", dir, name, AT_EMPTY_PATH), the way to name an
    // O_TMPFILE file: the file linked is the descriptor's, which the name
    // leads to after the call.
    let dir = tempfile::tempdir().unwrap();
    let dir_path = dir.path().canonicalize().unwrap();
    for mode in MODES {
        let name = dir_path.join(format!("named{}", mode.len()));
        let run =
            Trace::with_flags(mode, &[fixture("flink").as_os_str(), dir_path.as_os_str(), name.as_os_str()]).run();
        let inode = std::fs::metadata(&name).map(|m| m.ino().to_string()).unwrap_or_default();
        assert_eq!(
            (run.code(), run.stdout.as_str()),
            (Some(0), format!("{inode} linked\n").as_str()),
            "{}",
            run.stderr
        );
        let links = run.of("file");
        let link: Vec<_> = links.iter().filter(|e| e["syscall"] == "linkat").collect();
        assert_eq!(link.len(), 1, "{mode:?}: {links:#?}");
        let event = link[0];
        assert_eq!(retval(event), 0, "{mode:?}: {event:#?}");
        assert_eq!(event["file"]["path"], name.to_str().unwrap(), "{mode:?}: {event:#?}");
        assert_eq!(event["file"]["inode"], inode.as_str(), "{mode:?}: {event:#?}");
        assert!(event.get("unverified").is_none(), "{mode:?}: {event:#?}");
    }
}

#[test]
fn signals_pidfds_and_limits_aimed_at_the_tracer_are_refused_and_reported() {
    let dir = open_dir();
    let marker = dir.path().join("marker");
    std::fs::write(&marker, "x").unwrap();
    let program = runnable_by_anyone(dir.path(), &fixture("attack_signal"));
    let refused = [
        ("kill", "thread", "SIGSTOP"),
        ("kill", "process", "SIGSTOP"),
        ("kill", "process", "SIGTERM"),
        ("tkill", "thread", "SIGKILL"),
        ("tgkill", "process", "SIGSTOP"),
        ("rt_sigqueueinfo", "process", "SIGSTOP"),
        ("pidfd_open", "process", ""),
        ("pidfd_send_signal", "process", "SIGSTOP"),
        ("prlimit64", "process", ""),
        ("prlimit64", "thread", ""),
    ];
    for (flags, tracer_uid) in users() {
        for mode in MODES {
            let mut trace = Trace::with_flags(&[flags, mode].concat(), &[&program, &marker]);
            if let Some(uid) = tracer_uid {
                trace = trace.run_by_user(uid, dir.path());
            }
            let child = trace.spawn();
            let tracer = i64::from(child.id());
            let run = trace.finish(child);
            let context = format!("{flags:?} tracer uid {tracer_uid:?} {mode:?}: {}", run.stderr);
            // Signal 0 only asks whether the tracer is there; the kernel
            // answers as it would anyway (EPERM across users).
            let probe = if flags.is_empty() { "ok" } else { "EPERM" };
            let expected = format!(
                "tracer thread is not its process\nkill thread SIGSTOP: EPERM\nkill process SIGSTOP: EPERM\n\
                 kill process SIGTERM: EPERM\ntkill thread SIGKILL: EPERM\ntgkill SIGSTOP: EPERM\n\
                 rt_sigqueueinfo SIGSTOP: EPERM\npidfd_open: EPERM\npidfd_send_signal SIGSTOP: EPERM\n\
                 kill process 0: {probe}\nprlimit64 process NOFILE: EPERM\nprlimit64 thread FSIZE: EPERM\n\
                 prlimit64 process read: {probe}\ntracer limits kept\nopen: ok\n"
            );
            assert_eq!((run.code(), run.stdout.as_str()), (Some(0), expected.as_str()), "{context}");
            let events: Vec<(&str, i64, &str, i64)> = run
                .of("tracer_target")
                .into_iter()
                .map(|e| {
                    assert_eq!(retval(e), -i64::from(libc::EPERM), "{e:#?}");
                    assert!(e["denied"].is_string(), "{e:#?}");
                    let target = &e["tracer_target"];
                    let signal = target["signal_name"].as_str().unwrap_or("");
                    (e["syscall"].as_str().unwrap(), target["pid"].as_i64().unwrap(), signal, pid_of(e))
                })
                .collect();
            assert_eq!(events.len(), refused.len(), "{context}: {events:#?}");
            let workload = pid_of(run.of("exec")[0]);
            let tracer_thread = events[0].1;
            assert_ne!(tracer_thread, tracer);
            for ((syscall, pid, signal, caller), (expected_syscall, whom, expected_signal)) in
                events.iter().zip(refused)
            {
                let expected_pid = if whom == "thread" { tracer_thread } else { tracer };
                assert_eq!(
                    (*syscall, *pid, *signal, *caller),
                    (expected_syscall, expected_pid, expected_signal, workload)
                );
            }
            assert_eq!(run.opens_of(marker.to_str().unwrap()).len(), 1, "{context}");
        }
    }
}

#[test]
fn a_threaded_program_s_ordinary_opens_are_confirmed() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("target"), "x").unwrap();
    std::os::unix::fs::symlink("target", dir.path().join("link")).unwrap();
    let dir_path = dir.path().canonicalize().unwrap();
    for mode in MODES {
        let run = Trace::with_flags(mode, &[fixture("threaded_opens").as_os_str(), dir_path.as_os_str()]).run();
        assert_eq!(run.code(), Some(0), "{}", run.stderr);
        let pid = pid_of(run.of("exec")[0]);
        let thread = run.stdout.trim();
        let opens: Vec<&str> = run
            .of("open")
            .into_iter()
            .filter(|e| e["open"]["flags"].as_i64().is_some_and(|f| f & i64::from(libc::O_NOCTTY) != 0))
            .map(|e| {
                assert!(e.get("unverified").is_none(), "{mode:?}: {e:#?}");
                e["open"]["path"].as_str().unwrap()
            })
            .collect();
        let d = dir_path.display();
        let expected = [
            format!("/proc/{pid}/status"),
            format!("/proc/{pid}/task/{thread}/comm"),
            format!("{d}/target"),
            "/dev/null".to_owned(),
            d.to_string(),
            format!("{d}/new"),
        ];
        assert_eq!(opens, expected, "{mode:?}");
        let unlink = run.of("file").into_iter().find(|e| e["syscall"] == "unlink").unwrap();
        assert!(unlink.get("unverified").is_none(), "{unlink:#?}");
    }
}

#[test]
fn an_exec_reports_the_program_the_kernel_ran_whatever_a_process_sharing_its_directory_does() {
    // Another process that shares only the working directory (CLONE_FS)
    // changes it while a relative name is looked up from it: the event
    // names the program the kernel ran, or is marked.
    const COUNT: usize = 100;
    let program = fixture("attack_cwd");
    for mode in MODES {
        let dir = tempfile::tempdir().unwrap();
        let dir_path = dir.path().canonicalize().unwrap();
        for which in ["da", "db"] {
            std::fs::create_dir(dir_path.join(which)).unwrap();
            std::fs::copy(&program, dir_path.join(which).join("p")).unwrap();
        }
        let count = COUNT.to_string();
        let run = Trace::with_flags(mode, &[program.as_os_str(), dir_path.as_os_str(), count.as_ref()]).run();
        let context = format!("{mode:?}: {}", run.stderr);
        assert_eq!(run.code(), Some(0), "{context}");
        let ran: Vec<(i64, &str)> = run
            .stdout
            .lines()
            .map(|l| l.split_once(' ').map(|(pid, which)| (pid.parse().unwrap(), which)).unwrap())
            .collect();
        assert_eq!(ran.len(), COUNT, "{context}");
        let mut unverified = 0;
        for (pid, which) in ran {
            let execs: Vec<_> = run.of("exec").into_iter().filter(|e| pid_of(e) == pid).collect();
            assert_eq!(execs.len(), 1, "{context}: {pid}: {execs:#?}");
            let event = execs[0];
            assert_eq!(retval(event), 0, "{context}: {event:#?}");
            if event["unverified"].is_string() {
                unverified += 1;
                continue;
            }
            // Reported as fact: it must be the program that ran.
            let expected = dir_path.join(format!("d{which}")).join("p");
            assert_eq!(event["exec"]["path"], expected.to_str().unwrap(), "{context}: {event:#?}");
        }
        eprintln!("{context}: {unverified} of {COUNT} execs unverified");
    }
}

#[test]
fn a_script_run_by_a_relative_name_where_the_directory_is_shared_is_marked() {
    // The kernel keeps no reference to a script: a relative name looked up
    // again after the exec could lead back to the file it led to at entry
    // while another ran (a sibling changed the working directory, and back).
    let dir = tempfile::tempdir().unwrap();
    let dir_path = dir.path().canonicalize().unwrap();
    let script = dir_path.join("s");
    std::fs::write(&script, "#!/bin/sh\nexit 0\n").unwrap();
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    for mode in MODES {
        for (name, path_marked) in [("./s", true), (script.to_str().unwrap(), false)] {
            let run =
                Trace::with_flags(mode, &[fixture("threaded_script").as_os_str(), dir_path.as_os_str(), name.as_ref()])
                    .run();
            let context = format!("{mode:?} {name}: {}", run.stderr);
            assert_eq!(run.code(), Some(0), "{context}");
            let execs: Vec<_> =
                run.of("exec").into_iter().filter(|e| e["exec"]["path"] == script.to_str().unwrap()).collect();
            assert_eq!(execs.len(), 1, "{context}: {:#?}", run.of("exec"));
            let unverified = execs[0]["unverified"].as_str().unwrap_or_default();
            assert!(unverified.contains("args: argv[0] of a script"), "{context}: {unverified}");
            assert_eq!(unverified.contains("path:"), path_marked, "{context}: {unverified}");
        }
    }
}

#[test]
fn an_exec_reports_the_program_the_kernel_ran_whatever_a_sibling_writes_in_its_path() {
    const COUNT: usize = 100;
    let program_dir = open_dir();
    let program = runnable_by_anyone(program_dir.path(), &fixture("attack_args"));
    // Programs that know themselves; scripts that exit 10 and 11; a program
    // and a missing name. Flipped by a sibling thread, or by another process
    // through a shared mapping, which the tracer cannot see share anything.
    let cases = [
        ("program", "exec", "thread"),
        ("script", "exec", "thread"),
        ("missing", "fail", "thread"),
        ("program", "exec", "process"),
        ("script", "exec", "process"),
    ];
    for (kind, mode, by) in cases {
        for (flags, tracer_uid) in users() {
            for seccomp in MODES {
                let dir = open_dir();
                let dir_path = dir.path().canonicalize().unwrap();
                let names: &[&str] = if kind == "missing" { &["a"] } else { &["a", "b"] };
                let sources = tempfile::tempdir().unwrap();
                for (name, code) in names.iter().zip([10, 11]) {
                    let source = match kind {
                        "script" => {
                            let script = sources.path().join(name);
                            std::fs::write(&script, format!("#!/bin/sh\nexit {code}\n")).unwrap();
                            script
                        }
                        _ => program.clone(),
                    };
                    // Written by another process, as `runnable_by_anyone` says why.
                    let status = std::process::Command::new("install")
                        .arg("-m755")
                        .arg(&source)
                        .arg(dir_path.join(name))
                        .status()
                        .unwrap();
                    assert!(status.success());
                }
                let count = COUNT.to_string();
                let args = [program.as_os_str(), dir_path.as_os_str(), count.as_ref(), mode.as_ref(), by.as_ref()];
                let mut trace = Trace::with_flags(&[flags, seccomp].concat(), &args);
                if let Some(uid) = tracer_uid {
                    trace = trace.run_by_user(uid, program_dir.path());
                }
                let run = trace.run();
                let context = format!("{kind} by {by} {flags:?} tracer uid {tracer_uid:?} {seccomp:?}: {}", run.stderr);
                assert_eq!(run.code(), Some(0), "{context}");
                let ran: Vec<(i64, &str)> = run
                    .stdout
                    .lines()
                    .map(|l| {
                        let (pid, which) = l.split_once(' ').unwrap();
                        (pid.parse().unwrap(), which)
                    })
                    .collect();
                assert_eq!(ran.len(), COUNT, "{context}");
                let mut unverified = 0;
                for (pid, which) in ran {
                    let execs: Vec<_> =
                        run.of("exec").into_iter().filter(|e| pid_of(e) == pid && e["syscall"] == "execve").collect();
                    // A failed exec, then the child's _exit; or the one that ran.
                    assert_eq!(execs.len(), 1, "{context}: {pid}: {execs:#?}");
                    let event = execs[0];
                    let marked = event["unverified"].as_str();
                    if which == "n" {
                        assert_eq!(retval(event), -i64::from(libc::ENOENT), "{context}: {event:#?}");
                        assert!(marked.is_some(), "{context}: a failed exec in a shared process: {event:#?}");
                        unverified += 1;
                        continue;
                    }
                    assert_eq!(retval(event), 0, "{context}: {event:#?}");
                    let expected = dir_path.join(which);
                    if kind == "program" {
                        // The kernel's word, always.
                        let inode = std::fs::metadata(&expected).unwrap().ino().to_string();
                        assert_eq!(event["exec"]["inode"], inode.as_str(), "{context}: {event:#?}");
                    }
                    match marked {
                        None => assert_eq!(event["exec"]["path"], expected.to_str().unwrap(), "{context}: {event:#?}"),
                        // A script's argv[0] is the caller's word only: always marked.
                        Some(why) if kind == "script" && !why.contains("the tracer read") => {
                            assert_eq!(event["exec"]["path"], expected.to_str().unwrap(), "{context}: {why}");
                            assert!(why.starts_with("args:"), "{context}: {why}");
                        }
                        Some(why) => {
                            // A name the kernel did not take from the entry read: the event names its own.
                            if why.contains("the tracer read") {
                                assert_eq!(event["exec"]["path"], expected.to_str().unwrap(), "{context}: {why}");
                            }
                            unverified += 1;
                        }
                    }
                }
                eprintln!("{context}: {unverified} of {COUNT} execs had their path changed or failed");
            }
        }
    }
}

#[test]
fn openat2_reports_the_access_mode_the_kernel_gave_whatever_a_sibling_writes_in_open_how() {
    const COUNT: usize = 200;
    let dir = open_dir();
    let file = dir.path().join("file");
    std::fs::write(&file, "x").unwrap();
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o666)).unwrap();
    let file_path = common::real_path(file.to_str().unwrap());
    let program = runnable_by_anyone(dir.path(), &fixture("attack_args"));
    for (flags, tracer_uid) in users() {
        for mode in MODES {
            let count = COUNT.to_string();
            let args = [program.as_os_str(), file.as_os_str(), count.as_ref(), "openat2".as_ref()];
            let mut trace = Trace::with_flags(&[flags, mode, &["--stats"]].concat(), &args);
            if let Some(uid) = tracer_uid {
                trace = trace.run_by_user(uid, dir.path());
            }
            let run = trace.run();
            let context = format!("{flags:?} tracer uid {tracer_uid:?} {mode:?}: {}", run.stderr);
            assert_eq!(run.code(), Some(0), "{context}");
            let modes: Vec<i64> = run.stdout.lines().map(|l| l.parse().unwrap()).collect();
            assert_eq!(modes.len(), COUNT, "{context}");
            let opens: Vec<_> = run.opens_of(&file_path).into_iter().filter(|e| e["syscall"] == "openat2").collect();
            assert_eq!(opens.len(), COUNT, "{context}");
            let mut corrected = 0;
            for (event, access) in opens.iter().zip(modes) {
                assert!(retval(event) >= 0, "{context}: {event:#?}");
                let reported = event["open"]["flags"].as_i64().unwrap();
                assert_eq!(reported & i64::from(libc::O_ACCMODE), access, "{context}: {event:#?}");
                // Supervised (seccomp mode), the open_how is the tracer's
                // copy: all of it is what the kernel acted on.
                if mode.is_empty() {
                    assert!(event.get("unverified").is_none(), "{context}: {event:#?}");
                    continue;
                }
                // What the kernel keeps no record of is never reported as fact here.
                let why = event["unverified"].as_str().unwrap_or_else(|| panic!("{context}: {event:#?}"));
                assert!(why.contains("O_TRUNC"), "{why}");
                corrected += usize::from(why.contains("the tracer read"));
            }
            if mode.is_empty() {
                assert!(run.stat("supervised_calls") >= COUNT as u64, "{context}");
            }
            eprintln!("{context}: {corrected} of {COUNT} open_how flags changed after the tracer read them");
        }
    }
}

#[test]
fn a_mount_at_a_symlink_is_reported_where_the_kernel_mounted() {
    // mount(2) and umount2(2) follow the target's final symlink: the event
    // names the mount point, which mountinfo confirms, unmarked.
    if !common::require_root(&[common::CAP_SYS_ADMIN], "mount tmpfs in a mount namespace of its own") {
        return;
    }
    let program = fixture("mount_symlink");
    for mode in MODES {
        let dir = tempfile::tempdir().unwrap();
        let dir_path = dir.path().canonicalize().unwrap();
        let unshare = ["unshare", "-m", "--propagation", "private"].map(std::ffi::OsStr::new);
        let run = Trace::with_flags(mode, &[&unshare[..], &[program.as_os_str(), dir_path.as_os_str()]].concat()).run();
        let context = format!("{mode:?}: {}", run.stderr);
        let expected =
            "mount link: ok, real mounted\numount2 link: ok, real not mounted\nmount link: ok, real mounted\n\
                        umount2 link nofollow: EINVAL, real mounted\numount2 real: ok, real not mounted\n";
        assert_eq!((run.code(), run.stdout.as_str()), (Some(0), expected), "{context}");
        let at = |name: &str| dir_path.join(name).to_str().unwrap().to_owned();
        let calls: Vec<(&str, i64, &str, bool)> = run
            .of("namespace")
            .into_iter()
            .filter(|e| e["syscall"] == "mount" || e["syscall"] == "umount2")
            // unshare's own: / made private.
            .filter(|e| e["namespace"]["path"] != "/")
            .map(|e| {
                let path = e["namespace"]["path"].as_str().unwrap();
                (e["syscall"].as_str().unwrap(), retval(e), path, e.get("unverified").is_some())
            })
            .collect();
        let einval = -i64::from(libc::EINVAL);
        let (real, link) = (at("real"), at("link"));
        let expected = [
            ("mount", 0, real.as_str(), false),
            ("umount2", 0, real.as_str(), false),
            ("mount", 0, real.as_str(), false),
            ("umount2", einval, link.as_str(), false),
            ("umount2", 0, real.as_str(), false),
        ];
        assert_eq!(calls, expected, "{context}: {:#?}", run.of("namespace"));
    }
}

#[test]
fn a_mount_and_an_unmount_are_reported_as_the_kernel_did_them_whatever_a_sibling_writes() {
    const COUNT: usize = 100;
    if !common::require_root(&[common::CAP_SYS_ADMIN], "mount tmpfs in a mount namespace of its own") {
        return;
    }
    let program_dir = open_dir();
    let program = runnable_by_anyone(program_dir.path(), &fixture("attack_args"));
    for mode in MODES {
        let dir = tempfile::tempdir().unwrap();
        let dir_path = dir.path().canonicalize().unwrap();
        let count = COUNT.to_string();
        let args = [
            "unshare".as_ref(),
            "-m".as_ref(),
            "--propagation".as_ref(),
            "private".as_ref(),
            program.as_os_str(),
            dir_path.as_os_str(),
            count.as_ref(),
            "mount".as_ref(),
        ];
        let run = Trace::with_flags(mode, &args).run();
        let context = format!("{mode:?}: {}", run.stderr);
        assert_eq!(run.code(), Some(0), "{context}");
        let mounted: Vec<&str> = run.stdout.lines().collect();
        assert_eq!(mounted.len(), COUNT, "{context}");
        let calls = |syscall: &str| -> Vec<&serde_json::Value> {
            run.of("namespace").into_iter().filter(|e| e["syscall"] == syscall && retval(e) == 0).collect()
        };
        let (mounts, unmounts) = (calls("mount"), calls("umount2"));
        let mounts: Vec<_> = mounts.into_iter().filter(|e| e["namespace"]["fstype"] == "tmpfs").collect();
        assert_eq!((mounts.len(), unmounts.len()), (COUNT, COUNT), "{context}");
        let mut unverified = 0;
        for ((mount, unmount), which) in mounts.iter().zip(&unmounts).zip(&mounted) {
            let expected = dir_path.join(which);
            for event in [mount, unmount] {
                if event["unverified"].is_string() {
                    unverified += 1;
                    continue;
                }
                // Reported as fact: it must be where the kernel mounted, or unmounted.
                assert_eq!(event["namespace"]["path"], expected.to_str().unwrap(), "{context}: {event:#?}");
            }
            assert_eq!(mount["namespace"]["source"], "cws-src", "{context}: {mount:#?}");
        }
        // Every failed umount2 (the name that was no mount point) is marked.
        let failed: Vec<_> = run.of("namespace").into_iter().filter(|e| retval(e) < 0).collect();
        assert!(failed.iter().all(|e| e["unverified"].is_string()), "{context}: {failed:#?}");
        eprintln!("{context}: {unverified} of {} mounts and unmounts unverified", 2 * COUNT);
    }
}
