//! Handing a served connection back to the primary, for another worker to go on serving it.

use std::fmt;
use std::os::fd::OwnedFd;

use proto::HandleId;
use proto::wire::MAX_PREFIX;

use crate::worker::Worker;

/// Where a leaving worker hands its idle connections back, so that another worker goes on
/// serving them and their clients never see them close.
///
/// The serve helpers (`cluster::axum::serve`, `cluster::hyper::serve`) do this for every
/// HTTP/1.1 connection; this is the same thing for a server of your own over a
/// [`ClusterListener`](super::ClusterListener). Get one from
/// [`ClusterListener::hand_back`](super::ClusterListener::hand_back) before the listener is
/// dropped; once [`shutdown`](crate::shutdown) resolves and [`Self::is_wanted`] says so, stop
/// each connection at a point where nothing is half done (between two requests), and
/// [`send`](Self::send) it with the bytes you read from it and did not use. The primary hands
/// it to another worker, whose listener returns those bytes from
/// [`accept_with_prefix`](super::ClusterListener::accept_with_prefix) (only a listener that
/// calls it is ever given a connection with bytes).
///
/// ```no_run
/// # async fn dox(mut listener: cluster_tokio::ClusterListener) -> std::io::Result<()> {
/// let hand_back = listener.hand_back();
/// // ... serve until `cluster::shutdown()` resolves, then for each idle connection:
/// # let (stream, _peer) = listener.accept().await?;
/// # let unread = Vec::new();
/// if let Some(hand_back) = hand_back.as_ref().filter(|h| h.is_wanted()) {
///     if let Err(refused) = hand_back.send(stream.into_std()?, unread) {
///         // Too many unread bytes, or the primary is gone: finish and close it here.
///         let (_conn, _unread) = refused.into_parts();
///     }
/// }
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct HandBack {
    worker: Worker,
    handle: HandleId,
}

impl HandBack {
    pub(crate) fn new(worker: Worker, handle: HandleId) -> Self {
        Self { worker, handle }
    }

    /// Whether to hand connections back now: the primary asked this worker to leave while
    /// other workers stay (a rolling reload, a scale-down). False before, and when the whole
    /// cluster stops: then there is nowhere to go, and connections are closed as usual.
    pub fn is_wanted(&self) -> bool {
        self.worker.hand_back_wanted()
    }

    /// The most unread bytes a connection can be handed back with (32 KiB).
    pub const MAX_UNREAD: usize = MAX_PREFIX;

    /// Hands `conn` back with `unread`, the bytes read from it and not used (they are given to
    /// the next worker before what is still in the socket).
    ///
    /// # Errors
    ///
    /// [`HandBackError`], with the connection and its bytes, when hand-back is not wanted
    /// ([`Self::is_wanted`]), `unread` is longer than [`Self::MAX_UNREAD`], or this worker's
    /// link to the primary is gone: the connection is yours to finish.
    pub fn send(&self, conn: impl Into<OwnedFd>, unread: Vec<u8>) -> Result<(), HandBackError> {
        let conn = conn.into();
        if !self.is_wanted() {
            return Err(HandBackError {
                reason: Reason::NotWanted,
                conn,
                unread,
            });
        }
        if unread.len() > MAX_PREFIX {
            return Err(HandBackError {
                reason: Reason::TooLong,
                conn,
                unread,
            });
        }
        // The driver owns the link: once the command is queued the connection is on its way
        // (or closed there, should the link break before it is sent).
        self.worker
            .hand_back(self.handle, conn, unread)
            .map_err(|(conn, unread)| HandBackError {
                reason: Reason::Disconnected,
                conn,
                unread,
            })
    }
}

impl fmt::Debug for HandBack {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HandBack")
            .field("handle", &self.handle.get())
            .field("wanted", &self.is_wanted())
            .finish()
    }
}

/// A connection [`HandBack::send`] could not hand back; it comes back with its bytes.
pub struct HandBackError {
    reason: Reason,
    conn: OwnedFd,
    unread: Vec<u8>,
}

#[derive(Clone, Copy, Debug)]
enum Reason {
    NotWanted,
    TooLong,
    Disconnected,
}

impl HandBackError {
    /// The connection and its unread bytes, to finish serving here.
    pub fn into_parts(self) -> (OwnedFd, Vec<u8>) {
        (self.conn, self.unread)
    }

    /// Whether it was refused for having more unread bytes than [`HandBack::MAX_UNREAD`].
    pub fn is_too_long(&self) -> bool {
        matches!(self.reason, Reason::TooLong)
    }
}

impl fmt::Debug for HandBackError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HandBackError")
            .field("reason", &self.reason)
            .field("unread", &self.unread.len())
            .finish_non_exhaustive()
    }
}

impl fmt::Display for HandBackError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.reason {
            Reason::NotWanted => f.write_str(
                "connection not handed back: the primary did not ask this worker to hand its \
                 connections back",
            ),
            Reason::TooLong => write!(
                f,
                "connection not handed back: {} unread bytes, over the bound of {MAX_PREFIX}",
                self.unread.len()
            ),
            Reason::Disconnected => {
                f.write_str("connection not handed back: the link to the primary is gone")
            }
        }
    }
}

impl std::error::Error for HandBackError {}
