//! The Tokio runtime of `cluster`: the only crate that touches processes, sockets and signals.
//! Users depend on the `cluster` crate, which re-exports this one.
//!
//! It drives the sans-IO state machines of `cluster-core` with real I/O:
//!
//! - [`Primary`] forks workers (re-executing its generation's binary with the link at fd 3), owns the
//!   listening sockets and hands out connections; its driver is one task that accepts, hands
//!   off, reads acks and sends, with no channel hop on the connection path.
//! - [`Worker`] is a worker's link to its primary; [`ClusterListener`] is the listener user code
//!   binds, in a worker or in a plain process alike.
//! - [`Supervisor`] keeps the workers running and owns the signals.
//! - [`observability`] shows a supervised cluster outside: its status, the `/healthz`,
//!   `/readyz` and `/metrics` endpoint, the control socket.
//! - [`run`] and [`run_workers`] decide the role of this process and run `main` on a runtime
//!   built for it (what `#[cluster::main]` expands to), with the [`Settings`] it was given.
//! - With the features of the same names, `axum::serve`, `hyper::serve` and `tonic::serve` serve
//!   a listener until the worker is asked to leave, then drain it without losing a request.

#![deny(unsafe_code)]
#![cfg_attr(docsrs, feature(doc_cfg))]

mod cgroup;
mod check;
mod entry;
pub mod env;
mod ipc;
pub mod message;
pub mod net;
pub mod observability;
pub mod primary;
mod role;
#[cfg(any(feature = "axum", feature = "hyper", feature = "tonic"))]
mod serve;
pub mod settings;
mod socket;
pub mod supervisor;
// `sys::ffi` is the one module allowed `unsafe`: every block there has a `// SAFETY:` comment.
mod sys;
mod systemd;
pub mod worker;

#[doc(hidden)]
pub use entry::configure;
pub use entry::{MainOutput, Role, ready, run, run_workers, shutdown};
#[doc(hidden)]
pub use entry::{MainReturn, PassOutput, ReportError};
pub use net::ClusterListener;
pub use primary::Primary;
#[cfg(any(feature = "axum", feature = "hyper", feature = "tonic"))]
pub use serve::Serve;
#[cfg(feature = "axum")]
pub use serve::axum;
#[cfg(feature = "hyper")]
pub use serve::hyper;
#[cfg(feature = "tonic")]
pub use serve::tonic;
pub use settings::Settings;
pub use supervisor::Supervisor;
pub use worker::Worker;

pub(crate) use settings::SettingsError;
