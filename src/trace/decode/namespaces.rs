//! Calls that change where paths lead: chroot, pivot_root, mount, umount2,
//! unshare and setns. Reported so that a reader can follow a thread's root,
//! mounts and namespaces; paths are read at entry, as the kernel reads them.

use crate::proto::{self, event::Payload};
use crate::text;
use crate::trace::decode::context::{Call, Ctx, Next, AT_FDCWD, PATH_MAX};
use crate::trace::memory;
use crate::trace::procfs;

/// Which call, for what its arguments mean.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NsCall {
    /// chroot(path).
    Chroot,
    /// pivot_root(new_root, put_old).
    PivotRoot,
    /// mount(source, target, fstype, flags, data).
    Mount,
    /// umount2(target, flags).
    Umount,
    /// unshare(flags).
    Unshare,
    /// setns(fd, nstype).
    Setns,
}

/// Text as given (a mount source or filesystem type is not always a path).
fn read_text(cx: &Ctx<'_>, addr: u64) -> Option<String> {
    let (raw, _) = memory::read_cstring(cx.tid, addr, PATH_MAX).ok()?;
    Some(text::lossless(&raw))
}

pub fn entry(cx: &mut Ctx<'_>, call: &mut Call, ns: NsCall) -> Next {
    let [a0, a1, a2, ..] = call.args;
    let unread = match ns {
        NsCall::Chroot | NsCall::Umount => {
            call.entry_path = cx.read_path(AT_FDCWD, a0);
            call.entry_path.is_none()
        }
        NsCall::PivotRoot => {
            call.entry_path = cx.read_path(AT_FDCWD, a0);
            call.entry_target = cx.read_path(AT_FDCWD, a1);
            call.entry_path.is_none() || call.entry_target.is_none()
        }
        NsCall::Mount => {
            call.entry_path = cx.read_path(AT_FDCWD, a1);
            // Both may be NULL (a remount, a propagation change).
            call.entry_target = if a0 == 0 { Some(String::new()) } else { read_text(cx, a0) };
            let fstype = if a2 == 0 { Some(String::new()) } else { read_text(cx, a2) };
            call.entry_bytes = fstype.clone().unwrap_or_default().into_bytes();
            call.entry_path.is_none() || call.entry_target.is_none() || fstype.is_none()
        }
        NsCall::Unshare => false,
        NsCall::Setns => {
            call.entry_path = cx.fd_path(call.fd(0));
            call.entry_path.is_none()
        }
    };
    call.partial |= unread;
    Next::Exit
}

pub fn exit(cx: &mut Ctx<'_>, call: &Call, retval: i64, ns: NsCall) {
    let path = match ns {
        // The root the kernel gave the thread.
        NsCall::Chroot if retval == 0 => procfs::root(cx.tid).or_else(|| call.entry_path.clone()),
        NsCall::Setns | NsCall::Unshare => None,
        _ => call.entry_path.clone(),
    };
    let flags = match ns {
        NsCall::Mount => call.args[3],
        // int arguments.
        NsCall::Umount | NsCall::Setns => u64::from(call.args[1] as u32),
        NsCall::Unshare => u64::from(call.args[0] as u32),
        NsCall::Chroot | NsCall::PivotRoot => 0,
    };
    let event = proto::NamespaceEvent {
        path: path.unwrap_or_default(),
        source: call.entry_target.clone().unwrap_or_default(),
        fstype: String::from_utf8(call.entry_bytes.clone()).unwrap_or_default(),
        flags,
        fd: (ns == NsCall::Setns).then(|| call.fd(0)),
        namespace: if ns == NsCall::Setns { call.entry_path.clone().unwrap_or_default() } else { String::new() },
    };
    cx.emit_call(call, retval, false, Payload::Namespace(event));
}
