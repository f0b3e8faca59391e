//! The supervisor's book: what it knows that the primary does not (which worker runs in which
//! slot, restarts, reloads), kept by its loop and read by status snapshots.

use std::collections::{BTreeMap, HashMap};
use std::time::Instant;

use proto::supervisor::SlotId;
use proto::{ExitStatus, KillReason, WorkerId};

use super::{ReloadError, ReloadReport};

/// A worker that left its slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct PreviousWorker {
    /// Its id.
    pub worker: WorkerId,
    /// How it ended.
    pub status: ExitStatus,
    /// Why the primary or the supervisor killed it, if it did.
    pub killed: Option<KillReason>,
    /// Whether the kernel's OOM killer killed it (its memory cgroup counted a kill as it died).
    pub oom_killed: bool,
}

/// Rolling reloads, by how they ended.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ReloadCounts {
    /// Every worker was replaced.
    pub complete: u64,
    /// A replacement failed, and the old workers it would have replaced keep serving.
    pub aborted: u64,
    /// The reload could not run at all (the new binary cannot be run, a replacement could not
    /// be spawned).
    pub failed: u64,
}

impl ReloadCounts {
    /// Every reload that ended.
    pub fn total(&self) -> u64 {
        self.complete + self.aborted + self.failed
    }
}

/// Workers recycled ([`Settings::max_requests`](crate::Settings::max_requests),
/// [`Settings::max_memory`](crate::Settings::max_memory)), by why: replaced, and drained.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct RecycleCounts {
    /// Handed their limit of connections.
    pub requests: u64,
    /// Over the memory limit.
    pub memory: u64,
}

impl RecycleCounts {
    /// Every worker recycled.
    pub fn total(&self) -> u64 {
        self.requests + self.memory
    }
}

/// Where a supervised cluster is in its life.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum Phase {
    /// Keeping its workers running.
    #[default]
    Serving,
    /// SIGTERM came: it serves on for the shutdown delay
    /// ([`Settings::shutdown_delay`](crate::Settings::shutdown_delay)) while load balancers
    /// stop sending, and `/readyz` answers 503.
    Delaying,
    /// Draining its workers before it stops.
    Draining,
}

impl std::fmt::Display for Phase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Serving => "serving",
            Self::Delaying => "shutdown delay",
            Self::Draining => "draining",
        })
    }
}

/// What the supervisor knows that the primary does not: which worker runs in which slot,
/// restarts, reloads. Kept by the supervisor's loop, read by status snapshots
/// ([`ClusterStatus`](crate::observability::ClusterStatus)).
#[derive(Debug)]
pub(crate) struct Book {
    pub(crate) started: Instant,
    pub(crate) slots: BTreeMap<SlotId, SlotBook>,
    pub(crate) worker_slots: HashMap<WorkerId, SlotId>,
    pub(crate) reloads: ReloadCounts,
    pub(crate) serving: usize,
    pub(crate) wanted: usize,
    pub(crate) forked: u64,
    pub(crate) phase: Phase,
    /// Workers the OOM killer killed.
    pub(crate) oom_kills: u64,
    /// The address the HTTP endpoint bound (the port the kernel chose, for port 0).
    pub(crate) endpoint: Option<std::net::SocketAddr>,
    pub(crate) recycles: RecycleCounts,
}

/// One slot in the [`Book`].
#[derive(Clone, Debug, Default)]
pub(crate) struct SlotBook {
    pub(crate) worker: Option<WorkerId>,
    had_worker: bool,
    pub(crate) restarts: u64,
    pub(crate) previous: Option<PreviousWorker>,
    pub(crate) removed: bool,
}

impl Book {
    pub(crate) fn new() -> Self {
        Self {
            started: Instant::now(),
            slots: BTreeMap::new(),
            worker_slots: HashMap::new(),
            reloads: ReloadCounts::default(),
            serving: 0,
            wanted: 0,
            forked: 0,
            phase: Phase::Serving,
            oom_kills: 0,
            endpoint: None,
            recycles: RecycleCounts::default(),
        }
    }

    /// The supervisor started `worker` in `slot`.
    pub(crate) fn spawned(&mut self, slot: SlotId, worker: WorkerId) {
        let book = self.slots.entry(slot).or_default();
        if book.had_worker {
            book.restarts += 1;
        }
        book.had_worker = true;
        book.worker = Some(worker);
        self.worker_slots.insert(worker, slot);
    }

    /// A reload's `new` worker took `old`'s slot.
    pub(crate) fn replaced(&mut self, old: WorkerId, new: WorkerId) {
        if let Some(slot) = self.worker_slots.get(&old).copied() {
            self.worker_slots.insert(new, slot);
            if let Some(book) = self.slots.get_mut(&slot) {
                book.worker = Some(new);
            }
        }
    }

    /// `worker` exited.
    pub(crate) fn exited(
        &mut self,
        worker: WorkerId,
        status: ExitStatus,
        killed: Option<KillReason>,
        oom_killed: bool,
    ) {
        self.oom_kills += u64::from(oom_killed);
        let Some(slot) = self.worker_slots.remove(&worker) else {
            return;
        };
        if let Some(book) = self.slots.get_mut(&slot) {
            book.previous = Some(PreviousWorker {
                worker,
                status,
                killed,
                oom_killed,
            });
            if book.worker == Some(worker) {
                book.worker = None;
            }
        }
    }

    /// `slot` was scaled away, with its worker if it had one.
    pub(crate) fn removed(&mut self, slot: SlotId) {
        if let Some(book) = self.slots.get_mut(&slot) {
            book.removed = true;
        }
    }

    /// A rolling reload ended.
    pub(crate) fn reloaded(&mut self, outcome: &Result<ReloadReport, ReloadError>) {
        match outcome {
            Ok(report) if report.is_complete() => self.reloads.complete += 1,
            Ok(_) => self.reloads.aborted += 1,
            Err(ReloadError::AlreadyRunning) => {}
            Err(_) => self.reloads.failed += 1,
        }
    }

    /// A worker was recycled, for `reason`.
    pub(crate) fn recycled(&mut self, reason: &proto::supervisor::RecycleReason) {
        match reason {
            proto::supervisor::RecycleReason::Requests { .. } => self.recycles.requests += 1,
            proto::supervisor::RecycleReason::Memory { .. } => self.recycles.memory += 1,
        }
    }

    pub(crate) fn restarts(&self) -> u64 {
        self.slots.values().map(|s| s.restarts).sum()
    }
}
