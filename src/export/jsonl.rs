//! Events as protojson objects (proto field names), one per line: the
//! `--events-file`, and `--debug`'s lines on stderr.

use std::io;

use tokio::io::{AsyncWrite, AsyncWriteExt, BufWriter, Stderr};

use crate::proto::Event;

/// What `--debug` puts before each event, as Datadog's tracer does.
const DEBUG_PREFIX: &[u8] = b"cws-instrumentation: sending message: ";

pub struct Writer<W> {
    out: W,
    /// Written before each object.
    prefix: &'static [u8],
    line: Vec<u8>,
}

/// `--events-file`.
pub fn file(file: std::fs::File) -> Writer<BufWriter<tokio::fs::File>> {
    Writer { out: BufWriter::new(tokio::fs::File::from_std(file)), prefix: b"", line: Vec::new() }
}

/// `--debug`: unbuffered, one write per line, as stderr is the workload's
/// too and a line must not be cut by its output.
pub fn debug() -> Writer<Stderr> {
    Writer { out: tokio::io::stderr(), prefix: DEBUG_PREFIX, line: Vec::new() }
}

impl<W: AsyncWrite + Unpin> Writer<W> {
    pub async fn write(&mut self, batch: &[Event]) -> io::Result<()> {
        for event in batch {
            self.line.clear();
            self.line.extend_from_slice(self.prefix);
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
