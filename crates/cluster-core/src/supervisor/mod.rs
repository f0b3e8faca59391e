//! The supervisor's policy: which worker slots to (re)start and when.
//!
//! A slot is one of the N workers a cluster should run. When its worker crashes, the slot waits
//! an exponential backoff with full jitter and starts a new one. A slot that keeps crashing
//! opens its breaker: it cools down (the longest backoff) and tries again, while its siblings
//! keep serving; it never stays empty for good because of crashes. A worker killed by a signal
//! from outside (an operator's `kill`, the OOM killer) is not at fault: it is restarted after a
//! short backoff that grows with the kills but never past a second, and does not count towards
//! the breaker. The policy gives up only on what a restart cannot fix: a worker that exits with
//! the fatal code, every slot crash-looping before its workers even listen, or a socket the
//! workers asked for that cannot be bound while nothing serves. One that exits 0 or leaves on
//! purpose has finished and is not replaced. A worker past its limit of handoffs or of memory is
//! recycled: replaced while it serves, one at a time ([`recycle`]). Like the rest of the core
//! this performs no I/O and reads no clock; randomness comes from a seed.
//!
//! Every rule of supervision lives here, so the driver only executes: when a worker counts as up
//! (listening, or declared ready), which exits are kills from outside and which are the
//! supervisor's own kills, when a listen failure stops the cluster, and the bounds of scaling.
//!
//! ```text
//!  Spawning ──spawned──▶ Booting ──listening──▶ Running
//!     ▲                    │ boot deadline: Kill     │
//!     │ backoff elapsed    ▼ crash / killed          ▼ crash / killed
//!  Waiting ◀──────────── (failure) ────────────────────
//!     ▲                    │ N crashes in the window  │ fatal exit code │ left on purpose
//!     │ cooled down        ▼                          ▼                 ▼
//!     └──────────────── CoolingDown                 Broken            Stopped
//! ```

use std::collections::{BTreeSet, VecDeque};
use std::fmt;
use std::time::{Duration, Instant};

use crate::lifecycle::ExitStatus;
pub use crate::lifecycle::KillReason;
use crate::wire::WorkerId;

pub mod recycle;
pub use recycle::RecycleReason;

/// The supervisor's settings (defaults from PM2, systemd and gunicorn; see
/// `docs/operations.md`).
#[derive(Clone, Copy, Debug)]
#[non_exhaustive]
pub struct SupervisorConfig {
    /// The first backoff before restarting a crashed worker.
    pub backoff_initial: Duration,
    /// The longest backoff.
    pub backoff_max: Duration,
    /// A worker that ran this long resets its slot's backoff.
    pub healthy_after: Duration,
    /// Crashes within [`Self::crash_loop_window`] that open the slot's breaker.
    pub crash_loop_failures: usize,
    /// The window of the breaker.
    pub crash_loop_window: Duration,
    /// An exit code that means "do not restart me" (configuration error); `None` disables it.
    pub fatal_exit_code: Option<i32>,
    /// How long a new worker may take to listen before it is killed; `None` waits forever.
    pub boot_timeout: Option<Duration>,
    /// Whether a worker is up once it declares itself ready ([`Supervisor::handle_ready`])
    /// rather than once it listens.
    pub wait_ready: bool,
    /// Whether a socket that cannot be bound is left to the workers' restarts. When `false`, a
    /// worker that exits at boot after the primary failed to bind for it, while no worker
    /// serves, stops the cluster ([`GiveUp::Listen`]): every worker would fail the same way.
    pub retry_bind_errors: bool,
    /// The most slots [`Supervisor::scale`] keeps.
    pub max_workers: usize,
    /// Recycle a worker once it was handed this many connections (plus its share of
    /// [`Self::max_requests_jitter`]); `None` never does.
    pub max_requests: Option<u64>,
    /// Each worker's handoff limit is drawn once, uniformly from [`Self::max_requests`] to this
    /// many more, so that workers started together are not recycled together.
    pub max_requests_jitter: u64,
    /// Recycle a worker whose resident memory is over this many bytes; `None` never does.
    pub max_memory: Option<u64>,
}

