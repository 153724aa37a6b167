//! `trace` end to end: real programs under the real tracer, exact events.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::process::Stdio;

use common::{fixture, pid_of, real_path, retval, Terminal, Trace};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

#[test]
fn exit_status_is_the_workload_s() {
    assert_eq!(Trace::new(&["true"]).run().code(), Some(0));
    assert_eq!(Trace::new(&["sh", "-c", "exit 7"]).run().code(), Some(7));
    // Killed by a signal: 128 + N, as a shell reports it.
    let run = Trace::new(&["sh", "-c", "kill -TERM $$"]).run();
    assert_eq!(run.code(), Some(143));
    let exit = run.one("exit", "cause", "EXIT_CAUSE_SIGNALED");
    assert_eq!(exit["exit"]["signal"], 15);
}

#[test]
fn missing_entrypoint_exits_127_with_one_line() {
    let run = Trace::new(&["no-such-program-anywhere"]).run();
    assert_eq!(run.code(), Some(127));
    assert_eq!(run.stderr, "cws-instrumentation: no-such-program-anywhere: command not found\n");
    assert!(run.events.is_empty());
}

#[test]
fn non_executable_entrypoint_exits_126() {
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("script.sh");
    std::fs::write(&script, "#!/bin/sh\ntrue\n").unwrap();
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o644)).unwrap();
    let run = Trace::new(&[&script]).run();
    assert_eq!(run.code(), Some(126));
    assert_eq!(run.stderr, format!("cws-instrumentation: {}: permission denied\n", script.display()));
}

#[test]
fn bad_events_file_is_a_usage_error() {
    let output = std::process::Command::new(common::binary())
        .args(["trace", "--events-file", "/nonexistent-dir/x.jsonl", "--", "true"])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    assert_eq!(
        String::from_utf8_lossy(&output.stderr),
        "cws-instrumentation: cannot create events file /nonexistent-dir/x.jsonl: No such file or directory (os error 2)\n"
    );
}

#[test]
fn a_mistyped_option_is_a_usage_error_not_the_entrypoint() {
    for (flag, hint) in [("--verbos", "a similar argument exists: '--verbose'"), ("--bogus", "'--bogus'")] {
        let output = std::process::Command::new(common::binary()).args(["trace", flag, "--", "true"]).output().unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{stderr}");
        assert!(stderr.starts_with(&format!("error: unexpected argument '{flag}' found")), "{stderr}");
        assert!(stderr.contains(hint), "{stderr}");
    }
    // Without `--`, what follows the entrypoint is the entrypoint's, whatever it looks like.
    let output = std::process::Command::new(common::binary())
        .args(["trace", "--probe-addr", "", "sh", "-c", "echo \"$@\"", "sh", "--verbose", "-x"])
        .output()
        .unwrap();
    assert_eq!((output.status.code(), output.stdout.as_slice()), (Some(0), b"--verbose -x\n".as_slice()));
}

/// Starts `sh -c SCRIPT` under the tracer and waits for it to print "ready".
fn start_ready(script: &str) -> (Trace, std::process::Child, BufReader<std::process::ChildStdout>) {
    let mut trace = Trace::new(&["sh", "-c", script]);
    let mut child = trace.spawn();
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    stdout.read_line(&mut line).unwrap();
    assert_eq!(line, "ready\n");
    (trace, child, stdout)
}

#[test]
fn sigterm_to_the_tracer_ends_the_workload_with_143() {
    let (trace, child, _stdout) = start_ready("echo ready; exec sleep 100");
    kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM).unwrap();
    let run = trace.finish(child);
    assert_eq!(run.code(), Some(143));
}

#[test]
fn sigterm_reaches_the_workload_s_trap_handler() {
    // The background job says "ready" itself, once it is a process of its
    // own (a freshly forked dash would still run its parent's trap code).
    let script = r#"trap 'kill $!; echo got-term; exit 3' TERM; sh -c 'echo ready; exec sleep 100' & wait"#;
    let (trace, child, mut stdout) = start_ready(script);
    kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM).unwrap();
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut stdout, &mut rest).unwrap();
    let run = trace.finish(child);
    assert_eq!(rest, "got-term\n");
    assert_eq!(run.code(), Some(3));
}

#[test]
fn other_forwarded_signals_reach_the_workload() {
    let script =
        r#"trap 'echo got-usr1' USR1; trap 'echo got-hup; exit 0' HUP; echo ready; while :; do sleep 0.05; done"#;
    let (trace, child, mut stdout) = start_ready(script);
    let tracer = Pid::from_raw(child.id() as i32);
    kill(tracer, Signal::SIGUSR1).unwrap();
    let mut line = String::new();
    stdout.read_line(&mut line).unwrap();
    assert_eq!(line, "got-usr1\n");
    kill(tracer, Signal::SIGHUP).unwrap();
    line.clear();
    stdout.read_line(&mut line).unwrap();
    assert_eq!(line, "got-hup\n");
    assert_eq!(trace.finish(child).code(), Some(0));
}

#[test]
fn stdin_passes_through() {
    let mut trace = Trace::new(&["cat"]);
    trace.command().stdin(Stdio::piped());
    let mut child = trace.spawn();
    child.stdin.take().unwrap().write_all(b"hello through the tracer\n").unwrap();
    let run = trace.finish(child);
    assert_eq!(run.stdout, "hello through the tracer\n");
    assert_eq!(run.code(), Some(0));
}

