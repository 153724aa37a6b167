//! The seccomp-bpf filter, generated from the syscall table.
//!
//! Traced syscalls return SECCOMP_RET_TRACE with 16 bits of data that name the
//! table entry and ABI (see [`SeccompData`]), read back by the engine.
//! Supervised opens return SECCOMP_RET_USER_NOTIF where the tracer serves
//! them (`supervise.rs`), and SECCOMP_RET_TRACE when their sixth argument is
//! the tracer's marker (a call the tracer bounced back to ptrace).
//! Calls through an architecture we do not decode, and x32 calls, are traced
//! too (never allowed blindly), so that no ABI is a way around the tracer.

use nix::unistd::Pid;

use crate::trace::abi::{Abi, AUDIT_ARCH_I386, AUDIT_ARCH_X86_64, X32_SYSCALL_BIT};
use crate::trace::condition::{ArgTest, When};
use crate::trace::guard::{Harm, Target, GUARDS};
use crate::trace::supervise;
use crate::trace::syscalls::{Action, Notified, NOT_SUPERVISED_FLAGS, SYSCALLS};

const OFFSET_NR: u32 = 0;
const OFFSET_ARCH: u32 = 4;
/// `seccomp_data.args[i]` is at 16 + 8 i; its low 32 bits come first (x86
/// is little-endian).
const OFFSET_ARGS: u32 = 16;
const BPF_LD_W_ABS: u16 = (libc::BPF_LD | libc::BPF_W | libc::BPF_ABS) as u16;
const BPF_JEQ_K: u16 = (libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K) as u16;
const BPF_JSET_K: u16 = (libc::BPF_JMP | libc::BPF_JSET | libc::BPF_K) as u16;
const BPF_JA: u16 = (libc::BPF_JMP | libc::BPF_JA) as u16;
const BPF_AND_K: u16 = (libc::BPF_ALU | libc::BPF_AND | libc::BPF_K) as u16;
const BPF_RET_K: u16 = (libc::BPF_RET | libc::BPF_K) as u16;

/// The 16-bit SECCOMP_RET_DATA of a traced call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SeccompData {
    /// A table entry called through a known ABI.
    Known { abi: Abi, index: usize },
    /// Unknown architecture or x32: traced so that it is seen, not decoded.
    Foreign,
    /// A call whose arguments aim at the tracer (`guard.rs`).
    Guard { abi: Abi },
}

const ABI_SHIFT: u32 = 12;
const FOREIGN: u32 = 0xffff;
const GUARD_X86_64: u32 = 0xfffe;
const GUARD_I386: u32 = 0xfffd;

impl SeccompData {
    fn encode(self) -> u32 {
        match self {
            SeccompData::Known { abi, index } => {
                let abi_bits = match abi {
                    Abi::X86_64 => 0,
                    Abi::I386 => 1,
                    Abi::Unknown => return FOREIGN,
                };
                debug_assert!(index < 1 << ABI_SHIFT);
                (abi_bits << ABI_SHIFT) | index as u32
            }
            SeccompData::Foreign | SeccompData::Guard { abi: Abi::Unknown } => FOREIGN,
            SeccompData::Guard { abi: Abi::X86_64 } => GUARD_X86_64,
            SeccompData::Guard { abi: Abi::I386 } => GUARD_I386,
        }
    }

    /// The ABI the data names (for kernels that report nothing else).
    pub fn abi(self) -> Abi {
        match self {
            SeccompData::Known { abi, .. } | SeccompData::Guard { abi } => abi,
            SeccompData::Foreign => Abi::Unknown,
        }
    }

    pub fn decode(data: u32) -> SeccompData {
        let data = data & 0xffff;
        let index = (data & ((1 << ABI_SHIFT) - 1)) as usize;
        match data >> ABI_SHIFT {
            _ if data == GUARD_X86_64 => SeccompData::Guard { abi: Abi::X86_64 },
            _ if data == GUARD_I386 => SeccompData::Guard { abi: Abi::I386 },
            _ if data == FOREIGN || index >= SYSCALLS.len() => SeccompData::Foreign,
            0 => SeccompData::Known { abi: Abi::X86_64, index },
            1 => SeccompData::Known { abi: Abi::I386, index },
            _ => SeccompData::Foreign,
        }
    }
}

