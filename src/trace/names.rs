//! User and group names as the traced process's own system has them: its
//! root's /etc/passwd and /etc/group, not the tracer's. Both files are the
//! workload's to write: a FIFO, a device, a symlink out of its root or a
//! huge file must neither stall nor fool the tracer thread.

use std::collections::HashMap;
use std::io::Read;
use std::os::fd::{AsFd, OwnedFd};

use nix::fcntl::{openat, openat2, OFlag, OpenHow, ResolveFlag};
use nix::sys::stat::{Mode, SFlag};
use nix::unistd::Pid;

use crate::text;
use crate::trace::etc_watch::{EtcWatch, Role};
use crate::trace::procfs::{self, FileId};

/// Largest database read; a longer one is read up to here (its entries
/// past the cut are not known).
const DATABASE_MAX: usize = 1 << 20;
/// Databases kept (each at most about 2 MiB in memory): a workload that
/// chroots into many roots cycles them.
const CACHED_MAX: usize = 4;
/// Roots kept open (two descriptors each).
const ROOTS_MAX: usize = 4;
/// Most lookups between two tries to watch a root.
const WATCH_RETRY_MAX: u64 = 1024;
/// Lookups in a root before it is first watched. Watches save two statx
/// per lookup, but closing an inotify instance that holds them waits for
/// the kernel's grace period (13 ms here), which a short run pays at its
/// exit: a root is watched once it has been looked up often enough.
const WATCH_AFTER: u64 = 64;
/// How recent a change of an unwatched database may be for its version
/// (size, mtime, ctime) not to tell a later write apart: file times come
/// from the kernel's coarse clock, one tick (at most 10 ms) apart. Such a
/// database is read for the lookup and not kept.
const SAME_TICK_NS: i64 = 50_000_000;

/// Which database.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Database {
    Passwd,
    Group,
}

const DATABASES: [Database; 2] = [Database::Passwd, Database::Group];

impl Database {
    fn name(self) -> &'static str {
        match self {
            Database::Passwd => "passwd",
            Database::Group => "group",
        }
    }
}

/// Which file, on which mount, in what state: a changed file differs in
/// one of them (device, inode, mount, size, mtime, ctime) and is read again.
type Version = (u64, u64, Option<u64>, u64, Option<i64>, Option<i64>);

/// A file as statx gave it: a directory, a regular file (with its
/// version), or anything else (a symlink, a FIFO, a device...).
enum Kind {
    Directory,
    Regular(Version),
    Other,
}

fn kind(file: &FileId) -> Kind {
    let Some(stat) = file.stat else { return Kind::Other };
    let mount = file.unique_mount_id.or(file.mount_id);
    match SFlag::from_bits_truncate(stat.mode) & SFlag::S_IFMT {
        SFlag::S_IFDIR => Kind::Directory,
        SFlag::S_IFREG => Kind::Regular((file.device, file.inode, mount, stat.size, stat.mtime, stat.ctime)),
        _ => Kind::Other,
    }
}

/// Which directory (device, inode) on which mount: two mounts of one
/// directory may have different mounts on top of its files.
type Place = (u64, u64, Option<u64>);

/// Whether a database changed within a clock tick or so of now: a write
/// in that tick could leave its version as it is. Its ctime says: every
/// change sets it, and no call sets it to another time (an mtime can be
/// set to the future, which would keep a root from ever being cached).
fn changed_lately(version: &Version) -> bool {
    let now =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(i64::MAX, |d| d.as_nanos() as i64);
    let (.., ctime) = *version;
    ctime.is_none_or(|ctime| now.saturating_sub(ctime) < SAME_TICK_NS)
}

fn place_of(file: &FileId) -> Place {
    (file.device, file.inode, file.unique_mount_id.or(file.mount_id))
}

/// A database as read, and where each id's name is in it.
struct Loaded {
    version: Version,
    names: Entries,
    last_used: u64,
    /// Read while its root's databases were watched: any change seen since
    /// may have left its version as it was.
    watched: bool,
}

