//! The kernel's process connector (netlink, `NETLINK_CONNECTOR`,
//! `CN_IDX_PROC`): a message for every fork, exec and exit on the machine,
//! as it happens. The /proc scan takes them as hints of which pids to look
//! at; what it reports it still reads from /proc.
//!
//! The kernel honours a subscription only from a process with
//! `CAP_NET_ADMIN` in the initial user and pid namespaces (cn_proc.c drops
//! it, unanswered, from anywhere else): never inside a container. Both are
//! checked first, then the kernel's acknowledgement of the subscription is
//! awaited, so that a kernel that ignores it is not taken for a quiet one.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::time::{Duration, Instant, SystemTime};

use nix::errno::Errno;
use nix::sys::socket::{recvfrom, sendto, setsockopt, sockopt, MsgFlags, NetlinkAddr};
use nix::unistd::Pid;

use crate::trace::procfs;

// linux/netlink.h: struct nlmsghdr { __u32 nlmsg_len; __u16 nlmsg_type, nlmsg_flags; __u32 nlmsg_seq, nlmsg_pid; }.
const NLMSG_HDRLEN: usize = 16;
// linux/connector.h: struct cn_msg { struct cb_id { __u32 idx, val; } id; __u32 seq, ack; __u16 len, flags; __u8 data[]; }.
const CN_MSG_LEN: usize = 20;
// linux/cn_proc.h: struct proc_event { enum what (__u32); __u32 cpu; __u64 timestamp_ns; union event_data; }.
const PROC_EVENT_HEADER: usize = 16;
/// Where a message's `event_data` starts.
const EVENT_DATA: usize = NLMSG_HDRLEN + CN_MSG_LEN + PROC_EVENT_HEADER;

// include/linux/proc_ns.h: the inode numbers of the initial namespaces.
const PROC_USER_INIT_INO: u64 = 0xEFFF_FFFD;
const PROC_PID_INIT_INO: u64 = 0xEFFF_FFFC;
// linux/capability.h.
const CAP_NET_ADMIN: u32 = 12;

/// How long the kernel has to acknowledge the subscription (it answers at once).
const ACK_TIMEOUT: Duration = Duration::from_secs(1);
/// Room for bursts of messages (76 bytes each, a few hundred bytes of
/// kernel memory) between two reads; beyond, the kernel drops and says so
/// (ENOBUFS). Granted as asked with CAP_NET_ADMIN (SO_RCVBUFFORCE).
const RECEIVE_BUFFER: usize = 8 << 20;
/// Most datagrams read in one go: a machine that forks without pause must
/// not keep the scan from handling what it read.
const DRAIN_MAX: usize = 4096;

/// What a message says happened to which process (thread-group id), and
/// when (the kernel's CLOCK_MONOTONIC nanoseconds: `wall_time`). Only a
/// hint: the pid may be another process's by the time it is read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hint {
    /// A new process (not a thread) was forked.
    Fork(i32),
    /// A process ran a new program.
    Exec(i32, u64),
    /// A process's leader thread ended (the process may live on in its other threads).
    Exit(i32, u64),
}

/// The wall-clock time of a message's timestamp (ktime_get_ns: CLOCK_MONOTONIC).
pub fn wall_time(monotonic_ns: u64) -> SystemTime {
    let mut now = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `now` is a valid timespec for clock_gettime to write.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut now) };
    let now_ns = (now.tv_sec as u64).saturating_mul(1_000_000_000).saturating_add(now.tv_nsec as u64);
    let ago = Duration::from_nanos(if rc == 0 { now_ns.saturating_sub(monotonic_ns) } else { 0 });
    SystemTime::now().checked_sub(ago).unwrap_or_else(SystemTime::now)
}

/// Why messages stopped coming.
#[derive(Debug)]
pub enum Lost {
    /// The socket's buffer overflowed: some messages were dropped.
    Overrun,
    Failed(Errno),
}

/// A subscription to the process connector.
pub struct Connector {
    socket: OwnedFd,
    /// A LISTEN request went out: an IGNORE must follow it.
    listening: bool,
}

