//! Datadog's small subcommands: `inject` and `spawn` (run a command in
//! place of this program) and `trace selftests` (actions the agent watches
//! for to check that events flow).

use std::path::Path;
use std::time::Duration;

use nix::errno::Errno;
use nix::fcntl::OFlag;
use nix::sys::stat::Mode;

use crate::cli::{self, DatadogTraceArgs, InjectArgs, SelftestsArgs, SpawnArgs};
use crate::exit::{code, ExitError};
use crate::log::log;
use crate::trace;

/// Datadog's bound on a session's data.
const MAX_SESSION_DATA: usize = 1024;

/// Datadog's `inject` sends the session to its eBPF probe, then runs the
/// command; without eBPF there is nothing to send. As there, a problem with
/// the session is reported and never stops the command.
pub fn inject(args: InjectArgs) -> Result<i32, ExitError> {
    if args.data.len() > MAX_SESSION_DATA {
        log!("inject: --data is {} bytes, more than {MAX_SESSION_DATA}; running the command anyway", args.data.len());
    }
    Err(trace::exec_in_place(&args.command, false).into())
}

pub fn spawn(args: SpawnArgs) -> Result<i32, ExitError> {
    Err(trace::exec_in_place(&args.command, true).into())
}

/// Runs the actions asked for; each failure is one line, and the status is
/// 1 when any failed.
pub fn selftests(args: SelftestsArgs) -> Result<i32, ExitError> {
    let mut failed = false;
    if args.exec {
        if let Err(e) = exec_test(&args.exec_path, &args.exec_args) {
            log!("selftest exec {}: {e}", args.exec_path.display());
            failed = true;
        }
    }
    if args.open {
        if let Err(e) = open_test(&args.open_path) {
            log!("selftest open {}: {e}", args.open_path.display());
            failed = true;
        }
    }
    Ok(if failed { code::FAILED } else { 0 })
}

/// Runs the program with the space-separated arguments and waits for it;
/// its own exit status is not judged (the exec is the test).
fn exec_test(program: &Path, args: &str) -> std::io::Result<()> {
    std::process::Command::new(program).args(args.split_whitespace()).status().map(drop)
}

/// Creates the file (O_CREAT|O_EXCL, mode 0400) and removes it; a file
/// already there is only opened, and left alone.
fn open_test(path: &Path) -> nix::Result<()> {
    let create = OFlag::O_RDONLY | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_CLOEXEC;
    match nix::fcntl::open(path, create, Mode::from_bits_truncate(0o400)) {
        Ok(file) => {
            drop(file);
            nix::unistd::unlink(path)
        }
        Err(Errno::EEXIST) => nix::fcntl::open(path, OFlag::O_RDONLY | OFlag::O_CLOEXEC, Mode::empty()).map(drop),
        Err(e) => Err(e),
    }
}

/// Whether events carry file metadata and owner names: Datadog's
/// `--disable-stats` (or DD_CWS_INSTRUMENTATION_STATS_DISABLED=true) turns
/// them off.
pub fn file_stats(args: &DatadogTraceArgs) -> bool {
    !(args.disable_stats || cli::env_flag("DD_CWS_INSTRUMENTATION_STATS_DISABLED"))
}

/// The /proc scan's period, or None when it is turned off. As Datadog's, a
/// rate that is not a duration costs a warning and gives the default.
pub fn proc_scan_period(args: &DatadogTraceArgs) -> Option<Duration> {
    if args.disable_proc_scan || cli::env_flag("DD_CWS_INSTRUMENTATION_PROC_SCAN_DISABLED") {
        return None;
    }
    let rate = args.proc_scan_rate.clone().or_else(|| std::env::var("DD_CWS_INSTRUMENTATION_PROC_SCAN_RATE").ok());
    let default = trace::DEFAULT_PROC_SCAN_PERIOD;
    Some(match rate.as_deref().filter(|r| !r.is_empty()).map(cli::parse_go_duration) {
        None => default,
        Some(Ok(period)) if !period.is_zero() => period,
        Some(Ok(_)) => default,
        Some(Err(e)) => {
            log!("proc scan rate: {e}; scanning every {}", cli::format_duration(default));
            default
        }
    })
}
