//! Entry points: decide this process's role, build a runtime for it, run `main`.

use std::fmt;
use std::future::Future;
use std::io::{self, Write};
use std::sync::atomic::{AtomicBool, Ordering};

use tokio::signal::unix::{SignalKind, signal};

use crate::primary::Primary;
use crate::role::{self, Detected};
use crate::settings::Settings;
use crate::worker::{self, Worker};

/// What this process is in the cluster.
#[derive(Debug)]
pub enum Role {
    /// The primary: fork workers and watch them.
    Primary(Primary),
    /// A worker: serve.
    Worker(Worker),
}

/// Runs `main` in the role this process has: in a worker (started by a primary), with a
/// [`Role::Worker`] on a runtime built as `settings` say; otherwise with a [`Role::Primary`]
/// started with `settings`, on a current-thread runtime.
///
/// Call it first thing in `fn main`, before any thread exists: it reads and removes the worker
/// markers from the environment (`#[cluster::main]` expands to this). It applies the
/// `CLUSTER_*` overrides of the environment to `settings` first ([`Settings::apply_env`]), as
/// [`run_workers`] and `#[cluster::main]` do, unless [`Settings::env_overrides`] is off.
///
/// A bad `CLUSTER_*` value, settings the primary cannot run with, and more workers
/// ([`Settings::worker_count`]) than this user may start processes end the program before
/// `main` runs, as `#[cluster::main]` does: one line on stderr, exit code 78.
///
/// # Panics
///
/// If the runtime cannot be built, or a worker cannot register its link with the runtime.
pub fn run<F, Fut>(settings: Settings, main: F) -> Fut::Output
where
    F: FnOnce(Role) -> Fut,
    Fut: Future,
{
    run_configured(configured(settings), main, || {})
}

/// What every entry does with its settings first: takes the worker markers (before anything
/// else can read the environment or start a thread), answers
/// [`PRINT_PROTOCOL_VERSION`](crate::env::PRINT_PROTOCOL_VERSION), applies the `CLUSTER_*`
/// overrides (unless [`Settings::env_overrides`] is off) and validates. A program moved from
/// `#[cluster::main]` to [`run`] keeps its operators' overrides because all three go through
/// here. On error: one line on stderr, exit code 78 (`EX_CONFIG`).
fn configured(settings: Settings) -> Settings {
    role::detect();
    crate::env::answer_queries();
    let in_primary = !role::is_worker();
    if in_primary && crate::check::asked() {
        crate::check::check_and_exit(settings);
    }
    let settings = if settings.env_overrides {
        if in_primary {
            // A misspelt variable would otherwise be ignored without a word. Before any
            // subscriber exists: straight to stderr, as the errors below.
            let unknown = crate::env::unknown_variables(std::env::vars_os().map(|(name, _)| name));
            for variable in unknown {
                let _ = writeln!(
                    io::stderr(),
                    "{}: warning: {variable}",
                    crate::env::program_name()
                );
            }
        }
        let (settings, errors) = settings.apply_env_all(|name| std::env::var_os(name));
        if let Some(last) = errors.last() {
            // Every bad variable, one line each, not only the first.
            for error in &errors[..errors.len() - 1] {
                let _ = writeln!(
                    io::stderr(),
                    "{}: configuration error: {error}",
                    crate::env::program_name()
                );
            }
            last.exit();
        }
        settings
    } else {
        settings
    };
    if let Err(error) = settings.validate() {
        crate::env::exit_misconfigured(&error);
    }
    settings
}

/// [`run`] with settings already [`configured`]; `before_primary` runs in the primary once its
/// settings passed every check, before it starts.
fn run_configured<F, Fut>(settings: Settings, main: F, before_primary: fn()) -> Fut::Output
where
    F: FnOnce(Role) -> Fut,
    Fut: Future,
{
    match role::take() {
        Some(Detected::Worker { id, ipc }) => {
            name_process(&format!("w{}", id.get()));
            raise_oom_score();
            let runtime = settings
                .worker_runtime()
                .expect("failed to build the worker's Tokio runtime");
            runtime.block_on(async move {
                let worker =
                    Worker::start(id, ipc).expect("failed to connect to the cluster primary");
                let output = main(Role::Worker(worker.clone())).await;
                // As Node, which finishes pending channel writes before the process exits: a
                // message sent just before `main` returned still arrives.
                let _ = tokio::time::timeout(worker::EXIT_FLUSH, worker.flush()).await;
                output
            })
        }
        _ => {
            // Refused here rather than at the thousandth fork: in the `Role` form as in the
            // workers form.
            if let Err(error) = crate::sys::check_process_limit(settings.worker_count()) {
                crate::env::exit_misconfigured(&error);
            }
            before_primary();
            name_process("primary");
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("failed to build the primary's Tokio runtime");
            runtime.block_on(async move {
                let primary = Primary::start(settings)
                    .unwrap_or_else(|error| crate::env::exit_misconfigured(&error));
                main(Role::Primary(primary)).await
            })
        }
    }
}

