//! Command line: the subcommands and flags of `cws-instrumentation`.

use std::ffi::OsString;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "cws-instrumentation",
    version,
    about = "Workload security tracer for containers where eBPF cannot run (ptrace + seccomp)"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// Run ENTRYPOINT under the tracer and report what it does.
    Trace(TraceArgs),
}

#[derive(Args)]
pub struct TraceArgs {
    /// Print one line per event on stderr.
    #[arg(long)]
    pub verbose: bool,

    /// Write every event as one JSON object per line to PATH.
    #[arg(long, value_name = "PATH")]
    pub events_file: Option<PathBuf>,

    /// Stop at every syscall instead of filtering with seccomp (slower; for
    /// kernels without seccomp). Default from DD_CWS_INSTRUMENTATION_SECCOMP_DISABLED=true.
    #[arg(long)]
    pub disable_seccomp: bool,

    /// Run the workload as this numeric user id (supplementary groups cleared).
    #[arg(long, value_name = "N")]
    pub uid: Option<u32>,

    /// Run the workload as this numeric group id (supplementary groups cleared).
    #[arg(long, value_name = "N")]
    pub gid: Option<u32>,

    /// Address of the agent's event endpoint. Events are not sent yet: the
    /// tracer runs offline.
    #[arg(long, value_name = "ADDR", default_value = "localhost:5678")]
    pub probe_addr: String,

    /// Print ptrace stop and event counters on stderr at exit.
    #[arg(long)]
    pub stats: bool,

    /// The program to run, and its arguments.
    #[arg(required = true, trailing_var_arg = true, allow_hyphen_values = true, value_name = "ENTRYPOINT")]
    pub command: Vec<OsString>,
}

/// The agent's convention for boolean environment switches: exactly "true",
/// in any case.
pub fn env_flag(name: &str) -> bool {
    std::env::var(name).is_ok_and(|v| v.eq_ignore_ascii_case("true"))
}
