//! Exporters: where events go once the tracer has decoded them.
//!
//! The tracer thread hands events to a bounded queue with `try_send` and
//! never waits: when the queue is full the event is dropped and counted.
//! A tokio runtime on its own thread drains the queue and writes each batch
//! to every configured sink.

pub mod grpc;
mod jsonl;
mod verbose;

use std::io;
use std::path::PathBuf;
use std::thread::JoinHandle;

use tokio::sync::{mpsc, oneshot};

use crate::proto::{Event, Goodbye};

/// Events the queue holds before the tracer starts dropping.
const QUEUE_CAPACITY: usize = 16 * 1024;
/// Events taken from the queue at once.
const BATCH: usize = 512;

/// The tracer's end of the queue.
pub struct EventSink {
    tx: Option<mpsc::Sender<Event>>,
    pub emitted: u64,
    pub dropped: u64,
}

impl EventSink {
    /// A sink that counts events and sends them nowhere (no exporter).
    pub fn discard() -> Self {
        EventSink { tx: None, emitted: 0, dropped: 0 }
    }

    pub fn emit(&mut self, event: Event) {
        let Some(tx) = &self.tx else {
            self.emitted += 1;
            return;
        };
        match tx.try_send(event) {
            Ok(()) => self.emitted += 1,
            Err(mpsc::error::TrySendError::Full(_)) => self.dropped += 1,
            // The exporters are gone (they failed and said why); keep tracing.
            Err(mpsc::error::TrySendError::Closed(_)) => self.dropped += 1,
        }
    }
}

/// Where events should go.
#[derive(Default)]
pub struct Outputs {
    pub verbose: bool,
    pub events_file: Option<PathBuf>,
    pub agent: Option<grpc::Options>,
}

enum Sink {
    Verbose(verbose::Printer),
    JsonLines(jsonl::Writer),
    Agent(grpc::Exporter),
}

impl Sink {
    async fn write(&mut self, batch: &[Event]) -> io::Result<()> {
        match self {
            Sink::Verbose(printer) => printer.write(batch).await,
            Sink::JsonLines(writer) => writer.write(batch).await,
            Sink::Agent(exporter) => {
                exporter.write(batch);
                Ok(())
            }
        }
    }

    async fn flush(&mut self) -> io::Result<()> {
        match self {
            Sink::Verbose(printer) => printer.flush().await,
            Sink::JsonLines(writer) => writer.flush().await,
            Sink::Agent(_) => Ok(()),
        }
    }
}

/// Running exporters; `finish` waits until every queued event is written
/// (and, for the agent, acknowledged or given up on).
pub struct Exporters {
    thread: JoinHandle<io::Result<grpc::Delivery>>,
    goodbye: oneshot::Sender<Goodbye>,
    /// Fires once the agent stream is up (never without an agent).
    pub connected: std::sync::mpsc::Receiver<()>,
}

impl Exporters {
    /// Opens every output (so that a bad path fails before the workload
    /// starts) and starts draining the queue. Returns the tracer's sink.
    pub fn start(outputs: Outputs) -> io::Result<(EventSink, Option<Exporters>)> {
        let mut sinks = Vec::new();
        if let Some(path) = &outputs.events_file {
            let file = std::fs::File::create(path)
                .map_err(|e| io::Error::new(e.kind(), format!("cannot create events file {}: {e}", path.display())))?;
            sinks.push(Sink::JsonLines(jsonl::Writer::new(file)));
        }
        if outputs.verbose {
            sinks.push(Sink::Verbose(verbose::Printer::new()));
        }
        if sinks.is_empty() && outputs.agent.is_none() {
            return Ok((EventSink::discard(), None));
        }
        let (tx, rx) = mpsc::channel(QUEUE_CAPACITY);
        let (goodbye, goodbye_rx) = oneshot::channel();
        let (connected_tx, connected) = std::sync::mpsc::channel();
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        let agent = outputs.agent;
        let thread = std::thread::Builder::new().name("cws-export".into()).spawn(move || {
            let result = runtime.block_on(async move {
                if let Some(options) = agent {
                    sinks.push(Sink::Agent(grpc::Exporter::start(options, connected_tx)));
                }
                drain(rx, sinks, goodbye_rx).await
            });
            // A name lookup stuck in a blocking thread must not delay exit.
            runtime.shutdown_background();
            result
        })?;
        let exporters = Exporters { thread, goodbye, connected };
        Ok((EventSink { tx: Some(tx), emitted: 0, dropped: 0 }, Some(exporters)))
    }

    /// Call after the tracer dropped its sink: the queue then ends. The
    /// Goodbye tells the agent how the workload ended.
    pub fn finish(self, goodbye: Goodbye) -> io::Result<grpc::Delivery> {
        let _ = self.goodbye.send(goodbye);
        self.thread.join().unwrap_or_else(|_| Err(io::Error::other("exporter thread panicked")))
    }
}

async fn drain(
    mut rx: mpsc::Receiver<Event>,
    mut sinks: Vec<Sink>,
    goodbye: oneshot::Receiver<Goodbye>,
) -> io::Result<grpc::Delivery> {
    let mut batch = Vec::with_capacity(BATCH);
    while rx.recv_many(&mut batch, BATCH).await > 0 {
        for sink in &mut sinks {
            sink.write(&batch).await?;
        }
        batch.clear();
        // Idle: make what was written visible now rather than at exit.
        if rx.is_empty() {
            for sink in &mut sinks {
                sink.flush().await?;
            }
        }
    }
    let mut delivery = grpc::Delivery::default();
    let goodbye = goodbye.await.unwrap_or_default();
    for sink in sinks {
        match sink {
            Sink::Agent(exporter) => delivery = exporter.finish(goodbye).await,
            mut other => other.flush().await?,
        }
    }
    Ok(delivery)
}
