//! Process control: prctl options that change what a process may do or how
//! it is seen, resource limits, and signals to other processes. Which
//! calls stop is the table's (`PRCTL_WATCHED`, prlimit64 with a new limit,
//! signals other than 0 and SIGURG).

use nix::unistd::Pid;

use crate::proto::{self, event::Payload};
use crate::text;
use crate::trace::abi::Abi;
use crate::trace::decode::context::{Call, Ctx, Next};
use crate::trace::procfs;

pub const PR_SET_SECCOMP: u64 = 22;
const PR_SET_NAME: u64 = 15;
const PR_CAPBSET_DROP: u64 = 24;
const PR_SET_MM: u64 = 35;
const PR_CAP_AMBIENT: u64 = 47;
const PR_SET_SPECULATION_CTRL: u64 = 53;
const PR_SET_PTRACER: u64 = 0x5961_6d61;
/// TASK_COMM_LEN: the kernel takes at most 15 bytes and a NUL.
const COMM_LEN: usize = 16;

fn prctl_option_name(option: u64) -> &'static str {
    match option {
        4 => "PR_SET_DUMPABLE",
        8 => "PR_SET_KEEPCAPS",
        PR_SET_NAME => "PR_SET_NAME",
        PR_SET_SECCOMP => "PR_SET_SECCOMP",
        PR_CAPBSET_DROP => "PR_CAPBSET_DROP",
        28 => "PR_SET_SECUREBITS",
        PR_SET_MM => "PR_SET_MM",
        36 => "PR_SET_CHILD_SUBREAPER",
        38 => "PR_SET_NO_NEW_PRIVS",
        PR_CAP_AMBIENT => "PR_CAP_AMBIENT",
        PR_SET_SPECULATION_CTRL => "PR_SET_SPECULATION_CTRL",
        PR_SET_PTRACER => "PR_SET_PTRACER",
        _ => "",
    }
}

const CAPABILITIES: [&str; 41] = [
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_DAC_READ_SEARCH",
    "CAP_FOWNER",
    "CAP_FSETID",
    "CAP_KILL",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETPCAP",
    "CAP_LINUX_IMMUTABLE",
    "CAP_NET_BIND_SERVICE",
    "CAP_NET_BROADCAST",
    "CAP_NET_ADMIN",
    "CAP_NET_RAW",
    "CAP_IPC_LOCK",
    "CAP_IPC_OWNER",
    "CAP_SYS_MODULE",
    "CAP_SYS_RAWIO",
    "CAP_SYS_CHROOT",
    "CAP_SYS_PTRACE",
    "CAP_SYS_PACCT",
    "CAP_SYS_ADMIN",
    "CAP_SYS_BOOT",
    "CAP_SYS_NICE",
    "CAP_SYS_RESOURCE",
    "CAP_SYS_TIME",
    "CAP_SYS_TTY_CONFIG",
    "CAP_MKNOD",
    "CAP_LEASE",
    "CAP_AUDIT_WRITE",
    "CAP_AUDIT_CONTROL",
    "CAP_SETFCAP",
    "CAP_MAC_OVERRIDE",
    "CAP_MAC_ADMIN",
    "CAP_SYSLOG",
    "CAP_WAKE_ALARM",
    "CAP_BLOCK_SUSPEND",
    "CAP_AUDIT_READ",
    "CAP_PERFMON",
    "CAP_BPF",
    "CAP_CHECKPOINT_RESTORE",
];

fn capability_name(cap: u64) -> &'static str {
    usize::try_from(cap).ok().and_then(|c| CAPABILITIES.get(c)).copied().unwrap_or("")
}

