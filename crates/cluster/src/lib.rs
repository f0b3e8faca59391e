//! `cluster`: a Tokio-native multi-process cluster runtime, Node's `cluster` module for async
//! Rust.
//!
//! A primary process re-executes its own binary as N workers. Workers call
//! [`ClusterListener::bind`] as if they owned the port; the primary either accepts connections
//! and hands each to a worker in turn (fds passed over a Unix seqpacket socket, one ack per
//! handoff) or shares the listening socket with them.
//!
//! ```no_run
//! // Every worker runs the body; the primary forks them, watches them, and drains them on
//! // SIGTERM.
//! #[cluster::main(workers = 4)]
//! async fn main() -> std::io::Result<()> {
//!     let mut listener = cluster::ClusterListener::bind("127.0.0.1:3000").await?;
//!     while let Ok((stream, peer)) = listener.accept().await {
//!         // Serve `stream` (hyper, tonic, or by hand).
//!         drop((stream, peer));
//!     }
//!     Ok(())
//! }
//! ```
//!
//! The same program runs unclustered: outside a worker, [`ClusterListener::bind`] binds the
//! socket itself.
//!
//! # Optional features
//!
//! - `macros` (default): `#[cluster::main]`.
//! - `axum`: `ClusterListener` and `ClusterUnixListener` implement `axum::serve::Listener`.

#[cfg(feature = "macros")]
pub use cluster_macros::main;
pub use cluster_tokio::{
    ClusterListener, ClusterUdpSocket, ClusterUnixListener, DEFAULT_REQUEST_TIMEOUT,
    ENV_BATCH_SCHEDULING, ENV_HANDOFF_WINDOW, ENV_HEARTBEAT_TIMEOUT_MS, ENV_SCHED_POLICY,
    ENV_WORKERS, Event, Events, ExitStatus, FATAL_EXIT_CODE, Flavor, KillReason, ListenAddress,
    ListenOptions, MainOutput, Message, ORPHAN_GRACE, Primary, ReloadAborted, ReloadReport,
    RequestError, Role, RuntimeOptions, SchedulingPolicy, Settings, Stats, Supervisor,
    SupervisorConfig, Worker, WorkerHandle, WorkerId, WorkerState, WorkerStats, proto, run,
    run_workers, shutdown, worker, worker_count,
};

/// What `#[cluster::main]` expands to. Not public API.
#[doc(hidden)]
pub mod __private {
    pub use cluster_tokio::{Flavor, Role, RuntimeOptions, run, run_workers};
}
