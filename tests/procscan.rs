//! The /proc scan: processes outside the traced tree, reported as they start
//! and end, against the pids, arguments and exits the test itself makes.

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
        let mut trace = Trace::with_flags(flags, &["sh", "-c", "echo ready; read line"]);
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

#[test]
fn a_process_outside_the_tree_is_reported_as_it_starts_and_ends_even_under_a_reused_pid() {
    let traced = Traced::start(&["--proc-scan-rate", "100ms"]);
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
}

/// A counter of the tracer's `--stats` line.
fn stat(run: &common::Run, name: &str) -> u64 {
    let line = run.stderr.lines().find(|l| l.contains("stats: ")).expect("a stats line");
    let value = line.split_whitespace().find_map(|f| f.strip_prefix(&format!("{name}="))).expect(name);
    value.parse().unwrap()
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
    assert!(stat(&on, "proc_scans") >= 1, "{}", on.stderr);
    for traced in [off, off_by_env] {
        let run = traced.finish();
        assert_eq!(run.code(), Some(0), "{}", run.stderr);
        assert_eq!(stat(&run, "proc_scans"), 0, "{}", run.stderr);
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