/// Names of prctl's second and third arguments, where they name something.
fn prctl_argument_names(option: u64, arg2: u64, arg3: u64) -> (&'static str, &'static str) {
    match option {
        PR_CAPBSET_DROP => (capability_name(arg2), ""),
        PR_CAP_AMBIENT => {
            let operation = match arg2 {
                1 => "PR_CAP_AMBIENT_IS_SET",
                2 => "PR_CAP_AMBIENT_RAISE",
                3 => "PR_CAP_AMBIENT_LOWER",
                4 => "PR_CAP_AMBIENT_CLEAR_ALL",
                _ => "",
            };
            (operation, if arg2 == 4 { "" } else { capability_name(arg3) })
        }
        PR_SET_MM => {
            const FIELDS: [&str; 15] = [
                "PR_SET_MM_START_CODE",
                "PR_SET_MM_END_CODE",
                "PR_SET_MM_START_DATA",
                "PR_SET_MM_END_DATA",
                "PR_SET_MM_START_STACK",
                "PR_SET_MM_START_BRK",
                "PR_SET_MM_BRK",
                "PR_SET_MM_ARG_START",
                "PR_SET_MM_ARG_END",
                "PR_SET_MM_ENV_START",
                "PR_SET_MM_ENV_END",
                "PR_SET_MM_AUXV",
                "PR_SET_MM_EXE_FILE",
                "PR_SET_MM_MAP",
                "PR_SET_MM_MAP_SIZE",
            ];
            (arg2.checked_sub(1).and_then(|i| FIELDS.get(i as usize)).copied().unwrap_or(""), "")
        }
        PR_SET_SPECULATION_CTRL => {
            let which = match arg2 {
                0 => "PR_SPEC_STORE_BYPASS",
                1 => "PR_SPEC_INDIRECT_BRANCH",
                2 => "PR_SPEC_L1D_FLUSH",
                _ => "",
            };
            let control = match arg3 {
                1 => "PR_SPEC_PRCTL",
                2 => "PR_SPEC_ENABLE",
                4 => "PR_SPEC_DISABLE",
                8 => "PR_SPEC_FORCE_DISABLE",
                16 => "PR_SPEC_DISABLE_NOEXEC",
                _ => "",
            };
            (which, control)
        }
        PR_SET_PTRACER if arg2 as u32 == u32::MAX => ("PR_SET_PTRACER_ANY", ""),
        _ => ("", ""),
    }
}

/// The option's arguments as the kernel takes them: `unsigned long`s,
/// 32-bit on i386.
fn prctl_arg(call: &Call, index: usize) -> u64 {
    match call.abi {
        Abi::I386 => u64::from(call.args[index] as u32),
        _ => call.args[index],
    }
}

/// PR_SET_NAME's name is read at entry, as the kernel copies it.
pub fn prctl_entry(cx: &mut Ctx<'_>, call: &mut Call) -> Next {
    if prctl_arg(call, 0) == PR_SET_NAME {
        let raw = cx.read_bytes(prctl_arg(call, 1), COMM_LEN);
        let end = raw.iter().position(|&b| b == 0).unwrap_or(raw.len()).min(COMM_LEN - 1);
        call.partial |= raw.is_empty();
        call.entry_bytes = raw[..end.min(raw.len())].to_vec();
    }
    Next::Exit
}

pub fn prctl_exit(cx: &mut Ctx<'_>, call: &Call, retval: i64) {
    let (option, arg2, arg3) = (prctl_arg(call, 0), prctl_arg(call, 1), prctl_arg(call, 2));
    let (arg2_name, arg3_name) = prctl_argument_names(option, arg2, arg3);
    let mut event = proto::PrctlEvent {
        option: option as i32,
        option_name: prctl_option_name(option).to_owned(),
        arg2,
        arg3,
        arg2_name: arg2_name.to_owned(),
        arg3_name: arg3_name.to_owned(),
        ..Default::default()
    };
    if option != PR_SET_NAME {
        cx.emit_call(call, retval, false, Payload::Prctl(event));
        return;
    }
    event.new_name = text::lossless(&call.entry_bytes);
    // The kernel's name, unless the call failed (it then set none).
    let comm = (retval == 0).then(|| procfs::read_bounded(&format!("/proc/{}/comm", cx.tid), COMM_LEN + 1)).flatten();
    let comm = comm.map(|(raw, _)| raw.strip_suffix(b"\n").map(<[u8]>::to_vec).unwrap_or(raw));
    match comm {
        Some(comm) if comm != call.entry_bytes => {
            let why = format!(
                "new_name: {} was read from the workload's memory, but the thread's name is the kernel's answer \
                 (the memory changed after the read, or another thread renamed it)",
                event.new_name
            );
            event.new_name = text::lossless(&comm);
            cx.emit_unverified(call, retval, why, Payload::Prctl(event));
        }
        _ => cx.emit_call(call, retval, false, Payload::Prctl(event)),
    }
}

