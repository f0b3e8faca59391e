//! User messages larger than one frame.
//!
//! A message (or request, or reply) whose payload does not fit in one frame is sent as
//! `Fragment` frames carrying the leading bytes, then one `User` frame carrying the rest and
//! everything else (kind, fd). Both sides queue a message's frames together, so no other user
//! frame comes between them; control frames may, and are handled as usual. The receiver holds at
//! most [`MAX_MESSAGE`] bytes per link, so a peer cannot make it allocate more.

use crate::wire::{Envelope, MAX_PAYLOAD, Seq, UserKind};

/// The largest user payload either side sends or accepts, in bytes (16 MiB).
pub const MAX_MESSAGE: usize = 16 * 1024 * 1024;

/// Payload bytes per frame: what is left of [`MAX_PAYLOAD`] after the largest envelope header
/// (variant, kind with a 10-byte seq, fd flag).
pub const FRAGMENT_SIZE: usize = MAX_PAYLOAD - 16;

/// A message is over [`MAX_MESSAGE`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("message of {len} bytes exceeds the {max}-byte limit")]
pub struct MessageTooLarge {
    /// Its length (for a receiver, the length reached so far).
    pub len: usize,
    /// [`MAX_MESSAGE`].
    pub max: usize,
}

/// Why a user message or request was not queued; nothing was.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SendError {
    /// The payload is over [`MAX_MESSAGE`].
    #[error(transparent)]
    TooLarge(#[from] MessageTooLarge),
    /// The link is closed, or nothing sent on it arrives any more.
    #[error("the link is closed")]
    Closed,
}

/// How the peer answered a request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Answer {
    /// The reply's payload.
    Reply(Vec<u8>),
    /// The request was refused, or dropped unanswered; the reason.
    Refusal(String),
}

impl Answer {
    /// The user frame's kind and payload that carry this answer to request `ack`.
    pub(crate) fn into_frame(self, ack: Seq) -> (UserKind, Vec<u8>) {
        match self {
            Self::Reply(payload) => (UserKind::Reply { ack }, payload),
            Self::Refusal(reason) => (UserKind::Refusal { ack }, reason.into_bytes()),
        }
    }
}

/// What a user frame that arrived is, once its fragments are put back together: a message or
/// request for user code, or the answer to one of this side's requests.
#[derive(Debug)]
pub(crate) enum Arrived {
    /// A message, or (with `request`) a request to answer under that number.
    Message {
        payload: Vec<u8>,
        request: Option<Seq>,
    },
    /// The answer to this side's request `seq`.
    Answer { seq: Seq, answer: Answer },
}

impl Arrived {
    pub(crate) fn from_envelope(envelope: Envelope) -> Self {
        let payload = envelope.payload;
        match envelope.kind {
            UserKind::Message => Self::Message {
                payload,
                request: None,
            },
            UserKind::Request { seq } => Self::Message {
                payload,
                request: Some(seq),
            },
            UserKind::Reply { ack } => Self::Answer {
                seq: ack,
                answer: Answer::Reply(payload),
            },
            UserKind::Refusal { ack } => Self::Answer {
                seq: ack,
                answer: Answer::Refusal(String::from_utf8_lossy(&payload).into_owned()),
            },
        }
    }
}

/// One frame of a user message, in sending order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum UserFrame {
    /// Leading bytes of the payload.
    Fragment(Vec<u8>),
    /// The envelope with the last part of the payload.
    Last(Envelope),
}

/// Splits `envelope` into the frames that carry it: fragments of [`FRAGMENT_SIZE`] bytes, then
/// the envelope with the remaining 1 to [`FRAGMENT_SIZE`] bytes (or all of a small payload).
///
/// # Errors
///
/// The payload is over [`MAX_MESSAGE`]: nothing is produced.
pub fn split(mut envelope: Envelope) -> Result<Vec<UserFrame>, MessageTooLarge> {
    let len = envelope.payload.len();
    check_size(len)?;
    if len <= FRAGMENT_SIZE {
        return Ok(vec![UserFrame::Last(envelope)]);
    }
    let fragments = (len - 1) / FRAGMENT_SIZE;
    let rest = envelope.payload.split_off(fragments * FRAGMENT_SIZE);
    let mut frames: Vec<UserFrame> = envelope
        .payload
        .chunks(FRAGMENT_SIZE)
        .map(|chunk| UserFrame::Fragment(chunk.to_vec()))
        .collect();
    envelope.payload = rest;
    frames.push(UserFrame::Last(envelope));
    Ok(frames)
}

/// Refuses a payload of `len` bytes over [`MAX_MESSAGE`].
pub(crate) fn check_size(len: usize) -> Result<(), MessageTooLarge> {
    if len > MAX_MESSAGE {
        return Err(MessageTooLarge {
            len,
            max: MAX_MESSAGE,
        });
    }
    Ok(())
}

