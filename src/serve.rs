//! `serve`: a reference agent sidecar. It accepts tracer streams, writes
//! every event as one JSON line (the `--events-file` object plus the
//! session, container and sequence of its stream), acknowledges what is
//! written, and drops what it has already written.
//!
//! Exactly once across restarts: each line carries (session_id, sequence);
//! at start the output file is read back to learn what each session already
//! delivered, so events a tracer resends after a sidecar crash are not
//! written twice. The single writer task decides what is new, so two
//! connections of one session cannot both write a batch. Acks are sent only
//! once a batch is written and flushed.
//!
//! A session does not wait for its batch to be written before it reads and
//! encodes the next: a per-session ack task waits for the writes in order.

use std::collections::HashMap;
use std::io::{self, BufRead};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::sync::{mpsc, oneshot, watch};
use tokio_stream::wrappers::{ReceiverStream, UnixListenerStream};
use tokio_stream::Stream;
use tonic::transport::server::TcpIncoming;
use tonic::{Request, Response, Status, Streaming};

use crate::address::Address;
use crate::log::log;
use crate::proto::event_service_server::{EventService, EventServiceServer};
use crate::proto::{agent_message, tracer_message, Ack, AgentMessage, TracerMessage};
use crate::ExitError;

/// A peer that has not said Hello by then is cut off.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// How long open connections may linger after SIGTERM/SIGINT.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);
/// Largest message accepted from a tracer.
const MAX_MESSAGE: usize = 4 << 20;

/// Lines of one batch to write, and who waits for them to be on disk.
struct Write {
    session: Arc<str>,
    /// Sequence number of the first line; the others follow.
    first: u64,
    /// Where each line ends in `lines`.
    ends: Vec<usize>,
    lines: Vec<u8>,
    done: oneshot::Sender<()>,
}

/// A batch's acknowledgement, sent once its write (if any) is done.
type PendingAck = (Option<oneshot::Receiver<()>>, u64);

/// Batches a session may have read but not yet seen written.
const PIPELINE: usize = 8;
/// Writes that share one flush.
const MAX_GROUP: usize = 64;

/// Highest sequence written, per session; updated by the writer only.
type Delivered = Arc<Mutex<HashMap<String, u64>>>;

struct Service {
    writer: mpsc::Sender<Write>,
    delivered: Delivered,
    shutdown: watch::Receiver<bool>,
}

type AgentStream = Pin<Box<dyn Stream<Item = Result<AgentMessage, Status>> + Send>>;

#[tonic::async_trait]
impl EventService for Service {
    type StreamEventsStream = AgentStream;

