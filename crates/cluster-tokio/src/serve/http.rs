//! The HTTP server with the keep-alive drain, which the axum and hyper helpers share: HTTP/1.1
//! (with upgrades) and HTTP/2 over cleartext (h2c, prior knowledge), told apart by the first
//! bytes of each connection.
//!
//! How a drain ends a connection depends on where the worker is going. Leaving while other
//! workers stay (a rolling reload, a scale-down), it stops each HTTP/1.1 connection at its next
//! idle point (between two requests) and hands it back to the primary with the bytes it read and
//! did not parse, for another worker to go on serving: the client sees nothing. When the whole
//! cluster stops there is nowhere to go: HTTP/1.1 responses say `Connection: close` for a grace
//! period, then the connections left close, gently (see `connection::close_gently`). HTTP/2
//! connections get a `GOAWAY` either way.

use std::error::Error as StdError;
use std::future::Future;
use std::io;
use std::pin::{Pin, pin};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};

use hyper::body::{Body, Frame, Incoming as IncomingBody, SizeHint};
use hyper::header::{CONNECTION, HeaderValue, UPGRADE};
use hyper::service::Service;
use hyper::{Method, Request, Response, Version};
use tokio::sync::watch;
use tokio::time::Instant;

use super::connection::{self, Phase};
use super::{Drain, Incoming};
use crate::net::Listener;

pub(crate) type BoxError = Box<dyn StdError + Send + Sync>;

/// What the connections of one server share.
#[derive(Debug, Default)]
pub(crate) struct Shared {
    /// HTTP/1.1 responses say `Connection: close` (the cluster is stopping).
    pub(crate) closing: AtomicBool,
    /// Connections handed back to the primary.
    pub(crate) handed_back: AtomicU64,
    /// Requests not answered yet, on all connections: what a drain deadline cuts.
    pub(crate) unanswered: AtomicUsize,
}

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
    // This server reads what another worker handed back with a connection first.
    incoming.listener_mut().take_prefixes();
    let hand_back = incoming.listener_mut().hand_back();
    let shared = Arc::new(Shared::default());
    // Every connection's task holds a receiver: the phase of the drain reaches each, and the
    // sender sees when all are done. Dropping it (the deadline passed, or this future was
    // dropped) ends the connections left at once.
    let (phase, _) = watch::channel(Phase::Serving);
    let mut shutdown = pin!(crate::shutdown());
    loop {
        let (io, peer, guard, prefix) = tokio::select! {
            () = &mut shutdown => break,
            accepted = incoming.accept_prefixed() => match accepted {
                Some(accepted) => accepted,
                None => break,
            },
        };
        let task = connection::Task::<L, S> {
            io,
            prefix,
            guard,
            service: service(peer),
            phase: phase.subscribe(),
            shared: shared.clone(),
            hand_back: hand_back.clone(),
        };
        tokio::spawn(task.run());
    }
    let deadline = drain.deadline();
    // Connections handed over but not accepted yet go back to the primary, for another worker.
    drop(incoming);
    let handing_back = hand_back.as_ref().is_some_and(|h| h.is_wanted());
    if handing_back {
        phase.send_replace(Phase::HandBack);
    } else {
        shared.closing.store(true, Ordering::Relaxed);
        phase.send_replace(Phase::Closing);
        tokio::select! {
            () = tokio::time::sleep_until(deadline.min(Instant::now() + drain.grace())) => {}
            () = phase.closed() => return Ok(()),
        }
        phase.send_replace(Phase::CloseIdle);
    }
    let finished = tokio::time::timeout_at(deadline, phase.closed()).await;
    let handed_back = shared.handed_back.load(Ordering::Relaxed);
    if finished.is_err() {
        // Connections still open, and requests among them not answered yet: what the deadline
        // cuts (a response still streaming its body counts as a connection only).
        let connections = phase.receiver_count();
        let requests = shared.unanswered.load(Ordering::Relaxed);
        tracing::warn!(
            connections,
            requests,
            handed_back,
            "the drain deadline passed: cutting {connections} connections, {requests} requests unanswered"
        );
    } else if handing_back {
        tracing::debug!(handed_back, "drained: idle connections handed back");
    }
    Ok(())
}

