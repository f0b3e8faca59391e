//! Encoding and decoding of one frame (one datagram) with postcard.
//!
//! Decoding is total: any byte string yields a message or a [`DecodeError`], never a panic, and
//! never an allocation larger than the input allows.

use serde::Serialize;
use serde::de::DeserializeOwned;

/// The largest frame either side sends or accepts, in bytes.
///
/// Well below one `SOCK_SEQPACKET` datagram at the default socket buffer (212,960 bytes), so a
/// frame never fails with `EMSGSIZE` and a receive buffer of this size is never truncated by a
/// well-behaved peer. Control frames are a few bytes; the bound exists for user messages.
pub const MAX_FRAME: usize = 64 * 1024;

/// The most bytes one frame carries in its one byte-string field (a `Fragment`'s data): the
/// frame also carries the variant (one byte) and the length (a varint of three bytes at this
/// size). User messages larger than a frame are split (see [`crate::user`]).
pub const MAX_PAYLOAD: usize = MAX_FRAME - 4;

/// A frame could not be encoded.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EncodeError {
    /// The encoded message is larger than [`MAX_FRAME`]; nothing was written.
    #[error("frame of {len} bytes exceeds the {max}-byte limit")]
    TooLarge {
        /// The encoded length.
        len: usize,
        /// [`MAX_FRAME`].
        max: usize,
    },
    /// The value could not be serialized (a serde impl refused it).
    #[error("message cannot be serialized")]
    Serialize(#[source] postcard::Error),
}

/// A frame could not be decoded. Every variant means the peer is broken or hostile.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// An empty datagram (never sent by a peer: zero bytes mean end of stream on seqpacket).
    #[error("empty frame")]
    Empty,
    /// A frame larger than [`MAX_FRAME`], or one the receive buffer truncated.
    #[error("frame of {len} bytes exceeds the {max}-byte limit")]
    TooLarge {
        /// The length seen.
        len: usize,
        /// [`MAX_FRAME`].
        max: usize,
    },
    /// The bytes are not a message of this protocol.
    #[error("malformed frame")]
    Malformed(#[source] postcard::Error),
    /// A message was decoded but bytes were left over.
    #[error("{extra} trailing bytes after the message")]
    TrailingBytes {
        /// How many bytes were left.
        extra: usize,
    },
}

/// Appends `message` to `buf` as one frame.
///
/// # Errors
///
/// [`EncodeError::TooLarge`] when the frame would exceed [`MAX_FRAME`]; `buf` is then left as it
/// was.
pub fn encode<M: Serialize>(message: &M, buf: &mut Vec<u8>) -> Result<(), EncodeError> {
    let start = buf.len();
    let out = postcard::to_extend(message, std::mem::take(buf));
    *buf = match out {
        Ok(out) => out,
        Err(e) => return Err(EncodeError::Serialize(e)),
    };
    let len = buf.len() - start;
    if len > MAX_FRAME {
        buf.truncate(start);
        return Err(EncodeError::TooLarge {
            len,
            max: MAX_FRAME,
        });
    }
    Ok(())
}

/// Decodes one frame that must contain exactly one message.
///
/// # Errors
///
/// See [`DecodeError`].
pub fn decode<M: DeserializeOwned>(frame: &[u8]) -> Result<M, DecodeError> {
    if frame.is_empty() {
        return Err(DecodeError::Empty);
    }
    if frame.len() > MAX_FRAME {
        return Err(DecodeError::TooLarge {
            len: frame.len(),
            max: MAX_FRAME,
        });
    }
    let (message, rest) = postcard::take_from_bytes(frame).map_err(DecodeError::Malformed)?;
    if !rest.is_empty() {
        return Err(DecodeError::TrailingBytes { extra: rest.len() });
    }
    Ok(message)
}

