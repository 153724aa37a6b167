//! `trace`: run the entrypoint under the ptrace engine and export its events.
//!
//! Threads: the caller (waits, then reports), the tracer (forks the
//! workload, owns every ptrace call), the signal forwarder, and the
//! exporters' runtime. The exit status is the workload's.

mod decode;
mod engine;
mod launch;
mod memory;
mod paths;
mod process;
mod procfs;
mod ptrace;
mod seccomp;
mod signals;
mod syscalls;

use std::ffi::OsString;
use std::path::PathBuf;
use std::sync::mpsc;

pub use engine::Mode;
use engine::{Engine, Outcome};
use launch::{Launch, LaunchError};
use process::LiveProcesses;

use crate::export::{Exporters, Outputs};
use crate::log::log;
use crate::ExitError;

/// Exit statuses of the tracer itself, distinct from any a workload is
/// likely to use on purpose.
pub mod exit_code {
    /// The command line or an output path is unusable.
    pub const USAGE: i32 = 2;
    /// Tracing could not be set up (ptrace refused, fork failed, ...).
    pub const SETUP: i32 = 125;
    /// The entrypoint exists but cannot be executed.
    pub const NOT_EXECUTABLE: i32 = 126;
    /// The entrypoint does not exist.
    pub const NOT_FOUND: i32 = 127;
}

pub struct TraceOptions {
    pub command: Vec<OsString>,
    pub mode: Mode,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub verbose: bool,
    pub events_file: Option<PathBuf>,
    pub stats: bool,
}

/// Runs the workload to completion; returns the exit status to leave with.
pub fn run(options: TraceOptions) -> Result<i32, ExitError> {
    let ignored_signals = signals::IgnoredSignals::capture();
    let entrypoint = options.command.first().ok_or_else(|| ExitError::usage("trace needs an entrypoint after --"))?;
    let program = launch::resolve_entrypoint(entrypoint).map_err(launch_error)?;

    let outputs = Outputs { verbose: options.verbose, events_file: options.events_file.clone() };
    // Block before any thread starts, so that every thread inherits it.
    let signal_mask = signals::block_forwarded().map_err(|e| ExitError::setup(format!("cannot block signals: {e}")))?;
    let (sink, exporters) = Exporters::start(&outputs).map_err(|e| ExitError::new(exit_code::USAGE, e.to_string()))?;

    let mut launch = Launch::new(&program, &options.command, signal_mask, ignored_signals).map_err(launch_error)?;
    launch.uid = options.uid;
    launch.gid = options.gid;
    launch.filter = (options.mode == Mode::Seccomp).then(seccomp::build_filter);

    // Orphaned descendants are adopted by the tracer, as by PID 1 in a
    // container: they stay traced, are reaped, and see the same parent
    // whether or not the tracer is PID 1.
    nix::sys::prctl::set_child_subreaper(true)
        .map_err(|e| ExitError::setup(format!("cannot become a child subreaper: {e}")))?;
    let live = LiveProcesses::default();
    let (started_tx, started_rx) = mpsc::channel();
    let mode = options.mode;
    let tracer_live = live.clone();
    let tracer = std::thread::Builder::new()
        .name("cws-tracer".into())
        .spawn(move || -> Result<Outcome, LaunchError> {
            let root = match launch.spawn(mode == Mode::Full) {
                Ok(root) => root,
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
        .map_err(|e| ExitError::setup(format!("cannot start the tracer thread: {e}")))?;

    if let Ok(Some(root)) = started_rx.recv() {
        signals::spawn_forwarder(root, live, options.verbose)
            .map_err(|e| ExitError::setup(format!("cannot start the signal thread: {e}")))?;
    }
    let outcome = tracer.join().map_err(|_| ExitError::setup("the tracer thread failed".into()))?;
    // The engine, and with it the queue's sender, is gone: exporters drain and stop.
    let exported = exporters.map(Exporters::finish).transpose();
    let outcome = outcome.map_err(launch_error)?;
    if let Err(e) = exported {
        log!("exporting events failed: {e}");
    }
    if options.stats {
        let s = outcome.stats;
        log!(
            "stats: seccomp_stops={} syscall_stops={} fork_stops={} exec_stops={} group_stops={} signal_stops={} other_stops={} foreign_calls={} events={} dropped={}",
            s.seccomp, s.syscall, s.fork, s.exec, s.group, s.signal, s.other, s.foreign, s.events, s.dropped
        );
    }
    Ok(outcome.root.map_or(exit_code::SETUP, |death| death.shell_status()))
}

fn launch_error(error: LaunchError) -> ExitError {
    match error {
        LaunchError::NotFound(name) => ExitError::new(exit_code::NOT_FOUND, format!("{name}: command not found")),
        LaunchError::NotExecutable(message) => ExitError::new(exit_code::NOT_EXECUTABLE, message),
        LaunchError::Setup(message) => ExitError::setup(message),
    }
}
