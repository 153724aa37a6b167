//! `trace -- ENTRYPOINT`: the exporters, the agent wait, the tracer, and
//! the Goodbye, in that order; the exit status is the workload's.

use std::sync::Arc;

use tokio::sync::Notify;

use crate::address::Address;
use crate::auth::AgentCredentials;
use crate::cli::{self, TraceArgs};
use crate::context;
use crate::exit::{code, ExitError};
use crate::export::{grpc, Exporters, Outputs};
use crate::log::log;
use crate::proto::{Counters, Goodbye};
use crate::trace::{self, Inheritance, LaunchError, Mode, Outcome, Tracer, Workload};

pub fn run(args: TraceArgs) -> Result<i32, ExitError> {
    // Read (and taken out of the workload's environment) before any thread starts.
    let credentials = AgentCredentials::load(&args).map_err(ExitError::usage)?;
    let entrypoint =
        args.command.first().ok_or_else(|| ExitError::usage("trace needs an entrypoint after --".into()))?;
    let program = trace::resolve_entrypoint(entrypoint).map_err(launch_error)?;
    // A stop signal once no traced process is left ends the wait for the agent.
    let abandon_flush = Arc::new(Notify::new());
    let agent = agent_options(&args, credentials, &abandon_flush)?;
    // Before any thread starts, so that every thread inherits the blocked signals.
    let inheritance = Inheritance::capture().map_err(|e| ExitError::setup(format!("cannot block signals: {e}")))?;
    let outputs = Outputs {
        verbose: args.verbose,
        events_file: args.events_file.clone(),
        agent,
        agent_protocol: args.probe_protocol,
    };
    let (sink, exporters) = Exporters::start(outputs).map_err(|e| ExitError::usage(e.to_string()))?;
    if let Some(exporters) = &exporters {
        hold_for_agent(&args, exporters);
    }

    let requested = if args.disable_seccomp || cli::env_flag("DD_CWS_INSTRUMENTATION_SECCOMP_DISABLED") {
        Mode::Full
    } else {
        Mode::Seccomp
    };
    let workload = Workload {
        program,
        argv: args.command.clone(),
        uid: args.uid,
        gid: args.gid,
        mode: trace::usable_mode(requested),
        log_signals: args.verbose,
        abandon_flush,
    };
    let outcome = Tracer::start(workload, inheritance, sink).and_then(Tracer::wait);

    // The tracer, and with it the queue's sender, is gone: exporters drain and stop.
    let delivery = match exporters.map(|e| e.finish(goodbye(&outcome))).transpose() {
        Ok(delivery) => delivery.unwrap_or_default(),
        Err(e) => {
            log!("exporting events failed: {e}");
            grpc::Delivery::default()
        }
    };
    let outcome = outcome.map_err(launch_error)?;
    if args.stats {
        log_stats(&outcome, &delivery);
    }
    if args.verbose {
        log_summary(&outcome, &delivery);
    }
    Ok(outcome.root.map_or(code::SETUP, |death| death.shell_status()))
}

fn agent_options(
    args: &TraceArgs,
    credentials: AgentCredentials,
    abandon_flush: &Arc<Notify>,
) -> Result<Option<grpc::Options>, ExitError> {
    if args.probe_addr.is_empty() {
        return Ok(None);
    }
    let address = Address::parse(&args.probe_addr).map_err(|e| ExitError::usage(format!("--probe-addr {e}")))?;
    Ok(Some(grpc::Options {
        address,
        hello: context::hello(&args.command),
        capacity: args.buffer_events.max(1),
        flush_timeout: args.flush_timeout,
        answer_timeout: args.connect_timeout,
        abandon: Arc::clone(abandon_flush),
        credentials,
    }))
}

/// Holds the workload until its events have somewhere to go, but never
/// longer than the timeout: an absent agent must not stop it.
fn hold_for_agent(args: &TraceArgs, exporters: &Exporters) {
    if args.probe_addr.is_empty() || args.asynchronous {
        return;
    }
    if exporters.connected.recv_timeout(args.connect_timeout).is_err() {
        log!(
            "no agent answered at {} within {}; starting the workload anyway, its events are kept for the agent",
            args.probe_addr,
            cli::format_duration(args.connect_timeout)
        );
    }
}

/// How the workload ended and what the tracer counted, for the agent.
fn goodbye(outcome: &Result<Outcome, LaunchError>) -> Goodbye {
    let outcome = outcome.as_ref().ok();
    let stats = outcome.map(|o| o.stats.clone()).unwrap_or_default();
    Goodbye {
        exit: outcome.and_then(|o| o.root).map(trace::Death::event),
        counters: Some(Counters {
            events: stats.events,
            dropped: stats.dropped,
            ptrace_stops: stats.stops(),
            reconnects: 0,
        }),
    }
}

fn log_stats(outcome: &Outcome, delivery: &grpc::Delivery) {
    let s = &outcome.stats;
    log!(
        "stats: seccomp_stops={} syscall_stops={} fork_stops={} exec_stops={} group_stops={} signal_stops={} other_stops={} foreign_calls={} events={} dropped={} undelivered={} reconnects={} peak_rss_kib={}",
        s.seccomp, s.syscall, s.fork, s.exec, s.group, s.signal, s.other, s.foreign, s.events, s.dropped,
        delivery.undelivered + delivery.dropped, delivery.reconnects, trace::peak_rss_kib().unwrap_or(0)
    );
}

/// `--verbose`'s last line: what the run amounted to.
fn log_summary(outcome: &Outcome, delivery: &grpc::Delivery) {
    let s = &outcome.stats;
    let kinds: Vec<String> = s.events_by_kind.iter().map(|(kind, count)| format!("{kind} {count}")).collect();
    let undelivered = delivery.undelivered + delivery.dropped;
    log!(
        "summary: {} events ({}), {} ptrace stops, {} dropped{}",
        s.events + s.dropped,
        if kinds.is_empty() { "none".to_owned() } else { kinds.join(", ") },
        s.stops(),
        s.dropped,
        if undelivered > 0 { format!(", {undelivered} not delivered to the agent") } else { String::new() }
    );
}

fn launch_error(error: LaunchError) -> ExitError {
    match error {
        LaunchError::NotFound(name) => ExitError::new(code::NOT_FOUND, format!("{name}: command not found")),
        LaunchError::NotExecutable(message) => ExitError::new(code::NOT_EXECUTABLE, message),
        LaunchError::Setup(message) => ExitError::setup(message),
    }
}
