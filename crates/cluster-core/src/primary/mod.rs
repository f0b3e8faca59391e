//! The primary's side of the protocol: every worker's link and lifecycle, and the registry.

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

use crate::error::ProtocolError;
use crate::key::HandleKey;
use crate::lifecycle::{ExitStatus, KillReason, Lifecycle, Transition, WorkerState};
use crate::link::{Link, LinkError};
use crate::registry::{Registry, RegistryConfig, RegistryError, RegistryOutput};
use crate::user::{self, Answer, Arrived, MessageTooLarge, Reassembly, SendError, UserFrame};
use crate::wire::{
    self, BoundAddr, Distribution, Envelope, Errno, HandleId, ListenInfo, ListenRequest,
    PROTOCOL_VERSION, PrimaryMessage, Seq, UserKind, WorkerId, WorkerMessage,
};

/// Settings of the primary's core.
#[derive(Clone, Copy, Debug)]
#[non_exhaustive]
pub struct Config {
    /// The registry's policy and bounds.
    pub registry: RegistryConfig,
    /// How long a worker may take to ack a handed-off connection before it is presumed hung and
    /// killed. Acks that were not asked for may wait for the worker's next heartbeat, so the
    /// deadline is this plus [`HEARTBEAT_INTERVAL`](crate::wire::HEARTBEAT_INTERVAL).
    pub handoff_timeout: Duration,
    /// How long a worker may stay silent (no heartbeat, no frame) after its handshake before it
    /// is presumed hung and killed; `None` disables the check.
    pub heartbeat_timeout: Option<Duration>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            registry: RegistryConfig::default(),
            handoff_timeout: Duration::from_secs(10),
            heartbeat_timeout: Some(Duration::from_secs(30)),
        }
    }
}

/// What an fd that came with a worker's frame is, as the driver finds it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FdKind {
    /// A stream socket of the IP or Unix family: what a connection given back must be.
    Connection,
    /// Anything else.
    Other,
}

/// What travels with a transmitted frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Attachment<C> {
    /// The accepted connection `conn`, handed over as handoff `seq`. Once the frame is sent,
    /// the driver closes its copy of the fd but keeps the token: the connection is in the
    /// worker's receive queue, and the driver may get it back from there
    /// ([`Primary::handle_read_back`]) until the core settles the token with
    /// [`Output::Delivered`] or [`Output::Close`]. A frame never sent gives it back with
    /// [`Primary::handle_reclaimed`]`(worker, seq)`.
    Conn {
        /// The connection's token.
        conn: C,
        /// Its handoff's sequence number.
        seq: Seq,
    },
    /// The listening socket of a shared handle.
    Listener(HandleId),
    /// An fd the user sends with a message, held by the driver under `C`: close it once the frame
    /// is sent. If the frame is never sent, an [`Output::Close`] of it comes instead.
    Owned(C),
}

/// A frame to send; its bytes were written to the buffer given to [`Primary::poll_output`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Transmit<C> {
    /// The receiving worker.
    pub worker: WorkerId,
    /// The fd to attach, if any.
    pub attachment: Option<Attachment<C>>,
}

/// Something that happened to a worker, in Node's order (`Fork`, `Online`, `Listening`,
/// `Message`…, `Disconnect`, `Exit`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// The worker's runtime sent its handshake.
    Online {
        /// The worker.
        worker: WorkerId,
        /// Its pid, as it reported it.
        pid: u32,
    },
    /// The worker listens on a handle.
    Listening {
        /// The worker.
        worker: WorkerId,
        /// The handle.
        handle: HandleId,
        /// Its key.
        key: HandleKey,
        /// Where it is bound.
        addr: BoundAddr,
    },
    /// A user message or request (with its fragments put back together).
    Message {
        /// The sender.
        worker: WorkerId,
        /// The encoded value.
        payload: Vec<u8>,
        /// The fd that came with the frame is part of it (the driver closes it otherwise).
        fd: bool,
        /// For a request, the number to answer it under ([`Primary::send_answer`]).
        request: Option<Seq>,
    },
    /// The worker answered the primary's request `seq` ([`Primary::send_request`]).
    Answer {
        /// The worker.
        worker: WorkerId,
        /// The request's number.
        seq: Seq,
        /// Its answer.
        answer: Answer,
    },
    /// The worker's application declared itself ready to serve (once per worker).
    Ready {
        /// The worker.
        worker: WorkerId,
    },
    /// The worker's link closed ([`Primary::handle_link_closed`]).
    Disconnect {
        /// The worker.
        worker: WorkerId,
    },
    /// The worker's process ended (always after its `Disconnect`).
    Exit {
        /// The worker.
        worker: WorkerId,
        /// How it ended.
        status: ExitStatus,
        /// Whether it left on purpose (a disconnect), as Node's `exitedAfterDisconnect`.
        exited_after_disconnect: bool,
        /// Why the primary killed it, if it did.
        killed: Option<KillReason>,
    },
    /// The worker broke the protocol; its link is being closed.
    Error {
        /// The worker.
        worker: WorkerId,
        /// What it did.
        error: ProtocolError,
    },
}

