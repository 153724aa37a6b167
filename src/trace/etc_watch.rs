//! Whether a root's /etc/passwd or /etc/group may have changed since the
//! tracer last checked them, for one syscall (a poll) when nothing did:
//! inotify watches on the root, its /etc and both files, and the mount
//! table of the root's mount namespace (a mount over /etc or a database
//! changes which file the name leads to without touching any watched inode).
//!
//! The kernel queues an inotify event and bumps a namespace's mount event
//! count within the call that makes the change, so a change made before a
//! stop is seen by a poll at that stop. Watches are on inodes, so a change
//! through any link or mount of the same filesystem is seen; that holds for
//! local filesystems only, so files on others (NFS, FUSE...) are never
//! watched and are checked by statx at every lookup instead. Two gaps,
//! documented in README: an overlayfs file changed beneath the overlay (in
//! its upper or lower directory directly, which the kernel calls undefined)
//! and stores through a writable shared mapping raise no inotify event.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify, WatchDescriptor};
use nix::sys::statfs::{self, FsType};

use crate::trace::procfs;

/// Watch entries kept; past this the instance is made anew (dropping every
/// watch, old files' included) and every root is checked again.
const WATCHES_MAX: usize = 64;

/// Filesystems whose every change of a file reaches its inode's watches.
const LOCAL: [FsType; 6] = [
    statfs::EXT4_SUPER_MAGIC, // ext2 and ext3 too
    statfs::XFS_SUPER_MAGIC,
    statfs::BTRFS_SUPER_MAGIC,
    statfs::TMPFS_MAGIC,
    statfs::F2FS_SUPER_MAGIC,
    statfs::OVERLAYFS_SUPER_MAGIC,
];

/// What a watched inode is to the databases: which of the names in it matter.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// A root: its `etc` entry.
    Root,
    /// A root's /etc: its `passwd` and `group` entries.
    Etc,
    /// A database file: all of it.
    Database,
}

impl Role {
    fn mask(self) -> AddWatchFlags {
        let entries = AddWatchFlags::IN_CREATE
            | AddWatchFlags::IN_DELETE
            | AddWatchFlags::IN_MOVED_FROM
            | AddWatchFlags::IN_MOVED_TO
            | AddWatchFlags::IN_DELETE_SELF
            | AddWatchFlags::IN_MOVE_SELF
            | AddWatchFlags::IN_ATTRIB;
        match self {
            // A directory's IN_MODIFY is about its files' contents: the database's own watch has those.
            Role::Root | Role::Etc => entries,
            Role::Database => entries | AddWatchFlags::IN_MODIFY | AddWatchFlags::IN_CLOSE_WRITE,
        }
    }

    /// Whether an event named `name` (None: about the watched inode itself) matters.
    fn matters(self, name: Option<&std::ffi::OsStr>) -> bool {
        let Some(name) = name.map(|n| n.as_encoded_bytes()) else { return true };
        match self {
            Role::Root => name == b"etc",
            Role::Etc => name == b"passwd" || name == b"group",
            Role::Database => true,
        }
    }
}

/// One inotify instance, made when first needed; None when the kernel
/// refuses one (the instance limit): then nothing is ever fresh.
#[derive(Default)]
pub struct EtcWatch {
    inotify: Option<Inotify>,
    tried: bool,
    watches: Vec<(WatchDescriptor, Role)>,
    /// Set when the watches were dropped: whatever they guarded is stale.
    dropped: bool,
}

impl EtcWatch {
    /// Watches `file` (an O_PATH descriptor) in `role`; false when it
    /// cannot be (no instance, a filesystem not known to report all
    /// changes, the watch limit): the caller then keeps checking by statx.
    pub fn add(&mut self, file: &OwnedFd, role: Role) -> bool {
        if !statfs::fstatfs(file).is_ok_and(|fs| LOCAL.contains(&fs.filesystem_type())) {
            return false;
        }
        if self.watches.len() >= WATCHES_MAX {
            *self = EtcWatch { tried: true, inotify: Inotify::init(flags()).ok(), watches: Vec::new(), dropped: true };
        }
        if !self.tried {
            self.tried = true;
            self.inotify = Inotify::init(flags()).ok();
        }
        let Some(inotify) = &self.inotify else { return false };
        // The link of our own descriptor leads to that very inode.
        let Ok(wd) = inotify.add_watch(procfs::own_link(file).as_str(), role.mask()) else {
            return false;
        };
        if !self.watches.contains(&(wd, role)) {
            self.watches.push((wd, role));
        }
        true
    }

