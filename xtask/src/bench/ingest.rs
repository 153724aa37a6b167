//! How fast `serve` ingests: the `ingest_load` example replays the events of
//! a real traced build over 1 and then 4 concurrent streams to a `serve`
//! writing a real file, and reports events per second and the mean size of
//! an encoded event. The file is then counted: every event must be there
//! exactly once, or the measurement is void.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use super::{bare, Agent};

/// What an ECS Fargate container's entrypoint typically finds in its
/// environment, so that exec events in the corpus are of realistic size.
const FARGATE_ENV: &[(&str, &str)] = &[
    ("HOSTNAME", "ip-10-0-1-23.ec2.internal"),
    ("HOME", "/root"),
    ("AWS_EXECUTION_ENV", "AWS_ECS_FARGATE"),
    ("AWS_REGION", "us-east-1"),
    ("AWS_DEFAULT_REGION", "us-east-1"),
    ("AWS_CONTAINER_CREDENTIALS_RELATIVE_URI", "/v2/credentials/0c5d1c8f-3a4b-4f6e-9e7d-2b1a0c9d8e7f"),
    ("ECS_CONTAINER_METADATA_URI", "http://169.254.170.2/v3/8f2e3c1a9b7d4e6f-3456789012"),
    ("ECS_CONTAINER_METADATA_URI_V4", "http://169.254.170.2/v4/8f2e3c1a9b7d4e6f-3456789012"),
    ("ECS_AGENT_URI", "http://169.254.170.2/api/8f2e3c1a9b7d4e6f-3456789012"),
    ("DD_SERVICE", "web"),
    ("DD_ENV", "production"),
    ("DD_VERSION", "1.4.2"),
];

/// One load: `streams` sessions, `events` in all.
pub struct Load {
    pub streams: usize,
    pub events: u64,
    pub events_per_second: f64,
    pub mean_event_bytes: f64,
    /// The generator's whole report (per-kind sizes too).
    pub report: serde_json::Value,
}

fn generator() -> Result<PathBuf, String> {
    crate::build("ingest_load", &["--release", "--locked", "--example", "ingest_load"], &[])
}

/// The events of one traced build of the W5 project.
fn corpus(tracer: &str, dir: &Path, project: &Path) -> Result<PathBuf, String> {
    let corpus = dir.join("corpus.jsonl");
    let mut command = Command::new(tracer);
    bare(&mut command)
        .envs(FARGATE_ENV.iter().copied())
        .args(["trace", "--probe-addr", "", "--events-file"])
        .arg(&corpus)
        .args(["--", "make", "-s", "-B", "-j2", "-C"])
        .arg(project)
        .stdout(Stdio::null());
    crate::run(&mut command)?;
    Ok(corpus)
}

fn load(generator: &Path, agent: &str, corpus: &Path, streams: usize, events: u64) -> Result<Load, String> {
    let output = Command::new(generator)
        .arg(agent)
        .arg(corpus)
        .args([streams.to_string(), events.to_string()])
        .output()
        .map_err(|e| format!("cannot run {}: {e}", generator.display()))?;
    if !output.status.success() {
        return Err(format!("ingest_load failed: {}", String::from_utf8_lossy(&output.stderr).trim()));
    }
    let report: serde_json::Value =
        serde_json::from_slice(&output.stdout).map_err(|e| format!("ingest_load printed no JSON: {e}"))?;
    let number = |name: &str| report[name].as_f64().ok_or_else(|| format!("ingest_load reported no {name}"));
    Ok(Load {
        streams,
        events: number("events")? as u64,
        events_per_second: number("events_per_second")?,
        mean_event_bytes: number("mean_event_bytes")?,
        report,
    })
}

pub fn measure(tracer: &str, dir: &Path, project: &Path, events: u64) -> Result<Vec<Load>, String> {
    let generator = generator()?;
    let corpus = corpus(tracer, dir, project)?;
    let output = dir.join("ingest.jsonl");
    let _ = std::fs::remove_file(&output);
    let agent = Agent::start(tracer, &output)?;
    let mut loads = Vec::new();
    for streams in [1, 4] {
        let load = load(&generator, &agent.address, &corpus, streams, events)?;
        println!(
            "ingest {streams} stream(s): {:.0} events/s, mean event {:.1} bytes",
            load.events_per_second, load.mean_event_bytes
        );
        loads.push(load);
    }
    agent.stop()?;
    let file = std::fs::File::open(&output).map_err(|e| format!("{}: {e}", output.display()))?;
    let written = BufReader::new(file).split(b'\n').count() as u64;
    let sent: u64 = loads.iter().map(|l| l.events).sum();
    std::fs::remove_file(&output).map_err(|e| e.to_string())?;
    if written != sent {
        return Err(format!("serve wrote {written} events of the {sent} acknowledged"));
    }
    Ok(loads)
}
