//! Every ptrace request the tracer makes, and the typed stops they act on.
//!
//! `wait_any` turns a wait status into a [`Stop`]; each stop kind is its own
//! type and only offers the restart operations that are valid for it (a
//! group-stop can only be LISTENed, a signal-delivery stop only resumed with
//! its signal or without it, ...). Restarting consumes the stop, so a stop is
//! restarted exactly once. Errors from restarts are ESRCH in practice (the
//! tracee was SIGKILLed while stopped); its exit is then reported by `wait_any`
//! like any other exit, so callers may ignore them.
//!
//! `unsafe` lives here and in `launch`, `seccomp`, `signals` and `procfs`.

use nix::errno::Errno;
use nix::sys::ptrace::{self, Options};
use nix::unistd::Pid;

use crate::trace::abi::{Abi, SyscallEntry};

/// Options set on the workload at seize time; children inherit them.
pub const OPTIONS: Options = Options::PTRACE_O_TRACESYSGOOD
    .union(Options::PTRACE_O_TRACEFORK)
    .union(Options::PTRACE_O_TRACEVFORK)
    .union(Options::PTRACE_O_TRACECLONE)
    .union(Options::PTRACE_O_TRACEEXEC)
    .union(Options::PTRACE_O_TRACESECCOMP)
    .union(Options::PTRACE_O_EXITKILL);

pub fn seize(pid: Pid) -> nix::Result<()> {
    ptrace::seize(pid, OPTIONS)
}

/// Options for processes the tracer attaches to (`trace --pid`): the same
/// but EXITKILL. They are someone else's: if the tracer dies, they run on.
pub const ATTACH_OPTIONS: Options = OPTIONS.difference(Options::PTRACE_O_EXITKILL);

/// Seizes a running thread (attach mode). It keeps running until `interrupt`.
pub fn seize_running(tid: Pid) -> nix::Result<()> {
    ptrace::seize(tid, ATTACH_OPTIONS)
}

/// PTRACE_INTERRUPT: the thread stops soon with a [`Stop::Trap`] (or the
/// stop it was about to report). A blocking syscall it is in is restarted
/// by the kernel afterwards, unseen by the program.
pub fn interrupt(tid: Pid) -> nix::Result<()> {
    ptrace::interrupt(tid)
}

/// PTRACE_DETACH from a stop, delivering `signal` (0: none).
fn detach(pid: Pid, signal: i32) -> nix::Result<()> {
    // SAFETY: DETACH takes no pointers; `data` is the signal number.
    let rc = unsafe { libc::ptrace(libc::PTRACE_DETACH, pid.as_raw(), 0usize, signal as usize) };
    Errno::result(rc).map(drop)
}

/// How a tracee left the living.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Death {
    Exited(i32),
    Signaled { signal: i32, core_dumped: bool },
}

impl Death {
    pub fn event(self) -> crate::proto::ExitEvent {
        use crate::proto::{ExitCause, ExitEvent};
        match self {
            Death::Exited(code) => {
                ExitEvent { cause: ExitCause::Exited as i32, code: Some(code), ..Default::default() }
            }
            Death::Signaled { signal, core_dumped } => {
                ExitEvent { cause: ExitCause::Signaled as i32, signal: Some(signal), core_dumped, ..Default::default() }
            }
        }
    }

    /// The status a shell would report: the code, or 128 + signal.
    pub fn shell_status(self) -> i32 {
        match self {
            Death::Exited(code) => code,
            Death::Signaled { signal, .. } => 128 + signal,
        }
    }
}

