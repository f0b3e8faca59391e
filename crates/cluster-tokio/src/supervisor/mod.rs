//! `Supervisor`: keeps N workers running, and shuts them down on signals.

mod errors;
mod log;
mod reloads;

use std::io;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use proto::ExitStatus;
pub use proto::supervisor::{FATAL_EXIT_CODE, SlotId};
use proto::supervisor::{GiveUp, Supervisor as Policy, SupervisorOutput};
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::{mpsc, oneshot};

pub use self::errors::{AbortReason, ReloadAborted, ReloadError, ReloadReport, SupervisorError};
use self::log::{SpawnFailures, is_kill_from_outside, log_exit, report};
use self::reloads::Reloads;
use crate::primary::{Event, Primary, Signal};
use crate::settings::Settings;
use crate::status::{Book, ClusterStatus};

/// What a [`SupervisorHandle`] asks of the running supervisor.
enum Control {
    Scale {
        workers: usize,
        reply: oneshot::Sender<Result<(), SupervisorError>>,
    },
    Reload {
        reply: oneshot::Sender<Result<ReloadReport, ReloadError>>,
    },
    /// Answered by the loop itself: it is alive.
    Ping { reply: oneshot::Sender<()> },
}

/// What a supervisor and its handles share: the supervisor's book, and the primary.
#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) book: Mutex<Book>,
    primary: Primary,
}

/// How long a fast shutdown (SIGINT) lets workers drain before it kills them.
const FAST_SHUTDOWN: Duration = Duration::from_secs(5);

/// Keeps [`Settings::workers`](crate::Settings::workers) workers running: restarts crashed ones
/// with exponential backoff and full jitter and ones killed from outside within a second, cools
/// a slot that crash-loops down before it tries again (its siblings keep serving), never
/// restarts a worker that exited with the fatal code or left on purpose, and kills workers that
/// do not listen within the boot timeout (all set with [`Settings`]). It gives up only when
/// every slot's workers crash before they listen, or on the fatal code.
///
/// [`run`](Self::run) also owns the signals: SIGHUP replaces every worker one at a time (a
/// rolling reload), unless it says that this process's terminal closed, which stops the cluster
/// as SIGTERM does; SIGTTIN and SIGTTOU add and remove one worker; SIGTERM disconnects every
/// worker gracefully (bounded by [`Settings::disconnect_timeout`](crate::Settings::disconnect_timeout),
/// then SIGKILL); SIGINT (Ctrl-C) does the same within 5 s at most; a second SIGTERM or SIGINT
/// during either kills them at once. Workers run in process groups of their own, so a
/// terminal's Ctrl-C and hangup reach the primary alone, which stops them as described. A [`SupervisorHandle`] asks for a reload or a
/// new worker count from code.
///
/// # Examples
///
/// ```no_run
/// # async fn dox(primary: cluster_tokio::Primary) -> Result<(), cluster_tokio::supervisor::SupervisorError> {
/// // In the primary branch of a `Role` match:
/// let supervisor = cluster_tokio::Supervisor::new(primary);
/// let handle = supervisor.handle();
/// let running = tokio::spawn(supervisor.run());
/// handle.scale(2).await?;
/// running.await.expect("the supervisor panicked")
/// # }
/// ```
#[derive(Debug)]
pub struct Supervisor {
    primary: Primary,
    control: mpsc::UnboundedSender<Control>,
    controls: mpsc::UnboundedReceiver<Control>,
    shared: Arc<Shared>,
}

/// Asks a running [`Supervisor`] for a rolling reload, a new number of workers or a
/// [status](Self::status). Cheap to clone; made by [`Supervisor::handle`], so it exists only
/// where a supervisor does.
#[derive(Clone, Debug)]
pub struct SupervisorHandle {
    control: mpsc::UnboundedSender<Control>,
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Control {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Scale { workers, .. } => write!(f, "Scale({workers})"),
            Self::Reload { .. } => f.write_str("Reload"),
            Self::Ping { .. } => f.write_str("Ping"),
        }
    }
}

