//! One connection of the HTTP server: which protocol it speaks, serving it, and how it ends in
//! each phase of the drain (handed back between two requests, closed gently, or cut at the
//! deadline).

use std::pin::{Pin, pin};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::Poll;
use std::time::Duration;

use hyper::body::{Body, Incoming as IncomingBody};
use hyper::server::conn::{http1, http2};
use hyper::service::Service;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::watch;

use super::http::{BoxError, ConnState, Shared, Tracked};
use super::rewind::Rewind;
use crate::net::{ConnectionGuard, HandBack, Listener};

/// Where the server's drain is; every connection follows it. The sender dropped means: end now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Phase {
    Serving,
    /// Other workers stay: stop each HTTP/1.1 connection at its next idle point and hand it
    /// back; HTTP/2 connections get a `GOAWAY`.
    HandBack,
    /// The cluster stops: HTTP/1.1 responses say `Connection: close` (the shared flag).
    Closing,
    /// The grace is over: idle connections close, busy ones after their response.
    CloseIdle,
}

/// HTTP/2's connection preface (prior knowledge, RFC 9113 §3.4).
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// How long a gentle close waits for the client to close its side.
const LINGER: Duration = Duration::from_secs(1);

/// The most a gentle close reads and throws away.
const LINGER_BYTES: usize = 64 * 1024;

/// A connection to serve: the socket, the bytes to read before its own (handed back by another
/// worker), and the application's service for it.
pub(crate) struct Task<L: Listener, S> {
    pub(crate) io: L::Io,
    pub(crate) prefix: Vec<u8>,
    /// Dropped when the connection is over here (served to its end, closed, or handed back):
    /// the primary's count of this worker's open connections drops.
    pub(crate) guard: ConnectionGuard,
    pub(crate) service: S,
    pub(crate) phase: watch::Receiver<Phase>,
    pub(crate) shared: Arc<Shared>,
    pub(crate) hand_back: Option<HandBack>,
}

impl<L, S, B> Task<L, S>
where
    L: Listener,
    S: Service<Request<IncomingBody>, Response = Response<B>> + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    pub(crate) async fn run(self) {
        let Self {
            io,
            prefix,
            guard: _guard,
            service,
            mut phase,
            shared,
            hand_back,
        } = self;
        let mut io = Rewind::new(io, prefix);
        // Which protocol, from the first bytes; until they come the connection is idle, and
        // ends as an idle one does.
        let h2 = loop {
            if let Some(h2) = speaks_h2(io.prefix()) {
                break h2;
            }
            let current = *phase.borrow_and_update();
            if current == Phase::HandBack {
                let (io, unread) = io.into_parts();
                hand_back_or_close::<L>(io, unread, hand_back.as_ref(), &shared).await;
                return;
            }
            if current == Phase::CloseIdle {
                close_gently(io).await;
                return;
            }
            tokio::select! {
                read = io.read_more() => if !matches!(read, Ok(1..)) {
                    close_gently(io).await;
                    return;
                },
                changed = phase.changed() => if changed.is_err() {
                    return;
                },
            }
        };
        let state = Arc::new(ConnState::default());
        let service = Tracked {
            inner: Box::new(service),
            state: state.clone(),
            shared: shared.clone(),
            http1: !h2,
        };
        if h2 {
            serve_h2(TokioIo::new(io), service, phase).await;
        } else {
            serve_h1::<L, S, B>(io, service, state, phase, &shared, hand_back.as_ref()).await;
        }
    }
}

/// `Some(true)` for HTTP/2's preface, `Some(false)` for anything else, `None` while what came
/// so far could still be the preface.
fn speaks_h2(first: &[u8]) -> Option<bool> {
    let n = first.len().min(H2_PREFACE.len());
    if first[..n] != H2_PREFACE[..n] {
        Some(false)
    } else if n == H2_PREFACE.len() {
        Some(true)
    } else {
        None
    }
}

async fn serve_h2<Io, S, B>(
    io: TokioIo<Rewind<Io>>,
    service: Tracked<S>,
    mut phase: watch::Receiver<Phase>,
) where
    Io: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    S: Service<Request<IncomingBody>, Response = Response<B>> + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    let mut conn = pin!(http2::Builder::new(TokioExecutor::new()).serve_connection(io, service));
    let mut going_away = false;
    loop {
        if !going_away
            && matches!(
                *phase.borrow_and_update(),
                Phase::HandBack | Phase::CloseIdle
            )
        {
            going_away = true;
            conn.as_mut().graceful_shutdown();
        }
        tokio::select! {
            _ = conn.as_mut() => return,
            changed = phase.changed() => if changed.is_err() {
                return;
            },
        }
    }
}

/// What the HTTP/1.1 connection did when it stopped being polled.
enum Step {
    Done(hyper::Result<()>),
    /// A request asks to switch protocols.
    Upgrade,
    /// To hand back before its first request: hyper would only stop it after serving one, but
    /// nothing was written, so its parts can be taken as they are.
    Fresh,
}

