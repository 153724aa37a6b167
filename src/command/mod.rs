//! The subcommands: the command line mapped onto the modules that do the
//! work, and their errors onto one line and an exit status.

mod attach;
mod datadog;
mod fanout;
mod trace;

use std::process::ExitCode;

use clap::Parser;

use crate::address::Address;
use crate::cli::{Cli, Command, TraceCommand};
use crate::exit::ExitError;
use crate::log::log;
use crate::{serve, setup};

/// The program: parses the command line, runs the subcommand, and turns its
/// result into the exit status.
pub fn main() -> ExitCode {
    // A bug must end as one line, not a backtrace over the workload's output.
    std::panic::set_hook(Box::new(|info| {
        log!("internal error: {info}");
    }));
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Trace(mut args) => match args.subcommand.take() {
            Some(TraceCommand::Selftests(selftests)) => datadog::selftests(selftests),
            None => trace::run(*args),
        },
        Command::Serve(args) => Address::parse(&args.listen)
            .map_err(|e| ExitError::usage(format!("--listen {e}")))
            .and_then(|listen| serve::run(serve::ServeOptions::new(listen, args)?)),
        Command::Setup(args) => setup::setup(&args.cws_volume_mount),
        Command::Health => Ok(setup::health()),
        Command::Inject(args) => datadog::inject(args),
        Command::Spawn(args) => datadog::spawn(args),
    };
    match result {
        Ok(status) => ExitCode::from(status as u8),
        Err(error) => {
            log!("{}", error.message);
            ExitCode::from(error.code as u8)
        }
    }
}
