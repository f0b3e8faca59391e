//! The primary: forks workers, owns the listening sockets and hands out connections
//! ([`Primary`]), and what it tells about its workers ([`Event`], [`WorkerHandle`], [`Stats`]).

mod alarm;
mod driver;
pub(crate) mod holding;
mod image;
mod latency;
mod spawn;

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use proto::wire::BoundAddr;
pub use proto::{
    ExitStatus, KillReason, LinkError, ProtocolError, SchedulingPolicy, WorkerId, WorkerState,
};
use std::os::fd::OwnedFd;

use serde::Serialize;
use serde::de::DeserializeOwned;

pub use crate::message::Message;
use crate::message::{DEFAULT_REQUEST_TIMEOUT, RequestError};
use tokio::sync::{mpsc, oneshot, watch};

use crate::settings::{Settings, SettingsError};
use crate::supervisor::{AbortReason, ReloadAborted, ReloadError, ReloadReport};
use driver::{Driver, Input};

pub use image::Binary;
pub(crate) use image::Image;
pub use latency::HandoffLatency;
pub use signal::Signal;

mod signal;

/// The primary process's handle on its cluster. Cheap to clone.
///
/// # Examples
///
/// ```no_run
/// # async fn dox() -> std::io::Result<()> {
/// use cluster_tokio::primary::Event;
/// use cluster_tokio::{Primary, Settings};
///
/// let primary = Primary::start(Settings::new())?;
/// let mut events = primary.events();
/// for _ in 0..2 {
///     primary.fork().await?;
/// }
/// while let Some(event) = events.recv().await {
///     if let Event::Exit { worker, status, .. } = event {
///         eprintln!("worker {} exited: {status}", worker.id());
///     }
/// }
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct Primary {
    tx: mpsc::UnboundedSender<Input>,
    shared: Arc<PrimaryShared>,
}

pub(crate) struct PrimaryShared {
    subscribers: Mutex<Vec<mpsc::UnboundedSender<Event>>>,
    workers: Mutex<BTreeMap<WorkerId, WorkerHandle>>,
    settings: Settings,
    reloading: tokio::sync::Mutex<()>,
    /// The program of the current generation: what forks, respawns and scale-ups run.
    image: Mutex<Arc<Image>>,
    /// The number the next reload's generation gets (never reused, aborted reloads included).
    next_generation: std::sync::atomic::AtomicU64,
}

impl PrimaryShared {
    fn publish(&self, event: Event) {
        let mut subscribers = self.subscribers.lock().expect("not poisoned");
        subscribers.retain(|s| s.send(event.clone()).is_ok());
    }
}

impl fmt::Debug for Primary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Primary")
            .field("workers", &self.workers().len())
            .finish_non_exhaustive()
    }
}

impl Primary {
    /// Starts the primary's driver on the current Tokio runtime.
    ///
    /// [`run`](crate::run) and `#[cluster::main]` start the primary of a program and hand it
    /// over in [`Role::Primary`](crate::Role::Primary); call this only in a process that is not
    /// run by them (a test harness, a program with its own `main`).
    ///
    /// Workers are forked from the runtime's threads, and each worker is killed by the kernel
    /// when the thread that forked it exits (`PR_SET_PDEATHSIG`): start the primary on a
    /// long-lived runtime, never inside `spawn_blocking`.
    ///
    /// # Errors
    ///
    /// The settings are not valid ([`Settings::validate`]), or the workers' program cannot be
    /// opened ([`StartError`]).
    ///
    /// # Panics
    ///
    /// Outside a Tokio runtime.
    pub fn start(settings: Settings) -> Result<Self, StartError> {
        settings.validate()?;
        // First: the sockets systemd passed sit at fds 3 and up, and are marked close-on-exec
        // before any worker is forked.
        crate::systemd::init();
        let image =
            Image::first(settings.exec.as_deref()).map_err(|source| StartError::Program {
                path: settings
                    .exec
                    .clone()
                    .unwrap_or_else(|| PathBuf::from("/proc/self/exe")),
                source,
            })?;
        crate::sys::raise_fd_limit();
        let (tx, rx) = mpsc::unbounded_channel();
        let shared = Arc::new(PrimaryShared {
            subscribers: Mutex::new(Vec::new()),
            workers: Mutex::new(BTreeMap::new()),
            settings: settings.clone(),
            reloading: tokio::sync::Mutex::new(()),
            image: Mutex::new(Arc::new(image)),
            next_generation: std::sync::atomic::AtomicU64::new(2),
        });
        tokio::spawn(Driver::new(settings, shared.clone(), rx, tx.clone()));
        Ok(Self { tx, shared })
    }

