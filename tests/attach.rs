//! `trace --pid`: attaching to running processes, every thread and existing
//! child, and letting them go again; events exact against what the target
//! itself reports (its pid, thread ids, children, exit statuses).

mod common;

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Stdio};
use std::time::Instant;

use common::{binary, fixture, pid_of, retval, wait, Run, DEADLINE};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::Value;

/// The tracer attached to `pids`, writing events to DIR/events.jsonl.
fn attach(dir: &Path, pids: &[i32], flags: &[&str]) -> Child {
    let mut command = common::command(binary());
    command.args(["trace", "--probe-addr", ""]).arg("--events-file").arg(events_path(dir));
    for pid in pids {
        command.arg("--pid").arg(pid.to_string());
    }
    command.args(flags).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    command.spawn().unwrap()
}

fn events_path(dir: &Path) -> PathBuf {
    dir.join("events.jsonl")
}

fn events(dir: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(events_path(dir)).unwrap_or_default();
    // Only whole lines: the tracer may be writing the next one.
    text.split_inclusive('\n').filter(|l| l.ends_with('\n')).map(|l| serde_json::from_str(l).unwrap()).collect()
}

/// Waits until the tracer has written an event matching `found` (the
/// deadline only guards against a hang).
fn wait_for_event(dir: &Path, what: &str, found: impl Fn(&Value) -> bool) {
    let started = Instant::now();
    while !events(dir).iter().any(&found) {
        assert!(started.elapsed() < DEADLINE, "no {what} event within {DEADLINE:?}: {:#?}", events(dir));
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

fn seen_at_attach(event: &Value, pid: i32) -> bool {
    event["exec"]["seen_at_attach"] == true && pid_of(event) == i64::from(pid)
}

fn tracer_of(pid: i32) -> Option<i32> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status.lines().find_map(|l| l.strip_prefix("TracerPid:"))?.trim().parse().ok()
}

/// The attach target, started and ready: its stdin, its stdout lines, and
/// the numbers of its "ready" line.
struct Target {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<std::process::ChildStdout>,
    ready: Vec<i32>,
}

impl Target {
    fn start(dir: &Path) -> Target {
        let mut child = common::command(fixture("attach_target"))
            .arg(dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let stdin = child.stdin.take().unwrap();
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        let line = read_line(&mut stdout);
        let ready = line.strip_prefix("ready ").unwrap().split_whitespace().map(|n| n.parse().unwrap()).collect();
        Target { child, stdin, stdout, ready }
    }

    fn pid(&self) -> i32 {
        self.ready[0]
    }
}

fn read_line(reader: &mut impl BufRead) -> String {
    let mut line = String::new();
    reader.read_line(&mut line).unwrap();
    line.trim_end().to_owned()
}

#[test]
fn attach_follows_every_thread_and_child_then_detaches_on_sigint_and_the_process_runs_on() {
    let work = tempfile::tempdir().unwrap();
    let out = tempfile::tempdir().unwrap();
    let mut target = Target::start(work.path());
    let (pid, tid1, tid2, existing) = (target.ready[0], target.ready[1], target.ready[2], target.ready[3]);
    let tracer = attach(out.path(), &[pid], &["--stats"]);
    // The exec events seen at attach are written once everything is seized.
    wait_for_event(out.path(), "attach", |e| seen_at_attach(e, existing));
    wait_for_event(out.path(), "attach", |e| seen_at_attach(e, pid));

    writeln!(target.stdin, "go").unwrap();
    let line = read_line(&mut target.stdout);
    let fields: Vec<i32> = line.strip_prefix("child ").unwrap().split(' ').map(|n| n.parse().unwrap()).collect();
    let (started, status) = (fields[0], fields[1]);
    assert_eq!(status, 0);
    wait_for_event(out.path(), "exit", |e| e["exit"].is_object() && pid_of(e) == i64::from(started));

    kill(Pid::from_raw(tracer.id() as i32), Signal::SIGINT).unwrap();
    let (status, _, stderr) = wait(tracer);
    assert_eq!(status.code(), Some(0), "{stderr}");
    let mut stderr_lines = stderr.lines();
    assert_eq!(
        stderr_lines.next(),
        Some("cws-instrumentation: attach mode: a seccomp filter cannot be added to a running process, so every syscall stops the tracee")
    );
    assert_eq!(tracer_of(pid), Some(0), "the target is no longer traced");

    // The target runs on: its read, blocked through attach and detach, got
    // the line (an EINTR would have made it exit 3).
    writeln!(target.stdin, "exit").unwrap();
    assert_eq!(target.child.wait().unwrap().code(), Some(0));

    let run = Run { status, stdout: String::new(), stderr, events: events(out.path()) };
    let fixture_path = fixture("attach_target").to_string_lossy().into_owned();
    let dir = work.path().to_string_lossy().into_owned();
    let execs: Vec<(i64, String, bool)> = run
        .of("exec")
        .iter()
        .map(|e| (pid_of(e), e["exec"]["path"].as_str().unwrap().to_owned(), e["exec"]["seen_at_attach"] == true))
        .collect();
    assert_eq!(
        execs,
        vec![
            (i64::from(pid), fixture_path.clone(), true),
            (i64::from(existing), fixture_path, true),
            (i64::from(started), common::real_path("/bin/true"), false),
        ]
    );
    let attached = run.of("exec")[0];
    assert_eq!(attached["exec"]["args"], serde_json::json!([fixture("attach_target"), dir]));
    assert_eq!(attached["ppid"], std::process::id());
    assert_eq!((attached.get("retval"), attached["syscall"].as_str()), (None, None));
    assert_eq!(run.of("exec")[1]["ppid"], pid);

    let opens: Vec<(i64, i64, String)> = run
        .of("open")
        .iter()
        .filter(|e| e["open"]["path"].as_str().unwrap().starts_with(&dir))
        .map(|e| (pid_of(e), e["tid"].as_i64().unwrap(), e["open"]["path"].as_str().unwrap().to_owned()))
        .collect();
    let mut expected = vec![
        (i64::from(pid), i64::from(tid1), format!("{dir}/thread-1")),
        (i64::from(pid), i64::from(tid2), format!("{dir}/thread-2")),
        (i64::from(existing), i64::from(existing), format!("{dir}/existing-child")),
    ];
    let mut opens_sorted = opens.clone();
    opens_sorted.sort();
    expected.sort();
    assert_eq!(opens_sorted, expected);
    assert!(run
        .of("open")
        .iter()
        .filter(|e| e["open"]["path"].as_str().unwrap().starts_with(&dir))
        .all(|e| retval(e) >= 0));

    let forks: Vec<(i64, i64)> =
        run.of("fork").iter().map(|e| (pid_of(e), e["fork"]["child_pid"].as_i64().unwrap())).collect();
    assert_eq!(forks, vec![(i64::from(pid), i64::from(started))]);
    let exits: Vec<(i64, i64)> =
        run.of("exit").iter().map(|e| (pid_of(e), e["exit"]["code"].as_i64().unwrap())).collect();
    assert_eq!(exits, vec![(i64::from(existing), 0), (i64::from(started), 0)]);
}

#[test]
fn a_pid_that_does_not_exist_is_one_line_and_the_others_are_still_traced() {
    let pid_max: i32 = std::fs::read_to_string("/proc/sys/kernel/pid_max").unwrap().trim().parse().unwrap();
    let missing = pid_max + 1;
    let out = tempfile::tempdir().unwrap();
    let (status, _, stderr) = wait(attach(out.path(), &[missing], &[]));
    assert_eq!(status.code(), Some(127));
    assert_eq!(
        stderr,
        format!(
            "cws-instrumentation: attach mode: a seccomp filter cannot be added to a running process, so every syscall stops the tracee\n\
             cws-instrumentation: cannot attach to pid {missing}: no such process\n"
        )
    );
    assert!(events(out.path()).is_empty());

    // With a pid that exists as well: that one is traced until it exits.
    let work = tempfile::tempdir().unwrap();
    let mut target = Target::start(work.path());
    let tracer = attach(out.path(), &[missing, target.pid()], &[]);
    wait_for_event(out.path(), "attach", |e| seen_at_attach(e, target.pid()));
    writeln!(target.stdin, "go").unwrap();
    read_line(&mut target.stdout);
    writeln!(target.stdin, "exit").unwrap();
    assert_eq!(target.child.wait().unwrap().code(), Some(0));
    let (status, _, stderr) = wait(tracer);
    assert_eq!(status.code(), Some(127), "{stderr}");
    let exits: Vec<Value> = events(out.path()).into_iter().filter(|e| e["exit"].is_object()).collect();
    assert_eq!(pid_of(exits.last().unwrap()), i64::from(target.pid()));
    assert_eq!(exits.last().unwrap()["exit"]["code"], 0);
}

#[test]
fn a_process_traced_already_cannot_be_attached_and_says_why() {
    let mut traced = common::Trace::new(&["sh", "-c", "echo ready; read line"]);
    traced.command().stdin(Stdio::piped());
    let mut child = traced.spawn();
    let mut stdin = child.stdin.take().unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    assert_eq!(read_line(&mut stdout), "ready");
    let shell = tracee_of(child.id() as i32);
    let out = tempfile::tempdir().unwrap();
    let (status, _, stderr) = wait(attach(out.path(), &[shell], &[]));
    assert_eq!(status.code(), Some(125));
    assert!(stderr.ends_with(&format!(
        "cws-instrumentation: cannot attach to pid {shell}: ptrace(PTRACE_SEIZE): Operation not permitted (traced already, or the SYS_PTRACE capability is missing)\n"
    )), "{stderr}");
    writeln!(stdin, "done").unwrap();
    drop(stdin);
    assert_eq!(traced.finish(child).code(), Some(0));
}

/// The one child of the wrap-mode tracer `tracer` (forked by one of its threads): its workload.
fn tracee_of(tracer: i32) -> i32 {
    let mut children = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{tracer}/task")).unwrap() {
        let path = task.unwrap().path().join("children");
        let text = std::fs::read_to_string(path).unwrap_or_default();
        children.extend(text.split_whitespace().map(|n| n.parse::<i32>().unwrap()));
    }
    assert_eq!(children.len(), 1, "{children:?}");
    children[0]
}

#[test]
fn more_pids_than_pid_per_tracer_are_shared_by_several_tracers_that_detach_together() {
    let work = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
    let out = tempfile::tempdir().unwrap();
    let mut targets: Vec<Target> = work.iter().map(|w| Target::start(w.path())).collect();
    let pids: Vec<i32> = targets.iter().map(Target::pid).collect();
    let tracer = attach(out.path(), &pids, &["--pid-per-tracer", "1"]);
    // Tracer N writes events.jsonl.N.
    for (index, &pid) in pids.iter().enumerate() {
        let numbered = out.path().join(format!("events.jsonl.{}", index + 1));
        let started = Instant::now();
        while !std::fs::read_to_string(&numbered).unwrap_or_default().lines().any(|l| {
            let event: Value = serde_json::from_str(l).unwrap();
            seen_at_attach(&event, pid)
        }) {
            assert!(started.elapsed() < DEADLINE, "pid {pid} not attached");
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
    }
    // Each by a tracer of its own, neither of them the one started here.
    let tracers: Vec<i32> = pids.iter().map(|&pid| tracer_of(pid).unwrap()).collect();
    assert!(tracers[0] != tracers[1] && !tracers.contains(&(tracer.id() as i32)), "{tracers:?}");
    for tracer_pid in &tracers {
        assert_eq!(
            std::fs::read_to_string(format!("/proc/{tracer_pid}/stat")).unwrap().split(' ').nth(3),
            Some(tracer.id().to_string().as_str())
        );
    }

    kill(Pid::from_raw(tracer.id() as i32), Signal::SIGTERM).unwrap();
    let (status, _, stderr) = wait(tracer);
    assert_eq!(status.code(), Some(0), "{stderr}");
    for target in &mut targets {
        assert_eq!(tracer_of(target.pid()), Some(0));
        writeln!(target.stdin, "go").unwrap();
        read_line(&mut target.stdout);
        writeln!(target.stdin, "exit").unwrap();
        assert_eq!(target.child.wait().unwrap().code(), Some(0));
    }
}

fn state_of(pid: i32) -> String {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status.lines().find_map(|l| l.strip_prefix("State:")).unwrap().trim().to_owned()
}

#[test]
fn a_process_stopped_by_job_control_stays_stopped_after_detach_until_sigcont() {
    use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
    let work = tempfile::tempdir().unwrap();
    let out = tempfile::tempdir().unwrap();
    let mut target = Target::start(work.path());
    let pid = Pid::from_raw(target.pid());
    kill(pid, Signal::SIGSTOP).unwrap();
    assert_eq!(waitpid(pid, Some(WaitPidFlag::WUNTRACED)).unwrap(), WaitStatus::Stopped(pid, Signal::SIGSTOP));
    let tracer = attach(out.path(), &[target.pid()], &[]);
    wait_for_event(out.path(), "attach", |e| seen_at_attach(e, target.pid()));
    kill(Pid::from_raw(tracer.id() as i32), Signal::SIGTERM).unwrap();
    let (status, _, stderr) = wait(tracer);
    assert_eq!(status.code(), Some(0), "{stderr}");
    assert_eq!((tracer_of(target.pid()), state_of(target.pid())), (Some(0), "T (stopped)".to_owned()));
    kill(pid, Signal::SIGCONT).unwrap();
    assert_eq!(waitpid(pid, Some(WaitPidFlag::WCONTINUED)).unwrap(), WaitStatus::Continued(pid));
    writeln!(target.stdin, "go").unwrap();
    read_line(&mut target.stdout);
    writeln!(target.stdin, "exit").unwrap();
    assert_eq!(target.child.wait().unwrap().code(), Some(0));
}
