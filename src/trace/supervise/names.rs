//! Supervised name calls: unlink, rmdir, mkdir, mknod, rename, link and symlink,
//! and chmod, chown, truncate, setxattr, removexattr and the utime family
//! of the file a name leads to (and their `*at` and `l*` forms), performed
//! by the tracer on the names (and attribute value, and times) it read, and
//! answered with what its own call returned; fchmod, fchown, ftruncate,
//! fsetxattr, fremovexattr and futimens (utimensat without a name), on the
//! tracer's own duplicate of the thread's descriptor.
//!
//! Each name is split into its directory and its final name; the directory
//! is walked as every supervised walk is (`mod.rs`), and the call is made
//! on (that directory, that final name): the kernel acts on the very names
//! the event reports. Beyond what every supervised call needs:
//! - a name ending in `/`, `.` or `..`, or empty, is bounced (the kernel's
//!   rules for those differ per call);
//! - flags the tracer's call does not take the same way (AT_EMPTY_PATH,
//!   AT_SYMLINK_FOLLOW, whose symlink could lead to /proc/self/fd/N, the
//!   tracer's own files; an unknown bit) are bounced;
//! - mkdir and mknod run under the thread's creation mask;
//! - chmod, chown, truncate, the attribute calls and the utime family act
//!   on the file the tracer's own walk of the final name found (a symlink
//!   followed only within the root's mount, never a magic link), through
//!   its own descriptor of it: the file reported is the file changed. truncate opens it for writing without
//!   blocking, so that a lease the workload holds never holds the tracer
//!   (the call is bounced instead), then cuts it: the thread's write
//!   permission, append-only and immutable flags and a running program's
//!   ETXTBSY are checked by that open as by truncate(2); a length beyond
//!   the thread's file size limit is bounced (the kernel signals the
//!   caller);
//! - the names are walked in the kernel's order (rename's old name first,
//!   link's existing file first), so a call with two bad names fails with
//!   the error the native call would have.
//!
//! Which file the call acted on is read from the directory just before the
//! call (the file removed, renamed or linked to) or just after it (the one
//! made), and checked against the directory after it: a removed name no
//! longer names that file, a renamed or linked file is at its new name, a
//! made one is of the kind made. Another process changing the directory in
//! between is not ruled out by that check when it puts things back as they
//! would have been; where the check fails, the event says so.

use std::ffi::CString;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;

use nix::errno::Errno;
use nix::fcntl::AtFlags;
use nix::fcntl::RenameFlags;
use nix::sys::stat::{Mode, SFlag};
use nix::unistd::{Gid, Pid, Uid, UnlinkatFlags};

use super::{Base, Performed, Performer, Served, Supervisor, Thread, RESOLVE};
use crate::proto::FileOperation;
use crate::trace::abi::Abi;
use crate::trace::decode::{self, FileCall, LengthArg, Named, PathArg, XattrValue};
use crate::trace::memory;
use crate::trace::paths;
use crate::trace::procfs::{self, FileId};
use crate::trace::unotify::{self, Notification};

/// A name argument: the directory descriptor it is relative to, and the
/// bytes the tracer read.
struct NameArg {
    dirfd: i32,
    raw: Vec<u8>,
}

/// A name walked to its directory.
struct Walked {
    dir: OwnedFd,
    last: CString,
    /// The directory's path joined to the final name.
    path: Option<String>,
}

/// The call to make, with what each kind needs.
enum NameCall {
    Unlink(UnlinkatFlags),
    Mkdir(Mode),
    /// mknod's file type (none: a regular file), permissions and device
    /// number (as the kernel takes it: 32 bits).
    Mknod(SFlag, Mode, u32),
    Rename(RenameFlags),
    /// link, which never follows the existing name's final symlink.
    Link,
    Symlink(Vec<u8>),
    Chmod(Mode),
    /// chown, with the ids to set (None: unchanged), and whether a final
    /// symlink is followed.
    Chown {
        owner: Option<Uid>,
        group: Option<Gid>,
        follows: bool,
    },
    /// truncate and ftruncate, with the length: never negative (bounced:
    /// the native call fails before it looks the name up).
    Truncate(i64),
    /// setxattr (a value) and removexattr (none), as the tracer read them,
    /// with setxattr's flags, and whether a final symlink is followed.
    Attribute {
        attribute: Attribute,
        flags: rustix::fs::XattrFlags,
        follows: bool,
    },
    /// The utime family, with the times as utimensat takes them, and
    /// whether a final symlink is followed.
    Times {
        times: rustix::fs::Timestamps,
        follows: bool,
    },
}

