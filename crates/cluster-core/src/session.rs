//! The worker's side of the protocol.
//!
//! A [`WorkerSession`] sends the handshake first, numbers listen requests, matches the primary's
//! replies, and decides what to do with each handed-off connection: a connection for a handle
//! this worker has closed is refused at once (Node's `worker-handle-close`); any other is given
//! to the driver, which must [`WorkerSession::accept`] or [`WorkerSession::refuse`] it, in the
//! order offered.
//!
//! Acks are cumulative and lazy: an accepted connection is acknowledged at once only when the
//! primary asked (`NewConn::reply`, every half window); otherwise with the next one asked for, or
//! before the next heartbeat or the leaving announcement. The primary kept no copy of the
//! connection, so a refusal sends it back.

use std::collections::{BTreeSet, VecDeque};
use std::time::Duration;

use crate::error::ProtocolError;
use crate::link::{Link, LinkError};
use crate::user::{self, MessageTooLarge, Reassembly, UserFrame};
use crate::wire::{
    self, Envelope, Errno, HandleId, ListenInfo, ListenRequest, PROTOCOL_VERSION, PrimaryMessage,
    Seq, WorkerMessage,
};

/// What the worker's driver is told.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SessionEvent {
    /// A handed-off connection; the fd that came with the frame is it. Answer with
    /// [`WorkerSession::accept`] or [`WorkerSession::refuse`].
    Connection {
        /// Its seq, to name in the answer.
        seq: Seq,
        /// The handle it was accepted on.
        handle: HandleId,
    },
    /// The primary acknowledged [`WorkerSession::exit_after_disconnect`]: close the link and exit.
    DisconnectAcked,
    /// The primary asks this worker to close its listeners, finish its connections and leave.
    DisconnectRequested {
        /// How long it has, from when the primary asked, before it is killed.
        within: Duration,
    },
    /// The answer to [`WorkerSession::listen`]. For a shared handle, the fd that came with the
    /// frame is the listening socket. When the link closes first, the result is `ENOTCONN`.
    ListenReply {
        /// The request's seq.
        seq: Seq,
        /// The handle or the errno.
        result: Result<ListenInfo, Errno>,
    },
    /// A user message, request or reply (fragments put back together). With `envelope.fd`, the
    /// fd that came with the frame is part of it.
    User {
        /// What the primary sent.
        envelope: Envelope,
    },
}

/// What a [`WorkerSession`] asks its driver to do next.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SessionOutput {
    /// Send the frame now in the buffer, with the fd `attach` names.
    Transmit {
        /// Which fd the frame carries, if any.
        attach: SessionAttach,
    },
    /// Tell the user (or the listener).
    Event(SessionEvent),
}

/// Which fd a [`SessionOutput::Transmit`] carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SessionAttach {
    /// None.
    Nothing,
    /// The oldest fd the driver set aside for a frame that carries one and has not sent yet:
    /// the connection of [`WorkerSession::refuse`] or [`WorkerSession::give_back`], or the fd of
    /// a user message.
    SetAside,
    /// The fd that came with the frame just handled (a connection refused at once).
    Received,
}

/// A driver mistake: answering a connection that was not offered, or not the oldest one offered.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("connection {0} is not the next awaiting an answer")]
pub struct UnknownConnection(pub Seq);

/// A connection offered to the driver and not answered yet.
#[derive(Debug)]
struct Offered {
    seq: Seq,
    /// The primary asked for an ack at once.
    reply: bool,
}

#[derive(Debug, PartialEq, Eq)]
enum Request {
    Listen,
    ExitedAfterDisconnect,
}

enum Queued {
    /// A frame, and whether its fd is the one received with the frame being handled.
    Send(WorkerMessage, bool),
    Event(SessionEvent),
}

/// `Errno` for a request that failed because the link closed.
const ENOTCONN: Errno = Errno(107);

