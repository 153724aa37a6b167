//! Exporters: where events go once the tracer has decoded them.
//!
//! A tokio runtime on its own thread drains the queue (`crate::queue`) and
//! writes each batch to every configured sink.

mod datadog;
pub mod grpc;
mod handoff;
mod jsonl;
mod probe;
mod retry;
mod tcp;
mod verbose;

use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;
use std::sync::mpsc::RecvTimeoutError;
use std::time::Duration;

use tokio::sync::oneshot;

use crate::cli::ProbeProtocol;
use crate::proto::{Event, Goodbye};
use crate::queue::{self, EventQueue, EventSink};

/// How long an idle exporter lets events gather before it wakes for them.
/// Under load it never sleeps; the queue holds far more than this many
/// milliseconds of events.
const GATHER: Duration = Duration::from_millis(10);

/// Events taken from the queue at once.
const DRAIN_EVENTS: usize = 512;

/// Where events should go.
#[derive(Default)]
pub struct Outputs {
    pub verbose: bool,
    /// `--debug`: every event as JSON on stderr.
    pub debug: bool,
    pub events_file: Option<PathBuf>,
    pub agent: Option<grpc::Options>,
    /// What the agent speaks (see `probe`).
    pub agent_protocol: ProbeProtocol,
}

enum Sink {
    Verbose(verbose::Printer),
    Debug(jsonl::Writer<tokio::io::Stderr>),
    JsonLines(jsonl::Writer<tokio::io::BufWriter<tokio::fs::File>>),
    Agent(grpc::Exporter),
    Datadog(datadog::Exporter),
    /// The protocol is recognised at the endpoint.
    Auto(probe::Auto),
}

impl Sink {
    async fn write(&mut self, batch: &[Event]) -> io::Result<()> {
        match self {
            Sink::Verbose(printer) => printer.write(batch).await,
            Sink::Debug(printer) => printer.write(batch).await,
            Sink::JsonLines(writer) => writer.write(batch).await,
            Sink::Agent(exporter) => {
                exporter.write(batch);
                Ok(())
            }
            Sink::Datadog(exporter) => {
                exporter.write(batch);
                Ok(())
            }
            Sink::Auto(exporter) => {
                exporter.write(batch);
                Ok(())
            }
        }
    }

    /// Announces `count` events the tracer dropped to an agent (the local
    /// sinks only count them, in `--stats`).
    fn lose(&mut self, count: u64) {
        if count == 0 {
            return;
        }
        match self {
            Sink::Agent(exporter) => exporter.lose(count),
            Sink::Datadog(exporter) => exporter.lose(count),
            Sink::Auto(exporter) => exporter.lose(count),
            Sink::Verbose(_) | Sink::Debug(_) | Sink::JsonLines(_) => {}
        }
    }

    async fn flush(&mut self) -> io::Result<()> {
        match self {
            Sink::Verbose(printer) => printer.flush().await,
            Sink::Debug(printer) => printer.flush().await,
            Sink::JsonLines(writer) => writer.flush().await,
            Sink::Agent(_) | Sink::Datadog(_) | Sink::Auto(_) => Ok(()),
        }
    }
}

/// How long `finish` waits for the exporters beyond the agent's flush
/// timeout: the local sinks' last writes.
const JOIN_GRACE: Duration = Duration::from_secs(5);

/// Running exporters; `finish` waits until every queued event is written
/// (and, for the agent, acknowledged or given up on).
pub struct Exporters {
    done: std::sync::mpsc::Receiver<io::Result<grpc::Delivery>>,
    /// With an agent, how long `finish` may wait: whatever the agent does,
    /// the tracer exits.
    join_limit: Option<Duration>,
    goodbye: oneshot::Sender<Goodbye>,
    /// Fires once the agent stream is up (never without an agent).
    pub connected: std::sync::mpsc::Receiver<()>,
}

