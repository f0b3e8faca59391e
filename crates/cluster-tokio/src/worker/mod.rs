//! The worker side: this process's link to its primary ([`Worker`], and [`Worker::current`] to find
//! it from anywhere in a worker).

mod driver;
mod queue;

use std::fmt;
use std::io;
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use proto::WorkerId;
use proto::wire::ListenRequest;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::sync::{Mutex, mpsc, oneshot, watch};

use crate::ipc::Channel;
use crate::message::{DEFAULT_REQUEST_TIMEOUT, Message, RequestError};

pub(crate) use driver::Granted;
use driver::{Command, Driver};
pub(crate) use queue::{Conn, HandoffQueue};

/// How many connections handed to this worker have ended (for the primary's count of open
/// connections), and the driver's wake-up to report them.
#[derive(Debug, Default)]
pub(crate) struct Ended {
    count: std::sync::atomic::AtomicU64,
    changed: tokio::sync::Notify,
}

impl Ended {
    /// One more connection ended; `promptly`: the primary wants to know now (its handle said
    /// `report_ends`), otherwise it learns with the next ack or heartbeat. Wake-ups coalesce: the
    /// driver sends one frame for every connection that ended meanwhile.
    pub(crate) fn one(&self, promptly: bool) {
        self.count.fetch_add(1, Ordering::Release);
        if promptly {
            self.changed.notify_one();
        }
    }

    fn total(&self) -> u64 {
        self.count.load(Ordering::Acquire)
    }
}

/// How long a worker whose primary went away keeps running so in-flight work can finish.
pub const ORPHAN_GRACE: Duration = Duration::from_secs(1);

/// How long a worker whose `main` returned waits for its messages to go out before it exits.
pub const EXIT_FLUSH: Duration = Duration::from_secs(5);

static CURRENT: OnceLock<Worker> = OnceLock::new();

/// The link to the primary, as the worker sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum LinkState {
    Open,
    /// Closed after this worker left on purpose (the primary acknowledged).
    Left,
    /// Closed otherwise: the primary went away or broke the protocol.
    Lost,
}

/// This process's handle as a worker (Node's `cluster.worker`). Cheap to clone.
#[derive(Clone)]
pub struct Worker {
    inner: Arc<Inner>,
}

struct Inner {
    id: WorkerId,
    commands: mpsc::UnboundedSender<Command>,
    shutdown: watch::Receiver<bool>,
    link: watch::Receiver<LinkState>,
    deadline: Arc<OnceLock<tokio::time::Instant>>,
    /// The primary asked this worker to leave while others stay: idle connections go back to
    /// it rather than being closed.
    hand_back: Arc<AtomicBool>,
    messages: Mutex<mpsc::UnboundedReceiver<Message>>,
    holds: Arc<watch::Sender<Holds>>,
    ended: Arc<Ended>,
}

/// Who keeps the link open once this worker is leaving ([`Worker::hold_link`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Holds {
    /// [`LinkHold`]s alive.
    pub(crate) count: usize,
    /// Whether one was ever taken: if not, nothing said when the connections end, and the link
    /// stays open until `main` returns.
    pub(crate) taken: bool,
}

impl Holds {
    /// Whether the servers that said they serve are done.
    pub(crate) fn released(&self) -> bool {
        self.taken && self.count == 0
    }
}

impl fmt::Debug for Worker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Worker")
            .field("id", &self.id().get())
            .finish_non_exhaustive()
    }
}

/// The last error the primary answered a bind of this worker with (an errno; 0: none): the
/// primary reports that failure itself, with the address.
static REFUSED_BIND: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(0);

pub(crate) fn bind_refused(errno: i32) {
    REFUSED_BIND.store(errno, Ordering::Relaxed);
}

/// Whether `message` is what the bind the primary refused last says: the error `main` returns
/// when it passed that failure on as it came.
pub(crate) fn refused_bind_said(message: &str) -> bool {
    match REFUSED_BIND.load(Ordering::Relaxed) {
        0 => false,
        errno => io::Error::from_raw_os_error(errno).to_string() == message,
    }
}

