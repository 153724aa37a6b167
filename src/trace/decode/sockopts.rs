//! Sockets below TCP and UDP (raw and packet sockets) and the socket
//! options that shape or watch traffic (filters, raw headers, transparent
//! proxying, iptables rules, promiscuous mode). Which calls stop is the
//! conditions `RAW_SOCKETS` and `SOCKOPTS_WATCHED` below, the table rows'; i386's socketcall reaches
//! here for every call and is checked against the same conditions.

use crate::proto::{self, event::Payload};
use crate::text;
use crate::trace::abi::Abi;
use crate::trace::condition::{ArgTest, When};
use crate::trace::decode::context::{Call, Ctx, Next};
use crate::trace::decode::sockaddr;
use crate::trace::procfs;

/// socket(2) of a packet socket, or a raw one (SOCK_RAW, SOCK_PACKET),
/// whatever the SOCK_NONBLOCK and SOCK_CLOEXEC bits.
pub const RAW_SOCKETS: When = When(&[
    &[ArgTest::OneOf(0, &[libc::AF_PACKET as u32])],
    &[ArgTest::Masked(1, 0xf, libc::SOCK_RAW as u32)],
    // SOCK_PACKET (10), the obsolete packet socket type.
    &[ArgTest::Masked(1, 0xf, 10)],
]);

/// setsockopt options that stop (see `SetsockoptEvent`): (level, options).
pub const SOCKOPTS_WATCHED: When = When(&[
    // SOL_SOCKET: SO_BINDTODEVICE, SO_ATTACH_FILTER, SO_DETACH_FILTER, SO_MARK,
    // SO_LOCK_FILTER, SO_ATTACH_BPF, SO_ATTACH_REUSEPORT_CBPF and _EBPF, SO_BINDTOIFINDEX.
    &[ArgTest::OneOf(1, &[1]), ArgTest::OneOf(2, &[25, 26, 27, 36, 44, 50, 51, 52, 62])],
    // SOL_IP: IP_HDRINCL, IP_OPTIONS, IP_TRANSPARENT, IPT_SO_SET_REPLACE, IPT_SO_SET_ADD_COUNTERS.
    &[ArgTest::OneOf(1, &[0]), ArgTest::OneOf(2, &[3, 4, 19, 64, 65])],
    // SOL_IPV6: IPV6_HDRINCL, IP6T_SO_SET_REPLACE, IP6T_SO_SET_ADD_COUNTERS, IPV6_TRANSPARENT.
    &[ArgTest::OneOf(1, &[41]), ArgTest::OneOf(2, &[36, 64, 65, 75])],
    // SOL_TCP: TCP_REPAIR, TCP_ULP.
    &[ArgTest::OneOf(1, &[6]), ArgTest::OneOf(2, &[19, 31])],
    // SOL_PACKET: PACKET_ADD_MEMBERSHIP (promiscuous mode).
    &[ArgTest::OneOf(1, &[263]), ArgTest::OneOf(2, &[1])],
]);

/// BPF_MAXINSNS: the kernel refuses longer classic programs.
const FILTER_MAX_INSTRUCTIONS: usize = 4096;
/// Names passed as option values: interfaces (IFNAMSIZ 16), upper layer
/// protocols (TCP_ULP_NAME_MAX 16), iptables tables (XT_TABLE_MAXNAMELEN 32).
const OPTION_NAME_MAX: usize = 32;

pub fn family_name(family: i32) -> &'static str {
    match family {
        libc::AF_UNIX => "AF_UNIX",
        libc::AF_INET => "AF_INET",
        libc::AF_INET6 => "AF_INET6",
        libc::AF_NETLINK => "AF_NETLINK",
        libc::AF_PACKET => "AF_PACKET",
        _ => "",
    }
}

/// socket(2): only raw and packet sockets are events.
pub fn socket_entry(call: &Call) -> Next {
    match RAW_SOCKETS.passes(&call.args) {
        true => Next::Exit,
        false => Next::Done,
    }
}