/// How a limit is set.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RlimitCall {
    /// setrlimit(resource, rlim): the caller's own; on i386 two 32-bit
    /// values, 0xffffffff meaning RLIM_INFINITY.
    Setrlimit,
    /// prlimit64(pid, resource, new, old): two 64-bit values.
    Prlimit64,
}

const RESOURCES: [(&str, &str); 16] = [
    ("RLIMIT_CPU", "Max cpu time"),
    ("RLIMIT_FSIZE", "Max file size"),
    ("RLIMIT_DATA", "Max data size"),
    ("RLIMIT_STACK", "Max stack size"),
    ("RLIMIT_CORE", "Max core file size"),
    ("RLIMIT_RSS", "Max resident set"),
    ("RLIMIT_NPROC", "Max processes"),
    ("RLIMIT_NOFILE", "Max open files"),
    ("RLIMIT_MEMLOCK", "Max locked memory"),
    ("RLIMIT_AS", "Max address space"),
    ("RLIMIT_LOCKS", "Max file locks"),
    ("RLIMIT_SIGPENDING", "Max pending signals"),
    ("RLIMIT_MSGQUEUE", "Max msgqueue size"),
    ("RLIMIT_NICE", "Max nice priority"),
    ("RLIMIT_RTPRIO", "Max realtime priority"),
    ("RLIMIT_RTTIME", "Max realtime timeout"),
];

/// (resource, new limit's address, target as passed).
fn rlimit_args(call: &Call, rlimit: RlimitCall) -> (u32, u64, i32) {
    match rlimit {
        RlimitCall::Setrlimit => (call.args[0] as u32, call.args[1], 0),
        RlimitCall::Prlimit64 => (call.args[1] as u32, call.args[2], call.args[0] as i32),
    }
}

/// The new limit is read at entry, as the kernel copies it.
pub fn rlimit_entry(cx: &mut Ctx<'_>, call: &mut Call, rlimit: RlimitCall) -> Next {
    let (_, new, _) = rlimit_args(call, rlimit);
    let size = match (rlimit, call.abi) {
        (RlimitCall::Setrlimit, Abi::I386) => 8,
        _ => 16,
    };
    let raw = cx.read_bytes(new, size);
    call.partial |= raw.len() < size;
    call.entry_bytes = match size {
        // Widened as the kernel widens them.
        8 if raw.len() == 8 => [0, 1]
            .into_iter()
            .flat_map(|i| {
                let value = call_u32(&raw, i);
                let wide = if value == u32::MAX { u64::MAX } else { u64::from(value) };
                wide.to_ne_bytes()
            })
            .collect(),
        8 => Vec::new(),
        _ => raw,
    };
    Next::Exit
}

fn call_u32(raw: &[u8], index: usize) -> u32 {
    u32::from_ne_bytes(raw[index * 4..index * 4 + 4].try_into().expect("4 bytes"))
}

