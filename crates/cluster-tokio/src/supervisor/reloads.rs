//! Rolling reloads as the supervisor runs them: one at a time, a SIGHUP meanwhile queues one
//! more.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use tokio::sync::oneshot;

use super::handle::Shared;
use super::{ReloadError, ReloadReport};
use crate::env::ErrorChain;
use crate::primary::Primary;

/// The rolling reload under way, if any, and whether a SIGHUP asked for another meanwhile.
pub(super) struct Reloads {
    running: Option<tokio::task::JoinHandle<()>>,
    /// Read by the running reload when it ends: with one more to come, it does not tell systemd
    /// it is ready, so that a `systemctl reload` waits for its own reload.
    queued: Arc<AtomicBool>,
    /// Where reloads are counted.
    shared: Arc<Shared>,
}

impl Reloads {
    pub(super) fn new(shared: Arc<Shared>) -> Self {
        Self {
            running: None,
            queued: Arc::new(AtomicBool::new(false)),
            shared,
        }
    }

    pub(super) fn is_running(&self) -> bool {
        self.running.as_ref().is_some_and(|r| !r.is_finished())
    }

    /// SIGHUP: a reload, or one more after the running one (a deploy that landed while the
    /// previous reload was starting its workers must still be picked up). Coalesced: however
    /// many signals come meanwhile, one reload follows.
    pub(super) fn on_signal(&mut self, primary: &Primary) {
        if self.is_running() {
            if !self.queued.swap(true, Ordering::SeqCst) {
                tracing::info!("SIGHUP during a reload: another reload follows this one");
            }
        } else {
            self.start(primary, "SIGHUP", None);
        }
    }

    /// A handle asks: the running reload's caller owns that one, so this is refused.
    pub(super) fn ask(
        &mut self,
        primary: &Primary,
        reply: oneshot::Sender<Result<ReloadReport, ReloadError>>,
    ) {
        if self.is_running() {
            let _ = reply.send(Err(ReloadError::AlreadyRunning));
        } else {
            self.start(primary, "asked", Some(reply));
        }
    }

    /// Resolves when the running reload ends (never while none runs).
    pub(super) async fn finished(&mut self) {
        match &mut self.running {
            Some(running) => {
                let _ = running.await;
                self.running = None;
            }
            None => std::future::pending().await,
        }
    }

    /// Stops the running reload (a shutdown): it starts no more replacements.
    pub(super) fn cancel(&mut self) {
        self.queued.store(false, Ordering::SeqCst);
        if let Some(running) = self.running.take() {
            running.abort();
        }
    }

    pub(super) fn start_queued(&mut self, primary: &Primary) {
        if self.queued.swap(false, Ordering::SeqCst) {
            self.start(primary, "SIGHUP (queued)", None);
        }
    }

    /// Starts a rolling reload in a task; the outcome is logged, and sent to `reply` if a
    /// handle asked for it.
    pub(super) fn start(
        &mut self,
        primary: &Primary,
        cause: &'static str,
        reply: Option<oneshot::Sender<Result<ReloadReport, ReloadError>>>,
    ) {
        tracing::info!(cause, "rolling reload");
        crate::systemd::reloading(cause, crate::systemd::reload_step(primary.settings()));
        let primary = primary.clone();
        let shared = self.shared.clone();
        let queued = self.queued.clone();
        self.running = Some(tokio::spawn(async move {
            // After a recycle under way, if any: one replacement at a time.
            let turn = shared.replacing.lock().await;
            let outcome = super::reload::rolling_reload(&primary).await;
            drop(turn);
            shared.book.lock().expect("not poisoned").reloaded(&outcome);
            match &outcome {
                Ok(report) if report.is_complete() => tracing::info!(
                    generation = report.generation,
                    replaced = report.replaced.len(),
                    handed_back = report.handed_back,
                    binary = %report.to,
                    binary_changed = report.binary_changed(),
                    "reload complete"
                ),
                Ok(report) => {
                    let why = report.aborted.as_ref().map(ToString::to_string);
                    tracing::error!(
                        generation = report.generation,
                        replaced = report.replaced.len(),
                        "reload aborted, the old workers keep serving: {}",
                        why.unwrap_or_default()
                    );
                }
                Err(error) => {
                    tracing::error!(error = %ErrorChain(error), "reload failed; the old workers keep serving")
                }
            }
            let status = reload_status(&outcome);
            if queued.load(Ordering::SeqCst) {
                // The queued reload ends with `READY=1`.
                crate::systemd::notify(&format!("STATUS={status}"));
            } else {
                crate::systemd::reloaded(&status);
            }
            if let Some(reply) = reply {
                let _ = reply.send(outcome);
            }
        }));
    }
}

/// How a reload went, in a line for `systemctl status`.
pub(super) fn reload_status(outcome: &Result<ReloadReport, ReloadError>) -> String {
    match outcome {
        Ok(report) => match &report.aborted {
            None => format!(
                "reload complete: generation {}, {} workers replaced, {}",
                report.generation,
                report.replaced.len(),
                if report.binary_changed() {
                    "new binary"
                } else {
                    "same binary"
                }
            ),
            Some(aborted) => format!("reload aborted, the old workers keep serving: {aborted}"),
        },
        Err(error) => format!(
            "reload failed, the old workers keep serving: {}",
            ErrorChain(error)
        ),
    }
}
