//! The primary's driver: one task owning the core, every worker link, every listening socket and
//! every accepted connection. Accepting, handing off, reading acks and sending all happen in its
//! `poll`, with no channel hop on the connection path.
//!
//! The contract with the core: the driver feeds it what happened (frames with the kinds of the
//! fds that came with them, accepted connections, exits, the time) and does what its outputs
//! say. It never decodes a frame. Every fd the core speaks of is a token (`usize`) here, in
//! `tokens`: an accepted connection, one a worker gave back, or a user's fd waiting for its
//! frame.
//!
//! A handed-off connection's fd is closed here as soon as its `NewConn` is sent: it then lives in
//! the worker's receive queue, and the worker's close of it ends the TCP connection at once,
//! whenever the (lazy, cumulative) ack comes. The driver keeps a duplicate of each worker's end
//! of its link instead, so that what a worker never read is still there when it is gone: the
//! driver reads it back and hands it to the core, which dispatches it again. Because of that
//! duplicate, a link does not reach end of stream while the driver holds it: a worker is gone
//! when its process exits, or, once the core releases the duplicate (`Output::ReleasePeer`: it
//! left on purpose and settled its handoffs), when it closes its end.
//!
//! The job is split by what it drives: [`links`] (worker links: frames in and out, and what a
//! worker never read), [`accept`] (listening sockets and accepting), [`timer`] (the core's
//! deadlines), and [`events`] (what the core reports, as the user's events and messages).

mod accept;
mod events;
mod links;
mod timer;

use std::collections::{HashMap, VecDeque};
use std::ffi::OsString;
use std::future::Future;
use std::io;
use std::os::fd::OwnedFd;
use std::os::unix::process::ExitStatusExt;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use proto::wire::ListenTarget;
use proto::{ExitStatus, HandleId, Output, Seq, WorkerId};
use slab::Slab;
use tokio::sync::{mpsc, oneshot};

use self::accept::Listener;
use self::links::WorkerLink;
use self::timer::Timer;
use super::image::Image;
use super::{Counters, Event, PrimaryShared, WorkerCounters, WorkerHandle, WorkerShared, spawn};
use crate::message::{Answer, ReplySender, Waiters};
use crate::settings::Settings;

/// What the driver is asked to do, or told, from outside its `poll`.
pub(crate) enum Input {
    Fork {
        env: Vec<(OsString, OsString)>,
        image: Arc<Image>,
        reply: oneshot::Sender<io::Result<WorkerHandle>>,
    },
    Disconnect {
        worker: WorkerId,
        /// When it is killed if it has not left.
        within: Duration,
        /// Other workers stay: it may hand its idle connections back.
        hand_back: bool,
    },
    /// Close the sockets kept open for dead workers' replacements (a shutdown).
    ReleaseKeptHandles,
    Send {
        worker: WorkerId,
        payload: Vec<u8>,
        fd: Option<OwnedFd>,
    },
    Request {
        worker: WorkerId,
        payload: Vec<u8>,
        reply: ReplySender,
    },
    Answer {
        worker: WorkerId,
        ack: Seq,
        answer: Answer,
    },
    Exited {
        worker: WorkerId,
        status: ExitStatus,
    },
    Counters {
        reply: oneshot::Sender<Counters>,
    },
}

/// How many inputs of one source are handled before the others get a turn.
const BUDGET: usize = 64;
/// How long the exit of a silent worker waits for its output to be forwarded.
const OUTPUT_DRAIN: Duration = Duration::from_secs(1);

/// An fd under a core token.
struct Held {
    /// `None` while a connection's `NewConn` sits in a worker's receive queue (the token lives
    /// on until the core settles it); filled again if it comes back.
    fd: Option<OwnedFd>,
    /// When the primary accepted it, until its first handoff (the latency histogram).
    accepted: Option<Instant>,
}

impl Held {
    fn new(fd: OwnedFd) -> Self {
        Self {
            fd: Some(fd),
            accepted: None,
        }
    }
}

