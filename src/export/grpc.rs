//! The gRPC export to the agent: a bounded buffer of unacknowledged events
//! and a connection task that streams them.
//!
//! Every event gets the next sequence number of the session. It stays in
//! the buffer until the agent acknowledges it, so a reconnect resends what
//! the last connection may have lost (the agent drops duplicates). When the
//! buffer is full, new events are dropped, counted, and announced to the
//! agent with a Loss message: loss is never silent.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{mpsc, watch, Notify};
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Endpoint;

use crate::address::Address;
use crate::log::{causes, log};
use crate::proto::event_service_client::EventServiceClient;
use crate::proto::{agent_message, tracer_message, Event, EventBatch, Goodbye, Hello, Loss, TracerMessage};
use crate::{context, ecs};

/// Events per batch message, and its encoded size: a batch must stay well
/// under the agent's message size limit (4 MiB for `serve`), or it would be
/// refused and resent forever. One event is at most about 260 KiB (exec
/// arguments and environment are bounded).
const BATCH: usize = 256;
const BATCH_BYTES: usize = 1 << 20;
/// Memory the unacknowledged events may take (see `crate::queue::footprint`),
/// whatever `--buffer-events` says: exec events can be 250 KiB each.
const BUFFER_BYTES: usize = 32 << 20;
const BACKOFF_FIRST: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

pub struct Options {
    pub address: Address,
    pub hello: Hello,
    pub capacity: usize,
    pub flush_timeout: Duration,
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
    /// Dropped ranges the agent may not have heard of, oldest first: each is
    /// announced on every connection until an ack passes it.
    losses: Vec<(u64, u64)>,
    /// How many of `losses` the current connection has announced.
    announced: usize,
    /// Events dropped in all.
    dropped: u64,
}

impl Buffer {
    fn push(&mut self, event: Event, capacity: usize) {
        let sequence = self.next_sequence;
        self.next_sequence += 1;
        let encoded_len = prost::Message::encoded_len(&event);
        let size = crate::queue::footprint_of_encoded(encoded_len);
        if self.events.len() < capacity && self.bytes + size <= BUFFER_BYTES {
            self.bytes += size;
            self.events.push_back((sequence, event, encoded_len));
            return;
        }
        self.dropped += 1;
        // An announced range is not widened afterwards: the rest is a range of its own.
        let open = self.losses.len() > self.announced;
        match self.losses.last_mut() {
            Some((_, last)) if open && *last + 1 == sequence => *last = sequence,
            _ => self.losses.push((sequence, sequence)),
        }
    }

    /// The loss ranges this connection has not announced yet.
    fn take_unannounced_losses(&mut self) -> Vec<(u64, u64)> {
        let fresh = self.losses[self.announced..].to_vec();
        self.announced = self.losses.len();
        fresh
    }

    /// An ack of `sequence` also says the agent read every Loss sent before
    /// it on this stream, and each was sent before any later event.
    fn ack(&mut self, sequence: u64) {
        let heard = self.losses.partition_point(|(_, last)| *last < sequence);
        self.losses.drain(..heard);
        self.announced = self.announced.saturating_sub(heard);
        while self.events.front().is_some_and(|(s, _, _)| *s <= sequence) {
            if let Some((_, _, encoded_len)) = self.events.pop_front() {
                self.bytes -= crate::queue::footprint_of_encoded(encoded_len);
            }
        }
    }
}

/// State shared by the queue drain (producer) and the connection task.
struct Shared {
    buffer: Mutex<Buffer>,
    capacity: usize,
    wake: Notify,
}

