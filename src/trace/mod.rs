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
use std::sync::{mpsc, Arc};
use std::time::Duration;

pub use decode::timestamp;
pub use engine::Mode;
use engine::{Engine, Outcome};
use launch::{Launch, LaunchError};
use process::LiveProcesses;

use crate::address::Address;
use crate::context;
use crate::export::{grpc, Exporters, Outputs};
use crate::log::log;
use crate::proto::{Counters, Goodbye};
use crate::ExitError;
use ptrace::Death;

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

/// Where and how events reach the agent.
pub struct AgentOptions {
    pub address: Address,
    /// Start the workload at once instead of waiting for the connection.
    pub asynchronous: bool,
    pub connect_timeout: Duration,
    pub flush_timeout: Duration,
    pub buffer_events: usize,
    /// Presented to the agent on every stream.
    pub credentials: crate::auth::AgentCredentials,
}

pub struct TraceOptions {
    pub command: Vec<OsString>,
    pub agent: Option<AgentOptions>,
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

    let stop_flush = Arc::new(tokio::sync::Notify::new());
    let agent = options.agent.as_ref().map(|agent| grpc::Options {
        address: agent.address.clone(),
        hello: context::hello(&options.command),
        capacity: agent.buffer_events,
        flush_timeout: agent.flush_timeout,
        answer_timeout: agent.connect_timeout,
        abandon: Arc::clone(&stop_flush),
        credentials: agent.credentials.clone(),
    });
    let outputs = Outputs { verbose: options.verbose, events_file: options.events_file.clone(), agent };
    // Block before any thread starts, so that every thread inherits it.
    let signal_mask = signals::block_forwarded().map_err(|e| ExitError::setup(format!("cannot block signals: {e}")))?;
    let (sink, exporters) = Exporters::start(outputs).map_err(|e| ExitError::new(exit_code::USAGE, e.to_string()))?;
    if let (Some(agent), Some(exporters)) = (&options.agent, &exporters) {
        // Hold the workload until its events have somewhere to go, but
        // never longer than the timeout: an absent agent must not stop it.
        if !agent.asynchronous && exporters.connected.recv_timeout(agent.connect_timeout).is_err() {
            log!(
                "the agent at {} is not reachable after {:?}; starting the workload anyway, events are buffered",
                agent.address,
                agent.connect_timeout
            );
        }
    }

    let mut launch = Launch::new(&program, &options.command, signal_mask, ignored_signals).map_err(launch_error)?;
    launch.uid = options.uid;
    launch.gid = options.gid;
    let mode = match options.mode {
        Mode::Seccomp => match seccomp::available() {
            Ok(()) => Mode::Seccomp,
            Err(e) => {
                // Slower, but the workload runs and nothing goes unseen.
                log!("seccomp filters are not available here ({e}); tracing every syscall instead");
                Mode::Full
            }
        },
        Mode::Full => Mode::Full,
    };
    launch.filter = (mode == Mode::Seccomp).then(seccomp::build_filter);

    // Orphaned descendants are adopted by the tracer, as by PID 1 in a
    // container: they stay traced, are reaped, and see the same parent
    // whether or not the tracer is PID 1.
    nix::sys::prctl::set_child_subreaper(true)
        .map_err(|e| ExitError::setup(format!("cannot become a child subreaper: {e}")))?;
    let live = LiveProcesses::default();
    let (started_tx, started_rx) = mpsc::channel();
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
        signals::spawn_forwarder(root, live, options.verbose, stop_flush)
            .map_err(|e| ExitError::setup(format!("cannot start the signal thread: {e}")))?;
    }
    let outcome = tracer.join().map_err(|_| ExitError::setup("the tracer thread failed".into()))?;
    let stats = outcome.as_ref().map(|o| o.stats).unwrap_or_default();
    let goodbye = Goodbye {
        exit: outcome.as_ref().ok().and_then(|o| o.root).map(Death::event),
        counters: Some(Counters {
            events: stats.events,
            dropped: stats.dropped,
            ptrace_stops: stats.stops(),
            reconnects: 0,
        }),
    };
    // The engine, and with it the queue's sender, is gone: exporters drain and stop.
    let delivery = match exporters.map(|e| e.finish(goodbye)).transpose() {
        Ok(delivery) => delivery.unwrap_or_default(),
        Err(e) => {
            log!("exporting events failed: {e}");
            grpc::Delivery::default()
        }
    };
    let outcome = outcome.map_err(launch_error)?;
    if options.stats {
        let s = outcome.stats;
        log!(
            "stats: seccomp_stops={} syscall_stops={} fork_stops={} exec_stops={} group_stops={} signal_stops={} other_stops={} foreign_calls={} events={} dropped={} undelivered={} reconnects={} peak_rss_kib={}",
            s.seccomp, s.syscall, s.fork, s.exec, s.group, s.signal, s.other, s.foreign, s.events, s.dropped,
            delivery.undelivered + delivery.dropped, delivery.reconnects, procfs::peak_rss_kib().unwrap_or(0)
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