    async fn stream_events(&self, request: Request<Streaming<TracerMessage>>) -> Result<Response<AgentStream>, Status> {
        let peer = request.remote_addr().map_or_else(|| "a local peer".to_owned(), |a| a.to_string());
        let (acks, rx) = mpsc::channel(64);
        let session = Session {
            peer,
            writer: self.writer.clone(),
            delivered: Arc::clone(&self.delivered),
            shutdown: self.shutdown.clone(),
            acks,
        };
        tokio::spawn(session.run(request.into_inner()));
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

struct Session {
    peer: String,
    writer: mpsc::Sender<Write>,
    delivered: Delivered,
    shutdown: watch::Receiver<bool>,
    acks: mpsc::Sender<Result<AgentMessage, Status>>,
}

impl Session {
    async fn run(mut self, mut stream: Streaming<TracerMessage>) {
        let hello = match tokio::time::timeout(HELLO_TIMEOUT, stream.message()).await {
            Ok(Ok(Some(TracerMessage { message: Some(tracer_message::Message::Hello(hello)) }))) => hello,
            Ok(Err(status)) => return log!("{}: cut off before hello: {}", self.peer, status.message()),
            Ok(_) => return self.refuse("the first message must be a Hello").await,
            Err(_) => return self.refuse("no Hello within 10 s").await,
        };
        let container = hello.container.as_ref().map(|c| c.id.clone()).unwrap_or_default();
        // Which task this is, for whoever reads the log.
        let ecs = hello.container.as_ref().and_then(|c| c.ecs.as_ref()).map_or_else(String::new, |ecs| {
            format!(" ecs cluster {:?} task {:?} container {:?}", ecs.cluster, ecs.task_arn, ecs.container_name)
        });
        log!(
            "hello: session {} from {} container {:?} pid namespace {} entrypoint {:?}{ecs}",
            hello.session_id,
            self.peer,
            container,
            hello.pid_namespace,
            hello.entrypoint_args
        );
        let session: Arc<str> = Arc::from(hello.session_id.as_str());
        let head = line_head(&hello.session_id, &container);
        let (pending, pending_rx) = mpsc::channel(PIPELINE);
        tokio::spawn(acknowledge(session.clone(), pending_rx, self.acks.clone()));
        loop {
            let message = tokio::select! {
                message = stream.message() => message,
                _ = self.shutdown.changed() => return,
            };
            let message = match message {
                Ok(Some(TracerMessage { message: Some(message) })) => message,
                Ok(_) => return,
                Err(status) => {
                    log!("session {}: stream ended: {}", hello.session_id, status.message());
                    // Tell the peer why (a message over the size limit, say).
                    let _ = self.acks.send(Err(status)).await;
                    return;
                }
            };
            match message {
                tracer_message::Message::Batch(batch) => {
                    if let Err(e) = self.write_batch(&session, &head, batch, &pending).await {
                        return log!("session {}: {e}", hello.session_id);
                    }
                }
                tracer_message::Message::Loss(loss) => log!(
                    "session {}: the tracer dropped events {}..={}",
                    hello.session_id,
                    loss.first_sequence,
                    loss.last_sequence
                ),
                tracer_message::Message::Goodbye(goodbye) => {
                    let exit = goodbye.exit.unwrap_or_default();
                    let counters = goodbye.counters.unwrap_or_default();
                    log!(
                        "goodbye: session {} exit code {:?} signal {:?} events {} dropped {} ptrace stops {} reconnects {}",
                        hello.session_id,
                        exit.code,
                        exit.signal,
                        counters.events,
                        counters.dropped,
                        counters.ptrace_stops,
                        counters.reconnects
                    );
                }
                tracer_message::Message::Hello(_) => return self.refuse("a second Hello").await,
            }
        }
    }

    async fn refuse(&self, why: &str) {
        log!("{}: cut off: {why}", self.peer);
        let _ = self.acks.send(Err(Status::invalid_argument(why))).await;
    }

    /// Encodes the events not written before and queues them for the
    /// writer; the ack task acknowledges the batch once they are written.
    async fn write_batch(
        &self,
        session: &Arc<str>,
        head: &[u8],
        batch: crate::proto::EventBatch,
        pending: &mpsc::Sender<PendingAck>,
    ) -> Result<(), String> {
        let Some(count) = (batch.events.len() as u64).checked_sub(1) else { return Ok(()) };
        let last = batch.first_sequence.checked_add(count).ok_or("sequence numbers past 2^64")?;
        // Only to spare encoding what is known to be written; the writer decides.
        let seen = self.delivered.lock().unwrap_or_else(|e| e.into_inner()).get(&**session).copied();
        let (mut lines, mut ends, mut first) = (Vec::new(), Vec::new(), None);
        for (offset, event) in batch.events.iter().enumerate() {
            let sequence = batch.first_sequence + offset as u64;
            if seen.is_some_and(|s| sequence <= s) {
                continue;
            }
            first.get_or_insert(sequence);
            append_line(&mut lines, head, sequence, event)?;
            ends.push(lines.len());
        }
        let written = match first {
            Some(first) => {
                let (done, written) = oneshot::channel();
                let write = Write { session: Arc::clone(session), first, ends, lines, done };
                self.writer.send(write).await.map_err(|_| "output closed")?;
                Some(written)
            }
            None => None,
        };
        pending.send((written, last)).await.map_err(|_| "the tracer went away".to_owned())
    }
}

/// Acknowledges a session's batches in order, each once it is written.
async fn acknowledge(
    session: Arc<str>,
    mut pending: mpsc::Receiver<PendingAck>,
    acks: mpsc::Sender<Result<AgentMessage, Status>>,
) {
    while let Some((written, last)) = pending.recv().await {
        if let Some(written) = written {
            if written.await.is_err() {
                return log!("session {session}: output failed");
            }
        }
        let ack = AgentMessage { message: Some(agent_message::Message::Ack(Ack { sequence: Some(last) })) };
        if acks.send(Ok(ack)).await.is_err() {
            return;
        }
    }
}

/// `{"session_id":…,"container_id":…,"sequence":`, the start of every line
/// of a stream, escaped once rather than per event.
fn line_head(session: &str, container: &str) -> Vec<u8> {
    let quoted = |text: &str| serde_json::Value::from(text).to_string();
    format!("{{\"session_id\":{},\"container_id\":{},\"sequence\":", quoted(session), quoted(container)).into_bytes()
}

/// `HEAD N, …the event's fields…}\n`
fn append_line(out: &mut Vec<u8>, head: &[u8], sequence: u64, event: &crate::proto::Event) -> Result<(), String> {
    out.extend_from_slice(head);
    out.extend_from_slice(sequence.to_string().as_bytes());
    let start = out.len();
    serde_json::to_writer(&mut *out, event).map_err(|e| e.to_string())?;
    // The event's own object is spliced in: its `{` becomes the comma after
    // the sequence, or, for an empty object, the line's closing brace.
    if out.len() - start == 2 {
        out.truncate(start);
        out.push(b'}');
    } else {
        out[start] = b',';
    }
    out.push(b'\n');
    Ok(())
}

/// What each session already delivered, from an existing output file. A
/// line cut short by a crash is removed.
fn recover(path: &Path) -> io::Result<HashMap<String, u64>> {
    let mut delivered = HashMap::new();
    // Only a regular file holds earlier output (not /dev/null or a pipe).
    if !std::fs::metadata(path).is_ok_and(|m| m.is_file()) {
        return Ok(delivered);
    }
    let file = std::fs::OpenOptions::new().read(true).write(true).open(path)?;
    let mut complete = 0u64;
    let mut reader = io::BufReader::new(&file);
    let mut line = Vec::new();
    while reader.read_until(b'\n', &mut line)? > 0 {
        if line.last() != Some(&b'\n') {
            break;
        }
        complete += line.len() as u64;
        if let Ok(value) = serde_json::from_slice::<serde_json::Value>(&line) {
            if let (Some(session), Some(sequence)) = (value["session_id"].as_str(), value["sequence"].as_u64()) {
                let entry = delivered.entry(session.to_owned()).or_insert(sequence);
                *entry = (*entry).max(sequence);
            }
        }
        line.clear();
    }
    file.set_len(complete)?;
    Ok(delivered)
}

/// The single writer of the output, and the only one to decide what a
/// session already has. It ends when every session is gone, or when told
/// to: then it writes what is already queued and stops.
async fn write_output(
    mut out: Box<dyn tokio::io::AsyncWrite + Unpin + Send>,
    mut writes: mpsc::Receiver<Write>,
    mut finish: oneshot::Receiver<()>,
    delivered: Delivered,
) -> io::Result<()> {
    let mut finishing = false;
    let mut group = Vec::with_capacity(MAX_GROUP);
    loop {
        let write = if finishing {
            writes.recv().await
        } else {
            tokio::select! {
                write = writes.recv() => write,
                _ = &mut finish => {
                    // What is queued still comes out; nothing new goes in.
                    finishing = true;
                    writes.close();
                    continue;
                }
            }
        };
        let Some(write) = write else { break };
        group.push(write);
        // Whatever else is queued goes out under the same flush.
        while group.len() < MAX_GROUP {
            match writes.try_recv() {
                Ok(write) => group.push(write),
                Err(_) => break,
            }
        }
        for write in &group {
            let from = new_lines_start(&delivered, write);
            out.write_all(&write.lines[from..]).await?;
        }
        out.flush().await?;
        for write in group.drain(..) {
            let _ = write.done.send(());
        }
    }
    out.flush().await
}

/// Where the lines of `write` that its session has not written yet begin,
/// recording them as written.
fn new_lines_start(delivered: &Delivered, write: &Write) -> usize {
    let last = write.first + write.ends.len() as u64 - 1;
    let mut delivered = delivered.lock().unwrap_or_else(|e| e.into_inner());
    let seen = delivered.get(&*write.session).copied();
    let known =
        seen.map_or(0, |s| s.saturating_add(1).saturating_sub(write.first).min(write.ends.len() as u64) as usize);
    let entry = delivered.entry(write.session.to_string()).or_insert(last);
    *entry = (*entry).max(last);
    known.checked_sub(1).map_or(0, |i| write.ends[i])
}

enum Incoming {
    Tcp(TcpIncoming),
    Unix(UnixListenerStream),
}

pub struct ServeOptions {
    pub listen: Address,
    pub output: Option<PathBuf>,
}

pub fn run(options: ServeOptions) -> Result<i32, ExitError> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| ExitError::setup(format!("cannot start the runtime: {e}")))?;
    runtime.block_on(serve(options))
}