impl Default for SupervisorConfig {
    fn default() -> Self {
        Self {
            backoff_initial: Duration::from_millis(100),
            backoff_max: Duration::from_secs(15),
            healthy_after: Duration::from_secs(30),
            crash_loop_failures: 5,
            crash_loop_window: Duration::from_secs(10),
            fatal_exit_code: Some(FATAL_EXIT_CODE),
            boot_timeout: Some(Duration::from_secs(60)),
            wait_ready: false,
            retry_bind_errors: false,
            max_workers: MAX_WORKERS,
            max_requests: None,
            max_requests_jitter: 0,
            max_memory: None,
        }
    }
}

/// The default of [`SupervisorConfig::max_workers`]: more processes than one primary serves
/// well (each has a link, a heartbeat and its share of every handoff queue).
pub const MAX_WORKERS: usize = 1024;

/// How a worker's process ended, as the driver saw it ([`Supervisor::handle_exit`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WorkerExit {
    /// Its exit status.
    pub status: ExitStatus,
    /// It left on purpose: it was disconnected, or disconnected itself (Node's
    /// `exitedAfterDisconnect`).
    pub on_purpose: bool,
    /// Why the primary killed it, if it did (a hang, a handoff never acked, its disconnect
    /// deadline).
    pub killed: Option<KillReason>,
    /// It died of a signal a process does not raise against itself by faulting or aborting (an
    /// operator's `kill`, the OOM killer): the driver knows the platform's signal numbers.
    pub signal_from_outside: bool,
}

/// Why [`Supervisor::scale`] refused a worker count.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ScaleError {
    /// More than [`SupervisorConfig::max_workers`].
    TooMany {
        /// What was asked for.
        asked: usize,
        /// The most allowed.
        max: usize,
    },
    /// The cluster is stopping.
    Stopping,
}

impl fmt::Display for ScaleError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::TooMany { asked, max } => {
                write!(f, "{asked} workers asked for, at most {max} are allowed")
            }
            Self::Stopping => f.write_str("the cluster is stopping"),
        }
    }
}

impl std::error::Error for ScaleError {}

/// The default fatal exit code: 78, `EX_CONFIG` of `sysexits.h` ("configuration error").
pub const FATAL_EXIT_CODE: i32 = 78;

/// One of the workers a cluster should run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SlotId(usize);

impl SlotId {
    /// The slot's index, from 0.
    pub const fn index(self) -> usize {
        self.0
    }
}

impl fmt::Display for SlotId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "slot {}", self.0)
    }
}

/// What the supervisor reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SupervisorEvent {
    /// A crashed worker's slot will start a new worker after `delay`.
    Respawning {
        /// The slot.
        slot: SlotId,
        /// The backoff.
        delay: Duration,
        /// Crashes of this slot within the breaker's window, this one included.
        recent_failures: usize,
    },
    /// The slot crashed too often: its breaker opened, and it starts a worker again after
    /// `cooldown`.
    CrashLoop {
        /// The slot.
        slot: SlotId,
        /// Crashes within the window.
        failures: usize,
        /// Whether every one of them was before the worker listened.
        at_boot: bool,
        /// How long the slot stays empty.
        cooldown: Duration,
    },
    /// The worker was killed by a signal from outside; its slot starts a new one after `delay`.
    Killed {
        /// The slot.
        slot: SlotId,
        /// The worker.
        worker: WorkerId,
        /// The backoff.
        delay: Duration,
    },
    /// The worker exited with the fatal code; its slot stays empty.
    Fatal {
        /// The slot.
        slot: SlotId,
        /// The worker.
        worker: WorkerId,
        /// The exit code.
        code: i32,
    },
}

/// What the driver must do next.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SupervisorOutput {
    /// Start a worker for `slot` and report it with [`Supervisor::handle_spawned`] (or
    /// [`Supervisor::handle_spawn_failed`]).
    Spawn {
        /// The slot.
        slot: SlotId,
    },
    /// Kill `worker`; its exit is reported as usual.
    Kill {
        /// The worker.
        worker: WorkerId,
        /// Why.
        reason: KillReason,
    },
    /// Disconnect `worker`: it drains and exits, and its exit is not restarted (its slot was
    /// scaled away, or no longer wants it).
    Disconnect {
        /// The worker.
        worker: WorkerId,
    },
    /// Replace `worker`, which serves, as one step of a rolling reload does: start a
    /// replacement; once it is up, report it with [`Supervisor::handle_replaced`] and disconnect
    /// `worker`; when `worker` has drained, [`Supervisor::handle_recycled`]. If the replacement
    /// does not come up, [`Supervisor::handle_recycle_failed`]. No other `Recycle` comes until
    /// then.
    Recycle {
        /// The worker.
        worker: WorkerId,
        /// Why.
        reason: RecycleReason,
    },
    /// Tell the user.
    Event(SupervisorEvent),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    Spawning,
    Booting {
        worker: WorkerId,
        deadline: Option<Instant>,
        since: Instant,
    },
    Running {
        worker: WorkerId,
        since: Instant,
    },
    Waiting {
        until: Instant,
    },
    /// The breaker opened; `at_boot` when every crash in its window was before listening.
    CoolingDown {
        until: Instant,
        at_boot: bool,
    },
    /// Its worker exited with the fatal code.
    Broken {
        worker: WorkerId,
        code: i32,
    },
    Stopped,
    /// Scaled away: the cluster no longer wants this slot.
    Removed,
}

