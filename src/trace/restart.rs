//! Calls a signal interrupts: what the program sees of them. A blocking
//! call woken by a signal exits with a restart code the program never sees;
//! after the signal, the kernel either runs the call again (the program
//! sees only that second call's result) or returns EINTR. Which one depends
//! on the signal's handler, and on SA_RESTART, which /proc does not show:
//! the tracer reads the kernel's decision from the handler's signal frame.

use nix::unistd::Pid;

use crate::trace::abi::Abi;
use crate::trace::memory;

const ERESTARTSYS: i64 = -512;
const ERESTARTNOINTR: i64 = -513;
const ERESTARTNOHAND: i64 = -514;
const ERESTART_RESTARTBLOCK: i64 = -516;
pub const EINTR: i64 = -(libc::EINTR as i64);

/// What an exit stop's return value means to the program.
#[derive(Debug, PartialEq, Eq)]
pub enum Exit {
    /// The program gets this value.
    Final(i64),
    /// The kernel runs the call again whatever happens: the second call is
    /// the one reported.
    Restarted,
    /// Restarted when no handler runs; with a handler, EINTR unless
    /// `sa_restart_restarts` and the handler has SA_RESTART.
    Interrupted { sa_restart_restarts: bool },
}

pub fn classify(retval: i64) -> Exit {
    match retval {
        // Restart blocks go through restart_syscall, which is not watched;
        // none of the watched calls uses one.
        ERESTARTNOINTR | ERESTART_RESTARTBLOCK => Exit::Restarted,
        ERESTARTSYS => Exit::Interrupted { sa_restart_restarts: true },
        ERESTARTNOHAND => Exit::Interrupted { sa_restart_restarts: false },
        _ => Exit::Final(retval),
    }
}

/// What the kernel decided, read at a handler's first instruction.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    /// The call returns EINTR when the handler returns.
    Eintr,
    /// The call runs again when the handler returns.
    Restarted,
}

/// Offsets in an x86_64 `rt_sigframe` (at the handler's stack pointer):
/// the return address (8 bytes), then `ucontext` (uc_flags, uc_link, a
/// 24-byte stack_t) whose `sigcontext` holds r8..r15, di, si, bp, bx, dx,
/// ax, cx, sp, ip, 8 bytes each.
const FRAME_AX: u64 = 8 + 8 + 8 + 24 + 13 * 8;
const FRAME_IP: u64 = FRAME_AX + 3 * 8;
/// Length of the `syscall` instruction, which a restart runs again.
const SYSCALL_INSN_LEN: u64 = 2;

/// The kernel's decision as the handler's frame records it: the registers
/// the program resumes with when the handler returns. `sp` is the handler's
/// stack pointer at its first instruction; `exit_ip` the instruction
/// pointer at the call's exit stop. None when the frame is not one the
/// kernel built for this call (only x86_64 frames are read).
pub fn verdict_from_frame(pid: Pid, sp: u64, exit_ip: u64) -> Option<Verdict> {
    let ax = *memory::read_words(pid, sp.checked_add(FRAME_AX)?, Abi::X86_64, 1).first()?;
    let ip = *memory::read_words(pid, sp.checked_add(FRAME_IP)?, Abi::X86_64, 1).first()?;
    match (ax as i64, ip) {
        (EINTR, ip) if ip == exit_ip => Some(Verdict::Eintr),
        (_, ip) if ip == exit_ip.wrapping_sub(SYSCALL_INSN_LEN) => Some(Verdict::Restarted),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn restart_codes_are_never_what_the_program_sees() {
        assert_eq!(classify(-512), Exit::Interrupted { sa_restart_restarts: true });
        assert_eq!(classify(-514), Exit::Interrupted { sa_restart_restarts: false });
        assert_eq!(classify(-513), Exit::Restarted);
        assert_eq!(classify(-4), Exit::Final(-4));
        assert_eq!(classify(3), Exit::Final(3));
    }

    #[test]
    fn a_frame_says_eintr_or_restart_by_its_saved_registers() {
        let exit_ip = 0x4000_1002_u64;
        let verdict = |ax: i64, ip: u64| {
            let mut frame = [0u64; 32];
            frame[(FRAME_AX / 8) as usize] = ax as u64;
            frame[(FRAME_IP / 8) as usize] = ip;
            let frame = std::hint::black_box(frame);
            verdict_from_frame(Pid::this(), frame.as_ptr() as u64, exit_ip)
        };
        assert_eq!(verdict(EINTR, exit_ip), Some(Verdict::Eintr));
        assert_eq!(verdict(257, exit_ip - 2), Some(Verdict::Restarted));
        assert_eq!(verdict(257, 0x1234), None);
    }
}
