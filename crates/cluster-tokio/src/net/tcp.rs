//! `ClusterListener`: a TCP listener that works the same in a worker and in a plain process.

use std::io;
use std::net::SocketAddr;
use std::os::fd::{OwnedFd, RawFd};
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use proto::wire::{BoundAddr, ListenTarget, SocketKind};
use tokio::net::{TcpListener, TcpStream, ToSocketAddrs};

use super::{Acquired, ConnectionGuard, Family, Incoming, ListenOptions};

/// A TCP listener for clustered servers.
///
/// In a worker, [`bind`](Self::bind) asks the primary for the socket: with the round-robin
/// policy the primary accepts and hands this worker its share of connections; with the shared
/// policy the worker accepts on the primary's socket itself. Port 0 gives one real port shared
/// by every worker. In any other process, `bind` binds the socket itself, so the same program
/// runs unclustered.
///
/// It is a [`Stream`](futures_core::Stream) of `io::Result<TcpStream>` (for tonic's
/// `serve_with_incoming` or a hyper-util accept loop) and has an inherent
/// [`accept`](Self::accept). The stream ends when the worker is asked to disconnect or its
/// primary goes away.
///
/// # Examples
///
/// ```no_run
/// # async fn dox() -> std::io::Result<()> {
/// let mut listener = cluster_tokio::ClusterListener::bind("127.0.0.1:3000").await?;
/// while let Ok((stream, peer)) = listener.accept().await {
///     // serve `stream`
/// #   let _ = (stream, peer);
/// }
/// # Ok(()) }
/// ```
///
/// # Cancel safety
///
/// [`accept`](Self::accept) and `poll_next` are cancel safe: a connection is never lost by
/// dropping the future.
///
/// # Least-outstanding and per-worker caps
///
/// With either, the primary counts the connections each worker has open. Connections taken
/// with [`accept`](Self::accept) or as stream items count only until they are taken (the runtime
/// cannot see their end); take them with [`accept_tracked`](Self::accept_tracked) and keep its
/// [`ConnectionGuard`] while serving for an exact count:
///
/// ```no_run
/// # async fn dox() -> std::io::Result<()> {
/// let mut listener = cluster_tokio::ClusterListener::bind("127.0.0.1:3000").await?;
/// while let Ok((stream, peer, guard)) = listener.accept_tracked().await {
///     tokio::spawn(async move {
///         // serve `stream`; the connection counts as open until `guard` is dropped
/// #       let _ = (stream, peer);
///         drop(guard);
///     });
/// }
/// # Ok(()) }
/// ```
pub struct ClusterListener {
    incoming: Incoming<Tcp>,
    local_addr: SocketAddr,
}

impl std::fmt::Debug for ClusterListener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterListener")
            .field("incoming", &self.incoming)
            .field("local_addr", &self.local_addr)
            .finish()
    }
}

/// TCP, for [`Incoming`].
#[derive(Debug)]
enum Tcp {}

impl Family for Tcp {
    type Listener = TcpListener;
    type Stream = TcpStream;

    fn listener(fd: OwnedFd) -> io::Result<TcpListener> {
        TcpListener::from_std(std::net::TcpListener::from(fd))
    }

    fn stream(fd: OwnedFd) -> io::Result<TcpStream> {
        TcpStream::from_std(std::net::TcpStream::from(fd))
    }

    fn poll_accept(listener: &TcpListener, cx: &mut Context<'_>) -> Poll<io::Result<TcpStream>> {
        listener.poll_accept(cx).map_ok(|(stream, _)| stream)
    }
}

impl ClusterListener {
    /// Listens on `addr`, trying each address it resolves to in turn.
    ///
    /// # Errors
    ///
    /// The address does not resolve, or binding failed in the primary (`AddrInUse`,
    /// `PermissionDenied` for a privileged port, `AddrNotAvailable`…): the same `io::Error` a
    /// plain bind would give. The worker stays alive and may retry.
    pub async fn bind(addr: impl ToSocketAddrs) -> io::Result<Self> {
        Self::bind_with(addr, ListenOptions::default()).await
    }

    /// [`Self::bind`] with options: backlog, `ipv6_only`, `exclusive`, `reuse_port`.
    ///
    /// # Errors
    ///
    /// As [`Self::bind`].
    pub async fn bind_with(addr: impl ToSocketAddrs, options: ListenOptions) -> io::Result<Self> {
        super::bind_first(addr, SocketKind::Stream, &options, Self::from_acquired).await
    }