#[test]
fn signal_dispositions_and_environment_are_the_workload_s() {
    let script = "grep -E '^Sig(Ign|Blk)' /proc/self/status; echo \"$CWS_TEST_MARK\"";
    // Started as the tracer is: how a process is spawned decides some of
    // its dispositions (glibc's posix_spawn ignores its internal signals).
    let native = common::command("sh").args(["-c", script]).env("CWS_TEST_MARK", "m1").output().unwrap();
    let mut trace = Trace::new(&["sh", "-c", script]);
    trace.command().env("CWS_TEST_MARK", "m1");
    let run = trace.run();
    assert_eq!(run.stdout, String::from_utf8_lossy(&native.stdout));
}

#[test]
fn exec_events_carry_path_args_cwd_and_credentials() {
    let dir = tempfile::tempdir().unwrap();
    let mut trace = Trace::new(&["sh", "-c", "cat /etc/hostname >/dev/null; /nonexistent/prog arg; exit 0"]);
    trace.command().current_dir(dir.path()).env_clear().env("PATH", "/usr/bin:/bin").env("CWS_TEST_MARK", "m2");
    let run = trace.run();
    assert_eq!(run.code(), Some(0));
    let cwd = dir.path().canonicalize().unwrap();

    let sh = &run.of("exec")[0];
    assert_eq!(sh["exec"]["path"], "/usr/bin/sh");
    assert_eq!(
        sh["exec"]["args"],
        serde_json::json!(["sh", "-c", "cat /etc/hostname >/dev/null; /nonexistent/prog arg; exit 0"])
    );
    assert_eq!(sh["exec"]["envs"], serde_json::json!(["PATH=/usr/bin:/bin", "CWS_TEST_MARK=m2"]));

    let cat = run.one("exec", "path", "/usr/bin/cat");
    assert_eq!(cat["exec"]["args"], serde_json::json!(["cat", "/etc/hostname"]));
    assert_eq!(cat["exec"]["cwd"], cwd.to_str().unwrap());
    assert_eq!(cat["exec"]["executable"], "/usr/bin/cat");
    assert_eq!(cat["ppid"].as_i64(), Some(pid_of(sh)));
    assert_eq!(retval(cat), 0);
    let uid = nix::unistd::getuid().as_raw();
    assert_eq!(cat["exec"]["credentials"]["uid"], uid);
    assert_eq!(cat["exec"]["credentials"]["euid"], uid);
    let mut envs: Vec<_> = cat["exec"]["envs"].as_array().unwrap().iter().map(|e| e.as_str().unwrap()).collect();
    assert_eq!(envs.remove(0), "PATH=/usr/bin:/bin", "priority variables first");
    envs.sort();
    assert_eq!(envs, vec!["CWS_TEST_MARK=m2".to_owned(), format!("PWD={}", cwd.display())]);

    let failed = run.one("exec", "path", "/nonexistent/prog");
    assert_eq!(retval(failed), -libc_enoent());
    assert_eq!(failed["exec"]["args"], serde_json::json!(["/nonexistent/prog", "arg"]));

    let opened = run.opens_of("/etc/hostname");
    assert_eq!(opened.len(), 1);
    assert_eq!(pid_of(opened[0]), pid_of(cat));
    // The tracer starts with stdin, stdout and stderr only (common::command)
    // and hands none of its own descriptors to the workload.
    assert_eq!(retval(opened[0]), 3);
    assert_eq!(opened[0]["open"]["flags"], 0);
}

fn libc_enoent() -> i64 {
    2
}

#[test]
fn exit_events_report_codes_of_every_process() {
    let run = Trace::new(&["sh", "-c", "sh -c 'exit 5'; exit 0"]).run();
    let exits = run.of("exit");
    let codes: Vec<_> = exits.iter().map(|e| e["exit"]["code"].as_i64().unwrap()).collect();
    assert_eq!(codes, vec![5, 0]);
    assert_eq!(exits[1]["exit"]["cause"], "EXIT_CAUSE_EXITED");
}

#[test]
fn relative_paths_resolve_after_chdir_and_through_dirfds() {
    for flags in [&[] as &[&str], &["--disable-seccomp"]] {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("sub")).unwrap();
        let base = dir.path().canonicalize().unwrap();
        let base = base.to_str().unwrap();
        let run = Trace::with_flags(flags, &[fixture("paths").to_str().unwrap(), base]).run();
        assert_eq!(run.code(), Some(0), "{}", run.stderr);

        let rel = run.opens_of(&format!("{base}/rel.txt"));
        assert_eq!(rel.len(), 1, "{flags:?}");
        assert_eq!(rel[0]["open"]["flags"], libc::O_CREAT | libc::O_WRONLY);
        assert_eq!(rel[0]["open"]["mode"], 0o600);

        let inner = run.opens_of(&format!("{base}/sub/inner.txt"));
        // via dirfd, via its dup2, via its F_DUPFD copy, and after fchdir.
        assert_eq!(inner.len(), 4, "{flags:?}: {inner:#?}");
        assert_eq!(inner[0]["open"]["mode"], 0o640);
        assert!(inner[1..].iter().all(|e| e["open"]["flags"] == 0 && e["open"]["mode"].is_null()), "{inner:#?}");

        let missing = run.opens_of(&format!("{base}/missing.txt"));
        assert_eq!(missing.len(), 1, "{flags:?}");
        assert_eq!(retval(missing[0]), -2);

        let chdirs: Vec<_> = run.of("chdir").iter().map(|e| e["chdir"]["path"].clone()).collect();
        assert_eq!(chdirs, vec![serde_json::json!(base), serde_json::json!(format!("{base}/sub"))]);
    }
}

