//! Serve helpers: a server wired to [`shutdown`](crate::shutdown) that drains its connections
//! without losing a request, for axum, hyper and tonic (one module each, behind the feature of
//! the same name).
//!
//! What they share is here: the one builder, [`Serve`], with the knobs of the drain; accepting
//! with a policy for accept errors; and (in `http` and `connection`, for axum and hyper) the
//! HTTP server and its drain. Closing an HTTP/1.1 connection hyper considers idle races with a
//! request the client is sending on it. So a worker leaving while others stay does not close
//! them: it stops each at its next idle point and hands it back to the primary with the bytes it
//! read and did not parse, and another worker goes on serving it. When the whole cluster stops,
//! the server answers every HTTP/1.1 request with `Connection: close` for a grace period
//! (keep-alive clients move on after their next request, cleanly), then closes what is left
//! gently (HTTP/2 connections get a `GOAWAY` either way), within a deadline.

#[cfg(feature = "axum")]
pub mod axum;
mod builder;
#[cfg(any(feature = "axum", feature = "hyper"))]
mod connection;
#[cfg(any(feature = "axum", feature = "hyper"))]
mod http;
#[cfg(feature = "hyper")]
pub mod hyper;
#[cfg(any(feature = "axum", feature = "hyper"))]
mod rewind;
#[cfg(feature = "tonic")]
pub mod tonic;

use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use tokio::time::{Instant, Sleep};

use crate::net::Listener;

pub(crate) use builder::Front;
#[cfg(any(feature = "axum", feature = "hyper"))]
pub(crate) use builder::Http1;
pub use builder::Serve;

/// How long a draining HTTP/1.1 server keeps answering requests with `Connection: close` before
/// it closes the connections left, unless set otherwise.
#[cfg_attr(not(any(feature = "axum", feature = "hyper")), allow(dead_code))]
pub(crate) const KEEP_ALIVE_GRACE: Duration = Duration::from_millis(500);

/// The most a drain leaves of the disconnect timeout for the worker to exit before the primary
/// kills it.
const EXIT_MARGIN: Duration = Duration::from_secs(1);

/// How long to wait before accepting again after an error that is not about one connection
/// (`EMFILE`, `ENFILE`, `ENOBUFS`, `ENOMEM`): axum's and hyper's choice.
pub(crate) const ACCEPT_BACKOFF: Duration = Duration::from_secs(1);

/// What an accept loop of a worker does with an accept error.
pub(crate) enum AcceptError {
    /// The worker is shutting down (`NotConnected`): no more connections come.
    Leaving,
    /// About one connection, gone before it was taken: go on with the next.
    Skip,
    /// Anything else, such as `EMFILE`: log it, wait [`ACCEPT_BACKOFF`], try again.
    Backoff,
}

impl AcceptError {
    pub(crate) fn of(error: &std::io::Error) -> Self {
        use std::io::ErrorKind;
        match error.kind() {
            ErrorKind::NotConnected => Self::Leaving,
            ErrorKind::ConnectionAborted
            | ErrorKind::ConnectionReset
            | ErrorKind::ConnectionRefused => Self::Skip,
            _ => Self::Backoff,
        }
    }
}

/// The timing of a drain, as a helper's builder sets it.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Drain {
    /// How long to keep answering with `Connection: close`; `None`: [`KEEP_ALIVE_GRACE`].
    #[cfg_attr(not(any(feature = "axum", feature = "hyper")), allow(dead_code))]
    pub(crate) grace: Option<Duration>,
    /// The whole drain, grace included; `None`: until a little before the primary would kill
    /// the worker (see [`Self::deadline`]).
    pub(crate) timeout: Option<Duration>,
}

impl Drain {
    #[cfg_attr(not(any(feature = "axum", feature = "hyper")), allow(dead_code))]
    pub(crate) fn grace(&self) -> Duration {
        self.grace.unwrap_or(KEEP_ALIVE_GRACE)
    }

    /// The configured timeout, or the default one of [`default_drain_timeout`] (for display).
    pub(crate) fn timeout(&self) -> Duration {
        self.timeout.unwrap_or_else(default_drain_timeout)
    }

