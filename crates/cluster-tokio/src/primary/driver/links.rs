//! Worker links: frames in and out, and what a worker never read, read back when it is gone.

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::task::{Context, Poll};

use proto::{Attachment, FdKind, WorkerId};
use socket2::{Domain, Type};

use super::accept::Listener;
use super::{BUDGET, Driver, now};
use crate::ipc::{Channel, Received};
use crate::message::Waiters;
use crate::primary::messages::Delivered;

/// Frames read from a gone worker's link at most; a full socket buffer holds far fewer.
const LAST_FRAMES: usize = 65_536;
pub(super) struct WorkerLink {
    pub(super) channel: Channel,
    /// A duplicate of the worker's end: keeps the datagrams it has not read (and their fds)
    /// after it is gone, to be read back. Never registered with the reactor. Dropped once the
    /// core needs no read-back (the worker left on purpose), so that its close is seen.
    pub(super) peer: Option<OwnedFd>,
    pub(super) outgoing: VecDeque<(Vec<u8>, Option<Attachment<usize>>)>,
    /// Who waits for answers to the primary's requests to this worker; dropped with the link,
    /// which fails them.
    pub(super) waiters: Waiters,
    /// The worker shut its end down for reading (a send failed with `EPIPE`): nothing more is
    /// sent, but what the worker sends is still read until its process is gone.
    pub(super) hung_up: bool,
    /// A message it sent waits for room in the user's queue: its link is not read until it
    /// fits (`primary/messages.rs`), and the core suspends its deadlines meanwhile.
    pub(super) held: bool,
}

impl Driver {
    pub(super) fn poll_links(&mut self, cx: &mut Context<'_>) -> bool {
        let mut progress = self.release_held(cx);
        self.ids.clear();
        self.ids.extend(self.links.keys());
        for i in 0..self.ids.len() {
            let id = self.ids[i];
            for _ in 0..BUDGET {
                let Some(link) = self.links.get_mut(&id) else {
                    break;
                };
                // Not read while one of its messages waits for room: the kernel's buffer then
                // slows its sends, and nothing it sends piles up here.
                if link.held {
                    break;
                }
                let received = match link.channel.poll_recv(cx, &mut self.received) {
                    Poll::Pending => break,
                    Poll::Ready(received) => received,
                };
                progress = true;
                self.handle_received(id, received);
            }
        }
        // A message held just now: the queue must know whom to wake when the reader makes room.
        progress | self.release_held(cx)
    }

    /// Moves held messages into the user's queue as room allows; links whose messages all fit
    /// are read again, and their deadlines resume. The queue wakes this task when room is made.
    fn release_held(&mut self, cx: &Context<'_>) -> bool {
        // Kept per worker, not per link: a worker that exited while held has no link, and its
        // messages are still to be delivered (or dropped, if the reader left).
        if self.held_messages.is_empty() {
            return false;
        }
        let Some(queue) = self.shared.messages.current() else {
            return false;
        };
        let (released, dropped) = queue.flush_held(cx.waker());
        for _ in 0..dropped {
            self.shared.messages.count_dropped();
        }
        for worker in &released {
            self.held_messages.remove(worker);
            if let Some(link) = self.links.get_mut(worker) {
                link.held = false;
            }
            self.core.release(now(), *worker);
        }
        !released.is_empty()
    }

    /// Hands a message from `worker` to the user's queue: held if it is full (the link is not
    /// read until it fits), dropped if nobody reads messages (as Node drops a message nobody
    /// listens for), with a debug line and [`Primary::messages_dropped`](crate::Primary::messages_dropped).
    pub(super) fn deliver_message(
        &mut self,
        worker: WorkerId,
        handle: crate::primary::WorkerHandle,
        message: crate::message::Message,
    ) {
        let delivered = match self.shared.messages.current() {
            Some(queue) => queue.deliver(worker, (handle, message)),
            None => Err((handle, message)),
        };
        match delivered {
            Ok(Delivered::Queued) => {}
            Ok(Delivered::Held) => {
                self.held_messages.insert(worker);
                if let Some(link) = self.links.get_mut(&worker) {
                    link.held = true;
                }
                self.core.hold(now(), worker);
            }
            Err(dropped) => {
                self.shared.messages.count_dropped();
                tracing::debug!(
                    worker = worker.get(),
                    "message dropped: nobody reads `Primary::messages()`"
                );
                drop(dropped);
            }
        }
    }

    /// Hands what came from `worker`'s link to the core and acts on the outcome.
    pub(super) fn handle_received(&mut self, id: WorkerId, received: io::Result<Received>) {
        match received {
            Ok(Received::Frame { len }) => {
                let Some(link) = self.links.get(&id) else {
                    return;
                };
                let frame = link.channel.frame(len);
                self.kinds.clear();
                self.kinds.extend(self.received.iter().map(fd_kind));
                self.core.handle_frame(now(), id, frame, &self.kinds);
            }
            Ok(Received::Truncated) => self.core.handle_truncated(now(), id),
            // The worker closed its end after leaving on purpose (or the link broke).
            Ok(Received::Closed) | Err(_) => self.close_link(id),
        }
        // Outputs first: a `Returned` or `Reclaimed` claims the fd that came with the frame; any
        // other fd is closed.
        self.drain_core();
        self.received.clear();
    }

