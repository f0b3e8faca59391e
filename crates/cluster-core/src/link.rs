//! The seq/ack link: one per worker on each side.
//!
//! ```text
//!            peer's handshake            close()/peer gone
//!  Handshake ───────────────▶ Open ─────────────────────────▶ Closed
//!      │  anything else: HandshakeExpected                      ▲
//!      └────────────────────────────────────────────────────────┘
//!
//!  request(p) ─▶ seq n, pending[n] = p ─▶ reply(ack n) ─▶ p        (exactly once)
//!                                      └▶ reply(ack n) again ─▶ DuplicateAck
//!                                      └▶ close() ─▶ p returned as failed
//! ```
//!
//! The link does not know what its requests mean: it hands out sequence numbers, remembers what
//! each stands for (`P`) and when it must be answered, and matches replies to them. Every broken
//! promise is an error value, never a panic.

use std::collections::BTreeMap;
use std::time::Instant;

use crate::error::ProtocolError;
use crate::wire::{Message, PROTOCOL_VERSION, Seq};

/// A violation of the link protocol by the peer (or use of a closed link).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum LinkError {
    /// The peer's first message was not its handshake.
    #[error("first message was not the handshake")]
    HandshakeExpected,
    /// The peer sent its handshake twice.
    #[error("handshake repeated")]
    DuplicateHandshake,
    /// The peer speaks another protocol version.
    #[error("protocol version mismatch: ours {ours}, peer {theirs}")]
    VersionMismatch {
        /// [`PROTOCOL_VERSION`].
        ours: u16,
        /// The peer's.
        theirs: u16,
    },
    /// A reply for a request that was never sent.
    #[error("ack {ack} answers no request")]
    UnknownAck {
        /// The ack received.
        ack: Seq,
    },
    /// A second reply for a request already answered (or failed).
    #[error("ack {ack} was already answered")]
    DuplicateAck {
        /// The ack received.
        ack: Seq,
    },
    /// A reply of the wrong kind for its request (e.g. a connection ack for a listen query).
    #[error("ack {ack} has the wrong kind of reply")]
    WrongReply {
        /// The ack received.
        ack: Seq,
    },
    /// The link is closed.
    #[error("link closed")]
    Closed,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    Handshake,
    Open,
    Closed,
}

/// One side's view of a link: request numbering, pending requests and the handshake.
#[derive(Debug)]
pub struct Link<P> {
    state: State,
    next_seq: u64,
    /// The requests with a deadline, by seq. Their deadlines never decrease (one timeout per
    /// kind), so the first one's is the earliest.
    timed: BTreeMap<Seq, Timed<P>>,
    /// The requests without one (a user's request, a listen), by seq: kept apart so that finding
    /// the next deadline never walks over them.
    untimed: BTreeMap<Seq, P>,
}

#[derive(Debug)]
struct Timed<P> {
    what: P,
    deadline: Instant,
}

impl<P> Default for Link<P> {
    fn default() -> Self {
        Self::new()
    }
}

impl<P> Link<P> {
    /// A link waiting for the peer's handshake.
    pub fn new() -> Self {
        Self {
            state: State::Handshake,
            next_seq: 1,
            timed: BTreeMap::new(),
            untimed: BTreeMap::new(),
        }
    }

    /// Records the peer's handshake.
    ///
    /// # Errors
    ///
    /// [`LinkError::DuplicateHandshake`], [`LinkError::VersionMismatch`] or [`LinkError::Closed`].
    pub fn handle_handshake(&mut self, version: u16) -> Result<(), LinkError> {
        match self.state {
            State::Closed => Err(LinkError::Closed),
            State::Open => Err(LinkError::DuplicateHandshake),
            State::Handshake if version != PROTOCOL_VERSION => Err(LinkError::VersionMismatch {
                ours: PROTOCOL_VERSION,
                theirs: version,
            }),
            State::Handshake => {
                self.state = State::Open;
                Ok(())
            }
        }
    }

    /// Decodes a frame that came with `fds` file descriptors and checks that they are the
    /// number its message carries. A handshake of another protocol version is reported as
    /// [`LinkError::VersionMismatch`] even when it does not decode.
    ///
    /// # Errors
    ///
    /// [`ProtocolError::Decode`], [`ProtocolError::Link`] or [`ProtocolError::UnexpectedFds`].
    pub fn receive<M: Message>(&self, frame: &[u8], fds: usize) -> Result<M, ProtocolError> {
        let message: M = match crate::wire::decode(frame) {
            Ok(message) => message,
            Err(e) => {
                return Err(self
                    .foreign_handshake(frame)
                    .map_or_else(|| e.into(), Into::into));
            }
        };
        if fds != message.fd_count() {
            return Err(ProtocolError::UnexpectedFds {
                expected: message.fd_count(),
                got: fds,
            });
        }
        Ok(message)
    }

