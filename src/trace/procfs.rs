//! The few /proc reads the tracer needs, parsed by hand: they run while a
//! tracee is stopped, so they avoid the allocations of a general parser.

use std::fs::File;
use std::io::Read;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::DirEntryExt;

use nix::errno::Errno;
use nix::unistd::Pid;

use crate::proto::Credentials;
use crate::text;
use crate::trace::abi::PAGE;

fn readlink(path: &str) -> Option<String> {
    std::fs::read_link(path).ok().map(|p| text::lossless_os(p.as_os_str()))
}

/// The kernel's path for an open descriptor ("socket:[…]" and the like for
/// non-files).
pub fn fd_path(tid: Pid, fd: i32) -> Option<String> {
    readlink(&format!("/proc/{tid}/fd/{fd}"))
}

/// Where a path argument of thread `tid` leads, as the kernel resolves it:
/// the directory part is opened (O_PATH) from the thread's own root, working
/// directory or directory descriptor, so that symlinks are followed before
/// `..` as the kernel does, and its real location (in the tracer's view:
/// a chroot'ed thread's `/x` is `<root>/x`) read back; the final name is
/// joined to it unresolved (the file may be gone, or not there yet, and a
/// final symlink is the file an unlink or rename acts on). None when the
/// directory does not resolve (the call fails too); the caller then joins
/// lexically. A relative path of a chroot'ed thread is resolved from its
/// working directory without its root as a bound.
pub fn resolve_path(tid: Pid, dirfd: i32, raw: &[u8]) -> Option<String> {
    resolve(tid, dirfd, raw, false).map(|(path, _)| path)
}

/// [`resolve_path`] with the final symlink followed, as mount(2) and
/// umount2(2) take their target: the path of what it leads to now; None
/// when it leads nowhere from the tracer's side.
pub fn resolve_path_followed(tid: Pid, dirfd: i32, raw: &[u8]) -> Option<String> {
    let opened = open_in_view(tid, dirfd, raw.first() == Some(&b'/'), raw, nix::fcntl::OFlag::empty())?;
    Some(text::lossless(&directory_path(&opened)?))
}

/// Which file a name leads to, whatever its name: st_dev as stat(2) gives
/// it, the inode, and the mount id where the kernel gives it (5.8+).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FileId {
    pub device: u64,
    pub inode: u64,
    pub mount_id: Option<u64>,
    /// The mount's id that the kernel never reuses (Linux 6.8+).
    pub unique_mount_id: Option<u64>,
    /// What the same statx said of it otherwise, when it said all of it.
    pub stat: Option<FileStat>,
}

impl FileId {
    /// Whether `other` is this very file, whatever its metadata did
    /// meanwhile (a rename or a new link changes its ctime).
    pub fn is(&self, other: &FileId) -> bool {
        (self.device, self.inode, self.mount_id) == (other.device, other.inode, other.mount_id)
    }
}

/// A file's type and permissions, owner and times, as statx gave them
/// with its identity (one call: the same file).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FileStat {
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub size: u64,
    /// Nanoseconds since the epoch; None beyond what 64 bits hold (a time
    /// set after 2262 or before 1678).
    pub mtime: Option<i64>,
    pub ctime: Option<i64>,
}

/// [`resolve_path`], and the file the path names now, its final symlink not
/// followed (None when there is none: not created yet, or gone).
pub fn resolve_file(tid: Pid, dirfd: i32, raw: &[u8]) -> Option<(String, Option<FileId>)> {
    resolve(tid, dirfd, raw, true)
}

/// [`resolve_path`], and with `identify` the file (a statx the tracee
/// would wait for otherwise).
fn resolve(tid: Pid, dirfd: i32, raw: &[u8], identify: bool) -> Option<(String, Option<FileId>)> {
    use nix::fcntl::OFlag;
    let (dir, name) = split_final_name(raw);
    let opened = open_in_view(tid, dirfd, raw.first() == Some(&b'/'), dir, OFlag::O_DIRECTORY)?;
    let file = identify.then(|| file_id(&opened, name.unwrap_or_default())).flatten();
    Some((path_in(&opened, name)?, file))
}

/// [`resolve_path`], and the file an open(2) of `raw` would open now (see
/// [`opened_file`]), both looked up from one reference to the thread's
/// working directory, directory descriptor or root: another task changing
/// that meanwhile cannot have the two come from different ones.
pub fn resolve_opened_file(tid: Pid, dirfd: i32, raw: &[u8], follow: bool) -> Option<(String, Option<FileId>)> {
    use nix::fcntl::OFlag;
    let view = View::of(tid, dirfd, raw.first() == Some(&b'/'))?;
    let (dir, name) = split_final_name(raw);
    let opened = view.open(dir, OFlag::O_DIRECTORY)?;
    let file = view.open(raw, if follow { OFlag::empty() } else { OFlag::O_NOFOLLOW }).and_then(|f| file_id(&f, b""));
    Some((path_in(&opened, name)?, file))
}

