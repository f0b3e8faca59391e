//! What user code binds: [`ClusterListener`] (TCP), [`ClusterUnixListener`] and
//! [`ClusterUdpSocket`]. Each works the same in a worker (the primary owns the socket) and in a
//! plain process (it binds itself); this module holds what they share.

mod hand_back;
mod tcp;
mod udp;
mod unix;

use std::future::Future;
use std::io;
use std::os::fd::OwnedFd;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use proto::HandleId;
use proto::wire::{BoundAddr, ListenFlags, ListenRequest, ListenTarget, SocketKind};

pub use hand_back::{HandBack, HandBackError};
pub use tcp::ClusterListener;
pub use udp::ClusterUdpSocket;
pub use unix::ClusterUnixListener;

use crate::socket::{self, SocketFile};
use crate::worker::{self, Ended, Granted, HandoffQueue, Worker};

/// Says when a connection ends, for the primary's count of each worker's open connections: the
/// `least-outstanding` policy and per-worker caps
/// ([`Settings::max_connections_per_worker`](crate::Settings::max_connections_per_worker)).
///
/// [`ClusterListener::accept_tracked`] and [`ClusterUnixListener::accept_tracked`] give one with
/// each connection; keep it as long as the connection is open (move it into the task that serves
/// the connection) and drop it when done. A connection taken with `accept`, `poll_accept` or as
/// a stream item counts as ended when it is taken, since the runtime cannot see when it ends: the
/// primary then balances on connections waiting to be taken, not on connections being served.
/// The serve helpers (axum, hyper, tonic) keep one per connection themselves.
///
/// Outside a worker, or for a connection the primary did not hand over (shared sockets,
/// `reuse_port`, `exclusive`), it does nothing.
#[must_use = "dropping the guard says the connection ended"]
pub struct ConnectionGuard {
    /// `None`: nothing to report.
    ended: Option<(Arc<Ended>, bool)>,
}

/// A connection just taken, with its peer's address and the guard that says when it ends.
#[cfg(any(feature = "axum", feature = "hyper", feature = "tonic"))]
pub(crate) type Accepted<Io, Addr> = (Io, Addr, ConnectionGuard);

/// A connection just taken and the guard that says when it ends.
type Tracked<S> = (S, ConnectionGuard);

impl ConnectionGuard {
    /// A guard with nothing to report.
    fn inert() -> Self {
        Self { ended: None }
    }
}

impl std::fmt::Debug for ConnectionGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnectionGuard")
            .field("counted", &self.ended.is_some())
            .finish()
    }
}

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        if let Some((ended, promptly)) = self.ended.take() {
            ended.one(promptly);
        }
    }
}

/// A connection, with the bytes to read before its own.
type Prefixed<S> = (S, ConnectionGuard, Vec<u8>);

/// A connection, its peer's address, and the bytes to read before its own.
#[cfg(any(feature = "axum", feature = "hyper", feature = "tonic"))]
pub(crate) type Handed<Io, Addr> = (Io, Addr, ConnectionGuard, Vec<u8>);

