//! The gRPC export to the agent: a bounded buffer of unacknowledged events
//! and a connection task that streams them.
//!
//! Every event gets the next sequence number of the session. It stays in
//! the buffer until the agent acknowledges it, so a reconnect resends what
//! the last connection may have lost (the agent drops duplicates). When the
//! buffer is full, the least valuable event no stream has carried yet is
//! dropped (`crate::queue::Value`: a failed open before an exec), the new
//! one when none is worth less; every drop is counted and announced to the
//! agent with a Loss message: loss is never silent. The Goodbye's counters
//! are the buffer's: `dropped` is the length of all Loss ranges, `events`
//! the numbers kept.
//!
//! Nothing the agent does can hold the tracer: once the workload is gone,
//! the whole delivery (connecting, waiting for headers, sending, waiting for
//! acks) is cut off at `--flush-timeout`, or at once on SIGTERM. Failed
//! streams are retried after a growing, jittered backoff, and a failure that
//! repeats is logged once, then counted.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch, Notify};
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, ClientTlsConfig, Endpoint};

use crate::address::Address;
use crate::auth::{AgentCredentials, Token};
use crate::ecs;
use crate::log::{causes, log};
use crate::proto::event_service_client::EventServiceClient;
use crate::proto::{
    agent_message, tracer_message, AgentMessage, Event, EventBatch, Goodbye, Hello, Loss, TracerMessage,
};

use super::retry::{flush_limit, pause, Backoff, Repeated};

/// Events per batch message, and its encoded size: a batch must stay well
/// under the agent's message size limit (4 MiB for `serve`), or it would be
/// refused and resent forever. One event is at most about 1 MiB (exec
/// arguments and environment are bounded to 260 KiB; a process has at
/// most 65536 supplementary groups, which a setgroups event carries twice).
const BATCH_EVENTS: usize = 256;
const BATCH_BYTES: usize = 1 << 20;
/// Memory the unacknowledged events may take (see `crate::queue::footprint`),
/// whatever `--buffer-events` says: exec events can be 250 KiB each.
pub(super) const BUFFER_BYTES: usize = 32 << 20;
/// The least time the agent has to acknowledge events, whatever
/// `--connect-timeout` says (0 there means "do not hold the workload").
const MIN_ANSWER_TIMEOUT: Duration = Duration::from_secs(1);

pub struct Options {
    pub address: Address,
    pub hello: Hello,
    pub capacity: usize,
    pub flush_timeout: Duration,
    /// How long the agent may leave sent events unanswered (no headers, no
    /// ack) before the stream is given up on: `--connect-timeout`.
    pub answer_timeout: Duration,
    /// Notified when the flush must end at once (SIGTERM after the workload's end).
    pub abandon: Arc<Notify>,
    /// Presented on every stream.
    pub credentials: AgentCredentials,
}

#[derive(Default)]
struct Buffer {
    /// Unacknowledged events, oldest first, with their sequence numbers
    /// and encoded lengths.
    events: VecDeque<(u64, Event, usize)>,
    /// The sum of their footprints (`crate::queue::footprint`).
    bytes: usize,
    /// Sequence number of the next event.
    next_sequence: u64,
    /// Dropped ranges the agent may not have heard of, in sequence order:
    /// each is announced on every connection until an ack passes it.
    losses: Vec<LossRange>,
    /// One past the last event a stream has carried: events from here on
    /// were never sent, and only they may be dropped for a better one.
    carried: u64,
    /// Events from `carried` on, by value (`Value as usize`).
    uncarried: [usize; 3],
    /// Events dropped in all.
    dropped: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct LossRange {
    first: u64,
    last: u64,
    /// Announced on the current connection.
    announced: bool,
}

fn value_index(event: &Event) -> usize {
    crate::queue::value(event) as usize
}

impl Buffer {
    fn push(&mut self, event: Event, capacity: usize) {
        let encoded_len = prost::Message::encoded_len(&event);
        let size = crate::queue::footprint_of_encoded(encoded_len);
        let value = value_index(&event);
        while !self.fits(size, capacity) {
            if !self.drop_less_valuable_than(value) {
                self.lose(1);
                return;
            }
        }
        let sequence = self.next_sequence;
        self.next_sequence += 1;
        self.bytes += size;
        self.uncarried[value] += 1;
        self.events.push_back((sequence, event, encoded_len));
    }