/// One worker's side of its link to the primary.
#[derive(Debug)]
pub struct WorkerSession {
    link: Link<Request>,
    handles: BTreeSet<HandleId>,
    /// Oldest first; answered in this order.
    offered: VecDeque<Offered>,
    /// The highest accepted connection not acknowledged yet.
    unacked: Option<Seq>,
    disconnect_requested: bool,
    /// [`WorkerSession::service_ready`] was sent.
    service_ready: bool,
    reassembly: Reassembly,
    out: VecDeque<Queued>,
}

impl std::fmt::Debug for Queued {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Send(m, _) => write!(f, "Send({m:?})"),
            Self::Event(e) => write!(f, "Event({e:?})"),
        }
    }
}

impl WorkerSession {
    /// A session for process `pid`; its handshake (`Online`) is the first output.
    pub fn new(pid: u32) -> Self {
        let mut session = Self {
            link: Link::new(),
            handles: BTreeSet::new(),
            offered: VecDeque::new(),
            unacked: None,
            disconnect_requested: false,
            service_ready: false,
            reassembly: Reassembly::default(),
            out: VecDeque::new(),
        };
        session.send(WorkerMessage::Online {
            version: PROTOCOL_VERSION,
            pid,
        });
        session
    }

    /// Asks the primary for a listener; the answer is a [`SessionEvent::ListenReply`] with the
    /// returned seq.
    ///
    /// # Errors
    ///
    /// [`LinkError::Closed`] after the link closed.
    pub fn listen(&mut self, request: ListenRequest) -> Result<Seq, LinkError> {
        let seq = self
            .link
            .start_request(Request::Listen, None)
            .map_err(|(e, _)| e)?;
        self.send(WorkerMessage::QueryServer { seq, request });
        Ok(seq)
    }

    /// Tells the primary the application is ready to serve; only the first call sends.
    pub fn service_ready(&mut self) {
        if !self.service_ready && !self.link.is_closed() {
            self.service_ready = true;
            self.send(WorkerMessage::ServiceReady);
        }
    }

    /// Tells the primary the listener for `handle` is ready.
    pub fn listening(&mut self, handle: HandleId) {
        if self.handles.contains(&handle) {
            self.send(WorkerMessage::Listening { handle });
        }
    }

    /// Takes the oldest offered connection (`seq`). Its ack is sent now if the primary asked,
    /// later otherwise.
    ///
    /// # Errors
    ///
    /// [`UnknownConnection`] when `seq` is not the oldest connection awaiting an answer.
    pub fn accept(&mut self, seq: Seq) -> Result<(), UnknownConnection> {
        let offered = self.answer(seq)?;
        self.unacked = Some(seq);
        if offered.reply {
            self.flush_acks();
        }
        Ok(())
    }

    /// Refuses the oldest offered connection (`seq`): the driver sets its fd aside, and it goes
    /// back to the primary (see [`SessionAttach::SetAside`]). Offers on its handle pause until
    /// [`Self::ready`].
    ///
    /// # Errors
    ///
    /// [`UnknownConnection`] when `seq` is not the oldest connection awaiting an answer.
    pub fn refuse(&mut self, seq: Seq) -> Result<(), UnknownConnection> {
        let offered = self.answer(seq)?;
        if offered.reply {
            // The primary waits for an answer to come: acknowledge what came before.
            self.flush_acks();
        }
        self.send(WorkerMessage::Refused { ack: seq });
        Ok(())
    }

    fn answer(&mut self, seq: Seq) -> Result<Offered, UnknownConnection> {
        match self.offered.front() {
            Some(offered) if offered.seq == seq => Ok(self.offered.pop_front().expect("just seen")),
            _ => Err(UnknownConnection(seq)),
        }
    }

    /// Sends the ack of every connection accepted so far, if one is owed.
    fn flush_acks(&mut self) {
        if let Some(through) = self.unacked.take() {
            self.send(WorkerMessage::Accepted { through });
        }
    }

    /// This worker has room again on `handle` after refusing.
    pub fn ready(&mut self, handle: HandleId) {
        if self.handles.contains(&handle) {
            self.send(WorkerMessage::Ready { handle });
        }
    }

