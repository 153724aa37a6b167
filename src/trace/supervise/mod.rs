//! Supervised calls: opens (`open.rs`) and the calls that make, remove or
//! rename names (`names.rs`: unlink, rmdir, mkdir, rename, link, symlink)
//! that the tracer performs itself, answering the seccomp user notification
//! with their result: an open with the file it opened
//! (SECCOMP_IOCTL_NOTIF_ADDFD), the others with their return value.
//!
//! Why: the kernel acts on the paths the tracer read, not on the workload's
//! memory, which a sibling thread or another process could rewrite after
//! the tracer's read: the event names what the kernel acted on, by
//! construction. (Under ptrace, a call costs two stops; a notification one
//! round trip, but ADDFD waits for the thread to take the file: see
//! ARCHITECTURE.md for what each costs.)
//!
//! The tracer performs a call only where it is the call the workload's
//! would have been; everything else is *bounced* to the ptrace path, where
//! the kernel runs the workload's own call (`Served::Bounce`). The
//! conditions shared by every call, each checked at every call against
//! what the tracer knows of the thread (read from /proc once, or inherited
//! from its creator at its fork and kept across its exec where the kernel
//! carries it over, and forgotten at each watched call that can change
//! it):
//! - the filter notifies x86_64 calls only (`syscalls::Notified` says which
//!   forms);
//! - the thread has the tracer's root, mount namespace and user namespace
//!   (a chroot, pivot_root, setns or unshare makes its calls bounce), and
//!   credentials the tracer can take on (`impersonate`), creation mask
//!   included;
//! - every walk starts on the root's mount and never leaves it
//!   (RESOLVE_NO_XDEV): no /proc (whose `self` would be the tracer), no
//!   device, FUSE or network mount whose server could hold the tracer, no
//!   magic link (RESOLVE_NO_MAGICLINKS).
//!
//! A walk that fails where the native one would fail the same way
//! (ENOENT, ENOTDIR, EACCES, ENAMETOOLONG) is answered with that error.
//!
//! A bounce interrupts the waiting thread (PTRACE_INTERRUPT: its wait ends
//! and the call is to be restarted); at the interrupt stop the engine sets
//! the call's unused sixth argument to `marker`, which the filter sends to
//! ptrace instead of the listener, and puts the register back at the
//! call's exit stop.

mod names;
mod open;

use std::collections::HashMap;
use std::ffi::CString;
use std::os::fd::{AsRawFd, OwnedFd};
use std::time::SystemTime;

use nix::errno::Errno;
use nix::unistd::Pid;

use crate::text;
use crate::trace::abi::AUDIT_ARCH_X86_64;
use crate::trace::decode::{Decoder, Named};
use crate::trace::impersonate::{Borrowed, FsCredentials, Mask, Own};
use crate::trace::memory;
use crate::trace::paths;
use crate::trace::procfs::{self, FileId};
use crate::trace::syscalls;
use crate::trace::unotify::{self, Notification};

/// The argument that carries the marker: the sixth, unused by every
/// supervised call.
pub const MARKER_ARG: usize = 5;

const PATH_MAX: usize = 4096;

/// How the tracer's walks are confined (see the module's doc).
const RESOLVE: u64 = libc::RESOLVE_NO_XDEV | libc::RESOLVE_NO_MAGICLINKS;

/// Environment variable that turns supervised calls off (`off`).
const SWITCH: &str = "CWS_INSTRUMENTATION_SUPERVISED_OPENS";

/// Whether this kernel and configuration support supervised calls:
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

/// A call the tracer performed (or found failing) itself.
pub struct Performed {
    pub notification: Notification,
    pub time: SystemTime,
    /// The kernel's name for the call.
    pub name: &'static str,
    pub decoder: Decoder,
    /// Argument memory the tracer read once and acted on (openat2's
    /// `open_how`, setxattr's value), for the event, as a ptrace entry stop
    /// keeps it.
    pub entry_bytes: Vec<u8>,
    /// A name the tracer read once and acted on besides the path (an
    /// attribute's), for the event, as a ptrace entry stop keeps it.
    pub entry_target: Option<String>,
}

