//! Supervised opens: `open`, `openat`, `openat2` (every form but
//! O_TMPFILE) and `creat`, performed by the tracer and handed over as a new descriptor
//! of the thread's (SECCOMP_IOCTL_NOTIF_ADDFD). openat2's `open_how` is read
//! once, and the tracer's copy is what it acts on and reports.
//!
//! Beyond what every supervised call needs (`mod.rs`):
//! - the file is a regular file or a directory (no FIFO that would block,
//!   no device whose open does something), opened without waiting on a
//!   lease (O_NONBLOCK, taken back afterwards);
//! - a creating open (O_CREAT) either finds a regular file, which it opens
//!   by its path again with O_CREAT as the workload asked (the kernel
//!   applies its rules for existing files: EISDIR, protected_regular in
//!   sticky directories), or creates one that did not exist under the
//!   thread's creation mask (O_EXCL added: it never opens what appeared
//!   since the walk, nor follows a dangling symlink, whose target the
//!   workload's own call creates under ptrace);
//! - a write or a creation is answered with the errors of the file system
//!   too (EROFS, ENOSPC, EDQUOT, EISDIR, ETXTBSY, EPERM).

use std::ffi::CString;
use std::os::fd::{AsFd, OwnedFd};

use nix::errno::Errno;
use nix::unistd::Pid;

use super::{Base, Held, Performed, Performer, Served, Supervisor, Thread, RESOLVE};
use crate::trace::decode::OpenCall;
use crate::trace::memory;
use crate::trace::procfs::{self, FileId};
use crate::trace::syscalls::NOT_SUPERVISED_FLAGS;
use crate::trace::unotify::{self, Notification};

/// The open flags open(2) and openat(2) take (the kernel's
/// VALID_OPEN_FLAGS): they drop the others, which openat2 would refuse.
const OPEN_FLAGS: i32 = libc::O_ACCMODE
    | libc::O_CREAT
    | libc::O_EXCL
    | libc::O_NOCTTY
    | libc::O_TRUNC
    | libc::O_APPEND
    | libc::O_NONBLOCK
    | libc::O_DSYNC
    | libc::O_ASYNC
    | libc::O_DIRECT
    | libc::O_LARGEFILE
    | libc::O_DIRECTORY
    | libc::O_NOFOLLOW
    | libc::O_NOATIME
    | libc::O_CLOEXEC
    | libc::O_SYNC
    | libc::O_PATH
    | libc::O_TMPFILE;

/// An open's arguments, as the tracer read them once.
struct OpenArgs {
    dirfd: i32,
    /// The path exactly as the tracer read it, and as it walked it.
    raw: Vec<u8>,
    /// The open flags the kernel takes of the call's.
    flags: i32,
    /// The mode a created file is asked for.
    mode: u32,
    /// openat2's limits on the walk, added to the tracer's own.
    resolve: u64,
}

/// The size of openat2's first `struct open_how` {u64 flags, u64 mode, u64
/// resolve}; a larger one (a later kernel's) is the kernel's to check.
const OPEN_HOW_SIZE: u64 = 24;

/// openat2's walk limits the tracer applies as given: each only makes a
/// walk fail (EXDEV, ELOOP), and such a walk is bounced. RESOLVE_BENEATH
/// and RESOLVE_IN_ROOT, which change where an absolute path starts, and
/// RESOLVE_CACHED, are bounced.
const RESOLVE_AS_GIVEN: u64 = libc::RESOLVE_NO_XDEV | libc::RESOLVE_NO_MAGICLINKS | libc::RESOLVE_NO_SYMLINKS;

/// What the tracer's open came to.
enum Opening {
    Opened(OwnedFd, Option<FileId>),
    /// The errno, and the path walked (joined to where it was walked from).
    Failed(Errno, Option<String>),
    Bounce,
}

impl Supervisor {
    pub(super) fn serve_open(&mut self, mut call: Performed, open: OpenCall) -> Served {
        let n = call.notification;
        // The restart of a call whose file came too late: that file.
        if let Some(held) = self.held.remove(&n.tid).filter(|held| (held.nr, held.args) == (n.nr, n.args)) {
            call.entry_bytes = held.entry_bytes;
            return self.hand_over(call, held.file, held.id, held.path, held.cloexec);
        }
        let (dirfd, path, flags, mode, resolve) = match open {
            OpenCall::Openat => (n.args[0] as i32, n.args[1], n.args[2] as i32 & OPEN_FLAGS, n.args[3] as u32, 0),
            OpenCall::Open => (libc::AT_FDCWD, n.args[0], n.args[1] as i32 & OPEN_FLAGS, n.args[2] as u32, 0),
            OpenCall::Creat => {
                let flags = libc::O_CREAT | libc::O_WRONLY | libc::O_TRUNC;
                (libc::AT_FDCWD, n.args[0], flags, n.args[1] as u32, 0)
            }
            OpenCall::Openat2 => match read_open_how(&n) {
                Some((how, flags, mode, resolve)) => {
                    call.entry_bytes = how;
                    (n.args[0] as i32, n.args[1], flags, mode, resolve)
                }
                None => return Served::Bounce(n.tid),
            },
            _ => return Served::Bounce(n.tid),
        };
        // After the open_how: its read, too, was the waiting thread's.
        let [raw] = match self.read_strings(&n, [path]) {
            Ok(strings) => strings,
            Err(unserved) => return unserved.of(n.tid),
        };
        if flags as u32 & NOT_SUPERVISED_FLAGS != 0 {
            return Served::Bounce(n.tid);
        }
        let args = OpenArgs { dirfd, raw, flags, mode, resolve };
        let Some((performer, thread)) = self.performer_for(n.tid) else { return Served::Bounce(n.tid) };
        let (opening, path) = performer.open(n.tid, &args, thread);
        match opening {
            Opening::Opened(file, id) => self.hand_over(call, file, id, path, args.flags & libc::O_CLOEXEC != 0),
            Opening::Failed(errno, path) => self.fail(call, errno, path),
            Opening::Bounce => Served::Bounce(n.tid),
        }
    }

