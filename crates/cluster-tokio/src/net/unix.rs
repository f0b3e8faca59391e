//! `ClusterUnixListener`: a Unix stream socket listener, clustered like TCP.

use std::ffi::OsString;
use std::io;
use std::os::fd::{OwnedFd, RawFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use proto::wire::{BoundAddr, ListenTarget, SocketKind};
use tokio::net::{UnixListener, UnixStream};

use super::{Acquired, Family, Incoming, ListenOptions};

/// A Unix stream socket listener for clustered servers (Node's `listen(path)`), with the
/// distribution of [`ClusterListener`](super::ClusterListener): in a worker, the primary owns
/// the socket and hands out connections in turn (or shares the socket, by policy).
///
/// - A path longer than `sun_path` (107 bytes) works: it is bound through its directory.
/// - A socket file left by a crashed run (nothing accepts on it) is replaced; a live one, or a
///   file that is not a socket, is `AddrInUse`.
/// - The file is removed when the last worker listening on it leaves (or, unclustered, when the
///   listener is dropped), unless something else replaced it meanwhile.
/// - [`ListenOptions::readable_all`] and [`ListenOptions::writable_all`] open its mode.
///
/// Relative paths are resolved against this process's working directory.
///
/// ```no_run
/// # async fn dox() -> std::io::Result<()> {
/// let mut listener = cluster_tokio::net::ClusterUnixListener::bind("/run/app.sock").await?;
/// let (stream, _peer) = listener.accept().await?;
/// # let _ = stream;
/// # Ok(()) }
/// ```
pub struct ClusterUnixListener {
    incoming: Incoming<Unix>,
    path: PathBuf,
}

impl std::fmt::Debug for ClusterUnixListener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterUnixListener")
            .field("incoming", &self.incoming)
            .field("path", &self.path)
            .finish()
    }
}

/// Unix stream sockets, for [`Incoming`].
#[derive(Debug)]
enum Unix {}

impl Family for Unix {
    type Listener = UnixListener;
    type Stream = UnixStream;

    fn listener(fd: OwnedFd) -> io::Result<UnixListener> {
        UnixListener::from_std(std::os::unix::net::UnixListener::from(fd))
    }

    fn stream(fd: OwnedFd) -> io::Result<UnixStream> {
        UnixStream::from_std(std::os::unix::net::UnixStream::from(fd))
    }

    fn poll_accept(listener: &UnixListener, cx: &mut Context<'_>) -> Poll<io::Result<UnixStream>> {
        listener.poll_accept(cx).map_ok(|(stream, _)| stream)
    }
}

impl ClusterUnixListener {
    /// Listens on the Unix socket at `path`.
    ///
    /// # Errors
    ///
    /// `AddrInUse` (something listens there, or the file is not a stream socket),
    /// `PermissionDenied`, `NotFound` (no such directory), `InvalidFilename` (`ENAMETOOLONG`:
    /// the file name alone does not fit), `InvalidInput` (`ListenOptions::reuse_port`, which Unix
    /// sockets do not have).
    pub async fn bind(path: impl AsRef<Path>) -> io::Result<Self> {
        Self::bind_with(path, ListenOptions::default()).await
    }

    /// [`Self::bind`] with options: backlog, `readable_all`, `writable_all`, `exclusive`.
    ///
    /// # Errors
    ///
    /// As [`Self::bind`].
    pub async fn bind_with(path: impl AsRef<Path>, options: ListenOptions) -> io::Result<Self> {
        if options.reuse_port {
            return Err(super::wrong_family(
                "SO_REUSEPORT does not apply to Unix sockets",
            ));
        }
        // The primary may run elsewhere: send it an absolute path, as Node does.
        let path = std::path::absolute(path.as_ref())?;
        let target = ListenTarget::Path(path.as_os_str().as_bytes().to_vec());
        Self::from_acquired(super::acquire(target, SocketKind::Stream, &options).await?)
    }

    /// Listens on the primary's fd `fd`, a listening Unix stream socket it inherited (Node's
    /// `listen({ fd })`); outside a worker, on this process's own fd `fd`.
    ///
    /// # Errors
    ///
    /// The fd is not open, not a listening stream socket, or not a Unix socket.
    pub async fn from_primary_fd(fd: RawFd) -> io::Result<Self> {
        let options = ListenOptions::default();
        Self::from_acquired(
            super::acquire(ListenTarget::Fd(fd), SocketKind::Stream, &options).await?,
        )
    }