    /// Closes this worker's listener on `handle`; later offers on it are refused. Closing twice
    /// is a no-op.
    pub fn close(&mut self, handle: HandleId) {
        if self.handles.remove(&handle) {
            self.send(WorkerMessage::Close { handle });
        }
    }

    /// Gives back a connection of `handle` that this worker accepted but will not serve; the
    /// driver sets its fd aside for the resulting transmit ([`SessionAttach::SetAside`]).
    pub fn give_back(&mut self, handle: HandleId) {
        // Acked first: the primary settles the handoff before it takes the connection back.
        self.flush_acks();
        self.send(WorkerMessage::Return { handle });
    }

    /// Tells the primary this worker's runtime is alive, with the acks it still owes; call every
    /// [`HEARTBEAT_INTERVAL`](crate::wire::HEARTBEAT_INTERVAL) from a task on that runtime.
    pub fn heartbeat(&mut self) {
        self.flush_acks();
        self.send(WorkerMessage::Heartbeat);
    }

    /// Announces that this worker leaves on purpose; wait for [`SessionEvent::DisconnectAcked`]
    /// before closing the link.
    ///
    /// # Errors
    ///
    /// [`LinkError::Closed`].
    pub fn exit_after_disconnect(&mut self) -> Result<Seq, LinkError> {
        let seq = self
            .link
            .start_request(Request::ExitedAfterDisconnect, None)
            .map_err(|(e, _)| e)?;
        self.flush_acks();
        self.send(WorkerMessage::ExitedAfterDisconnect { seq });
        Ok(seq)
    }

    /// Queues a user message, request or reply; a payload larger than one frame is queued as
    /// fragments (see [`crate::user`]). With `envelope.fd`, the frame asks for an fd like
    /// [`Self::give_back`]'s: the driver attaches the oldest fd it set aside and has not sent.
    ///
    /// # Errors
    ///
    /// The payload is over [`MAX_MESSAGE`](crate::user::MAX_MESSAGE); nothing is queued.
    pub fn send_user(&mut self, envelope: Envelope) -> Result<(), MessageTooLarge> {
        for frame in user::split(envelope)? {
            match frame {
                UserFrame::Fragment(data) => self.send(WorkerMessage::Fragment { data }),
                UserFrame::Last(envelope) => self.send(WorkerMessage::User(envelope)),
            }
        }
        Ok(())
    }

