//! Exporters: where events go once the tracer has decoded them.
//!
//! The tracer thread hands events to a bounded queue with `try_send` and
//! never waits: when the queue is full (in events or in bytes) the event is
//! dropped and counted.
//! A tokio runtime on its own thread drains the queue and writes each batch
//! to every configured sink.

pub mod grpc;
mod jsonl;
mod verbose;

use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::RecvTimeoutError;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};

use crate::proto::{Event, Goodbye};

/// Events the queue holds before the tracer starts dropping, and the memory
/// they may take: one exec event can hold 250 KiB of arguments and
/// environment, so a count alone would not bound memory. With the agent
/// buffer's own byte bound, this keeps the tracer under about 64 MiB.
const QUEUE_CAPACITY: usize = 16 * 1024;
const QUEUE_BYTES: usize = 16 << 20;

/// How long an idle exporter lets events gather before it wakes for them.
/// Under load it never sleeps; the queue holds far more than this many
/// milliseconds of events.
const GATHER: Duration = Duration::from_millis(10);

/// About the memory an event holds: the struct, and for its strings twice
/// their encoded size (allocation headers and slack, vectors of strings).
pub fn footprint(event: &Event) -> usize {
    footprint_of_encoded(prost::Message::encoded_len(event))
}

/// [`footprint`] of an event whose encoded length is known.
pub fn footprint_of_encoded(encoded_len: usize) -> usize {
    std::mem::size_of::<Event>() + 2 * encoded_len
}
/// Events taken from the queue at once.
const BATCH: usize = 512;

/// The tracer's end of the queue.
pub struct EventSink {
    tx: Option<mpsc::Sender<Event>>,
    /// Footprint of the events in the queue, shared with the drain.
    queued_bytes: Arc<AtomicUsize>,
    pub emitted: u64,
    pub dropped: u64,
}

impl EventSink {
    /// A sink that counts events and sends them nowhere (no exporter).
    pub fn discard() -> Self {
        EventSink { tx: None, queued_bytes: Arc::default(), emitted: 0, dropped: 0 }
    }

    pub fn emit(&mut self, event: Event) {
        let Some(tx) = &self.tx else {
            self.emitted += 1;
            return;
        };
        let size = footprint(&event);
        // Added before sending, so the drain never subtracts more than was added.
        if self.queued_bytes.fetch_add(size, Ordering::Relaxed) + size > QUEUE_BYTES {
            self.queued_bytes.fetch_sub(size, Ordering::Relaxed);
            self.dropped += 1;
            return;
        }
        match tx.try_send(event) {
            Ok(()) => self.emitted += 1,
            // Full, or the exporters are gone (they failed and said why): keep tracing.
            Err(_) => {
                self.queued_bytes.fetch_sub(size, Ordering::Relaxed);
                self.dropped += 1;
            }
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
    pub fn start(outputs: Outputs) -> io::Result<(EventSink, Option<Exporters>)> {
        let mut sinks = Vec::new();
        if let Some(path) = &outputs.events_file {
            // Exec events carry environment variables: for the owner only.
            let file =
                std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(path).map_err(
                    |e| io::Error::new(e.kind(), format!("cannot create events file {}: {e}", path.display())),
                )?;
            sinks.push(Sink::JsonLines(jsonl::Writer::new(file)));
        }
        if outputs.verbose {
            sinks.push(Sink::Verbose(verbose::Printer::new()));
        }
        if sinks.is_empty() && outputs.agent.is_none() {
            return Ok((EventSink::discard(), None));
        }
        let (tx, rx) = mpsc::channel(QUEUE_CAPACITY);
        let queued_bytes = Arc::<AtomicUsize>::default();
        let drained_bytes = Arc::clone(&queued_bytes);
        let (goodbye, goodbye_rx) = oneshot::channel();
        let (connected_tx, connected) = std::sync::mpsc::channel();
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        let agent = outputs.agent;
        let join_limit = agent.as_ref().map(|agent| agent.flush_timeout + JOIN_GRACE);
        let (done_tx, done) = std::sync::mpsc::channel();
        std::thread::Builder::new().name("cws-export".into()).spawn(move || {
            let result = runtime.block_on(async move {
                if let Some(options) = agent {
                    sinks.push(Sink::Agent(grpc::Exporter::start(options, connected_tx)));
                }
                drain(rx, &drained_bytes, sinks, goodbye_rx).await
            });
            // A name lookup stuck in a blocking thread must not delay exit.
            runtime.shutdown_background();
            let _ = done_tx.send(result);
        })?;
        let exporters = Exporters { done, join_limit, goodbye, connected };
        Ok((EventSink { tx: Some(tx), queued_bytes, emitted: 0, dropped: 0 }, Some(exporters)))
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

async fn drain(
    mut rx: mpsc::Receiver<Event>,
    queued_bytes: &AtomicUsize,
    mut sinks: Vec<Sink>,
    mut goodbye: oneshot::Receiver<Goodbye>,
) -> io::Result<grpc::Delivery> {
    let mut batch = Vec::with_capacity(BATCH);
    // Set once the tracer is done: the Goodbye comes after its last event.
    let mut ended: Option<Goodbye> = None;
    while rx.recv_many(&mut batch, BATCH).await > 0 {
        for sink in &mut sinks {
            sink.write(&batch).await?;
        }
        // Only now is the batch's memory free for the tracer to queue more.
        queued_bytes.fetch_sub(batch.iter().map(footprint).sum(), Ordering::Relaxed);
        batch.clear();
        // Idle: make what was written visible now rather than at exit, then
        // let events gather for a moment. Waking for every event would
        // cost the workload a thread switch per event on a small machine.
        if rx.is_empty() {
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
    let mut delivery = grpc::Delivery::default();
    let goodbye = match ended {
        Some(goodbye) => goodbye,
        None => goodbye.await.unwrap_or_default(),
    };
    for sink in sinks {
        match sink {
            Sink::Agent(exporter) => delivery = exporter.finish(goodbye).await,
            mut other => other.flush().await?,
        }
    }
    Ok(delivery)
}