/// Puts a fragmented payload back together, on the receiving side of one link.
#[derive(Debug, Default)]
pub struct Reassembly {
    partial: Vec<u8>,
}

impl Reassembly {
    /// A fragment arrived.
    ///
    /// # Errors
    ///
    /// The message would exceed [`MAX_MESSAGE`]: the peer is broken or hostile.
    pub fn fragment(&mut self, data: &[u8]) -> Result<(), MessageTooLarge> {
        let len = self.partial.len() + data.len();
        if len > MAX_MESSAGE {
            self.partial = Vec::new();
            return Err(MessageTooLarge {
                len,
                max: MAX_MESSAGE,
            });
        }
        if self.partial.is_empty() {
            self.partial.reserve_exact(data.len());
        }
        self.partial.extend_from_slice(data);
        Ok(())
    }

    /// The last frame arrived: its payload, preceded by the fragments so far.
    ///
    /// # Errors
    ///
    /// The whole would exceed [`MAX_MESSAGE`].
    pub fn complete(&mut self, mut envelope: Envelope) -> Result<Envelope, MessageTooLarge> {
        if self.partial.is_empty() {
            return Ok(envelope);
        }
        let mut payload = std::mem::take(&mut self.partial);
        let len = payload.len() + envelope.payload.len();
        if len > MAX_MESSAGE {
            return Err(MessageTooLarge {
                len,
                max: MAX_MESSAGE,
            });
        }
        // Exactly: the bound is on what the receiver holds, not only on the length.
        payload.reserve_exact(envelope.payload.len());
        payload.extend_from_slice(&envelope.payload);
        envelope.payload = payload;
        Ok(envelope)
    }

    /// Bytes held for a message not complete yet.
    pub fn pending(&self) -> usize {
        self.partial.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::{self, PrimaryMessage, Seq, UserKind, WorkerMessage};

    fn envelope(len: usize) -> Envelope {
        Envelope {
            kind: UserKind::Request {
                seq: Seq::new(u64::MAX),
            },
            fd: true,
            payload: (0..len).map(|i| (i % 251) as u8).collect(),
        }
    }

    fn round_trip(len: usize) {
        let original = envelope(len);
        let frames = split(original.clone()).unwrap();
        let mut reassembly = Reassembly::default();
        let mut done = None;
        for (i, frame) in frames.into_iter().enumerate() {
            let mut buf = Vec::new();
            match frame {
                UserFrame::Fragment(data) => {
                    assert!(done.is_none(), "fragment after the last frame");
                    let message = WorkerMessage::Fragment { data };
                    wire::encode(&message, &mut buf).expect("a fragment fits in a frame");
                    let WorkerMessage::Fragment { data } = wire::decode(&buf).unwrap() else {
                        panic!("frame {i} changed kind");
                    };
                    reassembly.fragment(&data).unwrap();
                }
                UserFrame::Last(envelope) => {
                    let message = PrimaryMessage::User(envelope);
                    wire::encode(&message, &mut buf).expect("the last frame fits in a frame");
                    let PrimaryMessage::User(envelope) = wire::decode(&buf).unwrap() else {
                        panic!("frame {i} changed kind");
                    };
                    done = Some(reassembly.complete(envelope).unwrap());
                }
            }
        }
        assert_eq!(done, Some(original), "length {len}");
        assert_eq!(reassembly.pending(), 0);
    }

    #[test]
    fn payloads_of_every_boundary_length_survive_splitting() {
        for len in [
            0,
            1,
            FRAGMENT_SIZE - 1,
            FRAGMENT_SIZE,
            FRAGMENT_SIZE + 1,
            2 * FRAGMENT_SIZE,
            2 * FRAGMENT_SIZE + 1,
            1_000_000,
        ] {
            round_trip(len);
        }
    }

    #[test]
    fn the_largest_message_is_accepted_and_one_more_byte_is_refused() {
        assert_eq!(
            split(envelope(MAX_MESSAGE)).unwrap().len(),
            MAX_MESSAGE / FRAGMENT_SIZE + 1
        );
        assert_eq!(
            split(envelope(MAX_MESSAGE + 1)),
            Err(MessageTooLarge {
                len: MAX_MESSAGE + 1,
                max: MAX_MESSAGE
            })
        );
    }

    #[test]
    fn a_receiver_never_holds_more_than_the_limit() {
        let mut reassembly = Reassembly::default();
        let chunk = vec![0; FRAGMENT_SIZE];
        let mut held = 0;
        let error = loop {
            match reassembly.fragment(&chunk) {
                Ok(()) => held += chunk.len(),
                Err(e) => break e,
            }
            assert!(reassembly.pending() <= MAX_MESSAGE);
        };
        assert_eq!(error.len, held + FRAGMENT_SIZE);
        assert_eq!(reassembly.pending(), 0, "a refused message is dropped");
    }
}