impl Exporters {
    /// Opens every output (so that a bad path fails before the workload
    /// starts) and starts draining the queue. Returns the tracer's sink.
    /// An agent protocol that cannot be spoken at the address is an
    /// `InvalidInput` error.
    pub fn start(outputs: Outputs) -> io::Result<(EventSink, Option<Exporters>)> {
        let protocol = match &outputs.agent {
            Some(options) => probe::settle(outputs.agent_protocol, options)
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?,
            None => outputs.agent_protocol,
        };
        let mut sinks = Vec::new();
        if let Some(path) = &outputs.events_file {
            // Exec events carry environment variables: for the owner only.
            let file =
                std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(path).map_err(
                    |e| io::Error::new(e.kind(), format!("cannot create events file {}: {e}", path.display())),
                )?;
            sinks.push(Sink::JsonLines(jsonl::file(file)));
        }
        if outputs.verbose {
            sinks.push(Sink::Verbose(verbose::Printer::new()));
        }
        if outputs.debug {
            sinks.push(Sink::Debug(jsonl::debug()));
        }
        if sinks.is_empty() && outputs.agent.is_none() {
            return Ok((EventSink::discard(), None));
        }
        let (sink, queue) = queue::bounded();
        let (goodbye, goodbye_rx) = oneshot::channel();
        let (connected_tx, connected) = std::sync::mpsc::channel();
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        let agent = outputs.agent;
        let join_limit = agent.as_ref().map(|agent| agent.flush_timeout + JOIN_GRACE);
        let (done_tx, done) = std::sync::mpsc::channel();
        std::thread::Builder::new().name("cws-export".into()).spawn(move || {
            let result = runtime.block_on(async move {
                if let Some(options) = agent {
                    sinks.push(match protocol {
                        ProbeProtocol::Grpc => Sink::Agent(grpc::Exporter::start(options, connected_tx)),
                        ProbeProtocol::Datadog => Sink::Datadog(datadog::Exporter::start(options, None, connected_tx)),
                        ProbeProtocol::Auto => Sink::Auto(probe::Auto::start(options, connected_tx)),
                    });
                }
                drain(queue, sinks, goodbye_rx).await
            });
            // A name lookup stuck in a blocking thread must not delay exit.
            runtime.shutdown_background();
            let _ = done_tx.send(result);
        })?;
        let exporters = Exporters { done, join_limit, goodbye, connected };
        Ok((sink, Some(exporters)))
    }

    /// Call after the tracer dropped its sink: the queue then ends. The
    /// Goodbye tells the agent how the workload ended.
    pub fn finish(self, goodbye: Goodbye) -> io::Result<grpc::Delivery> {
        let _ = self.goodbye.send(goodbye);
        let result = match self.join_limit {
            Some(limit) => self.done.recv_timeout(limit).map_err(|e| match e {
                RecvTimeoutError::Timeout => format!("the exporters did not finish within {limit:?}"),
                RecvTimeoutError::Disconnected => "the exporter thread panicked".to_owned(),
            }),
            None => self.done.recv().map_err(|_| "the exporter thread panicked".to_owned()),
        };
        result.map_err(io::Error::other)?
    }
}

/// `kind N` pairs of `skipped`, joined: `exec 1, io_uring 2`.
pub fn skipped_kinds(skipped: &grpc::Skipped, between: &str, separator: &str) -> String {
    skipped.iter().map(|(kind, count)| format!("{kind}{between}{count}")).collect::<Vec<_>>().join(separator)
}

async fn drain(
    mut queue: EventQueue,
    mut sinks: Vec<Sink>,
    mut goodbye: oneshot::Receiver<Goodbye>,
) -> io::Result<grpc::Delivery> {
    let mut batch = Vec::with_capacity(DRAIN_EVENTS);
    // Set once the tracer is done: the Goodbye comes after its last event.
    let mut ended: Option<Goodbye> = None;
    while queue.recv_many(&mut batch, DRAIN_EVENTS).await > 0 {
        // The tracer's drops since the last batch take their numbers before it.
        let lost = queue.take_lost();
        for sink in &mut sinks {
            sink.lose(lost);
            sink.write(&batch).await?;
        }
        // Only now is the batch's memory free for the tracer to queue more.
        queue.release(&batch);
        batch.clear();
        // Idle: make what was written visible now rather than at exit, then
        // let events gather for a moment. Waking for every event would
        // cost the workload a thread switch per event on a small machine.
        if queue.is_empty() {
            for sink in &mut sinks {
                sink.flush().await?;
            }
            if ended.is_none() {
                tokio::select! {
                    _ = tokio::time::sleep(GATHER) => {}
                    // The workload is gone: what is left is queued already.
                    result = &mut goodbye => ended = Some(result.unwrap_or_default()),
                }
            }
        }
    }
    let lost = queue.take_lost();
    for sink in &mut sinks {
        sink.lose(lost);
    }
    let mut delivery = grpc::Delivery::default();
    let goodbye = match ended {
        Some(goodbye) => goodbye,
        None => goodbye.await.unwrap_or_default(),
    };
    for sink in sinks {
        match sink {
            Sink::Agent(exporter) => delivery = exporter.finish(goodbye).await,
            Sink::Datadog(exporter) => delivery = exporter.finish(goodbye).await,
            Sink::Auto(exporter) => delivery = exporter.finish(goodbye).await,
            mut other => other.flush().await?,
        }
    }
    Ok(delivery)
}
