//! The open family, and io_uring_setup: the ways a workload opens files.

use crate::proto::{self, event::Payload};
use crate::text;
use crate::trace::decode::context::{Call, Ctx, Next, AT_FDCWD};
use crate::trace::decode::identity::{self, CarriesFacts};
use crate::trace::decode::Supervised;
use crate::trace::procfs::{self, FileId};

/// Which open call, for its argument positions.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OpenCall {
    Open,
    Openat,
    /// Flags and mode in a `struct open_how`.
    Openat2,
    Creat,
    /// Names a file handle, not a path: the path is known only on success.
    ByHandle,
}

/// Argument values of an open call.
struct OpenArgs {
    dirfd: i32,
    /// Address of the path, 0 for none.
    path: u64,
    flags: i32,
    mode: u32,
}

impl OpenCall {
    fn args(self, call: &Call) -> OpenArgs {
        let a = call.args;
        match self {
            OpenCall::Open => OpenArgs { dirfd: AT_FDCWD, path: a[0], flags: a[1] as i32, mode: a[2] as u32 },
            OpenCall::Openat => OpenArgs { dirfd: call.fd(0), path: a[1], flags: a[2] as i32, mode: a[3] as u32 },
            OpenCall::Openat2 => {
                let word = |i| call.entry_u64(i).unwrap_or(0);
                OpenArgs { dirfd: call.fd(0), path: a[1], flags: word(0) as i32, mode: word(1) as u32 }
            }
            OpenCall::Creat => OpenArgs {
                dirfd: AT_FDCWD,
                path: a[0],
                flags: libc::O_CREAT | libc::O_WRONLY | libc::O_TRUNC,
                mode: a[1] as u32,
            },
            OpenCall::ByHandle => OpenArgs { dirfd: call.fd(0), path: 0, flags: a[2] as i32, mode: 0 },
        }
    }
}

/// openat2 passes flags and mode in a `struct open_how` {u64 flags, u64
/// mode, u64 resolve}, read at entry as the kernel reads it.
pub fn entry(cx: &mut Ctx<'_>, call: &mut Call, open: OpenCall) -> Next {
    if open == OpenCall::Openat2 {
        call.entry_bytes = cx.read_bytes(call.args[2], 16);
    }
    Next::Exit
}

pub fn exit(cx: &mut Ctx<'_>, call: &Call, retval: i64, open: OpenCall) {
    let mut args = open.args(call);
    let shared = cx.procs.tables_shared(cx.tid);
    if retval < 0 {
        let path = cx.read_path(args.dirfd, args.path);
        let event = open_event(cx, &args, None, &path);
        let event = cx.call_event(call, retval, path.is_none(), Payload::Open(event));
        // Another task could have rewritten the path before the kernel
        // read it, and a failed call leaves nothing to check it against.
        let unverified = if shared && args.path != 0 { FAILED_UNVERIFIABLE.to_owned() } else { String::new() };
        return cx.sink.emit(proto::Event { unverified, ..event });
    }
    // On success the kernel's own resolution of the new descriptor is the
    // truth (symlinks, `..`, and no window for the workload to change the
    // string after the kernel read it), as long as no other task can have
    // put another file at its number since the call returned.
    let fd = retval as i32;
    if !shared {
        let path = cx.fd_path(fd).or_else(|| cx.read_path(args.dirfd, args.path));
        let file = procfs::fd_file(cx.tid, fd);
        let event = open_event(cx, &args, file, &path);
        return cx.emit_call(call, retval, path.is_none(), Payload::Open(event));
    }
    let checked = check_descriptor(cx, &args, fd);
    let mut unverified: Vec<String> = checked.unverified.into_iter().collect();
    if open == OpenCall::Openat2 {
        let (flags, why) = check_open_how(cx, args.flags, fd);
        args.flags = flags;
        unverified.push(why);
    }
    let event = open_event(cx, &args, checked.file, &checked.path);
    let event = cx.call_event(call, retval, checked.path.is_none(), Payload::Open(event));
    cx.sink.emit(proto::Event { unverified: unverified.join("; "), ..event });
}

/// The event of a supervised open. Nothing in it is read back from the
/// workload: the path is the one the tracer walked, and the file the one it
/// opened and still holds, so no other task can have changed either.
pub fn supervised(cx: &mut Ctx<'_>, call: &Call, open: OpenCall, outcome: Supervised<'_>) {
    let args = open.args(call);
    let (retval, id, path) = match outcome {
        Supervised::Opened { fd, id, path } => (i64::from(fd), id, path),
        Supervised::Failed { errno, path } => (-i64::from(errno), None, path),
        Supervised::Named(_) => return,
    };
    let event = open_event(cx, &args, id, &path);
    cx.emit_call(call, retval, path.is_none(), Payload::Open(event));
}

/// The open flags the kernel keeps of an open file and that nothing can
/// change later (fcntl's F_SETFL changes O_APPEND, O_NONBLOCK, O_DIRECT,
/// O_NOATIME and O_ASYNC; F_SETFD O_CLOEXEC; O_CREAT, O_EXCL, O_NOCTTY and
/// O_TRUNC are dropped once the file is open): the access mode, O_PATH,
/// O_DIRECTORY, O_NOFOLLOW, O_TMPFILE, O_SYNC and O_DSYNC.
const KEPT_FLAGS: i32 =
    libc::O_ACCMODE | libc::O_PATH | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_TMPFILE | libc::O_SYNC;

