//! What a running cluster looks like from outside: [`ClusterStatus`], a snapshot that combines
//! the primary's bookkeeping ([`Primary::counters`]), the supervisor's (slots, restarts, reloads)
//! and what the kernel says of each worker process (memory, CPU time). Taken with
//! [`SupervisorHandle::status`]; the metrics endpoint and the control socket serve it.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use proto::WorkerId;
use proto::supervisor::SlotId;

use crate::primary::{Counters, Primary, WorkerCounters};
use crate::supervisor::{
    Book, Phase, PreviousWorker, RecycleCounts, ReloadCounts, SupervisorError, SupervisorHandle,
};

/// A snapshot of a supervised cluster.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct ClusterStatus {
    /// The primary's pid.
    pub pid: u32,
    /// How long the supervisor has been running.
    pub uptime: Duration,
    /// Whether it serves, waits out its shutdown delay, or drains.
    pub phase: Phase,
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
    /// Workers recycled ([`Settings::max_requests`](crate::Settings::max_requests),
    /// [`Settings::max_memory`](crate::Settings::max_memory)), by why.
    pub recycles: RecycleCounts,
    /// Workers the kernel's OOM killer killed (their memory cgroup ran out of memory).
    pub oom_kills: u64,
    /// As [`Counters::connections_held`].
    pub connections_held: usize,
    /// As [`Counters::listeners`].
    pub listeners: usize,
    /// As [`Counters::handoffs`]: connections handed to workers since the primary started.
    pub handoffs: u64,
    /// As [`Counters::handed_back`]: connections leaving workers handed back to be served on
    /// by others.
    pub handed_back: u64,
    /// As [`Counters::handoff_latency`].
    pub handoff_latency: crate::primary::HandoffLatency,
    /// As [`Counters::accept_errors`].
    pub accept_errors: u64,
    /// The binary of each generation that has a worker in this snapshot, and of
    /// [`Self::generation`], in order.
    pub binaries: Vec<(u64, crate::primary::Binary)>,
}

/// One worker in a [`ClusterStatus`].
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct WorkerStatus {
    /// What the primary counts for it: id, pid, state, handoffs.
    pub counters: WorkerCounters,
    /// The supervisor's slot it runs in; `None` for a worker forked outside the supervisor, or
    /// a reload's replacement that does not listen yet.
    pub slot: Option<SlotId>,
    /// Its generation ([`WorkerHandle::generation`](crate::primary::WorkerHandle::generation)).
    pub generation: u64,
    /// Whether it declared itself ready
    /// ([`WorkerHandle::is_ready`](crate::primary::WorkerHandle::is_ready)).
    pub ready: bool,
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

// Defined here, not beside the handle: the supervisor knows nothing of how it is observed.
impl SupervisorHandle {
    /// A snapshot of the cluster: every worker with its slot, generation, uptime, restarts,
    /// memory and CPU time and what the primary counts for it, and the supervisor's totals
    /// (restarts, reloads by result). Answered while the workers drain at shutdown too.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # async fn dox(handle: cluster_tokio::supervisor::SupervisorHandle) -> Result<(), cluster_tokio::supervisor::SupervisorError> {
    /// let status = handle.status().await?;
    /// for worker in &status.workers {
    ///     // A `WorkerId` shows as `worker 3`.
    ///     println!("{} pid {} restarts {}", worker.counters.id, worker.counters.pid, worker.restarts);
    /// }
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    ///
    /// [`SupervisorError::Stopped`]: the supervisor or the primary stopped.
    pub async fn status(&self) -> Result<ClusterStatus, SupervisorError> {
        if !self.is_running() {
            return Err(SupervisorError::Stopped);
        }
        let primary = self.primary();
        let counters = primary
            .counters()
            .await
            .map_err(|_| SupervisorError::Stopped)?;
        Ok(assemble(primary, counters, &self.shared.book).await)
    }
}

/// Puts a status together: `counters` from the primary, the supervisor's `book`, and `/proc`.
async fn assemble(
    primary: &Primary,
    stats: Counters,
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
        .filter_map(|(counters, read)| {
            let (usage, connections) = read.unwrap_or_default();
            // Gone since the primary counted it: not in the snapshot.
            let handle = primary.worker(counters.id)?;
            let slot = book.worker_slots.get(&counters.id).copied();
            let of_slot = slot.and_then(|slot| book.slots.get(&slot));
            Some(WorkerStatus {
                slot,
                generation: handle.generation(),
                ready: handle.is_ready(),
                uptime: handle.uptime(),
                restarts: of_slot.map_or(0, |s| s.restarts),
                previous: of_slot.and_then(|s| s.previous),
                usage,
                connections,
                counters,
            })
        })
        .collect::<Vec<WorkerStatus>>();
    let generations: std::collections::BTreeSet<u64> = workers
        .iter()
        .map(|w| w.generation)
        .chain([generation])
        .collect();
    let binaries = generations
        .into_iter()
        .filter_map(|g| Some((g, primary.binary_of(g)?)))
        .collect();
    ClusterStatus {
        pid: std::process::id(),
        uptime: book.started.elapsed(),
        phase: book.phase,
        generation,
        wanted: book.wanted,
        serving: book.serving,
        workers,
        slots,
        restarts: book.restarts(),
        reloads: book.reloads,
        recycles: book.recycles,
        oom_kills: book.oom_kills,
        connections_held: stats.connections_held,
        listeners: stats.listeners,
        handoffs: stats.handoffs,
        handed_back: stats.handed_back,
        handoff_latency: stats.handoff_latency,
        accept_errors: stats.accept_errors,
        binaries,
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