    /// When a drain starting now must end: the configured timeout from now; otherwise a little
    /// before the deadline the primary gave this worker when it asked it to leave (the disconnect
    /// timeout, or SIGINT's 5 s), or when the worker does not know one, [`default_drain_timeout`]
    /// from now.
    pub(crate) fn deadline(&self) -> Instant {
        let now = Instant::now();
        if let Some(timeout) = self.timeout {
            return now + timeout;
        }
        match crate::worker::current().and_then(|w| w.leave_deadline()) {
            Some(killed_at) => {
                let left = killed_at.saturating_duration_since(now);
                now + left.saturating_sub((left / 10).min(EXIT_MARGIN))
            }
            None => now + default_drain_timeout(),
        }
    }
}

/// A little under [`DEFAULT_LEAVE_TIMEOUT`](crate::worker::DEFAULT_LEAVE_TIMEOUT) (29 s of 30 s),
/// for a process that no primary gave a deadline: the one fallback of
/// [`Worker::leave_deadline`](crate::Worker::leave_deadline).
pub(crate) fn default_drain_timeout() -> Duration {
    let leave = crate::worker::DEFAULT_LEAVE_TIMEOUT;
    leave.saturating_sub((leave / 10).min(EXIT_MARGIN))
}

/// In a worker, keeps its link to the primary open while a server runs, drain included: the
/// primary's `Disconnect` comes once the server's connections are done (see
/// [`Worker::hold_link`](crate::Worker::hold_link)).
pub(crate) fn hold_link() -> Option<crate::worker::LinkHold> {
    crate::worker::current().map(|worker| worker.hold_link())
}

/// The connections of a [`Listener`], with accept errors handled: those about one connection
/// (aborted, reset, refused) are skipped; others, such as `EMFILE`, are logged and retried after
/// [`ACCEPT_BACKOFF`], so they never end serving. Ends once the worker is shutting down.
#[derive(Debug)]
pub(crate) struct Incoming<L> {
    listener: L,
    backoff: Option<Pin<Box<Sleep>>>,
}

impl<L: Listener> Incoming<L> {
    pub(crate) fn new(listener: L) -> Self {
        Self {
            listener,
            backoff: None,
        }
    }

    /// The next connection, its peer's address, and the guard to keep while it is open; `None`
    /// once the worker is shutting down.
    #[cfg_attr(not(feature = "tonic"), allow(dead_code))]
    pub(crate) fn poll_accept(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<crate::net::Accepted<L::Io, L::Addr>>> {
        self.poll_with_policy(cx, L::poll_accept_peer)
    }

    /// As [`Self::poll_accept`], with the bytes to read before the socket's (a connection
    /// another worker handed back; only once the listener said it takes them).
    #[cfg_attr(not(any(feature = "axum", feature = "hyper")), allow(dead_code))]
    pub(crate) fn poll_accept_prefixed(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<crate::net::Handed<L::Io, L::Addr>>> {
        self.poll_with_policy(cx, L::poll_accept_prefixed)
    }

    /// Polls `accept` on the listener with the policy for accept errors (see the type's doc).
    fn poll_with_policy<T>(
        &mut self,
        cx: &mut Context<'_>,
        accept: fn(&mut L, &mut Context<'_>) -> Poll<std::io::Result<T>>,
    ) -> Poll<Option<T>> {
        loop {
            if let Some(backoff) = &mut self.backoff {
                ready!(backoff.as_mut().poll(cx));
                self.backoff = None;
            }
            let error = match ready!(accept(&mut self.listener, cx)) {
                Ok(accepted) => return Poll::Ready(Some(accepted)),
                Err(error) => error,
            };
            match AcceptError::of(&error) {
                AcceptError::Leaving => return Poll::Ready(None),
                AcceptError::Skip => {}
                AcceptError::Backoff => {
                    tracing::error!(%error, "accept failed; retrying in 1s");
                    self.backoff = Some(Box::pin(tokio::time::sleep(ACCEPT_BACKOFF)));
                }
            }
        }
    }

    /// As [`Self::poll_accept_prefixed`].
    #[cfg_attr(not(any(feature = "axum", feature = "hyper")), allow(dead_code))]
    pub(crate) async fn accept_prefixed(&mut self) -> Option<crate::net::Handed<L::Io, L::Addr>> {
        std::future::poll_fn(|cx| self.poll_accept_prefixed(cx)).await
    }

    /// The listener, to set it up before serving.
    #[cfg_attr(not(any(feature = "axum", feature = "hyper")), allow(dead_code))]
    pub(crate) fn listener_mut(&mut self) -> &mut L {
        &mut self.listener
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_drain_ends_a_little_before_the_disconnect_timeout() {
        // Without a primary's deadline, the default one: 30 s.
        assert_eq!(default_drain_timeout(), Duration::from_secs(29));
    }
}
