//! The agent's message structs (`pkg/security/proto/ebpfless/msg.go`), field
//! for field, in Go's declaration order: that order is the order of the
//! keys on the wire. SPEC.md sections 5 to 10 describe each field.

use std::net::IpAddr;

use super::wire::{go_struct, DecodeError, Int, Reader, Value, Writer};

/// `Message.Type`.
const MESSAGE_HELLO: i32 = 1;
const MESSAGE_SYSCALL: i32 = 2;
/// Made up by the agent when a connection ends; never to be sent.
const MESSAGE_GOODBYE: i32 = 3;
/// An envelope key of ours, `true` in [`Message::Probe`]. The agent skips it
/// as it skips every key it does not know (SPEC.md section 4).
const OFFERS_GRPC: &str = "OffersGRPC";

/// `ExitSyscallMsg.Cause`.
pub const EXIT_CAUSE_EXITED: u32 = 0;
pub const EXIT_CAUSE_CORE_DUMPED: u32 = 1;
pub const EXIT_CAUSE_SIGNALED: u32 = 2;

/// `LinkSyscallMsg.Type`.
pub const LINK_SYMBOLIC: u8 = 0;
pub const LINK_HARD: u8 = 1;

/// `HelloMsg.Mode`.
pub const MODE_WRAPPED: &str = "wrapped";
pub const MODE_ATTACHED: &str = "attached";
pub const MODE_UNKNOWN: &str = "unknown";

go_struct! {
    pub struct Credentials {
        "UID" => uid: u32,
        "User" => user: String,
        "EUID" => euid: u32,
        "EUser" => euser: String,
        "GID" => gid: u32,
        "Group" => group: String,
        "EGID" => egid: u32,
        "EGroup" => egroup: String,
    }
}

go_struct! {
    /// A file and what `lstat` said of it (zero when not looked at).
    pub struct FileSyscallMsg {
        "Filename" => filename: String,
        "CTime" => ctime: u64,
        "MTime" => mtime: u64,
        "Mode" => mode: u32,
        "Inode" => inode: u64,
        /// The owner: only UID, User, GID and Group are filled.
        "Credentials" => credentials: Option<Credentials>,
    }
}

go_struct! {
    pub struct ContainerContext {
        "ID" => id: String,
        /// Nanoseconds since the epoch.
        "CreatedAt" => created_at: u64,
    }
}

go_struct! {
    pub struct HelloMsg {
        /// Inode of the tracer's pid namespace; must not be 0.
        "NSID" => nsid: u64,
        "ContainerContext" => container_context: Option<ContainerContext>,
        /// nil in attach mode.
        "EntrypointArgs" => entrypoint_args: Option<Vec<String>>,
        "Mode" => mode: String,
    }
}

go_struct! {
    pub struct TraceId {
        "Lo" => lo: u64,
        "Hi" => hi: u64,
    }
}

go_struct! {
    pub struct SpanContext {
        "SpanID" => span_id: u64,
        "TraceID" => trace_id: TraceId,
    }
}

go_struct! {
    pub struct ExecSyscallMsg {
        "File" => file: FileSyscallMsg,
        /// nil when argv is empty.
        "Args" => args: Option<Vec<String>>,
        "ArgsTruncated" => args_truncated: bool,
        "Envs" => envs: Option<Vec<String>>,
        "EnvsTruncated" => envs_truncated: bool,
        "TTY" => tty: String,
        /// nil: the agent keeps the credentials it has for the process.
        "Credentials" => credentials: Option<Credentials>,
        "PPID" => ppid: u32,
        "FromProcFS" => from_procfs: bool,
    }
}

go_struct! {
    pub struct ForkSyscallMsg {
        "PPID" => ppid: u32,
    }
}

go_struct! {
    pub struct ExitSyscallMsg {
        /// Exit status, or the signal number.
        "Code" => code: u32,
        "Cause" => cause: u32,
    }
}

go_struct! {
    pub struct OpenSyscallMsg {
        ..file: FileSyscallMsg as "FileSyscallMsg",
        "Flags" => flags: u32,
    }
}

go_struct! {
    /// -1: unchanged.
    pub struct SetUidSyscallMsg {
        "UID" => uid: i32,
        "User" => user: String,
        "EUID" => euid: i32,
        "EUser" => euser: String,
    }
}