/// A root met before, kept open, with its /etc when that is a directory.
/// The descriptor pins the root's mount, so its mount id cannot be reused
/// while it is kept: a thread whose root has the same place has this root.
struct Root {
    place: Place,
    dir: OwnedFd,
    etc: Option<(Place, OwnedFd)>,
    last_used: u64,
    /// While nothing watched has changed: both databases' versions.
    fresh: Option<Fresh>,
    /// Lookups to go before the first try to watch (`WATCH_AFTER`), or,
    /// when watching failed (a symlinked /etc, a filesystem not watched,
    /// the watch limit...), before the next try, and how many the one after
    /// waits (doubling, so that a root that cannot be
    /// watched costs the tries next to nothing).
    watch_retry: (u64, u64),
}

/// A root whose /etc/passwd and /etc/group are watched (see `etc_watch`).
struct Fresh {
    /// By `DATABASES`' order.
    versions: [Version; 2],
    /// `/proc/TID/mountinfo` of the root's mount namespace: a mount over
    /// /etc or a database changes no watched inode.
    mounts: OwnedFd,
}

/// The roots and databases met so far. A root's /etc/passwd and
/// /etc/group, once found regular files in its own /etc, are watched: a
/// lookup then costs two syscalls while nothing changed (the statx of the
/// thread's root, and one poll of the watches). Otherwise, and after any
/// change, a lookup checks the root's /etc and the two files by statx
/// against what was read (no symlink is followed on that way, so nothing
/// leads out of the root); a symlinked /etc or database is opened
/// confined to the root (openat2 RESOLVE_IN_ROOT) instead, and not watched.
#[derive(Default)]
pub struct Names {
    roots: Vec<Root>,
    /// Which root each thread has, as first looked up: kept until the
    /// engine says a thread's root may have changed (`forget_threads`), so
    /// that an event reported after its thread exited still has names.
    thread_roots: HashMap<Pid, Place>,
    loaded: Vec<Loaded>,
    uses: u64,
    watch: EtcWatch,
}

impl Names {
    /// The names of `uid` and `gid` (those given) in thread `tid`'s root,
    /// as its /etc/passwd and /etc/group say now.
    pub fn lookup(&mut self, tid: Pid, uid: Option<u32>, gid: Option<u32>) -> (Option<String>, Option<String>) {
        self.uses += 1;
        self.forget_changed();
        let Some(root) = self.root(tid) else { return (None, None) };
        if self.roots[root].fresh.is_none() {
            self.try_watch(root, tid);
        }
        let user = uid.and_then(|uid| self.name(root, Database::Passwd, uid));
        (user, gid.and_then(|gid| self.name(root, Database::Group, gid)))
    }

    /// Roots whose watched files or mount table changed are checked again,
    /// and databases read under watches that saw a change are read again.
    fn forget_changed(&mut self) {
        let watched: Vec<usize> = (0..self.roots.len()).filter(|&i| self.roots[i].fresh.is_some()).collect();
        let mounts: Vec<_> =
            watched.iter().filter_map(|&i| Some(self.roots[i].fresh.as_ref()?.mounts.as_fd())).collect();
        let (files, moved) = self.watch.changes(&mounts);
        for (bit, &i) in watched.iter().enumerate() {
            if files || moved & (1 << bit) != 0 {
                self.roots[i].fresh = None;
            }
        }
        if files {
            self.loaded.retain(|l| !l.watched);
        }
    }

    /// Root `index` watched when it can be, else a later try planned.
    fn try_watch(&mut self, index: usize, tid: Pid) {
        let wait = &mut self.roots[index].watch_retry.0;
        if *wait > 0 {
            *wait -= 1;
            return;
        }
        match self.watch_root(index, tid) {
            Some(fresh) => {
                // Read before the watches were in place, a database could
                // have changed within its version (a write within one tick
                // of the file system's clock): read again under them.
                self.loaded.retain(|l| l.watched || !fresh.versions.contains(&l.version));
                self.roots[index].fresh = Some(fresh);
                self.roots[index].watch_retry = (0, 0);
            }
            None => {
                let retry = &mut self.roots[index].watch_retry;
                retry.1 = (retry.1 * 2).clamp(1, WATCH_RETRY_MAX);
                retry.0 = retry.1;
            }
        }
    }

