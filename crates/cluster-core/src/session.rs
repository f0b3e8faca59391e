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
use crate::user::{self, Answer, Arrived, MessageTooLarge, Reassembly, SendError, UserFrame};
use crate::wire::{
    self, Envelope, Errno, HandleId, ListenInfo, ListenRequest, PROTOCOL_VERSION, PrimaryMessage,
    Seq, UserKind, WorkerMessage,
};

/// What the worker's driver is told. `F` is the driver's fd, as it gave it to
/// [`WorkerSession::handle_frame`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SessionEvent<F> {
    /// A handed-off connection. Answer with [`WorkerSession::accept`] or
    /// [`WorkerSession::refuse`] (which takes it back).
    Connection {
        /// Its seq, to name in the answer.
        seq: Seq,
        /// The handle it was accepted on.
        handle: HandleId,
        /// The connection.
        conn: F,
        /// Bytes to read before what is in the socket (another worker read them before it
        /// handed the connection back); empty unless the listener takes prefixes
        /// ([`WorkerSession::takes_prefixes`]).
        prefix: Vec<u8>,
    },
    /// The primary acknowledged [`WorkerSession::exit_after_disconnect`]: close the link and exit.
    DisconnectAcked,
    /// The primary asks this worker to close its listeners, finish its connections and leave.
    DisconnectRequested {
        /// How long it has, from when the primary asked, before it is killed.
        within: Duration,
        /// Other workers stay: idle connections may be handed back
        /// ([`WorkerSession::hand_back`]) rather than closed.
        hand_back: bool,
    },
    /// The answer to [`WorkerSession::listen`]. When the link closes first, the result is
    /// `ENOTCONN`.
    ListenReply {
        /// The request's seq.
        seq: Seq,
        /// The handle or the errno.
        result: Result<ListenInfo, Errno>,
        /// For a shared handle, the listening socket.
        socket: Option<F>,
    },
    /// A user message or request (fragments put back together).
    Message {
        /// The encoded value.
        payload: Vec<u8>,
        /// The fd that came with it.
        fd: Option<F>,
        /// For a request, the number to answer it under ([`WorkerSession::send_answer`]).
        request: Option<Seq>,
    },
    /// The primary answered this worker's request `seq` ([`WorkerSession::send_request`]).
    /// When the link closes first, no answer comes: the driver fails what waits for it.
    Answer {
        /// The request's number.
        seq: Seq,
        /// Its answer.
        answer: Answer,
    },
}

/// What a [`WorkerSession`] asks its driver to do next.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SessionOutput<F> {
    /// Send the frame now in the buffer, with `fd` attached (then closed) if there is one.
    Transmit {
        /// The fd the frame carries: a connection refused or given back, or a user's fd.
        fd: Option<F>,
    },
    /// Tell the user (or the listener).
    Event(SessionEvent<F>),
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
    /// A user request ([`WorkerSession::send_request`]).
    User,
}

enum Queued<F> {
    /// A frame, and the fd it carries.
    Send(WorkerMessage, Option<F>),
    Event(SessionEvent<F>),
}

/// `Errno` for a request that failed because the link closed.
const ENOTCONN: Errno = Errno(107);

/// One worker's side of its link to the primary. `F` is the driver's fd type: the session holds
/// the fds of frames until they are sent or handed to the driver in an event, never by position.
#[derive(Debug)]
pub struct WorkerSession<F> {
    link: Link<Request>,
    handles: BTreeSet<HandleId>,
    /// Handles whose listener takes connections with a prefix.
    prefixed: BTreeSet<HandleId>,
    /// Oldest first; answered in this order.
    offered: VecDeque<Offered>,
    /// The highest accepted connection not acknowledged yet.
    unacked: Option<Seq>,
    /// Connections that ended, as the driver last counted them ([`Self::set_ended`]).
    ended: u64,
    /// The count last sent to the primary.
    ended_sent: u64,
    disconnect_requested: bool,
    /// The primary asked this worker to leave and said it may hand its connections back.
    hand_back_asked: bool,
    /// [`WorkerSession::service_ready`] was sent.
    service_ready: bool,
    reassembly: Reassembly,
    out: VecDeque<Queued<F>>,
}

