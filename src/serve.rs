//! `serve`: a reference agent sidecar. It accepts tracer streams, writes
//! every event as one JSON line (the `--events-file` object plus the
//! session, container and sequence of its stream), acknowledges what is
//! written, and drops what it has already written.
//!
//! Exactly once across restarts: each line carries (session_id, sequence);
//! at start the output file is read back to learn exactly which sequences
//! each session already delivered, so events a tracer resends after a
//! sidecar crash are not written twice. The single writer task decides what
//! is new, so two connections of one session cannot both write a batch, and
//! it records a sequence as written only once its line is out: a batch that
//! comes out of order, or a forged one far ahead, takes nothing from the
//! others. Acks are sent only once a batch is written.
//!
//! A write that fails (a full disk) leaves no partial line: the file is cut
//! back to its last complete line, health turns NOT_SERVING, and the
//! batches waiting for that write are refused with UNAVAILABLE; the next
//! write that succeeds makes it SERVING again.
//!
//! A session does not wait for its batch to be written before it reads and
//! encodes the next: a per-session ack task waits for the writes in order.
//!
//! On plain TCP the listener also takes Datadog-protocol tracers: each
//! client goes where its first bytes say (`sniff`), HTTP/2 to the gRPC
//! server, anything else to a Datadog session (`datadog`), whose events are
//! written by the same writer in the same contract.

mod datadog;
mod sniff;

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::io::{self, BufRead, Write as _};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot, watch};
use tokio_stream::wrappers::{ReceiverStream, UnixListenerStream};
use tokio_stream::Stream;
use tonic::transport::server::{TcpIncoming, TlsConnectInfo, UdsConnectInfo};
use tonic::transport::ServerTlsConfig;
use tonic::{Request, Response, Status, Streaming};
use tonic_health::server::HealthReporter;
use tonic_health::ServingStatus;

use crate::address::Address;
use crate::auth::Token;
use crate::exit::ExitError;
use crate::log::{causes, log};
use crate::proto::event_service_server::{EventService, EventServiceServer};
use crate::proto::{agent_message, tracer_message, Ack, AgentMessage, TracerMessage, Welcome};

/// A peer that has not said Hello by then is cut off.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// How long open connections may linger after SIGTERM/SIGINT.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);
/// Largest message accepted from a tracer.
const MAX_MESSAGE: usize = 4 << 20;
/// Longest session id accepted (the tracer's are 32 characters): every
/// output line carries it.
const MAX_SESSION_ID: usize = 128;

/// Lines of one batch to write, and who waits for them to be written.
struct Write {
    session: Arc<str>,
    /// The sequence number of each line.
    sequences: Vec<u64>,
    /// Where each line ends in `lines`.
    ends: Vec<usize>,
    lines: Vec<u8>,
    done: oneshot::Sender<Result<(), Arc<str>>>,
}

/// Why a write failed, as the writer said it.
type WriteResult = Result<(), Arc<str>>;

/// What a session's ack task sends, in order.
enum Pending {
    /// A batch's acknowledgement, sent once its write (if any) is done.
    Ack(Option<oneshot::Receiver<WriteResult>>, u64),
    /// The stream's end with an error, after the acks before it.
    Refuse(Status),
}

/// Batches a session may have read but not yet seen written.
const PIPELINE: usize = 8;
/// Writes that share one flush.
const MAX_GROUP: usize = 64;

/// Sequence numbers as disjoint inclusive ranges, start to end.
#[derive(Default, Debug, Clone, PartialEq)]
struct Ranges(BTreeMap<u64, u64>);

impl Ranges {
    fn contains(&self, sequence: u64) -> bool {
        self.0.range(..=sequence).next_back().is_some_and(|(_, &end)| sequence <= end)
    }

