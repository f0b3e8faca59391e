//! What the supervisor logs of its workers' lives.

use std::io;

use proto::supervisor::{SlotId, SupervisorEvent};
use proto::{ExitStatus, KillReason, WorkerId};

use crate::settings::Shown;

/// Failures to start a worker process, logged once per burst: the first with its error, the
/// rest counted and summed up when the burst ends (a fork that fails with `EAGAIN` fails for
/// every slot at once, and each slot retries on its own backoff).
#[derive(Default)]
pub(super) struct SpawnFailures {
    in_burst: u64,
    /// Slots whose last start failed: their restarts are part of the burst, not news.
    slots: std::collections::BTreeSet<SlotId>,
}

impl SpawnFailures {
    pub(super) fn failed(&mut self, slot: SlotId, error: &io::Error) {
        if self.in_burst == 0 {
            tracing::error!(%slot, %error, "could not start a worker; retrying with backoff (further failures are counted, not logged)");
        }
        self.in_burst += 1;
        self.slots.insert(slot);
    }

    /// The burst is over, for the reason given.
    pub(super) fn end_burst(&mut self, why: &'static str) {
        if self.in_burst > 1 {
            tracing::warn!(failed_starts = self.in_burst, "{why}");
        }
        self.in_burst = 0;
        self.slots.clear();
    }

    pub(super) fn in_burst(&self, slot: SlotId) -> bool {
        self.slots.contains(&slot)
    }
}

pub(super) fn report(event: SupervisorEvent, spawn_failures: &SpawnFailures) {
    match event {
        SupervisorEvent::Respawning {
            slot,
            delay,
            recent_failures,
        } if spawn_failures.in_burst(slot) => {
            tracing::debug!(%slot, delay = %Shown(delay), recent_failures, "starting a worker again");
        }
        SupervisorEvent::Respawning {
            slot,
            delay,
            recent_failures,
        } => {
            tracing::warn!(%slot, delay = %Shown(delay), recent_failures, "restarting a crashed worker");
        }
        SupervisorEvent::Killed {
            slot,
            worker,
            delay,
        } => {
            tracing::warn!(%slot, worker = worker.get(), delay = %Shown(delay), "worker killed from outside; restarting it");
        }
        SupervisorEvent::CrashLoop {
            slot,
            failures,
            at_boot,
            cooldown,
        } => {
            tracing::error!(%slot, failures, at_boot, cooldown = %Shown(cooldown), "crash loop: this slot cools down before it tries again; the other workers keep serving");
        }
        SupervisorEvent::Fatal { slot, worker, code } => {
            tracing::error!(%slot, worker = worker.get(), code, "worker exited with the fatal exit code; not restarting it");
        }
    }
}

/// Whether a worker that died of `status` was killed from outside (an operator's `kill`, the OOM
/// killer, a terminal's signals) rather than crashing: a signal that a process does not raise
/// against itself by faulting or aborting.
pub(super) fn is_kill_from_outside(status: ExitStatus) -> bool {
    // Raised by the process's own faults, or by the kernel for what the process did itself
    // (a write to a closed pipe, a CPU or file-size limit).
    const FAULTS: [i32; 10] = [
        libc::SIGSEGV,
        libc::SIGBUS,
        libc::SIGILL,
        libc::SIGFPE,
        libc::SIGABRT,
        libc::SIGSYS,
        libc::SIGTRAP,
        libc::SIGPIPE,
        libc::SIGXCPU,
        libc::SIGXFSZ,
    ];
    matches!(status, ExitStatus::Signal(signal) if !FAULTS.contains(&signal))
}

pub(super) fn log_exit(
    worker: WorkerId,
    pid: u32,
    status: ExitStatus,
    on_purpose: bool,
    killed: Option<KillReason>,
) {
    if let Some(reason) = killed {
        tracing::warn!(worker = worker.get(), pid, %status, %reason, "worker exited");
    } else if on_purpose || status == ExitStatus::Code(0) {
        tracing::info!(worker = worker.get(), pid, %status, "worker exited");
    } else {
        tracing::warn!(worker = worker.get(), pid, %status, "worker exited");
    }
}
