//! What a running cluster looks like from outside: [`ClusterStatus`], a snapshot that combines
//! the primary's bookkeeping ([`Primary::stats`]), the supervisor's (slots, restarts, reloads)
//! and what the kernel says of each worker process (memory, CPU time). Taken with
//! [`SupervisorHandle::status`](crate::supervisor::SupervisorHandle::status); the metrics
//! endpoint and the control socket serve it.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use proto::supervisor::SlotId;
use proto::{ExitStatus, KillReason, WorkerId};

use crate::primary::{Primary, Stats, WorkerStats};
use crate::supervisor::{ReloadError, ReloadReport};

/// A snapshot of a supervised cluster.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct ClusterStatus {
    /// The primary's pid.
    pub pid: u32,
    /// How long the supervisor has been running.
    pub uptime: Duration,
    /// The generation new workers start in: 1 until a rolling reload completes.
    pub generation: u64,
    /// How many workers the supervisor keeps running (its active slots).
    pub wanted: usize,
    /// How many of them serve: listen, or, with
    /// [`Settings::wait_ready`](crate::Settings::wait_ready), declared themselves ready.
    pub serving: usize,
    /// Every worker not yet exited, by id.
    pub workers: Vec<WorkerStatus>,
    /// Every slot the supervisor has started a worker in, scaled-away ones included.
    pub slots: Vec<SlotStatus>,
    /// Workers started again in a slot that had one before (crashes, kills from outside, hangs),
    /// over every slot.
    pub restarts: u64,
    /// Rolling reloads, by how they ended.
    pub reloads: ReloadCounts,
    /// As [`Stats::connections_held`].
    pub connections_held: usize,
    /// As [`Stats::listeners`].
    pub listeners: usize,
    /// As [`Stats::handoffs`]: connections handed to workers since the primary started.
    pub handoffs: u64,
    /// As [`Stats::handoff_latency`].
    pub handoff_latency: crate::primary::HandoffLatency,
    /// As [`Stats::accept_errors`].
    pub accept_errors: u64,
}

/// One worker in a [`ClusterStatus`].
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct WorkerStatus {
    /// What the primary counts for it: id, pid, state, handoffs.
    pub stats: WorkerStats,
    /// The supervisor's slot it runs in; `None` for a worker forked outside the supervisor, or
    /// a reload's replacement that does not listen yet.
    pub slot: Option<SlotId>,
    /// Its generation ([`WorkerHandle::generation`](crate::primary::WorkerHandle::generation)).
    pub generation: u64,
    /// How long ago the primary started it.
    pub uptime: Duration,
    /// Restarts of its slot so far.
    pub restarts: u64,
    /// The last worker of its slot that exited, and how.
    pub previous: Option<PreviousWorker>,
    /// Its memory and CPU time, from `/proc`; `None` if they could not be read (it just exited).
    pub usage: Option<ProcessUsage>,
    /// The TCP connections it is serving: established ones on a port the primary listens on
    /// (its fds in `/proc`, matched with the kernel's socket diagnostics); connections over Unix
    /// sockets and its own outgoing ones are not counted. `None` if they could not be read. As of
    /// a reading up to 5 s old: one costs the primary milliseconds, so it is not taken again for
    /// each status asked for within that time.
    pub connections: Option<usize>,
}

/// One slot of the supervisor in a [`ClusterStatus`].
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct SlotStatus {
    /// The slot.
    pub slot: SlotId,
    /// Its worker, if one runs.
    pub worker: Option<WorkerId>,
    /// Workers started in it after its first.
    pub restarts: u64,
    /// Its last worker that exited, and how.
    pub previous: Option<PreviousWorker>,
    /// Whether the cluster was scaled down past it.
    pub removed: bool,
}

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

/// A process's use of the machine, as `/proc/<pid>/stat` and `/proc/<pid>/statm` say.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct ProcessUsage {
    /// Resident memory in bytes.
    pub resident_bytes: u64,
    /// CPU time, user and system.
    pub cpu_time: Duration,
}

impl ProcessUsage {
    /// Reads `pid`'s usage; `None` if it is gone or `/proc` cannot be read.
    pub fn of(pid: u32) -> Option<Self> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        let statm = std::fs::read_to_string(format!("/proc/{pid}/statm")).ok()?;
        let (ticks, pages) = parse_proc(&stat, &statm)?;
        let hz = crate::sys::clock_ticks_per_second().max(1);
        let cpu_time = Duration::from_secs(ticks / hz)
            + Duration::from_nanos((ticks % hz) * 1_000_000_000 / hz);
        Some(Self {
            resident_bytes: pages.saturating_mul(crate::sys::page_size()),
            cpu_time,
        })
    }
}

/// `(utime + stime in clock ticks, resident pages)` from the texts of `/proc/<pid>/stat` and
/// `/proc/<pid>/statm`.
fn parse_proc(stat: &str, statm: &str) -> Option<(u64, u64)> {
    // The command name (field 2) is in parentheses and may hold spaces and parentheses itself:
    // the fields after it start after the last `)`.
    let (_, rest) = stat.rsplit_once(')')?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // `rest` starts at field 3 (the state): utime is field 14, stime field 15.
    let utime: u64 = fields.get(14 - 3)?.parse().ok()?;
    let stime: u64 = fields.get(15 - 3)?.parse().ok()?;
    let resident: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some((utime + stime, resident))
}

