//! Our Hello and events as the agent's messages.
//!
//! What the agent is sent is what Datadog's tracer sends, where that is
//! true: the agent applies some messages to its process cache whatever their
//! return value says, so an event it would take for a fact it is not is left
//! out (None, for the caller to count):
//! - exec: successful ones only (a failed exec would replace the process's
//!   image in the agent's cache);
//! - set*uid, set*gid, capset: successful ones only, with the ids and
//!   capabilities the kernel has after the call (Datadog's tracer sends the
//!   ids asked for, also when refused, and the agent applies them);
//!   setfsuid and setfsgid always, with the kernel's fsuid/fsgid;
//! - other calls with the return values Datadog's tracer sends them with:
//!   success, EACCES and EPERM, and for connect ECONNREFUSED, ETIMEDOUT and
//!   EINPROGRESS, for bind EADDRINUSE and EFAULT, for accept ECONNABORTED.
//!   The agent's rules rarely test return values: the failed opens of every
//!   library search would each look like an open;
//! - AF_UNIX connects are not sent (nor by Datadog's tracer); sockets of
//!   other families than IPv4, IPv6 and AF_UNIX, and unreadable addresses,
//!   cannot be: the agent drops the connection for an IP it cannot parse;
//! - mount goes as Mount, a bind mount (MS_BIND) with FSType `bind` as
//!   Datadog's tracer sends it, umount2 (and i386's umount) as Umount;
//! - io_uring_setup, bpf, signals and datagrams sent to a destination have
//!   no Datadog type, nor truncate, the xattr calls, mknod, setgroups,
//!   chroot, pivot_root, unshare and setns; a
//!   send with MSG_FASTOPEN (a TCP connection) goes as a Connect; prctl goes
//!   for the options we watch (Datadog's tracer sends every prctl call);
//! - setsockopt goes only when the socket's kind could be read (the agent
//!   takes it as fact), with the program of SO_ATTACH_FILTER only, as
//!   Datadog's tracer sends it; socket(2) goes for the raw and packet
//!   sockets we report (Datadog's tracer sends every socket call);
//! - the utime family goes as Utimes, UTIME_NOW (or no times) as the
//!   call's entry time, UTIME_OMIT and times before 1970 as 0; memfd_create
//!   as an Open of `memfd:NAME` with the MFD_* flags, as Datadog's tracer
//!   sends them.
//!
//! File metadata (CTime, MTime, Mode, Inode and the owner with its names)
//! is filled from our events' where they carry it (open, exec, and the
//! file acted on by unlink, rmdir, rename, mkdir, link, symlink, chmod,
//! chown and the utime family; not a rename's new name, a link's target or
//! a chdir's directory, and not a script's, whose executable is its
//! interpreter), and chown's User and Group. Fields we cannot fill: the
//! names in credentials, SpanContext. ContainerID and CGroupID are the
//! process's, filled by the exporter (`export::datadog`). Fields we fill
//! differently: Timestamp is when the syscall was entered (Datadog's: when
//! the message is sent); an exec's Filename is the path asked for made
//! absolute, symlinks not resolved (Datadog's tracer resolves them in its
//! own mount namespace).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use crate::proto::{self, event::Payload as Ours, AddressFamily, Event, ExitCause, FileOperation, Mode, Protocol};

use super::msg::*;
use super::wire::Int;

/// The Hello that opens every connection.
pub fn hello(hello: &proto::Hello) -> HelloMsg {
    let container = hello.container.as_ref();
    HelloMsg {
        nsid: match hello.pid_namespace {
            0 => nsid_of_session(&hello.session_id),
            inode => inode,
        },
        container_context: Some(ContainerContext {
            id: container.map(|c| c.id.clone()).unwrap_or_default(),
            created_at: nanos(container.and_then(|c| c.created_at.as_ref())),
        }),
        entrypoint_args: (hello.mode() != Mode::Attached).then(|| hello.entrypoint_args.clone()),
        mode: match hello.mode() {
            Mode::Wrapped => MODE_WRAPPED,
            Mode::Attached => MODE_ATTACHED,
            Mode::Unspecified => MODE_UNKNOWN,
        }
        .to_owned(),
    }
}