/// The path of directory `dir` joined to `name`.
fn path_in(dir: &OwnedFd, name: Option<&[u8]>) -> Option<String> {
    let mut path = directory_path(dir)?;
    if let Some(name) = name {
        if path != b"/" {
            path.push(b'/');
        }
        path.extend_from_slice(name);
    }
    Some(text::lossless(&path))
}

/// `relative` (leading slashes ignored, "" for the base itself) opened
/// O_PATH with `flags` from where thread `tid` would start resolving a path
/// argument: its root for an absolute path (which then cannot climb out of
/// it), its working directory, or its directory descriptor `dirfd`.
fn open_in_view(tid: Pid, dirfd: i32, absolute: bool, relative: &[u8], flags: nix::fcntl::OFlag) -> Option<OwnedFd> {
    View::of(tid, dirfd, absolute)?.open(relative, flags)
}

/// Where thread `tid` starts resolving a path argument, as the tracer
/// holds it.
struct View {
    tid: Pid,
    base: OwnedFd,
    absolute: bool,
}

impl View {
    fn of(tid: Pid, dirfd: i32, absolute: bool) -> Option<View> {
        use nix::fcntl::OFlag;
        const AT_FDCWD: i32 = -100;
        let base = match (absolute, dirfd) {
            (true, _) => format!("/proc/{tid}/root"),
            (false, AT_FDCWD) => format!("/proc/{tid}/cwd"),
            (false, fd) => format!("/proc/{tid}/fd/{fd}"),
        };
        let directory = OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC;
        let base = nix::fcntl::open(base.as_str(), directory, nix::sys::stat::Mode::empty()).ok()?;
        Some(View { tid, base, absolute })
    }

    fn open(&self, relative: &[u8], flags: nix::fcntl::OFlag) -> Option<OwnedFd> {
        use nix::fcntl::{openat2, OFlag, OpenHow, ResolveFlag};
        let resolve = if self.absolute { ResolveFlag::RESOLVE_IN_ROOT } else { ResolveFlag::empty() };
        let relative = &relative[relative.iter().position(|&b| b != b'/').unwrap_or(relative.len())..];
        let own = if self.absolute { own_proc_links(self.tid, relative) } else { None };
        let relative = match own.as_deref().unwrap_or(relative) {
            b"" => std::ffi::OsStr::new("."),
            relative => std::ffi::OsStr::from_bytes(relative),
        };
        // The workload's /proc/self and /proc/PID/cwd would be the tracer's own
        // or another view: magic links are refused, and the caller falls back.
        let how = OpenHow::new()
            .flags(OFlag::O_PATH | OFlag::O_CLOEXEC | flags)
            .resolve(resolve | ResolveFlag::RESOLVE_NO_MAGICLINKS);
        openat2(&self.base, relative, how).ok()
    }
}

/// `proc/self` and `proc/thread-self` at the start of an absolute path, as
/// the thread has them: procfs answers them for whoever looks, here the
/// tracer (the workload is in the tracer's pid namespace).
fn own_proc_links(tid: Pid, path: &[u8]) -> Option<Vec<u8>> {
    let (link, rest) = [&b"proc/self"[..], b"proc/thread-self"].into_iter().find_map(|link| {
        let rest = path.strip_prefix(link)?;
        (rest.is_empty() || rest[0] == b'/').then_some((link, rest))
    })?;
    let tgid = status(tid)?.tgid?;
    let own = if link == b"proc/self" { format!("proc/{tgid}") } else { format!("proc/{tgid}/task/{tid}") };
    Some([own.as_bytes(), rest].concat())
}

/// The file an open(2) of path argument `raw` would open now: its final
/// symlink followed unless `follow` is false (O_NOFOLLOW). None when it
/// does not resolve from the tracer's side (it is gone, or its way goes
/// through a magic link).
pub fn opened_file(tid: Pid, dirfd: i32, raw: &[u8], follow: bool) -> Option<FileId> {
    use nix::fcntl::OFlag;
    let flags = if follow { OFlag::empty() } else { OFlag::O_NOFOLLOW };
    let opened = open_in_view(tid, dirfd, raw.first() == Some(&b'/'), raw, flags)?;
    file_id(&opened, b"")
}

/// The file descriptor `fd` of thread `tid` refers to now, and the kernel's
/// path for it, both from one reference to it: another thread sharing the
/// table cannot put a different file there between the two answers.
pub fn descriptor_file(tid: Pid, fd: i32) -> Option<(String, FileId)> {
    use nix::fcntl::OFlag;
    let flags = OFlag::O_PATH | OFlag::O_CLOEXEC;
    let file = nix::fcntl::open(format!("/proc/{tid}/fd/{fd}").as_str(), flags, nix::sys::stat::Mode::empty()).ok()?;
    let id = file_id(&file, b"")?;
    Some((own_fd_path(&file)?, id))
}

/// The kernel's path for a descriptor of the tracer's own.
pub fn own_fd_path(file: &impl AsFd) -> Option<String> {
    readlink(&own_link(file))
}