    /// The handles this worker listens on.
    pub fn handles(&self) -> impl Iterator<Item = HandleId> + '_ {
        self.handles.iter().copied()
    }

    /// Whether the primary asked this worker to disconnect.
    pub fn is_disconnect_requested(&self) -> bool {
        self.disconnect_requested
    }

    /// A datagram arrived from the primary with `fds` file descriptors. Fds not claimed by the
    /// resulting event (see [`SessionEvent`]) must be closed by the driver.
    ///
    /// # Errors
    ///
    /// Any [`ProtocolError`]: the primary is broken; close the link and exit.
    pub fn handle_frame(&mut self, frame: &[u8], fds: usize) -> Result<(), ProtocolError> {
        let message: PrimaryMessage = self.link.receive(frame, fds)?;
        if let PrimaryMessage::Hello { version } = message {
            return Ok(self.link.handle_handshake(version)?);
        }
        self.link.check_open()?;
        match message {
            PrimaryMessage::Hello { .. } => unreachable!("handled above"),
            PrimaryMessage::ListenReply { ack, result } => {
                self.link
                    .finish_request_if(ack, |r| *r == Request::Listen)?;
                if let Ok(info) = &result {
                    self.handles.insert(info.handle);
                }
                self.event(SessionEvent::ListenReply { seq: ack, result });
            }
            PrimaryMessage::NewConn { seq, handle, reply } => {
                if self.offered.iter().any(|o| o.seq == seq) {
                    return Err(ProtocolError::DuplicateConnection { seq });
                }
                if self.handles.contains(&handle) && !self.disconnect_requested {
                    self.offered.push_back(Offered { seq, reply });
                    self.event(SessionEvent::Connection { seq, handle });
                } else {
                    if reply {
                        self.flush_acks();
                    }
                    self.out
                        .push_back(Queued::Send(WorkerMessage::Refused { ack: seq }, true));
                }
            }
            PrimaryMessage::Disconnect { within_ms } => {
                self.disconnect_requested = true;
                self.event(SessionEvent::DisconnectRequested {
                    within: Duration::from_millis(within_ms),
                });
            }
            PrimaryMessage::DisconnectAck { ack } => {
                self.link
                    .finish_request_if(ack, |r| *r == Request::ExitedAfterDisconnect)?;
                self.event(SessionEvent::DisconnectAcked);
            }
            PrimaryMessage::User(envelope) => {
                let envelope = self.reassembly.complete(envelope)?;
                self.event(SessionEvent::User { envelope });
            }
            PrimaryMessage::Fragment { data } => self.reassembly.fragment(&data)?,
        }
        Ok(())
    }

    /// The link closed: pending listens fail with `ENOTCONN`.
    pub fn handle_link_closed(&mut self) {
        let failed: Vec<_> = self.link.close().collect();
        for (seq, request) in failed {
            if request == Request::Listen {
                self.event(SessionEvent::ListenReply {
                    seq,
                    result: Err(ENOTCONN),
                });
            }
        }
        self.offered.clear();
    }

    /// The next thing to do. For [`SessionOutput::Transmit`] the frame is written to `buf`
    /// (cleared first).
    #[must_use]
    pub fn poll_output(&mut self, buf: &mut Vec<u8>) -> Option<SessionOutput> {
        loop {
            match self.out.pop_front()? {
                Queued::Event(event) => return Some(SessionOutput::Event(event)),
                Queued::Send(_, _) if self.link.is_closed() => continue,
                Queued::Send(message, received) => {
                    buf.clear();
                    wire::encode(&message, buf).expect("queued frames fit in MAX_FRAME");
                    let attach = match (message.fd_count(), received) {
                        (0, _) => SessionAttach::Nothing,
                        (_, false) => SessionAttach::SetAside,
                        (_, true) => SessionAttach::Received,
                    };
                    return Some(SessionOutput::Transmit { attach });
                }
            }
        }
    }

    fn send(&mut self, message: WorkerMessage) {
        self.out.push_back(Queued::Send(message, false));
    }

    fn event(&mut self, event: SessionEvent) {
        self.out.push_back(Queued::Event(event));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::{BoundAddr, Distribution, ListenFlags, ListenTarget, SocketKind};

    fn outputs(s: &mut WorkerSession) -> Vec<Result<WorkerMessage, SessionEvent>> {
        let mut buf = Vec::new();
        std::iter::from_fn(|| {
            s.poll_output(&mut buf).map(|o| match o {
                SessionOutput::Transmit { .. } => Ok(wire::decode(&buf).unwrap()),
                SessionOutput::Event(e) => Err(e),
            })
        })
        .collect()
    }

    fn frame(m: &PrimaryMessage) -> Vec<u8> {
        let mut buf = Vec::new();
        wire::encode(m, &mut buf).unwrap();
        buf
    }

    fn connected() -> WorkerSession {
        let mut s = WorkerSession::new(77);
        assert_eq!(
            outputs(&mut s),
            [Ok(WorkerMessage::Online {
                version: PROTOCOL_VERSION,
                pid: 77
            })]
        );
        s.handle_frame(
            &frame(&PrimaryMessage::Hello {
                version: PROTOCOL_VERSION,
            }),
            0,
        )
        .unwrap();
        s
    }

    fn request() -> ListenRequest {
        ListenRequest {
            target: ListenTarget::Ip("127.0.0.1:0".parse().unwrap()),
            kind: SocketKind::Stream,
            backlog: 0,
            flags: ListenFlags::default(),
        }
    }

    fn listening(s: &mut WorkerSession) -> HandleId {
        let seq = s.listen(request()).unwrap();
        outputs(s);
        let handle = HandleId::new(3);
        let info = ListenInfo {
            handle,
            addr: BoundAddr::Ip("127.0.0.1:5555".parse().unwrap()),
            distribution: Distribution::RoundRobin,
        };
        s.handle_frame(
            &frame(&PrimaryMessage::ListenReply {
                ack: seq,
                result: Ok(info.clone()),
            }),
            0,
        )
        .unwrap();
        assert_eq!(
            outputs(s),
            [Err(SessionEvent::ListenReply {
                seq,
                result: Ok(info)
            })]
        );
        handle
    }

    #[test]
    fn primary_must_say_hello_first_with_our_version() {
        let mut s = WorkerSession::new(1);
        let err = s
            .handle_frame(&frame(&PrimaryMessage::Disconnect { within_ms: 5_000 }), 0)
            .unwrap_err();
        assert_eq!(err, ProtocolError::Link(LinkError::HandshakeExpected));
        let mut s = WorkerSession::new(1);
        let err = s
            .handle_frame(&frame(&PrimaryMessage::Hello { version: 999 }), 0)
            .unwrap_err();
        assert!(matches!(
            err,
            ProtocolError::Link(LinkError::VersionMismatch { theirs: 999, .. })
        ));
    }

    #[test]
    fn a_future_primary_is_a_version_mismatch_not_garbage() {
        let mut s = WorkerSession::new(1);
        // The next version's Hello with one more field.
        let next = u8::try_from(PROTOCOL_VERSION + 1).unwrap();
        let err = s.handle_frame(&[0, next, 7], 0).unwrap_err();
        assert_eq!(
            err,
            ProtocolError::Link(LinkError::VersionMismatch {
                ours: PROTOCOL_VERSION,
                theirs: PROTOCOL_VERSION + 1
            })
        );
    }

    fn new_conn(seq: u64, handle: HandleId, reply: bool) -> Vec<u8> {
        frame(&PrimaryMessage::NewConn {
            seq: Seq::new(seq),
            handle,
            reply,
        })
    }

    #[test]
    fn connections_are_offered_once_and_answered_once_in_order() {
        let mut s = connected();
        let handle = listening(&mut s);
        let (one, two) = (Seq::new(1), Seq::new(2));
        s.handle_frame(&new_conn(1, handle, true), 1).unwrap();
        s.handle_frame(&new_conn(2, handle, true), 1).unwrap();
        assert_eq!(
            outputs(&mut s),
            [
                Err(SessionEvent::Connection { seq: one, handle }),
                Err(SessionEvent::Connection { seq: two, handle })
            ]
        );
        let dup = s.handle_frame(&new_conn(1, handle, true), 1);
        assert_eq!(dup, Err(ProtocolError::DuplicateConnection { seq: one }));
        assert_eq!(s.accept(two), Err(UnknownConnection(two)));
        s.accept(one).unwrap();
        assert_eq!(s.accept(one), Err(UnknownConnection(one)));
        assert_eq!(
            outputs(&mut s),
            [Ok(WorkerMessage::Accepted { through: one })]
        );
        s.refuse(two).unwrap();
        assert_eq!(s.refuse(two), Err(UnknownConnection(two)));
        let mut buf = Vec::new();
        assert_eq!(
            s.poll_output(&mut buf),
            Some(SessionOutput::Transmit {
                attach: SessionAttach::SetAside
            })
        );
        assert_eq!(
            wire::decode::<WorkerMessage>(&buf),
            Ok(WorkerMessage::Refused { ack: two })
        );
    }

    #[test]
    fn acks_wait_until_asked_for_then_cover_everything_accepted() {
        let mut s = connected();
        let handle = listening(&mut s);
        for seq in 1..=3 {
            s.handle_frame(&new_conn(seq, handle, false), 1).unwrap();
            outputs(&mut s);
            s.accept(Seq::new(seq)).unwrap();
        }
        assert_eq!(outputs(&mut s), [], "no ack was asked for");
        // Asked with a refusal: the acks owed go first, then the refusal.
        s.handle_frame(&new_conn(4, handle, true), 1).unwrap();
        outputs(&mut s);
        s.refuse(Seq::new(4)).unwrap();
        assert_eq!(
            outputs(&mut s),
            [
                Ok(WorkerMessage::Accepted {
                    through: Seq::new(3)
                }),
                Ok(WorkerMessage::Refused { ack: Seq::new(4) })
            ]
        );
        // Unasked acks ride the heartbeat, and the leaving announcement.
        s.handle_frame(&new_conn(5, handle, false), 1).unwrap();
        outputs(&mut s);
        s.accept(Seq::new(5)).unwrap();
        s.heartbeat();
        s.heartbeat();
        assert_eq!(
            outputs(&mut s),
            [
                Ok(WorkerMessage::Accepted {
                    through: Seq::new(5)
                }),
                Ok(WorkerMessage::Heartbeat),
                Ok(WorkerMessage::Heartbeat)
            ]
        );
        s.handle_frame(&new_conn(6, handle, false), 1).unwrap();
        outputs(&mut s);
        s.accept(Seq::new(6)).unwrap();
        let leaving = s.exit_after_disconnect().unwrap();
        assert_eq!(
            outputs(&mut s),
            [
                Ok(WorkerMessage::Accepted {
                    through: Seq::new(6)
                }),
                Ok(WorkerMessage::ExitedAfterDisconnect { seq: leaving })
            ]
        );
    }

    #[test]
    fn connection_for_a_closed_handle_is_refused_at_once() {
        let mut s = connected();
        let handle = listening(&mut s);
        s.close(handle);
        s.close(handle);
        s.handle_frame(&new_conn(4, handle, false), 1).unwrap();
        assert_eq!(
            outputs(&mut s),
            [
                Ok(WorkerMessage::Close { handle }),
                Ok(WorkerMessage::Refused { ack: Seq::new(4) })
            ]
        );
        // The connection goes back: it is the fd that came with the frame.
        s.handle_frame(&new_conn(5, handle, false), 1).unwrap();
        let mut buf = Vec::new();
        assert_eq!(
            s.poll_output(&mut buf),
            Some(SessionOutput::Transmit {
                attach: SessionAttach::Received
            })
        );
    }

    #[test]
    fn newconn_without_its_fd_is_a_protocol_error() {
        let mut s = connected();
        let handle = listening(&mut s);
        let err = s.handle_frame(&new_conn(1, handle, true), 0);
        assert_eq!(
            err,
            Err(ProtocolError::UnexpectedFds {
                expected: 1,
                got: 0
            })
        );
    }

    #[test]
    fn replies_of_the_wrong_kind_are_rejected() {
        let mut s = connected();
        let seq = s.exit_after_disconnect().unwrap();
        let reply = PrimaryMessage::ListenReply {
            ack: seq,
            result: Err(Errno::EINVAL),
        };
        assert_eq!(
            s.handle_frame(&frame(&reply), 0),
            Err(ProtocolError::Link(LinkError::WrongReply { ack: seq }))
        );
        s.handle_frame(&frame(&PrimaryMessage::DisconnectAck { ack: seq }), 0)
            .unwrap();
        assert!(outputs(&mut s).contains(&Err(SessionEvent::DisconnectAcked)));
    }

    #[test]
    fn link_loss_fails_pending_listens_and_silences_sends() {
        let mut s = connected();
        let seq = s.listen(request()).unwrap();
        s.handle_link_closed();
        assert_eq!(
            outputs(&mut s),
            [Err(SessionEvent::ListenReply {
                seq,
                result: Err(ENOTCONN)
            })]
        );
        assert_eq!(s.listen(request()), Err(LinkError::Closed));
    }
}
