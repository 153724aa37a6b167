//! Supervised opens: read-only `open` and `openat` calls that the tracer
//! performs itself, answering the seccomp user notification with the file
//! it opened (SECCOMP_IOCTL_NOTIF_ADDFD).
//!
//! Why: under ptrace, an open costs two stops (entry and exit), each two
//! context switches. A notification costs one round trip, and the kernel
//! acts on the path the tracer read, not on the workload's memory, which a
//! sibling thread or another process could rewrite after the tracer's
//! read: the event names the file the kernel opened, by construction.
//!
//! The tracer opens a file only where its open is the one the workload's
//! would have been; everything else is *bounced* to the ptrace path, where
//! the kernel runs the workload's own call (`Served::Bounce`). The
//! conditions, each checked at every call:
//! - the filter only notifies read-only opens without O_CREAT, O_TRUNC or
//!   O_TMPFILE (the other forms stop under ptrace, as before);
//! - the thread has the tracer's root, mount namespace and user namespace
//!   (a chroot, pivot_root, setns or unshare makes its calls bounce), and
//!   credentials the tracer can take on (`impersonate`);
//! - the walk starts on the root's mount and never leaves it
//!   (RESOLVE_NO_XDEV): no /proc (whose `self` would be the tracer), no
//!   device, FUSE or network mount whose server could hold the tracer, no
//!   magic link (RESOLVE_NO_MAGICLINKS);
//! - the file is a regular file or a directory (no FIFO that would block,
//!   no device whose open does something), opened without waiting on a
//!   lease (O_NONBLOCK, taken back afterwards).
//!
//! A walk that fails where the native one would fail the same way
//! (ENOENT, ENOTDIR, EACCES, ENAMETOOLONG) is answered with that error.
//!
//! A bounce interrupts the waiting thread (PTRACE_INTERRUPT: its wait ends
//! and the call is to be restarted); at the interrupt stop the engine sets
//! the call's unused sixth argument to `marker`, which the filter sends to
//! ptrace instead of the listener, and puts the register back at the
//! seccomp stop that follows.

use std::collections::HashMap;
use std::ffi::CString;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::time::SystemTime;

use nix::errno::Errno;
use nix::unistd::Pid;

use crate::trace::abi::AUDIT_ARCH_X86_64;
use crate::trace::impersonate::{FsCredentials, Own};
use crate::trace::memory;
use crate::trace::procfs::{self, FileId};
use crate::trace::unotify::{self, Notification};

/// open(2) and openat(2) on x86_64: the calls the filter may notify.
pub const OPEN: u32 = 2;
pub const OPENAT: u32 = 257;

/// Open flags that make an open write, create or truncate: such opens are
/// never supervised. `__O_TMPFILE` is O_TMPFILE without O_DIRECTORY.
pub const NOT_SUPERVISED_FLAGS: u32 = (libc::O_ACCMODE | libc::O_CREAT | libc::O_TRUNC | 0o20_000_000) as u32;

/// The argument that carries the marker: the sixth, unused by both calls.
pub const MARKER_ARG: usize = 5;

const PATH_MAX: usize = 4096;

/// Environment variable that turns supervised opens off (`off`).
const SWITCH: &str = "CWS_INSTRUMENTATION_SUPERVISED_OPENS";

/// Whether this kernel and configuration support supervised opens:
/// ADDFD_FLAG_SEND is Linux 5.14 (openat2 5.6, STATX_MNT_ID 5.8).
pub fn wanted() -> bool {
    if std::env::var(SWITCH).is_ok_and(|v| v == "off") {
        return false;
    }
    let Ok(uname) = nix::sys::utsname::uname() else { return false };
    let release = uname.release().to_string_lossy().into_owned();
    let mut numbers = release.split(|c: char| !c.is_ascii_digit()).filter_map(|n| n.parse::<u32>().ok());
    matches!((numbers.next(), numbers.next()), (Some(major), Some(minor)) if (major, minor) >= (5, 14))
}

