//! Socket addresses and the sockets behind descriptors, shared by the
//! socket decoders (connect, bind and accept in `net`, sends in `sends`,
//! socket options in `sockopts`): decoding a sockaddr, asking the kernel
//! for a socket's kind and peer, checking an address read from the
//! workload's memory against the kernel's.

use std::net::{Ipv4Addr, Ipv6Addr};
use std::os::fd::OwnedFd;

use crate::proto::{AddressFamily, Protocol};
use crate::text;
use crate::trace::decode::context::Ctx;
use crate::trace::procfs::{self, End};

pub const SOCKADDR_MAX: usize = 128;

/// A socket address: family, textual address, port.
pub fn parse_sockaddr(raw: &[u8]) -> Option<(AddressFamily, String, u32)> {
    let family = i32::from(u16::from_ne_bytes(raw.get(0..2)?.try_into().ok()?));
    let port = || raw.get(2..4).map(|p| u32::from(u16::from_be_bytes([p[0], p[1]])));
    match family {
        libc::AF_INET => {
            let ip: [u8; 4] = raw.get(4..8)?.try_into().ok()?;
            Some((AddressFamily::Inet, Ipv4Addr::from(ip).to_string(), port()?))
        }
        libc::AF_INET6 => {
            let ip: [u8; 16] = raw.get(8..24)?.try_into().ok()?;
            Some((AddressFamily::Inet6, Ipv6Addr::from(ip).to_string(), port()?))
        }
        libc::AF_UNIX => {
            let path = &raw[2..];
            let text = match path.first() {
                // Abstract names start with a NUL and are not terminated.
                Some(0) => format!("@{}", text::lossless(&path[1..])),
                _ => {
                    let end = path.iter().position(|&b| b == 0).unwrap_or(path.len());
                    text::lossless(&path[..end])
                }
            };
            Some((AddressFamily::Unix, text, 0))
        }
        _ => Some((AddressFamily::Other, String::new(), 0)),
    }
}

fn protocol_of(family: AddressFamily, sock_type: i32, protocol: i32) -> Protocol {
    if !matches!(family, AddressFamily::Inet | AddressFamily::Inet6) {
        return Protocol::Unspecified;
    }
    match (sock_type, protocol) {
        (libc::SOCK_STREAM, 0 | libc::IPPROTO_TCP) => Protocol::Tcp,
        (libc::SOCK_DGRAM, 0 | libc::IPPROTO_UDP) => Protocol::Udp,
        _ => Protocol::Other,
    }
}

/// An address that could not be read is reported empty (the event partial).
pub fn address_or_empty(parsed: Option<(AddressFamily, String, u32)>) -> (AddressFamily, String, u32) {
    parsed.unwrap_or((AddressFamily::Unspecified, String::new(), 0))
}

/// The socket behind a tracee's descriptor, asked of the kernel now rather
/// than of a table kept from socket(2) calls: inherited, passed or dup'ed
/// sockets are all the same.
pub fn socket_of(cx: &Ctx<'_>, fd: i32) -> Option<OwnedFd> {
    procfs::descriptor_copy(cx.tid, cx.tgid(), fd)
}

pub fn protocol_of_socket(socket: Option<&OwnedFd>, family: AddressFamily) -> Protocol {
    // A descriptor that is no socket (or is gone) has no protocol to tell.
    match socket.and_then(procfs::socket_kind) {
        Some((sock_type, protocol)) => protocol_of(family, sock_type, protocol),
        None => Protocol::Unspecified,
    }
}

pub type Address = (AddressFamily, String, u32);

pub fn is_ip(family: AddressFamily) -> bool {
    matches!(family, AddressFamily::Inet | AddressFamily::Inet6)
}

