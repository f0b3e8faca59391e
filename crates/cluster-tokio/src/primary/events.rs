//! What the primary reports of its workers: [`Event`]s, as a stream.

use std::ffi::OsString;
use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::task::{Context, Poll};

use proto::wire::BoundAddr;
use proto::{ExitStatus, KillReason, LinkError};
use tokio::sync::mpsc;

use super::WorkerHandle;

/// The stream returned by [`Primary::events`](super::Primary::events).
#[derive(Debug)]
pub struct Events {
    pub(super) rx: mpsc::UnboundedReceiver<Event>,
}

impl Events {
    /// The next event.
    pub async fn recv(&mut self) -> Option<Event> {
        self.rx.recv().await
    }
}

impl futures_core::Stream for Events {
    type Item = Event;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Event>> {
        self.rx.poll_recv(cx)
    }
}

/// Where a worker listens, as the primary bound it (with the real port for port 0).
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum ListenAddress {
    /// An IP socket.
    Ip(SocketAddr),
    /// A Unix socket path.
    Unix(PathBuf),
}

impl ListenAddress {
    pub(super) fn from_bound(addr: BoundAddr) -> Self {
        match addr {
            BoundAddr::Ip(addr) => Self::Ip(addr),
            BoundAddr::Path(bytes) => {
                use std::os::unix::ffi::OsStringExt;
                Self::Unix(PathBuf::from(OsString::from_vec(bytes)))
            }
        }
    }
}

impl fmt::Display for ListenAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Ip(addr) => write!(f, "{addr}"),
            Self::Unix(path) => write!(f, "unix:{}", path.display()),
        }
    }
}

/// Something that happened to a worker (Node's cluster events).
#[derive(Clone, Debug)]
#[non_exhaustive]
pub enum Event {
    /// The worker process was started.
    Fork(WorkerHandle),
    /// Its runtime is up and talking to the primary.
    Online(WorkerHandle),
    /// It listens on `address`.
    Listening {
        /// The worker.
        worker: WorkerHandle,
        /// Where.
        address: ListenAddress,
    },
    /// Its application declared itself ready to serve, after its warm-up
    /// ([`cluster::ready()`](crate::ready)); once per worker. With
    /// [`Settings::wait_ready`](crate::Settings::wait_ready) the supervisor and rolling reloads
    /// count a worker as up from this event instead of its first `Listening`.
    Ready(WorkerHandle),
    /// A rolling reload, or a recycle ([`Settings::max_requests`](crate::Settings::max_requests),
    /// [`Settings::max_memory`](crate::Settings::max_memory)), replaced `old` with `new`, which
    /// is up; `old` is disconnected next.
    Replaced {
        /// The worker being retired.
        old: WorkerHandle,
        /// Its replacement.
        new: WorkerHandle,
    },
    /// Its link to the primary closed: it left on purpose (its own
    /// [`Worker::disconnect`](crate::Worker::disconnect) or the primary's) and closed its end
    /// once its servers' connections were done, as in Node (the serve helpers' drain ended,
    /// every [`Worker::hold_link`](crate::Worker::hold_link) guard dropped, or, if none was
    /// taken, its `main` returned); its process is gone (reported just before its `Exit`, once
    /// what it sent was read and what it never read was taken back); or the primary dropped it
    /// for breaking the protocol.
    Disconnect(WorkerHandle),
    /// Its process ended (always after its `Disconnect`).
    Exit {
        /// The worker.
        worker: WorkerHandle,
        /// How it ended.
        status: ExitStatus,
        /// Why the primary killed it, if it did (a hang, a missed ack).
        killed: Option<KillReason>,
    },
    /// It broke the protocol and was disconnected.
    Error {
        /// The worker.
        worker: WorkerHandle,
        /// What it did.
        error: ProtocolError,
    },
    /// The primary could not bind a socket workers asked for: every worker waiting for it got
    /// the error.
    ListenFailed {
        /// Where, as the workers asked (`127.0.0.1:8080`, `unix:/run/app.sock`, `fd 3`).
        address: String,
        /// The OS error number (`std::io::Error::from_raw_os_error(errno)` describes it).
        errno: i32,
    },
}