    /// Starts a worker (Node's `cluster.fork()`). Resolves once the process exists; its
    /// `Online` and `Listening` events follow.
    ///
    /// # Errors
    ///
    /// The process could not be spawned (e.g. `exec` does not exist).
    pub async fn fork(&self) -> io::Result<WorkerHandle> {
        self.fork_with_env(std::iter::empty::<(OsString, OsString)>())
            .await
    }

    /// Starts a worker with extra environment variables (Node's `cluster.fork(env)`).
    ///
    /// # Errors
    ///
    /// As [`Self::fork`].
    pub async fn fork_with_env<K, V>(
        &self,
        env: impl IntoIterator<Item = (K, V)>,
    ) -> io::Result<WorkerHandle>
    where
        K: Into<OsString>,
        V: Into<OsString>,
    {
        let env = env.into_iter().map(|(k, v)| (k.into(), v.into())).collect();
        self.fork_image(env, self.image()).await
    }

    /// The generation new workers start in (1 until a reload completes).
    pub(crate) fn generation(&self) -> u64 {
        self.image().generation
    }

    /// The program of the current generation.
    fn image(&self) -> Arc<Image> {
        self.shared.image.lock().expect("not poisoned").clone()
    }

    async fn fork_image(
        &self,
        env: Vec<(OsString, OsString)>,
        image: Arc<Image>,
    ) -> io::Result<WorkerHandle> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Input::Fork { env, image, reply })
            .map_err(|_| stopped())?;
        rx.await.map_err(|_| stopped())?
    }

    /// Sends `value` to every connected worker (Node's loop over `cluster.workers`); returns how
    /// many it was sent to.
    ///
    /// # Errors
    ///
    /// As [`WorkerHandle::send`].
    pub fn broadcast<T: Serialize + ?Sized>(&self, value: &T) -> io::Result<usize> {
        let payload = crate::message::encode(value)?;
        let mut sent = 0;
        for worker in self.workers().iter().filter(|w| w.is_connected()) {
            let input = Input::Send {
                worker: worker.id(),
                payload: payload.clone(),
                fd: None,
            };
            self.tx.send(input).map_err(|_| stopped())?;
            sent += 1;
        }
        Ok(sent)
    }

    /// A stream of everything that happens to workers from now on, in Node's order per worker
    /// (`Fork`, `Online`, `Listening`…, `Disconnect`, `Exit`). Every call makes an independent
    /// subscriber.
    pub fn events(&self) -> Events {
        let (tx, rx) = mpsc::unbounded_channel();
        self.shared
            .subscribers
            .lock()
            .expect("not poisoned")
            .push(tx);
        Events { rx }
    }

    /// The workers not yet exited, by id (Node's `cluster.workers`).
    pub fn workers(&self) -> Vec<WorkerHandle> {
        self.shared
            .workers
            .lock()
            .expect("not poisoned")
            .values()
            .cloned()
            .collect()
    }

    /// One worker by id, if it has not exited.
    pub fn worker(&self, id: WorkerId) -> Option<WorkerHandle> {
        self.shared
            .workers
            .lock()
            .expect("not poisoned")
            .get(&id)
            .cloned()
    }

    /// Disconnects every worker gracefully and waits until all have exited (Node's
    /// `cluster.disconnect()`). Workers that do not exit within
    /// [`Settings::disconnect_timeout`] are killed.
    ///
    /// # Errors
    ///
    /// The driver stopped.
    pub async fn disconnect(&self) -> io::Result<()> {
        self.disconnect_within(self.shared.settings.disconnect_timeout)
            .await
    }

    /// [`Self::disconnect`] with its own deadline.
    pub(crate) async fn disconnect_within(&self, deadline: Duration) -> io::Result<()> {
        // Listening sockets kept open for dead workers' replacements close now: nobody is
        // going to replace them.
        self.tx
            .send(Input::ReleaseKeptHandles)
            .map_err(|_| stopped())?;
        let workers = self.workers();
        let mut waits = tokio::task::JoinSet::new();
        for worker in workers {
            waits.spawn(async move { worker.disconnect_within(deadline).await });
        }
        while let Some(done) = waits.join_next().await {
            done.map_err(io::Error::other)??;
        }
        Ok(())
    }

    /// Replaces every worker, one at a time, without dropping a connection (a rolling reload:
    /// [`SupervisorHandle::reload`](crate::supervisor::SupervisorHandle::reload) and SIGHUP).
    pub(crate) async fn reload(&self) -> Result<ReloadReport, ReloadError> {
        let Ok(_only_one) = self.shared.reloading.try_lock() else {
            return Err(ReloadError::AlreadyRunning);
        };
        let boot_timeout = self.shared.settings.boot_timeout;
        let wait_ready = self.shared.settings.wait_ready;
        let current = self.image();
        // Looked up again now: a deploy renamed or copied a new build onto this path.
        let path = current.binary.path.clone();
        let generation = self
            .shared
            .next_generation
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let next = Image::open(&path, generation)
            .map_err(|source| ReloadError::Binary { path, source })?;
        let changed = !next.binary.same_file(&current.binary);
        if changed {
            tracing::info!(generation = next.generation, from = %current.binary, to = %next.binary, "rolling reload to a new binary");
        } else {
            tracing::info!(generation = next.generation, binary = %next.binary, "rolling reload: the binary is unchanged, recycling the workers");
        }
        let next = Arc::new(next);
        let mut report = ReloadReport {
            generation: next.generation,
            from: current.binary.clone(),
            to: next.binary.clone(),
            replaced: Vec::new(),
            aborted: None,
        };
        // Until every worker runs the new generation: one that crashed meanwhile came back on
        // the current image, and is replaced too.
        while let Some(old) = self
            .workers()
            .into_iter()
            .find(|w| !w.is_dead() && w.is_connected() && w.generation() < next.generation)
        {
            let mut events = self.events();
            let new = self
                .fork_image(Vec::new(), next.clone())
                .await
                .map_err(ReloadError::Spawn)?;
            let ready = async {
                loop {
                    match events.recv().await {
                        Some(Event::Listening { worker, .. })
                            if worker.id() == new.id() && !wait_ready =>
                        {
                            return None;
                        }
                        Some(Event::Ready(worker)) if worker.id() == new.id() && wait_ready => {
                            return None;
                        }
                        Some(Event::Exit { worker, status, .. }) if worker.id() == new.id() => {
                            return Some(AbortReason::ExitedBeforeListening(status));
                        }
                        Some(Event::Error {
                            worker,
                            error: ProtocolError::Link(LinkError::VersionMismatch { ours, theirs }),
                        }) if worker.id() == new.id() => {
                            return Some(AbortReason::ProtocolMismatch { ours, theirs });
                        }
                        Some(_) => {}
                        None => return Some(AbortReason::PrimaryStopped),
                    }
                }
            };
            let outcome = tokio::time::timeout(boot_timeout, ready).await;
            // Nothing else to wait for: an unread subscriber would hold every later event
            // (and the fds and requests of messages) until the old worker has drained.
            drop(events);
            let reason = outcome.unwrap_or(Some(AbortReason::BootTimeout(boot_timeout)));
            if let Some(reason) = reason {
                let _ = new.kill(Signal::KILL);
                tracing::error!(old = old.id().get(), new = new.id().get(), %reason, "reload aborted");
                report.aborted = Some(ReloadAborted {
                    worker: old.id(),
                    reason,
                });
                return Ok(report);
            }
            self.shared.publish(Event::Replaced {
                old: old.clone(),
                new: new.clone(),
            });
            old.disconnect().await.map_err(|_| ReloadError::Stopped)?;
            tracing::info!(
                old = old.id().get(),
                new = new.id().get(),
                "worker replaced"
            );
            report.replaced.push((old.id(), new.id()));
        }
        *self.shared.image.lock().expect("not poisoned") = next;
        Ok(report)
    }

    /// A snapshot of the primary's bookkeeping (for metrics and tests).
    ///
    /// # Errors
    ///
    /// The driver stopped.
    pub async fn stats(&self) -> io::Result<Stats> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Input::Stats { reply })
            .map_err(|_| stopped())?;
        rx.await.map_err(|_| stopped())
    }

    /// The settings the primary was started with.
    pub fn settings(&self) -> &Settings {
        &self.shared.settings
    }
}