/// A random marker the workload cannot guess (and if it sets it anyway, its
/// call merely goes through ptrace).
pub fn new_marker() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    // The standard library keys each RandomState from the kernel's random
    // source: hashing nothing with it yields a random word.
    let marker = std::collections::hash_map::RandomState::new().build_hasher().finish();
    // Never 0 or all ones: values a workload leaves in a register.
    marker.clamp(1, u64::MAX - 1)
}

/// Whether a call with these flags is one the filter notifies.
pub fn supervised_form(flags: u64) -> bool {
    flags as u32 & NOT_SUPERVISED_FLAGS == 0
}

/// An open call as the tracer performed it.
pub struct Performed {
    pub notification: Notification,
    pub time: SystemTime,
    pub dirfd: i32,
    /// The path exactly as the tracer read it, and as it opened it.
    pub raw: Vec<u8>,
    pub flags: i32,
}

/// What serving a notification came to.
pub enum Served {
    /// The thread has the file as descriptor `fd`; `file` is the tracer's
    /// own descriptor of it, to report from, `id` what statx said of it.
    Opened { call: Performed, fd: i32, file: OwnedFd, id: Option<FileId> },
    /// The thread's call failed with `errno`; `base` is the path of the
    /// directory a relative path was walked from.
    Failed { call: Performed, errno: i32, base: Option<String> },
    /// Not the tracer's to perform: the engine makes the kernel run the
    /// call under ptrace.
    Bounce(Pid),
    /// The thread stopped waiting (a signal, its death): nothing happened,
    /// and a restarted call comes as a new notification.
    Gone,
}

/// What the tracer knows of a thread it may open files for.
enum View {
    Like(FsCredentials),
    /// Another root or namespace, or credentials unreadable.
    Foreign,
}

pub struct Supervisor {
    listener: OwnedFd,
    marker: u64,
    /// None where the tracer cannot tell what its own root and credentials
    /// are: then every call is bounced (a notified call must be answered).
    performer: Option<Performer>,
}

/// What the tracer needs to perform opens as the workload would.
struct Performer {
    /// The tracer's root, where absolute paths start.
    root: OwnedFd,
    /// (device, inode, mount id) of the tracer's root.
    root_id: (u64, u64, u64),
    own: Own,
    views: HashMap<Pid, View>,
    /// Inodes of the tracer's mount and user namespaces.
    namespaces: (u64, u64),
}

impl Supervisor {
    pub fn new(listener: OwnedFd, marker: u64) -> Supervisor {
        let _ = unotify::wake_on_one_cpu(&listener);
        let performer = Performer::new();
        if performer.is_none() {
            crate::log::log!("cannot tell the tracer's own root and credentials; every open stops under ptrace");
        }
        Supervisor { listener, marker, performer }
    }

    pub fn listener(&self) -> &OwnedFd {
        &self.listener
    }

    pub fn marker(&self) -> u64 {
        self.marker
    }

    /// Forgets what it knew of every thread: called when one changes its
    /// credentials, root or namespaces (those calls stop under ptrace),
    /// execs or ends.
    pub fn forget(&mut self) {
        if let Some(performer) = &mut self.performer {
            performer.views.clear();
        }
    }

    /// Lets the notified call run as the kernel has it, unseen: for a thread
    /// the tracer can neither serve nor stop.
    pub fn let_run(&self, id: u64) -> nix::Result<()> {
        unotify::answer_continue(&self.listener, id)
    }

    /// The next notification, if one is pending.
    pub fn take(&self) -> Option<Notification> {
        unotify::receive(&self.listener).ok()
    }