    /// Hands `file` over as the thread's new descriptor. Where a signal
    /// ended the thread's wait meanwhile, the file is held for its
    /// restarted call.
    fn hand_over(
        &mut self,
        call: Performed,
        file: OwnedFd,
        id: Option<FileId>,
        path: Option<String>,
        cloexec: bool,
    ) -> Served {
        let n = call.notification;
        match unotify::answer_descriptor(&self.listener, n.id, file.as_fd(), cloexec) {
            Ok(fd) => Served::Opened { call, fd, id, path },
            // ENOENT: the wait ended before the answer; ESRCH: while the
            // thread was taking the file.
            Err(Errno::ENOENT | Errno::ESRCH) => {
                let entry_bytes = call.entry_bytes;
                self.held.insert(n.tid, Held { nr: n.nr, args: n.args, file, id, path, cloexec, entry_bytes });
                Served::Gone
            }
            // The thread's own table is full: what its call would have met.
            Err(errno @ (Errno::EMFILE | Errno::ENFILE)) => self.fail(call, errno, path),
            Err(_) => Served::Bounce(n.tid),
        }
    }

    fn fail(&self, call: Performed, errno: Errno, path: Option<String>) -> Served {
        let tid = call.notification.tid;
        match self.answer(&call, -(errno as i64)) {
            Ok(()) => Served::Failed { call, errno: errno as i32, path },
            Err(unserved) => unserved.of(tid),
        }
    }
}

/// openat2's `open_how`, read once: its bytes (the event's), flags, mode
/// and walk limits. None for what the tracer bounces: another size, a flag
/// or limit it does not take as given, what openat2 refuses (a mode without
/// O_CREAT, O_PATH with flags it does not combine with).
fn read_open_how(n: &Notification) -> Option<(Vec<u8>, i32, u32, u64)> {
    if n.args[3] != OPEN_HOW_SIZE {
        return None;
    }
    let mut how = vec![0u8; OPEN_HOW_SIZE as usize];
    if memory::read(n.tid, n.args[2], &mut how) != how.len() {
        return None;
    }
    let word = |i: usize| u64::from_ne_bytes(how[i * 8..i * 8 + 8].try_into().expect("8 bytes"));
    let (flags, mode, resolve) = (word(0), word(1), word(2));
    let known = flags & !u64::from(OPEN_FLAGS as u32) == 0 && resolve & !RESOLVE_AS_GIVEN == 0;
    let flags = flags as i32;
    let mode_fits = mode & !0o7777 == 0 && (mode == 0 || flags & libc::O_CREAT != 0);
    let path_only = libc::O_PATH | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC;
    let combines = flags & libc::O_PATH == 0 || flags & !path_only == 0;
    (known && mode_fits && combines).then_some((how, flags, mode as u32, resolve))
}

impl Performer {
    /// Opens as the thread would; with a file, its path: the kernel's name
    /// for it, or deeper than the kernel names a file, the path walked
    /// (joined to the very directory walked from).
    fn open(&self, tid: Pid, args: &OpenArgs, thread: &Thread) -> (Opening, Option<String>) {
        let Some(base) = self.base(tid, args.dirfd, &args.raw) else { return (Opening::Bounce, None) };
        let opening = self.open_from(&base, args, thread);
        let path = match &opening {
            Opening::Opened(file, _) => procfs::own_fd_path(&file).or_else(|| base.join(&args.raw)),
            _ => None,
        };
        (opening, path)
    }