    /// Adds `start..=end`, merged with the ranges it touches.
    fn insert(&mut self, mut start: u64, mut end: u64) {
        if let Some((&before, &before_end)) = self.0.range(..=start).next_back() {
            if before_end.saturating_add(1) >= start {
                start = before;
                end = end.max(before_end);
            }
        }
        while let Some((&key, &other_end)) = self.0.range(start..=end.saturating_add(1)).next() {
            self.0.remove(&key);
            end = end.max(other_end);
        }
        self.0.insert(start, end);
    }

    fn extend(&mut self, other: &Ranges) {
        for (&start, &end) in &other.0 {
            self.insert(start, end);
        }
    }
}

/// Sequences written, per session; updated by the writer only, once they are out.
type Written = Arc<Mutex<HashMap<String, Ranges>>>;

struct Service {
    token: Option<Token>,
    allowed_uids: Vec<u32>,
    writer: mpsc::Sender<Write>,
    written: Written,
    shutdown: watch::Receiver<bool>,
}

type AgentStream = Pin<Box<dyn Stream<Item = Result<AgentMessage, Status>> + Send>>;

#[tonic::async_trait]
impl EventService for Service {
    type StreamEventsStream = AgentStream;

    async fn stream_events(&self, request: Request<Streaming<TracerMessage>>) -> Result<Response<AgentStream>, Status> {
        let extensions = request.extensions();
        let unix = extensions
            .get::<UdsConnectInfo>()
            .or_else(|| extensions.get::<TlsConnectInfo<UdsConnectInfo>>().map(TlsConnectInfo::get_ref));
        let credentials = unix.and_then(|info| info.peer_cred);
        let peer = match (request.remote_addr(), credentials) {
            (Some(address), _) => address.to_string(),
            (None, Some(credentials)) => format!(
                "uid {} pid {}",
                credentials.uid(),
                credentials.pid().map_or_else(|| "unknown".to_owned(), |pid| pid.to_string())
            ),
            (None, None) => "a local peer".to_owned(),
        };
        if !self.allowed_uids.is_empty() && !credentials.is_some_and(|c| self.allowed_uids.contains(&c.uid())) {
            log!("{peer}: refused: its uid is not allowed");
            return Err(Status::permission_denied("this user may not stream events here"));
        }
        if self.token.as_ref().is_some_and(|token| !token.admits(request.metadata())) {
            log!("{peer}: refused: no valid token");
            return Err(Status::unauthenticated("a valid token is required (authorization: Bearer TOKEN)"));
        }
        let (acks, rx) = mpsc::channel(64);
        let session = Session {
            peer,
            writer: self.writer.clone(),
            written: Arc::clone(&self.written),
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
    written: Written,
    shutdown: watch::Receiver<bool>,
    acks: mpsc::Sender<Result<AgentMessage, Status>>,
}

/// What the agent says first: who it is.
fn welcome() -> AgentMessage {
    let welcome = Welcome {
        protocol_version: crate::proto::PROTOCOL_VERSION,
        agent: format!("cws-instrumentation serve {}", env!("CARGO_PKG_VERSION")),
        capabilities: Vec::new(),
    };
    AgentMessage { message: Some(agent_message::Message::Welcome(welcome)) }
}

impl Session {
    async fn run(mut self, mut stream: Streaming<TracerMessage>) {
        let hello = match tokio::time::timeout(HELLO_TIMEOUT, stream.message()).await {
            Ok(Ok(Some(TracerMessage { message: Some(tracer_message::Message::Hello(hello)) }))) => hello,
            Ok(Err(status)) => {
                return self.refuse(&format!("undecodable first message: {}", status.message())).await;
            }
            Ok(_) => return self.refuse("the first message must be a Hello").await,
            Err(_) => return self.refuse("no Hello within 10 s").await,
        };
        if hello.session_id.is_empty() || hello.session_id.len() > MAX_SESSION_ID {
            return self.refuse(&format!("a session id must have 1 to {MAX_SESSION_ID} bytes")).await;
        }
        // Everything in the Hello is the peer's word: quoted and escaped.
        let id = Quoted(&hello.session_id);
        let container = hello.container.as_ref().map(|c| c.id.clone()).unwrap_or_default();
        // Which task this is, for whoever reads the log.
        let ecs = hello.container.as_ref().and_then(|c| c.ecs.as_ref()).map_or_else(String::new, |ecs| {
            format!(" ecs cluster {:?} task {:?} container {:?}", ecs.cluster, ecs.task_arn, ecs.container_name)
        });
        log!(
            "hello: session {id} from {} container {:?} pid namespace {} entrypoint {:?}{ecs}",
            self.peer,
            container,
            hello.pid_namespace,
            hello.entrypoint_args
        );
        if self.acks.send(Ok(welcome())).await.is_err() {
            return;
        }
        let session: Arc<str> = Arc::from(hello.session_id.as_str());
        let head = line_head(&hello.session_id, &container);
        let (pending, pending_rx) = mpsc::channel(PIPELINE);
        tokio::spawn(acknowledge(pending_rx, self.acks.clone()));
        // The next sequence this stream may carry: batches only go forward.
        let mut next: Option<u64> = None;
        loop {
            let message = tokio::select! {
                message = stream.message() => message,
                _ = self.shutdown.changed() => return,
            };
            let message = match message {
                Ok(Some(TracerMessage { message: Some(message) })) => message,
                Ok(_) => return,
                Err(status) => {
                    log!("session {id}: stream ended: {:?}", status.message());
                    // Tell the peer why (a message over the size limit, say).
                    let _ = pending.send(Pending::Refuse(status)).await;
                    return;
                }
            };
            match message {
                tracer_message::Message::Batch(batch) => {
                    if let Some(expected) = next.filter(|&n| batch.first_sequence < n) {
                        let why =
                            format!("a batch at {} goes back: this stream is at {expected}", batch.first_sequence);
                        return self.refuse_session(id, &why, &pending).await;
                    }
                    match self.write_batch(&session, &head, batch, &pending).await {
                        Ok(Some(last)) => next = last.checked_add(1),
                        Ok(None) => {}
                        Err(why) => return self.refuse_session(id, &why, &pending).await,
                    }
                    if pending.is_closed() {
                        // The output failed: the ack task said so to the peer.
                        return;
                    }
                }
                tracer_message::Message::Loss(loss) => {
                    log!("session {id}: the tracer dropped events {}..={}", loss.first_sequence, loss.last_sequence)
                }
                tracer_message::Message::Goodbye(goodbye) => {
                    let exit = goodbye.exit.unwrap_or_default();
                    let ended = match (exit.code, exit.signal) {
                        (Some(code), _) => format!("exit code {code}"),
                        (None, Some(signal)) => format!("killed by signal {signal}"),
                        (None, None) => "end unknown".to_owned(),
                    };
                    let counters = goodbye.counters.unwrap_or_default();
                    log!(
                        "goodbye: session {id} {ended} events {} dropped {} ptrace stops {} reconnects {}",
                        counters.events,
                        counters.dropped,
                        counters.ptrace_stops,
                        counters.reconnects
                    );
                }
                tracer_message::Message::Hello(_) => return self.refuse_session(id, "a second Hello", &pending).await,
            }
        }
    }

    async fn refuse(&self, why: &str) {
        log!("{}: cut off: {why}", self.peer);
        let _ = self.acks.send(Err(Status::invalid_argument(why))).await;
    }

    /// Ends the stream with INVALID_ARGUMENT once the acks before are sent.
    async fn refuse_session(&self, id: Quoted<'_>, why: &str, pending: &mpsc::Sender<Pending>) {
        log!("session {id} from {}: cut off: {why}", self.peer);
        let _ = pending.send(Pending::Refuse(Status::invalid_argument(why))).await;
    }

    /// Encodes the events not written before and queues them for the
    /// writer; the ack task acknowledges the batch once they are written.
    /// Returns the batch's last sequence (None for an empty batch).
    async fn write_batch(
        &self,
        session: &Arc<str>,
        head: &[u8],
        batch: crate::proto::EventBatch,
        pending: &mpsc::Sender<Pending>,
    ) -> Result<Option<u64>, String> {
        let Some(count) = (batch.events.len() as u64).checked_sub(1) else { return Ok(None) };
        let last = batch.first_sequence.checked_add(count).ok_or("sequence numbers past 2^64")?;
        let (mut lines, mut ends, mut sequences) = (Vec::new(), Vec::new(), Vec::new());
        {
            // Only to spare encoding what is known to be written; the writer decides.
            let written = self.written.lock().unwrap_or_else(|e| e.into_inner());
            let known = written.get(&**session);
            for (offset, event) in batch.events.iter().enumerate() {
                let sequence = batch.first_sequence + offset as u64;
                if known.is_some_and(|k| k.contains(sequence)) {
                    continue;
                }
                sequences.push(sequence);
                append_line(&mut lines, head, sequence, event)?;
                ends.push(lines.len());
            }
        }
        let written = if sequences.is_empty() {
            None
        } else {
            let (done, written) = oneshot::channel();
            let write = Write { session: Arc::clone(session), sequences, ends, lines, done };
            self.writer.send(write).await.map_err(|_| "the output is closed")?;
            Some(written)
        };
        // A closed channel: the ack task ended on a failed write.
        let _ = pending.send(Pending::Ack(written, last)).await;
        Ok(Some(last))
    }
}

/// A peer's string in a log line: quoted, with control characters escaped,
/// so that it cannot forge lines or fields.
#[derive(Clone, Copy)]
struct Quoted<'a>(&'a str);

impl fmt::Display for Quoted<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.0)
    }
}