impl SupervisorHandle {
    /// Sets the number of workers the supervisor keeps (also SIGTTIN and SIGTTOU: one more, one
    /// fewer). New workers start at once; removed ones are disconnected and drain like any
    /// disconnect. Resolves once the change is under way.
    ///
    /// # Errors
    ///
    /// [`SupervisorError::TooManyWorkers`]: over [`MAX_WORKERS`](crate::settings::MAX_WORKERS), or more than this user may
    /// start processes. [`SupervisorError::Stopped`]: the supervisor is not running (any more).
    pub async fn scale(&self, workers: usize) -> Result<(), SupervisorError> {
        Settings::new().workers(workers).validate()?;
        let (reply, rx) = oneshot::channel();
        self.control
            .send(Control::Scale { workers, reply })
            .map_err(|_| SupervisorError::Stopped)?;
        rx.await.map_err(|_| SupervisorError::Stopped)?
    }

    /// Replaces every worker, one at a time, without dropping a connection (a rolling reload,
    /// also SIGHUP), and resolves when it is done.
    ///
    /// For each worker: a replacement is started first and must listen within
    /// [`Settings::boot_timeout`](crate::Settings::boot_timeout); then the old worker is taken
    /// out of the round robin and disconnected, so it finishes its connections (within
    /// [`Settings::disconnect_timeout`](crate::Settings::disconnect_timeout)) and exits. A
    /// replacement that crashes or does not listen in time aborts the reload: it is killed,
    /// the remaining old workers keep serving, and the report says why
    /// ([`ReloadReport::aborted`]).
    ///
    /// A replacement gets the settings' environment, not the extra environment its predecessor
    /// was forked with.
    ///
    /// # Errors
    ///
    /// Another reload is running, a replacement could not be spawned at all, or the supervisor
    /// stopped.
    pub async fn reload(&self) -> Result<ReloadReport, ReloadError> {
        let (reply, rx) = oneshot::channel();
        self.control
            .send(Control::Reload { reply })
            .map_err(|_| ReloadError::Stopped)?;
        rx.await.map_err(|_| ReloadError::Stopped)?
    }

    /// A snapshot of the cluster: every worker with its slot, generation, uptime, restarts,
    /// memory and CPU time and what the primary counts for it, and the supervisor's totals
    /// (restarts, reloads by result). Answered while the workers drain at shutdown too.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # async fn dox(handle: cluster_tokio::supervisor::SupervisorHandle) -> Result<(), cluster_tokio::supervisor::SupervisorError> {
    /// let status = handle.status().await?;
    /// for worker in &status.workers {
    ///     println!("worker {} pid {} restarts {}", worker.stats.id, worker.stats.pid, worker.restarts);
    /// }
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    ///
    /// [`SupervisorError::Stopped`]: the supervisor or the primary stopped.
    pub async fn status(&self) -> Result<ClusterStatus, SupervisorError> {
        if self.control.is_closed() {
            return Err(SupervisorError::Stopped);
        }
        let primary = &self.shared.primary;
        let stats = primary
            .stats()
            .await
            .map_err(|_| SupervisorError::Stopped)?;
        Ok(crate::status::assemble(primary, stats, &self.shared.book).await)
    }

    /// Whether the supervisor's loop answers (what `/healthz` asks): resolves `true` once it
    /// did, `false` if it stopped. A wedged loop never answers: bound the wait.
    pub(crate) async fn ping(&self) -> bool {
        let (reply, rx) = oneshot::channel();
        self.control.send(Control::Ping { reply }).is_ok() && rx.await.is_ok()
    }

    /// Whether at least one worker serves (what `/readyz` asks).
    pub(crate) fn is_serving(&self) -> bool {
        !self.control.is_closed() && self.shared.book.lock().expect("not poisoned").serving > 0
    }
}

