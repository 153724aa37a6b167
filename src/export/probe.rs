//! `--probe-protocol auto`: which agent is at the endpoint, gRPC or Datadog.
//!
//! An HTTP/2 server speaks first (its SETTINGS frame, right after accepting),
//! and a Datadog agent never writes anything. So the tracer connects, writes
//! the Datadog Hello, and waits [`FIRST_BYTES_WAIT`] for the server's first
//! bytes: an HTTP/2 SETTINGS frame means gRPC (the connection is closed, the
//! gRPC exporter makes its own); silence means Datadog, and the Datadog
//! exporter goes on after that Hello on the same connection.
//!
//! Why the Hello, and not silence: `serve` takes both protocols on one port
//! and can only tell them apart by what the client writes first; a silent
//! client gets HTTP/2 only after `serve` gave up waiting for it (100 ms). The
//! Hello is what a Datadog agent must get first anyway, so it sees exactly
//! the connection it would have seen (the envelope's extra key, saying that
//! the tracer also speaks gRPC, is skipped as every unknown key is: see
//! `datadog::msg::Message::Probe`), never a byte it could count as a broken
//! frame, while `serve` recognises the key and answers with HTTP/2 at once.
//! Any other gRPC server has sent its SETTINGS before it reads anything.
//!
//! Nobody there (refused, or a connection closed without a word, or bytes
//! that are not HTTP/2): try again after a backoff, and decide when someone
//! answers. Meanwhile events wait in a buffer bounded as the exporters' are.
//! The choice is said once on stderr and holds for the run.
//!
//! Unix sockets and TLS are gRPC only (a TLS server waits for the client's
//! first bytes: silence would say nothing).

use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::ReadHalf;
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::time::Instant;

use crate::address::Address;
use crate::cli::ProbeProtocol;
use crate::datadog::frame::frame;
use crate::datadog::msg::Message;
use crate::datadog::outbound;
use crate::ecs;
use crate::log::log;
use crate::proto::{Event, Goodbye};

use super::grpc::{self, Delivery, BUFFER_BYTES};
use super::retry::{flush_limit, pause, Backoff, Repeated};
use super::{datadog, grpc::Exporter as GrpcExporter};

/// How long a connection's silence takes to mean a Datadog agent. An HTTP/2
/// server writes its SETTINGS as it accepts, within milliseconds on loopback.
pub const FIRST_BYTES_WAIT: Duration = Duration::from_millis(500);

/// The length of an HTTP/2 frame header.
const FRAME_HEADER: usize = 9;

/// The protocol to speak, once what needs no probe is settled: `Auto` stays
/// only for a plain TCP endpoint. Err for a Datadog agent asked of an
/// endpoint it cannot be at.
pub fn settle(asked: ProbeProtocol, options: &grpc::Options) -> Result<ProbeProtocol, String> {
    let tcp = matches!(options.address, Address::Tcp(_));
    let tls = options.credentials.tls.is_some();
    match asked {
        ProbeProtocol::Datadog if !tcp => Err("--probe-protocol datadog needs a TCP address (host:port)".into()),
        ProbeProtocol::Datadog if tls => Err("--probe-protocol datadog cannot use TLS (the agent has none)".into()),
        ProbeProtocol::Auto if !tcp || tls => Ok(ProbeProtocol::Grpc),
        other => Ok(other),
    }
}

/// What answered at the endpoint.
enum Peer {
    Grpc,
    /// Silent: a Datadog agent; the connection, its Hello written, is kept
    /// for it.
    Datadog(TcpStream),
}

/// Does `header` open an HTTP/2 connection as a server does: a SETTINGS
/// frame (type 4), not an ack (flags 0), on stream 0, of whole settings?
fn opens_http2(header: &[u8; FRAME_HEADER]) -> bool {
    let length = u32::from_be_bytes([0, header[0], header[1], header[2]]);
    let stream = u32::from_be_bytes([header[5], header[6], header[7], header[8]]) & 0x7fff_ffff;
    header[3] == 4 && header[4] == 0 && stream == 0 && length.is_multiple_of(6)
}

/// One attempt: connect, write the Hello (`hello`, a whole frame), listen.
async fn recognise(hostport: &str, hello: &[u8]) -> Result<Peer, String> {
    let mut stream = super::tcp::connect_ipv4_first(hostport).await?;
    let deadline = Instant::now() + FIRST_BYTES_WAIT;
    // Written while listening: a gRPC server closes on a Hello it cannot
    // read, maybe before taking all of it (a long entrypoint), and the write
    // fails; what it said first still says what it is.
    let (heard, written) = {
        let (mut reader, mut writer) = stream.split();
        tokio::join!(first_bytes(&mut reader, deadline), tokio::time::timeout_at(deadline, writer.write_all(hello)))
    };
    match (heard?, written) {
        (Some(header), _) if opens_http2(&header) => Ok(Peer::Grpc),
        (Some(_), _) => Err("it answered, but not in HTTP/2 (neither a gRPC nor a Datadog agent)".into()),
        (None, Ok(Ok(()))) => Ok(Peer::Datadog(stream)),
        (None, Ok(Err(error))) => Err(error.to_string()),
        (None, Err(_)) => Err(format!("it did not take the Hello within {} ms", FIRST_BYTES_WAIT.as_millis())),
    }
}