/// One result of `waitpid(-1, __WALL)`.
pub enum Stop {
    Dead(Pid, Death),
    /// SECCOMP_RET_TRACE fired: the syscall entry, before it runs.
    Seccomp(SyscallStop),
    /// PTRACE_SYSCALL stop (entry or exit; `syscall_info` tells which).
    Syscall(SyscallStop),
    /// fork, vfork or clone completed in the parent.
    Fork(EventStop, ForkEventKind),
    /// A successful execve; the tid is already the thread group id.
    Exec(EventStop),
    /// PTRACE_EVENT_STOP with a stop signal: job control stopped the tracee.
    Group(GroupStop),
    /// PTRACE_EVENT_STOP with SIGTRAP: a new child's first stop, or an interrupt.
    Trap(EventStop),
    /// A signal is about to be delivered.
    Signal(SignalStop),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ForkEventKind {
    Fork,
    Vfork,
    Clone,
}

pub fn wait_any() -> nix::Result<Stop> {
    wait(0).map(|stop| stop.expect("a blocking wait returns a stop"))
}

/// As [`wait_any`], without blocking: None when no tracee has a stop to
/// report now.
pub fn poll_any() -> nix::Result<Option<Stop>> {
    wait(libc::WNOHANG)
}

fn wait(flags: libc::c_int) -> nix::Result<Option<Stop>> {
    let mut status: libc::c_int = 0;
    // SAFETY: waitpid only writes the status integer we pass.
    let pid = unsafe { libc::waitpid(-1, &mut status, libc::__WALL | flags) };
    let pid = Errno::result(pid)?;
    if pid == 0 {
        return Ok(None);
    }
    Ok(Some(stop_of(Pid::from_raw(pid), status)))
}

fn stop_of(pid: Pid, status: libc::c_int) -> Stop {
    // Decoded by hand rather than with nix's WaitStatus: real-time signals do
    // not fit its Signal enum, and every signal must be passed on unchanged.
    if libc::WIFEXITED(status) {
        return Stop::Dead(pid, Death::Exited(libc::WEXITSTATUS(status)));
    }
    if libc::WIFSIGNALED(status) {
        let death = Death::Signaled { signal: libc::WTERMSIG(status), core_dumped: libc::WCOREDUMP(status) };
        return Stop::Dead(pid, death);
    }
    let signal = libc::WSTOPSIG(status);
    let event = status >> 16;
    match (signal, event) {
        (s, 0) if s == libc::SIGTRAP | 0x80 => Stop::Syscall(SyscallStop { pid }),
        (libc::SIGTRAP, libc::PTRACE_EVENT_SECCOMP) => Stop::Seccomp(SyscallStop { pid }),
        (libc::SIGTRAP, libc::PTRACE_EVENT_FORK) => Stop::Fork(EventStop { pid }, ForkEventKind::Fork),
        (libc::SIGTRAP, libc::PTRACE_EVENT_VFORK) => Stop::Fork(EventStop { pid }, ForkEventKind::Vfork),
        (libc::SIGTRAP, libc::PTRACE_EVENT_CLONE) => Stop::Fork(EventStop { pid }, ForkEventKind::Clone),
        (libc::SIGTRAP, libc::PTRACE_EVENT_EXEC) => Stop::Exec(EventStop { pid }),
        (libc::SIGTRAP, libc::PTRACE_EVENT_STOP) => Stop::Trap(EventStop { pid }),
        (_, libc::PTRACE_EVENT_STOP) => Stop::Group(GroupStop { pid }),
        (_, 0) => Stop::Signal(SignalStop { pid, signal }),
        // Events we did not ask for (VFORK_DONE, EXIT): nothing to decode.
        _ => Stop::Trap(EventStop { pid }),
    }
}

/// How to let a tracee run on from a stop where no signal is pending.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Resume {
    /// Run until the next seccomp or event stop.
    Continue,
    /// Also stop at the next syscall entry or exit.
    Syscall,
    /// Run one instruction; from a signal-delivery-stop, stop at the first
    /// instruction of the signal's handler, its frame set up.
    Step,
}

fn resume(pid: Pid, how: Resume, signal: i32) -> nix::Result<()> {
    let request = match how {
        Resume::Continue => libc::PTRACE_CONT,
        Resume::Syscall => libc::PTRACE_SYSCALL,
        Resume::Step => libc::PTRACE_SINGLESTEP,
    };
    // SAFETY: CONT, SYSCALL and SINGLESTEP take no pointers; `data` is the signal number.
    let rc = unsafe { libc::ptrace(request, pid.as_raw(), 0usize, signal as usize) };
    Errno::result(rc).map(drop)
}

pub struct SyscallStop {
    pub pid: Pid,
}

impl SyscallStop {
    pub fn resume(self, how: Resume) -> nix::Result<()> {
        resume(self.pid, how, 0)
    }

    /// Lets the thread go: the call runs (or returns) as it would have.
    pub fn detach(self) -> nix::Result<()> {
        detach(self.pid, 0)
    }
}

pub struct EventStop {
    pub pid: Pid,
}

impl EventStop {
    /// PTRACE_GETEVENTMSG: the new child for fork events, the former tid for exec.
    pub fn message(&self) -> nix::Result<i64> {
        ptrace::getevent(self.pid)
    }

    pub fn resume(self, how: Resume) -> nix::Result<()> {
        resume(self.pid, how, 0)
    }

    pub fn detach(self) -> nix::Result<()> {
        detach(self.pid, 0)
    }
}

pub struct GroupStop {
    pub pid: Pid,
}

impl GroupStop {
    /// Stay stopped as job control asked, yet keep reporting events (SIGCONT).
    pub fn listen(self) -> nix::Result<()> {
        // SAFETY: PTRACE_LISTEN takes no pointers.
        let rc = unsafe { libc::ptrace(libc::PTRACE_LISTEN, self.pid.as_raw(), 0usize, 0usize) };
        Errno::result(rc).map(drop)
    }