    /// Listens on the primary's fd `fd`, a listening TCP socket it inherited (Node's
    /// `listen({ fd })`; e.g. from systemd or a parent process). Outside a worker, on this
    /// process's own fd `fd`. The fd itself stays open: the primary listens on a copy (which
    /// shares its open file description, so `fd` becomes non-blocking, as in Node).
    ///
    /// # Errors
    ///
    /// The fd is not open, not a listening stream socket, or a Unix socket (use
    /// [`ClusterUnixListener::from_primary_fd`](super::ClusterUnixListener::from_primary_fd)).
    pub async fn from_primary_fd(fd: RawFd) -> io::Result<Self> {
        let options = ListenOptions::default();
        Self::from_acquired(
            super::acquire(ListenTarget::Fd(fd), SocketKind::Stream, &options).await?,
        )
    }

    /// Listens on the socket the service manager passed the primary under `name` (systemd's
    /// `FileDescriptorName=` in a `.socket` unit); outside a worker, the one passed to this
    /// process. A bind of the socket's address gets it too ([`Self::bind`]); the name says which
    /// socket without repeating its address.
    ///
    /// # Errors
    ///
    /// No socket of that name was passed (`NotFound`, also when the primary was not
    /// socket-activated), or it is not a listening TCP socket.
    pub async fn from_activation(name: &str) -> io::Result<Self> {
        let options = ListenOptions::default();
        let target = ListenTarget::Name(name.to_owned());
        Self::from_acquired(super::acquire(target, SocketKind::Stream, &options).await?)
    }

    /// Wraps a listener this process bound itself: the primary is not involved (Node's
    /// `listen(handle)`), but the stream still ends when the worker shuts down.
    ///
    /// # Errors
    ///
    /// It cannot be made non-blocking or registered with the runtime.
    pub fn from_std(listener: std::net::TcpListener) -> io::Result<Self> {
        listener.set_nonblocking(true)?;
        let local_addr = listener.local_addr()?;
        Ok(Self {
            incoming: Incoming::own(TcpListener::from_std(listener)?),
            local_addr,
        })
    }

    fn from_acquired(acquired: Acquired) -> io::Result<Self> {
        let (incoming, addr) = Incoming::new(acquired)?;
        let BoundAddr::Ip(local_addr) = addr else {
            return Err(super::wrong_family(
                "a Unix socket, not TCP: use ClusterUnixListener for it",
            ));
        };
        Ok(Self {
            incoming,
            local_addr,
        })
    }