#[test]
fn tcp_and_udp_connects_report_address_port_and_protocol() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let run = Trace::new(&[fixture("net").to_str().unwrap(), "tcp", &port.to_string()]).run();
    assert_eq!(run.code(), Some(0));
    let fd: i64 = run.stdout.trim().parse().unwrap();
    let connect = &run.of("connect");
    assert_eq!(connect.len(), 1);
    let c = &connect[0]["connect"];
    assert_eq!((c["address"].as_str(), c["port"].as_u64()), (Some("127.0.0.1"), Some(u64::from(port))));
    assert_eq!(c["family"], "ADDRESS_FAMILY_INET");
    assert_eq!(c["protocol"], "PROTOCOL_TCP");
    assert_eq!(c["fd"].as_i64(), Some(fd));
    assert_eq!(retval(connect[0]), 0);
    assert!(connect[0].get("unverified").is_none(), "the peer confirmed the address");

    let udp = Trace::new(&[fixture("net").to_str().unwrap(), "udp", "53"]).run();
    let c = &udp.of("connect")[0]["connect"];
    assert_eq!((c["protocol"].as_str(), c["port"].as_u64()), (Some("PROTOCOL_UDP"), Some(53)));

    // A descriptor number that meant a UDP socket and now means a TCP one:
    // the protocol is the socket's, whatever the number was before.
    let swapped = Trace::new(&[fixture("net").to_str().unwrap(), "swapped", &port.to_string()]).run();
    assert_eq!(swapped.code(), Some(0));
    let fd: i64 = swapped.stdout.trim().parse().unwrap();
    let c = &swapped.of("connect")[0]["connect"];
    assert_eq!((c["protocol"].as_str(), c["fd"].as_i64()), (Some("PROTOCOL_TCP"), Some(fd)));
}

#[test]
fn binds_and_accepts_report_the_kernel_s_addresses() {
    let run = Trace::new(&[fixture("server")]).run();
    assert_eq!(run.code(), Some(0), "{}", run.stderr);
    let printed: Vec<u64> = run.stdout.split_whitespace().map(|n| n.parse().unwrap()).collect();
    let [port, client_port, accepted] = printed[..] else { panic!("{}", run.stdout) };

    let binds = run.of("bind");
    let summary: Vec<_> = binds
        .iter()
        .map(|e| (e["bind"]["address"].clone(), e["bind"]["port"].as_u64(), e["bind"]["protocol"].clone(), retval(e)))
        .collect();
    let tcp = serde_json::json!("PROTOCOL_TCP");
    let localhost = serde_json::json!("127.0.0.1");
    assert_eq!(
        summary,
        vec![
            (localhost.clone(), Some(port), tcp.clone(), 0),
            (localhost.clone(), Some(port), tcp.clone(), -libc::EADDRINUSE as i64),
        ],
        "port 0 is reported as the port the kernel chose"
    );

    let connect = &run.of("connect")[0];
    assert_ne!(connect["tid"], connect["pid"], "from a thread");
    assert_eq!(connect["connect"]["protocol"], tcp, "asked of the socket through the thread");

    let accepts = run.of("accept");
    assert_eq!(accepts.len(), 1, "{accepts:#?}");
    let accept = &accepts[0];
    assert_eq!(retval(accept), accepted as i64);
    assert_eq!(accept["accept"]["address"], localhost, "no address buffer was passed");
    assert_eq!(accept["accept"]["port"].as_u64(), Some(client_port));
    assert_eq!(accept["accept"]["local_port"].as_u64(), Some(port));
    assert_eq!(accept["accept"]["fd"], binds[0]["bind"]["fd"]);
    assert_eq!(accept["accept"]["protocol"], tcp);
}

#[test]
fn refused_connect_reports_econnrefused() {
    // A bound TCP socket that does not listen holds the port: the refusal is
    // certain and no other process can take the port meanwhile.
    use nix::sys::socket::{bind, getsockname, socket, AddressFamily, SockFlag, SockType, SockaddrIn};
    let holder = socket(AddressFamily::Inet, SockType::Stream, SockFlag::SOCK_CLOEXEC, None).unwrap();
    bind(std::os::fd::AsRawFd::as_raw_fd(&holder), &SockaddrIn::new(127, 0, 0, 1, 0)).unwrap();
    let port = getsockname::<SockaddrIn>(std::os::fd::AsRawFd::as_raw_fd(&holder)).unwrap().port();
    let run = Trace::new(&[fixture("net").to_str().unwrap(), "tcp", &port.to_string()]).run();
    assert_eq!(run.code(), Some(1));
    let connect = &run.of("connect")[0];
    assert_eq!(retval(connect), -(libc::ECONNREFUSED as i64));
    assert_eq!(connect["connect"]["port"].as_u64(), Some(u64::from(port)));
    // A refused connect leaves no peer to check the address against.
    assert!(connect["unverified"].as_str().unwrap().starts_with("address: read from the workload's memory"));
}

#[test]
fn unix_socket_connects_report_paths_and_abstract_names() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("agent.sock");
    let _listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
    let run = Trace::new(&[fixture("net").to_str().unwrap(), "unix", path.to_str().unwrap()]).run();
    assert_eq!(run.code(), Some(0));
    let c = &run.of("connect")[0];
    assert_eq!(c["connect"]["address"], path.to_str().unwrap());
    assert_eq!(c["connect"]["family"], "ADDRESS_FAMILY_UNIX");
    assert_eq!(retval(c), 0);

    let name = format!("cws-test-{}", std::process::id());
    let run = Trace::new(&[fixture("net").to_str().unwrap(), "abstract", &name]).run();
    let c = &run.of("connect")[0];
    assert_eq!(c["connect"]["address"], format!("@{name}"));
    assert_eq!(retval(c), -(libc::ECONNREFUSED as i64));
}