/// The arguments are registers, which no other thread can change: the event
/// is what the kernel was asked.
pub fn socket_exit(cx: &mut Ctx<'_>, call: &Call, retval: i64) {
    let family = call.args[0] as i32;
    let socket = proto::SocketEvent {
        family,
        family_name: family_name(family).to_owned(),
        r#type: call.args[1] as i32,
        protocol: call.args[2] as i32,
    };
    cx.emit_call(call, retval, false, Payload::Socket(socket));
}

/// What an option's value is.
#[derive(Clone, Copy, PartialEq, Eq)]
enum OptionValue {
    Int,
    /// A name (NUL-terminated or as long as optlen).
    Name,
    /// A `struct sock_fprog`: a classic BPF program.
    Filter,
    /// `struct packet_mreq`: its mr_type (PACKET_MR_PROMISC is 1).
    PacketMreq,
    Other,
}

/// (level name, option name, value) of a watched option.
fn option(level: i32, name: i32) -> (&'static str, &'static str, OptionValue) {
    use OptionValue::*;
    let (option, value) = match (level, name) {
        (libc::SOL_SOCKET, 25) => ("SO_BINDTODEVICE", Name),
        (libc::SOL_SOCKET, 26) => ("SO_ATTACH_FILTER", Filter),
        (libc::SOL_SOCKET, 27) => ("SO_DETACH_FILTER", Other),
        (libc::SOL_SOCKET, 36) => ("SO_MARK", Int),
        (libc::SOL_SOCKET, 44) => ("SO_LOCK_FILTER", Int),
        (libc::SOL_SOCKET, 50) => ("SO_ATTACH_BPF", Int),
        (libc::SOL_SOCKET, 51) => ("SO_ATTACH_REUSEPORT_CBPF", Filter),
        (libc::SOL_SOCKET, 52) => ("SO_ATTACH_REUSEPORT_EBPF", Int),
        (libc::SOL_SOCKET, 62) => ("SO_BINDTOIFINDEX", Int),
        (libc::SOL_IP, 3) => ("IP_HDRINCL", Int),
        (libc::SOL_IP, 4) => ("IP_OPTIONS", Other),
        (libc::SOL_IP, 19) => ("IP_TRANSPARENT", Int),
        (libc::SOL_IP, 64) => ("IPT_SO_SET_REPLACE", Name),
        (libc::SOL_IP, 65) => ("IPT_SO_SET_ADD_COUNTERS", Name),
        (libc::SOL_IPV6, 36) => ("IPV6_HDRINCL", Int),
        (libc::SOL_IPV6, 64) => ("IP6T_SO_SET_REPLACE", Name),
        (libc::SOL_IPV6, 65) => ("IP6T_SO_SET_ADD_COUNTERS", Name),
        (libc::SOL_IPV6, 75) => ("IPV6_TRANSPARENT", Int),
        (libc::SOL_TCP, 19) => ("TCP_REPAIR", Int),
        (libc::SOL_TCP, 31) => ("TCP_ULP", Name),
        (libc::SOL_PACKET, 1) => ("PACKET_ADD_MEMBERSHIP", PacketMreq),
        _ => ("", Other),
    };
    let level = match level {
        libc::SOL_SOCKET => "SOL_SOCKET",
        libc::SOL_IP => "SOL_IP",
        libc::SOL_IPV6 => "SOL_IPV6",
        libc::SOL_TCP => "SOL_TCP",
        libc::SOL_PACKET => "SOL_PACKET",
        _ => "",
    };
    (level, option, value)
}