/// The current worker, if this process is one ([`Worker::current`]).
pub(crate) fn current() -> Option<Worker> {
    CURRENT.get().cloned()
}

impl Worker {
    /// This process's worker, if it is one (Node's `cluster.worker`): `None` in the primary and
    /// in a process that runs unclustered.
    #[must_use]
    pub fn current() -> Option<Self> {
        current()
    }

    /// Connects this process to its primary over the inherited link and registers it as the
    /// current worker.
    pub(crate) fn start(id: WorkerId, ipc: OwnedFd) -> io::Result<Self> {
        if let Some(existing) = CURRENT.get() {
            return Ok(existing.clone());
        }
        crate::sys::raise_fd_limit();
        let channel = Channel::new(ipc)?;
        let (commands, command_rx) = mpsc::unbounded_channel();
        let (shutdown_tx, shutdown) = watch::channel(false);
        let (link_tx, link) = watch::channel(LinkState::Open);
        let deadline = Arc::new(OnceLock::new());
        let hand_back = Arc::new(AtomicBool::new(false));
        let (message_tx, messages) = mpsc::unbounded_channel();
        let holds = Arc::new(watch::Sender::new(Holds::default()));
        let ended = Arc::new(Ended::default());
        let worker = Self {
            inner: Arc::new(Inner {
                id,
                commands,
                shutdown,
                link,
                deadline: deadline.clone(),
                hand_back: hand_back.clone(),
                messages: Mutex::new(messages),
                holds: holds.clone(),
                ended: ended.clone(),
            }),
        };
        let answers = worker.inner.commands.downgrade();
        let driver = Driver::new(
            channel,
            command_rx,
            answers,
            shutdown_tx,
            link_tx,
            deadline,
            message_tx,
        )
        .with_holds(holds.subscribe())
        .with_hand_back(hand_back)
        .with_ended(ended);
        tokio::spawn(driver.run());
        survive_user_signals();
        Ok(CURRENT.get_or_init(|| worker).clone())
    }

    /// This worker's id (the primary's `WorkerHandle::id`).
    pub fn id(&self) -> WorkerId {
        self.inner.id
    }

    /// Whether the link to the primary is open (Node's `worker.isConnected()`). Once this worker
    /// leaves (the primary asked it to disconnect, or [`Self::disconnect`]) its listeners close
    /// at once, but the link stays open while it finishes its connections, as a Node worker's
    /// channel stays open until its servers have closed: until every [`LinkHold`] is dropped
    /// (the serve helpers hold one until their drain ends), or, if none was ever taken, until
    /// `main` returns. It also closes when the primary goes away.
    pub fn is_connected(&self) -> bool {
        *self.inner.link.borrow() == LinkState::Open
    }

    /// Resolves when the link to the primary has closed (Node's `'disconnect'` event in a
    /// worker; the primary's [`Event::Disconnect`](crate::primary::Event::Disconnect) comes at
    /// the same moment); see [`Self::is_connected`].
    pub async fn disconnected(&self) {
        let mut rx = self.inner.link.clone();
        let _ = rx.wait_for(|state| *state != LinkState::Open).await;
    }

    /// Says that this worker still serves connections: once it is leaving, the link to the
    /// primary (and so the primary's `Disconnect`) waits until every hold is dropped, as Node's
    /// worker waits for its servers' `close` before it disconnects. Dropping the last hold
    /// says "my connections are done". The serve helpers (`cluster::axum::serve`…) take one
    /// for as long as they run, drain included; a hand-written accept loop takes one and
    /// drops it once its connections have ended (clones count too: one per connection task
    /// works).
    ///
    /// If no hold is ever taken, the runtime cannot know when the connections end: the link
    /// then stays open until `main` returns. Either way a worker still there at the
    /// primary's deadline ([`Self::leave_deadline`]) is killed, holds or not. A worker with
    /// both a serve helper and a hand-written loop should hold for the loop too: the link
    /// closes when the last hold goes.
    ///
    /// ```no_run
    /// # async fn dox(worker: cluster_tokio::Worker) -> std::io::Result<()> {
    /// let mut listener = cluster_tokio::ClusterListener::bind("127.0.0.1:3000").await?;
    /// let hold = worker.hold_link();
    /// let mut connections = tokio::task::JoinSet::new();
    /// loop {
    ///     let (stream, _) = tokio::select! {
    ///         accepted = listener.accept() => accepted?,
    ///         () = worker.shutdown() => break,
    ///     };
    ///     connections.spawn(async move { /* serve `stream` */ drop(stream) });
    /// }
    /// connections.join_all().await;
    /// drop(hold); // the link closes now: the primary's `Disconnect`
    /// # Ok(()) }
    /// ```
    pub fn hold_link(&self) -> LinkHold {
        LinkHold::new(self.inner.holds.clone())
    }