/// An attribute call's name and setxattr's value, read once.
struct Attribute {
    name: CString,
    value: Option<Vec<u8>>,
}

/// What the tracer read once of the thread's memory besides the names:
/// setxattr's value or the utime family's times (`memory`), and an
/// attribute call's name. The event reports these, as the tracer acted on
/// them.
struct ReadOnce {
    memory: Option<Vec<u8>>,
    attribute_name: Option<Vec<u8>>,
}

impl ReadOnce {
    fn keep_for_event(&self, call: &mut Performed) {
        call.entry_target = self.attribute_name.as_deref().map(crate::text::lossless);
        call.entry_bytes = self.memory.clone().unwrap_or_default();
    }

    /// The attribute, when its name is one the kernel takes.
    fn attribute(&self) -> Option<Attribute> {
        let name = self.attribute_name.clone().filter(|name| !name.is_empty() && name.len() <= ATTRIBUTE_NAME_MAX)?;
        Some(Attribute { name: CString::new(name).ok()?, value: self.memory.clone() })
    }

    /// The times as utimensat takes them: both now for a NULL array. None
    /// for what the kernel answers before it looks the name up, which the
    /// tracer's walk would not: times out of range (EINVAL), both omitted
    /// (success, whatever the name).
    fn times(&self, layout: decode::TimeLayout) -> Option<rustix::fs::Timestamps> {
        use rustix::fs::{UTIME_NOW, UTIME_OMIT};
        let [access, modification] = match &self.memory {
            Some(bytes) => decode::timestamps(bytes, Abi::X86_64, layout)?,
            None => [(0, UTIME_NOW); 2],
        };
        let valid = |(_, nanos): (i64, i64)| (0..1_000_000_000).contains(&nanos) || nanos == UTIME_NOW;
        let omitted = |(_, nanos): (i64, i64)| nanos == UTIME_OMIT;
        let fine = (valid(access) || omitted(access)) && (valid(modification) || omitted(modification));
        if !fine || (omitted(access) && omitted(modification)) {
            return None;
        }
        let time = |(tv_sec, tv_nsec)| rustix::fs::Timespec { tv_sec, tv_nsec };
        Some(rustix::fs::Timestamps { last_access: time(access), last_modification: time(modification) })
    }
}

/// The largest attribute name and value the kernel takes (XATTR_NAME_MAX,
/// XATTR_SIZE_MAX): longer ones fail, as the thread's own call.
const ATTRIBUTE_NAME_MAX: usize = 255;
const ATTRIBUTE_VALUE_MAX: u64 = 65536;

impl NameCall {
    /// Whether a call that changes a file follows a final symlink to it.
    fn follows(&self) -> bool {
        match self {
            NameCall::Chown { follows, .. } | NameCall::Attribute { follows, .. } | NameCall::Times { follows, .. } => {
                *follows
            }
            _ => true,
        }
    }

    /// Whether the kernel would take the call as the thread's without a
    /// signal: a truncate beyond the thread's file size limit (or the
    /// tracer's) is for the thread to make, the kernel sends it SIGXFSZ.
    fn within_limits(&self, tid: Pid) -> bool {
        use nix::sys::resource::{getrlimit, Resource};
        let NameCall::Truncate(length) = *self else { return true };
        let own = getrlimit(Resource::RLIMIT_FSIZE).ok().map(|(soft, _)| soft);
        [procfs::file_size_limit(tid), own].iter().all(|limit| limit.is_some_and(|limit| length as u64 <= limit))
    }
}

