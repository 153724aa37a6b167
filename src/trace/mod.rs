//! The trace engine: starts the workload under ptrace and turns what it
//! does into events on the queue. Everything here runs on, or is started
//! from, the `cws-tracer` thread that owns every ptrace call; only the
//! signal forwarder runs beside it.
//!
//! Layers, lowest first: `abi` (the kernel's numbers); `memory`, `procfs`,
//! `paths`, `ptrace` (reading the tracee and its stops); `process` (the
//! process table), `restart` (interrupted calls); `decode` (what each call means); `syscalls` (the table);
//! `guard` (calls aimed at the tracer); `seccomp` (the filter built from
//! both); `launch`, `signals`, `engine`.

mod abi;
mod attach;
mod condition;
mod decode;
mod engine;
mod etc_watch;
mod guard;
mod impersonate;
mod launch;
mod memory;
mod mounts;
mod names;
mod netlink;
mod paths;
mod process;
mod procfs;
mod procscan;
mod procstat;
mod ptrace;
mod restart;
mod seccomp;
mod signals;
mod snapshot;
mod supervise;
mod syscalls;
mod unotify;

use std::ffi::OsString;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;

use nix::sys::signal::SigSet;

use crate::log::log;
use crate::queue::EventSink;
use engine::Engine;
use launch::Launch;
use process::LiveProcesses;
use supervise::Supervisor;

pub use attach::AttachError;
pub use engine::{Mode, Outcome, Stats};
pub use launch::{exec_in_place, resolve_entrypoint, LaunchError};
pub use procfs::peak_rss_kib;
pub use procscan::DEFAULT_PERIOD as DEFAULT_PROC_SCAN_PERIOD;
pub use ptrace::Death;

/// What the workload inherits from the tracer's own start, captured before
/// any thread starts (threads inherit the blocked signals).
pub struct Inheritance {
    signal_mask: SigSet,
    ignored_signals: signals::IgnoredSignals,
}

impl Inheritance {
    /// Takes the signal state the tracer was started with, and blocks every
    /// signal but the attach mode's wake.
    pub fn capture() -> nix::Result<Inheritance> {
        let ignored_signals = signals::IgnoredSignals::capture();
        let signal_mask = signals::block_signals()?;
        Ok(Inheritance { signal_mask, ignored_signals })
    }
}

/// What to run, and how.
pub struct Workload {
    pub program: PathBuf,
    pub argv: Vec<OsString>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub mode: Mode,
    /// Log each signal passed on to the workload.
    pub log_signals: bool,
    /// Notified when SIGTERM or SIGINT comes once no traced process is
    /// left: the container is being stopped, the exporters must not wait.
    pub abandon_flush: Arc<tokio::sync::Notify>,
    /// Scan /proc this often for processes outside the traced tree (None: never).
    pub proc_scan: Option<std::time::Duration>,
    /// File metadata and owner names in events (off: `--disable-stats`).
    pub file_stats: bool,
}

/// Passes the forwarded signals (blocked by `Inheritance::capture`) on to
/// `pids`: the tracers `--pid-per-tracer` started.
pub fn forward_signals(pids: &[u32]) -> std::io::Result<()> {
    let live = LiveProcesses::default();
    live.lock().unwrap_or_else(|e| e.into_inner()).extend(pids.iter().map(|&pid| pid as i32));
    // Each of those tracers ends its own flush.
    signals::spawn_forwarder(None, live, false, Arc::default())
}

/// The mode to trace in: seccomp where the kernel runs such filters, every
/// syscall otherwise (slower, but the workload runs and nothing goes unseen).
pub fn usable_mode(requested: Mode) -> Mode {
    match requested {
        Mode::Seccomp => match seccomp::available() {
            Ok(()) => Mode::Seccomp,
            Err(e) => {
                log!("seccomp filters are not available here ({e}); tracing every syscall instead");
                Mode::Full
            }
        },
        Mode::Full => Mode::Full,
    }
}

/// A running tracer.
pub struct Tracer {
    thread: JoinHandle<Result<Outcome, LaunchError>>,
    scanner: Option<procscan::Scanner>,
}

