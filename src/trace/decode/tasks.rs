//! Calls that change what a task is or shares: clone and clone3 (the child
//! itself is reported by the kernel's fork event), unshare, chdir and
//! fchdir.

use std::cell::RefCell;
use std::rc::Rc;

use nix::unistd::Pid;

use crate::proto::{self, event::Payload};
use crate::trace::abi::Abi;
use crate::trace::decode::context::{Call, Ctx, Next, AT_FDCWD};
use crate::trace::memory;
use crate::trace::process::ForkRequest;
use crate::trace::procfs;
use crate::trace::ptrace;

const CLONE_UNTRACED: u64 = 0x0080_0000;

/// Where the clone flags are.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CloneCall {
    /// In the first argument register.
    Clone,
    /// In `struct clone_args`, in memory.
    Clone3,
}

/// clone and clone3 at entry. The child is reported by the kernel's fork
/// event; here the flags are recorded for it, and CLONE_UNTRACED is
/// cleared: it would let the child run untraced. (fork and vfork cannot
/// ask for that, so they are not stopped at entry at all.)
pub fn clone_entry(cx: &mut Ctx<'_>, call: &mut Call, clone: CloneCall) -> Next {
    let flags = match clone {
        CloneCall::Clone3 => {
            // struct clone_args starts with a u64 `flags` in every ABI.
            let flags = memory::read_words(cx.tid, call.args[0], Abi::X86_64, 1).first().copied().unwrap_or(0);
            if flags & CLONE_UNTRACED != 0 {
                // Best effort: if the write fails the child is seen in /proc only.
                let _ = memory::write_u64(cx.tid, call.args[0], flags & !CLONE_UNTRACED);
            }
            flags
        }
        CloneCall::Clone => {
            let flags = call.args[0];
            if flags & CLONE_UNTRACED != 0 {
                let _ = ptrace::set_first_arg(cx.tid, call.abi, flags & !CLONE_UNTRACED);
            }
            flags
        }
    };
    let request = ForkRequest { syscall: call.name, flags: flags & !CLONE_UNTRACED, time: call.time };
    if let Some(thread) = cx.procs.thread_mut(cx.tid) {
        thread.forking = Some(request);
    }
    // clone3's flags live in memory, where another thread can set
    // CLONE_UNTRACED again after the write above: the exit checks.
    match clone {
        CloneCall::Clone3 => Next::Exit,
        CloneCall::Clone => Next::Done,
    }
}

/// A clone3 child the kernel did not report was made untraced behind the
/// tracer's back: it is seized now, and reported.
pub fn clone3_exit(cx: &mut Ctx<'_>, call: &Call, retval: i64) {
    let child = Pid::from_raw(retval as i32);
    if retval <= 0 || cx.procs.thread(child).is_some() || ptrace::seize(child).is_err() {
        return;
    }
    let flags = cx.procs.thread_mut(cx.tid).and_then(|t| t.forking.take()).map_or(0, |r| r.flags);
    if flags & libc::CLONE_THREAD as u64 != 0 {
        cx.procs.add_thread(child, cx.tgid());
        return;
    }
    cx.procs.add_process(child, cx.tgid());
    let fork = proto::ForkEvent { child_pid: child.as_raw() as u32, kind: proto::ForkKind::Clone as i32, flags };
    cx.emit_call(call, retval, false, Payload::Fork(fork));
}

/// unshare(CLONE_FS) gives the thread a private copy of its working
/// directory; done at entry (a failed call leaves a private copy that is
/// still exact).
pub fn unshare_entry(cx: &mut Ctx<'_>, call: &mut Call) -> Next {
    if call.args[0] as i32 & libc::CLONE_FS != 0 {
        if let Some(thread) = cx.procs.thread_mut(cx.tid) {
            let copy = thread.fs.borrow().clone();
            thread.fs = Rc::new(RefCell::new(copy));
        }
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
        let cwd = procfs::cwd(cx.tid);
        if let Some(thread) = cx.procs.thread(cx.tid) {
            thread.fs.borrow_mut().cwd = cwd.clone();
        }
        cwd
    } else {
        match chdir {
            ChdirCall::Fchdir => cx.fd_path(call.fd(0)),
            ChdirCall::Chdir => cx.read_path(AT_FDCWD, call.args[0]),
        }
    };
    let event = proto::ChdirEvent { path: path.clone().unwrap_or_default() };
    cx.emit_call(call, retval, path.is_none(), Payload::Chdir(event));
}
