//! The queue between the worker's driver and a round-robin `ClusterListener`: connections the
//! worker acked and the application has not accepted yet.
//!
//! Whoever closes it (the listener when dropped, the driver when the worker stops serving) takes
//! what is left and gives it back to the primary, so no acked connection is dropped unserved.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::task::{Context, Poll, Waker};

use std::os::fd::OwnedFd;

/// Connections one listener may hold unaccepted; past it, handoffs are refused (and the primary
/// pauses offers to this worker until the listener drains to half).
pub(crate) const CAPACITY: usize = 128;

/// A connection handed over, and the bytes to read before its socket's (another worker read
/// them before handing it back; usually none).
pub(crate) type Conn = (OwnedFd, Vec<u8>);

#[derive(Debug, Default)]
struct State {
    items: VecDeque<Conn>,
    waker: Option<Waker>,
    closed: bool,
    /// A handoff was refused because the queue was full: say `Ready` once it drains.
    refused: bool,
}

/// What [`HandoffQueue::offer`] did with a connection. A connection not taken comes back: the
/// primary kept no copy, so it is sent back with the refusal and offered to another worker.
pub(crate) enum Offer {
    Taken,
    Full(OwnedFd),
    Closed(OwnedFd),
}

#[derive(Debug, Default)]
pub(crate) struct HandoffQueue {
    state: Mutex<State>,
}

impl HandoffQueue {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // No code panics while holding the lock, so it is never poisoned; recover anyway.
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The driver hands over a connection.
    pub(crate) fn offer(&self, conn: Conn) -> Offer {
        let mut state = self.lock();
        // Refused, the prefix stays with the primary, which sends it again with the connection.
        if state.closed {
            return Offer::Closed(conn.0);
        }
        if state.items.len() >= CAPACITY {
            state.refused = true;
            return Offer::Full(conn.0);
        }
        state.items.push_back(conn);
        if let Some(waker) = state.waker.take() {
            waker.wake();
        }
        Offer::Taken
    }

    /// The listener takes the next connection; `None` once closed. The flag is true when the
    /// primary should be told there is room again.
    pub(crate) fn poll_pop(&self, cx: &Context<'_>) -> Poll<Option<(Conn, bool)>> {
        let mut state = self.lock();
        match state.items.pop_front() {
            Some(stream) => {
                let ready = state.refused && state.items.len() <= CAPACITY / 2;
                if ready {
                    state.refused = false;
                }
                Poll::Ready(Some((stream, ready)))
            }
            None if state.closed => Poll::Ready(None),
            None => {
                state.waker = Some(cx.waker().clone());
                Poll::Pending
            }
        }
    }

    /// Closes the queue and returns what the application never accepted.
    pub(crate) fn close(&self) -> Vec<Conn> {
        let mut state = self.lock();
        state.closed = true;
        if let Some(waker) = state.waker.take() {
            waker.wake();
        }
        state.items.drain(..).collect()
    }
}
