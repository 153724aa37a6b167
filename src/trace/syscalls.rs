//! The syscall table: one entry per watched syscall, with its number in each
//! ABI and its decoders. The seccomp filter is generated from this table, so
//! watching one more syscall is one more entry here.
//!
//! An entry decoder runs at the syscall-entry stop (before the kernel acts),
//! reads what will be gone afterwards, updates state that must change before
//! the call runs, and says whether the exit stop is needed: that costs a
//! second stop, so entries ask for it only when the result matters.

use std::time::SystemTime;

use crate::trace::decode::{self, Ctx};

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
    /// Size of a pointer (and of `long`) in this ABI.
    pub fn word_size(self) -> usize {
        match self {
            Abi::I386 => 4,
            _ => 8,
        }
    }
}

/// A syscall stopped at entry, kept until its exit stop when one is needed.
pub struct Call {
    pub def: &'static SyscallDef,
    pub abi: Abi,
    pub args: [u64; 6],
    /// When the syscall was entered.
    pub time: SystemTime,
    /// Absolute path read at entry, for calls whose memory is gone at exit
    /// (exec) or whose file is (unlink).
    pub entry_path: Option<String>,
    /// A second path read at entry (rename's new name, a symlink's contents).
    pub entry_target: Option<String>,
    /// Argument memory read at entry, as the kernel read it, before another
    /// thread of the workload can change it (a sockaddr, an open_how).
    pub entry_bytes: Vec<u8>,
    /// Set when something could not be read at entry.
    pub partial: bool,
}

/// What the engine does after an entry decoder ran.
#[derive(Debug, PartialEq, Eq)]
pub enum Next {
    /// Nothing more to learn from this call.
    Done,
    /// Stop again at the syscall exit and run the exit decoder.
    Exit,
}

