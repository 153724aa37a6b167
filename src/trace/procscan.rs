//! The /proc scan: processes of this container that the tracer cannot
//! trace, because they are not the entrypoint's descendants (`kubectl exec`
//! and `aws ecs execute-command` sessions, say), reported at least as they
//! start and end: an exec event marked `from_procfs` for each new one, an
//! exit event for each one gone.
//!
//! It runs on its own thread and never touches ptrace. Each tick lists /proc
//! once, and reads nothing more for a pid whose /proc directory has the
//! inode number it had (the listing gives it): a pid reused by a new
//! process gets a new one. Other pids cost a `stat` read (parent and start
//! time, which tell a new process from an old one whose pid was reused),
//! and the rest (`exe`, `cmdline`, `environ`, `status`, `cwd`, `cgroup`) is
//! read only for processes not seen before.
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
/// the CPU time they took, all of them and the first (which reads the
/// details of every process present; the others only of new ones).
pub struct Finished {
    pub sink: EventSink,
    pub scans: u64,
    pub cpu: Duration,
    pub first_cpu: Duration,
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
            let (mut scans, mut cpu, mut first_cpu) = (0, Duration::ZERO, Duration::ZERO);
            while !sleep_unless_stopped(&thread_stop, wait) {
                let before = thread_cpu_time();
                scan.tick();
                let spent = thread_cpu_time().saturating_sub(before);
                if scans == 0 {
                    first_cpu = spent;
                }
                scans += 1;
                cpu += spent;
                wait = period;
            }
            Finished { sink: scan.sink, scans, cpu, first_cpu }
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

/// A process the scan has judged, by pid.
struct Known {
    /// The inode number of its /proc directory, as listing /proc gives it:
    /// a process whose pid is reused gets a new one (a new one for the same
    /// process, after the kernel dropped its cached inode, only costs a
    /// `stat` read that finds the same start time).
    ino: u64,
    start_ticks: u64,
    /// Reported with this parent (None: judged not to report).
    reported: Option<i32>,
}

struct Scan {
    sink: EventSink,
    live: LiveProcesses,
    me: i32,
    ancestors: HashSet<i32>,
    cgroup: Option<Vec<u8>>,
    known: HashMap<i32, Known>,
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
        Scan { sink, live, me, ancestors, cgroup: cgroup(me), known: HashMap::new() }
    }

    fn tick(&mut self) {
        let listed = list_pids();
        // Only the pids whose /proc directory is not the one seen before
        // are read: new processes, and pids that changed hands.
        let mut stats: HashMap<i32, Stat> = HashMap::new();
        let mut changed = Vec::new();
        for &(pid, ino) in &listed {
            match self.known.get_mut(&pid) {
                Some(known) if known.ino == ino => {}
                known => match snapshot::stat(Pid::from_raw(pid)) {
                    Some(stat) if known.as_ref().is_some_and(|k| k.start_ticks == stat.start_ticks) => {
                        known.expect("checked").ino = ino;
                    }
                    Some(stat) => {
                        stats.insert(pid, stat);
                        changed.push((stat.start_ticks, pid, ino));
                    }
                    None => {}
                },
            }
        }
        let present: HashSet<i32> = listed.iter().map(|&(pid, _)| pid).collect();
        // Gone, or its pid now another process's.
        let mut gone: Vec<i32> =
            self.known.keys().filter(|pid| !present.contains(pid) || stats.contains_key(pid)).copied().collect();
        gone.sort_unstable();
        for pid in gone {
            if let Some(Known { reported: Some(ppid), .. }) = self.known.remove(&pid) {
                self.sink.emit(exit_event(pid, ppid));
            }
        }

        changed.sort_unstable();
        for (start_ticks, pid, ino) in changed {
            let reported = match self.judge(pid, &mut stats) {
                Some(true) => self.report(pid, start_ticks),
                Some(false) => None,
                // Its parent chain changed under the scan: judged next tick.
                None => continue,
            };
            self.known.insert(pid, Known { ino, start_ticks, reported });
        }
    }

    /// Reports a new process; returns its parent when it was reported.
    fn report(&mut self, pid: i32, start_ticks: u64) -> Option<i32> {
        let event = snapshot::exec_event(Pid::from_raw(pid), Found::ByScan)?;
        // Read after the stat: the pid must still be the same process.
        snapshot::stat(Pid::from_raw(pid)).filter(|s| s.start_ticks == start_ticks)?;
        let ppid = event.ppid as i32;
        self.sink.emit(event);
        Some(ppid)
    }

    /// Whether to report `pid`: false for the tracer, its ancestors and
    /// descendants, kernel threads and other cgroups; None when its parent
    /// chain could not be read whole. `stats` holds this tick's reads.
    fn judge(&self, pid: i32, stats: &mut HashMap<i32, Stat>) -> Option<bool> {
        if pid == self.me || pid == KTHREADD || self.ancestors.contains(&pid) {
            return Some(false);
        }
        if self.live.lock().unwrap_or_else(|e| e.into_inner()).contains(&pid) {
            return Some(false);
        }
        let mut current = pid;
        // Bounded: a chain longer than the pid space is a loop (reparenting under the scan).
        for _ in 0..=PID_MAX_LIMIT {
            let stat = match stats.get(&current) {
                Some(stat) => *stat,
                None => {
                    let stat = snapshot::stat(Pid::from_raw(current))?;
                    stats.insert(current, stat);
                    stat
                }
            };
            if stat.ppid == self.me || stat.ppid == KTHREADD {
                return Some(false);
            }
            if stat.ppid <= 1 || self.ancestors.contains(&stat.ppid) {
                let theirs = cgroup(pid);
                return Some(theirs.is_some() && theirs == self.cgroup);
            }
            current = stat.ppid;
        }
        None
    }
}

/// The kernel's largest pid (PID_MAX_LIMIT on 64-bit).
const PID_MAX_LIMIT: usize = 4 * 1024 * 1024;

/// Every pid in /proc, with the inode number of its directory (from the
/// listing itself: no further syscall).
fn list_pids() -> Vec<(i32, u64)> {
    use std::os::unix::fs::DirEntryExt;
    let Ok(entries) = std::fs::read_dir("/proc") else { return Vec::new() };
    entries.filter_map(|e| e.ok()).filter_map(|e| Some((e.file_name().to_str()?.parse().ok()?, e.ino()))).collect()
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
