//! The export to a Datadog agent, in its eBPF-less protocol (`crate::datadog`):
//! msgpack frames over plain TCP, never answered.
//!
//! Every connection opens with the Hello, then carries the held messages in
//! the order the events came. Without acks, "delivered" means written to the
//! socket: a frame leaves the buffer only once it is written whole, and a
//! frame cut by a failed connection is written again, whole, right after the
//! next connection's Hello (the agent discards the cut one with the
//! connection). While no connection is up, messages wait in a buffer bounded
//! in messages and bytes; beyond, new ones are dropped and counted. Events
//! the agent has no type for (or would take for what they are not, see
//! `datadog::outbound`) are never sent, and counted. At exit, what is left is
//! sent until `--flush-timeout`, or until SIGTERM after the workload's end.
//!
//! Each message carries its process's container (`ContainerID`, `CGroupID`),
//! from `/proc/PID/cgroup`, read when this thread meets the process (its
//! fork, its first event) and again at each exec, within milliseconds of
//! the event; a process gone by then keeps what was read before (its
//! parent's, for a fork). A process whose cgroup names no container gets
//! the tracer's (which ECS metadata may give only later).

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::time::Instant;

use crate::context::{self, Cgroup};
use crate::datadog::frame::frame;
use crate::datadog::msg::{Message, SyscallMsg};
use crate::datadog::outbound;
use crate::ecs;
use crate::log::log;
use crate::proto::event::Payload;
use crate::proto::{Event, Goodbye};

use super::grpc::{self, Delivery, Skipped, BUFFER_BYTES};
use super::retry::{flush_limit, pause, Backoff, Repeated};
use super::tcp::connect_ipv4_first;

/// A connection that stayed up this long worked: the next failure is a new
/// one, and the backoff starts over. The agent never answers, so time is the
/// only sign that it takes what it is sent.
const STEADY: Duration = Duration::from_secs(1);

#[derive(Default)]
struct Buffer {
    /// Messages not written yet, oldest first, with their footprints.
    messages: VecDeque<(SyscallMsg, usize)>,
    bytes: usize,
    /// Dropped for a full buffer.
    dropped: u64,
    /// Not sent, by kind: the agent has no type for them (see `datadog::outbound`).
    skipped: Skipped,
    /// Not sent: over the frame limit even cut (never expected).
    too_large: u64,
    containers: Containers,
}

/// Processes' cgroups, by pid, as this thread last read them.
#[derive(Default)]
struct Containers(HashMap<u32, Cgroup>);

/// Processes whose cgroups are kept; past that the cache starts over (and
/// is read again as processes come), should exits go unseen.
const CONTAINERS_KEPT: usize = 65536;

impl Containers {
    /// The cgroup of the process `message_pid` names (for a fork, the child).
    fn of(&mut self, event: &Event, message_pid: u32) -> Cgroup {
        if self.0.len() >= CONTAINERS_KEPT {
            self.0.clear();
        }
        match &event.payload {
            // An exec may follow a move to another cgroup.
            Some(Payload::Exec(_)) => self.read(event.pid, None),
            Some(Payload::Fork(_)) => {
                let parent = self.known(event.pid);
                self.read(message_pid, Some(parent))
            }
            Some(Payload::Exit(_)) => match self.0.remove(&event.pid) {
                Some(cgroup) => cgroup,
                None => context::cgroup_of(&event.pid.to_string()).unwrap_or_default(),
            },
            _ => self.known(event.pid),
        }
    }

    fn known(&mut self, pid: u32) -> Cgroup {
        match self.0.get(&pid) {
            Some(cgroup) => cgroup.clone(),
            None => self.read(pid, None),
        }
    }

    /// Reads `pid`'s cgroup now; when it cannot be (the process is gone),
    /// keeps what was known, else `fallback`.
    fn read(&mut self, pid: u32, fallback: Option<Cgroup>) -> Cgroup {
        let read = context::cgroup_of(&pid.to_string());
        let cgroup = read.or_else(|| self.0.get(&pid).cloned()).or(fallback).unwrap_or_default();
        self.0.insert(pid, cgroup.clone());
        cgroup
    }
}

impl Buffer {
    fn push(&mut self, event: &Event, capacity: usize) {
        // A process without a container id of its own gets the tracer's when
        // the message is written: the ECS metadata may name it only later.
        let Some(mut message) = outbound::syscall(event, "") else {
            *self.skipped.entry(crate::queue::kind(event)).or_default() += 1;
            return;
        };
        let cgroup = self.containers.of(event, message.pid);
        (message.container_id, message.cgroup_id) = (cgroup.container_id, cgroup.path);
        let size = crate::queue::footprint(event);
        if self.messages.len() < capacity && self.bytes + size <= BUFFER_BYTES {
            self.bytes += size;
            self.messages.push_back((message, size));
        } else {
            self.dropped += 1;
        }
    }

