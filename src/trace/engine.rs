//! The trace engine: one thread, every ptrace call, one loop over wait
//! results. It never blocks except in `waitpid`, and it never does I/O other
//! than short /proc reads and tracee memory reads while a tracee is stopped.
//!
//! Stop costs are what the design minimises: a watched syscall costs its
//! seccomp stop, plus an exit stop only when its decoder asked for one; an
//! unwatched syscall never stops (the filter allows it in the kernel).

use std::collections::HashMap;
use std::marker::PhantomData;
use std::panic::{self, AssertUnwindSafe};
use std::time::SystemTime;

use nix::errno::Errno;
use nix::unistd::Pid;

use crate::export::EventSink;
use crate::proto::{self, event::Payload, Event, ExitCause, ForkKind};
use crate::trace::decode::{self, Ctx};
use crate::trace::process::{LiveProcesses, ProcessTable};
use crate::trace::procfs;
use crate::trace::ptrace::{self, Death, EventStop, ForkEventKind, Resume, Stop, SyscallReader, SyscallState};
use crate::trace::seccomp::SeccompData;
use crate::trace::syscalls::{self, Call, Next, SYSCALLS};

/// How syscalls reach the tracer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// The seccomp filter stops only watched syscalls.
    Seccomp,
    /// `--disable-seccomp`: every syscall stops at entry and exit.
    Full,
}

/// Stops handled, by kind, reported with `--stats`.
#[derive(Debug, Default, Clone, Copy)]
pub struct Stats {
    pub seccomp: u64,
    pub syscall: u64,
    pub fork: u64,
    pub exec: u64,
    pub group: u64,
    pub signal: u64,
    pub other: u64,
    pub events: u64,
    pub dropped: u64,
}

pub struct Outcome {
    /// How the entrypoint ended (None if it was never seen to end).
    pub root: Option<Death>,
    pub stats: Stats,
}

pub struct Engine {
    mode: Mode,
    procs: ProcessTable,
    sink: EventSink,
    reader: SyscallReader,
    root: Pid,
    root_death: Option<Death>,
    /// New children whose first stop came before their parent's fork event:
    /// held stopped until the parent says who they are.
    unclaimed: HashMap<Pid, EventStop>,
    stats: Stats,
    /// ptrace requests are only valid from the thread that attached.
    _single_thread: PhantomData<*const ()>,
}

impl Engine {
    /// `root` is seized and about to exec the entrypoint; its parent is the tracer.
    pub fn new(mode: Mode, root: Pid, sink: EventSink, live: LiveProcesses) -> Self {
        let mut procs = ProcessTable::new(live);
        procs.add_process(root, Pid::this());
        Engine {
            mode,
            procs,
            sink,
            reader: SyscallReader::new(),
            root,
            root_death: None,
            unclaimed: HashMap::new(),
            stats: Stats::default(),
            _single_thread: PhantomData,
        }
    }

    /// Traces until every tracee is gone.
    pub fn run(mut self) -> Outcome {
        while !(self.root_death.is_some() && self.procs.is_empty() && self.unclaimed.is_empty()) {
            let stop = match ptrace::wait_any() {
                Ok(stop) => stop,
                Err(Errno::EINTR) => continue,
                Err(_) => break, // ECHILD: nothing left to wait for.
            };
            let pid = stop_pid(&stop);
            let handled = panic::catch_unwind(AssertUnwindSafe(|| self.handle(stop)));
            if handled.is_err() {
                // A decoder bug must not freeze the workload: let it run on.
                eprintln!("cws-instrumentation: internal error while handling pid {pid}; continuing");
                let _ = nix::sys::ptrace::cont(pid, None);
            }
        }
        self.stats.events = self.sink.emitted;
        self.stats.dropped = self.sink.dropped;
        Outcome { root: self.root_death, stats: self.stats }
    }