    /// Watches for any change of root `index`'s databases, then checks
    /// they are the regular files of its /etc (a change after a watch is
    /// in place is seen by it): their versions, or None when not both can
    /// be watched so (the statx checks then go on).
    fn watch_root(&mut self, index: usize, tid: Pid) -> Option<Fresh> {
        let root = &self.roots[index];
        let (etc_place, etc) = root.etc.as_ref()?;
        // Opened before the checks: a change of the table after it is seen.
        let flags = OFlag::O_RDONLY | OFlag::O_CLOEXEC;
        let mounts = nix::fcntl::open(format!("/proc/{tid}/mountinfo").as_str(), flags, Mode::empty()).ok()?;
        if !self.watch.add(&root.dir, Role::Root) || !self.watch.add(etc, Role::Etc) {
            return None;
        }
        // Still the thread's root, and its /etc still this directory.
        let still = |file: Option<FileId>, place: Place| {
            file.is_some_and(|f| matches!(kind(&f), Kind::Directory) && place_of(&f) == place)
        };
        if !still(procfs::root_file(tid), root.place) || !still(procfs::file_id(&root.dir, b"etc"), *etc_place) {
            return None;
        }
        let mut versions = Vec::with_capacity(DATABASES.len());
        for database in DATABASES {
            let flags = OFlag::O_PATH | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
            let file = openat(etc, database.name(), flags, Mode::empty()).ok()?;
            let Kind::Regular(version) = kind(&procfs::file_id(&file, b"")?) else { return None };
            if !self.watch.add(&file, Role::Database) {
                return None;
            }
            // The name still leads to the watched file.
            let named = procfs::file_id(etc, database.name().as_bytes())?;
            if !matches!(kind(&named), Kind::Regular(now) if now == version) {
                return None;
            }
            versions.push(version);
        }
        Some(Fresh { versions: versions.try_into().ok()?, mounts })
    }

    /// Thread `tid`'s root may have changed (a chroot, a namespace, an
    /// exec, its end: a reused id), or with None, every thread's.
    pub fn forget_threads(&mut self, tid: Option<Pid>) {
        match tid {
            Some(tid) => drop(self.thread_roots.remove(&tid)),
            None => self.thread_roots.clear(),
        }
    }

    /// The index of thread `tid`'s root among the roots kept.
    fn root(&mut self, tid: Pid) -> Option<usize> {
        let place = match self.thread_roots.get(&tid) {
            Some(place) => *place,
            None => {
                let place = place_of(&procfs::root_file(tid)?);
                self.thread_roots.insert(tid, place);
                place
            }
        };
        let index = match self.roots.iter().position(|r| r.place == place) {
            Some(index) => index,
            None => {
                let directory = OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC;
                let dir = nix::fcntl::open(format!("/proc/{tid}/root").as_str(), directory, Mode::empty()).ok()?;
                // The root may have changed since: kept only when it is the
                // one met, and looked up again at the next lookup if not.
                if place_of(&procfs::file_id(&dir, b"")?) != place {
                    self.thread_roots.remove(&tid);
                    return None;
                }
                if self.roots.len() == ROOTS_MAX {
                    let oldest = (0..self.roots.len()).min_by_key(|&i| self.roots[i].last_used)?;
                    self.roots.swap_remove(oldest);
                }
                let watch_retry = (WATCH_AFTER, 0);
                self.roots.push(Root { place, dir, etc: None, last_used: 0, fresh: None, watch_retry });
                self.roots.len() - 1
            }
        };
        let root = &mut self.roots[index];
        root.last_used = self.uses;
        if root.fresh.is_some() {
            return Some(index);
        }
        // The root's own /etc, a directory of this root, not a symlink.
        let etc = procfs::file_id(&root.dir, b"etc");
        match etc.as_ref().map(|etc| (kind(etc), place_of(etc))) {
            Some((Kind::Directory, place)) if root.etc.as_ref().is_some_and(|(known, _)| *known == place) => {}
            Some((Kind::Directory, place)) => {
                let flags = OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
                root.etc = openat(&root.dir, "etc", flags, Mode::empty())
                    .ok()
                    .filter(|fd| procfs::file_id(fd, b"").is_some_and(|opened| place_of(&opened) == place))
                    .map(|fd| (place, fd));
            }
            _ => root.etc = None,
        }
        Some(index)
    }