#[derive(Debug)]
struct Slot {
    state: State,
    /// The slot's most recent worker, even after it exited (to follow a replacement).
    last: Option<WorkerId>,
    /// Consecutive crashes since the slot was last healthy (the backoff exponent).
    attempt: u32,
    /// Crashes within the breaker's window: when, and whether before the worker listened.
    failures: VecDeque<(Instant, bool)>,
    /// Kills from outside within the breaker's window (their backoff exponent).
    kills: VecDeque<Instant>,
    recycling: recycle::SlotRecycling,
}

/// The policy that keeps N workers running.
#[derive(Debug)]
pub struct Supervisor {
    config: SupervisorConfig,
    slots: Vec<Slot>,
    rng: u64,
    stopping: bool,
    out: VecDeque<SupervisorOutput>,
    /// Workers this supervisor ordered killed (boot deadline): their deaths are its own doing,
    /// crashes to count, never kills from outside.
    killed: BTreeSet<WorkerId>,
    /// The last socket the primary could not bind for a worker, until a worker listens.
    listen_failure: Option<(String, i32)>,
    /// Why the cluster was given up before every slot finished.
    given_up: Option<GiveUp>,
    /// The worker being recycled, and those due after it, in order.
    recycling: Option<WorkerId>,
    due: VecDeque<(WorkerId, RecycleReason)>,
    recycling_paused: bool,
}

impl Supervisor {
    /// A supervisor for `workers` slots; a `Spawn` for each is the first output. `seed` drives the
    /// backoff jitter.
    pub fn new(config: SupervisorConfig, workers: usize, seed: u64) -> Self {
        let slots = (0..workers).map(|_| Slot::new());
        let mut supervisor = Self {
            config,
            slots: slots.collect(),
            rng: seed,
            stopping: false,
            out: VecDeque::new(),
            killed: BTreeSet::new(),
            listen_failure: None,
            given_up: None,
            recycling: None,
            due: VecDeque::new(),
            recycling_paused: false,
        };
        for index in 0..workers {
            supervisor.out.push_back(SupervisorOutput::Spawn {
                slot: SlotId(index),
            });
        }
        supervisor
    }

    /// The worker for `slot` was started. Returns false when the slot no longer wants it (a
    /// replacement took the slot meanwhile, it was scaled away, or the cluster is stopping):
    /// then a [`SupervisorOutput::Disconnect`] for it follows.
    pub fn handle_spawned(&mut self, now: Instant, slot: SlotId, worker: WorkerId) -> bool {
        let deadline = self.config.boot_timeout.map(|t| now + t);
        match self.slots.get_mut(slot.0) {
            Some(s) if s.state == State::Spawning => {
                s.state = State::Booting {
                    worker,
                    deadline,
                    since: now,
                };
                s.last = Some(worker);
                self.draw_recycle_limit(slot.0);
                true
            }
            _ => {
                self.out.push_back(SupervisorOutput::Disconnect { worker });
                false
            }
        }
    }