/// The address a connect reached, and why it could not be checked if not.
/// `shared`: another task shares the caller's memory, and could have
/// rewritten the address after the tracer read it.
pub fn verify_peer(
    socket: Option<&OwnedFd>,
    requested: Option<Address>,
    retval: i64,
    shared: bool,
) -> (Option<Address>, Option<String>) {
    let Some(requested) = requested else { return (None, None) };
    if requested.0 == AddressFamily::Unix {
        return verify_unix_peer(socket, requested, retval, shared);
    }
    if !is_ip(requested.0) {
        return (Some(requested), None);
    }
    if retval != 0 {
        let why = "address: read from the workload's memory; the kernel keeps no peer to check it against \
                   (the connect failed or is in progress)";
        return (Some(requested), Some(why.to_owned()));
    }
    match socket.and_then(|s| procfs::socket_address(s, End::Peer)).and_then(|a| parse_sockaddr(&a)) {
        Some(peer) if peer == requested => (Some(peer), None),
        Some(peer) => {
            let why = format!(
                "address: {}:{} was read from the workload's memory, but the socket's peer is the kernel's answer \
                 (the memory changed after the read, or the descriptor was replaced)",
                requested.1, requested.2
            );
            (Some(peer), Some(why))
        }
        None => (Some(requested), Some("address: the socket has no peer to check it against".to_owned())),
    }
}

/// A unix connect: the peer's name is the one it bound. An abstract name
/// is what a connect must give byte for byte, so a peer of another name is
/// the kernel's answer. A path may have been bound relative to the
/// server's directory, or through a symlink, so a peer bound under another
/// path says nothing alone; where another task shares the memory, it is
/// marked.
fn verify_unix_peer(
    socket: Option<&OwnedFd>,
    requested: Address,
    retval: i64,
    shared: bool,
) -> (Option<Address>, Option<String>) {
    const RACE: &str = "another task sharing the memory, or the working directory a relative path is looked up \
                        from, could have changed it before the kernel read it";
    if retval != 0 {
        let why = shared.then(|| {
            format!(
                "address: read from the workload's memory; the connect failed, leaving no peer to check it, and {RACE}"
            )
        });
        return (Some(requested), why);
    }
    let peer = socket.and_then(|s| procfs::socket_address(s, End::Peer)).and_then(|a| parse_sockaddr(&a));
    match peer {
        Some(peer) if peer == requested => (Some(peer), None),
        Some(peer) if peer.1.starts_with('@') => {
            let why = format!(
                "address: {} was read from the workload's memory, but the socket's peer is the kernel's answer \
                 (the memory changed after the read, or the descriptor was replaced)",
                requested.1
            );
            (Some(peer), Some(why))
        }
        Some(peer) if shared => {
            let why = format!(
                "address: read from the workload's memory; the socket's peer is bound as {}, which may name the \
                 same socket, and {RACE}",
                peer.1
            );
            (Some(requested), Some(why))
        }
        _ => (Some(requested), None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sockaddrs_decode_to_text() {
        let mut v4 = vec![0u8; 16];
        v4[0..2].copy_from_slice(&(libc::AF_INET as u16).to_ne_bytes());
        v4[2..4].copy_from_slice(&8080u16.to_be_bytes());
        v4[4..8].copy_from_slice(&[127, 0, 0, 1]);
        assert_eq!(parse_sockaddr(&v4), Some((AddressFamily::Inet, "127.0.0.1".into(), 8080)));

        let mut v6 = vec![0u8; 28];
        v6[0..2].copy_from_slice(&(libc::AF_INET6 as u16).to_ne_bytes());
        v6[2..4].copy_from_slice(&443u16.to_be_bytes());
        v6[23] = 1;
        assert_eq!(parse_sockaddr(&v6), Some((AddressFamily::Inet6, "::1".into(), 443)));

        let mut unix = (libc::AF_UNIX as u16).to_ne_bytes().to_vec();
        unix.extend_from_slice(b"/run/x.sock\0garbage");
        assert_eq!(parse_sockaddr(&unix), Some((AddressFamily::Unix, "/run/x.sock".into(), 0)));
        let mut abstract_name = (libc::AF_UNIX as u16).to_ne_bytes().to_vec();
        abstract_name.extend_from_slice(b"\0agent");
        assert_eq!(parse_sockaddr(&abstract_name), Some((AddressFamily::Unix, "@agent".into(), 0)));
        assert_eq!(parse_sockaddr(&[2]), None);
    }
}