/// Names this process for `ps` and `top`: `<program>:primary` or `<program>:w<id>`, the program's
/// name shortened to fit the 15 bytes the kernel keeps. The command line stays as it is: std
/// reads `args()` from that memory, so rewriting it would change what user code parses.
fn name_process(role: &str) {
    const KEPT: usize = 15;
    let program = std::env::args_os()
        .next()
        .map(|arg0| {
            std::path::Path::new(&arg0)
                .file_name()
                .unwrap_or(arg0.as_os_str())
                .to_string_lossy()
                .into_owned()
        })
        .unwrap_or_default();
    let mut end = program.len().min(KEPT.saturating_sub(role.len() + 1));
    while !program.is_char_boundary(end) {
        end -= 1;
    }
    crate::sys::set_thread_name(&format!("{}:{role}", &program[..end]));
}

/// How much more a worker's `oom_score_adj` is than its primary's: the kernel's OOM killer picks
/// a worker, whose loss costs its own connections, before the primary, whose loss costs every
/// worker.
const WORKER_OOM_SCORE_ADJ: i32 = 500;

/// Raises this worker's `oom_score_adj` above the primary's (it starts equal: inherited).
/// Raising it needs no privilege; if `/proc` says no, the worker runs as it is.
fn raise_oom_score() {
    let path = "/proc/self/oom_score_adj";
    let Some(inherited) = std::fs::read_to_string(path)
        .ok()
        .and_then(|adj| adj.trim().parse::<i32>().ok())
    else {
        return;
    };
    let raised = (inherited + WORKER_OOM_SCORE_ADJ).min(1000);
    if raised > inherited {
        let _ = std::fs::write(path, raised.to_string());
    }
}

/// Runs `body` in every worker while the primary keeps [`Settings::worker_count`] of them
/// running with a [`Supervisor`](crate::Supervisor) (restarts with backoff, crash-loop breaker,
/// graceful shutdown on SIGTERM, within 5 s on SIGINT, rolling reload on SIGHUP).
///
/// This is `#[cluster::main]` without a parameter. The `CLUSTER_*` overrides apply as in
/// [`run`]. With zero workers the body runs in this process, unclustered. The primary returns
/// `Ok` after a shutdown signal, or once every worker left on purpose; an error once every slot
/// failed. A bad `CLUSTER_*` value, settings the primary cannot run with, and more workers than
/// this user may start processes end the program before any worker starts: one line on
/// stderr, exit code 78.
pub fn run_workers<F, Fut, R>(settings: Settings, body: F) -> R
where
    F: FnOnce() -> Fut,
    Fut: Future<Output = R>,
    R: MainOutput,
{
    let settings = configured(settings);
    SUPERVISED.store(true, Ordering::Relaxed);
    if !role::is_worker() && settings.worker_count() == 0 {
        // `CLUSTER_WORKERS=0`: no cluster at all, the body runs in this process.
        let runtime = settings
            .worker_runtime()
            .expect("failed to build the Tokio runtime");
        return runtime.block_on(body());
    }
    // Before the primary starts: it logs what it makes of systemd's environment.
    run_configured(
        settings,
        move |role| async move {
            match role {
                Role::Worker(_) => body().await,
                Role::Primary(primary) => R::from_primary(supervise(primary).await),
            }
        },
        install_default_logging,
    )
}

/// The primary of [`run_workers`]: observed, then supervised. Every error it returns has been
/// logged (the supervisor and the observability servers log theirs where they happen), so that
/// `#[cluster::main]` does not print it a second time.
async fn supervise(primary: Primary) -> io::Result<()> {
    let supervisor = crate::Supervisor::new(primary);
    // Before any worker starts: an address that cannot be served stops the cluster here.
    let outcome = match crate::observability::serve(&supervisor.handle()) {
        Ok(_observed) => supervisor.run().await.map_err(io::Error::from),
        Err(error) => Err(error.into()),
    };
    if outcome.is_err() {
        PRIMARY_ERROR_LOGGED.store(true, Ordering::Relaxed);
    }
    outcome
}