    fn fits(&self, size: usize, capacity: usize) -> bool {
        self.events.len() < capacity && self.bytes + size <= BUFFER_BYTES
    }

    /// Drops the oldest event that no stream carried and is worth less than
    /// `value`; false when there is none.
    fn drop_less_valuable_than(&mut self, value: usize) -> bool {
        if self.uncarried[..value].iter().all(|&n| n == 0) {
            return false;
        }
        let start = self.events.partition_point(|(s, _, _)| *s < self.carried);
        let Some(offset) = self.events.range(start..).position(|(_, e, _)| value_index(e) < value) else {
            return false;
        };
        let Some((sequence, event, encoded_len)) = self.events.remove(start + offset) else { return false };
        self.bytes -= crate::queue::footprint_of_encoded(encoded_len);
        self.uncarried[value_index(&event)] -= 1;
        self.dropped += 1;
        self.add_loss(sequence, sequence);
        true
    }

    /// Numbers `count` events that are not kept, as a loss to announce.
    fn lose(&mut self, count: u64) {
        if count == 0 {
            return;
        }
        let (first_lost, last_lost) = (self.next_sequence, self.next_sequence + count - 1);
        self.next_sequence += count;
        self.dropped += count;
        self.add_loss(first_lost, last_lost);
    }

    /// Records a lost range, in sequence order; joined to a neighbour that
    /// is not announced yet (an announced range is not widened afterwards).
    fn add_loss(&mut self, first: u64, last: u64) {
        let at = self.losses.partition_point(|r| r.last < first);
        let mut range = LossRange { first, last, announced: false };
        if at > 0 && !self.losses[at - 1].announced && self.losses[at - 1].last + 1 == first {
            range.first = self.losses.remove(at - 1).first;
            return self.add_loss(range.first, last);
        }
        if let Some(next) = self.losses.get_mut(at) {
            if !next.announced && last + 1 == next.first {
                next.first = first;
                return;
            }
        }
        self.losses.insert(at, range);
    }

    /// The loss ranges this connection has not announced yet.
    fn take_unannounced_losses(&mut self) -> Vec<(u64, u64)> {
        let mut fresh = Vec::new();
        for range in self.losses.iter_mut().filter(|r| !r.announced) {
            range.announced = true;
            fresh.push((range.first, range.last));
        }
        fresh
    }

    /// A new connection has announced nothing yet.
    fn forget_announcements(&mut self) {
        for range in &mut self.losses {
            range.announced = false;
        }
    }

    /// The events from `next` on that fit in one batch, now carried by a
    /// stream: they may no longer be dropped for better ones.
    fn take_batch(&mut self, next: u64) -> Vec<(u64, Event)> {
        let batch = self.batch_from(next);
        if let Some((last, _)) = batch.last() {
            for (sequence, event) in &batch {
                if *sequence >= self.carried {
                    self.uncarried[value_index(event)] -= 1;
                }
            }
            self.carried = self.carried.max(last + 1);
        }
        batch
    }

    /// The sequence a new stream starts from: the oldest event held, or the
    /// next one when all are acknowledged.
    fn resend_start(&self) -> u64 {
        self.events.front().map_or(self.next_sequence, |(s, _, _)| *s)
    }

    /// The events from `next` on that fit in one batch. A batch stops at a
    /// gap (dropped events): its events are numbered one by one.
    fn batch_from(&self, next: u64) -> Vec<(u64, Event)> {
        let start = self.events.partition_point(|(s, _, _)| *s < next);
        let mut bytes = 0;
        let mut expected = None;
        self.events
            .range(start..)
            .take(BATCH_EVENTS)
            .take_while(|(sequence, _, encoded_len)| {
                let first = bytes == 0;
                bytes += encoded_len;
                let follows = expected.is_none_or(|e| e == *sequence);
                expected = Some(sequence + 1);
                follows && (first || bytes <= BATCH_BYTES)
            })
            .map(|(s, event, _)| (*s, event.clone()))
            .collect()
    }

