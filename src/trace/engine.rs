//! The trace engine: one thread, every ptrace call, one loop over wait
//! results. It never blocks except in `waitpid`, and it never does I/O other
//! than short /proc reads and tracee memory reads while a tracee is stopped.
//!
//! Stop costs are what the design minimises: a watched syscall costs its
//! seccomp stop, plus an exit stop only when its decoder asked for one; an
//! unwatched syscall never stops (the filter allows it in the kernel).

use std::collections::HashMap;
use std::marker::PhantomData;
use std::os::fd::AsFd;
use std::panic::{self, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::SystemTime;

use nix::errno::Errno;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::signalfd::SignalFd;
use nix::unistd::Pid;

use crate::log::log;
use crate::proto::{self, event::Payload, Event, ForkKind};
use crate::queue::EventSink;
use crate::trace::abi::{Abi, SyscallEntry};
use crate::trace::attach::{self, Seized};
use crate::trace::decode::{self, Call, ConfiningCall, Ctx, Decoder, Next, Supervised};
use crate::trace::guard;
use crate::trace::mounts::Mounts;
use crate::trace::names::Names;
use crate::trace::process::{LiveProcesses, ProcessTable, Sharing};
use crate::trace::procfs;
use crate::trace::ptrace::{self, Death, EventStop, ForkEventKind, Resume, Stop, SyscallReader, SyscallState};
use crate::trace::restart::{self, Verdict};
use crate::trace::seccomp::SeccompData;
use crate::trace::signals;
use crate::trace::supervise::{self, Performed, Served, Supervisor};
use crate::trace::syscalls::{self, Action, SyscallDef, SYSCALLS};

/// How syscalls reach the tracer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// The seccomp filter stops only watched syscalls.
    Seccomp,
    /// `--disable-seccomp`: every syscall stops at entry and exit.
    Full,
}

/// Stops handled, by kind, reported with `--stats`.
#[derive(Debug, Default, Clone)]
pub struct Stats {
    pub seccomp: u64,
    pub syscall: u64,
    pub fork: u64,
    pub exec: u64,
    pub group: u64,
    pub signal: u64,
    pub other: u64,
    /// Seccomp stops of calls no table entry decodes (x32, foreign ABIs).
    pub foreign: u64,
    /// Calls the tracer performed itself (no stop), and those it sent back
    /// to ptrace (`supervise/`).
    pub supervised: u64,
    pub bounced: u64,
    pub events: u64,
    pub dropped: u64,
    /// Events by kind (`crate::queue::kind`), dropped or not.
    pub events_by_kind: std::collections::BTreeMap<&'static str, u64>,
    /// /proc scans made, and the CPU time they took (all, and the first).
    pub proc_scans: u64,
    pub proc_scan_cpu: std::time::Duration,
    pub proc_scan_first_cpu: std::time::Duration,
}

impl Stats {
    /// Adds what a sender into the queue counted.
    pub fn add_sink(&mut self, sink: &EventSink) {
        self.events += sink.emitted;
        self.dropped += sink.dropped;
        for (kind, count) in &sink.by_kind {
            *self.events_by_kind.entry(kind).or_default() += count;
        }
    }

    pub fn stops(&self) -> u64 {
        self.seccomp + self.syscall + self.fork + self.exec + self.group + self.signal + self.other
    }
}

pub struct Outcome {
    /// How the entrypoint ended (None if it was never seen to end, and in attach mode).
    pub root: Option<Death>,
    pub stats: Stats,
    /// Attach mode: threads let go at the end (none when every traced process exited).
    pub detached: usize,
}

/// A call that asked for its exit stop, and how to decode it there.
struct Pending {
    decoder: Decoder,
    call: Call,
}

/// A call a signal woke with a restart code: whether the program sees
/// EINTR or the call runs again is decided when the signal is delivered.
struct Interrupted {
    pending: Pending,
    /// Whether SA_RESTART makes the kernel run the call again
    /// (ERESTARTSYS), or any handler makes it EINTR (ERESTARTNOHAND).
    sa_restart_restarts: bool,
    /// Instruction pointer at the exit stop, and whether the thread runs
    /// code of an ABI whose signal frames the tracer can read (x86_64, i386).
    exit_ip: u64,
    frame_readable: bool,
    /// Single-stepping into the handler, to read the kernel's decision.
    stepping: bool,
}

/// What to do with a signal at its delivery stop.
enum SignalAction {
    Deliver,
    /// Deliver it and stop at the handler's first instruction.
    DeliverAndStep,
    /// The tracer's own single-step trap: not the workload's.
    Discard,
}

/// Supervised opens: the listener, what wakes the engine for ptrace stops
/// while it waits on it, and the opens bounced back to ptrace.
struct Supervision {
    supervisor: Supervisor,
    /// None where no signalfd could be had: the engine then looks at both
    /// every few milliseconds.
    child_stops: Option<SignalFd>,
    /// A wait found no stop since `child_stops` was last read: every stop
    /// since raised a SIGCHLD, which keeps `child_stops` readable until
    /// read, so the next wait may as well wait for it (one syscall less
    /// per supervised call).
    stops_collected: bool,
    bounced: HashMap<Pid, Bounce>,
    /// The last name call the tracer made for each thread (number,
    /// arguments, result), until the thread's next notification: a signal
    /// can end the thread's wait before the answer, or even after it was
    /// sent (the kernel then drops it), and that thread's signal-delivery
    /// stop then makes the call return this result instead of restarting
    /// it (restarted, an unlink or a mkdir would fail the second time).
    made: HashMap<Pid, (i32, [u64; 6], i64)>,
    /// Whether a workload call carrying the marker has been logged.
    forged_marker_seen: bool,
}