    /// When the primary kills this worker if it has not exited: set once the primary asked it to
    /// leave (the disconnect timeout of a SIGTERM, a reload or a scale-down; 5 s at most for a
    /// SIGINT), `None` before, and when this worker left of its own accord or lost its primary.
    /// A server draining its connections should be done before it. This is the one source of
    /// the deadline in a worker: the serve helpers' drains end a little before it, and where
    /// there is none, after [`DEFAULT_LEAVE_TIMEOUT`].
    pub fn leave_deadline(&self) -> Option<tokio::time::Instant> {
        self.inner.deadline.get().copied()
    }

    /// Whether the primary asked this worker to leave, or went away.
    pub fn is_shutting_down(&self) -> bool {
        *self.inner.shutdown.borrow()
    }

    /// Resolves when this worker should stop serving: the primary asked it to disconnect, it
    /// disconnected itself, or the primary went away. Listeners stop yielding connections at the
    /// same moment. Pass it to `axum::serve(..).with_graceful_shutdown(..)`.
    pub async fn shutdown(&self) {
        let mut rx = self.inner.shutdown.clone();
        let _ = rx.wait_for(|v| *v).await;
    }

    /// Sends a message to the primary, encoded with postcard; it arrives as
    /// [`Primary::messages`](crate::Primary::messages). Messages arrive in the order they are sent.
    /// Values larger than one frame are split and put back together transparently, up to
    /// [`MAX_MESSAGE`](crate::message::MAX_MESSAGE) (16 MiB).
    ///
    /// # Errors
    ///
    /// The value cannot be encoded or is over 16 MiB (`InvalidInput`, nothing is sent), or the
    /// link is closed (`NotConnected`).
    pub fn send<T: Serialize + ?Sized>(&self, value: &T) -> io::Result<()> {
        let payload = crate::message::encode(value)?;
        self.command(Command::Send { payload, fd: None })
    }

    /// Sends a message with a file descriptor, such as a socket (`std::net::TcpStream`,
    /// `UdpSocket`, `UnixStream`, or any `OwnedFd`): the primary gets its own copy, with
    /// [`Message::take_fd`]. Tokio sockets convert with `into_std()`.
    ///
    /// # Errors
    ///
    /// As [`Self::send`]; on error the fd is closed.
    pub fn send_with_fd<T: Serialize + ?Sized>(
        &self,
        value: &T,
        fd: impl Into<OwnedFd>,
    ) -> io::Result<()> {
        let payload = crate::message::encode(value)?;
        self.command(Command::Send {
            payload,
            fd: Some(fd.into()),
        })
    }

    /// The next message from the primary, decoded as `T`; `None` once the link is closed and
    /// every message was read. A request read this way is refused (it has no way to be
    /// answered); use [`Self::recv_message`] where requests may come.
    ///
    /// # Errors
    ///
    /// The message is not a `T` (see [`Message::decode`]).
    pub async fn recv<T: DeserializeOwned>(
        &self,
    ) -> Option<Result<T, crate::message::DecodeError>> {
        let message = self.recv_message().await?;
        Some(message.decode())
    }

    /// The next message or request from the primary, undecoded, with its fd and its reply
    /// handle; `None` once the link is closed and every message was read.
    pub async fn recv_message(&self) -> Option<Message> {
        self.inner.messages.lock().await.recv().await
    }