/// One connection's state, shared by its driver and its service.
#[derive(Debug, Default)]
pub(crate) struct ConnState {
    /// Requests it has had, answered or not.
    pub(crate) requests: AtomicU64,
    /// The last request came with a body: whether the application read all of it is known
    /// only once hyper has polled again (see `connection::serve_h1`).
    pub(crate) body_unsettled: AtomicBool,
    /// Requests whose response is not completely written yet.
    pub(crate) in_flight: AtomicUsize,
    /// A request asked to switch protocols: the connection must be able to upgrade before its
    /// response goes out.
    pub(crate) wants_upgrades: AtomicBool,
    /// The connection can upgrade now.
    pub(crate) upgrades: AtomicBool,
    /// The client or the application said `Connection: close` (or spoke HTTP/1.0): the client
    /// expects the connection to close after this response, so it is not handed back.
    pub(crate) must_close: AtomicBool,
}

/// The application's service for one connection, counting its requests in flight and marking
/// its responses as the drain requires.
pub(crate) struct Tracked<S> {
    pub(crate) inner: Box<S>,
    pub(crate) state: Arc<ConnState>,
    pub(crate) shared: Arc<Shared>,
    /// HTTP/1.x: headers about the connection apply (HTTP/2 forbids them).
    pub(crate) http1: bool,
}

impl<S, B> Service<Request<IncomingBody>> for Tracked<S>
where
    S: Service<Request<IncomingBody>, Response = Response<B>>,
    S::Future: Send + 'static,
    B: Body + Send + 'static,
{
    type Response = Response<TrackedBody<B>>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, S::Error>> + Send>>;

    fn call(&self, request: Request<IncomingBody>) -> Self::Future {
        self.state.requests.fetch_add(1, Ordering::Relaxed);
        let guard = InFlight::new(self.state.clone());
        let unanswered = Unanswered::new(self.shared.clone());
        let http1 = self.http1;
        if http1 {
            if !request.body().is_end_stream() {
                self.state.body_unsettled.store(true, Ordering::Relaxed);
            }
            let old_without_keep_alive =
                request.version() < Version::HTTP_11 && !has_token(&request, "keep-alive");
            if old_without_keep_alive || has_token(&request, "close") {
                self.state.must_close.store(true, Ordering::Relaxed);
            }
            if request.method() == Method::CONNECT || request.headers().contains_key(UPGRADE) {
                self.state.wants_upgrades.store(true, Ordering::Relaxed);
            }
        }
        let state = self.state.clone();
        let shared = self.shared.clone();
        let response = self.inner.call(request);
        Box::pin(async move {
            let mut response = response.await?;
            drop(unanswered);
            if http1 {
                if state.wants_upgrades.load(Ordering::Relaxed) {
                    // The driver switches the connection to one that can upgrade before this
                    // response (a `101`, maybe) is written.
                    std::future::poll_fn(|cx| {
                        if state.upgrades.load(Ordering::Relaxed) {
                            Poll::Ready(())
                        } else {
                            cx.waker().wake_by_ref();
                            Poll::Pending
                        }
                    })
                    .await;
                }
                // Read when the response is ready, so a request in flight when the drain starts
                // is answered with `Connection: close` too.
                if shared.closing.load(Ordering::Relaxed) {
                    response
                        .headers_mut()
                        .insert(CONNECTION, HeaderValue::from_static("close"));
                }
                if response
                    .headers()
                    .get_all(CONNECTION)
                    .iter()
                    .any(|v| token_in(v, "close"))
                {
                    state.must_close.store(true, Ordering::Relaxed);
                }
            }
            Ok(response.map(|body| TrackedBody {
                body,
                _guard: guard,
            }))
        })
    }
}

/// Whether the request's `Connection` header names `token`.
fn has_token(request: &Request<IncomingBody>, token: &str) -> bool {
    request
        .headers()
        .get_all(CONNECTION)
        .iter()
        .any(|v| token_in(v, token))
}

fn token_in(value: &HeaderValue, token: &str) -> bool {
    value
        .to_str()
        .is_ok_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
}

/// A request counted unanswered by the server until its response is ready.
struct Unanswered(Arc<Shared>);

impl Unanswered {
    fn new(shared: Arc<Shared>) -> Self {
        shared.unanswered.fetch_add(1, Ordering::Relaxed);
        Self(shared)
    }
}

impl Drop for Unanswered {
    fn drop(&mut self) {
        self.0.unanswered.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A request counted in flight until its response body is done with (written or dropped).
#[derive(Debug)]
struct InFlight(Arc<ConnState>);

impl InFlight {
    fn new(state: Arc<ConnState>) -> Self {
        state.in_flight.fetch_add(1, Ordering::Relaxed);
        Self(state)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

pin_project_lite::pin_project! {
    /// A response body that keeps its request counted in flight until hyper is done with it.
    pub(crate) struct TrackedBody<B> {
        #[pin]
        body: B,
        _guard: InFlight,
    }
}

impl<B: Body> Body for TrackedBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        self.project().body.poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}