    /// A rolling reload replaced `old` with `new`, which listens: `new` takes `old`'s slot (and
    /// `old`'s exit will not be restarted). If `old` had crashed and its slot was waiting to
    /// restart, the replacement fills it instead. Returns false if `old` had no slot that could
    /// take `new`.
    pub fn handle_replaced(&mut self, now: Instant, old: WorkerId, new: WorkerId) -> bool {
        let Some(index) = self.slots.iter().position(|s| s.last == Some(old)) else {
            return false;
        };
        let slot = &mut self.slots[index];
        match slot.state {
            State::Booting { .. }
            | State::Running { .. }
            | State::Waiting { .. }
            | State::CoolingDown { .. }
            | State::Spawning => {
                slot.state = State::Running {
                    worker: new,
                    since: now,
                };
                slot.last = Some(new);
                self.out.retain(|o| {
                    *o != SupervisorOutput::Spawn {
                        slot: SlotId(index),
                    }
                });
                self.draw_recycle_limit(index);
                true
            }
            State::Broken { .. } | State::Stopped | State::Removed => false,
        }
    }

    /// The worker for `slot` could not even be started: counts as a crash at boot, unless the
    /// slot no longer waits for it (scaled away or stopped meanwhile).
    pub fn handle_spawn_failed(&mut self, now: Instant, slot: SlotId) {
        if self
            .slots
            .get(slot.0)
            .is_some_and(|s| s.state == State::Spawning)
        {
            self.failed(now, slot.0, true);
        }
    }

    /// `worker` listens: without [`SupervisorConfig::wait_ready`] it has booted. Any listen
    /// failure before it is forgotten (a socket can be bound after all).
    pub fn handle_listening(&mut self, now: Instant, worker: WorkerId) {
        self.listen_failure = None;
        if !self.config.wait_ready {
            self.booted(now, worker);
        }
    }

    /// `worker` declared itself ready: with [`SupervisorConfig::wait_ready`] it has booted.
    pub fn handle_ready(&mut self, now: Instant, worker: WorkerId) {
        if self.config.wait_ready {
            self.booted(now, worker);
        }
    }

    /// The primary could not bind `address` (`errno`) for a worker. Decided when a worker exits
    /// at boot: a worker may handle the error itself (an optional port, a fallback address).
    pub fn handle_listen_failed(&mut self, address: String, errno: i32) {
        self.listen_failure = Some((address, errno));
    }

    fn booted(&mut self, now: Instant, worker: WorkerId) {
        if let Some(slot) = self.slot_of(worker)
            && let State::Booting { .. } = self.slots[slot].state
        {
            self.slots[slot].state = State::Running { worker, since: now };
        }
    }

    /// `worker` exited. A crash (a non-zero code, a fault's signal, the supervisor's own kill)
    /// is restarted after a backoff; a kill from outside after a short one
    /// ([`KILL_BACKOFF_MAX`]) that does not count towards the breaker. A worker that exited 0
    /// or left on purpose has finished and is not replaced; one that exited with the fatal code
    /// is not replaced either. A worker that fails at boot after a listen failed, while nothing
    /// serves, gives the cluster up ([`GiveUp::Listen`]) unless
    /// [`SupervisorConfig::retry_bind_errors`].
    pub fn handle_exit(&mut self, now: Instant, worker: WorkerId, exit: WorkerExit) {
        let WorkerExit {
            status,
            on_purpose,
            killed,
            signal_from_outside,
        } = exit;
        let ours = self.killed.remove(&worker) || killed.is_some();
        let failed_at_boot =
            self.is_booting(worker) && !on_purpose && status != ExitStatus::Code(0);
        if failed_at_boot
            && !self.stopping
            && self.serving() == 0
            && !self.config.retry_bind_errors
            && let Some((address, errno)) = self.listen_failure.take()
        {
            self.given_up = Some(GiveUp::Listen { address, errno });
            self.stop();
            if let Some(slot) = self.slot_of(worker) {
                self.slots[slot].state = State::Stopped;
            }
            return;
        }
        if !on_purpose && !ours && signal_from_outside {
            self.handle_killed(now, worker);
        } else {
            self.ended(now, worker, status, on_purpose);
        }
    }

    fn ended(&mut self, now: Instant, worker: WorkerId, status: ExitStatus, on_purpose: bool) {
        let Some(slot) = self.slot_of(worker) else {
            return;
        };
        if self.stopping || on_purpose || status == ExitStatus::Code(0) {
            // Finished, not crashed (systemd's `Restart=on-failure`): the slot stays empty.
            self.slots[slot].state = State::Stopped;
        } else if let Some(code) = self
            .config
            .fatal_exit_code
            .filter(|&code| status == ExitStatus::Code(code))
        {
            self.slots[slot].state = State::Broken { worker, code };
            self.out
                .push_back(SupervisorOutput::Event(SupervisorEvent::Fatal {
                    slot: SlotId(slot),
                    worker,
                    code,
                }));
        } else {
            let at_boot = matches!(self.slots[slot].state, State::Booting { .. });
            self.failed(now, slot, at_boot);
        }
    }

