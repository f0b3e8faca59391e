//! The worker's driver task: reads frames from the primary, answers handoffs, and carries out
//! what the worker's handles ask.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

use proto::wire::{BoundAddr, Distribution, ListenInfo, ListenRequest};
use proto::{HandleId, Seq, SessionEvent, SessionOutput, WorkerSession};
use tokio::sync::{mpsc, oneshot, watch};

use super::queue::{Conn, HandoffQueue, Offer};
use super::{Ended, Holds, LinkState};
use crate::ipc::{Channel, Received};
use crate::message::{Answer, Message, ReplySender, Waiters};

pub(crate) enum Command {
    Listen {
        request: ListenRequest,
        reply: oneshot::Sender<io::Result<Granted>>,
    },
    Close {
        handle: HandleId,
    },
    Ready {
        handle: HandleId,
    },
    ServiceReady,
    GiveBack {
        handle: HandleId,
        conns: Vec<Conn>,
    },
    HandBack {
        handle: HandleId,
        conn: OwnedFd,
        unread: Vec<u8>,
    },
    TakesPrefixes {
        handle: HandleId,
    },
    Send {
        payload: Vec<u8>,
        fd: Option<OwnedFd>,
    },
    Request {
        payload: Vec<u8>,
        reply: ReplySender,
    },
    Answer {
        ack: Seq,
        answer: Answer,
    },
    Disconnect {
        reply: oneshot::Sender<io::Result<()>>,
    },
    /// Answered once everything queued before it is in the link's buffer.
    Flush {
        reply: oneshot::Sender<()>,
    },
}

/// What a successful listen gives the listener.
pub(crate) enum Granted {
    /// Connections come through `queue`.
    RoundRobin {
        handle: HandleId,
        addr: BoundAddr,
        queue: Arc<HandoffQueue>,
        /// The primary wants ended connections reported at once.
        report_ends: bool,
    },
    /// The primary's socket itself.
    Shared {
        handle: HandleId,
        addr: BoundAddr,
        socket: OwnedFd,
    },
}

pub(crate) struct Driver {
    channel: Channel,
    session: WorkerSession<OwnedFd>,
    commands: mpsc::UnboundedReceiver<Command>,
    /// For answers to requests from the primary (weak: the driver must not keep itself alive).
    answers: mpsc::WeakUnboundedSender<Command>,
    shutdown: watch::Sender<bool>,
    link: watch::Sender<LinkState>,
    /// When the primary kills this worker, once it asked it to leave.
    deadline: Arc<OnceLock<tokio::time::Instant>>,
    /// Set when the primary asks this worker to leave while others stay.
    hand_back: Arc<AtomicBool>,
    messages: mpsc::UnboundedSender<Message>,
    /// Who keeps the link open once this worker is leaving.
    holds: watch::Receiver<Holds>,
    /// Connections that ended, reported to the primary.
    ended: Arc<Ended>,
    listens: HashMap<Seq, oneshot::Sender<io::Result<Granted>>>,
    queues: HashMap<HandleId, Arc<HandoffQueue>>,
    /// Who waits for answers to this worker's requests.
    waiters: Waiters,
    /// Waiting for the primary to acknowledge this worker's leaving (`Some` once it announced
    /// it).
    leaving: Option<Vec<oneshot::Sender<io::Result<()>>>>,
    /// This worker left on purpose and the primary acknowledged: the link closes once its
    /// connections are done (`holds`).
    acked: bool,
    /// Acknowledged and done: the link closes now.
    left: bool,
    flushes: Vec<oneshot::Sender<()>>,
    outgoing: VecDeque<(Vec<u8>, Option<OwnedFd>)>,
    buf: Vec<u8>,
}

impl Driver {
    pub(crate) fn new(
        channel: Channel,
        commands: mpsc::UnboundedReceiver<Command>,
        answers: mpsc::WeakUnboundedSender<Command>,
        shutdown: watch::Sender<bool>,
        link: watch::Sender<LinkState>,
        deadline: Arc<OnceLock<tokio::time::Instant>>,
        messages: mpsc::UnboundedSender<Message>,
    ) -> Self {
        Self {
            channel,
            session: WorkerSession::new(std::process::id()),
            commands,
            answers,
            shutdown,
            link,
            deadline,
            hand_back: Arc::new(AtomicBool::new(false)),
            messages,
            holds: watch::Sender::new(Holds::default()).subscribe(),
            ended: Arc::default(),
            listens: HashMap::new(),
            queues: HashMap::new(),
            waiters: Waiters::default(),
            leaving: None,
            acked: false,
            left: false,
            flushes: Vec::new(),
            outgoing: VecDeque::new(),
            buf: Vec::new(),
        }
    }

