//! The /proc scan: processes of this container that the tracer cannot
//! trace, because they are not the entrypoint's descendants (`kubectl exec`
//! and `aws ecs execute-command` sessions, say), reported at least as they
//! start and end: an exec event marked `from_procfs` for each new one, an
//! exit event for each one gone.
//!
//! It runs on its own thread and never touches ptrace. Where the kernel
//! grants it (`netlink`: CAP_NET_ADMIN in the initial namespaces, so never
//! in a container), the process connector says which pids forked, exec'd or
//! ended, as it happens; the scan reads those from /proc, as it would have
//! found them. Elsewhere, or when the connector fails, it lists /proc every
//! period. A lost connector message (its buffer overflowed) costs a full
//! listing then, so that nothing is missed.
//!
//! A listing reads nothing more for a pid whose /proc directory has the
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
use std::os::fd::{AsFd, OwnedFd};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use nix::unistd::Pid;

use crate::cli::format_duration;
use crate::log::log;
use crate::proto::{self, event::Payload, Event};
use crate::queue::EventSink;
use crate::trace::netlink::{wait_readable, wall_time, Connector, Hint, Lost};
use crate::trace::process::LiveProcesses;
use crate::trace::procstat::{self, Stat};
use crate::trace::snapshot::{self, Found};

/// Datadog's scan: every 500 ms, after 2 s that let the tracer's own events go first.
pub const DEFAULT_PERIOD: Duration = Duration::from_millis(500);
pub const START_DELAY: Duration = Duration::from_secs(2);

/// `off` keeps the scan from using the process connector where the kernel
/// would grant it: for measuring the listing, and for tests of it.
pub const CONNECTOR_ENV: &str = "CWS_INSTRUMENTATION_PROC_CONNECTOR";

/// The kernel's own threads hang off kthreadd, pid 2.
const KTHREADD: i32 = 2;

/// What a scan did: its sink (with its counts), how many listings of /proc
/// it made and the CPU time it took, all of it and the first listing's
/// (which reads the details of every process present; the others only of
/// new ones). With the connector, the time spent on its messages is in
/// the total.
pub struct Finished {
    pub sink: EventSink,
    pub scans: u64,
    pub cpu: Duration,
    pub first_cpu: Duration,
}

/// A running scan; `stop` ends it.
pub struct Scanner {
    /// Closed to wake the thread and end it.
    stop: OwnedFd,
    thread: JoinHandle<Finished>,
}

impl Scanner {
    pub fn start(period: Duration, delay: Duration, sink: EventSink, live: LiveProcesses) -> std::io::Result<Self> {
        let (stopped, stop) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
        let thread = std::thread::Builder::new()
            .name("cws-procscan".into())
            .spawn(move || run(Scan::new(sink, live), period, delay, stopped))?;
        Ok(Scanner { stop, thread })
    }

    pub fn stop(self) -> Option<Finished> {
        drop(self.stop);
        self.thread.join().ok()
    }
}

/// The scan thread: the first listing after `delay`, then connector
/// messages as they come, or a listing every `period`, until `stopped`
/// is readable (its other end closed).
fn run(mut scan: Scan, period: Duration, delay: Duration, stopped: OwnedFd) -> Finished {
    let mut meter = Meter::default();
    if sleep_unless_stopped(&stopped, delay) {
        return meter.finish(scan.sink);
    }
    // Subscribed before the first listing: what starts meanwhile is not missed.
    let mut connector = choose_source(period);
    match connector {
        Some(_) => meter.listing(|| scan.list_then_retry()),
        None => meter.listing(|| drop(scan.list())),
    }
    let mut hints = Vec::new();
    let mut overrun_said = false;
    loop {
        let Some(messages) = &connector else {
            if sleep_unless_stopped(&stopped, period) {
                break;
            }
            meter.listing(|| drop(scan.list()));
            continue;
        };
        let timeout = scan.has_pending().then_some(period);
        if wait_readable([stopped.as_fd(), messages.as_fd()], timeout)[0] {
            break;
        }
        let before = thread_cpu_time();
        hints.clear();
        let received = messages.receive(&mut hints);
        // What came before a loss is still good.
        scan.follow(&hints, period);
        meter.cpu += thread_cpu_time().saturating_sub(before);
        match received {
            Ok(()) => {}
            Err(Lost::Overrun) => {
                if !overrun_said {
                    log!("the process connector dropped messages (its buffer was full): /proc is listed again each time it does");
                    overrun_said = true;
                }
                meter.listing(|| scan.list_and_recheck());
            }
            Err(Lost::Failed(e)) => {
                log!("the process connector failed ({e}); listing /proc every {} instead", format_duration(period));
                connector = None;
                meter.listing(|| scan.list_alone());
            }
        }
    }
    meter.finish(scan.sink)
}

