//! What every decoder works with: the stopped thread and its process state
//! (`Ctx`), the call being decoded (`Call`), and the helpers that read its
//! arguments.

use std::time::SystemTime;

use nix::unistd::Pid;

use crate::proto::{self, event::Payload, Event};
use crate::queue::EventSink;
use crate::text;
use crate::trace::abi::{Abi, SyscallEntry};
use crate::trace::memory;
use crate::trace::mounts::Mounts;
use crate::trace::names::Names;
use crate::trace::paths;
use crate::trace::process::ProcessTable;
use crate::trace::procfs::{self, FileId};

pub const AT_FDCWD: i32 = -100;
pub const PATH_MAX: usize = 4096;

/// A syscall stopped at entry, kept until its exit stop when one is needed.
pub struct Call {
    /// The syscall's name, as events report it.
    pub name: &'static str,
    pub abi: Abi,
    pub args: [u64; 6],
    /// When the syscall was entered.
    pub time: SystemTime,
    /// Absolute path read at entry, for calls whose memory is gone at exit
    /// (exec) or whose file is (unlink).
    pub entry_path: Option<String>,
    /// The file `entry_path` named at entry, when there was one.
    pub entry_file: Option<FileId>,
    /// A second path or name read at entry (rename's new name, a symlink's
    /// contents, an extended attribute's or a memfd's name).
    pub entry_target: Option<String>,
    /// An exec's argv as the caller passed it, read at entry (at most
    /// `MAX_EXEC_ENTRIES`, each cut a byte past the entry bound), and
    /// whether entries were left out; None when unreadable.
    pub entry_args: Option<(Vec<Vec<u8>>, bool)>,
    /// Argument memory read at entry, as the kernel read it, before another
    /// thread of the workload can change it (a sockaddr, an open_how).
    pub entry_bytes: Vec<u8>,
    /// Set when something could not be read at entry.
    pub partial: bool,
    /// Whether another task shared the caller's memory, descriptor table
    /// or working directory at entry (see `ProcessTable::tables_shared`), for a decoder whose
    /// check at exit needs what entry saw (an exec's tables are the new
    /// image's by its exec event).
    pub shared: bool,
    /// The mounts at a mount or umount2 target at entry (their mountinfo
    /// ids), where `shared`; None when mountinfo could not be read.
    pub entry_mounts: Option<Vec<u64>>,
    /// The parent process when the call was entered: by its exit the
    /// parent may have died and the process been given to another.
    pub ppid: Option<u32>,
}

impl Call {
    pub fn new(name: &'static str, entry: &SyscallEntry, time: SystemTime) -> Call {
        Call {
            name,
            abi: entry.abi,
            args: entry.args,
            time,
            entry_path: None,
            entry_target: None,
            entry_file: None,
            entry_args: None,
            entry_bytes: Vec::new(),
            partial: false,
            shared: false,
            entry_mounts: None,
            ppid: None,
        }
    }

    /// The `index`th native-endian u32 of the memory read at entry, if read.
    pub fn entry_u32(&self, index: usize) -> Option<u32> {
        let bytes = self.entry_bytes.get(index * 4..index * 4 + 4)?;
        Some(u32::from_ne_bytes(bytes.try_into().expect("4 bytes")))
    }

    /// The `index`th native-endian u64 of the memory read at entry, if read.
    pub fn entry_u64(&self, index: usize) -> Option<u64> {
        let bytes = self.entry_bytes.get(index * 8..index * 8 + 8)?;
        Some(u64::from_ne_bytes(bytes.try_into().expect("8 bytes")))
    }

    /// Argument `index` as a descriptor (the kernel reads an `int`).
    pub fn fd(&self, index: usize) -> i32 {
        self.args[index] as i32
    }
}

/// What the engine does after an entry decoder ran.
#[derive(Debug, PartialEq, Eq)]
pub enum Next {
    /// Nothing more to learn from this call.
    Done,
    /// Stop again at the syscall exit and run the exit decoder.
    Exit,
    /// The call must not run: it fails with this errno instead.
    Refuse(i32),
}

/// The stopped thread, the process table and the event queue.
pub struct Ctx<'a> {
    pub tid: Pid,
    pub procs: &'a mut ProcessTable,
    pub sink: &'a mut EventSink,
    /// User and group names for file metadata; None with file stats off
    /// (`--disable-stats`): then no metadata is looked up at all.
    pub names: Option<&'a mut Names>,
    /// The mounts files were found on.
    pub mounts: &'a mut Mounts,
}

fn abi_field(abi: Abi) -> i32 {
    match abi {
        Abi::X86_64 => proto::Abi::X8664 as i32,
        Abi::I386 => proto::Abi::I386 as i32,
        Abi::Unknown => proto::Abi::Unspecified as i32,
    }
}

