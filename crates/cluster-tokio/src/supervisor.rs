//! `Supervisor`: keeps N workers running, and shuts them down on signals.

use std::io;
use std::time::{Duration, Instant};

use proto::supervisor::{
    Supervisor as Policy, SupervisorConfig, SupervisorEvent, SupervisorOutput,
};
use proto::{ExitStatus, KillReason, WorkerId};
use tokio::signal::unix::{SignalKind, signal};

use crate::primary::{Event, Primary};

/// What `Primary::scale` asks of the running supervisor.
pub(crate) enum Control {
    Scale {
        workers: usize,
        reply: tokio::sync::oneshot::Sender<()>,
    },
}

/// How long a fast shutdown (SIGINT) waits for workers after signalling them.
const FAST_SHUTDOWN: Duration = Duration::from_secs(5);

/// Keeps a number of workers running: restarts crashed ones with exponential backoff and full
/// jitter, stops restarting a slot that crash-loops (its siblings keep serving), never restarts a
/// worker that exited with the fatal code or left on purpose, and kills workers that do not
/// listen within the boot deadline (all configurable with [`SupervisorConfig`]).
///
/// [`run`](Self::run) also owns the signals: SIGHUP replaces every worker one at a time
/// ([`Primary::reload`]); SIGTTIN and SIGTTOU add and remove one worker ([`Primary::scale`]); SIGTERM disconnects every worker gracefully (bounded by
/// `Settings::disconnect_timeout`, then SIGKILL); SIGINT stops them fast (SIGTERM, then SIGKILL
/// after 5 s); a second SIGTERM or SIGINT during either kills them at once.
///
/// # Examples
///
/// ```no_run
/// # async fn dox(primary: cluster_tokio::Primary) -> std::io::Result<()> {
/// // In the primary branch of a `Role` match:
/// cluster_tokio::Supervisor::new(primary).run(4).await
/// # }
/// ```
#[derive(Debug)]
pub struct Supervisor {
    primary: Primary,
    config: SupervisorConfig,
}

impl Supervisor {
    /// A supervisor with the default policy.
    pub fn new(primary: Primary) -> Self {
        Self {
            primary,
            config: SupervisorConfig::default(),
        }
    }

    /// Replaces the policy.
    #[must_use]
    pub fn config(mut self, config: SupervisorConfig) -> Self {
        self.config = config;
        self
    }

    /// Starts `workers` workers and keeps them running until a shutdown signal, or until no slot
    /// can run a worker any more.
    ///
    /// # Errors
    ///
    /// Every slot failed (crash loop or fatal exit): the error says which and why. Signal
    /// handlers could not be installed.
    pub async fn run(self, workers: usize) -> io::Result<()> {
        let Self { primary, config } = self;
        let mut terminate = signal(SignalKind::terminate())?;
        let mut interrupt = signal(SignalKind::interrupt())?;
        let mut hangup = signal(SignalKind::hangup())?;
        let mut more = signal(SignalKind::from_raw(libc::SIGTTIN))?;
        let mut fewer = signal(SignalKind::from_raw(libc::SIGTTOU))?;
        let (control, mut controls) = tokio::sync::mpsc::unbounded_channel();
        primary.attach_supervisor(Some(control));
        let _detach = Detach(&primary);
        let mut reloading: Option<tokio::task::JoinHandle<()>> = None;
        let mut events = primary.events();
        let mut policy = Policy::new(config, workers, seed());
        let mut failure = None;
        loop {
            while let Some(output) = policy.poll_output() {
                match output {
                    SupervisorOutput::Spawn { slot } => match primary.fork().await {
                        Ok(worker) => {
                            if !policy.handle_spawned(now(), slot, worker.id()) {
                                // A reload's replacement took the slot meanwhile.
                                tokio::spawn(async move { worker.disconnect().await });
                            }
                        }
                        Err(error) => {
                            tracing::error!(%slot, %error, "could not start a worker");
                            policy.handle_spawn_failed(now(), slot);
                        }
                    },
                    SupervisorOutput::Kill { worker, reason } => {
                        tracing::warn!(worker = worker.get(), ?reason, "killing worker");
                        if let Some(handle) = primary.worker(worker) {
                            let _ = handle.kill(libc::SIGKILL);
                        }
                    }
                    SupervisorOutput::Event(event) => report(event, &mut failure),
                    _ => {}
                }
            }
            if policy.is_done() {
                return match failure {
                    Some(failure) => Err(io::Error::other(failure)),
                    None => Ok(()),
                };
            }
            let timer = policy.poll_timeout().map(tokio::time::Instant::from_std);
            tokio::select! {
                biased;
                _ = terminate.recv() => {
                    policy.stop();
                    tracing::info!("SIGTERM: disconnecting workers");
                    return shut_down(&primary, &mut terminate, &mut interrupt, primary.disconnect()).await;
                }
                _ = interrupt.recv() => {
                    policy.stop();
                    tracing::info!("SIGINT: stopping workers");
                    return shut_down(&primary, &mut terminate, &mut interrupt, stop_fast(&primary)).await;
                }
                Some(Control::Scale { workers, reply }) = controls.recv() => {
                    scale(&mut policy, &primary, workers);
                    let _ = reply.send(());
                }
                _ = more.recv() => {
                    let target = policy.active() + 1;
                    scale(&mut policy, &primary, target);
                }
                _ = fewer.recv() => {
                    // Never below one worker by signal; `Primary::scale(0)` can.
                    let target = policy.active().saturating_sub(1).max(1);
                    scale(&mut policy, &primary, target);
                }
                _ = hangup.recv() => {
                    if reloading.as_ref().is_some_and(|r| !r.is_finished()) {
                        tracing::warn!("SIGHUP: a reload is already running");
                    } else {
                        tracing::info!("SIGHUP: rolling reload");
                        let primary = primary.clone();
                        reloading = Some(tokio::spawn(async move {
                            match primary.reload().await {
                                Ok(report) if report.is_complete() => {
                                    tracing::info!(replaced = report.replaced.len(), "reload complete");
                                }
                                Ok(report) => tracing::error!(replaced = report.replaced.len(), aborted = ?report.aborted, "reload aborted; the old workers keep serving"),
                                Err(error) => tracing::error!(%error, "reload failed"),
                            }
                        }));
                    }
                }
                event = events.recv() => match event {
                    Some(Event::Replaced { old, new }) => {
                        policy.handle_replaced(now(), old.id(), new.id());
                    }
                    Some(Event::Listening { worker, address }) => {
                        tracing::info!(worker = worker.id().get(), pid = worker.pid(), %address, "listening");
                        policy.handle_listening(now(), worker.id());
                    }
                    Some(Event::Exit { worker, status, killed }) => {
                        let on_purpose = worker.exited_after_disconnect() == Some(true);
                        log_exit(worker.id(), worker.pid(), status, on_purpose, killed);
                        policy.handle_exit(now(), worker.id(), status, on_purpose);
                    }
                    Some(Event::Error { worker, error }) => {
                        tracing::warn!(worker = worker.id().get(), %error, "worker broke the protocol");
                    }
                    Some(_) => {}
                    None => return Ok(()),
                },
                () = sleep_until(timer) => policy.handle_timeout(now()),
            }
        }
    }
}

