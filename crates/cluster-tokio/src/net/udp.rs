//! `ClusterUdpSocket`: a UDP socket shared by every worker.

use std::io;
use std::ops::Deref;
use std::os::fd::RawFd;

use proto::wire::{BoundAddr, ListenTarget, SocketKind};
use tokio::net::{ToSocketAddrs, UdpSocket};

use super::{Acquired, HandleGuard, ListenOptions};

/// A UDP socket for clustered servers (Node's `dgram` `bind` in a worker).
///
/// UDP is always shared, whatever the scheduling policy (as in Node): in a worker, the primary
/// binds the socket once and every worker binding the same address receives it, and the kernel
/// spreads datagrams over them. Port 0 gives one real port shared by all workers. Outside a
/// worker it binds the socket itself.
///
/// It dereferences to [`tokio::net::UdpSocket`] for `recv_from`, `send_to` and the rest. Dropping
/// it leaves the handle; the primary closes its copy when the last worker has left.
///
/// ```no_run
/// # async fn dox() -> std::io::Result<()> {
/// let socket = cluster_tokio::net::ClusterUdpSocket::bind("0.0.0.0:5353").await?;
/// let mut buf = [0; 1500];
/// let (len, peer) = socket.recv_from(&mut buf).await?;
/// socket.send_to(&buf[..len], peer).await?;
/// # Ok(()) }
/// ```
///
/// # Cancel safety
///
/// Dropping a `bind` future before the primary answered leaves nothing behind: the socket that
/// arrives later is closed and its handle given back.
#[derive(Debug)]
pub struct ClusterUdpSocket {
    socket: UdpSocket,
    _guard: Option<HandleGuard>,
}

impl ClusterUdpSocket {
    /// Binds `addr`, trying each address it resolves to in turn.
    ///
    /// # Errors
    ///
    /// The address does not resolve, or the bind failed in the primary (`AddrInUse`,
    /// `PermissionDenied`…): the same `io::Error` a plain bind would give.
    pub async fn bind(addr: impl ToSocketAddrs) -> io::Result<Self> {
        Self::bind_with(addr, ListenOptions::default()).await
    }

    /// [`Self::bind`] with options: `reuse_addr`, `ipv6_only`, `exclusive`, `reuse_port`.
    ///
    /// # Errors
    ///
    /// As [`Self::bind`].
    pub async fn bind_with(addr: impl ToSocketAddrs, options: ListenOptions) -> io::Result<Self> {
        super::bind_first(addr, SocketKind::Datagram, &options, Self::from_acquired).await
    }

    /// Uses the primary's fd `fd`, a bound UDP socket it inherited (Node's `bind({ fd })`);
    /// outside a worker, this process's own fd `fd`.
    ///
    /// # Errors
    ///
    /// The fd is not open or not a datagram socket.
    pub async fn from_primary_fd(fd: RawFd) -> io::Result<Self> {
        let options = ListenOptions::default();
        Self::from_acquired(
            super::acquire(ListenTarget::Fd(fd), SocketKind::Datagram, &options).await?,
        )
    }

    /// Uses the datagram socket the service manager passed the primary under `name` (systemd's
    /// `FileDescriptorName=` with `ListenDatagram=`); outside a worker, the one passed to this
    /// process.
    ///
    /// # Errors
    ///
    /// No socket of that name was passed (`NotFound`), or it is not a datagram socket.
    pub async fn from_activation(name: &str) -> io::Result<Self> {
        let options = ListenOptions::default();
        let target = ListenTarget::Name(name.to_owned());
        Self::from_acquired(super::acquire(target, SocketKind::Datagram, &options).await?)
    }

    fn from_acquired(acquired: Acquired) -> io::Result<Self> {
        match acquired {
            Acquired::Socket {
                fd,
                addr: BoundAddr::Ip(_),
                guard,
                ..
            } => Ok(Self {
                socket: UdpSocket::from_std(std::net::UdpSocket::from(fd))?,
                _guard: guard,
            }),
            _ => Err(super::wrong_family("not a UDP socket")),
        }
    }
}

impl Deref for ClusterUdpSocket {
    type Target = UdpSocket;

    fn deref(&self) -> &UdpSocket {
        &self.socket
    }
}