/// Where a bounced open is on its way back to ptrace.
enum Bounce {
    /// PTRACE_INTERRUPT sent: its interrupt stop marks the call.
    Interrupting(Entered),
    /// Marked; the sixth argument's own value.
    Marked(u64, Entered),
    /// Its seccomp stop came: the value goes back at its exit stop.
    InCall(u64),
}

/// When a bounced open was first entered, and its caller's parent then: the
/// call's, not the later ptrace stop's (a parent can die in between).
#[derive(Clone, Copy)]
struct Entered {
    time: SystemTime,
    ppid: u32,
}

/// Ended processes whose fork event is awaited, at most: each costs a
/// little; past this, the list starts over (those fork events are then
/// stamped when handled).
const UNANNOUNCED_MAX: usize = 1024;

/// How long the engine waits on the listener alone, without a signalfd.
const POLL_WITHOUT_SIGNALFD: u16 = 5;

pub struct Engine {
    mode: Mode,
    procs: ProcessTable,
    /// Per thread, the traced syscall waiting for its exit stop.
    pending: HashMap<Pid, Pending>,
    /// Per thread, the call a signal interrupted, until the program's view
    /// of it is known.
    interrupted: HashMap<Pid, Interrupted>,
    sink: EventSink,
    /// User and group names of file owners; None with file stats off.
    names: Option<Names>,
    mounts: Mounts,
    reader: SyscallReader,
    /// The entrypoint; None in attach mode, which ends when every traced
    /// process is gone or `detach` is set.
    root: Option<Pid>,
    detach: Option<Arc<AtomicBool>>,
    /// Until the root's first exec, its calls (but that exec) are the
    /// tracer's own set-up (capabilities, the filter, --uid/--gid): not the
    /// workload's.
    root_started: bool,
    root_death: Option<Death>,
    stats: Stats,
    supervision: Option<Supervision>,
    /// Processes that ended before their creator's fork event was handled
    /// (the kernel's wait may give a new child's stops first, its whole
    /// life long): their parent and when they were adopted, until the
    /// event comes, which is then stamped no later than their first stop
    /// and adds no process. Dropped with their parent.
    unannounced: HashMap<Pid, (Pid, SystemTime)>,
    /// ptrace requests are only valid from the thread that attached.
    _single_thread: PhantomData<*const ()>,
}

impl Engine {
    /// `root` is seized and about to exec the entrypoint; its parent is the
    /// tracer. `file_stats`: events carry file metadata and owner names.
    pub fn new(mode: Mode, root: Pid, sink: EventSink, live: LiveProcesses, file_stats: bool) -> Self {
        let mut procs = ProcessTable::new(live);
        procs.add_root(root, Pid::this());
        Engine { root: Some(root), ..Engine::with_table(mode, procs, sink, file_stats) }
    }

    /// Attach mode: the processes are seized, each of their threads about to
    /// report an interrupt stop. Setting `detach` makes `run` let them go.
    pub fn attached(
        processes: Vec<Seized>,
        sink: EventSink,
        live: LiveProcesses,
        detach: Arc<AtomicBool>,
        file_stats: bool,
    ) -> Self {
        let mut procs = ProcessTable::new(live);
        for process in processes {
            procs.add_process(process.tgid, process.ppid);
            for &tid in process.threads.iter().filter(|&&tid| tid != process.tgid) {
                procs.add_thread(tid, process.tgid);
            }
        }
        Engine { detach: Some(detach), root_started: true, ..Engine::with_table(Mode::Full, procs, sink, file_stats) }
    }

    /// An engine over `procs`, with no root and nothing pending yet.
    fn with_table(mode: Mode, procs: ProcessTable, sink: EventSink, file_stats: bool) -> Self {
        Engine {
            mode,
            procs,
            pending: HashMap::new(),
            interrupted: HashMap::new(),
            sink,
            names: file_stats.then(Names::default),
            mounts: Mounts::default(),
            reader: SyscallReader::new(),
            root: None,
            detach: None,
            root_death: None,
            root_started: false,
            stats: Stats::default(),
            supervision: None,
            unannounced: HashMap::new(),
            _single_thread: PhantomData,
        }
    }

    fn finished(&self) -> bool {
        match self.root {
            Some(_) => self.root_death.is_some() && self.procs.is_empty(),
            None => self.procs.is_empty(),
        }
    }

    fn detach_requested(&self) -> bool {
        self.detach.as_ref().is_some_and(|d| d.load(Ordering::SeqCst))
    }

    /// Serves the filter's notifications with `supervisor` from now on.
    pub fn supervise(&mut self, supervisor: Supervisor) {
        let child_stops = match signals::child_stops() {
            Ok(fd) => Some(fd),
            Err(e) => {
                log!("cannot wait for ptrace stops on a descriptor ({e}); looking for them every {POLL_WITHOUT_SIGNALFD} ms");
                None
            }
        };
        self.supervision = Some(Supervision {
            supervisor,
            child_stops,
            stops_collected: false,
            bounced: HashMap::new(),
            made: HashMap::new(),
            forged_marker_seen: false,
        });
    }