    /// Who keeps the link open once this worker is leaving ([`super::Worker::hold_link`]).
    pub(crate) fn with_holds(mut self, holds: watch::Receiver<Holds>) -> Self {
        self.holds = holds;
        self
    }

    /// Where to say that idle connections may be handed back ([`super::Worker::hand_back_wanted`]).
    pub(crate) fn with_hand_back(mut self, hand_back: Arc<AtomicBool>) -> Self {
        self.hand_back = hand_back;
        self
    }

    /// The count of ended connections the listeners keep.
    pub(crate) fn with_ended(mut self, ended: Arc<Ended>) -> Self {
        self.ended = ended;
        self
    }

    pub(crate) async fn run(mut self) {
        let mut fds = Vec::new();
        // On this worker's runtime: if user code blocks it, the heartbeats stop and the primary
        // notices.
        let mut heartbeat = tokio::time::interval(proto::wire::HEARTBEAT_INTERVAL);
        heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let ended = self.ended.clone();
        loop {
            // Only connections the session accepted already are counted (a listener gets them
            // after the driver answered the handoff), so every frame that carries the count
            // follows their acks.
            self.session.set_ended(ended.total());
            self.pump();
            if let Err(error) = self.send_all().await {
                tracing::debug!(%error, "link to the primary broke");
                break;
            }
            for flushed in self.flushes.drain(..) {
                let _ = flushed.send(());
            }
            if self.left {
                break;
            }
            let mut holds = self.holds.clone();
            tokio::select! {
                received = self.channel.recv(&mut fds) => match received {
                    Ok(Received::Frame { len }) => {
                        let fds = std::mem::take(&mut fds);
                        if let Err(error) = self.session.handle_frame(self.channel.frame(len), fds) {
                            tracing::error!(%error, "the primary broke the protocol; leaving");
                            break;
                        }
                    }
                    Ok(Received::Truncated) => {
                        tracing::error!("truncated frame from the primary; leaving");
                        break;
                    }
                    Ok(Received::Closed) | Err(_) => break,
                },
                command = self.commands.recv() => match command {
                    Some(command) => self.command(command),
                    None => break,
                },
                _ = heartbeat.tick() => self.session.heartbeat(),
                // Connections of a handle whose primary counts them ended: one frame for all
                // that ended since the last.
                () = ended.changed.notified() => {
                    self.session.set_ended(ended.total());
                    self.session.report_ended();
                }
                // Its connections are done (every `LinkHold` dropped): the link closes, which
                // is the primary's `Disconnect`.
                Ok(_) = holds.wait_for(Holds::released), if self.acked => {
                    // What the servers asked before they let go goes first (connections
                    // handed back, above all).
                    while let Ok(command) = self.commands.try_recv() {
                        self.command(command);
                    }
                    self.left = true;
                }
            }
        }
        self.link_closed();
    }

    /// Acts on the session's outputs.
    fn pump(&mut self) {
        while let Some(output) = self.session.poll_output(&mut self.buf) {
            match output {
                SessionOutput::Transmit { fd } => self.outgoing.push_back((self.buf.clone(), fd)),
                SessionOutput::Event(event) => self.event(event),
            }
        }
    }

    async fn send_all(&mut self) -> io::Result<()> {
        while let Some((frame, fd)) = self.outgoing.pop_front() {
            self.channel
                .send(&frame, fd.as_ref().map(AsFd::as_fd))
                .await?;
        }
        Ok(())
    }