    /// Performs the notified open, or says why not.
    pub fn serve(&mut self, notification: Notification) -> Served {
        let time = SystemTime::now();
        let n = notification;
        let (dirfd, path, flags) = match n.nr as u32 {
            _ if n.arch != AUDIT_ARCH_X86_64 => return Served::Bounce(n.tid),
            OPENAT => (n.args[0] as i32, n.args[1], n.args[2]),
            OPEN => (libc::AT_FDCWD, n.args[0], n.args[1]),
            _ => return Served::Bounce(n.tid),
        };
        if !supervised_form(flags) {
            return Served::Bounce(n.tid);
        }
        let raw = match memory::read_cstring(n.tid, path, PATH_MAX) {
            Ok((raw, false)) => raw,
            // Unreadable or too long: the kernel's own answer (EFAULT,
            // ENAMETOOLONG) is the one to report.
            _ => return Served::Bounce(n.tid),
        };
        // The memory read was this thread's, not a reused id's.
        if !unotify::still_waiting(&self.listener, n.id) {
            return Served::Gone;
        }
        let call = Performed { notification: n, time, dirfd, raw, flags: flags as i32 };
        let Some(performer) = &mut self.performer else { return Served::Bounce(n.tid) };
        performer.know(n.tid);
        let Some(credentials) = performer.credentials(n.tid) else { return Served::Bounce(n.tid) };
        match performer.open(&call, credentials) {
            Opening::Opened(file, id) => {
                match unotify::answer_descriptor(&self.listener, n.id, file.as_fd(), call.flags & libc::O_CLOEXEC != 0)
                {
                    Ok(fd) => Served::Opened { call, fd, file, id },
                    Err(Errno::ENOENT) => Served::Gone,
                    // The thread's own table is full: what its call would have met.
                    Err(errno @ (Errno::EMFILE | Errno::ENFILE)) => self.fail(call, errno as i32, None),
                    Err(_) => Served::Bounce(n.tid),
                }
            }
            Opening::Failed(errno, base) => self.fail(call, errno, base),
            Opening::Bounce => Served::Bounce(n.tid),
        }
    }

    fn fail(&self, call: Performed, errno: i32, base: Option<String>) -> Served {
        match unotify::answer_error(&self.listener, call.notification.id, errno) {
            Ok(()) => Served::Failed { call, errno, base },
            Err(Errno::ENOENT) => Served::Gone,
            Err(_) => Served::Bounce(call.notification.tid),
        }
    }
}

impl Performer {
    fn new() -> Option<Performer> {
        let root = procfs::open_path(c"/")?;
        let root_id = procfs::cached_identity(root.as_raw_fd(), c"")?;
        let namespaces = namespaces_of("self")?;
        Some(Performer { root, root_id, own: Own::current()?, views: HashMap::new(), namespaces })
    }

    /// Looks at the thread once, until `forget`.
    fn know(&mut self, tid: Pid) {
        if !self.views.contains_key(&tid) {
            let view = self.look_at(tid);
            self.views.insert(tid, view);
        }
    }

    /// The thread's credentials, where its opens can be the tracer's.
    fn credentials(&self, tid: Pid) -> Option<&FsCredentials> {
        match self.views.get(&tid)? {
            View::Like(credentials) => Some(credentials),
            View::Foreign => None,
        }
    }

    fn look_at(&self, tid: Pid) -> View {
        let same_root =
            procfs::cached_identity(libc::AT_FDCWD, &proc_path(&format!("/proc/{tid}/root"))) == Some(self.root_id);
        let same_namespaces = namespaces_of(&tid.to_string()) == Some(self.namespaces);
        let credentials = procfs::status(tid).and_then(|s| FsCredentials::from_status(&s.credentials));
        match credentials {
            Some(credentials) if same_root && same_namespaces => View::Like(credentials),
            _ => View::Foreign,
        }
    }

