//! Serving an axum [`Router`] from a cluster listener, with the drain a reload needs
//! (feature `axum`).
//!
//! ```no_run
//! use std::net::SocketAddr;
//!
//! use axum::Router;
//! use axum::extract::ConnectInfo;
//! use axum::routing::get;
//!
//! # async fn dox() -> std::io::Result<()> {
//! let listener = cluster_tokio::ClusterListener::bind("127.0.0.1:3000").await?;
//! let app = Router::new().route(
//!     "/",
//!     get(|ConnectInfo(peer): ConnectInfo<SocketAddr>| async move { format!("Hello {peer}\n") }),
//! );
//! // Serves until the worker is asked to leave, then drains and returns.
//! cluster_tokio::axum::serve(listener, app).await
//! # }
//! ```

use std::future::{Future, IntoFuture};
use std::io;
use std::pin::Pin;

use axum::Router;
use axum::extract::ConnectInfo;
use hyper::body::Incoming;
use hyper::service::service_fn;

use crate::net::Listener;

/// Serves `router` on every connection of `listener` (a [`ClusterListener`] or a
/// [`ClusterUnixListener`]) until the worker is asked to leave, then drains: what
/// `axum::serve(listener, router).with_graceful_shutdown(cluster::shutdown())` does, without
/// the failed requests.
///
/// It speaks HTTP/1.1, with upgrades (WebSockets), and HTTP/2 over cleartext (h2c, with prior
/// knowledge), as `axum::serve` does. Each request carries its peer's address as
/// [`ConnectInfo<L::Addr>`](ConnectInfo) (`ConnectInfo<SocketAddr>` on TCP), for axum's
/// extractor.
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
pub fn serve<L: Listener>(listener: L, router: Router) -> Serve<L> {
    Serve::new(listener, Axum(router))
}

/// The server [`serve`] sets up: its knobs are [`Serve`](crate::Serve)'s.
pub type Serve<L> = crate::Serve<L, Axum>;

/// What an axum [`Serve`] serves: the router.
#[derive(Debug)]
pub struct Axum(Router);

impl super::Front for Axum {
    const HTTP1: bool = true;
}

impl super::Http1 for Axum {}

impl<L: Listener> IntoFuture for Serve<L> {
    /// `Ok` once drained; no error today (accept errors are retried), as `axum::serve`'s.
    type Output = io::Result<()>;
    type IntoFuture = Pin<Box<dyn Future<Output = io::Result<()>> + Send>>;

    fn into_future(self) -> Self::IntoFuture {
        let Axum(router) = self.app;
        let service = move |peer: L::Addr| {
            let router = router.clone();
            service_fn(move |mut request: hyper::Request<Incoming>| {
                request.extensions_mut().insert(ConnectInfo(peer.clone()));
                tower_service::Service::call(&mut router.clone(), request)
            })
        };
        Box::pin(super::http::serve(self.listener, service, self.drain))
    }
}