impl Supervisor {
    pub(super) fn serve_name_call(&mut self, mut call: Performed, spec: FileCall) -> Served {
        let n = call.notification;
        match spec.path_arg() {
            PathArg::Fd(i) => return self.serve_descriptor_call(call, spec, n.args[i] as i32),
            // utimensat(fd, NULL): futimens; with AT_FDCWD, EFAULT: the thread's own.
            PathArg::AtOrFd(dirfd, i) if n.args[i] == 0 => match n.args[dirfd] as i32 {
                libc::AT_FDCWD => return Served::Bounce(n.tid),
                fd => return self.serve_descriptor_call(call, spec, fd),
            },
            _ => {}
        }
        let name_at = |arg: PathArg| match arg {
            PathArg::Path(i) => Some((libc::AT_FDCWD, n.args[i])),
            PathArg::At(dirfd, i) | PathArg::AtOrFd(dirfd, i) => Some((n.args[dirfd] as i32, n.args[i])),
            _ => None,
        };
        let Some((dirfd, path)) = name_at(spec.path_arg()) else { return Served::Bounce(n.tid) };
        let flags = spec.flags_arg().map_or(0, |i| n.args[i] as u32 as i32);
        let second = match spec.target_arg() {
            Some(PathArg::Text(i)) => Some((libc::AT_FDCWD, n.args[i])),
            Some(arg) => match name_at(arg) {
                Some(name) => Some(name),
                None => return Served::Bounce(n.tid),
            },
            None => None,
        };
        // The memory first: the strings' read then checks the thread still waits.
        let Some(memory) = argument_memory(&n, spec) else { return Served::Bounce(n.tid) };
        let attribute_name = spec.xattr_args().map(|(i, _)| n.args[i]);
        let strings = match (second, attribute_name) {
            (Some((_, addr)), _) => self.read_strings(&n, [path, addr]).map(|[a, b]| (a, Some(b), None)),
            (None, Some(addr)) => self.read_strings(&n, [path, addr]).map(|[a, b]| (a, None, Some(b))),
            (None, None) => self.read_strings(&n, [path]).map(|[a]| (a, None, None)),
        };
        let (raw, second_raw, attribute_name) = match strings {
            Ok(strings) => strings,
            Err(unserved) => return unserved.of(n.tid),
        };
        let name = NameArg { dirfd, raw };
        let second = second.zip(second_raw).map(|((dirfd, _), raw)| NameArg { dirfd, raw });
        let once = ReadOnce { memory, attribute_name };
        once.keep_for_event(&mut call);
        let Some(kind) = call_of(spec, flags, n.args, &second, &once).filter(|c| c.within_limits(n.tid)) else {
            return Served::Bounce(n.tid);
        };
        let Some((performer, thread)) = self.performer_for(n.tid) else { return Served::Bounce(n.tid) };
        let Some(named) = performer.perform(n.tid, thread, kind, &name, second.as_ref()) else {
            return Served::Bounce(n.tid);
        };
        self.answered(call, named)
    }

    /// fchmod, fchown, ftruncate, fsetxattr, fremovexattr and utimensat
    /// without a name: made on the tracer's own duplicate of the thread's
    /// descriptor (pidfd_getfd), the same open file, whatever the thread's
    /// table holds at that number afterwards.
    fn serve_descriptor_call(&mut self, mut call: Performed, spec: FileCall, fd: i32) -> Served {
        let n = call.notification;
        let Some(memory) = argument_memory(&n, spec) else { return Served::Bounce(n.tid) };
        let attribute_name = match spec.xattr_args().map(|(i, _)| self.read_strings(&n, [n.args[i]])) {
            Some(Ok([name])) => Some(name),
            Some(Err(unserved)) => return unserved.of(n.tid),
            None => None,
        };
        let once = ReadOnce { memory, attribute_name };
        once.keep_for_event(&mut call);
        let flags = spec.flags_arg().map_or(0, |i| n.args[i] as u32 as i32);
        let kind = call_of(spec, flags, n.args, &None, &once).filter(|c| c.within_limits(n.tid));
        let Some(
            kind @ (NameCall::Chmod(_)
            | NameCall::Chown { .. }
            | NameCall::Truncate(_)
            | NameCall::Attribute { .. }
            // Without a name, utimensat takes no flags (EINVAL).
            | NameCall::Times { follows: true, .. }),
        ) = kind
        else {
            return Served::Bounce(n.tid);
        };
        let Some(tgid) = self.performer_for(n.tid).and_then(|(_, thread)| thread.tgid) else {
            return Served::Bounce(n.tid);
        };
        let copy = procfs::thread_descriptor_copy(n.tid, tgid, fd);
        // The thread is the one whose table was read, not a reused id's.
        if !unotify::still_waiting(&self.listener, n.id) {
            return Served::Gone;
        }
        let Some((performer, thread)) = self.performer_for(n.tid) else { return Served::Bounce(n.tid) };
        let Some(named) = performer.change(thread, kind, copy) else { return Served::Bounce(n.tid) };
        self.answered(call, named)
    }

