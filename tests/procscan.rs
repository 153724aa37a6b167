//! The /proc scan: processes outside the traced tree, reported as they start
//! and end, against the pids, arguments and exits the test itself makes;
//! through the kernel's process connector where the tests run as root in
//! the initial namespaces, and through listings of /proc elsewhere, in a
//! new user namespace, or with the connector turned off.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, Stdio};
use std::time::Instant;

use common::{fixture, pid_of, Trace, DEADLINE};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::Value;

/// A traced shell that waits for a line on stdin, with the tracer's events file.
struct Traced {
    trace: Trace,
    child: Child,
    stdin: std::process::ChildStdin,
    events: std::path::PathBuf,
}

impl Traced {
    fn start(flags: &[&str]) -> Traced {
        Traced::start_with_env(flags, &[])
    }

    fn start_with_env(flags: &[&str], env: &[(&str, &str)]) -> Traced {
        Traced::start_via(flags, env, None)
    }

    /// The tracer started as `launcher TRACER ARGS...` when there is one.
    fn start_via(flags: &[&str], env: &[(&str, &str)], launcher: Option<&std::path::Path>) -> Traced {
        let mut trace = Trace::with_flags(flags, &["sh", "-c", "echo ready; read line"]);
        if let Some(launcher) = launcher {
            trace = trace.via(launcher);
        }
        trace.command().stdin(Stdio::piped()).envs(env.iter().copied());
        let mut child = trace.spawn();
        let stdin = child.stdin.take().unwrap();
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        stdout.read_line(&mut line).unwrap();
        assert_eq!(line, "ready\n");
        let args: Vec<String> = trace.command().get_args().map(|a| a.to_string_lossy().into_owned()).collect();
        let events = args.iter().position(|a| a == "--events-file").map(|i| args[i + 1].clone().into()).unwrap();
        Traced { trace, child, stdin, events }
    }

    fn events(&self) -> Vec<Value> {
        let text = std::fs::read_to_string(&self.events).unwrap_or_default();
        text.split_inclusive('\n').filter(|l| l.ends_with('\n')).map(|l| serde_json::from_str(l).unwrap()).collect()
    }

