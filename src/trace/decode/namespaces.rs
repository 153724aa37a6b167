//! Calls that change where paths lead: chroot, pivot_root, mount, umount2,
//! unshare and setns. Reported so that a reader can follow a thread's root,
//! mounts and namespaces; paths are read at entry, as the kernel reads them.

use crate::proto::{self, event::Payload};
use crate::text;
use crate::trace::decode::context::{Call, Ctx, Next, AT_FDCWD, PATH_MAX};
use crate::trace::memory;
use crate::trace::mounts;
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
    /// i386's umount(target): umount2 without flags.
    UmountNoFlags,
    /// unshare(flags).
    Unshare,
    /// setns(fd, nstype).
    Setns,
}

/// mount(2)'s MS_* flags (a bind mount is MS_BIND, a propagation change
/// MS_PRIVATE, MS_SHARED, MS_SLAVE or MS_UNBINDABLE).
const MOUNT_FLAGS: &[(u64, &str)] = &[
    (1, "MS_RDONLY"),
    (1 << 1, "MS_NOSUID"),
    (1 << 2, "MS_NODEV"),
    (1 << 3, "MS_NOEXEC"),
    (1 << 4, "MS_SYNCHRONOUS"),
    (1 << 5, "MS_REMOUNT"),
    (1 << 6, "MS_MANDLOCK"),
    (1 << 7, "MS_DIRSYNC"),
    (1 << 8, "MS_NOSYMFOLLOW"),
    (1 << 10, "MS_NOATIME"),
    (1 << 11, "MS_NODIRATIME"),
    (1 << 12, "MS_BIND"),
    (1 << 13, "MS_MOVE"),
    (1 << 14, "MS_REC"),
    (1 << 15, "MS_SILENT"),
    (1 << 16, "MS_POSIXACL"),
    (1 << 17, "MS_UNBINDABLE"),
    (1 << 18, "MS_PRIVATE"),
    (1 << 19, "MS_SLAVE"),
    (1 << 20, "MS_SHARED"),
    (1 << 21, "MS_RELATIME"),
    (1 << 22, "MS_KERNMOUNT"),
    (1 << 23, "MS_I_VERSION"),
    (1 << 24, "MS_STRICTATIME"),
    (1 << 25, "MS_LAZYTIME"),
];

const MS_BIND: u64 = 1 << 12;
const MS_MOVE: u64 = 1 << 13;
const UMOUNT_NOFOLLOW: u32 = 1 << 3;

/// The magic old programs put in mount's high 16 bits; the kernel drops
/// those bits when it finds it (a name for the magic, not for each bit).
const MS_MGC_VAL: u64 = 0xc0ed_0000;
const MS_MGC_MSK: u64 = 0xffff_0000;

const UMOUNT_FLAGS: &[(u64, &str)] =
    &[(1, "MNT_FORCE"), (1 << 1, "MNT_DETACH"), (1 << 2, "MNT_EXPIRE"), (1 << 3, "UMOUNT_NOFOLLOW")];

/// unshare(2)'s and setns(2)'s CLONE_* flags.
const CLONE_FLAGS: &[(u64, &str)] = &[
    (0x80, "CLONE_NEWTIME"),
    (0x100, "CLONE_VM"),
    (0x200, "CLONE_FS"),
    (0x400, "CLONE_FILES"),
    (0x800, "CLONE_SIGHAND"),
    (0x1_0000, "CLONE_THREAD"),
    (0x2_0000, "CLONE_NEWNS"),
    (0x4_0000, "CLONE_SYSVSEM"),
    (0x0200_0000, "CLONE_NEWCGROUP"),
    (0x0400_0000, "CLONE_NEWUTS"),
    (0x0800_0000, "CLONE_NEWIPC"),
    (0x1000_0000, "CLONE_NEWUSER"),
    (0x2000_0000, "CLONE_NEWPID"),
    (0x4000_0000, "CLONE_NEWNET"),
];

/// `flags` by name, lowest bit first (`table` is in that order); bits
/// without a name as hex, so that the list says every bit.
fn flag_names(flags: u64, table: &[(u64, &str)]) -> Vec<String> {
    (0..64)
        .map(|i| 1u64 << i)
        .filter(|bit| flags & bit != 0)
        .map(|bit| {
            table
                .iter()
                .find(|(named, _)| *named == bit)
                .map_or_else(|| format!("{bit:#x}"), |(_, name)| (*name).to_owned())
        })
        .collect()
}

