//! The process table: every traced thread and process, with the state that
//! decoding needs (parent, a clone in progress).
//!
//! Invariants:
//! - every traced tid has a [`Thread`], and its `tgid` has a [`Process`];
//! - there is no descriptor table: what a descriptor is, the kernel's own
//!   table says when an event needs it (/proc/TID/fd, pidfd_getfd). So
//!   close, dup and fcntl need no stops, and no table can drift from the
//!   kernel's;
//! - there is no copy of working directories either: a path is resolved
//!   from /proc/TID/cwd when an event needs it, so a directory renamed by
//!   another process, or shared or unshared (CLONE_FS, unshare(2)), is
//!   never reported by a stale name.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use nix::unistd::Pid;

/// A clone seen at syscall entry, waiting for the kernel's fork event.
#[derive(Clone, Copy, Debug)]
pub struct ForkRequest {
    pub syscall: &'static str,
    pub flags: u64,
    pub time: SystemTime,
}

pub struct Thread {
    pub tgid: Pid,
    /// Set by a clone entry, taken by the fork event it announces, and
    /// dropped at the thread's next syscall (the clone failed).
    pub forking: Option<ForkRequest>,
    /// Entry/exit bookkeeping for stops the kernel cannot describe itself.
    pub in_syscall: bool,
    /// When a task whose first stop came before its creator's fork event
    /// was adopted: its fork happened earlier.
    pub adopted_at: Option<SystemTime>,
}

impl Thread {
    /// A thread whose tables are unknown: everything comes from /proc.
    fn unknown(tgid: Pid) -> Thread {
        Thread { tgid, forking: None, in_syscall: false, adopted_at: None }
    }
}

pub struct Process {
    pub ppid: Pid,
    /// Its live threads in the table.
    threads: usize,
    /// Another process may share its descriptor table or memory (a clone
    /// with CLONE_FILES or CLONE_VM but not CLONE_THREAD, either side), or
    /// it is not known whether one does. Kept until its exec, which gives it
    /// tables of its own.
    shared_with_processes: bool,
    /// Another process may share its working directory and root (a clone
    /// with CLONE_FS but not CLONE_THREAD, either side, or one whose flags
    /// are not known), from which its relative names are looked up. An exec
    /// keeps them shared: kept for good.
    shares_directory: bool,
}

/// How a new task relates to the one that created it.
#[derive(Clone, Copy, Debug, Default)]
pub struct Sharing {
    pub thread: bool,
    /// CLONE_PARENT: the child is a sibling of its creator.
    pub sibling: bool,
    /// Not a thread, but the child shares its creator's descriptor table
    /// or memory (CLONE_FILES, CLONE_VM).
    pub tables: bool,
    /// Not a thread, but the child shares its creator's working directory
    /// and root (CLONE_FS).
    pub directory: bool,
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

    pub fn thread_count(&self) -> usize {
        self.threads.len()
    }

    /// Every traced thread.
    pub fn threads(&self) -> Vec<Pid> {
        self.threads.keys().copied().collect()
    }

    pub fn thread(&self, tid: Pid) -> Option<&Thread> {
        self.threads.get(&tid)
    }

    pub fn thread_mut(&mut self, tid: Pid) -> Option<&mut Thread> {
        self.threads.get_mut(&tid)
    }

    /// The process a thread belongs to.
    pub fn process_of(&self, tid: Pid) -> Option<&Process> {
        self.threads.get(&tid).and_then(|t| self.processes.get(&t.tgid))
    }

    /// The process the tracer started: its tables are its own.
    pub fn add_root(&mut self, pid: Pid, ppid: Pid) {
        self.insert_process(pid, ppid, false, false);
    }

    /// A process whose state is not known yet: everything comes from /proc,
    /// and another process may share its tables.
    pub fn add_process(&mut self, pid: Pid, ppid: Pid) {
        self.insert_process(pid, ppid, true, false);
    }

