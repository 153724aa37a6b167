//! Calls aimed at the tracer itself. A signal that stops the tracer freezes
//! tracing (and the workload with it), one that kills it kills the workload
//! (it fails closed); a pidfd of it is the way to signal it later; a
//! resource limit set on it (prlimit64 needs no capability to lower the
//! limits of a process of the same user) would take from it descriptors
//! (its /proc reads and its own supervised calls), memory or file size
//! (its events file; a growing supervised truncate). Any signal but 0 (an
//! existence check) sent to the tracer's process or one of its threads,
//! pidfd_open of its pid, and prlimit64 with a new limit for it, are
//! refused with EPERM at the stop and reported.
//!
//! The filter stops these calls by argument where it can: a process id
//! that is the tracer's, with a signal that is not 0. A call that names
//! one of the tracer's other threads (kill and tkill take any thread's id,
//! and the threads start after the filter is built) is stopped by the
//! table's own row for that call when its signal could harm (see
//! `SIGNALS_WATCHED` in `syscalls.rs`), and checked here at that stop; any
//! other signal is blocked in every tracer thread (`signals.rs`) and stays
//! pending. rt_sigqueueinfo has no row of its own, so every one with a
//! signal stops; it is rare. What a filter cannot see (whether a task id
//! is one of the tracer's threads, which process a pidfd names) is checked
//! at the stop.
//!
//! Signals the workload sends to a process group or to every process
//! (kill(0), kill(-N), kill(-1)) reach the tracer too when it is in that
//! group, and are left alone: refusing them would change what they do to
//! the workload's own processes.

use nix::unistd::Pid;

use crate::trace::abi::Abi;
use crate::trace::procfs;

/// How a guarded call names its target.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target {
    /// A thread group id argument, which must be the group's own (tgkill):
    /// the filter compares it with the tracer's.
    Tgid(usize),
    /// A task id argument: kill, tkill and pidfd_open take any thread's id
    /// (kill then signals its whole process), so any of the tracer's
    /// threads, some started after the filter was built. The filter
    /// compares it with the tracer's process id; the call's table row stops
    /// the harmful signals sent to the other threads.
    Task(usize),
    /// A task id argument the filter cannot narrow (no table row stops the
    /// call): every call with a signal stops.
    AnyTask(usize),
    /// A pidfd (or /proc/PID directory) descriptor argument.
    Pidfd(usize),
}

/// Which calls aimed at the tracer harm it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Harm {
    /// Those whose signal argument is not 0 (0 only asks whether the target
    /// is there): the filter compares the argument's low word, as the
    /// kernel takes an int.
    Signal(usize),
    /// Those whose new-limit pointer argument is not NULL (a NULL one only
    /// reads the limits): a pointer the filter does not compare (its low
    /// word may be 0), checked at the stop.
    NewLimit(usize),
    /// Every one (pidfd_open).
    Always,
}

pub struct Guard {
    pub name: &'static str,
    pub x86_64: u32,
    pub i386: u32,
    pub target: Target,
    pub harm: Harm,
}

impl Guard {
    pub fn number(&self, abi: Abi) -> Option<u32> {
        match abi {
            Abi::X86_64 => Some(self.x86_64),
            Abi::I386 => Some(self.i386),
            Abi::Unknown => None,
        }
    }
}

const fn guard(name: &'static str, x86_64: u32, i386: u32, target: Target, harm: Harm) -> Guard {
    Guard { name, x86_64, i386, target, harm }
}

use Harm::{Always, NewLimit, Signal};
use Target::{AnyTask, Pidfd, Task, Tgid};

#[rustfmt::skip]
pub static GUARDS: &[Guard] = &[
    //    name                  x86_64  i386  target      harm
    guard("kill",               62,     37,   Task(0),    Signal(1)),
    guard("tkill",              200,    238,  Task(0),    Signal(1)),
    guard("tgkill",             234,    270,  Tgid(0),    Signal(2)),
    guard("rt_sigqueueinfo",    129,    178,  AnyTask(0), Signal(1)),
    guard("rt_tgsigqueueinfo",  297,    335,  Tgid(0),    Signal(2)),
    guard("pidfd_send_signal",  424,    424,  Pidfd(0),   Signal(1)),
    guard("pidfd_open",         434,    434,  Task(0),    Always),
    // The table's prlimit64 row stops the calls with a new limit, so a
    // call naming another of the tracer's threads is checked too.
    guard("prlimit64",          302,    340,  Task(0),    NewLimit(2)),
];