impl<F> std::fmt::Debug for Queued<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Send(m, _) => write!(f, "Send({m:?})"),
            Self::Event(_) => f.write_str("Event(..)"),
        }
    }
}

impl<F> WorkerSession<F> {
    /// A session for process `pid`; its handshake (`Online`) is the first output.
    pub fn new(pid: u32) -> Self {
        let mut session = Self {
            link: Link::new(),
            handles: BTreeSet::new(),
            prefixed: BTreeSet::new(),
            offered: VecDeque::new(),
            unacked: None,
            ended: 0,
            ended_sent: 0,
            disconnect_requested: false,
            hand_back_asked: false,
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

    /// Refuses the oldest offered connection (`seq`): `conn` goes back to the primary with the
    /// refusal. Offers on its handle pause until [`Self::ready`].
    ///
    /// # Errors
    ///
    /// [`UnknownConnection`] when `seq` is not the oldest connection awaiting an answer; `conn`
    /// comes back with it.
    pub fn refuse(&mut self, seq: Seq, conn: F) -> Result<(), (UnknownConnection, F)> {
        let offered = match self.answer(seq) {
            Ok(offered) => offered,
            Err(error) => return Err((error, conn)),
        };
        if offered.reply {
            // The primary waits for an answer to come: acknowledge what came before.
            self.flush_acks();
        }
        self.send_with(WorkerMessage::Refused { ack: seq }, Some(conn));
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
            self.ended_sent = self.ended;
            let ended = self.ended;
            self.send(WorkerMessage::Accepted { through, ended });
        }
    }

    /// How many connections handed to this worker have ended so far (closed, or taken by an
    /// application that does not say when they end); it travels with the next ack or
    /// heartbeat. Only count connections already [`accepted`](Self::accept): the primary
    /// kills a worker that reports more ended connections than it acked. A count lower than
    /// the last one is ignored.
    pub fn set_ended(&mut self, total: u64) {
        self.ended = self.ended.max(total);
    }

    /// Sends the count of ended connections now if it changed since it was last sent: with the
    /// acks owed if there are any, in a heartbeat otherwise. For handles whose primary schedules
    /// by open connections ([`ListenInfo::report_ends`]).
    pub fn report_ended(&mut self) {
        if self.ended == self.ended_sent || self.link.is_closed() {
            return;
        }
        if self.unacked.is_some() {
            self.flush_acks();
        } else {
            self.ended_sent = self.ended;
            let ended = self.ended;
            self.send(WorkerMessage::Heartbeat { ended });
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

    /// Gives back `conn`, a connection of `handle` that this worker accepted but will not
    /// serve.
    pub fn give_back(&mut self, handle: HandleId, conn: F) {
        // Acked first: the primary settles the handoff before it takes the connection back.
        self.flush_acks();
        self.send_with(WorkerMessage::Return { handle }, Some(conn));
    }

    /// Hands back `conn`, a connection of `handle` this worker served and stopped between two
    /// requests because it is leaving, with `prefix`, the bytes it read and did not use. The
    /// primary gives it to another worker, which reads `prefix` first.
    ///
    /// # Errors
    ///
    /// Gives both back when `prefix` is over [`MAX_PREFIX`](crate::wire::MAX_PREFIX), or the
    /// primary did not ask this worker to hand connections back (it is not leaving, or the
    /// whole cluster stops), or the link is closed: the connection is this worker's to finish.
    pub fn hand_back(
        &mut self,
        handle: HandleId,
        conn: F,
        prefix: Vec<u8>,
    ) -> Result<(), (F, Vec<u8>)> {
        if prefix.len() > wire::MAX_PREFIX || !self.hand_back_asked || self.link.is_closed() {
            return Err((conn, prefix));
        }
        self.flush_acks();
        self.send_with(WorkerMessage::HandBack { handle, prefix }, Some(conn));
        Ok(())
    }

    /// Tells the primary the listener for `handle` takes connections that carry a prefix
    /// ([`SessionEvent::Connection::prefix`]); only the first call per handle sends.
    pub fn takes_prefixes(&mut self, handle: HandleId) {
        if self.handles.contains(&handle) && self.prefixed.insert(handle) {
            self.send(WorkerMessage::TakesPrefixes { handle });
        }
    }

    /// Tells the primary this worker's runtime is alive, with the acks it still owes; call every
    /// [`HEARTBEAT_INTERVAL`](crate::wire::HEARTBEAT_INTERVAL) from a task on that runtime.
    pub fn heartbeat(&mut self) {
        self.flush_acks();
        self.ended_sent = self.ended;
        let ended = self.ended;
        self.send(WorkerMessage::Heartbeat { ended });
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

    /// Queues a user message, with `fd` (its last frame carries it); a payload larger than one
    /// frame is queued as fragments (see [`crate::user`]).
    ///
    /// # Errors
    ///
    /// The payload is over [`MAX_MESSAGE`](crate::user::MAX_MESSAGE); nothing is queued, and
    /// `fd` comes back.
    pub fn send_message(
        &mut self,
        payload: Vec<u8>,
        fd: Option<F>,
    ) -> Result<(), (MessageTooLarge, Option<F>)> {
        self.send_user(UserKind::Message, payload, fd)
    }

    /// Queues a request to the primary and returns its number; the answer comes as
    /// [`SessionEvent::Answer`] with it, unless the link closes first or
    /// [`Self::forget_request`] dropped it.
    ///
    /// # Errors
    ///
    /// The payload is too large, or the link is closed; nothing is queued.
    pub fn send_request(&mut self, payload: Vec<u8>) -> Result<Seq, SendError> {
        user::check_size(payload.len())?;
        let seq = self
            .link
            .start_request(Request::User, None)
            .map_err(|_| SendError::Closed)?;
        self.send_user(UserKind::Request { seq }, payload, None)
            .map_err(|(error, _)| error)?;
        Ok(seq)
    }

    /// Answers the primary's request `ack` ([`SessionEvent::Message`] with `request`).
    ///
    /// # Errors
    ///
    /// A reply's payload is too large; nothing is queued.
    pub fn send_answer(&mut self, ack: Seq, answer: Answer) -> Result<(), MessageTooLarge> {
        let (kind, payload) = answer.into_frame(ack);
        self.send_user(kind, payload, None)
            .map_err(|(error, _)| error)
    }

    /// Nobody waits for the answer to request `seq` any more (it timed out): the answer, if it
    /// comes, is dropped.
    pub fn forget_request(&mut self, seq: Seq) {
        self.link.forget_if(seq, |r| *r == Request::User);
    }

    fn send_user(
        &mut self,
        kind: UserKind,
        payload: Vec<u8>,
        fd: Option<F>,
    ) -> Result<(), (MessageTooLarge, Option<F>)> {
        let envelope = Envelope {
            kind,
            fd: fd.is_some(),
            payload,
        };
        let frames = match user::split(envelope) {
            Ok(frames) => frames,
            Err(error) => return Err((error, fd)),
        };
        let mut fd = fd;
        for frame in frames {
            match frame {
                UserFrame::Fragment(data) => self.send(WorkerMessage::Fragment { data }),
                UserFrame::Last(envelope) => {
                    self.send_with(WorkerMessage::User(envelope), fd.take());
                }
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

    /// A datagram arrived from the primary with `fds`. They go with the resulting event or
    /// frame; dropped otherwise (a frame that carries none, or an error).
    ///
    /// # Errors
    ///
    /// Any [`ProtocolError`]: the primary is broken; close the link and exit.
    pub fn handle_frame(&mut self, frame: &[u8], fds: Vec<F>) -> Result<(), ProtocolError> {
        let message: PrimaryMessage = self.link.receive(frame, fds.len())?;
        // The link checked the count: one fd at most, where the message says.
        let mut fd = fds.into_iter().next();
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
                self.event(SessionEvent::ListenReply {
                    seq: ack,
                    result,
                    socket: fd.take(),
                });
            }
            PrimaryMessage::NewConn {
                seq,
                handle,
                reply,
                prefix,
            } => {
                if self.offered.iter().any(|o| o.seq == seq) {
                    return Err(ProtocolError::DuplicateConnection { seq });
                }
                if !prefix.is_empty() && !self.prefixed.contains(&handle) {
                    return Err(ProtocolError::UnexpectedPrefix { seq });
                }
                let conn = fd.take().ok_or(ProtocolError::UnexpectedFds {
                    expected: 1,
                    got: 0,
                })?;
                if self.handles.contains(&handle) && !self.disconnect_requested {
                    self.offered.push_back(Offered { seq, reply });
                    self.event(SessionEvent::Connection {
                        seq,
                        handle,
                        conn,
                        prefix,
                    });
                } else {
                    // Refused at once: it goes back as it came.
                    if reply {
                        self.flush_acks();
                    }
                    self.send_with(WorkerMessage::Refused { ack: seq }, Some(conn));
                }
            }
            PrimaryMessage::Disconnect {
                within_ms,
                hand_back,
            } => {
                self.disconnect_requested = true;
                self.hand_back_asked = hand_back;
                self.event(SessionEvent::DisconnectRequested {
                    within: Duration::from_millis(within_ms),
                    hand_back,
                });
            }
            PrimaryMessage::DisconnectAck { ack } => {
                self.link
                    .finish_request_if(ack, |r| *r == Request::ExitedAfterDisconnect)?;
                self.event(SessionEvent::DisconnectAcked);
            }
            PrimaryMessage::User(envelope) => {
                let envelope = self.reassembly.complete(envelope)?;
                let fd = if envelope.fd { fd.take() } else { None };
                let event = match Arrived::from_envelope(envelope) {
                    Arrived::Message { payload, request } => SessionEvent::Message {
                        payload,
                        fd,
                        request,
                    },
                    Arrived::Answer { seq, answer } => {
                        match self.link.finish_request_if(seq, |r| *r == Request::User) {
                            Ok(_) => SessionEvent::Answer { seq, answer },
                            // Its waiter gave up ([`Self::forget_request`]).
                            Err(LinkError::DuplicateAck { .. }) => return Ok(()),
                            Err(error) => return Err(error.into()),
                        }
                    }
                };
                self.event(event);
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
                    socket: None,
                });
            }
        }
        self.offered.clear();
    }

    /// The next thing to do. For [`SessionOutput::Transmit`] the frame is written to `buf`
    /// (cleared first).
    #[must_use]
    pub fn poll_output(&mut self, buf: &mut Vec<u8>) -> Option<SessionOutput<F>> {
        loop {
            match self.out.pop_front()? {
                Queued::Event(event) => return Some(SessionOutput::Event(event)),
                // Never sent: its fd is dropped with it.
                Queued::Send(_, _) if self.link.is_closed() => continue,
                Queued::Send(message, fd) => {
                    buf.clear();
                    wire::encode(&message, buf).expect("queued frames fit in MAX_FRAME");
                    return Some(SessionOutput::Transmit { fd });
                }
            }
        }
    }

    fn send(&mut self, message: WorkerMessage) {
        self.out.push_back(Queued::Send(message, None));
    }

    fn send_with(&mut self, message: WorkerMessage, fd: Option<F>) {
        self.out.push_back(Queued::Send(message, fd));
    }

    fn event(&mut self, event: SessionEvent<F>) {
        self.out.push_back(Queued::Event(event));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::{BoundAddr, Distribution, ListenFlags, ListenTarget, SocketKind};

    /// The tests' fds: numbers.
    type S = WorkerSession<u32>;

    fn outputs(s: &mut S) -> Vec<Result<WorkerMessage, SessionEvent<u32>>> {
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

    fn connected() -> S {
        let mut s = S::new(77);
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
            vec![],
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

    fn listening(s: &mut S) -> HandleId {
        let seq = s.listen(request()).unwrap();
        outputs(s);
        let handle = HandleId::new(3);
        let info = ListenInfo {
            handle,
            addr: BoundAddr::Ip("127.0.0.1:5555".parse().unwrap()),
            distribution: Distribution::RoundRobin,
            report_ends: false,
        };
        s.handle_frame(
            &frame(&PrimaryMessage::ListenReply {
                ack: seq,
                result: Ok(info.clone()),
            }),
            vec![],
        )
        .unwrap();
        assert_eq!(
            outputs(s),
            [Err(SessionEvent::ListenReply {
                seq,
                result: Ok(info),
                socket: None
            })]
        );
        handle
    }

    #[test]
    fn primary_must_say_hello_first_with_our_version() {
        let mut s = S::new(1);
        let err = s
            .handle_frame(
                &frame(&PrimaryMessage::Disconnect {
                    within_ms: 5_000,
                    hand_back: false,
                }),
                vec![],
            )
            .unwrap_err();
        assert_eq!(err, ProtocolError::Link(LinkError::HandshakeExpected));
        let mut s = S::new(1);
        let err = s
            .handle_frame(&frame(&PrimaryMessage::Hello { version: 999 }), vec![])
            .unwrap_err();
        assert!(matches!(
            err,
            ProtocolError::Link(LinkError::VersionMismatch { theirs: 999, .. })
        ));
    }

    #[test]
    fn a_future_primary_is_a_version_mismatch_not_garbage() {
        let mut s = S::new(1);
        // The next version's Hello with one more field.
        let next = u8::try_from(PROTOCOL_VERSION + 1).unwrap();
        let err = s.handle_frame(&[0, next, 7], vec![]).unwrap_err();
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
            prefix: Vec::new(),
        })
    }

    #[test]
    fn connections_are_offered_once_and_answered_once_in_order() {
        let mut s = connected();
        let handle = listening(&mut s);
        let (one, two) = (Seq::new(1), Seq::new(2));
        s.handle_frame(&new_conn(1, handle, true), vec![1]).unwrap();
        s.handle_frame(&new_conn(2, handle, true), vec![2]).unwrap();
        assert_eq!(
            outputs(&mut s),
            [
                Err(SessionEvent::Connection {
                    seq: one,
                    handle,
                    conn: 1,
                    prefix: Vec::new()
                }),
                Err(SessionEvent::Connection {
                    seq: two,
                    handle,
                    conn: 2,
                    prefix: Vec::new()
                })
            ]
        );
        let dup = s.handle_frame(&new_conn(1, handle, true), vec![1]);
        assert_eq!(dup, Err(ProtocolError::DuplicateConnection { seq: one }));
        assert_eq!(s.accept(two), Err(UnknownConnection(two)));
        s.accept(one).unwrap();
        assert_eq!(s.accept(one), Err(UnknownConnection(one)));
        assert_eq!(
            outputs(&mut s),
            [Ok(WorkerMessage::Accepted {
                through: one,
                ended: 0
            })]
        );
        s.refuse(two, 2).unwrap();
        assert_eq!(s.refuse(two, 2), Err((UnknownConnection(two), 2)));
        let mut buf = Vec::new();
        assert_eq!(
            s.poll_output(&mut buf),
            Some(SessionOutput::Transmit { fd: Some(2) })
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
            s.handle_frame(&new_conn(seq, handle, false), vec![seq as u32])
                .unwrap();
            outputs(&mut s);
            s.accept(Seq::new(seq)).unwrap();
        }
        assert_eq!(outputs(&mut s), [], "no ack was asked for");
        // Asked with a refusal: the acks owed go first, then the refusal.
        s.handle_frame(&new_conn(4, handle, true), vec![4]).unwrap();
        outputs(&mut s);
        s.refuse(Seq::new(4), 4).unwrap();
        assert_eq!(
            outputs(&mut s),
            [
                Ok(WorkerMessage::Accepted {
                    through: Seq::new(3),
                    ended: 0
                }),
                Ok(WorkerMessage::Refused { ack: Seq::new(4) })
            ]
        );
        // Unasked acks ride the heartbeat, and the leaving announcement.
        s.handle_frame(&new_conn(5, handle, false), vec![5])
            .unwrap();
        outputs(&mut s);
        s.accept(Seq::new(5)).unwrap();
        s.heartbeat();
        s.heartbeat();
        assert_eq!(
            outputs(&mut s),
            [
                Ok(WorkerMessage::Accepted {
                    through: Seq::new(5),
                    ended: 0
                }),
                Ok(WorkerMessage::Heartbeat { ended: 0 }),
                Ok(WorkerMessage::Heartbeat { ended: 0 })
            ]
        );
        s.handle_frame(&new_conn(6, handle, false), vec![6])
            .unwrap();
        outputs(&mut s);
        s.accept(Seq::new(6)).unwrap();
        let leaving = s.exit_after_disconnect().unwrap();
        assert_eq!(
            outputs(&mut s),
            [
                Ok(WorkerMessage::Accepted {
                    through: Seq::new(6),
                    ended: 0
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
        s.handle_frame(&new_conn(4, handle, false), vec![4])
            .unwrap();
        assert_eq!(
            outputs(&mut s),
            [
                Ok(WorkerMessage::Close { handle }),
                Ok(WorkerMessage::Refused { ack: Seq::new(4) })
            ]
        );
        // The connection goes back as it came.
        s.handle_frame(&new_conn(5, handle, false), vec![5])
            .unwrap();
        let mut buf = Vec::new();
        assert_eq!(
            s.poll_output(&mut buf),
            Some(SessionOutput::Transmit { fd: Some(5) })
        );
    }

    #[test]
    fn newconn_without_its_fd_is_a_protocol_error() {
        let mut s = connected();
        let handle = listening(&mut s);
        let err = s.handle_frame(&new_conn(1, handle, true), vec![]);
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
            s.handle_frame(&frame(&reply), vec![]),
            Err(ProtocolError::Link(LinkError::WrongReply { ack: seq }))
        );
        s.handle_frame(&frame(&PrimaryMessage::DisconnectAck { ack: seq }), vec![])
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
                result: Err(ENOTCONN),
                socket: None
            })]
        );
        assert_eq!(s.listen(request()), Err(LinkError::Closed));
    }

    fn user(kind: UserKind, payload: &[u8]) -> Vec<u8> {
        frame(&PrimaryMessage::User(Envelope {
            kind,
            fd: false,
            payload: payload.to_vec(),
        }))
    }

    #[test]
    fn a_request_is_numbered_in_the_link_and_answered_once() {
        let mut s = connected();
        let listen = s.listen(request()).unwrap();
        let seq = s.send_request(b"ping".to_vec()).unwrap();
        assert_ne!(seq, listen, "one numbering for every request on the link");
        outputs(&mut s);
        // A listen reply naming the user request, and a user answer naming the listen, are
        // answers of the wrong kind.
        let wrong = PrimaryMessage::ListenReply {
            ack: seq,
            result: Err(Errno::EINVAL),
        };
        assert_eq!(
            s.handle_frame(&frame(&wrong), vec![]),
            Err(ProtocolError::Link(LinkError::WrongReply { ack: seq }))
        );
        assert_eq!(
            s.handle_frame(&user(UserKind::Reply { ack: listen }, b""), vec![]),
            Err(ProtocolError::Link(LinkError::WrongReply { ack: listen }))
        );
        s.handle_frame(&user(UserKind::Reply { ack: seq }, b"pong"), vec![])
            .unwrap();
        assert_eq!(
            outputs(&mut s),
            [Err(SessionEvent::Answer {
                seq,
                answer: Answer::Reply(b"pong".to_vec())
            })]
        );
        // Again: late, dropped. Never issued: a broken primary.
        s.handle_frame(&user(UserKind::Refusal { ack: seq }, b"x"), vec![])
            .unwrap();
        assert_eq!(outputs(&mut s), []);
        let never = Seq::new(1000);
        assert_eq!(
            s.handle_frame(&user(UserKind::Reply { ack: never }, b""), vec![]),
            Err(ProtocolError::Link(LinkError::UnknownAck { ack: never }))
        );
    }

    #[test]
    fn a_forgotten_request_drops_its_answer_and_a_closed_link_sends_none() {
        let mut s = connected();
        let seq = s.send_request(vec![1]).unwrap();
        outputs(&mut s);
        s.forget_request(seq);
        s.handle_frame(&user(UserKind::Reply { ack: seq }, b"late"), vec![])
            .unwrap();
        assert_eq!(outputs(&mut s), []);
        s.handle_link_closed();
        assert_eq!(s.send_request(vec![1]), Err(SendError::Closed));
        assert!(matches!(
            S::new(1).send_request(vec![0; user::MAX_MESSAGE + 1]),
            Err(SendError::TooLarge(_))
        ));
    }
}
