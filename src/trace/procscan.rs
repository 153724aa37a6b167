//! The /proc scan: processes of this container that the tracer cannot
//! trace, because they are not the entrypoint's descendants (`kubectl exec`
//! and `aws ecs execute-command` sessions, say), reported at least as they
//! start and end: an exec event marked `from_procfs` for each new one, an
//! exit event for each one gone.
//!
//! It runs on its own thread and never touches ptrace. Each tick lists /proc
//! once and reads one small file per process (`stat`: its parent and start
//! time, which tell a new process from an old one whose pid was reused);
//! the rest (`exe`, `cmdline`, `environ`, `status`, `cwd`, `cgroup`) is read
//! only for processes not seen before.
//!
//! Which processes: not the tracer, not its ancestors, not its descendants
//! (the traced tree: the tracer is their subreaper, so every one of them has
//! the tracer up its parent chain, even before the engine has seen its fork
//! event; the engine's live set is checked too), not kernel threads, and in
//! the tracer's own cgroup (every line of /proc/PID/cgroup equal): in a
//! container, the container; on a developer's machine, the session or
//! service the tracer was started in.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime};

use nix::unistd::Pid;

use crate::proto::{self, event::Payload, Event};
use crate::queue::EventSink;
use crate::trace::process::LiveProcesses;
use crate::trace::snapshot::{self, Found, Stat};

/// Datadog's scan: every 500 ms, after 2 s that let the tracer's own events go first.
pub const DEFAULT_PERIOD: Duration = Duration::from_millis(500);
pub const START_DELAY: Duration = Duration::from_secs(2);

/// The kernel's own threads hang off kthreadd, pid 2.
const KTHREADD: i32 = 2;

/// What a scan did: its sink (with its counts), how many scans it made and
/// the CPU time they took.
pub struct Finished {
    pub sink: EventSink,
    pub scans: u64,
    pub cpu: Duration,
}

/// A running scan; `stop` ends it.
pub struct Scanner {
    stop: Arc<(Mutex<bool>, Condvar)>,
    thread: JoinHandle<Finished>,
}

impl Scanner {
    pub fn start(period: Duration, delay: Duration, sink: EventSink, live: LiveProcesses) -> std::io::Result<Self> {
        let stop = Arc::new((Mutex::new(false), Condvar::new()));
        let thread_stop = Arc::clone(&stop);
        let thread = std::thread::Builder::new().name("cws-procscan".into()).spawn(move || {
            let mut scan = Scan::new(sink, live);
            let mut wait = delay;
            let (mut scans, mut cpu) = (0, Duration::ZERO);
            while !sleep_unless_stopped(&thread_stop, wait) {
                let before = thread_cpu_time();
                scan.tick();
                scans += 1;
                cpu += thread_cpu_time().saturating_sub(before);
                wait = period;
            }
            Finished { sink: scan.sink, scans, cpu }
        })?;
        Ok(Scanner { stop, thread })
    }

    pub fn stop(self) -> Option<Finished> {
        let (stopped, wake) = &*self.stop;
        *stopped.lock().unwrap_or_else(|e| e.into_inner()) = true;
        wake.notify_all();
        self.thread.join().ok()
    }
}

/// CPU time of the calling thread so far (the first field of its
/// schedstat, in nanoseconds); zero where the kernel does not keep it.
fn thread_cpu_time() -> Duration {
    let text = std::fs::read_to_string("/proc/thread-self/schedstat").unwrap_or_default();
    Duration::from_nanos(text.split_whitespace().next().and_then(|n| n.parse().ok()).unwrap_or(0))
}

/// Sleeps `duration`; true when told to stop meanwhile.
fn sleep_unless_stopped(stop: &(Mutex<bool>, Condvar), duration: Duration) -> bool {
    let (stopped, wake) = stop;
    let guard = stopped.lock().unwrap_or_else(|e| e.into_inner());
    let (guard, _) = wake.wait_timeout_while(guard, duration, |stopped| !*stopped).unwrap_or_else(|e| e.into_inner());
    *guard
}

/// A process the scan reported, by pid.
struct Reported {
    start_ticks: u64,
    ppid: i32,
}

struct Scan {
    sink: EventSink,
    live: LiveProcesses,
    me: i32,
    ancestors: HashSet<i32>,
    cgroup: Option<Vec<u8>>,
    reported: HashMap<i32, Reported>,
    /// Processes judged not to report (pid → start time), not judged again.
    ignored: HashMap<i32, u64>,
}

