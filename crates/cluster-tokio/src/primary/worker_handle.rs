//! The primary's handle on one worker, and the state it shares with the driver.

use std::fmt;
use std::io;
use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::time::Duration;

use proto::{ExitStatus, KillReason, WorkerId, WorkerState};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::sync::{mpsc, oneshot, watch};

use super::driver::Input;
use super::{Signal, stopped};
use crate::message::{DEFAULT_REQUEST_TIMEOUT, RequestError};

/// What a worker's handles show: a copy of the core's view, refreshed by the driver with each
/// event.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Status {
    pub(super) state: WorkerState,
    pub(super) ready: bool,
    pub(super) exited_after_disconnect: Option<bool>,
    pub(super) exit: Option<ExitStatus>,
    pub(super) killed: Option<KillReason>,
}

pub(crate) struct WorkerShared {
    pub(super) id: WorkerId,
    pub(super) pid: u32,
    pub(super) generation: u64,
    pub(super) disconnect_timeout: Duration,
    pub(super) status: watch::Sender<Status>,
    /// When the primary started it (made right after the spawn).
    pub(super) started: std::time::Instant,
    /// Asked to leave through a handle: a rolling reload does not replace a worker that is
    /// already on its way out (scaled away, say).
    pub(super) leaving: std::sync::atomic::AtomicBool,
}

impl WorkerShared {
    pub(super) fn new(
        id: WorkerId,
        pid: u32,
        generation: u64,
        disconnect_timeout: Duration,
    ) -> Self {
        let status = Status {
            state: WorkerState::None,
            ready: false,
            exited_after_disconnect: None,
            exit: None,
            killed: None,
        };
        Self {
            id,
            pid,
            generation,
            disconnect_timeout,
            status: watch::Sender::new(status),
            started: std::time::Instant::now(),
            leaving: std::sync::atomic::AtomicBool::new(false),
        }
    }

    pub(super) fn update(&self, f: impl FnOnce(&mut Status)) {
        self.status.send_modify(f);
    }
}

/// The primary's handle on one worker (Node's `Worker` in the primary). Cheap to clone.
#[derive(Clone)]
pub struct WorkerHandle {
    pub(super) shared: Arc<WorkerShared>,
    pub(super) tx: mpsc::UnboundedSender<Input>,
}

impl fmt::Debug for WorkerHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WorkerHandle")
            .field("id", &self.id().get())
            .field("pid", &self.pid())
            .field("state", &self.state())
            .finish()
    }
}

impl WorkerHandle {
    /// The worker's id (from 1, never reused).
    pub fn id(&self) -> WorkerId {
        self.shared.id
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.shared.pid
    }

    /// The generation it belongs to: 1 for the workers of the binary the primary started with;
    /// each rolling reload numbers its replacements with the next number (an aborted reload's
    /// number is not used again). Respawns and scale-ups join the last completed generation.
    pub fn generation(&self) -> u64 {
        self.shared.generation
    }

    /// How long ago the primary started its process.
    pub fn uptime(&self) -> Duration {
        self.shared.started.elapsed()
    }

    /// Where it is in its life.
    pub fn state(&self) -> WorkerState {
        self.shared.status.borrow().state
    }

    /// Whether its link to the primary is open.
    pub fn is_connected(&self) -> bool {
        self.shared.status.borrow().state < WorkerState::Disconnected
    }

    /// Whether it declared itself ready to serve ([`Worker::ready`](crate::Worker::ready)).
    pub fn is_ready(&self) -> bool {
        self.shared.status.borrow().ready
    }

    /// Whether its process has exited.
    pub fn is_dead(&self) -> bool {
        self.shared.status.borrow().exit.is_some()
    }

    /// `None` until it is asked to leave, disconnects or exits; then whether it left on purpose
    /// (the primary disconnected it, or it disconnected itself: `true` from the request on, as
    /// Node's). A [`Self::kill`] is just a signal and leaves this `false`, as in Node ≥ 15.
    pub fn exited_after_disconnect(&self) -> Option<bool> {
        self.shared.status.borrow().exited_after_disconnect
    }

    /// Why the primary killed it, once it is dead and if it did.
    pub fn killed(&self) -> Option<KillReason> {
        self.shared.status.borrow().killed
    }

    /// How it ended, once it has.
    pub fn exit_status(&self) -> Option<ExitStatus> {
        self.shared.status.borrow().exit
    }

    /// Sends it a signal (e.g. [`Signal::TERM`]). Does nothing once it is dead, so a recycled
    /// pid is never signalled.
    ///
    /// # Errors
    ///
    /// The signal could not be delivered.
    pub fn kill(&self, signal: Signal) -> io::Result<()> {
        if self.is_dead() {
            return Ok(());
        }
        crate::sys::kill(self.pid(), signal.as_raw())
    }

