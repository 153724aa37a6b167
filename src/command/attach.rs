//! `trace --pid PID...`: attach mode's command side. The pids that cannot
//! be traced are one line each; the others are traced until they exit or
//! an ending signal detaches the tracer.

use crate::cli::TraceArgs;
use crate::exit::code;
use crate::log::log;
use crate::queue::EventSink;
use crate::trace::{AttachError, LaunchError, Outcome, Stats, Tracer};

/// Attaches, traces, and returns how it went with the pids that failed.
pub fn run(args: &TraceArgs, sink: EventSink) -> (Result<Outcome, LaunchError>, Vec<AttachError>) {
    log!("attach mode: a seccomp filter cannot be added to a running process, so every syscall stops the tracee");
    let file_stats = crate::command::datadog::file_stats(&args.datadog);
    let (tracer, failures) = match Tracer::attach(args.datadog.pids.clone(), sink, file_stats) {
        Ok(attached) => attached,
        Err(e) => return (Err(e), Vec::new()),
    };
    for failure in &failures {
        log!("{failure}");
    }
    let outcome = match tracer {
        Some(tracer) => tracer.wait(),
        None => Ok(Outcome { root: None, stats: Stats::default(), detached: 0 }),
    };
    (outcome, failures)
}

/// The exit status for a pid that could not be traced.
pub fn status(failure: &AttachError) -> i32 {
    match failure {
        AttachError::NoSuchProcess(_) => code::NOT_FOUND,
        AttachError::Refused(..) => code::SETUP,
    }
}