impl Connector {
    /// Subscribes, or says why the kernel will not give it here.
    pub fn subscribe() -> Result<Connector, String> {
        in_initial_namespaces_with_net_admin()?;
        // SAFETY: socket takes integers and returns a new descriptor or -1.
        let fd = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_DGRAM | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
                libc::NETLINK_CONNECTOR,
            )
        };
        if fd < 0 {
            return Err(format!("socket: {}", Errno::last()));
        }
        // SAFETY: a non-negative return is a fresh descriptor we own.
        let mut connector = Connector { socket: unsafe { OwnedFd::from_raw_fd(fd) }, listening: false };
        // A smaller buffer only means an earlier overrun, which is handled.
        let _ = setsockopt(&connector.socket, sockopt::RcvBufForce, &RECEIVE_BUFFER);
        // Groups are a bit mask: group CN_IDX_PROC (1) is bit 0.
        let groups = 1 << (libc::CN_IDX_PROC - 1);
        nix::sys::socket::bind(fd, &NetlinkAddr::new(0, groups)).map_err(|e| format!("bind: {e}"))?;
        // Acknowledgements go to every listener, numbered by the kernel's
        // own counter: this one is known by the `ack` it echoes (plus one).
        let seq = std::process::id();
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.subsec_nanos());
        let ack = nanos ^ seq.rotate_left(16);
        connector.send(libc::PROC_CN_MCAST_LISTEN, seq, ack).map_err(|e| format!("subscribe: {e}"))?;
        connector.listening = true;
        connector.await_ack(ack.wrapping_add(1))
    }

    fn send(&self, op: libc::proc_cn_mcast_op, seq: u32, ack: u32) -> nix::Result<usize> {
        let message = control_message(op, seq, ack);
        sendto(self.socket.as_raw_fd(), &message, &NetlinkAddr::new(0, 0), MsgFlags::empty())
    }

    fn await_ack(self, ack: u32) -> Result<Connector, String> {
        let deadline = Instant::now() + ACK_TIMEOUT;
        let mut buf = [0u8; 8192];
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            wait_readable([self.socket.as_fd()], Some(left));
            loop {
                match recvfrom::<NetlinkAddr>(self.socket.as_raw_fd(), &mut buf) {
                    Ok((len, from)) if from_kernel(from) => match acknowledgement(&buf[..len], ack) {
                        Some(0) => return Ok(self),
                        Some(err) => {
                            return Err(format!("the kernel refused the subscription: {}", Errno::from_raw(err as i32)))
                        }
                        // Messages before the acknowledgement: the first listing covers them.
                        None => {}
                    },
                    Ok(_) | Err(Errno::EINTR) | Err(Errno::ENOBUFS) => {}
                    Err(Errno::EAGAIN) => break,
                    Err(e) => return Err(format!("receive: {e}")),
                }
            }
        }
        Err("the kernel did not acknowledge the subscription".to_owned())
    }

    /// Adds the hints of every message waiting (up to `DRAIN_MAX`); never blocks.
    pub fn receive(&self, hints: &mut Vec<Hint>) -> Result<(), Lost> {
        let mut buf = [0u8; 8192];
        for _ in 0..DRAIN_MAX {
            match recvfrom::<NetlinkAddr>(self.socket.as_raw_fd(), &mut buf) {
                // Only the kernel speaks for the kernel: a process that
                // found this socket's port sends from a port of its own.
                Ok((len, from)) if from_kernel(from) => parse(&buf[..len], hints)?,
                Ok(_) | Err(Errno::EINTR) => {}
                Err(Errno::EAGAIN) => return Ok(()),
                Err(Errno::ENOBUFS) => return Err(Lost::Overrun),
                Err(e) => return Err(Lost::Failed(e)),
            }
        }
        Ok(())
    }
}

impl AsFd for Connector {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.socket.as_fd()
    }
}

impl Drop for Connector {
    /// Kernels before 6.6 count listeners only by these requests (an
    /// IGNORE without its LISTEN would take another listener's count), and
    /// do the work of every message while the count is above zero.
    fn drop(&mut self) {
        if self.listening {
            let _ = self.send(libc::PROC_CN_MCAST_IGNORE, std::process::id(), 0);
        }
    }
}

fn from_kernel(from: Option<NetlinkAddr>) -> bool {
    from.is_some_and(|address| address.pid() == 0)
}

/// Why the kernel would ignore a subscription from this process, if it would.
fn in_initial_namespaces_with_net_admin() -> Result<(), String> {
    for (namespace, initial) in [("user", PROC_USER_INIT_INO), ("pid", PROC_PID_INIT_INO)] {
        match std::fs::metadata(format!("/proc/self/ns/{namespace}")) {
            Ok(ns) if ns.ino() == initial => {}
            Ok(_) => return Err(format!("not in the initial {namespace} namespace")),
            Err(e) => return Err(format!("cannot tell its {namespace} namespace: {e}")),
        }
    }
    let effective = procfs::status(Pid::this()).and_then(|s| s.credentials.cap_effective);
    match effective {
        Some(caps) if caps >> CAP_NET_ADMIN & 1 == 1 => Ok(()),
        _ => Err("no CAP_NET_ADMIN".to_owned()),
    }
}

