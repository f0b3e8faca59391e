//! `Supervisor`: keeps N workers running, reloads them, and shuts them down on signals.
//!
//! The policy (restarts, the breaker, when a worker is up, what gives the cluster up, the bounds
//! of scaling) is the core's `Supervisor`; this module drives it: `running` is its loop,
//! `signals` what each signal asks, `reload` one rolling reload and `reloads` their coalescing,
//! `book` what a status reads of it, `handle` what code asks of it.

mod book;
mod errors;
mod handle;
mod log;
mod recycle;
mod reload;
mod reloads;
mod running;
mod signals;

use std::sync::{Arc, Mutex};
use std::time::Duration;

pub use proto::supervisor::{FATAL_EXIT_CODE, RecycleReason, SlotId};
use tokio::sync::mpsc;

pub(crate) use self::book::Book;
pub use self::book::{Phase, PreviousWorker, RecycleCounts, ReloadCounts};
pub use self::errors::{AbortReason, ReloadAborted, ReloadError, ReloadReport, SupervisorError};
pub use self::handle::SupervisorHandle;
use self::handle::{Control, Shared};
use self::running::Running;
use self::signals::Signals;
use crate::primary::Primary;

/// Keeps [`Settings::workers`](crate::Settings::workers) workers running: restarts crashed ones
/// with exponential backoff and full jitter and ones killed from outside within a second, cools
/// a slot that crash-loops down before it tries again (its siblings keep serving), never
/// restarts a worker that exited with the fatal code or left on purpose, and kills workers that
/// do not listen within the boot timeout (all set with [`Settings`](crate::Settings)). It gives up only when
/// every slot's workers crash before they listen, or on the fatal code.
///
/// [`run`](Self::run) also owns the signals: SIGHUP replaces every worker one at a time (a
/// rolling reload), unless it says that this process's terminal closed, which stops the cluster
/// as SIGTERM does; SIGTTIN and SIGTTOU add and remove one worker; SIGTERM disconnects every
/// worker gracefully (bounded by [`Settings::disconnect_timeout`](crate::Settings::disconnect_timeout),
/// then SIGKILL); SIGQUIT the same without the shutdown delay; SIGUSR1 is passed on to the
/// workers and SIGUSR2 ignored with a warning; SIGINT (Ctrl-C) drains within 5 s at most; a
/// second SIGTERM or SIGINT
/// during either kills them at once. Workers run in process groups of their own, so a
/// terminal's Ctrl-C and hangup reach the primary alone, which stops them as described. A [`SupervisorHandle`] asks for a reload or a
/// new worker count from code.
///
/// # Examples
///
/// ```no_run
/// # async fn dox(primary: cluster_tokio::Primary) -> Result<(), cluster_tokio::supervisor::SupervisorError> {
/// // In the primary branch of a `Role` match:
/// let supervisor = cluster_tokio::Supervisor::new(primary);
/// let handle = supervisor.handle();
/// let running = tokio::spawn(supervisor.run());
/// handle.scale(2).await?;
/// running.await.expect("the supervisor panicked")
/// # }
/// ```
#[derive(Debug)]
pub struct Supervisor {
    control: mpsc::UnboundedSender<Control>,
    controls: mpsc::UnboundedReceiver<Control>,
    shared: Arc<Shared>,
}

impl Supervisor {
    /// A supervisor for `primary`, with the policy of the primary's
    /// [`Settings`](crate::Settings).
    pub fn new(primary: Primary) -> Self {
        let (control, controls) = mpsc::unbounded_channel();
        let shared = Arc::new(Shared {
            book: Mutex::new(Book::new()),
            primary,
            replacing: tokio::sync::Mutex::new(()),
        });
        Self {
            control,
            controls,
            shared,
        }
    }

    /// A handle that asks this supervisor, once it runs, for a reload, a new worker count or a
    /// [status](SupervisorHandle::status).
    pub fn handle(&self) -> SupervisorHandle {
        SupervisorHandle {
            control: self.control.clone(),
            shared: self.shared.clone(),
        }
    }

    /// Starts [`Settings::worker_count`](crate::Settings::worker_count) workers and keeps them
    /// running until a shutdown signal, or until no slot can run a worker any more.
    ///
    /// # Errors
    ///
    /// Nothing can serve and a restart will not change it (every slot crashing before it
    /// listens, a fatal exit, a socket that cannot be bound): the error says which and why.
    /// More workers than this user may start processes (`RLIMIT_NPROC`; none is started).
    /// Signal handlers could not be installed.
    pub async fn run(self) -> Result<(), SupervisorError> {
        let Self {
            control,
            controls,
            shared,
        } = self;
        // Handles made before `run` stay usable; ours must not keep the channel open.
        drop(control);
        let primary = shared.primary.clone();
        crate::sys::check_process_limit(primary.settings().worker_count())?;
        let signals = Signals::install()?;
        let outcome = Running::new(primary.clone(), shared.clone(), controls, seed())
            .supervise(signals)
            .await;
        // The primary's count covers every worker, gone ones included.
        let handed_off = match tokio::time::timeout(SUMMARY_COUNTERS, primary.counters()).await {
            Ok(Ok(counters)) => counters.handoffs.to_string(),
            _ => "unknown".to_owned(),
        };
        let book = shared.book.lock().expect("not poisoned");
        tracing::info!(
            workers_started = book.forked,
            restarts = book.restarts(),
            reloads_complete = book.reloads.complete,
            reloads_aborted = book.reloads.aborted,
            reloads_failed = book.reloads.failed,
            %handed_off,
            "cluster stopped"
        );
        outcome
    }
}

/// How long the summary at shutdown waits for the primary's counters.
const SUMMARY_COUNTERS: Duration = Duration::from_secs(1);

/// A seed for the backoff jitter: different per process and start.
fn seed() -> u64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    (nanos as u64) ^ (u64::from(std::process::id()) << 32)
}