    fn name(&mut self, root: usize, database: Database, id: u32) -> Option<String> {
        let (version, opened) = self.database_file(root, database)?;
        let index = match self.loaded.iter().position(|l| l.version == version) {
            Some(index) => index,
            None => {
                let file = match opened {
                    Some(file) => file,
                    None => self.open_in_etc(root, database, version)?,
                };
                let names = Entries::parse(read_regular(&file)?);
                let watched = self.roots[root].fresh.is_some();
                if !watched && changed_lately(&version) {
                    return names.get(id);
                }
                if self.loaded.len() == CACHED_MAX {
                    let oldest = (0..self.loaded.len()).min_by_key(|&i| self.loaded[i].last_used)?;
                    self.loaded.swap_remove(oldest);
                }
                self.loaded.push(Loaded { version, names, last_used: 0, watched });
                self.loaded.len() - 1
            }
        };
        let loaded = &mut self.loaded[index];
        loaded.last_used = self.uses;
        loaded.names.get(id)
    }

    /// The database's version, and when it had to be opened to be found,
    /// its descriptor (O_PATH). None when it is not a regular file.
    fn database_file(&self, root: usize, database: Database) -> Option<(Version, Option<OwnedFd>)> {
        let root = &self.roots[root];
        if let Some(fresh) = &root.fresh {
            let at = DATABASES.iter().position(|&d| d == database)?;
            return Some((fresh.versions[at], None));
        }
        if let Some((_, etc)) = &root.etc {
            match kind(&procfs::file_id(etc, database.name().as_bytes())?) {
                Kind::Regular(version) => return Some((version, None)),
                Kind::Directory => return None,
                Kind::Other => {} // A symlink, maybe: followed below, inside the root.
            }
        }
        // Opened without reading (O_PATH: a FIFO or device is not opened for
        // real), its symlinks kept inside the workload's root, then looked at.
        let how = OpenHow::new()
            .flags(OFlag::O_PATH | OFlag::O_CLOEXEC)
            .resolve(ResolveFlag::RESOLVE_IN_ROOT | ResolveFlag::RESOLVE_NO_MAGICLINKS);
        let file = openat2(&root.dir, format!("etc/{}", database.name()).as_str(), how).ok()?;
        match kind(&procfs::file_id(&file, b"")?) {
            Kind::Regular(version) => Some((version, Some(file))),
            _ => None,
        }
    }

    /// The database in the root's /etc, checked to be the version found.
    fn open_in_etc(&self, root: usize, database: Database, version: Version) -> Option<OwnedFd> {
        let (_, etc) = self.roots[root].etc.as_ref()?;
        let flags = OFlag::O_PATH | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
        let file = openat(etc, database.name(), flags, Mode::empty()).ok()?;
        match kind(&procfs::file_id(&file, b"")?) {
            Kind::Regular(opened) if opened == version => Some(file),
            _ => None,
        }
    }
}

/// Up to `DATABASE_MAX` bytes of a file opened O_PATH and known to be a
/// regular file: reopened through its descriptor, so it is the same file.
fn read_regular(file: &OwnedFd) -> Option<Vec<u8>> {
    use std::os::unix::fs::OpenOptionsExt;
    let path = procfs::own_link(file);
    let flags = libc::O_NONBLOCK | libc::O_NOCTTY;
    let opened = std::fs::OpenOptions::new().read(true).custom_flags(flags).open(path).ok()?;
    let mut bytes = Vec::new();
    opened.take(DATABASE_MAX as u64).read_to_end(&mut bytes).ok()?;
    Some(bytes)
}

