//! `serve`'s end of the Datadog agent's eBPF-less protocol: a Datadog
//! tracer (Datadog's own, or ours with `--probe-protocol datadog`) on the
//! gRPC listener, its events written in the same JSON-lines contract.
//!
//! A connection is a session: a random session id of its own, sequences
//! from 0 in the order its events came (the protocol has no numbers, no
//! acks and no resending, so there is nothing to deduplicate), and as
//! `container_id` the message's `ContainerID`, or the Hello's when the
//! message has none. Events are mapped by `datadog::inbound`; messages
//! without an event of ours are counted by type and said when the session
//! ends.
//!
//! The agent's rules (SPEC.md, section 11): frames over 256 KiB, an empty
//! or undecodable body, a connection cut inside a frame end the connection
//! (one log line), and so does a message the agent would crash on (a Hello
//! or syscall type without its map or payload). A Hello is taken while the
//! session has no pid namespace (so a Hello with NSID 0 lets the next one
//! in); later ones are ignored, and counted. Messages before any Hello are
//! written, with the message's container id. A Goodbye on the wire forgets
//! the Hello's container, as the agent does, and the session goes on.
//!
//! Our tracer's `--probe-protocol auto` opens with a Hello that also offers
//! gRPC (`Message::Probe`): as a connection's first frame it is answered at
//! once with HTTP/2's first frame, which tells the tracer to come back
//! speaking gRPC, the richer protocol (acks, resending, sequences), and the
//! connection ends there. Without the answer the tracer would take this port
//! for a Datadog agent; with a token required, it could not come at all.

use std::collections::BTreeMap;
use std::sync::Arc;

use tokio::io::AsyncWriteExt;
use tokio::sync::{mpsc, oneshot, watch};

use crate::datadog::frame::read_frame;
use crate::datadog::inbound;
use crate::datadog::msg::{HelloMsg, Message, Received, SyscallMsg};
use crate::log::log;

use super::sniff::{Prefixed, SERVER_PREFACE};
use super::{append_line, line_head, Quoted, Write};

/// Skipped messages of types the agent does not know, under one name each.
const UNKNOWN_MESSAGE: &str = "unknown message type";
const UNKNOWN_SYSCALL: &str = "unknown syscall type";

pub(super) struct Session {
    id: Arc<str>,
    peer: String,
    /// The Hello's pid namespace; 0 until a Hello gives one.
    nsid: u64,
    /// The Hello's container id (empty without one, or after a Goodbye).
    container: String,
    /// The next line's sequence.
    next: u64,
    /// Messages with no event of ours, by type.
    skipped: BTreeMap<&'static str, u64>,
    ignored_hellos: u64,
    goodbyes: u64,
    writer: mpsc::Sender<Write>,
}

impl Session {
    pub(super) fn new(peer: String, writer: mpsc::Sender<Write>) -> Session {
        Session {
            id: Arc::from(crate::context::session_id()),
            peer,
            nsid: 0,
            container: String::new(),
            next: 0,
            skipped: BTreeMap::new(),
            ignored_hellos: 0,
            goodbyes: 0,
            writer,
        }
    }