/// An NSID when the pid namespace could not be read: the agent ignores a
/// Hello with NSID 0, and keys its process cache by NSID, so it must be
/// non-zero and the same on every connection of this run (as the session
/// id is). FNV-1a.
fn nsid_of_session(session_id: &str) -> u64 {
    let hash =
        session_id.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3));
    hash.max(1)
}

/// Nanoseconds since the epoch (0 when unknown or before 1970).
fn nanos(time: Option<&pbjson_types::Timestamp>) -> u64 {
    time.and_then(|t| {
        let seconds = u64::try_from(t.seconds).ok()?;
        seconds.checked_mul(1_000_000_000)?.checked_add(u64::try_from(t.nanos).ok()?)
    })
    .unwrap_or(0)
}

/// The message for one of our events, or None when the agent has no type
/// for it or would take it for what it is not (see the module comment).
/// `container_id` is the process's, when the caller knows it.
pub fn syscall(event: &Event, container_id: &str) -> Option<SyscallMsg> {
    let retval = event.retval.unwrap_or(0);
    let (pid, payload) = match event.payload.as_ref()? {
        Ours::Exec(exec) if retval == 0 => (event.pid, Payload::Exec(exec_msg(exec, event.ppid))),
        Ours::Exec(_) => return None,
        // The agent wants the child's pid, and the parent in the payload.
        Ours::Fork(fork) => (fork.child_pid, Payload::Fork(ForkSyscallMsg { ppid: event.pid })),
        Ours::Exit(exit) => (event.pid, Payload::Exit(exit_msg(exit)?)),
        Ours::Open(open) if accepted(retval) => (event.pid, Payload::Open(open_msg(open)?)),
        Ours::File(file) if accepted(retval) => (event.pid, file_msg(file, event.timestamp.as_ref())?),
        Ours::Chdir(chdir) if accepted(retval) => {
            (event.pid, Payload::Chdir(ChdirSyscallMsg { dir: file_named(&chdir.path) }))
        }
        Ours::Credentials(credentials) => (event.pid, credentials_msg(&event.syscall, credentials, retval)?),
        // A send to a destination is a connection only with TCP Fast Open.
        Ours::Connect(connect)
            if connect_sent(retval)
                && connect.family() != AddressFamily::Unix
                && (!matches!(event.syscall.as_str(), "sendto" | "sendmsg" | "sendmmsg")
                    || connect.send_flags & MSG_FASTOPEN != 0) =>
        {
            let socket = socket_info(connect.family(), &connect.address, connect.port)?;
            (event.pid, Payload::Connect(ConnectSyscallMsg { socket, protocol: protocol_number(connect.protocol()) }))
        }
        Ours::Bind(bind) if bind_sent(retval) => {
            let socket = socket_info(bind.family(), &bind.address, bind.port)?;
            (event.pid, Payload::Bind(BindSyscallMsg { socket, protocol: protocol_number(bind.protocol()) }))
        }
        // The agent's Port is the port the connection arrived on.
        Ours::Accept(accept) if accept_sent(retval) => {
            let socket = socket_info(accept.family(), &accept.address, accept.local_port)?;
            (event.pid, Payload::Accept(AcceptSyscallMsg { socket, socket_fd: accept.fd.unwrap_or(0) }))
        }
        Ours::Prctl(prctl) if accepted(retval) => (
            event.pid,
            Payload::Prctl(PrctlSyscallMsg {
                option: Int(i64::from(prctl.option)),
                arg2: prctl.arg2,
                new_name: prctl.new_name.clone(),
            }),
        ),
        Ours::Rlimit(rlimit) if accepted(retval) => (
            event.pid,
            Payload::Setrlimit(SetrlimitSyscallMsg {
                resource: Int(i64::from(rlimit.resource)),
                cur_limit: rlimit.soft?,
                max_limit: rlimit.hard?,
                pid: rlimit.pid,
            }),
        ),
        Ours::Setsockopt(opt) if accepted(retval) => (event.pid, Payload::Setsockopt(setsockopt_msg(opt)?)),
        Ours::Socket(socket) if accepted(retval) => (
            event.pid,
            Payload::Socket(SocketSyscallMsg {
                domain: Int(i64::from(socket.family)),
                socket_type: Int(i64::from(socket.r#type)),
                protocol: Int(i64::from(socket.protocol)),
            }),
        ),
        Ours::Module(module) if accepted(retval) => (event.pid, module_msg(&event.syscall, module)?),
        Ours::Namespace(ns) if accepted(retval) => (event.pid, mount_msg(&event.syscall, ns)?),
        _ => return None,
    };
    Some(SyscallMsg {
        pid,
        span_context: None,
        timestamp: nanos(event.timestamp.as_ref()),
        // Datadog's tracer sends 0 for forks and exits.
        retval: if matches!(payload, Payload::Fork(_) | Payload::Exit(_)) { 0 } else { retval },
        container_id: container_id.to_owned(),
        cgroup_id: String::new(),
        payload,
        fake_socket: None,
    })
}

/// MSG_FASTOPEN: a send that opens a TCP connection.
const MSG_FASTOPEN: u32 = 0x2000_0000;

/// The socket's kind as the agent takes it (u16 each), and SO_ATTACH_FILTER's
/// program (the only filter Datadog's tracer sends).
fn setsockopt_msg(opt: &proto::SetsockoptEvent) -> Option<SetsockoptSyscallMsg> {
    let filter = (opt.level == libc::SOL_SOCKET && opt.option == libc::SO_ATTACH_FILTER && !opt.filter.is_empty())
        .then(|| opt.filter.clone());
    Some(SetsockoptSyscallMsg {
        socket_family: u16::try_from(opt.socket_family?).ok()?,
        socket_protocol: opt.socket_protocol? as u16,
        socket_type: u16::try_from(opt.socket_type?).ok()?,
        level: opt.level as u32,
        opt_name: opt.option as u32,
        filter_len: filter.as_ref().map_or(0, |f| (f.len() / 8) as u16),
        filter,
    })
}

/// MS_BIND: Datadog's tracer sends a bind mount with FSType `bind`.
const MS_BIND: u64 = 0x1000;

/// mount and umount as Datadog's Mount and Umount; the other namespace
/// calls (chroot, pivot_root, unshare, setns) have no Datadog type.
fn mount_msg(syscall: &str, ns: &proto::NamespaceEvent) -> Option<Payload> {
    Some(match syscall {
        "mount" => Payload::Mount(MountSyscallMsg {
            source: ns.source.clone(),
            target: ns.path.clone(),
            fs_type: if ns.flags & MS_BIND != 0 { "bind".to_owned() } else { ns.fstype.clone() },
        }),
        "umount2" | "umount" => Payload::Umount(UmountSyscallMsg { path: ns.path.clone() }),
        _ => return None,
    })
}

fn module_msg(syscall: &str, module: &proto::ModuleEvent) -> Option<Payload> {
    Some(match syscall {
        "init_module" => Payload::LoadModule(LoadModuleSyscallMsg {
            loaded_from_memory: true,
            name: module.name.clone(),
            args: module.args.clone(),
            ..Default::default()
        }),
        "finit_module" => Payload::LoadModule(LoadModuleSyscallMsg {
            file: file_named(&module.path),
            loaded_from_memory: false,
            name: module.name.clone(),
            args: module.args.clone(),
        }),
        "delete_module" => Payload::UnloadModule(UnloadModuleSyscallMsg { name: module.name.clone() }),
        _ => return None,
    })
}

fn accepted(retval: i64) -> bool {
    retval >= 0 || errno_in(retval, &[libc::EACCES, libc::EPERM])
}

fn connect_sent(retval: i64) -> bool {
    accepted(retval) || errno_in(retval, &[libc::ECONNREFUSED, libc::ETIMEDOUT, libc::EINPROGRESS])
}

fn bind_sent(retval: i64) -> bool {
    accepted(retval) || errno_in(retval, &[libc::EADDRINUSE, libc::EFAULT])
}

fn accept_sent(retval: i64) -> bool {
    accepted(retval) || errno_in(retval, &[libc::ECONNABORTED])
}

fn errno_in(retval: i64, errnos: &[i32]) -> bool {
    errnos.iter().any(|&errno| retval == -i64::from(errno))
}

/// A file known by its path only.
fn file_named(path: &str) -> FileSyscallMsg {
    FileSyscallMsg { filename: path.to_owned(), ..Default::default() }
}

/// A file and what stat said of it, as Datadog's tracer fills them: the
/// metadata zero and the owner nil without it (`--disable-stats`, a memfd,
/// no file). Times before 1970 are 0: the agent's are unsigned.
fn file_described(path: &str, inode: u64, metadata: Option<&proto::FileMetadata>) -> FileSyscallMsg {
    let Some(meta) = metadata else { return FileSyscallMsg { inode, ..file_named(path) } };
    let nanos = |time: Option<i64>| time.and_then(|t| u64::try_from(t).ok()).unwrap_or(0);
    FileSyscallMsg {
        filename: path.to_owned(),
        ctime: nanos(meta.ctime),
        mtime: nanos(meta.mtime),
        mode: meta.mode,
        inode,
        credentials: Some(Credentials {
            uid: meta.uid,
            user: meta.user.clone().unwrap_or_default(),
            gid: meta.gid,
            group: meta.group.clone().unwrap_or_default(),
            ..Default::default()
        }),
    }
}

fn exec_msg(exec: &proto::ExecEvent, ppid: u32) -> ExecSyscallMsg {
    // The program asked for (a script, not its interpreter), as Datadog's
    // tracer names it; what the kernel runs when that could not be read.
    let filename = if exec.path.is_empty() { &exec.executable } else { &exec.path };
    // The metadata is the executable's: a script's interpreter's is not the script's.
    let file = match exec.interpreter.is_empty() {
        true => file_described(filename, exec.inode, exec.metadata.as_ref()),
        false => file_named(filename),
    };
    ExecSyscallMsg {
        file,
        // Datadog's tracer sends a nil argv when it is empty.
        args: (!exec.args.is_empty()).then(|| exec.args.clone()),
        args_truncated: exec.args_truncated,
        envs: Some(exec.envs.clone()),
        envs_truncated: exec.envs_truncated,
        tty: datadog_tty(&exec.tty),
        credentials: exec.credentials.as_ref().and_then(process_credentials),
        ppid,
        // The agent links a process it did not see start to its parent by ppid.
        from_procfs: exec.from_procfs || exec.seen_at_attach,
    }
}

/// A terminal as Datadog's tracer names it: `pts3` for `/dev/pts/3`, the
/// device's name for others.
fn datadog_tty(tty: &str) -> String {
    match tty.strip_prefix("/dev/pts/") {
        Some(number) => format!("pts{number}"),
        None => tty.strip_prefix("/dev/").unwrap_or("").to_owned(),
    }
}

/// Real and effective ids after the exec, when the kernel gave them all;
/// nil leaves the agent with the ones it has.
fn process_credentials(ids: &proto::Credentials) -> Option<Credentials> {
    Some(Credentials { uid: ids.uid?, euid: ids.euid?, gid: ids.gid?, egid: ids.egid?, ..Default::default() })
}

fn exit_msg(exit: &proto::ExitEvent) -> Option<ExitSyscallMsg> {
    Some(match exit.cause() {
        ExitCause::Exited => ExitSyscallMsg { code: exit.code? as u32, cause: EXIT_CAUSE_EXITED },
        ExitCause::Signaled => ExitSyscallMsg {
            code: exit.signal? as u32,
            cause: if exit.core_dumped { EXIT_CAUSE_CORE_DUMPED } else { EXIT_CAUSE_SIGNALED },
        },
        ExitCause::Unspecified => return None,
    })
}

fn open_msg(open: &proto::OpenEvent) -> Option<OpenSyscallMsg> {
    // Mode is the creation mode, as Datadog's tracer sends it when the call
    // carries one, otherwise the file's st_mode.
    let file = file_described(&open.path, open.inode, open.metadata.as_ref());
    let file = FileSyscallMsg { mode: if open.mode != 0 { open.mode } else { file.mode }, ..file };
    Some(OpenSyscallMsg { file, flags: open.flags? as u32 })
}

fn file_msg(file: &proto::FileEvent, called: Option<&pbjson_types::Timestamp>) -> Option<Payload> {
    let path = || file_described(&file.path, file.inode, file.metadata.as_ref());
    let target = || file_named(&file.target);
    Some(match file.operation() {
        FileOperation::Unlink => Payload::Unlink(UnlinkSyscallMsg { file: path() }),
        FileOperation::Rmdir => Payload::Rmdir(RmdirSyscallMsg { file: path() }),
        FileOperation::Rename => Payload::Rename(RenameSyscallMsg { old_file: path(), new_file: target() }),
        FileOperation::Mkdir => Payload::Mkdir(MkdirSyscallMsg { dir: path(), mode: file.mode? }),
        FileOperation::Link => Payload::Link(LinkSyscallMsg { link_type: LINK_HARD, target: target(), link: path() }),
        FileOperation::Symlink => {
            Payload::Link(LinkSyscallMsg { link_type: LINK_SYMBOLIC, target: target(), link: path() })
        }
        FileOperation::Chmod => Payload::Chmod(ChmodSyscallMsg { file: path(), mode: file.mode? }),
        // Ids are 32-bit, -1 for unchanged, as the kernel takes them.
        FileOperation::Chown => Payload::Chown(ChownSyscallMsg {
            file: path(),
            uid: file.uid? as i32,
            user: file.user.clone().unwrap_or_default(),
            gid: file.gid? as i32,
            group: file.group.clone().unwrap_or_default(),
        }),
        FileOperation::Utimes => Payload::Utimes(UtimesSyscallMsg {
            file: path(),
            atime: file_time(file.access_time.as_ref()?, called),
            mtime: file_time(file.modification_time.as_ref()?, called),
        }),
        FileOperation::MemfdCreate => {
            Payload::Open(OpenSyscallMsg { file: file_named(&format!("memfd:{}", file.name)), flags: file.flags })
        }
        FileOperation::Truncate
        | FileOperation::Setxattr
        | FileOperation::Removexattr
        | FileOperation::Mknod
        | FileOperation::Unspecified => return None,
    })
}

/// A utime-family time in ns since the epoch, as Datadog's tracer sends it:
/// "now" is when the call was made, an omitted time 0.
fn file_time(time: &proto::FileTime, called: Option<&pbjson_types::Timestamp>) -> u64 {
    if time.now {
        return nanos(called);
    }
    let given = pbjson_types::Timestamp { seconds: time.seconds, nanos: i32::try_from(time.nanos).unwrap_or(-1) };
    if time.omit {
        0
    } else {
        nanos(Some(&given))
    }
}

fn credentials_msg(syscall: &str, event: &proto::CredentialsEvent, retval: i64) -> Option<Payload> {
    let now = event.credentials.as_ref()?;
    let id = |value: Option<u32>| value.map(|v| v as i32);
    let succeeded = retval == 0;
    // i386's 32-bit id calls are the same calls.
    Some(match syscall.trim_end_matches("32") {
        "setuid" | "setreuid" | "setresuid" if succeeded => {
            Payload::SetUid(SetUidSyscallMsg { uid: id(now.uid)?, euid: id(now.euid)?, ..Default::default() })
        }
        "setgid" | "setregid" | "setresgid" if succeeded => {
            Payload::SetGid(SetGidSyscallMsg { gid: id(now.gid)?, egid: id(now.egid)?, ..Default::default() })
        }
        "setfsuid" => Payload::SetFsUid(SetFsUidSyscallMsg { fsuid: id(now.fsuid)?, ..Default::default() }),
        "setfsgid" => Payload::SetFsGid(SetFsGidSyscallMsg { fsgid: id(now.fsgid)?, ..Default::default() }),
        "capset" if succeeded => {
            Payload::Capset(CapsetSyscallMsg { effective: now.cap_effective?, permitted: now.cap_permitted? })
        }
        _ => return None,
    })
}

/// Family, address and port; None when the agent could not be given a true
/// one.
fn socket_info(family: AddressFamily, address: &str, port: u32) -> Option<MsgSocketInfo> {
    let (family, addr) = match family {
        AddressFamily::Inet => (libc::AF_INET, Some(IpAddr::V4(address.parse::<Ipv4Addr>().ok()?))),
        AddressFamily::Inet6 => (libc::AF_INET6, Some(IpAddr::V6(address.parse::<Ipv6Addr>().ok()?))),
        // The empty IP, as Datadog's tracer sends for AF_UNIX.
        AddressFamily::Unix => (libc::AF_UNIX, None),
        AddressFamily::Other | AddressFamily::Unspecified => return None,
    };
    Some(MsgSocketInfo { address_family: family as u16, addr, port: u16::try_from(port).ok()? })
}

/// IPPROTO_*; 0 when not TCP or UDP (the number is not in our model).
fn protocol_number(protocol: Protocol) -> u16 {
    match protocol {
        Protocol::Tcp => libc::IPPROTO_TCP as u16,
        Protocol::Udp => libc::IPPROTO_UDP as u16,
        Protocol::Other | Protocol::Unspecified => 0,
    }
}