/// The protocol version of a handshake frame, read without decoding the rest.
///
/// Both handshakes are variant 0 with the version first, in every version of the protocol, so a
/// peer of another version is recognised even when the rest of its handshake has changed shape.
pub fn handshake_version(frame: &[u8]) -> Option<u16> {
    match frame {
        [0, rest @ ..] => postcard::take_from_bytes::<u16>(rest)
            .ok()
            .map(|(version, _)| version),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::{HandleId, PrimaryMessage, Seq, WorkerMessage};

    #[test]
    fn control_frames_are_tiny() {
        let mut buf = Vec::new();
        encode(
            &PrimaryMessage::NewConn {
                seq: Seq::new(1),
                handle: HandleId::new(0),
                reply: true,
                prefix: Vec::new(),
            },
            &mut buf,
        )
        .unwrap();
        assert_eq!(buf, [2, 1, 0, 1, 0]);
        buf.clear();
        encode(
            &WorkerMessage::Accepted {
                through: Seq::new(300),
                ended: 5,
            },
            &mut buf,
        )
        .unwrap();
        assert_eq!(buf, [3, 0xac, 0x02, 5]);
    }

    #[test]
    fn encode_appends_and_decode_round_trips() {
        let mut buf = vec![0xff];
        let msg = WorkerMessage::Online {
            version: 1,
            pid: 4242,
        };
        encode(&msg, &mut buf).unwrap();
        assert_eq!(buf[0], 0xff);
        assert_eq!(decode::<WorkerMessage>(&buf[1..]).unwrap(), msg);
    }

    #[test]
    fn oversized_message_is_refused_and_buffer_untouched() {
        let mut buf = vec![7, 7];
        let msg = WorkerMessage::Fragment {
            data: vec![0; MAX_FRAME],
        };
        let err = encode(&msg, &mut buf).unwrap_err();
        assert!(
            matches!(err, EncodeError::TooLarge { max: MAX_FRAME, .. }),
            "{err}"
        );
        assert_eq!(buf, [7, 7]);
    }

    #[test]
    fn largest_message_that_fits_is_accepted() {
        let payload_len = MAX_PAYLOAD;
        let msg = WorkerMessage::Fragment {
            data: vec![1; payload_len],
        };
        let mut buf = Vec::new();
        encode(&msg, &mut buf).unwrap();
        assert_eq!(buf.len(), MAX_FRAME);
        assert_eq!(decode::<WorkerMessage>(&buf).unwrap(), msg);
        let one_more = WorkerMessage::Fragment {
            data: vec![1; MAX_PAYLOAD + 1],
        };
        assert!(encode(&one_more, &mut Vec::new()).is_err());
    }

    #[test]
    fn ipv6_scope_and_flowinfo_survive_the_wire() {
        use crate::wire::{ListenFlags, ListenRequest, ListenTarget, SocketKind};
        let addr = std::net::SocketAddrV6::new("fe80::1".parse().unwrap(), 8080, 7, 2).into();
        let msg = WorkerMessage::QueryServer {
            seq: Seq::new(1),
            request: ListenRequest {
                target: ListenTarget::Ip(addr),
                kind: SocketKind::Stream,
                backlog: 0,
                flags: ListenFlags::default(),
            },
        };
        let mut buf = Vec::new();
        encode(&msg, &mut buf).unwrap();
        assert_eq!(decode::<WorkerMessage>(&buf).unwrap(), msg);
    }

    #[test]
    fn handshake_version_is_read_from_any_future_handshake() {
        // Version 2 with a field this version does not know.
        assert_eq!(handshake_version(&[0, 2, 0xaa, 0xbb, 0xcc, 0xdd]), Some(2));
        assert_eq!(handshake_version(&[0, 0x80, 0x01]), Some(128));
        assert_eq!(handshake_version(&[1, 2]), None);
        assert_eq!(handshake_version(&[]), None);
    }

    #[test]
    fn bad_frames_give_typed_errors() {
        assert_eq!(decode::<WorkerMessage>(&[]), Err(DecodeError::Empty));
        assert!(matches!(
            decode::<WorkerMessage>(&[200]),
            Err(DecodeError::Malformed(_))
        ));
        assert!(matches!(
            decode::<WorkerMessage>(&[3, 1, 9, 9]),
            Err(DecodeError::TrailingBytes { extra: 1 })
        ));
        assert!(matches!(
            decode::<WorkerMessage>(&vec![0; MAX_FRAME + 1]),
            Err(DecodeError::TooLarge { .. })
        ));
        // A length prefix that promises far more bytes than the frame holds.
        assert!(matches!(
            decode::<WorkerMessage>(&[7, 0xff, 0xff, 0xff, 0xff, 0x0f, 1]),
            Err(DecodeError::Malformed(_))
        ));
    }
}
