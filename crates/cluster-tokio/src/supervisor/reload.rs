//! One rolling reload: every worker replaced, one at a time, by a worker of the next generation
//! (the program at its path looked up again), each replacement up before its predecessor drains.

use std::io;
use std::sync::Arc;

use proto::WorkerId;

use crate::primary::{Event, Image, Primary, Signal, WorkerHandle};

use super::{AbortReason, ReloadAborted, ReloadError, ReloadReport};

/// Replaces every worker of `primary`, one at a time, without dropping a connection. The
/// supervisor runs at most one at a time ([`super::reloads`]), and no recycle beside it.
pub(super) async fn rolling_reload(primary: &Primary) -> Result<ReloadReport, ReloadError> {
    let current = primary.image();
    // Looked up again now: a deploy renamed or copied a new build onto this path.
    let next = primary
        .open_next_image()
        .map_err(|source| ReloadError::Binary {
            path: current.binary.path.clone(),
            source,
        })?;
    if next.binary.same_file(&current.binary) {
        tracing::info!(generation = next.generation, binary = %next.binary, "rolling reload: the binary is unchanged, recycling the workers");
    } else {
        tracing::info!(generation = next.generation, from = %current.binary, to = %next.binary, "rolling reload to a new binary");
    }
    let next = Arc::new(next);
    let mut report = ReloadReport {
        generation: next.generation,
        from: current.binary.clone(),
        to: next.binary.clone(),
        replaced: Vec::new(),
        handed_back: 0,
        aborted: None,
    };
    // Until every worker runs the new generation: one that crashed meanwhile came back on the
    // current image, and is replaced too. One on its way out (scaled away) is left to go.
    while let Some(old) = primary.workers().into_iter().find(|w| {
        !w.is_dead() && w.is_connected() && !w.is_leaving() && w.generation() < next.generation
    }) {
        let handed_back = || async { primary.counters().await.map_or(0, |c| c.handed_back) };
        let before = handed_back().await;
        match replace(primary, &old, next.clone()).await {
            Ok(new) => {
                // Its idle keep-alive connections, served on by the others (the replacement
                // first).
                let moved = handed_back().await.saturating_sub(before);
                report.handed_back += moved;
                tracing::info!(
                    old = old.id().get(),
                    new = new.id().get(),
                    handed_back = moved,
                    "worker replaced"
                );
                report.replaced.push((old.id(), new.id()));
            }
            Err(Step::Aborted { new, reason }) => {
                tracing::error!(old = old.id().get(), new = new.get(), %reason, "reload aborted");
                report.aborted = Some(ReloadAborted {
                    worker: old.id(),
                    reason,
                });
                return Ok(report);
            }
            Err(Step::Spawn(error)) => return Err(ReloadError::Spawn(error)),
            Err(Step::Stopped) => return Err(ReloadError::Stopped),
        }
    }
    primary.set_image(next);
    Ok(report)
}

/// Why [`replace`] did not replace a worker.
pub(super) enum Step {
    /// The replacement could not be spawned.
    Spawn(io::Error),
    /// The replacement `new` did not come up (and was killed); the old worker serves on.
    Aborted { new: WorkerId, reason: AbortReason },
    /// The primary stopped.
    Stopped,
}

/// One step of a rolling reload, which a recycle takes too: a worker of `image` is started and
/// must be up (listening, or ready with `wait_ready`) within the boot timeout; then
/// [`Event::Replaced`] tells the supervisor that it takes `old`'s slot, and `old` is
/// disconnected. Returns the replacement once `old` has drained and exited.
pub(super) async fn replace(
    primary: &Primary,
    old: &WorkerHandle,
    image: Arc<Image>,
) -> Result<WorkerHandle, Step> {
    let settings = primary.settings();
    let (boot_timeout, wait_ready) = (settings.boot_timeout, settings.wait_ready);
    let mut events = primary.events();
    let new = primary
        .fork_image(Vec::new(), image)
        .await
        .map_err(Step::Spawn)?;
    let up = async {
        loop {
            match events.recv().await {
                Some(Event::Listening { worker, .. }) if worker.id() == new.id() && !wait_ready => {
                    return None;
                }
                Some(Event::Ready(worker)) if worker.id() == new.id() && wait_ready => {
                    return None;
                }
                Some(Event::Exit { worker, status, .. }) if worker.id() == new.id() => {
                    return Some(AbortReason::ExitedBeforeListening(status));
                }
                Some(Event::Error { worker, error }) if worker.id() == new.id() => {
                    if let Some((ours, theirs)) = error.version_mismatch() {
                        return Some(AbortReason::ProtocolMismatch { ours, theirs });
                    }
                }
                Some(_) => {}
                None => return Some(AbortReason::PrimaryStopped),
            }
        }
    };
    let outcome = tokio::time::timeout(boot_timeout, up).await;
    // Nothing else to wait for: an unread subscriber would hold every later event until the
    // old worker has drained.
    drop(events);
    if let Some(reason) = outcome.unwrap_or(Some(AbortReason::BootTimeout(boot_timeout))) {
        let _ = new.kill(Signal::KILL);
        return Err(Step::Aborted {
            new: new.id(),
            reason,
        });
    }
    primary.announce(Event::Replaced {
        old: old.clone(),
        new: new.clone(),
    });
    old.disconnect().await.map_err(|_| Step::Stopped)?;
    Ok(new)
}