    fn open(&self, call: &Performed, credentials: &FsCredentials) -> Opening {
        let tid = call.notification.tid;
        let relative = call.raw.first() != Some(&b'/');
        let base = match (relative, call.dirfd) {
            (false, _) => None,
            (true, libc::AT_FDCWD) => procfs::open_path(&proc_path(&format!("/proc/{tid}/cwd"))),
            (true, dirfd) => procfs::open_path(&proc_path(&format!("/proc/{tid}/fd/{dirfd}"))),
        };
        let base = match (relative, base) {
            (false, _) => &self.root,
            (true, Some(base)) => {
                // A walk from another mount could meet a server the
                // workload runs (FUSE) or a /proc of its own.
                let on_root_mount =
                    procfs::cached_identity(base.as_raw_fd(), c"").is_some_and(|(_, _, mount)| mount == self.root_id.2);
                if !on_root_mount {
                    return Opening::Bounce;
                }
                return self.open_from(call, credentials, &base, true);
            }
            (true, None) => return Opening::Bounce,
        };
        self.open_from(call, credentials, base, false)
    }

    fn open_from(&self, call: &Performed, credentials: &FsCredentials, base: &OwnedFd, relative: bool) -> Opening {
        let Ok(path) = CString::new(call.raw.clone()) else { return Opening::Bounce };
        let borrowed = match self.own.is_like(credentials) {
            true => None,
            false => match self.own.become_like(credentials) {
                Ok(borrowed) => Some(borrowed),
                Err(_) => return Opening::Bounce,
            },
        };
        let walk_flags = call.flags & (libc::O_NOFOLLOW | libc::O_DIRECTORY);
        let resolve = libc::RESOLVE_NO_XDEV | libc::RESOLVE_NO_MAGICLINKS;
        let found = match procfs::open_beneath(base, &path, libc::O_PATH | libc::O_CLOEXEC | walk_flags, resolve) {
            Ok(found) => found,
            Err(errno @ (Errno::ENOENT | Errno::ENOTDIR | Errno::EACCES | Errno::ENAMETOOLONG)) => {
                drop(borrowed);
                let base = relative.then(|| procfs::fd_path(Pid::this(), base.as_raw_fd())).flatten();
                return Opening::Failed(errno as i32, base);
            }
            // EXDEV and ELOOP are this walk's limits, not the workload's;
            // the rest are the tracer's own troubles.
            Err(_) => return Opening::Bounce,
        };
        // The file's identity, for the event too: the reopened file is the same one.
        let found_id = procfs::file_id(&found, b"");
        if call.flags & libc::O_PATH != 0 {
            return Opening::Opened(found, found_id);
        }
        let Some(kind) = found_id.as_ref().and_then(|id| id.stat.as_ref()).map(|s| s.mode & libc::S_IFMT) else {
            return Opening::Bounce;
        };
        if kind != libc::S_IFREG && kind != libc::S_IFDIR {
            return Opening::Bounce;
        }
        // The file found, reopened with the workload's flags: the kernel
        // checks the open against the thread's credentials as for its own.
        let reopen_flags = (call.flags & !(libc::O_NOFOLLOW | libc::O_CLOEXEC)) | libc::O_CLOEXEC | libc::O_NONBLOCK;
        let reopened = procfs::reopen(&found, reopen_flags);
        drop(borrowed);
        let file = match reopened {
            Ok(file) => file,
            Err(errno @ (Errno::EACCES | Errno::EPERM)) => return Opening::Failed(errno as i32, None),
            Err(_) => return Opening::Bounce,
        };
        // The O_NONBLOCK added against leases goes; the thread's own flags stay.
        if call.flags & libc::O_NONBLOCK == 0 && procfs::set_status_flags(&file, call.flags).is_err() {
            return Opening::Bounce;
        }
        Opening::Opened(file, found_id)
    }
}

fn proc_path(path: &str) -> CString {
    CString::new(path).expect("a /proc path has no NUL")
}

enum Opening {
    Opened(OwnedFd, Option<FileId>),
    Failed(i32, Option<String>),
    Bounce,
}

/// Inodes of a process's mount and user namespaces (`who`: a pid or "self").
fn namespaces_of(who: &str) -> Option<(u64, u64)> {
    let inode = |ns: &str| {
        std::fs::metadata(format!("/proc/{who}/ns/{ns}")).ok().map(|m| std::os::unix::fs::MetadataExt::ino(&m))
    };
    Some((inode("mnt")?, inode("user")?))
}