    /// Answers a call the tracer made: whether or not the answer reaches
    /// the thread, the call was made, and is reported.
    fn answered(&self, call: Performed, named: Named) -> Served {
        let _ = self.answer(&call, named.retval);
        Served::Named { call, named }
    }
}

/// The argument memory besides names in the waiting thread's memory, read
/// once: setxattr's value, the utime family's times. Some(None) for a call
/// without any (or a NULL times array), None to bounce (a value the kernel
/// would refuse or could not read, setxattrat's `struct xattr_args`).
fn argument_memory(n: &Notification, spec: FileCall) -> Option<Option<Vec<u8>>> {
    let (addr, size) = match (spec.xattr_args(), spec.times_arg()) {
        (Some((_, Some(XattrValue::Args(i)))), _) => (n.args[i], n.args[i + 1]),
        (Some((_, Some(XattrValue::Struct(_)))), _) => return None,
        (_, Some((i, layout))) if n.args[i] != 0 => (n.args[i], decode::times_size(Abi::X86_64, layout) as u64),
        _ => return Some(None),
    };
    if size > ATTRIBUTE_VALUE_MAX {
        return None;
    }
    let mut value = vec![0u8; size as usize];
    (memory::read(n.tid, addr, &mut value) == value.len()).then_some(Some(value))
}

/// The call a row's arguments make; None for what the tracer does not make
/// the same way.
fn call_of(spec: FileCall, flags: i32, args: [u64; 6], second: &Option<NameArg>, once: &ReadOnce) -> Option<NameCall> {
    let call = match spec.operation() {
        FileOperation::Unlink => match flags {
            0 => NameCall::Unlink(UnlinkatFlags::NoRemoveDir),
            libc::AT_REMOVEDIR => NameCall::Unlink(UnlinkatFlags::RemoveDir),
            _ => return None,
        },
        FileOperation::Rmdir => NameCall::Unlink(UnlinkatFlags::RemoveDir),
        FileOperation::Mknod => {
            let mode = args[spec.mode_arg()?] as u32;
            let kind = SFlag::from_bits_truncate(mode & libc::S_IFMT);
            NameCall::Mknod(kind, Mode::from_bits_truncate(mode & 0o7777), args[spec.device_arg()?] as u32)
        }
        FileOperation::Mkdir => NameCall::Mkdir(Mode::from_bits_truncate(args[spec.mode_arg()?] as u32)),
        FileOperation::Rename => NameCall::Rename(RenameFlags::from_bits(flags as u32)?),
        // AT_SYMLINK_FOLLOW is bounced: the tracer's linkat would follow a
        // symlink to /proc/self/fd/N into the tracer's own files.
        FileOperation::Link if flags == 0 => NameCall::Link,
        FileOperation::Symlink => NameCall::Symlink(second.as_ref()?.raw.clone()),
        // fchmodat2's flags (AT_SYMLINK_NOFOLLOW, AT_EMPTY_PATH) are bounced.
        FileOperation::Chmod if flags == 0 => {
            NameCall::Chmod(Mode::from_bits_truncate(args[spec.mode_arg()?] as u32 & 0o7777))
        }
        FileOperation::Chown if flags & !libc::AT_SYMLINK_NOFOLLOW == 0 => {
            let owner = spec.owner_arg()?;
            let id = |i: usize| Some(args[i] as u32).filter(|&id| id != u32::MAX);
            NameCall::Chown {
                owner: id(owner).map(Uid::from_raw),
                group: id(owner + 1).map(Gid::from_raw),
                follows: spec.follows() && flags & libc::AT_SYMLINK_NOFOLLOW == 0,
            }
        }
        FileOperation::Truncate => match spec.length_arg()? {
            LengthArg::Long(i) if args[i] as i64 >= 0 => NameCall::Truncate(args[i] as i64),
            _ => return None,
        },
        FileOperation::Setxattr | FileOperation::Removexattr => NameCall::Attribute {
            flags: rustix::fs::XattrFlags::from_bits(flags as u32)?,
            attribute: once.attribute()?,
            follows: spec.follows(),
        },
        // utimensat's AT_EMPTY_PATH is bounced.
        FileOperation::Utimes if flags & !libc::AT_SYMLINK_NOFOLLOW == 0 => {
            NameCall::Times { times: once.times(spec.times_arg()?.1)?, follows: flags & libc::AT_SYMLINK_NOFOLLOW == 0 }
        }
        _ => return None,
    };
    Some(call)
}

