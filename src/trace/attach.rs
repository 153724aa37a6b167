//! Attach mode (`trace --pid`): seizing running processes, every thread of
//! each and their existing descendants, and letting them all go again.
//!
//! They are someone else's processes: seized without EXITKILL (if the tracer
//! dies, the kernel detaches them and they run on), and detached, each from
//! a stop, with the signal it was about to receive. A seccomp filter cannot
//! be added to a running process, so they are traced in full-ptrace mode.

use std::collections::{BTreeSet, HashSet};

use nix::errno::Errno;
use nix::unistd::Pid;

use crate::log::log;
use crate::queue::EventSink;
use crate::trace::procfs;
use crate::trace::procstat;
use crate::trace::ptrace::{self, Stop};
use crate::trace::snapshot::{self, Found};

/// A process seized at attach: its threads, all seized and interrupted
/// (each reports a [`Stop::Trap`] soon, from which it is resumed in
/// full-ptrace mode).
pub struct Seized {
    pub tgid: Pid,
    pub ppid: Pid,
    pub threads: Vec<Pid>,
}

/// Why a pid named on the command line is not traced.
#[derive(Debug)]
pub enum AttachError {
    NoSuchProcess(i32),
    Refused(i32, Errno),
}

impl std::fmt::Display for AttachError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AttachError::NoSuchProcess(pid) => write!(f, "cannot attach to pid {pid}: no such process"),
            AttachError::Refused(pid, errno) => write!(
                f,
                "cannot attach to pid {pid}: ptrace(PTRACE_SEIZE): {} (traced already, or the SYS_PTRACE capability is missing)",
                errno.desc()
            ),
        }
    }
}

/// What attaching to the named pids gave.
#[derive(Default)]
pub struct Attached {
    pub processes: Vec<Seized>,
    /// Named pids that could not be traced (the others are).
    pub failures: Vec<AttachError>,
}

/// Seizes the processes of `pids` and their descendants, and reports each
/// as an exec event seen at attach. Must run on the tracer thread.
pub fn attach(pids: &[i32], sink: &mut EventSink) -> Attached {
    let mut attached = Attached::default();
    let mut known = HashSet::new();
    for &pid in pids {
        let Some(tgid) = process_of(pid) else {
            attached.failures.push(AttachError::NoSuchProcess(pid));
            continue;
        };
        if known.contains(&tgid) {
            continue;
        }
        match seize_process(tgid, &mut known) {
            Ok(Some(seized)) => {
                let mut work = vec![seized];
                while let Some(seized) = work.pop() {
                    if let Some(event) = snapshot::exec_event(seized.tgid, Found::AtAttach) {
                        sink.emit(event);
                    }
                    for child in children(seized.tgid) {
                        match seize_process(child, &mut known) {
                            Ok(Some(seized)) => work.push(seized),
                            Ok(None) => {}
                            Err(errno) => {
                                log!("cannot trace pid {child}, a child of {}: {}", seized.tgid, errno.desc())
                            }
                        }
                    }
                    attached.processes.push(seized);
                }
            }
            Ok(None) => attached.failures.push(AttachError::NoSuchProcess(pid)),
            Err(errno) => attached.failures.push(AttachError::Refused(pid, errno)),
        }
    }
    attached
}

/// The process a pid (or a thread id) belongs to, if it exists.
fn process_of(pid: i32) -> Option<Pid> {
    if pid <= 0 {
        return None;
    }
    procfs::status(Pid::from_raw(pid)).and_then(|s| s.tgid).map(Pid::from_raw)
}