    /// Whether anything watched changed since the last look, and for each
    /// of `mounts` (`/proc/TID/mountinfo` descriptors), whether its
    /// namespace's mount table did (bit i for `mounts[i]`). Anything that
    /// cannot be told counts as a change.
    pub fn changes(&mut self, mounts: &[BorrowedFd<'_>]) -> (bool, u64) {
        let all_mounts = (0..mounts.len().min(64)).fold(0u64, |bits, i| bits | 1 << i);
        if std::mem::take(&mut self.dropped) {
            return (true, all_mounts);
        }
        let Some(inotify) = &self.inotify else { return (true, all_mounts) };
        let mut fds = Vec::with_capacity(mounts.len() + 1);
        fds.push(PollFd::new(inotify.as_fd(), PollFlags::POLLIN));
        fds.extend(mounts.iter().map(|fd| PollFd::new(*fd, PollFlags::POLLPRI)));
        match poll(&mut fds, PollTimeout::ZERO) {
            Ok(0) => return (false, 0),
            Ok(_) => {}
            Err(_) => return (true, all_mounts),
        }
        // A mountinfo file is always readable: only POLLPRI (or an error) says its table changed.
        let changed = PollFlags::POLLPRI | PollFlags::POLLERR | PollFlags::POLLNVAL;
        let moved = fds[1..]
            .iter()
            .enumerate()
            .filter(|(_, fd)| fd.revents().is_none_or(|r| r.intersects(changed)))
            .fold(0u64, |bits, (i, _)| bits | 1 << i.min(63));
        let queued = fds[0].revents().is_none_or(|r| !r.is_empty());
        drop(fds);
        (queued && self.drain(), moved)
    }

    /// Reads every queued event; true when one matters (or the queue
    /// overflowed, or a watch went away).
    fn drain(&mut self) -> bool {
        let Some(inotify) = &self.inotify else { return true };
        let mut matters = false;
        loop {
            let events = match inotify.read_events() {
                Ok(events) => events,
                Err(nix::errno::Errno::EAGAIN) => return matters,
                Err(_) => return true,
            };
            for event in events {
                if event.mask.intersects(AddWatchFlags::IN_Q_OVERFLOW | AddWatchFlags::IN_IGNORED) {
                    self.watches.retain(|(wd, _)| *wd != event.wd);
                    matters = true;
                    continue;
                }
                let mut roles = self.watches.iter().filter(|(wd, _)| *wd == event.wd).peekable();
                // An event of no watch known here is taken to matter.
                matters |= roles.peek().is_none() || roles.any(|(_, role)| role.matters(event.name.as_deref()));
            }
        }
    }
}

fn flags() -> InitFlags {
    InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::fcntl::{open, OFlag};
    use nix::sys::stat::Mode;

    fn opened(path: &std::path::Path) -> OwnedFd {
        open(path, OFlag::O_PATH | OFlag::O_CLOEXEC, Mode::empty()).unwrap()
    }

    #[test]
    fn a_change_to_the_databases_is_seen_once_and_other_files_of_etc_are_not_one() {
        // The checkout's filesystem: a test machine's /tmp may be one not watched.
        let root = tempfile::tempdir_in(env!("CARGO_MANIFEST_DIR")).unwrap();
        let etc = root.path().join("etc");
        std::fs::create_dir(&etc).unwrap();
        std::fs::write(etc.join("passwd"), "a:x:1:1\n").unwrap();
        let mut watch = EtcWatch::default();
        assert!(watch.add(&opened(root.path()), Role::Root));
        assert!(watch.add(&opened(&etc), Role::Etc));
        assert!(watch.add(&opened(&etc.join("passwd")), Role::Database));
        assert_eq!(watch.changes(&[]), (false, 0));

        std::fs::write(etc.join("hosts"), "x").unwrap();
        std::fs::create_dir(root.path().join("var")).unwrap();
        assert_eq!(watch.changes(&[]), (false, 0));

        // Written through another name of the same file: its own watch sees it.
        std::fs::hard_link(etc.join("passwd"), root.path().join("other")).unwrap();
        assert_eq!(watch.changes(&[]), (true, 0), "a new link count");
        let mut other = std::fs::OpenOptions::new().append(true).open(root.path().join("other")).unwrap();
        std::io::Write::write_all(&mut other, b"b:x:2:2\n").unwrap();
        assert_eq!(watch.changes(&[]), (true, 0));
        assert_eq!(watch.changes(&[]), (false, 0));

        std::fs::write(etc.join("group.new"), "g:x:1:\n").unwrap();
        std::fs::rename(etc.join("group.new"), etc.join("group")).unwrap();
        assert_eq!(watch.changes(&[]), (true, 0));

        std::fs::rename(&etc, root.path().join("etc.old")).unwrap();
        assert_eq!(watch.changes(&[]), (true, 0));
    }

    #[test]
    fn an_unchanged_mount_table_is_not_a_change() {
        let root = tempfile::tempdir_in(env!("CARGO_MANIFEST_DIR")).unwrap();
        let mut watch = EtcWatch::default();
        assert!(watch.add(&opened(root.path()), Role::Root));
        let mounts = open("/proc/self/mountinfo", OFlag::O_RDONLY | OFlag::O_CLOEXEC, Mode::empty()).unwrap();
        assert_eq!(watch.changes(&[mounts.as_fd()]), (false, 0));
    }
}
