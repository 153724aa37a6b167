//! `trace` against agents that misbehave: silent, not HTTP/2, dropping the
//! connection on the first bytes, refusing every stream, acknowledging
//! beyond what they were sent, holding back their response headers, failing
//! a stream after a partial ack. The workload's exit status and output never
//! change, the tracer exits within its timeouts, retries are spaced, and
//! each failure is said once.

mod common;

use std::net::{TcpListener, TcpStream};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{Run, Trace};
use cws_instrumentation::proto::event_service_server::{EventService, EventServiceServer};
use cws_instrumentation::proto::{agent_message, tracer_message, Ack, AgentMessage, Counters, TracerMessage};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::Value;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

/// Slack on top of the tracer's own timeouts before a run counts as hung:
/// a deadline, not a measure of speed.
const HANG: Duration = Duration::from_secs(3);

/// The faulty agents are gRPC ones: a silent peer would otherwise be taken
/// for a Datadog agent (`--probe-protocol auto`), unless a test says.
fn traced(address: &str, flags: &[&str], command: &[&str]) -> Trace {
    let mut all = vec!["--probe-addr", address, "--stats"];
    if !flags.contains(&"--probe-protocol") {
        all.extend(["--probe-protocol", "grpc"]);
    }
    all.extend_from_slice(flags);
    Trace::with_flags(&all, command)
}

/// Runs the trace; fails if it outlives its timeouts by more than `HANG`.
fn run_bounded(trace: Trace, timeouts: Duration) -> Run {
    let started = Instant::now();
    let run = trace.run();
    assert!(started.elapsed() < timeouts + HANG, "the tracer hung: {:?}\n{}", started.elapsed(), run.stderr);
    run
}

/// The tracer's lines on stderr that contain `text`.
fn said<'a>(run: &'a Run, text: &str) -> Vec<&'a str> {
    run.stderr.lines().filter(|l| l.contains(text)).collect()
}

/// `N` from a "... (N times in all; the last: ...)" line, or 1 when the
/// failure was said once only.
fn times_in_all(lines: &[&str]) -> u64 {
    lines
        .iter()
        .find_map(|l| l.split_once(" times in all; the last: ")?.0.rsplit_once('(')?.1.parse().ok())
        .unwrap_or(1)
}

#[test]
fn a_silent_peer_costs_the_timeouts_and_nothing_more() {
    // Connections complete in the backlog and nobody ever reads them.
    let silent = TcpListener::bind("127.0.0.1:0").unwrap();
    let address = silent.local_addr().unwrap().to_string();
    let flags = ["--connect-timeout", "500ms", "--flush-timeout", "500ms"];
    let run = run_bounded(traced(&address, &flags, &["sh", "-c", "echo ran; exit 3"]), Duration::from_secs(1));
    assert_eq!((run.code(), run.stdout.as_str()), (Some(3), "ran\n"), "{}", run.stderr);
    assert_eq!(said(&run, "within 500ms; starting the workload anyway").len(), 1, "{}", run.stderr);
    assert_eq!(run.stat("undelivered"), run.events.len() as u64, "{}", run.stderr);
}

#[test]
fn a_stop_signal_after_the_workload_ended_ends_the_flush_at_once() {
    let silent = TcpListener::bind("127.0.0.1:0").unwrap();
    let address = silent.local_addr().unwrap().to_string();
    let flags = ["--async", "--flush-timeout", "600s"];
    let mut trace = traced(&address, &flags, &["sh", "-c", "exit 3"]);
    let child = trace.spawn();
    let tracer = Pid::from_raw(child.id() as i32);
    // The exit event is written once the workload is gone: then the tracer
    // is flushing, and would wait 600 s for the silent peer.
    let events = trace.events_path();
    let started = Instant::now();
    while !std::fs::read_to_string(&events).unwrap_or_default().contains("\"exit\":") {
        assert!(started.elapsed() < common::DEADLINE, "the workload's exit was never reported");
        std::thread::sleep(Duration::from_millis(5));
    }
    let signalled = Instant::now();
    kill(tracer, Signal::SIGTERM).unwrap();
    let run = trace.finish(child);
    assert!(signalled.elapsed() < HANG, "SIGTERM did not end the flush: {:?}", signalled.elapsed());
    assert_eq!(run.code(), Some(3), "the workload's status, not the signal's: {}", run.stderr);
    assert_eq!(said(&run, "a stop signal after the workload's end").len(), 1, "{}", run.stderr);
    assert_eq!(run.stat("undelivered"), run.events.len() as u64, "{}", run.stderr);
}

