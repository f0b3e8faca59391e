//! Messages from workers to the primary's code: one bounded queue with one consumer
//! ([`Messages`]), filled by the driver, which stops reading a worker's link while a message of
//! that worker waits for room.
//!
//! Why bounded by the driver and not by a channel: a worker sends as fast as the primary reads,
//! so a queue the driver can always push to grows without bound when the primary's code is
//! slower than a worker (one worker sending a million 1 KB messages took an unbounded primary
//! to 443 MB). Here a message that finds the queue full is held, that worker's link is not read
//! until it fits, and the kernel's socket buffer then blocks the worker's sends. Other workers'
//! links are read as before. While a worker's link is held the core suspends its heartbeat and
//! handoff deadlines ([`proto::Primary::hold`]): its heartbeats are behind the held message,
//! and a worker is never presumed hung because the primary did not read it.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};

use proto::WorkerId;

use super::WorkerHandle;
use crate::message::Message;

/// Messages the queue holds at most (one more always fits in an empty queue, whatever its size).
pub(crate) const CAPACITY: usize = 256;
/// Payload bytes the queue holds at most.
pub(crate) const BUDGET: usize = 1 << 20;

type Item = (WorkerHandle, Message);

/// The queue between the driver and the one [`Messages`] that reads it.
pub(crate) struct Queue {
    state: Mutex<State>,
    /// The primary's count of messages dropped unread ([`Slot::dropped`]).
    dropped: Arc<AtomicU64>,
}

#[derive(Default)]
struct State {
    items: VecDeque<Item>,
    bytes: usize,
    /// Per worker, its messages read from its link that found no room, oldest first: while a
    /// worker has some, the driver does not read its link.
    held: HashMap<WorkerId, VecDeque<Item>>,
    /// The reader waiting for a message.
    reader: Option<Waker>,
    /// The driver waiting for room.
    driver: Option<Waker>,
    /// Its [`Messages`] was dropped, or replaced by a later [`Primary::messages`](super::Primary::messages).
    closed: bool,
}

impl State {
    fn has_room(&self, len: usize) -> bool {
        self.items.is_empty() || (self.items.len() < CAPACITY && self.bytes + len <= BUDGET)
    }

    fn push(&mut self, item: Item) {
        self.bytes += item.1.as_bytes().len();
        self.items.push_back(item);
        if let Some(reader) = self.reader.take() {
            reader.wake();
        }
    }
}

/// What became of a message the driver delivered to an open queue.
pub(crate) enum Delivered {
    /// In the queue.
    Queued,
    /// Held for want of room: stop reading this worker's link.
    Held,
}

impl Queue {
    fn lock(&self) -> MutexGuard<'_, State> {
        // Nothing panics while holding the lock; recover anyway.
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Queues a message from `worker`, behind any it has held; holds it if there is no room.
    /// A queue nobody reads any more gives it back, to be dropped outside the lock.
    pub(crate) fn deliver(&self, worker: WorkerId, item: Item) -> Result<Delivered, Item> {
        let mut state = self.lock();
        let state = &mut *state;
        if state.closed {
            return Err(item);
        }
        if let Some(held) = state.held.get_mut(&worker) {
            held.push_back(item);
            return Ok(Delivered::Held);
        }
        if state.has_room(item.1.as_bytes().len()) {
            state.push(item);
            Ok(Delivered::Queued)
        } else {
            state.held.entry(worker).or_default().push_back(item);
            Ok(Delivered::Held)
        }
    }

    /// Moves held messages into the queue while there is room, and returns the workers that
    /// have none held any more (their links may be read again), and how many messages were
    /// dropped. Registers `waker` to be woken when room is made, if some stay held. A closed
    /// queue (its reader is gone) drops what it held.
    pub(crate) fn flush_held(&self, waker: &Waker) -> (Vec<WorkerId>, usize) {
        let mut guard = self.lock();
        if guard.closed {
            let held = std::mem::take(&mut guard.held);
            drop(guard);
            let dropped = held.values().map(VecDeque::len).sum();
            // Dropped outside the lock: requests are refused, fds closed.
            return (held.into_keys().collect(), dropped);
        }
        let state = &mut *guard;
        let mut released = Vec::new();
        // Oldest worker first would be fairer; any order keeps each worker's own order.
        let workers: Vec<WorkerId> = state.held.keys().copied().collect();
        for worker in workers {
            let Some(mut held) = state.held.remove(&worker) else {
                continue;
            };
            while let Some(item) = held.pop_front() {
                if !state.has_room(item.1.as_bytes().len()) {
                    held.push_front(item);
                    break;
                }
                state.push(item);
            }
            if held.is_empty() {
                released.push(worker);
            } else {
                state.held.insert(worker, held);
            }
        }
        if !state.held.is_empty() {
            state.driver = Some(waker.clone());
        }
        (released, 0)
    }

