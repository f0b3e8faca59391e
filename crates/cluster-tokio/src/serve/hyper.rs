//! Serving a hyper service from a cluster listener, with the drain a reload needs (feature
//! `hyper`).
//!
//! ```no_run
//! use std::convert::Infallible;
//!
//! use http_body_util::Full;
//! use hyper::body::{Bytes, Incoming};
//! use hyper::service::service_fn;
//! use hyper::{Request, Response};
//!
//! # async fn dox() -> std::io::Result<()> {
//! let listener = cluster_tokio::ClusterListener::bind("127.0.0.1:3000").await?;
//! let service = service_fn(|_: Request<Incoming>| async {
//!     Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"hello\n"))))
//! });
//! // Serves until the worker is asked to leave, then drains and returns.
//! cluster_tokio::hyper::serve(listener, service).await
//! # }
//! ```

use std::error::Error as StdError;
use std::fmt;
use std::future::{Future, IntoFuture};
use std::io;
use std::pin::Pin;
use std::time::Duration;

use hyper::body::{Body, Incoming};
use hyper::service::Service;
use hyper::{Request, Response};

use super::Drain;
use crate::net::Listener;

/// Serves `service` (cloned for each connection; a `hyper::service::service_fn` closure will do)
/// over HTTP/1.1, with upgrades, on every connection of `listener` (a [`ClusterListener`] or a
/// [`ClusterUnixListener`]) until the worker is asked to leave, then drains.
///
/// Once [`shutdown`](crate::shutdown) resolves (in a worker: the primary asked it to leave, for
/// a reload or a shutdown; in a plain process: SIGTERM or SIGINT), it stops accepting (connections
/// handed over but not accepted go back to the primary), answers every request with
/// `Connection: close` for [`keep_alive_grace`](Serve::keep_alive_grace) (500 ms), so that
/// keep-alive clients send their next request elsewhere instead of racing the close of an idle
/// connection, then closes idle connections and waits for requests in flight, until
/// [`drain_timeout`](Serve::drain_timeout). It ends sooner once no connection is left.
/// Connections upgraded to another protocol (WebSockets) are the application's from then on:
/// they are not drained, and close when the runtime shuts down, as `main` returns.
///
/// Accept errors never end it: those about one connection are skipped, others (such as
/// `EMFILE`) are logged and retried after a second.
///
/// [`ClusterListener`]: crate::ClusterListener
/// [`ClusterUnixListener`]: crate::net::ClusterUnixListener
pub fn serve<L, S>(listener: L, service: S) -> Serve<L, S>
where
    L: Listener,
    S: Clone,
{
    Serve {
        listener,
        service,
        drain: Drain::default(),
    }
}

/// A server that [`serve`] set up: await it (it implements [`IntoFuture`]), after setting its
/// drain if the defaults do not fit.
#[must_use = "a server does nothing until awaited"]
pub struct Serve<L, S> {
    listener: L,
    service: S,
    drain: Drain,
}

impl<L, S> Serve<L, S> {
    /// How long a draining server keeps answering requests with `Connection: close` before it
    /// closes the connections left: long enough for a busy keep-alive client to send one more
    /// request. 500 ms unless set. Counted within [`Self::drain_timeout`].
    pub fn keep_alive_grace(mut self, grace: Duration) -> Self {
        self.drain.grace = Some(grace);
        self
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

impl<L: fmt::Debug, S> fmt::Debug for Serve<L, S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Serve")
            .field("listener", &self.listener)
            .field("keep_alive_grace", &self.drain.grace())
            .field("drain_timeout", &self.drain.timeout())
            .finish_non_exhaustive()
    }
}

impl<L, S, B> IntoFuture for Serve<L, S>
where
    L: Listener,
    S: Service<Request<Incoming>, Response = Response<B>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<Box<dyn StdError + Send + Sync>>,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn StdError + Send + Sync>>,
{
    /// `Ok` once drained; no error today (accept errors are retried).
    type Output = io::Result<()>;
    type IntoFuture = Pin<Box<dyn Future<Output = io::Result<()>> + Send>>;

    fn into_future(self) -> Self::IntoFuture {
        let Self {
            listener,
            service,
            drain,
        } = self;
        Box::pin(super::http1::serve(
            listener,
            move |_peer| service.clone(),
            drain,
        ))
    }
}
