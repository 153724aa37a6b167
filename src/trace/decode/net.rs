//! Sockets: connect, bind, accept, and i386's socketcall that multiplexes
//! them. What a socket is (its type and protocol, its addresses) is asked
//! of the socket itself, through a copy of the tracee's descriptor.

use std::net::{Ipv4Addr, Ipv6Addr};
use std::os::fd::OwnedFd;

use crate::proto::{self, event::Payload, AddressFamily, Protocol};
use crate::text;
use crate::trace::abi::Abi;
use crate::trace::decode::context::{Call, Ctx, Next};
use crate::trace::decode::sends::{self, SendCall};
use crate::trace::decode::sockopts;
use crate::trace::memory;
use crate::trace::procfs::{self, End};

pub(super) const SOCKADDR_MAX: usize = 128;

/// Which socket call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NetCall {
    Connect,
    Bind,
    Accept,
    /// socket(2): raw and packet sockets only (`sockopts`).
    Socket,
    Setsockopt,
    /// Sends that name a destination (`sends`).
    Send(SendCall),
}

/// A socket address: family, textual address, port.
pub(super) fn parse_sockaddr(raw: &[u8]) -> Option<(AddressFamily, String, u32)> {
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

/// The address of connect and bind is read at entry, when the kernel copies
/// it: a blocking connect leaves time for another thread to rewrite it
/// before the exit.
pub fn entry(cx: &mut Ctx<'_>, call: &mut Call, net: NetCall) -> Next {
    match net {
        NetCall::Socket => return sockopts::socket_entry(call),
        NetCall::Setsockopt => return sockopts::setsockopt_entry(cx, call),
        NetCall::Send(send) => return sends::entry(cx, call, send),
        _ => {}
    }
    if net != NetCall::Accept {
        let [_, addr, len, ..] = call.args;
        call.entry_bytes = cx.read_bytes(addr, (len as usize).min(SOCKADDR_MAX));
    }
    Next::Exit
}

pub fn exit(cx: &mut Ctx<'_>, call: &Call, retval: i64, net: NetCall) {
    match net {
        NetCall::Connect => connect_exit(cx, call, retval),
        NetCall::Bind => bind_exit(cx, call, retval),
        NetCall::Accept => accept_exit(cx, call, retval),
        NetCall::Socket => sockopts::socket_exit(cx, call, retval),
        NetCall::Setsockopt => sockopts::setsockopt_exit(cx, call, retval),
        NetCall::Send(send) => sends::exit(cx, call, retval, send),
    }
}

/// An address that could not be read is reported empty (the event partial).
pub(super) fn address_or_empty(parsed: Option<(AddressFamily, String, u32)>) -> (AddressFamily, String, u32) {
    parsed.unwrap_or((AddressFamily::Unspecified, String::new(), 0))
}

/// The socket behind a tracee's descriptor, asked of the kernel now rather
/// than of a table kept from socket(2) calls: inherited, passed or dup'ed
/// sockets are all the same.
pub(super) fn socket_of(cx: &Ctx<'_>, fd: i32) -> Option<OwnedFd> {
    procfs::descriptor_copy(cx.tid, cx.tgid(), fd)
}

pub(super) fn protocol_of_socket(socket: Option<&OwnedFd>, family: AddressFamily) -> Protocol {
    // A descriptor that is no socket (or is gone) has no protocol to tell.
    match socket.and_then(procfs::socket_kind) {
        Some((sock_type, protocol)) => protocol_of(family, sock_type, protocol),
        None => Protocol::Unspecified,
    }
}

/// connect: the address read at entry, checked against the socket's peer
/// after a successful IP connect. Another thread can rewrite the address
/// between the tracer's read and the kernel's; the peer is the kernel's
/// word, so it is what a mismatch reports.
fn connect_exit(cx: &mut Ctx<'_>, call: &Call, retval: i64) {
    let fd = call.fd(0);
    let socket = socket_of(cx, fd);
    let requested = parse_sockaddr(&call.entry_bytes);
    let partial = requested.is_none();
    let (checked, unverified) = verify_peer(socket.as_ref(), requested, retval);
    let (family, address, port) = address_or_empty(checked);
    let connect = proto::ConnectEvent {
        address,
        port,
        family: family as i32,
        protocol: protocol_of_socket(socket.as_ref(), family) as i32,
        fd: Some(fd),
        ..Default::default()
    };
    match unverified {
        Some(why) => cx.emit_unverified(call, retval, why, Payload::Connect(connect)),
        None => cx.emit_call(call, retval, partial, Payload::Connect(connect)),
    }
}

type Address = (AddressFamily, String, u32);

pub(super) fn is_ip(family: AddressFamily) -> bool {
    matches!(family, AddressFamily::Inet | AddressFamily::Inet6)
}

/// The address a connect reached, and why it could not be checked if not.
pub(super) fn verify_peer(
    socket: Option<&OwnedFd>,
    requested: Option<Address>,
    retval: i64,
) -> (Option<Address>, Option<String>) {
    let Some(requested) = requested else { return (None, None) };
    if !is_ip(requested.0) {
        // A unix peer's name is whatever it bound, not what was asked.
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

/// bind: on success, the address the kernel bound (port 0 becomes the port
/// it chose); on failure, the one asked for.
fn bind_exit(cx: &mut Ctx<'_>, call: &Call, retval: i64) {
    let fd = call.fd(0);
    let socket = socket_of(cx, fd);
    let bound = (retval == 0).then(|| socket.as_ref().and_then(|s| procfs::socket_address(s, End::Local))).flatten();
    let parsed = parse_sockaddr(bound.as_deref().unwrap_or(&call.entry_bytes));
    let partial = parsed.is_none();
    let (family, address, port) = address_or_empty(parsed);
    let bind = proto::BindEvent {
        address,
        port,
        family: family as i32,
        protocol: protocol_of_socket(socket.as_ref(), family) as i32,
        fd: Some(fd),
    };
    cx.emit_call(call, retval, partial, Payload::Bind(bind));
}

/// accept, accept4: the peer and local port of the new connection, asked of
/// its socket (so an accept that passes no address buffer is seen too).
/// Failed accepts are not reported: a non-blocking server fails with EAGAIN
/// at every idle wake-up.
fn accept_exit(cx: &mut Ctx<'_>, call: &Call, retval: i64) {
    if retval < 0 {
        return;
    }
    let socket = socket_of(cx, retval as i32);
    let end = |end| socket.as_ref().and_then(|s| procfs::socket_address(s, end)).and_then(|a| parse_sockaddr(&a));
    let (peer, local) = (end(End::Peer), end(End::Local));
    let partial = peer.is_none();
    let (family, address, port) = address_or_empty(peer);
    let accept = proto::AcceptEvent {
        address,
        port,
        family: family as i32,
        protocol: protocol_of_socket(socket.as_ref(), family) as i32,
        fd: Some(call.fd(0)),
        local_port: local.map_or(0, |(_, _, port)| port),
    };
    cx.emit_call(call, retval, partial, Payload::Accept(accept));
}

/// i386 `socketcall(call, args)`: the real arguments sit in an array in
/// memory. A sub-call we watch becomes the call it stands for (name and
/// arguments), to be decoded as that call; None for the others.
pub fn unpack_socketcall(cx: &mut Ctx<'_>, call: &mut Call) -> Option<NetCall> {
    let (net, name, count) = match call.args[0] {
        2 => (NetCall::Bind, "bind", 3),
        3 => (NetCall::Connect, "connect", 3),
        5 => (NetCall::Accept, "accept", 3),
        18 => (NetCall::Accept, "accept4", 4),
        1 => (NetCall::Socket, "socket", 3),
        11 => (NetCall::Send(SendCall::Sendto), "sendto", 6),
        14 => (NetCall::Setsockopt, "setsockopt", 5),
        16 => (NetCall::Send(SendCall::Sendmsg), "sendmsg", 3),
        20 => (NetCall::Send(SendCall::Sendmmsg), "sendmmsg", 4),
        _ => return None,
    };
    let words = memory::read_words(cx.tid, call.args[1], Abi::I386, count);
    if words.len() < count {
        call.partial = true;
    }
    call.name = name;
    call.args = [0; 6];
    call.args[..words.len()].copy_from_slice(&words);
    Some(net)
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
