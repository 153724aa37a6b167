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
/// An i386 handler gets one of two frames, both of 4-byte words: with
/// SA_SIGINFO an `rt_sigframe_ia32` (pretcode, sig, pinfo, puc, a 128-byte
/// siginfo, then `ucontext_ia32`: uc_flags, uc_link, a 12-byte stack_t and
/// the `sigcontext_32`), without it a `sigframe_ia32` (pretcode, sig, then
/// the `sigcontext_32`). In `sigcontext_32`, after gs, fs, es, ds (4 bytes
/// each): di, si, bp, sp, bx, dx, cx, ax, trapno, err, ip.
const IA32_SIGCONTEXT_AX: u64 = 16 + 7 * 4;
const IA32_SIGCONTEXT_IP: u64 = IA32_SIGCONTEXT_AX + 3 * 4;
const IA32_RT_PINFO: u64 = 8;
const IA32_RT_SIGINFO: u64 = 16;
const IA32_RT_UCONTEXT: u64 = IA32_RT_SIGINFO + 128;
const IA32_RT_SIGCONTEXT: u64 = IA32_RT_UCONTEXT + 4 + 4 + 12;
const IA32_SIGCONTEXT: u64 = 8;
/// Length of the instruction a restart runs again: `syscall`, and for
/// i386 `int $0x80` (also where the vDSO's sysenter path resumes).
const SYSCALL_INSN_LEN: u64 = 2;

/// The kernel's decision as the handler's frame records it: the registers
/// the program resumes with when the handler returns. `sp` is the handler's
/// stack pointer at its first instruction and `handler_abi` the mode it
/// runs in, which says which frame the kernel built; `exit_ip` the
/// instruction pointer at the call's exit stop. None when the frame is not
/// one the kernel built for this call.
pub fn verdict_from_frame(pid: Pid, sp: u64, handler_abi: Abi, exit_ip: u64) -> Option<Verdict> {
    let word = |offset: u64| memory::read_words(pid, sp.checked_add(offset)?, handler_abi, 1).first().copied();
    let (ax, ip) = match handler_abi {
        Abi::X86_64 => (word(FRAME_AX)? as i64, word(FRAME_IP)?),
        Abi::I386 => {
            // An rt frame's `pinfo` points at its own siginfo; in the other
            // frame that word is the saved gs selector, a small number.
            let rt = word(IA32_RT_PINFO)? == sp.wrapping_add(IA32_RT_SIGINFO) & 0xffff_ffff;
            let context = if rt { IA32_RT_SIGCONTEXT } else { IA32_SIGCONTEXT };
            let ax = word(context + IA32_SIGCONTEXT_AX)? as u32 as i32;
            (i64::from(ax), word(context + IA32_SIGCONTEXT_IP)?)
        }
        Abi::Unknown => return None,
    };
    match (ax, ip) {
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
            verdict_from_frame(Pid::this(), frame.as_ptr() as u64, Abi::X86_64, exit_ip)
        };
        assert_eq!(verdict(EINTR, exit_ip), Some(Verdict::Eintr));
        assert_eq!(verdict(257, exit_ip - 2), Some(Verdict::Restarted));
        assert_eq!(verdict(257, 0x1234), None);
    }

    #[test]
    fn i386_frames_with_and_without_siginfo_are_told_apart_and_read() {
        let exit_ip = 0x0804_9002_u64;
        let verdict = |rt: bool, ax: i32, ip: u32| {
            let mut frame = vec![0u32; 128];
            let sp = frame.as_ptr() as u64;
            let context = if rt { IA32_RT_SIGCONTEXT } else { IA32_SIGCONTEXT };
            if rt {
                // The kernel's pointer to the frame's own siginfo (a 32-bit address).
                frame[(IA32_RT_PINFO / 4) as usize] = (sp + IA32_RT_SIGINFO) as u32;
            }
            frame[((context + IA32_SIGCONTEXT_AX) / 4) as usize] = ax as u32;
            frame[((context + IA32_SIGCONTEXT_IP) / 4) as usize] = ip;
            verdict_from_frame(Pid::this(), std::hint::black_box(&frame).as_ptr() as u64, Abi::I386, exit_ip)
        };
        for rt in [true, false] {
            assert_eq!(verdict(rt, -4, exit_ip as u32), Some(Verdict::Eintr), "rt: {rt}");
            assert_eq!(verdict(rt, 295, exit_ip as u32 - 2), Some(Verdict::Restarted), "rt: {rt}");
            assert_eq!(verdict(rt, -4, 0x1234), None, "rt: {rt}");
        }
    }
}
