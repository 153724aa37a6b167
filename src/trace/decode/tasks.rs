//! Calls that change what a task is or shares: clone (the child itself is
//! reported by the kernel's fork event), chdir and fchdir.

use crate::proto::{self, event::Payload};
use crate::trace::decode::context::{Call, Ctx, Next, AT_FDCWD};
use crate::trace::process::ForkRequest;
use crate::trace::procfs;
use crate::trace::ptrace;

const CLONE_UNTRACED: u64 = 0x0080_0000;

/// clone at entry. The child is reported by the kernel's fork event; here
/// the flags are recorded for it, and CLONE_UNTRACED is cleared: it would
/// let the child run untraced. The flags are in a register, which no other
/// thread can change: the kernel uses what was read. (fork and vfork cannot
/// ask for CLONE_UNTRACED, so they are not stopped at entry at all; clone3,
/// whose flags are in memory, is refused.)
pub fn clone_entry(cx: &mut Ctx<'_>, call: &mut Call) -> Next {
    let flags = call.args[0];
    if flags & CLONE_UNTRACED != 0 {
        let _ = ptrace::set_first_arg(cx.tid, call.abi, flags & !CLONE_UNTRACED);
    }
    let request = ForkRequest { syscall: call.name, flags: flags & !CLONE_UNTRACED, time: call.time };
    if let Some(thread) = cx.procs.thread_mut(cx.tid) {
        thread.forking = Some(request);
    }
    Next::Done
}

/// Whether the new working directory is named by a path or a descriptor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChdirCall {
    Chdir,
    Fchdir,
}

pub fn chdir_exit(cx: &mut Ctx<'_>, call: &Call, retval: i64, chdir: ChdirCall) {
    let path = if retval == 0 {
        // The kernel's answer: symlinks and `..` resolved as it did.
        procfs::cwd(cx.tid)
    } else {
        match chdir {
            ChdirCall::Fchdir => cx.fd_path(call.fd(0)),
            ChdirCall::Chdir => cx.read_path(AT_FDCWD, call.args[0]),
        }
    };
    let event = proto::ChdirEvent { path: path.clone().unwrap_or_default() };
    cx.emit_call(call, retval, path.is_none(), Payload::Chdir(event));
}