/// Forgets the supervisor's control channel when `run` ends.
struct Detach<'a>(&'a Primary);

impl Drop for Detach<'_> {
    fn drop(&mut self) {
        self.0.attach_supervisor(None);
    }
}

/// Adds or removes slots until `target` are active; removed workers drain and exit.
fn scale(policy: &mut Policy, primary: &Primary, target: usize) {
    tracing::info!(from = policy.active(), to = target, "scaling");
    while policy.active() < target {
        policy.add_slot();
    }
    while policy.active() > target {
        if let Some(worker) = policy.remove_slot().and_then(|w| primary.worker(w)) {
            tokio::spawn(async move { worker.disconnect().await });
        }
    }
}

/// Waits for `stopping`; a second signal meanwhile kills every worker at once.
async fn shut_down(
    primary: &Primary,
    terminate: &mut tokio::signal::unix::Signal,
    interrupt: &mut tokio::signal::unix::Signal,
    stopping: impl Future<Output = io::Result<()>>,
) -> io::Result<()> {
    tokio::select! {
        done = stopping => done,
        _ = terminate.recv() => kill_all(primary).await,
        _ = interrupt.recv() => kill_all(primary).await,
    }
}

async fn stop_fast(primary: &Primary) -> io::Result<()> {
    for worker in primary.workers() {
        let _ = worker.kill(libc::SIGTERM);
    }
    let all_exited = async {
        for worker in primary.workers() {
            worker.exited().await;
        }
    };
    if tokio::time::timeout(FAST_SHUTDOWN, all_exited)
        .await
        .is_err()
    {
        return kill_all(primary).await;
    }
    Ok(())
}

async fn kill_all(primary: &Primary) -> io::Result<()> {
    tracing::warn!("killing every worker");
    for worker in primary.workers() {
        let _ = worker.kill(libc::SIGKILL);
    }
    for worker in primary.workers() {
        worker.exited().await;
    }
    Ok(())
}

fn report(event: SupervisorEvent, failure: &mut Option<String>) {
    match event {
        SupervisorEvent::Respawning {
            slot,
            delay,
            recent_failures,
        } => {
            tracing::warn!(%slot, ?delay, recent_failures, "restarting a crashed worker");
        }
        SupervisorEvent::CrashLoop { slot, failures } => {
            tracing::error!(%slot, failures, "crash loop: this slot stays empty; the other workers keep serving");
            failure.get_or_insert_with(|| format!("{slot} crash-looped ({failures} crashes)"));
        }
        SupervisorEvent::Fatal { slot, worker } => {
            tracing::error!(%slot, worker = worker.get(), "worker exited with the fatal exit code; not restarting it");
            failure
                .get_or_insert_with(|| format!("{slot}: {worker} exited with the fatal exit code"));
        }
        _ => {}
    }
}

fn log_exit(
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