impl Supervisor {
    /// A supervisor for `primary`, with the policy of the primary's
    /// [`Settings`].
    pub fn new(primary: Primary) -> Self {
        let (control, controls) = mpsc::unbounded_channel();
        let shared = Arc::new(Shared {
            book: Mutex::new(Book::new()),
            primary: primary.clone(),
        });
        Self {
            primary,
            control,
            controls,
            shared,
        }
    }

    /// A handle that asks this supervisor, once it runs, for a reload, a new worker count or a
    /// [status](SupervisorHandle::status).
    pub fn handle(&self) -> SupervisorHandle {
        SupervisorHandle {
            control: self.control.clone(),
            shared: self.shared.clone(),
        }
    }

    /// Starts [`Settings::worker_count`](crate::Settings::worker_count) workers and keeps them
    /// running until a shutdown signal, or until no slot can run a worker any more.
    ///
    /// # Errors
    ///
    /// Nothing can serve and a restart will not change it (every slot crashing before it
    /// listens, or a fatal exit): the error says which and why. More workers
    /// than this user may start processes (`RLIMIT_NPROC`; none is started). Signal handlers
    /// could not be installed.
    pub async fn run(self) -> Result<(), SupervisorError> {
        let shared = self.shared.clone();
        let primary = self.primary.clone();
        let outcome = self.supervise().await;
        // The primary's count covers every worker, gone ones included.
        let handed_off = match tokio::time::timeout(SUMMARY_STATS, primary.stats()).await {
            Ok(Ok(stats)) => stats.handoffs.to_string(),
            _ => "unknown".to_owned(),
        };
        let book = shared.book.lock().expect("not poisoned");
        tracing::info!(
            workers_started = book.forked,
            restarts = book.restarts(),
            reloads_complete = book.reloads.complete,
            reloads_aborted = book.reloads.aborted,
            reloads_failed = book.reloads.failed,
            %handed_off,
            "cluster stopped"
        );
        outcome
    }

