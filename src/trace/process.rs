//! The process table: every traced thread and process, with the state that
//! decoding needs (descriptor table, working directory, parent).
//!
//! Invariants:
//! - every traced tid has a [`Thread`], and its `tgid` has a [`Process`];
//! - an fd table entry is exact: every way a descriptor number is released
//!   (close, close_range, dup2/dup3 onto it, exec) is traced and updates the
//!   table. A number missing from the table is unknown, not free: ask /proc;
//! - descriptor tables and working directories are `Rc`-shared exactly as
//!   the kernel shares them (CLONE_FILES, CLONE_FS, and always between the
//!   threads of a process). `Rc` also keeps the table on the tracer thread.

use std::cell::RefCell;
use std::collections::{BTreeSet, HashMap};
use std::rc::Rc;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use nix::unistd::Pid;

use crate::trace::syscalls::Call;

/// What the tracer knows of a descriptor.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FdInfo {
    File(String),
    Socket { family: i32, sock_type: i32, protocol: i32 },
}

pub type FdTable = HashMap<i32, FdInfo>;

#[derive(Default)]
pub struct FsState {
    /// None until first needed (then read from /proc) or after a failed chdir.
    pub cwd: Option<String>,
}

/// A fork or clone seen at syscall entry, waiting for the kernel's event.
#[derive(Clone, Copy, Debug)]
pub struct ForkRequest {
    pub syscall: &'static str,
    pub flags: u64,
    pub time: SystemTime,
}

pub struct Thread {
    pub tgid: Pid,
    /// A traced syscall that asked for its exit stop.
    pub pending: Option<Call>,
    pub forking: Option<ForkRequest>,
    /// Entry/exit bookkeeping for stops the kernel cannot describe itself.
    pub in_syscall: bool,
}

pub struct Process {
    pub ppid: Pid,
    pub fds: Rc<RefCell<FdTable>>,
    pub fs: Rc<RefCell<FsState>>,
}

/// Processes alive under the tracer, readable from the signal forwarder.
pub type LiveProcesses = Arc<Mutex<BTreeSet<i32>>>;

pub struct ProcessTable {
    threads: HashMap<Pid, Thread>,
    processes: HashMap<Pid, Process>,
    live: LiveProcesses,
}

impl ProcessTable {
    pub fn new(live: LiveProcesses) -> Self {
        ProcessTable { threads: HashMap::new(), processes: HashMap::new(), live }
    }

    pub fn is_empty(&self) -> bool {
        self.threads.is_empty()
    }

    pub fn thread(&self, tid: Pid) -> Option<&Thread> {
        self.threads.get(&tid)
    }

    pub fn thread_mut(&mut self, tid: Pid) -> Option<&mut Thread> {
        self.threads.get_mut(&tid)
    }

    pub fn process_mut(&mut self, tgid: Pid) -> Option<&mut Process> {
        self.processes.get_mut(&tgid)
    }

    /// The process a thread belongs to.
    pub fn process_of(&self, tid: Pid) -> Option<&Process> {
        self.threads.get(&tid).and_then(|t| self.processes.get(&t.tgid))
    }

    fn new_thread(tgid: Pid) -> Thread {
        Thread { tgid, pending: None, forking: None, in_syscall: false }
    }

    /// A process whose state is not known yet: everything comes from /proc.
    pub fn add_process(&mut self, pid: Pid, ppid: Pid) {
        let process = Process { ppid, fds: Rc::default(), fs: Rc::default() };
        self.insert_process(pid, process);
    }

    fn insert_process(&mut self, pid: Pid, process: Process) {
        self.threads.insert(pid, Self::new_thread(pid));
        self.processes.insert(pid, process);
        self.live.lock().unwrap_or_else(|e| e.into_inner()).insert(pid.as_raw());
    }