/// A success is checked against the target's limits as the kernel has them.
pub fn rlimit_exit(cx: &mut Ctx<'_>, call: &Call, retval: i64, rlimit: RlimitCall) {
    let (resource, _, target) = rlimit_args(call, rlimit);
    let pid = if target == 0 { cx.tgid().as_raw() } else { target };
    let requested = call.entry_u64(0).zip(call.entry_u64(1));
    let mut event = proto::RlimitEvent {
        resource: resource as i32,
        resource_name: RESOURCES.get(resource as usize).map_or("", |r| r.0).to_owned(),
        soft: requested.map(|r| r.0),
        hard: requested.map(|r| r.1),
        pid: pid as u32,
    };
    let now = (retval == 0).then(|| limits_of(Pid::from_raw(pid), resource)).flatten();
    match (requested, now) {
        (Some(asked), Some(now)) if asked != now => {
            let why = format!(
                "soft, hard: {}, {} were read from the workload's memory, but the process's limits are the \
                 kernel's answer (the memory changed after the read, or another call changed them)",
                asked.0, asked.1
            );
            (event.soft, event.hard) = (Some(now.0), Some(now.1));
            cx.emit_unverified(call, retval, why, Payload::Rlimit(event));
        }
        _ => cx.emit_call(call, retval, false, Payload::Rlimit(event)),
    }
}

/// (soft, hard) of one resource, from /proc/PID/limits (RLIM_INFINITY
/// is "unlimited").
fn limits_of(pid: Pid, resource: u32) -> Option<(u64, u64)> {
    let (_, title) = RESOURCES.get(resource as usize)?;
    let (text, _) = procfs::read_bounded(&format!("/proc/{pid}/limits"), 4096)?;
    let text = String::from_utf8(text).ok()?;
    let line = text.lines().find(|l| l.starts_with(title) && l.as_bytes().get(title.len()) == Some(&b' '))?;
    let mut values = line[title.len()..].split_whitespace().map(|v| match v {
        "unlimited" => Some(u64::MAX),
        v => v.parse().ok(),
    });
    Some((values.next()??, values.next()??))
}

/// Which signal call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SignalCall {
    /// kill(pid, sig)
    Kill,
    /// tkill(tid, sig)
    Tkill,
    /// tgkill(tgid, tid, sig)
    Tgkill,
    /// pidfd_send_signal(pidfd, sig, info, flags)
    PidfdSendSignal,
}

/// (target process, target thread, signal, pidfd) as passed; the target of
/// a pidfd is its process, read now (None: not a pidfd).
fn signal_args(cx: &Ctx<'_>, call: &Call, signal: SignalCall) -> (Option<i32>, Option<i32>, i32, Option<i32>) {
    let arg = |i: usize| call.args[i] as i32;
    match signal {
        SignalCall::Kill => (Some(arg(0)), None, arg(1), None),
        SignalCall::Tkill => (None, Some(arg(0)), arg(1), None),
        SignalCall::Tgkill => (Some(arg(0)), Some(arg(1)), arg(2), None),
        SignalCall::PidfdSendSignal => (procfs::pidfd_target(cx.tid, arg(0)), None, arg(1), Some(arg(0))),
    }
}

/// A signal the process sends itself is no event; which process a pidfd
/// names is read now, before the call.
pub fn signal_entry(cx: &mut Ctx<'_>, call: &mut Call, signal: SignalCall) -> Next {
    let own = cx.tgid().as_raw();
    let (pid, tid, _, _) = signal_args(cx, call, signal);
    let own_thread = tid.is_some_and(|tid| cx.procs.thread(Pid::from_raw(tid)).map(|t| t.tgid.as_raw()) == Some(own));
    if pid == Some(own) || (signal == SignalCall::Tkill && own_thread) {
        return Next::Done;
    }
    if signal == SignalCall::PidfdSendSignal {
        call.entry_bytes = pid.unwrap_or(-1).to_ne_bytes().to_vec();
    }
    Next::Exit
}

pub fn signal_exit(cx: &mut Ctx<'_>, call: &Call, retval: i64, signal: SignalCall) {
    let (pid, tid, sig, pidfd) = signal_args(cx, call, signal);
    let pid = match signal {
        SignalCall::PidfdSendSignal => call.entry_u32(0).map(|p| p as i32),
        _ => pid,
    };
    let event = proto::SignalEvent {
        pid: pid.unwrap_or(0),
        tid,
        signal: sig,
        signal_name: nix::sys::signal::Signal::try_from(sig).map_or("", |s| s.as_str()).to_owned(),
        pidfd,
    };
    cx.emit_call(call, retval, false, Payload::Signal(event));
}
