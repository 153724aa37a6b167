//! `trace -- ENTRYPOINT`: the exporters, the agent wait, the tracer, and
//! the Goodbye, in that order; the exit status is the workload's.

use std::path::PathBuf;
use std::sync::Arc;

use tokio::sync::Notify;

use crate::address::Address;
use crate::auth::AgentCredentials;
use crate::cli::{self, TraceArgs};
use crate::command::{attach, datadog, fanout};
use crate::context;
use crate::exit::{code, ExitError};
use crate::export::{self, grpc, Exporters, Outputs};
use crate::log::log;
use crate::proto::{self, Counters, Goodbye};
use crate::queue::EventSink;
use crate::trace::{self, Inheritance, LaunchError, Mode, Outcome, Tracer, Workload};

pub fn run(args: TraceArgs) -> Result<i32, ExitError> {
    if fanout::needed(&args) {
        return fanout::run(&args);
    }
    // Read (and taken out of the workload's environment) before any thread starts.
    let credentials = AgentCredentials::load(&args).map_err(ExitError::usage)?;
    let attaching = !args.datadog.pids.is_empty();
    let program = match args.command.first() {
        Some(entrypoint) => Some(trace::resolve_entrypoint(entrypoint).map_err(ExitError::from)?),
        None if attaching => None,
        None => return Err(ExitError::usage("trace needs an entrypoint after --".into())),
    };
    // A stop signal once no traced process is left ends the wait for the agent.
    let abandon_flush = Arc::new(Notify::new());
    let agent = agent_options(&args, credentials, &abandon_flush)?;
    // Before any thread starts, so that every thread inherits the blocked signals.
    let inheritance = Inheritance::capture().map_err(|e| ExitError::setup(format!("cannot block signals: {e}")))?;
    let outputs = Outputs {
        verbose: args.verbose,
        debug: args.datadog.debug,
        events_file: args.events_file.clone(),
        agent,
        agent_protocol: args.probe_protocol,
    };
    let (sink, exporters) = Exporters::start(outputs).map_err(|e| ExitError::usage(e.to_string()))?;
    if let Some(exporters) = &exporters {
        hold_for_agent(&args, exporters);
    }

    let (outcome, failures) = match program {
        Some(program) => (wrap(&args, program, inheritance, sink, abandon_flush), Vec::new()),
        None => attach::run(&args, sink),
    };

    // The tracer, and with it the queue's sender, is gone: exporters drain and stop.
    let delivery = match exporters.map(|e| e.finish(goodbye(&outcome))).transpose() {
        Ok(delivery) => delivery.unwrap_or_default(),
        Err(e) => {
            log!("exporting events failed: {e}");
            grpc::Delivery::default()
        }
    };
    let outcome = outcome.map_err(ExitError::from)?;
    if args.stats {
        log_stats(&outcome, &delivery);
    }
    if args.verbose {
        log_summary(&outcome, &delivery);
    }
    if attaching {
        return Ok(failures.first().map_or(0, attach::status));
    }
    Ok(outcome.root.map_or(code::SETUP, |death| death.shell_status()))
}