#[test]
fn fork_vfork_and_threads_are_followed() {
    let run = Trace::new(&[fixture("forks")]).run();
    assert_eq!(run.code(), Some(0), "{}", run.stderr);
    let parent = pid_of(run.of("exec")[0]);
    let ids: Vec<i64> = run.stdout.trim().split(' ').map(|kv| kv.split('=').nth(1).unwrap().parse().unwrap()).collect();
    let (forked, vforked) = (ids[0], ids[1]);

    let forks = run.of("fork");
    assert_eq!(forks.len(), 2, "threads are not forks: {forks:#?}");
    assert_eq!((pid_of(forks[0]), forks[0]["fork"]["child_pid"].as_i64()), (parent, Some(forked)));
    assert_eq!(forks[0]["fork"]["kind"], "FORK_KIND_FORK");
    assert_eq!(retval(forks[0]), forked);
    assert_eq!(forks[1]["fork"]["kind"], "FORK_KIND_VFORK");
    assert_eq!(forks[1]["fork"]["child_pid"].as_i64(), Some(vforked));

    let null = run.opens_of("/dev/null");
    assert_eq!(null.len(), 1);
    assert_eq!((pid_of(null[0]), null[0]["ppid"].as_i64()), (forked, Some(parent)));

    let zero = run.opens_of("/dev/zero");
    assert_eq!(zero.len(), 1);
    assert_eq!(pid_of(zero[0]), parent);
    assert_ne!(zero[0]["tid"].as_i64(), Some(parent), "opened by the thread");

    let exits: Vec<_> = run.of("exit").iter().map(|e| (pid_of(e), e["exit"]["code"].as_i64().unwrap())).collect();
    assert_eq!(exits, vec![(forked, 3), (vforked, 4), (parent, 0)]);
}

#[test]
fn exec_from_a_non_leader_thread_is_reported_under_the_process_id_and_its_own_thread() {
    for flags in [&[] as &[&str], &["--disable-seccomp"]] {
        let run = Trace::with_flags(flags, &[fixture("thread_exec")]).run();
        assert_eq!(run.code(), Some(0), "{}", run.stderr);
        let (thread, rest) = run.stdout.split_once('\n').unwrap();
        assert_eq!(rest, "from-thread\n");
        let execs = run.of("exec");
        assert_eq!(execs.len(), 2);
        let echo = &execs[1];
        assert_eq!(echo["exec"]["path"], real_path("/bin/echo"));
        assert_eq!(echo["exec"]["args"], serde_json::json!(["echo", "from-thread"]));
        assert_eq!(pid_of(echo), pid_of(execs[0]));
        assert_eq!(echo["tid"].to_string(), thread, "the thread that called execve");
        assert_ne!(echo["tid"], echo["pid"]);
        let exits = run.of("exit");
        assert_eq!(exits.len(), 1);
        assert_eq!(pid_of(exits[0]), pid_of(echo));
    }
}

#[test]
fn int80_syscalls_from_a_64_bit_process_do_not_escape() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let run = Trace::new(&[fixture("int80").to_str().unwrap(), &port.to_string()]).run();
    assert_eq!(run.code(), Some(0), "{}", run.stderr);

    let open = run.opens_of("/etc/hostname");
    assert_eq!(open.len(), 1);
    assert_eq!((open[0]["syscall"].as_str(), open[0]["abi"].as_str()), (Some("open"), Some("ABI_I386")));

    let connect = &run.of("connect")[0];
    assert_eq!(connect["abi"], "ABI_I386");
    assert_eq!(connect["connect"]["port"].as_u64(), Some(u64::from(port)));
    assert_eq!(connect["connect"]["protocol"], "PROTOCOL_TCP");
    assert_eq!(retval(connect), 0);

    let exec = run.one("exec", "path", &real_path("/bin/true"));
    assert_eq!((exec["syscall"].as_str(), exec["abi"].as_str()), (Some("execve"), Some("ABI_I386")));
    assert_eq!(exec["exec"]["args"], serde_json::json!(["/bin/true"]));
}

#[test]
fn clone_untraced_children_are_traced_anyway_and_clone3_is_refused() {
    for flags in [&[] as &[&str], &["--disable-seccomp"]] {
        let run = Trace::with_flags(flags, &[fixture("untraced")]).run();
        assert_eq!(run.code(), Some(0), "{}", run.stderr);
        assert_eq!(run.stdout, "clone3: ENOSYS\n", "{flags:?}");
        let forks = run.of("fork");
        assert_eq!(forks.len(), 2, "{forks:#?}");
        // glibc's fork is a clone; had it tried clone3 first, it would have fallen back.
        for (fork, syscall, argv0) in [(forks[0], "clone", "via-clone"), (forks[1], "clone", "via-fork")] {
            assert_eq!(fork["syscall"], syscall);
            let child = fork["fork"]["child_pid"].as_i64().unwrap();
            let execs: Vec<_> = run.of("exec").into_iter().filter(|e| pid_of(e) == child).collect();
            assert_eq!(execs.len(), 1, "{argv0}: the child was traced");
            assert_eq!(execs[0]["exec"]["args"], serde_json::json!([argv0]));
            // protojson: a string, absent when 0.
            let flags: u64 = fork["fork"]["flags"].as_str().map_or(0, |f| f.parse().unwrap());
            assert_eq!(flags & 0x0080_0000, 0, "{argv0}: CLONE_UNTRACED cleared");
        }
    }
}

#[test]
fn a_thousand_execs_complete_and_are_all_reported() {
    let script = "i=0; while [ $i -lt 1000 ]; do /bin/true; i=$((i+1)); done";
    let run = Trace::new(&["sh", "-c", script]).run();
    assert_eq!(run.code(), Some(0));
    assert_eq!(run.of("exec").iter().filter(|e| e["exec"]["path"] == real_path("/bin/true")).count(), 1000);
    assert_eq!(run.of("exit").len(), 1001);
}