/// What openat2's flags are reported as where another task shares the
/// caller's memory (its `open_how` could have been rewritten between the
/// tracer's read and the kernel's): the bits the kernel keeps are taken
/// from the new descriptor, and why the rest cannot be confirmed.
fn check_open_how(cx: &Ctx<'_>, read: i32, fd: i32) -> (i32, String) {
    const UNCHECKED: &str = "O_CREAT, O_EXCL, O_TRUNC, O_NOCTTY, O_APPEND, O_NONBLOCK, O_DIRECT, O_NOATIME, O_ASYNC, \
        O_CLOEXEC and the mode are as read from the workload's memory at the call's entry: another task sharing the \
        memory could have changed them before the kernel read them, and the kernel keeps no record of them that \
        another task cannot change";
    // O_SYNC is __O_SYNC with O_DSYNC, which the kernel adds to the former.
    let asked = if read & libc::O_SYNC != 0 { read | libc::O_DSYNC } else { read };
    match procfs::fd_flags(cx.tid, fd) {
        Some(kept) if kept & KEPT_FLAGS == asked & KEPT_FLAGS => (
            read,
            format!(
                "flags: the access mode, O_PATH, O_DIRECTORY, O_NOFOLLOW, O_TMPFILE and O_SYNC are \
                            confirmed by the new descriptor; {UNCHECKED}"
            ),
        ),
        Some(kept) => (
            (read & !KEPT_FLAGS) | (kept & KEPT_FLAGS),
            format!(
                "flags: the access mode, O_PATH, O_DIRECTORY, O_NOFOLLOW, O_TMPFILE and O_SYNC are the new \
                 descriptor's ({kept:#o}); the tracer read {read:#o} at the call's entry: another task sharing the \
                 memory changed the open_how while the call ran; {UNCHECKED}"
            ),
        ),
        None => (read, format!("flags: the new descriptor's flags could not be read; {UNCHECKED}")),
    }
}

/// The event of an open of `path`, the file the kernel opened being `file`.
fn open_event(cx: &mut Ctx<'_>, args: &OpenArgs, file: Option<FileId>, path: &Option<String>) -> proto::OpenEvent {
    let creates = args.flags & (libc::O_CREAT | libc::O_TMPFILE) != 0;
    let facts = identity::facts(cx, file, path.as_deref().unwrap_or_default());
    proto::OpenEvent {
        path: path.clone().unwrap_or_default(),
        flags: Some(args.flags),
        mode: if creates { args.mode } else { 0 },
        ..Default::default()
    }
    .with_facts(facts)
}

/// Why a failed call's path argument is not reported as fact where another
/// task shares the caller's memory or descriptor table.
pub const FAILED_UNVERIFIABLE: &str = "path: read from the workload's memory after the call failed; another task \
    sharing the memory or the descriptor table could have changed the path or its directory before the kernel \
    read it, and a failed call leaves nothing to check it against";

/// The file at the new descriptor, when another task shares the caller's
/// descriptor table (it can move the descriptor away and put another file
/// at its number before the tracer looks) or its memory (it can rewrite the
/// path after the kernel read it): reported as verified only when the path
/// argument names that very file now (device, inode, mount); otherwise
/// reported all the same, with why it could not be confirmed.
fn check_descriptor(cx: &mut Ctx<'_>, args: &OpenArgs, fd: i32) -> Checked {
    let raw = match args.path {
        0 => None,
        addr => cx.read_raw_path(addr),
    };
    let Some((path, file)) = procfs::descriptor_file(cx.tid, fd) else {
        let requested = raw.and_then(|raw| cx.resolve(args.dirfd, &raw));
        let why = "path: the path argument as read from the workload's memory; another task closed the \
                   descriptor the call returned before the tracer could read it";
        return Checked { path: requested, file: None, unverified: Some(why.to_owned()) };
    };
    let Some(raw) = raw else {
        let why = "path: the file at the descriptor the call returned; another task sharing the descriptor \
                   table could have put it there, and there is no path argument to check it against";
        return Checked { path: Some(path), file: Some(file), unverified: Some(why.to_owned()) };
    };
    if args.flags & libc::O_TMPFILE == libc::O_TMPFILE {
        let why = "path: the file at the descriptor the call returned; an unnamed file (O_TMPFILE) cannot be \
                   told from another one that a task sharing the descriptor table could have put there";
        return Checked { path: Some(path), file: Some(file), unverified: Some(why.to_owned()) };
    }
    let follow = args.flags & libc::O_NOFOLLOW == 0;
    if procfs::opened_file(cx.tid, args.dirfd, &raw, follow).is_some_and(|named| named.is(&file)) {
        return Checked { path: Some(path), file: Some(file), unverified: None };
    }
    let requested = cx.resolve(args.dirfd, &raw).unwrap_or_else(|| text::lossless(&raw));
    let why = format!(
        "path: the file at the descriptor the call returned, which the path argument ({requested}) no longer \
         names: another task sharing the descriptor table or the memory changed one of them before the tracer \
         read it"
    );
    Checked { path: Some(path), file: Some(file), unverified: Some(why) }
}

/// What an open in a shared process is reported with: the path and file at
/// its descriptor (or the requested path when the descriptor is gone), and
/// why that could not be confirmed.
struct Checked {
    path: Option<String>,
    file: Option<FileId>,
    unverified: Option<String>,
}

/// io_uring_setup(entries, params): the flags sit in `struct io_uring_params`
/// (after `sq_entries` and `cq_entries`), read at entry as the kernel does.
pub fn io_uring_entry(cx: &mut Ctx<'_>, call: &mut Call) -> Next {
    call.entry_bytes = cx.read_bytes(call.args[1], 12);
    Next::Exit
}

pub fn io_uring_exit(cx: &mut Ctx<'_>, call: &Call, retval: i64) {
    let flags = call.entry_u32(2);
    let event = proto::IoUringEvent { entries: call.args[0] as u32, flags: flags.unwrap_or(0) };
    cx.emit_call(call, retval, flags.is_none(), Payload::IoUring(event));
}