    /// Waits until the events of `pid` number `count` (the deadline only
    /// guards against a hang).
    fn wait_for_events_of(&self, pid: i32, count: usize) -> Vec<Value> {
        let started = Instant::now();
        loop {
            let of_pid: Vec<Value> = self.events().into_iter().filter(|e| pid_of(e) == i64::from(pid)).collect();
            if of_pid.len() >= count {
                return of_pid;
            }
            assert!(started.elapsed() < DEADLINE, "fewer than {count} events of pid {pid}: {of_pid:#?}");
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
    }

    fn finish(mut self) -> common::Run {
        writeln!(self.stdin, "done").unwrap();
        drop(self.stdin);
        self.trace.finish(self.child)
    }
}

/// (pid, what) for each event of `pid`: "exec ARGS" (found by the scan) or "exit".
fn summary(events: &[Value]) -> Vec<String> {
    events
        .iter()
        .map(|e| match (&e["exec"], &e["exit"]) {
            (Value::Object(exec), _) => {
                assert_eq!(exec["from_procfs"], true, "{e}");
                assert_eq!((e.get("retval"), e.get("syscall")), (None, None), "{e}");
                format!("exec {} {}", exec["executable"].as_str().unwrap(), exec["args"])
            }
            (_, Value::Object(exit)) => {
                assert!(exit.get("cause").is_none() && exit.get("code").is_none(), "{e}");
                "exit".to_owned()
            }
            _ => panic!("unexpected {e}"),
        })
        .collect()
}

/// The line that says where the tracer learns of processes outside its tree.
fn source_line(run: &common::Run) -> &str {
    let prefix = "cws-instrumentation: processes outside the traced tree: ";
    run.stderr.lines().find_map(|l| l.strip_prefix(prefix)).unwrap_or_else(|| panic!("no source line: {}", run.stderr))
}

const CONNECTOR: &str = "as the kernel's process connector reports them";

const CAP_NET_ADMIN: (u32, &str) = (12, "CAP_NET_ADMIN");

/// Whether this process is in the initial user and pid namespaces (their
/// inode numbers are fixed, include/linux/proc_ns.h).
fn in_initial_namespaces() -> bool {
    use std::os::unix::fs::MetadataExt;
    let ino = |ns: &str| std::fs::metadata(format!("/proc/self/ns/{ns}")).map(|m| m.ino()).ok();
    ino("user") == Some(0xEFFF_FFFD) && ino("pid") == Some(0xEFFF_FFFC)
}

/// Whether the kernel grants a tracer started by this process the
/// connector: CAP_NET_ADMIN in the initial namespaces.
fn connector_granted() -> bool {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let effective = status.lines().find_map(|l| l.strip_prefix("CapEff:")).map(|hex| hex.trim().to_owned());
    let effective = u64::from_str_radix(&effective.unwrap(), 16).unwrap();
    effective >> CAP_NET_ADMIN.0 & 1 == 1 && in_initial_namespaces()
}

#[test]
fn a_process_outside_the_tree_is_reported_as_it_starts_and_ends_even_under_a_reused_pid() {
    let run = outside_process_and_reused_pid(&[]);
    if connector_granted() {
        assert_eq!(source_line(&run), CONNECTOR);
    }
}

#[test]
fn listing_proc_instead_of_the_connector_reports_the_same() {
    let run = outside_process_and_reused_pid(&[("CWS_INSTRUMENTATION_PROC_CONNECTOR", "off")]);
    assert_eq!(source_line(&run), "/proc listed every 100ms (CWS_INSTRUMENTATION_PROC_CONNECTOR=off)");
}

/// A process started outside the tree, then another under its pid: each
/// reported as it starts and ends. Returns the tracer's run.
fn outside_process_and_reused_pid(env: &[(&str, &str)]) -> common::Run {
    let traced = Traced::start_with_env(&["--proc-scan-rate", "100ms"], env);
    let sleep = std::fs::canonicalize("/bin/sleep").unwrap().to_string_lossy().into_owned();
    let mut outside = common::command("/bin/sleep").arg("1000").spawn().unwrap();
    let pid = outside.id() as i32;
    let found = traced.wait_for_events_of(pid, 1);
    assert_eq!(summary(&found), vec![format!("exec {sleep} [\"/bin/sleep\",\"1000\"]")]);
    assert_eq!(found[0]["ppid"], std::process::id());
    assert_eq!(found[0]["exec"]["cwd"], std::env::current_dir().unwrap().to_string_lossy().as_ref());

    // The pid goes to another process at once, between two scans most
    // likely: the start time tells them apart.
    outside.kill().unwrap();
    outside.wait().unwrap();
    let mut reused =
        common::command(fixture("at_pid")).arg(pid.to_string()).args(["/bin/sleep", "2000"]).spawn().unwrap();
    // Seen before it ends (a process shorter than a period goes unseen).
    traced.wait_for_events_of(pid, 3);
    kill(Pid::from_raw(pid), Signal::SIGKILL).unwrap();
    assert_eq!(reused.wait().unwrap().code(), Some(128 + 9));
    let found = traced.wait_for_events_of(pid, 4);
    assert_eq!(
        summary(&found),
        vec![
            format!("exec {sleep} [\"/bin/sleep\",\"1000\"]"),
            "exit".to_owned(),
            format!("exec {sleep} [\"/bin/sleep\",\"2000\"]"),
            "exit".to_owned(),
        ]
    );
    assert_eq!(found[2]["ppid"], reused.id());

    let run = traced.finish();
    assert_eq!(run.code(), Some(0), "{}", run.stderr);
    // The traced tree, the tracer and its ancestors are never the scan's.
    let traced_execs: Vec<&Value> = run.of("exec").into_iter().filter(|e| e["exec"]["from_procfs"] != true).collect();
    assert_eq!(traced_execs.len(), 1, "{traced_execs:#?}");
    let (shell, tracer) = (pid_of(traced_execs[0]), traced_execs[0]["ppid"].as_i64().unwrap());
    let not_scanned = [shell, tracer, i64::from(std::process::id())];
    for event in run.of("exec").iter().filter(|e| e["exec"]["from_procfs"] == true) {
        assert!(!not_scanned.contains(&pid_of(event)), "{event}");
    }
    run
}

#[test]
fn the_flag_and_the_environment_turn_the_scan_off() {
    // Started before the control: a scan they ran would have come before its first.
    let off = Traced::start(&["--stats", "--proc-scan-rate", "100ms", "--disable-proc-scan"]);
    let env = [("DD_CWS_INSTRUMENTATION_PROC_SCAN_DISABLED", "TRUE")];
    let off_by_env = Traced::start_with_env(&["--stats", "--proc-scan-rate", "100ms"], &env);
    let on = Traced::start(&["--stats", "--proc-scan-rate", "100ms"]);
    let mut outside = common::command("/bin/sleep").arg("1000").spawn().unwrap();
    on.wait_for_events_of(outside.id() as i32, 1);
    let on = on.finish();
    outside.kill().unwrap();
    outside.wait().unwrap();
    assert!(on.stat("proc_scans") >= 1, "{}", on.stderr);
    for traced in [off, off_by_env] {
        let run = traced.finish();
        assert_eq!(run.code(), Some(0), "{}", run.stderr);
        assert_eq!(run.stat("proc_scans"), 0, "{}", run.stderr);
        assert!(run.of("exec").iter().all(|e| e["exec"]["from_procfs"] != true), "{:#?}", run.of("exec"));
    }
}

#[test]
fn a_process_found_by_the_scan_carries_its_controlling_terminal() {
    let traced = Traced::start(&["--proc-scan-rate", "100ms"]);
    let mut command = common::command("sh");
    command.args(["-c", "tty; exec sleep 1000"]);
    let (mut child, terminal) = common::Terminal::spawn_command(&mut command);
    let tty = terminal.read_until(|l| l.starts_with("/dev/")).pop().unwrap();
    let found = traced.wait_for_events_of(child.id() as i32, 1);
    assert_eq!(found[0]["exec"]["tty"], tty.as_str(), "{:#?}", found[0]);
    child.kill().unwrap();
    child.wait().unwrap();
    assert_eq!(traced.finish().code(), Some(0));
}

#[test]
fn in_a_new_user_namespace_proc_is_listed_and_reports_the_same() {
    if !common::require_root(&[common::CAP_SYS_ADMIN], "make a user namespace") {
        return;
    }
    // The process outside the tree is the one that makes the namespace: the
    // tracer, in it too, may read it (a process in another user namespace
    // than its reader's is closed to it, ptrace's access rules).
    let mut outside =
        common::command("unshare").args(["--user", "--map-root-user", "/bin/sleep", "1000"]).spawn().unwrap();
    let pid = outside.id() as i32;
    let sleep = std::fs::canonicalize("/bin/sleep").unwrap();
    let started = Instant::now();
    while std::fs::read_link(format!("/proc/{pid}/exe")).ok().as_ref() != Some(&sleep) {
        assert!(started.elapsed() < DEADLINE, "unshare never ran sleep");
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    let dir = tempfile::tempdir().unwrap();
    let launcher = dir.path().join("in-namespace");
    std::fs::write(&launcher, format!("#!/bin/sh\nexec nsenter --user --target {pid} \"$@\"\n")).unwrap();
    std::fs::set_permissions(&launcher, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let traced = Traced::start_via(&["--proc-scan-rate", "100ms"], &[], Some(&launcher));
    let found = traced.wait_for_events_of(pid, 1);
    let sleep = sleep.to_string_lossy();
    assert_eq!(summary(&found), vec![format!("exec {sleep} [\"/bin/sleep\",\"1000\"]")]);
    assert_eq!(found[0]["ppid"], std::process::id());
    outside.kill().unwrap();
    outside.wait().unwrap();
    assert_eq!(summary(&traced.wait_for_events_of(pid, 2))[1], "exit");
    let run = traced.finish();
    assert_eq!(run.code(), Some(0), "{}", run.stderr);
    let expected = "/proc listed every 100ms (no process connector: not in the initial user namespace)";
    assert_eq!(source_line(&run), expected);
}

#[test]
fn the_connector_reports_what_a_listing_would_miss_and_not_what_ended_before_it_was_read() {
    if !common::require_root(&[CAP_NET_ADMIN], "subscribe to the process connector") {
        return;
    }
    if !in_initial_namespaces() {
        return common::skip("the process connector answers only in the initial user and pid namespaces");
    }
    // /proc is listed once, 2 s in; after that only the connector tells.
    let traced = Traced::start(&["--proc-scan-rate", "1h"]);
    let first = common::command("/bin/sleep").arg("1000").spawn().unwrap();
    traced.wait_for_events_of(first.id() as i32, 1);

    // A process that runs a few milliseconds (no listing for an hour).
    let mut brief = common::command("/bin/sleep").arg("1000").spawn().unwrap();
    let pid = brief.id() as i32;
    traced.wait_for_events_of(pid, 1);
    brief.kill().unwrap();
    brief.wait().unwrap();
    let sleep = std::fs::canonicalize("/bin/sleep").unwrap().to_string_lossy().into_owned();
    assert_eq!(
        summary(&traced.wait_for_events_of(pid, 2)),
        [format!("exec {sleep} [\"/bin/sleep\",\"1000\"]"), "exit".into()]
    );

    // Each exec of a process outside the tree, as it happens.
    let mut shell =
        common::command("sh").args(["-c", "read line; exec /bin/sleep 1000"]).stdin(Stdio::piped()).spawn().unwrap();
    let pid = shell.id() as i32;
    traced.wait_for_events_of(pid, 1);
    writeln!(shell.stdin.take().unwrap(), "go").unwrap();
    traced.wait_for_events_of(pid, 2);
    shell.kill().unwrap();
    shell.wait().unwrap();
    let sh = std::fs::canonicalize("/bin/sh").unwrap().to_string_lossy().into_owned();
    assert_eq!(
        summary(&traced.wait_for_events_of(pid, 3)),
        [
            format!("exec {sh} [\"sh\",\"-c\",\"read line; exec /bin/sleep 1000\"]"),
            format!("exec {sleep} [\"/bin/sleep\",\"1000\"]"),
            "exit".into()
        ]
    );

    // One that exits at once: reported if it was still there to be read
    // when its exec was, else not at all. The kernel's messages come in
    // order, so once the next process is reported, this one's were handled.
    let quick = common::command("/bin/true").spawn().unwrap();
    let quick_pid = quick.id() as i64;
    assert_eq!(common::wait(quick).0.code(), Some(0));
    let next = common::command("/bin/sleep").arg("1000").spawn().unwrap();
    traced.wait_for_events_of(next.id() as i32, 1);
    let of_quick: Vec<Value> = traced.events().into_iter().filter(|e| pid_of(e) == quick_pid).collect();
    let truth = std::fs::canonicalize("/bin/true").unwrap().to_string_lossy().into_owned();
    if !of_quick.is_empty() {
        assert_eq!(summary(&of_quick), [format!("exec {truth} [\"/bin/true\"]"), "exit".into()]);
    }

    for mut child in [first, next] {
        child.kill().unwrap();
        child.wait().unwrap();
    }
    let run = traced.finish();
    assert_eq!(run.code(), Some(0), "{}", run.stderr);
    assert_eq!(source_line(&run), CONNECTOR);
}