/// The /proc magic link of a descriptor of the tracer's own, which leads
/// to that very file (`/proc/self`: no getpid to name the process).
pub fn own_link(file: &impl AsFd) -> String {
    format!("/proc/self/fd/{}", file.as_fd().as_raw_fd())
}

/// Whether `tid` is a thread of the tracer's own process (the workload is
/// in the tracer's pid namespace).
pub fn is_own_thread(tid: Pid) -> bool {
    std::path::Path::new(&format!("/proc/self/task/{tid}")).exists()
}

/// The process a descriptor of thread `tid` can signal: a pidfd's (its
/// fdinfo's `Pid:`), or a /proc/PID directory's.
pub fn pidfd_process(tid: Pid, fd: i32) -> Option<i32> {
    let (info, _) = read_bounded(&format!("/proc/{tid}/fdinfo/{fd}"), PAGE)?;
    let info = String::from_utf8_lossy(&info);
    if let Some(line) = info.lines().find_map(|l| l.strip_prefix("Pid:")) {
        return line.trim().parse().ok();
    }
    fd_path(tid, fd)?.strip_prefix("/proc/")?.parse().ok()
}

/// The open flags the kernel keeps for descriptor `fd` of thread `tid`
/// (fdinfo's `flags:`, in octal: the open file's flags, O_CLOEXEC the
/// descriptor's).
pub fn fd_flags(tid: Pid, fd: i32) -> Option<i32> {
    let (info, _) = read_bounded(&format!("/proc/{tid}/fdinfo/{fd}"), PAGE)?;
    let info = String::from_utf8_lossy(&info);
    let flags = info.lines().find_map(|l| l.strip_prefix("flags:"))?;
    i32::from_str_radix(flags.trim(), 8).ok()
}

/// The file a descriptor of thread `tid` refers to.
pub fn fd_file(tid: Pid, fd: i32) -> Option<FileId> {
    statx(libc::AT_FDCWD, format!("/proc/{tid}/fd/{fd}").as_bytes(), libc::AT_NO_AUTOMOUNT)
}

/// The file `name` names in `dir` (`dir` itself for an empty name), its
/// final symlink not followed.
pub fn file_id(dir: &OwnedFd, name: &[u8]) -> Option<FileId> {
    statx(dir.as_raw_fd(), name, libc::AT_SYMLINK_NOFOLLOW | libc::AT_EMPTY_PATH | libc::AT_NO_AUTOMOUNT)
}

fn statx(dir: i32, name: &[u8], flags: i32) -> Option<FileId> {
    const STATX_MNT_ID_UNIQUE: u32 = 0x4000;
    let name = std::ffi::CString::new(name).ok()?;
    let stx = raw_statx(dir, &name, flags, libc::STATX_BASIC_STATS | STATX_MNT_ID_UNIQUE)?;
    if stx.stx_mask & libc::STATX_INO == 0 {
        return None;
    }
    let unique = (stx.stx_mask & STATX_MNT_ID_UNIQUE != 0).then_some(stx.stx_mnt_id);
    // The kernel fills one mount id or the other. The one mountinfo shows is
    // asked apart, once per mount (Linux 6.8+, whose unique ids are never
    // reused), and taken only when the file and its mount were the same on
    // both sides of it.
    let same_file = |other: &libc::statx| {
        (other.stx_ino, other.stx_dev_major, other.stx_dev_minor) == (stx.stx_ino, stx.stx_dev_major, stx.stx_dev_minor)
    };
    let ask_mount_id = || {
        let other = raw_statx(dir, &name, flags, libc::STATX_INO | libc::STATX_MNT_ID)?;
        let mount_id = (other.stx_mask & libc::STATX_MNT_ID != 0 && same_file(&other)).then_some(other.stx_mnt_id)?;
        match unique {
            Some(unique) => raw_statx(dir, &name, flags, libc::STATX_INO | STATX_MNT_ID_UNIQUE)
                .filter(|again| same_file(again) && again.stx_mnt_id == unique)
                .map(|_| mount_id),
            None => Some(mount_id),
        }
    };
    let mount_id = match unique {
        Some(unique) => OLD_MOUNT_IDS.with_borrow_mut(|known| match known.get(&unique) {
            Some(&id) => Some(id),
            None => {
                let id = ask_mount_id()?;
                if known.len() == MOUNTS_KNOWN_MAX {
                    known.clear();
                }
                known.insert(unique, id);
                Some(id)
            }
        }),
        None => ask_mount_id(),
    };
    const STAT: u32 = libc::STATX_TYPE | libc::STATX_MODE | libc::STATX_UID | libc::STATX_GID | libc::STATX_SIZE;
    let time = |t: libc::statx_timestamp, bit: u32| {
        (stx.stx_mask & bit != 0).then(|| t.tv_sec.checked_mul(1_000_000_000)?.checked_add(i64::from(t.tv_nsec)))?
    };
    let stat = (stx.stx_mask & STAT == STAT).then(|| FileStat {
        mode: u32::from(stx.stx_mode),
        uid: stx.stx_uid,
        gid: stx.stx_gid,
        size: stx.stx_size,
        mtime: time(stx.stx_mtime, libc::STATX_MTIME),
        ctime: time(stx.stx_ctime, libc::STATX_CTIME),
    });
    Some(FileId {
        device: libc::makedev(stx.stx_dev_major, stx.stx_dev_minor),
        inode: stx.stx_ino,
        mount_id,
        unique_mount_id: unique,
        stat,
    })
}