impl Ctx<'_> {
    pub fn tgid(&self) -> Pid {
        self.procs.thread(self.tid).map_or(self.tid, |t| t.tgid)
    }

    pub fn ppid(&self) -> u32 {
        self.procs.process_of(self.tid).map_or(0, |p| p.ppid.as_raw() as u32)
    }

    /// An event about this thread, without payload.
    pub fn event(&self, time: SystemTime) -> Event {
        Event {
            pid: self.tgid().as_raw() as u32,
            tid: self.tid.as_raw() as u32,
            ppid: self.ppid(),
            timestamp: Some(proto::timestamp(time)),
            ..Event::default()
        }
    }

    pub fn call_event(&self, call: &Call, retval: i64, partial: bool, payload: Payload) -> Event {
        Event {
            retval: Some(retval),
            syscall: call.name.to_owned(),
            abi: abi_field(call.abi),
            partial: partial || call.partial,
            payload: Some(payload),
            ppid: call.ppid.unwrap_or_else(|| self.ppid()),
            ..self.event(call.time)
        }
    }

    /// Queues the event of a decoded call.
    pub fn emit_call(&mut self, call: &Call, retval: i64, partial: bool, payload: Payload) {
        let event = self.call_event(call, retval, partial, payload);
        self.sink.emit(event);
    }

    /// Queues the event of a decoded call whose fields could not all be
    /// checked against the kernel: `unverified` says which and why.
    pub fn emit_unverified(&mut self, call: &Call, retval: i64, unverified: String, payload: Payload) {
        let event = Event { unverified, ..self.call_event(call, retval, false, payload) };
        self.sink.emit(event);
    }

    /// Queues the event of a call the tracer refuses: the workload gets
    /// -`errno`, and the event says why.
    pub fn emit_refused(&mut self, call: &Call, errno: i32, reason: &str, payload: Payload) {
        let event = Event { denied: reason.to_owned(), ..self.call_event(call, -i64::from(errno), false, payload) };
        self.sink.emit(event);
    }

    /// The working directory as the kernel has it now (never a copy: a
    /// directory renamed by another process must not keep its old name).
    pub fn cwd(&self) -> Option<String> {
        procfs::cwd(self.tid)
    }

    /// Path of a descriptor, as the kernel's table has it now.
    pub fn fd_path(&self, fd: i32) -> Option<String> {
        procfs::fd_path(self.tid, fd)
    }

    /// A path argument as the kernel resolves it from the thread's root,
    /// cwd or directory fd (its final name unresolved); lexically joined
    /// when its directory does not resolve.
    pub fn resolve(&mut self, dirfd: i32, path: &[u8]) -> Option<String> {
        procfs::resolve_path(self.tid, dirfd, path).or_else(|| self.lexical(dirfd, path))
    }

    /// A path joined to the cwd or a directory fd as text, for a directory
    /// the kernel does not resolve (the call fails too). None where the
    /// text could name another file than the kernel's walk (a `..` after a
    /// name that may be a symlink).
    fn lexical(&self, dirfd: i32, path: &[u8]) -> Option<String> {
        if paths::climbs_after_a_name(path) {
            return None;
        }
        let path = text::lossless(path);
        if path.starts_with('/') {
            return Some(paths::absolute("/", &path));
        }
        let base = if dirfd == AT_FDCWD { self.cwd()? } else { self.fd_path(dirfd)? };
        Some(paths::absolute(&base, &path))
    }

    /// Reads a path argument, resolves it, and identifies the file it names
    /// now (see [`procfs::resolve_file`]); None when unreadable. An empty
    /// name from a descriptor of a file that is no directory names that
    /// file (AT_EMPTY_PATH: linkat of an O_TMPFILE file; without the flag
    /// the call fails).
    pub fn read_file(&mut self, dirfd: i32, addr: u64) -> Option<(String, Option<FileId>)> {
        let raw = self.read_raw_path(addr)?;
        procfs::resolve_file(self.tid, dirfd, &raw).or_else(|| {
            // Path and file from one look at the descriptor, which a
            // sibling could swap between two.
            let descriptor = (raw.is_empty() && dirfd != AT_FDCWD).then(|| procfs::descriptor_file(self.tid, dirfd));
            match descriptor.flatten() {
                Some((path, file)) => Some((path, Some(file))),
                None => Some((self.lexical(dirfd, &raw)?, None)),
            }
        })
    }

    /// Reads a path argument and resolves it; None when unreadable.
    pub fn read_path(&mut self, dirfd: i32, addr: u64) -> Option<String> {
        let raw = self.read_raw_path(addr)?;
        self.resolve(dirfd, &raw)
    }

    /// Reads a path argument and resolves it with its final symlink
    /// followed (see [`procfs::resolve_path_followed`]); as [`Self::read_path`]
    /// where it leads nowhere. None when unreadable.
    pub fn read_followed_path(&mut self, dirfd: i32, addr: u64) -> Option<String> {
        let raw = self.read_raw_path(addr)?;
        procfs::resolve_path_followed(self.tid, dirfd, &raw).or_else(|| self.resolve(dirfd, &raw))
    }

    /// A path argument's bytes; None when unreadable.
    pub fn read_raw_path(&self, addr: u64) -> Option<Vec<u8>> {
        memory::read_cstring(self.tid, addr, PATH_MAX).ok().map(|(raw, _)| raw)
    }

    /// Up to `len` bytes of tracee memory at `addr`; fewer where it ends.
    pub fn read_bytes(&self, addr: u64, len: usize) -> Vec<u8> {
        let mut bytes = vec![0u8; len];
        let got = memory::read(self.tid, addr, &mut bytes);
        bytes.truncate(got);
        bytes
    }
}