/// Set once the supervised primary of [`run_workers`] has logged the error it returns.
static PRIMARY_ERROR_LOGGED: AtomicBool = AtomicBool::new(false);

/// Whether this process runs [`run_workers`]: its primary is a supervisor, which reports what
/// happened to its workers (a worker's failed bind, why it asked a worker to leave).
static SUPERVISED: AtomicBool = AtomicBool::new(false);

/// What `#[cluster::main]` does with what `main` returns: an error is printed the way a person
/// reads it ([`Display`](fmt::Display), one line) rather than as std's `Error: {:?}` dump, and
/// the process exits with code 1 as std would. An error someone already reported is not printed
/// again: the supervised primary's (logged where it happened), and a worker's that the primary
/// reports (a bind the primary could not make, or any error once the primary asked the worker
/// to leave or went away). Outputs whose error is not `Display` are returned as they are.
///
/// Autoref specialisation: `(&mut MainReturn::new(output)).finish_main()` finds
/// [`ReportError`] for a `Result` whose error is `Display`, and [`PassOutput`] otherwise.
#[doc(hidden)]
#[derive(Debug)]
pub struct MainReturn<T>(Option<T>);

impl<T> MainReturn<T> {
    /// Wraps `main`'s output.
    pub fn new(output: T) -> Self {
        Self(Some(output))
    }

    fn take(&mut self) -> T {
        self.0.take().expect("main's output is finished once")
    }
}

/// [`MainReturn`] for an error that is `Display`.
#[doc(hidden)]
pub trait ReportError<T> {
    /// Prints the error (unless already reported) and exits 1; returns `Ok` as it is.
    fn finish_main(&mut self) -> T;
}

impl<T, E: fmt::Display> ReportError<Result<T, E>> for MainReturn<Result<T, E>> {
    fn finish_main(&mut self) -> Result<T, E> {
        match self.take() {
            Err(error) => exit_with_error(&error),
            ok => ok,
        }
    }
}

/// [`MainReturn`] for anything else.
#[doc(hidden)]
pub trait PassOutput<T> {
    /// Returns the output as it is.
    fn finish_main(&mut self) -> T;
}

impl<T> PassOutput<T> for &mut MainReturn<T> {
    fn finish_main(&mut self) -> T {
        self.take()
    }
}

/// Prints `error` on one line of stderr, prefixed with the program's name (and the worker's id
/// in a worker), unless it was reported already; exits with code 1.
fn exit_with_error(error: &dyn fmt::Display) -> ! {
    let program = crate::env::program_name();
    let supervised = SUPERVISED.load(Ordering::Relaxed);
    let line = match worker::current() {
        Some(worker) if supervised && (worker.is_shutting_down() || !worker.is_connected()) => None,
        Some(_) if supervised && worker::refused_bind_said(&error.to_string()) => None,
        Some(worker) => Some(format!("{program} worker {}: {error:#}", worker.id().get())),
        None if PRIMARY_ERROR_LOGGED.load(Ordering::Relaxed) => None,
        None => Some(format!("{program}: {error:#}")),
    };
    if let Some(line) = line {
        // Not `eprintln!`, which panics if stderr is gone (a terminal that hung up).
        let _ = writeln!(io::stderr(), "{line}");
    }
    std::process::exit(1)
}

/// What `#[cluster::main]` does with its settings before [`run`] or [`run_workers`]:
/// `env = false` turns [`Settings::env_overrides`] off; both entries apply and validate the
/// rest.
#[doc(hidden)]
pub fn configure(settings: Settings, env: bool) -> Settings {
    if env {
        settings
    } else {
        settings.env_overrides(false)
    }
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
        // Its default reports a failed write with `eprintln!`, which panics when stderr is a
        // terminal that hung up: the primary must outlive its terminal to stop its workers.
        .log_internal_errors(false)
        .try_init();
}

/// Declares this process ready to serve, after its warm-up: in a worker,
/// [`Worker::ready`]; elsewhere (unclustered) it does nothing.
pub fn ready() {
    if let Some(worker) = worker::current() {
        worker.ready();
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
        // The primary logged its error where it happened.
        if result.is_err() {
            std::process::exit(1);
        }
    }
}

impl<E: From<io::Error>> MainOutput for Result<(), E> {
    fn from_primary(result: io::Result<()>) -> Self {
        result.map_err(E::from)
    }
}