/// The call's flags by name.
fn names_of(ns: NsCall, flags: u64) -> Vec<String> {
    match ns {
        NsCall::Mount if flags & MS_MGC_MSK == MS_MGC_VAL => {
            [vec!["MS_MGC_VAL".to_owned()], flag_names(flags & !MS_MGC_MSK, MOUNT_FLAGS)].concat()
        }
        NsCall::Mount => flag_names(flags, MOUNT_FLAGS),
        NsCall::Umount => flag_names(flags, UMOUNT_FLAGS),
        NsCall::Unshare | NsCall::Setns => flag_names(flags, CLONE_FLAGS),
        NsCall::Chroot | NsCall::PivotRoot | NsCall::UmountNoFlags => Vec::new(),
    }
}

/// Text as given (a mount source or filesystem type is not always a path).
fn read_text(cx: &Ctx<'_>, addr: u64) -> Option<String> {
    let (raw, _) = memory::read_cstring(cx.tid, addr, PATH_MAX).ok()?;
    Some(text::lossless(&raw))
}

pub fn entry(cx: &mut Ctx<'_>, call: &mut Call, ns: NsCall) -> Next {
    let [a0, a1, a2, ..] = call.args;
    let unread = match ns {
        NsCall::Chroot => {
            call.entry_path = cx.read_path(AT_FDCWD, a0);
            call.entry_path.is_none()
        }
        // The kernel follows the target's final symlink (umount2 unless
        // told not to): the mount is where it leads, which mountinfo shows.
        NsCall::Umount | NsCall::UmountNoFlags => {
            let follows = ns == NsCall::UmountNoFlags || a1 as u32 & UMOUNT_NOFOLLOW == 0;
            call.entry_path = match follows {
                true => cx.read_followed_path(AT_FDCWD, a0),
                false => cx.read_path(AT_FDCWD, a0),
            };
            call.entry_path.is_none()
        }
        NsCall::PivotRoot => {
            call.entry_path = cx.read_path(AT_FDCWD, a0);
            call.entry_target = cx.read_path(AT_FDCWD, a1);
            call.entry_path.is_none() || call.entry_target.is_none()
        }
        NsCall::Mount => {
            call.entry_path = cx.read_followed_path(AT_FDCWD, a1);
            // Both may be NULL (a remount, a propagation change). A bind
            // mount's or a move's source is a path, resolved as the kernel does.
            call.entry_target = match a0 {
                0 => Some(String::new()),
                _ if call.args[3] & (MS_BIND | MS_MOVE) != 0 => cx.read_path(AT_FDCWD, a0),
                _ => read_text(cx, a0),
            };
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
    // Another task, or another process writing this memory, could rewrite
    // the arguments before the kernel reads them: what a successful call
    // did is looked for in mountinfo at exit.
    call.shared = cx.procs.tables_shared(cx.tid);
    if matches!(ns, NsCall::Mount | NsCall::Umount) {
        call.entry_mounts = mounted_at(cx, call.entry_path.as_deref());
    }
    Next::Exit
}

/// The ids of the mounts at `target` (an event's path) in the thread's
/// mountinfo; None when it could not be read.
fn mounted_at(cx: &Ctx<'_>, target: Option<&str>) -> Option<Vec<u64>> {
    let target = text::bytes(target?)?;
    Some(mounts::listed(cx.tid)?.into_iter().filter(|m| m.point == target).map(|m| m.id).collect())
}

/// Whether a call is one whose effect mountinfo shows whoever wrote its
/// arguments: a successful unmount, or a new mount that is no bind or
/// move. The rest is checked only where another task shares the memory:
/// another process writing it is a residual risk there (see README).
fn leaves_a_mount_change(call: &Call, retval: i64, ns: NsCall) -> bool {
    retval >= 0 && (ns == NsCall::Umount || call.args[3] & (CHANGES_A_MOUNT | BINDS_OR_MOVES) == 0)
}

/// Flags with which mount(2) changes an existing mount instead of adding
/// one: a remount, and the propagation changes (shared, private, slave,
/// unbindable).
const CHANGES_A_MOUNT: u64 =
    libc::MS_REMOUNT | libc::MS_SHARED | libc::MS_PRIVATE | libc::MS_SLAVE | libc::MS_UNBINDABLE;
/// Flags with which mount(2) puts an existing mount's tree elsewhere.
const BINDS_OR_MOVES: u64 = libc::MS_BIND | libc::MS_MOVE;

/// Why a mount or umount2 cannot be reported as read at entry, or None: a
/// new mount must be in the thread's mountinfo at the target, of that type
/// and from that source, and was not there at entry; an unmount must have
/// taken away a mount that was at the target at entry. What leaves nothing
/// to look for (a failure, a remount, a propagation change) is marked, and
/// so is a bind or move's source.
fn mount_unverified(cx: &Ctx<'_>, call: &Call, retval: i64, ns: NsCall) -> Option<String> {
    const RACE: &str = "another task sharing the memory, or another process writing it, could have changed them \
                        before the kernel read them";
    let fields = if ns == NsCall::Umount { "path" } else { "path, source, fstype" };
    if retval < 0 {
        return Some(format!("{fields}: as read at the call's entry; it failed, and {RACE}"));
    }
    let flags = call.args[3];
    // The kernel tells these apart in this order: remount, propagation, bind, move, new mount.
    if ns == NsCall::Mount && flags & CHANGES_A_MOUNT != 0 {
        return Some(format!(
            "path, source, fstype: as read at the call's entry; a remount or propagation change leaves no new \
             mount to check them against, and {RACE}"
        ));
    }
    let (Some(before), Some(target)) = (&call.entry_mounts, call.entry_path.as_deref().and_then(text::bytes)) else {
        return Some(format!("{fields}: as read at the call's entry; mountinfo could not be read, and {RACE}"));
    };
    let Some(after) = mounts::listed(cx.tid) else {
        return Some(format!("{fields}: as read at the call's entry; mountinfo could not be read, and {RACE}"));
    };
    if ns == NsCall::Umount {
        let gone = before.iter().any(|id| !after.iter().any(|m| m.id == *id));
        return (!gone).then(|| format!("path: no mount that was at it at the call's entry is gone after it: {RACE}"));
    }
    let source = call.entry_target.as_deref().and_then(text::bytes).unwrap_or_default();
    let fstype = std::str::from_utf8(&call.entry_bytes).ok().and_then(text::bytes).unwrap_or_default();
    let new_at_target = |m: &&mounts::Listed| m.point == target && !before.contains(&m.id);
    if flags & BINDS_OR_MOVES != 0 {
        return Some(match after.iter().any(|m| new_at_target(&m)) {
            true => format!(
                "source: a bind or move's source as read at the call's entry; its target is confirmed by \
                             mountinfo, but {RACE}"
            ),
            false => format!("path, source: no new mount at the path in mountinfo after the call: {RACE}"),
        });
    }
    // A NULL source is listed as "none".
    let same_source = |m: &mounts::Listed| m.source == source || (source.is_empty() && m.source == b"none");
    let confirmed = after.iter().filter(new_at_target).any(|m| m.fstype == fstype && same_source(m));
    (!confirmed).then(|| {
        format!(
            "path, source, fstype: no new mount at the path, of that type and from that source, in mountinfo after \
             the call: {RACE}"
        )
    })
}

pub fn exit(cx: &mut Ctx<'_>, call: &Call, retval: i64, ns: NsCall) {
    let path = match ns {
        // The root the kernel gave the thread.
        NsCall::Chroot if retval == 0 => procfs::root(cx.tid).or_else(|| call.entry_path.clone()),
        NsCall::Setns | NsCall::Unshare => None,
        _ => call.entry_path.clone(),
    };
    let flags = match ns {
        // unsigned long for the kernel: every bit counts (an i386 call's
        // upper halves are already cleared).
        NsCall::Mount => call.args[3],
        NsCall::Unshare => call.args[0],
        // int arguments.
        NsCall::Umount | NsCall::Setns => u64::from(call.args[1] as u32),
        NsCall::Chroot | NsCall::PivotRoot | NsCall::UmountNoFlags => 0,
    };
    let event = proto::NamespaceEvent {
        path: path.unwrap_or_default(),
        source: call.entry_target.clone().unwrap_or_default(),
        fstype: String::from_utf8(call.entry_bytes.clone()).unwrap_or_default(),
        flags,
        fd: (ns == NsCall::Setns).then(|| call.fd(0)),
        namespace: if ns == NsCall::Setns { call.entry_path.clone().unwrap_or_default() } else { String::new() },
        flag_names: names_of(ns, flags),
    };
    let unverified = match ns {
        NsCall::Mount | NsCall::Umount if call.shared || leaves_a_mount_change(call, retval, ns) => {
            mount_unverified(cx, call, retval, ns)
        }
        _ => None,
    };
    let event = cx.call_event(call, retval, false, Payload::Namespace(event));
    cx.sink.emit(proto::Event { unverified: unverified.unwrap_or_default(), ..event });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_are_named_lowest_bit_first_and_unnamed_bits_shown_as_hex() {
        assert_eq!(names_of(NsCall::Mount, 0x5000), ["MS_BIND", "MS_REC"]);
        // The old magic is one name, and leaves the low bits to name.
        assert_eq!(names_of(NsCall::Mount, 0xc0ed_0001), ["MS_MGC_VAL", "MS_RDONLY"]);
        assert_eq!(names_of(NsCall::Mount, 1 << 9), ["0x200"]);
        assert_eq!(names_of(NsCall::Umount, 0x3), ["MNT_FORCE", "MNT_DETACH"]);
        assert_eq!(names_of(NsCall::Unshare, 0x8002_0000), ["CLONE_NEWNS", "0x80000000"]);
        assert!(names_of(NsCall::Chroot, 0).is_empty());
    }
}