    /// Classifies a frame that did not decode: a handshake of another protocol version (whose
    /// shape may differ from ours) is a [`LinkError::VersionMismatch`], anything else `None`.
    pub fn foreign_handshake(&self, frame: &[u8]) -> Option<LinkError> {
        let theirs = crate::wire::handshake_version(frame)?;
        (self.state == State::Handshake && theirs != PROTOCOL_VERSION).then_some(
            LinkError::VersionMismatch {
                ours: PROTOCOL_VERSION,
                theirs,
            },
        )
    }

    /// Checks that a message other than the handshake may be received now.
    ///
    /// # Errors
    ///
    /// [`LinkError::HandshakeExpected`] before the handshake, [`LinkError::Closed`] after close.
    pub fn check_open(&self) -> Result<(), LinkError> {
        match self.state {
            State::Open => Ok(()),
            State::Handshake => Err(LinkError::HandshakeExpected),
            State::Closed => Err(LinkError::Closed),
        }
    }

    /// Whether the handshake is done and the link not closed.
    pub fn is_open(&self) -> bool {
        self.state == State::Open
    }

    /// Whether the link is closed.
    pub fn is_closed(&self) -> bool {
        self.state == State::Closed
    }

    /// Starts a request: returns its sequence number and remembers `what` until the reply.
    ///
    /// Requests may be sent before the peer's handshake arrives (frames are ordered, and the
    /// peer sends its handshake first on its own side).
    ///
    /// # Errors
    ///
    /// [`LinkError::Closed`]; `what` is handed back.
    pub fn start_request(
        &mut self,
        what: P,
        deadline: Option<Instant>,
    ) -> Result<Seq, (LinkError, P)> {
        if self.state == State::Closed {
            return Err((LinkError::Closed, what));
        }
        let seq = Seq::new(self.next_seq);
        self.next_seq += 1;
        match deadline {
            Some(deadline) => {
                self.timed.insert(seq, Timed { what, deadline });
            }
            None => {
                self.untimed.insert(seq, what);
            }
        }
        Ok(seq)
    }

    /// Matches a reply to its request and forgets the request.
    ///
    /// # Errors
    ///
    /// [`LinkError::UnknownAck`] for a number never issued, [`LinkError::DuplicateAck`] for one
    /// already answered.
    pub fn finish_request(&mut self, ack: Seq) -> Result<P, LinkError> {
        self.check_open()?;
        match self.remove(ack) {
            Some(what) => Ok(what),
            None if ack.get() > 0 && ack.get() < self.next_seq => {
                Err(LinkError::DuplicateAck { ack })
            }
            None => Err(LinkError::UnknownAck { ack }),
        }
    }

    /// Matches a reply only if `accept` agrees that its kind fits the request.
    ///
    /// # Errors
    ///
    /// As [`Self::finish_request`], plus [`LinkError::WrongReply`] (the request stays pending).
    pub fn finish_request_if(
        &mut self,
        ack: Seq,
        accept: impl FnOnce(&P) -> bool,
    ) -> Result<P, LinkError> {
        self.check_open()?;
        match self.pending(ack) {
            Some(what) if !accept(what) => Err(LinkError::WrongReply { ack }),
            _ => self.finish_request(ack),
        }
    }

    /// Matches a cumulative reply: every pending request up to and including `through` that
    /// `answered` agrees it covers is forgotten and returned, oldest first (the others stay
    /// pending).
    ///
    /// # Errors
    ///
    /// [`LinkError::UnknownAck`] when `through` was never issued, [`LinkError::DuplicateAck`]
    /// when it covers no pending request (all of them were answered already).
    pub fn finish_through(
        &mut self,
        through: Seq,
        answered: impl Fn(&P) -> bool,
    ) -> Result<Vec<(Seq, P)>, LinkError> {
        self.check_open()?;
        if through.get() == 0 || through.get() >= self.next_seq {
            return Err(LinkError::UnknownAck { ack: through });
        }
        let mut finished: Vec<(Seq, P)> = self
            .timed
            .extract_if(..=through, |_, p| answered(&p.what))
            .map(|(seq, p)| (seq, p.what))
            .chain(
                self.untimed
                    .extract_if(..=through, |_, what| answered(what)),
            )
            .collect();
        finished.sort_unstable_by_key(|(seq, _)| *seq);
        if finished.is_empty() {
            return Err(LinkError::DuplicateAck { ack: through });
        }
        Ok(finished)
    }

    /// The pending request for `seq`, if any.
    pub fn pending(&self, seq: Seq) -> Option<&P> {
        match self.timed.get(&seq) {
            Some(p) => Some(&p.what),
            None => self.untimed.get(&seq),
        }
    }