go_struct! {
    /// -1: unchanged.
    pub struct SetGidSyscallMsg {
        "GID" => gid: i32,
        "Group" => group: String,
        "EGID" => egid: i32,
        "EGroup" => egroup: String,
    }
}

go_struct! {
    pub struct SetFsUidSyscallMsg {
        "FSUID" => fsuid: i32,
        "FSUser" => fsuser: String,
    }
}

go_struct! {
    pub struct SetFsGidSyscallMsg {
        "FSGID" => fsgid: i32,
        "FSGroup" => fsgroup: String,
    }
}

go_struct! {
    pub struct CapsetSyscallMsg {
        "Effective" => effective: u64,
        "Permitted" => permitted: u64,
    }
}

go_struct! {
    pub struct UnlinkSyscallMsg {
        "File" => file: FileSyscallMsg,
    }
}

go_struct! {
    pub struct RmdirSyscallMsg {
        "File" => file: FileSyscallMsg,
    }
}

go_struct! {
    pub struct RenameSyscallMsg {
        "OldFile" => old_file: FileSyscallMsg,
        "NewFile" => new_file: FileSyscallMsg,
    }
}

go_struct! {
    pub struct MkdirSyscallMsg {
        "Dir" => dir: FileSyscallMsg,
        /// The mode asked for.
        "Mode" => mode: u32,
    }
}

go_struct! {
    pub struct UtimesSyscallMsg {
        "File" => file: FileSyscallMsg,
        "ATime" => atime: u64,
        "MTime" => mtime: u64,
    }
}

go_struct! {
    pub struct LinkSyscallMsg {
        /// `LINK_SYMBOLIC` or `LINK_HARD`.
        "Type" => link_type: u8,
        /// The existing file (a symlink's contents).
        "Target" => target: FileSyscallMsg,
        /// The new name.
        "Link" => link: FileSyscallMsg,
    }
}

go_struct! {
    pub struct ChmodSyscallMsg {
        "File" => file: FileSyscallMsg,
        /// The mode asked for.
        "Mode" => mode: u32,
    }
}

go_struct! {
    /// -1: unchanged.
    pub struct ChownSyscallMsg {
        "File" => file: FileSyscallMsg,
        "UID" => uid: i32,
        "User" => user: String,
        "GID" => gid: i32,
        "Group" => group: String,
    }
}

go_struct! {
    pub struct LoadModuleSyscallMsg {
        "File" => file: FileSyscallMsg,
        "LoadedFromMemory" => loaded_from_memory: bool,
        "Name" => name: String,
        "Args" => args: String,
    }
}

go_struct! {
    pub struct UnloadModuleSyscallMsg {
        "Name" => name: String,
    }
}

go_struct! {
    pub struct ChdirSyscallMsg {
        "Dir" => dir: FileSyscallMsg,
    }
}

go_struct! {
    pub struct MountSyscallMsg {
        "Source" => source: String,
        "Target" => target: String,
        "FSType" => fs_type: String,
    }
}

go_struct! {
    pub struct UmountSyscallMsg {
        "Path" => path: String,
    }
}

go_struct! {
    pub struct MsgSocketInfo {
        /// AF_*.
        "AddressFamily" => address_family: u16,
        /// None: the empty IP (AF_UNIX).
        "Addr" => addr: Option<IpAddr>,
        "Port" => port: u16,
    }
}

go_struct! {
    pub struct BindSyscallMsg {
        ..socket: MsgSocketInfo as "MsgSocketInfo",
        "Protocol" => protocol: u16,
    }
}

go_struct! {
    pub struct ConnectSyscallMsg {
        ..socket: MsgSocketInfo as "MsgSocketInfo",
        "Protocol" => protocol: u16,
    }
}

go_struct! {
    /// `socket` is the peer, with the listening socket's port.
    pub struct AcceptSyscallMsg {
        ..socket: MsgSocketInfo as "MsgSocketInfo",
        "SocketFd" => socket_fd: i32,
    }
}

go_struct! {
    pub struct SetsockoptSyscallMsg {
        "SocketFamily" => socket_family: u16,
        "SocketProtocol" => socket_protocol: u16,
        "SocketType" => socket_type: u16,
        "Level" => level: u32,
        "OptName" => opt_name: u32,
        /// The classic BPF program of SO_ATTACH_FILTER.
        "Filter" => filter: Option<Vec<u8>>,
        "FilterLen" => filter_len: u16,
    }
}

