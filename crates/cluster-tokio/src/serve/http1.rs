//! The HTTP/1.1 server with the keep-alive drain, which the axum and hyper helpers share.

use std::error::Error as StdError;
use std::future::Future;
use std::io;
use std::pin::{Pin, pin};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll, ready};

use hyper::body::{Body, Incoming as IncomingBody};
use hyper::header::{CONNECTION, HeaderValue};
use hyper::server::conn::http1::UpgradeableConnection;
use hyper::service::Service;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::watch;
use tokio::time::Instant;

use super::{Drain, Incoming};
use crate::net::Listener;

type BoxError = Box<dyn StdError + Send + Sync>;

/// Serves HTTP/1.1 (with upgrades) on every connection of `listener`, with the service
/// `service` makes for its peer, until [`shutdown`](crate::shutdown) resolves or the worker
/// stops serving; then drains as `drain` says. Accept errors never end it.
pub(crate) async fn serve<L, M, S, B>(listener: L, mut service: M, drain: Drain) -> io::Result<()>
where
    L: Listener,
    M: FnMut(L::Addr) -> S,
    S: Service<Request<IncomingBody>, Response = Response<B>> + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    // The link to the primary stays open until this server's connections are done.
    let _link = super::hold_link();
    let mut incoming = Incoming::new(listener);
    let draining = Arc::new(AtomicBool::new(false));
    // `true`: shut down gracefully. Every connection holds a receiver; dropped: close now.
    let (close, _) = watch::channel(false);
    let mut shutdown = pin!(crate::shutdown());
    loop {
        let (io, peer) = tokio::select! {
            () = &mut shutdown => break,
            accepted = incoming.accept() => match accepted {
                Some(accepted) => accepted,
                None => break,
            },
        };
        let service = Closing {
            inner: service(peer),
            draining: draining.clone(),
        };
        let connection = hyper::server::conn::http1::Builder::new()
            .serve_connection(TokioIo::new(io), service)
            .with_upgrades();
        tokio::spawn(watch_connection(connection, close.subscribe()));
    }
    let deadline = drain.deadline();
    // Connections handed over but not accepted yet go back to the primary, for another worker.
    drop(incoming);
    draining.store(true, Ordering::Relaxed);
    tokio::select! {
        () = tokio::time::sleep_until(deadline.min(Instant::now() + drain.grace())) => {}
        () = close.closed() => return Ok(()),
    }
    close.send_replace(true);
    if tokio::time::timeout_at(deadline, close.closed())
        .await
        .is_err()
    {
        tracing::warn!(
            connections = close.receiver_count(),
            "drain deadline passed; closing the connections left"
        );
    }
    Ok(())
}

/// Runs `connection` until it ends; shuts it down gracefully once `close` says so, and drops it
/// once the server is gone (its drain deadline passed, or it was dropped).
async fn watch_connection<I, S, B>(
    connection: UpgradeableConnection<TokioIo<I>, Closing<S>>,
    mut close: watch::Receiver<bool>,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    S: Service<Request<IncomingBody>, Response = Response<B>>,
    S::Error: Into<BoxError>,
    B: Body + 'static,
    B::Error: Into<BoxError>,
{
    let mut connection = pin!(connection);
    tokio::select! {
        _ = connection.as_mut() => return,
        _ = close.wait_for(|close| *close) => {}
    }
    connection.as_mut().graceful_shutdown();
    tokio::select! {
        _ = connection => {}
        () = async { while close.changed().await.is_ok() {} } => {}
    }
}

/// A service whose responses say `Connection: close` once the server drains.
#[derive(Debug)]
struct Closing<S> {
    inner: S,
    draining: Arc<AtomicBool>,
}

impl<S, B> Service<Request<IncomingBody>> for Closing<S>
where
    S: Service<Request<IncomingBody>, Response = Response<B>>,
{
    type Response = Response<B>;
    type Error = S::Error;
    type Future = ClosingFuture<S::Future>;

    fn call(&self, request: Request<IncomingBody>) -> Self::Future {
        ClosingFuture {
            inner: self.inner.call(request),
            draining: self.draining.clone(),
        }
    }
}

pin_project_lite::pin_project! {
    /// A response of [`Closing`]: the flag is read when the response is ready, so a request in
    /// flight when the drain starts is answered with `Connection: close` too.
    struct ClosingFuture<F> {
        #[pin]
        inner: F,
        draining: Arc<AtomicBool>,
    }
}

impl<F, B, E> Future for ClosingFuture<F>
where
    F: Future<Output = Result<Response<B>, E>>,
{
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let mut response = ready!(this.inner.poll(cx))?;
        if this.draining.load(Ordering::Relaxed) {
            response
                .headers_mut()
                .insert(CONNECTION, HeaderValue::from_static("close"));
        }
        Poll::Ready(Ok(response))
    }
}
