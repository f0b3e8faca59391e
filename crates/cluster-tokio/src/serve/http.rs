//! The HTTP server with the keep-alive drain, which the axum and hyper helpers share: HTTP/1.1
//! (with upgrades) and HTTP/2 over cleartext (h2c, prior knowledge), told apart by hyper-util's
//! auto builder, drained with its `GracefulShutdown`.

use std::error::Error as StdError;
use std::future::Future;
use std::io;
use std::pin::{Pin, pin};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::task::{Context, Poll, ready};

use hyper::body::{Body, Incoming as IncomingBody};
use hyper::header::{CONNECTION, HeaderValue};
use hyper::service::Service;
use hyper::{Request, Response, Version};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::sync::watch;
use tokio::time::Instant;

use super::{Drain, Incoming};
use crate::net::Listener;

type BoxError = Box<dyn StdError + Send + Sync>;

/// Serves HTTP/1.1 (with upgrades) and h2c on every connection of `listener`, with the service
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
    let builder = auto::Builder::new(TokioExecutor::new());
    let draining = Arc::new(AtomicBool::new(false));
    let requests = Arc::new(AtomicUsize::new(0));
    let graceful = GracefulShutdown::new();
    // Every connection's task holds a receiver: dropping the sender (the drain deadline passed,
    // or this future was dropped) ends the connections left at once.
    let (abort, _) = watch::channel(());
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
            requests: requests.clone(),
        };
        let connection = builder
            .serve_connection_with_upgrades(TokioIo::new(io), service)
            .into_owned();
        let connection = graceful.watch(connection);
        let mut aborted = abort.subscribe();
        tokio::spawn(async move {
            tokio::select! {
                _ = connection => {}
                _ = aborted.changed() => {}
            }
        });
    }
    let deadline = drain.deadline();
    // Connections handed over but not accepted yet go back to the primary, for another worker.
    drop(incoming);
    draining.store(true, Ordering::Relaxed);
    tokio::select! {
        () = tokio::time::sleep_until(deadline.min(Instant::now() + drain.grace())) => {}
        () = abort.closed() => return Ok(()),
    }
    if tokio::time::timeout_at(deadline, graceful.shutdown())
        .await
        .is_err()
    {
        // Connections still open, and requests among them not answered yet: what the deadline
        // cuts (a response still streaming its body counts as a connection only).
        let connections = abort.receiver_count();
        let requests = requests.load(Ordering::Relaxed);
        tracing::warn!(
            connections,
            requests,
            "the drain deadline passed: cutting {connections} connections, {requests} requests unanswered"
        );
    }
    Ok(())
}

/// A service whose HTTP/1.x responses say `Connection: close` once the server drains (HTTP/2
/// forbids the header; its connections get a `GOAWAY` instead).
#[derive(Debug)]
struct Closing<S> {
    inner: S,
    draining: Arc<AtomicBool>,
    /// Requests whose response is not ready yet, over every connection.
    requests: Arc<AtomicUsize>,
}

impl<S, B> Service<Request<IncomingBody>> for Closing<S>
where
    S: Service<Request<IncomingBody>, Response = Response<B>>,
{
    type Response = Response<B>;
    type Error = S::Error;
    type Future = ClosingFuture<S::Future>;

    fn call(&self, request: Request<IncomingBody>) -> Self::Future {
        let http1 = request.version() < Version::HTTP_2;
        ClosingFuture {
            inner: self.inner.call(request),
            draining: http1.then(|| self.draining.clone()),
            _unanswered: Unanswered::new(&self.requests),
        }
    }
}

pin_project_lite::pin_project! {
    /// A response of [`Closing`]: the flag is read when the response is ready, so a request in
    /// flight when the drain starts is answered with `Connection: close` too.
    struct ClosingFuture<F> {
        #[pin]
        inner: F,
        // `None` for an HTTP/2 request.
        draining: Option<Arc<AtomicBool>>,
        _unanswered: Unanswered,
    }
}

/// One request counted as unanswered until its response is ready (or it is dropped).
#[derive(Debug)]
struct Unanswered(Arc<AtomicUsize>);

impl Unanswered {
    fn new(count: &Arc<AtomicUsize>) -> Self {
        count.fetch_add(1, Ordering::Relaxed);
        Self(count.clone())
    }
}

impl Drop for Unanswered {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
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
        if this
            .draining
            .as_ref()
            .is_some_and(|draining| draining.load(Ordering::Relaxed))
        {
            response
                .headers_mut()
                .insert(CONNECTION, HeaderValue::from_static("close"));
        }
        Poll::Ready(Ok(response))
    }
}