/// How a worker broke the protocol ([`Event::Error`]): opaque, as hyper's errors are. Its
/// [`kind`](Self::kind) says which rule, its `Display` and `source` chain say the details.
#[derive(Clone, PartialEq, Eq)]
pub struct ProtocolError {
    inner: proto::ProtocolError,
}

impl ProtocolError {
    pub(crate) fn new(inner: proto::ProtocolError) -> Self {
        Self { inner }
    }

    /// Which rule was broken.
    #[must_use]
    pub fn kind(&self) -> ProtocolErrorKind {
        use proto::ProtocolError as E;
        match &self.inner {
            E::Decode(_) => ProtocolErrorKind::Decode,
            E::Truncated => ProtocolErrorKind::Truncated,
            E::Link(LinkError::VersionMismatch { .. }) => ProtocolErrorKind::VersionMismatch,
            E::Link(LinkError::HandshakeExpected | LinkError::DuplicateHandshake) => {
                ProtocolErrorKind::Handshake
            }
            E::Link(_) => ProtocolErrorKind::Link,
            E::Registry(_) => ProtocolErrorKind::Handle,
            E::UnexpectedFds { .. } => ProtocolErrorKind::UnexpectedFds,
            E::DuplicateConnection { .. } => ProtocolErrorKind::DuplicateConnection,
            E::MessageTooLarge(_) => ProtocolErrorKind::MessageTooLarge,
            E::NotAConnection => ProtocolErrorKind::NotAConnection,
            E::HandoffTimeout { .. } => ProtocolErrorKind::HandoffTimeout,
            E::PrefixTooLong { .. }
            | E::NotGiven { .. }
            | E::UnexpectedPrefix { .. }
            | E::HandBackNotAsked => ProtocolErrorKind::HandBack,
            E::EndedMiscounted { .. } => ProtocolErrorKind::EndedMiscounted,
            // The core's error is non-exhaustive: a rule it adds is reported, not lost.
            _ => ProtocolErrorKind::Other,
        }
    }

    /// The protocol versions of the primary and of the worker (`(ours, theirs)`), if the worker
    /// speaks another one ([`ProtocolErrorKind::VersionMismatch`]).
    #[must_use]
    pub fn version_mismatch(&self) -> Option<(u16, u16)> {
        match self.inner {
            proto::ProtocolError::Link(LinkError::VersionMismatch { ours, theirs }) => {
                Some((ours, theirs))
            }
            _ => None,
        }
    }
}

impl fmt::Debug for ProtocolError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ProtocolError")
            .field("kind", &self.kind())
            .field("detail", &self.inner)
            .finish()
    }
}

impl fmt::Display for ProtocolError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.inner, f)
    }
}

impl std::error::Error for ProtocolError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        std::error::Error::source(&self.inner)
    }
}

/// Which protocol rule a worker broke ([`ProtocolError::kind`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ProtocolErrorKind {
    /// A frame could not be decoded.
    Decode,
    /// A datagram or its fds were truncated by the receive buffer.
    Truncated,
    /// The worker speaks another protocol version ([`ProtocolError::version_mismatch`]).
    VersionMismatch,
    /// Its first frame was not its handshake, or it sent the handshake twice.
    Handshake,
    /// It broke the request and answer rules (an answer to no request, twice, or of the wrong
    /// kind), or sent on a closed link.
    Link,
    /// It named a listening handle or a connection it does not hold.
    Handle,
    /// A frame came with the wrong number of file descriptors.
    UnexpectedFds,
    /// It offered the same connection twice.
    DuplicateConnection,
    /// A message grew past [`MAX_MESSAGE`](crate::message::MAX_MESSAGE).
    MessageTooLarge,
    /// It sent back, as a connection, an fd that is not a stream socket.
    NotAConnection,
    /// It did not ack a handed-off connection in time: presumed hung.
    HandoffTimeout,
    /// It handed a connection back against the rules: without being asked to, with more unread
    /// bytes than the bound, on a handle it was never given connections on, or more of them than
    /// it was given.
    HandBack,
    /// It reported more ended connections than it was given, or its count went back.
    EndedMiscounted,
    /// A rule this version does not name.
    Other,
}