/// The option's value is read at entry, as the kernel copies it: a filter
/// program as the 8-byte instruction count it was passed with, then the
/// instructions read (at most BPF_MAXINSNS).
pub fn setsockopt_entry(cx: &mut Ctx<'_>, call: &mut Call) -> Next {
    if !SOCKOPTS_WATCHED.passes(&call.args) {
        return Next::Done;
    }
    let [_, level, name, value, len, _] = call.args;
    let len = len as u32 as usize;
    match option(level as i32, name as i32).2 {
        OptionValue::Int if len >= 4 => call.entry_bytes = cx.read_bytes(value, 4),
        OptionValue::Name => call.entry_bytes = cx.read_bytes(value, len.min(OPTION_NAME_MAX)),
        OptionValue::PacketMreq if len >= 8 => call.entry_bytes = cx.read_bytes(value, 8),
        OptionValue::Filter => read_filter(cx, call, value),
        _ => {}
    }
    Next::Exit
}

/// `struct sock_fprog { unsigned short len; struct sock_filter *filter; }`:
/// the pointer at a word's offset.
fn read_filter(cx: &mut Ctx<'_>, call: &mut Call, fprog: u64) {
    let word = call.abi.word_size();
    let header = cx.read_bytes(fprog, 2 * word);
    if header.len() < 2 * word {
        call.partial = true;
        return;
    }
    let count = usize::from(u16::from_ne_bytes([header[0], header[1]]));
    let program = match call.abi {
        Abi::I386 => u64::from(u32::from_ne_bytes(header[4..8].try_into().expect("4 bytes"))),
        _ => u64::from_ne_bytes(header[8..16].try_into().expect("8 bytes")),
    };
    let wanted = count.min(FILTER_MAX_INSTRUCTIONS) * 8;
    let instructions = cx.read_bytes(program, wanted);
    call.partial |= instructions.len() < wanted;
    call.entry_bytes = (count as u64).to_ne_bytes().to_vec();
    call.entry_bytes.extend_from_slice(&instructions);
}

pub fn setsockopt_exit(cx: &mut Ctx<'_>, call: &Call, retval: i64) {
    let [fd, level, name, _, len, _] = call.args;
    let (fd, level, name) = (fd as i32, level as i32, name as i32);
    let (level_name, option_name, kind) = option(level, name);
    let socket = sockaddr::socket_of(cx, fd);
    let kind_of_socket = socket.as_ref().and_then(procfs::socket_kind);
    let mut event = proto::SetsockoptEvent {
        fd: Some(fd),
        level,
        level_name: level_name.to_owned(),
        option: name,
        option_name: option_name.to_owned(),
        socket_family: socket.as_ref().and_then(procfs::socket_family),
        socket_type: kind_of_socket.map(|(t, _)| t),
        socket_protocol: kind_of_socket.map(|(_, p)| p),
        length: len as u32,
        ..Default::default()
    };
    let bytes = &call.entry_bytes;
    match kind {
        OptionValue::Int => event.value = call.entry_u32(0).map(|v| i64::from(v as i32)),
        OptionValue::Name => {
            let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
            event.name = text::lossless(&bytes[..end]);
        }
        OptionValue::PacketMreq => {
            event.value = bytes.get(4..6).map(|t| i64::from(u16::from_ne_bytes([t[0], t[1]])));
        }
        OptionValue::Filter => {
            event.filter_instructions = call.entry_u64(0).map(|count| count as u32);
            event.filter = bytes.get(8..).unwrap_or_default().to_vec();
        }
        OptionValue::Other => {}
    }
    // SO_ATTACH_FILTER's program, once attached, is the kernel's to tell.
    let attached = (retval == 0 && level == libc::SOL_SOCKET && name == libc::SO_ATTACH_FILTER)
        .then(|| socket.as_ref().and_then(procfs::socket_filter))
        .flatten();
    match attached {
        Some(program) if program != event.filter => {
            let why = "filter: read from the workload's memory, but the socket's program is the kernel's answer \
                       (the memory changed after the read, or another call replaced the filter)";
            event.filter_instructions = Some((program.len() / 8) as u32);
            event.filter = program;
            cx.emit_unverified(call, retval, why.to_owned(), Payload::Setsockopt(event));
        }
        _ => cx.emit_call(call, retval, false, Payload::Setsockopt(event)),
    }
}