/// Mounts whose ids are remembered; past this the memory starts over.
const MOUNTS_KNOWN_MAX: usize = 4096;

thread_local! {
    /// The id mountinfo shows of each mount met, by its unique id: a mount's
    /// ids never change, so one statx per file is enough once it is known.
    static OLD_MOUNT_IDS: std::cell::RefCell<std::collections::HashMap<u64, u64>> = Default::default();
}

fn raw_statx(dir: i32, name: &std::ffi::CStr, flags: i32, mask: u32) -> Option<libc::statx> {
    // SAFETY: statx is plain data; all zeroes is a valid value.
    let mut stx: libc::statx = unsafe { std::mem::zeroed() };
    // SAFETY: `name` is a NUL-terminated string and `stx` is valid for writes of its size.
    let rc = unsafe { libc::statx(dir, name.as_ptr(), flags, mask, &mut stx) };
    (rc == 0).then_some(stx)
}

/// A thread's root directory, on its mount.
pub fn root_file(tid: Pid) -> Option<FileId> {
    statx(libc::AT_FDCWD, format!("/proc/{tid}/root").as_bytes(), libc::AT_NO_AUTOMOUNT)
}

/// Thread `tid`'s file size limit (RLIMIT_FSIZE, soft; u64::MAX for
/// unlimited), as /proc/TID/limits gives it to anyone: prlimit(2) on
/// another process needs CAP_SYS_RESOURCE, which the tracer may not have.
pub fn file_size_limit(tid: Pid) -> Option<u64> {
    let (text, _) = read_bounded(&format!("/proc/{tid}/limits"), PAGE)?;
    let text = std::str::from_utf8(&text).ok()?;
    let soft = text.lines().find_map(|line| line.strip_prefix("Max file size"))?.split_whitespace().next()?;
    match soft {
        "unlimited" => Some(u64::MAX),
        bytes => bytes.parse().ok(),
    }
}

/// The program a process runs now (after an exec: the file the kernel ran).
pub fn exe_file(pid: Pid) -> Option<FileId> {
    statx(libc::AT_FDCWD, format!("/proc/{pid}/exe").as_bytes(), libc::AT_NO_AUTOMOUNT)
}

/// Most entries a directory may have for the tracer to look a name up in
/// it, and most levels it climbs, when a path is longer than the kernel
/// will name (PATH_MAX): the workload makes the tree.
const NAME_SCAN_MAX: usize = 1 << 16;
const CLIMB_MAX: usize = 1 << 12;

/// The path of an open directory. The kernel names it up to PATH_MAX; a
/// deeper one is built by climbing `..` until the kernel can name an
/// ancestor, looking each directory's name up in its parent by inode.
fn directory_path(dir: &OwnedFd) -> Option<Vec<u8>> {
    use nix::fcntl::{openat, OFlag};
    use nix::sys::stat::{fstat, Mode};
    let mut names: Vec<Vec<u8>> = Vec::new();
    let mut ancestor: Option<OwnedFd> = None;
    loop {
        let current = ancestor.as_ref().unwrap_or(dir);
        match std::fs::read_link(own_link(&current)) {
            Ok(known) => {
                let mut path = known.into_os_string().into_vec();
                for name in names.iter().rev() {
                    if path != b"/" {
                        path.push(b'/');
                    }
                    path.extend_from_slice(name);
                }
                return Some(path);
            }
            Err(e) if e.raw_os_error() == Some(libc::ENAMETOOLONG) && names.len() < CLIMB_MAX => {}
            Err(_) => return None,
        }
        let own = fstat(current).ok()?;
        let parent =
            openat(current, "..", OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC, Mode::empty()).ok()?;
        let entries = std::fs::read_dir(own_link(&parent)).ok()?;
        let name = entries.take(NAME_SCAN_MAX).filter_map(Result::ok).find(|e| e.ino() == own.st_ino)?;
        names.push(name.file_name().into_vec());
        ancestor = Some(parent);
    }
}

/// The path of a directory the tracer holds open, also deeper than the
/// kernel names (PATH_MAX).
pub fn directory_name(dir: &OwnedFd) -> Option<String> {
    Some(text::lossless(&directory_path(dir)?))
}

/// (directory part, final name): the name is None when the path ends in a
/// directory (`/`, `.`, `..`), which then resolves whole. Trailing slashes
/// name the same file (`mkdir("new/")`).
fn split_final_name(raw: &[u8]) -> (&[u8], Option<&[u8]>) {
    let end = raw.iter().rposition(|&b| b != b'/').map_or(raw.len().min(1), |last| last + 1);
    let raw = &raw[..end];
    let (dir, name) = match raw.iter().rposition(|&b| b == b'/') {
        Some(slash) => (&raw[..=slash], &raw[slash + 1..]),
        None => (&b""[..], raw),
    };
    match name {
        b"" | b"." | b".." => (raw, None),
        name => (dir, Some(name)),
    }
}

