//! Serving a tonic router from a cluster listener, drained within a deadline (feature `tonic`).
//!
//! ```no_run
//! # async fn dox() -> Result<(), Box<dyn std::error::Error>> {
//! let listener = cluster_tokio::ClusterListener::bind("127.0.0.1:50051").await?;
//! let (_reporter, health) = tonic_health::server::health_reporter();
//! let router = tonic::transport::Server::builder().add_service(health);
//! // Serves until the worker is asked to leave, then drains and returns.
//! cluster_tokio::tonic::serve(listener, router).await?;
//! # Ok(())
//! # }
//! ```

use std::error::Error as StdError;
use std::future::{Future, IntoFuture};
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{Request, Response};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tonic::body::Body;
use tonic::service::Routes;
use tonic::transport::server::{Connected, Router};
use tower_layer::Layer;
use tower_service::Service;

use super::Incoming;
use crate::net::{ConnectionGuard, Listener};

type BoxError = Box<dyn StdError + Send + Sync>;

/// Serves `router` on every connection of `listener` (a [`ClusterListener`] or a
/// [`ClusterUnixListener`]) until the worker is asked to leave, then drains: tonic's
/// `serve_with_incoming_shutdown(listener, cluster::shutdown())`, with a deadline and with
/// accept errors handled.
///
/// Once [`shutdown`](crate::shutdown) resolves (in a worker: the primary asked it to leave, for
/// a reload or a shutdown; in a plain process: SIGTERM or SIGINT), tonic stops accepting and
/// shuts its connections down gracefully: over HTTP/2 a `GOAWAY` tells clients which requests
/// were taken, and they send new ones elsewhere, so there is no close race to wait out. It
/// waits for requests in flight until [`drain_timeout`](crate::Serve::drain_timeout), then returns;
/// connections still open then are closed when the runtime shuts down, as `main` returns.
///
/// Accept errors never end it, nor spin: those about one connection are skipped, others (such
/// as `EMFILE`) are logged and retried after a second (tonic itself retries at once).
///
/// [`ClusterListener`]: crate::ClusterListener
/// [`ClusterUnixListener`]: crate::net::ClusterUnixListener
pub fn serve<L, Lyr>(listener: L, router: Router<Lyr>) -> Serve<L, Lyr>
where
    L: Listener,
    L::Io: Connected,
{
    Serve::new(listener, Tonic(router))
}

/// The server [`serve`] sets up: its knob is [`Serve::drain_timeout`](crate::Serve::drain_timeout).
pub type Serve<L, Lyr> = crate::Serve<L, Tonic<Lyr>>;

/// What a tonic [`Serve`] serves: the router.
#[derive(Debug)]
pub struct Tonic<Lyr>(Router<Lyr>);

impl<Lyr> super::Front for Tonic<Lyr> {
    // HTTP/2 only: a `GOAWAY` leaves no close to race, so no grace.
    const HTTP1: bool = false;
}

impl<L, Lyr, ResBody> IntoFuture for Serve<L, Lyr>
where
    L: Listener,
    L::Io: Connected,
    Lyr: Layer<Routes> + Send + 'static,
    Lyr::Service: Service<Request<Body>, Response = Response<ResBody>> + Clone + Send + 'static,
    <Lyr::Service as Service<Request<Body>>>::Future: Send,
    <Lyr::Service as Service<Request<Body>>>::Error: Into<BoxError> + Send,
    ResBody: http_body::Body<Data = Bytes> + Send + 'static,
    ResBody::Error: Into<BoxError>,
{
    /// tonic's result: `Ok` once drained or at the deadline.
    type Output = Result<(), tonic::transport::Error>;
    type IntoFuture = Pin<Box<dyn Future<Output = Self::Output> + Send>>;

    fn into_future(self) -> Self::IntoFuture {
        let Tonic(router) = self.app;
        let (listener, drain) = (self.listener, self.drain);
        Box::pin(async move {
            // The link to the primary stays open until this server's connections are done.
            let _link = super::hold_link();
            let server = router.serve_with_incoming_shutdown(
                Connections(Incoming::new(listener)),
                crate::shutdown(),
            );
            // The deadline counts from the request to leave, whether tonic heard it from the
            // signal or from the listener ending.
            let deadline = async {
                crate::shutdown().await;
                tokio::time::sleep_until(drain.deadline()).await;
            };
            tokio::select! {
                result = server => result,
                () = deadline => {
                    tracing::warn!("drain deadline passed; returning (the connections left end with the runtime)");
                    Ok(())
                }
            }
        })
    }
}

/// The connections of a listener as the stream tonic takes.
struct Connections<L>(Incoming<L>);

impl<L: Listener> futures_core::Stream for Connections<L> {
    type Item = io::Result<Tracked<L::Io>>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.0
            .poll_accept(cx)
            .map(|accepted| accepted.map(|(io, _peer, guard)| Ok(Tracked { io, _guard: guard })))
    }
}

/// A connection with the guard that says when it ends: tonic drops it with the connection.
struct Tracked<Io> {
    io: Io,
    _guard: ConnectionGuard,
}

impl<Io: Connected> Connected for Tracked<Io> {
    type ConnectInfo = Io::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.io.connect_info()
    }
}

impl<Io: AsyncRead + Unpin> AsyncRead for Tracked<Io> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<Io: AsyncWrite + Unpin> AsyncWrite for Tracked<Io> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}