    async fn supervise(self) -> Result<(), SupervisorError> {
        let Self {
            primary,
            control,
            mut controls,
            shared,
        } = self;
        let handle = SupervisorHandle {
            control: control.clone(),
            shared: shared.clone(),
        };
        // Handles made before `run` stay usable; ours must not keep the channel open.
        drop(control);
        let settings = primary.settings();
        let workers = settings.worker_count();
        crate::sys::check_process_limit(workers)?;
        let config = settings.supervisor_config();
        // Up means declared ready, not only listening.
        let wait_ready = settings.wait_ready;
        // A SIGHUP is a reload, unless it is the hangup of the terminal this primary runs in the
        // foreground of (asked before our handler replaces an inherited `nohup`).
        let in_terminal = crate::sys::in_foreground_of_terminal();
        let mut terminate = signal(SignalKind::terminate()).map_err(SupervisorError::Signals)?;
        let mut interrupt = signal(SignalKind::interrupt()).map_err(SupervisorError::Signals)?;
        let mut hangup = signal(SignalKind::hangup()).map_err(SupervisorError::Signals)?;
        let mut more =
            signal(SignalKind::from_raw(libc::SIGTTIN)).map_err(SupervisorError::Signals)?;
        let mut fewer =
            signal(SignalKind::from_raw(libc::SIGTTOU)).map_err(SupervisorError::Signals)?;

        // Before any worker starts: an address that cannot be served stops the cluster here.
        let _endpoint = match settings.metrics_addr {
            Some(address) => {
                let listener = crate::endpoint::bind(address).map_err(|source| {
                    tracing::error!("cannot serve the metrics endpoint on {address}: {source}");
                    SupervisorError::Endpoint { address, source }
                })?;
                let bound = listener.local_addr().unwrap_or(address);
                tracing::info!(address = %bound, "serving /metrics, /healthz and /readyz");
                Some(AbortOnDrop(tokio::spawn(crate::endpoint::serve(
                    listener,
                    handle.clone(),
                ))))
            }
            None => None,
        };
        let _control = match &settings.control_socket {
            Some(path) => {
                let socket = crate::control::bind(path).map_err(|source| {
                    tracing::error!("cannot listen for commands on {}: {source}", path.display());
                    SupervisorError::ControlSocket {
                        path: path.clone(),
                        source,
                    }
                })?;
                tracing::info!(path = %path.display(), "listening for commands");
                Some(AbortOnDrop(tokio::spawn(crate::control::serve(
                    socket,
                    handle.clone(),
                ))))
            }
            None => None,
        };
        drop(handle);
        let mut reload = Reloads::new(shared.clone());
        let mut events = primary.events();
        let mut policy = Policy::new(config, workers, seed());
        let mut spawn_failures = SpawnFailures::default();
        // The last listen the primary could not bind, until a worker listens.
        let mut listen_failure: Option<(String, i32)> = None;
        // Workers this supervisor killed (boot deadline): their deaths are crashes, not kills
        // from outside.
        let mut killed_here = std::collections::HashSet::new();
        let mut progress = crate::systemd::Progress::default();
        let mut watchdog = crate::systemd::Watchdog::new();
        loop {
            while let Some(output) = policy.poll_output() {
                match output {
                    SupervisorOutput::Spawn { slot } => match primary.fork().await {
                        Ok(worker) => {
                            spawn_failures.end_burst("a worker started again");
                            if policy.handle_spawned(now(), slot, worker.id()) {
                                shared
                                    .book
                                    .lock()
                                    .expect("not poisoned")
                                    .spawned(slot, worker.id());
                            } else {
                                // A reload's replacement took the slot meanwhile.
                                tokio::spawn(async move { worker.disconnect().await });
                            }
                        }
                        Err(error) => {
                            spawn_failures.failed(slot, &error);
                            policy.handle_spawn_failed(now(), slot);
                        }
                    },
                    SupervisorOutput::Kill { worker, reason } => {
                        tracing::warn!(worker = worker.get(), ?reason, "killing worker");
                        if let Some(handle) = primary.worker(worker) {
                            killed_here.insert(worker);
                            let _ = handle.kill(Signal::KILL);
                        }
                    }
                    SupervisorOutput::Event(event) => report(event, &spawn_failures),
                }
            }
            if policy.is_done() {
                spawn_failures.end_burst("no worker is left to start");
                let outcome = match policy.gave_up() {
                    Some(GiveUp::Fatal { slot, worker, code }) => {
                        Err(SupervisorError::Fatal { slot, worker, code })
                    }
                    Some(GiveUp::BootLoop { slot, failures }) => {
                        Err(SupervisorError::BootLoop { slot, failures })
                    }
                    None => Ok(()),
                };
                if let Err(error) = &outcome {
                    crate::systemd::stopping(&format!("giving up: {error}"));
                }
                return outcome;
            }
            progress.update(policy.serving(), policy.active(), primary.generation());
            {
                let mut book = shared.book.lock().expect("not poisoned");
                book.serving = policy.serving();
                book.wanted = policy.active();
            }
            let timer = policy.poll_timeout().map(tokio::time::Instant::from_std);
            tokio::select! {
                biased;
                _ = terminate.recv() => {
                    policy.stop();
                    reload.cancel();
                    crate::systemd::stopping("SIGTERM: draining the workers");
                    tracing::info!("SIGTERM: disconnecting workers");
                    return shut_down(&primary, &shared, &mut controls, &mut terminate, &mut interrupt, primary.disconnect()).await;
                }
                _ = interrupt.recv() => {
                    policy.stop();
                    reload.cancel();
                    crate::systemd::stopping("SIGINT: stopping the workers");
                    tracing::info!("SIGINT: stopping workers");
                    return shut_down(&primary, &shared, &mut controls, &mut terminate, &mut interrupt, stop_fast(&primary)).await;
                }
                // Here, not in a task of its own: a wedged loop stops the pets.
                () = watchdog.tick() => crate::systemd::notify("WATCHDOG=1"),
                Some(control) = controls.recv() => match control {
                    Control::Scale { workers, reply } => {
                        let more = workers.saturating_sub(policy.active());
                        // The bounds of `Settings::workers`, as for SIGTTIN.
                        let allowed = Settings::new()
                            .workers(workers)
                            .validate()
                            .and_then(|()| crate::sys::check_process_limit(more));
                        match allowed {
                            Ok(()) => {
                                scale(&mut policy, &primary, &shared, workers);
                                let _ = reply.send(Ok(()));
                            }
                            Err(error) => {
                                let _ = reply.send(Err(error.into()));
                            }
                        }
                    }
                    Control::Reload { reply } => reload.ask(&primary, reply),
                    Control::Ping { reply } => { let _ = reply.send(()); }
                },
                _ = more.recv() => {
                    let target = policy.active() + 1;
                    let allowed = Settings::new().workers(target).validate()
                        .and_then(|()| crate::sys::check_process_limit(1));
                    match allowed {
                        Ok(()) => scale(&mut policy, &primary, &shared, target),
                        Err(error) => tracing::warn!(%error, "SIGTTIN: not adding a worker"),
                    }
                }
                _ = fewer.recv() => {
                    // Never below one worker by signal; `SupervisorHandle::scale(0)` can.
                    let target = policy.active().saturating_sub(1).max(1);
                    scale(&mut policy, &primary, &shared, target);
                }
                _ = hangup.recv() => {
                    if in_terminal && !crate::sys::has_controlling_terminal() {
                        policy.stop();
                        reload.cancel();
                        crate::systemd::stopping("the terminal closed: draining the workers");
                        tracing::info!("SIGHUP: the terminal closed; disconnecting workers");
                        return shut_down(&primary, &shared, &mut controls, &mut terminate, &mut interrupt, primary.disconnect()).await;
                    }
                    reload.on_signal(&primary);
                }
                () = reload.finished() => reload.start_queued(&primary),
                event = events.recv() => match event {
                    Some(Event::Replaced { old, new }) => {
                        crate::systemd::reload_progress(crate::systemd::reload_step(primary.settings()));
                        policy.handle_replaced(now(), old.id(), new.id());
                        shared.book.lock().expect("not poisoned").replaced(old.id(), new.id());
                    }
                    Some(Event::ListenFailed { address, errno }) => {
                        // Decided when a worker that got it exits without listening: a worker
                        // may handle the error itself (an optional port, a fallback address).
                        listen_failure = Some((address, errno));
                    }
                    Some(Event::Listening { worker, address }) => {
                        listen_failure = None;
                        tracing::info!(worker = worker.id().get(), pid = worker.pid(), %address, "listening");
                        if !wait_ready {
                            policy.handle_listening(now(), worker.id());
                        }
                    }
                    Some(Event::Ready(worker)) => {
                        tracing::info!(worker = worker.id().get(), pid = worker.pid(), "worker ready");
                        if wait_ready {
                            policy.handle_listening(now(), worker.id());
                        }
                    }
                    Some(Event::Exit { worker, status, killed }) => {
                        let on_purpose = worker.exited_after_disconnect() == Some(true);
                        let failed_at_boot = policy.is_booting(worker.id())
                            && !on_purpose
                            && status != ExitStatus::Code(0);
                        if failed_at_boot
                            && policy.serving() == 0
                            && !primary.settings().retry_bind_errors
                            && let Some((address, errno)) = listen_failure.take()
                        {
                            log_exit(worker.id(), worker.pid(), status, on_purpose, killed);
                            let source = io::Error::from_raw_os_error(errno);
                            tracing::error!(%address, error = %source, "cannot listen, and no worker serves: stopping (every worker would fail the same way)");
                            policy.stop();
                            reload.cancel();
                            crate::systemd::stopping(&format!("cannot listen on {address}: {source}"));
                            shut_down(&primary, &shared, &mut controls, &mut terminate, &mut interrupt, primary.disconnect()).await?;
                            return Err(SupervisorError::Listen { address, source });
                        }
                        log_exit(worker.id(), worker.pid(), status, on_purpose, killed);
                        shared.book.lock().expect("not poisoned").exited(worker.id(), status, killed);
                        let killed_by_us = killed_here.remove(&worker.id());
                        let ours = killed.is_some() || killed_by_us;
                        if !on_purpose && !ours && is_kill_from_outside(status) {
                            policy.handle_killed(now(), worker.id());
                        } else {
                            policy.handle_exit(now(), worker.id(), status, on_purpose);
                        }
                    }
                    Some(Event::Fork(_)) => shared.book.lock().expect("not poisoned").forked += 1,
                    Some(_) => {}
                    None => {
                        crate::systemd::stopping("the primary stopped");
                        return Ok(());
                    }
                },
                () = sleep_until(timer) => policy.handle_timeout(now()),
            }
        }
    }
}