    /// Asks the primary and waits for its answer (up to [`DEFAULT_REQUEST_TIMEOUT`], 30 s): the
    /// primary gets an [`Primary::messages`](crate::Primary::messages) whose message
    /// [`is_request`](Message::is_request), and answers with [`Message::reply`].
    ///
    /// # Errors
    ///
    /// [`RequestError`]: no answer in time, refused, link closed, or a reply of another type.
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
        self.command(Command::Request { payload, reply })
            .map_err(|_| RequestError::Disconnected)?;
        crate::message::await_reply(rx, timeout).await
    }

    /// Leaves the cluster on purpose (Node's `worker.disconnect()` in a worker): closes every
    /// listener, tells the primary (so its `exited_after_disconnect` is true), and resolves once
    /// the primary acknowledged. The link then closes when this worker's connections are done
    /// (see [`Self::hold_link`]); the process keeps running until `main` returns. The runtime
    /// does the same by itself when the primary asks this worker to disconnect; calling it
    /// again after either is harmless.
    ///
    /// # Errors
    ///
    /// The link closed without this worker leaving (the primary went away).
    pub async fn disconnect(&self) -> io::Result<()> {
        if *self.inner.link.borrow() == LinkState::Left {
            return Ok(());
        }
        let (reply, rx) = oneshot::channel();
        let asked = self.command(Command::Disconnect { reply });
        match (asked, rx.await) {
            (Ok(()), Ok(result)) => result,
            // The driver ended meanwhile: fine if it was by leaving.
            _ if *self.inner.link.borrow() == LinkState::Left => Ok(()),
            _ => Err(not_connected()),
        }
    }

    /// Waits until every message sent so far is in the link's buffer, from where it reaches
    /// the primary even if this process exits right after. Returning from `main` in a worker
    /// does this by itself (for up to [`EXIT_FLUSH`]); call it before ending the process any
    /// other way, such as `std::process::exit`.
    ///
    /// # Errors
    ///
    /// The link closed before they all went out (`NotConnected`).
    pub async fn flush(&self) -> io::Result<()> {
        let (reply, rx) = oneshot::channel();
        self.command(Command::Flush { reply })?;
        rx.await.map_err(|_| not_connected())
    }

    pub(crate) async fn listen(&self, request: ListenRequest) -> io::Result<Granted> {
        let (reply, rx) = oneshot::channel();
        self.command(Command::Listen { request, reply })?;
        let mut pending = PendingListen {
            worker: self,
            rx: Some(rx),
        };
        let rx = pending.rx.as_mut().expect("set above");
        let granted = rx.await.map_err(|_| not_connected())?;
        pending.rx = None;
        granted
    }

    pub(crate) fn close(&self, handle: proto::HandleId) {
        let _ = self.command(Command::Close { handle });
    }

    /// Tells the primary this worker is ready to serve: its warm-up is done (caches filled,
    /// connections to databases open). Only the first call counts. The primary reports
    /// [`Event::Ready`](crate::primary::Event::Ready); with
    /// [`Settings::wait_ready`](crate::Settings::wait_ready), starts and rolling reloads wait for
    /// it (within the boot timeout) instead of for the worker's first listener. Also
    /// [`cluster::ready()`](crate::ready), which works in any process.
    pub fn ready(&self) {
        let _ = self.command(Command::ServiceReady);
    }

    pub(crate) fn has_room(&self, handle: proto::HandleId) {
        let _ = self.command(Command::Ready { handle });
    }

    /// Gives unaccepted connections of `handle` back to the primary, to be served elsewhere.
    pub(crate) fn give_back(&self, handle: proto::HandleId, conns: Vec<Conn>) {
        if !conns.is_empty() {
            let _ = self.command(Command::GiveBack { handle, conns });
        }
    }

    /// Hands `conn`, a connection of `handle` stopped between two requests, back to the
    /// primary with `unread`, the bytes read from it and not used.
    pub(crate) fn hand_back(
        &self,
        handle: proto::HandleId,
        conn: OwnedFd,
        unread: Vec<u8>,
    ) -> Result<(), (OwnedFd, Vec<u8>)> {
        let command = Command::HandBack {
            handle,
            conn,
            unread,
        };
        match self.inner.commands.send(command) {
            Ok(()) => Ok(()),
            Err(mpsc::error::SendError(Command::HandBack { conn, unread, .. })) => {
                Err((conn, unread))
            }
            Err(_) => unreachable!("the command sent comes back"),
        }
    }

    /// Tells the primary this worker's listener on `handle` reads a prefix before the socket.
    pub(crate) fn takes_prefixes(&self, handle: proto::HandleId) {
        let _ = self.command(Command::TakesPrefixes { handle });
    }

    /// Whether the primary asked this worker to leave while other workers stay, so that its
    /// idle connections can be handed back ([`crate::net::HandBack`]) rather than closed.
    /// False until it is asked to leave, and when the whole cluster stops.
    pub fn hand_back_wanted(&self) -> bool {
        self.inner.hand_back.load(Ordering::Acquire)
    }

    /// The count of this worker's connections that ended.
    pub(crate) fn ended(&self) -> &Arc<Ended> {
        &self.inner.ended
    }

    pub(crate) fn shutdown_receiver(&self) -> watch::Receiver<bool> {
        self.inner.shutdown.clone()
    }

    fn command(&self, command: Command) -> io::Result<()> {
        self.inner
            .commands
            .send(command)
            .map_err(|_| not_connected())
    }
}