    /// The address this listener is bound to, with the real port when port 0 was asked for.
    ///
    /// # Errors
    ///
    /// Never, today; `io::Result` matches `TcpListener::local_addr`.
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        Ok(self.local_addr)
    }

    /// Waits for the next connection and returns it with the peer's address.
    ///
    /// # Errors
    ///
    /// An accept error, or `NotConnected` once the worker is shutting down: not before
    /// [`shutdown`](crate::shutdown) has resolved, so that a `select!` on both always ends in
    /// its shutdown branch, never with this error.
    pub async fn accept(&mut self) -> io::Result<(TcpStream, SocketAddr)> {
        loop {
            let next = std::future::poll_fn(|cx| {
                futures_core::Stream::poll_next(Pin::new(&mut *self), cx)
            });
            let Some(stream) = next.await else {
                return super::stopped().await;
            };
            let stream = stream?;
            match stream.peer_addr() {
                Ok(peer) => return Ok((stream, peer)),
                // Reset before we looked at it: nothing to serve.
                Err(e) if e.kind() == io::ErrorKind::NotConnected => continue,
                Err(e) => return Err(e),
            }
        }
    }

    /// [`Self::accept`], with a [`ConnectionGuard`] to keep while the connection is open: the
    /// primary counts the connection as this worker's until the guard is dropped (for the
    /// least-outstanding policy and per-worker caps).
    ///
    /// # Errors
    ///
    /// As [`Self::accept`].
    pub async fn accept_tracked(&mut self) -> io::Result<(TcpStream, SocketAddr, ConnectionGuard)> {
        loop {
            let next = std::future::poll_fn(|cx| self.incoming.poll_next_tracked(cx, true));
            let Some(accepted) = next.await else {
                return super::stopped().await;
            };
            let (stream, guard) = accepted?;
            match stream.peer_addr() {
                Ok(peer) => return Ok((stream, peer, guard)),
                // Reset before we looked at it: nothing to serve (and it ended).
                Err(e) if e.kind() == io::ErrorKind::NotConnected => continue,
                Err(e) => return Err(e),
            }
        }
    }

    /// As [`Self::accept`], for a server that can read bytes before the socket's: a connection
    /// another worker handed back ([`HandBack`](super::HandBack)) comes with the bytes it had
    /// read and not used, to be parsed first; any other comes with none. The first call tells
    /// the primary that this listener takes such connections; without it, the listener is never
    /// given one. Once called, use it rather than [`Self::accept`] or the `Stream`, which
    /// cannot deliver the bytes and return `InvalidData` for such a connection (it is closed).
    ///
    /// # Errors
    ///
    /// As [`Self::accept`].
    pub async fn accept_with_prefix(&mut self) -> io::Result<(TcpStream, SocketAddr, Vec<u8>)> {
        self.incoming.take_prefixes();
        loop {
            let next = std::future::poll_fn(|cx| self.incoming.poll_next_prefixed(cx, false));
            let Some(accepted) = next.await else {
                return super::stopped().await;
            };
            let (stream, _, prefix) = accepted?;
            match stream.peer_addr() {
                Ok(peer) => return Ok((stream, peer, prefix)),
                Err(e) if e.kind() == io::ErrorKind::NotConnected => continue,
                Err(e) => return Err(e),
            }
        }
    }

    /// Where to hand connections back when this worker leaves while others stay (see
    /// [`HandBack`](super::HandBack)): `None` unless the primary hands this listener its
    /// connections (outside a worker, with the shared policy, or with a socket of its own).
    pub fn hand_back(&self) -> Option<super::HandBack> {
        self.incoming.hand_back()
    }

    /// Polls for the next connection and its peer's address, as tokio's
    /// `TcpListener::poll_accept` does.
    ///
    /// # Errors
    ///
    /// As [`Self::accept`].
    pub fn poll_accept(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<io::Result<(TcpStream, SocketAddr)>> {
        loop {
            let stream = ready!(self.poll_stream(cx))?;
            match stream.peer_addr() {
                Ok(peer) => return Poll::Ready(Ok((stream, peer))),
                // Reset before we looked at it: nothing to serve.
                Err(e) if e.kind() == io::ErrorKind::NotConnected => {}
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }

    /// The next connection, without its peer's address.
    fn poll_stream(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<TcpStream>> {
        match ready!(futures_core::Stream::poll_next(Pin::new(self), cx)) {
            Some(result) => Poll::Ready(result),
            None => Poll::Ready(Err(super::shutting_down())),
        }
    }
}

impl futures_core::Stream for ClusterListener {
    type Item = io::Result<TcpStream>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.incoming.poll_next(cx)
    }
}

#[cfg(any(feature = "axum", feature = "hyper", feature = "tonic"))]
impl super::Listener for ClusterListener {
    type Io = TcpStream;
    type Addr = SocketAddr;

    fn poll_accept_peer(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<io::Result<(TcpStream, SocketAddr, ConnectionGuard)>> {
        let accepted = match ready!(self.incoming.poll_next_tracked(cx, true)) {
            Some(accepted) => accepted?,
            None => return Poll::Ready(Err(super::shutting_down())),
        };
        let peer = accepted.0.peer_addr();
        Poll::Ready(super::with_peer(accepted, peer))
    }

    fn poll_accept_prefixed(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<io::Result<super::Handed<TcpStream, SocketAddr>>> {
        let Some(accepted) = ready!(self.incoming.poll_next_prefixed(cx, true)) else {
            return Poll::Ready(Err(super::shutting_down()));
        };
        let (stream, guard, prefix) = accepted?;
        let peer = stream.peer_addr();
        Poll::Ready(super::with_peer((stream, guard), peer).map(|(s, p, g)| (s, p, g, prefix)))
    }

    fn take_prefixes(&mut self) {
        self.incoming.take_prefixes();
    }

    fn hand_back(&self) -> Option<super::HandBack> {
        self.incoming.hand_back()
    }

    fn into_fd(io: TcpStream) -> io::Result<OwnedFd> {
        Ok(io.into_std()?.into())
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        Ok(self.local_addr)
    }
}