/// What the primary's driver must do next.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Output<C> {
    /// Send the frame now in the buffer.
    Transmit(Transmit<C>),
    /// Create the socket for `handle` and report with [`Primary::handle_bound`].
    Bind {
        /// The handle.
        handle: HandleId,
        /// What was asked.
        request: ListenRequest,
        /// Whether the primary accepts on it or shares it.
        distribution: Distribution,
    },
    /// Close the socket of `handle` (and unlink its path).
    Unbind {
        /// The handle.
        handle: HandleId,
    },
    /// Close the connection without serving it (its handle has no worker left).
    Close(C),
    /// A worker acked the connection, or went away after reading it: forget the token (the
    /// driver closed its copy of the fd when it sent it).
    Delivered {
        /// The owner.
        worker: WorkerId,
        /// The connection.
        conn: C,
    },
    /// Drop the copy of `worker`'s end of the link the driver kept to read back what the worker
    /// never read: from now on nothing it leaves unread can be a connection (it left on purpose
    /// and settled every handoff). Its link then reaches end of stream when the worker closes
    /// its end, which is reported as its `Disconnect` (Node's, before the process exits).
    ReleasePeer {
        /// The worker.
        worker: WorkerId,
    },
    /// Drop this worker's link (it broke the protocol): take back what it never read
    /// ([`Primary::handle_reclaimed`]), then report [`Primary::handle_link_closed`] (and
    /// [`Primary::handle_exit`] later).
    CloseLink {
        /// The worker.
        worker: WorkerId,
    },
    /// The frame just handled (a refusal) carried connection `conn` back: the fd that came with
    /// it is `conn` again. Keep it under that token; it is dispatched to another worker next.
    Reclaimed {
        /// The worker that refused it.
        worker: WorkerId,
        /// The connection.
        conn: C,
    },
    /// The frame just handled carried a connection that `worker` gives back on `handle`: keep
    /// its fd under a new token and call [`Primary::handle_returned`] with `prefix`.
    Returned {
        /// The worker giving it back.
        worker: WorkerId,
        /// The handle it belongs to.
        handle: HandleId,
        /// The bytes the worker read from it and did not use, to be read first.
        prefix: Vec<u8>,
        /// The worker served it and handed it back between two requests
        /// ([`WorkerMessage::HandBack`]), rather than giving back one it never served.
        handed_back: bool,
    },
    /// Kill this worker: it is hung. The connections it never read are re-dispatched once its
    /// link closes.
    Kill {
        /// The worker.
        worker: WorkerId,
        /// Why.
        reason: KillReason,
    },
    /// Tell the user.
    Event(Event),
}

enum Queued<C> {
    Send {
        worker: WorkerId,
        message: PrimaryMessage,
        attachment: Option<Attachment<C>>,
    },
    Ready(Output<C>),
}

#[derive(Debug)]
enum Request<C> {
    /// A connection sent to the worker. `reclaimed`: the driver holds its fd again (it never
    /// left, or was read back from the worker's end), so it is dispatched again when the link
    /// closes instead of being counted as the worker's.
    Handoff {
        handle: HandleId,
        conn: C,
        reclaimed: bool,
    },
    /// A user request ([`Primary::send_request`]), answered by the worker's user code.
    User,
}

impl<C> Request<C> {
    /// A handoff the worker may still ack or refuse (one that reached it).
    fn is_live_handoff(&self) -> bool {
        matches!(
            self,
            Self::Handoff {
                reclaimed: false,
                ..
            }
        )
    }

    fn is_handoff(&self) -> bool {
        matches!(self, Self::Handoff { .. })
    }

    fn is_user(&self) -> bool {
        matches!(self, Self::User)
    }
}

/// Per-worker totals since the worker was added.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Counters {
    /// Connections handed to it (`NewConn` sent), re-dispatches included.
    pub handoffs: u64,
    /// Handoffs it acked, or read and then went away with.
    pub delivered: u64,
    /// Handoffs it refused.
    pub refused: u64,
    /// Connections it gave back after acking them (`Return`).
    pub returned: u64,
    /// Connections it served and handed back between two requests as it left (`HandBack`).
    pub handed_back: u64,
    /// Connections it reported ended.
    pub ended: u64,
}

#[derive(Debug)]
struct WorkerEntry<C> {
    lifecycle: Lifecycle,
    link: Link<Request<C>>,
    pid: Option<u32>,
    /// Asked to disconnect or announced leaving: no new listens.
    leaving: bool,
    /// Announced leaving and was answered (`DisconnectAck` queued): it reads nothing more that
    /// matters once its handoffs are settled.
    farewell_answered: bool,
    /// [`Output::ReleasePeer`] was emitted.
    peer_released: bool,
    /// Told to be killed, and why: it is offered nothing more.
    killed: Option<KillReason>,
    /// Was told it may hand its idle connections back (`Disconnect { hand_back: true }`): the
    /// only time a `HandBack` is accepted from it.
    hand_back_asked: bool,
    /// Declared ready to serve.
    service_ready: bool,
    /// Shut its end of the link for reading ([`Primary::handle_deaf`]).
    deaf: bool,
    /// When a frame last came from it, after its handshake.
    last_seen: Option<Instant>,
    /// When it is killed if its process is still there: the deadline of the primary's
    /// [`Primary::disconnect`]. It holds whether the worker leaves as asked or had announced
    /// leaving on its own; only a link closed or an exit ends it.
    leave_by: Option<Instant>,
    /// Since when the driver holds its frames unread ([`Primary::hold`]): its silence is the
    /// primary's doing, so its heartbeat and handoff deadlines are suspended (not its
    /// disconnect deadline).
    held_since: Option<Instant>,
    /// Broke the protocol: its frames are ignored until the driver closes the link.
    failed: bool,
    /// Handoffs sent since the last one that asked for an immediate ack.
    unasked: usize,
    /// The handles it was handed connections on: the only ones it may hand one back on.
    served: Vec<HandleId>,
    counters: Counters,
    /// A user message arriving in fragments.
    reassembly: Reassembly,
}

impl<C> WorkerEntry<C> {
    /// Whether the primary itself took this worker off its handles (it is leaving, or was told
    /// to be killed): it may still name them in frames already on the wire, a race rather than a
    /// violation.
    fn is_retired(&self) -> bool {
        self.leaving || self.killed.is_some()
    }

    /// The worker leaves on purpose: no new listens, and its exit counts as intended.
    fn leave_on_purpose(&mut self) {
        self.leaving = true;
        self.lifecycle.leaving_on_purpose();
    }
}