/// A stream listener the serve helpers take: [`ClusterListener`] or [`ClusterUnixListener`].
///
/// Sealed: it names what the helpers (`cluster::axum::serve`, `cluster::hyper::serve`,
/// `cluster::tonic::serve`) need of a listener, and only these two have it.
#[cfg(any(feature = "axum", feature = "hyper", feature = "tonic"))]
pub trait Listener: sealed::Sealed + Send + Unpin + 'static {
    /// A connection: `tokio::net::TcpStream` or `tokio::net::UnixStream`.
    type Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static;
    /// The peer's address: `std::net::SocketAddr` or `tokio::net::unix::SocketAddr`.
    type Addr: Clone + std::fmt::Debug + Send + Sync + 'static;

    /// Polls for the next connection, its peer's address, and the guard that says when it ends:
    /// `NotConnected` once the worker is shutting down, `ConnectionAborted` for a connection gone
    /// before it was looked at.
    #[doc(hidden)]
    fn poll_accept_peer(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<io::Result<Accepted<Self::Io, Self::Addr>>>;

    /// As [`Self::poll_accept_peer`], with the bytes to read before the socket's (a connection
    /// another worker handed back); only after [`Self::take_prefixes`].
    #[doc(hidden)]
    fn poll_accept_prefixed(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<io::Result<Handed<Self::Io, Self::Addr>>>;

    /// Says that this listener's connections may come with a prefix.
    #[doc(hidden)]
    fn take_prefixes(&mut self);

    /// Where to hand connections back, in a worker whose connections come from the primary.
    #[doc(hidden)]
    fn hand_back(&self) -> Option<HandBack>;

    /// The connection's socket, to hand back.
    #[doc(hidden)]
    fn into_fd(io: Self::Io) -> io::Result<OwnedFd>;

    /// The address it listens on, for `axum::serve::Listener`.
    #[doc(hidden)]
    fn local_addr(&self) -> io::Result<Self::Addr>;
}

/// One impl for both listeners (a blanket impl over [`Listener`] is not allowed on axum's trait).
#[cfg(feature = "axum")]
macro_rules! axum_listener {
    ($($listener:ty),*) => {$(
        /// With the `axum` feature, `axum::serve(listener, app)` works directly on both listeners; but
        /// [`axum::serve`](crate::axum::serve) is the one that drains without failing requests.
        ///
        /// `accept` cannot fail in axum's trait: as axum's own `TcpListener` does, errors that concern
        /// one connection are skipped, and others (such as `EMFILE`) are logged and retried after a
        /// second. Once the worker is shutting down it waits forever: pair `axum::serve` with
        /// `.with_graceful_shutdown(cluster::shutdown())`, which ends the accept loop (and closes idle
        /// keep-alive connections at once, racing requests clients are sending on them).
        ///
        /// For `ConnectInfo<SocketAddr>`, wrap the listener with `axum::serve::ListenerExt::tap_io`
        /// (`listener.tap_io(|_| {})`) and use `into_make_service_with_connect_info::<SocketAddr>()`: axum
        /// implements `Connected` only for its own listeners and for `TapIo`, and the orphan rule keeps
        /// us from adding an impl for `ClusterListener`. [`axum::serve`](crate::axum::serve) inserts
        /// `ConnectInfo` itself.
        impl axum::serve::Listener for $listener {
            type Io = <Self as Listener>::Io;
            type Addr = <Self as Listener>::Addr;

            async fn accept(&mut self) -> (Self::Io, Self::Addr) {
                use crate::serve::{ACCEPT_BACKOFF, AcceptError};
                loop {
                    let accepted =
                        std::future::poll_fn(|cx| Listener::poll_accept_peer(self, cx)).await;
                    let error = match accepted {
                        // axum does not say when a connection ends: it counts as ended now.
                        Ok((io, peer, _ended)) => return (io, peer),
                        Err(error) => error,
                    };
                    match AcceptError::of(&error) {
                        AcceptError::Leaving => std::future::pending().await,
                        AcceptError::Skip => {}
                        AcceptError::Backoff => {
                            tracing::error!(%error, "accept failed; retrying in 1s");
                            tokio::time::sleep(ACCEPT_BACKOFF).await;
                        }
                    }
                }
            }

            fn local_addr(&self) -> io::Result<Self::Addr> {
                Listener::local_addr(self)
            }
        }
    )*};
}

#[cfg(feature = "axum")]
axum_listener!(ClusterListener, ClusterUnixListener);

/// A connection just accepted, with its peer's address: one reset before it was looked at
/// (`NotConnected`) is `ConnectionAborted`, nothing to serve.
#[cfg(any(feature = "axum", feature = "hyper", feature = "tonic"))]
fn with_peer<S, A>(
    (stream, guard): (S, ConnectionGuard),
    peer: io::Result<A>,
) -> io::Result<(S, A, ConnectionGuard)> {
    match peer {
        Ok(peer) => Ok((stream, peer, guard)),
        Err(e) if e.kind() == io::ErrorKind::NotConnected => {
            Err(io::Error::new(io::ErrorKind::ConnectionAborted, e))
        }
        Err(e) => Err(e),
    }
}

#[cfg(any(feature = "axum", feature = "hyper", feature = "tonic"))]
mod sealed {
    #[expect(unnameable_types)] // The sealing trait: nameable by nobody outside, on purpose.
    pub trait Sealed {}
    impl Sealed for super::ClusterListener {}
    impl Sealed for super::ClusterUnixListener {}
}

/// The backlog of sockets a process binds itself (Node's default).
const DEFAULT_BACKLOG: u32 = 511;

/// Options of a bind, for [`ClusterListener::bind_with`], [`ClusterUnixListener::bind_with`] and
/// [`ClusterUdpSocket::bind_with`]. The defaults are those of a plain bind.
///
/// ```
/// let options = cluster_tokio::net::ListenOptions::new().backlog(1024).ipv6_only(true);
/// # let _ = options;
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[must_use]
pub struct ListenOptions {
    backlog: u32,
    ipv6_only: bool,
    reuse_addr: bool,
    reuse_port: bool,
    exclusive: bool,
    readable_all: bool,
    writable_all: bool,
}

impl ListenOptions {
    /// The defaults.
    pub fn new() -> Self {
        Self::default()
    }

    /// The accept backlog; 0, the default, means the primary's
    /// [`Settings::backlog`](crate::Settings::backlog) (511). The primary creates each socket
    /// once: the first worker's backlog is the one applied, as in Node.
    pub fn backlog(mut self, backlog: u32) -> Self {
        self.backlog = backlog;
        self
    }

    /// `IPV6_V6ONLY`: `::` then leaves IPv4 to others (by default `::` is dual-stack).
    pub fn ipv6_only(mut self, on: bool) -> Self {
        self.ipv6_only = on;
        self
    }

    /// UDP: `SO_REUSEADDR`, so other sockets may bind the same address (Node's `reuseAddr`).
    pub fn reuse_addr(mut self, on: bool) -> Self {
        self.reuse_addr = on;
        self
    }

    /// Each worker binds its own socket with `SO_REUSEPORT` and the kernel balances between
    /// them; the primary is not involved (Node's `reusePort`).
    pub fn reuse_port(mut self, on: bool) -> Self {
        self.reuse_port = on;
        self
    }

    /// The worker binds the socket itself and the primary is not involved (Node's
    /// `exclusive`): port 0 gives each worker its own port, and a fixed port is `AddrInUse` in
    /// the second worker.
    pub fn exclusive(mut self, on: bool) -> Self {
        self.exclusive = on;
        self
    }

    /// Unix sockets: make the socket file readable by everyone (Node's `readableAll`).
    pub fn readable_all(mut self, on: bool) -> Self {
        self.readable_all = on;
        self
    }

    /// Unix sockets: make the socket file writable by everyone (Node's `writableAll`).
    pub fn writable_all(mut self, on: bool) -> Self {
        self.writable_all = on;
        self
    }

    fn request(&self, target: ListenTarget, kind: SocketKind) -> ListenRequest {
        ListenRequest {
            target,
            kind,
            backlog: self.backlog,
            flags: ListenFlags {
                ipv6_only: self.ipv6_only,
                reuse_addr: self.reuse_addr,
                readable_all: self.readable_all,
                writable_all: self.writable_all,
            },
        }
    }
}

/// What a bind got.
enum Acquired {
    /// A socket in this process: bound here, or the primary's shared socket (with its guard).
    Socket {
        fd: OwnedFd,
        addr: BoundAddr,
        guard: Option<HandleGuard>,
        file: Option<SocketFile>,
    },
    /// Connections handed over by the primary, one by one.
    Handoff { handoff: Handoff, addr: BoundAddr },
}

/// Binds `target`: through the primary in a worker, unless `options` bypass it; here otherwise.
async fn acquire(
    target: ListenTarget,
    kind: SocketKind,
    options: &ListenOptions,
) -> io::Result<Acquired> {
    let request = options.request(target, kind);
    let bypass = options.exclusive || options.reuse_port;
    let Some(worker) = worker::current().filter(|_| !bypass) else {
        let bound = socket::bind(&request, DEFAULT_BACKLOG, options.reuse_port)?;
        let socket::Bound { socket, addr, file } = bound;
        let fd = OwnedFd::from(socket);
        return Ok(Acquired::Socket {
            fd,
            addr,
            guard: None,
            file,
        });
    };
    Ok(match worker.listen(request).await? {
        Granted::RoundRobin {
            handle,
            addr,
            queue,
            report_ends,
        } => Acquired::Handoff {
            handoff: Handoff {
                queue,
                report_ends,
                guard: HandleGuard { worker, handle },
            },
            addr,
        },
        Granted::Shared {
            handle,
            addr,
            socket,
        } => Acquired::Socket {
            fd: socket,
            addr,
            guard: Some(HandleGuard { worker, handle }),
            file: None,
        },
    })
}

/// Binds the first address `addr` resolves to that works, as `TcpListener::bind` does, and
/// builds the listener with `make`.
async fn bind_first<T>(
    addr: impl tokio::net::ToSocketAddrs,
    kind: SocketKind,
    options: &ListenOptions,
    make: fn(Acquired) -> io::Result<T>,
) -> io::Result<T> {
    let mut last = None;
    for addr in tokio::net::lookup_host(addr).await? {
        match acquire(ListenTarget::Ip(addr), kind, options)
            .await
            .and_then(make)
        {
            Ok(bound) => return Ok(bound),
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| {
        io::Error::new(io::ErrorKind::InvalidInput, "address resolved to nothing")
    }))
}

/// Gives the handle back to the primary when the listener goes.
#[derive(Debug)]
struct HandleGuard {
    worker: Worker,
    handle: HandleId,
}

impl Drop for HandleGuard {
    fn drop(&mut self) {
        self.worker.close(self.handle);
    }
}

/// Connections the primary hands this worker on one round-robin handle.
#[derive(Debug)]
struct Handoff {
    queue: Arc<HandoffQueue>,
    /// The primary wants ended connections reported at once.
    report_ends: bool,
    guard: HandleGuard,
}

impl Handoff {
    /// The next connection with its prefix, and the guard that reports its end (`tracked`), or
    /// counted as ended now (otherwise); `None` once the worker stopped serving.
    fn poll_next(
        &self,
        cx: &Context<'_>,
        tracked: bool,
    ) -> Poll<Option<(OwnedFd, ConnectionGuard, Vec<u8>)>> {
        let Some(((conn, prefix), room_again)) = ready!(self.queue.poll_pop(cx)) else {
            return Poll::Ready(None);
        };
        // The primary stopped offering after we refused while full; say there is room.
        if room_again {
            self.guard.worker.has_room(self.guard.handle);
        }
        let ended = self.guard.worker.ended().clone();
        if !tracked {
            ended.one(self.report_ends);
            return Poll::Ready(Some((conn, ConnectionGuard::inert(), prefix)));
        }
        let guard = ConnectionGuard {
            ended: Some((ended, self.report_ends)),
        };
        Poll::Ready(Some((conn, guard, prefix)))
    }
}

impl Drop for Handoff {
    fn drop(&mut self) {
        // Connections acked but never accepted go back to the primary (before the guard's
        // `Close`), to be served by another worker.
        self.guard
            .worker
            .give_back(self.guard.handle, self.queue.close());
    }
}

/// What a stream listener is made of, per socket family (tokio has no trait over
/// `TcpListener` and `UnixListener`).
trait Family {
    type Listener: std::fmt::Debug + Send + Sync;
    type Stream;
    fn listener(fd: OwnedFd) -> io::Result<Self::Listener>;
    fn stream(fd: OwnedFd) -> io::Result<Self::Stream>;
    fn poll_accept(
        listener: &Self::Listener,
        cx: &mut Context<'_>,
    ) -> Poll<io::Result<Self::Stream>>;
}

/// The connections of one stream listener, whatever their source, until the worker stops
/// serving.
#[derive(Debug)]
struct Incoming<F: Family> {
    source: Source<F>,
    shutdown: Shutdown,
    /// The primary was told this listener reads a prefix before the socket.
    takes_prefixes: bool,
}

#[derive(Debug)]
enum Source<F: Family> {
    /// A socket this process accepts on: bound here, or the primary's shared socket.
    Listener {
        /// Removed before the socket closes (fields drop in order): nobody sees a file whose
        /// socket refuses connections and takes it for stale.
        _file: Option<SocketFile>,
        listener: F::Listener,
        _guard: Option<HandleGuard>,
    },
    /// Connections handed over by the primary.
    Handoff(Handoff),
}

impl<F: Family> Incoming<F> {
    /// From what a bind got, with where it is bound.
    fn new(acquired: Acquired) -> io::Result<(Self, BoundAddr)> {
        let (source, addr) = match acquired {
            Acquired::Socket {
                fd,
                addr,
                guard,
                file,
            } => {
                let source = Source::Listener {
                    _file: file,
                    listener: F::listener(fd)?,
                    _guard: guard,
                };
                (source, addr)
            }
            Acquired::Handoff { handoff, addr } => (Source::Handoff(handoff), addr),
        };
        let incoming = Self {
            source,
            shutdown: Shutdown::new(),
            takes_prefixes: false,
        };
        Ok((incoming, addr))
    }

    /// From a listener this process bound on its own.
    fn own(listener: F::Listener) -> Self {
        Self {
            source: Source::Listener {
                _file: None,
                listener,
                _guard: None,
            },
            shutdown: Shutdown::new(),
            takes_prefixes: false,
        }
    }

    /// From now on, connections may come with a prefix (only from the primary).
    fn take_prefixes(&mut self) {
        if let (Source::Handoff(handoff), false) = (&self.source, self.takes_prefixes) {
            handoff.guard.worker.takes_prefixes(handoff.guard.handle);
        }
        self.takes_prefixes = true;
    }

    /// Where to hand connections back: only those the primary handed over.
    fn hand_back(&self) -> Option<HandBack> {
        match &self.source {
            Source::Handoff(handoff) => Some(HandBack::new(
                handoff.guard.worker.clone(),
                handoff.guard.handle,
            )),
            Source::Listener { .. } => None,
        }
    }

    /// The socket accepted on here, if connections are not handed over.
    #[cfg_attr(not(feature = "axum"), allow(dead_code))]
    fn listener(&self) -> Option<&F::Listener> {
        match &self.source {
            Source::Listener { listener, .. } => Some(listener),
            Source::Handoff(_) => None,
        }
    }

    fn poll_next(&mut self, cx: &mut Context<'_>) -> Poll<Option<io::Result<F::Stream>>> {
        self.poll_next_tracked(cx, false)
            .map(|next| next.map(|result| result.map(|(stream, _)| stream)))
    }

    /// The next connection and its guard; see [`ConnectionGuard`] for `tracked`.
    fn poll_next_tracked(
        &mut self,
        cx: &mut Context<'_>,
        tracked: bool,
    ) -> Poll<Option<io::Result<Tracked<F::Stream>>>> {
        Poll::Ready(match ready!(self.poll_next_prefixed(cx, tracked)) {
            Some(Ok((stream, guard, prefix))) if prefix.is_empty() => Some(Ok((stream, guard))),
            // Only once it said it takes prefixes: the bytes cannot go where they are not read.
            Some(Ok(_)) => Some(Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "a connection handed back with unread bytes: accept it with `accept_with_prefix`",
            ))),
            Some(Err(error)) => Some(Err(error)),
            None => None,
        })
    }

    /// The next connection, its guard, and the bytes to read before its own.
    fn poll_next_prefixed(
        &mut self,
        cx: &mut Context<'_>,
        tracked: bool,
    ) -> Poll<Option<io::Result<Prefixed<F::Stream>>>> {
        if self.shutdown.is_ready(cx) {
            return Poll::Ready(None);
        }
        match &mut self.source {
            Source::Listener { listener, .. } => F::poll_accept(listener, cx).map(|result| {
                Some(result.map(|stream| (stream, ConnectionGuard::inert(), Vec::new())))
            }),
            Source::Handoff(handoff) => match ready!(handoff.poll_next(cx, tracked)) {
                // A connection that cannot be wrapped is closed: it ends here.
                Some((conn, guard, prefix)) => {
                    Poll::Ready(Some(F::stream(conn).map(|s| (s, guard, prefix))))
                }
                None => Poll::Ready(None),
            },
        }
    }
}