    /// A thread of `tgid` whose state is not known yet.
    pub fn add_thread(&mut self, tid: Pid, tgid: Pid) {
        if self.threads.insert(tid, Thread::unknown(tgid)).is_none() {
            if let Some(process) = self.processes.get_mut(&tgid) {
                process.threads += 1;
            }
        }
    }

    fn insert_process(&mut self, pid: Pid, ppid: Pid, shared_with_processes: bool, shares_directory: bool) {
        self.threads.insert(pid, Thread::unknown(pid));
        self.processes.insert(pid, Process { ppid, threads: 1, shared_with_processes, shares_directory });
        self.live.lock().unwrap_or_else(|e| e.into_inner()).insert(pid.as_raw());
    }

    /// Whether a task other than `tid` may use its descriptor table, its
    /// memory or its working directory: another thread, or another process
    /// (see `Process`). Only then can what the tracer reads of them after
    /// the kernel did differ from what the kernel saw, while `tid` is
    /// stopped.
    pub fn tables_shared(&self, tid: Pid) -> bool {
        self.memory_or_table_shared(tid) || self.process_of(tid).is_some_and(|p| p.shares_directory)
    }

    /// Whether a task other than `tid` may use its memory or descriptor
    /// table (its working directory aside).
    pub fn memory_or_table_shared(&self, tid: Pid) -> bool {
        self.process_of(tid).is_none_or(|p| p.threads > 1 || p.shared_with_processes)
    }

    /// A task created by thread `parent`; returns its tgid. A child already
    /// known (its first stop came before its parent's event and it was added
    /// from /proc) keeps the state it has: it may have run meanwhile.
    pub fn add_child(&mut self, parent: Pid, child: Pid, sharing: Sharing) -> Pid {
        let Some(from) = self.threads.get(&parent) else {
            if !self.threads.contains_key(&child) {
                self.add_process(child, parent);
            }
            return self.threads[&child].tgid;
        };
        let parent_tgid = from.tgid;
        let parent = self.processes.get_mut(&parent_tgid);
        let grandparent = parent.as_ref().map(|p| p.ppid);
        if let Some(parent) = parent {
            parent.shared_with_processes |= sharing.tables;
            parent.shares_directory |= sharing.directory;
        }
        if let Some(known) = self.threads.get(&child).map(|t| t.tgid) {
            // Adopted before this event: how it shares its directory is
            // known only now, and outlives its exec.
            if let Some(process) = self.processes.get_mut(&known) {
                process.shares_directory |= sharing.directory;
            }
            return known;
        }
        if sharing.thread {
            self.add_thread(child, parent_tgid);
            return parent_tgid;
        }
        let ppid = if sharing.sibling { grandparent.unwrap_or(parent_tgid) } else { parent_tgid };
        self.insert_process(child, ppid, sharing.tables, sharing.directory);
        child
    }

    /// After a successful exec by `former_tid` in process `tgid`: the execing
    /// thread now has the tgid as its tid and every other thread is gone.
    pub fn exec(&mut self, tgid: Pid, former_tid: Pid) {
        let execing = self.threads.remove(&former_tid);
        self.threads.retain(|_, t| t.tgid != tgid);
        self.threads.insert(tgid, execing.unwrap_or_else(|| Thread::unknown(tgid)));
        if let Some(process) = self.processes.get_mut(&tgid) {
            process.threads = 1;
            process.shared_with_processes = false;
        }
    }