/// The entries of a passwd or group file, kept as the file's bytes and a
/// sorted index into them: a workload's 1 MiB of one-letter names costs
/// the tracer about twice that, not a map entry and a string each.
struct Entries {
    bytes: Vec<u8>,
    /// (id, start, end of the name), by id, the first entry of an id only
    /// (as getpwuid and getgrgid take it).
    index: Vec<(u32, u32, u32)>,
}

impl Entries {
    /// `name:password:id:...` lines (both files start so); a line cut by
    /// the read bound, and lines that do not parse, are left out.
    fn parse(mut bytes: Vec<u8>) -> Entries {
        if bytes.len() == DATABASE_MAX {
            bytes.truncate(bytes.iter().rposition(|&b| b == b'\n').unwrap_or(0));
        }
        let mut index = Vec::new();
        let mut start = 0;
        for line in bytes.split(|&b| b == b'\n') {
            let line_start = start;
            start += line.len() + 1;
            let mut fields = line.split(|&b| b == b':');
            // Both files put the id third (passwd's fourth field is the gid).
            let (Some(name), Some(_), Some(id)) = (fields.next(), fields.next(), fields.next()) else { continue };
            let Some(id) = std::str::from_utf8(id).ok().and_then(|id| id.parse::<u32>().ok()) else { continue };
            if name.is_empty() || name.starts_with(b"#") {
                continue;
            }
            // Within DATABASE_MAX: offsets fit in 32 bits.
            index.push((id, line_start as u32, (line_start + name.len()) as u32));
        }
        // Stable: the first entry of an id stays first, and is the one kept.
        index.sort_by_key(|&(id, _, _)| id);
        index.dedup_by_key(|&mut (id, _, _)| id);
        Entries { bytes, index }
    }

    fn get(&self, id: u32) -> Option<String> {
        let at = self.index.binary_search_by_key(&id, |&(id, _, _)| id).ok()?;
        let (_, start, end) = self.index[at];
        Some(text::lossless(&self.bytes[start as usize..end as usize]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_database_changed_within_a_tick_is_not_kept() {
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as i64;
        let version = |mtime, ctime| (1, 2, Some(3), 4, mtime, ctime);
        assert!(changed_lately(&version(Some(now - 1_000_000_000), Some(now))));
        assert!(changed_lately(&version(Some(now - 1_000_000_000), None)));
        assert!(!changed_lately(&version(Some(now - 1_000_000_000), Some(now - 1_000_000_000))));
        let future = now + 3_600_000_000_000;
        assert!(!changed_lately(&version(Some(future), Some(now - 1_000_000_000))), "an mtime set ahead is no change");
    }

    #[test]
    fn entries_map_ids_to_names_first_one_winning() {
        let passwd = b"root:x:0:0:root:/root:/bin/sh\nalias:x:0:0::/:/bin/sh\n# note\nbad:x:nan:0\n\xffname:x:1000:1000::/:/bin/sh";
        let names = Entries::parse(passwd.to_vec());
        assert_eq!(names.get(0).as_deref(), Some("root"));
        assert_eq!(names.get(1000).as_deref(), Some(r"\xffname"));
        assert_eq!(names.index.len(), 2);
    }

    #[test]
    fn a_line_cut_by_the_read_bound_is_left_out() {
        // "c:x:35:" cut after its first digit.
        let mut bytes = b"a:x:1:1\nb:x:2:2\n".to_vec();
        bytes.resize(DATABASE_MAX - 6, b'#');
        bytes.extend_from_slice(b"\nc:x:3");
        let names = Entries::parse(bytes);
        assert_eq!((names.index.len(), names.get(2).as_deref()), (2, Some("b")));
    }
}