impl Performer {
    /// Performs the call on `name` (and rename's new name or link's
    /// existing file, `second`), as the thread; None to bounce.
    fn perform(
        &self,
        tid: Pid,
        thread: &Thread,
        call: NameCall,
        name: &NameArg,
        second: Option<&NameArg>,
    ) -> Option<Named> {
        let base = self.base(tid, name.dirfd, &name.raw)?;
        let other = match (&call, second) {
            (NameCall::Rename(_) | NameCall::Link, Some(arg)) => Some((arg, self.base(tid, arg.dirfd, &arg.raw)?)),
            _ => None,
        };
        let creates = matches!(call, NameCall::Mkdir(_) | NameCall::Mknod(..));
        let _borrowed = self.become_like(thread, creates)?;
        let walked = walk(&base, &name.raw)?;
        let walked_other = match &other {
            Some((arg, other_base)) => Some(walk(other_base, &arg.raw)?),
            None => None,
        };
        let text = |walked: &Result<Walked, Errno>, arg: &NameArg, base: &Base<'_>| match walked {
            Ok(walked) => walked.path.clone(),
            Err(_) => base.join(&arg.raw),
        };
        let path = text(&walked, name, &base);
        let target = match (&call, &other, &walked_other) {
            (NameCall::Symlink(contents), ..) => Some(crate::text::lossless(contents)),
            (_, Some((arg, other_base)), Some(walked)) => text(walked, arg, other_base),
            _ => None,
        };
        // The kernel walks link's existing file before its new name, and
        // rename's old name before its new one.
        let errors = [walked.as_ref().err(), walked_other.as_ref().and_then(|w| w.as_ref().err())];
        let error = if matches!(call, NameCall::Link) { errors[1].or(errors[0]) } else { errors[0].or(errors[1]) };
        if let Some(errno) = error {
            return Some(Named { retval: -(*errno as i64), path, target, file: None, unverified: None });
        }
        let walked = walked.ok()?;
        let walked_other = walked_other.and_then(Result::ok);
        let (retval, file, unverified) = make(call, &walked, walked_other.as_ref())?;
        Some(Named { retval, path, target, file, unverified })
    }
}

impl Performer {
    /// Makes fchmod or fchown on `copy`, the thread's descriptor as the
    /// tracer took it; None to bounce.
    fn change(&self, thread: &Thread, call: NameCall, copy: nix::Result<OwnedFd>) -> Option<Named> {
        let file = match copy {
            Ok(file) => file,
            Err(Errno::EBADF) => {
                return Some(Named {
                    retval: -(libc::EBADF as i64),
                    path: None,
                    target: None,
                    file: None,
                    unverified: None,
                })
            }
            Err(_) => return None,
        };
        // A file of another mount could be a server's the workload runs
        // (FUSE), which could hold the tracer.
        let on_root_mount =
            procfs::cached_identity(file.as_raw_fd(), c"").is_some_and(|(_, _, mount)| mount == self.root_id.2);
        if !on_root_mount {
            return None;
        }
        let _borrowed = self.become_like(thread, false)?;
        let result = match call {
            NameCall::Chmod(mode) => nix::sys::stat::fchmod(&file, mode),
            NameCall::Chown { owner, group, .. } => nix::unistd::fchown(&file, owner, group),
            NameCall::Truncate(length) => nix::unistd::ftruncate(&file, length),
            NameCall::Attribute { attribute, flags, .. } => {
                change_attribute(AttributeOf::Descriptor(&file), &attribute, flags)
            }
            NameCall::Times { times, .. } => rustix::fs::futimens(&file, &times).map_err(errno_of),
            _ => return None,
        };
        let path = procfs::own_fd_path(&file);
        let retval = result.map_or_else(|errno| -(errno as i64), |()| 0);
        Some(Named { retval, path, target: None, file: procfs::file_id(&file, b""), unverified: None })
    }
}

/// Walks `raw` from `base` to its directory: None to bounce (a final name
/// the calls treat each their own way, a walk the tracer's limits stop),
/// else the directory or the error the native walk meets too.
fn walk(base: &Base<'_>, raw: &[u8]) -> Option<Result<Walked, Errno>> {
    let (dir, last) = split(raw)?;
    let dir_path = CString::new(if dir.is_empty() { b".".to_vec() } else { dir.to_vec() }).ok()?;
    let last = CString::new(last).ok()?;
    let flags = libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC;
    match procfs::open_beneath(base.fd(), &dir_path, flags, 0, RESOLVE) {
        Ok(dir) => {
            let path =
                procfs::directory_name(&dir).map(|d| paths::absolute(&d, &crate::text::lossless(last.as_bytes())));
            Some(Ok(Walked { dir, last, path }))
        }
        Err(errno @ (Errno::ENOENT | Errno::ENOTDIR | Errno::EACCES | Errno::ENAMETOOLONG)) => Some(Err(errno)),
        Err(_) => None,
    }
}

