//! Which role this process plays, decided once from its environment.

use std::os::fd::OwnedFd;
use std::sync::Mutex;

use proto::WorkerId;

/// Set by the primary in every worker's environment: its id.
pub(crate) const ENV_WORKER_ID: &str = "CLUSTER_WORKER_ID";
/// Set by the primary in every worker's environment: the fd of its end of the link.
pub(crate) const ENV_IPC_FD: &str = "CLUSTER_IPC_FD";

/// What [`detect`] found.
#[derive(Debug)]
pub(crate) enum Detected {
    Primary,
    Worker { id: WorkerId, ipc: OwnedFd },
}

static DETECTED: Mutex<Option<Detected>> = Mutex::new(None);
static DONE: std::sync::Once = std::sync::Once::new();

/// Reads the worker markers, takes the inherited link fd, and removes the markers from the
/// environment when that is sound (a single-threaded process, as at the top of `main`), so user
/// code and grandchildren do not see them. Runs once; later calls are no-ops.
pub(crate) fn detect() {
    DONE.call_once(|| {
        let id = std::env::var(ENV_WORKER_ID)
            .ok()
            .and_then(|v| v.parse::<u64>().ok());
        let fd_named = std::env::var_os(ENV_IPC_FD).is_some();
        crate::sys::remove_env_if_single_threaded(&[ENV_WORKER_ID, ENV_IPC_FD]);
        let ipc = if fd_named {
            crate::sys::take_inherited_ipc_fd()
        } else {
            None
        };
        let detected = match (id, ipc) {
            (Some(id), Some(ipc)) => Detected::Worker {
                id: WorkerId::new(id),
                ipc,
            },
            _ => Detected::Primary,
        };
        *DETECTED.lock().expect("not poisoned") = Some(detected);
    });
}

/// Whether this process is a worker (without taking its link).
pub(crate) fn is_worker() -> bool {
    detect();
    matches!(
        *DETECTED.lock().expect("not poisoned"),
        Some(Detected::Worker { .. })
    )
}

/// Takes what [`detect`] found (once: the link fd can be owned only once).
pub(crate) fn take() -> Option<Detected> {
    detect();
    DETECTED.lock().expect("not poisoned").take()
}
