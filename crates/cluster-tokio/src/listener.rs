//! `ClusterListener`: a TCP listener that works the same in a worker and in a plain process.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use proto::HandleId;
use proto::wire::{ListenFlags, ListenRequest, ListenTarget, SocketKind};
use tokio::net::{TcpListener, TcpStream, ToSocketAddrs};

use crate::worker::{self, Granted, HandoffQueue, Worker};

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
pub struct ClusterListener {
    kind: Kind,
    local_addr: SocketAddr,
    shutdown: Option<Pin<Box<dyn Future<Output = ()> + Send + Sync>>>,
}

impl std::fmt::Debug for ClusterListener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterListener")
            .field("kind", &self.kind)
            .field("local_addr", &self.local_addr)
            .finish()
    }
}

#[derive(Debug)]
enum Kind {
    /// Not a worker, or a shared socket.
    Direct {
        listener: TcpListener,
        _guard: Option<HandleGuard>,
    },
    /// Connections handed over by the primary.
    RoundRobin {
        queue: Arc<HandoffQueue>,
        handle: HandleGuard,
    },
}

/// Gives the handle back to the primary when the listener goes.
#[derive(Debug)]
struct HandleGuard {
    worker: Worker,
    handle: HandleId,
}

impl Drop for ClusterListener {
    fn drop(&mut self) {
        // Connections acked but never accepted go back to the primary (before the guard's
        // `Close`), to be served by another worker.
        if let Kind::RoundRobin { queue, handle } = &self.kind {
            handle.worker.give_back(handle.handle, queue.close());
        }
    }
}

impl Drop for HandleGuard {
    fn drop(&mut self) {
        self.worker.close(self.handle);
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
        let mut last = None;
        for addr in tokio::net::lookup_host(addr).await? {
            match Self::bind_addr(addr).await {
                Ok(listener) => return Ok(listener),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| {
            io::Error::new(io::ErrorKind::InvalidInput, "address resolved to nothing")
        }))
    }

    async fn bind_addr(addr: SocketAddr) -> io::Result<Self> {
        let Some(worker) = worker::current() else {
            let listener = TcpListener::bind(addr).await?;
            let local_addr = listener.local_addr()?;
            return Ok(Self {
                kind: Kind::Direct {
                    listener,
                    _guard: None,
                },
                local_addr,
                shutdown: None,
            });
        };
        let request = ListenRequest {
            target: ListenTarget::Ip(addr),
            kind: SocketKind::Stream,
            backlog: 0,
            flags: ListenFlags::default(),
        };
        let granted = worker.listen(request).await?;
        let mut shutdown = worker.shutdown_receiver();
        let shutdown: Pin<Box<dyn Future<Output = ()> + Send + Sync>> = Box::pin(async move {
            let _ = shutdown.wait_for(|v| *v).await;
        });
        let (kind, local_addr) = match granted {
            Granted::RoundRobin {
                handle,
                addr,
                queue,
            } => (
                Kind::RoundRobin {
                    queue,
                    handle: HandleGuard { worker, handle },
                },
                addr,
            ),
            Granted::Shared { handle, listener } => {
                let local_addr = listener.local_addr()?;
                (
                    Kind::Direct {
                        listener,
                        _guard: Some(HandleGuard { worker, handle }),
                    },
                    local_addr,
                )
            }
        };
        Ok(Self {
            kind,
            local_addr,
            shutdown: Some(shutdown),
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
    /// An accept error, or `NotConnected` once the worker is shutting down.
    pub async fn accept(&mut self) -> io::Result<(TcpStream, SocketAddr)> {
        loop {
            let stream = std::future::poll_fn(|cx| self.poll_accept(cx)).await?;
            match stream.peer_addr() {
                Ok(peer) => return Ok((stream, peer)),
                // Reset before we looked at it: nothing to serve.
                Err(e) if e.kind() == io::ErrorKind::NotConnected => continue,
                Err(e) => return Err(e),
            }
        }
    }

    /// Polls for the next connection.
    ///
    /// # Errors
    ///
    /// As [`Self::accept`].
    pub fn poll_accept(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<TcpStream>> {
        match std::task::ready!(futures_core::Stream::poll_next(Pin::new(self), cx)) {
            Some(result) => Poll::Ready(result),
            None => Poll::Ready(Err(io::Error::new(
                io::ErrorKind::NotConnected,
                "the worker is shutting down",
            ))),
        }
    }
}

impl futures_core::Stream for ClusterListener {
    type Item = io::Result<TcpStream>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        if let Some(shutdown) = &mut this.shutdown
            && shutdown.as_mut().poll(cx).is_ready()
        {
            return Poll::Ready(None);
        }
        match &mut this.kind {
            Kind::Direct { listener, .. } => {
                let (stream, _) = ready!(listener.poll_accept(cx))?;
                Poll::Ready(Some(Ok(stream)))
            }
            Kind::RoundRobin { queue, handle } => {
                let Some((stream, room_again)) = ready!(queue.poll_pop(cx)) else {
                    return Poll::Ready(None);
                };
                // The primary stopped offering after we refused while full; say there is room.
                if room_again {
                    handle.worker.ready(handle.handle);
                }
                Poll::Ready(Some(Ok(stream)))
            }
        }
    }
}

/// With the `axum` feature, `axum::serve(listener, app)` works directly.
///
/// `accept` cannot fail in axum's trait: as axum's own `TcpListener` does, errors that concern
/// one connection are skipped, and others (such as `EMFILE`) are logged and retried after a
/// second. Once the worker is shutting down it waits forever: pair `axum::serve` with
/// `.with_graceful_shutdown(cluster::shutdown())`, which ends the accept loop.
///
/// For `ConnectInfo<SocketAddr>`, wrap the listener with `axum::serve::ListenerExt::tap_io`
/// (`listener.tap_io(|_| {})`) and use `into_make_service_with_connect_info::<SocketAddr>()`: axum
/// implements `Connected` only for its own listeners and for `TapIo`, and the orphan rule keeps
/// us from adding an impl for `ClusterListener`.
#[cfg(feature = "axum")]
impl axum::serve::Listener for ClusterListener {
    type Io = TcpStream;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            match Self::accept(self).await {
                Ok(accepted) => return accepted,
                Err(e) if e.kind() == io::ErrorKind::NotConnected => std::future::pending().await,
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::ConnectionRefused
                            | io::ErrorKind::ConnectionAborted
                            | io::ErrorKind::ConnectionReset
                    ) => {}
                Err(error) => {
                    tracing::error!(%error, "accept failed; retrying in 1s");
                    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                }
            }
        }
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        Self::local_addr(self)
    }
}