    fn event(&mut self, event: SessionEvent<OwnedFd>) {
        match event {
            SessionEvent::ListenReply {
                seq,
                result,
                socket,
            } => {
                let granted = result
                    .map_err(|errno| {
                        super::bind_refused(errno.0);
                        io::Error::from_raw_os_error(errno.0)
                    })
                    .and_then(|info| self.grant(info, socket));
                let handle = granted.as_ref().ok().map(Granted::handle);
                let delivered = match self.listens.remove(&seq) {
                    Some(reply) => reply.send(granted).is_ok(),
                    None => false,
                };
                match (handle, delivered) {
                    (Some(handle), true) => self.session.listening(handle),
                    // The bind was cancelled before the answer came: give the handle back.
                    (Some(handle), false) => self.close(handle),
                    (None, _) => {}
                }
            }
            // Answered in the order offered, so answering cannot fail.
            SessionEvent::Connection {
                seq,
                handle,
                conn,
                prefix,
            } => match self.deliver(handle, (conn, prefix)) {
                Ok(()) => {
                    let _ = self.session.accept(seq);
                }
                Err(conn) => {
                    let _ = self.session.refuse(seq, conn);
                }
            },
            SessionEvent::Message {
                payload,
                fd,
                request,
            } => self.message(payload, fd, request),
            SessionEvent::Answer { seq, answer } => self.waiters.answer(seq, answer),
            // As Node's workers: close every listener (announced at once, so that the primary
            // knows every handoff is settled), then the link once the connections are done.
            SessionEvent::DisconnectRequested { within, hand_back } => {
                let _ = self.deadline.set(tokio::time::Instant::now() + within);
                // Before the listeners stop: whoever sees the shutdown sees this too.
                self.hand_back.store(hand_back, Ordering::Release);
                self.leave(None);
            }
            SessionEvent::DisconnectAcked => {
                self.acked = true;
                for reply in self.leaving.take().into_iter().flatten() {
                    let _ = reply.send(Ok(()));
                }
            }
        }
    }

    fn grant(&mut self, info: ListenInfo, socket: Option<OwnedFd>) -> io::Result<Granted> {
        let handle = info.handle;
        let addr = info.addr;
        let granted = match info.distribution {
            Distribution::RoundRobin => {
                let queue = Arc::new(HandoffQueue::default());
                self.queues.insert(handle, queue.clone());
                Ok(Granted::RoundRobin {
                    handle,
                    addr,
                    queue,
                    report_ends: info.report_ends,
                })
            }
            Distribution::Shared => socket
                .ok_or_else(|| {
                    io::Error::new(io::ErrorKind::InvalidData, "shared listener without its fd")
                })
                .map(|socket| Granted::Shared {
                    handle,
                    addr,
                    socket,
                }),
        };
        if granted.is_err() {
            self.close(handle);
        }
        granted
    }

    /// A user message or request from the primary.
    fn message(&self, payload: Vec<u8>, fd: Option<OwnedFd>, request: Option<Seq>) {
        let answers = self.answers.clone();
        let responder = request.map(|seq| -> crate::message::Responder {
            Box::new(move |answer| {
                answers
                    .upgrade()
                    .and_then(|tx| tx.send(Command::Answer { ack: seq, answer }).ok())
                    .ok_or_else(super::not_connected)
            })
        });
        let _ = self.messages.send(Message::new(payload, fd, responder));
    }

    /// Hands a connection to its listener; gives it back if the listener is full or gone (it
    /// goes back to the primary, which offers it elsewhere and offers this worker nothing more
    /// until `Ready`).
    fn deliver(&mut self, handle: HandleId, conn: Conn) -> Result<(), OwnedFd> {
        let Some(queue) = self.queues.get(&handle) else {
            return Err(conn.0);
        };
        match queue.offer(conn) {
            Offer::Taken => Ok(()),
            Offer::Full(conn) => Err(conn),
            Offer::Closed(conn) => {
                self.close(handle);
                Err(conn)
            }
        }
    }

    /// Gives connections of `handle` back to the primary, to be served by another worker; one
    /// that came with a prefix goes back with it.
    fn give_back(&mut self, handle: HandleId, conns: Vec<Conn>) {
        for (conn, prefix) in conns {
            if prefix.is_empty() {
                self.session.give_back(handle, conn);
            } else if self.session.hand_back(handle, conn, prefix).is_err() {
                // Its bytes can only go back with a hand-back, which the primary did not ask
                // for (the whole cluster stops): it is closed here, its request lost with it.
                tracing::debug!(%handle, "a connection with unread bytes closed unserved");
            }
        }
    }

    /// Closes this worker's listener on `handle`; what it never accepted goes back first.
    fn close(&mut self, handle: HandleId) {
        if let Some(queue) = self.queues.remove(&handle) {
            let unaccepted = queue.close();
            self.give_back(handle, unaccepted);
        }
        self.session.close(handle);
    }

    /// Resolves `shutdown()` and stops every listener: in that order, so that a listener that
    /// ends finds `shutdown()` resolved (see `net::stopped`).
    fn stop_serving(&mut self) {
        self.shutdown.send_replace(true);
        let handles: Vec<_> = self.session.handles().collect();
        for handle in handles {
            self.close(handle);
        }
    }