#[test]
fn descendants_outliving_the_entrypoint_stay_traced() {
    let dir = tempfile::tempdir().unwrap();
    let marker = dir.path().join("late");
    // The entrypoint exits at once; its child opens a file afterwards.
    let script = format!("(sleep 0.3; : > {}) & exit 4", marker.display());
    let mut trace = Trace::new(&["sh", "-c", &script]);
    let child = trace.spawn();
    let tracer = i64::from(child.id());
    let run = trace.finish(child);
    assert_eq!(run.code(), Some(4));
    assert!(marker.exists());
    let late = run.opens_of(marker.to_str().unwrap());
    assert_eq!(late.len(), 1, "the orphan's open is still seen");
    assert_eq!(late[0]["ppid"].as_i64(), Some(tracer), "orphans are adopted by the tracer");
    let exits = run.of("exit");
    assert_eq!(exits.len(), 3, "entrypoint, subshell and sleep: {exits:#?}");
}

#[test]
fn verbose_prints_one_line_per_event() {
    let run = Trace::with_flags(&["--verbose"], &["cat", "/etc/hostname"]).run();
    let open = &run.opens_of("/etc/hostname")[0];
    let pid = pid_of(open);
    let ppid = open["ppid"].as_i64().unwrap();
    let expected = format!("[pid {pid} ppid {ppid}] openat(\"/etc/hostname\", O_RDONLY) = 3\n");
    assert!(run.stderr.contains(&expected), "{}", run.stderr);
    assert!(run.stderr.contains(&format!("[pid {pid} ppid {ppid}] +++ exited with 0 +++\n")));
    let lines: Vec<&str> = run.stderr.lines().collect();
    let (summary, event_lines) = lines.split_last().unwrap();
    assert_eq!(event_lines.len(), run.events.len(), "one line per event");
    // The last line sums the run up, by event kind in alphabetical order.
    let kinds: Vec<String> = ["exec", "exit", "fork", "open"]
        .iter()
        .map(|kind| (kind, run.of(kind).len()))
        .filter(|(_, count)| *count > 0)
        .map(|(kind, count)| format!("{kind} {count}"))
        .collect();
    assert_eq!(
        kinds.iter().map(|k| k.split(' ').nth(1).unwrap().parse::<usize>().unwrap()).sum::<usize>(),
        run.events.len()
    );
    let head = format!("cws-instrumentation: summary: {} events ({}), ", run.events.len(), kinds.join(", "));
    assert!(summary.starts_with(&head) && summary.ends_with(" ptrace stops, 0 dropped"), "{summary}\n{head}");
}

#[test]
fn stats_count_stops() {
    let run = Trace::with_flags(&["--stats"], &["true"]).run();
    let line = run.stderr.lines().find(|l| l.contains("stats:")).expect("a stats line");
    assert!(line.contains("exec_stops=1 "), "{line}");
    assert!(line.contains(&format!("events={} ", run.events.len())), "{line}");
}

/// State letter of a process from /proc/PID/stat.
fn process_state(pid: i32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit(')').next()?.trim_start().chars().next()
}

#[test]
fn sigstop_stops_the_workload_until_sigcont() {
    let mut trace = Trace::new(&["sh", "-c", "echo $$; kill -STOP $$; echo resumed"]);
    let mut child = trace.spawn();
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    stdout.read_line(&mut line).unwrap();
    let pid: i32 = line.trim().parse().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = stdout.read_line(&mut line);
        let _ = tx.send(line);
    });
    // Stopped (job control honoured, not swallowed): "T", or "t" under
    // ptrace. A ptrace stop on the way to the group stop (the kill call's
    // own, the signal's delivery) looks the same and swallows a SIGCONT
    // sent during it: sent again while the workload is seen stopped.
    let started = std::time::Instant::now();
    let mut continued = 0;
    let line = loop {
        assert!(started.elapsed() < common::DEADLINE, "workload never stopped, or never resumed");
        match rx.recv_timeout(std::time::Duration::from_millis(5)) {
            Ok(line) => break line,
            Err(_) if matches!(process_state(pid), Some('T' | 't')) => {
                kill(Pid::from_raw(pid), Signal::SIGCONT).unwrap();
                continued += 1;
            }
            Err(_) => {}
        }
    };
    assert_eq!(line, "resumed\n");
    assert!(continued > 0, "the workload went on without SIGCONT");
    let run = trace.finish(child);
    assert_eq!(run.code(), Some(0));
}

#[test]
fn terminal_interrupt_reaches_the_workload_once_and_the_tracer_survives() {
    let script = "trap 'echo int' INT; trap 'echo usr1; exit 0' USR1; echo ready; while :; do sleep 0.05; done";
    let mut trace = Trace::with_flags(&["--verbose"], &["sh", "-c", script]);
    let (child, mut terminal) = Terminal::spawn(&mut trace);
    let mut seen = terminal.read_until(|l| l == "ready");
    terminal.type_keys(&[3]); // Ctrl-C
                              // The terminal echoes "^C" on the line where the handler writes.
    seen.extend(terminal.read_until(|l| l.ends_with("int")));
    kill(Pid::from_raw(child.id() as i32), Signal::SIGUSR1).unwrap();
    let run = trace.finish(child);
    assert_eq!(run.code(), Some(0));
    seen.extend(terminal.rest());
    let pid = pid_of(run.of("exec")[0]);
    // SIGUSR1 came from kill(2) and is passed on; the terminal's SIGINT went
    // to the workload directly, so the tracer's copy is not passed on.
    let forwarded: Vec<_> = seen.iter().filter(|l| l.contains("forwarded")).collect();
    assert_eq!(forwarded, vec![&format!("cws-instrumentation: forwarded SIGUSR1 to pid {pid}")], "{seen:#?}");
    assert_eq!(seen.iter().filter(|l| l.ends_with("int")).count(), 1, "{seen:#?}");
    assert!(seen.contains(&"usr1".to_owned()), "{seen:#?}");
}