go_struct! {
    pub struct SetrlimitSyscallMsg {
        "Resource" => resource: Int,
        "CurLimit" => cur_limit: u64,
        "MaxLimit" => max_limit: u64,
        "Pid" => pid: u32,
    }
}

go_struct! {
    pub struct PrctlSyscallMsg {
        "Option" => option: Int,
        "Arg2" => arg2: u64,
        "NewName" => new_name: String,
    }
}

go_struct! {
    pub struct SocketSyscallMsg {
        "Domain" => domain: Int,
        "Type" => socket_type: Int,
        "Protocol" => protocol: Int,
    }
}

go_struct! {
    /// Tracer-internal socket state, left set by the Go tracer on Socket
    /// messages; the agent ignores it.
    pub struct FakeSocketMsg {
        "AddressFamily" => address_family: u16,
        "Protocol" => protocol: u16,
        "SocketType" => socket_type: u16,
    }
}

/// Defines `Payload`: one variant per `SyscallType`, with its number and its
/// key in `SyscallMsg`.
macro_rules! payloads {
    ($($number:literal $variant:ident($ty:ty) $key:literal,)*) => {
        /// The one payload of a `SyscallMsg`; the message's `Type` comes from
        /// it, so the key the agent reads for that type is never nil.
        #[derive(Clone, Debug, PartialEq)]
        pub enum Payload {
            $($variant($ty),)*
        }

        impl Payload {
            /// `SyscallType`.
            pub fn syscall_type(&self) -> i32 {
                match self {
                    $(Payload::$variant(_) => $number,)*
                }
            }

            /// Its key in `SyscallMsg`, which names the type.
            pub fn key(&self) -> &'static str {
                match self {
                    $(Payload::$variant(_) => $key,)*
                }
            }

            fn encode_value(&self, w: &mut Writer) {
                match self {
                    $(Payload::$variant(value) => value.encode(w),)*
                }
            }

            /// The payload under `key` (None when nil), or Err(false) when
            /// `key` names no payload.
            fn decode(key: &[u8], r: &mut Reader<'_>) -> Result<Option<Payload>, Option<DecodeError>> {
                $(
                    if key == $key.as_bytes() {
                        let value: Option<$ty> = Value::decode(r).map_err(Some)?;
                        return Ok(value.map(Payload::$variant));
                    }
                )*
                Err(None)
            }

            fn is_known(syscall_type: i32) -> bool {
                [$($number),*].contains(&syscall_type)
            }
        }
    };
}

payloads! {
    1 Exec(ExecSyscallMsg) "Exec",
    2 Fork(ForkSyscallMsg) "Fork",
    3 Open(OpenSyscallMsg) "Open",
    4 Exit(ExitSyscallMsg) "Exit",
    5 SetUid(SetUidSyscallMsg) "SetUID",
    6 SetGid(SetGidSyscallMsg) "SetGID",
    7 SetFsUid(SetFsUidSyscallMsg) "SetFSUID",
    8 SetFsGid(SetFsGidSyscallMsg) "SetFSGID",
    9 Capset(CapsetSyscallMsg) "Capset",
    10 Unlink(UnlinkSyscallMsg) "Unlink",
    11 Rmdir(RmdirSyscallMsg) "Rmdir",
    12 Rename(RenameSyscallMsg) "Rename",
    13 Mkdir(MkdirSyscallMsg) "Mkdir",
    14 Utimes(UtimesSyscallMsg) "Utimes",
    15 Link(LinkSyscallMsg) "Link",
    16 Chmod(ChmodSyscallMsg) "Chmod",
    17 Chown(ChownSyscallMsg) "Chown",
    18 LoadModule(LoadModuleSyscallMsg) "LoadModule",
    19 UnloadModule(UnloadModuleSyscallMsg) "UnloadModule",
    20 Chdir(ChdirSyscallMsg) "Chdir",
    21 Mount(MountSyscallMsg) "Mount",
    22 Umount(UmountSyscallMsg) "Umount",
    23 Accept(AcceptSyscallMsg) "Accept",
    24 Connect(ConnectSyscallMsg) "Connect",
    25 Bind(BindSyscallMsg) "Bind",
    26 Setsockopt(SetsockoptSyscallMsg) "Setsockopt",
    27 Setrlimit(SetrlimitSyscallMsg) "Setrlimit",
    28 Prctl(PrctlSyscallMsg) "Prctl",
    29 Socket(SocketSyscallMsg) "Socket",
}