    /// A child of `parent` created with clone `flags`; returns its tgid.
    pub fn add_child(&mut self, parent: Pid, child: Pid, flags: u64) -> Pid {
        let Some(parent_tgid) = self.threads.get(&parent).map(|t| t.tgid) else {
            self.add_process(child, parent);
            return child;
        };
        let flags = flags as i32;
        if flags & libc::CLONE_THREAD != 0 {
            self.threads.insert(child, Self::new_thread(parent_tgid));
            return parent_tgid;
        }
        let Some(from) = self.processes.get(&parent_tgid) else {
            self.add_process(child, parent_tgid);
            return child;
        };
        let fds = if flags & libc::CLONE_FILES != 0 {
            Rc::clone(&from.fds)
        } else {
            Rc::new(RefCell::new(from.fds.borrow().clone()))
        };
        let fs = if flags & libc::CLONE_FS != 0 {
            Rc::clone(&from.fs)
        } else {
            Rc::new(RefCell::new(FsState { cwd: from.fs.borrow().cwd.clone() }))
        };
        let ppid = if flags & libc::CLONE_PARENT != 0 { from.ppid } else { parent_tgid };
        self.insert_process(child, Process { ppid, fds, fs });
        child
    }

    /// After a successful exec by `former_tid` in process `tgid`: the execing
    /// thread now has the tgid as its tid, every other thread is gone, and
    /// the descriptor table is private (close-on-exec descriptors are closed,
    /// so it starts unknown again).
    pub fn exec(&mut self, tgid: Pid, former_tid: Pid) {
        let execing = self.threads.remove(&former_tid);
        self.threads.retain(|_, t| t.tgid != tgid);
        self.threads.insert(tgid, execing.unwrap_or_else(|| Self::new_thread(tgid)));
        if let Some(process) = self.processes.get_mut(&tgid) {
            process.fds = Rc::default();
        }
    }

    /// Forgets a dead thread; returns it, and its process when it was the
    /// last of the thread group (the leader is reaped last).
    pub fn remove_thread(&mut self, tid: Pid) -> (Option<Thread>, Option<Process>) {
        let thread = self.threads.remove(&tid);
        let process = self.processes.remove(&tid);
        if process.is_some() {
            self.threads.retain(|_, t| t.tgid != tid);
            self.live.lock().unwrap_or_else(|e| e.into_inner()).remove(&tid.as_raw());
        }
        (thread, process)
    }
}

impl ProcessTable {
    /// After `dead` exited, its children belong to another parent (the
    /// tracer, as subreaper); `parent_of` asks the kernel which.
    pub fn reparent_children(&mut self, dead: Pid, parent_of: impl Fn(Pid) -> Option<Pid>) {
        for (&pid, process) in self.processes.iter_mut().filter(|(_, p)| p.ppid == dead) {
            if let Some(parent) = parent_of(pid) {
                process.ppid = parent;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table() -> ProcessTable {
        let mut table = ProcessTable::new(LiveProcesses::default());
        table.add_process(Pid::from_raw(10), Pid::from_raw(1));
        table.process_mut(Pid::from_raw(10)).unwrap().fds.borrow_mut().insert(3, FdInfo::File("/a".into()));
        table
    }

    #[test]
    fn fork_copies_and_clone_files_shares_the_fd_table() {
        let mut table = table();
        let (parent, forked, shared) = (Pid::from_raw(10), Pid::from_raw(11), Pid::from_raw(12));
        table.add_child(parent, forked, libc::SIGCHLD as u64);
        table.add_child(parent, shared, (libc::CLONE_FILES | libc::SIGCHLD) as u64);
        table.process_mut(parent).unwrap().fds.borrow_mut().insert(4, FdInfo::File("/b".into()));
        assert_eq!(table.process_mut(forked).unwrap().fds.borrow().len(), 1);
        assert_eq!(table.process_mut(shared).unwrap().fds.borrow().len(), 2);
        assert_eq!(table.process_mut(forked).unwrap().ppid, parent);
    }

    #[test]
    fn threads_join_their_process_and_vanish_at_exec() {
        let mut table = table();
        let (leader, thread) = (Pid::from_raw(10), Pid::from_raw(13));
        let flags = libc::CLONE_THREAD | libc::CLONE_VM | libc::CLONE_FILES | libc::CLONE_FS | libc::CLONE_SIGHAND;
        assert_eq!(table.add_child(leader, thread, flags as u64), leader);
        table.exec(leader, thread);
        assert!(table.thread(thread).is_none());
        assert_eq!(table.thread(leader).unwrap().tgid, leader);
        assert!(table.process_mut(leader).unwrap().fds.borrow().is_empty());
    }
}