    /// Lets the thread go; it stays stopped, as job control asked, until SIGCONT.
    pub fn detach(self) -> nix::Result<()> {
        detach(self.pid, 0)
    }
}

pub struct SignalStop {
    pub pid: Pid,
    pub signal: i32,
}

impl SignalStop {
    /// Deliver the signal exactly as the workload would have received it.
    pub fn deliver(self, how: Resume) -> nix::Result<()> {
        resume(self.pid, how, self.signal)
    }

    /// Lets the thread go with its signal, delivered as it would have been.
    pub fn detach(self) -> nix::Result<()> {
        detach(self.pid, self.signal)
    }

    /// Resume without the signal: a trap the tracer caused itself.
    pub fn discard(self, how: Resume) -> nix::Result<()> {
        resume(self.pid, how, 0)
    }
}

/// What one syscall stop holds.
#[derive(Clone, Copy, Debug)]
pub enum SyscallState {
    Entry(SyscallEntry),
    Exit(i64),
}

/// Reads syscall stops, with PTRACE_GET_SYSCALL_INFO (Linux 5.3+) when the
/// kernel has it and the registers otherwise.
pub struct SyscallReader {
    has_syscall_info: Option<bool>,
}

impl SyscallReader {
    pub fn new() -> Self {
        SyscallReader { has_syscall_info: None }
    }