    /// `worker` was killed by a signal from outside the cluster (not a fault of its own, not
    /// the primary's kill for a hang): restarted after a short backoff that grows with the
    /// slot's recent kills up to [`KILL_BACKOFF_MAX`], without counting towards the breaker.
    /// A worker killed before it listened counts as a crash at boot (the OOM killer at every
    /// start is a boot loop, not a storm).
    fn handle_killed(&mut self, now: Instant, worker: WorkerId) {
        let Some(index) = self.slot_of(worker) else {
            return;
        };
        if self.stopping {
            self.slots[index].state = State::Stopped;
            return;
        }
        if matches!(self.slots[index].state, State::Booting { .. }) {
            self.failed(now, index, true);
            return;
        }
        let window = self.config.crash_loop_window;
        let slot = &mut self.slots[index];
        slot.kills.push_back(now);
        while slot
            .kills
            .front()
            .is_some_and(|t| now.saturating_duration_since(*t) > window)
        {
            slot.kills.pop_front();
        }
        let exponent = u32::try_from(slot.kills.len() - 1).unwrap_or(u32::MAX);
        let cap = KILL_BACKOFF_MAX.min(self.config.backoff_max);
        let delay = jittered_backoff(&self.config, exponent, cap, &mut self.rng);
        slot.state = State::Waiting { until: now + delay };
        self.out
            .push_back(SupervisorOutput::Event(SupervisorEvent::Killed {
                slot: SlotId(index),
                worker,
                delay,
            }));
    }

    /// Time passed: start slots whose backoff elapsed, kill workers past their boot deadline.
    pub fn handle_timeout(&mut self, now: Instant) {
        for (index, slot) in self.slots.iter_mut().enumerate() {
            match slot.state {
                State::Waiting { until } | State::CoolingDown { until, .. }
                    if until <= now && !self.stopping =>
                {
                    if matches!(slot.state, State::CoolingDown { .. }) {
                        // A fresh breaker window: the slot gets its full count of tries again.
                        slot.failures.clear();
                    }
                    slot.state = State::Spawning;
                    self.out.push_back(SupervisorOutput::Spawn {
                        slot: SlotId(index),
                    });
                }
                State::Booting {
                    worker,
                    deadline: Some(deadline),
                    since,
                } if deadline <= now => {
                    // Killed once; its exit will count as a crash.
                    slot.state = State::Booting {
                        worker,
                        deadline: None,
                        since,
                    };
                    self.killed.insert(worker);
                    self.out.push_back(SupervisorOutput::Kill {
                        worker,
                        reason: KillReason::BootTimeout,
                    });
                }
                _ => {}
            }
        }
    }