/// The connector where the kernel grants it, said once on stderr either way.
fn choose_source(period: Duration) -> Option<Connector> {
    let every = format_duration(period);
    if std::env::var_os(CONNECTOR_ENV).is_some_and(|v| v == "off") {
        log!("processes outside the traced tree: /proc listed every {every} ({CONNECTOR_ENV}=off)");
        return None;
    }
    match Connector::subscribe() {
        Ok(connector) => {
            log!("processes outside the traced tree: as the kernel's process connector reports them");
            Some(connector)
        }
        Err(why) => {
            log!("processes outside the traced tree: /proc listed every {every} (no process connector: {why})");
            None
        }
    }
}

/// The scan thread's CPU time.
#[derive(Default)]
struct Meter {
    scans: u64,
    cpu: Duration,
    first_cpu: Duration,
}

impl Meter {
    fn listing(&mut self, list: impl FnOnce()) {
        let before = thread_cpu_time();
        list();
        let spent = thread_cpu_time().saturating_sub(before);
        if self.scans == 0 {
            self.first_cpu = spent;
        }
        self.scans += 1;
        self.cpu += spent;
    }

    fn finish(self, sink: EventSink) -> Finished {
        Finished { sink, scans: self.scans, cpu: self.cpu, first_cpu: self.first_cpu }
    }
}

/// CPU time of the calling thread so far (the first field of its
/// schedstat, in nanoseconds); zero where the kernel does not keep it.
fn thread_cpu_time() -> Duration {
    let text = std::fs::read_to_string("/proc/thread-self/schedstat").unwrap_or_default();
    Duration::from_nanos(text.split_whitespace().next().and_then(|n| n.parse().ok()).unwrap_or(0))
}

/// Sleeps `duration`; true when `stopped` became readable meanwhile.
fn sleep_unless_stopped(stopped: &OwnedFd, duration: Duration) -> bool {
    let deadline = Instant::now() + duration;
    while let Some(left) = deadline.checked_duration_since(Instant::now()) {
        if wait_readable([stopped.as_fd()], Some(left))[0] {
            return true;
        }
    }
    false
}

/// A process the scan has judged, by pid.
struct Known {
    /// The inode number of its /proc directory, as listing /proc gives it:
    /// a process whose pid is reused gets a new one (a new one for the same
    /// process, after the kernel dropped its cached inode, only costs a
    /// `stat` read that finds the same start time). 0 when found through
    /// the connector: the next listing reads its `stat`.
    ino: u64,
    start_ticks: u64,
    /// Judged to be reported: outside the traced tree, in this container.
    outside: bool,
    /// Reported with this parent (None: judged not to report, or it could
    /// not be read; with the connector, its next exec is a new chance).
    reported: Option<i32>,
}

/// Whether a process whose leader thread ended is gone.
enum Ending {
    Gone,
    /// It runs on (the exit was of a leader replaced by an exec'ing thread).
    Alive,
    /// Its leader is a zombie but other threads still run, or are ending.
    OtherThreads,
}

struct Scan {
    sink: EventSink,
    live: LiveProcesses,
    me: i32,
    ancestors: HashSet<i32>,
    cgroup: Option<Vec<u8>>,
    known: HashMap<i32, Known>,
    /// Connector: processes forked and not (yet) exec'd, when. Judged a
    /// period later, as a listing would find them: most exec at once, and
    /// are judged then, with their program.
    forked: HashMap<i32, Instant>,
    /// Connector: processes whose leader ended (when, if a message said),
    /// until they are gone.
    ending: HashMap<i32, Option<SystemTime>>,
}

impl Scan {
    fn new(sink: EventSink, live: LiveProcesses) -> Self {
        let me = std::process::id() as i32;
        let mut ancestors = HashSet::new();
        let mut pid = me;
        while let Some(stat) = procstat::stat(Pid::from_raw(pid)) {
            if stat.ppid <= 0 || !ancestors.insert(stat.ppid) {
                break;
            }
            pid = stat.ppid;
        }
        let cgroup = cgroup(me);
        Scan {
            sink,
            live,
            me,
            ancestors,
            cgroup,
            known: HashMap::new(),
            forked: HashMap::new(),
            ending: HashMap::new(),
        }
    }