/// Acknowledges a session's batches in order, each once it is written; a
/// failed write ends the stream with UNAVAILABLE and the writer's reason.
async fn acknowledge(mut pending: mpsc::Receiver<Pending>, acks: mpsc::Sender<Result<AgentMessage, Status>>) {
    while let Some(next) = pending.recv().await {
        let (written, last) = match next {
            Pending::Ack(written, last) => (written, last),
            Pending::Refuse(status) => {
                let _ = acks.send(Err(status)).await;
                return;
            }
        };
        if let Some(written) = written {
            let failure = match written.await {
                Ok(Ok(())) => None,
                Ok(Err(reason)) => Some(format!("cannot write events: {reason}")),
                Err(_) => Some("the output is closed".to_owned()),
            };
            if let Some(why) = failure {
                let _ = acks.send(Err(Status::unavailable(why))).await;
                return;
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
fn recover(path: &Path) -> io::Result<HashMap<String, Ranges>> {
    let mut written: HashMap<String, Ranges> = HashMap::new();
    // Only a regular file holds earlier output (not /dev/null or a pipe).
    if !std::fs::metadata(path).is_ok_and(|m| m.is_file()) {
        return Ok(written);
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
                written.entry(session.to_owned()).or_default().insert(sequence, sequence);
            }
        }
        line.clear();
    }
    file.set_len(complete)?;
    Ok(written)
}

/// Where the events go: a file, cut back to its last complete line when a
/// write fails, or stdout.
enum Output {
    File { file: std::fs::File, path: PathBuf, complete: u64 },
    Stdout,
}

impl fmt::Display for Output {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Output::File { path, .. } => write!(f, "{}", path.display()),
            Output::Stdout => write!(f, "stdout"),
        }
    }
}