pub fn lookup(abi: Abi, nr: u64) -> Option<&'static Guard> {
    GUARDS.iter().find(|g| g.number(abi).map(u64::from) == Some(nr))
}

/// A guarded call that aims at the tracer: the tracer's process or thread
/// it names, and the signal (0 for a call that sends none).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Aim {
    pub pid: i32,
    pub signal: i32,
}

/// Whether the call of thread `tid` with `args` aims at the tracer (whose
/// process is `tracer`). Called at every stop of a guarded call: the
/// filter's argument checks are only a first sieve (full-ptrace mode has
/// no filter, and a filter of the workload's own can stop anything).
pub fn aims_at_tracer(guard: &Guard, tid: Pid, args: &[u64; 6], tracer: Pid) -> Option<Aim> {
    let signal = match guard.harm {
        Signal(i) => Some(args[i] as i32).filter(|&signal| signal != 0)?,
        NewLimit(i) => Some(0).filter(|_| args[i] != 0)?,
        Always => 0,
    };
    let pid = match guard.target {
        Tgid(i) => Some(args[i] as i32).filter(|&pid| pid == tracer.as_raw())?,
        Task(i) | AnyTask(i) => {
            Some(args[i] as i32).filter(|&tid| tid > 0 && procfs::is_own_thread(Pid::from_raw(tid)))?
        }
        // A pidfd of one of the tracer's threads (PIDFD_THREAD) signals it too.
        Pidfd(i) => procfs::pidfd_process(tid, args[i] as i32)
            .filter(|&pid| pid == tracer.as_raw() || procfs::is_own_thread(Pid::from_raw(pid)))?,
    };
    Some(Aim { pid, signal })
}

#[cfg(test)]
mod tests {
    use std::str::FromStr;

    use super::*;

    #[test]
    fn names_and_numbers_are_the_kernel_s() {
        for g in GUARDS {
            let x86_64 = syscalls::x86_64::Sysno::from_str(g.name).unwrap().id() as u32;
            let i386 = syscalls::x86::Sysno::from_str(g.name).unwrap().id() as u32;
            assert_eq!((g.x86_64, g.i386), (x86_64, i386), "{}", g.name);
        }
    }

    #[test]
    fn only_a_signal_to_the_tracer_is_aimed_at_it() {
        let tracer = Pid::this();
        let me = tracer.as_raw() as u64;
        let kill = lookup(Abi::X86_64, 62).unwrap();
        let stop = libc::SIGSTOP as u64;
        assert_eq!(aims_at_tracer(kill, tracer, &[me, stop, 0, 0, 0, 0], tracer).map(|a| a.signal), Some(19));
        assert_eq!(aims_at_tracer(kill, tracer, &[me, 0, 0, 0, 0, 0], tracer), None, "signal 0 probes");
        assert_eq!(aims_at_tracer(kill, tracer, &[1, stop, 0, 0, 0, 0], tracer), None);
        // This test's thread is one of the "tracer's" own: kill signals its process.
        let own_thread = nix::unistd::gettid().as_raw() as u64;
        for (abi, nr) in [(Abi::X86_64, 62), (Abi::I386, 238)] {
            let call = lookup(abi, nr).unwrap();
            assert!(aims_at_tracer(call, tracer, &[own_thread, stop, 0, 0, 0, 0], tracer).is_some());
        }
        let tgkill = lookup(Abi::X86_64, 234).unwrap();
        assert!(aims_at_tracer(tgkill, tracer, &[me, own_thread, stop, 0, 0, 0], tracer).is_some());
        assert_eq!(aims_at_tracer(tgkill, tracer, &[me, own_thread, 0, 0, 0, 0], tracer), None);
        let open = lookup(Abi::X86_64, 434).unwrap();
        assert!(aims_at_tracer(open, tracer, &[me, 0, 0, 0, 0, 0], tracer).is_some());
        // A new limit at an address whose low word is 0 is a new limit.
        let prlimit = lookup(Abi::X86_64, 302).unwrap();
        let limit = 1u64 << 32;
        assert_eq!(aims_at_tracer(prlimit, tracer, &[me, 7, limit, 0, 0, 0], tracer).map(|a| a.signal), Some(0));
        assert_eq!(aims_at_tracer(prlimit, tracer, &[me, 7, 0, limit, 0, 0], tracer), None, "reads only");
        assert_eq!(aims_at_tracer(prlimit, tracer, &[0, 7, limit, 0, 0, 0], tracer), None, "its own");
    }
}