fn stmt(code: u16, k: u32) -> libc::sock_filter {
    libc::sock_filter { code, jt: 0, jf: 0, k }
}

fn jump(code: u16, k: u32, jt: u8, jf: u8) -> libc::sock_filter {
    libc::sock_filter { code, jt, jf, k }
}

/// For every guarded call (`guard.rs`) that has a number in `abi`: stop it
/// when its process id argument is `tracer` and its signal is not 0 (a
/// call that may name another of the tracer's threads, or a pidfd, and a
/// new limit's pointer are checked at the stop). Ends with the syscall
/// number loaded again.
fn push_guards(prog: &mut Vec<libc::sock_filter>, abi: Abi, tracer: u32) {
    let trace = libc::SECCOMP_RET_TRACE | SeccompData::Guard { abi }.encode();
    for g in GUARDS {
        let Some(nr) = g.number(abi) else { continue };
        // Each test jumps past the block's end when the call is not aimed
        // at the tracer; the block ends with RET.
        let mut tests: Vec<(u32, u32, bool)> = vec![(OFFSET_NR, nr, true)];
        if let Target::Tgid(i) | Target::Task(i) = g.target {
            tests.push((OFFSET_ARGS + 8 * i as u32, tracer, true));
        }
        if let Harm::Signal(i) = g.harm {
            tests.push((OFFSET_ARGS + 8 * i as u32, 0, false));
        }
        let len = 2 * tests.len() + 1;
        for (n, (offset, value, must_equal)) in tests.into_iter().enumerate() {
            let past_end = (len - 2 * n - 2) as u8;
            prog.push(stmt(BPF_LD_W_ABS, offset));
            prog.push(if must_equal {
                jump(BPF_JEQ_K, value, 0, past_end)
            } else {
                jump(BPF_JEQ_K, value, past_end, 0)
            });
        }
        prog.push(stmt(BPF_RET_K, trace));
    }
    prog.push(stmt(BPF_LD_W_ABS, OFFSET_NR));
}

/// For every table entry that has a number in `abi`: `JEQ nr; RET action`
/// (with an argument check first for `TraceWhen`), after the guards.
fn push_abi_block(prog: &mut Vec<libc::sock_filter>, abi: Abi, tracer: u32, marker: Option<u64>) {
    prog.push(stmt(BPF_LD_W_ABS, OFFSET_NR));
    if abi == Abi::X86_64 {
        prog.push(jump(BPF_JSET_K, X32_SYSCALL_BIT as u32, 0, 1));
        prog.push(stmt(BPF_RET_K, libc::SECCOMP_RET_TRACE | SeccompData::Foreign.encode()));
    }
    push_guards(prog, abi, tracer);
    for (index, def) in SYSCALLS.iter().enumerate() {
        let Some(nr) = def.number(abi) else { continue };
        let trace = libc::SECCOMP_RET_TRACE | SeccompData::Known { abi, index }.encode();
        match def.action {
            Action::Trace(_) => {
                prog.push(jump(BPF_JEQ_K, nr, 0, 1));
                prog.push(stmt(BPF_RET_K, trace));
            }
            Action::TraceWhen { index: arg, value, .. } => {
                // The accumulator then holds the argument, not the number:
                // both branches return.
                prog.push(jump(BPF_JEQ_K, nr, 0, 4));
                prog.push(stmt(BPF_LD_W_ABS, OFFSET_ARGS + 8 * arg as u32));
                prog.push(jump(BPF_JEQ_K, value, 0, 1));
                prog.push(stmt(BPF_RET_K, trace));
                prog.push(stmt(BPF_RET_K, libc::SECCOMP_RET_ALLOW));
            }
            Action::TraceIf { when, .. } => {
                // A long block is jumped over with JA (32-bit offset); it
                // ends in RET on every path.
                let block = condition_block(when, trace, abi);
                prog.push(jump(BPF_JEQ_K, nr, 1, 0));
                prog.push(stmt(BPF_JA, block.len() as u32));
                prog.extend(block);
            }
            Action::Supervise { notified, .. } => match marker.filter(|_| abi == Abi::X86_64) {
                Some(marker) => {
                    let block = supervise_block(notified, marker, trace);
                    prog.push(jump(BPF_JEQ_K, nr, 1, 0));
                    prog.push(stmt(BPF_JA, block.len() as u32));
                    prog.extend(block);
                }
                None => {
                    prog.push(jump(BPF_JEQ_K, nr, 0, 1));
                    prog.push(stmt(BPF_RET_K, trace));
                }
            },
            Action::Refuse(errno) => {
                prog.push(jump(BPF_JEQ_K, nr, 0, 1));
                prog.push(stmt(BPF_RET_K, libc::SECCOMP_RET_ERRNO | errno as u32));
            }
        }
    }
    prog.push(stmt(BPF_RET_K, libc::SECCOMP_RET_ALLOW));
}