    /// Lists /proc: new processes are judged (and reported), gone ones too.
    /// Returns those whose parent chain changed under the read, to judge later.
    fn list(&mut self) -> Vec<i32> {
        let listed = list_pids();
        // Only the pids whose /proc directory is not the one seen before
        // are read: new processes, and pids that changed hands.
        let mut stats: HashMap<i32, Stat> = HashMap::new();
        let mut changed = Vec::new();
        for &(pid, ino) in &listed {
            match self.known.get_mut(&pid) {
                Some(known) if known.ino == ino => {}
                known => match procstat::stat(Pid::from_raw(pid)) {
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
            self.forget(pid, None);
        }

        changed.sort_unstable();
        let mut unjudged = Vec::new();
        for (start_ticks, pid, ino) in changed {
            if !self.admit(pid, ino, start_ticks, None, &mut stats) {
                unjudged.push(pid);
            }
        }
        unjudged
    }

    /// The connector is gone: listings alone from now on.
    fn list_alone(&mut self) {
        self.forked.clear();
        self.ending.clear();
        self.list();
    }

    /// A listing with the connector: what it could not judge is, a period later.
    fn list_then_retry(&mut self) {
        let now = Instant::now();
        let unjudged = self.list();
        self.forked.extend(unjudged.into_iter().map(|pid| (pid, now)));
    }

    /// A listing after connector messages were lost: exits lost with them
    /// are found too, of processes a listing sees (zombies not reaped yet).
    fn list_and_recheck(&mut self) {
        self.list_then_retry();
        for (&pid, _) in self.known.iter().filter(|(_, k)| k.reported.is_some()) {
            self.ending.entry(pid).or_insert(None);
        }
        self.settle_ending();
    }

    /// Whether `follow` has work due later even if no message comes.
    fn has_pending(&self) -> bool {
        !self.forked.is_empty() || !self.ending.is_empty()
    }

    /// Connector messages, in the kernel's order, then what is due.
    fn follow(&mut self, hints: &[Hint], period: Duration) {
        for &hint in hints {
            match hint {
                Hint::Fork(pid) => {
                    self.forked.insert(pid, Instant::now());
                }
                Hint::Exec(pid, at) => {
                    self.forked.remove(&pid);
                    self.examine(pid, Some(wall_time(at)));
                }
                Hint::Exit(pid, at) => {
                    self.forked.remove(&pid);
                    self.ending.insert(pid, Some(wall_time(at)));
                }
            }
        }
        let now = Instant::now();
        let due: Vec<i32> =
            self.forked.iter().filter(|(_, &at)| now.duration_since(at) >= period).map(|(&pid, _)| pid).collect();
        for pid in due {
            self.forked.remove(&pid);
            self.examine(pid, None);
        }
        self.settle_ending();
    }

    /// A process the connector named: judged if new (and reported), and
    /// reported again after an exec if it was reported before. `exec`: the
    /// time of the exec that named it, which its event then carries.
    fn examine(&mut self, pid: i32, exec: Option<SystemTime>) {
        // The engine's to report, and nothing to read: most connector
        // messages are of the traced tree's own forks and execs.
        if self.traced(pid) {
            return;
        }
        // Gone already: it ended before it could be read (its exit settles a known one).
        let Some(stat) = procstat::stat(Pid::from_raw(pid)) else { return };
        if let Some(known) = self.known.get(&pid) {
            if known.start_ticks == stat.start_ticks {
                if exec.is_some() && known.outside {
                    let reported = self.report(pid, stat.start_ticks, exec);
                    if let (Some(known), Some(_)) = (self.known.get_mut(&pid), reported) {
                        known.reported = reported;
                    }
                }
                return;
            }
            self.forget(pid, None);
        }
        let mut stats = HashMap::from([(pid, stat)]);
        if !self.admit(pid, 0, stat.start_ticks, exec, &mut stats) {
            // Its parent chain changed under the read: again a period later.
            self.forked.insert(pid, Instant::now());
        }
    }

    /// Forgets the processes whose leader ended that are gone (an exit
    /// event for those reported); keeps those whose other threads run.
    fn settle_ending(&mut self) {
        let ending: Vec<(i32, Option<SystemTime>)> = self.ending.iter().map(|(&pid, &at)| (pid, at)).collect();
        for (pid, at) in ending {
            let Some(known) = self.known.get(&pid) else {
                // Never judged (it ended before it could be): nothing to say.
                self.ending.remove(&pid);
                continue;
            };
            match ending_of(pid, known.start_ticks) {
                Ending::Gone => self.forget(pid, at),
                Ending::Alive => {}
                // Its end is not its leader's: stamped when it is found gone.
                Ending::OtherThreads => {
                    self.ending.insert(pid, None);
                    continue;
                }
            }
            self.ending.remove(&pid);
        }
    }

    /// A known process is gone: its exit is reported if it was, stamped
    /// `at` (when the kernel said its leader ended) or now.
    fn forget(&mut self, pid: i32, at: Option<SystemTime>) {
        if let Some(Known { reported: Some(ppid), .. }) = self.known.remove(&pid) {
            self.sink.emit(exit_event(pid, ppid, at.unwrap_or_else(SystemTime::now)));
        }
    }

    /// Judges a new process, reports it if it is to be, and knows it from
    /// then on; false when its parent chain could not be read whole.
    fn admit(
        &mut self,
        pid: i32,
        ino: u64,
        start_ticks: u64,
        exec: Option<SystemTime>,
        stats: &mut HashMap<i32, Stat>,
    ) -> bool {
        let outside = match self.judge(pid, stats) {
            Some(outside) => outside,
            None => return false,
        };
        let reported = if outside { self.report(pid, start_ticks, exec) } else { None };
        self.known.insert(pid, Known { ino, start_ticks, outside, reported });
        true
    }

    /// Reports a process, stamped with its start time or the time of the
    /// `exec` that named it; returns its parent when it was reported.
    fn report(&mut self, pid: i32, start_ticks: u64, exec: Option<SystemTime>) -> Option<i32> {
        let mut event = snapshot::exec_event(Pid::from_raw(pid), Found::ByScan)?;
        if let Some(exec) = exec {
            event.timestamp = Some(proto::timestamp(exec));
        }
        // Read after the stat: the pid must still be the same process.
        procstat::stat(Pid::from_raw(pid)).filter(|s| s.start_ticks == start_ticks)?;
        let ppid = event.ppid as i32;
        self.sink.emit(event);
        Some(ppid)
    }

    /// Whether the engine traces process `pid` now.
    fn traced(&self, pid: i32) -> bool {
        self.live.lock().unwrap_or_else(|e| e.into_inner()).contains(&pid)
    }

    /// Whether to report `pid`: false for the tracer, its ancestors and
    /// descendants, kernel threads and other cgroups; None when its parent
    /// chain could not be read whole. `stats` holds the reads made so far.
    fn judge(&self, pid: i32, stats: &mut HashMap<i32, Stat>) -> Option<bool> {
        if pid == self.me || pid == KTHREADD || self.ancestors.contains(&pid) {
            return Some(false);
        }
        if self.traced(pid) {
            return Some(false);
        }
        let mut current = pid;
        // Bounded: a chain longer than the pid space is a loop (reparenting under the scan).
        for _ in 0..=PID_MAX_LIMIT {
            let stat = match stats.get(&current) {
                Some(stat) => *stat,
                None => {
                    let stat = procstat::stat(Pid::from_raw(current))?;
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

/// Whether the process `pid` (started at `start_ticks`), whose leader
/// thread ended, is gone. A zombie is: it has ended, only its parent has
/// not collected it yet.
fn ending_of(pid: i32, start_ticks: u64) -> Ending {
    match procstat::stat(Pid::from_raw(pid)) {
        Some(stat) if stat.start_ticks == start_ticks && matches!(stat.state, b'Z' | b'X') => {
            let threads = std::fs::read_dir(format!("/proc/{pid}/task")).map_or(0, |t| t.count());
            if threads > 1 {
                Ending::OtherThreads
            } else {
                Ending::Gone
            }
        }
        Some(stat) if stat.start_ticks == start_ticks => Ending::Alive,
        _ => Ending::Gone,
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
fn exit_event(pid: i32, ppid: i32, at: SystemTime) -> Event {
    Event {
        pid: pid as u32,
        tid: pid as u32,
        ppid: ppid as u32,
        timestamp: Some(proto::timestamp(at)),
        syscall: "exit".to_owned(),
        payload: Some(Payload::Exit(proto::ExitEvent::default())),
        ..Event::default()
    }
}
