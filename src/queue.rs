//! The bounded queue between the tracer thread and the exporters.
//!
//! The tracer hands events over with `try_send` and never waits: when the
//! queue is full, in events or in bytes, the event is dropped and counted.
//! A flood of cheap events cannot push a valuable one out: each event may
//! only fill the queue up to the share its [`Value`] allows.
//! This module is the only thing the tracer and the exporters share, so
//! neither depends on the other.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::sync::mpsc;

use crate::proto::{event::Payload, Event};

/// Events the queue holds before the tracer starts dropping, and the memory
/// they may take: one exec event can hold 250 KiB of arguments and
/// environment, so a count alone would not bound memory. With the agent
/// buffer's own byte bound, this keeps the tracer under about 64 MiB.
const CAPACITY: usize = 16 * 1024;
const CAPACITY_BYTES: usize = 16 << 20;

/// About the memory an event holds: the struct, and for its strings twice
/// their encoded size (allocation headers and slack, vectors of strings).
pub fn footprint(event: &Event) -> usize {
    footprint_of_encoded(prost::Message::encoded_len(event))
}

/// [`footprint`] of an event whose encoded length is known.
pub fn footprint_of_encoded(encoded_len: usize) -> usize {
    std::mem::size_of::<Event>() + 2 * encoded_len
}

/// What losing an event would cost its reader.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Value {
    /// Failed opens and file calls: a workload can make millions.
    Low,
    Normal,
    /// Execs, connects, credential changes, calls against the tracer, and
    /// whatever the tracer refused.
    High,
}

impl Value {
    /// The percentage of the queue an event of this value may fill.
    fn share(self) -> usize {
        match self {
            Value::Low => 50,
            Value::Normal => 80,
            Value::High => 100,
        }
    }
}

pub fn value(event: &Event) -> Value {
    if !event.denied.is_empty() {
        return Value::High;
    }
    let failed = event.retval.is_some_and(|r| r < 0);
    match &event.payload {
        Some(
            Payload::Exec(_)
            | Payload::Connect(_)
            | Payload::Bind(_)
            | Payload::Credentials(_)
            | Payload::IoUring(_)
            | Payload::Ptrace(_)
            | Payload::Seccomp(_)
            | Payload::Userfaultfd(_)
            | Payload::Prctl(_)
            | Payload::Setsockopt(_)
            | Payload::Socket(_)
            | Payload::Module(_)
            | Payload::Bpf(_)
            | Payload::Signal(_)
            | Payload::TracerTarget(_),
        ) => Value::High,
        Some(Payload::Open(_) | Payload::File(_) | Payload::Chdir(_)) | None if failed => Value::Low,
        _ => Value::Normal,
    }
}

/// The kind of an event: the name of its payload, as JSON lines key it.
pub fn kind(event: &Event) -> &'static str {
    match &event.payload {
        Some(Payload::Exec(_)) => "exec",
        Some(Payload::Open(_)) => "open",
        Some(Payload::Connect(_)) => "connect",
        Some(Payload::Fork(_)) => "fork",
        Some(Payload::Exit(_)) => "exit",
        Some(Payload::Chdir(_)) => "chdir",
        Some(Payload::IoUring(_)) => "io_uring",
        Some(Payload::Credentials(_)) => "credentials",
        Some(Payload::Bind(_)) => "bind",
        Some(Payload::Accept(_)) => "accept",
        Some(Payload::File(_)) => "file",
        Some(Payload::Ptrace(_)) => "ptrace",
        Some(Payload::Seccomp(_)) => "seccomp",
        Some(Payload::Userfaultfd(_)) => "userfaultfd",
        Some(Payload::Namespace(_)) => "namespace",
        Some(Payload::Prctl(_)) => "prctl",
        Some(Payload::Rlimit(_)) => "rlimit",
        Some(Payload::Setsockopt(_)) => "setsockopt",
        Some(Payload::Socket(_)) => "socket",
        Some(Payload::Module(_)) => "module",
        Some(Payload::Bpf(_)) => "bpf",
        Some(Payload::Signal(_)) => "signal",
        Some(Payload::TracerTarget(_)) => "tracer_target",
        None => "none",
    }
}

/// The tracer's end of the queue.
pub struct EventSink {
    tx: Option<mpsc::Sender<Event>>,
    /// Footprint of the events in the queue, shared with the drain.
    queued_bytes: Arc<AtomicUsize>,
    capacity: usize,
    capacity_bytes: usize,
    /// Drops not yet told to the exporters, shared with the queue: an agent
    /// hears of them as a Loss, numbered where they happened.
    lost: Arc<AtomicU64>,
    /// Events emitted, dropped or not, by kind.
    pub by_kind: BTreeMap<&'static str, u64>,
    pub emitted: u64,
    pub dropped: u64,
}

