//! Listening sockets: binding what workers ask for, and accepting on round-robin handles.

use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::task::{Context, Poll};
use std::time::Duration;

use proto::wire::{BoundAddr, Distribution, Errno, ListenRequest, SocketKind};
use proto::{HandleId, WorkerId};
use tokio::io::unix::AsyncFd;

use super::{BUDGET, Driver, Held, now};
use crate::socket::{self, SocketFile};

/// Pause after an accept error that is not about one connection (EMFILE, ENFILE, ENOBUFS).
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

pub(super) struct Listener {
    /// The Unix socket file, removed with the handle, before the socket closes (fields drop in
    /// order): nobody sees a file whose socket refuses connections and takes it for stale.
    _file: Option<SocketFile>,
    socket: ListenerSocket,
}

pub(super) enum ListenerSocket {
    /// Round robin: the primary accepts. Readiness comes from the reactor, but accepted
    /// connections are never registered with it: the primary only passes them on, so
    /// registering would cost two `epoll_ctl` per connection for nothing.
    Accepting(AsyncFd<OwnedFd>),
    /// Shared: the fd is sent to workers, who accept (or receive datagrams) on it.
    Shared(OwnedFd),
}

impl Listener {
    pub(super) fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        match &self.socket {
            ListenerSocket::Accepting(l) => l.get_ref().as_fd(),
            ListenerSocket::Shared(l) => l.as_fd(),
        }
    }
}

impl Driver {
    pub(super) fn poll_accepts(&mut self, cx: &mut Context<'_>) -> bool {
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
                        let accepted = now();
                        let conn = self.tokens.insert(Held {
                            fd: Some(conn),
                            accepted: Some(accepted),
                        });
                        if let Err(conn) = self.core.handle_connection(accepted, handle, conn) {
                            self.tokens.remove(conn);
                        }
                        self.drain_core();
                    }
                    Err(e) if is_connection_error(&e) => self.accept_errors += 1,
                    Err(error) => {
                        self.accept_errors += 1;
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

    pub(super) fn bind(
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

    /// A worker gave back a connection it could not serve, or one it served and stopped
    /// between two requests as it left (`handed_back`, with the bytes it read and did not use):
    /// it is served by another worker, or closed if none is left.
    pub(super) fn take_back(
        &mut self,
        worker: WorkerId,
        handle: HandleId,
        prefix: Vec<u8>,
        handed_back: bool,
    ) {
        // Checked to be a connected stream socket before the frame was handled.
        let Some(fd) = self.received.pop() else {
            return;
        };
        if handed_back {
            self.handed_back += 1;
        }
        let conn = self.tokens.insert(Held::new(fd));
        if let Err(conn) = self
            .core
            .handle_returned(now(), worker, handle, conn, prefix)
        {
            self.tokens.remove(conn);
        }
    }
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