/// The keys of `SyscallMsg` after its common fields, in Go's order: the
/// payloads, with the tracer-internal `Fcntl`, `Dup`, `Pipe` and
/// `FakeSocket` where Go declares them.
const PAYLOAD_KEYS: [&str; 33] = [
    "Exec",
    "Open",
    "Fork",
    "Exit",
    "Fcntl",
    "SetUID",
    "SetGID",
    "SetFSUID",
    "SetFSGID",
    "Capset",
    "Unlink",
    "Rmdir",
    "Rename",
    "Mkdir",
    "Utimes",
    "Link",
    "Chmod",
    "Chown",
    "LoadModule",
    "UnloadModule",
    "Chdir",
    "Mount",
    "Umount",
    "Bind",
    "Connect",
    "Accept",
    "Setsockopt",
    "Setrlimit",
    "Prctl",
    "Socket",
    "Dup",
    "Pipe",
    "FakeSocket",
];

/// The common fields before the payloads: Type, PID, SpanContext,
/// Timestamp, Retval, ContainerID, CGroupID.
const COMMON_KEYS: usize = 7;

/// `SyscallMsg`.
#[derive(Clone, Debug, PartialEq)]
pub struct SyscallMsg {
    /// The process (tgid); for Fork, the child.
    pub pid: u32,
    pub span_context: Option<SpanContext>,
    /// Nanoseconds since the epoch.
    pub timestamp: u64,
    pub retval: i64,
    pub container_id: String,
    pub cgroup_id: String,
    pub payload: Payload,
    pub fake_socket: Option<FakeSocketMsg>,
}

impl SyscallMsg {
    fn encode(&self, w: &mut Writer) {
        w.map_len(COMMON_KEYS + PAYLOAD_KEYS.len());
        w.str("Type");
        self.payload.syscall_type().encode(w);
        w.str("PID");
        self.pid.encode(w);
        w.str("SpanContext");
        self.span_context.encode(w);
        w.str("Timestamp");
        self.timestamp.encode(w);
        w.str("Retval");
        self.retval.encode(w);
        w.str("ContainerID");
        self.container_id.encode(w);
        w.str("CGroupID");
        self.cgroup_id.encode(w);
        for key in PAYLOAD_KEYS {
            w.str(key);
            if key == self.payload.key() {
                self.payload.encode_value(w);
            } else if key == "FakeSocket" {
                self.fake_socket.encode(w);
            } else {
                w.nil();
            }
        }
    }
}

/// A `SyscallMsg` as read, before its payload is chosen by its type (keys
/// may come in any order, and more than one payload may be set: the agent
/// reads only the one of the type).
#[derive(Default)]
struct SyscallFields {
    syscall_type: i32,
    pid: u32,
    span_context: Option<SpanContext>,
    timestamp: u64,
    retval: i64,
    container_id: String,
    cgroup_id: String,
    payloads: Vec<Payload>,
    fake_socket: Option<FakeSocketMsg>,
}

impl SyscallFields {
    fn decode(r: &mut Reader<'_>) -> Result<Option<SyscallFields>, DecodeError> {
        let Some(len) = r.map_len()? else { return Ok(None) };
        let mut fields = SyscallFields::default();
        for _ in 0..len {
            match r.key()? {
                b"Type" => fields.syscall_type = Value::decode(r)?,
                b"PID" => fields.pid = Value::decode(r)?,
                b"SpanContext" => fields.span_context = Value::decode(r)?,
                b"Timestamp" => fields.timestamp = Value::decode(r)?,
                b"Retval" => fields.retval = Value::decode(r)?,
                b"ContainerID" => fields.container_id = Value::decode(r)?,
                b"CGroupID" => fields.cgroup_id = Value::decode(r)?,
                b"FakeSocket" => fields.fake_socket = Value::decode(r)?,
                key => match Payload::decode(key, r) {
                    Ok(payload) => fields.payloads.extend(payload),
                    Err(Some(error)) => return Err(error),
                    // Unknown keys and the other internal fields.
                    Err(None) => r.skip()?,
                },
            }
        }
        Ok(Some(fields))
    }

