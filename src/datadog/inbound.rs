//! The agent's messages, from a Datadog tracer, as our Hello and events.
//!
//! Lossy where the models differ. Lost from every message: SpanContext,
//! CGroupID, ContainerID (not in our events: `serve` writes it as the
//! line's `container_id`), the thread (tid is the pid), the ABI, and which syscall of a family was made:
//! `syscall` names the family ("open" for open, openat, creat...; "setreuid"
//! for setuid, setreuid and setresuid, whose ids Datadog sends as a pair).
//! Lost per type:
//! - files: CTime, MTime, Inode, owner, and Mode (kept only as an open's
//!   creation mode, when the flags create);
//! - exec: TTY, FromProcFS, user and group names; cwd and executable are
//!   not sent;
//! - fork: kind and clone flags; the parent's parent;
//! - set*id, capset: the ids as sent go to `requested` ([real, effective],
//!   [fsuid], [effective, permitted]: no inheritable set), `credentials`
//!   stays empty (Datadog does not send the result);
//! - connect, bind, accept: the descriptor, and AF_UNIX paths (never sent);
//!   accept's peer port (Datadog sends the local port) and protocol;
//! - Hello: tracer version, session id (there is none) and hostname.
//!
//! - utimes: Datadog's 0 (an omitted time) is the epoch, and its "now" a
//!   time like any other;
//!
//! Mount and Umount are namespace events (`mount`, `umount2`: the mount
//! point, a mount's source and FSType as sent; no flags, which Datadog does
//! not send: a bind mount's FSType is `bind`).
//!
//! Types without an event of ours (LoadModule, UnloadModule, Setsockopt,
//! Setrlimit, Prctl, Socket) give None.

use crate::proto::{self, event::Payload as Ours, AddressFamily, Event, ExitCause, FileOperation, Mode, Protocol};

use super::msg::*;

pub fn hello(msg: &HelloMsg) -> proto::Hello {
    proto::Hello {
        mode: match msg.mode.as_str() {
            MODE_WRAPPED => Mode::Wrapped,
            MODE_ATTACHED => Mode::Attached,
            _ => Mode::Unspecified,
        } as i32,
        pid_namespace: msg.nsid,
        container: msg.container_context.as_ref().map(|c| proto::ContainerContext {
            id: c.id.clone(),
            created_at: Some(timestamp(c.created_at)),
            ..Default::default()
        }),
        entrypoint_args: msg.entrypoint_args.clone().unwrap_or_default(),
        ..Default::default()
    }
}

fn timestamp(nanos: u64) -> pbjson_types::Timestamp {
    // Both parts fit: u64::MAX / 10^9 < i64::MAX.
    pbjson_types::Timestamp { seconds: (nanos / 1_000_000_000) as i64, nanos: (nanos % 1_000_000_000) as i32 }
}