/// A PROC_CN_MCAST_LISTEN or _IGNORE request: nlmsghdr, cn_msg, the op.
fn control_message(op: libc::proc_cn_mcast_op, seq: u32, ack: u32) -> Vec<u8> {
    let op_len = std::mem::size_of::<u32>();
    let total = NLMSG_HDRLEN + CN_MSG_LEN + op_len;
    let mut message = Vec::with_capacity(total);
    message.extend_from_slice(&(total as u32).to_ne_bytes());
    message.extend_from_slice(&(libc::NLMSG_DONE as u16).to_ne_bytes());
    message.extend_from_slice(&0u16.to_ne_bytes());
    message.extend_from_slice(&seq.to_ne_bytes());
    message.extend_from_slice(&0u32.to_ne_bytes());
    for field in [libc::CN_IDX_PROC, libc::CN_VAL_PROC, seq, ack] {
        message.extend_from_slice(&field.to_ne_bytes());
    }
    message.extend_from_slice(&(op_len as u16).to_ne_bytes());
    message.extend_from_slice(&0u16.to_ne_bytes());
    message.extend_from_slice(&op.to_ne_bytes());
    message
}

fn u32_at(bytes: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(bytes.get(at..at + 4)?.try_into().ok()?))
}

/// The netlink messages of a datagram, each its nlmsghdr and what follows.
fn messages(mut datagram: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    std::iter::from_fn(move || {
        let len = u32_at(datagram, 0)? as usize;
        let kind = u16::from_ne_bytes(datagram.get(4..6)?.try_into().ok()?);
        let message = datagram.get(..len).filter(|_| len >= NLMSG_HDRLEN)?;
        // NLMSG_ALIGN: messages start on 4-byte boundaries.
        datagram = datagram.get(len.next_multiple_of(4)..).unwrap_or_default();
        Some((kind, message))
    })
}

/// A process-connector message's `what`, `timestamp_ns` and `event_data`,
/// or None for anything else.
fn proc_event(message: &[u8]) -> Option<(u32, u64, &[u8])> {
    let id = (u32_at(message, NLMSG_HDRLEN)?, u32_at(message, NLMSG_HDRLEN + 4)?);
    if id != (libc::CN_IDX_PROC, libc::CN_VAL_PROC) {
        return None;
    }
    let event = NLMSG_HDRLEN + CN_MSG_LEN;
    let timestamp = u64::from_ne_bytes(message.get(event + 8..event + 16)?.try_into().ok()?);
    Some((u32_at(message, event)?, timestamp, message.get(EVENT_DATA..)?))
}

/// The hints of one datagram; an overrun notice is an overrun.
fn parse(datagram: &[u8], hints: &mut Vec<Hint>) -> Result<(), Lost> {
    for (kind, message) in messages(datagram) {
        if i32::from(kind) == libc::NLMSG_OVERRUN {
            return Err(Lost::Overrun);
        }
        let Some((what, at, data)) = proc_event(message) else { continue };
        // event_data: fork { parent_pid, parent_tgid, child_pid, child_tgid },
        // exec { process_pid, process_tgid }, exit { process_pid, process_tgid, ... }.
        let hint = match what {
            libc::PROC_EVENT_FORK => match (u32_at(data, 8), u32_at(data, 12)) {
                (Some(pid), Some(tgid)) if pid == tgid => Some(Hint::Fork(tgid as i32)),
                _ => None,
            },
            libc::PROC_EVENT_EXEC => u32_at(data, 4).map(|tgid| Hint::Exec(tgid as i32, at)),
            libc::PROC_EVENT_EXIT => match (u32_at(data, 0), u32_at(data, 4)) {
                (Some(pid), Some(tgid)) if pid == tgid => Some(Hint::Exit(tgid as i32, at)),
                _ => None,
            },
            _ => None,
        };
        hints.extend(hint);
    }
    Ok(())
}

/// The error the kernel's acknowledgement of the request numbered `ack` - 1
/// carries (PROC_EVENT_NONE, `event_data.ack.err`), if the datagram is it.
fn acknowledgement(datagram: &[u8], ack: u32) -> Option<u32> {
    messages(datagram).find_map(|(_, message)| {
        let echoed = u32_at(message, NLMSG_HDRLEN + 12)?;
        match proc_event(message)? {
            (libc::PROC_EVENT_NONE, _, data) if echoed == ack => u32_at(data, 0),
            _ => None,
        }
    })
}

