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
use std::future::{Future, IntoFuture};
use std::io;
use std::pin::Pin;

use hyper::body::{Body, Incoming};
use hyper::service::Service;
use hyper::{Request, Response};

use crate::net::Listener;

/// Serves `service` (cloned for each connection; a `hyper::service::service_fn` closure will do)
/// over HTTP/1.1, with upgrades, and over HTTP/2 in cleartext (h2c, with prior knowledge), on every connection of `listener` (a [`ClusterListener`] or a
/// [`ClusterUnixListener`]) until the worker is asked to leave, then drains.
///
/// Once [`shutdown`](crate::shutdown) resolves (in a worker: the primary asked it to leave, for
/// a reload or a shutdown; in a plain process: SIGTERM or SIGINT), it stops accepting (connections
/// handed over but not accepted go back to the primary), answers every request with
/// `Connection: close` over HTTP/1.1 for [`keep_alive_grace`](crate::Serve::keep_alive_grace)
/// (500 ms), so that keep-alive clients send their next request elsewhere instead of racing the
/// close of an idle connection, then closes idle connections, sends HTTP/2 clients a `GOAWAY`
/// and waits for requests in flight, until
/// [`drain_timeout`](crate::Serve::drain_timeout). It ends sooner once no connection is left.
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
    Serve::new(listener, Hyper(service))
}

/// The server [`serve`] sets up: its knobs are [`Serve`](crate::Serve)'s.
pub type Serve<L, S> = crate::Serve<L, Hyper<S>>;

/// What a hyper [`Serve`] serves: the service, cloned for each connection.
#[derive(Debug)]
pub struct Hyper<S>(S);

impl<S> super::Front for Hyper<S> {
    const HTTP1: bool = true;
}

impl<S> super::Http1 for Hyper<S> {}

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
        let Hyper(service) = self.app;
        Box::pin(super::http::serve(
            self.listener,
            move |_peer| service.clone(),
            self.drain,
        ))
    }
}
