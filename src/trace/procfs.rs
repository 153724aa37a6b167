//! The few /proc reads the tracer needs, parsed by hand: they run while a
//! tracee is stopped, so they avoid the allocations of a general parser.

use std::fs::File;
use std::io::Read;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use nix::unistd::Pid;

use crate::proto::Credentials;

const PAGE: usize = 4096;

fn readlink(path: &str) -> Option<String> {
    std::fs::read_link(path).ok().map(|p| p.to_string_lossy().into_owned())
}

/// The kernel's path for an open descriptor ("socket:[…]" and the like for
/// non-files).
pub fn fd_path(tid: Pid, fd: i32) -> Option<String> {
    readlink(&format!("/proc/{tid}/fd/{fd}"))
}

pub fn cwd(tid: Pid) -> Option<String> {
    readlink(&format!("/proc/{tid}/cwd"))
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

/// Fields of /proc/TID/status we use.
#[derive(Default)]
pub struct Status {
    pub tgid: Option<i32>,
    pub ppid: Option<i32>,
    pub credentials: Credentials,
}

pub fn status(tid: Pid) -> Option<Status> {
    let (bytes, _) = read_bounded(&format!("/proc/{tid}/status"), 4 * PAGE)?;
    let text = String::from_utf8(bytes).ok()?;
    let mut status = Status::default();
    for line in text.lines() {
        let Some((key, value)) = line.split_once(':') else { continue };
        let mut numbers = value.split_whitespace().map(|v| v.parse::<u32>().ok());
        let mask = || u64::from_str_radix(value.trim(), 16).ok();
        let c = &mut status.credentials;
        match key {
            "Tgid" => status.tgid = numbers.next().flatten().map(|v| v as i32),
            "PPid" => status.ppid = numbers.next().flatten().map(|v| v as i32),
            // Real, effective, saved, filesystem.
            "Uid" => [c.uid, c.euid, c.suid, c.fsuid] = std::array::from_fn(|_| numbers.next().flatten()),
            "Gid" => [c.gid, c.egid, c.sgid, c.fsgid] = std::array::from_fn(|_| numbers.next().flatten()),
            "CapInh" => c.cap_inheritable = mask(),
            "CapPrm" => c.cap_permitted = mask(),
            "CapEff" => c.cap_effective = mask(),
            _ => {}
        }
    }
    Some(status)
}

/// (type, protocol) of a socket descriptor, asked of the socket itself
/// through a pidfd duplicate (Linux 5.6+).
pub fn socket_kind(pid: Pid, fd: i32) -> Option<(i32, i32)> {
    // SAFETY: pidfd_open and pidfd_getfd take integers and return a new
    // descriptor or -1; every descriptor is wrapped in an OwnedFd at once.
    let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid.as_raw(), 0) };
    if pidfd < 0 {
        return None;
    }
    // SAFETY: pidfd is a fresh descriptor we own.
    let pidfd = unsafe { OwnedFd::from_raw_fd(pidfd as i32) };
    // SAFETY: as above.
    let copy = unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd.as_raw_fd(), fd, 0) };
    if copy < 0 {
        return None;
    }
    // SAFETY: copy is a fresh descriptor we own.
    let copy = unsafe { OwnedFd::from_raw_fd(copy as i32) };
    let option = |name| {
        let mut value: libc::c_int = 0;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: value and len are valid for writes of their sizes.
        let rc = unsafe {
            libc::getsockopt(
                copy.as_raw_fd(),
                libc::SOL_SOCKET,
                name,
                (&mut value as *mut libc::c_int).cast(),
                &mut len,
            )
        };
        (rc == 0).then_some(value)
    };
    Some((option(libc::SO_TYPE)?, option(libc::SO_PROTOCOL)?))
}

/// The tracer's own peak resident set (VmHWM), for `--stats`.
pub fn peak_rss_kib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Whether two tasks share their filesystem context (working directory),
/// asked of the kernel (kcmp(2)); None when it cannot say.
pub fn shares_fs(a: Pid, b: Pid) -> Option<bool> {
    const KCMP_FS: i32 = 3;
    // SAFETY: kcmp takes integers only.
    let rc = unsafe { libc::syscall(libc::SYS_kcmp, a.as_raw(), b.as_raw(), KCMP_FS, 0, 0) };
    (rc >= 0).then_some(rc == 0)
}
