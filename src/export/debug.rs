//! `--debug`: every event as JSON on stderr, as Datadog's `--debug` prints
//! every message ("sending message: {...}"). The JSON is the events file's.

use std::io;

use tokio::io::AsyncWriteExt;

use crate::proto::Event;

pub struct Printer {
    out: tokio::io::Stderr,
    line: Vec<u8>,
}

impl Printer {
    pub fn new() -> Self {
        Printer { out: tokio::io::stderr(), line: Vec::new() }
    }

    /// One write per line: stderr is the workload's too, and a line must
    /// not be cut by its output.
    pub async fn write(&mut self, batch: &[Event]) -> io::Result<()> {
        for event in batch {
            self.line.clear();
            self.line.extend_from_slice(b"cws-instrumentation: sending message: ");
            serde_json::to_writer(&mut self.line, event)?;
            self.line.push(b'\n');
            self.out.write_all(&self.line).await?;
        }
        Ok(())
    }

    pub async fn flush(&mut self) -> io::Result<()> {
        self.out.flush().await
    }
}