/// What serving a notification came to.
pub enum Served {
    /// An open: the thread has the file as descriptor `fd`; `id` is what
    /// statx said of the tracer's own descriptor of it, `path` the
    /// kernel's name for that descriptor.
    Opened { call: Performed, fd: i32, id: Option<FileId>, path: Option<String> },
    /// An open failed with `errno`, walking `path` (the bytes the tracer
    /// walked, joined to the directory it walked them from).
    Failed { call: Performed, errno: i32, path: Option<String> },
    /// A name call, answered with what the tracer's own call returned. It
    /// is made, and reported, whether or not the answer reaches the thread
    /// (a signal can end its wait first): the engine keeps the result.
    Named { call: Performed, named: Named },
    /// Not the tracer's to perform: the engine makes the kernel run the
    /// call under ptrace.
    Bounce(Pid),
    /// The thread stopped waiting (a signal, its death): nothing happened,
    /// and a restarted call comes as a new notification.
    Gone,
}

/// Why a call is not answered with the tracer's own result.
enum Unserved {
    Bounce,
    Gone,
}

impl Unserved {
    fn of(self, tid: Pid) -> Served {
        match self {
            Unserved::Bounce => Served::Bounce(tid),
            Unserved::Gone => Served::Gone,
        }
    }
}

/// What the tracer knows of a thread it may perform calls for.
enum View {
    Like(Thread),
    /// Another root or namespace, or credentials unreadable.
    Foreign,
}

pub struct Supervisor {
    listener: OwnedFd,
    marker: u64,
    /// None where the tracer cannot tell what its own root and credentials
    /// are: then every call is bounced (a notified call must be answered).
    performer: Option<Performer>,
    /// Files the tracer opened whose handing over came too late (a signal
    /// ended the thread's wait), by thread: its restarted call, the same
    /// registers, gets that file instead of a second open (an O_EXCL one
    /// would fail).
    held: HashMap<Pid, Held>,
}

/// An opened file waiting for the thread's restarted call.
struct Held {
    nr: i32,
    args: [u64; 6],
    file: OwnedFd,
    id: Option<FileId>,
    path: Option<String>,
    cloexec: bool,
    /// openat2's `open_how` as the tracer read it, for the event.
    entry_bytes: Vec<u8>,
}

/// What the tracer needs to perform calls as the workload would.
struct Performer {
    /// The tracer's root, where absolute paths start.
    root: OwnedFd,
    /// (device, inode, mount id) of the tracer's root.
    root_id: (u64, u64, u64),
    own: Own,
    /// None where the thread cannot take on another creation mask: then
    /// creating calls bounce.
    mask: Option<Mask>,
    views: HashMap<Pid, View>,
    /// Inodes of the tracer's mount and user namespaces.
    namespaces: (u64, u64),
    /// The tracer's LSM label (SELinux, AppArmor).
    label: Label,
}

/// The tracer's LSM label, or that this kernel gives none.
enum Label {
    /// No LSM of this kernel gives labels (`/proc/self/attr/current` says
    /// EINVAL): nor does any thread have one, so none is read (the set of
    /// LSMs is fixed at boot).
    Unlabelled,
    Of(Option<Vec<u8>>),
}

/// A thread whose calls the tracer can perform, as it last read it.
struct Thread {
    credentials: FsCredentials,
    /// Its creation mask (None: unreadable).
    mask: Option<u32>,
    /// Its process.
    tgid: Option<Pid>,
}

/// Where a path is walked from: the tracer's root for an absolute path,
/// else the thread's working directory or directory descriptor.
struct Base<'a> {
    dir: Dir<'a>,
    relative: bool,
}

enum Dir<'a> {
    Root(&'a OwnedFd),
    Thread(OwnedFd),
}