    /// When [`Self::handle_timeout`] should be called next.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.slots
            .iter()
            .filter_map(|slot| match slot.state {
                State::Waiting { until } | State::CoolingDown { until, .. } if !self.stopping => {
                    Some(until)
                }
                State::Booting { deadline, .. } => deadline,
                _ => None,
            })
            .min()
    }

    /// The next thing to do.
    #[must_use]
    pub fn poll_output(&mut self) -> Option<SupervisorOutput> {
        self.out.pop_front()
    }

    /// The cluster is shutting down: nothing is restarted any more.
    pub fn stop(&mut self) {
        self.stopping = true;
        self.due.clear();
        self.out
            .retain(|o| !matches!(o, SupervisorOutput::Spawn { .. }));
        for slot in &mut self.slots {
            if matches!(
                slot.state,
                State::Waiting { .. } | State::CoolingDown { .. } | State::Spawning
            ) {
                slot.state = State::Stopped;
            }
        }
    }

    /// Whether the cluster is over: every slot finished, broke on the fatal code, or cools
    /// down from crashes that all came before its workers listened (nothing serves, and a
    /// restart is not going to change that; [`Self::gave_up`] says why).
    pub fn is_done(&self) -> bool {
        if self.given_up.is_some() {
            return true;
        }
        // Scaled to zero is idle, not done: it may be scaled up again.
        self.slots.iter().all(|s| {
            matches!(
                s.state,
                State::Broken { .. }
                    | State::Stopped
                    | State::Removed
                    | State::CoolingDown { at_boot: true, .. }
            )
        }) && self.slots.iter().any(|s| s.state != State::Removed)
    }

    /// Why the cluster is over, if it is and not because every worker finished: a socket that
    /// cannot be bound, else a worker's fatal exit, else a slot whose workers crash before they
    /// listen. Workers may still run when the cluster is given up (a listen failure stops it
    /// while other workers boot): the driver drains them.
    pub fn gave_up(&self) -> Option<GiveUp> {
        if let Some(given_up) = &self.given_up {
            return Some(given_up.clone());
        }
        if !self.is_done() {
            return None;
        }
        let fatal = self
            .slots
            .iter()
            .enumerate()
            .find_map(|(index, s)| match s.state {
                State::Broken { worker, code } => Some(GiveUp::Fatal {
                    slot: SlotId(index),
                    worker,
                    code,
                }),
                _ => None,
            });
        fatal.or_else(|| {
            self.slots
                .iter()
                .enumerate()
                .find_map(|(index, s)| match s.state {
                    State::CoolingDown { at_boot: true, .. } => Some(GiveUp::BootLoop {
                        slot: SlotId(index),
                        failures: s.failures.len(),
                    }),
                    _ => None,
                })
        })
    }

    /// Whether `worker` was started by a slot and has not listened yet.
    pub fn is_booting(&self, worker: WorkerId) -> bool {
        self.slots
            .iter()
            .any(|s| matches!(s.state, State::Booting { worker: w, .. } if w == worker))
    }

    /// Slots whose worker listens.
    pub fn serving(&self) -> usize {
        self.slots
            .iter()
            .filter(|s| matches!(s.state, State::Running { .. }))
            .count()
    }

    /// Slots that have, or will have, a worker.
    pub fn active(&self) -> usize {
        self.slots
            .iter()
            .filter(|s| {
                !matches!(
                    s.state,
                    State::Broken { .. } | State::Stopped | State::Removed
                )
            })
            .count()
    }

    /// Keeps `target` slots active: adds slots (their `Spawn`s follow), or removes the newest
    /// ones (a [`SupervisorOutput::Disconnect`] for each one's worker follows). Returns the
    /// slots removed.
    ///
    /// # Errors
    ///
    /// Over [`SupervisorConfig::max_workers`], or while the cluster stops; nothing changes.
    pub fn scale(&mut self, target: usize) -> Result<Vec<SlotId>, ScaleError> {
        if self.stopping {
            return Err(ScaleError::Stopping);
        }
        if target > self.config.max_workers {
            return Err(ScaleError::TooMany {
                asked: target,
                max: self.config.max_workers,
            });
        }
        while self.active() < target {
            self.add_slot();
        }
        let mut removed = Vec::new();
        while self.active() > target {
            let Some((slot, _)) = self.remove_slot() else {
                break;
            };
            removed.push(slot);
        }
        Ok(removed)
    }

    /// One worker more (`true`) or fewer, as SIGTTIN and SIGTTOU ask: never fewer than one
    /// (only [`Self::scale`] empties the cluster). Returns the target and the slots removed.
    ///
    /// # Errors
    ///
    /// As [`Self::scale`].
    pub fn scale_by_one(&mut self, more: bool) -> Result<(usize, Vec<SlotId>), ScaleError> {
        let target = if more {
            self.active() + 1
        } else {
            self.active().saturating_sub(1).max(1)
        };
        self.scale(target).map(|removed| (target, removed))
    }

    /// Adds a slot; its `Spawn` is the next output.
    pub fn add_slot(&mut self) -> SlotId {
        let slot = SlotId(self.slots.len());
        self.slots.push(Slot::new());
        self.out.push_back(SupervisorOutput::Spawn { slot });
        slot
    }

    /// Removes the newest active slot. Returns it, with its worker if one runs, for which a
    /// [`SupervisorOutput::Disconnect`] follows (it drains and exits, and is not restarted);
    /// `None` if there was no active slot.
    pub fn remove_slot(&mut self) -> Option<(SlotId, Option<WorkerId>)> {
        let index = self.slots.iter().rposition(|s| {
            !matches!(
                s.state,
                State::Broken { .. } | State::Stopped | State::Removed
            )
        })?;
        let worker = match self.slots[index].state {
            State::Booting { worker, .. } | State::Running { worker, .. } => Some(worker),
            _ => None,
        };
        self.slots[index].state = State::Removed;
        self.out.retain(|o| {
            *o != SupervisorOutput::Spawn {
                slot: SlotId(index),
            }
        });
        if let Some(worker) = worker {
            self.out.push_back(SupervisorOutput::Disconnect { worker });
        }
        Some((SlotId(index), worker))
    }

    /// Slots whose breaker is open (cooling down) or whose worker was fatal.
    pub fn broken(&self) -> usize {
        self.slots
            .iter()
            .filter(|s| matches!(s.state, State::Broken { .. } | State::CoolingDown { .. }))
            .count()
    }

    /// The slot of `worker`, if it belongs to one.
    pub fn slot_of(&self, worker: WorkerId) -> Option<usize> {
        self.slots.iter().position(|s| match s.state {
            State::Booting { worker: w, .. } | State::Running { worker: w, .. } => w == worker,
            _ => false,
        })
    }

    fn failed(&mut self, now: Instant, index: usize, at_boot: bool) {
        let config = self.config;
        let slot = &mut self.slots[index];
        if let State::Running { since, .. } = slot.state
            && now.saturating_duration_since(since) >= config.healthy_after
        {
            slot.attempt = 0;
        }
        slot.failures.push_back((now, at_boot));
        while slot
            .failures
            .front()
            .is_some_and(|(t, _)| now.saturating_duration_since(*t) > config.crash_loop_window)
        {
            slot.failures.pop_front();
        }
        let failures = slot.failures.len();
        if failures >= config.crash_loop_failures {
            let at_boot = slot.failures.iter().all(|(_, at_boot)| *at_boot);
            let cooldown = config.backoff_max;
            slot.state = State::CoolingDown {
                until: now + cooldown,
                at_boot,
            };
            self.out
                .push_back(SupervisorOutput::Event(SupervisorEvent::CrashLoop {
                    slot: SlotId(index),
                    failures,
                    at_boot,
                    cooldown,
                }));
            return;
        }
        let exponent = slot.attempt;
        slot.attempt = slot.attempt.saturating_add(1);
        let delay = jittered_backoff(&config, exponent, config.backoff_max, &mut self.rng);
        self.slots[index].state = State::Waiting { until: now + delay };
        self.out
            .push_back(SupervisorOutput::Event(SupervisorEvent::Respawning {
                slot: SlotId(index),
                delay,
                recent_failures: failures,
            }));
    }
}

