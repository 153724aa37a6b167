//! The open family, and io_uring_setup: the ways a workload opens files.

use crate::proto::{self, event::Payload};
use crate::trace::decode::context::{Call, Ctx, Next, AT_FDCWD};
use crate::trace::decode::identity;
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
/// mode, u64 resolve}, read at entry as the kernel reads it.
pub fn entry(cx: &mut Ctx<'_>, call: &mut Call, open: OpenCall) -> Next {
    if open == OpenCall::Openat2 {
        call.entry_bytes = cx.read_bytes(call.args[2], 16);
    }
    Next::Exit
}

pub fn exit(cx: &mut Ctx<'_>, call: &Call, retval: i64, open: OpenCall) {
    let args = open.args(call);
    // On success the kernel's own resolution of the new descriptor is the
    // truth (symlinks, `..`, and no window for the workload to change the
    // string after the kernel read it); on failure, the requested path.
    let path = if retval >= 0 {
        cx.fd_path(retval as i32).or_else(|| cx.read_path(args.dirfd, args.path))
    } else {
        cx.read_path(args.dirfd, args.path)
    };
    let creates = args.flags & (libc::O_CREAT | libc::O_TMPFILE) != 0;
    // The file the kernel opened: the new descriptor's.
    let file = (retval >= 0).then(|| procfs::fd_file(cx.tid, retval as i32)).flatten();
    let facts = identity::facts(cx, file, path.as_deref().unwrap_or_default());
    let event = proto::OpenEvent {
        path: path.clone().unwrap_or_default(),
        flags: Some(args.flags),
        mode: if creates { args.mode } else { 0 },
        device: facts.device,
        inode: facts.inode,
        mount_id: facts.mount_id,
        metadata: facts.metadata,
        mount_root: facts.mount_root,
        source_path: facts.source_path,
    };
    cx.emit_call(call, retval, path.is_none(), Payload::Open(event));
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