    fn into_message(self) -> Result<Received, DecodeError> {
        if !Payload::is_known(self.syscall_type) {
            return Ok(Received::UnknownSyscall(self.syscall_type));
        }
        let syscall_type = self.syscall_type;
        let payload = self
            .payloads
            .into_iter()
            .rev()
            .find(|p| p.syscall_type() == syscall_type)
            .ok_or(DecodeError::MissingPayload(syscall_type))?;
        Ok(Received::Message(Message::Syscall(Box::new(SyscallMsg {
            pid: self.pid,
            span_context: self.span_context,
            timestamp: self.timestamp,
            retval: self.retval,
            container_id: self.container_id,
            cgroup_id: self.cgroup_id,
            payload,
            fake_socket: self.fake_socket,
        }))))
    }
}

/// What a tracer sends: `Message` with `Type` 1 or 2. Goodbye (3) is the
/// agent's own and cannot be built.
#[derive(Clone, Debug, PartialEq)]
pub enum Message {
    Hello(HelloMsg),
    /// The Hello of `--probe-protocol auto` (`export::probe`): to the agent a
    /// Hello like any other, the first frame of the connection it keeps; the
    /// envelope also says the tracer speaks gRPC, and `serve`, which speaks
    /// both, answers with HTTP/2 at once (a Datadog agent never answers).
    Probe(HelloMsg),
    Syscall(Box<SyscallMsg>),
}

/// A frame as the agent reads it.
#[derive(Clone, Debug, PartialEq)]
pub enum Received {
    Message(Message),
    /// Type 3: the agent forgets the connection's container, as at its end.
    Goodbye,
    /// Another message type: the agent logs it and reads on.
    UnknownMessage(i32),
    /// A syscall type the agent does not know (0, or newer than Socket): it
    /// dispatches an event without type.
    UnknownSyscall(i32),
}

impl Message {
    /// The msgpack body.
    pub fn encode(&self, w: &mut Writer) {
        let probe = matches!(self, Message::Probe(_));
        w.map_len(if probe { 4 } else { 3 });
        w.str("Type");
        match self {
            Message::Hello(hello) | Message::Probe(hello) => {
                MESSAGE_HELLO.encode(w);
                w.str("Hello");
                hello.encode(w);
                w.str("Syscall");
                w.nil();
            }
            Message::Syscall(syscall) => {
                MESSAGE_SYSCALL.encode(w);
                w.str("Hello");
                w.nil();
                w.str("Syscall");
                syscall.encode(w);
            }
        }
        if probe {
            w.str(OFFERS_GRPC);
            true.encode(w);
        }
    }

    /// Reads one body as `msgpack.Unmarshal` into the agent's `Message`
    /// does (bytes after the first value are ignored, as there). A message
    /// the agent would crash on (a Hello or Syscall type without its map, a
    /// syscall type without its payload) is an error.
    pub fn decode(body: &[u8]) -> Result<Received, DecodeError> {
        let mut r = Reader::new(body);
        let (mut message_type, mut hello, mut syscall, mut offers_grpc) = (0i32, None, None, false);
        let len = r.map_len()?.unwrap_or(0);
        for _ in 0..len {
            match r.key()? {
                b"Type" => message_type = Value::decode(&mut r)?,
                b"Hello" => hello = Value::decode(&mut r)?,
                b"Syscall" => syscall = SyscallFields::decode(&mut r)?,
                // Skipped whatever it holds, as by the agent, which does not know it.
                key if key == OFFERS_GRPC.as_bytes() => offers_grpc = r.skip_noting_true()?,
                _ => r.skip()?,
            }
        }
        let hello_of = |h| if offers_grpc { Message::Probe(h) } else { Message::Hello(h) };
        match message_type {
            MESSAGE_HELLO => hello.map(|h| Received::Message(hello_of(h))).ok_or(DecodeError::MissingHello),
            MESSAGE_SYSCALL => syscall.ok_or(DecodeError::MissingSyscall)?.into_message(),
            MESSAGE_GOODBYE => Ok(Received::Goodbye),
            other => Ok(Received::UnknownMessage(other)),
        }
    }
}
