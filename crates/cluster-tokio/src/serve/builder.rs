//! The one builder of the three serve helpers: the drain's knobs, once.

use std::fmt;
use std::time::Duration;

use super::Drain;

/// A server that `axum::serve`, `hyper::serve` or `tonic::serve` set up (`A` is what it serves:
/// `axum::Axum`, `hyper::Hyper<S>`, `tonic::Tonic<Lyr>`): await it (it implements
/// [`IntoFuture`](std::future::IntoFuture)), after setting its drain if the defaults do not fit.
#[must_use = "a server does nothing until awaited"]
pub struct Serve<L, A> {
    pub(crate) listener: L,
    pub(crate) app: A,
    pub(crate) drain: Drain,
}

impl<L, A> Serve<L, A> {
    pub(crate) fn new(listener: L, app: A) -> Self {
        Self {
            listener,
            app,
            drain: Drain::default(),
        }
    }

    /// How long the whole drain may take, grace included, before the connections left are
    /// closed and the future returns. By default a little under the time the primary gave
    /// this worker when it asked it to leave (29 s of the default 30 s disconnect timeout; 4.5 s
    /// of a Ctrl-C's 5 s), so a slow drain still ends before the primary kills the worker.
    pub fn drain_timeout(mut self, timeout: Duration) -> Self {
        self.drain.timeout = Some(timeout);
        self
    }
}

impl<L, A: Http1> Serve<L, A> {
    /// How long a server draining for a shutdown keeps answering HTTP/1.1 requests with
    /// `Connection: close` before it closes the connections left: long enough for a busy
    /// keep-alive client to send one more request. 500 ms unless set. Counted within
    /// [`Self::drain_timeout`]. (HTTP/2 connections are told to go away with a `GOAWAY` at its
    /// end.) A worker replaced by a reload needs no grace: it hands its idle connections back
    /// for another worker to serve ([`Settings::hand_back`](crate::Settings::hand_back)).
    pub fn keep_alive_grace(mut self, grace: Duration) -> Self {
        self.drain.grace = Some(grace);
        self
    }
}

impl<L: fmt::Debug, A: Front> fmt::Debug for Serve<L, A> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut debug = f.debug_struct("Serve");
        debug.field("listener", &self.listener);
        if A::HTTP1 {
            debug.field("keep_alive_grace", &self.drain.grace());
        }
        debug
            .field("drain_timeout", &self.drain.timeout())
            .finish_non_exhaustive()
    }
}

/// What a [`Serve`] may serve: the front-ends' wrappers, and nothing else.
#[expect(unnameable_types)] // Sealed: nameable by nobody outside, on purpose.
pub trait Front {
    /// Whether it speaks HTTP/1.1 and so has a keep-alive grace.
    const HTTP1: bool;
}

/// A front-end that speaks HTTP/1.1: its [`Serve`] has [`Serve::keep_alive_grace`].
#[expect(unnameable_types)] // Sealed, as `Front`.
pub trait Http1: Front {}