/// Adds or removes slots until `target` are active; removed workers drain and exit.
fn scale(policy: &mut Policy, primary: &Primary, shared: &Shared, target: usize) {
    tracing::info!(from = policy.active(), to = target, "scaling");
    while policy.active() < target {
        policy.add_slot();
    }
    while policy.active() > target {
        let Some((slot, worker)) = policy.remove_slot() else {
            break;
        };
        shared.book.lock().expect("not poisoned").removed(slot);
        if let Some(worker) = worker.and_then(|w| primary.worker(w)) {
            tokio::spawn(async move { worker.disconnect().await });
        }
    }
}

/// Waits for `stopping`; a second signal meanwhile kills every worker at once. Meanwhile the
/// loop stays alive for `/healthz` and refuses reloads and scaling.
async fn shut_down(
    primary: &Primary,
    shared: &Shared,
    controls: &mut mpsc::UnboundedReceiver<Control>,
    terminate: &mut tokio::signal::unix::Signal,
    interrupt: &mut tokio::signal::unix::Signal,
    stopping: impl Future<Output = io::Result<()>>,
) -> Result<(), SupervisorError> {
    shared.book.lock().expect("not poisoned").serving = 0;
    let mut stopping = std::pin::pin!(stopping);
    loop {
        tokio::select! {
            done = &mut stopping => return done.map_err(|_| SupervisorError::Stopped),
            _ = terminate.recv() => { kill_all(primary).await; return Ok(()) }
            _ = interrupt.recv() => { kill_all(primary).await; return Ok(()) }
            Some(control) = controls.recv() => match control {
                Control::Ping { reply } => { let _ = reply.send(()); }
                Control::Scale { reply, .. } => { let _ = reply.send(Err(SupervisorError::Stopped)); }
                Control::Reload { reply } => { let _ = reply.send(Err(ReloadError::Stopped)); }
            },
        }
    }
}

/// A task that ends with its owner.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// How long the summary at shutdown waits for the primary's counters.
const SUMMARY_STATS: Duration = Duration::from_secs(1);

/// SIGINT: the drain of SIGTERM with a short deadline, so a Ctrl-C stops promptly without
/// cutting the requests that finish within it.
async fn stop_fast(primary: &Primary) -> io::Result<()> {
    let deadline = FAST_SHUTDOWN.min(primary.settings().disconnect_timeout);
    primary.disconnect_within(deadline).await
}

async fn kill_all(primary: &Primary) {
    tracing::warn!("killing every worker");
    for worker in primary.workers() {
        let _ = worker.kill(Signal::KILL);
    }
    for worker in primary.workers() {
        worker.exited().await;
    }
}

async fn sleep_until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

fn now() -> Instant {
    tokio::time::Instant::now().into_std()
}

/// A seed for the backoff jitter: different per process and start.
fn seed() -> u64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    (nanos as u64) ^ (u64::from(std::process::id()) << 32)
}