#[test]
fn interactive_bash_works_and_ctrl_c_reaches_its_job() {
    let mut trace = Trace::new(&["bash", "--norc", "--noprofile", "-i"]);
    trace.command().env("PS1", "prompt> ");
    let (child, mut terminal) = Terminal::spawn(&mut trace);
    terminal.type_keys(b"echo hi-$((1+1))\n");
    // Lines may start with terminal control sequences (bracketed paste).
    terminal.read_until(|l| l.ends_with("\rhi-2") || l == "hi-2");
    // The job says it started once bash has made it the foreground job.
    terminal.type_keys(b"sh -c 'echo started; exec sleep 100'\n");
    terminal.read_until(|l| l.ends_with("started") && !l.contains("echo"));
    terminal.type_keys(&[3]); // Ctrl-C: ends the foreground job, not the tracer
    terminal.type_keys(b"echo back-$?\n");
    terminal.read_until(|l| l.ends_with("back-130") && !l.contains("echo"));
    terminal.type_keys(b"exit 3\n");
    let run = trace.finish(child);
    assert_eq!(run.code(), Some(3));
    let job =
        run.of("exec").into_iter().find(|e| e["exec"]["args"][2] == "echo started; exec sleep 100").expect("the job");
    let exit = run.of("exit").into_iter().find(|e| pid_of(e) == pid_of(job)).expect("the job's exit");
    assert_eq!(exit["exit"]["signal"], libc::SIGINT);
}

#[test]
fn fileless_exec_of_a_memfd_is_reported() {
    let run = Trace::new(&[fixture("memfd_exec")]).run();
    assert_eq!(run.code(), Some(0), "{}", run.stderr);
    let execs = run.of("exec");
    assert_eq!(execs.len(), 2);
    let fileless = &execs[1];
    assert_eq!(fileless["syscall"], "execveat");
    assert_eq!(fileless["exec"]["path"], "/memfd:cws-fileless (deleted)");
    assert_eq!(fileless["exec"]["executable"], "/memfd:cws-fileless (deleted)");
    assert_eq!(fileless["exec"]["args"], serde_json::json!(["fileless"]));
    assert_eq!(fileless["exec"]["envs"], serde_json::json!(["A=1"]));
    assert_eq!(retval(fileless), 0);
}

#[test]
fn nonblocking_connect_reports_einprogress() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let run = Trace::new(&[fixture("net").to_str().unwrap(), "nonblock", &port.to_string()]).run();
    let connect = &run.of("connect")[0];
    assert_eq!(retval(connect), -(libc::EINPROGRESS as i64));
    assert_eq!(connect["connect"]["protocol"], "PROTOCOL_TCP");
}

/// What a run reported, without pids, times and the files' identities (a
/// memfd is a new file each run): comparable across runs.
fn event_shapes(run: &common::Run) -> Vec<String> {
    let mut shapes: Vec<String> = run
        .events
        .iter()
        .map(|e| {
            let mut e = e.clone();
            let map = e.as_object_mut().unwrap();
            for volatile in ["pid", "tid", "ppid", "timestamp"] {
                map.remove(volatile);
            }
            for payload in map.values_mut().filter_map(|v| v.as_object_mut()) {
                for volatile in ["device", "inode", "mount_id", "metadata"] {
                    payload.remove(volatile);
                }
            }
            if let Some(fork) = map.get_mut("fork") {
                fork.as_object_mut().unwrap().remove("child_pid");
                map.remove("retval");
            }
            // A file each run creates anew (a memfd) has an inode of its own.
            if let Some(file) = map.get_mut("file") {
                file.as_object_mut().unwrap().remove("inode");
            }
            e.to_string()
        })
        .collect();
    shapes.sort();
    shapes
}

#[test]
fn full_ptrace_mode_reports_what_seccomp_mode_reports() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port().to_string();
    let path = |name: &str| fixture(name).to_str().unwrap().to_owned();
    let commands = [
        vec![path("forks")],
        vec![path("thread_exec")],
        vec![path("int80"), port],
        vec![path("untraced")],
        vec![path("memfd_exec")],
    ];
    for command in commands {
        let seccomp = Trace::new(&command).run();
        let full = Trace::with_flags(&["--disable-seccomp"], &command).run();
        assert_eq!(seccomp.code(), full.code());
        assert_eq!(event_shapes(&seccomp), event_shapes(&full), "{command:?}");
    }
}

#[test]
fn uid_and_gid_switch_and_clear_supplementary_groups() {
    let script = "id -u; id -g; id -G; grep NoNewPrivs /proc/self/status";
    let run = Trace::with_flags(&["--uid", "65534", "--gid", "65534"], &["sh", "-c", script]).run();
    if nix::unistd::geteuid().is_root() {
        assert_eq!(run.code(), Some(0), "{}", run.stderr);
        // The filter went in with root's privileges: no NO_NEW_PRIVS needed,
        // setuid programs keep working.
        assert_eq!(run.stdout, "65534\n65534\n65534\nNoNewPrivs:\t0\n");
        let creds = &run.of("exec")[0]["exec"]["credentials"];
        assert_eq!((creds["uid"].as_u64(), creds["egid"].as_u64()), (Some(65534), Some(65534)));
    } else {
        assert_eq!(run.code(), Some(125));
        assert!(run.stderr.starts_with("cws-instrumentation: cannot clear supplementary groups"), "{}", run.stderr);
    }
}