/// (directory part, final name) of a name whose final name is a plain one:
/// None for an empty name and one ending in `/`, `.` or `..`.
fn split(raw: &[u8]) -> Option<(&[u8], &[u8])> {
    let (dir, last) = match raw.iter().rposition(|&b| b == b'/') {
        Some(0) => (&raw[..1], &raw[1..]),
        Some(slash) => (&raw[..slash], &raw[slash + 1..]),
        None => (&b""[..], raw),
    };
    match last {
        b"" | b"." | b".." => None,
        last => Some((dir, last)),
    }
}

/// What `make` returns: the call's return value, the file it acted on, and
/// why that file could not be confirmed; None to bounce.
type Made = Option<(i64, Option<FileId>, Option<String>)>;

/// The file the final name leads to, found by the tracer's own walk (a
/// symlink followed within the root's mount only); Err: the native walk's
/// error, or None to bounce (a symlink to another mount or a magic link,
/// which the thread's own call follows).
fn final_file(name: &Walked, follows: bool) -> Result<OwnedFd, Option<Errno>> {
    let flags = libc::O_PATH | libc::O_CLOEXEC | if follows { 0 } else { libc::O_NOFOLLOW };
    match procfs::open_beneath(&name.dir, &name.last, flags, 0, RESOLVE) {
        Ok(file) => Ok(file),
        Err(errno @ (Errno::ENOENT | Errno::ENOTDIR | Errno::EACCES | Errno::ENAMETOOLONG)) => Err(Some(errno)),
        Err(_) => Err(None),
    }
}

/// Makes the call; returns its return value, the file it acted on, and why
/// that file could not be confirmed (None: to bounce).
fn make(call: NameCall, name: &Walked, other: Option<&Walked>) -> Made {
    const UNCONFIRMED: &str = "file: the directory after the call does not show its effect on the file its name \
        named just before it: another process changed the directory meanwhile, and which file the call acted on \
        is not known";
    let id = |walked: &Walked| procfs::file_id(&walked.dir, walked.last.as_bytes());
    let same = |a: &Option<FileId>, b: &Option<FileId>| a.zip(*b).is_some_and(|(a, b)| a.is(&b));
    let kind = |file: &Option<FileId>| file.and_then(|f| f.stat).map(|s| s.mode & libc::S_IFMT);
    let (result, file, confirmed) = match call {
        NameCall::Unlink(flags) => {
            let before = id(name);
            let result = nix::unistd::unlinkat(&name.dir, name.last.as_c_str(), flags);
            let gone = before.is_some() && !same(&id(name), &before);
            (result, before, gone)
        }
        NameCall::Mkdir(mode) => {
            let result = nix::sys::stat::mkdirat(&name.dir, name.last.as_c_str(), mode);
            let made = id(name);
            let confirmed = kind(&made) == Some(libc::S_IFDIR);
            (result, made, confirmed)
        }
        NameCall::Mknod(file_type, mode, device) => {
            let result = nix::sys::stat::mknodat(&name.dir, name.last.as_c_str(), file_type, mode, u64::from(device));
            let made = id(name);
            let wanted = if file_type.is_empty() { libc::S_IFREG } else { file_type.bits() };
            let confirmed = kind(&made) == Some(wanted);
            (result, made, confirmed)
        }
        NameCall::Symlink(contents) => {
            let contents = CString::new(contents).ok()?;
            let result = nix::unistd::symlinkat(contents.as_c_str(), &name.dir, name.last.as_c_str());
            let made = id(name);
            let confirmed = kind(&made) == Some(libc::S_IFLNK);
            (result, made, confirmed)
        }
        NameCall::Rename(flags) => {
            let new = other?;
            let before = id(name);
            let result = nix::fcntl::renameat2(&name.dir, name.last.as_c_str(), &new.dir, new.last.as_c_str(), flags);
            let moved = same(&id(new), &before);
            (result, before, moved)
        }
        NameCall::Chmod(_)
        | NameCall::Chown { .. }
        | NameCall::Truncate(_)
        | NameCall::Attribute { .. }
        | NameCall::Times { .. } => {
            let file = match final_file(name, call.follows()) {
                Ok(file) => file,
                Err(walk) => return walk.map(|errno| (-(errno as i64), None, None)),
            };
            let result = change_final_file(&file, call)?;
            // The file as the call left it.
            (result, procfs::file_id(&file, b""), true)
        }
        NameCall::Link => {
            let existing = other?;
            let before = id(existing);
            let result = nix::unistd::linkat(
                &existing.dir,
                existing.last.as_c_str(),
                &name.dir,
                name.last.as_c_str(),
                AtFlags::empty(),
            );
            let made = id(name);
            let linked = same(&made, &before);
            (result, made, linked)
        }
    };
    Some(match result {
        Ok(()) => (0, file, (!confirmed).then(|| UNCONFIRMED.to_owned())),
        Err(errno) => (-(errno as i64), file, None),
    })
}

