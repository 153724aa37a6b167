//! Sockets: connect, bind, accept, and i386's socketcall that multiplexes
//! them. What a socket is (its type and protocol, its addresses) is asked
//! of the socket itself, through a copy of the tracee's descriptor.

use crate::proto::{self, event::Payload};
use crate::trace::abi::Abi;
use crate::trace::decode::context::{Call, Ctx, Next};
use crate::trace::decode::sends::{self, SendCall};
use crate::trace::decode::sockaddr::{
    address_or_empty, parse_sockaddr, protocol_of_socket, socket_of, verify_peer, SOCKADDR_MAX,
};
use crate::trace::decode::sockopts;
use crate::trace::memory;
use crate::trace::procfs::{self, End};

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

/// connect: the address read at entry, checked against the socket's peer
/// after a successful IP connect. Another thread can rewrite the address
/// between the tracer's read and the kernel's; the peer is the kernel's
/// word, so it is what a mismatch reports.
fn connect_exit(cx: &mut Ctx<'_>, call: &Call, retval: i64) {
    let fd = call.fd(0);
    let socket = socket_of(cx, fd);
    let requested = parse_sockaddr(&call.entry_bytes);
    let partial = requested.is_none();
    let shared = cx.procs.tables_shared(cx.tid);
    let (checked, unverified) = verify_peer(socket.as_ref(), requested, retval, shared);
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
