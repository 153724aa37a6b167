//! The open family, and io_uring_setup: the ways a workload opens files.

use crate::proto::{self, event::Payload};
use crate::text;
use crate::trace::decode::context::{Call, Ctx, Next, AT_FDCWD};
use crate::trace::procfs;

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
/// mode, u64 resolve}, read at entry as the kernel reads it. Where another
/// task may rewrite the path before the kernel reads it, its bytes are kept
/// for the exit to compare.
pub fn entry(cx: &mut Ctx<'_>, call: &mut Call, open: OpenCall) -> Next {
    if open == OpenCall::Openat2 {
        call.entry_bytes = cx.read_bytes(call.args[2], 16);
    }
    let path = open.args(call).path;
    if path != 0 && cx.procs.tables_shared(cx.tid) {
        call.entry_raw_path = cx.read_raw_path(path);
    }
    Next::Exit
}

/// Why the path argument, read again at exit, cannot be trusted to be the
/// one the kernel read: it differs from the entry's read.
fn rewritten(cx: &mut Ctx<'_>, call: &Call, dirfd: i32, exit_raw: Option<&[u8]>) -> Option<String> {
    let entry_raw = call.entry_raw_path.as_deref()?;
    if exit_raw == Some(entry_raw) {
        return None;
    }
    let name = |cx: &mut Ctx<'_>, raw: &[u8]| cx.resolve(dirfd, raw).unwrap_or_else(|| text::lossless(raw));
    let entered = name(cx, entry_raw);
    let exited = exit_raw.map_or_else(|| "unreadable".to_owned(), |raw| name(cx, raw));
    Some(format!(
        "path: the path argument was {entered} when the call was entered and {exited} at its exit: another task \
         sharing the memory rewrote it while the call ran, and which one the kernel read is not known"
    ))
}

pub fn exit(cx: &mut Ctx<'_>, call: &Call, retval: i64, open: OpenCall) {
    let args = open.args(call);
    let creates = args.flags & (libc::O_CREAT | libc::O_TMPFILE) != 0;
    let event = |path: &Option<String>| proto::OpenEvent {
        path: path.clone().unwrap_or_default(),
        flags: Some(args.flags),
        mode: if creates { args.mode } else { 0 },
    };
    if retval < 0 {
        let raw = cx.read_raw_path(args.path);
        let path = raw.as_ref().and_then(|raw| cx.resolve(args.dirfd, raw));
        let event = cx.call_event(call, retval, path.is_none(), Payload::Open(event(&path)));
        let unverified = rewritten(cx, call, args.dirfd, raw.as_deref()).unwrap_or_default();
        return cx.sink.emit(proto::Event { unverified, ..event });
    }
    // On success the kernel's own resolution of the new descriptor is the
    // truth (symlinks, `..`, and no window for the workload to change the
    // string after the kernel read it), as long as no other task can have
    // put another file at its number since the call returned.
    let fd = retval as i32;
    if !cx.procs.tables_shared(cx.tid) {
        let path = cx.fd_path(fd).or_else(|| cx.read_path(args.dirfd, args.path));
        return cx.emit_call(call, retval, path.is_none(), Payload::Open(event(&path)));
    }
    match check_descriptor(cx, call, &args, fd) {
        Ok(path) => cx.emit_call(call, retval, false, Payload::Open(event(&Some(path)))),
        Err((path, unverified)) => {
            let event = cx.call_event(call, retval, path.is_none(), Payload::Open(event(&path)));
            cx.sink.emit(proto::Event { unverified, ..event });
        }
    }
}

/// The file at the new descriptor, when another task shares the caller's
/// descriptor table (it can move the descriptor away and put another file
/// at its number before the tracer looks) or its memory (it can rewrite the
/// path after the kernel read it): reported as verified only when the path
/// argument names that very file now (device, inode, mount); otherwise
/// reported all the same, with why it could not be confirmed.
fn check_descriptor(
    cx: &mut Ctx<'_>,
    call: &Call,
    args: &OpenArgs,
    fd: i32,
) -> Result<String, (Option<String>, String)> {
    let raw = match args.path {
        0 => None,
        addr => cx.read_raw_path(addr),
    };
    let Some((path, file)) = procfs::descriptor_file(cx.tid, fd) else {
        let requested = raw.and_then(|raw| cx.resolve(args.dirfd, &raw));
        let why = "path: the path argument as read from the workload's memory; another task closed the \
                   descriptor the call returned before the tracer could read it";
        return Err((requested, why.to_owned()));
    };
    let Some(raw) = raw else {
        let why = "path: the file at the descriptor the call returned; another task sharing the descriptor \
                   table could have put it there, and there is no path argument to check it against";
        return Err((Some(path), why.to_owned()));
    };
    if let Some(why) = rewritten(cx, call, args.dirfd, Some(&raw)) {
        return Err((Some(path), why));
    }
    if args.flags & libc::O_TMPFILE == libc::O_TMPFILE {
        let why = "path: the file at the descriptor the call returned; an unnamed file (O_TMPFILE) cannot be \
                   told from another one that a task sharing the descriptor table could have put there";
        return Err((Some(path), why.to_owned()));
    }
    let follow = args.flags & libc::O_NOFOLLOW == 0;
    if procfs::opened_file(cx.tid, args.dirfd, &raw, follow) == Some(file) {
        return Ok(path);
    }
    let requested = cx.resolve(args.dirfd, &raw).unwrap_or_else(|| text::lossless(&raw));
    let why = format!(
        "path: the file at the descriptor the call returned, which the path argument ({requested}) no longer \
         names: another task sharing the descriptor table or the memory changed one of them before the tracer \
         read it"
    );
    Err((Some(path), why))
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
