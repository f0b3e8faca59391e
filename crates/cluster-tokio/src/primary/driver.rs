//! The primary's driver: one task owning the core, every worker link, every listening socket and
//! every accepted connection. Accepting, handing off, reading acks and sending all happen in its
//! `poll`, with no channel hop on the connection path.
//!
//! A handed-off connection's fd is closed here as soon as its `NewConn` is sent: it then lives in
//! the worker's receive queue, and the worker's close of it ends the TCP connection at once,
//! whenever the (lazy, cumulative) ack comes. The driver keeps a duplicate of each worker's end
//! of its link instead, so that what a worker never read is still there when it is gone: the
//! driver reads it back and the core dispatches it again. Because of that duplicate, a link does
//! not reach end of stream while the driver holds it: a worker is gone when its process exits,
//! or, once it has left on purpose and settled its handoffs (the duplicate is dropped then), when
//! it closes its end.

use std::collections::{HashMap, VecDeque};
use std::ffi::OsString;
use std::future::Future;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::process::ExitStatusExt;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use proto::wire::{
    BoundAddr, Distribution, Envelope, Errno, ListenRequest, ListenTarget, PrimaryMessage,
    SocketKind, UserKind, WorkerMessage,
};
use proto::{Attachment, ExitStatus, HandleId, Output, Seq, WorkerId};
use slab::Slab;
use socket2::{Domain, Type};
use tokio::io::unix::AsyncFd;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Sleep;

use super::alarm::Alarm;
use super::image::Image;
use super::{
    Event, ListenAddress, Message, PrimaryShared, Stats, WorkerHandle, WorkerShared, WorkerStats,
    spawn,
};
use crate::ipc::{Channel, Received};
use crate::message::{Answer, PendingRequests, ReplySender};
use crate::settings::Settings;
use crate::socket::{self, SocketFile};

/// What the driver is asked to do, or told, from outside its `poll`.
pub(crate) enum Input {
    Fork {
        env: Vec<(OsString, OsString)>,
        image: Arc<Image>,
        reply: oneshot::Sender<io::Result<WorkerHandle>>,
    },
    Disconnect {
        worker: WorkerId,
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
    Stats {
        reply: oneshot::Sender<Stats>,
    },
}

/// How many inputs of one source are handled before the others get a turn.
const BUDGET: usize = 64;
/// How long the exit of a silent worker waits for its output to be forwarded.
const OUTPUT_DRAIN: Duration = Duration::from_secs(1);
/// Frames read from a gone worker's link at most; a full socket buffer holds far fewer.
const LAST_FRAMES: usize = 65_536;
/// Pause after an accept error that is not about one connection (EMFILE, ENFILE, ENOBUFS).
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

struct Link {
    channel: Channel,
    /// A duplicate of the worker's end: keeps the datagrams it has not read (and their fds)
    /// after it is gone, to be read back. Never registered with the reactor. Dropped once the
    /// core needs no read-back (the worker left on purpose), so that its close is seen.
    peer: Option<OwnedFd>,
    outgoing: VecDeque<(Vec<u8>, Option<Attachment<usize>>)>,
    /// The primary's requests to this worker; dropped with the link, which fails them.
    requests: PendingRequests,
    /// The worker shut its end down for reading (a send failed with `EPIPE`): nothing more is
    /// sent, but what the worker sends is still read until its process is gone.
    hung_up: bool,
}

struct Listener {
    /// The Unix socket file, removed with the handle, before the socket closes (fields drop in
    /// order): nobody sees a file whose socket refuses connections and takes it for stale.
    _file: Option<SocketFile>,
    socket: ListenerSocket,
}

enum ListenerSocket {
    /// Round robin: the primary accepts. Readiness comes from the reactor, but accepted
    /// connections are never registered with it: the primary only passes them on, so
    /// registering would cost two `epoll_ctl` per connection for nothing.
    Accepting(AsyncFd<OwnedFd>),
    /// Shared: the fd is sent to workers, who accept (or receive datagrams) on it.
    Shared(OwnedFd),
}

impl Listener {
    fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        match &self.socket {
            ListenerSocket::Accepting(l) => l.get_ref().as_fd(),
            ListenerSocket::Shared(l) => l.as_fd(),
        }
    }
}