/// The exporters' end of the queue.
pub struct EventQueue {
    rx: mpsc::Receiver<Event>,
    queued_bytes: Arc<AtomicUsize>,
    lost: Arc<AtomicU64>,
}

/// A queue and its two ends.
pub fn bounded() -> (EventSink, EventQueue) {
    bounded_to(CAPACITY, CAPACITY_BYTES)
}

fn bounded_to(capacity: usize, capacity_bytes: usize) -> (EventSink, EventQueue) {
    let (tx, rx) = mpsc::channel(capacity);
    let queued_bytes = Arc::<AtomicUsize>::default();
    let lost = Arc::<AtomicU64>::default();
    let sink = EventSink {
        tx: Some(tx),
        queued_bytes: Arc::clone(&queued_bytes),
        lost: Arc::clone(&lost),
        capacity,
        capacity_bytes,
        ..EventSink::discard()
    };
    (sink, EventQueue { rx, queued_bytes, lost })
}

impl EventSink {
    /// A sink that counts events and sends them nowhere (no exporter).
    pub fn discard() -> Self {
        EventSink {
            tx: None,
            queued_bytes: Arc::default(),
            lost: Arc::default(),
            capacity: CAPACITY,
            capacity_bytes: CAPACITY_BYTES,
            by_kind: BTreeMap::new(),
            emitted: 0,
            dropped: 0,
        }
    }

    /// Another sender into the same queue, with counts of its own (the
    /// queue ends when every sender is gone).
    pub fn another(&self) -> Self {
        EventSink {
            tx: self.tx.clone(),
            queued_bytes: Arc::clone(&self.queued_bytes),
            lost: Arc::clone(&self.lost),
            capacity: self.capacity,
            capacity_bytes: self.capacity_bytes,
            ..EventSink::discard()
        }
    }

    pub fn emit(&mut self, event: Event) {
        *self.by_kind.entry(kind(&event)).or_default() += 1;
        let Some(tx) = &self.tx else {
            self.emitted += 1;
            return;
        };
        let size = footprint(&event);
        let share = value(&event).share();
        let queued = self.capacity - tx.capacity();
        // Added before sending, so the drain never subtracts more than was added.
        let bytes = self.queued_bytes.fetch_add(size, Ordering::Relaxed) + size;
        if queued * 100 >= self.capacity * share || bytes > self.capacity_bytes / 100 * share {
            self.queued_bytes.fetch_sub(size, Ordering::Relaxed);
            return self.drop_one();
        }
        match tx.try_send(event) {
            Ok(()) => self.emitted += 1,
            // Full, or the exporters are gone (they failed and said why): keep tracing.
            Err(_) => {
                self.queued_bytes.fetch_sub(size, Ordering::Relaxed);
                self.drop_one();
            }
        }
    }

    fn drop_one(&mut self) {
        self.dropped += 1;
        self.lost.fetch_add(1, Ordering::Relaxed);
    }
}

impl EventQueue {
    /// Waits for events and moves up to `limit` of them into `batch`; 0 once
    /// the sink is gone and the queue empty.
    pub async fn recv_many(&mut self, batch: &mut Vec<Event>, limit: usize) -> usize {
        self.rx.recv_many(batch, limit).await
    }

    pub fn is_empty(&self) -> bool {
        self.rx.is_empty()
    }

    /// Events the tracer dropped since the last call.
    pub fn take_lost(&self) -> u64 {
        self.lost.swap(0, Ordering::Relaxed)
    }

    /// Gives the memory of events taken from the queue back to the tracer,
    /// once they are written.
    pub fn release(&self, events: &[Event]) {
        self.queued_bytes.fetch_sub(events.iter().map(footprint).sum(), Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::OpenEvent;

    fn open(retval: i64) -> Event {
        Event { retval: Some(retval), payload: Some(Payload::Open(OpenEvent::default())), ..Event::default() }
    }

    #[test]
    fn a_flood_of_failed_opens_leaves_room_for_what_matters() {
        let (mut sink, _queue) = bounded_to(10, usize::MAX);
        for _ in 0..100 {
            sink.emit(open(-2));
        }
        assert_eq!((sink.emitted, sink.dropped), (5, 95), "failed opens fill half the queue at most");
        for _ in 0..4 {
            sink.emit(open(3));
        }
        assert_eq!((sink.emitted, sink.dropped), (8, 96), "successful ones fill it to 80%");
        let exec = Event { payload: Some(Payload::Exec(Default::default())), ..Event::default() };
        sink.emit(exec.clone());
        sink.emit(exec.clone());
        sink.emit(exec);
        assert_eq!((sink.emitted, sink.dropped), (10, 97), "an exec may take the last places");
        let denied = Event { denied: "why".into(), ..open(-1) };
        assert_eq!(value(&denied), Value::High);
    }
}