    fn command(&mut self, command: Command) {
        match command {
            Command::Listen { request, reply } => {
                if *self.shutdown.borrow() {
                    let _ = reply.send(Err(io::Error::new(
                        io::ErrorKind::NotConnected,
                        "worker is shutting down",
                    )));
                    return;
                }
                match self.session.listen(request) {
                    Ok(seq) => {
                        self.listens.insert(seq, reply);
                    }
                    Err(_) => {
                        let _ = reply.send(Err(io::Error::from(io::ErrorKind::NotConnected)));
                    }
                }
            }
            Command::Close { handle } => self.close(handle),
            Command::Ready { handle } => self.session.ready(handle),
            Command::ServiceReady => self.session.service_ready(),
            Command::GiveBack { handle, conns } => self.give_back(handle, conns),
            Command::HandBack {
                handle,
                conn,
                unread,
            } => {
                // The caller checked the bound; past it, or with the link closed, the
                // connection is closed here.
                if self.session.hand_back(handle, conn, unread).is_err() {
                    tracing::debug!(%handle, "connection not handed back; closed");
                }
            }
            Command::TakesPrefixes { handle } => self.session.takes_prefixes(handle),
            Command::Send { payload, fd } => {
                // Sizes were checked when the value was encoded.
                if let Err((error, _fd)) = self.session.send_message(payload, fd) {
                    tracing::warn!(%error, "message to the primary not sent");
                }
            }
            // Not sent (the link is closed): the reply sender is dropped, which fails the
            // request at once.
            Command::Request { payload, reply } => {
                if let Ok(seq) = self.session.send_request(payload) {
                    for gone in self.waiters.insert(seq, reply) {
                        self.session.forget_request(gone);
                    }
                }
            }
            Command::Answer { ack, answer } => {
                if let Err(error) = self.session.send_answer(ack, answer) {
                    tracing::warn!(%error, "answer to the primary not sent");
                }
            }
            Command::Disconnect { reply } => self.leave(Some(reply)),
            Command::Flush { reply } => self.flushes.push(reply),
        }
    }

    /// Stops serving and announces leaving (once); `reply` is answered when the primary
    /// acknowledged it.
    fn leave(&mut self, reply: Option<oneshot::Sender<io::Result<()>>>) {
        self.stop_serving();
        if self.acked {
            // Left already; the link waits for the connections, not for another answer.
            if let Some(reply) = reply {
                let _ = reply.send(Ok(()));
            }
            return;
        }
        if let Some(waiting) = &mut self.leaving {
            waiting.extend(reply);
            return;
        }
        match self.session.exit_after_disconnect() {
            Ok(_) => self.leaving = Some(reply.into_iter().collect()),
            Err(_) => {
                if let Some(reply) = reply {
                    let _ = reply.send(Err(io::Error::from(io::ErrorKind::NotConnected)));
                }
            }
        }
    }

    fn link_closed(mut self) {
        // Before the listeners end (see `stop_serving`).
        self.shutdown.send_replace(true);
        self.session.handle_link_closed();
        self.pump();
        for (_, queue) in self.queues.drain() {
            // The link is gone: there is nobody to give them back to.
            drop(queue.close());
        }
        for (_, reply) in self.listens.drain() {
            let _ = reply.send(Err(io::Error::from(io::ErrorKind::NotConnected)));
        }
        for reply in self.leaving.take().into_iter().flatten() {
            let _ = reply.send(Err(io::Error::from(io::ErrorKind::NotConnected)));
        }
        if self.left {
            // Everything asked before them went out before the farewell.
            for flushed in self.flushes.drain(..) {
                let _ = flushed.send(());
            }
        }
        self.link.send_replace(if self.left {
            LinkState::Left
        } else {
            LinkState::Lost
        });
        self.shutdown.send_replace(true);
        if !self.left {
            // The primary went away (or dropped us): like Node's workers, leave. A short grace
            // lets in-flight requests finish; PDEATHSIG covers a blocked runtime.
            tokio::spawn(async {
                tokio::time::sleep(super::ORPHAN_GRACE).await;
                std::process::exit(0);
            });
        }
    }
}

impl Granted {
    pub(crate) fn handle(&self) -> HandleId {
        match self {
            Self::RoundRobin { handle, .. } | Self::Shared { handle, .. } => *handle,
        }
    }
}
