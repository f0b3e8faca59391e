//! What reloads report, and the errors of a supervisor and its handles.

use std::io;
use std::time::Duration;

use proto::supervisor::SlotId;
use proto::{ExitStatus, WorkerId};

use crate::primary::Binary;
use crate::settings::SettingsError;

/// What a rolling reload did.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct ReloadReport {
    /// The generation the replacements belong to.
    pub generation: u64,
    /// The binary the replaced workers ran.
    pub from: Binary,
    /// The binary the replacements run: the program's path looked up again at the reload.
    pub to: Binary,
    /// `(old, new)` for every worker replaced, in order.
    pub replaced: Vec<(WorkerId, WorkerId)>,
    /// Idle keep-alive connections the replaced workers handed back, served on by the others
    /// without their clients noticing ([`Settings::hand_back`](crate::Settings::hand_back)).
    pub handed_back: u64,
    /// Why the reload stopped early, if it did; the workers not yet replaced keep serving.
    pub aborted: Option<ReloadAborted>,
}

impl ReloadReport {
    /// Whether every worker was replaced.
    pub fn is_complete(&self) -> bool {
        self.aborted.is_none()
    }

    /// Whether the replacements run another binary than the workers they replaced (a deploy);
    /// `false` when the reload only recycled the workers.
    pub fn binary_changed(&self) -> bool {
        !self.to.same_file(&self.from)
    }
}

/// Why a rolling reload stopped.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct ReloadAborted {
    /// The worker whose replacement failed (it keeps serving).
    pub worker: WorkerId,
    /// What happened to the replacement.
    pub reason: AbortReason,
}

impl std::fmt::Display for ReloadAborted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // `WorkerId` shows as `worker 3`.
        write!(f, "replacing {}: {}", self.worker, self.reason)
    }
}

/// What happened to a replacement worker that aborted a rolling reload.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AbortReason {
    /// It exited before it listened (with [`Settings::wait_ready`](crate::Settings::wait_ready): before it was ready).
    #[error("the replacement exited before it was up: {0}")]
    ExitedBeforeListening(ExitStatus),
    /// It did not listen (with [`Settings::wait_ready`](crate::Settings::wait_ready): declare itself ready) within the boot
    /// timeout; it was killed.
    #[error("the replacement was not up within the boot timeout ({})", crate::settings::Shown(*.0))]
    BootTimeout(Duration),
    /// It speaks another protocol version than this primary (a deploy across an incompatible
    /// release of `cluster`: restart the service instead).
    #[error("the replacement speaks protocol version {theirs}, this primary speaks {ours}")]
    ProtocolMismatch {
        /// The primary's version.
        ours: u16,
        /// The replacement's.
        theirs: u16,
    },
    /// The primary stopped meanwhile.
    #[error("the primary stopped")]
    PrimaryStopped,
}

/// Why a rolling reload could not run.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ReloadError {
    /// Another reload is running.
    #[error("a reload is already running")]
    AlreadyRunning,
    /// The program at the reload's path cannot be run (missing, not a file, not executable);
    /// no worker was touched.
    #[error("the new binary {} cannot be run", path.display())]
    Binary {
        /// The program's path.
        path: std::path::PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// A replacement could not be spawned at all.
    #[error("a replacement worker could not be started")]
    Spawn(#[source] io::Error),
    /// The primary or its supervisor stopped.
    #[error("the cluster primary has stopped")]
    Stopped,
}

impl From<ReloadError> for io::Error {
    fn from(error: ReloadError) -> Self {
        let kind = match &error {
            ReloadError::AlreadyRunning => io::ErrorKind::ResourceBusy,
            ReloadError::Binary { source: e, .. } | ReloadError::Spawn(e) => e.kind(),
            ReloadError::Stopped => io::ErrorKind::BrokenPipe,
        };
        Self::new(kind, error)
    }
}

/// Why a [`Supervisor`](crate::Supervisor) stopped with an error, or could not do what its handle asked.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SupervisorError {
    /// No worker could be kept running: every slot's workers crash before they listen (a bad
    /// build, a port another process holds, a missing file), which a restart does not change.
    #[error(
        "every worker crashes before it listens ({slot}: {failures} crashes within the \
         breaker's window); see the workers' errors above"
    )]
    BootLoop {
        /// The first such slot.
        slot: SlotId,
        /// Its crashes within the window.
        failures: usize,
    },
    /// No worker is left, and one exited with the fatal code (a configuration error).
    #[error("{slot}: {worker} exited with the fatal exit code {code}")]
    Fatal {
        /// The slot.
        slot: SlotId,
        /// The worker.
        worker: WorkerId,
        /// The code.
        code: i32,
    },
    /// A socket the workers asked for could not be bound while no worker served: every worker
    /// would fail the same way (see [`Settings::retry_bind_errors`](crate::Settings::retry_bind_errors)).
    #[error("cannot listen on {address}")]
    Listen {
        /// Where.
        address: String,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The signal handlers could not be installed.
    #[error("could not install the signal handlers")]
    Signals(#[source] io::Error),
    /// More workers were asked for than one primary runs, or than this user may start.
    #[error(transparent)]
    TooManyWorkers(#[from] SettingsError),
    /// The supervisor is not running (any more).
    #[error("the supervisor is not running")]
    Stopped,
}

impl From<SupervisorError> for io::Error {
    fn from(error: SupervisorError) -> Self {
        match error {
            SupervisorError::Signals(error) => error,
            SupervisorError::Stopped => Self::new(io::ErrorKind::BrokenPipe, error),
            other => Self::other(other),
        }
    }
}