/// Waits until one of `fds` is readable (or its other end closed), or
/// `timeout` passes (None: no limit); which were. A signal ends the wait
/// early, none ready.
pub fn wait_readable<const N: usize>(fds: [BorrowedFd<'_>; N], timeout: Option<Duration>) -> [bool; N] {
    let mut polled = fds.map(|fd| libc::pollfd { fd: fd.as_raw_fd(), events: libc::POLLIN, revents: 0 });
    // Rounded up: a wait shorter than a millisecond must not spin.
    let ms = timeout.map_or(-1, |t| t.as_nanos().div_ceil(1_000_000).min(i32::MAX as u128) as i32);
    // SAFETY: `polled` is N initialised pollfd, valid for reads and writes;
    // the descriptors are borrowed, so open for the call.
    let ready = unsafe { libc::poll(polled.as_mut_ptr(), N as libc::nfds_t, ms) };
    if ready <= 0 {
        return [false; N];
    }
    polled.map(|p| p.revents != 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A datagram as the kernel sends it: one message, `what` and its event_data words.
    fn datagram(what: u32, data: &[u32]) -> Vec<u8> {
        let mut message = control_message(libc::PROC_CN_MCAST_LISTEN, 7, 8);
        message.truncate(NLMSG_HDRLEN + CN_MSG_LEN);
        message.extend_from_slice(&what.to_ne_bytes());
        message.extend_from_slice(&[0; 4]);
        message.extend_from_slice(&(1000 + u64::from(what)).to_ne_bytes());
        data.iter().for_each(|word| message.extend_from_slice(&word.to_ne_bytes()));
        let len = message.len() as u32;
        message[..4].copy_from_slice(&len.to_ne_bytes());
        message
    }

    #[test]
    fn forks_of_processes_execs_and_leader_exits_are_hints() {
        let mut hints = Vec::new();
        for (what, data) in [
            (libc::PROC_EVENT_FORK, &[10, 10, 11, 11][..]),
            // A new thread is no new process.
            (libc::PROC_EVENT_FORK, &[10, 10, 12, 11]),
            (libc::PROC_EVENT_EXEC, &[11, 11]),
            (libc::PROC_EVENT_EXIT, &[12, 11, 0, 17]),
            (libc::PROC_EVENT_EXIT, &[11, 11, 0, 17]),
            (libc::PROC_EVENT_UID, &[11, 11, 0, 0]),
        ] {
            parse(&datagram(what, data), &mut hints).unwrap();
        }
        let (exec_at, exit_at) = (1000 + u64::from(libc::PROC_EVENT_EXEC), 1000 + u64::from(libc::PROC_EVENT_EXIT));
        assert_eq!(hints, [Hint::Fork(11), Hint::Exec(11, exec_at), Hint::Exit(11, exit_at)]);
    }

    #[test]
    fn short_foreign_and_overrun_messages_are_not_hints() {
        let mut hints = Vec::new();
        let mut cut = datagram(libc::PROC_EVENT_EXEC, &[11, 11]);
        cut.truncate(EVENT_DATA + 2);
        let cut_len = cut.len() as u32;
        cut[..4].copy_from_slice(&cut_len.to_ne_bytes());
        parse(&cut, &mut hints).unwrap();
        let mut foreign = datagram(libc::PROC_EVENT_EXEC, &[11, 11]);
        foreign[NLMSG_HDRLEN..NLMSG_HDRLEN + 4].copy_from_slice(&9u32.to_ne_bytes());
        parse(&foreign, &mut hints).unwrap();
        // A length past the datagram, and one shorter than a header.
        let mut long = datagram(libc::PROC_EVENT_EXEC, &[11, 11]);
        long[..4].copy_from_slice(&1000u32.to_ne_bytes());
        parse(&long, &mut hints).unwrap();
        parse(&[4, 0, 0, 0, 3, 0], &mut hints).unwrap();
        assert_eq!(hints, []);
        let mut overrun = datagram(libc::PROC_EVENT_EXEC, &[11, 11]);
        overrun[4..6].copy_from_slice(&(libc::NLMSG_OVERRUN as u16).to_ne_bytes());
        assert!(matches!(parse(&overrun, &mut hints), Err(Lost::Overrun)));
    }

    #[test]
    fn only_the_acknowledgement_of_this_request_is_one() {
        let mut ack = datagram(libc::PROC_EVENT_NONE, &[0]);
        // control_message numbered it ack 8: the kernel answers ack + 1.
        ack[NLMSG_HDRLEN + 12..NLMSG_HDRLEN + 16].copy_from_slice(&9u32.to_ne_bytes());
        assert_eq!(acknowledgement(&ack, 9), Some(0));
        assert_eq!(acknowledgement(&ack, 8), None);
        assert_eq!(acknowledgement(&datagram(libc::PROC_EVENT_EXEC, &[0, 0]), 8), None);
    }
}