impl Output {
    /// Writes whole lines: on failure none of them is left behind.
    fn write_lines(&mut self, lines: &[u8]) -> io::Result<()> {
        match self {
            Output::File { file, complete, .. } => match file.write_all(lines) {
                Ok(()) => {
                    *complete += lines.len() as u64;
                    Ok(())
                }
                Err(error) => match file.set_len(*complete) {
                    Ok(()) => Err(error),
                    // A regular file that cannot be cut back (EIO): the cut
                    // line is removed by the next start's recovery.
                    Err(cut) if file.metadata().is_ok_and(|m| m.is_file()) => {
                        Err(io::Error::new(error.kind(), format!("{error}; and cutting back the line failed: {cut}")))
                    }
                    Err(_) => Err(error),
                },
            },
            Output::Stdout => {
                let mut stdout = io::stdout().lock();
                stdout.write_all(lines).and_then(|()| stdout.flush())
            }
        }
    }
}

/// Appends to `out` the lines of `write` that its session has not written
/// yet, neither before (`known`) nor earlier in this group (`added`), and
/// records them in `added`.
fn select_new_lines(known: Option<&Ranges>, added: &mut Ranges, write: &Write, out: &mut Vec<u8>) {
    let mut start = 0;
    // New sequences one after another, recorded as one range.
    let mut run: Option<(u64, u64)> = None;
    for (&sequence, &end) in write.sequences.iter().zip(&write.ends) {
        if !known.is_some_and(|k| k.contains(sequence)) && !added.contains(sequence) {
            out.extend_from_slice(&write.lines[start..end]);
            run = match run {
                Some((first, last)) if last.checked_add(1) == Some(sequence) => Some((first, sequence)),
                Some((first, last)) => {
                    added.insert(first, last);
                    Some((sequence, sequence))
                }
                None => Some((sequence, sequence)),
            };
        }
        start = end;
    }
    if let Some((first, last)) = run {
        added.insert(first, last);
    }
}