/// Keeps the link to the primary open while this worker finishes its connections, once it is
/// leaving: see [`Worker::hold_link`]. Cloning takes another hold; dropping the last says the
/// connections are done.
#[must_use = "the link closes when the last hold is dropped"]
pub struct LinkHold {
    holds: Arc<watch::Sender<Holds>>,
}

impl LinkHold {
    fn new(holds: Arc<watch::Sender<Holds>>) -> Self {
        holds.send_modify(|h| {
            h.count += 1;
            h.taken = true;
        });
        Self { holds }
    }
}

impl Clone for LinkHold {
    fn clone(&self) -> Self {
        Self::new(self.holds.clone())
    }
}

impl Drop for LinkHold {
    fn drop(&mut self) {
        self.holds.send_modify(|h| h.count -= 1);
    }
}

impl fmt::Debug for LinkHold {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LinkHold")
            .field("holds", &self.holds.borrow().count)
            .finish()
    }
}

/// How long a process leaves itself to finish its connections when no primary gave it a
/// deadline ([`Worker::leave_deadline`] is `None`: an unclustered process, or a worker leaving
/// on its own): the default of [`Settings::disconnect_timeout`](crate::Settings::disconnect_timeout).
/// The serve helpers' drains end a little before it.
pub const DEFAULT_LEAVE_TIMEOUT: Duration = Duration::from_secs(30);

/// A listen whose future may be dropped: the driver closes a grant it could not deliver, but a
/// grant delivered into the channel just before the drop is only found here.
struct PendingListen<'a> {
    worker: &'a Worker,
    rx: Option<oneshot::Receiver<io::Result<Granted>>>,
}

impl Drop for PendingListen<'_> {
    fn drop(&mut self) {
        if let Some(Ok(Ok(granted))) = self.rx.as_mut().map(oneshot::Receiver::try_recv) {
            if let Granted::RoundRobin { handle, queue, .. } = &granted {
                self.worker.give_back(*handle, queue.close());
            }
            self.worker.close(granted.handle());
        }
    }
}

pub(crate) fn not_connected() -> io::Error {
    io::Error::new(
        io::ErrorKind::NotConnected,
        "the link to the cluster primary is closed",
    )
}

/// SIGUSR1 and SIGUSR2 end a process by default: an operator's `pkill -USR1 my-service`
/// (logrotate's habit) or the primary passing SIGUSR1 on must not kill the workers. They are
/// listened for here and dropped; the program's own code may listen too (Tokio gives every
/// listener each signal).
fn survive_user_signals() {
    for kind in [
        tokio::signal::unix::SignalKind::user_defined1(),
        tokio::signal::unix::SignalKind::user_defined2(),
    ] {
        if let Ok(mut signals) = tokio::signal::unix::signal(kind) {
            tokio::spawn(async move { while signals.recv().await.is_some() {} });
        }
    }
}