impl Base<'_> {
    fn fd(&self) -> &OwnedFd {
        match &self.dir {
            Dir::Root(root) => root,
            Dir::Thread(dir) => dir,
        }
    }

    /// `raw` joined to where it is walked from, as text: the path a failed
    /// walk is reported with. Joined as text, `..` would undo the name
    /// before it, which the kernel followed if it was a symlink: such a
    /// path is joined to the deepest directory its walk reached instead,
    /// and the rest kept as written (None where that cannot be told).
    fn join(&self, raw: &[u8]) -> Option<String> {
        if paths::climbs_after_a_name(raw) {
            return self.reached(raw);
        }
        let raw = text::lossless(raw);
        let base = match self.relative {
            false => "/".to_owned(),
            true => procfs::directory_name(self.fd())?,
        };
        Some(paths::absolute(&base, &raw))
    }

    /// The deepest directory a walk of `raw` reaches (the tracer's own walk
    /// of ever shorter leading parts), and the rest of `raw` after it.
    fn reached(&self, raw: &[u8]) -> Option<String> {
        let flags = libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC;
        let cuts = raw.iter().enumerate().filter(|&(_, &b)| b == b'/').map(|(at, _)| at).rev();
        for cut in cuts {
            let lead = if cut == 0 { &b"/"[..] } else { &raw[..cut] };
            let Ok(lead) = CString::new(lead) else { return None };
            match procfs::open_beneath(self.fd(), &lead, flags, 0, RESOLVE) {
                Ok(dir) => {
                    let rest = text::lossless(&raw[cut + 1..]);
                    let dir = procfs::directory_name(&dir)?;
                    return Some(format!("{}/{rest}", dir.trim_end_matches('/')));
                }
                Err(Errno::ENOENT | Errno::ENOTDIR) => continue,
                Err(_) => return None,
            }
        }
        let dir = procfs::directory_name(self.fd())?;
        Some(format!("{}/{}", dir.trim_end_matches('/'), text::lossless(raw)))
    }
}

impl Supervisor {
    pub fn new(listener: OwnedFd, marker: u64) -> Supervisor {
        let _ = unotify::wake_on_one_cpu(&listener);
        let performer = Performer::new();
        if performer.is_none() {
            crate::log::log!(
                "cannot tell the tracer's own root and credentials; every supervised call stops under ptrace"
            );
        }
        Supervisor { listener, marker, performer, held: HashMap::new() }
    }

    pub fn listener(&self) -> &OwnedFd {
        &self.listener
    }

    pub fn marker(&self) -> u64 {
        self.marker
    }

    /// Forgets what it knew of every thread: called when one changes its
    /// credentials, root or namespaces (those calls stop under ptrace; a
    /// chroot or pivot_root reaches the processes that share its root).
    /// An exec or a death is the thread's alone (`exec`, `forget_thread`).
    pub fn forget(&mut self) {
        if let Some(performer) = &mut self.performer {
            performer.views.clear();
        }
    }

    /// Makes no more calls for the workload: every call is bounced from now
    /// on. Returns whether it made them until now.
    pub fn step_back(&mut self) -> bool {
        self.performer.take().is_some()
    }

    /// Forgets a thread that ended or ran another program (its id may be
    /// reused; an exec may change its credentials): what the tracer knew of
    /// it, and a file held for its restarted call, which is closed.
    pub fn forget_thread(&mut self, tid: Pid) {
        self.held.remove(&tid);
        if let Some(performer) = &mut self.performer {
            performer.views.remove(&tid);
        }
    }

    /// A new task, at its creator's fork event, before it ran: it starts
    /// where its creator is (root, mount and user namespaces, LSM label),
    /// unless `own_namespaces` (its clone made it new ones, or its flags
    /// are not known), with its credentials and creation mask, so what the
    /// tracer knows of the creator holds for it, and the task is not looked
    /// at again in /proc. Any later change of either is a watched call,
    /// which forgets every thread.
    pub fn inherit(&mut self, creator: Pid, child: Pid, child_tgid: Pid, own_namespaces: bool) {
        let Some(performer) = &mut self.performer else { return };
        let inherited = match performer.views.get(&creator) {
            Some(View::Like(thread)) if !own_namespaces => {
                Thread { credentials: thread.credentials.clone(), mask: thread.mask, tgid: Some(child_tgid) }
            }
            // Anything known of that id before was a former task's.
            _ => {
                performer.views.remove(&child);
                return;
            }
        };
        performer.views.insert(child, View::Like(inherited));
    }

