//! A gRPC load generator for `serve`, used by `cargo xtask bench` to
//! measure how many events per second the sidecar ingests and how big an
//! encoded event is.
//!
//! `ingest_load AGENT CORPUS STREAMS EVENTS`: replays the events of CORPUS
//! (an `--events-file` from a real traced run) over STREAMS concurrent
//! sessions, EVENTS in all, in batches as the tracer sends them, and waits
//! until the agent has acknowledged every one. It prints one JSON object:
//! the rate from the first Hello to the last Ack, and the mean size of an
//! event on the wire (its bytes inside a batch), overall and per kind.

use std::collections::BTreeMap;
use std::time::Instant;

use prost::Message;
use tokio_stream::wrappers::ReceiverStream;

use cws_instrumentation::proto;
use proto::event_service_client::EventServiceClient;
use proto::{agent_message, tracer_message, EventBatch, Goodbye, Hello, TracerMessage};

/// The tracer's own batch size limit.
const BATCH_EVENTS: usize = 256;
/// Batches a stream may have sent but not seen acknowledged.
const WINDOW: usize = 16;

/// Bytes an event takes inside an EventBatch: tag, length, body.
fn wire_size(event: &proto::Event) -> usize {
    let body = event.encoded_len();
    1 + prost::encoding::encoded_len_varint(body as u64) + body
}

fn message(message: tracer_message::Message) -> TracerMessage {
    TracerMessage { message: Some(message) }
}

async fn session(agent: String, corpus: Vec<proto::Event>, index: usize, events: u64) -> Result<(), String> {
    let mut client = EventServiceClient::connect(agent).await.map_err(|e| format!("connect: {e}"))?;
    let (tx, rx) = tokio::sync::mpsc::channel(WINDOW);
    let hello = Hello { session_id: format!("ingest-load-{}-{index}", std::process::id()), ..Default::default() };
    tx.send(message(tracer_message::Message::Hello(hello))).await.map_err(|e| e.to_string())?;
    let mut acks = client.stream_events(ReceiverStream::new(rx)).await.map_err(|e| e.to_string())?.into_inner();
    let last = events.checked_sub(1).ok_or("no events")?;
    let sender = tokio::spawn(async move {
        let mut sequence = 0u64;
        let mut source = corpus.iter().cycle();
        while sequence <= last {
            let count = (last + 1 - sequence).min(BATCH_EVENTS as u64);
            let batch = EventBatch {
                first_sequence: sequence,
                events: source.by_ref().take(count as usize).cloned().collect(),
            };
            sequence += count;
            if tx.send(message(tracer_message::Message::Batch(batch))).await.is_err() {
                return Err("the agent closed the stream".to_owned());
            }
        }
        Ok(tx)
    });
    loop {
        let reply = acks.message().await.map_err(|e| e.to_string())?.ok_or("the agent ended the stream early")?;
        if let Some(agent_message::Message::Ack(ack)) = reply.message {
            if ack.sequence.is_some_and(|s| s >= last) {
                break;
            }
        }
    }
    let tx = sender.await.map_err(|e| e.to_string())??;
    let goodbye = Goodbye { exit: None, counters: None };
    let _ = tx.send(message(tracer_message::Message::Goodbye(goodbye))).await;
    Ok(())
}

fn main() {
    if let Err(e) = run() {
        eprintln!("ingest_load: {e}");
        std::process::exit(1);
    }
}

fn run() -> Result<(), String> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [agent, corpus_path, streams, events] = args.as_slice() else {
        return Err("usage: ingest_load AGENT CORPUS STREAMS EVENTS".into());
    };
    let streams: usize = streams.parse().map_err(|_| "STREAMS is a number")?;
    let events: u64 = events.parse().map_err(|_| "EVENTS is a number")?;
    let text = std::fs::read_to_string(corpus_path).map_err(|e| format!("{corpus_path}: {e}"))?;
    let corpus: Vec<proto::Event> = text
        .lines()
        .map(|line| serde_json::from_str(line).map_err(|e| format!("{corpus_path}: {e}: {line}")))
        .collect::<Result<_, _>>()?;
    if corpus.is_empty() {
        return Err(format!("{corpus_path} holds no events"));
    }

    let mut by_kind: BTreeMap<&str, (usize, usize)> = BTreeMap::new();
    for event in &corpus {
        let entry = by_kind.entry(cws_instrumentation::queue::kind(event)).or_default();
        entry.0 += 1;
        entry.1 += wire_size(event);
    }
    let total_bytes: usize = by_kind.values().map(|(_, bytes)| bytes).sum();

    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(|e| e.to_string())?;
    let started = Instant::now();
    runtime.block_on(async {
        let per_stream = events / streams as u64;
        let tasks: Vec<_> = (0..streams)
            .map(|i| tokio::spawn(session(format!("http://{agent}"), corpus.clone(), i, per_stream)))
            .collect();
        for task in tasks {
            task.await.map_err(|e| e.to_string())??;
        }
        Ok::<_, String>(())
    })?;
    let seconds = started.elapsed().as_secs_f64();
    let sent = events / streams as u64 * streams as u64;
    let kinds: Vec<String> = by_kind
        .iter()
        .map(|(kind, (count, bytes))| {
            format!("\"{kind}\": {{\"events\": {count}, \"mean_bytes\": {:.1}}}", *bytes as f64 / *count as f64)
        })
        .collect();
    println!(
        "{{\"events\": {sent}, \"streams\": {streams}, \"seconds\": {seconds:.3}, \"events_per_second\": {:.0}, \"corpus_events\": {}, \"mean_event_bytes\": {:.1}, \"by_kind\": {{{}}}}}",
        sent as f64 / seconds,
        corpus.len(),
        total_bytes as f64 / corpus.len() as f64,
        kinds.join(", ")
    );
    Ok(())
}