/// The event for a syscall message, or None for types we have no event for.
pub fn event(msg: &SyscallMsg) -> Option<Event> {
    let mut event = Event {
        pid: msg.pid,
        tid: msg.pid,
        timestamp: Some(timestamp(msg.timestamp)),
        retval: Some(msg.retval),
        ..Default::default()
    };
    let (syscall, payload) = match &msg.payload {
        Payload::Exec(exec) => {
            event.ppid = exec.ppid;
            ("execve", Ours::Exec(exec_event(exec)))
        }
        // Ours is the parent's event, returning the child.
        Payload::Fork(fork) => {
            (event.pid, event.tid, event.retval) = (fork.ppid, fork.ppid, Some(i64::from(msg.pid)));
            ("fork", Ours::Fork(proto::ForkEvent { child_pid: msg.pid, ..Default::default() }))
        }
        Payload::Exit(exit) => {
            event.retval = None;
            ("exit", Ours::Exit(exit_event(exit)))
        }
        Payload::Open(open) => {
            let creates = open.flags & (libc::O_CREAT | libc::O_TMPFILE) as u32 != 0;
            let mode = if creates { open.file.mode & 0o7777 } else { 0 };
            let path = open.file.filename.clone();
            ("open", Ours::Open(proto::OpenEvent { path, flags: Some(open.flags as i32), mode, ..Default::default() }))
        }
        Payload::SetUid(ids) => ("setreuid", requested(vec![ids.uid.into(), ids.euid.into()])),
        Payload::SetGid(ids) => ("setregid", requested(vec![ids.gid.into(), ids.egid.into()])),
        Payload::SetFsUid(ids) => ("setfsuid", requested(vec![ids.fsuid.into()])),
        Payload::SetFsGid(ids) => ("setfsgid", requested(vec![ids.fsgid.into()])),
        Payload::Capset(caps) => ("capset", requested(vec![caps.effective as i64, caps.permitted as i64])),
        Payload::Unlink(m) => ("unlink", Ours::File(file(FileOperation::Unlink, &m.file, None))),
        Payload::Rmdir(m) => ("rmdir", Ours::File(file(FileOperation::Rmdir, &m.file, None))),
        Payload::Rename(m) => ("rename", Ours::File(file(FileOperation::Rename, &m.old_file, Some(&m.new_file)))),
        Payload::Mkdir(m) => {
            ("mkdir", Ours::File(proto::FileEvent { mode: Some(m.mode), ..file(FileOperation::Mkdir, &m.dir, None) }))
        }
        Payload::Link(m) => match m.link_type {
            LINK_HARD => ("link", Ours::File(file(FileOperation::Link, &m.link, Some(&m.target)))),
            LINK_SYMBOLIC => ("symlink", Ours::File(file(FileOperation::Symlink, &m.link, Some(&m.target)))),
            _ => return None,
        },
        Payload::Chmod(m) => {
            ("chmod", Ours::File(proto::FileEvent { mode: Some(m.mode), ..file(FileOperation::Chmod, &m.file, None) }))
        }
        Payload::Chown(m) => {
            let ids = (Some(i64::from(m.uid)), Some(i64::from(m.gid)));
            (
                "chown",
                Ours::File(proto::FileEvent { uid: ids.0, gid: ids.1, ..file(FileOperation::Chown, &m.file, None) }),
            )
        }
        Payload::Chdir(m) => ("chdir", Ours::Chdir(proto::ChdirEvent { path: m.dir.filename.clone() })),
        Payload::Bind(m) => {
            let (address, port, family) = socket(&m.socket);
            let protocol = protocol(m.protocol) as i32;
            ("bind", Ours::Bind(proto::BindEvent { address, port, family, protocol, fd: None }))
        }
        Payload::Connect(m) => {
            let (address, port, family) = socket(&m.socket);
            let protocol = protocol(m.protocol) as i32;
            ("connect", Ours::Connect(proto::ConnectEvent { address, port, family, protocol, ..Default::default() }))
        }
        Payload::Accept(m) => {
            let (address, local_port, family) = socket(&m.socket);
            ("accept", Ours::Accept(proto::AcceptEvent { address, local_port, family, ..Default::default() }))
        }
        Payload::Mount(m) => {
            let (path, source, fstype) = (m.target.clone(), m.source.clone(), m.fs_type.clone());
            ("mount", Ours::Namespace(proto::NamespaceEvent { path, source, fstype, ..Default::default() }))
        }
        Payload::Umount(m) => {
            ("umount2", Ours::Namespace(proto::NamespaceEvent { path: m.path.clone(), ..Default::default() }))
        }
        Payload::Utimes(m) => {
            let time = |ns: u64| {
                let t = timestamp(ns);
                Some(proto::FileTime { seconds: t.seconds, nanos: i64::from(t.nanos), ..Default::default() })
            };
            let event = proto::FileEvent {
                access_time: time(m.atime),
                modification_time: time(m.mtime),
                ..file(FileOperation::Utimes, &m.file, None)
            };
            ("utimes", Ours::File(event))
        }
        Payload::LoadModule(_)
        | Payload::UnloadModule(_)
        | Payload::Setsockopt(_)
        | Payload::Setrlimit(_)
        | Payload::Prctl(_)
        | Payload::Socket(_) => return None,
    };
    event.syscall = syscall.to_owned();
    event.payload = Some(payload);
    Some(event)
}

fn exec_event(exec: &ExecSyscallMsg) -> proto::ExecEvent {
    proto::ExecEvent {
        path: exec.file.filename.clone(),
        args: exec.args.clone().unwrap_or_default(),
        args_truncated: exec.args_truncated,
        envs: exec.envs.clone().unwrap_or_default(),
        envs_truncated: exec.envs_truncated,
        credentials: exec.credentials.as_ref().map(|c| proto::Credentials {
            uid: Some(c.uid),
            gid: Some(c.gid),
            euid: Some(c.euid),
            egid: Some(c.egid),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn exit_event(exit: &ExitSyscallMsg) -> proto::ExitEvent {
    let signaled = |core_dumped| proto::ExitEvent {
        cause: ExitCause::Signaled as i32,
        signal: Some(exit.code as i32),
        core_dumped,
        ..Default::default()
    };
    match exit.cause {
        EXIT_CAUSE_EXITED => {
            proto::ExitEvent { cause: ExitCause::Exited as i32, code: Some(exit.code as i32), ..Default::default() }
        }
        EXIT_CAUSE_CORE_DUMPED => signaled(true),
        EXIT_CAUSE_SIGNALED => signaled(false),
        _ => proto::ExitEvent::default(),
    }
}

fn requested(ids: Vec<i64>) -> Ours {
    Ours::Credentials(proto::CredentialsEvent { credentials: None, requested: ids })
}

fn file(operation: FileOperation, file: &FileSyscallMsg, target: Option<&FileSyscallMsg>) -> proto::FileEvent {
    proto::FileEvent {
        operation: operation as i32,
        path: file.filename.clone(),
        target: target.map(|t| t.filename.clone()).unwrap_or_default(),
        ..Default::default()
    }
}

/// Address text, port and family. AF_UNIX sockets come without a path.
fn socket(info: &MsgSocketInfo) -> (String, u32, i32) {
    let family = match i32::from(info.address_family) {
        libc::AF_INET => AddressFamily::Inet,
        libc::AF_INET6 => AddressFamily::Inet6,
        libc::AF_UNIX => AddressFamily::Unix,
        _ => AddressFamily::Other,
    };
    let address = info.addr.map(|ip| ip.to_string()).unwrap_or_default();
    (address, u32::from(info.port), family as i32)
}

fn protocol(number: u16) -> Protocol {
    match i32::from(number) {
        0 => Protocol::Unspecified,
        libc::IPPROTO_TCP => Protocol::Tcp,
        libc::IPPROTO_UDP => Protocol::Udp,
        _ => Protocol::Other,
    }
}
