//! `cluster`: a Tokio-native multi-process cluster runtime, Node's `cluster` module for async
//! Rust.
//!
//! A primary process re-executes its own binary as N workers. Workers call
//! [`ClusterListener::bind`] as if they owned the port; the primary either accepts connections
//! and hands each to a worker in turn (fds passed over a Unix seqpacket socket, acked in
//! batches) or shares the listening socket with them. It restarts crashed workers, replaces
//! them one at a time on SIGHUP, and drains them on SIGTERM.
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
//! socket itself. Every knob is a [`Settings`] method, handed to `#[cluster::main(settings =
//! ..)]`; operators override some with `CLUSTER_*` environment variables ([`env`](mod@env)).
//!
//! The [`guide`] walks through all of it; the [`operations`] page is for whoever deploys it.
//!
//! # Where things are
//!
//! - The paved path is at the root: [`main`], [`run`], [`Role`], [`shutdown`], [`ready`],
//!   [`Worker::current`], [`Settings`], [`ClusterListener`], [`Primary`], [`Worker`].
//! - [`net`]: every listener (TCP, Unix, UDP) and its bind options.
//! - [`primary`]: what the primary knows of its workers: events, their messages, handles,
//!   counters, signals.
//! - [`worker`](mod@worker): the worker's side.
//! - [`message`]: typed messages and requests between the two.
//! - [`supervisor`]: restarts, rolling reloads, scaling, and their errors.
//! - [`observability`]: a snapshot of the cluster from outside (workers, slots, restarts,
//!   reloads, memory and CPU time), and the metrics endpoint and control socket that serve it.
//! - [`settings`] and [`env`](mod@env): configuration, in code and from the environment.
//!
//! # Optional features
//!
//! - `macros` (default): `#[cluster::main]`.
//! - `axum`: `axum::serve(listener, router)` serves an axum `Router` until the worker is asked
//!   to leave, then drains it without losing a request (with `ConnectInfo` for the peer's
//!   address); and `ClusterListener` and `ClusterUnixListener` implement
//!   `axum::serve::Listener`.
//! - `hyper`: `hyper::serve(listener, service)`, the same for a hyper service (HTTP/1.1 and
//!   h2c, HTTP/2 without TLS).
//! - `tonic`: `tonic::serve(listener, router)`, the same for a tonic router (HTTP/2), with a
//!   drain deadline and accept errors handled.
//! - `metrics`: `GET /metrics` on the primary's HTTP endpoint
//!   ([`Settings::metrics_addr`]), in the Prometheus text format; `/healthz` and `/readyz`
//!   are served without it.

#![cfg_attr(docsrs, feature(doc_cfg))]

#[cfg(feature = "macros")]
pub use cluster_macros::main;
#[cfg(feature = "axum")]
pub use cluster_tokio::axum;
#[cfg(feature = "hyper")]
pub use cluster_tokio::hyper;
#[cfg(feature = "tonic")]
pub use cluster_tokio::tonic;
pub use cluster_tokio::{
    ClusterListener, MainOutput, Primary, Role, Settings, Supervisor, Worker, env, message, net,
    observability, primary, ready, run, run_workers, settings, shutdown, supervisor, worker,
};

// `docs/` in this crate links to the repository's `docs/` pages: one text, on GitHub and on
// docs.rs alike, and `cargo package` puts the pages themselves in the crate.
#[doc = include_str!("../docs/guide.md")]
pub mod guide {}

#[doc = include_str!("../docs/operations.md")]
pub mod operations {}

/// What `#[cluster::main]` expands to. Not public API.
#[doc(hidden)]
pub mod __private {
    pub use cluster_tokio::configure;
    pub use cluster_tokio::settings::Flavor;
    pub use cluster_tokio::{MainReturn, PassOutput, ReportError};
    pub use cluster_tokio::{Role, Settings, run, run_workers};
}