/// The thread's working directory, also deeper than PATH_MAX. The link
/// names it as a path resolved to it would (the same d_path) in one
/// syscall; only a directory deeper than the kernel names is climbed to.
pub fn cwd(tid: Pid) -> Option<String> {
    match std::fs::read_link(format!("/proc/{tid}/cwd")) {
        Ok(path) => Some(text::lossless_os(path.as_os_str())),
        Err(e) if e.raw_os_error() == Some(libc::ENAMETOOLONG) => resolve_path(tid, -100, b"."),
        Err(_) => None,
    }
}

pub fn root(tid: Pid) -> Option<String> {
    readlink(&format!("/proc/{tid}/root"))
}

pub fn exe(pid: Pid) -> Option<String> {
    readlink(&format!("/proc/{pid}/exe"))
}

/// Up to `max` bytes of a /proc file; the flag says whether there was more.
pub fn read_bounded(path: &str, max: usize) -> Option<(Vec<u8>, bool)> {
    // /proc files report a size of 0: without room to start with, the read
    // would grow from a few bytes, one syscall per doubling, while a tracee
    // waits. Most of these files fit in one page.
    let mut buf = Vec::with_capacity(max.min(PAGE) + 1);
    let read = File::open(path).ok()?.take(max as u64 + 1).read_to_end(&mut buf).ok()?;
    let cut = read > max;
    buf.truncate(max);
    Some((buf, cut))
}

/// Up to `max` bytes of a /proc file the kernel writes as one record
/// (seq_file's single_open: status, stat): each read copies as much of the
/// whole text as it has room for, so a read that leaves room was the last,
/// and the one more read that would say so is not made. The flag says
/// whether there was more than `max`.
pub fn read_record(path: &str, max: usize) -> Option<(Vec<u8>, bool)> {
    let mut file = File::open(path).ok()?;
    let mut buf = vec![0; max.min(PAGE) + 1];
    let mut len = 0;
    loop {
        let read = match file.read(&mut buf[len..]) {
            Ok(read) => read,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => return None,
        };
        len += read;
        if read == 0 || len < buf.len() || len > max {
            break;
        }
        buf.resize((2 * len).min(max + 1), 0);
    }
    let cut = len > max;
    buf.truncate(len.min(max));
    Some((buf, cut))
}

/// Fields of /proc/TID/status we use.
#[derive(Default)]
pub struct Status {
    pub tgid: Option<i32>,
    pub ppid: Option<i32>,
    pub credentials: Credentials,
    /// The file-creation mask (Linux 4.7+).
    pub umask: Option<u32>,
    /// Signals with a handler (SigCgt; bit N-1 for signal N).
    pub caught: Option<u64>,
}

/// Parsed as bytes: the `Name:` line is the process name, which the
/// workload sets (prctl(PR_SET_NAME)) to any bytes, valid UTF-8 or not; it
/// must not hide the lines that follow it.
pub fn status(tid: Pid) -> Option<Status> {
    // The Groups line, before the capability lines, can list NGROUPS_MAX
    // (65536) ids of up to 10 digits: a bound below that would let a
    // workload push its capabilities out of reach. Usually one page is read.
    let (bytes, _) = read_record(&format!("/proc/{tid}/status"), 256 * PAGE)?;
    Some(parse_status(&bytes))
}

fn parse_status(bytes: &[u8]) -> Status {
    let mut status = Status::default();
    for line in bytes.split(|&b| b == b'\n') {
        let Some(colon) = line.iter().position(|&b| b == b':') else { continue };
        // The fields read here are ASCII numbers; other lines are skipped unread.
        let (key, value) = (&line[..colon], std::str::from_utf8(&line[colon + 1..]).unwrap_or(""));
        let mut numbers = value.split_whitespace().map(|v| v.parse::<u32>().ok());
        let mask = || u64::from_str_radix(value.trim(), 16).ok();
        let c = &mut status.credentials;
        match key {
            b"Umask" => status.umask = u32::from_str_radix(value.trim(), 8).ok(),
            b"Tgid" => status.tgid = numbers.next().flatten().map(|v| v as i32),
            b"PPid" => status.ppid = numbers.next().flatten().map(|v| v as i32),
            // Real, effective, saved, filesystem.
            b"Uid" => [c.uid, c.euid, c.suid, c.fsuid] = std::array::from_fn(|_| numbers.next().flatten()),
            b"Gid" => [c.gid, c.egid, c.sgid, c.fsgid] = std::array::from_fn(|_| numbers.next().flatten()),
            b"Groups" => c.groups = value.split_whitespace().filter_map(|v| v.parse().ok()).collect(),
            b"CapInh" => c.cap_inheritable = mask(),
            b"CapPrm" => c.cap_permitted = mask(),
            b"CapEff" => c.cap_effective = mask(),
            b"SigCgt" => status.caught = mask(),
            _ => {}
        }
    }
    status
}