impl Slot {
    fn new() -> Self {
        Self {
            state: State::Spawning,
            last: None,
            attempt: 0,
            failures: VecDeque::new(),
            kills: VecDeque::new(),
            recycling: recycle::SlotRecycling::default(),
        }
    }
}

/// The longest backoff before restarting a worker killed from outside: a storm of kills must
/// not leave slots empty long after it ends.
pub const KILL_BACKOFF_MAX: Duration = Duration::from_secs(1);

/// Why the supervisor gave up on the cluster ([`Supervisor::gave_up`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum GiveUp {
    /// A socket the workers asked for could not be bound while no worker served, and a worker
    /// failed at boot after it: every worker would fail the same way.
    Listen {
        /// The address, as the worker asked for it.
        address: String,
        /// The bind's errno.
        errno: i32,
    },
    /// A worker exited with the fatal exit code.
    Fatal {
        /// Its slot.
        slot: SlotId,
        /// The worker.
        worker: WorkerId,
        /// The code.
        code: i32,
    },
    /// Every slot's workers crash before they listen.
    BootLoop {
        /// The first such slot.
        slot: SlotId,
        /// Its crashes within the breaker's window.
        failures: usize,
    },
}

/// Exponential backoff with full jitter: uniform in `[0, min(initial × 2^exponent, cap)]`.
fn jittered_backoff(
    config: &SupervisorConfig,
    exponent: u32,
    cap: Duration,
    rng: &mut u64,
) -> Duration {
    let ceiling = config
        .backoff_initial
        .saturating_mul(1 << exponent.min(30))
        .min(cap);
    ceiling.mul_f64(next_unit(rng))
}

/// splitmix64: a uniform number in [0, 1].
fn next_unit(state: &mut u64) -> f64 {
    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^= z >> 31;
    (z >> 11) as f64 / (1u64 << 53) as f64
}

#[cfg(test)]
mod tests;
