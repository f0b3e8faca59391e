//! The Tokio runtime of `cluster`: the only crate that touches processes, sockets and signals.
//!
//! It drives the sans-IO state machines of [`proto`] (`cluster-core`) with real I/O:
//!
//! - [`Primary`] forks workers (re-executing `/proc/self/exe` with the link at fd 3), owns the
//!   listening sockets and hands out connections; its driver is one task that accepts, hands
//!   off, reads acks and sends, with no channel hop on the connection path.
//! - [`Worker`] is a worker's link to its primary; [`ClusterListener`] is the listener user code
//!   binds, in a worker or in a plain process alike.
//! - [`run`] decides the role of this process and runs `main` on a runtime built for it (what
//!   `#[cluster::main]` expands to).

mod entry;
mod ipc;
mod listener;
mod message;
mod primary;
mod role;
mod settings;
mod socket;
mod supervisor;
mod sys;
mod worker;

pub use entry::{
    ENV_WORKERS, Flavor, MainOutput, Role, RuntimeOptions, run, run_workers, shutdown, worker_count,
};
pub use listener::{ClusterListener, ClusterUdpSocket, ClusterUnixListener, ListenOptions};
pub use message::{DEFAULT_REQUEST_TIMEOUT, RequestError};
pub use primary::{
    Event, Events, ListenAddress, Message, Primary, ReloadAborted, ReloadReport, Stats,
    WorkerHandle, WorkerStats,
};
pub use proto;
pub use proto::supervisor::{FATAL_EXIT_CODE, SupervisorConfig};
pub use proto::{ExitStatus, KillReason, SchedulingPolicy, WorkerId, WorkerState};
pub use settings::{
    ENV_BATCH_SCHEDULING, ENV_HANDOFF_WINDOW, ENV_HEARTBEAT_TIMEOUT_MS, ENV_SCHED_POLICY, Settings,
};
pub use supervisor::Supervisor;
pub use worker::{ORPHAN_GRACE, Worker, current as worker};