/// The primary's core: feed it what happens, drain what to do.
///
/// `C` is the driver's token for an accepted connection (see [`crate::registry::Registry`]).
#[derive(Debug)]
pub struct Primary<C> {
    config: Config,
    registry: Registry<C>,
    workers: BTreeMap<WorkerId, WorkerEntry<C>>,
    next_worker: u64,
    out: VecDeque<Queued<C>>,
    /// The bytes each connection handed back with a prefix carries, until a worker has it.
    prefixes: BTreeMap<C, Vec<u8>>,
}

impl<C> std::fmt::Debug for Queued<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Send {
                worker, message, ..
            } => write!(f, "Send({worker}, {message:?})"),
            Self::Ready(_) => f.write_str("Ready(..)"),
        }
    }
}

impl<C: Copy + Ord + std::fmt::Debug> Primary<C> {
    /// A primary with no workers.
    pub fn new(config: Config) -> Self {
        Self {
            registry: Registry::new(config.registry),
            config,
            workers: BTreeMap::new(),
            next_worker: 1,
            out: VecDeque::new(),
            prefixes: BTreeMap::new(),
        }
    }

    /// Registers a new worker and returns its id (from 1, never reused). The driver spawns the
    /// process with that id; the primary's handshake is queued for it.
    pub fn add_worker(&mut self) -> WorkerId {
        let worker = WorkerId::new(self.next_worker);
        self.next_worker += 1;
        let entry = WorkerEntry {
            lifecycle: Lifecycle::new(),
            link: Link::new(),
            pid: None,
            leaving: false,
            farewell_answered: false,
            peer_released: false,
            killed: None,
            service_ready: false,
            deaf: false,
            last_seen: None,
            leave_by: None,
            held_since: None,
            failed: false,
            unasked: 0,
            served: Vec::new(),
            hand_back_asked: false,
            counters: Counters::default(),
            reassembly: Reassembly::default(),
        };
        self.workers.insert(worker, entry);
        self.send(
            worker,
            PrimaryMessage::Hello {
                version: PROTOCOL_VERSION,
            },
            None,
        );
        worker
    }

    /// The driver could not start `worker`'s process: forget it without reporting events.
    pub fn handle_spawn_failed(&mut self, worker: WorkerId) {
        self.workers.remove(&worker);
        self.out
            .retain(|q| !matches!(q, Queued::Send { worker: w, .. } if *w == worker));
    }

    /// A datagram arrived from `worker` with `fds` file descriptors attached. The driver closes
    /// them after draining the outputs, unless an [`Output::Returned`] claimed the fd.
    pub fn handle_frame(&mut self, now: Instant, worker: WorkerId, frame: &[u8], fds: &[FdKind]) {
        if let Err(error) = self.process_frame(now, worker, frame, fds) {
            self.fail(now, worker, error);
        }
        // A worker that announced leaving, was answered and settled every handoff is offered
        // nothing more: nothing it leaves unread can be a connection.
        if let Some(entry) = self.workers.get_mut(&worker)
            && entry.farewell_answered
            && !entry.link.pending_requests().any(|(_, r)| r.is_handoff())
            && !entry.peer_released
        {
            entry.peer_released = true;
            self.push(Output::ReleasePeer { worker });
        }
    }

    /// A datagram the driver read back from `worker`'s end of the link after the worker went
    /// away (see [`Output::ReleasePeer`]), with `fds` fds. Returns the token to keep the fd under
    /// when it is a handoff the worker never read, still the primary's; `None` otherwise (the
    /// driver closes what came with it). Call before [`Self::handle_link_closed`], which
    /// dispatches those again.
    pub fn handle_read_back(&mut self, worker: WorkerId, frame: &[u8], fds: usize) -> Option<C> {
        match wire::decode::<PrimaryMessage>(frame) {
            Ok(PrimaryMessage::NewConn { seq, .. }) if fds == 1 => self.reclaim(worker, seq),
            _ => None,
        }
    }

    /// The datagram from `worker` was truncated by the receive buffer.
    pub fn handle_truncated(&mut self, now: Instant, worker: WorkerId) {
        self.fail(now, worker, ProtocolError::Truncated);
    }

    /// `worker`'s link is gone (the worker exited, failed, or the link broke), and the driver
    /// took back what the worker never read ([`Self::handle_reclaimed`]). Those connections are
    /// dispatched again; the unacked ones the worker did read went with it (they count as
    /// delivered). Its handles are left, and `Disconnect` (and a held-back `Exit`) reported.
    pub fn handle_link_closed(&mut self, now: Instant, worker: WorkerId) {
        let Some(entry) = self.workers.get_mut(&worker) else {
            return;
        };
        if entry.link.is_closed() {
            return;
        }
        // A `NewConn` still queued here never reached the driver, which holds its fd.
        for queued in &self.out {
            if let Queued::Send {
                worker: to,
                message: PrimaryMessage::NewConn { seq, .. },
                ..
            } = queued
                && *to == worker
                && let Some(Request::Handoff { reclaimed, .. }) = entry.link.pending_mut(*seq)
            {
                *reclaimed = true;
            }
        }
        // User requests are failed by the driver, which drops their waiters with the link.
        for (_, request) in entry.link.close() {
            if let Request::Handoff {
                handle,
                conn,
                reclaimed: false,
            } = request
            {
                entry.counters.delivered += 1;
                // Both books agree on what is in flight, so this cannot fail; if it did, the
                // token would only stay in the registry's books until the handle is forgotten.
                let _ = self.registry.ack(worker, handle, conn, true);
            }
        }
        // The registry dispatches the reclaimed ones again.
        let transitions: Vec<_> = entry.lifecycle.link_closed().collect();
        self.registry.remove_worker(now, worker);
        self.drain_registry(now);
        self.report(worker, transitions);
    }