/// Makes `call`, one that changes a file, on `file`: the tracer's O_PATH
/// descriptor of the file the final name led to. None to bounce. The calls
/// that take no AT_EMPTY_PATH (chmod before fchmodat2, the attribute calls
/// before setxattrat, utimensat) and whose f* forms refuse an O_PATH
/// descriptor go through its /proc link, which leads to that very file
/// (to a symlink itself, for the l* forms).
fn change_final_file(file: &OwnedFd, call: NameCall) -> Option<Result<(), Errno>> {
    let link = procfs::own_link(file);
    let result = match call {
        NameCall::Chmod(mode) => std::fs::set_permissions(&link, std::fs::Permissions::from_mode(mode.bits()))
            .map_err(|e| Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO))),
        NameCall::Chown { owner, group, .. } => nix::unistd::fchownat(file, "", owner, group, AtFlags::AT_EMPTY_PATH),
        NameCall::Truncate(length) => match procfs::file_id(file, b"").and_then(|f| f.stat) {
            Some(stat) if stat.mode & libc::S_IFMT == libc::S_IFDIR => Err(Errno::EISDIR),
            // Opened for writing without blocking: a lease to break bounces
            // the call (the thread waits for its holder, never the tracer).
            Some(stat) if stat.mode & libc::S_IFMT == libc::S_IFREG => {
                let flags = libc::O_WRONLY | libc::O_NONBLOCK | libc::O_NOCTTY | libc::O_CLOEXEC | libc::O_LARGEFILE;
                match procfs::reopen(file, flags) {
                    Ok(writable) => nix::unistd::ftruncate(&writable, length),
                    Err(Errno::EWOULDBLOCK) => return None,
                    Err(errno) => Err(errno),
                }
            }
            // truncate(2) fails with EINVAL for these, but opening one
            // could block or act (a FIFO, a device): the thread's own.
            _ => return None,
        },
        NameCall::Attribute { attribute, flags, .. } => change_attribute(AttributeOf::Path(&link), &attribute, flags),
        NameCall::Times { times, .. } => {
            rustix::fs::utimensat(rustix::fs::CWD, link.as_str(), &times, rustix::fs::AtFlags::empty())
                .map_err(errno_of)
        }
        _ => return None,
    };
    Some(result)
}

/// What an attribute call names the file by.
enum AttributeOf<'a> {
    /// A path (the /proc link of the tracer's own descriptor).
    Path(&'a str),
    /// A descriptor open on the file (the f* forms').
    Descriptor(&'a OwnedFd),
}

/// setxattr (a value) or removexattr (none) of the file.
fn change_attribute(of: AttributeOf<'_>, attribute: &Attribute, flags: rustix::fs::XattrFlags) -> Result<(), Errno> {
    use rustix::fs::{fremovexattr, fsetxattr, removexattr, setxattr};
    let name = attribute.name.as_c_str();
    let result = match (of, &attribute.value) {
        (AttributeOf::Path(path), Some(value)) => setxattr(path, name, value, flags),
        (AttributeOf::Path(path), None) => removexattr(path, name),
        (AttributeOf::Descriptor(file), Some(value)) => fsetxattr(file, name, value, flags),
        (AttributeOf::Descriptor(file), None) => fremovexattr(file, name),
    };
    result.map_err(errno_of)
}

fn errno_of(error: rustix::io::Errno) -> Errno {
    Errno::from_raw(error.raw_os_error())
}
