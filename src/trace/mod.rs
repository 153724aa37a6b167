//! The trace engine: starts the workload under ptrace and turns what it
//! does into events on the queue. Everything here runs on, or is started
//! from, the `cws-tracer` thread that owns every ptrace call; only the
//! signal forwarder runs beside it.
//!
//! Layers, lowest first: `abi` (the kernel's numbers); `memory`, `procfs`,
//! `paths`, `ptrace` (reading the tracee and its stops); `process` (the
//! process table), `restart` (interrupted calls); `decode` (what each call means); `syscalls` (the table);
//! `seccomp` (the filter built from it); `launch`, `signals`, `engine`.

mod abi;
mod decode;
mod engine;
mod launch;
mod memory;
mod paths;
mod process;
mod procfs;
mod ptrace;
mod restart;
mod seccomp;
mod signals;
mod syscalls;

use std::ffi::OsString;
use std::path::PathBuf;
use std::sync::mpsc;
use std::thread::JoinHandle;

use nix::sys::signal::SigSet;

use crate::log::log;
use crate::queue::EventSink;
use engine::Engine;
use launch::Launch;
use process::LiveProcesses;

pub use engine::{Mode, Outcome, Stats};
pub use launch::{resolve_entrypoint, LaunchError};
pub use procfs::peak_rss_kib;
pub use ptrace::Death;

/// What the workload inherits from the tracer's own start, captured before
/// any thread starts (threads inherit the blocked signals).
pub struct Inheritance {
    signal_mask: SigSet,
    ignored_signals: signals::IgnoredSignals,
}

impl Inheritance {
    /// Takes the signal state the tracer was started with, and blocks the
    /// signals the forwarder will pass on.
    pub fn capture() -> nix::Result<Inheritance> {
        let ignored_signals = signals::IgnoredSignals::capture();
        let signal_mask = signals::block_forwarded()?;
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
}

impl Tracer {
    /// Starts the workload under the `cws-tracer` thread, and the signal
    /// forwarder once the workload exists. Events go to `sink`.
    pub fn start(workload: Workload, inheritance: Inheritance, sink: EventSink) -> Result<Tracer, LaunchError> {
        let mut launch =
            Launch::new(&workload.program, &workload.argv, inheritance.signal_mask, inheritance.ignored_signals)?;
        launch.uid = workload.uid;
        launch.gid = workload.gid;
        launch.filter = (workload.mode == Mode::Seccomp).then(seccomp::build_filter);
        // Orphaned descendants are adopted by the tracer, as by PID 1 in a
        // container: they stay traced, are reaped, and see the same parent
        // whether or not the tracer is PID 1.
        nix::sys::prctl::set_child_subreaper(true)
            .map_err(|e| LaunchError::Setup(format!("cannot become a child subreaper: {e}")))?;
        let mode = workload.mode;
        let live = LiveProcesses::default();
        let (started_tx, started_rx) = mpsc::channel();
        let tracer_live = live.clone();
        let thread = std::thread::Builder::new()
            .name("cws-tracer".into())
            .spawn(move || -> Result<Outcome, LaunchError> {
                // The filter's listener stays open until every tracee is gone.
                let (root, _listener) = match launch.spawn(mode == Mode::Full) {
                    Ok(spawned) => spawned,
                    Err(e) => {
                        let _ = started_tx.send(None);
                        return Err(e);
                    }
                };
                // The engine lists the root as live before the forwarder starts,
                // so that no signal finds nobody to go to.
                let engine = Engine::new(mode, root, sink, tracer_live);
                let _ = started_tx.send(Some(root));
                Ok(engine.run())
            })
            .map_err(|e| LaunchError::Setup(format!("cannot start the tracer thread: {e}")))?;
        if let Ok(Some(root)) = started_rx.recv() {
            signals::spawn_forwarder(root, live, workload.log_signals)
                .map_err(|e| LaunchError::Setup(format!("cannot start the signal thread: {e}")))?;
        }
        Ok(Tracer { thread })
    }

    /// Waits until every traced process is gone.
    pub fn wait(self) -> Result<Outcome, LaunchError> {
        self.thread.join().unwrap_or_else(|_| Err(LaunchError::Setup("the tracer thread failed".into())))
    }
}