    /// `worker`'s process exited.
    pub fn handle_exit(&mut self, worker: WorkerId, status: ExitStatus) {
        let Some(entry) = self.workers.get_mut(&worker) else {
            return;
        };
        let transition = entry.lifecycle.exited(status);
        self.report(worker, transition);
    }

    /// The driver finished binding `handle`.
    pub fn handle_bound(
        &mut self,
        now: Instant,
        handle: HandleId,
        result: Result<BoundAddr, Errno>,
    ) {
        self.registry.bound(handle, result);
        self.drain_registry(now);
    }

    /// The driver accepted `conn` on `handle`.
    ///
    /// # Errors
    ///
    /// Hands `conn` back when the handle takes no connections now (check
    /// [`Self::wants_connections`] before accepting); the driver closes it.
    pub fn handle_connection(&mut self, now: Instant, handle: HandleId, conn: C) -> Result<(), C> {
        self.registry.connection(handle, conn)?;
        self.drain_registry(now);
        Ok(())
    }

    /// The driver registered a connection `worker` gave back (after [`Output::Returned`], with
    /// its `prefix`); it goes to another worker first (one that takes prefixes, if `prefix` is
    /// not empty).
    ///
    /// # Errors
    ///
    /// Hands `conn` back when nobody is left to serve it; the driver closes it.
    pub fn handle_returned(
        &mut self,
        now: Instant,
        worker: WorkerId,
        handle: HandleId,
        conn: C,
        prefix: Vec<u8>,
    ) -> Result<(), C> {
        let leaving = self
            .workers
            .get(&worker)
            .is_none_or(|e| e.is_retired() || e.link.is_closed());
        let prefixed = !prefix.is_empty();
        self.registry
            .give_back(worker, handle, conn, leaving, prefixed)?;
        if prefixed {
            self.prefixes.insert(conn, prefix);
        }
        self.drain_registry(now);
        Ok(())
    }

    /// The driver holds the fd of handoff `seq` to `worker` again: its `NewConn` was never sent
    /// (the link hung up or is being dropped; `seq` is in its [`Attachment::Conn`]). Returns the
    /// token to keep it under; `None` when `seq` is not a handoff in flight to `worker` (the
    /// driver closes the fd). Call before [`Self::handle_link_closed`], which dispatches it
    /// again.
    pub fn handle_reclaimed(&mut self, now: Instant, worker: WorkerId, seq: Seq) -> Option<C> {
        let entry = self.workers.get_mut(&worker)?;
        if entry.deaf {
            // Nothing sent to it arrives any more: the handoff is over, as if refused, and the
            // connection goes to another worker now rather than when its link closes.
            let Ok(Request::Handoff { handle, conn, .. }) =
                entry.link.finish_request_if(seq, Request::is_live_handoff)
            else {
                return None;
            };
            entry.counters.refused += 1;
            // Both books agree on what is in flight, so this cannot fail.
            let _ = self.registry.ack(worker, handle, conn, false);
            self.drain_registry(now);
            return Some(conn);
        }
        self.reclaim(worker, seq)
    }

    /// Marks handoff `seq` to a gone worker as the primary's again: dispatched when its link
    /// closes.
    fn reclaim(&mut self, worker: WorkerId, seq: Seq) -> Option<C> {
        match self.workers.get_mut(&worker)?.link.pending_mut(seq)? {
            Request::Handoff {
                conn, reclaimed, ..
            } if !*reclaimed => {
                *reclaimed = true;
                Some(*conn)
            }
            Request::Handoff { .. } | Request::User => None,
        }
    }

    /// `worker` shut its end of the link for reading: nothing sent to it arrives any more, so it
    /// is offered nothing more, and what is taken back from its unsent frames
    /// ([`Self::handle_reclaimed`]) goes to other workers at once. What it sends is still read.
    pub fn handle_deaf(&mut self, now: Instant, worker: WorkerId) {
        let Some(entry) = self.workers.get_mut(&worker) else {
            return;
        };
        entry.deaf = true;
        self.registry.leave_all(worker);
        self.drain_registry(now);
    }

    /// Whether the driver should accept on `handle` now.
    pub fn wants_connections(&self, handle: HandleId) -> bool {
        self.registry.wants_connections(handle)
    }

    /// Time passed: workers that missed a handoff deadline, went silent, or were asked to
    /// disconnect and are still there at the deadline of [`Self::disconnect`] are killed.
    pub fn handle_timeout(&mut self, now: Instant) {
        self.registry.release_kept(Some(now));
        self.drain_registry(now);
        let heartbeat = self.config.heartbeat_timeout;
        let doomed: Vec<_> = self
            .workers
            .iter()
            .filter(|(_, e)| e.killed.is_none())
            .filter_map(|(w, e)| {
                // Until its process exits: a worker that closed its link (or broke the protocol)
                // may still hang. The deadline holds while the driver holds its frames, too.
                if e.leave_by.is_some_and(|by| now >= by) && e.lifecycle.exit_status().is_none() {
                    Some((*w, KillReason::DisconnectTimeout, None))
                } else if e.failed || e.link.is_closed() || e.held_since.is_some() {
                    None
                } else if let Some((seq, _)) = e.link.expired(now).next() {
                    Some((*w, KillReason::HandoffTimeout, Some(seq)))
                } else if let (Some(seen), Some(timeout)) = (e.last_seen, heartbeat)
                    && now.saturating_duration_since(seen) >= timeout
                {
                    Some((*w, KillReason::HeartbeatTimeout, None))
                } else {
                    None
                }
            })
            .collect();
        for (worker, reason, seq) in doomed {
            if let Some(entry) = self.workers.get_mut(&worker) {
                entry.killed = Some(reason);
            }
            // Offered nothing more; its in-flight connections move on when its link closes.
            self.registry.leave_all(worker);
            self.drain_registry(now);
            if let Some(seq) = seq {
                self.push(Output::Event(Event::Error {
                    worker,
                    error: ProtocolError::HandoffTimeout { seq },
                }));
            }
            self.push(Output::Kill { worker, reason });
        }
    }