/// The server's first frame header, or None when it said nothing by
/// `deadline`.
async fn first_bytes(reader: &mut ReadHalf<'_>, deadline: Instant) -> Result<Option<[u8; FRAME_HEADER]>, String> {
    let mut header = [0u8; FRAME_HEADER];
    let mut got = 0;
    while got < FRAME_HEADER {
        match tokio::time::timeout_at(deadline, reader.read(&mut header[got..])).await {
            Err(_) if got == 0 => return Ok(None),
            Err(_) => return Err(format!("it wrote {got} bytes that do not open HTTP/2, then nothing")),
            Ok(Ok(0)) if got == 0 => return Err("it closed the connection without a word".into()),
            Ok(Ok(0)) => return Err(format!("it wrote {got} bytes that do not open HTTP/2, then closed")),
            Ok(Ok(n)) => got += n,
            Ok(Err(error)) => return Err(error.to_string()),
        }
    }
    Ok(Some(header))
}

/// Where events go while the protocol is unknown, and then.
enum State {
    /// `gaps`: (index in `events`, count) of the tracer's drops before that
    /// event; `dropped`: every event from the first the buffer could not keep.
    Pending {
        events: Vec<Event>,
        bytes: usize,
        gaps: Vec<(usize, u64)>,
        dropped: u64,
    },
    Grpc(GrpcExporter),
    Datadog(datadog::Exporter),
    Finished,
}

/// The agent sink of `--probe-protocol auto` on a TCP endpoint.
pub struct Auto {
    state: Arc<Mutex<State>>,
    address: Address,
    capacity: usize,
    goodbye: watch::Sender<Option<Goodbye>>,
    /// When the workload ended: an exporter chosen after that has only what
    /// is left of the flush timeout.
    ended_at: Arc<OnceLock<Instant>>,
    task: tokio::task::JoinHandle<()>,
}

impl Auto {
    pub fn start(options: grpc::Options, connected: std::sync::mpsc::Sender<()>) -> Auto {
        let state = Arc::new(Mutex::new(State::Pending { events: Vec::new(), bytes: 0, gaps: Vec::new(), dropped: 0 }));
        let (goodbye, goodbye_rx) = watch::channel(None);
        let ended_at = Arc::new(OnceLock::new());
        let (address, capacity) = (options.address.clone(), options.capacity);
        let task = tokio::spawn(decide(options, Arc::clone(&state), connected, goodbye_rx, Arc::clone(&ended_at)));
        Auto { state, address, capacity, goodbye, ended_at, task }
    }

    pub fn write(&self, batch: &[Event]) {
        match &mut *lock(&self.state) {
            State::Pending { events, bytes, dropped, .. } => {
                for event in batch {
                    let size = crate::queue::footprint(event);
                    // After a drop, everything drops: what is kept stays a prefix.
                    if *dropped == 0 && events.len() < self.capacity && *bytes + size <= BUFFER_BYTES {
                        *bytes += size;
                        events.push(event.clone());
                    } else {
                        *dropped += 1;
                    }
                }
            }
            State::Grpc(exporter) => exporter.write(batch),
            State::Datadog(exporter) => exporter.write(batch),
            State::Finished => {}
        }
    }

    /// Counts `count` events the tracer dropped, after those written so far.
    pub fn lose(&self, count: u64) {
        match &mut *lock(&self.state) {
            State::Pending { dropped, .. } if *dropped > 0 => *dropped += count,
            State::Pending { events, gaps, .. } => gaps.push((events.len(), count)),
            State::Grpc(exporter) => exporter.lose(count),
            State::Datadog(exporter) => exporter.lose(count),
            State::Finished => {}
        }
    }

    pub async fn finish(self, goodbye: Goodbye) -> Delivery {
        let _ = self.ended_at.set(Instant::now());
        let _ = self.goodbye.send(Some(goodbye));
        // Ends once decided, or when the flush limit gave up on deciding.
        let _ = self.task.await;
        let state = std::mem::replace(&mut *lock(&self.state), State::Finished);
        match state {
            State::Grpc(exporter) => exporter.finish(goodbye).await,
            State::Datadog(exporter) => exporter.finish(goodbye).await,
            State::Pending { events, gaps, dropped, .. } => {
                let dropped = dropped + gaps.iter().map(|(_, count)| count).sum::<u64>();
                let delivery = Delivery { undelivered: events.len() as u64, dropped, ..Delivery::default() };
                log!(
                    "{} events were not delivered: no agent answered at {}",
                    delivery.undelivered + delivery.dropped,
                    self.address
                );
                delivery
            }
            State::Finished => Delivery::default(),
        }
    }
}