impl Scan {
    fn new(sink: EventSink, live: LiveProcesses) -> Self {
        let me = std::process::id() as i32;
        let mut ancestors = HashSet::new();
        let mut pid = me;
        while let Some(stat) = snapshot::stat(Pid::from_raw(pid)) {
            if stat.ppid <= 0 || !ancestors.insert(stat.ppid) {
                break;
            }
            pid = stat.ppid;
        }
        Scan { sink, live, me, ancestors, cgroup: cgroup(me), reported: HashMap::new(), ignored: HashMap::new() }
    }

    fn tick(&mut self) {
        let stats: HashMap<i32, Stat> =
            list_pids().into_iter().filter_map(|pid| Some((pid, snapshot::stat(Pid::from_raw(pid))?))).collect();
        let start_of = |pid: &i32| stats.get(pid).map(|s| s.start_ticks);
        // Gone, or its pid now another process's.
        let mut gone: Vec<i32> =
            self.reported.iter().filter(|(pid, r)| start_of(pid) != Some(r.start_ticks)).map(|(&pid, _)| pid).collect();
        gone.sort_unstable();
        for pid in gone {
            if let Some(reported) = self.reported.remove(&pid) {
                self.sink.emit(exit_event(pid, reported.ppid));
            }
        }
        self.ignored.retain(|pid, start| start_of(pid) == Some(*start));

        let mut new: Vec<(u64, i32)> = stats
            .iter()
            .filter(|(pid, _)| !self.reported.contains_key(pid) && !self.ignored.contains_key(pid))
            .map(|(&pid, stat)| (stat.start_ticks, pid))
            .collect();
        new.sort_unstable();
        for (start_ticks, pid) in new {
            match self.judge(pid, &stats) {
                Some(true) => {}
                Some(false) => {
                    self.ignored.insert(pid, start_ticks);
                    continue;
                }
                // Its parent chain changed under the scan: judged next tick.
                None => continue,
            }
            let event = snapshot::exec_event(Pid::from_raw(pid), Found::ByScan);
            // Read after the stat: the pid must still be the same process.
            let same = snapshot::stat(Pid::from_raw(pid)).is_some_and(|s| s.start_ticks == start_ticks);
            match event {
                Some(event) if same => {
                    let ppid = event.ppid as i32;
                    self.sink.emit(event);
                    self.reported.insert(pid, Reported { start_ticks, ppid });
                }
                // Gone already, or with no executable (a kernel thread).
                _ => {
                    self.ignored.insert(pid, start_ticks);
                }
            }
        }
    }

    /// Whether to report `pid`: Some(false) for the tracer, its ancestors and
    /// descendants, kernel threads and other cgroups; None when its parent
    /// chain could not be read whole.
    fn judge(&self, pid: i32, stats: &HashMap<i32, Stat>) -> Option<bool> {
        if pid == self.me || pid == KTHREADD || self.ancestors.contains(&pid) {
            return Some(false);
        }
        if self.live.lock().unwrap_or_else(|e| e.into_inner()).contains(&pid) {
            return Some(false);
        }
        let mut current = pid;
        for _ in 0..stats.len() + 1 {
            let ppid = stats.get(&current)?.ppid;
            if ppid == self.me {
                return Some(false);
            }
            if ppid == KTHREADD {
                return Some(false);
            }
            if ppid <= 1 || self.ancestors.contains(&ppid) {
                break;
            }
            current = ppid;
        }
        let theirs = cgroup(pid);
        Some(theirs.is_some() && theirs == self.cgroup)
    }
}

fn list_pids() -> Vec<i32> {
    let Ok(entries) = std::fs::read_dir("/proc") else { return Vec::new() };
    entries.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok()).collect()
}

fn cgroup(pid: i32) -> Option<Vec<u8>> {
    crate::trace::procfs::read_bounded(&format!("/proc/{pid}/cgroup"), 64 * 1024).map(|(bytes, _)| bytes)
}

/// A reported process is gone: how it ended is its parent's to know, not
/// the scan's (no cause, no code).
fn exit_event(pid: i32, ppid: i32) -> Event {
    Event {
        pid: pid as u32,
        tid: pid as u32,
        ppid: ppid as u32,
        timestamp: Some(proto::timestamp(SystemTime::now())),
        syscall: "exit".to_owned(),
        payload: Some(Payload::Exit(proto::ExitEvent::default())),
        ..Event::default()
    }
}