/// The service names the health service answers for.
const HEALTH_NAMES: [&str; 2] = ["", "cws.v1.EventService"];

async fn set_health(health: &HealthReporter, status: ServingStatus) {
    for name in HEALTH_NAMES {
        health.set_service_status(name, status).await;
    }
}

/// The single writer of the output, and the only one to decide what a
/// session already has. It ends when every session is gone, or when told
/// to: then it writes what is already queued and stops. Err if the output
/// was failing at the end.
async fn write_output(
    mut output: Output,
    mut writes: mpsc::Receiver<Write>,
    mut finish: oneshot::Receiver<()>,
    written: Written,
    health: HealthReporter,
) -> Result<(), String> {
    let mut finishing = false;
    let mut failing: Option<Arc<str>> = None;
    let mut group = Vec::with_capacity(MAX_GROUP);
    let mut bytes = Vec::new();
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
        bytes.clear();
        let mut added: HashMap<Arc<str>, Ranges> = HashMap::new();
        {
            let known = written.lock().unwrap_or_else(|e| e.into_inner());
            for write in &group {
                let fresh = added.entry(Arc::clone(&write.session)).or_default();
                select_new_lines(known.get(&*write.session), fresh, write, &mut bytes);
            }
        }
        let result = if bytes.is_empty() {
            Ok(())
        } else {
            // On a blocking thread, lent the output and the lines and given them back.
            let write = tokio::task::spawn_blocking(move || {
                let result = output.write_lines(&bytes);
                (output, bytes, result)
            });
            let result;
            (output, bytes, result) = write.await.map_err(|e| format!("the writer failed: {e}"))?;
            result
        };
        let outcome: WriteResult = match result {
            Ok(()) => {
                {
                    let mut known = written.lock().unwrap_or_else(|e| e.into_inner());
                    for (session, ranges) in &added {
                        known.entry(session.to_string()).or_default().extend(ranges);
                    }
                }
                if failing.take().is_some() {
                    log!("events are written to {output} again; serving");
                    set_health(&health, ServingStatus::Serving).await;
                }
                Ok(())
            }
            Err(error) => {
                let reason: Arc<str> = Arc::from(error.to_string());
                if failing.is_none() {
                    log!("cannot write events to {output}: {reason}; batches are refused (UNAVAILABLE) and health is NOT_SERVING until a write succeeds");
                    set_health(&health, ServingStatus::NotServing).await;
                }
                failing = Some(Arc::clone(&reason));
                Err(reason)
            }
        };
        for write in group.drain(..) {
            let _ = write.done.send(outcome.clone());
        }
    }
    match failing {
        None => Ok(()),
        Some(reason) => Err(format!("the last write to {output} failed: {reason}")),
    }
}