    /// Traces until every tracee is gone.
    pub fn run(mut self) -> Outcome {
        let mut detached = 0;
        while !self.finished() {
            if self.detach_requested() {
                detached = attach::detach_all(self.procs.threads());
                break;
            }
            let stop = match self.next_stop() {
                Ok(stop) => stop,
                Err(Errno::EINTR) => continue,
                Err(_) => break, // ECHILD: nothing left to wait for.
            };
            let pid = stop_pid(&stop);
            let handled = panic::catch_unwind(AssertUnwindSafe(|| self.handle(stop)));
            if handled.is_err() {
                // A decoder bug must not freeze the workload: let it run on.
                log!("internal error while handling pid {pid}; continuing");
                let _ = nix::sys::ptrace::cont(pid, None);
            }
        }
        self.stats.add_sink(&self.sink);
        Outcome { root: self.root_death, stats: self.stats, detached }
    }

    /// The next ptrace stop; with supervised opens, the notifications that
    /// come first are served meanwhile.
    fn next_stop(&mut self) -> nix::Result<Stop> {
        loop {
            let Some(supervision) = &mut self.supervision else { return ptrace::wait_any() };
            if !supervision.stops_collected || supervision.child_stops.is_none() {
                match ptrace::poll_any()? {
                    // Others may be queued behind it under one SIGCHLD.
                    Some(stop) => return Ok(stop),
                    None => supervision.stops_collected = true,
                }
            }
            // No allocation per wait: the signalfd's slot, without one, is
            // the listener again and left out of the poll.
            let listener = supervision.supervisor.listener().as_fd();
            let second = supervision.child_stops.as_ref().map_or(listener, |fd| fd.as_fd());
            let mut fds = [PollFd::new(listener, PollFlags::POLLIN), PollFd::new(second, PollFlags::POLLIN)];
            let (watched, timeout) = match supervision.child_stops {
                Some(_) => (2, PollTimeout::NONE),
                None => (1, PollTimeout::from(POLL_WITHOUT_SIGNALFD)),
            };
            poll(&mut fds[..watched], timeout)?;
            let ready = |fd: &PollFd<'_>| fd.revents().unwrap_or(PollFlags::empty());
            let (listener, woken) = (ready(&fds[0]), fds[1..watched].first().map(ready));
            if woken.is_some_and(|r| r.contains(PollFlags::POLLIN)) {
                if let Some(child_stops) = &supervision.child_stops {
                    // One read empties it: SIGCHLD is a standard signal, of
                    // which at most one is pending (a second read would only
                    // say EAGAIN, once per stop). Another one pending makes
                    // the next poll return at once: no stop is missed.
                    let _ = child_stops.read_signal();
                    supervision.stops_collected = false;
                }
            }
            if listener.contains(PollFlags::POLLIN) {
                self.serve_notification();
            } else if listener.intersects(PollFlags::POLLHUP | PollFlags::POLLERR) {
                // No task is left under the filter: only ptrace stops remain.
                return ptrace::wait_any();
            }
        }
    }

    /// Serves one pending notification: performed, failed, or bounced back
    /// to ptrace.
    fn serve_notification(&mut self) {
        let time = SystemTime::now();
        let Some(supervision) = &self.supervision else { return };
        let Some(notification) = supervision.supervisor.take() else { return };
        let entered =
            Entered { time, ppid: self.procs.process_of(notification.tid).map_or(0, |p| p.ppid.as_raw() as u32) };
        let Some(supervision) = &mut self.supervision else { return };
        // The thread has moved on from the last call made for it.
        supervision.made.remove(&notification.tid);
        match supervision.supervisor.serve(notification) {
            Served::Opened { call, fd, id, path } => self.report_supervised(&call, Supervised::Opened { fd, id, path }),
            Served::Failed { call, errno, path } => self.report_supervised(&call, Supervised::Failed { errno, path }),
            Served::Named { call, named } => {
                let n = &call.notification;
                supervision.made.insert(n.tid, (n.nr, n.args, named.retval));
                self.report_supervised(&call, Supervised::Named(&named));
            }
            Served::Bounce(tid) => {
                self.stats.bounced += 1;
                match ptrace::interrupt(tid) {
                    Ok(()) => {
                        supervision.bounced.insert(tid, Bounce::Interrupting(entered));
                    }
                    // Not a thread the tracer can stop: its call runs as the
                    // kernel has it, unseen, rather than never.
                    Err(e) => {
                        log!("cannot stop thread {tid} to trace its call ({e}); the call runs unseen");
                        let _ = supervision.supervisor.let_run(notification.id);
                    }
                }
            }
            Served::Gone => {}
        }
    }