    /// The pending request for `seq`, if any, to update what it stands for.
    pub fn pending_mut(&mut self, seq: Seq) -> Option<&mut P> {
        match self.timed.get_mut(&seq) {
            Some(p) => Some(&mut p.what),
            None => self.untimed.get_mut(&seq),
        }
    }

    /// Forgets request `seq` if `what` agrees, whatever the link's state (its waiter gave up);
    /// an answer to it, if one comes, is then a [`LinkError::DuplicateAck`].
    pub fn forget_if(&mut self, seq: Seq, what: impl FnOnce(&P) -> bool) -> Option<P> {
        if what(self.pending(seq)?) {
            self.remove(seq)
        } else {
            None
        }
    }

    fn remove(&mut self, seq: Seq) -> Option<P> {
        match self.timed.remove(&seq) {
            Some(p) => Some(p.what),
            None => self.untimed.remove(&seq),
        }
    }

    /// The pending requests, oldest first.
    pub fn pending_requests(&self) -> impl Iterator<Item = (Seq, &P)> + '_ {
        let mut timed = self.timed.iter().map(|(seq, p)| (*seq, &p.what)).peekable();
        let mut untimed = self
            .untimed
            .iter()
            .map(|(seq, what)| (*seq, what))
            .peekable();
        std::iter::from_fn(move || match (timed.peek(), untimed.peek()) {
            (Some((a, _)), Some((b, _))) if a > b => untimed.next(),
            (Some(_), _) => timed.next(),
            (None, _) => untimed.next(),
        })
    }

    /// How many requests await a reply.
    pub fn pending_len(&self) -> usize {
        self.timed.len() + self.untimed.len()
    }

    /// Moves every pending request's deadline `by` later: time the driver spent not reading
    /// the peer does not count against it. Their order is kept.
    pub fn postpone(&mut self, by: std::time::Duration) {
        for timed in self.timed.values_mut() {
            timed.deadline += by;
        }
    }

    /// The earliest deadline among pending requests.
    ///
    /// Requests with deadlines are assumed to be issued with non-decreasing deadlines (one
    /// timeout per kind), so this is the oldest timed request's.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.timed.values().next().map(|p| p.deadline)
    }

    /// The requests whose deadline is at or before `now`, oldest first. They stay pending.
    pub fn expired(&self, now: Instant) -> impl Iterator<Item = (Seq, &P)> + '_ {
        self.timed
            .iter()
            .take_while(move |(_, p)| p.deadline <= now)
            .map(|(seq, p)| (*seq, &p.what))
    }

    /// Closes the link; every pending request is returned as failed, oldest first.
    pub fn close(&mut self) -> impl Iterator<Item = (Seq, P)> {
        self.state = State::Closed;
        let mut failed: Vec<(Seq, P)> = std::mem::take(&mut self.timed)
            .into_iter()
            .map(|(seq, p)| (seq, p.what))
            .chain(std::mem::take(&mut self.untimed))
            .collect();
        failed.sort_unstable_by_key(|(seq, _)| *seq);
        failed.into_iter()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn open() -> Link<&'static str> {
        let mut link = Link::new();
        link.handle_handshake(PROTOCOL_VERSION).unwrap();
        link
    }

    #[test]
    fn messages_before_the_handshake_are_refused() {
        let mut link = Link::<()>::new();
        assert_eq!(link.check_open(), Err(LinkError::HandshakeExpected));
        assert_eq!(
            link.finish_request(Seq::new(1)),
            Err(LinkError::HandshakeExpected)
        );
        assert_eq!(
            link.handle_handshake(PROTOCOL_VERSION + 1),
            Err(LinkError::VersionMismatch {
                ours: PROTOCOL_VERSION,
                theirs: PROTOCOL_VERSION + 1
            })
        );
        link.handle_handshake(PROTOCOL_VERSION).unwrap();
        assert_eq!(
            link.handle_handshake(PROTOCOL_VERSION),
            Err(LinkError::DuplicateHandshake)
        );
    }

    #[test]
    fn each_reply_matches_exactly_once() {
        let mut link = open();
        let a = link.start_request("a", None).unwrap();
        let b = link.start_request("b", None).unwrap();
        assert_eq!((a.get(), b.get()), (1, 2));
        assert_eq!(link.finish_request(b), Ok("b"));
        assert_eq!(
            link.finish_request(b),
            Err(LinkError::DuplicateAck { ack: b })
        );
        assert_eq!(
            link.finish_request(Seq::new(99)),
            Err(LinkError::UnknownAck { ack: Seq::new(99) })
        );
        assert_eq!(
            link.finish_request(Seq::new(0)),
            Err(LinkError::UnknownAck { ack: Seq::new(0) })
        );
        assert_eq!(link.pending_len(), 1);
        assert_eq!(link.finish_request(a), Ok("a"));
    }

    #[test]
    fn a_cumulative_reply_answers_everything_it_covers_once() {
        let mut link = open();
        for what in ["a", "b", "kept", "d", "e"] {
            link.start_request(what, None).unwrap();
        }
        let answered = |p: &&str| *p != "kept";
        assert_eq!(
            link.finish_through(Seq::new(6), answered),
            Err(LinkError::UnknownAck { ack: Seq::new(6) })
        );
        assert_eq!(
            link.finish_through(Seq::new(0), answered),
            Err(LinkError::UnknownAck { ack: Seq::new(0) })
        );
        let done = link.finish_through(Seq::new(4), answered).unwrap();
        assert_eq!(
            done,
            [(Seq::new(1), "a"), (Seq::new(2), "b"), (Seq::new(4), "d")]
        );
        assert_eq!(link.pending(Seq::new(3)), Some(&"kept"));
        assert_eq!(
            link.finish_through(Seq::new(4), answered),
            Err(LinkError::DuplicateAck { ack: Seq::new(4) })
        );
        assert_eq!(
            link.finish_through(Seq::new(5), answered).unwrap(),
            [(Seq::new(5), "e")]
        );
    }

    #[test]
    fn wrong_kind_of_reply_leaves_the_request_pending() {
        let mut link = open();
        let a = link.start_request("query", None).unwrap();
        assert_eq!(
            link.finish_request_if(a, |p| *p == "conn"),
            Err(LinkError::WrongReply { ack: a })
        );
        assert_eq!(link.finish_request_if(a, |p| *p == "query"), Ok("query"));
    }

    #[test]
    fn close_fails_every_pending_request_and_refuses_new_ones() {
        let mut link = open();
        link.start_request("a", None).unwrap();
        link.start_request("b", None).unwrap();
        let failed: Vec<_> = link.close().map(|(_, p)| p).collect();
        assert_eq!(failed, ["a", "b"]);
        assert!(link.is_closed());
        assert_eq!(link.start_request("c", None), Err((LinkError::Closed, "c")));
        assert_eq!(link.finish_request(Seq::new(1)), Err(LinkError::Closed));
    }

    #[test]
    fn deadlines_are_reported_oldest_first() {
        let t0 = Instant::now();
        let s = Duration::from_secs(1);
        let mut link = open();
        link.start_request("no deadline", None).unwrap();
        let a = link.start_request("a", Some(t0 + s)).unwrap();
        link.start_request("b", Some(t0 + 2 * s)).unwrap();
        assert_eq!(link.next_deadline(), Some(t0 + s));
        assert_eq!(link.expired(t0).count(), 0);
        assert_eq!(
            link.expired(t0 + s).map(|(seq, _)| seq).collect::<Vec<_>>(),
            [a]
        );
        link.finish_request(a).unwrap();
        assert_eq!(link.next_deadline(), Some(t0 + 2 * s));
    }

    #[test]
    fn requests_without_a_deadline_never_hide_the_next_one_and_keep_their_order() {
        let mut link = open();
        let now = Instant::now();
        let untimed = link.start_request("user", None).unwrap();
        let first = link
            .start_request("handoff", Some(now + Duration::from_secs(1)))
            .unwrap();
        let second = link.start_request("listen", None).unwrap();
        let third = link
            .start_request("handoff", Some(now + Duration::from_secs(2)))
            .unwrap();
        assert_eq!(link.next_deadline(), Some(now + Duration::from_secs(1)));
        let expired: Vec<_> = link.expired(now + Duration::from_secs(1)).collect();
        assert_eq!(expired, [(first, &"handoff")]);
        let order: Vec<Seq> = link.pending_requests().map(|(seq, _)| seq).collect();
        assert_eq!(order, [untimed, first, second, third]);
        // A cumulative reply covers both kinds if asked to, oldest first.
        let done = link.finish_through(second, |_| true).unwrap();
        assert_eq!(
            done.iter().map(|(seq, _)| *seq).collect::<Vec<_>>(),
            [untimed, first, second]
        );
        assert_eq!(link.next_deadline(), Some(now + Duration::from_secs(2)));
        let last = link.start_request("user", None).unwrap();
        let failed: Vec<Seq> = link.close().map(|(seq, _)| seq).collect();
        assert_eq!(failed, [third, last]);
    }

    #[test]
    fn a_request_is_forgotten_even_before_the_handshake() {
        let mut link = Link::<&str>::new();
        let seq = link.start_request("user", None).unwrap();
        assert_eq!(link.forget_if(seq, |what| *what == "listen"), None);
        assert_eq!(link.forget_if(seq, |what| *what == "user"), Some("user"));
        assert_eq!(link.pending_len(), 0);
        link.handle_handshake(PROTOCOL_VERSION).unwrap();
        assert_eq!(
            link.finish_request(seq),
            Err(LinkError::DuplicateAck { ack: seq })
        );
    }
}