#[test]
fn unreadable_arguments_give_partial_events_and_the_workload_s_own_error() {
    // open((char *)1, ...) fails with EFAULT for the workload, as without the
    // tracer; the event says what it could not read.
    let script = "import ctypes, os; libc = ctypes.CDLL(None, use_errno=True); \
                  r = libc.open(ctypes.c_void_p(1), os.O_RDONLY); \
                  print(r, os.strerror(ctypes.get_errno()))";
    let run = Trace::new(&["python3", "-c", script]).run();
    assert_eq!(run.stdout, "-1 Bad address\n", "{}", run.stderr);
    let partial: Vec<_> = run.of("open").into_iter().filter(|e| e["partial"] == true).collect();
    assert_eq!(partial.len(), 1, "{partial:#?}");
    assert_eq!(retval(partial[0]), -(libc::EFAULT as i64));
    assert!(partial[0]["open"]["path"].is_null());
}

#[test]
fn ctrl_z_stops_a_traced_job_and_fg_resumes_it() {
    let mut bash = std::process::Command::new("bash");
    bash.args(["--norc", "--noprofile", "-i"]).env("PS1", "prompt> ");
    let (shell, mut terminal) = Terminal::spawn_command(&mut bash);
    let job = format!(
        "{} trace --probe-addr '' -- sh -c 'i=0; while :; do i=$((i+1)); echo tick$i; sleep 0.1; done'\n",
        common::binary()
    );
    terminal.type_keys(job.as_bytes());
    let is_tick = |l: &str| l.contains("tick") && !l.contains("echo");
    terminal.read_until(is_tick);
    terminal.type_keys(&[0x1a]); // Ctrl-Z: tracer and workload stop together
    terminal.read_until(|l| l.contains("Stopped"));
    terminal.type_keys(b"fg\n");
    terminal.read_until(|l| l.ends_with("-- sh -c 'i=0; while :; do i=$((i+1)); echo tick$i; sleep 0.1; done'"));
    // Only the resumed workload can print after "Stopped" and the fg echo.
    terminal.read_until(is_tick);
    terminal.type_keys(&[3]);
    terminal.type_keys(b"echo rc-$?\n");
    terminal.read_until(|l| l.ends_with("rc-130") && !l.contains("echo"));
    terminal.type_keys(b"exit 0\n");
    let (status, _, _) = common::wait(shell);
    assert_eq!(status.code(), Some(0));
}

#[test]
fn a_workload_s_own_seccomp_filter_cannot_disguise_a_syscall() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let run = Trace::new(&[fixture("own_filter").to_str().unwrap(), &port.to_string()]).run();
    assert_eq!(run.code(), Some(0), "{}", run.stderr);
    let connects = run.of("connect");
    assert_eq!(connects.len(), 2, "{connects:#?}");
    for connect in connects {
        assert_eq!(connect["connect"]["port"].as_u64(), Some(u64::from(port)));
        assert_eq!(retval(connect), 0);
    }
}

#[test]
fn without_seccomp_filters_every_syscall_is_traced_instead() {
    let run = Trace::new(&["sh", "-c", "cat /etc/hostname >/dev/null; exit 4"]).via(&fixture("no_seccomp")).run();
    assert_eq!(run.code(), Some(4), "{}", run.stderr);
    assert_eq!(
        run.stderr,
        "cws-instrumentation: seccomp filters are not available here (ENOSYS: Function not implemented); tracing every syscall instead\n"
    );
    let cat = run.one("exec", "path", "/usr/bin/cat");
    let open = &run.opens_of("/etc/hostname")[0];
    assert_eq!((pid_of(open), retval(open)), (pid_of(cat), 3));
    assert_eq!(run.of("fork").len(), 1);
}

#[test]
fn file_handles_and_io_uring_cannot_open_unseen() {
    let run = Trace::new(&[fixture("handles")]).run();
    assert_eq!(run.code(), Some(0), "{}", run.stderr);
    let returned: Vec<i64> = run.stdout.lines().map(|l| l.parse().unwrap()).collect();
    let [by_handle, ring] = returned[..] else { panic!("{}", run.stdout) };

    let calls = |kind: &str, name: &str| -> Vec<serde_json::Value> {
        run.of(kind).into_iter().filter(|e| e["syscall"] == name).cloned().collect()
    };
    let opens = calls("open", "open_by_handle_at");
    assert_eq!(opens.len(), 1, "{opens:#?}");
    let open = &opens[0];
    assert_eq!(retval(open), by_handle);
    assert_eq!(open["open"]["flags"], 0, "O_RDONLY");
    if by_handle >= 0 {
        assert_eq!(open["open"]["path"], "/etc/hostname", "the kernel's path of the opened file");
    }

    let setups = calls("io_uring", "io_uring_setup");
    assert_eq!(setups.len(), 1, "{setups:#?}");
    let setup = &setups[0];
    assert_eq!(retval(setup), ring);
    assert_eq!(setup["io_uring"]["entries"], 4);
    assert_eq!(setup["io_uring"]["flags"], 1 << 4, "IORING_SETUP_CLAMP");
}