    /// Sends it a message, encoded with postcard, which the worker reads with
    /// [`Worker::recv`](crate::Worker::recv). Messages arrive in order; values larger than one
    /// frame are split and put back together transparently, up to 16 MiB
    /// ([`MAX_MESSAGE`](crate::message::MAX_MESSAGE)). Messages to a disconnected worker are
    /// dropped, as Node's `send` on a closed channel.
    ///
    /// # Errors
    ///
    /// The value cannot be encoded or is over 16 MiB (`InvalidInput`; nothing is sent).
    pub fn send<T: Serialize + ?Sized>(&self, value: &T) -> io::Result<()> {
        self.send_fd(value, None)
    }

    /// Sends it a message with a file descriptor, such as a socket (`std::net::TcpStream`,
    /// `UdpSocket`, `UnixStream`, any `OwnedFd`): the worker gets its own copy, with
    /// [`Message::take_fd`](crate::message::Message::take_fd). The primary's copy is closed once sent.
    ///
    /// # Errors
    ///
    /// As [`Self::send`]; on error the fd is closed.
    pub fn send_with_fd<T: Serialize + ?Sized>(
        &self,
        value: &T,
        fd: impl Into<OwnedFd>,
    ) -> io::Result<()> {
        self.send_fd(value, Some(fd.into()))
    }

    fn send_fd<T: Serialize + ?Sized>(&self, value: &T, fd: Option<OwnedFd>) -> io::Result<()> {
        let payload = crate::message::encode(value)?;
        self.tx
            .send(Input::Send {
                worker: self.id(),
                payload,
                fd,
            })
            .map_err(|_| stopped())
    }

    /// Asks the worker and waits for its answer (up to [`DEFAULT_REQUEST_TIMEOUT`], 30 s): the
    /// worker gets a message from [`Worker::recv_message`](crate::Worker::recv_message) that
    /// [`is_request`](crate::message::Message::is_request), and answers with [`Message::reply`](crate::message::Message::reply).
    ///
    /// # Errors
    ///
    /// [`RequestError`]: no answer in time, refused, the worker disconnected, or a reply of
    /// another type.
    pub async fn request<Q, R>(&self, request: &Q) -> Result<R, RequestError>
    where
        Q: Serialize + ?Sized,
        R: DeserializeOwned,
    {
        self.request_with_timeout(request, DEFAULT_REQUEST_TIMEOUT)
            .await
    }

    /// [`Self::request`] with its own timeout.
    ///
    /// # Errors
    ///
    /// As [`Self::request`].
    pub async fn request_with_timeout<Q, R>(
        &self,
        request: &Q,
        timeout: Duration,
    ) -> Result<R, RequestError>
    where
        Q: Serialize + ?Sized,
        R: DeserializeOwned,
    {
        let payload = crate::message::encode(request).map_err(RequestError::Send)?;
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Input::Request {
                worker: self.id(),
                payload,
                reply,
            })
            .map_err(|_| RequestError::Disconnected)?;
        crate::message::await_reply(rx, timeout).await
    }

    /// Asks it to disconnect gracefully (close its listeners, finish its connections, exit) and
    /// waits for its exit. The primary kills it if it has not exited within
    /// [`Settings::disconnect_timeout`](crate::Settings::disconnect_timeout), whether this
    /// future is still awaited or not: once asked, dropping the future cancels only the wait.
    /// Its [`Event::Exit`](crate::primary::Event::Exit) then says
    /// `killed: Some(KillReason::DisconnectTimeout)`.
    ///
    /// # Errors
    ///
    /// The primary's driver stopped.
    pub async fn disconnect(&self) -> io::Result<()> {
        self.disconnect_within(self.shared.disconnect_timeout).await
    }

    /// Asks it to leave within `deadline` (the core kills it then), then waits for its exit.
    /// The request is sent before the first poll returns. The other workers stay, so its idle
    /// connections are handed back to them.
    pub(crate) async fn disconnect_within(&self, deadline: Duration) -> io::Result<()> {
        self.leave(deadline, true).await
    }

    /// As [`Self::disconnect_within`]; `hand_back`: whether its idle connections may go to the
    /// other workers (not when they all stop).
    pub(crate) async fn leave(&self, deadline: Duration, hand_back: bool) -> io::Result<()> {
        self.shared
            .leaving
            .store(true, std::sync::atomic::Ordering::Relaxed);
        self.tx
            .send(Input::Disconnect {
                worker: self.id(),
                within: deadline,
                hand_back,
            })
            .map_err(|_| stopped())?;
        self.exited().await;
        Ok(())
    }

    /// Whether it was asked to leave through a handle (it may still be draining).
    pub(crate) fn is_leaving(&self) -> bool {
        self.shared
            .leaving
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Waits until its process has exited and returns how.
    pub async fn exited(&self) -> ExitStatus {
        let mut rx = self.shared.status.subscribe();
        let status = rx.wait_for(|s| s.exit.is_some()).await;
        match status {
            Ok(s) => s.exit.expect("checked by wait_for"),
            // The sender lives in `self.shared`, so it cannot be dropped while we wait.
            Err(_) => unreachable!("status sender outlives its handles"),
        }
    }
}
