//! Recycling as the supervisor runs it ([`Settings::max_requests`], [`Settings::max_memory`]):
//! a task reads each worker's handoffs and resident memory for the policy, which decides; a
//! recycle it asks for runs as one step of a rolling reload, one at a time.

use std::sync::Arc;

use proto::WorkerId;
use proto::supervisor::RecycleReason;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::handle::Shared;
use super::reload::{Step, replace};
use crate::observability::ProcessUsage;
use crate::primary::Primary;
use crate::settings::{MAX_MEMORY_PERIOD, MAX_REQUESTS_PERIOD, Settings};

/// What the readings task saw.
pub(super) enum Reading {
    /// Connections handed to each worker so far.
    Handoffs(Vec<(WorkerId, u64)>),
    /// Each worker's resident memory, in bytes.
    Memory(Vec<(WorkerId, u64)>),
}

/// How a recycle ended.
pub(super) enum Outcome {
    /// `new` took the slot, and `old` drained.
    Replaced { new: WorkerId },
    /// The worker had gone or was leaving by its turn (a reload replaced it, it exited).
    Gone,
    /// The replacement did not come up: the worker serves on.
    Failed(String),
}

/// The readings the settings need, if any.
pub(super) struct Readings(Option<(mpsc::Receiver<Reading>, JoinHandle<()>)>);

impl Readings {
    /// Starts the readings the settings need, if any.
    pub(super) fn new(primary: &Primary) -> Self {
        let settings = primary.settings();
        Self(
            (settings.max_requests.is_some() || settings.max_memory.is_some()).then(|| {
                let (tx, rx) = mpsc::channel(2);
                (rx, tokio::spawn(read(primary.clone(), tx)))
            }),
        )
    }

    /// The next reading (never, without limits).
    pub(super) async fn next(&mut self) -> Option<Reading> {
        match &mut self.0 {
            Some((rx, _)) => rx.recv().await,
            None => std::future::pending().await,
        }
    }

    /// Stops reading (a shutdown).
    pub(super) fn cancel(&mut self) {
        if let Some((_, reader)) = self.0.take() {
            reader.abort();
        }
    }
}

impl Drop for Readings {
    fn drop(&mut self) {
        self.cancel();
    }
}

/// The recycle under way, if any.
#[derive(Default)]
pub(super) struct Recycler {
    running: Option<(WorkerId, RecycleReason, JoinHandle<Outcome>)>,
}

impl Recycler {
    /// Replaces `old` in a task; [`Self::finished`] resolves when it ends.
    pub(super) fn start(&mut self, shared: &Arc<Shared>, old: WorkerId, reason: RecycleReason) {
        let shared = shared.clone();
        let task = tokio::spawn(async move {
            // After a rolling reload that started first, if any: one replacement at a time.
            let _turn = shared.replacing.lock().await;
            let primary = &shared.primary;
            let Some(old) = primary
                .worker(old)
                .filter(|w| !w.is_dead() && w.is_connected() && !w.is_leaving())
            else {
                return Outcome::Gone;
            };
            match replace(primary, &old, primary.image()).await {
                Ok(new) => Outcome::Replaced { new: new.id() },
                Err(Step::Aborted { reason, .. }) => Outcome::Failed(reason.to_string()),
                Err(Step::Spawn(error)) => {
                    Outcome::Failed(format!("cannot start a worker: {error}"))
                }
                Err(Step::Stopped) => Outcome::Failed("the primary stopped".to_owned()),
            }
        });
        self.running = Some((old, reason, task));
    }

    /// Resolves when the recycle under way ends (never while none runs): the worker, why it was
    /// recycled, and how it went.
    pub(super) async fn finished(&mut self) -> (WorkerId, RecycleReason, Outcome) {
        match &mut self.running {
            Some((_, _, task)) => {
                let outcome = task
                    .await
                    .unwrap_or_else(|_| Outcome::Failed("the recycle was cancelled".to_owned()));
                let (old, reason, _) = self.running.take().expect("running");
                (old, reason, outcome)
            }
            None => std::future::pending().await,
        }
    }

    /// Stops the recycle under way (a shutdown).
    pub(super) fn cancel(&mut self) {
        if let Some((_, _, task)) = self.running.take() {
            task.abort();
        }
    }
}

impl Drop for Recycler {
    fn drop(&mut self) {
        self.cancel();
    }
}

/// Reads every worker's handoffs every [`MAX_REQUESTS_PERIOD`] (with
/// [`Settings::max_requests`]) and its resident memory every [`MAX_MEMORY_PERIOD`] (with
/// [`Settings::max_memory`]), until the supervisor's loop stops listening.
async fn read(primary: Primary, tx: mpsc::Sender<Reading>) {
    let settings: &Settings = primary.settings();
    let mut requests = settings
        .max_requests
        .is_some()
        .then(|| period(MAX_REQUESTS_PERIOD));
    let mut memory = settings
        .max_memory
        .is_some()
        .then(|| period(MAX_MEMORY_PERIOD));
    loop {
        let reading = tokio::select! {
            () = tick(&mut requests) => {
                let Ok(counters) = primary.counters().await else { return };
                Reading::Handoffs(counters.workers.iter().map(|w| (w.id, w.handoffs)).collect())
            }
            () = tick(&mut memory) => {
                let workers: Vec<(WorkerId, u32)> =
                    primary.workers().iter().map(|w| (w.id(), w.pid())).collect();
                // `/proc` is read off the primary's only thread, which hands off connections.
                let read = tokio::task::spawn_blocking(move || {
                    workers
                        .into_iter()
                        .filter_map(|(id, pid)| Some((id, ProcessUsage::of(pid)?.resident_bytes)))
                        .collect()
                });
                let Ok(resident) = read.await else { return };
                Reading::Memory(resident)
            }
        };
        if tx.send(reading).await.is_err() {
            return;
        }
    }
}

fn period(every: std::time::Duration) -> tokio::time::Interval {
    let mut period = tokio::time::interval(every);
    period.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    period
}

async fn tick(period: &mut Option<tokio::time::Interval>) {
    match period {
        Some(period) => {
            period.tick().await;
        }
        None => std::future::pending().await,
    }
}