pub(crate) struct Driver {
    core: proto::Primary<usize>,
    settings: Settings,
    shared: Arc<PrimaryShared>,
    inputs: mpsc::UnboundedReceiver<Input>,
    input_tx: mpsc::UnboundedSender<Input>,
    links: HashMap<WorkerId, WorkerLink>,
    workers: HashMap<WorkerId, Arc<WorkerShared>>,
    /// The shortest time each worker asked to disconnect was given, for the log line of its
    /// kill (the deadline itself is the core's).
    disconnect_within: HashMap<WorkerId, Duration>,
    listeners: HashMap<HandleId, Listener>,
    /// Fds under the core's tokens: accepted connections and users' fds.
    tokens: Slab<Held>,
    /// Workers with messages held for want of room in the user's queue (their link, if it is
    /// still there, is not read): known here, so that a poll with none held costs no lock.
    held_messages: std::collections::BTreeSet<WorkerId>,
    /// Connections handed to workers so far, and how long they waited for it.
    handoffs: u64,
    /// Connections leaving workers handed back between two requests.
    handed_back: u64,
    handoff_latency: super::HandoffLatency,
    /// Accepts that failed: a connection gone before it was accepted, or out of fds.
    accept_errors: u64,
    timer: Timer,
    accept_resume: Option<Instant>,
    buf: Vec<u8>,
    received: Vec<OwnedFd>,
    /// What each of `received` is, for the core.
    kinds: Vec<proto::FdKind>,
    ids: Vec<WorkerId>,
    handles: Vec<HandleId>,
    /// The thread's scheduling policy is decided on the first poll, on the thread that polls.
    scheduling_decided: bool,
    /// This thread was moved to `SCHED_BATCH`: workers must be moved back.
    batch_scheduling: bool,
}

/// Kills a worker as the core said. One late to leave is killed once what it still holds is
/// known, for the log line: read before the kill (its fds go with it), off the runtime's
/// thread (which hands off connections), and bounded.
fn kill(worker: &Arc<WorkerShared>, reason: proto::KillReason, deadline: Option<Duration>) {
    let (id, pid) = (worker.id, worker.pid);
    if reason != proto::KillReason::DisconnectTimeout {
        tracing::warn!(worker = id.get(), %reason, "killing worker");
        let _ = crate::sys::kill(pid, libc::SIGKILL);
        return;
    }
    let deadline = deadline.unwrap_or(worker.disconnect_timeout);
    let worker = worker.clone();
    tokio::spawn(async move {
        let read = tokio::task::spawn_blocking(move || super::holding::Holding::of(pid));
        let holding = match tokio::time::timeout(HOLDING_READ, read).await {
            Ok(Ok(holding)) => holding,
            _ => None,
        };
        // It may have exited meanwhile: never signal a pid that may be someone else's now.
        if worker.status.borrow().exit.is_some() {
            return;
        }
        match holding {
            Some(holding) => {
                tracing::warn!(worker = id.get(), pid, deadline = %crate::settings::Shown(deadline), "worker did not exit within the disconnect timeout; killing it: {holding}")
            }
            None => {
                tracing::warn!(worker = id.get(), pid, deadline = %crate::settings::Shown(deadline), "worker did not exit within the disconnect timeout; killing it")
            }
        }
        let _ = crate::sys::kill(pid, libc::SIGKILL);
    });
}

/// How long the kill at the disconnect deadline waits to learn what the worker still holds.
const HOLDING_READ: Duration = Duration::from_secs(1);

fn now() -> Instant {
    tokio::time::Instant::now().into_std()
}

impl Driver {
    pub(crate) fn new(
        settings: Settings,
        shared: Arc<PrimaryShared>,
        inputs: mpsc::UnboundedReceiver<Input>,
        input_tx: mpsc::UnboundedSender<Input>,
    ) -> Self {
        Self {
            core: proto::Primary::new(settings.core_config()),
            settings,
            shared,
            inputs,
            input_tx,
            links: HashMap::new(),
            workers: HashMap::new(),
            disconnect_within: HashMap::new(),
            listeners: HashMap::new(),
            tokens: Slab::new(),
            held_messages: std::collections::BTreeSet::new(),
            handoffs: 0,
            handed_back: 0,
            handoff_latency: super::HandoffLatency::default(),
            accept_errors: 0,
            timer: Timer::Unset,
            accept_resume: None,
            buf: Vec::new(),
            received: Vec::new(),
            kinds: Vec::new(),
            ids: Vec::new(),
            handles: Vec::new(),
            scheduling_decided: false,
            batch_scheduling: false,
        }
    }

    /// Applies [`Settings::batch_scheduling`] to the thread running the driver, which on a
    /// current-thread runtime is the only one that ever will.
    fn decide_scheduling(&mut self) {
        self.scheduling_decided = true;
        let current_thread = tokio::runtime::Handle::current().runtime_flavor()
            == tokio::runtime::RuntimeFlavor::CurrentThread;
        if !current_thread || !self.settings.wants_batch_scheduling() {
            return;
        }
        match crate::sys::use_batch_scheduling() {
            Ok(applied) => self.batch_scheduling = applied,
            Err(error) => tracing::debug!(%error, "SCHED_BATCH refused; keeping the policy"),
        }
    }