/// Resolves when the worker stops serving (never outside a worker, or with a bypassing bind in
/// a worker that is not shutting down).
struct Shutdown {
    wait: Option<Pin<Box<dyn Future<Output = ()> + Send + Sync>>>,
    /// `wait` finished: it is never polled again (a listener may be polled after its end).
    done: bool,
}

impl Shutdown {
    fn new() -> Self {
        let wait = worker::current().map(|worker| {
            let mut rx = worker.shutdown_receiver();
            let wait: Pin<Box<dyn Future<Output = ()> + Send + Sync>> = Box::pin(async move {
                let _ = rx.wait_for(|v| *v).await;
            });
            wait
        });
        Self { wait, done: false }
    }

    fn is_ready(&mut self, cx: &mut Context<'_>) -> bool {
        if let (Some(wait), false) = (&mut self.wait, self.done) {
            self.done = wait.as_mut().poll(cx).is_ready();
        }
        self.done
    }
}

impl std::fmt::Debug for Shutdown {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Shutdown")
    }
}

/// What `accept` gives once the worker stopped serving. Not at once: it pends until the
/// worker's [`shutdown`](crate::shutdown) has resolved, and one turn more, so that in the
/// documented loop (`select!` on `accept()` and `shutdown()`) the shutdown branch is always the
/// one taken, whatever order the branches are polled in; a loop on `accept` alone then ends
/// with `NotConnected`.
async fn stopped<T>() -> io::Result<T> {
    if let Some(worker) = worker::current() {
        worker.shutdown().await;
    }
    tokio::task::yield_now().await;
    Err(shutting_down())
}

fn shutting_down() -> io::Error {
    io::Error::new(io::ErrorKind::NotConnected, "the worker is shutting down")
}

fn wrong_family(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, what.to_owned())
}