impl Tracer {
    /// Starts the workload under the `cws-tracer` thread, and the signal
    /// forwarder once the workload exists. Events go to `sink`.
    pub fn start(workload: Workload, inheritance: Inheritance, sink: EventSink) -> Result<Tracer, LaunchError> {
        let mut launch =
            Launch::new(&workload.program, &workload.argv, inheritance.signal_mask, inheritance.ignored_signals)?;
        launch.uid = workload.uid;
        launch.gid = workload.gid;
        // Supervised opens need the filter's listener, and a bounce needs
        // ptrace stops of the seccomp kind.
        let marker = (workload.mode == Mode::Seccomp && supervise::wanted()).then(supervise::new_marker);
        launch.filter = (workload.mode == Mode::Seccomp).then(|| seccomp::programs(nix::unistd::Pid::this(), marker));
        // Orphaned descendants are adopted by the tracer, as by PID 1 in a
        // container: they stay traced, are reaped, and see the same parent
        // whether or not the tracer is PID 1.
        nix::sys::prctl::set_child_subreaper(true)
            .map_err(|e| LaunchError::Setup(format!("cannot become a child subreaper: {e}")))?;
        let (mode, file_stats) = (workload.mode, workload.file_stats);
        let live = LiveProcesses::default();
        let (started_tx, started_rx) = mpsc::channel();
        let tracer_live = live.clone();
        let scan_sink = workload.proc_scan.map(|_| sink.another());
        let thread = std::thread::Builder::new()
            .name("cws-tracer".into())
            .spawn(move || -> Result<Outcome, LaunchError> {
                // The filter's listener stays open until every tracee is gone.
                let (root, listener) = match launch.spawn(mode == Mode::Full) {
                    Ok(spawned) => spawned,
                    Err(e) => {
                        let _ = started_tx.send(None);
                        return Err(e);
                    }
                };
                // The engine lists the root as live before the forwarder starts,
                // so that no signal finds nobody to go to.
                let mut engine = Engine::new(mode, root, sink, tracer_live, file_stats);
                let _listener = match (listener, marker) {
                    (Some(listener), Some(marker)) => {
                        engine.supervise(Supervisor::new(listener, marker));
                        None
                    }
                    (listener, _) => listener,
                };
                let _ = started_tx.send(Some(root));
                Ok(engine.run())
            })
            .map_err(|e| LaunchError::Setup(format!("cannot start the tracer thread: {e}")))?;
        let mut scanner = None;
        if let Ok(Some(root)) = started_rx.recv() {
            signals::spawn_forwarder(Some(root), live.clone(), workload.log_signals, workload.abandon_flush)
                .map_err(|e| LaunchError::Setup(format!("cannot start the signal thread: {e}")))?;
            if let (Some(period), Some(sink)) = (workload.proc_scan, scan_sink) {
                match procscan::Scanner::start(period, procscan::START_DELAY, sink, live) {
                    Ok(started) => scanner = Some(started),
                    Err(e) => log!("cannot start the /proc scan: {e}; processes outside the traced tree go unseen"),
                }
            }
        }
        Ok(Tracer { thread, scanner })
    }

    /// Attach mode: seizes the processes `pids` name (every thread, and
    /// their descendants) and traces them in full-ptrace mode until they are
    /// gone or an ending signal (TERM, INT, HUP, QUIT) makes the tracer let
    /// them go. Returns the tracer, and the pids that could not be traced;
    /// when none could, no tracer. The forwarded signals must be blocked
    /// (`Inheritance::capture`). `file_stats` as in [`Workload`].
    pub fn attach(
        pids: Vec<i32>,
        mut sink: EventSink,
        file_stats: bool,
    ) -> Result<(Option<Tracer>, Vec<AttachError>), LaunchError> {
        let detach = Arc::new(AtomicBool::new(false));
        let done = Arc::new(AtomicBool::new(false));
        let tracer_tid = Arc::new(AtomicI32::new(0));
        let (attached_tx, attached_rx) = mpsc::channel();
        let (thread_detach, thread_done, thread_tid) = (detach.clone(), done.clone(), tracer_tid.clone());
        let thread = std::thread::Builder::new()
            .name("cws-tracer".into())
            .spawn(move || -> Result<Outcome, LaunchError> {
                thread_tid.store(nix::unistd::gettid().as_raw(), Ordering::SeqCst);
                if let Err(e) = signals::accept_wake() {
                    log!("cannot install the detach wake-up handler: {e}");
                }
                let attached = attach::attach(&pids, &mut sink);
                let traced = !attached.processes.is_empty();
                let _ = attached_tx.send((traced, attached.failures));
                let outcome = if traced {
                    let live = LiveProcesses::default();
                    Engine::attached(attached.processes, sink, live, thread_detach, file_stats).run()
                } else {
                    Outcome { root: None, stats: Stats::default(), detached: 0 }
                };
                thread_done.store(true, Ordering::SeqCst);
                Ok(outcome)
            })
            .map_err(|e| LaunchError::Setup(format!("cannot start the tracer thread: {e}")))?;
        let (traced, failures) = attached_rx.recv().unwrap_or_default();
        if !traced {
            let _ = thread.join();
            return Ok((None, failures));
        }
        signals::spawn_detacher(detach, tracer_tid, done)
            .map_err(|e| LaunchError::Setup(format!("cannot start the signal thread: {e}")))?;
        Ok((Some(Tracer { thread, scanner: None }), failures))
    }

    /// Waits until every traced process is gone.
    pub fn wait(self) -> Result<Outcome, LaunchError> {
        let mut outcome =
            self.thread.join().unwrap_or_else(|_| Err(LaunchError::Setup("the tracer thread failed".into())));
        // The scan ends with the tracer: its sender must go for the queue to end.
        if let Some(scan) = self.scanner.and_then(procscan::Scanner::stop) {
            if let Ok(outcome) = &mut outcome {
                outcome.stats.add_sink(&scan.sink);
                outcome.stats.proc_scans = scan.scans;
                outcome.stats.proc_scan_cpu = scan.cpu;
                outcome.stats.proc_scan_first_cpu = scan.first_cpu;
            }
        }
        outcome
    }
}