impl Shared {
    fn buffer(&self) -> std::sync::MutexGuard<'_, Buffer> {
        self.buffer.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The exporter's handle on the connection task.
pub struct Exporter {
    shared: Arc<Shared>,
    goodbye: watch::Sender<Option<Goodbye>>,
    task: tokio::task::JoinHandle<Delivery>,
}

/// What became of the events at exit.
#[derive(Debug, Default, Clone, Copy)]
pub struct Delivery {
    pub undelivered: u64,
    pub dropped: u64,
    pub reconnects: u64,
}

impl Exporter {
    /// Starts connecting at once. `connected` fires when the first stream
    /// is up (the tracer holds the workload until then, or a timeout).
    pub fn start(options: Options, connected: std::sync::mpsc::Sender<()>) -> Exporter {
        let shared = Arc::new(Shared { buffer: Mutex::default(), capacity: options.capacity, wake: Notify::new() });
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

    /// Sends what is left and the Goodbye; waits for acknowledgements until
    /// the flush timeout.
    pub async fn finish(self, goodbye: Goodbye) -> Delivery {
        let _ = self.goodbye.send(Some(goodbye));
        self.shared.wake.notify_one();
        self.task.await.unwrap_or_default()
    }
}

async fn connect(address: &Address) -> Result<EventServiceClient<tonic::transport::Channel>, String> {
    let channel = match address {
        Address::Tcp(hostport) => {
            let endpoint = Endpoint::from_shared(format!("http://{hostport}")).map_err(|e| e.to_string())?;
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
    let channel = channel.map_err(|e| causes(&e))?;
    Ok(EventServiceClient::new(channel))
}

async fn run(
    mut options: Options,
    shared: Arc<Shared>,
    connected: std::sync::mpsc::Sender<()>,
    mut goodbye: watch::Receiver<Option<Goodbye>>,
) -> Delivery {
    // Read once per run, while the first connection is being made; every
    // Hello, from the first on, carries what it said.
    let ecs_uri = options.hello.container.as_ref().map_or("", |c| c.ecs_metadata_uri.as_str());
    let mut ecs = (!ecs_uri.is_empty()).then(|| tokio::spawn(ecs::fetch(ecs_uri.to_owned())));
    let mut delivery = Delivery::default();
    let mut backoff = BACKOFF_FIRST;
    let mut deadline: Option<Instant> = None;
    let mut last_error = String::new();
    let mut connections = 0u64;
    loop {
        if deadline.is_none() && goodbye.borrow().is_some() {
            deadline = Some(Instant::now() + options.flush_timeout);
        }
        if deadline.is_some_and(|d| Instant::now() >= d) {
            break;
        }
        let client = match connect(&options.address).await {
            Ok(client) => client,
            Err(error) => {
                if error != last_error {
                    log!("cannot reach the agent at {}: {error}; retrying", options.address);
                    last_error = error;
                }
                let wait = deadline.map_or(backoff, |d| backoff.min(d.saturating_duration_since(Instant::now())));
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = goodbye.changed() => {}
                }
                backoff = (backoff * 2).min(BACKOFF_MAX);
                continue;
            }
        };
        if let Some(fetch) = ecs.take() {
            // Bounded by the fetch's own timeout; it has said why if it failed.
            if let Ok(Some(metadata)) = fetch.await {
                context::add_ecs(&mut options.hello, metadata);
            }
        }
        connections += 1;
        delivery.reconnects = connections - 1;
        match stream(&options, &shared, client, &connected, &mut goodbye, &mut deadline, &delivery).await {
            Ok(()) => break,
            Err(error) => {
                log!("stream to the agent at {} ended: {error}; reconnecting", options.address);
                backoff = BACKOFF_FIRST;
            }
        }
    }
    let buffer = shared.buffer();
    delivery.undelivered = buffer.events.len() as u64;
    delivery.dropped = buffer.dropped;
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

/// One connection: Hello, then everything unacknowledged, then new events
/// as they come; the Goodbye once the workload is gone. Ok when all is
/// acknowledged after the Goodbye (or the flush deadline passed).
async fn stream(
    options: &Options,
    shared: &Shared,
    mut client: EventServiceClient<tonic::transport::Channel>,
    connected: &std::sync::mpsc::Sender<()>,
    goodbye: &mut watch::Receiver<Option<Goodbye>>,
    deadline: &mut Option<Instant>,
    delivery: &Delivery,
) -> Result<(), String> {
    let (tx, rx) = mpsc::channel::<TracerMessage>(16);
    let message = |m| TracerMessage { message: Some(m) };
    tx.send(message(tracer_message::Message::Hello(options.hello.clone()))).await.map_err(|e| e.to_string())?;
    let mut responses = client.stream_events(ReceiverStream::new(rx)).await.map_err(|e| e.to_string())?.into_inner();
    let _ = connected.send(());
    // Resend from the oldest unacknowledged event, and every loss not known heard.
    let mut next = {
        let mut buffer = shared.buffer();
        buffer.announced = 0;
        buffer.events.front().map_or(0, |(s, _, _)| *s)
    };
    let mut goodbye_sent = false;
    loop {
        // Send everything available.
        loop {
            let (losses, batch) = {
                let mut buffer = shared.buffer();
                let losses = buffer.take_unannounced_losses();
                let start = buffer.events.partition_point(|(s, _, _)| *s < next);
                let mut bytes = 0;
                let batch: Vec<(u64, Event)> = buffer
                    .events
                    .range(start..)
                    .take(BATCH)
                    .take_while(|(_, _, encoded_len)| {
                        let first = bytes == 0;
                        bytes += encoded_len;
                        first || bytes <= BATCH_BYTES
                    })
                    .map(|(s, event, _)| (*s, event.clone()))
                    .collect();
                (losses, batch)
            };
            for (first, last) in losses {
                let loss = Loss { first_sequence: first, last_sequence: last };
                tx.send(message(tracer_message::Message::Loss(loss))).await.map_err(|e| e.to_string())?;
            }
            let Some(&(first_sequence, _)) = batch.first() else { break };
            next = batch.last().map_or(next, |(s, _)| s + 1);
            let events = batch.into_iter().map(|(_, e)| e).collect();
            tx.send(message(tracer_message::Message::Batch(EventBatch { first_sequence, events })))
                .await
                .map_err(|e| e.to_string())?;
        }
        let all_acked = shared.buffer().events.is_empty();
        let bye = *goodbye.borrow();
        if let Some(mut bye) = bye {
            deadline.get_or_insert_with(|| Instant::now() + options.flush_timeout);
            if !goodbye_sent {
                if let Some(counters) = bye.counters.as_mut() {
                    counters.reconnects = delivery.reconnects;
                }
                tx.send(message(tracer_message::Message::Goodbye(bye))).await.map_err(|e| e.to_string())?;
                goodbye_sent = true;
            }
            if all_acked {
                // End our side and wait for the agent to end its own: then
                // the Goodbye has been read, not lost in a torn-down stream.
                drop(tx);
                let until = deadline.unwrap_or_else(Instant::now);
                while let Ok(Ok(Some(_))) = tokio::time::timeout_at(until, responses.message()).await {}
                return Ok(());
            }
        }
        let until = deadline.map_or_else(|| Instant::now() + Duration::from_secs(3600), |d| d);
        tokio::select! {
            response = responses.message() => match response {
                Ok(Some(reply)) => {
                    if let Some(agent_message::Message::Ack(ack)) = reply.message {
                        shared.buffer().ack(ack.sequence);
                    }
                }
                Ok(None) => return Err("closed by the agent".into()),
                Err(status) => return Err(status.message().to_owned()),
            },
            _ = shared.wake.notified() => {}
            _ = goodbye.changed() => {}
            _ = tokio::time::sleep_until(until) => return Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_buffer_drops_new_events_as_contiguous_losses() {
        let mut buffer = Buffer::default();
        for _ in 0..5 {
            buffer.push(Event::default(), 2);
        }
        assert_eq!(buffer.events.iter().map(|(s, _, _)| *s).collect::<Vec<_>>(), vec![0, 1]);
        assert_eq!((buffer.losses.clone(), buffer.dropped), (vec![(2, 4)], 3));
        buffer.ack(0);
        buffer.push(Event::default(), 2);
        assert_eq!(buffer.events.iter().map(|(s, _, _)| *s).collect::<Vec<_>>(), vec![1, 5]);
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
        buffer.announced = 0;
        assert_eq!(buffer.take_unannounced_losses(), vec![(1, 2), (3, 3)]);
        // An event after the losses acknowledged: they were heard.
        buffer.ack(0);
        assert_eq!(buffer.losses, vec![(1, 2), (3, 3)], "an ack before them says nothing of them");
        buffer.push(Event::default(), 1);
        buffer.ack(4);
        assert_eq!((buffer.losses.clone(), buffer.announced), (vec![], 0));
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
        buffer.ack(0);
        buffer.push(event, usize::MAX);
        assert_eq!((buffer.events.len(), buffer.dropped), (fits, 3), "an ack makes room again");
    }
}