    fn open_from(&self, base: &Base<'_>, args: &OpenArgs, thread: &Thread) -> Opening {
        let Ok(path) = CString::new(args.raw.clone()) else { return Opening::Bounce };
        let flags = args.flags;
        let creates = flags & (libc::O_CREAT | libc::O_PATH) == libc::O_CREAT;
        // O_CREAT with O_DIRECTORY is EINVAL since Linux 6.4, and something
        // else before: the kernel's own call answers it.
        if creates && flags & libc::O_DIRECTORY != 0 {
            return Opening::Bounce;
        }
        let Some(borrowed) = self.become_like(thread, creates) else { return Opening::Bounce };
        let failed = |errno: Errno| Opening::Failed(errno, base.join(&args.raw));
        // O_CREAT with O_EXCL never follows a final symlink.
        let exclusive = creates && flags & libc::O_EXCL != 0;
        let walk_flags = flags & (libc::O_NOFOLLOW | libc::O_DIRECTORY) | if exclusive { libc::O_NOFOLLOW } else { 0 };
        let resolve = RESOLVE | args.resolve;
        let found = procfs::open_beneath(base.fd(), &path, libc::O_PATH | libc::O_CLOEXEC | walk_flags, 0, resolve);
        let found = match found {
            Ok(found) => found,
            Err(Errno::ENOENT) if creates => return create(base, &path, args).unwrap_or_else(failed),
            Err(errno @ (Errno::ENOENT | Errno::ENOTDIR | Errno::EACCES | Errno::ENAMETOOLONG)) => {
                return failed(errno)
            }
            // EXDEV and ELOOP are this walk's limits, not the workload's;
            // the rest are the tracer's own troubles.
            Err(_) => return Opening::Bounce,
        };
        if exclusive {
            return failed(Errno::EEXIST);
        }
        // The file's identity, for the event too: the reopened file is the same one.
        let found_id = procfs::file_id(&found, b"");
        if flags & libc::O_PATH != 0 {
            return Opening::Opened(found, found_id);
        }
        let Some(kind) = found_id.as_ref().and_then(|id| id.stat.as_ref()).map(|s| s.mode & libc::S_IFMT) else {
            return Opening::Bounce;
        };
        match kind {
            libc::S_IFDIR if creates => return failed(Errno::EISDIR),
            libc::S_IFREG | libc::S_IFDIR => {}
            _ => return Opening::Bounce,
        }
        let file = match creates {
            // Opened by its path again, O_CREAT and all, for the kernel's
            // checks of an existing file in a sticky directory; a file put
            // there since the walk is the workload's own race, and taken
            // only if it is a regular file too.
            true => match procfs::open_beneath(base.fd(), &path, quiet(flags), args.mode & 0o7777, resolve) {
                Ok(file) => match procfs::file_id(&file, b"") {
                    Some(id) if id.stat.as_ref().is_some_and(|s| s.mode & libc::S_IFMT == libc::S_IFREG) => {
                        return finish(file, flags, Some(id)).unwrap_or_else(failed);
                    }
                    _ => return Opening::Bounce,
                },
                Err(errno) => Err(errno),
            },
            // The file found, reopened with the workload's flags: the kernel
            // checks the open against the thread's credentials as for its own.
            false => procfs::reopen(&found, quiet(flags & !libc::O_NOFOLLOW)),
        };
        drop(borrowed);
        match file {
            Ok(file) => finish(file, flags, found_id).unwrap_or_else(failed),
            Err(errno) if refusal(errno) => failed(errno),
            Err(_) => Opening::Bounce,
        }
    }
}

/// Creates the file a creating open's walk did not find, with the thread's
/// credentials and mask already in place: O_EXCL added, so that only a
/// file this call makes is taken. Where one exists now (a dangling
/// symlink, or a file made since the walk) the workload's own call, under
/// ptrace, is the one to follow it or open it.
fn create(base: &Base<'_>, path: &CString, args: &OpenArgs) -> Result<Opening, Errno> {
    let resolve = RESOLVE | args.resolve;
    match procfs::open_beneath(base.fd(), path, quiet(args.flags | libc::O_EXCL), args.mode & 0o7777, resolve) {
        Ok(file) => {
            let id = procfs::file_id(&file, b"");
            finish(file, args.flags, id)
        }
        Err(Errno::EEXIST) if args.flags & libc::O_EXCL == 0 => Ok(Opening::Bounce),
        Err(errno) if errno == Errno::EEXIST || refusal(errno) => Err(errno),
        Err(_) => Ok(Opening::Bounce),
    }
}

/// The tracer's own flags for an open it performs: never waiting on a lease
/// or a FIFO (O_NONBLOCK, taken back by `finish`), never taking a terminal
/// as its own, never leaking into a child.
fn quiet(flags: i32) -> i32 {
    flags | libc::O_CLOEXEC | libc::O_NONBLOCK | libc::O_NOCTTY
}

/// The opened file with the thread's own status flags back in place.
fn finish(file: OwnedFd, flags: i32, id: Option<FileId>) -> Result<Opening, Errno> {
    if flags & libc::O_NONBLOCK == 0 && procfs::set_status_flags(&file, flags).is_err() {
        return Ok(Opening::Bounce);
    }
    Ok(Opening::Opened(file, id))
}

/// Errors of an open that the thread's own call would have met the same
/// way: the file's permissions, the file system's state.
fn refusal(errno: Errno) -> bool {
    matches!(
        errno,
        Errno::ENOENT
            | Errno::ENOTDIR
            | Errno::EACCES
            | Errno::EPERM
            | Errno::ENAMETOOLONG
            | Errno::EISDIR
            | Errno::EROFS
            | Errno::ETXTBSY
            | Errno::ENOSPC
            | Errno::EDQUOT
    )
}
