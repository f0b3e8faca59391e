//! Recycling: a worker that has been handed enough connections
//! ([`SupervisorConfig::max_requests`](super::SupervisorConfig::max_requests)) or grew past a
//! memory limit ([`SupervisorConfig::max_memory`](super::SupervisorConfig::max_memory)) is
//! replaced, as one step of a rolling reload does it (the replacement is up before the old
//! worker drains), to contain leaks without a deploy.
//!
//! The rules: each worker's handoff limit is drawn once, when it takes its slot, uniformly in
//! `[max_requests, max_requests + jitter]`, so that workers started together do not all
//! reach it together. Only a serving worker (`Running`) is recycled, one at a time, never while
//! a rolling reload runs or the cluster is leaving ([`Supervisor::pause_recycling`]), and a
//! worker is asked for at most once. Workers due meanwhile wait their turn, in the order they
//! became due. A replacement that fails leaves the old worker serving; it is tried again after
//! the longest backoff at the earliest.

use std::fmt;
use std::time::Instant;

use super::{State, Supervisor, SupervisorOutput};
use crate::wire::WorkerId;

/// Why a worker is recycled ([`SupervisorOutput::Recycle`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RecycleReason {
    /// It was handed its limit of connections.
    Requests {
        /// Connections handed to it so far.
        handoffs: u64,
        /// Its limit, drawn in `[max_requests, max_requests + jitter]`.
        limit: u64,
    },
    /// Its resident memory went past [`SupervisorConfig::max_memory`](super::SupervisorConfig::max_memory).
    Memory {
        /// Its resident memory, in bytes.
        resident: u64,
        /// The limit, in bytes.
        limit: u64,
    },
}

impl RecycleReason {
    /// `"requests"` or `"memory"`: the label of a metric.
    pub const fn label(&self) -> &'static str {
        match self {
            Self::Requests { .. } => "requests",
            Self::Memory { .. } => "memory",
        }
    }
}

impl fmt::Display for RecycleReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Requests { handoffs, limit } => {
                write!(
                    f,
                    "{handoffs} connections handed to it, its limit is {limit}"
                )
            }
            Self::Memory { resident, limit } => write!(
                f,
                "resident memory {} over the limit of {}",
                Bytes(*resident),
                Bytes(*limit)
            ),
        }
    }
}

/// A byte count for people: `612.0 MiB`.
struct Bytes(u64);

impl fmt::Display for Bytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
        if self.0 < 1024 {
            return write!(f, "{} B", self.0);
        }
        let mut value = self.0 as f64 / 1024.0;
        let mut unit = 0;
        while value >= 1024.0 && unit + 1 < UNITS.len() {
            value /= 1024.0;
            unit += 1;
        }
        write!(f, "{value:.1} {}", UNITS[unit])
    }
}

/// What recycling keeps per slot.
#[derive(Clone, Copy, Debug, Default)]
pub(super) struct SlotRecycling {
    /// The handoff limit of the slot's current worker, drawn when it took the slot.
    pub(super) limit: Option<u64>,
    /// A replacement of the slot's worker failed: not tried again before this.
    pub(super) not_before: Option<Instant>,
}

impl Supervisor {
    /// A new worker took slot `index`: its handoff limit is drawn, and a failed recycle of its
    /// predecessor holds it back no more.
    pub(super) fn draw_recycle_limit(&mut self, index: usize) {
        let limit = self.config.max_requests.map(|at_least| {
            let jitter = self.config.max_requests_jitter;
            // Uniform over the jitter + 1 whole numbers from `at_least`.
            let spread = (super::next_unit(&mut self.rng) * (jitter as f64 + 1.0)) as u64;
            at_least.saturating_add(spread.min(jitter))
        });
        self.slots[index].recycling = SlotRecycling {
            limit,
            not_before: None,
        };
    }

    /// The handoff limit drawn for `worker`, if it runs in a slot and
    /// [`SupervisorConfig::max_requests`](super::SupervisorConfig::max_requests) is set.
    pub fn recycle_limit(&self, worker: WorkerId) -> Option<u64> {
        self.slot_of(worker)
            .and_then(|index| self.slots[index].recycling.limit)
    }

    /// The primary has handed `handoffs` connections to `worker` so far: at its limit, it is due
    /// for recycling.
    pub fn handle_handoffs(&mut self, now: Instant, worker: WorkerId, handoffs: u64) {
        let Some(limit) = self.recycle_limit(worker) else {
            return;
        };
        if handoffs >= limit {
            self.due(now, worker, RecycleReason::Requests { handoffs, limit });
        }
    }

    /// `worker`'s resident memory is `resident` bytes: past
    /// [`SupervisorConfig::max_memory`](super::SupervisorConfig::max_memory), it is due for
    /// recycling.
    pub fn handle_memory(&mut self, now: Instant, worker: WorkerId, resident: u64) {
        let Some(limit) = self.config.max_memory else {
            return;
        };
        if resident > limit {
            self.due(now, worker, RecycleReason::Memory { resident, limit });
        }
    }

    /// Whether recycling waits (a rolling reload runs, which replaces every worker anyway, or
    /// the cluster is about to stop). A recycle under way goes on.
    pub fn pause_recycling(&mut self, paused: bool) {
        self.recycling_paused = paused;
        self.next_recycle();
    }

    /// The recycle of `worker` ended: its replacement took its slot
    /// ([`Self::handle_replaced`]) and it drained, or it exited meanwhile. The next worker due
    /// may go.
    pub fn handle_recycled(&mut self, worker: WorkerId) {
        if self.recycling == Some(worker) {
            self.recycling = None;
        }
        self.next_recycle();
    }

    /// The recycle of `worker` failed (its replacement did not come up): `worker` keeps
    /// serving, and is not recycled again before the longest backoff has passed.
    pub fn handle_recycle_failed(&mut self, now: Instant, worker: WorkerId) {
        if let Some(index) = self.slot_of(worker) {
            self.slots[index].recycling.not_before = Some(now + self.config.backoff_max);
        }
        self.handle_recycled(worker);
    }

    /// The worker being recycled, if one is.
    pub fn recycling(&self) -> Option<WorkerId> {
        self.recycling
    }

    fn due(&mut self, now: Instant, worker: WorkerId, reason: RecycleReason) {
        let Some(index) = self.slot_of(worker) else {
            return;
        };
        let held = self.slots[index]
            .recycling
            .not_before
            .is_some_and(|t| now < t);
        let asked = self.recycling == Some(worker) || self.due.iter().any(|(w, _)| *w == worker);
        if held || asked || self.stopping {
            return;
        }
        self.due.push_back((worker, reason));
        self.next_recycle();
    }

    /// Asks for the next recycle, if none runs and recycling is not paused. Workers no longer
    /// serving in a slot (exited, scaled away, replaced by a reload) are dropped from the queue.
    pub(super) fn next_recycle(&mut self) {
        if self.recycling.is_some() || self.recycling_paused || self.stopping {
            return;
        }
        while let Some((worker, reason)) = self.due.pop_front() {
            let serving = self
                .slot_of(worker)
                .is_some_and(|index| matches!(self.slots[index].state, State::Running { .. }));
            if serving {
                self.recycling = Some(worker);
                self.out
                    .push_back(SupervisorOutput::Recycle { worker, reason });
                return;
            }
        }
    }
}