    /// An ack of `sequence` on the current stream, which sent the events
    /// before `sent` (never past `carried`). It says the agent stored what
    /// this stream carried up to `sequence`, and read the Losses announced on
    /// it up to there. Events from `sent` on stay whatever it says: this
    /// stream announces every Loss before its next batch, so an ack may pass
    /// a Loss announced ahead of events not sent yet, and an agent cannot
    /// have stored those. A Loss not announced on this stream stays too,
    /// to be announced.
    fn ack(&mut self, sequence: u64, sent: u64) {
        self.losses.retain(|r| !(r.announced && r.last <= sequence));
        while self.events.front().is_some_and(|(s, _, _)| *s <= sequence && *s < sent) {
            if let Some((_, _, encoded_len)) = self.events.pop_front() {
                self.bytes -= crate::queue::footprint_of_encoded(encoded_len);
            }
        }
    }

    /// The Goodbye's counters as the agent can check them: `dropped` is
    /// every event numbered in a Loss range, `events` every other number.
    fn count_into(&self, counters: &mut crate::proto::Counters) {
        counters.dropped = self.dropped;
        counters.events = self.next_sequence - self.dropped;
    }
}

/// State shared by the queue drain (producer) and the connection task.
type Shared = super::handoff::Shared<Buffer>;

/// The exporter's handle on the connection task.
pub struct Exporter {
    shared: Arc<Shared>,
    goodbye: watch::Sender<Option<Goodbye>>,
    task: tokio::task::JoinHandle<Delivery>,
}

/// What became of the events at exit.
#[derive(Debug, Default, Clone)]
pub struct Delivery {
    pub undelivered: u64,
    pub dropped: u64,
    pub reconnects: u64,
    /// Not sent, by kind: the agent has no message for them (Datadog mode).
    pub skipped: Skipped,
}

/// Events by kind (`queue::kind`).
pub type Skipped = std::collections::BTreeMap<&'static str, u64>;

impl Exporter {
    /// Starts connecting at once. `connected` fires when the first stream
    /// is up (the tracer holds the workload until then, or a timeout).
    pub fn start(options: Options, connected: std::sync::mpsc::Sender<()>) -> Exporter {
        let shared = Arc::new(Shared::new(options.capacity));
        let (goodbye, goodbye_rx) = watch::channel(None);
        let task = tokio::spawn(run(options, Arc::clone(&shared), connected, goodbye_rx));
        Exporter { shared, goodbye, task }
    }

    pub fn write(&self, batch: &[Event]) {
        let mut buffer = self.shared.buffer();
        for event in batch {
            buffer.push(event.clone(), self.shared.capacity);
        }
        drop(buffer);
        self.shared.wake.notify_one();
    }

    /// Counts `count` events dropped before they could be written here,
    /// after those written so far: they are announced as a loss.
    pub fn lose(&self, count: u64) {
        self.shared.buffer().lose(count);
        self.shared.wake.notify_one();
    }