/// What the supervisor knows that the primary does not: which worker runs in which slot,
/// restarts, reloads. Kept by the supervisor's loop, read by [`ClusterStatus`] snapshots.
#[derive(Debug)]
pub(crate) struct Book {
    started: Instant,
    slots: BTreeMap<SlotId, SlotBook>,
    worker_slots: HashMap<WorkerId, SlotId>,
    pub(crate) reloads: ReloadCounts,
    pub(crate) serving: usize,
    pub(crate) wanted: usize,
    pub(crate) forked: u64,
}

#[derive(Clone, Debug, Default)]
struct SlotBook {
    worker: Option<WorkerId>,
    had_worker: bool,
    restarts: u64,
    previous: Option<PreviousWorker>,
    removed: bool,
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
    ) {
        let Some(slot) = self.worker_slots.remove(&worker) else {
            return;
        };
        if let Some(book) = self.slots.get_mut(&slot) {
            book.previous = Some(PreviousWorker {
                worker,
                status,
                killed,
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

    pub(crate) fn restarts(&self) -> u64 {
        self.slots.values().map(|s| s.restarts).sum()
    }
}

/// How long a reading of the connections each worker serves is reused. Taking one walks the
/// kernel's whole TCP hash table and every worker's fds (milliseconds, however many connections
/// there are), so however often a status is asked for (a scraper, `cluster-ctl` in a loop), the
/// primary takes at most one reading per period.
pub(crate) const CONNECTIONS_MAX_AGE: Duration = Duration::from_secs(5);

/// The last reading of the connections served, by pid (`None`: its fds could not be read).
type ConnectionsReading = (Instant, HashMap<u32, Option<usize>>);

static CONNECTIONS: std::sync::Mutex<Option<ConnectionsReading>> = std::sync::Mutex::new(None);

/// How many connections each of `pids` serves, as of a reading at most
/// [`CONNECTIONS_MAX_AGE`] old that covers them all (a new one otherwise).
fn connections_served(pids: &[u32]) -> HashMap<u32, Option<usize>> {
    let mut last = CONNECTIONS
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if let Some((at, counts)) = &*last
        && at.elapsed() < CONNECTIONS_MAX_AGE
        && pids.iter().all(|pid| counts.contains_key(pid))
    {
        return counts.clone();
    }
    let serving = crate::primary::holding::Serving::read();
    let counts: HashMap<u32, Option<usize>> = pids
        .iter()
        .map(|&pid| (pid, serving.as_ref().and_then(|s| s.by(pid))))
        .collect();
    *last = Some((Instant::now(), counts.clone()));
    counts
}

/// Puts a status together: `stats` from the primary, the supervisor's `book`, and `/proc`.
pub(crate) async fn assemble(
    primary: &Primary,
    stats: Stats,
    book: &std::sync::Mutex<Book>,
) -> ClusterStatus {
    // `/proc` is read on a blocking thread: the primary's runtime has one thread, which hands
    // off connections.
    let pids: Vec<u32> = stats.workers.iter().map(|w| w.pid).collect();
    let usage = tokio::task::spawn_blocking(move || {
        let connections = connections_served(&pids);
        pids.into_iter()
            .map(|pid| {
                let served = connections.get(&pid).copied().flatten();
                (ProcessUsage::of(pid), served)
            })
            .collect::<Vec<_>>()
    })
    .await
    .unwrap_or_default();
    let generation = primary.generation();
    let book = book.lock().expect("not poisoned");
    let slots: Vec<SlotStatus> = book
        .slots
        .iter()
        .map(|(slot, s)| SlotStatus {
            slot: *slot,
            worker: s.worker,
            restarts: s.restarts,
            previous: s.previous,
            removed: s.removed,
        })
        .collect();
    let workers = stats
        .workers
        .into_iter()
        .zip(usage.into_iter().map(Some).chain(std::iter::repeat(None)))
        .filter_map(|(stats, read)| {
            let (usage, connections) = read.unwrap_or_default();
            // Gone since the primary counted it: not in the snapshot.
            let handle = primary.worker(stats.id)?;
            let slot = book.worker_slots.get(&stats.id).copied();
            let of_slot = slot.and_then(|slot| book.slots.get(&slot));
            Some(WorkerStatus {
                slot,
                generation: handle.generation(),
                uptime: handle.uptime(),
                restarts: of_slot.map_or(0, |s| s.restarts),
                previous: of_slot.and_then(|s| s.previous),
                usage,
                connections,
                stats,
            })
        })
        .collect();
    ClusterStatus {
        pid: std::process::id(),
        uptime: book.started.elapsed(),
        generation,
        wanted: book.wanted,
        serving: book.serving,
        workers,
        slots,
        restarts: book.restarts(),
        reloads: book.reloads,
        connections_held: stats.connections_held,
        listeners: stats.listeners,
        handoffs: stats.handoffs,
        handoff_latency: stats.handoff_latency,
        accept_errors: stats.accept_errors,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_fields_are_found_after_the_command_name() {
        // A command name with spaces and parentheses, as a program may name itself.
        let stat = "4242 (my (odd) prog) S 1 4242 4242 0 -1 4194560 1000 0 0 0 \
                    250 50 0 0 20 0 1 0 123456 1000000 300 18446744073709551615";
        let statm = "2000 300 100 10 0 500 0\n";
        assert_eq!(parse_proc(stat, statm), Some((300, 300)));
        assert_eq!(parse_proc("garbage", statm), None);
        assert_eq!(parse_proc(stat, ""), None);
    }

    #[test]
    fn this_process_can_be_read() {
        let usage = ProcessUsage::of(std::process::id()).expect("/proc/self");
        assert!(usage.resident_bytes > 0);
    }
}