async fn serve_h1<L, S, B>(
    io: Rewind<L::Io>,
    service: Tracked<S>,
    state: Arc<ConnState>,
    mut phase: watch::Receiver<Phase>,
    shared: &Shared,
    hand_back: Option<&HandBack>,
) where
    L: Listener,
    S: Service<Request<IncomingBody>, Response = Response<B>> + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    // The low-level connection, which gives the socket and its unparsed bytes back; it cannot
    // upgrade, so it becomes one that can when a request asks (`Step::Upgrade`).
    let mut conn = http1::Builder::new().serve_connection(TokioIo::new(io), service);
    let mut handing_back = false;
    let mut closing_idle = false;
    let mut shut = false;
    let step = loop {
        match *phase.borrow_and_update() {
            Phase::HandBack => handing_back = true,
            Phase::CloseIdle => closing_idle = true,
            _ => {}
        }
        // Stopped only between two requests: an idle connection ends at once, without writing
        // anything; a busy one once its response is written. Never one whose response says
        // `Connection: close`: hyper closes it itself once that response is flushed (stopping
        // it earlier would drop the unflushed end of the response).
        let stoppable = |state: &ConnState| {
            state.in_flight.load(Ordering::Relaxed) == 0
                && !state.must_close.load(Ordering::Relaxed)
        };
        let polled = std::future::poll_fn(|cx| {
            loop {
                if handing_back && state.requests.load(Ordering::Relaxed) == 0 {
                    return Poll::Ready(Step::Fresh);
                }
                let mut settling = false;
                if (handing_back || closing_idle) && !shut && stoppable(&state) {
                    if state.body_unsettled.swap(false, Ordering::Relaxed) {
                        // The last request had a body: hyper learns whether the application
                        // read it all only on its next poll (an unread rest closes the
                        // connection). Stopped before that, the rest would go to the next
                        // worker as if it were a request.
                        settling = true;
                    } else {
                        shut = true;
                        Pin::new(&mut conn).graceful_shutdown();
                    }
                }
                if let Poll::Ready(done) = conn.poll_without_shutdown(cx) {
                    return Poll::Ready(Step::Done(done));
                }
                if state.wants_upgrades.load(Ordering::Relaxed) {
                    return Poll::Ready(Step::Upgrade);
                }
                // Settled, or its last response was just written: stop it now.
                if !(settling || ((handing_back || closing_idle) && !shut && stoppable(&state))) {
                    return Poll::Pending;
                }
            }
        });
        tokio::select! {
            step = polled => break step,
            changed = phase.changed() => if changed.is_err() {
                return;
            },
        }
    };
    match step {
        Step::Upgrade => {
            let mut conn = conn.with_upgrades();
            state.upgrades.store(true, Ordering::Relaxed);
            // Upgraded connections are not handed back: they end as they would anyway.
            let mut shut = false;
            loop {
                if !shut
                    && matches!(
                        *phase.borrow_and_update(),
                        Phase::HandBack | Phase::CloseIdle
                    )
                {
                    shut = true;
                    Pin::new(&mut conn).graceful_shutdown();
                }
                tokio::select! {
                    _ = &mut conn => return,
                    changed = phase.changed() => if changed.is_err() {
                        return;
                    },
                }
            }
        }
        Step::Fresh => {
            let parts = conn.into_parts();
            let (io, rest) = parts.io.into_inner().into_parts();
            let mut unread = Vec::from(parts.read_buf);
            unread.extend_from_slice(&rest);
            if unread.len() > HandBack::MAX_UNREAD {
                close_gently(Rewind::new(io, unread)).await;
            } else {
                hand_back_or_close::<L>(io, unread, hand_back, shared).await;
            }
        }
        Step::Done(Err(_)) => {
            let parts = conn.into_parts();
            close_gently(parts.io.into_inner()).await;
        }
        Step::Done(Ok(())) => {
            let parts = conn.into_parts();
            let (io, rest) = parts.io.into_inner().into_parts();
            // hyper's unparsed bytes came before those the rewind still holds.
            let mut unread = Vec::from(parts.read_buf);
            unread.extend_from_slice(&rest);
            if !(handing_back && shut) || state.must_close.load(Ordering::Relaxed) {
                // It ended on its own (the client closed it, or asked to).
                close_gently(Rewind::new(io, unread)).await;
                return;
            }
            if unread.len() > HandBack::MAX_UNREAD {
                // Too much to carry: finish the request it started here, then close.
                let io = TokioIo::new(Rewind::new(io, unread));
                // Its next request may ask to upgrade: this connection can.
                state.upgrades.store(true, Ordering::Relaxed);
                let last = http1::Builder::new()
                    .keep_alive(false)
                    .serve_connection(io, parts.service)
                    .with_upgrades();
                tokio::select! {
                    _ = last => {}
                    _ = phase.wait_for(|_| false) => {}
                }
                return;
            }
            hand_back_or_close::<L>(io, unread, hand_back, shared).await;
        }
    }
}

/// Hands an idle connection back to the primary, or closes it gently where that cannot be done.
async fn hand_back_or_close<L: Listener>(
    io: L::Io,
    unread: Vec<u8>,
    hand_back: Option<&HandBack>,
    shared: &Shared,
) {
    let Some(hand_back) = hand_back.filter(|h| h.is_wanted()) else {
        close_gently(Rewind::new(io, unread)).await;
        return;
    };
    match L::into_fd(io) {
        Ok(fd) => match hand_back.send(fd, unread) {
            Ok(()) => {
                shared.handed_back.fetch_add(1, Ordering::Relaxed);
            }
            // The link is gone; so is the worker, in a moment.
            Err(error) => tracing::debug!(%error, "connection closed"),
        },
        Err(error) => tracing::debug!(%error, "connection not handed back; closed"),
    }
}

/// Closes a connection without destroying what is still on its way to the client: a close with
/// unread input sends a reset, which can make the client drop the response it has not read yet.
/// So: half-close, then read (and throw away) what comes until the client closes, bounded.
pub(crate) async fn close_gently<Io: AsyncRead + AsyncWrite + Unpin>(mut io: Io) {
    if io.shutdown().await.is_err() {
        return;
    }
    let drain = async {
        let mut buf = [0; 4096];
        let mut read = 0;
        while read < LINGER_BYTES {
            match io.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => read += n,
            }
        }
    };
    let _ = tokio::time::timeout(LINGER, drain).await;
}