fn stopped() -> io::Error {
    io::Error::new(io::ErrorKind::BrokenPipe, "the cluster primary has stopped")
}

/// Why [`Primary::start`] refused to start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StartError {
    /// The settings are not valid.
    #[error(transparent)]
    Settings(#[from] SettingsError),
    /// The workers' program cannot be opened or executed.
    #[error("the workers' program {} cannot be run", path.display())]
    Program {
        /// Its path.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
}

impl From<StartError> for io::Error {
    fn from(error: StartError) -> Self {
        let kind = match &error {
            StartError::Settings(_) => io::ErrorKind::InvalidInput,
            StartError::Program { source, .. } => source.kind(),
        };
        Self::new(kind, error)
    }
}

/// What [`Primary::stats`] reports.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct Stats {
    /// Every worker not yet exited, by id.
    pub workers: Vec<WorkerStats>,
    /// Fds of accepted connections (and of user messages not sent yet) the primary holds:
    /// queued for a worker, or taken back. A connection sent to a worker is in that worker's
    /// receive queue, not here: the primary closes its copy when it sends it.
    pub connections_held: usize,
    /// Listening sockets the primary holds.
    pub listeners: usize,
    /// Connections handed to workers since the primary started, re-dispatches included (the
    /// sum of every worker's `handoffs`, those gone too).
    pub handoffs: u64,
    /// How long accepted connections waited in the primary before they were handed over.
    pub handoff_latency: HandoffLatency,
}

