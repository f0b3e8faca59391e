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
    /// A worker did not ack a handed-off connection in time; it is presumed hung.
    #[error("connection {seq} was not acknowledged within the handoff timeout")]
    HandoffTimeout {
        /// The oldest unacked handoff.
        seq: Seq,
    },
}
