//! The primary: forks workers, owns the listening sockets and hands out connections
//! ([`Primary`]), and what it tells about its workers ([`Event`], [`Messages`], [`WorkerHandle`],
//! [`Counters`]).

mod alarm;
mod driver;
mod events;
pub(crate) mod holding;
mod image;
mod latency;
pub(crate) mod messages;
mod reaper;
mod spawn;
mod worker_handle;

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::fmt;
use std::io;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

// One home per public type: `WorkerId` lives here (the primary numbers its workers);
// `SchedulingPolicy` in `settings`, `Message` in `message`, `FATAL_EXIT_CODE` in `supervisor`.
pub use proto::{ExitStatus, KillReason, WorkerId, WorkerState};

use serde::Serialize;

use tokio::sync::{mpsc, oneshot};

use crate::settings::{Settings, SettingsError};
use driver::{Driver, Input};

pub use events::{Event, Events, ListenAddress, ProtocolError, ProtocolErrorKind};
pub use image::Binary;
pub(crate) use image::Image;
pub use latency::HandoffLatency;
pub use messages::Messages;
pub use signal::Signal;
pub use worker_handle::WorkerHandle;
pub(crate) use worker_handle::WorkerShared;

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
///         eprintln!("{} exited: {status}", worker.id());
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
    /// The queue of [`Primary::messages`], if it was taken.
    messages: messages::Slot,
    workers: Mutex<BTreeMap<WorkerId, WorkerHandle>>,
    settings: Settings,
    /// The program of the current generation: what forks, respawns and scale-ups run.
    image: Mutex<Arc<Image>>,
    /// The binary of every generation opened, for the status.
    binaries: Mutex<BTreeMap<u64, Binary>>,
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
    /// This process becomes a child subreaper (`PR_SET_CHILD_SUBREAPER`): processes the workers
    /// leave behind become its children when their parent exits, and it reaps their zombies
    /// (those in a worker's process group). As a container's PID 1 it reaps every zombie outside
    /// its own process group. It never reaps a worker, nor a process in its own process group:
    /// a child this program starts itself stays its own to wait for (as PID 1, as long as it
    /// stays in this process's group).
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
            messages: messages::Slot::default(),
            workers: Mutex::new(BTreeMap::new()),
            settings: settings.clone(),
            binaries: Mutex::new(BTreeMap::from([(image.generation, image.binary.clone())])),
            image: Mutex::new(Arc::new(image)),
            next_generation: std::sync::atomic::AtomicU64::new(2),
        });
        reaper::start();
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
    pub(crate) fn image(&self) -> Arc<Image> {
        self.shared.image.lock().expect("not poisoned").clone()
    }

    pub(crate) async fn fork_image(
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

    /// The messages and requests workers send ([`Worker::send`](crate::Worker::send),
    /// [`Worker::request`](crate::Worker::request)), each with its sender, in the order each
    /// worker sent them; answer a request with [`Message::reply`](crate::message::Message::reply).
    ///
    /// One reader at a time: a later call takes over, and the earlier stream ends (what it had
    /// not read goes to the new one). Bounded ([`Messages`]): a reader slower than a worker
    /// slows that worker down instead of growing the primary's memory.
    ///
    /// Messages that arrive while nobody took the stream (before the first call, or after the
    /// stream was dropped) are dropped, as Node drops a message no `'message'` listener hears:
    /// requests among them are refused at once, fds closed, and
    /// [`Self::messages_dropped`] counts them (logged at debug level).
    pub fn messages(&self) -> Messages {
        Messages::new(self.shared.messages.take_over())
    }

    /// How many messages from workers were dropped because nobody read [`Self::messages`].
    #[must_use]
    pub fn messages_dropped(&self) -> u64 {
        self.shared.messages.dropped()
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
        // Until no new worker shows up: a fork under way (a reload cancelled by the shutdown)
        // may add one after the first look.
        let mut asked = std::collections::HashSet::new();
        loop {
            let mut waits = tokio::task::JoinSet::new();
            for worker in self.workers() {
                if asked.insert(worker.id()) {
                    // Everyone stops: nobody to hand connections back to.
                    waits.spawn(async move { worker.leave(deadline, false).await });
                }
            }
            if waits.is_empty() {
                return Ok(());
            }
            while let Some(done) = waits.join_next().await {
                done.map_err(io::Error::other)??;
            }
        }
    }

    /// The program of the next generation: the program's path looked up again (a deploy
    /// renamed or copied a new build onto it), under a generation number never used before.
    pub(crate) fn open_next_image(&self) -> io::Result<Image> {
        let path = self.image().binary.path.clone();
        let generation = self
            .shared
            .next_generation
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let image = Image::open(&path, generation)?;
        self.shared
            .binaries
            .lock()
            .expect("not poisoned")
            .insert(generation, image.binary.clone());
        Ok(image)
    }

    /// The binary `generation` runs (or would have run, for a reload that aborted).
    pub(crate) fn binary_of(&self, generation: u64) -> Option<Binary> {
        self.shared
            .binaries
            .lock()
            .expect("not poisoned")
            .get(&generation)
            .cloned()
    }

    /// From now on, forks, respawns and scale-ups run `image`.
    pub(crate) fn set_image(&self, image: Arc<Image>) {
        *self.shared.image.lock().expect("not poisoned") = image;
    }

    /// Publishes an event that happened above the primary (a reload's replacement).
    pub(crate) fn announce(&self, event: Event) {
        self.shared.publish(event);
    }

    /// The primary's counters: its workers' handoffs, what it holds (for metrics and tests).
    ///
    /// # Errors
    ///
    /// The driver stopped.
    pub async fn counters(&self) -> io::Result<Counters> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Input::Counters { reply })
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