    /// `worker`'s process is gone: reads what it sent to the end, then closes its link.
    pub(super) fn finish_link(&mut self, worker: WorkerId) {
        // Bounded: a process the worker started may have inherited its end and still write.
        for _ in 0..LAST_FRAMES {
            let Some(link) = self.links.get_mut(&worker) else {
                return;
            };
            let received = match link.channel.try_recv(&mut self.received) {
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
    pub(super) fn close_link(&mut self, worker: WorkerId) {
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
    pub(super) fn take_back_unsent(
        &mut self,
        worker: WorkerId,
        unsent: impl IntoIterator<Item = (Vec<u8>, Option<Attachment<usize>>)>,
    ) {
        for (_, attachment) in unsent {
            match attachment {
                // Kept under its token, to be dispatched again, unless the core says otherwise.
                Some(Attachment::Conn { conn, seq })
                    if self.core.handle_reclaimed(now(), worker, seq) != Some(conn) =>
                {
                    self.tokens.try_remove(conn);
                }
                Some(Attachment::Owned(fd)) => {
                    self.tokens.try_remove(fd);
                }
                Some(Attachment::Conn { .. } | Attachment::Listener(_)) | None => {}
            }
        }
    }

    /// Reads what `worker` never read from its end of the link: each connection there is the
    /// primary's again.
    pub(super) fn read_back(&mut self, worker: WorkerId, peer: &OwnedFd) {
        let mut buf = vec![0; proto::wire::MAX_FRAME];
        let mut fds = Vec::new();
        while let Ok(datagram) = crate::sys::recv_frame(peer.as_fd(), &mut buf, &mut fds) {
            if datagram.len == 0 && fds.is_empty() {
                break;
            }
            let frame = &buf[..datagram.len.min(buf.len())];
            if let Some(conn) = self.core.handle_read_back(worker, frame, fds.len())
                && let Some(held) = self.tokens.get_mut(conn)
            {
                held.fd = fds.pop();
            }
            // Anything else (a shared listener, a user's fd) is closed.
            fds.clear();
        }
    }

    pub(super) fn flush_sends(&mut self, cx: &mut Context<'_>) -> bool {
        let mut progress = false;
        let mut broken = Vec::new();
        let mut hung_up = Vec::new();
        for (id, link) in &mut self.links {
            while let Some((frame, attachment)) = link.outgoing.front() {
                let fd = match attachment {
                    None => None,
                    Some(Attachment::Conn { conn, .. } | Attachment::Owned(conn)) => self
                        .tokens
                        .get(*conn)
                        .and_then(|held| held.fd.as_ref())
                        .map(AsFd::as_fd),
                    Some(Attachment::Listener(handle)) => {
                        self.listeners.get(handle).map(Listener::as_fd)
                    }
                };
                if attachment.is_some() && fd.is_none() {
                    // The fd stays here until its frame is sent, so this is a bug; a frame
                    // without its fd would be a protocol error at the worker.
                    tracing::error!(worker = id.get(), "dropping a frame whose fd is gone");
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
                                self.tokens.try_remove(fd);
                            }
                            Some((_, Some(Attachment::Conn { conn, .. }))) => {
                                self.handoffs += 1;
                                if let Some(held) = self.tokens.get_mut(conn) {
                                    held.fd = None;
                                    if let Some(accepted) = held.accepted.take() {
                                        self.handoff_latency
                                            .observe(now().saturating_duration_since(accepted));
                                    }
                                }
                            }
                            _ => {}
                        }
                    }
                    Poll::Ready(Err(error)) if is_hang_up(&error) => {
                        tracing::debug!(
                            worker = id.get(),
                            "the worker shut its link for reading; reading what it sends"
                        );
                        link.hung_up = true;
                        hung_up.push(*id);
                        progress = true;
                        break;
                    }
                    Poll::Ready(Err(error)) => {
                        tracing::debug!(worker = id.get(), %error, "link send failed");
                        broken.push(*id);
                        break;
                    }
                }
            }
        }
        for id in hung_up {
            // Offered nothing more; what it was about to be sent goes to other workers now.
            self.core.handle_deaf(now(), id);
            if let Some(link) = self.links.get_mut(&id) {
                let unsent = std::mem::take(&mut link.outgoing);
                self.take_back_unsent(id, unsent);
            }
            self.drain_core();
        }
        for id in broken {
            self.close_link(id);
            self.drain_core();
            progress = true;
        }
        progress
    }
}

/// Errors of a send on a link whose other end is shut down for reading.
fn is_hang_up(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset
    )
}

/// What an fd that came with a frame is: the core decides whether it may be one. A listening
/// socket is not a connection (a connection the peer has reset still is: its worker did nothing
/// wrong).
fn fd_kind(fd: &OwnedFd) -> FdKind {
    let socket = socket2::SockRef::from(fd);
    let stream = matches!(socket.r#type(), Ok(t) if t == Type::STREAM);
    let family = matches!(
        socket.domain(),
        Ok(d) if d == Domain::IPV4 || d == Domain::IPV6 || d == Domain::UNIX
    );
    if stream && family && matches!(socket.is_listener(), Ok(false)) {
        FdKind::Connection
    } else {
        FdKind::Other
    }
}