/// One worker in [`Stats`].
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct WorkerStats {
    /// Its id.
    pub id: WorkerId,
    /// Its pid.
    pub pid: u32,
    /// Its state.
    pub state: WorkerState,
    /// Connections handed to it and not yet acked. Acks are cumulative and asked for every half
    /// window, so a few taken connections may count here until the worker's next heartbeat.
    pub in_flight: usize,
    /// Connections handed to it so far, re-dispatches included.
    pub handoffs: u64,
    /// Handoffs it refused (its listener was full or closing).
    pub refused: u64,
    /// Connections it gave back unserved (its listener closed before accepting them).
    pub returned: u64,
}

/// The stream returned by [`Primary::events`].
#[derive(Debug)]
pub struct Events {
    rx: mpsc::UnboundedReceiver<Event>,
}

impl Events {
    /// The next event.
    pub async fn recv(&mut self) -> Option<Event> {
        self.rx.recv().await
    }
}

impl futures_core::Stream for Events {
    type Item = Event;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Event>> {
        self.rx.poll_recv(cx)
    }
}

/// Where a worker listens, as the primary bound it (with the real port for port 0).
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum ListenAddress {
    /// An IP socket.
    Ip(SocketAddr),
    /// A Unix socket path.
    Unix(PathBuf),
}

impl ListenAddress {
    fn from_bound(addr: BoundAddr) -> Self {
        match addr {
            BoundAddr::Ip(addr) => Self::Ip(addr),
            BoundAddr::Path(bytes) => {
                use std::os::unix::ffi::OsStringExt;
                Self::Unix(PathBuf::from(OsString::from_vec(bytes)))
            }
        }
    }
}

impl fmt::Display for ListenAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Ip(addr) => write!(f, "{addr}"),
            Self::Unix(path) => write!(f, "unix:{}", path.display()),
        }
    }
}

/// Something that happened to a worker (Node's cluster events).
#[derive(Clone, Debug)]
#[non_exhaustive]
pub enum Event {
    /// The worker process was started.
    Fork(WorkerHandle),
    /// Its runtime is up and talking to the primary.
    Online(WorkerHandle),
    /// It listens on `address`.
    Listening {
        /// The worker.
        worker: WorkerHandle,
        /// Where.
        address: ListenAddress,
    },
    /// Its application declared itself ready to serve, after its warm-up
    /// ([`cluster::ready()`](crate::ready)); once per worker. With
    /// [`Settings::wait_ready`](crate::Settings::wait_ready) the supervisor and rolling reloads
    /// count a worker as up from this event instead of its first `Listening`.
    Ready(WorkerHandle),
    /// It sent a message or a request (answer it with [`Message::reply`]).
    Message {
        /// The sender.
        worker: WorkerHandle,
        /// The message.
        message: Message,
    },
    /// A rolling reload replaced `old` with `new`, which listens; `old` is disconnected next.
    Replaced {
        /// The worker being retired.
        old: WorkerHandle,
        /// Its replacement.
        new: WorkerHandle,
    },
    /// Its link to the primary closed: it left on purpose and closed its end (a worker that
    /// called [`Worker::disconnect`](crate::Worker::disconnect) may still be finishing its
    /// connections), its process is gone (reported just before its `Exit`, once what it sent
    /// was read and what it never read was taken back), or the primary dropped it for breaking
    /// the protocol.
    Disconnect(WorkerHandle),
    /// Its process ended (always after its `Disconnect`).
    Exit {
        /// The worker.
        worker: WorkerHandle,
        /// How it ended.
        status: ExitStatus,
        /// Why the primary killed it, if it did (a hang, a missed ack).
        killed: Option<KillReason>,
    },
    /// It broke the protocol and was disconnected.
    Error {
        /// The worker.
        worker: WorkerHandle,
        /// What it did.
        error: ProtocolError,
    },
    /// The primary could not bind a socket workers asked for: every worker waiting for it got
    /// the error.
    ListenFailed {
        /// Where, as the workers asked (`127.0.0.1:8080`, `unix:/run/app.sock`, `fd 3`).
        address: String,
        /// The OS error number (`std::io::Error::from_raw_os_error(errno)` describes it).
        errno: i32,
    },
}