/// Wrap mode: starts the entrypoint under the tracer and waits for it.
fn wrap(
    args: &TraceArgs,
    program: PathBuf,
    inheritance: Inheritance,
    sink: EventSink,
    abandon_flush: Arc<Notify>,
) -> Result<Outcome, LaunchError> {
    let requested = if args.disable_seccomp || cli::env_flag("DD_CWS_INSTRUMENTATION_SECCOMP_DISABLED") {
        Mode::Full
    } else {
        Mode::Seccomp
    };
    let workload = Workload {
        program,
        argv: args.command.clone(),
        uid: args.uid.and_then(|id| id.0),
        gid: args.gid.and_then(|id| id.0),
        mode: trace::usable_mode(requested),
        log_signals: args.verbose,
        abandon_flush,
        proc_scan: datadog::proc_scan_period(&args.datadog),
        file_stats: datadog::file_stats(&args.datadog),
    };
    Tracer::start(workload, inheritance, sink).and_then(Tracer::wait)
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
    let mut hello = context::hello(&args.command);
    if !args.datadog.pids.is_empty() {
        hello.mode = proto::Mode::Attached as i32;
    }
    Ok(Some(grpc::Options {
        address,
        hello,
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
        "stats: seccomp_stops={} syscall_stops={} fork_stops={} exec_stops={} group_stops={} signal_stops={} other_stops={} foreign_calls={} supervised_calls={} bounced_calls={} events={} dropped={} undelivered={} reconnects={} peak_rss_kib={} proc_scans={} proc_scan_cpu_us={} proc_scan_first_cpu_us={} detached={} skipped={} skipped_by_kind={}",
        s.seccomp, s.syscall, s.fork, s.exec, s.group, s.signal, s.other, s.foreign, s.supervised, s.bounced, s.events,
        s.dropped,
        delivery.undelivered + delivery.dropped, delivery.reconnects, trace::peak_rss_kib().unwrap_or(0),
        s.proc_scans, s.proc_scan_cpu.as_micros(), s.proc_scan_first_cpu.as_micros(), outcome.detached,
        delivery.skipped.values().sum::<u64>(), export::skipped_kinds(&delivery.skipped, ":", ",")
    );
}

/// `--verbose`'s last line: what the run amounted to.
fn log_summary(outcome: &Outcome, delivery: &grpc::Delivery) {
    let s = &outcome.stats;
    let kinds: Vec<String> = s.events_by_kind.iter().map(|(kind, count)| format!("{kind} {count}")).collect();
    let undelivered = delivery.undelivered + delivery.dropped;
    let skipped = delivery.skipped.values().sum::<u64>();
    log!(
        "summary: {} events ({}), {} ptrace stops, {} dropped{}{}",
        s.events + s.dropped,
        if kinds.is_empty() { "none".to_owned() } else { kinds.join(", ") },
        s.stops(),
        s.dropped,
        if undelivered > 0 { format!(", {undelivered} not delivered to the agent") } else { String::new() },
        if skipped > 0 {
            format!(
                ", {skipped} not sent to the Datadog agent ({})",
                export::skipped_kinds(&delivery.skipped, " ", ", ")
            )
        } else {
            String::new()
        }
    );
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;
    use crate::cli::{Cli, Command};

    fn trace_args(argv: &[&str]) -> TraceArgs {
        match Cli::try_parse_from(argv).map(|cli| cli.command) {
            Ok(Command::Trace(args)) => *args,
            _ => panic!("not a trace command line: {argv:?}"),
        }
    }

    #[test]
    fn the_hello_says_attached_without_entrypoint_in_attach_mode() {
        let attached = trace_args(&["cws-instrumentation", "trace", "--probe-addr", "127.0.0.1:1", "--pid", "7"]);
        let options = |args| agent_options(args, AgentCredentials::default(), &Arc::default()).unwrap().unwrap();
        let hello = options(&attached).hello;
        assert_eq!((hello.mode(), hello.entrypoint_args.len()), (proto::Mode::Attached, 0));
        let wrapped = trace_args(&["cws-instrumentation", "trace", "--probe-addr", "127.0.0.1:1", "--", "true"]);
        let hello = options(&wrapped).hello;
        assert_eq!((hello.mode(), hello.entrypoint_args), (proto::Mode::Wrapped, vec!["true".to_owned()]));
    }

    #[test]
    fn pids_repeat_or_come_comma_separated_as_in_go() {
        let args = trace_args(&["cws-instrumentation", "trace", "--pid", "3,4", "--pid", "5"]);
        assert_eq!(args.datadog.pids, [3, 4, 5]);
    }

    #[test]
    fn an_entrypoint_and_pids_are_not_both_accepted() {
        let argv = ["cws-instrumentation", "trace", "--pid", "7", "--", "true"];
        assert!(Cli::try_parse_from(argv).is_err());
        assert!(Cli::try_parse_from(["cws-instrumentation", "trace"]).is_err());
    }
}
