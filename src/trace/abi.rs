//! The system call ABIs a traced process can call through, and what a
//! syscall entry is. The lowest layer of the engine: the kernel's own
//! numbers, nothing of the tracer's.

/// `AUDIT_ARCH_*` of linux/audit.h: the `arch` the kernel reports for a
/// syscall (in seccomp data and PTRACE_GET_SYSCALL_INFO).
pub const AUDIT_ARCH_X86_64: u32 = 0xc000_003e;
pub const AUDIT_ARCH_I386: u32 = 0x4000_0003;
/// Syscall numbers of the x32 ABI carry this bit within AUDIT_ARCH_X86_64.
pub const X32_SYSCALL_BIT: u64 = 0x4000_0000;

/// The size of a memory page on x86_64 (and i386): reads of tracee memory
/// and of /proc files are sized by it.
pub const PAGE: usize = 4096;

/// The system call table a call went through.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Abi {
    X86_64,
    /// `int 0x80`, from a 32-bit process or a 64-bit one.
    I386,
    /// Another architecture or x32: traced so it is seen, never decoded.
    Unknown,
}

impl Abi {
    /// The ABI of a call the kernel reports with `arch` and number `nr`.
    pub fn of(arch: u32, nr: u64) -> Abi {
        match arch {
            AUDIT_ARCH_X86_64 if nr & X32_SYSCALL_BIT == 0 => Abi::X86_64,
            AUDIT_ARCH_I386 => Abi::I386,
            _ => Abi::Unknown,
        }
    }

    /// Size of a pointer (and of `long`) in this ABI.
    pub fn word_size(self) -> usize {
        match self {
            Abi::I386 => 4,
            _ => 8,
        }
    }
}

/// A syscall entry as the kernel reports it.
#[derive(Clone, Copy, Debug)]
pub struct SyscallEntry {
    pub abi: Abi,
    pub nr: u64,
    pub args: [u64; 6],
}

impl SyscallEntry {
    /// An entry with its arguments as the kernel takes them: an i386 call
    /// uses the low 32 bits of each register, whatever a 64-bit process left
    /// in the upper halves (which the kernel reports as they are). Read
    /// whole, they would point the tracer at memory the call never reads.
    pub fn new(abi: Abi, nr: u64, mut args: [u64; 6]) -> SyscallEntry {
        if abi == Abi::I386 {
            args = args.map(|arg| arg & 0xffff_ffff);
        }
        SyscallEntry { abi, nr, args }
    }
}