    /// Reads frames until the tracer closes, breaks a rule, or the sidecar
    /// stops; then says how the session ended, in one line.
    pub(super) async fn run(mut self, mut stream: Prefixed, mut shutdown: watch::Receiver<bool>) {
        let mut first = true;
        let ended = loop {
            let frame = tokio::select! {
                frame = read_frame(&mut stream) => frame,
                _ = shutdown.changed() => break "the sidecar is stopping".to_owned(),
            };
            let body = match frame {
                Ok(Some(body)) => body,
                Ok(None) => break "closed by the tracer".to_owned(),
                Err(error) => break format!("cut off: {error}"),
            };
            let message = match Message::decode(&body) {
                Ok(message) => message,
                Err(error) => break format!("cut off: undecodable message: {error}"),
            };
            match message {
                // Where the probe puts it; it is no session.
                Received::Message(Message::Probe(_)) if first => {
                    log!("{}: {}", self.peer, answer_probe(&mut stream).await);
                    return;
                }
                Received::Message(Message::Hello(hello) | Message::Probe(hello)) => self.hello(&hello),
                Received::Message(Message::Syscall(syscall)) => {
                    if let Err(why) = self.write(&syscall).await {
                        break why;
                    }
                }
                Received::Goodbye => {
                    self.container.clear();
                    self.goodbyes += 1;
                }
                Received::UnknownMessage(_) => *self.skipped.entry(UNKNOWN_MESSAGE).or_default() += 1,
                Received::UnknownSyscall(_) => *self.skipped.entry(UNKNOWN_SYSCALL).or_default() += 1,
            }
            first = false;
        };
        let skipped: Vec<String> = self.skipped.iter().map(|(kind, count)| format!("{kind} {count}")).collect();
        log!(
            "datadog session {} from {} ended: {ended}; {} events written, skipped: {}{}{}",
            Quoted(&self.id),
            self.peer,
            self.next,
            if skipped.is_empty() { "none".to_owned() } else { skipped.join(", ") },
            if self.ignored_hellos > 0 {
                format!(", {} later Hellos ignored", self.ignored_hellos)
            } else {
                String::new()
            },
            if self.goodbyes > 0 { format!(", {} Goodbyes", self.goodbyes) } else { String::new() },
        );
    }

    fn hello(&mut self, hello: &HelloMsg) {
        if self.nsid != 0 {
            self.ignored_hellos += 1;
            return;
        }
        self.nsid = hello.nsid;
        self.container = hello.container_context.as_ref().map(|c| c.id.clone()).unwrap_or_default();
        // Everything in the Hello is the peer's word: quoted and escaped.
        let entrypoint = hello.entrypoint_args.as_ref().map_or_else(|| "none".to_owned(), |args| format!("{args:?}"));
        log!(
            "hello: session {} from {} (Datadog protocol) container {:?} pid namespace {} mode {:?} entrypoint {entrypoint}",
            Quoted(&self.id),
            self.peer,
            self.container,
            hello.nsid,
            hello.mode,
        );
    }

    /// Queues the message's line for the writer; Err when the output is
    /// closed (the sidecar is stopping).
    async fn write(&mut self, syscall: &SyscallMsg) -> Result<(), String> {
        let Some(event) = inbound::event(syscall) else {
            *self.skipped.entry(syscall.payload.key()).or_default() += 1;
            return Ok(());
        };
        let container = if syscall.container_id.is_empty() { &self.container } else { &syscall.container_id };
        let mut lines = Vec::new();
        append_line(&mut lines, &line_head(&self.id, container), self.next, &event)?;
        // Nobody waits for the write: the protocol has no acknowledgement.
        let (done, _) = oneshot::channel();
        let write =
            Write { session: Arc::clone(&self.id), sequences: vec![self.next], ends: vec![lines.len()], lines, done };
        self.writer.send(write).await.map_err(|_| "the output is closed".to_owned())?;
        self.next += 1;
        Ok(())
    }
}

/// With a token required: a Datadog tracer, which cannot present one, is
/// refused at its first frame; our tracer's probe is answered, as that
/// tracer will present the token over gRPC. A first frame that does not come
/// whole in time is a refusal too: no session waits here.
pub(super) async fn refuse(mut stream: Prefixed, peer: &str) {
    let probe = match tokio::time::timeout(super::HELLO_TIMEOUT, read_frame(&mut stream)).await {
        Ok(Ok(Some(body))) => matches!(Message::decode(&body), Ok(Received::Message(Message::Probe(_)))),
        _ => false,
    };
    let said = if probe {
        answer_probe(&mut stream).await
    } else {
        "refused: a Datadog-protocol tracer cannot present the token this sidecar requires".to_owned()
    };
    log!("{peer}: {said}");
}

/// Answers our tracer's probe with the frame every HTTP/2 server opens with:
/// the tracer then connects again, speaking gRPC. What happened, for the log.
async fn answer_probe(stream: &mut Prefixed) -> String {
    match stream.write_all(&SERVER_PREFACE).await {
        Ok(()) => "our tracer's protocol probe, answered in HTTP/2: gRPC is spoken here".to_owned(),
        Err(error) => format!("our tracer's protocol probe, which could not be answered: {error}"),
    }
}