enum Incoming {
    /// With TLS: gRPC only.
    Tcp(TcpIncoming),
    /// Plain TCP: the HTTP/2 clients `route` found.
    Sniffed(ReceiverStream<io::Result<sniff::Prefixed>>),
    Unix(UnixListenerStream),
}

/// What a Datadog session needs; None with a token, which the Datadog
/// protocol cannot present.
struct DatadogEnd {
    writer: mpsc::Sender<Write>,
    shutdown: watch::Receiver<bool>,
}

/// How long to wait before accepting again after accept(2) failed (out of
/// descriptors, say), so that the failure does not spin.
const ACCEPT_RETRY: Duration = Duration::from_millis(100);

/// Accepts TCP clients and sends each where its first bytes say: HTTP/2 to
/// the gRPC server, anything else to a Datadog session. Each client is
/// sniffed on a task of its own, so a silent one holds up nobody.
async fn route(
    listener: tokio::net::TcpListener,
    http2: mpsc::Sender<io::Result<sniff::Prefixed>>,
    datadog: Option<DatadogEnd>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut failing = false;
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = shutdown.changed() => return,
        };
        let (stream, address) = match accepted {
            Ok(accepted) => accepted,
            Err(error) => {
                if !failing {
                    log!("cannot accept connections: {error}; retrying");
                }
                failing = true;
                tokio::time::sleep(ACCEPT_RETRY).await;
                continue;
            }
        };
        failing = false;
        // Acks are small writes: without NODELAY, Nagle holds one back
        // while the previous is unacknowledged, and a tracer waits 40 ms.
        let _ = stream.set_nodelay(true);
        let http2 = http2.clone();
        let datadog = datadog.as_ref().map(|end| (end.writer.clone(), end.shutdown.clone()));
        tokio::spawn(async move {
            match sniff::sniff(stream).await {
                Ok(sniff::Sniffed::Http2(stream)) => {
                    let _ = http2.send(Ok(stream)).await;
                }
                Ok(sniff::Sniffed::Datadog(stream)) => match datadog {
                    Some((writer, shutdown)) => {
                        datadog::Session::new(address.to_string(), writer).run(stream, shutdown).await
                    }
                    None => datadog::refuse(stream, &address.to_string()).await,
                },
                Ok(sniff::Sniffed::Closed(0)) => {}
                Ok(sniff::Sniffed::Closed(got)) => log!("{address}: closed after {got} bytes of an HTTP/2 preface"),
                Err(why) => log!("{address}: cut off: {why}"),
            }
        });
    }
}

/// `serve`'s exit status when its output was failing when it stopped: the
/// events refused meanwhile are still with their tracers, if they live.
pub const OUTPUT_FAILED: i32 = 1;

pub struct ServeOptions {
    pub listen: Address,
    pub output: Option<PathBuf>,
    /// Required of every stream, when set.
    pub token: Option<Token>,
    /// On a unix socket, the only user ids streams are taken from (all when empty).
    pub allowed_uids: Vec<u32>,
    pub tls: Option<ServerTlsConfig>,
}

impl ServeOptions {
    /// From the command line; the token and TLS files are read now.
    pub fn new(listen: Address, args: crate::cli::ServeArgs) -> Result<ServeOptions, ExitError> {
        let token = Token::load(args.auth_token_file.as_deref()).map_err(ExitError::usage)?;
        let tls =
            crate::auth::server_tls(args.tls_cert.as_deref(), args.tls_key.as_deref(), args.tls_client_ca.as_deref())
                .map_err(ExitError::usage)?;
        Ok(ServeOptions { listen, output: args.output, token, allowed_uids: args.allow_uid, tls })
    }
}