    /// A process ran another program: `status`, read at its exec event, is
    /// what it has now. An exec keeps its root and namespaces, so where
    /// they were the tracer's before, only the credentials (set-id bits,
    /// file capabilities) are new, and `status` gives them; the LSM label
    /// an exec can change too, so with an LSM that gives labels the thread
    /// is looked at again at its next call.
    pub fn exec(&mut self, former: Pid, pid: Pid, status: Option<&procfs::Status>) {
        let Some(performer) = &mut self.performer else { return };
        let was_like = [former, pid].iter().any(|tid| matches!(performer.views.get(tid), Some(View::Like(_))));
        self.forget_thread(former);
        self.forget_thread(pid);
        let (Some(performer), Some(status)) = (&mut self.performer, status) else { return };
        if was_like && matches!(performer.label, Label::Unlabelled) {
            performer.views.insert(pid, Performer::view_from(status, true));
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

    /// Performs the notified call, or says why not.
    pub fn serve(&mut self, notification: Notification) -> Served {
        let n = notification;
        let time = SystemTime::now();
        let supervised = (n.arch == AUDIT_ARCH_X86_64).then(|| syscalls::supervised(n.nr as u64, &n.args)).flatten();
        let Some((def, decoder)) = supervised else { return Served::Bounce(n.tid) };
        let call =
            Performed { notification: n, time, name: def.name, decoder, entry_bytes: Vec::new(), entry_target: None };
        match decoder {
            Decoder::Open(open) => self.serve_open(call, open),
            Decoder::File(spec) => self.serve_name_call(call, spec),
            _ => Served::Bounce(n.tid),
        }
    }

    /// Reads the strings at `addrs` in the waiting thread's memory, once;
    /// then makes sure the thread still waits, so that the memory read was
    /// that thread's, not a reused id's. Unreadable or too long: the
    /// kernel's own answer (EFAULT, ENAMETOOLONG) is the one to report.
    fn read_strings<const N: usize>(&self, n: &Notification, addrs: [u64; N]) -> Result<[Vec<u8>; N], Unserved> {
        let mut strings: [Vec<u8>; N] = std::array::from_fn(|_| Vec::new());
        for (string, addr) in strings.iter_mut().zip(addrs) {
            match memory::read_cstring(n.tid, addr, PATH_MAX) {
                Ok((raw, false)) => *string = raw,
                _ => return Err(Unserved::Bounce),
            }
        }
        if !unotify::still_waiting(&self.listener, n.id) {
            return Err(Unserved::Gone);
        }
        Ok(strings)
    }

    /// The performer and what it knows of the thread, where the tracer can
    /// perform the thread's calls.
    fn performer_for(&mut self, tid: Pid) -> Option<(&Performer, &Thread)> {
        let performer = self.performer.as_mut()?;
        performer.know(tid);
        let performer = &*performer;
        Some((performer, performer.credentials(tid)?))
    }

    /// Answers the call with `retval`: a descriptor number or a value, or
    /// a negated errno.
    fn answer(&self, call: &Performed, retval: i64) -> Result<(), Unserved> {
        match unotify::answer_return(&self.listener, call.notification.id, retval) {
            Ok(()) => Ok(()),
            Err(Errno::ENOENT) => Err(Unserved::Gone),
            Err(_) => Err(Unserved::Bounce),
        }
    }
}

impl Performer {
    fn new() -> Option<Performer> {
        let root = procfs::open_path(c"/")?;
        let root_id = procfs::cached_identity(root.as_raw_fd(), c"")?;
        let namespaces = namespaces_of("self")?;
        let mask = Mask::own();
        let label = match label_of("self") {
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => Label::Unlabelled,
            own => Label::Of(own.ok()),
        };
        Some(Performer { root, root_id, own: Own::current()?, mask, views: HashMap::new(), namespaces, label })
    }

    /// Looks at the thread once, until `forget`.
    fn know(&mut self, tid: Pid) {
        if !self.views.contains_key(&tid) {
            let view = self.look_at(tid);
            self.views.insert(tid, view);
        }
    }

    /// What the tracer knows of the thread, where its calls can be the
    /// tracer's.
    fn credentials(&self, tid: Pid) -> Option<&Thread> {
        match self.views.get(&tid)? {
            View::Like(thread) => Some(thread),
            View::Foreign => None,
        }
    }

    fn look_at(&self, tid: Pid) -> View {
        let same_root =
            procfs::cached_identity(libc::AT_FDCWD, &proc_path(&format!("/proc/{tid}/root"))) == Some(self.root_id);
        let same_namespaces = namespaces_of(&tid.to_string()) == Some(self.namespaces);
        // Under another label, an LSM would allow or deny the tracer's
        // calls, not the thread's.
        let same_label = match &self.label {
            Label::Unlabelled => true,
            Label::Of(own) => label_of(&tid.to_string()).ok() == *own,
        };
        let Some(status) = procfs::status(tid) else { return View::Foreign };
        Performer::view_from(&status, same_root && same_namespaces && same_label)
    }

    /// A thread with `status`, where `same_place` says whether it has the
    /// tracer's root, namespaces and label.
    fn view_from(status: &procfs::Status, same_place: bool) -> View {
        match FsCredentials::from_status(&status.credentials) {
            Some(credentials) if same_place => {
                View::Like(Thread { credentials, mask: status.umask, tgid: status.tgid.map(Pid::from_raw) })
            }
            _ => View::Foreign,
        }
    }

    /// Where thread `tid` walks `raw` from, given its directory argument
    /// `dirfd`; None where the tracer cannot walk it as the thread would.
    fn base(&self, tid: Pid, dirfd: i32, raw: &[u8]) -> Option<Base<'_>> {
        if raw.first() == Some(&b'/') {
            return Some(Base { dir: Dir::Root(&self.root), relative: false });
        }
        let dir = match dirfd {
            libc::AT_FDCWD => procfs::open_path(&proc_path(&format!("/proc/{tid}/cwd")))?,
            dirfd => procfs::open_path(&proc_path(&format!("/proc/{tid}/fd/{dirfd}")))?,
        };
        // A walk from another mount could meet a server the workload runs
        // (FUSE) or a /proc of its own.
        let on_root_mount =
            procfs::cached_identity(dir.as_raw_fd(), c"").is_some_and(|(_, _, mount)| mount == self.root_id.2);
        on_root_mount.then_some(Base { dir: Dir::Thread(dir), relative: true })
    }

    /// Takes on the thread's credentials (and, for a call that creates a
    /// file, its creation mask) until the result is dropped; None where the
    /// tracer cannot.
    fn become_like(&self, thread: &Thread, creates: bool) -> Option<Option<Borrowed<'_>>> {
        if creates {
            match (&self.mask, thread.mask) {
                (Some(own), Some(mask)) => own.set(mask),
                _ => return None,
            }
        }
        match self.own.is_like(&thread.credentials) {
            true => Some(None),
            false => self.own.become_like(&thread.credentials).ok().map(Some),
        }
    }
}

fn proc_path(path: &str) -> CString {
    CString::new(path).expect("a /proc path has no NUL")
}

/// A process's LSM label (`who`: a pid or "self"); EINVAL where no LSM gives
/// one.
fn label_of(who: &str) -> std::io::Result<Vec<u8>> {
    std::fs::read(format!("/proc/{who}/attr/current"))
}

/// Inodes of a process's mount and user namespaces (`who`: a pid or "self").
fn namespaces_of(who: &str) -> Option<(u64, u64)> {
    let inode = |ns: &str| {
        std::fs::metadata(format!("/proc/{who}/ns/{ns}")).ok().map(|m| std::os::unix::fs::MetadataExt::ino(&m))
    };
    Some((inode("mnt")?, inode("user")?))
}
