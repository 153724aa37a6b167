//! The syscall table: one entry per watched syscall, with its number in each
//! ABI, when it stops, and what it decodes as. The seccomp filter is
//! generated from this table, so watching one more syscall is one more entry
//! here (and, for a new kind of call, its decoder).

use crate::proto::FileOperation as Op;
use crate::trace::abi::Abi;
use crate::trace::condition::{ArgTest, When};
use crate::trace::decode::PathArg::{At, Fd, Path, Text};
use crate::trace::decode::PathArg::{AtOrFd, Returned};
use crate::trace::decode::XattrValue::{Args, Struct};
use crate::trace::decode::{
    ChdirCall, ConfiningCall, CredCall, Decoder, ExecCall, FileCall as F, ModuleCall, NetCall, NsCall, OpenCall,
    RlimitCall, SeccompCall, SendCall, SignalCall, UffdCall,
};
use crate::trace::decode::{LengthArg, TimeLayout, RAW_SOCKETS, SOCKOPTS_WATCHED};

/// What the tracer does with a call of the table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// Every call stops and is decoded.
    Trace(Decoder),
    /// Only calls whose argument `index` (its low 32 bits, as the kernel
    /// reads an int) equals `value` stop; the filter lets the others run
    /// untouched, so a hot call with nothing to report costs no stop.
    TraceWhen { index: usize, value: u32, decoder: Decoder },
    /// Only calls whose arguments pass `when` stop (checked by the filter,
    /// and by the engine for stops that did not come through it).
    TraceIf { when: When, decoder: Decoder },
    /// Calls the tracer can perform itself: where it supervises calls, the
    /// filter hands those of the `notified` form to its listener and the
    /// tracer performs them (`supervise/`); every other form, every i386
    /// call and every call bounced back to ptrace stops as `Trace`.
    Supervise { notified: Notified, decoder: Decoder },
    /// The call never runs: it fails with this errno, unreported (a policy
    /// the filter applies by itself, as container runtimes' profiles do).
    Refuse(i32),
}

/// Open flags that make an open unsupervised: `__O_TMPFILE` (O_TMPFILE
/// without O_DIRECTORY), an unnamed file that a later linkat names.
pub const NOT_SUPERVISED_FLAGS: u32 = 0o20_000_000;

/// Which calls of a `Supervise` row the filter hands to the listener.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Notified {
    /// Every call.
    Always,
    /// Opens whose flags (argument `flags`) are not O_TMPFILE's.
    NamedOpens { flags: usize },
}

impl Notified {
    /// Whether a call with these arguments is of the notified form.
    pub fn covers(self, args: &[u64; 6]) -> bool {
        match self {
            Notified::Always => true,
            Notified::NamedOpens { flags } => args[flags] as u32 & NOT_SUPERVISED_FLAGS == 0,
        }
    }
}

