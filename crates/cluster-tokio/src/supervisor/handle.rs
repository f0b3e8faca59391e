//! [`SupervisorHandle`]: what code and the outside (the metrics endpoint, the control socket)
//! ask of a running supervisor.

use std::sync::{Arc, Mutex};

use tokio::sync::{mpsc, oneshot};

use super::book::Book;
use super::{ReloadError, ReloadReport, SupervisorError};
use crate::primary::Primary;

/// What a [`SupervisorHandle`] asks of the running supervisor.
pub(super) enum Control {
    Scale {
        workers: usize,
        reply: oneshot::Sender<Result<(), SupervisorError>>,
    },
    Reload {
        reply: oneshot::Sender<Result<ReloadReport, ReloadError>>,
    },
    /// Answered by the loop itself: it is alive.
    Ping { reply: oneshot::Sender<()> },
}

impl std::fmt::Debug for Control {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Scale { workers, .. } => write!(f, "Scale({workers})"),
            Self::Reload { .. } => f.write_str("Reload"),
            Self::Ping { .. } => f.write_str("Ping"),
        }
    }
}

/// What a supervisor and its handles share: the supervisor's book, and the primary.
#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) book: Mutex<Book>,
    pub(crate) primary: Primary,
    /// Held by a rolling reload throughout and by a recycle for its step: workers are replaced
    /// one at a time.
    pub(crate) replacing: tokio::sync::Mutex<()>,
}

/// Asks a running [`Supervisor`](super::Supervisor) for a rolling reload, a new number of
/// workers or a [status](Self::status). Cheap to clone; made by
/// [`Supervisor::handle`](super::Supervisor::handle), so it exists only where a supervisor does.
#[derive(Clone, Debug)]
pub struct SupervisorHandle {
    pub(super) control: mpsc::UnboundedSender<Control>,
    pub(crate) shared: Arc<Shared>,
}

impl SupervisorHandle {
    /// Sets the number of workers the supervisor keeps (also SIGTTIN and SIGTTOU: one more, one
    /// fewer). New workers start at once; removed ones are disconnected and drain like any
    /// disconnect. Resolves once the change is under way.
    ///
    /// # Errors
    ///
    /// [`SupervisorError::TooManyWorkers`]: over [`MAX_WORKERS`](crate::settings::MAX_WORKERS),
    /// or more than this user may start processes. [`SupervisorError::Stopped`]: the supervisor
    /// is not running (any more), or is shutting down.
    pub async fn scale(&self, workers: usize) -> Result<(), SupervisorError> {
        let (reply, rx) = oneshot::channel();
        self.control
            .send(Control::Scale { workers, reply })
            .map_err(|_| SupervisorError::Stopped)?;
        rx.await.map_err(|_| SupervisorError::Stopped)?
    }

    /// Replaces every worker, one at a time, without dropping a connection (a rolling reload,
    /// also SIGHUP), and resolves when it is done.
    ///
    /// For each worker: a replacement is started first and must listen within
    /// [`Settings::boot_timeout`](crate::Settings::boot_timeout); then the old worker is taken
    /// out of the round robin and disconnected, so it finishes its connections (within
    /// [`Settings::disconnect_timeout`](crate::Settings::disconnect_timeout)) and exits. A
    /// replacement that crashes or does not listen in time aborts the reload: it is killed,
    /// the remaining old workers keep serving, and the report says why
    /// ([`ReloadReport::aborted`]).
    ///
    /// A replacement gets the settings' environment, not the extra environment its predecessor
    /// was forked with.
    ///
    /// # Errors
    ///
    /// Another reload is running, a replacement could not be spawned at all, or the supervisor
    /// stopped.
    pub async fn reload(&self) -> Result<ReloadReport, ReloadError> {
        let (reply, rx) = oneshot::channel();
        self.control
            .send(Control::Reload { reply })
            .map_err(|_| ReloadError::Stopped)?;
        rx.await.map_err(|_| ReloadError::Stopped)?
    }

    /// Whether the supervisor's loop still runs (it may be draining the workers).
    pub(crate) fn is_running(&self) -> bool {
        !self.control.is_closed()
    }

    /// Whether the supervisor's loop answers (what `/healthz` asks): resolves `true` once it
    /// did, `false` if it stopped. A wedged loop never answers: bound the wait.
    pub(crate) async fn ping(&self) -> bool {
        let (reply, rx) = oneshot::channel();
        self.control.send(Control::Ping { reply }).is_ok() && rx.await.is_ok()
    }

    /// Whether at least one worker serves and the cluster is not shutting down (what `/readyz`
    /// asks).
    pub(crate) fn is_serving(&self) -> bool {
        let book = self.shared.book.lock().expect("not poisoned");
        self.is_running() && book.phase == super::Phase::Serving && book.serving > 0
    }

    /// Whether the cluster serves, waits out its shutdown delay, or drains.
    pub(crate) fn phase(&self) -> super::Phase {
        self.shared.book.lock().expect("not poisoned").phase
    }

    /// The primary the supervisor keeps the workers of.
    pub(crate) fn primary(&self) -> &Primary {
        &self.shared.primary
    }
}