/// A supervised call: TRACE when its sixth argument is `marker` (both
/// halves), else USER_NOTIF when it is of the `notified` form (an open's
/// flags, argument `flags` as an int, have none of the bits that make it
/// unsupervised), else TRACE.
fn supervise_block(notified: Notified, marker: u64, trace: u32) -> Vec<libc::sock_filter> {
    let marker_at = OFFSET_ARGS + 8 * supervise::MARKER_ARG as u32;
    let mut block = vec![
        stmt(BPF_LD_W_ABS, marker_at),
        jump(BPF_JEQ_K, marker as u32, 0, 3),
        stmt(BPF_LD_W_ABS, marker_at + 4),
        jump(BPF_JEQ_K, (marker >> 32) as u32, 0, 1),
        stmt(BPF_RET_K, trace),
    ];
    match notified {
        Notified::Always => block.push(stmt(BPF_RET_K, libc::SECCOMP_RET_USER_NOTIF)),
        Notified::NamedOpens { flags } => block.extend([
            stmt(BPF_LD_W_ABS, OFFSET_ARGS + 8 * flags as u32),
            stmt(BPF_AND_K, NOT_SUPERVISED_FLAGS),
            jump(BPF_JEQ_K, 0, 0, 1),
            stmt(BPF_RET_K, libc::SECCOMP_RET_USER_NOTIF),
            stmt(BPF_RET_K, trace),
        ]),
    }
    block
}

/// `when` as a block that returns `trace` when it passes and ALLOW
/// otherwise: each clause's tests in turn, a failed test jumping to the next
/// clause, a clause that passes to its own RET.
fn condition_block(when: When, trace: u32, abi: Abi) -> Vec<libc::sock_filter> {
    let mut block = Vec::new();
    for clause in when.0 {
        // Jumps to the next clause, patched once its start is known: (at, on true).
        let mut fails = Vec::new();
        for test in clause.iter() {
            push_test(&mut block, *test, abi, &mut fails);
        }
        block.push(stmt(BPF_RET_K, trace));
        let next = block.len();
        for (at, on_true) in fails {
            let offset = u8::try_from(next - at - 1).expect("a clause of the syscall table fits a BPF jump");
            match on_true {
                true => block[at].jt = offset,
                false => block[at].jf = offset,
            }
        }
    }
    block.push(stmt(BPF_RET_K, libc::SECCOMP_RET_ALLOW));
    block
}