fn lock(state: &Mutex<State>) -> std::sync::MutexGuard<'_, State> {
    state.lock().unwrap_or_else(|e| e.into_inner())
}

/// Probes until someone answers (or the flush limit passes after the
/// workload's end), then starts the exporter for what answered and hands it
/// the events kept meanwhile, in order.
async fn decide(
    mut options: grpc::Options,
    state: Arc<Mutex<State>>,
    connected: std::sync::mpsc::Sender<()>,
    goodbye: watch::Receiver<Option<Goodbye>>,
    ended_at: Arc<OnceLock<Instant>>,
) {
    let (abandon, flush_timeout) = (Arc::clone(&options.abandon), options.flush_timeout);
    let peer = tokio::select! {
        peer = probe_until_answered(&mut options, goodbye.clone()) => peer,
        _ = flush_limit(goodbye, flush_timeout, &abandon) => return,
    };
    if let Some(ended) = ended_at.get() {
        options.flush_timeout = options.flush_timeout.saturating_sub(ended.elapsed());
    }
    let how = format!("waited {} ms for its first bytes", FIRST_BYTES_WAIT.as_millis());
    let address = options.address.clone();
    let mut state = lock(&state);
    let State::Pending { events, gaps, dropped, .. } = std::mem::replace(&mut *state, State::Finished) else {
        return;
    };
    // The events kept meanwhile and the tracer's drops among them, in order.
    let hand_over = |write: &dyn Fn(&[Event]), lose: &dyn Fn(u64)| {
        let mut from = 0;
        for &(at, count) in &gaps {
            write(&events[from..at]);
            lose(count);
            from = at;
        }
        write(&events[from..]);
        lose(dropped);
    };
    *state = match peer {
        Peer::Grpc => {
            log!("the agent at {address} speaks gRPC (it opened with HTTP/2 SETTINGS); sending it gRPC");
            let exporter = GrpcExporter::start(options, connected);
            // Once full, the pending buffer dropped every later event: the
            // losses come after what it kept, and keep their numbers.
            hand_over(&|batch| exporter.write(batch), &|count| exporter.lose(count));
            State::Grpc(exporter)
        }
        Peer::Datadog(stream) => {
            log!("the agent at {address} is a Datadog agent ({how}: none came); sending it the Datadog protocol");
            let exporter = datadog::Exporter::start(options, Some(stream), connected);
            hand_over(&|batch| exporter.write(batch), &|count| exporter.lose(count));
            State::Datadog(exporter)
        }
    };
}

/// Probes until someone answers; the Hello it sends is the one a Datadog
/// agent keeps, so the ECS metadata is read first (once per run: the
/// exporter started then finds it read).
async fn probe_until_answered(options: &mut grpc::Options, mut goodbye: watch::Receiver<Option<Goodbye>>) -> Peer {
    ecs::add_fetched(&mut ecs::start_fetch(&options.hello), &mut options.hello).await;
    let address = &options.address;
    let hostport = address.to_string();
    let probe = frame(Message::Probe(outbound::hello(&options.hello)));
    let mut backoff = Backoff::new();
    let mut failures = Repeated::default();
    loop {
        let recognised = match &probe {
            Ok(hello) => recognise(&hostport, hello).await,
            // Over the agent's limit even with its arguments cut: no agent
            // could take it, and the Datadog exporter would say so as well.
            Err(too_large) => Err(too_large.to_string()),
        };
        match recognised {
            Ok(peer) => {
                failures.settle();
                return peer;
            }
            Err(error) => failures.record(format!("cannot reach the agent at {address}"), error, "; retrying"),
        }
        pause(&mut backoff, &mut goodbye).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_server_settings_frame_opens_http2_and_nothing_else_does() {
        // h2's server preface: SETTINGS with three settings (18 bytes).
        assert!(opens_http2(&[0, 0, 18, 4, 0, 0, 0, 0, 0]));
        assert!(opens_http2(&[0, 0, 0, 4, 0, 0, 0, 0, 0]));
        assert!(!opens_http2(&[0, 0, 0, 4, 1, 0, 0, 0, 0]), "a SETTINGS ack is not an opening");
        assert!(!opens_http2(&[0, 0, 18, 1, 4, 0, 0, 0, 1]), "HEADERS");
        assert!(!opens_http2(b"HTTP/1.1 "));
        assert!(!opens_http2(&[0, 0, 7, 4, 0, 0, 0, 0, 0]), "settings are 6 bytes each");
    }
}
