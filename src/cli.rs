//! Command line: the subcommands and flags of `cws-instrumentation`.

use std::ffi::OsString;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

mod datadog;
pub use datadog::*;

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
    Trace(Box<TraceArgs>),
    /// Receive tracer streams, as the agent sidecar does, and write every
    /// event as one JSON line.
    Serve(ServeArgs),
    /// Copy this binary into DIR (a volume shared with the application
    /// container), as DIR/cws-instrumentation.
    Setup(SetupArgs),
    /// Print OK and exit 0 (a container health check).
    Health,
    /// Run COMMAND in place of this program (Datadog's session injection,
    /// which has nothing to do without eBPF).
    Inject(InjectArgs),
    /// Run COMMAND in place of this program, without the descriptors above 2
    /// that this program inherited.
    #[command(disable_help_flag = true)]
    Spawn(SpawnArgs),
}

#[derive(Args)]
pub struct SetupArgs {
    /// The shared volume's mount point.
    #[arg(long, value_name = "DIR")]
    pub cws_volume_mount: PathBuf,
}

#[derive(Args)]
pub struct ServeArgs {
    /// Address to listen on: host:port or unix:/path.
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:5678")]
    pub listen: String,

    /// Append events to PATH (default: stdout; a new file is created 0600).
    #[arg(long, value_name = "PATH")]
    pub output: Option<PathBuf>,

    /// Require this shared token of every tracer stream (default: from
    /// DD_CWS_INSTRUMENTATION_AUTH_TOKEN, else none).
    #[arg(long, value_name = "PATH")]
    pub auth_token_file: Option<PathBuf>,

    /// On a unix socket, take streams only from processes of these user ids
    /// (SO_PEERCRED); repeat or separate with commas.
    #[arg(long, value_name = "UID", value_delimiter = ',')]
    pub allow_uid: Vec<u32>,

    /// Serve TLS with this certificate chain (PEM); needs --tls-key.
    #[arg(long, value_name = "PATH")]
    pub tls_cert: Option<PathBuf>,

    /// The private key of --tls-cert (PEM).
    #[arg(long, value_name = "PATH")]
    pub tls_key: Option<PathBuf>,

    /// Require of every client a certificate from this authority (PEM).
    #[arg(long, value_name = "PATH")]
    pub tls_client_ca: Option<PathBuf>,
}

/// A duration as the command line writes it: "10s", "1.5s", "500ms".
pub fn format_duration(duration: Duration) -> String {
    if duration.subsec_millis() != 0 && duration < Duration::from_secs(1) {
        format!("{}ms", duration.as_millis())
    } else {
        format!("{}s", duration.as_secs_f64())
    }
}

/// A duration: "10s", "500ms", "2m", or plain seconds.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let (number, scale) = if let Some(ms) = text.strip_suffix("ms") {
        (ms, 0.001)
    } else if let Some(s) = text.strip_suffix('s') {
        (s, 1.0)
    } else if let Some(m) = text.strip_suffix('m') {
        (m, 60.0)
    } else {
        (text, 1.0)
    };
    number
        .parse::<f64>()
        .ok()
        .filter(|n| n.is_finite() && *n >= 0.0)
        .map(|n| Duration::from_secs_f64(n * scale))
        .ok_or_else(|| format!("{text:?} is not a duration (like 10s or 500ms)"))
}

#[derive(Args)]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
pub struct TraceArgs {
    #[command(subcommand)]
    pub subcommand: Option<TraceCommand>,

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

    /// Run the workload as this numeric user id (supplementary groups cleared; -1: unchanged).
    #[arg(long, value_name = "N", value_parser = parse_id, allow_hyphen_values = true)]
    pub uid: Option<Id>,

    /// Run the workload as this numeric group id (supplementary groups cleared; -1: unchanged).
    #[arg(long, value_name = "N", value_parser = parse_id, allow_hyphen_values = true)]
    pub gid: Option<Id>,

    /// Agent endpoint: host:port, http://host:port or unix:/path. Empty: offline.
    #[arg(long, value_name = "ADDR", default_value = "localhost:5678")]
    pub probe_addr: String,

    /// The agent's protocol: auto (recognise it at the endpoint), grpc, or
    /// datadog (the Datadog agent's eBPF-less protocol, TCP only).
    #[arg(long, value_name = "PROTOCOL", value_enum, default_value_t = ProbeProtocol::Auto,
          env = "DD_CWS_INSTRUMENTATION_PROBE_PROTOCOL")]
    pub probe_protocol: ProbeProtocol,

    /// Start the workload at once instead of waiting for the agent.
    #[arg(long = "async")]
    pub asynchronous: bool,

    /// How long the workload waits for the agent before starting anyway.
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = parse_duration)]
    pub connect_timeout: Duration,

    /// How long to wait at exit for the agent to acknowledge the last events.
    #[arg(long, value_name = "DURATION", default_value = "5s", value_parser = parse_duration)]
    pub flush_timeout: Duration,

    /// Present this shared token to the agent (default: from
    /// DD_CWS_INSTRUMENTATION_AUTH_TOKEN, which the workload does not inherit).
    #[arg(long, value_name = "PATH")]
    pub auth_token_file: Option<PathBuf>,

    /// Connect to the agent over TLS, its certificate checked against this
    /// authority (PEM). TCP only.
    #[arg(long, value_name = "PATH")]
    pub tls_ca: Option<PathBuf>,

    /// A client certificate (PEM) for an agent that requires one; needs --tls-key and --tls-ca.
    #[arg(long, value_name = "PATH")]
    pub tls_cert: Option<PathBuf>,

    /// The private key of --tls-cert (PEM).
    #[arg(long, value_name = "PATH")]
    pub tls_key: Option<PathBuf>,

    /// Events kept for the agent until acknowledged (and at most 32 MiB of
    /// them); beyond that, new events are dropped and the loss reported.
    #[arg(long, value_name = "N", default_value_t = 100_000)]
    pub buffer_events: usize,

    /// Print ptrace stop and event counters on stderr at exit.
    #[arg(long)]
    pub stats: bool,

    #[command(flatten)]
    pub datadog: DatadogTraceArgs,

    /// The program to run, and its arguments. Options of `trace` come
    /// before it (or before `--`); an unknown option is an error, not the
    /// entrypoint.
    #[arg(required_unless_present = "pids", trailing_var_arg = true, value_name = "ENTRYPOINT")]
    pub command: Vec<OsString>,
}

/// What `--probe-protocol` names.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
pub enum ProbeProtocol {
    #[default]
    Auto,
    Grpc,
    Datadog,
}

/// The agent's convention for boolean environment switches: exactly "true",
/// in any case.
pub fn env_flag(name: &str) -> bool {
    std::env::var(name).is_ok_and(|v| v.eq_ignore_ascii_case("true"))
}
