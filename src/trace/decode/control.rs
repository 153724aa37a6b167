//! Calls that reach for the kernel's control of processes and syscalls:
//! ptrace, seccomp filters, userfaultfd. A workload that knows the tracer
//! would use them against it; each attempt is an event, and userfaultfd is
//! refused outright, as are calls aimed at the tracer itself (`guard.rs`).

use crate::proto::{self, event::Payload};
use crate::trace::decode::context::{Call, Ctx, Next};
use crate::trace::guard::Aim;

/// Where a seccomp request comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SeccompCall {
    /// seccomp(operation, flags, args).
    Seccomp,
    /// prctl(PR_SET_SECCOMP, mode, filter): mode 1 strict, 2 filter.
    Prctl,
}

/// How a userfaultfd is asked for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UffdCall {
    /// userfaultfd(flags).
    Syscall,
    /// ioctl(fd, USERFAULTFD_IOC_NEW, flags) on /dev/userfaultfd.
    Ioctl,
}

const SECCOMP_SET_MODE_FILTER: u64 = 1;

fn ptrace_request_name(request: i64) -> &'static str {
    match request {
        0 => "PTRACE_TRACEME",
        1 => "PTRACE_PEEKTEXT",
        2 => "PTRACE_PEEKDATA",
        3 => "PTRACE_PEEKUSER",
        4 => "PTRACE_POKETEXT",
        5 => "PTRACE_POKEDATA",
        6 => "PTRACE_POKEUSER",
        7 => "PTRACE_CONT",
        8 => "PTRACE_KILL",
        9 => "PTRACE_SINGLESTEP",
        12 => "PTRACE_GETREGS",
        13 => "PTRACE_SETREGS",
        14 => "PTRACE_GETFPREGS",
        15 => "PTRACE_SETFPREGS",
        16 => "PTRACE_ATTACH",
        17 => "PTRACE_DETACH",
        24 => "PTRACE_SYSCALL",
        0x4200 => "PTRACE_SETOPTIONS",
        0x4201 => "PTRACE_GETEVENTMSG",
        0x4202 => "PTRACE_GETSIGINFO",
        0x4203 => "PTRACE_SETSIGINFO",
        0x4204 => "PTRACE_GETREGSET",
        0x4205 => "PTRACE_SETREGSET",
        0x4206 => "PTRACE_SEIZE",
        0x4207 => "PTRACE_INTERRUPT",
        0x4208 => "PTRACE_LISTEN",
        0x4209 => "PTRACE_PEEKSIGINFO",
        0x420a => "PTRACE_GETSIGMASK",
        0x420b => "PTRACE_SETSIGMASK",
        0x420c => "PTRACE_SECCOMP_GET_FILTER",
        0x420d => "PTRACE_SECCOMP_GET_METADATA",
        0x420e => "PTRACE_GET_SYSCALL_INFO",
        _ => "",
    }
}

fn seccomp_operation_name(operation: u32) -> &'static str {
    match operation {
        0 => "SECCOMP_SET_MODE_STRICT",
        1 => "SECCOMP_SET_MODE_FILTER",
        2 => "SECCOMP_GET_ACTION_AVAIL",
        3 => "SECCOMP_GET_NOTIF_SIZES",
        _ => "",
    }
}

/// ptrace is reported with its result: the kernel decides (the workload
/// has no CAP_SYS_PTRACE and the tracer is not dumpable).
pub fn ptrace_entry(_: &mut Ctx<'_>, _: &mut Call) -> Next {
    Next::Exit
}

pub fn ptrace_exit(cx: &mut Ctx<'_>, call: &Call, retval: i64) {
    // The request is an enum (int) in glibc's prototype, a long for the kernel.
    let request = i64::from(call.args[0] as i32);
    let event = proto::PtraceEvent {
        request,
        request_name: ptrace_request_name(request).to_owned(),
        pid: i64::from(call.args[1] as i32),
    };
    cx.emit_call(call, retval, false, Payload::Ptrace(event));
}

/// The filter's length is read at entry, as the kernel reads the program.
pub fn seccomp_entry(cx: &mut Ctx<'_>, call: &mut Call, seccomp: SeccompCall) -> Next {
    let (operation, program) = seccomp_request(call, seccomp);
    if operation == SECCOMP_SET_MODE_FILTER as u32 {
        // struct sock_fprog { unsigned short len; struct sock_filter *filter; }
        call.entry_bytes = cx.read_bytes(program, 2);
    }
    Next::Exit
}

/// (seccomp(2) operation, address of the filter program).
fn seccomp_request(call: &Call, seccomp: SeccompCall) -> (u32, u64) {
    match seccomp {
        SeccompCall::Seccomp => (call.args[0] as u32, call.args[2]),
        // prctl's modes are SECCOMP_MODE_STRICT (1) and SECCOMP_MODE_FILTER
        // (2): the same requests as seccomp(2)'s operations 0 and 1.
        SeccompCall::Prctl => ((call.args[1] as u32).wrapping_sub(1), call.args[2]),
    }
}

pub fn seccomp_exit(cx: &mut Ctx<'_>, call: &Call, retval: i64, seccomp: SeccompCall) {
    let (operation, _) = seccomp_request(call, seccomp);
    let instructions = call.entry_bytes.get(..2).map(|b| u32::from(u16::from_ne_bytes([b[0], b[1]])));
    let filter = operation == SECCOMP_SET_MODE_FILTER as u32;
    let event = proto::SeccompEvent {
        operation,
        operation_name: seccomp_operation_name(operation).to_owned(),
        flags: if seccomp == SeccompCall::Seccomp { call.args[1] } else { 0 },
        instructions,
    };
    cx.emit_call(call, retval, filter && instructions.is_none(), Payload::Seccomp(event));
}

/// A userfaultfd would let the workload stall the tracer inside its reads
/// of tracee memory, or serve it different bytes than the kernel later
/// sees: refused, and reported.
pub fn userfaultfd_entry(cx: &mut Ctx<'_>, call: &mut Call, uffd: UffdCall) -> Next {
    let flags = match uffd {
        UffdCall::Syscall => call.args[0],
        UffdCall::Ioctl => call.args[2],
    };
    let reason = "userfaultfd is refused to traced workloads";
    cx.emit_refused(call, libc::EPERM, reason, Payload::Userfaultfd(proto::UserfaultfdEvent { flags }));
    Next::Refuse(libc::EPERM)
}

/// The event of a call aimed at the tracer, which the engine refused.
pub fn tracer_target_refused(cx: &mut Ctx<'_>, call: &Call, aim: Aim) {
    let signal_name = nix::sys::signal::Signal::try_from(aim.signal).map_or("", |s| s.as_str());
    let event = proto::TracerTargetEvent { pid: aim.pid, signal: aim.signal, signal_name: signal_name.to_owned() };
    let reason = "a signal, pidfd or resource limit aimed at the tracer is refused to traced workloads";
    cx.emit_refused(call, libc::EPERM, reason, Payload::TracerTarget(event));
}