    fn ctx(&mut self, tid: Pid) -> Ctx<'_> {
        Ctx { tid, procs: &mut self.procs, sink: &mut self.sink }
    }

    /// How to resume a thread that has no signal to receive.
    fn resume_mode(&self, tid: Pid) -> Resume {
        let pending = self.procs.thread(tid).is_some_and(|t| t.pending.is_some());
        if pending || self.mode == Mode::Full {
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
                if self.procs.thread(stop.pid).is_some() {
                    let how = self.resume_mode(stop.pid);
                    let _ = stop.resume(how);
                } else {
                    self.unclaimed.insert(stop.pid, stop);
                }
            }
            Stop::Signal(stop) => {
                self.stats.signal += 1;
                let how = self.resume_mode(stop.pid);
                let _ = stop.deliver(how);
            }
            Stop::Dead(pid, death) => self.on_death(pid, death),
        }
    }

    /// A watched syscall is about to run. Returns how to resume.
    fn on_seccomp(&mut self, tid: Pid) -> Resume {
        let time = SystemTime::now();
        let Ok((entry, data)) = self.reader.read_seccomp(tid) else { return Resume::Continue };
        let SeccompData::Known { index, .. } = data else {
            // x32 or a foreign architecture: seen, not decodable.
            return self.resume_mode(tid);
        };
        self.enter(tid, &SYSCALLS[index], entry, time);
        self.resume_mode(tid)
    }

    /// A PTRACE_SYSCALL stop: an entry in full mode, or a watched call's exit.
    fn on_syscall(&mut self, tid: Pid) {
        let time = SystemTime::now();
        let Some(thread) = self.procs.thread(tid) else { return };
        let in_syscall = thread.in_syscall || thread.pending.is_some();
        let Ok(state) = self.reader.read_syscall(tid, in_syscall) else { return };
        let Some(thread) = self.procs.thread_mut(tid) else { return };
        match state {
            SyscallState::Entry(entry) => {
                thread.in_syscall = true;
                // An entry stop while a call is pending is the same call seen
                // again (pre-4.8 kernels stop at entry after the seccomp stop).
                if thread.pending.is_none() {
                    if let Some(def) = syscalls::lookup(entry.abi, entry.nr) {
                        self.enter(tid, def, entry, time);
                    }
                }
            }
            SyscallState::Exit(retval) => {
                thread.in_syscall = false;
                if let Some(call) = thread.pending.take() {
                    (call.def.on_exit)(&mut self.ctx(tid), &call, retval);
                }
            }
        }
    }

    fn enter(&mut self, tid: Pid, def: &'static syscalls::SyscallDef, entry: ptrace::SyscallEntry, time: SystemTime) {
        let mut call = Call { def, abi: entry.abi, args: entry.args, time, entry_path: None, partial: false };
        if (def.on_entry)(&mut self.ctx(tid), &mut call) == Next::Exit {
            if let Some(thread) = self.procs.thread_mut(tid) {
                thread.pending = Some(call);
            }
        }
    }

    fn on_fork(&mut self, stop: &EventStop, kind: ForkEventKind) {
        let parent = stop.pid;
        let Ok(child) = stop.message().map(|pid| Pid::from_raw(pid as i32)) else { return };
        let request = self.procs.thread_mut(parent).and_then(|t| t.forking.take());
        let flags = match (request, kind) {
            (Some(request), _) => request.flags,
            (None, ForkEventKind::Fork) => libc::SIGCHLD as u64,
            (None, ForkEventKind::Vfork) => (libc::CLONE_VM | libc::CLONE_VFORK | libc::SIGCHLD) as u64,
            // The entry was not seen; ask the kernel whether it is a thread.
            (None, ForkEventKind::Clone) => match procfs::status(child).and_then(|s| s.tgid) {
                Some(tgid) if tgid != child.as_raw() => libc::CLONE_THREAD as u64,
                _ => 0,
            },
        };
        let child_tgid = self.procs.add_child(parent, child, flags);
        if child_tgid == child {
            let time = request.map_or_else(SystemTime::now, |r| r.time);
            let syscall = request.map_or(
                match kind {
                    ForkEventKind::Fork => "fork",
                    ForkEventKind::Vfork => "vfork",
                    ForkEventKind::Clone => "clone",
                },
                |r| r.syscall,
            );
            // The kernel's own classification: glibc's fork() is a clone.
            let fork_kind = match kind {
                ForkEventKind::Fork => ForkKind::Fork,
                ForkEventKind::Vfork => ForkKind::Vfork,
                ForkEventKind::Clone => ForkKind::Clone,
            };
            let cx = self.ctx(parent);
            let event = Event {
                retval: Some(i64::from(child.as_raw())),
                syscall: syscall.to_owned(),
                payload: Some(Payload::Fork(proto::ForkEvent {
                    child_pid: child.as_raw() as u32,
                    kind: fork_kind as i32,
                    flags: if syscall.starts_with("clone") { flags } else { 0 },
                })),
                ..cx.event(time)
            };
            self.sink.emit(event);
        }
        if let Some(held) = self.unclaimed.remove(&child) {
            let _ = held.resume(self.resume_mode(child));
        }
    }

    fn on_exec(&mut self, stop: &EventStop) {
        let time = SystemTime::now();
        let tgid = stop.pid;
        let former = stop.message().map_or(tgid, |tid| Pid::from_raw(tid as i32));
        self.procs.exec(tgid, former);
        let call = self.procs.thread_mut(tgid).and_then(|t| t.pending.take());
        decode::exec_succeeded(&mut self.ctx(tgid), call, time);
    }

    fn on_death(&mut self, pid: Pid, death: Death) {
        self.unclaimed.remove(&pid);
        let (_, process) = self.procs.remove_thread(pid);
        if !self.unclaimed.is_empty() {
            self.release_orphaned_children();
        }
        if let Some(process) = process {
            self.procs.reparent_children(pid, |child| procfs::status(child)?.ppid.map(Pid::from_raw));
            let (cause, code, signal, core_dumped) = match death {
                Death::Exited(code) => (ExitCause::Exited, Some(code), None, false),
                Death::Signaled { signal, core_dumped } => (ExitCause::Signaled, None, Some(signal), core_dumped),
            };
            let event = Event {
                pid: pid.as_raw() as u32,
                tid: pid.as_raw() as u32,
                ppid: process.ppid.as_raw() as u32,
                timestamp: Some(decode::timestamp(SystemTime::now())),
                syscall: "exit".to_owned(),
                payload: Some(Payload::Exit(proto::ExitEvent { cause: cause as i32, code, signal, core_dumped })),
                ..Event::default()
            };
            self.sink.emit(event);
        }
        if pid == self.root {
            self.root_death = Some(death);
        }
    }

    /// A parent can die between creating a child and the kernel's report of
    /// it; the held child would then wait forever. Held children whose
    /// parent is no longer traced (they were reparented to the tracer) are
    /// let go, with their state read from /proc.
    fn release_orphaned_children(&mut self) {
        let held: Vec<Pid> = self.unclaimed.keys().copied().collect();
        for child in held {
            let status = procfs::status(child);
            let ppid = status.as_ref().and_then(|s| s.ppid).map(Pid::from_raw);
            let tgid = status.as_ref().and_then(|s| s.tgid).map(Pid::from_raw);
            if ppid.is_some_and(|p| self.procs.thread(p).is_some()) {
                continue;
            }
            let Some(stop) = self.unclaimed.remove(&child) else { continue };
            match tgid {
                Some(tgid) if tgid != child => {
                    self.procs.add_child(tgid, child, libc::CLONE_THREAD as u64);
                }
                _ => self.procs.add_process(child, ppid.unwrap_or_else(Pid::this)),
            }
            let how = self.resume_mode(child);
            let _ = stop.resume(how);
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
