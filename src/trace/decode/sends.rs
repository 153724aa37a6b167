//! sendto, sendmsg, sendmmsg that name a destination: an unconnected UDP
//! datagram (DNS), or a TCP Fast Open connection (MSG_FASTOPEN), reach the
//! network without connect(2). Each is a connect event with the send's
//! flags. The destinations are read at entry, when the kernel copies them.

use crate::proto::{self, event::Payload};
use crate::trace::abi::Abi;
use crate::trace::decode::context::{Call, Ctx, Next};
use crate::trace::decode::sockaddr::{self, SOCKADDR_MAX};
use crate::trace::memory;

/// Which send call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SendCall {
    /// sendto(fd, buf, len, flags, addr, addrlen)
    Sendto,
    /// sendmsg(fd, msghdr, flags)
    Sendmsg,
    /// sendmmsg(fd, mmsghdr[], vlen, flags)
    Sendmmsg,
}

/// Messages of a sendmmsg looked at (the kernel takes at most 1024).
const MMSG_MAX: usize = 64;

/// `struct msghdr`: msg_name's and msg_namelen's offsets, and its size
/// (in `struct mmsghdr`, followed by an unsigned int, padded to a word).
fn msghdr_layout(abi: Abi) -> (usize, usize, usize) {
    match abi {
        Abi::I386 => (0, 4, 32),
        _ => (0, 8, 64),
    }
}

/// A destination's address, as a record of the call's entry bytes: its
/// length (one byte, at most SOCKADDR_MAX), then the bytes.
fn push_destination(call: &mut Call, address: &[u8]) {
    let address = &address[..address.len().min(SOCKADDR_MAX)];
    call.entry_bytes.push(address.len() as u8);
    call.entry_bytes.extend_from_slice(address);
}

fn destinations(call: &Call) -> Vec<&[u8]> {
    let mut out = Vec::new();
    let mut rest = call.entry_bytes.as_slice();
    while let Some((&len, tail)) = rest.split_first() {
        let len = usize::from(len).min(tail.len());
        out.push(&tail[..len]);
        rest = &tail[len..];
    }
    out
}

/// The send flags argument.
fn flags(call: &Call, send: SendCall) -> u32 {
    match send {
        SendCall::Sendto => call.args[3] as u32,
        SendCall::Sendmsg => call.args[2] as u32,
        SendCall::Sendmmsg => call.args[3] as u32,
    }
}

/// Reads the destinations the call names; a call that names none (a
/// connected socket's send) is no event and needs no exit stop.
pub fn entry(cx: &mut Ctx<'_>, call: &mut Call, send: SendCall) -> Next {
    match send {
        SendCall::Sendto => {
            let [_, _, _, _, addr, len] = call.args;
            if addr != 0 && len != 0 {
                let address = cx.read_bytes(addr, (len as u32 as usize).min(SOCKADDR_MAX));
                call.partial |= address.is_empty();
                push_destination(call, &address);
            }
        }
        SendCall::Sendmsg => read_msghdr_name(cx, call, call.args[1]),
        SendCall::Sendmmsg => {
            let (_, _, stride) = msghdr_layout(call.abi);
            let count = (call.args[2] as u32 as usize).min(MMSG_MAX);
            for i in 0..count {
                read_msghdr_name(cx, call, call.args[1].wrapping_add((i * stride) as u64));
            }
        }
    }
    match call.entry_bytes.is_empty() && !call.partial {
        true => Next::Done,
        false => Next::Exit,
    }
}

/// The destination of one `struct msghdr`, when it names one and it is not
/// one already read.
fn read_msghdr_name(cx: &mut Ctx<'_>, call: &mut Call, msghdr: u64) {
    let (name_at, len_at, _) = msghdr_layout(call.abi);
    let name = memory::read_words(cx.tid, msghdr.wrapping_add(name_at as u64), call.abi, 1);
    let mut len = [0u8; 4];
    let got = memory::read(cx.tid, msghdr.wrapping_add(len_at as u64), &mut len);
    let (Some(&name), 4) = (name.first(), got) else {
        call.partial = true;
        return;
    };
    let len = u32::from_ne_bytes(len) as usize;
    if name == 0 || len == 0 {
        return;
    }
    let address = cx.read_bytes(name, len.min(SOCKADDR_MAX));
    if address.is_empty() {
        call.partial = true;
    } else if !destinations(call).contains(&address.as_slice()) {
        push_destination(call, &address);
    }
}

/// One connect event per destination. A stream socket's destination (TCP
/// Fast Open) is checked against its peer as a connect's is; a datagram's
/// cannot be: the kernel keeps no record of where it went.
pub fn exit(cx: &mut Ctx<'_>, call: &Call, retval: i64, send: SendCall) {
    let fd = call.fd(0);
    let socket = sockaddr::socket_of(cx, fd);
    let stream = socket.as_ref().and_then(crate::trace::procfs::socket_kind).map(|(t, _)| t) == Some(libc::SOCK_STREAM);
    let found = destinations(call);
    if found.is_empty() {
        let connect = proto::ConnectEvent { fd: Some(fd), send_flags: flags(call, send), ..Default::default() };
        cx.emit_call(call, retval, true, Payload::Connect(connect));
        return;
    }
    let shared = cx.procs.tables_shared(cx.tid);
    for raw in found {
        let requested = sockaddr::parse_sockaddr(raw);
        let partial = requested.is_none();
        let (checked, unverified) = match (stream, requested) {
            // A send's success is the bytes it sent; the check takes a connect's 0.
            (true, requested) => sockaddr::verify_peer(socket.as_ref(), requested, retval.min(0), shared),
            (false, Some(requested)) if sockaddr::is_ip(requested.0) => {
                let why = "address: read from the workload's memory as the kernel read it; the kernel keeps no \
                           record of a datagram's destination to check it against";
                (Some(requested), Some(why.to_owned()))
            }
            // A unix datagram's destination neither: marked where another
            // task shares the memory (syslog's every message is one).
            (false, Some(requested)) if shared => {
                let why = "address: read from the workload's memory; the kernel keeps no record of a datagram's \
                           destination to check it against, and another task sharing the memory (or the working \
                           directory of a relative path) could have changed it before the kernel read it";
                (Some(requested), Some(why.to_owned()))
            }
            (false, requested) => (requested, None),
        };
        let (family, address, port) = sockaddr::address_or_empty(checked);
        let connect = proto::ConnectEvent {
            address,
            port,
            family: family as i32,
            protocol: sockaddr::protocol_of_socket(socket.as_ref(), family) as i32,
            fd: Some(fd),
            send_flags: flags(call, send),
        };
        match unverified {
            Some(why) => cx.emit_unverified(call, retval, why, Payload::Connect(connect)),
            None => cx.emit_call(call, retval, partial, Payload::Connect(connect)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn destinations_round_trip_through_the_entry_bytes() {
        let entry = crate::trace::abi::SyscallEntry { abi: Abi::X86_64, nr: 0, args: [0; 6] };
        let mut call = Call::new("sendmmsg", &entry, std::time::SystemTime::now());
        push_destination(&mut call, &[2, 0, 0, 53, 127, 0, 0, 1]);
        push_destination(&mut call, &[1, 0]);
        push_destination(&mut call, &[7; 200]);
        let found = destinations(&call);
        assert_eq!(found.len(), 3);
        assert_eq!(found[0], &[2, 0, 0, 53, 127, 0, 0, 1]);
        assert_eq!(found[1], &[1, 0]);
        assert_eq!(found[2].len(), SOCKADDR_MAX);
    }
}