    /// Forgets a dead thread; returns it, and its process when it was the
    /// last of the thread group (the leader is reaped last).
    pub fn remove_thread(&mut self, tid: Pid) -> (Option<Thread>, Option<Process>) {
        let thread = self.threads.remove(&tid);
        if let Some(process) = thread.as_ref().and_then(|t| self.processes.get_mut(&t.tgid)) {
            process.threads = process.threads.saturating_sub(1);
        }
        let process = self.processes.remove(&tid);
        if process.is_some() {
            self.threads.retain(|_, t| t.tgid != tid);
            self.live.lock().unwrap_or_else(|e| e.into_inner()).remove(&tid.as_raw());
        }
        (thread, process)
    }

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
        table
    }

    #[test]
    fn children_are_processes_of_their_own_or_siblings() {
        let mut table = table();
        table.add_process(Pid::from_raw(20), Pid::from_raw(10));
        let (parent, forked, sibling) = (Pid::from_raw(20), Pid::from_raw(21), Pid::from_raw(22));
        assert_eq!(table.add_child(parent, forked, Sharing::default()), forked);
        assert_eq!(table.add_child(parent, sibling, Sharing { sibling: true, ..Sharing::default() }), sibling);
        assert_eq!(table.process_of(forked).unwrap().ppid, parent);
        assert_eq!(table.process_of(sibling).unwrap().ppid, Pid::from_raw(10));
    }

    #[test]
    fn threads_join_their_process_and_vanish_at_exec() {
        let mut table = table();
        let (leader, thread) = (Pid::from_raw(10), Pid::from_raw(13));
        let sharing = Sharing { thread: true, ..Sharing::default() };
        assert_eq!(table.add_child(leader, thread, sharing), leader);
        table.exec(leader, thread);
        assert!(table.thread(thread).is_none());
        assert_eq!(table.thread(leader).unwrap().tgid, leader);
    }

    #[test]
    fn tables_are_shared_by_threads_and_by_clone_files_or_vm_children_until_exec() {
        let mut table = table();
        let (leader, thread, child) = (Pid::from_raw(10), Pid::from_raw(11), Pid::from_raw(12));
        table.add_root(Pid::from_raw(30), Pid::from_raw(1));
        assert!(!table.tables_shared(Pid::from_raw(30)), "the root's tables are its own");
        assert!(table.tables_shared(leader), "a process found running may share");
        table.exec(leader, leader);
        assert!(!table.tables_shared(leader));
        table.add_child(leader, thread, Sharing { thread: true, ..Sharing::default() });
        assert!(table.tables_shared(leader) && table.tables_shared(thread));
        table.remove_thread(thread);
        assert!(!table.tables_shared(leader), "the other thread is gone");
        table.add_child(leader, child, Sharing::default());
        assert!(!table.tables_shared(leader) && !table.tables_shared(child), "a fork copies");
        let shared = Pid::from_raw(13);
        table.add_child(leader, shared, Sharing { tables: true, ..Sharing::default() });
        assert!(table.tables_shared(leader) && table.tables_shared(shared));
        table.exec(shared, shared);
        assert!(!table.tables_shared(shared));
    }

    #[test]
    fn a_working_directory_shared_with_another_process_stays_shared_after_exec() {
        let mut table = table();
        let (leader, child, adopted) = (Pid::from_raw(10), Pid::from_raw(12), Pid::from_raw(14));
        table.exec(leader, leader);
        table.add_child(leader, child, Sharing { directory: true, ..Sharing::default() });
        table.exec(leader, leader);
        table.exec(child, child);
        assert!(table.tables_shared(leader) && table.tables_shared(child), "an exec keeps CLONE_FS shared");
        assert!(!table.memory_or_table_shared(leader), "a vfork child of it shares no directory");
        table.add_process(adopted, leader);
        table.add_child(leader, adopted, Sharing { directory: true, ..Sharing::default() });
        table.exec(adopted, adopted);
        assert!(table.tables_shared(adopted), "known at the fork event of a child adopted before it");
    }

    #[test]
    fn a_child_added_before_its_parent_s_event_keeps_its_state() {
        let mut table = table();
        let child = Pid::from_raw(14);
        table.add_process(child, Pid::from_raw(1));
        table.thread_mut(child).unwrap().adopted_at = Some(SystemTime::UNIX_EPOCH);
        assert_eq!(table.add_child(Pid::from_raw(10), child, Sharing::default()), child);
        assert_eq!(table.thread(child).unwrap().adopted_at, Some(SystemTime::UNIX_EPOCH));
    }
}
