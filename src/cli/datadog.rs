//! The parts of the command line that exist for Datadog's users: the flags of
//! Datadog's `trace` that the rest of this tool does not need, attach mode,
//! and the `inject`, `spawn` and `trace selftests` subcommands. Each keeps
//! Datadog's name, default and environment variable; README's "Datadog
//! users" section says what each does here.

use std::ffi::OsString;
use std::path::PathBuf;

use clap::{Args, Subcommand, ValueEnum};

/// Flags of Datadog's `trace`, flattened into ours.
#[derive(Args, Default)]
pub struct DatadogTraceArgs {
    /// Print every event as JSON on stderr ("sending message: {...}").
    #[arg(long)]
    pub debug: bool,

    /// Leave file metadata (mode, owner, times) and owner names out of
    /// events (not about --stats). Also DD_CWS_INSTRUMENTATION_STATS_DISABLED=true.
    #[arg(long)]
    pub disable_stats: bool,

    /// Turn off the /proc scan for processes outside the traced tree. Also
    /// DD_CWS_INSTRUMENTATION_PROC_SCAN_DISABLED=true.
    #[arg(long)]
    pub disable_proc_scan: bool,

    /// Period of the /proc scan, a Go duration (default 500ms). Also DD_CWS_INSTRUMENTATION_PROC_SCAN_RATE.
    #[arg(long, value_name = "DURATION")]
    pub proc_scan_rate: Option<String>,

    /// Attach to this running process (repeatable, or comma-separated)
    /// instead of starting an entrypoint: every thread of it, and its descendants.
    #[arg(long = "pid", value_name = "PID", conflicts_with = "command", value_delimiter = ',')]
    pub pids: Vec<i32>,

    /// In attach mode, at most this many pids per tracer process: more are
    /// traced by as many tracer processes as needed.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    pub pid_per_tracer: Option<u64>,
}

/// `--uid`/`--gid`: a numeric id, or -1 (Datadog's default) for "keep the tracer's".
#[derive(Clone, Copy, Debug)]
pub struct Id(pub Option<u32>);

pub fn parse_id(text: &str) -> Result<Id, String> {
    if text == "-1" {
        return Ok(Id(None));
    }
    text.parse::<u32>().map(|id| Id(Some(id))).map_err(|_| format!("{text:?} is not a numeric id (or -1)"))
}

#[derive(Subcommand)]
pub enum TraceCommand {
    /// Small actions the agent watches for to check that events flow: run
    /// a program, open (and create) a file.
    Selftests(SelftestsArgs),
}

#[derive(Args)]
pub struct SelftestsArgs {
    /// Run a program and wait for it.
    #[arg(long)]
    pub exec: bool,

    /// The program run by --exec.
    #[arg(long = "exec.path", value_name = "PATH", default_value = "/usr/bin/date")]
    pub exec_path: PathBuf,

    /// Its arguments, separated by spaces.
    #[arg(long = "exec.args", value_name = "ARGS", default_value = "", allow_hyphen_values = true)]
    pub exec_args: String,

    /// Create the file (O_CREAT|O_EXCL, mode 0400) and remove it again; an
    /// existing file is only opened.
    #[arg(long)]
    pub open: bool,

    /// The file opened by --open.
    #[arg(long = "open.path", value_name = "PATH", default_value = "/tmp/open.test")]
    pub open_path: PathBuf,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum SessionType {
    K8s,
    Ssh,
}

#[derive(Args)]
pub struct InjectArgs {
    /// The kind of user session (Datadog sends it to its eBPF probe; without
    /// eBPF there is nothing to send).
    #[arg(long, value_name = "TYPE")]
    pub session_type: SessionType,

    /// The session's data (at most 1024 bytes).
    #[arg(long, value_name = "DATA", default_value = "")]
    pub data: String,

    /// The command to run in place of this one.
    #[arg(required = true, trailing_var_arg = true, value_name = "COMMAND")]
    pub command: Vec<OsString>,
}

#[derive(Args)]
pub struct SpawnArgs {
    /// The command to run in place of this one; nothing of it is read as an option.
    #[arg(required = true, trailing_var_arg = true, allow_hyphen_values = true, value_name = "COMMAND")]
    pub command: Vec<OsString>,
}

/// A duration as Go writes it ("500ms", "1m30s", "1.5h", "250us"): what
/// Datadog's `--proc-scan-rate` takes.
pub fn parse_go_duration(text: &str) -> Result<std::time::Duration, String> {
    const UNITS: [(&str, f64); 8] =
        [("ns", 1e-9), ("us", 1e-6), ("µs", 1e-6), ("μs", 1e-6), ("ms", 1e-3), ("s", 1.0), ("m", 60.0), ("h", 3600.0)];
    let invalid = || format!("{text:?} is not a duration (like 500ms or 1m30s)");
    if text == "0" {
        return Ok(std::time::Duration::ZERO);
    }
    let mut rest = text;
    let mut seconds = 0.0;
    while !rest.is_empty() {
        let number_end = rest.find(|c: char| !(c.is_ascii_digit() || c == '.')).ok_or_else(invalid)?;
        let number: f64 = rest[..number_end].parse().map_err(|_| invalid())?;
        rest = &rest[number_end..];
        // The longest unit that matches: "ms" rather than "m".
        let (unit, scale) = UNITS
            .iter()
            .filter(|(unit, _)| rest.starts_with(unit))
            .max_by_key(|(unit, _)| unit.len())
            .ok_or_else(invalid)?;
        seconds += number * scale;
        rest = &rest[unit.len()..];
    }
    if text.is_empty() || !seconds.is_finite() {
        return Err(invalid());
    }
    std::time::Duration::try_from_secs_f64(seconds).map_err(|_| invalid())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn go_durations_parse_as_go_parses_them() {
        assert_eq!(parse_go_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_go_duration("1m30s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_go_duration("1.5h"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse_go_duration("250us"), Ok(Duration::from_micros(250)));
        assert_eq!(parse_go_duration("0"), Ok(Duration::ZERO));
        for bad in ["", "10", "5x", "ms", "1.2.3s"] {
            assert!(parse_go_duration(bad).is_err(), "{bad}");
        }
    }
}