/// A duplicate of a tracee's descriptor (pidfd_getfd, Linux 5.6+), to ask
/// the socket itself what it is. The thread's own table when the kernel can
/// name a thread (PIDFD_THREAD, 6.9+), else its process's: threads share
/// their table in practice.
pub fn descriptor_copy(tid: Pid, tgid: Pid, fd: i32) -> Option<OwnedFd> {
    let pidfd = if tid == tgid { pidfd_open(tid, 0) } else { thread_pidfd(tid).or_else(|_| pidfd_open(tgid, 0)) };
    descriptor_from(&pidfd.ok()?, fd).ok()
}

/// A duplicate of the descriptor `fd` of thread `tid`, from its own table
/// only: for a thread other than its process's first on a kernel that
/// cannot name a thread (before 6.9), an error (ENOSYS), as its table may
/// be its own. EBADF: no such descriptor.
pub fn thread_descriptor_copy(tid: Pid, tgid: Pid, fd: i32) -> nix::Result<OwnedFd> {
    let pidfd = if tid == tgid { pidfd_open(tid, 0) } else { thread_pidfd(tid).map_err(|_| Errno::ENOSYS) }?;
    descriptor_from(&pidfd, fd)
}

fn thread_pidfd(tid: Pid) -> nix::Result<OwnedFd> {
    const PIDFD_THREAD: libc::c_long = libc::O_EXCL as libc::c_long;
    pidfd_open(tid, PIDFD_THREAD)
}

fn pidfd_open(pid: Pid, flags: libc::c_long) -> nix::Result<OwnedFd> {
    // SAFETY: pidfd_open takes integers and returns a new descriptor or -1.
    let pidfd = Errno::result(unsafe { libc::syscall(libc::SYS_pidfd_open, pid.as_raw(), flags) })?;
    // SAFETY: a descriptor pidfd_open just returned, owned by no one else.
    Ok(unsafe { OwnedFd::from_raw_fd(pidfd as i32) })
}

fn descriptor_from(pidfd: &OwnedFd, fd: i32) -> nix::Result<OwnedFd> {
    // SAFETY: pidfd_getfd takes integers and returns a new descriptor or -1.
    let copy = Errno::result(unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd.as_raw_fd(), fd, 0) })?;
    // SAFETY: a descriptor pidfd_getfd just returned, owned by no one else.
    Ok(unsafe { OwnedFd::from_raw_fd(copy as i32) })
}

/// An int SOL_SOCKET option of a socket.
fn socket_option(socket: &OwnedFd, name: libc::c_int) -> Option<i32> {
    let mut value: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: value and len are valid for writes of their sizes.
    let rc = unsafe {
        libc::getsockopt(socket.as_raw_fd(), libc::SOL_SOCKET, name, (&mut value as *mut libc::c_int).cast(), &mut len)
    };
    (rc == 0).then_some(value)
}

/// (type, protocol) of a socket.
pub fn socket_kind(socket: &OwnedFd) -> Option<(i32, i32)> {
    Some((socket_option(socket, libc::SO_TYPE)?, socket_option(socket, libc::SO_PROTOCOL)?))
}

/// The AF_* family of a socket.
pub fn socket_family(socket: &OwnedFd) -> Option<i32> {
    socket_option(socket, libc::SO_DOMAIN)
}

/// The classic BPF program attached to a socket, as it was passed
/// (SO_GET_FILTER: the kernel keeps the original instructions); None when
/// it has none, or an eBPF one.
pub fn socket_filter(socket: &OwnedFd) -> Option<Vec<u8>> {
    /// SO_GET_FILTER is SO_ATTACH_FILTER's number.
    const SO_GET_FILTER: libc::c_int = libc::SO_ATTACH_FILTER;
    // With a zero length the kernel answers the instruction count; the
    // length given and answered counts instructions, not bytes.
    let mut count: libc::socklen_t = 0;
    // SAFETY: a zero length asks for no buffer; count is valid for writes.
    let rc = unsafe {
        libc::getsockopt(socket.as_raw_fd(), libc::SOL_SOCKET, SO_GET_FILTER, std::ptr::null_mut(), &mut count)
    };
    if rc != 0 || count == 0 || count > 4096 {
        return None;
    }
    let mut program = vec![0u8; count as usize * 8];
    let mut len = count;
    // SAFETY: program holds `count` instructions of 8 bytes, the length given.
    let rc = unsafe {
        libc::getsockopt(socket.as_raw_fd(), libc::SOL_SOCKET, SO_GET_FILTER, program.as_mut_ptr().cast(), &mut len)
    };
    (rc == 0 && len == count).then_some(program)
}

/// The process a pidfd refers to, from its fdinfo (`Pid:`, Linux 5.10+;
/// -1 once the process is gone); None when the descriptor is no pidfd.
pub fn pidfd_target(tid: Pid, fd: i32) -> Option<i32> {
    let info = std::fs::read_to_string(format!("/proc/{tid}/fdinfo/{fd}")).ok()?;
    info.lines().find_map(|l| l.strip_prefix("Pid:")).and_then(|pid| pid.trim().parse().ok())
}