    /// Serves the notifications queued by now. Called before a dead
    /// process's children are given to their new parent: a call one of them
    /// entered while its parent lived, still waiting behind the death's
    /// ptrace stop, names the parent it had. Each thread has at most one
    /// queued notification, so at most one round per thread.
    fn serve_queued_notifications(&mut self) {
        for _ in 0..self.procs.thread_count() {
            let Some(supervision) = &self.supervision else { return };
            let mut listener = [PollFd::new(supervision.supervisor.listener().as_fd(), PollFlags::POLLIN)];
            let queued = poll(&mut listener, PollTimeout::ZERO).is_ok_and(|ready| ready > 0)
                && listener[0].revents().is_some_and(|r| r.contains(PollFlags::POLLIN));
            if !queued {
                return;
            }
            self.serve_notification();
        }
    }

    fn report_supervised(&mut self, performed: &Performed, outcome: Supervised<'_>) {
        let n = &performed.notification;
        if Some(n.tid) == self.root && !self.root_started {
            return;
        }
        self.stats.supervised += 1;
        let entry = SyscallEntry::new(Abi::X86_64, n.nr as u64, n.args);
        let mut call = Call::new(performed.name, &entry, performed.time);
        call.ppid = Some(self.ctx(n.tid).ppid());
        call.entry_bytes.clone_from(&performed.entry_bytes);
        call.entry_target.clone_from(&performed.entry_target);
        performed.decoder.supervised(&mut self.ctx(n.tid), &call, outcome);
    }

    /// At a bounced open's interrupt stop: marks it for ptrace.
    fn mark_bounced(&mut self, tid: Pid) {
        let Some(supervision) = &mut self.supervision else { return };
        if let Some(Bounce::Interrupting(entered)) = supervision.bounced.remove(&tid) {
            if let Ok(Some(own)) =
                ptrace::restart_supervised(tid, supervision.supervisor.marker(), true, notified, None)
            {
                supervision.bounced.insert(tid, Bounce::Marked(own, entered));
            }
        }
    }

    /// At a seccomp stop: a bounced call's, marked, is now under ptrace.
    /// Returns when and with which parent it was first entered. A call
    /// that carries the marker without having been bounced was marked by
    /// the workload itself (it can read the marker of a bounced call of a
    /// sibling's in /proc): the marker is taken off, and the kernel's
    /// second run of the filters after this stop hands the call to the
    /// tracer as any other (Err). A marked call of a form the filter never
    /// hands to the tracer (an O_TMPFILE open) stops under ptrace anyway,
    /// and is decoded here as any other.
    fn bounced_entered(&mut self, tid: Pid, entry: &SyscallEntry) -> Result<Option<Entered>, ()> {
        let Some(supervision) = self.supervision.as_mut() else { return Ok(None) };
        // The marker first: the table is looked up only for a marked call.
        let marked = entry.abi == Abi::X86_64
            && entry.args[supervise::MARKER_ARG] == supervision.supervisor.marker()
            && notified(entry.nr, &entry.args);
        match (marked, supervision.bounced.get(&tid)) {
            (true, Some(&Bounce::Marked(own, entered))) => {
                supervision.bounced.insert(tid, Bounce::InCall(own));
                Ok(Some(entered))
            }
            (true, _) => {
                let _ = ptrace::set_sixth_arg(tid, 0);
                if !supervision.forged_marker_seen {
                    supervision.forged_marker_seen = true;
                    log!("a workload call carried the tracer's marker of bounced calls; the tracer makes it as any other");
                }
                Err(())
            }
            (false, _) => Ok(None),
        }
    }

    /// At a syscall stop: a bounced open's exit, where its sixth argument
    /// gets its own value back. Not at its seccomp stop: the kernel runs the
    /// filters again after a tracer's seccomp stop, and without the marker
    /// that second run would notify the call again.
    fn unmark_bounced(&mut self, tid: Pid) {
        let Some(supervision) = &mut self.supervision else { return };
        if let Some(Bounce::InCall(own)) = supervision.bounced.get(&tid) {
            let _ = ptrace::set_sixth_arg(tid, *own);
            supervision.bounced.remove(&tid);
        }
    }

    /// Whether a bounced open is under way on this thread (its exit stop is
    /// needed to put its argument back).
    fn bounced_in_call(&self, tid: Pid) -> bool {
        self.supervision.as_ref().is_some_and(|s| matches!(s.bounced.get(&tid), Some(Bounce::InCall(_))))
    }

    /// A thread's credentials, root or namespaces may have changed (a
    /// sibling sharing them may have changed them): what the supervisor
    /// and the owner names knew of threads is forgotten.
    fn forget_all_threads(&mut self) {
        if let Some(names) = &mut self.names {
            names.forget_threads(None);
        }
        if let Some(supervision) = &mut self.supervision {
            supervision.supervisor.forget();
        }
    }

    /// A new task that has not run yet takes what the supervisor knows of its
    /// creator, unless it has namespaces of its own. `flags`: the creator's
    /// clone entry's, matching the event or not. Supervised calls exist
    /// only for a workload traced from its start, so every clone's entry
    /// was seen: a fork or vfork event without one was fork(2) or vfork(2),
    /// which make none; a clone's flags not known leave the child to be
    /// looked at.
    fn supervisor_inherits(
        &mut self,
        parent: Pid,
        child: Pid,
        child_tgid: Pid,
        flags: Option<i32>,
        kind: ForkEventKind,
    ) {
        let Some(supervision) = &mut self.supervision else { return };
        let own_namespaces = match (flags, kind) {
            (Some(flags), _) => flags & (libc::CLONE_NEWNS | libc::CLONE_NEWUSER) != 0,
            (None, ForkEventKind::Fork | ForkEventKind::Vfork) => false,
            (None, ForkEventKind::Clone) => true,
        };
        supervision.supervisor.inherit(parent, child, child_tgid, own_namespaces);
    }

