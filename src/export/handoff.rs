//! What the queue's drain and an agent connection task share: the buffer
//! of events not yet delivered, its bound, and the connection task's wake-up.

use std::sync::{Mutex, MutexGuard};

use tokio::sync::Notify;

pub struct Shared<B> {
    buffer: Mutex<B>,
    /// Events the buffer may hold (`--buffer-events`).
    pub capacity: usize,
    /// Rung when there is something new to send.
    pub wake: Notify,
}

impl<B: Default> Shared<B> {
    pub fn new(capacity: usize) -> Self {
        Shared { buffer: Mutex::default(), capacity, wake: Notify::new() }
    }
}

impl<B> Shared<B> {
    /// The buffer; a panic elsewhere while it was held leaves it usable.
    pub fn buffer(&self) -> MutexGuard<'_, B> {
        self.buffer.lock().unwrap_or_else(|e| e.into_inner())
    }
}