/// Which end of a socket: its own address, or its peer's.
#[derive(Clone, Copy)]
pub enum End {
    Local,
    Peer,
}

/// The raw sockaddr of one end of a socket (getsockname, getpeername).
pub fn socket_address(socket: &OwnedFd, end: End) -> Option<Vec<u8>> {
    // SAFETY: sockaddr_storage is plain data; all zeroes is a valid value.
    let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    let address = (&mut storage as *mut libc::sockaddr_storage).cast();
    // SAFETY: address and len describe `storage`, valid for writes of its size.
    let rc = unsafe {
        match end {
            End::Local => libc::getsockname(socket.as_raw_fd(), address, &mut len),
            End::Peer => libc::getpeername(socket.as_raw_fd(), address, &mut len),
        }
    };
    if rc != 0 {
        return None;
    }
    // A longer address is cut to the storage by the kernel, which still says its full length.
    let len = (len as usize).min(std::mem::size_of::<libc::sockaddr_storage>());
    // SAFETY: the kernel wrote `len` bytes, within the storage, into it.
    let bytes = unsafe { std::slice::from_raw_parts((&storage as *const libc::sockaddr_storage).cast::<u8>(), len) };
    Some(bytes.to_vec())
}

/// The tracer's own peak resident set (VmHWM), for `--stats`.
pub fn peak_rss_kib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// (device, inode, mount id) of `name` in `dir` (`dir` itself for an empty
/// name), from what the kernel has cached (AT_STATX_DONT_SYNC): asking a
/// FUSE or network filesystem's server would let it hold the tracer.
pub fn cached_identity(dir: i32, name: &std::ffi::CStr) -> Option<(u64, u64, u64)> {
    let flags = libc::AT_EMPTY_PATH | libc::AT_NO_AUTOMOUNT | libc::AT_STATX_DONT_SYNC;
    let stx = raw_statx(dir, name, flags, libc::STATX_INO | libc::STATX_MNT_ID)?;
    let wanted = libc::STATX_INO | libc::STATX_MNT_ID;
    (stx.stx_mask & wanted == wanted)
        .then(|| (libc::makedev(stx.stx_dev_major, stx.stx_dev_minor), stx.stx_ino, stx.stx_mnt_id))
}

/// An O_PATH descriptor of `path`, followed to the end (a /proc magic link
/// leads to the file it names).
pub fn open_path(path: &std::ffi::CStr) -> Option<OwnedFd> {
    // SAFETY: `path` is NUL-terminated; openat returns a new descriptor or -1.
    let fd = unsafe { libc::openat(libc::AT_FDCWD, path.as_ptr(), libc::O_PATH | libc::O_CLOEXEC) };
    // SAFETY: a descriptor openat just returned, owned by no one else.
    (fd >= 0).then(|| unsafe { OwnedFd::from_raw_fd(fd) })
}

