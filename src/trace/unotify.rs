//! The seccomp user-notification listener's requests (seccomp_unotify(2)):
//! receiving a notification, checking it is still live, answering it with
//! a return value, an error or a descriptor the tracer opened.
//!
//! `unsafe` here is the listener's ioctls, each on structs of plain data.

use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};

use nix::errno::Errno;
use nix::unistd::Pid;

/// A call the filter held for the tracer: the thread waits, inside the
/// call, until it is answered.
#[derive(Clone, Copy, Debug)]
pub struct Notification {
    /// The kernel's cookie for this call; stale once the thread is gone or
    /// a signal has interrupted its wait.
    pub id: u64,
    /// The calling thread, in the tracer's pid namespace.
    pub tid: Pid,
    pub nr: i32,
    pub arch: u32,
    pub args: [u64; 6],
}

/// Takes the next notification; EAGAIN-like errors (none pending, one
/// whose thread died since) come back as errors for the caller to skip.
pub fn receive(listener: &OwnedFd) -> nix::Result<Notification> {
    // SAFETY: seccomp_notif is plain data; the kernel wants it zeroed.
    let mut notif: libc::seccomp_notif = unsafe { std::mem::zeroed() };
    // SAFETY: NOTIF_RECV writes one seccomp_notif into `notif`, which is valid for writes of its size.
    let rc = unsafe { libc::ioctl(listener.as_raw_fd(), libc::SECCOMP_IOCTL_NOTIF_RECV, &mut notif) };
    Errno::result(rc)?;
    Ok(Notification {
        id: notif.id,
        tid: Pid::from_raw(notif.pid as i32),
        nr: notif.data.nr,
        arch: notif.data.arch,
        args: notif.data.args,
    })
}

/// Whether the notification's thread still waits for this answer: after it
/// has been read from, the thread's memory is known to be that thread's
/// (its id cannot have been reused by another process meanwhile).
pub fn still_waiting(listener: &OwnedFd, id: u64) -> bool {
    // SAFETY: NOTIF_ID_VALID reads the u64 it is pointed at.
    let rc = unsafe { libc::ioctl(listener.as_raw_fd(), libc::SECCOMP_IOCTL_NOTIF_ID_VALID, &id) };
    rc == 0
}

/// The call returns `retval` (a negated errno: fails with it); the thread
/// never runs it.
pub fn answer_return(listener: &OwnedFd, id: u64, retval: i64) -> nix::Result<()> {
    let (val, error) = if retval < 0 { (0, retval as i32) } else { (retval, 0) };
    let response = libc::seccomp_notif_resp { id, val, error, flags: 0 };
    // SAFETY: NOTIF_SEND reads one seccomp_notif_resp, which `response` is.
    let rc = unsafe { libc::ioctl(listener.as_raw_fd(), libc::SECCOMP_IOCTL_NOTIF_SEND, &response) };
    Errno::result(rc).map(drop)
}

/// The call returns a new descriptor of the thread's that refers to
/// `file`, as if the thread had opened it (SECCOMP_ADDFD_FLAG_SEND, Linux
/// 5.14: installing and answering are one step, so a thread interrupted
/// meanwhile gets neither). Returns the descriptor's number.
pub fn answer_descriptor(listener: &OwnedFd, id: u64, file: BorrowedFd<'_>, cloexec: bool) -> nix::Result<i32> {
    let addfd = libc::seccomp_notif_addfd {
        id,
        flags: libc::SECCOMP_ADDFD_FLAG_SEND as u32,
        srcfd: file.as_raw_fd() as u32,
        newfd: 0,
        newfd_flags: if cloexec { libc::O_CLOEXEC as u32 } else { 0 },
    };
    // SAFETY: NOTIF_ADDFD reads one seccomp_notif_addfd, which `addfd` is.
    let rc = unsafe { libc::ioctl(listener.as_raw_fd(), libc::SECCOMP_IOCTL_NOTIF_ADDFD, &addfd) };
    Errno::result(rc)
}

