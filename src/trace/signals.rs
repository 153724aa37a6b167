//! Signals sent to the tracer are the workload's: the tracer is its
//! container's PID 1, and a `docker stop` or `kill` aimed at it means the
//! workload. A dedicated thread waits for them (they are blocked in every
//! tracer thread) and passes them on.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nix::sys::signal::{kill, pthread_sigmask, SigSet, SigmaskHow, Signal};
use nix::unistd::Pid;

use crate::log::log;

/// Signals that reach the workload when the tracer receives them.
const FORWARDED: [Signal; 7] = [
    Signal::SIGTERM,
    Signal::SIGINT,
    Signal::SIGHUP,
    Signal::SIGQUIT,
    Signal::SIGUSR1,
    Signal::SIGUSR2,
    Signal::SIGWINCH,
];

/// Signals the terminal sends to its whole foreground process group: when
/// they come from the kernel, the workload got its own copy already.
const FROM_TERMINAL: [Signal; 3] = [Signal::SIGINT, Signal::SIGQUIT, Signal::SIGWINCH];

fn forwarded_set() -> SigSet {
    let mut set = SigSet::empty();
    for signal in FORWARDED {
        set.add(signal);
    }
    set
}

/// Blocks every signal but WAKE and job control's in the calling thread
/// (and so in every thread it starts afterwards): the forwarded ones are
/// waited for by the forwarder, and any other that the workload sends one
/// of the tracer's threads stays pending instead of ending the tracer (most
/// signals end a process by default; the filter stops only the harmful
/// ones, see `guard.rs`). The terminal's stop and continue signals keep
/// their default action, so that the tracer stops and resumes with its
/// job. Returns the mask to restore in the workload.
pub fn block_signals() -> nix::Result<SigSet> {
    let mut blocked = SigSet::all();
    for signal in [Signal::SIGURG, Signal::SIGTSTP, Signal::SIGTTIN, Signal::SIGTTOU, Signal::SIGCONT] {
        blocked.remove(signal);
    }
    let mut previous = SigSet::empty();
    pthread_sigmask(SigmaskHow::SIG_BLOCK, Some(&blocked), Some(&mut previous))?;
    Ok(previous)
}

/// Signals that, once no traced process is left, end the tracer's wait for
/// the agent: the container is being stopped.
const STOPPING: [Signal; 2] = [Signal::SIGTERM, Signal::SIGINT];

/// Starts the forwarding thread. Until the entrypoint (`root`) exits,
/// signals go to it; after that, or without one, to every process in
/// `live`. `verbose` logs each one. A stop signal that finds no traced
/// process left notifies `stop_flush`.
pub fn spawn_forwarder(
    root: Option<Pid>,
    live: Arc<Mutex<BTreeSet<i32>>>,
    verbose: bool,
    stop_flush: Arc<tokio::sync::Notify>,
) -> std::io::Result<()> {
    let set = forwarded_set();
    std::thread::Builder::new().name("cws-signals".into()).spawn(move || loop {
        let mut info: libc::siginfo_t = zeroed_siginfo();
        // SAFETY: `set` is a valid sigset and `info` is writable.
        let signal = unsafe { libc::sigwaitinfo(set.as_ref(), &mut info) };
        let Ok(signal) = Signal::try_from(signal) else { continue };
        if STOPPING.contains(&signal) && live.lock().unwrap_or_else(|e| e.into_inner()).is_empty() {
            stop_flush.notify_one();
            continue;
        }
        if info.si_code == libc::SI_KERNEL && FROM_TERMINAL.contains(&signal) {
            continue;
        }
        let targets: Vec<i32> = {
            let live = live.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(root) = root.filter(|root| live.contains(&root.as_raw())) {
                vec![root.as_raw()]
            } else {
                live.iter().copied().collect()
            }
        };
        for pid in targets {
            let _ = kill(Pid::from_raw(pid), signal);
            if verbose {
                log!("forwarded {} to pid {pid}", signal.as_str());
            }
        }
    })?;
    Ok(())
}

/// The kernel's `struct sigaction` on x86_64 (the raw syscall bypasses
/// glibc, which refuses to touch the signals it reserves for itself).
#[repr(C)]
#[derive(Default)]
struct KernelSigaction {
    handler: usize,
    flags: u64,
    restorer: usize,
    mask: u64,
}

/// Signals (1..=64) that were ignored when the tracer started, as a bit set:
/// ignored dispositions survive exec, so they are part of what the
/// workload inherits and must pass through unchanged.
#[derive(Clone, Copy, Debug)]
pub struct IgnoredSignals(u64);

