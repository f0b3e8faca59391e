//! What the primary reports of its workers: [`Event`]s, as a stream.

use std::ffi::OsString;
use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::task::{Context, Poll};

use proto::wire::BoundAddr;
use proto::{ExitStatus, KillReason, ProtocolError};
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
    /// A rolling reload replaced `old` with `new`, which listens; `old` is disconnected next.
    Replaced {
        /// The worker being retired.
        old: WorkerHandle,
        /// Its replacement.
        new: WorkerHandle,
    },
    /// Its link to the primary closed: it left on purpose and closed its end (a worker that
    /// called [`Worker::disconnect`](crate::Worker::disconnect) may still be finishing its
    /// connections), its process is gone (reported just before its `Exit`, once what it sent
    /// was read and what it never read was taken back), or the primary dropped it for breaking
    /// the protocol.
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