#[derive(Clone, Copy, Debug)]
pub(crate) struct Status {
    state: WorkerState,
    connected: bool,
    ready: bool,
    exited_after_disconnect: Option<bool>,
    exit: Option<ExitStatus>,
    killed: Option<KillReason>,
}

pub(crate) struct WorkerShared {
    id: WorkerId,
    pid: u32,
    generation: u64,
    disconnect_timeout: Duration,
    status: watch::Sender<Status>,
    /// When the primary started it (made right after the spawn).
    started: std::time::Instant,
}

impl WorkerShared {
    fn new(id: WorkerId, pid: u32, generation: u64, disconnect_timeout: Duration) -> Self {
        let status = Status {
            state: WorkerState::None,
            connected: true,
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
        }
    }

    fn update(&self, f: impl FnOnce(&mut Status)) {
        self.status.send_modify(f);
    }
}

/// The primary's handle on one worker (Node's `Worker` in the primary). Cheap to clone.
#[derive(Clone)]
pub struct WorkerHandle {
    shared: Arc<WorkerShared>,
    tx: mpsc::UnboundedSender<Input>,
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
        self.shared.status.borrow().connected
    }

    /// Whether it declared itself ready to serve ([`Worker::ready`](crate::Worker::ready)).
    pub fn is_ready(&self) -> bool {
        self.shared.status.borrow().ready
    }

    /// Whether its process has exited.
    pub fn is_dead(&self) -> bool {
        self.shared.status.borrow().exit.is_some()
    }

    /// `None` until it disconnects or exits; then whether it left on purpose (the primary
    /// disconnected it, or it disconnected itself). A [`Self::kill`] is just a signal and leaves
    /// this `false`, as in Node ≥ 15.
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
    /// [`Message::take_fd`]. The primary's copy is closed once sent.
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
    /// [`is_request`](Message::is_request), and answers with [`Message::reply`].
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
    /// waits for its exit; kills it if it has not exited within
    /// [`Settings::disconnect_timeout`].
    ///
    /// # Errors
    ///
    /// The primary's driver stopped.
    pub async fn disconnect(&self) -> io::Result<()> {
        self.disconnect_within(self.shared.disconnect_timeout).await
    }

    pub(crate) async fn disconnect_within(&self, deadline: Duration) -> io::Result<()> {
        self.tx
            .send(Input::Disconnect {
                worker: self.id(),
                within: deadline,
            })
            .map_err(|_| stopped())?;
        if tokio::time::timeout(deadline, self.exited()).await.is_err() {
            match holding::Holding::of(self.pid()) {
                Some(holding) => {
                    tracing::warn!(worker = %self.id(), pid = self.pid(), ?deadline, "worker did not exit within the disconnect timeout; killing it: {holding}")
                }
                None => {
                    tracing::warn!(worker = %self.id(), pid = self.pid(), ?deadline, "worker did not exit within the disconnect timeout; killing it")
                }
            }
            self.kill(Signal::KILL)?;
            self.exited().await;
        }
        Ok(())
    }

    /// Waits until its process has exited and returns how.
    pub async fn exited(&self) -> ExitStatus {
        let mut rx = self.shared.status.subscribe();
        let status = rx.wait_for(|s| s.exit.is_some() && !s.connected).await;
        match status {
            Ok(s) => s.exit.expect("checked by wait_for"),
            // The sender lives in `self.shared`, so it cannot be dropped while we wait.
            Err(_) => unreachable!("status sender outlives its handles"),
        }
    }
}
