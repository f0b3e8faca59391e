//! Protocol errors: what a peer can do wrong.

use crate::link::LinkError;
use crate::registry::RegistryError;
use crate::user::MessageTooLarge;
use crate::wire::{DecodeError, Seq};

/// A peer broke the protocol. The link to it is closed; the process carries on.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ProtocolError {
    /// A frame could not be decoded.
    #[error("undecodable frame")]
    Decode(#[from] DecodeError),
    /// A datagram or its fds were truncated by the receive buffer.
    #[error("truncated datagram")]
    Truncated,
    /// The seq/ack or handshake rules were broken.
    #[error("link protocol violated")]
    Link(#[from] LinkError),
    /// The peer named a handle or connection it does not hold.
    #[error("handle protocol violated")]
    Registry(#[from] RegistryError),
    /// A message arrived with the wrong number of file descriptors.
    #[error("expected {expected} file descriptors with the message, got {got}")]
    UnexpectedFds {
        /// How many the message needs.
        expected: usize,
        /// How many came.
        got: usize,
    },
    /// The same connection was offered twice.
    #[error("connection {seq} offered twice")]
    DuplicateConnection {
        /// Its seq.
        seq: Seq,
    },
    /// A user message grew past [`crate::user::MAX_MESSAGE`].
    #[error(transparent)]
    MessageTooLarge(#[from] MessageTooLarge),
    /// A worker sent back, as a connection (`Refused`, `Return`), an fd that is not a stream
    /// socket.
    #[error("the fd sent back as a connection is not a stream socket")]
    NotAConnection,
    /// The primary offered a connection with a prefix on a handle whose listener never said it
    /// takes one.
    #[error("connection {seq} came with a prefix the listener does not take")]
    UnexpectedPrefix {
        /// Its seq.
        seq: Seq,
    },
    /// A worker handed back a connection with more unread bytes than
    /// [`MAX_PREFIX`](crate::wire::MAX_PREFIX).
    #[error("a connection handed back with {len} unread bytes, over the bound")]
    PrefixTooLong {
        /// How many bytes came.
        len: usize,
    },
    /// A worker handed a connection back without being asked to leave with `hand_back`.
    #[error("a connection handed back by a worker not asked to hand its connections back")]
    HandBackNotAsked,
    /// A worker handed back more connections than it was given, or one of a handle it was never
    /// given a connection on.
    #[error("{handle} handed back a connection it was not given")]
    NotGiven {
        /// The handle it named.
        handle: crate::wire::HandleId,
    },
    /// A worker reported more ended connections than it was given, or its count went back.
    #[error(
        "{ended} connections reported ended, but {given} were given and {previous} reported before"
    )]
    EndedMiscounted {
        /// The count it reported.
        ended: u64,
        /// The connections it acked and did not give back.
        given: u64,
        /// The count it reported before.
        previous: u64,
    },
    /// A worker did not ack a handed-off connection in time; it is presumed hung.
    #[error("connection {seq} was not acknowledged within the handoff timeout")]
    HandoffTimeout {
        /// The oldest unacked handoff.
        seq: Seq,
    },
}
