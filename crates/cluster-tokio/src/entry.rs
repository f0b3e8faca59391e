//! Entry points: decide this process's role, build a runtime for it, run `main`.

use std::future::Future;
use std::io;

use tokio::signal::unix::{SignalKind, signal};

use crate::primary::Primary;
use crate::role::{self, Detected};
use crate::settings::Settings;
use crate::worker::{self, Worker};

/// The environment variable that overrides the number of workers.
pub const ENV_WORKERS: &str = "CLUSTER_WORKERS";

/// What this process is in the cluster.
#[derive(Debug)]
pub enum Role {
    /// The primary: fork workers and watch them.
    Primary(Primary),
    /// A worker: serve.
    Worker(Worker),
}

/// The Tokio runtime flavor of workers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Flavor {
    /// One thread per worker process (the default: scale with processes, not threads).
    #[default]
    CurrentThread,
    /// A work-stealing runtime in each worker.
    MultiThread,
}

/// How worker runtimes are built (the primary always runs on a current-thread runtime).
#[derive(Clone, Copy, Debug, Default)]
pub struct RuntimeOptions {
    flavor: Flavor,
    worker_threads: Option<usize>,
}

impl RuntimeOptions {
    /// The defaults: a current-thread runtime per worker.
    pub const fn new() -> Self {
        Self {
            flavor: Flavor::CurrentThread,
            worker_threads: None,
        }
    }

    /// Sets the flavor.
    #[must_use]
    pub const fn flavor(mut self, flavor: Flavor) -> Self {
        self.flavor = flavor;
        self
    }

    /// Sets the number of threads of a multi-thread worker runtime.
    #[must_use]
    pub const fn worker_threads(mut self, threads: usize) -> Self {
        self.worker_threads = Some(threads);
        self
    }

    fn build(self) -> io::Result<tokio::runtime::Runtime> {
        let mut builder = match self.flavor {
            Flavor::CurrentThread => tokio::runtime::Builder::new_current_thread(),
            Flavor::MultiThread => tokio::runtime::Builder::new_multi_thread(),
        };
        if let (Flavor::MultiThread, Some(threads)) = (self.flavor, self.worker_threads) {
            builder.worker_threads(threads);
        }
        builder.enable_all().build()
    }
}

/// Runs `main` in the role this process has: in a worker (started by a primary), with a
/// [`Role::Worker`] on a runtime built from `options`; otherwise with a [`Role::Primary`] on a
/// current-thread runtime.
///
/// Call it first thing in `fn main`, before any thread exists: it reads and removes the worker
/// markers from the environment (`#[cluster::main]` expands to this).
///
/// # Panics
///
/// If the runtime cannot be built, or a worker cannot register its link with the runtime.
pub fn run<F, Fut>(options: RuntimeOptions, main: F) -> Fut::Output
where
    F: FnOnce(Role) -> Fut,
    Fut: Future,
{
    match role::take() {
        Some(Detected::Worker { id, ipc }) => {
            let runtime = options
                .build()
                .expect("failed to build the worker's Tokio runtime");
            runtime.block_on(async move {
                let worker =
                    Worker::start(id, ipc).expect("failed to connect to the cluster primary");
                main(Role::Worker(worker)).await
            })
        }
        _ => {
            let runtime = RuntimeOptions::new()
                .build()
                .expect("failed to build the primary's Tokio runtime");
            runtime.block_on(async move {
                main(Role::Primary(Primary::start(Settings::default()))).await
            })
        }
    }
}

/// Runs `body` in every worker while the primary keeps [`worker_count`]`(workers)` of them
/// running with a [`Supervisor`](crate::Supervisor) (restarts with backoff, crash-loop breaker,
/// graceful shutdown on SIGTERM, fast on SIGINT).
///
/// This is `#[cluster::main(workers = N)]`. The primary returns `Ok` after a shutdown signal, or
/// once every worker left on purpose; an error once every slot failed.
pub fn run_workers<F, Fut, R>(options: RuntimeOptions, workers: Option<usize>, body: F) -> R
where
    F: FnOnce() -> Fut,
    Fut: Future<Output = R>,
    R: MainOutput,
{
    if !role::is_worker() && worker_count(workers) == 0 {
        // `CLUSTER_WORKERS=0`: no cluster at all, the body runs in this process.
        let runtime = options.build().expect("failed to build the Tokio runtime");
        return runtime.block_on(body());
    }
    run(options, move |role| async move {
        match role {
            Role::Worker(_) => body().await,
            Role::Primary(primary) => {
                install_default_logging();
                R::from_primary(
                    crate::Supervisor::new(primary)
                        .run(worker_count(workers))
                        .await,
                )
            }
        }
    })
}

/// In this form no user code runs in the primary, so nobody else can install a subscriber for
/// its reports: install a plain one (filtered by `RUST_LOG`, default `info`) unless one exists.
fn install_default_logging() {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let ansi = io::IsTerminal::is_terminal(&io::stderr());
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(io::stderr)
        .with_ansi(ansi)
        .try_init();
}

/// The number of workers to start: `CLUSTER_WORKERS` if set, else `configured`, else the
/// available parallelism. `CLUSTER_WORKERS=0` asks [`run_workers`] to run unclustered: the body
/// runs in this process, with no primary.
pub fn worker_count(configured: Option<usize>) -> usize {
    match std::env::var(ENV_WORKERS).ok().and_then(|v| v.parse().ok()) {
        Some(workers) => workers,
        None => configured
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, usize::from))
            .max(1),
    }
}

/// Resolves when this process should stop serving: in a worker, when the primary asks it to
/// disconnect or goes away; in any other process, on SIGTERM or SIGINT.
pub async fn shutdown() {
    if let Some(worker) = worker::current() {
        return worker.shutdown().await;
    }
    let (Ok(mut terminate), Ok(mut interrupt)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        return std::future::pending().await;
    };
    tokio::select! {
        _ = terminate.recv() => {}
        _ = interrupt.recv() => {}
    }
}

/// What `main` returns, as the primary of `run_workers` produces it.
pub trait MainOutput {
    /// The primary's result as this type.
    fn from_primary(result: io::Result<()>) -> Self;
}

impl MainOutput for () {
    fn from_primary(result: io::Result<()>) {
        if let Err(error) = result {
            eprintln!("cluster primary: {error}");
            std::process::exit(1);
        }
    }
}

impl<E: From<io::Error>> MainOutput for Result<(), E> {
    fn from_primary(result: io::Result<()>) -> Self {
        result.map_err(E::from)
    }
}