async fn serve(options: ServeOptions) -> Result<i32, ExitError> {
    let delivered = match &options.output {
        Some(path) => recover(path).map_err(|e| ExitError::usage(&format!("cannot read {}: {e}", path.display())))?,
        None => HashMap::new(),
    };
    let out: Box<dyn tokio::io::AsyncWrite + Unpin + Send> = match &options.output {
        Some(path) => {
            let file = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .map_err(|e| ExitError::usage(&format!("cannot open {}: {e}", path.display())))?;
            Box::new(tokio::fs::File::from_std(file))
        }
        None => Box::new(tokio::io::stdout()),
    };
    let incoming = match &options.listen {
        Address::Tcp(hostport) => {
            let listener = tokio::net::TcpListener::bind(hostport)
                .await
                .map_err(|e| ExitError::usage(&format!("cannot listen on {hostport}: {e}")))?;
            let local = listener.local_addr().map_err(|e| ExitError::setup(e.to_string()))?;
            log!("listening on {local}");
            // Acks are small writes: without NODELAY, Nagle holds one back
            // while the previous is unacknowledged, and a tracer waits 40 ms.
            Incoming::Tcp(TcpIncoming::from(listener).with_nodelay(Some(true)))
        }
        Address::Unix(path) => {
            // A socket left by a previous run would make bind fail.
            if std::fs::symlink_metadata(path).is_ok_and(|m| std::os::unix::fs::FileTypeExt::is_socket(&m.file_type()))
            {
                let _ = std::fs::remove_file(path);
            }
            let listener = tokio::net::UnixListener::bind(path)
                .map_err(|e| ExitError::usage(&format!("cannot listen on {}: {e}", path.display())))?;
            log!("listening on unix:{}", path.display());
            Incoming::Unix(UnixListenerStream::new(listener))
        }
    };
    let (writes_tx, writes) = mpsc::channel(256);
    let (finish, finish_rx) = oneshot::channel();
    let delivered: Delivered = Arc::new(Mutex::new(delivered));
    let writer = tokio::spawn(write_output(out, writes, finish_rx, Arc::clone(&delivered)));
    let (shutdown_tx, shutdown) = watch::channel(false);
    let shutdown_seen = shutdown.clone();
    let service = Service { writer: writes_tx, delivered, shutdown };
    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<EventServiceServer<Service>>().await;

    let stop = async move {
        let mut term =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("SIGTERM handler");
        let mut int =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt()).expect("SIGINT handler");
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        log!("stopping: no new streams; draining");
        let _ = shutdown_tx.send(true);
    };
    let server = EventServiceServer::new(service).max_decoding_message_size(MAX_MESSAGE);
    let router = tonic::transport::Server::builder().add_service(health_service).add_service(server);
    let serving = async {
        match incoming {
            Incoming::Tcp(incoming) => router.serve_with_incoming_shutdown(incoming, stop).await,
            Incoming::Unix(incoming) => router.serve_with_incoming_shutdown(incoming, stop).await,
        }
    };
    // Sessions end at once on shutdown, but a peer may keep its connection
    // open (an idle health checker, a tracer about to reconnect): after a
    // grace period those connections are simply dropped.
    let mut stopping = shutdown_seen;
    let grace = async move {
        let _ = stopping.changed().await;
        tokio::time::sleep(SHUTDOWN_GRACE).await;
    };
    tokio::select! {
        served = serving => served.map_err(|e| ExitError::setup(format!("server failed: {e}")))?,
        () = grace => log!("closing connections still open {SHUTDOWN_GRACE:?} after the stop signal"),
    }
    // Connections still open may hold the writer's queue: what is queued
    // is written, then the output ends.
    let _ = finish.send(());
    writer
        .await
        .map_err(|e| ExitError::setup(e.to_string()))?
        .map_err(|e| ExitError::setup(format!("writing events failed: {e}")))?;
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(session: &str, first: u64, lines: &[&str]) -> Write {
        let mut bytes = Vec::new();
        let mut ends = Vec::new();
        for line in lines {
            bytes.extend_from_slice(line.as_bytes());
            ends.push(bytes.len());
        }
        Write { session: Arc::from(session), first, ends, lines: bytes, done: oneshot::channel().0 }
    }

    #[test]
    fn the_writer_skips_what_another_connection_of_the_session_wrote() {
        let delivered = Delivered::default();
        let first = write("s", 0, &["0\n", "1\n", "2\n"]);
        assert_eq!(new_lines_start(&delivered, &first), 0);
        // A resend overlapping the first write by two lines.
        let resend = write("s", 1, &["1\n", "2\n", "3\n"]);
        assert_eq!(&resend.lines[new_lines_start(&delivered, &resend)..], b"3\n");
        let old = write("s", 0, &["0\n"]);
        assert_eq!(new_lines_start(&delivered, &old), old.lines.len(), "nothing left to write");
        let other = write("t", 2, &["2\n"]);
        assert_eq!(new_lines_start(&delivered, &other), 0, "sessions are apart");
        assert_eq!(delivered.lock().unwrap().get("s"), Some(&3));
    }
}