impl IgnoredSignals {
    /// Reads the dispositions. SIGPIPE is left out: the Rust runtime ignores
    /// it before `main`, so its inherited disposition is unknowable, and the
    /// default is what nearly every parent gives.
    pub fn capture() -> Self {
        let mut bits = 0u64;
        for signal in 1..=64 {
            let mut old = KernelSigaction::default();
            // SAFETY: reads the disposition into `old`; sets nothing.
            let rc = unsafe {
                libc::syscall(libc::SYS_rt_sigaction, signal, std::ptr::null::<KernelSigaction>(), &mut old, 8)
            };
            if rc == 0 && old.handler == libc::SIG_IGN && signal != libc::SIGPIPE {
                bits |= 1 << (signal - 1);
            }
        }
        IgnoredSignals(bits)
    }

    /// Every signal back to what the tracer inherited (ignored, or
    /// default), before an exec: in the forked child, or in place
    /// (`spawn`, `inject`). Raw syscalls only.
    pub fn restore(self) {
        for signal in 1..=64 {
            if signal == libc::SIGKILL || signal == libc::SIGSTOP {
                continue;
            }
            let ignored = self.0 & (1 << (signal - 1)) != 0;
            let action =
                KernelSigaction { handler: if ignored { libc::SIG_IGN } else { libc::SIG_DFL }, ..Default::default() };
            // SAFETY: installs SIG_DFL or SIG_IGN, which need no handler code.
            unsafe {
                libc::syscall(libc::SYS_rt_sigaction, signal, &action, std::ptr::null_mut::<KernelSigaction>(), 8)
            };
        }
    }
}

/// Signals that, in attach mode, end the tracer: it detaches from the
/// processes (they are not its workload) and exits. The other forwarded
/// signals are ignored there.
const ENDING: [Signal; 4] = [Signal::SIGTERM, Signal::SIGINT, Signal::SIGHUP, Signal::SIGQUIT];

/// Sent to the tracer thread to break its waitpid when it must detach
/// (ignored by default, so a stray one does no harm).
const WAKE: i32 = libc::SIGURG; // left unblocked by `block_signals`

extern "C" fn on_wake(_: libc::c_int) {}

/// On the tracer thread, in attach mode: WAKE gets a handler without
/// SA_RESTART, so that it ends a waitpid with EINTR.
pub fn accept_wake() -> nix::Result<()> {
    // SAFETY: sigaction is plain data; all zeroes is no flags and an empty mask.
    let mut action: libc::sigaction = unsafe { std::mem::zeroed() };
    action.sa_sigaction = on_wake as extern "C" fn(libc::c_int) as usize;
    // SAFETY: installs a handler that touches nothing.
    let rc = unsafe { libc::sigaction(WAKE, &action, std::ptr::null_mut()) };
    nix::errno::Errno::result(rc).map(drop)
}

/// Attach mode's signal thread: an ending signal sets `detach`, then wakes
/// the tracer thread (kernel thread id `tracer`) until it is `done`: a wake
/// that came just before its waitpid would be lost, the next one is not.
pub fn spawn_detacher(detach: Arc<AtomicBool>, tracer: Arc<AtomicI32>, done: Arc<AtomicBool>) -> std::io::Result<()> {
    let set = forwarded_set();
    std::thread::Builder::new().name("cws-signals".into()).spawn(move || loop {
        let mut info: libc::siginfo_t = zeroed_siginfo();
        // SAFETY: `set` is a valid sigset and `info` is writable.
        let signal = unsafe { libc::sigwaitinfo(set.as_ref(), &mut info) };
        if !Signal::try_from(signal).is_ok_and(|s| ENDING.contains(&s)) {
            continue;
        }
        detach.store(true, Ordering::SeqCst);
        while !done.load(Ordering::SeqCst) {
            // SAFETY: tgkill takes integers; the tid is checked against our own process.
            unsafe { libc::syscall(libc::SYS_tgkill, std::process::id(), tracer.load(Ordering::SeqCst), WAKE) };
            std::thread::sleep(Duration::from_millis(10));
        }
    })?;
    Ok(())
}

fn zeroed_siginfo() -> libc::siginfo_t {
    // SAFETY: siginfo_t is plain data for which all-zero bytes are valid.
    unsafe { std::mem::zeroed() }
}

/// A descriptor that is readable while a SIGCHLD is pending: what wakes
/// the engine for ptrace stops while it also waits on the seccomp listener.
/// SIGCHLD stays blocked in every tracer thread (`block_signals`), so the
/// descriptor is the only one to take it; its disposition is made the
/// default, as the kernel sends none for stops to a tracer that ignores it.
pub fn child_stops() -> nix::Result<nix::sys::signalfd::SignalFd> {
    use nix::sys::signal::{signal, SigHandler};
    use nix::sys::signalfd::{SfdFlags, SignalFd};
    // SAFETY: the default disposition installs no handler.
    unsafe { signal(Signal::SIGCHLD, SigHandler::SigDfl) }?;
    let mut mask = SigSet::empty();
    mask.add(Signal::SIGCHLD);
    SignalFd::with_flags(&mask, SfdFlags::SFD_NONBLOCK | SfdFlags::SFD_CLOEXEC)
}
