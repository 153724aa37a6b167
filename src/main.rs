//! cws-instrumentation: a ptrace + seccomp workload security tracer for
//! containers where eBPF cannot run (AWS Fargate and the like).
//!
//! `trace -- ENTRYPOINT` forks the entrypoint under ptrace with a seccomp
//! filter that stops only the syscalls worth watching, decodes them into
//! events (see `proto/`), and exits with the workload's status. See
//! ARCHITECTURE.md for the map of the code and its invariants.

mod address;
mod auth;
mod cli;
mod context;
mod ecs;
mod export;
mod log;
mod proto;
mod serve;
mod setup;
mod trace;

use std::process::ExitCode;

use clap::Parser;

use cli::{Cli, Command};

/// An error that ends the program: one line on stderr, and its exit status.
#[derive(Debug)]
pub struct ExitError {
    code: i32,
    message: String,
}

impl ExitError {
    pub fn new(code: i32, message: String) -> Self {
        ExitError { code, message }
    }

    pub fn usage(message: &str) -> Self {
        ExitError::new(trace::exit_code::USAGE, message.to_owned())
    }

    pub fn setup(message: String) -> Self {
        ExitError::new(trace::exit_code::SETUP, message)
    }
}

fn main() -> ExitCode {
    // A bug must end as one line, not a backtrace over the workload's output.
    std::panic::set_hook(Box::new(|info| {
        log::log!("internal error: {info}");
    }));
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Trace(args) => {
            // Read (and taken out of the workload's environment) before any thread starts.
            let credentials = match auth::AgentCredentials::load(&args) {
                Ok(credentials) => credentials,
                Err(e) => return exit_with(ExitError::usage(&e)),
            };
            let mode = if args.disable_seccomp || cli::env_flag("DD_CWS_INSTRUMENTATION_SECCOMP_DISABLED") {
                trace::Mode::Full
            } else {
                trace::Mode::Seccomp
            };
            let agent = match args.probe_addr.as_str() {
                "" => Ok(None),
                addr => address::Address::parse(addr).map(|address| {
                    Some(trace::AgentOptions {
                        address,
                        asynchronous: args.asynchronous,
                        connect_timeout: args.connect_timeout,
                        flush_timeout: args.flush_timeout,
                        buffer_events: args.buffer_events.max(1),
                        credentials,
                    })
                }),
            };
            agent.map_err(|e| ExitError::usage(&format!("--probe-addr {e}"))).and_then(|agent| {
                trace::run(trace::TraceOptions {
                    command: args.command,
                    agent,
                    mode,
                    uid: args.uid,
                    gid: args.gid,
                    verbose: args.verbose,
                    events_file: args.events_file,
                    stats: args.stats,
                })
            })
        }
        Command::Serve(args) => address::Address::parse(&args.listen)
            .map_err(|e| ExitError::usage(&format!("--listen {e}")))
            .and_then(|listen| serve::run(serve::ServeOptions::new(listen, args)?)),
        Command::Setup(args) => setup::setup(&args.cws_volume_mount),
        Command::Health => Ok(setup::health()),
    };
    match result {
        Ok(status) => ExitCode::from(status as u8),
        Err(error) => exit_with(error),
    }
}

fn exit_with(error: ExitError) -> ExitCode {
    log::log!("{}", error.message);
    ExitCode::from(error.code as u8)
}