    fn pop(&mut self) -> Option<SyscallMsg> {
        let (message, size) = self.messages.pop_front()?;
        self.bytes -= size;
        Some(message)
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

impl Exporter {
    /// Starts at once, on `connection` when one is open already (the
    /// protocol probe's: its Hello is written). `connected` fires once a
    /// Hello is written.
    pub fn start(
        options: grpc::Options,
        connection: Option<TcpStream>,
        connected: std::sync::mpsc::Sender<()>,
    ) -> Exporter {
        let shared = Arc::new(Shared::new(options.capacity));
        let (goodbye, goodbye_rx) = watch::channel(None);
        let task = tokio::spawn(run(options, Arc::clone(&shared), connection, connected, goodbye_rx));
        Exporter { shared, goodbye, task }
    }

    pub fn write(&self, batch: &[Event]) {
        let mut buffer = self.shared.buffer();
        for event in batch {
            buffer.push(event, self.shared.capacity);
        }
        drop(buffer);
        self.shared.wake.notify_one();
    }

    /// Counts `count` events dropped before they could be written here.
    pub fn lose(&self, count: u64) {
        self.shared.buffer().dropped += count;
    }

    /// Writes what is left, until the flush timeout. The protocol has no
    /// goodbye: the agent sees the connection end.
    pub async fn finish(self, goodbye: Goodbye) -> Delivery {
        let _ = self.goodbye.send(Some(goodbye));
        self.shared.wake.notify_one();
        self.task.await.unwrap_or_default()
    }
}

/// What the connections have done, kept across them.
#[derive(Default)]
struct Progress {
    connections: u64,
    failures: Repeated,
    /// A frame cut by a failed connection: the next one writes it first.
    unfinished: Option<Vec<u8>>,
}

async fn run(
    mut options: grpc::Options,
    shared: Arc<Shared>,
    connection: Option<TcpStream>,
    connected: std::sync::mpsc::Sender<()>,
    goodbye: watch::Receiver<Option<Goodbye>>,
) -> Delivery {
    let mut progress = Progress::default();
    let abandon = Arc::clone(&options.abandon);
    let limit = flush_limit(goodbye.clone(), options.flush_timeout, &abandon);
    let abandoned = tokio::select! {
        () = deliver(&mut options, &shared, connection, &connected, goodbye, &mut progress) => false,
        abandoned = limit => abandoned,
    };
    if abandoned {
        log!("stopped sending to the agent at {}: a stop signal after the workload's end", options.address);
    }
    progress.failures.settle();
    let buffer = shared.buffer();
    let delivery = Delivery {
        undelivered: buffer.messages.len() as u64 + u64::from(progress.unfinished.is_some()),
        dropped: buffer.dropped + buffer.too_large,
        reconnects: progress.connections.saturating_sub(1),
        skipped: buffer.skipped.clone(),
    };
    if delivery.undelivered + delivery.dropped > 0 {
        log!(
            "{} events were not delivered to the agent at {} ({} dropped when the buffer was full, {} too large for a frame)",
            delivery.undelivered + delivery.dropped,
            options.address,
            buffer.dropped,
            buffer.too_large
        );
    }
    if !delivery.skipped.is_empty() {
        log!(
            "{} events were not sent to the agent at {} ({}): it has no message for them, or would take them for what they are not (failed calls, refused credential changes)",
            delivery.skipped.values().sum::<u64>(),
            options.address,
            super::skipped_kinds(&delivery.skipped, " ", ", ")
        );
    }
    delivery
}

/// Connects and writes until everything is written after the workload's
/// end; reconnects after a backoff. Never ends otherwise: the caller cuts it
/// off.
async fn deliver(
    options: &mut grpc::Options,
    shared: &Shared,
    mut connection: Option<TcpStream>,
    connected: &std::sync::mpsc::Sender<()>,
    mut goodbye: watch::Receiver<Option<Goodbye>>,
    progress: &mut Progress,
) {
    // Read once per run, before the first Hello: on Fargate the container id
    // may come only from there.
    let mut ecs = ecs::start_fetch(&options.hello);
    let mut backoff = Backoff::new();
    let hostport = options.address.to_string();
    loop {
        let opened = match connection.take() {
            Some(stream) => Ok((stream, Hello::Written)),
            None => {
                // Before connecting: a new connection's Hello goes out at
                // once, as a Datadog tracer's does (`serve` takes a client
                // silent for 100 ms for an HTTP/2 one).
                ecs::add_fetched(&mut ecs, &mut options.hello).await;
                connect_ipv4_first(&hostport).await.map(|stream| (stream, Hello::ToWrite))
            }
        };
        let failure = match opened {
            Ok((stream, hello)) => {
                progress.connections += 1;
                let since = Instant::now();
                let result = send(options, shared, stream, hello, connected, &mut goodbye, progress).await;
                if since.elapsed() >= STEADY {
                    backoff.reset();
                    progress.failures.settle();
                }
                match result {
                    Ok(()) => return,
                    Err(error) => (format!("connection to the agent at {} failed", options.address), error),
                }
            }
            Err(error) => (format!("cannot reach the agent at {}", options.address), error),
        };
        progress.failures.record(failure.0, failure.1, "; retrying");
        pause(&mut backoff, &mut goodbye).await;
    }
}

/// Whether a connection's Hello is still to be written.
enum Hello {
    ToWrite,
    /// By the protocol probe, which handed the connection over.
    Written,
}

/// One connection: the Hello, then every held message in order. Ok once all
/// is written after the workload's end (the write side is then shut).
async fn send(
    options: &grpc::Options,
    shared: &Shared,
    stream: TcpStream,
    hello: Hello,
    connected: &std::sync::mpsc::Sender<()>,
    goodbye: &mut watch::Receiver<Option<Goodbye>>,
    progress: &mut Progress,
) -> Result<(), String> {
    let _ = stream.set_nodelay(true);
    let (mut reader, mut writer) = stream.into_split();
    if let Hello::ToWrite = hello {
        let hello = frame(Message::Hello(outbound::hello(&options.hello))).map_err(|e| e.to_string())?;
        writer.write_all(&hello).await.map_err(|e| e.to_string())?;
    }
    let _ = connected.send(());
    let container_id = options.hello.container.as_ref().map(|c| c.id.clone()).unwrap_or_default();
    loop {
        loop {
            if progress.unfinished.is_none() {
                let Some(mut message) = shared.buffer().pop() else { break };
                if message.container_id.is_empty() {
                    message.container_id.clone_from(&container_id);
                }
                match frame(Message::Syscall(Box::new(message))) {
                    Ok(bytes) => progress.unfinished = Some(bytes),
                    Err(_) => shared.buffer().too_large += 1,
                }
            }
            if let Some(bytes) = &progress.unfinished {
                write_frame(&mut writer, &mut reader, bytes).await?;
                progress.unfinished = None;
            }
        }
        if goodbye.borrow().is_some() {
            // Everything is written: the agent sees the end of the stream.
            return writer.shutdown().await.map_err(|e| e.to_string());
        }
        tokio::select! {
            _ = shared.wake.notified() => {}
            Ok(()) = goodbye.changed() => {}
            ended = agent_ended(&mut reader) => return Err(ended),
        }
    }
}

/// Writes one frame whole, or fails: a frame the agent would not get whole
/// is not taken for written.
async fn write_frame(writer: &mut OwnedWriteHalf, reader: &mut OwnedReadHalf, bytes: &[u8]) -> Result<(), String> {
    tokio::select! {
        written = writer.write_all(bytes) => written.map_err(|e| e.to_string()),
        ended = agent_ended(reader) => Err(ended),
    }
}

/// Resolves when the agent ends the connection, or writes: a Datadog agent
/// never does, so a peer that writes is something else (a TLS or HTTP
/// server answering what it cannot read) and the connection is given up.
async fn agent_ended(reader: &mut OwnedReadHalf) -> String {
    let mut scratch = [0u8; 512];
    match reader.read(&mut scratch).await {
        Ok(0) => "closed by the agent".to_owned(),
        Ok(n) => format!("the peer wrote {n} bytes: it is not a Datadog agent, which never writes"),
        Err(error) => error.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::{event::Payload, ExecEvent, IoUringEvent};

    fn exec(retval: i64, args: Vec<String>) -> Event {
        let exec = ExecEvent { path: "/bin/true".into(), args, ..Default::default() };
        Event { pid: 7, retval: Some(retval), payload: Some(Payload::Exec(exec)), ..Default::default() }
    }

    #[test]
    fn events_without_a_datadog_type_are_counted_not_held() {
        let mut buffer = Buffer::default();
        let io_uring = Event { payload: Some(Payload::IoUring(IoUringEvent::default())), ..Default::default() };
        buffer.push(&io_uring, 10);
        buffer.push(&exec(-2, vec![]), 10);
        buffer.push(&exec(0, vec![]), 10);
        let skipped: Vec<_> = buffer.skipped.into_iter().collect();
        assert_eq!((buffer.messages.len(), skipped, buffer.dropped), (1, vec![("exec", 1), ("io_uring", 1)], 0));
    }

    #[test]
    fn the_buffer_holds_at_most_its_bytes_and_messages() {
        let mut buffer = Buffer::default();
        for _ in 0..3 {
            buffer.push(&exec(0, vec![]), 2);
        }
        assert_eq!((buffer.messages.len(), buffer.dropped), (2, 1));
        let large = exec(0, vec!["x".repeat(350); 356]);
        let fits = BUFFER_BYTES / crate::queue::footprint(&large);
        let mut buffer = Buffer::default();
        for _ in 0..fits + 2 {
            buffer.push(&large, usize::MAX);
        }
        assert_eq!((buffer.messages.len(), buffer.dropped), (fits, 2));
        assert!(buffer.pop().is_some());
        buffer.push(&large, usize::MAX);
        assert_eq!((buffer.messages.len(), buffer.dropped), (fits, 2), "a written message makes room again");
    }
}
