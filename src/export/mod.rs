//! Exporters: where events go once the tracer has decoded them.
//!
//! The tracer thread hands events to a bounded queue with `try_send` and
//! never waits: when the queue is full the event is dropped and counted.
//! A tokio runtime on its own thread drains the queue and writes each batch
//! to every configured sink.

mod jsonl;
mod verbose;

use std::io;
use std::path::PathBuf;
use std::thread::JoinHandle;

use tokio::sync::mpsc;

use crate::proto::Event;

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
        let Some(tx) = &self.tx else { return };
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
}

enum Sink {
    Verbose(verbose::Printer),
    JsonLines(jsonl::Writer),
}

impl Sink {
    async fn write(&mut self, batch: &[Event]) -> io::Result<()> {
        match self {
            Sink::Verbose(printer) => printer.write(batch).await,
            Sink::JsonLines(writer) => writer.write(batch).await,
        }
    }

    async fn flush(&mut self) -> io::Result<()> {
        match self {
            Sink::Verbose(printer) => printer.flush().await,
            Sink::JsonLines(writer) => writer.flush().await,
        }
    }
}

/// Running exporters; `finish` waits until every queued event is written.
pub struct Exporters {
    thread: JoinHandle<io::Result<()>>,
}

impl Exporters {
    /// Opens every output (so that a bad path fails before the workload
    /// starts) and starts draining the queue. Returns the tracer's sink.
    pub fn start(outputs: &Outputs) -> io::Result<(EventSink, Option<Exporters>)> {
        let mut sinks = Vec::new();
        if let Some(path) = &outputs.events_file {
            let file = std::fs::File::create(path)
                .map_err(|e| io::Error::new(e.kind(), format!("cannot create events file {}: {e}", path.display())))?;
            sinks.push(Sink::JsonLines(jsonl::Writer::new(file)));
        }
        if outputs.verbose {
            sinks.push(Sink::Verbose(verbose::Printer::new()));
        }
        if sinks.is_empty() {
            return Ok((EventSink::discard(), None));
        }
        let (tx, rx) = mpsc::channel(QUEUE_CAPACITY);
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        let thread =
            std::thread::Builder::new().name("cws-export".into()).spawn(move || runtime.block_on(drain(rx, sinks)))?;
        Ok((EventSink { tx: Some(tx), emitted: 0, dropped: 0 }, Some(Exporters { thread })))
    }

    /// Call after the tracer dropped its sink: the queue then ends.
    pub fn finish(self) -> io::Result<()> {
        self.thread.join().unwrap_or_else(|_| Err(io::Error::other("exporter thread panicked")))
    }
}

async fn drain(mut rx: mpsc::Receiver<Event>, mut sinks: Vec<Sink>) -> io::Result<()> {
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
    for sink in &mut sinks {
        sink.flush().await?;
    }
    Ok(())
}