/// A peer that answers every connection with `answer`, and counts the
/// connections.
struct Peer {
    address: String,
    connections: Arc<Mutex<u64>>,
}

impl Peer {
    fn start(answer: fn(&mut TcpStream)) -> Peer {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let address = listener.local_addr().unwrap().to_string();
        let connections = Arc::new(Mutex::new(0));
        let counted = Arc::clone(&connections);
        std::thread::spawn(move || {
            for connection in listener.incoming() {
                let Ok(mut connection) = connection else { return };
                *counted.lock().unwrap() += 1;
                answer(&mut connection);
            }
        });
        Peer { address, connections }
    }
}

/// The client's first bytes (the HTTP/2 preface), then an HTTP/1.1 refusal.
fn answer_http1(connection: &mut TcpStream) {
    use std::io::{Read, Write};
    let mut preface = [0u8; 24];
    let _ = connection.read_exact(&mut preface);
    let _ = connection.write_all(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
}

/// The client's first bytes, then the connection dropped, as an agent that
/// does not speak this protocol does.
fn drop_after_first_bytes(connection: &mut TcpStream) {
    use std::io::Read;
    let mut preface = [0u8; 24];
    let _ = connection.read_exact(&mut preface);
}

/// Takes the client's bytes and never answers, until the client goes.
fn never_answer(connection: &mut TcpStream) {
    let _ = std::io::copy(connection, &mut std::io::sink());
}

#[test]
fn a_peer_that_takes_events_and_never_answers_is_given_up_on_and_retried() {
    assert_given_up_on_and_retried("");
}

#[test]
fn a_peer_that_stops_reading_is_given_up_on_and_retried() {
    // Exec events of 125 KiB each: more than the peer's HTTP/2 window, which
    // it never opens, so that the tracer's sends wait on it.
    let big =
        "a=$(head -c 350 /dev/zero | tr '\\0' x); i=0; while [ $i -lt 356 ]; do set -- \"$@\" $a; i=$((i+1)); done; \
               j=0; while [ $j -lt 10 ]; do /bin/true \"$@\"; j=$((j+1)); done; ";
    assert_given_up_on_and_retried(big);
}

/// Runs `prelude`, then events until a never-answering peer has seen a
/// second connection: the tracer gave the first up.
fn assert_given_up_on_and_retried(prelude: &str) {
    let peer = Peer::start(never_answer);
    let dir = tempfile::tempdir().unwrap();
    let go = dir.path().join("go");
    let script = format!("{prelude}while [ ! -e {} ]; do sleep 0.05; done; exit 2", go.display());
    let flags = ["--async", "--connect-timeout", "300ms", "--flush-timeout", "300ms"];
    let mut trace = traced(&peer.address, &flags, &["sh", "-c", &script]);
    trace.command().env_clear().env("PATH", "/usr/bin:/bin");
    let child = trace.spawn();
    let started = Instant::now();
    while *peer.connections.lock().unwrap() < 2 {
        assert!(started.elapsed() < common::DEADLINE, "the tracer kept waiting on a peer that never answers");
        std::thread::sleep(Duration::from_millis(5));
    }
    std::fs::write(&go, "").unwrap();
    let run = trace.finish(child);
    assert_eq!(run.code(), Some(2), "{}", run.stderr);
    let failures = said(&run, &format!("stream to the agent at {} failed", peer.address));
    assert!(
        failures[0].ends_with("failed: no answer from the agent within 1s of sending it events; retrying"),
        "{}",
        run.stderr
    );
    assert_eq!(run.stat("undelivered"), run.events.len() as u64, "{}", run.stderr);
}

#[test]
fn an_http1_peer_is_retried_with_backoff_and_its_failure_said_once() {
    assert_backoff_against(Peer::start(answer_http1));
}

#[test]
fn a_peer_that_drops_the_connection_is_retried_with_backoff_and_its_failure_said_once() {
    assert_backoff_against(Peer::start(drop_after_first_bytes));
}

fn assert_backoff_against(peer: Peer) {
    let flags = ["--connect-timeout", "1s", "--flush-timeout", "1s"];
    let run = run_bounded(traced(&peer.address, &flags, &["sh", "-c", "echo ran; exit 4"]), Duration::from_secs(2));
    assert_eq!((run.code(), run.stdout.as_str()), (Some(4), "ran\n"), "{}", run.stderr);
    let failures = said(&run, &format!("stream to the agent at {} failed", peer.address));
    assert!(!failures.is_empty() && failures.len() <= 2, "said once, then counted once: {}", run.stderr);
    let connections = *peer.connections.lock().unwrap();
    let failed = times_in_all(&failures);
    // The last attempt may be cut short by the flush timeout before it fails.
    assert!(failed == connections || failed + 1 == connections, "{failed} failures, {connections} connections");
    // 2 s of backoff from 100 ms, doubling: a handful of attempts, not thousands.
    assert!(connections <= 20, "{connections} connections in 2 s: no backoff");
    assert_eq!(run.stat("undelivered"), run.events.len() as u64, "{}", run.stderr);
}

/// What an agent in this file saw.
#[derive(Default)]
struct Seen {
    streams: u64,
    /// Every event received, with its sequence number, in arrival order.
    events: Vec<(u64, Value)>,
    /// Every Loss range received, in arrival order.
    losses: Vec<(u64, u64)>,
    /// The Goodbye's counters, once received.
    goodbye: Option<Counters>,
}

#[derive(Clone, Copy, PartialEq)]
enum Behaviour {
    /// Every batch acknowledged, as `serve` does.
    Faithful,
    /// Every stream refused with UNAVAILABLE.
    Refuse,
    /// Each batch acknowledged 1000 beyond its last event.
    AckBeyond,
    /// Response headers held back until the first ack, as grpcio does by default.
    HeadersWithFirstAck,
    /// On the first stream, the first event acknowledged, and the stream
    /// failed at the first batch from this sequence on; later streams as usual.
    FailFirstStreamFrom(u64),
}

struct Agent {
    behaviour: Behaviour,
    seen: Arc<Mutex<Seen>>,
}

type Replies = Pin<Box<dyn tokio_stream::Stream<Item = Result<AgentMessage, Status>> + Send>>;

fn ack(sequence: u64) -> Result<AgentMessage, Status> {
    Ok(AgentMessage { message: Some(agent_message::Message::Ack(Ack { sequence: Some(sequence) })) })
}

impl Agent {
    /// Records a batch; the ack to send for it.
    fn record(seen: &Mutex<Seen>, behaviour: Behaviour, message: TracerMessage) -> Option<u64> {
        let mut seen = seen.lock().unwrap();
        let batch = match message.message {
            Some(tracer_message::Message::Batch(batch)) => batch,
            Some(tracer_message::Message::Loss(loss)) => {
                seen.losses.push((loss.first_sequence, loss.last_sequence));
                return None;
            }
            Some(tracer_message::Message::Goodbye(goodbye)) => {
                seen.goodbye = goodbye.counters;
                return None;
            }
            _ => return None,
        };
        for (offset, event) in batch.events.iter().enumerate() {
            seen.events.push((batch.first_sequence + offset as u64, serde_json::to_value(event).unwrap()));
        }
        let last = batch.first_sequence + batch.events.len() as u64 - 1;
        Some(if behaviour == Behaviour::AckBeyond { last + 1000 } else { last })
    }
}

#[tonic::async_trait]
impl EventService for Agent {
    type StreamEventsStream = Replies;

    async fn stream_events(&self, request: Request<Streaming<TracerMessage>>) -> Result<Response<Replies>, Status> {
        let streams = {
            let mut seen = self.seen.lock().unwrap();
            seen.streams += 1;
            seen.streams
        };
        if let (Behaviour::FailFirstStreamFrom(from), 1) = (self.behaviour, streams) {
            return Ok(Response::new(Box::pin(self.fail_from(from, request.into_inner()))));
        }
        if self.behaviour == Behaviour::Refuse {
            return Err(Status::unavailable("refusing every stream"));
        }
        let mut incoming = request.into_inner();
        let (tx, rx) = tokio::sync::mpsc::channel(1024);
        if self.behaviour == Behaviour::HeadersWithFirstAck {
            // No headers until there is something to answer.
            loop {
                let message = incoming.message().await?.ok_or_else(|| Status::aborted("ended"))?;
                if let Some(sequence) = Agent::record(&self.seen, self.behaviour, message) {
                    let _ = tx.send(ack(sequence)).await;
                    break;
                }
            }
        }
        let (seen, behaviour) = (Arc::clone(&self.seen), self.behaviour);
        tokio::spawn(async move {
            // Ends its side (status OK) when the tracer ends its own.
            while let Ok(Some(message)) = incoming.message().await {
                if let Some(sequence) = Agent::record(&seen, behaviour, message) {
                    let _ = tx.send(ack(sequence)).await;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

impl Agent {
    /// `FailFirstStreamFrom(from)`'s first stream.
    fn fail_from(
        &self,
        from: u64,
        mut incoming: Streaming<TracerMessage>,
    ) -> ReceiverStream<Result<AgentMessage, Status>> {
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        let seen = Arc::clone(&self.seen);
        tokio::spawn(async move {
            let mut acknowledged = false;
            while let Ok(Some(message)) = incoming.message().await {
                let Some(tracer_message::Message::Batch(batch)) = &message.message else { continue };
                let first = batch.first_sequence;
                if first >= from {
                    let _ = tx.send(Err(Status::unavailable("failing at the batches after the first"))).await;
                    return;
                }
                Agent::record(&seen, Behaviour::FailFirstStreamFrom(from), message);
                if !acknowledged {
                    acknowledged = true;
                    let _ = tx.send(ack(first)).await;
                }
            }
        });
        ReceiverStream::new(rx)
    }
}

/// An agent of `behaviour` on loopback, until dropped.
struct RunningAgent {
    address: String,
    seen: Arc<Mutex<Seen>>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl RunningAgent {
    fn start(behaviour: Behaviour) -> RunningAgent {
        RunningAgent::start_at(behaviour, "127.0.0.1:0")
    }

    fn start_at(behaviour: Behaviour, address: &str) -> RunningAgent {
        let seen = Arc::new(Mutex::new(Seen::default()));
        let agent = Agent { behaviour, seen: Arc::clone(&seen) };
        let listener = std::net::TcpListener::bind(address).unwrap();
        listener.set_nonblocking(true).unwrap();
        let address = listener.local_addr().unwrap().to_string();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            runtime.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).unwrap();
                let incoming = tonic::transport::server::TcpIncoming::from(listener);
                let _ = tonic::transport::Server::builder()
                    .add_service(EventServiceServer::new(agent))
                    .serve_with_incoming_shutdown(incoming, async {
                        let _ = stopped.await;
                    })
                    .await;
            });
        });
        RunningAgent { address, seen, stop: Some(stop) }
    }

    /// The events received, each once, in sequence order, and whether any came twice.
    fn events(&self) -> Vec<(u64, Value)> {
        let mut events = self.seen.lock().unwrap().events.clone();
        events.sort_by_key(|(sequence, _)| *sequence);
        events.dedup_by_key(|(sequence, _)| *sequence);
        events
    }
}

impl Drop for RunningAgent {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// The agent holds exactly the run's events, numbered from 0.
fn assert_received(agent: &RunningAgent, run: &Run) {
    let events = agent.events();
    let sequences: Vec<u64> = events.iter().map(|(s, _)| *s).collect();
    assert_eq!(sequences, (0..run.events.len() as u64).collect::<Vec<_>>(), "{}", run.stderr);
    let values: Vec<Value> = events.into_iter().map(|(_, v)| v).collect();
    assert_eq!(values, run.events);
}

#[test]
fn an_agent_refusing_every_stream_is_retried_with_backoff_and_said_once() {
    let agent = RunningAgent::start(Behaviour::Refuse);
    let flags = ["--connect-timeout", "1s", "--flush-timeout", "1s"];
    let run = run_bounded(traced(&agent.address, &flags, &["sh", "-c", "echo ran; exit 5"]), Duration::from_secs(2));
    assert_eq!((run.code(), run.stdout.as_str()), (Some(5), "ran\n"), "{}", run.stderr);
    let failures = said(&run, &format!("stream to the agent at {} failed", agent.address));
    assert!(!failures.is_empty() && failures.len() <= 2, "said once, then counted once: {}", run.stderr);
    assert!(failures[0].ends_with("failed: status Unavailable \"refusing every stream\"; retrying"), "{}", run.stderr);
    let streams = agent.seen.lock().unwrap().streams;
    let failed = times_in_all(&failures);
    assert!(failed == streams || failed + 1 == streams, "{failed} failures, {streams} streams\n{}", run.stderr);
    assert!(streams <= 20, "{streams} streams in 2 s: no backoff");
    assert_eq!(run.stat("undelivered"), run.events.len() as u64, "{}", run.stderr);
}

#[test]
fn acks_beyond_what_was_sent_are_cut_to_it_and_said_once() {
    let agent = RunningAgent::start(Behaviour::AckBeyond);
    // Events in two bursts, so that the second comes after an ack far beyond it.
    let script = "cat /etc/hostname >/dev/null; sleep 0.3; cat /etc/hostname >/dev/null; cat /etc/passwd >/dev/null";
    let run =
        run_bounded(traced(&agent.address, &["--flush-timeout", "5s"], &["sh", "-c", script]), Duration::from_secs(5));
    assert_eq!(run.code(), Some(0), "{}", run.stderr);
    assert_eq!(run.opens_of("/etc/passwd").len(), 1);
    // Every event reached the agent: none was forgotten for an ack beyond it.
    assert_received(&agent, &run);
    let complaints = said(&run, "acknowledges events it was not sent");
    assert!(!complaints.is_empty() && complaints.len() <= 2, "said once, then counted: {}", run.stderr);
    assert_eq!(run.stat("undelivered"), 0, "{}", run.stderr);
}

#[test]
fn an_agent_that_sends_its_headers_with_its_first_ack_gets_every_event() {
    let agent = RunningAgent::start(Behaviour::HeadersWithFirstAck);
    let flags = ["--connect-timeout", "500ms", "--flush-timeout", "5s"];
    let script = "cat /etc/hostname >/dev/null; exit 6";
    let run = run_bounded(traced(&agent.address, &flags, &["sh", "-c", script]), Duration::from_millis(5500));
    assert_eq!(run.code(), Some(6), "{}", run.stderr);
    // No headers before an event: the workload waited its connect timeout.
    assert_eq!(said(&run, "within 500ms; starting the workload anyway").len(), 1, "{}", run.stderr);
    assert_received(&agent, &run);
    assert_eq!(run.stat("undelivered"), 0, "{}", run.stderr);
    assert_eq!(agent.seen.lock().unwrap().streams, 1, "{}", run.stderr);
}

/// A traced shell loop that makes events until the test writes its `go`
/// file, started with no agent at a free loopback address: returns once its
/// events file holds `events` events (the buffer has overflowed by then).
/// Without LD_LIBRARY_PATH: under `cargo test` the loader would first try
/// each directory cargo puts there, and the run's first events would be
/// dozens of failed opens rather than the loop's own. The rest of the
/// environment stays, switches of the suite's run included.
struct Overflowing {
    address: String,
    go: std::path::PathBuf,
    trace: Trace,
    child: std::process::Child,
    started: Instant,
    _dir: tempfile::TempDir,
}

impl Overflowing {
    fn start(flags: &[&str], body: &str, events: usize) -> Overflowing {
        let address = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().to_string();
        let dir = tempfile::tempdir().unwrap();
        let go = dir.path().join("go");
        let script = format!("while [ ! -e {} ]; do {body}; done", go.display());
        let mut trace = traced(&address, flags, &["sh", "-c", &script]);
        trace.command().env_remove("LD_LIBRARY_PATH");
        let child = trace.spawn();
        let started = Instant::now();
        while std::fs::read_to_string(trace.events_path()).unwrap_or_default().lines().count() < events {
            assert!(started.elapsed() < common::DEADLINE, "the workload made too few events");
            std::thread::sleep(Duration::from_millis(5));
        }
        Overflowing { address, go, trace, child, started, _dir: dir }
    }

    /// Ends the loop and the trace.
    fn finish(self) -> Run {
        std::fs::write(&self.go, "").unwrap();
        let run = self.trace.finish(self.child);
        assert_eq!(run.code(), Some(0), "{}", run.stderr);
        run
    }
}

#[test]
fn a_resend_after_dropped_events_keeps_each_event_under_its_own_number() {
    // Events go on until the test says: the buffer (10) overflows while no
    // agent listens, and fills again after the agent's first ack.
    // auto: the events and drops before the agent answers are kept by the
    // protocol probe, and handed over under the same numbers.
    let flags = ["--async", "--buffer-events", "10", "--flush-timeout", "30s", "--probe-protocol", "auto"];
    let workload = Overflowing::start(&flags, "cat /etc/hostname >/dev/null; sleep 0.02", 30);
    // The probe keeps 0..=9 and drops the rest. Until a stream carries them,
    // the exporter may push any of 1..=9 out for a better event, announced:
    // how many go depends on how many events come before the first stream
    // does. The first stream gets what it still holds, acknowledges 0, and
    // fails when the events after the dropped ones come: the next stream
    // announces the losses again, resends the others, and those, with gaps
    // between.
    let agent = RunningAgent::start_at(Behaviour::FailFirstStreamFrom(10), &workload.address);
    while agent.seen.lock().unwrap().streams < 2 || agent.events().last().is_none_or(|(s, _)| *s < 10) {
        assert!(workload.started.elapsed() < common::DEADLINE, "no resend after the failed stream");
        std::thread::sleep(Duration::from_millis(5));
    }
    let run = workload.finish();
    let seen = agent.seen.lock().unwrap();
    for (sequence, event) in &seen.events {
        assert_eq!(event, &run.events[*sequence as usize], "event {sequence} came under another's number");
    }
    let sequences: Vec<u64> = seen.events.iter().map(|(s, _)| *s).collect();
    let lost = |sequence: u64| seen.losses.iter().any(|&(first, last)| (first..=last).contains(&sequence));
    for sequence in 1..10 {
        let times = sequences.iter().filter(|&&s| s == sequence).count();
        // Came on the first stream and again on the next, or was pushed out
        // before either carried it and said lost: never both, never once.
        assert!(
            matches!((times, lost(sequence)), (0, true) | (2.., false)),
            "{sequence} received {times} times, lost: {}: {sequences:?}, losses {:?}",
            lost(sequence),
            seen.losses
        );
    }
    // Nothing is worth more than an exec, so nothing pushed one out: the
    // first cat's is among 1..=9, and was resent.
    let execs: Vec<u64> = (1..10).filter(|&s| run.events[s as usize].get("exec").is_some()).collect();
    assert!(!execs.is_empty(), "no exec among the first ten events: {:?}", &run.events[..10]);
    for sequence in execs {
        assert!(!lost(sequence), "exec {sequence} was pushed out: {sequences:?}, losses {:?}", seen.losses);
    }
}

/// Every number is an event received or in a Loss range, once, and the
/// Goodbye counts both; its counters.
fn assert_every_number_received_or_lost(seen: &Seen) -> Counters {
    let counters = seen.goodbye.expect("a Goodbye");
    let mut losses = seen.losses.clone();
    losses.sort_unstable();
    losses.dedup();
    let lost: u64 = losses.iter().map(|(first, last)| last - first + 1).sum();
    let received: std::collections::BTreeSet<u64> = seen.events.iter().map(|(s, _)| *s).collect();
    assert_eq!((counters.dropped, counters.events), (lost, received.len() as u64), "{losses:?} {received:?}");
    let mut numbers: Vec<u64> = received.iter().copied().collect();
    numbers.extend(losses.iter().flat_map(|&(first, last)| first..=last));
    numbers.sort_unstable();
    assert_eq!(numbers, (0..counters.events + counters.dropped).collect::<Vec<_>>());
    counters
}

#[test]
fn an_ack_past_a_loss_announced_ahead_of_unsent_events_forgets_none_of_them() {
    // More events than a batch holds (256) wait for the agent in a buffer
    // of 300 that overflows: the first stream announces the drops after
    // them, then sends one batch, which the agent acknowledges far beyond.
    let flags = ["--async", "--buffer-events", "300", "--flush-timeout", "30s"];
    let workload = Overflowing::start(&flags, "cat /etc/hostname >/dev/null", 400);
    let agent = RunningAgent::start_at(Behaviour::AckBeyond, &workload.address);
    while agent.events().last().is_none_or(|(s, _)| *s < 400) {
        assert!(workload.started.elapsed() < common::DEADLINE, "no event after the overflow was delivered");
        std::thread::sleep(Duration::from_millis(5));
    }
    let run = workload.finish();
    let seen = agent.seen.lock().unwrap();
    assert!(assert_every_number_received_or_lost(&seen).dropped > 0, "the buffer overflowed: {}", run.stderr);
    for (sequence, event) in &seen.events {
        assert_eq!(event, &run.events[*sequence as usize], "event {sequence} came under another's number");
    }
}

#[test]
fn a_full_buffer_keeps_what_matters_and_the_goodbye_adds_up_with_the_losses() {
    let address = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().to_string();
    // No agent until the workload is done: every event waits in a buffer of
    // 8, which the failed opens overflow before the last exec comes.
    let script =
        "for i in 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16; do true </nonexistent; done 2>/dev/null; exec /bin/true";
    let flags = ["--async", "--buffer-events", "8", "--flush-timeout", "30s", "--connect-timeout", "10s"];
    let mut trace = traced(&address, &flags, &["sh", "-c", script]);
    let child = trace.spawn();
    let started = Instant::now();
    let exited = |text: &str| text.lines().any(|l| l.contains("\"exit\"") && l.contains("\"syscall\":\"exit\""));
    while !exited(&std::fs::read_to_string(trace.events_path()).unwrap_or_default()) {
        assert!(started.elapsed() < common::DEADLINE, "the workload did not end");
        std::thread::sleep(Duration::from_millis(5));
    }
    let agent = RunningAgent::start_at(Behaviour::Faithful, &address);
    let run = trace.finish(child);
    assert_eq!(run.code(), Some(0), "{}", run.stderr);
    let seen = agent.seen.lock().unwrap();
    let counters = assert_every_number_received_or_lost(&seen);
    assert!(counters.dropped > 0, "the buffer overflowed: {}", run.stderr);
    // The failed opens made way for the execs.
    let execs = |events: Vec<&Value>| events.into_iter().filter(|e| e.get("exec").is_some()).count();
    assert_eq!(execs(seen.events.iter().map(|(_, e)| e).collect()), execs(run.events.iter().collect()));
    let failed_opens = seen.events.iter().filter(|(_, e)| e.get("open").is_some() && e["retval"] == "-2").count();
    assert!(failed_opens < 16, "{failed_opens}");
}