    /// Listens on the Unix stream socket the service manager passed the primary under `name`
    /// (systemd's `FileDescriptorName=`); outside a worker, the one passed to this process.
    ///
    /// # Errors
    ///
    /// No socket of that name was passed (`NotFound`), or it is not a listening Unix socket.
    pub async fn from_activation(name: &str) -> io::Result<Self> {
        let options = ListenOptions::default();
        let target = ListenTarget::Name(name.to_owned());
        Self::from_acquired(super::acquire(target, SocketKind::Stream, &options).await?)
    }

    fn from_acquired(acquired: Acquired) -> io::Result<Self> {
        let (incoming, addr) = Incoming::new(acquired)?;
        let BoundAddr::Path(path) = addr else {
            return Err(super::wrong_family(
                "a TCP socket, not Unix: use ClusterListener for it",
            ));
        };
        Ok(Self {
            incoming,
            path: PathBuf::from(OsString::from_vec(path)),
        })
    }

    /// The socket's path (empty for an unnamed inherited socket).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Waits for the next connection. Peers of Unix sockets are usually unnamed.
    ///
    /// # Errors
    ///
    /// An accept error, or `NotConnected` once the worker is shutting down: not before
    /// [`shutdown`](crate::shutdown) has resolved, so that a `select!` on both always ends in
    /// its shutdown branch, never with this error.
    pub async fn accept(&mut self) -> io::Result<(UnixStream, tokio::net::unix::SocketAddr)> {
        let next =
            std::future::poll_fn(|cx| futures_core::Stream::poll_next(Pin::new(&mut *self), cx));
        let Some(stream) = next.await else {
            return super::stopped().await;
        };
        let stream = stream?;
        let peer = stream.peer_addr()?;
        Ok((stream, peer))
    }

    /// [`Self::accept`], with a [`ConnectionGuard`](super::ConnectionGuard) to keep while the
    /// connection is open: the primary counts the connection as this worker's until the guard
    /// is dropped (for the least-outstanding policy and per-worker caps).
    ///
    /// # Errors
    ///
    /// As [`Self::accept`].
    pub async fn accept_tracked(
        &mut self,
    ) -> io::Result<(
        UnixStream,
        tokio::net::unix::SocketAddr,
        super::ConnectionGuard,
    )> {
        let next = std::future::poll_fn(|cx| self.incoming.poll_next_tracked(cx, true));
        let Some(accepted) = next.await else {
            return super::stopped().await;
        };
        let (stream, guard) = accepted?;
        let peer = stream.peer_addr()?;
        Ok((stream, peer, guard))
    }

    /// Where to hand connections back when this worker leaves while others stay (see
    /// [`HandBack`](super::HandBack)); `None` unless the primary hands this listener its
    /// connections.
    pub fn hand_back(&self) -> Option<super::HandBack> {
        self.incoming.hand_back()
    }

    /// Polls for the next connection.
    ///
    /// # Errors
    ///
    /// As [`Self::accept`].
    pub fn poll_accept(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<UnixStream>> {
        match ready!(futures_core::Stream::poll_next(Pin::new(self), cx)) {
            Some(result) => Poll::Ready(result),
            None => Poll::Ready(Err(super::shutting_down())),
        }
    }
}

impl futures_core::Stream for ClusterUnixListener {
    type Item = io::Result<UnixStream>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.incoming.poll_next(cx)
    }
}

#[cfg(any(feature = "axum", feature = "hyper", feature = "tonic"))]
impl super::Listener for ClusterUnixListener {
    type Io = UnixStream;
    type Addr = tokio::net::unix::SocketAddr;

    fn poll_accept_peer(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<
        io::Result<(
            UnixStream,
            tokio::net::unix::SocketAddr,
            super::ConnectionGuard,
        )>,
    > {
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
    ) -> Poll<io::Result<super::Handed<UnixStream, tokio::net::unix::SocketAddr>>> {
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

    fn into_fd(io: UnixStream) -> io::Result<OwnedFd> {
        Ok(io.into_std()?.into())
    }

    fn local_addr(&self) -> io::Result<tokio::net::unix::SocketAddr> {
        match self.incoming.listener() {
            Some(listener) => listener.local_addr(),
            None => Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "connections are handed over by the primary; see ClusterUnixListener::path",
            )),
        }
    }
}