pub struct SyscallDef {
    /// The kernel's name for the call, as events report it.
    pub name: &'static str,
    pub x86_64: Option<u32>,
    pub i386: Option<u32>,
    pub action: Action,
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

const fn row(name: &'static str, x86_64: Option<u32>, i386: Option<u32>, action: Action) -> SyscallDef {
    SyscallDef { name, x86_64, i386, action }
}

const fn ids(count: usize) -> Action {
    Trace(Decoder::Credentials(CredCall::Ids { count, narrow_on_i386: true }))
}

const fn ids32(count: usize) -> Action {
    Trace(Decoder::Credentials(CredCall::Ids { count, narrow_on_i386: false }))
}

const fn file(spec: F) -> Action {
    Trace(Decoder::File(spec))
}

/// A file call on a name that the tracer performs itself where it can.
const fn names(spec: F) -> Action {
    Supervise { notified: Notified::Always, decoder: Decoder::File(spec) }
}

const fn opens(flags: usize, call: OpenCall) -> Action {
    Supervise { notified: Notified::NamedOpens { flags }, decoder: Decoder::Open(call) }
}

const fn decode(decoder: Decoder) -> Action {
    Trace(decoder)
}

/// ioctl(fd, USERFAULTFD_IOC_NEW) on /dev/userfaultfd: `_IO(0xAA, 0x00)`.
const USERFAULTFD_IOC_NEW: u32 = 0xaa00;

/// prctl options that stop: those that change what the process may do or
/// how it is seen (see `PrctlEvent`) and PR_SET_SECCOMP (a seccomp event),
/// PR_CAP_AMBIENT only for the operations that change the set. PR_GET_*, PR_SET_VMA, PR_SET_PDEATHSIG
/// and the like never stop.
pub const PRCTL_WATCHED: When = When(&[
    &[ArgTest::OneOf(0, &[4, 8, 15, 22, 24, 28, 35, 36, 38, 53, 0x5961_6d61])],
    &[ArgTest::OneOf(0, &[47]), ArgTest::OneOf(1, &[2, 3, 4])],
]);

/// Signals that stop: those whose default action ends, stops or resumes a
/// process (SIGHUP, SIGINT, SIGQUIT, SIGILL, SIGTRAP, SIGABRT, SIGBUS,
/// SIGFPE, SIGKILL, SIGSEGV, SIGPIPE, SIGTERM, SIGSTKFLT, SIGCONT, SIGSTOP,
/// SIGTSTP, SIGTTIN, SIGTTOU, SIGXCPU, SIGXFSZ, SIGPWR, SIGSYS). The filter
/// cannot tell a signal a process sends itself from one to another, so the
/// signals programs send themselves all the time never stop: timers
/// (SIGALRM, SIGVTALRM, SIGPROF), SIGUSR1 and SIGUSR2, SIGIO, those ignored
/// by default (SIGCHLD, SIGURG: Go preempts its threads with it, SIGWINCH),
/// real-time ones (glibc's thread cancellation and set*id broadcast), and 0
/// (a probe that sends nothing).
const SIGNALS_WATCHED: &[u32] = &[1, 2, 3, 4, 5, 6, 7, 8, 9, 11, 13, 15, 16, 18, 19, 20, 21, 22, 24, 25, 30, 31];

/// `index` is the signal's argument.
const fn signal_sent(index: usize) -> When {
    match index {
        1 => When(&[&[ArgTest::OneOf(1, SIGNALS_WATCHED)]]),
        _ => When(&[&[ArgTest::OneOf(2, SIGNALS_WATCHED)]]),
    }
}

const fn signal(call: SignalCall, index: usize) -> Action {
    TraceIf { when: signal_sent(index), decoder: Decoder::Signal(call) }
}

use Action::{Refuse, Supervise, Trace, TraceIf, TraceWhen};
use Decoder::{Chdir, Clone, Exec, IoUring, Namespace, Net, Open, Ptrace, Seccomp, Socketcall, Userfaultfd};

#[rustfmt::skip]
pub static SYSCALLS: &[SyscallDef] = &[
    //   name               x86_64      i386        decodes as
    row("execve",          Some(59),   Some(11),   decode(Exec(ExecCall::Execve))),
    row("execveat",        Some(322),  Some(358),  decode(Exec(ExecCall::Execveat))),
    row("open",            Some(2),    Some(5),    opens(1, OpenCall::Open)),
    row("openat",          Some(257),  Some(295),  opens(2, OpenCall::Openat)),
    row("openat2",         Some(437),  Some(437),  Supervise { notified: Notified::Always, decoder: Open(OpenCall::Openat2) }),
    row("creat",           Some(85),   Some(8),    Supervise { notified: Notified::Always, decoder: Open(OpenCall::Creat) }),
    row("open_by_handle_at", Some(304), Some(342), decode(Open(OpenCall::ByHandle))),
    row("io_uring_setup",  Some(425),  Some(425),  decode(IoUring)),
    row("connect",         Some(42),   Some(362),  decode(Net(NetCall::Connect))),
    row("bind",            Some(49),   Some(361),  decode(Net(NetCall::Bind))),
    // i386 has accept only through socketcall.
    row("accept",          Some(43),   None,       decode(Net(NetCall::Accept))),
    row("accept4",         Some(288),  Some(364),  decode(Net(NetCall::Accept))),
    row("socketcall",      None,       Some(102),  decode(Socketcall)),
    // Where later paths lead: the root, mounts and namespaces.
    row("chroot",          Some(161),  Some(61),   decode(Namespace(NsCall::Chroot))),
    row("pivot_root",      Some(155),  Some(217),  decode(Namespace(NsCall::PivotRoot))),
    row("mount",           Some(165),  Some(21),   decode(Namespace(NsCall::Mount))),
    row("umount2",         Some(166),  Some(52),   decode(Namespace(NsCall::Umount))),
    row("umount",          None,       Some(22),   decode(Namespace(NsCall::UmountNoFlags))),
    row("unshare",         Some(272),  Some(310),  decode(Namespace(NsCall::Unshare))),
    row("setns",           Some(308),  Some(346),  decode(Namespace(NsCall::Setns))),
    row("chdir",           Some(80),   Some(12),   decode(Chdir(ChdirCall::Chdir))),
    row("fchdir",          Some(81),   Some(133),  decode(Chdir(ChdirCall::Fchdir))),
    row("unlink",          Some(87),   Some(10),   names(F::new(Op::Unlink, Path(0)))),
    row("unlinkat",        Some(263),  Some(301),  names(F::new(Op::Unlink, At(0, 1)).flags(2))),
    row("rmdir",           Some(84),   Some(40),   names(F::new(Op::Rmdir, Path(0)))),
    row("rename",          Some(82),   Some(38),   names(F::new(Op::Rename, Path(0)).target(Path(1)))),
    row("renameat",        Some(264),  Some(302),  names(F::new(Op::Rename, At(0, 1)).target(At(2, 3)))),
    row("renameat2",       Some(316),  Some(353),  names(F::new(Op::Rename, At(0, 1)).target(At(2, 3)).flags(4))),
    row("mkdir",           Some(83),   Some(39),   names(F::new(Op::Mkdir, Path(0)).mode(1))),
    row("mkdirat",         Some(258),  Some(296),  names(F::new(Op::Mkdir, At(0, 1)).mode(2))),
    row("link",            Some(86),   Some(9),    names(F::new(Op::Link, Path(1)).target(Path(0)))),
    row("linkat",          Some(265),  Some(303),  names(F::new(Op::Link, At(2, 3)).target(At(0, 1)).flags(4))),
    row("symlink",         Some(88),   Some(83),   names(F::new(Op::Symlink, Path(1)).target(Text(0)))),
    row("symlinkat",       Some(266),  Some(304),  names(F::new(Op::Symlink, At(1, 2)).target(Text(0)))),
    row("chmod",           Some(90),   Some(15),   names(F::new(Op::Chmod, Path(0)).mode(1))),
    row("fchmod",          Some(91),   Some(94),   names(F::new(Op::Chmod, Fd(0)).mode(1))),
    row("fchmodat",        Some(268),  Some(306),  names(F::new(Op::Chmod, At(0, 1)).mode(2))),
    row("fchmodat2",       Some(452),  Some(452),  names(F::new(Op::Chmod, At(0, 1)).mode(2).flags(3))),
    // On i386, chown, lchown and fchown take 16-bit ids; the *32 forms 32-bit ones.
    row("chown",           Some(92),   Some(182),  names(F::new(Op::Chown, Path(0)).owner(1).narrow_ids_on_i386())),
    row("lchown",          Some(94),   Some(16),   names(F::new(Op::Chown, Path(0)).owner(1).narrow_ids_on_i386().symlink_itself())),
    row("fchown",          Some(93),   Some(95),   names(F::new(Op::Chown, Fd(0)).owner(1).narrow_ids_on_i386())),
    row("fchownat",        Some(260),  Some(298),  names(F::new(Op::Chown, At(0, 1)).owner(2).flags(4))),
    row("chown32",         None,       Some(212),  file(F::new(Op::Chown, Path(0)).owner(1))),
    row("lchown32",        None,       Some(198),  file(F::new(Op::Chown, Path(0)).owner(1).symlink_itself())),
    row("fchown32",        None,       Some(207),  file(F::new(Op::Chown, Fd(0)).owner(1))),
    // Timestomping: times as each call lays them out (i386's time32 forms
    // take 32-bit ones; utimensat_time64 is i386's 64-bit utimensat).
    row("utime",           Some(132),  Some(30),   names(F::new(Op::Utimes, Path(0)).times(1, TimeLayout::Utimbuf))),
    row("utimes",          Some(235),  Some(271),  names(F::new(Op::Utimes, Path(0)).times(1, TimeLayout::Timeval))),
    row("futimesat",       Some(261),  Some(299),  names(F::new(Op::Utimes, AtOrFd(0, 1)).times(2, TimeLayout::Timeval))),
    row("utimensat",       Some(280),  Some(320),  names(F::new(Op::Utimes, AtOrFd(0, 1)).times(2, TimeLayout::Timespec).flags(3))),
    row("utimensat_time64", None,      Some(412),  file(F::new(Op::Utimes, AtOrFd(0, 1)).times(2, TimeLayout::Timespec64).flags(3))),
    // i386's truncate64 and ftruncate64 split the 64-bit length in two registers.
    row("truncate",        Some(76),   Some(92),   names(F::new(Op::Truncate, Path(0)).length(LengthArg::Long(1)))),
    row("ftruncate",       Some(77),   Some(93),   names(F::new(Op::Truncate, Fd(0)).length(LengthArg::Long(1)))),
    row("truncate64",      None,       Some(193),  file(F::new(Op::Truncate, Path(0)).length(LengthArg::Split(1)))),
    row("ftruncate64",     None,       Some(194),  file(F::new(Op::Truncate, Fd(0)).length(LengthArg::Split(1)))),
    row("setxattr",        Some(188),  Some(226),  names(F::new(Op::Setxattr, Path(0)).xattr(1, Some(Args(2))).flags(4))),
    row("lsetxattr",       Some(189),  Some(227),  names(F::new(Op::Setxattr, Path(0)).xattr(1, Some(Args(2))).flags(4).symlink_itself())),
    row("fsetxattr",       Some(190),  Some(228),  names(F::new(Op::Setxattr, Fd(0)).xattr(1, Some(Args(2))).flags(4))),
    row("removexattr",     Some(197),  Some(235),  names(F::new(Op::Removexattr, Path(0)).xattr(1, None))),
    row("lremovexattr",    Some(198),  Some(236),  names(F::new(Op::Removexattr, Path(0)).xattr(1, None).symlink_itself())),
    row("fremovexattr",    Some(199),  Some(237),  names(F::new(Op::Removexattr, Fd(0)).xattr(1, None))),
    // Linux 6.13: the value in a struct, whose XATTR_* flags join the AT_* ones (no bit is shared).
    row("setxattrat",      Some(463),  Some(463),  file(F::new(Op::Setxattr, AtOrFd(0, 1)).xattr(3, Some(Struct(4))).flags(2))),
    row("removexattrat",   Some(466),  Some(466),  file(F::new(Op::Removexattr, AtOrFd(0, 1)).xattr(3, None).flags(2))),
    row("mknod",           Some(133),  Some(14),   names(F::new(Op::Mknod, Path(0)).mode(1).device(2))),
    row("mknodat",         Some(259),  Some(297),  names(F::new(Op::Mknod, At(0, 1)).mode(2).device(3))),
    row("memfd_create",    Some(319),  Some(356),  file(F::new(Op::MemfdCreate, Returned).name(0).flags(1))),
    row("setuid",          Some(105),  Some(23),   ids(1)),
    row("setgid",          Some(106),  Some(46),   ids(1)),
    row("setreuid",        Some(113),  Some(70),   ids(2)),
    row("setregid",        Some(114),  Some(71),   ids(2)),
    row("setresuid",       Some(117),  Some(164),  ids(3)),
    row("setresgid",       Some(119),  Some(170),  ids(3)),
    row("setfsuid",        Some(122),  Some(138),  ids(1)),
    row("setfsgid",        Some(123),  Some(139),  ids(1)),
    row("capset",          Some(126),  Some(185),  decode(Decoder::Credentials(CredCall::Capset))),
    row("setgroups",       Some(116),  Some(81),   decode(Decoder::Credentials(CredCall::Groups { narrow_on_i386: true }))),
    row("setgroups32",     None,       Some(206),  decode(Decoder::Credentials(CredCall::Groups { narrow_on_i386: false }))),
    // i386's 32-bit id variants (the calls above take 16-bit ids there).
    row("setuid32",        None,       Some(213),  ids32(1)),
    row("setgid32",        None,       Some(214),  ids32(1)),
    row("setreuid32",      None,       Some(203),  ids32(2)),
    row("setregid32",      None,       Some(204),  ids32(2)),
    row("setresuid32",     None,       Some(208),  ids32(3)),
    row("setresgid32",     None,       Some(210),  ids32(3)),
    row("setfsuid32",      None,       Some(215),  ids32(1)),
    row("setfsgid32",      None,       Some(216),  ids32(1)),
    // fork and vfork are seen through their ptrace events only. clone3's
    // flags are in memory that a sibling thread can rewrite after the entry
    // stop (CLONE_UNTRACED, CLONE_THREAD): it is refused, and libc falls
    // back to clone, whose flags are in a register the tracer reads and
    // rewrites exactly as the kernel uses them.
    row("clone",           Some(56),   Some(120),  decode(Clone)),
    row("clone3",          Some(435),  Some(435),  Refuse(libc::ENOSYS)),
    // Calls that reach for the tracer or the kernel's control of processes.
    row("ptrace",          Some(101),  Some(26),   decode(Ptrace)),
    row("seccomp",         Some(317),  Some(354),  decode(Seccomp(SeccompCall::Seccomp))),
    // PR_SET_SECCOMP decodes as a seccomp call.
    row("prctl",           Some(157),  Some(172),  TraceIf { when: PRCTL_WATCHED, decoder: Decoder::Prctl }),
    row("userfaultfd",     Some(323),  Some(374),  decode(Userfaultfd(UffdCall::Syscall))),
    row("ioctl",           Some(16),   Some(54),   TraceWhen { index: 1, value: USERFAULTFD_IOC_NEW, decoder: Userfaultfd(UffdCall::Ioctl) }),
    // Resource limits; a prlimit64 without a new limit only reads.
    row("setrlimit",       Some(160),  Some(75),   decode(Decoder::Rlimit(RlimitCall::Setrlimit))),
    row("prlimit64",       Some(302),  Some(340),  TraceIf { when: When(&[&[ArgTest::NonZero(2)]]), decoder: Decoder::Rlimit(RlimitCall::Prlimit64) }),
    // Kernel code: modules and eBPF.
    row("init_module",     Some(175),  Some(128),  decode(Decoder::Module(ModuleCall::Init))),
    row("finit_module",    Some(313),  Some(350),  decode(Decoder::Module(ModuleCall::Finit))),
    row("delete_module",   Some(176),  Some(129),  decode(Decoder::Module(ModuleCall::Delete))),
    row("bpf",             Some(321),  Some(357),  decode(Decoder::Bpf)),
    // No events: what the tracer may do for the workload's supervised calls.
    // A supervised creation uses the thread's mask, which only umask
    // changes; a Landlock domain or a fanotify content group (permission
    // events) would confine or hold the tracer's own calls, which then stop.
    row("umask",           Some(95),   Some(60),   decode(Decoder::Confines(ConfiningCall::Umask))),
    row("landlock_restrict_self", Some(446), Some(446), decode(Decoder::Confines(ConfiningCall::Landlock))),
    row("fanotify_init",   Some(300),  Some(338),  decode(Decoder::Confines(ConfiningCall::Fanotify))),
    // Signals to other processes.
    row("kill",            Some(62),   Some(37),   signal(SignalCall::Kill, 1)),
    row("tkill",           Some(200),  Some(238),  signal(SignalCall::Tkill, 1)),
    row("tgkill",          Some(234),  Some(270),  signal(SignalCall::Tgkill, 2)),
    row("pidfd_send_signal", Some(424), Some(424), signal(SignalCall::PidfdSendSignal, 1)),
    // Sockets below TCP and UDP, options that shape traffic, and datagrams
    // (or TCP Fast Open) to a destination without connect(2). sendmsg and
    // sendmmsg carry their destination in memory: every call stops.
    row("socket",          Some(41),   Some(359),  TraceIf { when: RAW_SOCKETS, decoder: Net(NetCall::Socket) }),
    row("setsockopt",      Some(54),   Some(366),  TraceIf { when: SOCKOPTS_WATCHED, decoder: Net(NetCall::Setsockopt) }),
    row("sendto",          Some(44),   Some(369),  TraceIf { when: When(&[&[ArgTest::NonZero(4)]]), decoder: Net(NetCall::Send(SendCall::Sendto)) }),
    row("sendmsg",         Some(46),   Some(370),  decode(Net(NetCall::Send(SendCall::Sendmsg)))),
    row("sendmmsg",        Some(307),  Some(345),  decode(Net(NetCall::Send(SendCall::Sendmmsg)))),
];

/// The entry and decoder of an x86_64 call the filter hands to the listener
/// where the tracer supervises calls (None for any other call).
pub fn supervised(nr: u64, args: &[u64; 6]) -> Option<(&'static SyscallDef, Decoder)> {
    let def = lookup(Abi::X86_64, nr)?;
    match def.action {
        Action::Supervise { notified, decoder } if notified.covers(args) => Some((def, decoder)),
        _ => None,
    }
}

/// The entry for a syscall number, for stops that did not come through the
/// filter (`--disable-seccomp`).
pub fn lookup(abi: Abi, nr: u64) -> Option<&'static SyscallDef> {
    SYSCALLS.iter().find(|def| def.number(abi).map(u64::from) == Some(nr))
}

#[cfg(test)]
mod tests {
    use std::str::FromStr;

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

    /// Names and numbers as the kernel's own syscall tables have them (the
    /// `syscalls` crate generates its tables from the kernel's sources): a
    /// typo in either would watch the wrong call or none.
    #[test]
    fn names_and_numbers_are_the_kernel_s() {
        for def in SYSCALLS {
            let x86_64 = syscalls::x86_64::Sysno::from_str(def.name).ok().map(|s| s.id() as u32);
            let i386 = syscalls::x86::Sysno::from_str(def.name).ok().map(|s| s.id() as u32);
            assert!(x86_64.is_some() || i386.is_some(), "{} is no syscall name", def.name);
            assert_eq!(def.x86_64, x86_64, "x86_64 number of {}", def.name);
            assert_eq!(def.i386, i386, "i386 number of {}", def.name);
        }
    }
}