/// One argument test: falls through when it passes, records its jumps to
/// the next clause in `fails`.
fn push_test(block: &mut Vec<libc::sock_filter>, test: ArgTest, abi: Abi, fails: &mut Vec<(usize, bool)>) {
    let low = |index: usize| stmt(BPF_LD_W_ABS, OFFSET_ARGS + 8 * index as u32);
    match test {
        ArgTest::OneOf(index, values) => {
            block.push(low(index));
            for (k, &value) in values.iter().enumerate() {
                // A match jumps past the remaining values; the last miss fails.
                block.push(jump(BPF_JEQ_K, value, (values.len() - 1 - k) as u8, 0));
                if k == values.len() - 1 {
                    fails.push((block.len() - 1, false));
                }
            }
        }
        ArgTest::Masked(index, mask, value) => {
            block.push(low(index));
            block.push(stmt(BPF_AND_K, mask));
            block.push(jump(BPF_JEQ_K, value, 0, 0));
            fails.push((block.len() - 1, false));
        }
        // An i386 call's arguments are their low 32 bits (see `SyscallEntry::new`).
        ArgTest::NonZero(index) if abi == Abi::I386 => {
            block.push(low(index));
            block.push(jump(BPF_JEQ_K, 0, 0, 0));
            fails.push((block.len() - 1, true));
        }
        ArgTest::NonZero(index) => {
            // Low word not 0: passes (skips the high word's check).
            block.push(low(index));
            block.push(jump(BPF_JEQ_K, 0, 0, 2));
            block.push(stmt(BPF_LD_W_ABS, OFFSET_ARGS + 8 * index as u32 + 4));
            block.push(jump(BPF_JEQ_K, 0, 0, 0));
            fails.push((block.len() - 1, true));
        }
    }
}

/// The programs the child may install: with supervised opens (kept for a
/// filter that gets its listener: without one, notifying calls would fail
/// with ENOSYS) and without.
pub struct Programs {
    pub supervised: Option<Vec<libc::sock_filter>>,
    pub plain: Vec<libc::sock_filter>,
}

/// Builds the filter programs for a workload traced by process `tracer`,
/// supervised opens bounced with `marker` (None: none supervised). Done in
/// the parent, before fork, so that the child only has to hand one to the
/// kernel.
pub fn programs(tracer: Pid, marker: Option<u64>) -> Programs {
    Programs { supervised: marker.map(|m| build_filter(tracer, Some(m))), plain: build_filter(tracer, None) }
}

fn build_filter(tracer: Pid, marker: Option<u64>) -> Vec<libc::sock_filter> {
    let tracer = tracer.as_raw() as u32;
    let mut native = Vec::new();
    push_abi_block(&mut native, Abi::X86_64, tracer, marker);
    let mut compat = Vec::new();
    push_abi_block(&mut compat, Abi::I386, tracer, marker);

    let mut prog = vec![stmt(BPF_LD_W_ABS, OFFSET_ARCH)];
    // arch == x86_64 ? fall into the native block : skip over it (JA takes a
    // 32-bit offset, so the table can grow past the 255 of conditional jumps).
    prog.push(jump(BPF_JEQ_K, AUDIT_ARCH_X86_64, 1, 0));
    prog.push(stmt(BPF_JA, native.len() as u32));
    prog.extend(native);
    prog.push(jump(BPF_JEQ_K, AUDIT_ARCH_I386, 1, 0));
    prog.push(stmt(BPF_RET_K, libc::SECCOMP_RET_TRACE | SeccompData::Foreign.encode()));
    prog.extend(compat);
    prog
}

/// Whether this kernel runs seccomp filters that stop with
/// SECCOMP_RET_TRACE. Some sandboxes and emulators (valgrind, gVisor
/// configurations, kernels without CONFIG_SECCOMP_FILTER) do not.
pub fn available() -> Result<(), nix::errno::Errno> {
    let action: u32 = libc::SECCOMP_RET_TRACE;
    // SAFETY: SECCOMP_GET_ACTION_AVAIL only reads the u32 it is pointed at.
    let ret = unsafe { libc::syscall(libc::SYS_seccomp, libc::SECCOMP_GET_ACTION_AVAIL, 0, &action as *const u32) };
    if ret == 0 {
        Ok(())
    } else {
        Err(nix::errno::Errno::last())
    }
}

/// The filter's user-notification listener, or why it has none.
#[derive(Clone, Copy, Debug)]
pub enum Listener {
    /// A descriptor in the calling process (close-on-exec).
    Fd(i32),
    /// The kernel refused one (EBUSY: a filter above already has one, as
    /// under some container runtimes; EINVAL: a kernel before 5.0).
    Refused(i32),
}