    /// Sends what is left and the Goodbye; waits for acknowledgements until
    /// the flush timeout.
    pub async fn finish(self, goodbye: Goodbye) -> Delivery {
        let _ = self.goodbye.send(Some(goodbye));
        self.shared.wake.notify_one();
        self.task.await.unwrap_or_default()
    }
}

async fn connect(address: &Address, tls: Option<&ClientTlsConfig>) -> Result<Channel, String> {
    let channel = match address {
        Address::Tcp(hostport) => {
            let scheme = if tls.is_some() { "https" } else { "http" };
            let mut endpoint = Endpoint::from_shared(format!("{scheme}://{hostport}")).map_err(|e| e.to_string())?;
            if let Some(tls) = tls {
                endpoint = endpoint.tls_config(tls.clone()).map_err(|e| causes(&e))?;
            }
            endpoint.connect_timeout(Duration::from_secs(2)).tcp_nodelay(true).connect().await
        }
        Address::Unix(path) => {
            // The URI is required but unused: the connector dials the socket.
            let path = path.clone();
            let connector = tower::service_fn(move |_: tonic::transport::Uri| {
                let path = path.clone();
                async move { tokio::net::UnixStream::connect(path).await.map(hyper_util::rt::TokioIo::new) }
            });
            Endpoint::from_static("http://agent").connect_with_connector(connector).await
        }
    };
    channel.map_err(|e| causes(&e))
}

/// What the connections learned, kept across them.
#[derive(Default)]
struct Progress {
    connections: u64,
    /// An ack came on the current stream: the agent works.
    acknowledged: bool,
    failures: Repeated,
    /// Acks beyond what their stream carried.
    acks_beyond: Repeated,
}

async fn run(
    mut options: Options,
    shared: Arc<Shared>,
    connected: std::sync::mpsc::Sender<()>,
    goodbye: watch::Receiver<Option<Goodbye>>,
) -> Delivery {
    let mut progress = Progress::default();
    let abandon = Arc::clone(&options.abandon);
    let limit = flush_limit(goodbye.clone(), options.flush_timeout, &abandon);
    let abandoned = tokio::select! {
        () = deliver(&mut options, &shared, &connected, goodbye, &mut progress) => false,
        abandoned = limit => abandoned,
    };
    if abandoned {
        log!("stopped waiting for the agent at {}: a stop signal after the workload's end", options.address);
    }
    progress.failures.settle();
    progress.acks_beyond.settle();
    let buffer = shared.buffer();
    let delivery = Delivery {
        undelivered: buffer.events.len() as u64,
        dropped: buffer.dropped,
        reconnects: progress.connections.saturating_sub(1),
        skipped: Skipped::new(),
    };
    if delivery.undelivered + delivery.dropped > 0 {
        log!(
            "{} events were not delivered to the agent at {} ({} dropped when the buffer was full)",
            delivery.undelivered + delivery.dropped,
            options.address,
            delivery.dropped
        );
    }
    delivery
}

/// Connects and streams until everything is acknowledged after the
/// Goodbye; retries failed streams after a backoff. Never ends otherwise:
/// the caller cuts it off.
async fn deliver(
    options: &mut Options,
    shared: &Shared,
    connected: &std::sync::mpsc::Sender<()>,
    mut goodbye: watch::Receiver<Option<Goodbye>>,
    progress: &mut Progress,
) {
    // Read once per run, while the first connection is being made; every
    // Hello, from the first on, carries what it said.
    let mut ecs = ecs::start_fetch(&options.hello);
    let mut backoff = Backoff::new();
    loop {
        let failure = match connect(&options.address, options.credentials.tls.as_ref()).await {
            Ok(channel) => {
                ecs::add_fetched(&mut ecs, &mut options.hello).await;
                progress.connections += 1;
                progress.acknowledged = false;
                let result = stream(options, shared, channel, connected, &mut goodbye, progress).await;
                if progress.acknowledged {
                    backoff.reset();
                }
                match result {
                    Ok(()) => return,
                    Err(error) => (format!("stream to the agent at {} failed", options.address), error),
                }
            }
            Err(error) => (format!("cannot reach the agent at {}", options.address), error),
        };
        progress.failures.record(failure.0, failure.1, "; retrying");
        pause(&mut backoff, &mut goodbye).await;
    }
}

/// What the reader task saw of the agent's side of a stream.
enum Reply {
    /// The response headers: the agent took the stream.
    Headers,
    Message(AgentMessage),
    /// The agent ended its side with status OK.
    Ended,
    Failed(String),
}

/// A status as one line; its message comes from the peer, so it is quoted.
fn describe(status: &tonic::Status) -> String {
    let mut line = format!("status {:?} {:?}", status.code(), status.message());
    if let Some(source) = std::error::Error::source(status) {
        line = format!("{line}: {}", causes(source));
    }
    line
}

/// Opens the stream and passes on everything the agent sends. It runs on
/// its own, so that the tracer sends while the agent holds back its
/// response headers (grpcio sends them with its first message).
async fn read_replies(
    channel: Channel,
    token: Option<Token>,
    requests: mpsc::Receiver<TracerMessage>,
    replies: mpsc::Sender<Reply>,
) {
    let mut client = EventServiceClient::new(channel);
    let mut request = tonic::Request::new(ReceiverStream::new(requests));
    if let Some(token) = &token {
        token.attach(request.metadata_mut());
    }
    let mut stream = match client.stream_events(request).await {
        Ok(response) => response.into_inner(),
        Err(status) => {
            let _ = replies.send(Reply::Failed(describe(&status))).await;
            return;
        }
    };
    if replies.send(Reply::Headers).await.is_err() {
        return;
    }
    loop {
        let reply = match stream.message().await {
            Ok(Some(message)) => Reply::Message(message),
            Ok(None) => Reply::Ended,
            Err(status) => Reply::Failed(describe(&status)),
        };
        let last = !matches!(reply, Reply::Message(_));
        if replies.send(reply).await.is_err() || last {
            return;
        }
    }
}

/// Aborts a task when dropped: a stream given up on takes its reader along.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// What one stream has sent and is owed.
struct Sent {
    /// The next event to send.
    next: u64,
    /// One past the last sequence this stream carried (events and losses):
    /// an ack may not reach it, and one that does is said. What is before
    /// the resend start was acknowledged already, so an ack of it changes
    /// nothing.
    carried: u64,
    /// Since when the agent owes an ack for events this stream sent: a peer
    /// that takes events and never answers is given up on, not waited on.
    owed_since: Option<Instant>,
    answer_timeout: Duration,
}

impl Sent {
    fn answer_deadline(&self) -> Option<Instant> {
        self.owed_since.map(|since| since + self.answer_timeout)
    }