    fn poll_inputs(&mut self, cx: &mut Context<'_>) -> bool {
        let mut progress = false;
        for _ in 0..BUDGET {
            let Poll::Ready(Some(input)) = self.inputs.poll_recv(cx) else {
                break;
            };
            progress = true;
            match input {
                Input::Fork { env, image, reply } => {
                    let _ = reply.send(self.fork(&env, &image));
                }
                Input::Disconnect {
                    worker,
                    within,
                    hand_back,
                } => {
                    let hand_back = hand_back && self.settings.hand_back;
                    self.core.disconnect(now(), worker, within, hand_back);
                    if self.workers.contains_key(&worker) {
                        let shortest = self.disconnect_within.entry(worker).or_insert(within);
                        *shortest = within.min(*shortest);
                    }
                }
                Input::ReleaseKeptHandles => self.core.release_kept_handles(now()),
                Input::Send {
                    worker,
                    payload,
                    fd,
                } => self.send_message(worker, payload, fd),
                Input::Request {
                    worker,
                    payload,
                    reply,
                } => {
                    // Not sent (no link, or one nothing arrives on any more): the reply sender
                    // is dropped, which fails the request at once.
                    if let Some(link) = self.links.get_mut(&worker)
                        && let Ok(seq) = self.core.send_request(worker, payload)
                    {
                        for gone in link.waiters.insert(seq, reply) {
                            self.core.forget_request(worker, gone);
                        }
                        self.drain_core();
                    }
                }
                Input::Answer {
                    worker,
                    ack,
                    answer,
                } => {
                    // Sizes were checked when the value was encoded.
                    if let Err(error) = self.core.send_answer(worker, ack, answer) {
                        tracing::warn!(worker = worker.get(), %error, "answer not sent");
                    }
                    self.drain_core();
                }
                Input::Exited { worker, status } => {
                    self.finish_link(worker);
                    self.core.handle_exit(worker, status);
                }
                Input::Counters { reply } => {
                    let _ = reply.send(self.counters());
                }
            }
            self.drain_core();
        }
        progress
    }

    /// Acts on everything the core asks for.
    fn drain_core(&mut self) {
        while let Some(output) = self.core.poll_output(&mut self.buf) {
            match output {
                Output::Transmit(t) => match self.links.get_mut(&t.worker) {
                    Some(link) if !link.hung_up => {
                        link.outgoing.push_back((self.buf.clone(), t.attachment));
                    }
                    // Never sent: a connection is taken back, a user's fd closed.
                    _ => {
                        let unsent = [(self.buf.clone(), t.attachment)];
                        self.take_back_unsent(t.worker, unsent);
                    }
                },
                Output::Bind {
                    handle,
                    request,
                    distribution,
                } => {
                    let result = self.bind(handle, &request, distribution);
                    if let Err(errno) = result {
                        let address = match &request.target {
                            ListenTarget::Ip(addr) => addr.to_string(),
                            ListenTarget::Path(path) => {
                                format!("unix:{}", String::from_utf8_lossy(path))
                            }
                            ListenTarget::Fd(fd) => format!("fd {fd}"),
                            ListenTarget::Name(name) => format!("the socket named {name}"),
                        };
                        let error = io::Error::from_raw_os_error(errno.0);
                        tracing::debug!(%address, %error, "could not listen");
                        self.shared.publish(Event::ListenFailed {
                            address,
                            errno: errno.0,
                        });
                    }
                    self.core.handle_bound(now(), handle, result);
                }
                Output::Unbind { handle } => {
                    self.listeners.remove(&handle);
                }
                Output::Close(conn) | Output::Delivered { conn, .. } => {
                    self.tokens.try_remove(conn);
                }
                Output::CloseLink { worker } => self.close_link(worker),
                Output::Returned {
                    worker,
                    handle,
                    prefix,
                    handed_back,
                } => self.take_back(worker, handle, prefix, handed_back),
                Output::Reclaimed { conn, .. } => {
                    if let (Some(fd), Some(held)) = (self.received.pop(), self.tokens.get_mut(conn))
                    {
                        held.fd = Some(fd);
                    }
                }
                Output::Kill { worker, reason } => {
                    if let Some(w) = self.workers.get(&worker) {
                        kill(w, reason, self.disconnect_within.get(&worker).copied());
                    }
                }
                Output::ReleasePeer { worker } => {
                    // Its close of its end is now seen as end of stream: its `Disconnect`.
                    if let Some(link) = self.links.get_mut(&worker) {
                        link.peer = None;
                    }
                }
                Output::Event(event) => self.publish(event),
            }
        }
    }