    /// PTRACE_GET_SYSCALL_INFO, or None when the kernel lacks it (probed on
    /// first use: EIO means the request is unknown).
    fn info(&mut self, pid: Pid) -> nix::Result<Option<libc::ptrace_syscall_info>> {
        if self.has_syscall_info == Some(false) {
            return Ok(None);
        }
        // SAFETY: ptrace_syscall_info is plain data; all zeroes is a valid value.
        let mut info: libc::ptrace_syscall_info = unsafe { std::mem::zeroed() };
        // SAFETY: the kernel writes at most `size_of::<ptrace_syscall_info>()`
        // bytes into `info`.
        let rc = unsafe {
            libc::ptrace(
                libc::PTRACE_GET_SYSCALL_INFO,
                pid.as_raw(),
                std::mem::size_of::<libc::ptrace_syscall_info>(),
                &mut info as *mut libc::ptrace_syscall_info,
            )
        };
        match Errno::result(rc) {
            Ok(_) => {
                self.has_syscall_info = Some(true);
                Ok(Some(info))
            }
            Err(Errno::EIO) if self.has_syscall_info.is_none() => {
                self.has_syscall_info = Some(false);
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }

    /// At a seccomp stop: the call, and the filter's return data (which
    /// names the table entry, as a hint the caller must check). Without
    /// syscall info (pre-5.3 kernels) only that data can tell an `int 0x80`
    /// call from a 64-bit one: `abi_in_data` reads it.
    pub fn read_seccomp(&mut self, pid: Pid, abi_in_data: fn(u32) -> Abi) -> nix::Result<(SyscallEntry, u32)> {
        if let Some(info) = self.info(pid)? {
            if info.op != libc::PTRACE_SYSCALL_INFO_SECCOMP {
                return Err(Errno::EINVAL);
            }
            // SAFETY: op SECCOMP says the kernel filled the `seccomp` member.
            let seccomp = unsafe { info.u.seccomp };
            let entry = SyscallEntry::new(Abi::of(info.arch, seccomp.nr), seccomp.nr, seccomp.args);
            return Ok((entry, seccomp.ret_data));
        }
        let data = ptrace::getevent(pid)? as u32;
        Ok((entry_from_registers(&ptrace::getregs(pid)?, abi_in_data(data)), data))
    }

    /// At a PTRACE_SYSCALL stop. `in_syscall` is the caller's own entry/exit
    /// bookkeeping, used only when the kernel cannot tell (register fallback,
    /// which also assumes the native ABI).
    pub fn read_syscall(&mut self, pid: Pid, in_syscall: bool) -> nix::Result<SyscallState> {
        if let Some(info) = self.info(pid)? {
            return match info.op {
                libc::PTRACE_SYSCALL_INFO_ENTRY => {
                    // SAFETY: op ENTRY says the kernel filled the `entry` member.
                    let entry = unsafe { info.u.entry };
                    Ok(SyscallState::Entry(SyscallEntry::new(Abi::of(info.arch, entry.nr), entry.nr, entry.args)))
                }
                // SAFETY: op EXIT says the kernel filled the `exit` member.
                libc::PTRACE_SYSCALL_INFO_EXIT => Ok(SyscallState::Exit(unsafe { info.u.exit }.sval)),
                _ => Err(Errno::EINVAL),
            };
        }
        let regs = ptrace::getregs(pid)?;
        if in_syscall {
            return Ok(SyscallState::Exit(regs.rax as i64));
        }
        Ok(SyscallState::Entry(entry_from_registers(&regs, Abi::X86_64)))
    }
}

fn entry_from_registers(regs: &libc::user_regs_struct, abi: Abi) -> SyscallEntry {
    let args = match abi {
        Abi::I386 => [regs.rbx, regs.rcx, regs.rdx, regs.rsi, regs.rdi, regs.rbp],
        _ => [regs.rdi, regs.rsi, regs.rdx, regs.r10, regs.r8, regs.r9],
    };
    SyscallEntry::new(abi, regs.orig_rax, args)
}

/// The ABI of user code by its code segment: x86_64 and i386 user code use
/// fixed selectors.
fn abi_of_code(cs: u64) -> Option<Abi> {
    const USER_CS_64: u64 = 0x33;
    const USER_CS_32: u64 = 0x23;
    match cs {
        USER_CS_64 => Some(Abi::X86_64),
        USER_CS_32 => Some(Abi::I386),
        _ => None,
    }
}

/// At an exec stop: the new image's stack pointer and ABI.
pub fn stack_at_exec(pid: Pid) -> nix::Result<(u64, Abi)> {
    let regs = ptrace::getregs(pid)?;
    Ok((regs.rsp, abi_of_code(regs.cs).unwrap_or(Abi::Unknown)))
}

/// Where a stopped thread is: its instruction and stack pointers, and the
/// ABI of the code it runs.
pub fn position(pid: Pid) -> nix::Result<(u64, u64, Abi)> {
    let regs = ptrace::getregs(pid)?;
    Ok((regs.rip, regs.rsp, abi_of_code(regs.cs).unwrap_or(Abi::Unknown)))
}

/// At a syscall-entry or seccomp stop: the call is skipped (syscall number
/// -1) and the thread sees -`errno` as its result. The kernel leaves the
/// return register alone for a skipped call, so no exit stop is needed.
pub fn refuse_syscall(pid: Pid, errno: i32) -> nix::Result<()> {
    let mut regs = ptrace::getregs(pid)?;
    regs.orig_rax = u64::MAX;
    regs.rax = (-i64::from(errno)) as u64;
    ptrace::setregs(pid, regs)
}

/// Rewrites the first syscall argument at a syscall-entry stop (used to strip
/// CLONE_UNTRACED before the kernel sees it).
pub fn set_first_arg(pid: Pid, abi: Abi, value: u64) -> nix::Result<()> {
    let mut regs = ptrace::getregs(pid)?;
    match abi {
        Abi::I386 => regs.rbx = value,
        _ => regs.rdi = value,
    }
    ptrace::setregs(pid, regs)
}

/// Where a signal or PTRACE_INTERRUPT ended a supervised call's wait for
/// the tracer (the call never ran: it is in a restart state, with no
/// marker): makes the kernel run it again whatever handler runs first
/// (ERESTARTNOINTR: natively, such a call on a local file is never
/// interrupted), and with `marker` as its sixth argument when `bounce` (the
/// filter then sends it to ptrace). `notified` says which calls (number,
/// arguments) the filter hands to the tracer. Where the tracer has made
/// this very call already (`made`: its number, arguments and result) and
/// the signal beat its answer, the call returns that result instead of
/// restarting, as natively it would have completed before the signal was
/// handled. Returns the sixth argument's value before, when it did any of
/// this.
pub fn restart_supervised(
    pid: Pid,
    marker: u64,
    bounce: bool,
    notified: impl Fn(u64, &[u64; 6]) -> bool,
    made: Option<(i32, [u64; 6], i64)>,
) -> nix::Result<Option<u64>> {
    const RESTART_CODES: [i64; 3] = [-512, -513, -514];
    let mut regs = ptrace::getregs(pid)?;
    let args = [regs.rdi, regs.rsi, regs.rdx, regs.r10, regs.r8, regs.r9];
    let waiting = abi_of_code(regs.cs) == Some(Abi::X86_64)
        && RESTART_CODES.contains(&(regs.rax as i64))
        && regs.r9 != marker
        && notified(regs.orig_rax, &args);
    if !waiting {
        return Ok(None);
    }
    let before = regs.r9;
    let made = made.filter(|&(nr, made_args, _)| nr as u64 == regs.orig_rax && made_args == args);
    match made {
        Some((_, _, retval)) => regs.rax = retval as u64,
        None => {
            regs.rax = -513i64 as u64;
            if bounce {
                regs.r9 = marker;
            }
        }
    }
    ptrace::setregs(pid, regs)?;
    Ok(Some(before))
}

/// Puts back the sixth argument of a bounced call at its exit stop.
pub fn set_sixth_arg(pid: Pid, value: u64) -> nix::Result<()> {
    let mut regs = ptrace::getregs(pid)?;
    regs.r9 = value;
    ptrace::setregs(pid, regs)
}