/// How the driver waits for its next deadline.
enum Timer {
    /// Not needed yet (the timer fd is made on the first deadline, inside the runtime).
    Unset,
    /// A timer fd of the driver's own (see [`Alarm`]).
    Alarm(Alarm),
    /// The fallback when no timer fd can be had.
    Sleep(Pin<Box<Sleep>>),
}

impl Timer {
    /// The fallback; `poll_timer` sets it for its deadline before polling it.
    fn sleep() -> Self {
        Self::Sleep(Box::pin(tokio::time::sleep(Duration::ZERO)))
    }
}

pub(crate) struct Driver {
    core: proto::Primary<usize>,
    settings: Settings,
    shared: Arc<PrimaryShared>,
    inputs: mpsc::UnboundedReceiver<Input>,
    input_tx: mpsc::UnboundedSender<Input>,
    links: HashMap<WorkerId, Link>,
    workers: HashMap<WorkerId, Arc<WorkerShared>>,
    listeners: HashMap<HandleId, Listener>,
    /// Fds under the core's tokens: accepted connections and users' fds. A connection's slot is
    /// empty while its `NewConn` sits in a worker's receive queue (the token lives on until the
    /// core settles it), and filled again if it comes back.
    conns: Slab<Option<OwnedFd>>,
    timer: Timer,
    accept_resume: Option<Instant>,
    buf: Vec<u8>,
    fds: Vec<OwnedFd>,
    ids: Vec<WorkerId>,
    handles: Vec<HandleId>,
    /// The thread's scheduling policy is decided on the first poll, on the thread that polls.
    scheduling_decided: bool,
    /// This thread was moved to `SCHED_BATCH`: workers must be moved back.
    batch_scheduling: bool,
}

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
            listeners: HashMap::new(),
            conns: Slab::new(),
            timer: Timer::Unset,
            accept_resume: None,
            buf: Vec::new(),
            fds: Vec::new(),
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
                Input::Disconnect { worker } => {
                    self.core.disconnect(now(), worker);
                }
                Input::ReleaseKeptHandles => self.core.release_kept_handles(now()),
                Input::Send {
                    worker,
                    payload,
                    fd,
                } => self.send_user(worker, UserKind::Message, payload, fd),
                Input::Request {
                    worker,
                    payload,
                    reply,
                } => {
                    // No link: the reply sender is dropped, which fails the request.
                    if let Some(link) = self.links.get_mut(&worker) {
                        let seq = link.requests.start(reply);
                        self.send_user(worker, UserKind::Request { seq }, payload, None);
                    }
                }
                Input::Answer {
                    worker,
                    ack,
                    answer,
                } => {
                    let (kind, payload) = match answer {
                        Answer::Reply(payload) => (UserKind::Reply { ack }, payload),
                        Answer::Refusal(reason) => (UserKind::Refusal { ack }, reason.into_bytes()),
                    };
                    self.send_user(worker, kind, payload, None);
                }
                Input::Exited { worker, status } => {
                    self.finish_link(worker);
                    self.core.handle_exit(worker, status);
                }
                Input::Stats { reply } => {
                    let _ = reply.send(self.stats());
                }
            }
            self.drain_core();
        }
        progress
    }

    fn poll_links(&mut self, cx: &mut Context<'_>) -> bool {
        let mut progress = false;
        self.ids.clear();
        self.ids.extend(self.links.keys());
        for i in 0..self.ids.len() {
            let id = self.ids[i];
            for _ in 0..BUDGET {
                let Some(link) = self.links.get_mut(&id) else {
                    break;
                };
                let received = match link.channel.poll_recv(cx, &mut self.fds) {
                    Poll::Pending => break,
                    Poll::Ready(received) => received,
                };
                progress = true;
                self.handle_received(id, received);
            }
        }
        progress
    }

    /// Hands what came from `worker`'s link to the core and acts on the outcome.
    fn handle_received(&mut self, id: WorkerId, received: io::Result<Received>) {
        match received {
            Ok(Received::Frame { len }) => {
                let Some(link) = self.links.get(&id) else {
                    return;
                };
                let frame = link.channel.frame(len);
                if gives_back_something_else(frame, &self.fds) {
                    self.core.handle_not_a_connection(now(), id);
                } else {
                    self.core.handle_frame(now(), id, frame, self.fds.len());
                }
                if !self.core.needs_read_back(id)
                    && let Some(link) = self.links.get_mut(&id)
                {
                    link.peer = None;
                }
            }
            Ok(Received::Truncated) => self.core.handle_truncated(now(), id),
            // The worker closed its end after leaving on purpose (or the link broke).
            Ok(Received::Closed) | Err(_) => self.close_link(id),
        }
        // Outputs first: a `Returned` or `Reclaimed` claims the fd that came with the frame; any
        // other fd is closed.
        self.drain_core();
        self.fds.clear();
    }

    /// `worker`'s process is gone: reads what it sent to the end, then closes its link.
    fn finish_link(&mut self, worker: WorkerId) {
        // Bounded: a process the worker started may have inherited its end and still write.
        for _ in 0..LAST_FRAMES {
            let Some(link) = self.links.get_mut(&worker) else {
                return;
            };
            let received = match link.channel.try_recv(&mut self.fds) {
                Ok(None) => break,
                Ok(Some(received)) => Ok(received),
                Err(error) => Err(error),
            };
            self.handle_received(worker, received);
        }
        self.close_link(worker);
        self.drain_core();
    }

    /// Drops `worker`'s link and tells the core, after taking back every connection the worker
    /// never got: those still queued here and those still in its receive queue.
    fn close_link(&mut self, worker: WorkerId) {
        let Some(mut link) = self.links.remove(&worker) else {
            return;
        };
        self.take_back_unsent(worker, std::mem::take(&mut link.outgoing));
        if let Some(peer) = &link.peer {
            self.read_back(worker, peer);
        }
        drop(link);
        self.core.handle_link_closed(now(), worker);
    }

    /// Frames queued for `worker` will not be sent: a connection's fd is still here and is
    /// dispatched again by the core; a user's fd is closed.
    fn take_back_unsent(
        &mut self,
        worker: WorkerId,
        unsent: impl IntoIterator<Item = (Vec<u8>, Option<Attachment<usize>>)>,
    ) {
        for (frame, attachment) in unsent {
            match attachment {
                Some(Attachment::Conn(conn)) => {
                    let reclaimed =
                        handoff_seq(&frame).and_then(|seq| self.core.handle_reclaimed(worker, seq));
                    if reclaimed != Some(conn) {
                        self.conns.try_remove(conn);
                    }
                }
                Some(Attachment::Owned(fd)) => {
                    self.conns.try_remove(fd);
                }
                _ => {}
            }
        }
    }

    /// Reads what `worker` never read from its end of the link: each connection there is the
    /// primary's again.
    fn read_back(&mut self, worker: WorkerId, peer: &OwnedFd) {
        let mut buf = vec![0; proto::wire::MAX_FRAME];
        let mut fds = Vec::new();
        while let Ok(datagram) = crate::sys::recv_frame(peer.as_fd(), &mut buf, &mut fds) {
            if datagram.len == 0 && fds.is_empty() {
                break;
            }
            let frame = &buf[..datagram.len.min(buf.len())];
            if let (Some(seq), [_]) = (handoff_seq(frame), &fds[..])
                && let Some(conn) = self.core.handle_reclaimed(worker, seq)
                && let Some(slot) = self.conns.get_mut(conn)
            {
                *slot = fds.pop();
            }
            // Anything else (a shared listener, a user's fd) is closed.
            fds.clear();
        }
    }

    fn poll_accepts(&mut self, cx: &mut Context<'_>) -> bool {
        if self.accept_resume.is_some_and(|t| now() < t) {
            return false;
        }
        self.accept_resume = None;
        let mut progress = false;
        self.handles.clear();
        self.handles.extend(self.listeners.keys());
        for i in 0..self.handles.len() {
            let handle = self.handles[i];
            for _ in 0..BUDGET {
                if !self.core.wants_connections(handle) {
                    break;
                }
                let Some(Listener {
                    socket: ListenerSocket::Accepting(listener),
                    ..
                }) = self.listeners.get(&handle)
                else {
                    break;
                };
                let accepted = match listener.poll_read_ready(cx) {
                    Poll::Pending => break,
                    Poll::Ready(Err(e)) => Err(e),
                    Poll::Ready(Ok(mut ready)) => {
                        match ready.try_io(|l| crate::sys::accept(l.get_ref().as_fd())) {
                            Ok(accepted) => {
                                // Ending the loop with an accept that fails would cost as much
                                // as one more connection: ask whether one waits, and if not,
                                // clear readiness (a connection arriving meanwhile raises a new
                                // edge, which the reactor has not seen yet, so it is not lost).
                                if accepted.is_ok()
                                    && !crate::sys::connection_waiting(ready.get_ref().as_fd())
                                {
                                    ready.clear_ready();
                                }
                                accepted
                            }
                            // No connection left: readiness is cleared, poll again to wait.
                            Err(_would_block) => continue,
                        }
                    }
                };
                progress = true;
                match accepted {
                    Ok(conn) => {
                        let conn = self.conns.insert(Some(conn));
                        if let Err(conn) = self.core.handle_connection(now(), handle, conn) {
                            self.conns.remove(conn);
                        }
                        self.drain_core();
                    }
                    Err(e) if is_connection_error(&e) => {}
                    Err(error) => {
                        // Node skips failed accepts too; back off so EMFILE does not spin.
                        tracing::warn!(%handle, %error, "accept failed; pausing accepts");
                        self.accept_resume = Some(now() + ACCEPT_BACKOFF);
                        return progress;
                    }
                }
            }
        }
        progress
    }

    fn poll_timer(&mut self, cx: &mut Context<'_>) -> bool {
        let deadline = [self.core.poll_timeout(), self.accept_resume]
            .into_iter()
            .flatten()
            .min();
        let Some(deadline) = deadline else {
            return false;
        };
        if now() >= deadline {
            self.core.handle_timeout(now());
            self.drain_core();
            return true;
        }
        if let Timer::Unset = self.timer {
            self.timer = match Alarm::new() {
                Ok(alarm) => Timer::Alarm(alarm),
                Err(error) => {
                    tracing::debug!(%error, "no timer fd; deadlines use a tokio timer");
                    Timer::sleep()
                }
            };
        }
        match &mut self.timer {
            Timer::Alarm(alarm) => match alarm.poll_ring(cx, deadline) {
                // Rang early (the deadline moved later): set it again on the next turn.
                Ok(rang) => rang,
                Err(error) => {
                    tracing::debug!(%error, "timer fd failed; deadlines use a tokio timer");
                    self.timer = Timer::sleep();
                    true
                }
            },
            Timer::Sleep(sleep) => {
                let deadline = tokio::time::Instant::from_std(deadline);
                if sleep.deadline() != deadline {
                    sleep.as_mut().reset(deadline);
                }
                // Registers the waker; the clock comparison above decides (a Sleep may be held
                // back by the cooperative budget).
                let _ = sleep.as_mut().poll(cx);
                false
            }
            Timer::Unset => false,
        }
    }

    fn flush_sends(&mut self, cx: &mut Context<'_>) -> bool {
        let mut progress = false;
        let mut broken = Vec::new();
        let mut hung_up = Vec::new();
        for (id, link) in &mut self.links {
            while let Some((frame, attachment)) = link.outgoing.front() {
                let fd = match attachment {
                    None => None,
                    Some(Attachment::Conn(conn) | Attachment::Owned(conn)) => self
                        .conns
                        .get(*conn)
                        .and_then(Option::as_ref)
                        .map(AsFd::as_fd),
                    Some(Attachment::Listener(handle)) => {
                        self.listeners.get(handle).map(Listener::as_fd)
                    }
                };
                if attachment.is_some() && fd.is_none() {
                    // The fd stays here until its frame is sent, so this is a bug; a frame
                    // without its fd would be a protocol error at the worker.
                    tracing::error!(worker = %id, "dropping a frame whose fd is gone");
                    link.outgoing.pop_front();
                    continue;
                }
                match link.channel.poll_send(cx, frame, fd) {
                    Poll::Pending => break,
                    Poll::Ready(Ok(())) => {
                        progress = true;
                        // The fd was copied into the datagram: the primary's copy goes. A
                        // connection's token stays until the core settles it.
                        match link.outgoing.pop_front() {
                            Some((_, Some(Attachment::Owned(fd)))) => {
                                self.conns.try_remove(fd);
                            }
                            Some((_, Some(Attachment::Conn(conn)))) => {
                                if let Some(slot) = self.conns.get_mut(conn) {
                                    *slot = None;
                                }
                            }
                            _ => {}
                        }
                    }
                    Poll::Ready(Err(error)) if is_hang_up(&error) => {
                        tracing::debug!(worker = %id, "the worker shut its link for reading; reading what it sends");
                        link.hung_up = true;
                        hung_up.push(*id);
                        progress = true;
                        break;
                    }
                    Poll::Ready(Err(error)) => {
                        tracing::debug!(worker = %id, %error, "link send failed");
                        broken.push(*id);
                        break;
                    }
                }
            }
        }
        for id in hung_up {
            if let Some(link) = self.links.get_mut(&id) {
                let unsent = std::mem::take(&mut link.outgoing);
                self.take_back_unsent(id, unsent);
            }
        }
        for id in broken {
            self.close_link(id);
            self.drain_core();
            progress = true;
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
                    self.conns.try_remove(conn);
                }
                Output::CloseLink { worker } => self.close_link(worker),
                Output::Returned { worker, handle } => self.take_back(worker, handle),
                Output::Reclaimed { conn, .. } => {
                    if let (Some(fd), Some(slot)) = (self.fds.pop(), self.conns.get_mut(conn)) {
                        *slot = Some(fd);
                    }
                }
                Output::Kill { worker, reason } => {
                    tracing::warn!(%worker, %reason, "killing worker");
                    if let Some(w) = self.workers.get(&worker) {
                        let _ = crate::sys::kill(w.pid, libc::SIGKILL);
                    }
                }
                Output::Event(event) => self.publish(event),
                other => tracing::error!(?other, "unexpected core output"),
            }
        }
    }

    /// A worker gave back a connection it could not serve: it is served by another worker, or
    /// closed if none is left.
    fn take_back(&mut self, worker: WorkerId, handle: HandleId) {
        // Checked to be a stream socket before the frame was handled.
        let Some(fd) = self.fds.pop() else { return };
        let conn = self.conns.insert(Some(fd));
        if let Err(conn) = self.core.handle_returned(now(), worker, handle, conn) {
            self.conns.remove(conn);
        }
    }

    fn publish(&mut self, event: proto::Event) {
        let handle = |workers: &HashMap<WorkerId, Arc<WorkerShared>>, id: &WorkerId| {
            workers.get(id).map(|shared| WorkerHandle {
                shared: shared.clone(),
                tx: self.input_tx.clone(),
            })
        };
        let event = match event {
            proto::Event::Online { worker, .. } => {
                let Some(w) = handle(&self.workers, &worker) else {
                    return;
                };
                w.shared.update(|s| s.state = proto::WorkerState::Online);
                Event::Online(w)
            }
            proto::Event::Listening { worker, addr, .. } => {
                let Some(w) = handle(&self.workers, &worker) else {
                    return;
                };
                w.shared.update(|s| s.state = proto::WorkerState::Listening);
                Event::Listening {
                    worker: w,
                    address: ListenAddress::from_bound(addr),
                }
            }
            proto::Event::Ready { worker } => {
                let Some(w) = handle(&self.workers, &worker) else {
                    return;
                };
                w.shared.update(|s| s.ready = true);
                Event::Ready(w)
            }
            proto::Event::User { worker, envelope } => {
                let fd = if envelope.fd { self.fds.pop() } else { None };
                let responder = match envelope.kind {
                    UserKind::Message => None,
                    UserKind::Request { seq } => {
                        let tx = self.input_tx.downgrade();
                        let responder: crate::message::Responder = Box::new(move |answer| {
                            tx.upgrade()
                                .and_then(|tx| {
                                    tx.send(Input::Answer {
                                        worker,
                                        ack: seq,
                                        answer,
                                    })
                                    .ok()
                                })
                                .ok_or_else(super::stopped)
                        });
                        Some(responder)
                    }
                    UserKind::Reply { ack } => {
                        if let Some(link) = self.links.get_mut(&worker) {
                            link.requests.finish(ack, Answer::Reply(envelope.payload));
                        }
                        return;
                    }
                    UserKind::Refusal { ack } => {
                        if let Some(link) = self.links.get_mut(&worker) {
                            let reason = String::from_utf8_lossy(&envelope.payload).into_owned();
                            link.requests.finish(ack, Answer::Refusal(reason));
                        }
                        return;
                    }
                };
                let Some(w) = handle(&self.workers, &worker) else {
                    return;
                };
                Event::Message {
                    worker: w,
                    message: Message::new(envelope.payload, fd, responder),
                }
            }
            proto::Event::Disconnect { worker } => {
                let Some(w) = handle(&self.workers, &worker) else {
                    return;
                };
                let eod = self
                    .core
                    .lifecycle(worker)
                    .and_then(proto::Lifecycle::exited_after_disconnect);
                w.shared.update(|s| {
                    s.state = proto::WorkerState::Disconnected;
                    s.connected = false;
                    s.exited_after_disconnect = eod;
                });
                Event::Disconnect(w)
            }
            proto::Event::Exit {
                worker,
                status,
                exited_after_disconnect,
                killed,
            } => {
                let Some(shared) = self.workers.remove(&worker) else {
                    return;
                };
                self.shared
                    .workers
                    .lock()
                    .expect("not poisoned")
                    .remove(&worker);
                let w = WorkerHandle {
                    shared,
                    tx: self.input_tx.clone(),
                };
                w.shared.update(|s| {
                    s.state = proto::WorkerState::Dead;
                    s.connected = false;
                    s.exited_after_disconnect = Some(exited_after_disconnect);
                    s.exit = Some(status);
                    s.killed = killed;
                });
                Event::Exit {
                    worker: w,
                    status,
                    killed,
                }
            }
            proto::Event::Error { worker, error } => {
                // The whole chain names the rule (`link protocol violated: protocol version
                // mismatch: ours 2, peer 99`), not only its family.
                tracing::warn!(%worker, error = %crate::env::ErrorChain(&error), "worker broke the protocol; disconnecting and killing it");
                let Some(w) = handle(&self.workers, &worker) else {
                    return;
                };
                Event::Error { worker: w, error }
            }
            other => {
                tracing::debug!(?other, "unhandled core event");
                return;
            }
        };
        self.shared.publish(event);
    }

    fn stats(&self) -> Stats {
        let mut workers: Vec<WorkerStats> = self
            .workers
            .values()
            .map(|w| (w, self.core.counters(w.id).unwrap_or_default()))
            .map(|(w, counters)| WorkerStats {
                id: w.id,
                pid: w.pid,
                state: self.core.state(w.id).unwrap_or(proto::WorkerState::Dead),
                in_flight: self.core.in_flight(w.id),
                handoffs: counters.handoffs,
                refused: counters.refused,
                returned: counters.returned,
            })
            .collect();
        workers.sort_by_key(|w| w.id);
        Stats {
            workers,
            connections_held: self.conns.iter().filter(|(_, fd)| fd.is_some()).count(),
            listeners: self.listeners.len(),
        }
    }

    fn fork(&mut self, env: &[(OsString, OsString)], image: &Image) -> io::Result<WorkerHandle> {
        let id = self.core.add_worker();
        let (mut child, channel, peer) =
            match spawn::spawn(&self.settings, image, id, env, self.batch_scheduling) {
                Ok(spawned) => spawned,
                Err(error) => {
                    self.core.handle_spawn_failed(id);
                    return Err(error);
                }
            };
        let pid = child.id().unwrap_or_default();
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
            Link {
                channel,
                peer: Some(peer),
                outgoing: VecDeque::new(),
                requests: PendingRequests::default(),
                hung_up: false,
            },
        );
        let tx = self.input_tx.clone();
        tokio::spawn(async move {
            let status = match child.wait().await {
                Ok(status) => match (status.code(), status.signal()) {
                    (Some(code), _) => ExitStatus::Code(code),
                    (None, Some(signal)) => ExitStatus::Signal(signal),
                    (None, None) => ExitStatus::Code(-1),
                },
                Err(error) => {
                    tracing::error!(worker = %id, %error, "waiting for worker failed");
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

    fn bind(
        &mut self,
        handle: HandleId,
        request: &ListenRequest,
        distribution: Distribution,
    ) -> Result<BoundAddr, Errno> {
        let errno = |e: io::Error| Errno(e.raw_os_error().unwrap_or(Errno::EINVAL.0));
        let bound = match crate::systemd::activated(request) {
            Some(activated) => activated,
            None => socket::bind(request, self.settings.backlog, false),
        }
        .map_err(errno)?;
        let socket::Bound { socket, addr, file } = bound;
        let fd = OwnedFd::from(socket);
        // An inherited datagram socket cannot be accepted on, whatever the policy.
        let accepting =
            distribution == Distribution::RoundRobin && request.kind == SocketKind::Stream;
        let socket = if accepting {
            ListenerSocket::Accepting(crate::sys::register_listener(fd).map_err(errno)?)
        } else {
            ListenerSocket::Shared(fd)
        };
        self.listeners.insert(
            handle,
            Listener {
                socket,
                _file: file,
            },
        );
        Ok(addr)
    }

    /// Queues a user frame for `worker`; an fd waits in the connection slab until sent.
    fn send_user(
        &mut self,
        worker: WorkerId,
        kind: UserKind,
        payload: Vec<u8>,
        fd: Option<OwnedFd>,
    ) {
        let envelope = Envelope {
            kind,
            fd: fd.is_some(),
            payload,
        };
        let token = fd.map(|fd| self.conns.insert(Some(fd)));
        // Sizes were checked when the value was encoded.
        if let Err((error, token)) = self.core.send_user(worker, envelope, token) {
            tracing::warn!(%worker, %error, "message not sent");
            if let Some(token) = token {
                self.conns.remove(token);
            }
        }
        self.drain_core();
    }
}

/// The seq of a `NewConn` frame.
fn handoff_seq(frame: &[u8]) -> Option<Seq> {
    match proto::wire::decode::<PrimaryMessage>(frame) {
        Ok(PrimaryMessage::NewConn { seq, .. }) => Some(seq),
        _ => None,
    }
}

/// Whether a frame that gives back a connection (`Refused`, `Return`) came with an fd that is
/// not one: only stream sockets may enter the connection slab and be handed to workers.
fn gives_back_something_else(frame: &[u8], fds: &[OwnedFd]) -> bool {
    let [fd] = fds else { return false };
    if !matches!(
        proto::wire::decode::<WorkerMessage>(frame),
        Ok(WorkerMessage::Refused { .. } | WorkerMessage::Return { .. })
    ) {
        return false;
    }
    let socket = socket2::SockRef::from(fd);
    let stream = matches!(socket.r#type(), Ok(t) if t == Type::STREAM);
    let family = matches!(socket.domain(), Ok(d) if d == Domain::IPV4 || d == Domain::IPV6 || d == Domain::UNIX);
    !(stream && family)
}

/// Errors of a send on a link whose other end is shut down for reading.
fn is_hang_up(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset
    )
}

/// Errors that concern one connection only (the next accept may succeed).
fn is_connection_error(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
    )
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