    /// A thread ended (its id may be reused): what the supervisor and the
    /// owner names knew of it is forgotten.
    fn forget_thread(&mut self, tid: Pid) {
        if let Some(names) = &mut self.names {
            names.forget_threads(Some(tid));
        }
        if let Some(supervision) = &mut self.supervision {
            supervision.bounced.remove(&tid);
            supervision.made.remove(&tid);
            supervision.supervisor.forget_thread(tid);
        }
    }

    /// The tracer makes no more calls for the workload: from now on every
    /// notified call goes to ptrace (bounced), where the kernel runs the
    /// workload's own call under its own confinement.
    fn supervisor_steps_back(&mut self, why: &str) {
        if let Some(supervision) = &mut self.supervision {
            if supervision.supervisor.step_back() {
                log!("{why}; the tracer no longer makes calls for the workload, every one stops under ptrace");
            }
        }
    }

    fn ctx(&mut self, tid: Pid) -> Ctx<'_> {
        Ctx { tid, procs: &mut self.procs, sink: &mut self.sink, names: self.names.as_mut(), mounts: &mut self.mounts }
    }

    /// How to resume a thread that has no signal to receive.
    fn resume_mode(&self, tid: Pid) -> Resume {
        if self.pending.contains_key(&tid) || self.mode == Mode::Full || self.bounced_in_call(tid) {
            Resume::Syscall
        } else {
            Resume::Continue
        }
    }

    fn handle(&mut self, stop: Stop) {
        match stop {
            Stop::Seccomp(stop) => {
                self.stats.seccomp += 1;
                let how = self.on_seccomp(stop.pid);
                let _ = stop.resume(how);
            }
            Stop::Syscall(stop) => {
                self.stats.syscall += 1;
                self.on_syscall(stop.pid);
                let how = self.resume_mode(stop.pid);
                let _ = stop.resume(how);
            }
            Stop::Fork(stop, kind) => {
                self.stats.fork += 1;
                self.on_fork(&stop, kind);
                let how = self.resume_mode(stop.pid);
                let _ = stop.resume(how);
            }
            Stop::Exec(stop) => {
                self.stats.exec += 1;
                self.on_exec(&stop);
                let how = self.resume_mode(stop.pid);
                let _ = stop.resume(how);
            }
            Stop::Group(stop) => {
                self.stats.group += 1;
                let _ = stop.listen();
            }
            Stop::Trap(stop) => {
                self.stats.other += 1;
                if self.procs.thread(stop.pid).is_none() {
                    self.adopt(stop.pid);
                }
                self.mark_bounced(stop.pid);
                let how = self.resume_mode(stop.pid);
                let _ = stop.resume(how);
            }
            Stop::Signal(stop) => {
                self.stats.signal += 1;
                // A call of the ptrace path that the signal interrupted is
                // the kernel's to restart or fail, as natively.
                if let (Some(supervision), false) = (&mut self.supervision, self.interrupted.contains_key(&stop.pid)) {
                    let made = supervision.made.get(&stop.pid).copied();
                    let marker = supervision.supervisor.marker();
                    if let Ok(Some(_)) = ptrace::restart_supervised(stop.pid, marker, false, notified, made) {
                        supervision.made.remove(&stop.pid);
                    }
                }
                let how = self.resume_mode(stop.pid);
                let _ = match self.on_signal(stop.pid, stop.signal) {
                    SignalAction::Deliver => stop.deliver(how),
                    SignalAction::DeliverAndStep => stop.deliver(Resume::Step),
                    SignalAction::Discard => stop.discard(how),
                };
            }
            Stop::Dead(pid, death) => self.on_death(pid, death),
        }
    }

    /// A watched syscall is about to run. Returns how to resume.
    fn on_seccomp(&mut self, tid: Pid) -> Resume {
        if self.mode == Mode::Full {
            // Only a filter of the workload's own can stop here; the
            // syscall-entry stop decodes the call.
            return self.resume_mode(tid);
        }
        let time = SystemTime::now();
        let abi_in_data = |data| SeccompData::decode(data).abi();
        let Ok((entry, data)) = self.reader.read_seccomp(tid, abi_in_data) else { return Resume::Continue };
        let Ok(bounced) = self.bounced_entered(tid, &entry) else { return self.resume_mode(tid) };

        if self.guarded(tid, &entry, time) {
            return self.resume_mode(tid);
        }
        // The filter's data names the table entry, but a filter of the
        // workload's own can return any data: it is only a hint, checked
        // against the real syscall number.
        let hinted = match SeccompData::decode(data) {
            SeccompData::Known { index, .. } => Some(&SYSCALLS[index]),
            SeccompData::Foreign | SeccompData::Guard { .. } => None,
        };
        let def = hinted
            .filter(|def| def.number(entry.abi).map(u64::from) == Some(entry.nr))
            .or_else(|| syscalls::lookup(entry.abi, entry.nr));
        match def {
            Some(def) => {
                self.enter(tid, def, entry, bounced.map_or(time, |b| b.time));
                if let (Some(bounced), Some(pending)) = (bounced, self.pending.get_mut(&tid)) {
                    pending.call.ppid = Some(bounced.ppid);
                }
            }
            // A guarded call aimed elsewhere is not the tracer's business.
            None if guard::lookup(entry.abi, entry.nr).is_some() => {}
            // x32 or a foreign architecture: seen, not decodable.
            None => self.stats.foreign += 1,
        }
        self.resume_mode(tid)
    }

    /// A call aimed at the tracer itself is refused (EPERM) and reported;
    /// returns whether this one was.
    fn guarded(&mut self, tid: Pid, entry: &SyscallEntry, time: SystemTime) -> bool {
        let Some(guard) = guard::lookup(entry.abi, entry.nr) else { return false };
        let Some(aim) = guard::aims_at_tracer(guard, tid, &entry.args, Pid::this()) else { return false };
        let _ = ptrace::refuse_syscall(tid, libc::EPERM);
        let mut call = Call::new(guard.name, entry, time);
        call.ppid = Some(self.ctx(tid).ppid());
        decode::tracer_target_refused(&mut self.ctx(tid), &call, aim);
        true
    }

    /// A PTRACE_SYSCALL stop: an entry in full mode, or a watched call's exit.
    fn on_syscall(&mut self, tid: Pid) {
        self.unmark_bounced(tid);
        let time = SystemTime::now();
        let pending = self.pending.contains_key(&tid);
        let Some(thread) = self.procs.thread_mut(tid) else { return };
        let Ok(state) = self.reader.read_syscall(tid, thread.in_syscall || pending) else { return };
        match state {
            SyscallState::Entry(entry) => {
                thread.in_syscall = true;
                // An entry stop while a call is pending is the same call seen
                // again (pre-4.8 kernels stop at entry after the seccomp stop).
                if !pending && !self.guarded(tid, &entry, time) {
                    if let Some(def) = syscalls::lookup(entry.abi, entry.nr) {
                        self.enter(tid, def, entry, time);
                    }
                }
            }
            SyscallState::Exit(retval) => {
                thread.in_syscall = false;
                if let Some(pending) = self.pending.remove(&tid) {
                    self.on_exit(tid, pending, retval);
                }
            }
        }
    }

    /// A watched call's exit: reported with what the program sees.
    fn on_exit(&mut self, tid: Pid, pending: Pending, retval: i64) {
        match pending.decoder {
            Decoder::Credentials(_)
            | Decoder::Namespace(_)
            | Decoder::Prctl
            | Decoder::Confines(ConfiningCall::Umask) => self.forget_all_threads(),
            Decoder::Confines(ConfiningCall::Landlock) if retval == 0 => {
                self.supervisor_steps_back("a workload process confined itself with Landlock")
            }
            Decoder::Confines(ConfiningCall::Fanotify) if retval >= 0 && pending.call.args[0] & FAN_CONTENT != 0 => {
                self.supervisor_steps_back("a workload process made a fanotify group with permission events")
            }
            _ => {}
        }
        match restart::classify(retval) {
            restart::Exit::Final(retval) => pending.decoder.exit(&mut self.ctx(tid), &pending.call, retval),
            // The call runs again, and that one is reported.
            restart::Exit::Restarted => {}
            restart::Exit::Interrupted { sa_restart_restarts } => {
                let (exit_ip, frame_readable) =
                    ptrace::position(tid).map_or((0, false), |(ip, _, abi)| (ip, abi != Abi::Unknown));
                let interrupted =
                    Interrupted { pending, sa_restart_restarts, exit_ip, frame_readable, stepping: false };
                self.interrupted.insert(tid, interrupted);
            }
        }
    }

    /// An interrupted call the program sees fail with EINTR.
    fn report_eintr(&mut self, tid: Pid, interrupted: Interrupted) {
        let Pending { decoder, call } = interrupted.pending;
        decoder.exit(&mut self.ctx(tid), &call, restart::EINTR);
    }

    /// A signal about to be delivered: for a thread whose call it
    /// interrupted, the moment the kernel decides between EINTR and a
    /// restart. Without a handler the call runs again (or the process
    /// dies); with one, the handler's frame says.
    fn on_signal(&mut self, tid: Pid, signal: i32) -> SignalAction {
        let Some(interrupted) = self.interrupted.remove(&tid) else { return SignalAction::Deliver };
        if interrupted.stepping {
            let frame = ptrace::position(tid).ok();
            let verdict = frame.and_then(|(_, sp, abi)| restart::verdict_from_frame(tid, sp, abi, interrupted.exit_ip));
            if verdict != Some(Verdict::Restarted) {
                self.report_eintr(tid, interrupted);
            }
            return if signal == libc::SIGTRAP { SignalAction::Discard } else { SignalAction::Deliver };
        }
        let caught = procfs::status(tid).and_then(|s| s.caught).map(|mask| mask >> (signal - 1) & 1 == 1);
        match caught {
            Some(false) => {
                self.interrupted.insert(tid, interrupted);
                SignalAction::Deliver
            }
            Some(true) if interrupted.sa_restart_restarts && interrupted.frame_readable => {
                self.interrupted.insert(tid, Interrupted { stepping: true, ..interrupted });
                SignalAction::DeliverAndStep
            }
            // ERESTARTNOHAND with a handler; or a frame the tracer cannot read.
            _ => {
                self.report_eintr(tid, interrupted);
                SignalAction::Deliver
            }
        }
    }

    fn enter(&mut self, tid: Pid, def: &'static SyscallDef, entry: SyscallEntry, time: SystemTime) {
        // A thread whose call was interrupted enters a call again without
        // having seen EINTR: the kernel restarted it, and this is that call.
        self.interrupted.remove(&tid);
        let exec = matches!(def.action, Action::Trace(Decoder::Exec(_)));
        if Some(tid) == self.root && !self.root_started && !exec {
            return;
        }
        if let Some(thread) = self.procs.thread_mut(tid) {
            // A clone that announced a child and reached no fork event failed.
            thread.forking = None;
        }
        let mut decoder = match def.action {
            Action::Trace(decoder) | Action::Supervise { decoder, .. } => decoder,
            // The filter checks the argument too; a stop from a filter of the
            // workload's own, or from full-ptrace mode, is checked here.
            Action::TraceWhen { index, value, decoder } if entry.args[index] as u32 == value => decoder,
            Action::TraceWhen { .. } => return,
            Action::TraceIf { when, decoder } if when.passes(&entry.args) => decoder,
            Action::TraceIf { .. } => return,
            Action::Refuse(errno) => {
                let _ = ptrace::refuse_syscall(tid, errno);
                return;
            }
        };
        let mut call = Call::new(def.name, &entry, time);
        call.ppid = Some(self.ctx(tid).ppid());
        match decoder.entry(&mut self.ctx(tid), &mut call) {
            Next::Done => {}
            Next::Exit => {
                self.pending.insert(tid, Pending { decoder, call });
            }
            Next::Refuse(errno) => {
                let _ = ptrace::refuse_syscall(tid, errno);
            }
        }
    }

    fn on_fork(&mut self, stop: &EventStop, kind: ForkEventKind) {
        let parent = stop.pid;
        let Ok(child) = stop.message().map(|pid| Pid::from_raw(pid as i32)) else { return };
        let request = self.procs.thread_mut(parent).and_then(|t| t.forking.take());
        let entered_flags = request.map(|r| r.flags as i32);
        // The request must be the clone the kernel reports: a vfork is
        // reported as VFORK and a thread as CLONE.
        let request = request.filter(|r| {
            let flags = r.flags as i32;
            (flags & libc::CLONE_VFORK != 0) == (kind == ForkEventKind::Vfork)
                && (flags & libc::CLONE_THREAD == 0 || kind == ForkEventKind::Clone)
        });
        let thread = match request {
            Some(request) => request.flags as i32 & libc::CLONE_THREAD != 0,
            None => kind == ForkEventKind::Clone && procfs::status(child).and_then(|s| s.tgid) != Some(child.as_raw()),
        };
        let sibling = request.is_some_and(|r| r.flags as i32 & libc::CLONE_PARENT != 0);
        let tables = !thread && self.shares_tables_with_child(parent, request.map(|r| r.flags as i32), kind);
        // A clone's flags not known may have had CLONE_FS.
        let directory =
            !thread && request.map_or(kind == ForkEventKind::Clone, |r| r.flags as i32 & libc::CLONE_FS != 0);
        let sharing = Sharing { thread, sibling, tables, directory };
        // Ended already: its parent is this one, or with CLONE_PARENT this one's.
        let ended = self.unannounced.remove(&child).and_then(|(ppid, adopted)| {
            let created = self.procs.thread(parent).is_some_and(|t| t.tgid == ppid)
                || self.procs.process_of(parent).is_some_and(|p| p.ppid == ppid);
            (created && self.procs.thread(child).is_none()).then_some(adopted)
        });
        // A child adopted before this event has run: its own state is read.
        let adopted = self.procs.thread_mut(child).and_then(|t| t.adopted_at.take());
        let child_tgid = match ended {
            Some(_) => child,
            None => self.procs.add_child(parent, child, sharing),
        };
        if adopted.is_none() && ended.is_none() {
            self.supervisor_inherits(parent, child, child_tgid, entered_flags, kind);
        }
        if child_tgid == child {
            // A child adopted before this event may already have events of
            // its own, or have ended: the fork is stamped no later than its
            // first stop.
            let adopted_at = adopted.or(ended);
            let time = request.map_or_else(SystemTime::now, |r| r.time);
            let time = adopted_at.map_or(time, |adopted| time.min(adopted));
            let (fork_kind, default_syscall) = match kind {
                ForkEventKind::Fork => (ForkKind::Fork, "fork"),
                ForkEventKind::Vfork => (ForkKind::Vfork, "vfork"),
                ForkEventKind::Clone => (ForkKind::Clone, "clone"),
            };
            let syscall = request.map_or(default_syscall, |r| r.syscall);
            let cx = self.ctx(parent);
            let event = Event {
                retval: Some(i64::from(child.as_raw())),
                syscall: syscall.to_owned(),
                payload: Some(Payload::Fork(proto::ForkEvent {
                    child_pid: child.as_raw() as u32,
                    kind: fork_kind as i32,
                    flags: request.map_or(0, |r| r.flags),
                })),
                ..cx.event(time)
            };
            self.sink.emit(event);
        }
    }

    /// Whether a new process shares its creator's descriptor table or
    /// memory with a task that can run alongside it. A vfork's creator
    /// waits for the child's exec or exit: only its other threads, or
    /// processes it shares with already, can. Flags not known (no clone
    /// entry seen) count as shared, but for fork(2)'s.
    fn shares_tables_with_child(&self, parent: Pid, flags: Option<i32>, kind: ForkEventKind) -> bool {
        let flags = match (flags, kind) {
            (Some(flags), _) => flags,
            (None, ForkEventKind::Fork) => 0,
            (None, ForkEventKind::Vfork) => libc::CLONE_VM | libc::CLONE_VFORK,
            (None, ForkEventKind::Clone) => return true,
        };
        flags & libc::CLONE_FILES != 0
            || (flags & libc::CLONE_VM != 0
                && (flags & libc::CLONE_VFORK == 0 || self.procs.memory_or_table_shared(parent)))
    }

    /// A new task whose first stop came before its creator's fork event:
    /// traced from now on with its state from /proc; the event, when it
    /// comes, only announces it.
    fn adopt(&mut self, pid: Pid) {
        let time = SystemTime::now();
        let status = procfs::status(pid);
        let tgid = status.as_ref().and_then(|s| s.tgid).map_or(pid, Pid::from_raw);
        let ppid = status.as_ref().and_then(|s| s.ppid).map_or_else(Pid::this, Pid::from_raw);
        if tgid != pid && self.procs.thread(tgid).is_some() {
            self.procs.add_thread(pid, tgid);
        } else {
            self.procs.add_process(pid, ppid);
        }
        if let Some(thread) = self.procs.thread_mut(pid) {
            thread.adopted_at = Some(time);
        }
    }

    fn on_exec(&mut self, stop: &EventStop) {
        let time = SystemTime::now();
        let tgid = stop.pid;
        self.root_started |= Some(tgid) == self.root;
        let former = stop.message().map_or(tgid, |tid| Pid::from_raw(tid as i32));
        self.procs.exec(tgid, former);
        // The leader's own pending call, if another thread exec'd, is gone with it.
        let pending = self.pending.remove(&former);
        self.pending.remove(&tgid);
        self.interrupted.remove(&former);
        self.interrupted.remove(&tgid);
        let call = pending.filter(|p| matches!(p.decoder, Decoder::Exec(_))).map(|p| p.call);
        let status = decode::exec_succeeded(&mut self.ctx(tgid), call, time, former);
        // The exec'ing thread now has the process id, and its own root,
        // not the former leader's.
        if let Some(names) = &mut self.names {
            names.forget_threads(Some(former));
            names.forget_threads(Some(tgid));
        }
        if let Some(supervision) = &mut self.supervision {
            supervision.bounced.remove(&former);
            supervision.made.remove(&former);
            supervision.supervisor.exec(former, tgid, status.as_ref());
        }
    }

    fn on_death(&mut self, pid: Pid, death: Death) {
        self.pending.remove(&pid);
        // Killed by the signal that interrupted its call: the call did not
        // complete (reported while the names still know its root).
        if let Some(interrupted) = self.interrupted.remove(&pid) {
            self.report_eintr(pid, interrupted);
        }
        self.forget_thread(pid);
        let (thread, process) = self.procs.remove_thread(pid);
        if let Some(process) = process {
            // Its fork events not handled yet will not come now: its
            // children that ended before them are forgotten.
            self.unannounced.retain(|_, (ppid, _)| *ppid != pid);
            if let Some(adopted) = thread.and_then(|t| t.adopted_at) {
                if self.unannounced.len() >= UNANNOUNCED_MAX {
                    self.unannounced.clear();
                }
                self.unannounced.insert(pid, (process.ppid, adopted));
            }
            self.serve_queued_notifications();
            self.procs.reparent_children(pid, |child| procfs::status(child)?.ppid.map(Pid::from_raw));
            let event = Event {
                pid: pid.as_raw() as u32,
                tid: pid.as_raw() as u32,
                ppid: process.ppid.as_raw() as u32,
                timestamp: Some(proto::timestamp(SystemTime::now())),
                syscall: "exit".to_owned(),
                payload: Some(Payload::Exit(death.event())),
                ..Event::default()
            };
            self.sink.emit(event);
        }
        if Some(pid) == self.root {
            self.root_death = Some(death);
        }
    }
}

fn stop_pid(stop: &Stop) -> Pid {
    match stop {
        Stop::Dead(pid, _) => *pid,
        Stop::Seccomp(s) | Stop::Syscall(s) => s.pid,
        Stop::Fork(s, _) | Stop::Exec(s) | Stop::Trap(s) => s.pid,
        Stop::Group(s) => s.pid,
        Stop::Signal(s) => s.pid,
    }
}

/// fanotify_init's FAN_CLASS_CONTENT and FAN_CLASS_PRE_CONTENT: groups whose
/// listener answers permission events.
const FAN_CONTENT: u64 = 0x04 | 0x08;

/// Whether the filter hands this x86_64 call to the supervisor.
fn notified(nr: u64, args: &[u64; 6]) -> bool {
    syscalls::supervised(nr, args).is_some()
}