    /// The driver stops reading `worker`'s link for now (a message from it waits for room in
    /// the user's queue): what it sent is behind that message, so its heartbeats and acks
    /// cannot arrive. Until [`Self::release`], its heartbeat and handoff deadlines are
    /// suspended, so a worker is never presumed hung because the primary did not read it.
    pub fn hold(&mut self, now: Instant, worker: WorkerId) {
        if let Some(entry) = self.workers.get_mut(&worker) {
            entry.held_since.get_or_insert(now);
        }
    }

    /// The driver reads `worker`'s link again: its deadlines resume where they stood when
    /// [`Self::hold`] suspended them (moved later by the time it was held).
    pub fn release(&mut self, now: Instant, worker: WorkerId) {
        let Some(entry) = self.workers.get_mut(&worker) else {
            return;
        };
        let Some(since) = entry.held_since.take() else {
            return;
        };
        let held = now.saturating_duration_since(since);
        entry.last_seen = entry.last_seen.map(|seen| (seen + held).min(now));
        entry.link.postpone(held);
    }

    /// When [`Self::handle_timeout`] should be called next.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let heartbeat = self.config.heartbeat_timeout;
        let leave_by = self
            .workers
            .values()
            .filter(|e| e.killed.is_none() && e.lifecycle.exit_status().is_none())
            .filter_map(|e| e.leave_by);
        self.workers
            .values()
            .filter(|e| {
                e.killed.is_none() && !e.failed && !e.link.is_closed() && e.held_since.is_none()
            })
            .flat_map(|e| {
                [
                    e.link.next_deadline(),
                    e.last_seen.zip(heartbeat).map(|(seen, t)| seen + t),
                ]
            })
            .flatten()
            .chain(leave_by)
            .chain(self.registry.next_release())
            .min()
    }

    /// Closes the listening sockets kept open for the replacements of workers that died, which
    /// no worker listens on now (see [`Registry::remove_worker`]): for a shutdown, so the ports
    /// close before the last worker has drained.
    pub fn release_kept_handles(&mut self, now: Instant) {
        self.registry.release_kept(None);
        self.drain_registry(now);
    }

    /// Asks `worker` to disconnect: it is offered no more connections, its pending listens are
    /// refused, and it is told to close its listeners and leave `within`. The worker is told the
    /// deadline, so that its drain ends before; if its process is still there then,
    /// [`Self::handle_timeout`] emits [`Output::Kill`] with [`KillReason::DisconnectTimeout`],
    /// whoever waits for the exit (or nobody). Returns false if it is already leaving or gone;
    /// a worker that announced leaving on its own is still given the deadline (the earlier
    /// one, if asked twice), though not asked again.
    pub fn disconnect(
        &mut self,
        now: Instant,
        worker: WorkerId,
        within: Duration,
        hand_back: bool,
    ) -> bool {
        let Some(entry) = self.workers.get_mut(&worker) else {
            return false;
        };
        // The deadline first, whatever the link's state: a worker whose link closed (it left on
        // its own, or broke the protocol) may still be running, and whoever disconnects it
        // waits for its exit.
        if entry.lifecycle.exit_status().is_none() {
            let by = now.checked_add(within);
            entry.leave_by = match (entry.leave_by, by) {
                (Some(old), Some(new)) => Some(old.min(new)),
                (old, new) => old.or(new),
            };
        }
        if entry.link.is_closed() || entry.failed || entry.leaving {
            return false;
        }
        entry.leave_on_purpose();
        self.registry.leave_all(worker);
        self.drain_registry(now);
        let within_ms = u64::try_from(within.as_millis()).unwrap_or(u64::MAX);
        // Handing back to nobody would only close the connections less gently.
        let hand_back = hand_back
            && self
                .workers
                .iter()
                .any(|(id, e)| *id != worker && !e.is_retired() && !e.link.is_closed());
        if let Some(entry) = self.workers.get_mut(&worker) {
            entry.hand_back_asked = hand_back;
        }
        self.send(
            worker,
            PrimaryMessage::Disconnect {
                within_ms,
                hand_back,
            },
            None,
        );
        true
    }

    /// Queues a user message for `worker`, with `fd` (the driver's token for an fd to attach).
    /// A payload larger than one frame is queued as fragments (see [`crate::user`]).
    ///
    /// Messages to unknown or disconnected workers are dropped (as Node's `send` on a closed
    /// channel), and their fd comes back as [`Output::Close`].
    ///
    /// # Errors
    ///
    /// The payload is over [`MAX_MESSAGE`](crate::user::MAX_MESSAGE); nothing is queued and `fd`
    /// is returned.
    pub fn send_message(
        &mut self,
        worker: WorkerId,
        payload: Vec<u8>,
        fd: Option<C>,
    ) -> Result<(), (MessageTooLarge, Option<C>)> {
        self.send_user(worker, UserKind::Message, payload, fd)
    }

    /// Queues a request for `worker` and returns its number. Its answer comes as
    /// [`Event::Answer`] with that number, unless the link closes first (the driver fails what
    /// waits for it) or [`Self::forget_request`] dropped it.
    ///
    /// # Errors
    ///
    /// The payload is too large, or the worker's link is closed (or nothing sent on it arrives
    /// any more); nothing is queued.
    pub fn send_request(&mut self, worker: WorkerId, payload: Vec<u8>) -> Result<Seq, SendError> {
        user::check_size(payload.len())?;
        let entry = self
            .workers
            .get_mut(&worker)
            .filter(|e| !e.deaf && !e.failed)
            .ok_or(SendError::Closed)?;
        let seq = entry
            .link
            .start_request(Request::User, None)
            .map_err(|_| SendError::Closed)?;
        self.send_user(worker, UserKind::Request { seq }, payload, None)
            .map_err(|(error, _)| error)?;
        Ok(seq)
    }

    /// Answers `worker`'s request `ack` ([`Event::Message`] with `request`). Answers to
    /// disconnected workers are dropped, as messages are.
    ///
    /// # Errors
    ///
    /// A reply's payload is too large; nothing is queued.
    pub fn send_answer(
        &mut self,
        worker: WorkerId,
        ack: Seq,
        answer: Answer,
    ) -> Result<(), MessageTooLarge> {
        let (kind, payload) = answer.into_frame(ack);
        self.send_user(worker, kind, payload, None)
            .map_err(|(error, _)| error)
    }

    /// Nobody waits for the answer to request `seq` to `worker` any more (it timed out): the
    /// answer, if it comes, is dropped.
    pub fn forget_request(&mut self, worker: WorkerId, seq: Seq) {
        if let Some(entry) = self.workers.get_mut(&worker) {
            entry.link.forget_if(seq, Request::is_user);
        }
    }

    fn send_user(
        &mut self,
        worker: WorkerId,
        kind: UserKind,
        payload: Vec<u8>,
        fd: Option<C>,
    ) -> Result<(), (MessageTooLarge, Option<C>)> {
        let envelope = Envelope {
            kind,
            fd: fd.is_some(),
            payload,
        };
        let frames = user::split(envelope).map_err(|e| (e, fd))?;
        for frame in frames {
            match frame {
                UserFrame::Fragment(data) => {
                    self.send(worker, PrimaryMessage::Fragment { data }, None);
                }
                UserFrame::Last(envelope) => {
                    self.send(
                        worker,
                        PrimaryMessage::User(envelope),
                        fd.map(Attachment::Owned),
                    );
                }
            }
        }
        Ok(())
    }

    /// The next thing to do. For [`Output::Transmit`], the frame is written to `buf` (cleared
    /// first).
    #[must_use]
    pub fn poll_output(&mut self, buf: &mut Vec<u8>) -> Option<Output<C>> {
        loop {
            match self.out.pop_front()? {
                Queued::Ready(output) => return Some(output),
                Queued::Send {
                    worker,
                    message,
                    attachment,
                } => {
                    if self.workers.get(&worker).is_none_or(|e| e.link.is_closed()) {
                        if let Some(Attachment::Owned(fd)) = attachment {
                            return Some(Output::Close(fd));
                        }
                        continue;
                    }
                    buf.clear();
                    // Control frames are a few bytes; user messages were size-checked when queued.
                    wire::encode(&message, buf).expect("queued frames fit in MAX_FRAME");
                    return Some(Output::Transmit(Transmit { worker, attachment }));
                }
            }
        }
    }

    /// The workers not yet removed (a worker is removed after its `Exit`).
    pub fn workers(&self) -> impl Iterator<Item = WorkerId> + '_ {
        self.workers.keys().copied()
    }

    /// A worker's state.
    pub fn state(&self, worker: WorkerId) -> Option<WorkerState> {
        self.workers.get(&worker).map(|e| e.lifecycle.state())
    }

    /// A worker's lifecycle (state, `exited_after_disconnect`, exit status).
    pub fn lifecycle(&self, worker: WorkerId) -> Option<&Lifecycle> {
        self.workers.get(&worker).map(|e| &e.lifecycle)
    }

    /// Whether the worker's application declared itself ready ([`Event::Ready`]).
    pub fn is_ready(&self, worker: WorkerId) -> bool {
        self.workers.get(&worker).is_some_and(|e| e.service_ready)
    }

    /// The pid the worker reported in its handshake.
    pub fn pid(&self, worker: WorkerId) -> Option<u32> {
        self.workers.get(&worker)?.pid
    }

    /// `worker`'s totals (handoffs, deliveries, refusals, returns).
    pub fn counters(&self, worker: WorkerId) -> Option<Counters> {
        self.workers.get(&worker).map(|e| e.counters)
    }

    /// Connections handed to `worker` and not yet acked, over all handles.
    pub fn in_flight(&self, worker: WorkerId) -> usize {
        self.workers.get(&worker).map_or(0, |e| {
            e.link
                .pending_requests()
                .filter(|(_, r)| r.is_handoff())
                .count()
        })
    }

    /// The connections `worker` has open as the scheduler counts them: handed to it and not
    /// refused, given back or reported ended.
    pub fn outstanding(&self, worker: WorkerId) -> usize {
        self.registry.loads().open(worker)
    }

    /// The registry, for inspection.
    pub fn registry(&self) -> &Registry<C> {
        &self.registry
    }

    /// The configuration.
    pub fn config(&self) -> &Config {
        &self.config
    }

    fn process_frame(
        &mut self,
        now: Instant,
        worker: WorkerId,
        frame: &[u8],
        fds: &[FdKind],
    ) -> Result<(), ProtocolError> {
        let Some(entry) = self.workers.get_mut(&worker) else {
            return Ok(());
        };
        if entry.link.is_closed() || entry.failed {
            return Ok(());
        }
        let message: WorkerMessage = entry.link.receive(frame, fds.len())?;
        if matches!(
            message,
            WorkerMessage::Refused { .. }
                | WorkerMessage::Return { .. }
                | WorkerMessage::HandBack { .. }
        ) && fds != [FdKind::Connection]
        {
            return Err(ProtocolError::NotAConnection);
        }
        // Any frame is a sign of life, not just heartbeats.
        entry.last_seen = Some(now);
        if let WorkerMessage::Online { version, pid } = message {
            entry.link.handle_handshake(version)?;
            entry.pid = Some(pid);
            if entry.lifecycle.online() {
                self.push(Output::Event(Event::Online { worker, pid }));
            }
            return Ok(());
        }
        entry.link.check_open()?;
        match message {
            WorkerMessage::Online { .. } => unreachable!("handled above"),
            WorkerMessage::QueryServer { seq, request } => {
                if entry.leaving {
                    let result = Err(Errno::ESHUTDOWN);
                    self.send(
                        worker,
                        PrimaryMessage::ListenReply { ack: seq, result },
                        None,
                    );
                } else {
                    self.registry.query(worker, seq, request);
                }
            }
            WorkerMessage::Listening { handle } if !self.registry.is_held(worker, handle) => {
                if !entry.is_retired() {
                    return Err(RegistryError::NotHeld { worker, handle }.into());
                }
            }
            WorkerMessage::Listening { handle } => {
                let (key, addr) = self.registry.info(handle).expect("held handles are bound");
                let event = Event::Listening {
                    worker,
                    handle,
                    key: key.clone(),
                    addr: addr.clone(),
                };
                entry.lifecycle.listening();
                self.push(Output::Event(event));
            }
            WorkerMessage::Accepted { through, ended } => {
                // A reclaimed handoff never reached the worker, which cannot have acked it.
                let acked = entry
                    .link
                    .finish_through(through, Request::is_live_handoff)?;
                entry.counters.delivered += acked.len() as u64;
                for (_, request) in acked {
                    if let Request::Handoff { handle, conn, .. } = request {
                        self.registry.ack(worker, handle, conn, true)?;
                    }
                }
                // After the acks: they cover every connection the count may include.
                count_ended(entry, &mut self.registry, worker, ended)?;
            }
            WorkerMessage::Refused { ack } => {
                // Only a live handoff passes, so the `else` is never taken.
                if let Request::Handoff { handle, conn, .. } = entry
                    .link
                    .finish_request_if(ack, Request::is_live_handoff)?
                {
                    entry.counters.refused += 1;
                    // First: the driver must hold the fd again before it is dispatched.
                    self.out
                        .push_back(Queued::Ready(Output::Reclaimed { worker, conn }));
                    self.registry.ack(worker, handle, conn, false)?;
                }
            }
            WorkerMessage::Ready { handle } | WorkerMessage::Close { handle } => {
                let result = match message {
                    WorkerMessage::Close { .. } => self.registry.close(worker, handle),
                    _ => self.registry.ready(worker, handle),
                };
                match result {
                    Err(RegistryError::NotHeld { .. }) if entry.is_retired() => {}
                    result => result?,
                }
            }
            WorkerMessage::ExitedAfterDisconnect { seq } => {
                entry.leave_on_purpose();
                entry.farewell_answered = true;
                self.registry.leave_all(worker);
                self.send(worker, PrimaryMessage::DisconnectAck { ack: seq }, None);
            }
            WorkerMessage::User(envelope) => {
                let envelope = entry.reassembly.complete(envelope)?;
                let fd = envelope.fd;
                let event = match Arrived::from_envelope(envelope) {
                    Arrived::Message { payload, request } => Event::Message {
                        worker,
                        payload,
                        fd,
                        request,
                    },
                    Arrived::Answer { seq, answer } => {
                        match entry.link.finish_request_if(seq, Request::is_user) {
                            Ok(_) => Event::Answer {
                                worker,
                                seq,
                                answer,
                            },
                            // Its waiter gave up ([`Self::forget_request`]).
                            Err(LinkError::DuplicateAck { .. }) => return Ok(()),
                            Err(error) => return Err(error.into()),
                        }
                    }
                };
                self.push(Output::Event(event));
            }
            WorkerMessage::Fragment { data } => entry.reassembly.fragment(&data)?,
            WorkerMessage::Heartbeat { ended } => {
                count_ended(entry, &mut self.registry, worker, ended)?;
            }
            WorkerMessage::ServiceReady => {
                if !entry.service_ready && !entry.leaving {
                    entry.service_ready = true;
                    self.push(Output::Event(Event::Ready { worker }));
                }
            }
            WorkerMessage::Return { handle } => {
                entry.counters.returned += 1;
                // No longer open at the worker: counted here, not in its reports.
                self.registry.release(worker, 1);
                self.push(Output::Returned {
                    worker,
                    handle,
                    prefix: Vec::new(),
                    handed_back: false,
                });
            }
            WorkerMessage::HandBack { handle, prefix } => {
                if prefix.len() > wire::MAX_PREFIX {
                    return Err(ProtocolError::PrefixTooLong { len: prefix.len() });
                }
                // Only when told: a worker that hands back while it serves would be given its
                // own connections again, round and round.
                if !entry.hand_back_asked {
                    return Err(ProtocolError::HandBackNotAsked);
                }
                // Never more than it was given: a worker cannot loop a connection through the
                // primary faster than the primary hands it out.
                let given = entry.counters.delivered;
                let back = entry.counters.returned + entry.counters.handed_back;
                if !entry.served.contains(&handle) || back >= given {
                    return Err(ProtocolError::NotGiven { handle });
                }
                // It served it: the worker reports it ended, as any connection it is done with
                // (unlike a `Return`, which it never served).
                entry.counters.handed_back += 1;
                self.push(Output::Returned {
                    worker,
                    handle,
                    prefix,
                    handed_back: true,
                });
            }
            WorkerMessage::TakesPrefixes { handle } => {
                match self.registry.takes_prefixes(worker, handle) {
                    Err(RegistryError::NotHeld { .. }) if entry.is_retired() => {}
                    result => result?,
                }
            }
        }
        self.drain_registry(now);
        Ok(())
    }

    /// A worker broke the protocol: report it, offer it nothing more, ignore what else it sends,
    /// and have the driver close its link (which takes back what the worker never read first).
    fn fail(&mut self, now: Instant, worker: WorkerId, error: ProtocolError) {
        let Some(entry) = self.workers.get_mut(&worker) else {
            return;
        };
        if entry.link.is_closed() || entry.failed {
            return;
        }
        entry.failed = true;
        entry.killed.get_or_insert(KillReason::ProtocolViolation);
        self.registry.leave_all(worker);
        self.drain_registry(now);
        self.push(Output::Event(Event::Error { worker, error }));
        // What it never read is taken back at once; what it read goes with its process.
        self.push(Output::CloseLink { worker });
        self.push(Output::Kill {
            worker,
            reason: KillReason::ProtocolViolation,
        });
    }

    fn report(&mut self, worker: WorkerId, transitions: impl IntoIterator<Item = Transition>) {
        for transition in transitions {
            let event = match transition {
                Transition::Disconnect => Event::Disconnect { worker },
                Transition::Exit {
                    status,
                    exited_after_disconnect,
                } => {
                    let killed = self.workers.remove(&worker).and_then(|e| e.killed);
                    Event::Exit {
                        worker,
                        status,
                        exited_after_disconnect,
                        killed,
                    }
                }
            };
            self.push(Output::Event(event));
        }
    }

    fn drain_registry(&mut self, now: Instant) {
        while let Some(output) = self.registry.poll() {
            match output {
                RegistryOutput::Bind {
                    handle,
                    request,
                    distribution,
                } => {
                    self.push(Output::Bind {
                        handle,
                        request,
                        distribution,
                    });
                }
                RegistryOutput::Unbind { handle } => self.push(Output::Unbind { handle }),
                RegistryOutput::Close(conn) => {
                    self.take_prefix(conn);
                    self.push(Output::Close(conn));
                }
                RegistryOutput::Delivered { worker, conn } => {
                    self.take_prefix(conn);
                    self.push(Output::Delivered { worker, conn });
                }
                RegistryOutput::Reply {
                    worker,
                    seq,
                    result,
                } => {
                    let attachment = match &result {
                        Ok(ListenInfo {
                            handle,
                            distribution: Distribution::Shared,
                            ..
                        }) => Some(Attachment::Listener(*handle)),
                        _ => None,
                    };
                    self.send(
                        worker,
                        PrimaryMessage::ListenReply { ack: seq, result },
                        attachment,
                    );
                }
                RegistryOutput::Dispatch {
                    worker,
                    handle,
                    conn,
                } => {
                    // Unasked acks may wait for the worker's next heartbeat.
                    let deadline =
                        Some(now + self.config.handoff_timeout + wire::HEARTBEAT_INTERVAL);
                    let handoff = Request::Handoff {
                        handle,
                        conn,
                        reclaimed: false,
                    };
                    // Ask for an ack every half window: the window refills before it runs dry,
                    // at a fraction of the acks (a window of 1 asks every time, as Node).
                    let ask_every = self.config.registry.window.div_ceil(2).max(1);
                    let started = match self.workers.get_mut(&worker) {
                        Some(entry) => {
                            let started = entry.link.start_request(handoff, deadline);
                            if started.is_ok() {
                                entry.counters.handoffs += 1;
                                entry.unasked += 1;
                                if !entry.served.contains(&handle) {
                                    entry.served.push(handle);
                                }
                            }
                            let reply = entry.unasked >= ask_every;
                            if reply {
                                entry.unasked = 0;
                            }
                            started.map(|seq| (seq, reply))
                        }
                        None => Err((LinkError::Closed, handoff)),
                    };
                    match started {
                        Ok((seq, reply)) => {
                            // Kept until a worker has it: a refusal sends it out again.
                            let prefix = self.prefix(conn).to_vec();
                            self.send(
                                worker,
                                PrimaryMessage::NewConn {
                                    seq,
                                    handle,
                                    reply,
                                    prefix,
                                },
                                Some(Attachment::Conn { conn, seq }),
                            );
                        }
                        // Unreachable while the registry forgets workers when their link closes;
                        // if it ever happens, the connection goes to someone else, not astray.
                        Err(_) => self.registry.remove_worker(now, worker),
                    }
                }
            }
        }
    }

    /// The bytes connection `conn` carries (none for most).
    fn prefix(&self, conn: C) -> &[u8] {
        if self.prefixes.is_empty() {
            return &[];
        }
        self.prefixes.get(&conn).map_or(&[], Vec::as_slice)
    }

    /// `conn` left the primary's hands: its bytes went with it, or it is closed.
    fn take_prefix(&mut self, conn: C) {
        if !self.prefixes.is_empty() {
            self.prefixes.remove(&conn);
        }
    }

    fn send(
        &mut self,
        worker: WorkerId,
        message: PrimaryMessage,
        attachment: Option<Attachment<C>>,
    ) {
        self.out.push_back(Queued::Send {
            worker,
            message,
            attachment,
        });
    }

    fn push(&mut self, output: Output<C>) {
        self.out.push_back(Queued::Ready(output));
    }
}

/// A worker reported `ended` connections ended in all (cumulative): the registry's count of its
/// open connections goes down by the new ones. More than it acked and kept, or fewer than it
/// reported before, is a violation.
fn count_ended<C: Copy + Ord>(
    entry: &mut WorkerEntry<C>,
    registry: &mut Registry<C>,
    worker: WorkerId,
    ended: u64,
) -> Result<(), ProtocolError> {
    let given = entry
        .counters
        .delivered
        .saturating_sub(entry.counters.returned);
    let previous = entry.counters.ended;
    if ended < previous || ended > given {
        return Err(ProtocolError::EndedMiscounted {
            ended,
            given,
            previous,
        });
    }
    entry.counters.ended = ended;
    let new = ended - previous;
    registry.release(worker, usize::try_from(new).unwrap_or(usize::MAX));
    Ok(())
}

#[cfg(test)]
mod tests;