    fn counters(&self) -> Counters {
        let mut workers: Vec<WorkerCounters> = self
            .workers
            .values()
            .map(|w| (w, self.core.counters(w.id).unwrap_or_default()))
            .map(|(w, counters)| WorkerCounters {
                id: w.id,
                pid: w.pid,
                state: self.core.state(w.id).unwrap_or(proto::WorkerState::Dead),
                in_flight: self.core.in_flight(w.id),
                outstanding: self.core.outstanding(w.id),
                handoffs: counters.handoffs,
                refused: counters.refused,
                returned: counters.returned,
                handed_back: counters.handed_back,
            })
            .collect();
        workers.sort_by_key(|w| w.id);
        Counters {
            workers,
            connections_held: self.tokens.iter().filter(|(_, h)| h.fd.is_some()).count(),
            listeners: self.listeners.len(),
            handoffs: self.handoffs,
            handed_back: self.handed_back,
            handoff_latency: self.handoff_latency.clone(),
            accept_errors: self.accept_errors,
        }
    }

    fn fork(&mut self, env: &[(OsString, OsString)], image: &Image) -> io::Result<WorkerHandle> {
        let id = self.core.add_worker();
        // Held across the spawn: the orphan reaper must know a worker before it can exit.
        let mut worker_pids = super::reaper::worker_pids();
        let (mut child, channel, peer) =
            match spawn::spawn(&self.settings, image, id, env, self.batch_scheduling) {
                Ok(spawned) => spawned,
                Err(error) => {
                    self.core.handle_spawn_failed(id);
                    return Err(error);
                }
            };
        let pid = child.id().unwrap_or_default();
        worker_pids.insert(pid);
        drop(worker_pids);
        let output = if self.settings.silent {
            spawn::forward_output(id, &mut child)
        } else {
            Vec::new()
        };
        let shared = Arc::new(WorkerShared::new(
            id,
            pid,
            image.generation,
            self.settings.disconnect_timeout,
        ));
        self.workers.insert(id, shared.clone());
        self.links.insert(
            id,
            WorkerLink {
                channel,
                peer: Some(peer),
                outgoing: VecDeque::new(),
                waiters: Waiters::default(),
                hung_up: false,
                held: false,
            },
        );
        let tx = self.input_tx.clone();
        tokio::spawn(async move {
            let waited = child.wait().await;
            // Reaped: the pid may be reused by an orphan from now on.
            super::reaper::worker_pids().remove(pid);
            let status = match waited {
                Ok(status) => match (status.code(), status.signal()) {
                    (Some(code), _) => ExitStatus::Code(code),
                    (None, Some(signal)) => ExitStatus::Signal(signal),
                    (None, None) => ExitStatus::Code(-1),
                },
                Err(error) => {
                    tracing::error!(worker = id.get(), %error, "waiting for worker failed");
                    ExitStatus::Code(-1)
                }
            };
            // What a silent worker wrote just before it exited may still be in its pipes: let it
            // through before the exit is reported, so a primary that returns on the last exit
            // loses none of it. Bounded, since a process the worker started may hold the pipes.
            let drained = tokio::time::Instant::now() + OUTPUT_DRAIN;
            for task in output {
                let _ = tokio::time::timeout_at(drained, task).await;
            }
            let _ = tx.send(Input::Exited { worker: id, status });
        });
        let handle = WorkerHandle {
            shared,
            tx: self.input_tx.clone(),
        };
        self.shared
            .workers
            .lock()
            .expect("not poisoned")
            .insert(id, handle.clone());
        self.drain_core();
        self.shared.publish(Event::Fork(handle.clone()));
        Ok(handle)
    }
}

impl Future for Driver {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.get_mut();
        if !this.scheduling_decided {
            this.decide_scheduling();
        }
        for _ in 0..16 {
            let mut progress = this.poll_inputs(cx);
            progress |= this.poll_links(cx);
            progress |= this.poll_accepts(cx);
            progress |= this.poll_timer(cx);
            progress |= this.flush_sends(cx);
            if !progress {
                return Poll::Pending;
            }
        }
        // Still busy: yield to other tasks and come back.
        cx.waker().wake_by_ref();
        Poll::Pending
    }
}