    fn no_answer(&self) -> String {
        format!("no answer from the agent within {:?} of sending it events", self.answer_timeout)
    }

    /// Sends, waiting for the agent to read at most until the answer deadline.
    async fn send(&self, sender: &mpsc::Sender<TracerMessage>, message: tracer_message::Message) -> Result<(), String> {
        let message = TracerMessage { message: Some(message) };
        let sent = match self.answer_deadline() {
            Some(deadline) => tokio::time::timeout_at(deadline, sender.send(message)).await,
            None => Ok(sender.send(message).await),
        };
        sent.map_err(|_| self.no_answer())?.map_err(|e| e.to_string())
    }
}

/// What a reply means for the stream.
enum Flow {
    Continue,
    /// Everything is acknowledged and the agent ended its side.
    Done,
}

/// Acts on one reply from the agent. `half_closed`: all was acknowledged
/// after the Goodbye and the tracer ended its side.
fn on_reply(
    reply: Option<Reply>,
    half_closed: bool,
    sent: &mut Sent,
    options: &Options,
    shared: &Shared,
    connected: &std::sync::mpsc::Sender<()>,
    progress: &mut Progress,
) -> Result<Flow, String> {
    match reply {
        Some(Reply::Headers) => {
            let _ = connected.send(());
        }
        Some(Reply::Message(AgentMessage { message: Some(agent_message::Message::Ack(ack)) })) => {
            if let Some(sequence) = ack.sequence {
                take_ack(options, shared, sequence, sent, progress);
            }
            // Answered; what is sent and still unacknowledged is owed from now.
            let outstanding = shared.buffer().events.front().is_some_and(|(s, _, _)| *s < sent.next);
            sent.owed_since = outstanding.then(Instant::now);
        }
        // A Welcome, or a message of a later protocol: nothing to act on.
        Some(Reply::Message(_)) => {}
        // All is acknowledged: however the agent ends, nothing is left to send.
        Some(Reply::Ended | Reply::Failed(_)) | None if half_closed => return Ok(Flow::Done),
        Some(Reply::Ended) | None => return Err("closed by the agent".into()),
        Some(Reply::Failed(error)) => return Err(error),
    }
    Ok(Flow::Continue)
}

/// One connection: Hello, then everything unacknowledged, then new events
/// as they come; the Goodbye once the workload is gone. Ok when all is
/// acknowledged after the Goodbye and the agent ended its side.
async fn stream(
    options: &Options,
    shared: &Shared,
    channel: Channel,
    connected: &std::sync::mpsc::Sender<()>,
    goodbye: &mut watch::Receiver<Option<Goodbye>>,
    progress: &mut Progress,
) -> Result<(), String> {
    let (tx, rx) = mpsc::channel::<TracerMessage>(16);
    let (replies_tx, mut replies) = mpsc::channel(16);
    let hello = TracerMessage { message: Some(tracer_message::Message::Hello(options.hello.clone())) };
    tx.send(hello).await.map_err(|e| e.to_string())?;
    let _reader = AbortOnDrop(tokio::spawn(read_replies(channel, options.credentials.token.clone(), rx, replies_tx)));
    // Resend from the oldest unacknowledged event, and every loss not known heard.
    let start = {
        let mut buffer = shared.buffer();
        buffer.forget_announcements();
        buffer.resend_start()
    };
    let answer_timeout = options.answer_timeout.max(MIN_ANSWER_TIMEOUT);
    let mut sent = Sent { next: start, carried: start, owed_since: None, answer_timeout };
    let mut goodbye_sent = false;
    let mut tx = Some(tx);
    loop {
        if let Some(sender) = &tx {
            // Send everything available; acks that came meanwhile first, so
            // that an agent slow to read but answering is not given up on.
            loop {
                while let Ok(reply) = replies.try_recv() {
                    on_reply(Some(reply), false, &mut sent, options, shared, connected, progress)?;
                }
                let (losses, batch) = {
                    let mut buffer = shared.buffer();
                    (buffer.take_unannounced_losses(), buffer.take_batch(sent.next))
                };
                for (first, last) in losses {
                    sent.carried = sent.carried.max(last + 1);
                    let loss = Loss { first_sequence: first, last_sequence: last };
                    sent.send(sender, tracer_message::Message::Loss(loss)).await?;
                }
                let Some(&(first_sequence, _)) = batch.first() else { break };
                sent.next = batch.last().map_or(sent.next, |(s, _)| s + 1);
                sent.carried = sent.carried.max(sent.next);
                sent.owed_since.get_or_insert_with(Instant::now);
                let events = batch.into_iter().map(|(_, e)| e).collect();
                sent.send(sender, tracer_message::Message::Batch(EventBatch { first_sequence, events })).await?;
            }
            let bye = *goodbye.borrow();
            if let Some(mut bye) = bye {
                if !goodbye_sent {
                    if let Some(counters) = bye.counters.as_mut() {
                        counters.reconnects = progress.connections.saturating_sub(1);
                        shared.buffer().count_into(counters);
                    }
                    sent.send(sender, tracer_message::Message::Goodbye(bye)).await?;
                    goodbye_sent = true;
                }
                if shared.buffer().events.is_empty() {
                    // End our side and wait for the agent to end its own: then
                    // the Goodbye has been read, not lost in a torn-down stream.
                    tx = None;
                }
            }
        }
        tokio::select! {
            reply = replies.recv() => {
                if let Flow::Done = on_reply(reply, tx.is_none(), &mut sent, options, shared, connected, progress)? {
                    return Ok(());
                }
            }
            _ = shared.wake.notified(), if tx.is_some() => {}
            Ok(()) = goodbye.changed(), if tx.is_some() => {}
            () = sleep_until_some(sent.answer_deadline()), if tx.is_some() => return Err(sent.no_answer()),
        }
    }
}

async fn sleep_until_some(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

/// Applies an ack, cut to what the stream carried: an agent that
/// acknowledges more would make the tracer forget events it never sent.
fn take_ack(options: &Options, shared: &Shared, sequence: u64, sent: &Sent, progress: &mut Progress) {
    let carried = sent.carried;
    let sequence = if sequence < carried {
        sequence
    } else {
        let what = format!("the agent at {} acknowledges events it was not sent", options.address);
        let detail = format!("an ack of {sequence} on a stream that carried sequences up to {carried} (excluded)");
        progress.acks_beyond.record(what, detail, "; acks are taken only up to what their stream carried");
        match carried.checked_sub(1) {
            Some(last) => last,
            None => return,
        }
    };
    let mut buffer = shared.buffer();
    let held = buffer.events.len();
    buffer.ack(sequence, sent.next);
    if buffer.events.len() < held && !progress.acknowledged {
        // The agent works: the backoff starts over, the failure streak is over.
        progress.acknowledged = true;
        progress.failures.settle();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::event::Payload;

    fn ranges(buffer: &Buffer) -> Vec<(u64, u64)> {
        buffer.losses.iter().map(|r| (r.first, r.last)).collect()
    }

    fn sequences(buffer: &Buffer) -> Vec<u64> {
        buffer.events.iter().map(|(s, _, _)| *s).collect()
    }

    /// A new stream announces every loss and sends every event held, in
    /// rounds as `stream` does, then the agent acknowledges `sequence`.
    fn send_all_and_ack(buffer: &mut Buffer, sequence: u64) {
        buffer.forget_announcements();
        let mut next = buffer.resend_start();
        loop {
            buffer.take_unannounced_losses();
            let Some(&(last, _)) = buffer.take_batch(next).last() else { break };
            next = last + 1;
        }
        buffer.ack(sequence, next);
    }

    #[test]
    fn a_full_buffer_drops_new_events_as_contiguous_losses() {
        let mut buffer = Buffer::default();
        for _ in 0..5 {
            buffer.push(Event::default(), 2);
        }
        assert_eq!(buffer.events.iter().map(|(s, _, _)| *s).collect::<Vec<_>>(), vec![0, 1]);
        assert_eq!((ranges(&buffer), buffer.dropped), (vec![(2, 4)], 3));
        send_all_and_ack(&mut buffer, 0);
        buffer.push(Event::default(), 2);
        assert_eq!(buffer.events.iter().map(|(s, _, _)| *s).collect::<Vec<_>>(), vec![1, 5]);
        // Drops made before the exporter (by the protocol probe) come as one range.
        buffer.lose(2);
        assert_eq!((ranges(&buffer), buffer.next_sequence, buffer.dropped), (vec![(2, 4), (6, 7)], 8, 5));
    }

    #[test]
    fn losses_are_announced_on_every_connection_until_an_ack_passes_them() {
        let mut buffer = Buffer::default();
        for _ in 0..3 {
            buffer.push(Event::default(), 1);
        }
        assert_eq!(buffer.take_unannounced_losses(), vec![(1, 2)]);
        buffer.push(Event::default(), 1);
        assert_eq!(buffer.take_unannounced_losses(), vec![(3, 3)], "an announced range is not widened");
        assert_eq!(buffer.take_unannounced_losses(), vec![]);
        // The connection died before the agent read them: a new one says them again.
        buffer.forget_announcements();
        assert_eq!(buffer.take_unannounced_losses(), vec![(1, 2), (3, 3)]);
        // An event after the losses acknowledged: they were heard.
        assert_eq!(buffer.take_batch(0).len(), 1);
        buffer.ack(0, 1);
        assert_eq!(ranges(&buffer), vec![(1, 2), (3, 3)], "an ack before them says nothing of them");
        buffer.push(Event::default(), 1);
        assert_eq!(buffer.take_batch(1).len(), 1);
        buffer.ack(4, 5);
        assert_eq!(ranges(&buffer), vec![]);
    }

    #[test]
    fn a_batch_stops_at_dropped_events_so_that_its_numbering_holds() {
        let mut buffer = Buffer::default();
        for _ in 0..2 {
            buffer.push(Event::default(), 2);
        }
        buffer.push(Event::default(), 2); // dropped: sequence 2
        send_all_and_ack(&mut buffer, 0);
        buffer.push(Event::default(), 2); // sequence 3, after the gap
        let sequences = |batch: Vec<(u64, Event)>| batch.into_iter().map(|(s, _)| s).collect::<Vec<_>>();
        assert_eq!(sequences(buffer.batch_from(0)), vec![1]);
        assert_eq!(sequences(buffer.batch_from(2)), vec![3]);
        assert_eq!(buffer.resend_start(), 1);
        send_all_and_ack(&mut buffer, 3);
        assert_eq!(buffer.resend_start(), 4, "all acknowledged: a new stream starts at the next event");
    }

    #[test]
    fn the_buffer_holds_at_most_its_bytes_whatever_the_count() {
        let exec = crate::proto::ExecEvent { args: vec!["x".repeat(350); 356], ..Default::default() };
        let event = Event { payload: Some(crate::proto::event::Payload::Exec(exec)), ..Default::default() };
        let fits = BUFFER_BYTES / crate::queue::footprint(&event);
        let mut buffer = Buffer::default();
        for _ in 0..fits + 3 {
            buffer.push(event.clone(), usize::MAX);
        }
        assert_eq!((buffer.events.len(), buffer.dropped), (fits, 3));
        assert!(buffer.bytes <= BUFFER_BYTES);
        send_all_and_ack(&mut buffer, 0);
        buffer.push(event, usize::MAX);
        assert_eq!((buffer.events.len(), buffer.dropped), (fits, 3), "an ack makes room again");
    }

    fn failed_open() -> Event {
        Event { retval: Some(-2), payload: Some(Payload::Open(Default::default())), ..Default::default() }
    }

    fn exec() -> Event {
        Event { retval: Some(0), payload: Some(Payload::Exec(Default::default())), ..Default::default() }
    }

    #[test]
    fn a_full_buffer_drops_its_least_valuable_unsent_event_for_a_better_one() {
        let mut buffer = Buffer::default();
        for event in [failed_open(), failed_open(), exec()] {
            buffer.push(event, 3);
        }
        // An exec pushes out the oldest failed open, then the next one.
        buffer.push(exec(), 3);
        buffer.push(exec(), 3);
        assert_eq!(sequences(&buffer), vec![2, 3, 4]);
        assert_eq!(ranges(&buffer), vec![(0, 1)], "neighbouring losses are one range");
        // Nothing is worth less than a failed open: it is the one dropped.
        buffer.push(failed_open(), 3);
        assert_eq!((ranges(&buffer), buffer.dropped), (vec![(0, 1), (5, 5)], 3));
        // A loss announced already is not widened by a later eviction.
        send_all_and_ack(&mut buffer, 4);
        assert_eq!((sequences(&buffer), ranges(&buffer)), (vec![], vec![(5, 5)]));
        for event in [failed_open(), exec(), exec(), exec()] {
            buffer.push(event, 3);
        }
        assert_eq!((sequences(&buffer), ranges(&buffer)), (vec![7, 8, 9], vec![(5, 5), (6, 6)]));
    }

    #[test]
    fn an_event_a_stream_carried_is_never_dropped_for_another() {
        let mut buffer = Buffer::default();
        buffer.push(failed_open(), 2);
        buffer.push(failed_open(), 2);
        assert_eq!(buffer.take_batch(0).len(), 2);
        // The agent may have stored them: the exec is the one lost.
        buffer.push(exec(), 2);
        assert_eq!((sequences(&buffer), ranges(&buffer)), (vec![0, 1], vec![(2, 2)]));
        buffer.ack(0, 2);
        buffer.push(failed_open(), 2);
        buffer.push(exec(), 2);
        assert_eq!((sequences(&buffer), ranges(&buffer)), (vec![1, 4], vec![(2, 3)]));
    }

    #[test]
    fn an_ack_past_a_loss_announced_ahead_keeps_what_the_stream_did_not_send_or_say_yet() {
        let mut buffer = Buffer::default();
        let unsent = BATCH_EVENTS as u64;
        for _ in 0..unsent {
            buffer.push(exec(), usize::MAX);
        }
        buffer.push(failed_open(), usize::MAX); // unsent
        buffer.push(exec(), usize::MAX); // unsent + 1
        buffer.lose(1); // unsent + 2: the tracer's queue dropped one
                        // The stream's first round: every loss, then a full batch; the rest waits.
        assert_eq!(buffer.take_unannounced_losses(), vec![(unsent + 2, unsent + 2)]);
        assert_eq!(buffer.take_batch(0).len() as u64, unsent);
        // Meanwhile an exec pushes the failed open out.
        buffer.push(exec(), unsent as usize + 2);
        // The agent stored the batch and read the Loss: it says so before the rest is sent.
        buffer.ack(unsent + 2, unsent);
        assert_eq!(sequences(&buffer), vec![unsent + 1, unsent + 3], "what the stream did not send is kept");
        assert_eq!(ranges(&buffer), vec![(unsent, unsent)], "a loss the stream did not announce is kept");
        // The next round says it, then sends the rest.
        assert_eq!(buffer.take_unannounced_losses(), vec![(unsent, unsent)]);
        let next: Vec<u64> = buffer.take_batch(unsent).iter().map(|(s, _)| *s).collect();
        assert_eq!(next, vec![unsent + 1]);
    }

    #[test]
    fn the_goodbye_counts_every_loss_range_and_every_other_number() {
        let mut buffer = Buffer::default();
        for event in [failed_open(), exec(), failed_open(), exec(), exec()] {
            buffer.push(event, 2);
        }
        buffer.lose(3);
        let mut counters = crate::proto::Counters::default();
        buffer.count_into(&mut counters);
        let lost: u64 = ranges(&buffer).iter().map(|(first, last)| last - first + 1).sum();
        assert_eq!((counters.dropped, counters.events), (lost, buffer.next_sequence - lost));
        assert_eq!((counters.dropped, counters.events), (6, 2));
    }
}