/// A new output file is for its owner only: exec events carry environment
/// variables, and the lines carry session ids.
const OUTPUT_MODE: u32 = 0o600;
/// The unix socket: its owner and group may connect.
const SOCKET_MODE: u32 = 0o660;

/// Binds the socket, narrows its mode, and only then listens: nobody can
/// connect in between.
fn listen_unix(path: &Path) -> io::Result<tokio::net::UnixListener> {
    use nix::sys::socket::{bind, listen, socket, AddressFamily, Backlog, SockFlag, SockType, UnixAddr};
    let flags = SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK;
    let socket = socket(AddressFamily::Unix, SockType::Stream, flags, None)?;
    bind(std::os::fd::AsRawFd::as_raw_fd(&socket), &UnixAddr::new(path)?)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(SOCKET_MODE))?;
    listen(&socket, Backlog::MAXCONN)?;
    tokio::net::UnixListener::from_std(std::os::unix::net::UnixListener::from(socket))
}

pub fn run(options: ServeOptions) -> Result<i32, ExitError> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| ExitError::setup(format!("cannot start the runtime: {e}")))?;
    runtime.block_on(serve(options))
}

async fn serve(options: ServeOptions) -> Result<i32, ExitError> {
    if matches!(options.listen, Address::Tcp(_)) && !options.allowed_uids.is_empty() {
        return Err(ExitError::usage("--allow-uid needs a unix socket (--listen unix:/path)".into()));
    }
    // Before "listening" is said: a stop signal from then on is handled.
    let signal =
        |kind| tokio::signal::unix::signal(kind).map_err(|e| ExitError::setup(format!("cannot handle signals: {e}")));
    let mut term = signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut int = signal(tokio::signal::unix::SignalKind::interrupt())?;
    let written = match &options.output {
        Some(path) => recover(path).map_err(|e| ExitError::usage(format!("cannot read {}: {e}", path.display())))?,
        None => HashMap::new(),
    };
    let output = match &options.output {
        Some(path) => {
            let file = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .mode(OUTPUT_MODE)
                .open(path)
                .map_err(|e| ExitError::usage(format!("cannot open {}: {e}", path.display())))?;
            let metadata =
                file.metadata().map_err(|e| ExitError::usage(format!("cannot stat {}: {e}", path.display())))?;
            if metadata.is_file() && metadata.permissions().mode() & 0o077 != 0 {
                log!(
                    "warning: {} is open to other users (mode {:04o}); events carry environment variables",
                    path.display(),
                    metadata.permissions().mode() & 0o7777
                );
            }
            let complete = metadata.len();
            Output::File { file, path: path.clone(), complete }
        }
        None => Output::Stdout,
    };
    let (writes_tx, writes) = mpsc::channel(256);
    let (finish, finish_rx) = oneshot::channel();
    let (shutdown_tx, shutdown) = watch::channel(false);
    let incoming = match &options.listen {
        Address::Tcp(hostport) => {
            let listener = tokio::net::TcpListener::bind(hostport)
                .await
                .map_err(|e| ExitError::usage(format!("cannot listen on {hostport}: {e}")))?;
            let local = listener.local_addr().map_err(|e| ExitError::setup(e.to_string()))?;
            log!("listening on {local}");
            if options.tls.is_some() {
                // TLS clients open with a TLS record, not HTTP/2: nothing to
                // sniff, and the Datadog protocol has no TLS. NODELAY: see `route`.
                Incoming::Tcp(TcpIncoming::from(listener).with_nodelay(Some(true)))
            } else {
                let (http2, clients) = mpsc::channel(64);
                let datadog = options
                    .token
                    .is_none()
                    .then(|| DatadogEnd { writer: writes_tx.clone(), shutdown: shutdown.clone() });
                tokio::spawn(route(listener, http2, datadog, shutdown.clone()));
                Incoming::Sniffed(ReceiverStream::new(clients))
            }
        }
        Address::Unix(path) => {
            // A socket left by a previous run would make bind fail.
            if std::fs::symlink_metadata(path).is_ok_and(|m| std::os::unix::fs::FileTypeExt::is_socket(&m.file_type()))
            {
                let _ = std::fs::remove_file(path);
            }
            let listener =
                listen_unix(path).map_err(|e| ExitError::usage(format!("cannot listen on {}: {e}", path.display())))?;
            log!("listening on unix:{}", path.display());
            Incoming::Unix(UnixListenerStream::new(listener))
        }
    };
    let written: Written = Arc::new(Mutex::new(written));
    let (health, health_service) = tonic_health::server::health_reporter();
    set_health(&health, ServingStatus::Serving).await;
    let writer = tokio::spawn(write_output(output, writes, finish_rx, Arc::clone(&written), health));
    let shutdown_seen = shutdown.clone();
    let service =
        Service { token: options.token, allowed_uids: options.allowed_uids, writer: writes_tx, written, shutdown };

    let stop = async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        log!("stopping: no new streams; draining");
        let _ = shutdown_tx.send(true);
    };
    let server = EventServiceServer::new(service).max_decoding_message_size(MAX_MESSAGE);
    let mut builder = tonic::transport::Server::builder();
    if let Some(tls) = options.tls {
        builder =
            builder.tls_config(tls).map_err(|e| ExitError::usage(format!("unusable TLS files: {}", causes(&e))))?;
    }
    let router = builder.add_service(health_service).add_service(server);
    let serving = async {
        match incoming {
            Incoming::Tcp(incoming) => router.serve_with_incoming_shutdown(incoming, stop).await,
            Incoming::Sniffed(incoming) => router.serve_with_incoming_shutdown(incoming, stop).await,
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
    writer.await.map_err(|e| ExitError::setup(e.to_string()))?.map_err(|e| ExitError::new(OUTPUT_FAILED, e))?;
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(session: &str, sequences: &[u64]) -> Write {
        let mut lines = Vec::new();
        let mut ends = Vec::new();
        for sequence in sequences {
            lines.extend_from_slice(format!("{sequence}\n").as_bytes());
            ends.push(lines.len());
        }
        Write { session: Arc::from(session), sequences: sequences.to_vec(), ends, lines, done: oneshot::channel().0 }
    }

    fn ranges(pairs: &[(u64, u64)]) -> Ranges {
        Ranges(pairs.iter().copied().collect())
    }

    #[test]
    fn ranges_merge_what_touches_and_keep_gaps() {
        let mut r = Ranges::default();
        r.insert(10, 19);
        r.insert(0, 9);
        assert_eq!(r, ranges(&[(0, 19)]));
        r.insert(1_000_000_000_000, 1_000_000_000_009);
        r.insert(25, 30);
        r.insert(21, 22);
        assert_eq!(r, ranges(&[(0, 19), (21, 22), (25, 30), (1_000_000_000_000, 1_000_000_000_009)]));
        r.insert(20, 26);
        assert_eq!(r, ranges(&[(0, 30), (1_000_000_000_000, 1_000_000_000_009)]));
        assert!(r.contains(0) && r.contains(30) && !r.contains(31) && !r.contains(999_999_999_999));
        r.insert(u64::MAX, u64::MAX);
        assert!(r.contains(u64::MAX));
    }

    #[test]
    fn the_writer_takes_exactly_the_lines_not_written_before() {
        let known = ranges(&[(10, 19), (1_000_000_000_000, 1_000_000_000_000)]);
        let mut added = Ranges::default();
        let mut out = Vec::new();
        // Behind a later batch and a forged one far ahead: all of it is new.
        select_new_lines(Some(&known), &mut added, &write("s", &[0, 1, 2]), &mut out);
        // Overlapping what is written and what this group adds.
        select_new_lines(Some(&known), &mut added, &write("s", &[2, 3, 18, 19, 20]), &mut out);
        assert_eq!(String::from_utf8(out).unwrap(), "0\n1\n2\n3\n20\n");
        assert_eq!(added, ranges(&[(0, 3), (20, 20)]));
    }
}