pub type EntryDecoder = fn(&mut Ctx<'_>, &mut Call) -> Next;
pub type ExitDecoder = fn(&mut Ctx<'_>, &Call, i64);

pub struct SyscallDef {
    pub name: &'static str,
    pub x86_64: Option<u32>,
    pub i386: Option<u32>,
    pub on_entry: EntryDecoder,
    pub on_exit: ExitDecoder,
}

impl SyscallDef {
    pub fn number(&self, abi: Abi) -> Option<u32> {
        match abi {
            Abi::X86_64 => self.x86_64,
            Abi::I386 => self.i386,
            Abi::Unknown => None,
        }
    }
}

const fn def(
    name: &'static str,
    x86_64: Option<u32>,
    i386: Option<u32>,
    on_entry: EntryDecoder,
    on_exit: ExitDecoder,
) -> SyscallDef {
    SyscallDef { name, x86_64, i386, on_entry, on_exit }
}

use decode::*;

#[rustfmt::skip]
pub static SYSCALLS: &[SyscallDef] = &[
    //   name               x86_64      i386        entry            exit
    def("execve",          Some(59),   Some(11),   exec_entry,      exec_exit),
    def("execveat",        Some(322),  Some(358),  exec_entry,      exec_exit),
    def("open",            Some(2),    Some(5),    await_exit,      open_exit),
    def("openat",          Some(257),  Some(295),  await_exit,      open_exit),
    def("openat2",         Some(437),  Some(437),  openat2_entry,   open_exit),
    def("creat",           Some(85),   Some(8),    await_exit,      open_exit),
    def("open_by_handle_at", Some(304), Some(342), await_exit,      open_exit),
    def("connect",         Some(42),   Some(362),  sockaddr_entry,  connect_exit),
    def("bind",            Some(49),   Some(361),  sockaddr_entry,  bind_exit),
    // i386 has accept only through socketcall.
    def("accept",          Some(43),   None,       await_exit,      accept_exit),
    def("accept4",         Some(288),  Some(364),  await_exit,      accept_exit),
    def("socketcall",      None,       Some(102),  socketcall_entry, never_exit),
    def("unshare",         Some(272),  Some(310),  unshare_entry,   never_exit),
    def("chdir",           Some(80),   Some(12),   await_exit,      chdir_exit),
    def("fchdir",          Some(81),   Some(133),  await_exit,      chdir_exit),
    def("io_uring_setup",  Some(425),  Some(425),  io_uring_entry,  io_uring_exit),
    def("unlink",          Some(87),   Some(10),   file_entry,      file_exit),
    def("unlinkat",        Some(263),  Some(301),  file_entry,      file_exit),
    def("rmdir",           Some(84),   Some(40),   file_entry,      file_exit),
    def("rename",          Some(82),   Some(38),   file_entry,      file_exit),
    def("renameat",        Some(264),  Some(302),  file_entry,      file_exit),
    def("renameat2",       Some(316),  Some(353),  file_entry,      file_exit),
    def("mkdir",           Some(83),   Some(39),   file_entry,      file_exit),
    def("mkdirat",         Some(258),  Some(296),  file_entry,      file_exit),
    def("link",            Some(86),   Some(9),    file_entry,      file_exit),
    def("linkat",          Some(265),  Some(303),  file_entry,      file_exit),
    def("symlink",         Some(88),   Some(83),   file_entry,      file_exit),
    def("symlinkat",       Some(266),  Some(304),  file_entry,      file_exit),
    def("chmod",           Some(90),   Some(15),   file_entry,      file_exit),
    def("fchmod",          Some(91),   Some(94),   file_entry,      file_exit),
    def("fchmodat",        Some(268),  Some(306),  file_entry,      file_exit),
    def("fchmodat2",       Some(452),  Some(452),  file_entry,      file_exit),
    // On i386, chown, lchown and fchown take 16-bit ids; the *32 forms 32-bit ones.
    def("chown",           Some(92),   Some(182),  file_entry,      file_exit),
    def("lchown",          Some(94),   Some(16),   file_entry,      file_exit),
    def("fchown",          Some(93),   Some(95),   file_entry,      file_exit),
    def("fchownat",        Some(260),  Some(298),  file_entry,      file_exit),
    def("chown32",         None,       Some(212),  file_entry,      file_exit),
    def("lchown32",        None,       Some(198),  file_entry,      file_exit),
    def("fchown32",        None,       Some(207),  file_entry,      file_exit),
    def("setuid",          Some(105),  Some(23),   await_exit,      credentials_exit),
    def("setgid",          Some(106),  Some(46),   await_exit,      credentials_exit),
    def("setreuid",        Some(113),  Some(70),   await_exit,      credentials_exit),
    def("setregid",        Some(114),  Some(71),   await_exit,      credentials_exit),
    def("setresuid",       Some(117),  Some(164),  await_exit,      credentials_exit),
    def("setresgid",       Some(119),  Some(170),  await_exit,      credentials_exit),
    def("setfsuid",        Some(122),  Some(138),  await_exit,      credentials_exit),
    def("setfsgid",        Some(123),  Some(139),  await_exit,      credentials_exit),
    def("capset",          Some(126),  Some(185),  capset_entry,    credentials_exit),
    // i386's 32-bit id variants (the calls above take 16-bit ids there).
    def("setuid32",        None,       Some(213),  await_exit,      credentials_exit),
    def("setgid32",        None,       Some(214),  await_exit,      credentials_exit),
    def("setreuid32",      None,       Some(203),  await_exit,      credentials_exit),
    def("setregid32",      None,       Some(204),  await_exit,      credentials_exit),
    def("setresuid32",     None,       Some(208),  await_exit,      credentials_exit),
    def("setresgid32",     None,       Some(210),  await_exit,      credentials_exit),
    def("setfsuid32",      None,       Some(215),  await_exit,      credentials_exit),
    def("setfsgid32",      None,       Some(216),  await_exit,      credentials_exit),
    // fork and vfork are seen through their ptrace events only.
    def("clone",           Some(56),   Some(120),  clone_entry,     never_exit),
    def("clone3",          Some(435),  Some(435),  clone_entry,     clone3_exit),
];

/// The entry for a syscall number, for stops that did not come through the
/// filter (`--disable-seccomp`).
pub fn lookup(abi: Abi, nr: u64) -> Option<&'static SyscallDef> {
    SYSCALLS.iter().find(|def| def.number(abi).map(u64::from) == Some(nr))
}

/// The entry of a syscall by name (i386 `socketcall` dispatches to connect).
pub fn by_name(name: &str) -> &'static SyscallDef {
    SYSCALLS.iter().find(|def| def.name == name).expect("syscall named in the table")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_are_unique_per_abi() {
        for abi in [Abi::X86_64, Abi::I386] {
            let mut seen = std::collections::HashSet::new();
            for def in SYSCALLS {
                if let Some(nr) = def.number(abi) {
                    assert!(seen.insert(nr), "{} reuses {abi:?} number {nr}", def.name);
                }
            }
        }
    }
}