/// Seizes every thread of `tgid`, listing its threads again until a listing
/// shows none new: once all are seized, threads they start are traced by
/// the kernel itself. None when the process is gone, or was traced by us
/// already (a child born after its parent was seized is the kernel's to
/// report, with its fork event).
fn seize_process(tgid: Pid, known: &mut HashSet<Pid>) -> Result<Option<Seized>, Errno> {
    let mut threads = Vec::new();
    loop {
        let listed = tasks(tgid);
        let new: Vec<Pid> = listed.into_iter().filter(|tid| !known.contains(tid)).collect();
        if new.is_empty() {
            break;
        }
        for tid in new {
            known.insert(tid);
            match ptrace::seize_running(tid) {
                Ok(()) => {
                    // Stopped once, to be resumed at every syscall.
                    let _ = ptrace::interrupt(tid);
                    threads.push(tid);
                }
                // Gone since the listing.
                Err(Errno::ESRCH) => {}
                Err(Errno::EPERM) if traced_by_us(tid) => {}
                Err(errno) if threads.is_empty() => return Err(errno),
                Err(errno) => log!("cannot trace thread {tid} of pid {tgid}: {}", errno.desc()),
            }
        }
    }
    if threads.is_empty() {
        return Ok(None);
    }
    let ppid = procstat::stat(tgid).map_or_else(|| Pid::from_raw(0), |s| Pid::from_raw(s.ppid));
    Ok(Some(Seized { tgid, ppid, threads }))
}

fn traced_by_us(tid: Pid) -> bool {
    let Some((bytes, _)) = procfs::read_bounded(&format!("/proc/{tid}/status"), 4096) else { return false };
    let text = String::from_utf8_lossy(&bytes);
    let tracer = text.lines().find_map(|l| l.strip_prefix("TracerPid:")).and_then(|v| v.trim().parse::<i32>().ok());
    tracer == Some(std::process::id() as i32)
}

fn numbers(text: &str) -> impl Iterator<Item = Pid> + '_ {
    text.split_ascii_whitespace().filter_map(|n| n.parse::<i32>().ok()).filter(|&n| n > 0).map(Pid::from_raw)
}

/// The threads of a process, from /proc/PID/task.
fn tasks(tgid: Pid) -> Vec<Pid> {
    let Ok(entries) = std::fs::read_dir(format!("/proc/{tgid}/task")) else { return Vec::new() };
    entries.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok()).map(Pid::from_raw).collect()
}

/// The children of a process: /proc/PID/task/TID/children where the kernel
/// has it (CONFIG_PROC_CHILDREN), else every process whose parent it is.
fn children(tgid: Pid) -> BTreeSet<Pid> {
    let mut found = BTreeSet::new();
    for tid in tasks(tgid) {
        match std::fs::read_to_string(format!("/proc/{tgid}/task/{tid}/children")) {
            Ok(text) => found.extend(numbers(&text)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && found.is_empty() => return children_by_ppid(tgid),
            Err(_) => {}
        }
    }
    found
}

fn children_by_ppid(tgid: Pid) -> BTreeSet<Pid> {
    let Ok(entries) = std::fs::read_dir("/proc") else { return BTreeSet::new() };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .map(Pid::from_raw)
        .filter(|&pid| procstat::stat(pid).is_some_and(|s| s.ppid == tgid.as_raw()))
        .collect()
}

/// Lets every traced thread go: each is interrupted, and detached from the
/// stop it reports, with the signal that stop was about to deliver (a
/// thread in a group-stop stays stopped, as job control asked). Children
/// born meanwhile are detached from their first stop. Returns how many
/// threads were detached.
pub fn detach_all(threads: impl IntoIterator<Item = Pid>) -> usize {
    let mut waiting: HashSet<Pid> = threads.into_iter().collect();
    for &tid in &waiting {
        // ESRCH: dead, and its death is reported below.
        let _ = ptrace::interrupt(tid);
    }
    let mut detached = 0;
    while !waiting.is_empty() {
        let stop = match ptrace::wait_any() {
            Ok(stop) => stop,
            Err(Errno::EINTR) => continue,
            Err(_) => break,
        };
        let (tid, result) = match stop {
            Stop::Dead(pid, _) => {
                waiting.remove(&pid);
                continue;
            }
            Stop::Fork(stop, _) => {
                // A child traced since its birth, about to report its first stop.
                if let Ok(child) = stop.message() {
                    waiting.insert(Pid::from_raw(child as i32));
                }
                (stop.pid, stop.detach())
            }
            Stop::Seccomp(stop) | Stop::Syscall(stop) => (stop.pid, stop.detach()),
            Stop::Exec(stop) | Stop::Trap(stop) => (stop.pid, stop.detach()),
            Stop::Group(stop) => (stop.pid, stop.detach()),
            Stop::Signal(stop) => (stop.pid, stop.detach()),
        };
        waiting.remove(&tid);
        detached += usize::from(result.is_ok());
    }
    detached
}