/// Installs one of `programs` on the calling thread, with a
/// user-notification listener: a thread group may have only one, so holding
/// it keeps the workload from getting one of its own, and it serves the
/// supervised opens. Where the kernel refuses the listener, the program
/// without supervised opens goes in. With
/// SECCOMP_FILTER_FLAG_SPEC_ALLOW where the kernel has it: kernels whose
/// default forces the speculative store bypass mitigation on filtered
/// tasks would otherwise slow the workload's own code, tracing or not, and
/// make it differ from the same workload untraced.
///
/// Runs in the forked child, so it only makes raw syscalls. Tries without
/// NO_NEW_PRIVS first: a tracer with CAP_SYS_ADMIN then leaves setuid
/// programs working in the workload.
pub fn install(programs: &Programs) -> Result<Listener, i32> {
    let set_filter = |flags: libc::c_ulong| {
        let filter = match &programs.supervised {
            Some(supervised) if flags & libc::SECCOMP_FILTER_FLAG_NEW_LISTENER != 0 => supervised,
            _ => &programs.plain,
        };
        let prog = libc::sock_fprog { len: filter.len() as u16, filter: filter.as_ptr() as *mut _ };
        // SAFETY: `prog` points at `filter`, which outlives the call; the
        // kernel copies the program before returning.
        let rc = unsafe {
            libc::syscall(libc::SYS_seccomp, libc::SECCOMP_SET_MODE_FILTER, flags, &prog as *const libc::sock_fprog)
        };
        if rc < 0 {
            Err(nix::errno::Errno::last_raw())
        } else {
            Ok(rc as i32)
        }
    };
    let mut flags = libc::SECCOMP_FILTER_FLAG_NEW_LISTENER | libc::SECCOMP_FILTER_FLAG_SPEC_ALLOW;
    let mut no_new_privs = false;
    let mut listener_refused = None;
    loop {
        match set_filter(flags) {
            Ok(fd) => {
                return Ok(match listener_refused {
                    None => Listener::Fd(fd),
                    Some(errno) => Listener::Refused(errno),
                })
            }
            Err(libc::EACCES) if !no_new_privs => {
                // SAFETY: prctl(PR_SET_NO_NEW_PRIVS) takes integer arguments only.
                if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
                    return Err(nix::errno::Errno::last_raw());
                }
                no_new_privs = true;
            }
            // A kernel before 4.17 knows no SPEC_ALLOW.
            Err(libc::EINVAL) if flags & libc::SECCOMP_FILTER_FLAG_SPEC_ALLOW != 0 => {
                flags &= !libc::SECCOMP_FILTER_FLAG_SPEC_ALLOW;
            }
            Err(errno) if flags & libc::SECCOMP_FILTER_FLAG_NEW_LISTENER != 0 => {
                listener_refused = Some(errno);
                flags &= !libc::SECCOMP_FILTER_FLAG_NEW_LISTENER;
            }
            Err(errno) => return Err(errno),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn data_round_trips_for_every_entry() {
        for (index, def) in SYSCALLS.iter().enumerate() {
            for abi in [Abi::X86_64, Abi::I386] {
                if def.number(abi).is_some() {
                    let data = SeccompData::Known { abi, index };
                    assert_eq!(SeccompData::decode(data.encode()), data, "{}", def.name);
                }
            }
        }
        assert_eq!(SeccompData::decode(SeccompData::Foreign.encode()), SeccompData::Foreign);
        for abi in [Abi::X86_64, Abi::I386] {
            assert_eq!(SeccompData::decode(SeccompData::Guard { abi }.encode()), SeccompData::Guard { abi });
        }
    }

    #[test]
    fn filter_is_within_kernel_limits() {
        let prog = build_filter(Pid::this(), None);
        assert!(prog.len() < 4096);
        assert!(build_filter(Pid::this(), Some(u64::MAX - 1)).len() < 4096);
        // Every number of both ABIs appears once as a JEQ constant, and
        // every argument check once more; so does every guard's.
        let jeqs = prog.iter().filter(|i| i.code == BPF_JEQ_K).count();
        let checks: usize = SYSCALLS
            .iter()
            .map(|d| {
                [Abi::X86_64, Abi::I386]
                    .into_iter()
                    .filter(|&abi| d.number(abi).is_some())
                    .map(|abi| {
                        1 + match d.action {
                            Action::TraceWhen { .. } => 1,
                            Action::TraceIf { when, .. } => {
                                when.0.iter().flat_map(|c| c.iter()).map(|t| jeqs_of(*t, abi)).sum()
                            }
                            _ => 0,
                        }
                    })
                    .sum::<usize>()
            })
            .sum();
        let guards: usize = GUARDS
            .iter()
            .map(|g| {
                let signal = matches!(g.harm, Harm::Signal(_));
                2 * (1 + matches!(g.target, Target::Tgid(_) | Target::Task(_)) as usize + signal as usize)
            })
            .sum();
        assert_eq!(jeqs, checks + guards + 2, "two arch checks plus one per number and argument");
    }

    fn jeqs_of(test: ArgTest, abi: Abi) -> usize {
        match test {
            ArgTest::OneOf(_, values) => values.len(),
            ArgTest::Masked(..) => 1,
            ArgTest::NonZero(_) if abi == Abi::I386 => 1,
            ArgTest::NonZero(_) => 2,
        }
    }

    /// Runs the program on one `seccomp_data`, as the kernel would (only the
    /// instructions the generator emits).
    fn run(prog: &[libc::sock_filter], arch: u32, nr: u32, args: &[u64; 6]) -> u32 {
        let word = |offset: u32| -> u32 {
            match offset {
                OFFSET_NR => nr,
                OFFSET_ARCH => arch,
                _ => {
                    let arg = args[((offset - OFFSET_ARGS) / 8) as usize];
                    if (offset - OFFSET_ARGS).is_multiple_of(8) {
                        arg as u32
                    } else {
                        (arg >> 32) as u32
                    }
                }
            }
        };
        let (mut pc, mut acc) = (0usize, 0u32);
        loop {
            let insn = prog[pc];
            pc += 1;
            match insn.code {
                BPF_LD_W_ABS => acc = word(insn.k),
                BPF_AND_K => acc &= insn.k,
                BPF_JA => pc += insn.k as usize,
                BPF_JEQ_K => pc += usize::from(if acc == insn.k { insn.jt } else { insn.jf }),
                BPF_JSET_K => pc += usize::from(if acc & insn.k != 0 { insn.jt } else { insn.jf }),
                BPF_RET_K => return insn.k,
                code => panic!("unexpected instruction {code:#x}"),
            }
        }
    }

    /// Every argument condition the filter checks is the one the engine
    /// checks: each row, with values on both sides of each test.
    #[test]
    fn the_filter_checks_arguments_as_the_table_says() {
        // A tracer pid none of the probes below is: the guards that compare
        // a process id let every call through to the table's rows.
        let prog = build_filter(Pid::from_raw(4_000_000), None);
        // A guard that names its target otherwise stops every call with a
        // signal before the table is looked at.
        let guard_stops = |abi: Abi, nr: u32, args: &[u64; 6]| {
            GUARDS.iter().find(|g| g.number(abi) == Some(nr)).is_some_and(|g| {
                matches!(g.target, Target::Pidfd(_) | Target::AnyTask(_))
                    && match g.harm {
                        Harm::Signal(i) => args[i] as u32 != 0,
                        Harm::NewLimit(_) | Harm::Always => true,
                    }
            })
        };
        for (index, def) in SYSCALLS.iter().enumerate() {
            let Action::TraceIf { when, .. } = def.action else { continue };
            let mut probes: Vec<u64> = vec![0, 1, 1 << 32, u64::MAX];
            for test in when.0.iter().flat_map(|c| c.iter()) {
                match *test {
                    ArgTest::OneOf(_, values) => probes
                        .extend(values.iter().flat_map(|&v| [u64::from(v), u64::from(v) + 1, u64::from(v) | 1 << 40])),
                    ArgTest::Masked(_, mask, value) => probes.extend([u64::from(value), u64::from(value | !mask)]),
                    ArgTest::NonZero(_) => {}
                }
            }
            for (abi, arch) in [(Abi::X86_64, AUDIT_ARCH_X86_64), (Abi::I386, AUDIT_ARCH_I386)] {
                let Some(nr) = def.number(abi) else { continue };
                let trace = libc::SECCOMP_RET_TRACE | SeccompData::Known { abi, index }.encode();
                for slot in 0..6 {
                    for &a in &probes {
                        for &b in &probes {
                            let mut args = [0u64; 6];
                            args[slot] = a;
                            args[(slot + 1) % 6] = b;
                            // The engine sees an i386 call's arguments as the kernel takes them.
                            let seen = crate::trace::abi::SyscallEntry::new(abi, u64::from(nr), args).args;
                            let expected = match () {
                                _ if guard_stops(abi, nr, &args) => {
                                    libc::SECCOMP_RET_TRACE | SeccompData::Guard { abi }.encode()
                                }
                                _ if when.passes(&seen) => trace,
                                _ => libc::SECCOMP_RET_ALLOW,
                            };
                            assert_eq!(run(&prog, arch, nr, &args), expected, "{} {abi:?} {args:x?}", def.name);
                        }
                    }
                }
            }
        }
    }

    /// Opens and file calls go to the listener, an O_TMPFILE open and every
    /// call carrying the marker to ptrace; i386 calls always to ptrace.
    #[test]
    fn supervised_calls_notify_only_their_form() {
        let marker = 0x1234_5678_9abc_def0u64;
        let prog = build_filter(Pid::from_raw(4_000_000), Some(marker));
        let plain = build_filter(Pid::from_raw(4_000_000), None);
        let notify = libc::SECCOMP_RET_USER_NOTIF;
        for (index, def) in SYSCALLS.iter().enumerate() {
            let Action::Supervise { notified, .. } = def.action else { continue };
            for (abi, arch) in [(Abi::X86_64, AUDIT_ARCH_X86_64), (Abi::I386, AUDIT_ARCH_I386)] {
                let Some(nr) = def.number(abi) else { continue };
                let trace = libc::SECCOMP_RET_TRACE | SeccompData::Known { abi, index }.encode();
                let with = |flag_value: i32, sixth: u64| {
                    let mut args = [0u64; 6];
                    if let Notified::NamedOpens { flags } = notified {
                        args[flags] = flag_value as u64;
                    }
                    args[supervise::MARKER_ARG] = sixth;
                    (run(&prog, arch, nr, &args), run(&plain, arch, nr, &args))
                };
                let supervised = if abi == Abi::X86_64 { notify } else { trace };
                let forms = [
                    0,
                    libc::O_DIRECTORY | libc::O_CLOEXEC,
                    libc::O_PATH | libc::O_NOFOLLOW,
                    libc::O_NONBLOCK,
                    libc::O_WRONLY | libc::O_CREAT | libc::O_TRUNC,
                    libc::O_RDWR | libc::O_CREAT | libc::O_EXCL,
                ];
                for form in forms {
                    assert_eq!(with(form, 0), (supervised, trace), "{} {abi:?} {form:#o}", def.name);
                    assert_eq!(with(form, marker), (trace, trace), "{} {abi:?} marked", def.name);
                    assert_eq!(with(form, marker & 0xffff_ffff), (supervised, trace), "{} half marker", def.name);
                    assert_eq!(with(form, marker | 1 << 63), (supervised, trace), "{} other high half", def.name);
                }
                let unnamed = if notified == Notified::Always { supervised } else { trace };
                for tmpfile in [libc::O_TMPFILE | libc::O_RDWR, libc::O_TMPFILE & !libc::O_DIRECTORY] {
                    assert_eq!(with(tmpfile, 0), (unnamed, trace), "{} {abi:?} {tmpfile:#o}", def.name);
                }
            }
        }
    }
}
