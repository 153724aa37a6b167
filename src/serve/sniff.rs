//! Which protocol a TCP client speaks, from its first bytes: gRPC (HTTP/2)
//! or the Datadog agent's eBPF-less protocol, so that one listener takes both.
//!
//! An HTTP/2 client opens with the 24-byte preface `PRI * HTTP/2.0...`; a
//! Datadog tracer with a 4-byte little-endian frame length, then msgpack.
//! No valid Datadog length starts like the preface (`PRI ` would be a
//! 541 MB frame, and the limit is 256 KiB), so the bytes part ways within the
//! first four, and a Datadog tracer never waits for the server before it
//! writes: reading until the bytes leave the preface, or until all 24 have
//! come, decides without waiting on anyone who has something to say.
//!
//! A client that says nothing is handed to HTTP/2 after [`SILENCE`]: an
//! HTTP/2 server speaks first (its SETTINGS frame), and a client may wait for
//! that (older versions of our tracer's `--probe-protocol auto` did, for
//! 500 ms, to tell a gRPC agent from a Datadog one, which never writes).
//! Datadog tracers write their Hello as soon as they are connected, and so
//! does `auto` now, which `serve` answers at once (`datadog`).
//!
//! The bytes read to decide are given back, in order, by [`Prefixed`].

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tonic::transport::server::{Connected, TcpConnectInfo};

/// The HTTP/2 client connection preface (RFC 9113, 3.4).
const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// How long a client may stay silent before the server speaks HTTP/2 first.
/// Well under the 500 ms an older tracer's silent `auto` probe waits for it.
pub const SILENCE: Duration = Duration::from_millis(100);

/// An empty SETTINGS frame: the least an HTTP/2 server may open with (RFC
/// 9113, 3.4), and what the tracer's `auto` probe takes for gRPC.
pub const SERVER_PREFACE: [u8; 9] = [0, 0, 0, 4, 0, 0, 0, 0, 0];

/// How long a client that started the preface may take to finish it.
pub const PREFACE_TIMEOUT: Duration = Duration::from_secs(10);

/// What a client turned out to be.
pub enum Sniffed {
    /// HTTP/2, or silent: for the gRPC server.
    Http2(Prefixed),
    /// Bytes that are not HTTP/2: for the Datadog reader, which decides
    /// whether they are frames.
    Datadog(Prefixed),
    /// Closed after these many bytes, all of them a start of the preface.
    Closed(usize),
}

/// Reads the client's first bytes and decides; Err for a client that
/// started the preface and then stalled, or a failed read.
pub async fn sniff(mut stream: TcpStream) -> Result<Sniffed, String> {
    let mut first = [0u8; PREFACE.len()];
    let mut got = 0;
    let started = Instant::now();
    loop {
        let deadline = if got == 0 { started + SILENCE } else { started + PREFACE_TIMEOUT };
        let read = tokio::time::timeout_at(deadline, stream.read(&mut first[got..])).await;
        match read {
            Err(_) if got == 0 => return Ok(Sniffed::Http2(Prefixed::new(Vec::new(), stream))),
            Err(_) => {
                return Err(format!("sent {got} bytes of an HTTP/2 preface, then nothing for {PREFACE_TIMEOUT:?}"))
            }
            Ok(Err(error)) => return Err(error.to_string()),
            Ok(Ok(0)) => return Ok(Sniffed::Closed(got)),
            Ok(Ok(n)) => got += n,
        }
        let prefix = first[..got].to_vec();
        if prefix[..] != PREFACE[..got] {
            return Ok(Sniffed::Datadog(Prefixed::new(prefix, stream)));
        }
        if got == PREFACE.len() {
            return Ok(Sniffed::Http2(Prefixed::new(prefix, stream)));
        }
    }
}

/// A connection whose first bytes were already read: they are read again
/// first.
pub struct Prefixed {
    prefix: Vec<u8>,
    /// How much of `prefix` was read again.
    consumed: usize,
    stream: TcpStream,
}

impl Prefixed {
    fn new(prefix: Vec<u8>, stream: TcpStream) -> Prefixed {
        Prefixed { prefix, consumed: 0, stream }
    }
}

impl AsyncRead for Prefixed {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.consumed < this.prefix.len() {
            let rest = &this.prefix[this.consumed..];
            let n = rest.len().min(buf.remaining());
            buf.put_slice(&rest[..n]);
            this.consumed += n;
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for Prefixed {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

/// The peer's address reaches the gRPC service as with a plain TcpStream.
impl Connected for Prefixed {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> TcpConnectInfo {
        self.stream.connect_info()
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::AsyncWriteExt;

    use super::*;

    async fn pair() -> (TcpStream, TcpStream) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
        (client, listener.accept().await.unwrap().0)
    }

    async fn read_all(mut prefixed: Prefixed) -> Vec<u8> {
        let mut all = Vec::new();
        prefixed.read_to_end(&mut all).await.unwrap();
        all
    }

    #[tokio::test]
    async fn a_preface_is_http2_and_is_read_again_whole() {
        let (mut client, server) = pair().await;
        // In pieces, as a slow client might send it.
        client.write_all(&PREFACE[..3]).await.unwrap();
        let sniffing = tokio::spawn(sniff(server));
        client.write_all(&PREFACE[3..]).await.unwrap();
        client.write_all(b"next").await.unwrap();
        drop(client);
        let Ok(Ok(Sniffed::Http2(prefixed))) = sniffing.await else { panic!("not HTTP/2") };
        assert_eq!(read_all(prefixed).await, [&PREFACE[..], b"next"].concat());
    }

    #[tokio::test]
    async fn a_short_datadog_frame_is_decided_on_its_first_bytes_without_waiting_for_more() {
        let (mut client, server) = pair().await;
        // A 1-byte body: 5 bytes in all, and the client waits for nothing.
        client.write_all(&[1, 0, 0, 0, 0xc0]).await.unwrap();
        let Ok(Sniffed::Datadog(prefixed)) = sniff(server).await else { panic!("not Datadog") };
        drop(client);
        assert_eq!(read_all(prefixed).await, [1, 0, 0, 0, 0xc0]);
    }

    #[tokio::test]
    async fn a_silent_client_is_given_to_http2_and_a_closed_one_is_said_closed() {
        let (_client, server) = pair().await;
        assert!(matches!(sniff(server).await, Ok(Sniffed::Http2(_))));
        let (mut client, server) = pair().await;
        client.write_all(b"PRI").await.unwrap();
        drop(client);
        assert!(matches!(sniff(server).await, Ok(Sniffed::Closed(3))));
    }
}