/// The call runs as the kernel has it (SECCOMP_USER_NOTIF_FLAG_CONTINUE).
pub fn answer_continue(listener: &OwnedFd, id: u64) -> nix::Result<()> {
    let response =
        libc::seccomp_notif_resp { id, val: 0, error: 0, flags: libc::SECCOMP_USER_NOTIF_FLAG_CONTINUE as u32 };
    // SAFETY: NOTIF_SEND reads one seccomp_notif_resp, which `response` is.
    let rc = unsafe { libc::ioctl(listener.as_raw_fd(), libc::SECCOMP_IOCTL_NOTIF_SEND, &response) };
    Errno::result(rc).map(drop)
}

/// Asks the kernel to wake the tracer on the notifying thread's CPU, and
/// the thread on the tracer's when answered (SECCOMP_USER_NOTIF_FD_SYNC_WAKE_UP,
/// Linux 6.6): the two then hand the CPU to each other as at a ptrace stop,
/// instead of each waking the other's idle CPU, which costs tens of
/// microseconds in a VM. Older kernels refuse it; nothing else changes.
pub fn wake_on_one_cpu(listener: &OwnedFd) -> nix::Result<()> {
    const SYNC_WAKE_UP: libc::c_ulong = 1;
    // SAFETY: NOTIF_SET_FLAGS reads no memory: despite its _IOW(.., __u64)
    // number, the kernel takes the flags as the argument's value
    // (`seccomp_notify_set_flags(filter, arg)`); a pointer to them is
    // refused with EINVAL.
    let rc = unsafe { libc::ioctl(listener.as_raw_fd(), libc::SECCOMP_IOCTL_NOTIF_SET_FLAGS, SYNC_WAKE_UP) };
    Errno::result(rc).map(drop)
}

#[cfg(test)]
mod tests {
    use std::os::fd::FromRawFd;

    use super::*;

    /// A listener of an allow-all filter, installed on a thread of its own
    /// that ends at once: the filter binds that thread only.
    fn listener() -> OwnedFd {
        let allow = [libc::sock_filter {
            code: (libc::BPF_RET | libc::BPF_K) as u16,
            jt: 0,
            jf: 0,
            k: libc::SECCOMP_RET_ALLOW,
        }];
        std::thread::spawn(move || {
            let prog = libc::sock_fprog { len: 1, filter: allow.as_ptr() as *mut _ };
            // SAFETY: prctl takes integers; seccomp copies `prog`, which
            // outlives the call.
            let fd = unsafe {
                assert_eq!(libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), 0);
                libc::syscall(
                    libc::SYS_seccomp,
                    libc::SECCOMP_SET_MODE_FILTER,
                    libc::SECCOMP_FILTER_FLAG_NEW_LISTENER,
                    &prog as *const libc::sock_fprog,
                )
            };
            assert!(fd >= 0, "no listener: {}", Errno::last());
            // SAFETY: the kernel just made this descriptor, owned by no one else.
            unsafe { OwnedFd::from_raw_fd(fd as i32) }
        })
        .join()
        .expect("filter thread")
    }

    #[test]
    fn the_kernel_takes_the_one_cpu_wake_up_where_it_has_it() {
        let listener = listener();
        // Whether the kernel has NOTIF_SET_FLAGS at all (Linux 6.6, or a
        // backport): no flags is valid wherever it is.
        // SAFETY: NOTIF_SET_FLAGS reads no memory; 0 is its value.
        let known =
            unsafe { libc::ioctl(listener.as_raw_fd(), libc::SECCOMP_IOCTL_NOTIF_SET_FLAGS, 0 as libc::c_ulong) };
        let expected = match known {
            0 => Ok(()),
            _ => Err(Errno::EINVAL),
        };
        assert_eq!(wake_on_one_cpu(&listener), expected);
    }
}