/// What [`Primary::counters`] reports: the primary's own bookkeeping, as opposed to the
/// status of a supervised cluster, which the observability module assembles above it.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct Counters {
    /// Every worker not yet exited, by id.
    pub workers: Vec<WorkerCounters>,
    /// Fds of accepted connections (and of user messages not sent yet) the primary holds:
    /// queued for a worker, or taken back. A connection sent to a worker is in that worker's
    /// receive queue, not here: the primary closes its copy when it sends it.
    pub connections_held: usize,
    /// Listening sockets the primary holds.
    pub listeners: usize,
    /// Connections handed to workers since the primary started, re-dispatches included (the
    /// sum of every worker's `handoffs`, those gone too).
    pub handoffs: u64,
    /// Connections that leaving workers served and handed back between two requests, to be
    /// served on by other workers (rolling reloads, scale-downs), since the primary started.
    pub handed_back: u64,
    /// How long accepted connections waited in the primary before they were handed over.
    pub handoff_latency: HandoffLatency,
    /// Accepts that failed since the primary started (round robin): connections reset before
    /// they were accepted, and errors such as `EMFILE` (after which accepting pauses 100 ms).
    pub accept_errors: u64,
}

/// One worker in [`Counters`].
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct WorkerCounters {
    /// Its id.
    pub id: WorkerId,
    /// Its pid.
    pub pid: u32,
    /// Its state.
    pub state: WorkerState,
    /// Connections handed to it and not yet acked. Acks are cumulative and asked for every half
    /// window, so a few taken connections may count here until the worker's next heartbeat.
    pub in_flight: usize,
    /// Its open connections as the scheduler counts them: handed to it and not refused, given
    /// back or reported ended (the guide's "Scheduling" says when a connection's end is
    /// reported). What least-outstanding and the per-worker cap go by.
    pub outstanding: usize,
    /// Connections handed to it so far, re-dispatches included.
    pub handoffs: u64,
    /// Handoffs it refused (its listener was full or closing).
    pub refused: u64,
    /// Connections it gave back unserved (its listener closed before accepting them).
    pub returned: u64,
    /// Connections it served and handed back between two requests as it left.
    pub handed_back: u64,
}
