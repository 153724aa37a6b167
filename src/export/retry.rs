//! What the agent transports share: the backoff between attempts, the
//! logging of a failure that repeats, and the limit on the flush at exit.

use std::hash::{BuildHasher, Hasher};
use std::time::Duration;

use tokio::sync::{watch, Notify};

use crate::log::log;
use crate::proto::Goodbye;

/// The wait after a failed stream doubles from the first to the last; each
/// wait is drawn between half and all of it, so that tracers started together
/// do not come back together.
const BACKOFF_FIRST: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// A failure that may repeat many times (an agent that refuses every
/// stream): said once when it starts, and once more with its count when it
/// stops repeating. The workload's stderr is shared.
#[derive(Default)]
pub(super) struct Repeated {
    /// What failed ("stream to the agent at X failed"); the details may
    /// change from one time to the next without making it a new failure.
    what: String,
    last_detail: String,
    count: u64,
}

impl Repeated {
    /// Says `what: detail` (and `then`) unless `what` is the failure already said.
    pub(super) fn record(&mut self, what: String, detail: String, then: &str) {
        if what != self.what {
            self.settle();
            log!("{what}: {detail}{then}");
            self.what = what;
        }
        self.last_detail = detail;
        self.count += 1;
    }

    /// The failure is over: how often it happened, when more than once.
    pub(super) fn settle(&mut self) {
        if self.count > 1 {
            log!("{} ({} times in all; the last: {})", self.what, self.count, self.last_detail);
        }
        *self = Repeated::default();
    }
}

/// The wait before the next attempt.
pub(super) struct Backoff {
    next: Duration,
    /// A source of jitter: std's randomly keyed hasher.
    random: std::collections::hash_map::RandomState,
    draws: u64,
}

impl Backoff {
    pub(super) fn new() -> Self {
        Backoff { next: BACKOFF_FIRST, random: Default::default(), draws: 0 }
    }

    /// Between half and all of the current wait; the next is twice as long.
    pub(super) fn draw(&mut self) -> Duration {
        let full = self.next;
        self.next = (self.next * 2).min(BACKOFF_MAX);
        self.draws += 1;
        let mut hasher = self.random.build_hasher();
        hasher.write_u64(self.draws);
        let fraction = (hasher.finish() >> 11) as f64 / (1u64 << 53) as f64;
        full.mul_f64(0.5 + fraction / 2.0)
    }

    pub(super) fn reset(&mut self) {
        self.next = BACKOFF_FIRST;
    }
}

/// Ends once the workload is gone and then the flush timeout has passed
/// (false) or a stop signal came (true).
pub(super) async fn flush_limit(
    mut goodbye: watch::Receiver<Option<Goodbye>>,
    timeout: Duration,
    abandon: &Notify,
) -> bool {
    // An error means the exporter is gone: the limit starts now.
    let _ = goodbye.wait_for(Option::is_some).await;
    tokio::select! {
        () = tokio::time::sleep(timeout) => false,
        () = abandon.notified() => true,
    }
}

/// Waits out the backoff before the next attempt; the workload's end (the
/// Goodbye) cuts the wait short once: it may be the last chance to deliver.
pub async fn pause(backoff: &mut Backoff, goodbye: &mut watch::Receiver<Option<Goodbye>>) {
    let ended = goodbye.borrow().is_some();
    tokio::select! {
        () = tokio::time::sleep(backoff.draw()) => {}
        Ok(()) = goodbye.changed(), if !ended => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_waits_grow_with_jitter_up_to_the_cap() {
        let mut backoff = Backoff::new();
        let mut full = BACKOFF_FIRST;
        for _ in 0..12 {
            let wait = backoff.draw();
            assert!(wait >= full / 2 && wait <= full, "{wait:?} outside {full:?}/2..={full:?}");
            full = (full * 2).min(BACKOFF_MAX);
        }
        backoff.reset();
        assert!(backoff.draw() <= BACKOFF_FIRST);
    }
}