#[test]
fn credential_changes_report_what_the_kernel_then_has() {
    if !common::require_root(&[common::CAP_SETUID, common::CAP_SETGID], "change uid and gid from 0") {
        return;
    }
    let run = Trace::new(&[fixture("creds")]).run();
    assert_eq!((run.code(), run.stdout.as_str()), (Some(0), "0\n0\n0\n-1\n0\n"), "{}", run.stderr);
    let changes = run.of("credentials");
    let summary: Vec<(String, serde_json::Value, i64, serde_json::Value)> = changes
        .iter()
        .map(|e| {
            let c = &e["credentials"]["credentials"];
            let ids = serde_json::json!([
                [c["uid"], c["euid"], c["suid"], c["fsuid"]],
                [c["gid"], c["egid"], c["sgid"], c["fsgid"]],
            ]);
            let requested = e["credentials"]["requested"].clone();
            (e["syscall"].as_str().unwrap().to_owned(), requested, retval(e), ids)
        })
        .collect();
    let setuid_cap = 1 << 7;
    let asked = |ids: &[i64]| serde_json::json!(ids.iter().map(|i| i.to_string()).collect::<Vec<_>>());
    let ids = |u: [u32; 4], g: [u32; 4]| serde_json::json!([u, g]);
    assert_eq!(
        summary,
        vec![
            ("setresgid".to_owned(), asked(&[1000, 1000, 1000]), 0, ids([0, 0, 0, 0], [1000; 4])),
            ("capset".to_owned(), asked(&[setuid_cap, setuid_cap, 0]), 0, ids([0, 0, 0, 0], [1000; 4])),
            ("setresuid".to_owned(), asked(&[1000, 1001, 1002]), 0, ids([1000, 1001, 1002, 1001], [1000; 4])),
            ("setuid".to_owned(), asked(&[0]), -libc::EPERM as i64, ids([1000, 1001, 1002, 1001], [1000; 4])),
            ("capset".to_owned(), asked(&[0, 0, 0]), 0, ids([1000, 1001, 1002, 1001], [1000; 4])),
        ]
    );
    let caps = |i: usize| {
        let c = &changes[i]["credentials"]["credentials"];
        [&c["cap_effective"], &c["cap_permitted"], &c["cap_inheritable"]].map(|m| m.as_str().unwrap().to_owned())
    };
    let masks = |m: [i64; 3]| m.map(|m| m.to_string());
    assert_ne!(caps(0), masks([0, 0, 0]), "root still has its capabilities");
    assert_eq!(caps(1), masks([setuid_cap, setuid_cap, 0]));
    assert_eq!(caps(2), masks([0, 0, 0]), "leaving uid 0 clears them");
}

#[test]
fn file_changes_report_paths_as_the_calls_named_them() {
    if !common::require_root(&[common::CAP_CHOWN], "give a file to uid 1000") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().to_str().unwrap().to_owned();
    let run = Trace::new(&[fixture("files").to_str().unwrap(), &base]).run();
    assert_eq!(run.code(), Some(0), "{}", run.stderr);
    let at = |path: &str| format!("{base}/{path}");
    let changes: Vec<String> = run
        .of("file")
        .iter()
        .map(|e| {
            let f = &e["file"];
            let text = |v: &serde_json::Value| v.as_str().unwrap_or("").to_owned();
            format!(
                "{} {} {} {:?} {} {} {} {} = {}",
                e["syscall"].as_str().unwrap(),
                text(&f["operation"]).trim_start_matches("FILE_OPERATION_"),
                text(&f["path"]),
                text(&f["target"]),
                f["mode"].as_u64().map_or("-".to_owned(), |m| format!("{m:o}")),
                f["uid"].as_str().unwrap_or("-"),
                f["gid"].as_str().unwrap_or("-"),
                f["flags"].as_u64().unwrap_or(0),
                retval(e)
            )
        })
        .collect();
    let expected = [
        format!("mkdir MKDIR {} \"\" 750 - - 0 = 0", at("d")),
        format!("fchmod CHMOD {} \"\" 640 - - 0 = 0", at("d/f")),
        format!("chmod CHMOD {} \"\" 644 - - 0 = 0", at("d/f")),
        format!("fchownat CHOWN {} \"\" - 1000 -1 0 = 0", at("d/f")),
        format!("symlink SYMLINK {} \"f\" - - - 0 = 0", at("d/s")),
        format!("linkat LINK {} {:?} - - - 0 = 0", at("hard"), at("d/f")),
        format!("renameat2 RENAME {} {:?} - - - 1 = 0", at("hard"), at("d/moved")),
        format!("unlink UNLINK {} \"\" - - - 0 = 0", at("d/moved")),
        format!("unlinkat UNLINK {} \"\" - - - 0 = 0", at("d/s")),
        format!("unlink UNLINK {} \"\" - - - 0 = 0", at("d/f")),
        format!("rmdir RMDIR {} \"\" - - - 0 = -2", at("d/missing")),
        format!("unlinkat RMDIR {} \"\" - - - {} = 0", at("d"), libc::AT_REMOVEDIR),
    ];
    assert_eq!(changes, expected);
}

#[test]
fn a_failed_clone_does_not_describe_the_next_fork() {
    let run = Trace::new(&[fixture("stale_clone")]).run();
    assert_eq!(run.code(), Some(0), "{}", run.stderr);
    let forks = run.of("fork");
    assert_eq!(forks.len(), 1, "{forks:#?}");
    assert_eq!(forks[0]["fork"]["kind"], "FORK_KIND_FORK");
    let child = forks[0]["fork"]["child_pid"].as_i64().unwrap();
    let exec = run.one("exec", "path", &real_path("/bin/true"));
    assert_eq!(pid_of(exec), child, "the child is a process of its own, not a thread");
    let exits: Vec<_> = run.of("exit").iter().map(|e| pid_of(e)).collect();
    assert!(exits.contains(&child));
}