    /// Ends this queue for its reader (a newer one replaces it) and hands over what it has not
    /// read, held messages included, in order.
    pub(crate) fn close_into(&self, next: &Self) {
        let (items, held, reader, driver) = {
            let mut state = self.lock();
            state.closed = true;
            state.bytes = 0;
            (
                std::mem::take(&mut state.items),
                std::mem::take(&mut state.held),
                state.reader.take(),
                state.driver.take(),
            )
        };
        // The old reader ends; the driver moves held messages into the new queue.
        for waker in [reader, driver].into_iter().flatten() {
            waker.wake();
        }
        let mut next = next.lock();
        next.bytes += items.iter().map(|(_, m)| m.as_bytes().len()).sum::<usize>();
        next.items.extend(items);
        next.held = held;
    }

    /// The waker of the driver, once it has something to do: room was made, or the reader left.
    fn wake_driver(state: &mut State) {
        if let Some(driver) = state.driver.take() {
            driver.wake();
        }
    }
}

/// The messages workers send to the primary ([`Primary::messages`](super::Primary::messages)),
/// in the order each worker sent them; each with the handle of its sender. Requests among them
/// are answered with [`Message::reply`]; a request dropped unanswered is refused.
///
/// Bounded: when the primary's code reads slower than a worker sends, the primary stops reading
/// that worker's link until there is room (the worker's sends then wait in its socket buffer),
/// so no worker can grow the primary's memory; other workers are read as before, and a worker
/// held this way is not presumed hung. Ends when a later call to `messages()` takes over (what
/// this one had not read goes to the new one), or once the primary is gone.
pub struct Messages {
    queue: Arc<Queue>,
}

impl fmt::Debug for Messages {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = self.queue.lock();
        f.debug_struct("Messages")
            .field("queued", &state.items.len())
            .field("held_workers", &state.held.len())
            .finish()
    }
}

impl Messages {
    pub(super) fn new(queue: Arc<Queue>) -> Self {
        Self { queue }
    }

    /// The next message and its sender; `None` once this stream ended.
    pub async fn recv(&mut self) -> Option<(WorkerHandle, Message)> {
        std::future::poll_fn(|cx| self.poll_recv(cx)).await
    }

    /// Polls for the next message and its sender.
    pub fn poll_recv(&mut self, cx: &mut Context<'_>) -> Poll<Option<(WorkerHandle, Message)>> {
        let mut state = self.queue.lock();
        if let Some(item) = state.items.pop_front() {
            state.bytes -= item.1.as_bytes().len();
            if !state.held.is_empty() {
                Queue::wake_driver(&mut state);
            }
            return Poll::Ready(Some(item));
        }
        if state.closed || Arc::strong_count(&self.queue) == 1 {
            return Poll::Ready(None);
        }
        state.reader = Some(cx.waker().clone());
        Poll::Pending
    }
}

impl futures_core::Stream for Messages {
    type Item = (WorkerHandle, Message);

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.poll_recv(cx)
    }
}

impl Drop for Messages {
    fn drop(&mut self) {
        let mut state = self.queue.lock();
        state.closed = true;
        // Dropped here, not in the driver: requests are refused and fds closed now.
        let items = std::mem::take(&mut state.items);
        state.bytes = 0;
        self.queue
            .dropped
            .fetch_add(items.len() as u64, Ordering::Relaxed);
        // The driver drops what it held and reads those links again.
        Queue::wake_driver(&mut state);
        drop(state);
        drop(items);
    }
}

/// Where the driver finds the current queue, and what it dropped for want of a reader.
#[derive(Default)]
pub(crate) struct Slot {
    current: Mutex<Option<Arc<Queue>>>,
    dropped: Arc<AtomicU64>,
}

impl Slot {
    /// A new queue takes over from the current one.
    pub(super) fn take_over(&self) -> Arc<Queue> {
        let queue = Arc::new(Queue {
            state: Mutex::default(),
            dropped: self.dropped.clone(),
        });
        let mut current = self.current.lock().expect("not poisoned");
        if let Some(previous) = current.replace(queue.clone()) {
            previous.close_into(&queue);
        }
        queue
    }

    /// The current queue, if anyone reads it.
    pub(crate) fn current(&self) -> Option<Arc<Queue>> {
        self.current.lock().expect("not poisoned").clone()
    }

    /// A message nobody reads was dropped.
    pub(crate) fn count_dropped(&self) {
        self.dropped.fetch_add(1, Ordering::Relaxed);
    }

    /// Messages dropped because nobody read them: they arrived while nobody had taken the
    /// stream, or it was dropped with them still in it.
    pub(super) fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}
