//! `--events-file`: one protojson object per line, proto field names.

use std::io;

use tokio::io::{AsyncWriteExt, BufWriter};

use crate::proto::Event;

pub struct Writer {
    out: BufWriter<tokio::fs::File>,
    line: Vec<u8>,
}

impl Writer {
    pub fn new(file: std::fs::File) -> Self {
        Writer { out: BufWriter::new(tokio::fs::File::from_std(file)), line: Vec::new() }
    }

    pub async fn write(&mut self, batch: &[Event]) -> io::Result<()> {
        for event in batch {
            self.line.clear();
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
