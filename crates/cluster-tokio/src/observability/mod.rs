//! What a supervised cluster shows outside: a status snapshot ([`ClusterStatus`], also
//! [`SupervisorHandle::status`]), and the servers that serve it, started by [`serve`]: the
//! HTTP endpoint of [`Settings::metrics_addr`](crate::Settings::metrics_addr) (`/healthz`,
//! `/readyz`, the status page `/status` with its `/status.json`, and, with the `metrics`
//! feature, Prometheus' `/metrics`) and the control socket of
//! [`Settings::control_socket`](crate::Settings::control_socket) behind `cluster-ctl`.
//!
//! Everything here reads the cluster through a [`SupervisorHandle`]; nothing below (the
//! supervisor, the primary) knows it exists. [`run_workers`](crate::run_workers) and
//! `#[cluster::main]` start it; a program that builds its own [`Supervisor`](crate::Supervisor)
//! calls [`serve`].

mod control;
mod endpoint;
mod local_server;
#[cfg(feature = "metrics")]
mod metrics;
mod status;

use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;

pub use self::status::{ClusterStatus, ProcessUsage, SlotStatus, WorkerStatus};
use crate::supervisor::SupervisorHandle;

/// The endpoint and the control socket of a cluster, served until this is dropped.
#[derive(Debug)]
pub struct Observability {
    endpoint: Option<(SocketAddr, AbortOnDrop)>,
    _control: Option<AbortOnDrop>,
}

impl Observability {
    /// The address the HTTP endpoint listens on (the port the kernel chose, for port 0);
    /// `None` without [`Settings::metrics_addr`](crate::Settings::metrics_addr).
    pub fn endpoint_addr(&self) -> Option<SocketAddr> {
        self.endpoint.as_ref().map(|(address, _)| *address)
    }
}

/// Why [`serve`] could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BindError {
    /// The endpoint's address ([`Settings::metrics_addr`](crate::Settings::metrics_addr)) cannot
    /// be bound.
    #[error("cannot serve the metrics endpoint on {address}")]
    Endpoint {
        /// The address.
        address: SocketAddr,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The control socket ([`Settings::control_socket`](crate::Settings::control_socket))
    /// cannot be bound: its path is taken by a live socket or another file, or its directory is
    /// missing or not writable.
    #[error("cannot listen for commands on {}", path.display())]
    ControlSocket {
        /// The path.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
}

impl From<BindError> for io::Error {
    fn from(error: BindError) -> Self {
        let kind = match &error {
            BindError::Endpoint { source, .. } | BindError::ControlSocket { source, .. } => {
                source.kind()
            }
        };
        Self::new(kind, error)
    }
}

/// Serves the endpoint and the control socket the supervised primary's settings name, until the
/// returned [`Observability`] is dropped. Call it before [`Supervisor::run`](crate::Supervisor::run),
/// so that an address that cannot be served stops the program before any worker starts.
///
/// # Errors
///
/// One of them cannot be bound; neither is served then.
///
/// # Panics
///
/// Outside a Tokio runtime.
///
/// # Examples
///
/// ```no_run
/// # async fn dox(primary: cluster_tokio::Primary) -> std::io::Result<()> {
/// let supervisor = cluster_tokio::Supervisor::new(primary);
/// let _served = cluster_tokio::observability::serve(&supervisor.handle())?;
/// supervisor.run().await?;
/// # Ok(()) }
/// ```
pub fn serve(handle: &SupervisorHandle) -> Result<Observability, BindError> {
    let settings = handle.primary().settings();
    let endpoint = match settings.metrics_addr {
        Some(address) => {
            let listener = endpoint::bind(address).map_err(|source| {
                tracing::error!("cannot serve the metrics endpoint on {address}: {source}");
                BindError::Endpoint { address, source }
            })?;
            let bound = listener.local_addr().unwrap_or(address);
            handle.shared.book.lock().expect("not poisoned").endpoint = Some(bound);
            tracing::info!(address = %bound, "serving /metrics, /healthz, /readyz and /status");
            let task = tokio::spawn(endpoint::serve(listener, handle.clone()));
            Some((bound, AbortOnDrop(task)))
        }
        None => None,
    };
    let control = match &settings.control_socket {
        Some(path) => {
            let socket = control::bind(path).map_err(|source| {
                tracing::error!("cannot listen for commands on {}: {source}", path.display());
                BindError::ControlSocket {
                    path: path.clone(),
                    source,
                }
            })?;
            tracing::info!(path = %path.display(), "listening for commands");
            Some(AbortOnDrop(tokio::spawn(control::serve(
                socket,
                handle.clone(),
            ))))
        }
        None => None,
    };
    Ok(Observability {
        endpoint,
        _control: control,
    })
}

/// A task that ends with its owner.
#[derive(Debug)]
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