/// openat2(2) from `dir` with `resolve`'s limits on the walk (Linux 5.6+).
pub fn open_beneath(dir: &OwnedFd, path: &std::ffi::CStr, flags: i32, mode: u32, resolve: u64) -> nix::Result<OwnedFd> {
    // SAFETY: open_how is plain data; zero is valid for every field.
    let mut how: libc::open_how = unsafe { std::mem::zeroed() };
    how.flags = flags as u64;
    how.mode = u64::from(mode);
    how.resolve = resolve;
    let size = std::mem::size_of::<libc::open_how>();
    // SAFETY: `path` is NUL-terminated and `how` is an open_how of `size` bytes.
    let fd = unsafe {
        libc::syscall(libc::SYS_openat2, dir.as_raw_fd(), path.as_ptr(), &how as *const libc::open_how, size)
    };
    let fd = nix::errno::Errno::result(fd)?;
    // SAFETY: a descriptor openat2 just returned, owned by no one else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Opens again, with `flags`, the file an O_PATH descriptor of the
/// tracer's refers to (through its /proc magic link): the kernel checks
/// the open's permissions on that very file.
pub fn reopen(file: &OwnedFd, flags: i32) -> nix::Result<OwnedFd> {
    let path = std::ffi::CString::new(own_link(file)).expect("no NUL in a number");
    // SAFETY: `path` is NUL-terminated; open returns a new descriptor or -1.
    let fd = nix::errno::Errno::result(unsafe { libc::open(path.as_ptr(), flags) })?;
    // SAFETY: a descriptor open just returned, owned by no one else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Sets an open file description's status flags (F_SETFL: of `flags`, the
/// kernel takes O_APPEND, O_ASYNC, O_DIRECT, O_NOATIME and O_NONBLOCK).
pub fn set_status_flags(file: &OwnedFd, flags: i32) -> nix::Result<()> {
    // SAFETY: F_SETFL takes and returns integers.
    nix::errno::Errno::result(unsafe { libc::fcntl(file.as_raw_fd(), libc::F_SETFL, flags) }).map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_size_limit_is_the_one_the_kernel_applies() {
        use nix::sys::resource::{getrlimit, Resource};
        let (soft, _) = getrlimit(Resource::RLIMIT_FSIZE).unwrap();
        assert_eq!(file_size_limit(Pid::this()), Some(soft));
    }

    #[test]
    fn paths_split_at_their_final_name_unless_it_names_a_directory() {
        assert_eq!(split_final_name(b"a/b/c"), (&b"a/b/"[..], Some(&b"c"[..])));
        assert_eq!(split_final_name(b"/c"), (&b"/"[..], Some(&b"c"[..])));
        assert_eq!(split_final_name(b"c"), (&b""[..], Some(&b"c"[..])));
        assert_eq!(split_final_name(b"a/.."), (&b"a/.."[..], None));
        assert_eq!(split_final_name(b"a/b//"), (&b"a/"[..], Some(&b"b"[..])));
        assert_eq!(split_final_name(b"//"), (&b"/"[..], None));
    }

    #[test]
    fn paths_resolve_through_symlinks_before_dot_dot() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().canonicalize().unwrap();
        std::fs::create_dir_all(base.join("real/sub")).unwrap();
        std::os::unix::fs::symlink(base.join("real/sub"), base.join("link")).unwrap();
        let raw = format!("{}/link/../victim", base.display());
        let expected = format!("{}/real/victim", base.display());
        assert_eq!(resolve_path(Pid::this(), -100, raw.as_bytes()), Some(expected));
        assert_eq!(resolve_path(Pid::this(), -100, b"/nonexistent-dir/x"), None);
    }

    #[test]
    fn proc_self_is_the_thread_s_own_not_the_tracer_s() {
        let me = Pid::this();
        let thread = nix::unistd::gettid();
        assert_eq!(own_proc_links(thread, b"proc/self/status"), Some(format!("proc/{me}/status").into_bytes()));
        assert_eq!(own_proc_links(thread, b"proc/thread-self"), Some(format!("proc/{me}/task/{thread}").into_bytes()));
        assert_eq!(own_proc_links(thread, b"proc/selfish"), None);
        assert_eq!(own_proc_links(thread, b"etc/passwd"), None);
    }

    #[test]
    fn a_record_is_read_whole_or_cut_at_its_bound() {
        // As root, this thread alone gets 3000 supplementary groups (raw
        // setgroups: glibc's would set every thread's), so that its status
        // is longer than a first read's room and the reads go on.
        let own = nix::unistd::getgroups().unwrap();
        let many: Vec<libc::gid_t> = (1..=3000).collect();
        let set = |groups: &[libc::gid_t]| {
            // SAFETY: setgroups reads `groups.len()` ids from a live slice.
            unsafe { libc::syscall(libc::SYS_setgroups, groups.len(), groups.as_ptr()) == 0 }
        };
        let long = nix::unistd::geteuid().is_root() && set(&many);
        // Counters in both change from one read to the next: their ends and
        // beginnings do not.
        let (status, cut) = read_record("/proc/thread-self/status", 256 * PAGE).unwrap();
        let last = b"nonvoluntary_ctxt_switches:";
        let last_line = status[..status.len() - 1].rsplit(|&b| b == b'\n').next().unwrap();
        assert!(!cut && last_line.starts_with(last), "{}", String::from_utf8_lossy(&status));
        if long {
            assert!(status.len() > 2 * PAGE);
            assert_eq!(parse_status(&status).credentials.groups, many);
            let own: Vec<libc::gid_t> = own.iter().map(|g| g.as_raw()).collect();
            assert!(set(&own));
        }
        let (stat, cut) = read_record("/proc/thread-self/stat", 1024).unwrap();
        assert!(!cut && stat.ends_with(b"\n"), "{}", String::from_utf8_lossy(&stat));
        let (start, cut) = read_record("/proc/thread-self/status", 10).unwrap();
        assert_eq!((start.len(), &start[..6], cut), (10, &b"Name:\t"[..], true));
    }

    #[test]
    fn status_parses_past_a_name_that_is_not_utf8() {
        let text = b"Name:\t\xff\xfe:x\nUmask:\t0022\nTgid:\t12\nPid:\t13\nPPid:\t7\n\
            Uid:\t1\t2\t3\t4\nGid:\t5\t6\t7\t8\nGroups:\t10 4294967294 \nSigCgt:\t0000000000000202\nCapEff:\t0000000000000080\n";
        let status = parse_status(text);
        assert_eq!((status.tgid, status.ppid, status.caught), (Some(12), Some(7), Some(0x202)));
        assert_eq!(status.umask, Some(0o22));
        let c = status.credentials;
        assert_eq!([c.uid, c.euid, c.suid, c.fsuid], [Some(1), Some(2), Some(3), Some(4)]);
        assert_eq!([c.gid, c.egid, c.sgid, c.fsgid], [Some(5), Some(6), Some(7), Some(8)]);
        assert_eq!(c.cap_effective, Some(0x80));
        assert_eq!(c.groups, [10, 4_294_967_294]);
    }
}
