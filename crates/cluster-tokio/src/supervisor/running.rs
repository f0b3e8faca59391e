//! The supervisor's loop: signals, control commands, the primary's events, forks and the timer
//! go in; the core's policy decides; each of its outputs is carried out here.

use std::io;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use futures_util::future::BoxFuture;
use futures_util::stream::FuturesUnordered;
use proto::supervisor::{
    GiveUp, ScaleError, SlotId, Supervisor as Policy, SupervisorOutput, WorkerExit,
};
use tokio::sync::mpsc;

use super::handle::{Control, Shared};
use super::log::{SpawnFailures, is_kill_from_outside, log_exit, report};
use super::recycle::{Outcome, Reading, Readings, Recycler};
use super::reloads::Reloads;
use super::signals::{Asked, Signals};
use super::{ReloadError, SupervisorError};
use crate::primary::{Event, Events, ExitStatus, Primary, Signal, WorkerHandle};
use crate::settings::{SettingsError, Shown};

/// How long a fast shutdown (SIGINT) lets workers drain before it kills them.
const FAST_SHUTDOWN: Duration = Duration::from_secs(5);

/// A fork under way, for a slot.
type Fork = BoxFuture<'static, (SlotId, io::Result<WorkerHandle>)>;

/// Why the loop ends.
enum Stop {
    /// Drain every worker within `within`, then return `outcome`.
    Drain {
        within: Duration,
        outcome: Result<(), SupervisorError>,
    },
    /// The primary is gone: nothing to drain.
    PrimaryGone,
}

/// Everything the loop owns.
pub(super) struct Running {
    primary: Primary,
    shared: Arc<Shared>,
    policy: Policy,
    controls: mpsc::UnboundedReceiver<Control>,
    events: Events,
    /// Forks under way. Polled before the primary's events: the driver answers a fork in the
    /// turn it spawns the process, and a `Listening` needs frames the worker sends later, so its
    /// slot is known before its `Listening`.
    forks: FuturesUnordered<Fork>,
    reloads: Reloads,
    recycler: Recycler,
    readings: Readings,
    spawn_failures: SpawnFailures,
    progress: crate::systemd::Progress,
    watchdog: crate::systemd::Watchdog,
    /// When the shutdown delay a SIGTERM started ends, and the drain begins.
    leave_at: Option<tokio::time::Instant>,
    /// With `workers_follow_cpu_limit`: when to read the CPU limit again, and the count it gave
    /// last time.
    cpu_limit: Option<(tokio::time::Interval, usize)>,
    /// Whether an unreadable CPU limit was logged already (once is enough).
    cpu_limit_unreadable: bool,
    /// Log lines about signals passed on, and about signals ignored: a storm of either logs
    /// once a second.
    forward_log: RateLimit,
    ignore_log: RateLimit,
    /// The OOM kills the memory cgroup counted at the last look: one more when a worker died
    /// of SIGKILL means the OOM killer killed it.
    oom_kills: Option<u64>,
    /// The last bind the primary could not make for a worker, reported when that worker exits.
    listen_failure: Option<(String, i32)>,
}

impl Running {
    pub(super) fn new(
        primary: Primary,
        shared: Arc<Shared>,
        controls: mpsc::UnboundedReceiver<Control>,
        seed: u64,
    ) -> Self {
        let settings = primary.settings();
        let policy = Policy::new(settings.supervisor_config(), settings.worker_count(), seed);
        Self {
            events: primary.events(),
            reloads: Reloads::new(shared.clone()),
            recycler: Recycler::default(),
            readings: Readings::new(&primary),
            primary,
            shared,
            policy,
            controls,
            forks: FuturesUnordered::new(),
            spawn_failures: SpawnFailures::default(),
            progress: crate::systemd::Progress::default(),
            watchdog: crate::systemd::Watchdog::new(),
            leave_at: None,
            cpu_limit: None,
            cpu_limit_unreadable: false,
            oom_kills: crate::cgroup::oom_kills(),
            forward_log: RateLimit::default(),
            ignore_log: RateLimit::default(),
            listen_failure: None,
        }
    }

    pub(super) async fn supervise(mut self, mut signals: Signals) -> Result<(), SupervisorError> {
        self.banner();
        let settings = self.primary.settings();
        if settings.workers_follow_cpu_limit {
            let mut period = tokio::time::interval(crate::settings::CPU_LIMIT_PERIOD);
            period.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            period.reset();
            self.cpu_limit = Some((period, crate::cgroup::available().count));
            tracing::info!(period = %Shown(crate::settings::CPU_LIMIT_PERIOD), "the worker count follows the CPU limit");
        }
        let (delay, from) = self.primary.settings().shutdown_delay_in_force();
        if !delay.is_zero() {
            tracing::info!(
                delay = %Shown(delay),
                from,
                "on SIGTERM the cluster serves on for the shutdown delay, then drains"
            );
        }
        loop {
            // A reload replaces every worker anyway, and a cluster about to stop keeps them.
            self.policy
                .pause_recycling(self.reloads.is_running() || self.leave_at.is_some());
            self.carry_out();
            if let Some(stop) = self.given_up() {
                return self.stop(stop, &mut signals).await;
            }
            self.publish();
            let timer = self
                .policy
                .poll_timeout()
                .map(tokio::time::Instant::from_std);
            let stop = tokio::select! {
                biased;
                Some((slot, forked)) = self.forks.next() => self.forked(slot, forked),
                asked = signals.recv() => self.on_signal(asked),
                // Here, not in a task of its own: a wedged loop stops the pets.
                () = self.watchdog.tick() => watchdog(),
                Some(control) = self.controls.recv() => self.on_control(control),
                () = self.reloads.finished() => self.reload_queued(),
                event = self.events.recv() => self.on_event(event),
                () = sleep_until(timer) => self.on_timer(),
                () = sleep_until(self.leave_at) => self.drain_after_delay(),
                () = tick(&mut self.cpu_limit) => self.follow_cpu_limit(),
                Some(reading) = self.readings.next() => self.on_reading(reading),
                (old, reason, outcome) = self.recycler.finished() => self.recycled(old, reason, outcome),
            };
            if let Some(stop) = stop {
                return self.stop(stop, &mut signals).await;
            }
        }
    }

    /// The line that says what runs: the program, the versions, and the main settings in force
    /// with where the worker count came from (the rest: `CLUSTER_CHECK_CONFIG=1`, or the
    /// control socket's status).
    fn banner(&self) {
        let settings = self.primary.settings();
        let in_force = settings.in_force();
        let value = |name: &str| {
            in_force
                .iter()
                .find(|s| s.name == name)
                .map(|s| s.value.clone())
                .unwrap_or_default()
        };
        let (workers, workers_from) = settings.worker_count_and_source();
        let endpoint = self.shared.book.lock().expect("not poisoned").endpoint;
        let metrics = endpoint.map_or_else(|| value("metrics_addr"), |a| a.to_string());
        tracing::info!(
            program = %crate::env::program_name(),
            binary = %self.primary.image().binary.path.display(),
            cluster = %env!("CARGO_PKG_VERSION"),
            protocol = crate::env::PROTOCOL_VERSION,
            workers,
            workers_from = %workers_from,
            policy = %value("policy"),
            handoff_timeout = %value("handoff_timeout"),
            disconnect_timeout = %value("disconnect_timeout"),
            boot_timeout = %value("boot_timeout"),
            heartbeat_timeout = %value("heartbeat_timeout"),
            shutdown_delay = %value("shutdown_delay"),
            wait_ready = %value("wait_ready"),
            metrics = %metrics,
            control = %value("control_socket"),
            "starting the workers"
        );
    }

    /// Carries out what the policy decided.
    fn carry_out(&mut self) {
        while let Some(output) = self.policy.poll_output() {
            match output {
                SupervisorOutput::Spawn { slot } => {
                    let primary = self.primary.clone();
                    self.forks
                        .push(Box::pin(async move { (slot, primary.fork().await) }));
                }
                SupervisorOutput::Kill { worker, reason } => {
                    tracing::warn!(worker = worker.get(), %reason, "killing worker");
                    if let Some(handle) = self.primary.worker(worker) {
                        let _ = handle.kill(Signal::KILL);
                    }
                }
                SupervisorOutput::Disconnect { worker } => {
                    if let Some(handle) = self.primary.worker(worker) {
                        tokio::spawn(async move { handle.disconnect().await });
                    }
                }
                SupervisorOutput::Recycle { worker, reason } => {
                    let pid = self.primary.worker(worker).map(|w| w.pid());
                    tracing::info!(worker = worker.get(), pid, %reason, "recycling worker: starting its replacement");
                    self.recycler.start(&self.shared, worker, reason);
                }
                SupervisorOutput::Event(event) => report(event, &self.spawn_failures),
            }
        }
    }

    /// Hands a reading of the workers' handoffs or memory to the policy.
    fn on_reading(&mut self, reading: Reading) -> Option<Stop> {
        let now = now();
        match reading {
            Reading::Handoffs(workers) => {
                for (worker, handoffs) in workers {
                    self.policy.handle_handoffs(now, worker, handoffs);
                }
            }
            Reading::Memory(workers) => {
                for (worker, resident) in workers {
                    self.policy.handle_memory(now, worker, resident);
                }
            }
        }
        None
    }

    /// A recycle ended.
    fn recycled(
        &mut self,
        old: proto::WorkerId,
        reason: proto::supervisor::RecycleReason,
        outcome: Outcome,
    ) -> Option<Stop> {
        match outcome {
            Outcome::Replaced { new } => {
                tracing::info!(
                    old = old.get(),
                    new = new.get(),
                    reason = reason.label(),
                    "worker recycled"
                );
                self.shared
                    .book
                    .lock()
                    .expect("not poisoned")
                    .recycled(&reason);
                self.policy.handle_recycled(old);
            }
            Outcome::Gone => {
                tracing::info!(
                    worker = old.get(),
                    "worker recycled: it had already left (replaced by a reload, or exited)"
                );
                self.policy.handle_recycled(old);
            }
            Outcome::Failed(why) => {
                let retry = self.primary.settings().backoff_max;
                tracing::error!(worker = old.get(), %why, ?retry, "recycle aborted: the worker serves on, and is recycled again after the longest backoff at the earliest");
                self.policy.handle_recycle_failed(now(), old);
            }
        }
        None
    }

    /// The end, if the policy says there is nothing left to supervise.
    fn given_up(&mut self) -> Option<Stop> {
        if !self.policy.is_done() {
            return None;
        }
        self.spawn_failures.end_burst("no worker is left to start");
        let outcome = match self.policy.gave_up() {
            Some(GiveUp::Fatal { slot, worker, code }) => {
                Err(SupervisorError::Fatal { slot, worker, code })
            }
            Some(GiveUp::BootLoop { slot, failures }) => {
                Err(SupervisorError::BootLoop { slot, failures })
            }
            Some(GiveUp::Listen { address, errno }) => {
                let source = io::Error::from_raw_os_error(errno);
                tracing::error!(%address, error = %source, "cannot listen, and no worker serves: stopping (every worker would fail the same way)");
                Err(SupervisorError::Listen { address, source })
            }
            None => Ok(()),
        };
        if let Err(error) = &outcome {
            crate::systemd::stopping(&format!("giving up: {error}"));
        }
        Some(Stop::Drain {
            within: self.primary.settings().disconnect_timeout,
            outcome,
        })
    }

    /// Tells systemd and the book how many workers serve.
    fn publish(&mut self) {
        let (serving, wanted) = (self.policy.serving(), self.policy.active());
        self.progress
            .update(serving, wanted, self.primary.generation());
        let mut book = self.shared.book.lock().expect("not poisoned");
        book.serving = serving;
        book.wanted = wanted;
    }

    fn forked(&mut self, slot: SlotId, forked: io::Result<WorkerHandle>) -> Option<Stop> {
        match forked {
            Ok(worker) => {
                self.spawn_failures.end_burst("a worker started again");
                if self.policy.handle_spawned(now(), slot, worker.id()) {
                    let mut book = self.shared.book.lock().expect("not poisoned");
                    book.spawned(slot, worker.id());
                }
            }
            Err(error) => {
                self.spawn_failures.failed(slot, &error);
                self.policy.handle_spawn_failed(now(), slot);
            }
        }
        None
    }

    fn reload_queued(&mut self) -> Option<Stop> {
        self.reloads.start_queued(&self.primary);
        None
    }

    fn on_timer(&mut self) -> Option<Stop> {
        self.policy.handle_timeout(now());
        None
    }

    fn on_signal(&mut self, asked: Asked) -> Option<Stop> {
        let settings = self.primary.settings();
        let (delay, _) = settings.shutdown_delay_in_force();
        let leaving = self.leave_at.is_some();
        let (within, why) = match asked {
            Asked::Quit => (
                settings.disconnect_timeout,
                "SIGQUIT: a graceful stop, as SIGTERM without its delay; draining the workers",
            ),
            Asked::Terminate if !leaving && !delay.is_zero() => {
                self.delay_shutdown(delay);
                return None;
            }
            Asked::Terminate if leaving => (
                settings.disconnect_timeout,
                "SIGTERM again: the rest of the shutdown delay skipped; draining the workers",
            ),
            Asked::Terminate => (settings.disconnect_timeout, "SIGTERM: draining the workers"),
            Asked::Interrupt => (
                FAST_SHUTDOWN.min(settings.disconnect_timeout),
                "SIGINT: stopping the workers",
            ),
            Asked::TerminalClosed => (
                settings.disconnect_timeout,
                "SIGHUP: the terminal closed; draining the workers",
            ),
            Asked::Forward(signal) => {
                self.forward(signal);
                return None;
            }
            Asked::Ignored(name) => {
                if self.ignore_log.allows() {
                    tracing::warn!("{name}: ignored (no in-place upgrade here; SIGHUP reloads)");
                }
                return None;
            }
            Asked::Reload | Asked::Scale { .. } if leaving => {
                let what = if matches!(asked, Asked::Reload) {
                    "not reloading"
                } else {
                    "not scaling"
                };
                tracing::warn!("shutting down: {what}");
                return None;
            }
            Asked::Reload => {
                self.reloads.on_signal(&self.primary);
                return None;
            }
            Asked::Scale { more } => {
                if let Err(error) = self.scale_by_one(more) {
                    let signal = if more { "SIGTTIN" } else { "SIGTTOU" };
                    tracing::warn!(%error, "{signal}: not scaling");
                }
                return None;
            }
        };
        crate::systemd::stopping(why);
        tracing::info!("{why}");
        Some(Stop::Drain {
            within,
            outcome: Ok(()),
        })
    }

    /// SIGTERM with a shutdown delay: `/readyz` fails at once, and everything else carries on
    /// (workers serve, crashed ones are restarted) until the delay ends; reloads and scaling are
    /// refused meanwhile.
    fn delay_shutdown(&mut self, delay: Duration) {
        self.leave_at = Some(tokio::time::Instant::now() + delay);
        self.reloads.cancel();
        self.shared.book.lock().expect("not poisoned").phase = super::Phase::Delaying;
        let why = format!(
            "SIGTERM: serving {} more while load balancers stop sending, then draining",
            Shown(delay)
        );
        crate::systemd::stopping(&why);
        tracing::info!("{why}");
    }

    fn drain_after_delay(&self) -> Option<Stop> {
        tracing::info!("the shutdown delay is over: draining the workers");
        crate::systemd::notify("STATUS=draining the workers");
        Some(Stop::Drain {
            within: self.primary.settings().disconnect_timeout,
            outcome: Ok(()),
        })
    }

    /// `workers_follow_cpu_limit`: the CPU limit changed since the last reading (a resize of
    /// the container), so the worker count follows it. A limit that cannot be read leaves the
    /// count as it is, logged once.
    fn follow_cpu_limit(&mut self) -> Option<Stop> {
        let cpus = match crate::cgroup::try_available() {
            Ok(cpus) => cpus,
            Err(error) => {
                if !std::mem::replace(&mut self.cpu_limit_unreadable, true) {
                    tracing::warn!(%error, "cannot read the CPU limit; the worker count stays as it is");
                }
                return None;
            }
        };
        self.cpu_limit_unreadable = false;
        let last = self.cpu_limit.as_mut().map(|(_, last)| last)?;
        if cpus.count == std::mem::replace(last, cpus.count) || self.leave_at.is_some() {
            return None;
        }
        tracing::info!(cpus = cpus.count, source = %cpus.source, "the CPU limit changed");
        if let Err(error) = self.scale(cpus.count) {
            tracing::warn!(%error, "not following the CPU limit");
        }
        None
    }

    /// Passes `signal` on to every worker, as an init passes on what it does not handle.
    fn forward(&mut self, signal: i32) {
        let workers = self.primary.workers();
        if self.forward_log.allows() {
            tracing::info!(
                signal,
                workers = workers.len(),
                "passing the signal on to the workers"
            );
        }
        let Some(signal) = Signal::from_raw(signal) else {
            return;
        };
        for worker in workers {
            let _ = worker.kill(signal);
        }
    }

    fn on_control(&mut self, control: Control) -> Option<Stop> {
        if self.leave_at.is_some() {
            refuse(control);
            return None;
        }
        match control {
            Control::Scale { workers, reply } => {
                let _ = reply.send(self.scale(workers));
            }
            Control::Reload { reply } => self.reloads.ask(&self.primary, reply),
            Control::Ping { reply } => {
                let _ = reply.send(());
            }
        }
        None
    }

    fn on_event(&mut self, event: Option<Event>) -> Option<Stop> {
        let now = now();
        let Some(event) = event else {
            return Some(Stop::PrimaryGone);
        };
        match event {
            Event::Replaced { old, new } => {
                if self.reloads.is_running() {
                    crate::systemd::reload_progress(crate::systemd::reload_step(
                        self.primary.settings(),
                    ));
                }
                let supervised = self
                    .shared
                    .book
                    .lock()
                    .expect("not poisoned")
                    .worker_slots
                    .contains_key(&old.id());
                if self.policy.handle_replaced(now, old.id(), new.id()) {
                    let mut book = self.shared.book.lock().expect("not poisoned");
                    book.replaced(old.id(), new.id());
                } else if supervised {
                    // Its slot no longer wants a worker (scaled away meanwhile): the replacement
                    // goes too, instead of running outside every slot.
                    tracing::info!(
                        old = old.id().get(),
                        new = new.id().get(),
                        "the replaced worker's slot is gone: disconnecting its replacement"
                    );
                    tokio::spawn(async move { new.disconnect().await });
                }
            }
            Event::ListenFailed { address, errno } => {
                self.listen_failure = Some((address.clone(), errno));
                self.policy.handle_listen_failed(address, errno);
            }
            Event::Listening { worker, address } => {
                tracing::info!(worker = worker.id().get(), pid = worker.pid(), %address, "listening");
                self.policy.handle_listening(now, worker.id());
            }
            Event::Ready(worker) => {
                tracing::info!(
                    worker = worker.id().get(),
                    pid = worker.pid(),
                    "worker ready"
                );
                self.policy.handle_ready(now, worker.id());
            }
            Event::Exit {
                worker,
                status,
                killed,
            } => {
                let on_purpose = worker.exited_after_disconnect() == Some(true);
                log_exit(worker.id(), worker.pid(), status, on_purpose, killed);
                let oom_killed = status == ExitStatus::Signal(libc::SIGKILL)
                    && killed.is_none()
                    && self.oom_killed();
                if oom_killed {
                    tracing::warn!(
                        worker = worker.id().get(),
                        pid = worker.pid(),
                        "the worker was killed by the kernel's OOM killer: its memory cgroup is \
                         out of memory (a container's memory limit)"
                    );
                }
                let mut book = self.shared.book.lock().expect("not poisoned");
                book.exited(worker.id(), status, killed, oom_killed);
                drop(book);
                let exit = WorkerExit {
                    status,
                    on_purpose,
                    killed,
                    signal_from_outside: is_kill_from_outside(status),
                };
                self.policy.handle_exit(now, worker.id(), exit);
                // The worker that asked exits without a word about it (`#[cluster::main]`):
                // this is its report. When the cluster gives up instead, its one line says it.
                if let Some((address, errno)) = self.listen_failure.take()
                    && !self.policy.is_done()
                {
                    let error = io::Error::from_raw_os_error(errno);
                    tracing::warn!(worker = worker.id().get(), %address, %error, "the worker could not listen");
                }
            }
            Event::Fork(_) => self.shared.book.lock().expect("not poisoned").forked += 1,
            _ => {}
        }
        None
    }

    /// Whether the memory cgroup counted an OOM kill since the last look.
    fn oom_killed(&mut self) -> bool {
        let now = crate::cgroup::oom_kills();
        let before = std::mem::replace(&mut self.oom_kills, now);
        matches!((before, now), (Some(before), Some(now)) if now > before)
    }

    /// Keeps `target` workers: the policy's bounds, and this user's process limit for the
    /// ones to add.
    fn scale(&mut self, target: usize) -> Result<(), SupervisorError> {
        crate::sys::check_process_limit(target.saturating_sub(self.policy.active()))?;
        let from = self.policy.active();
        let removed = self.policy.scale(target).map_err(scale_error)?;
        tracing::info!(from, to = target, "scaling");
        self.removed(&removed);
        Ok(())
    }

    fn scale_by_one(&mut self, more: bool) -> Result<(), SupervisorError> {
        if more {
            crate::sys::check_process_limit(1)?;
        }
        let from = self.policy.active();
        let (target, removed) = self.policy.scale_by_one(more).map_err(scale_error)?;
        if target != from {
            tracing::info!(from, to = target, "scaling");
        }
        self.removed(&removed);
        Ok(())
    }

    fn removed(&self, slots: &[SlotId]) {
        let mut book = self.shared.book.lock().expect("not poisoned");
        for &slot in slots {
            book.removed(slot);
        }
    }

    /// Drains every worker (a second SIGTERM or SIGINT meanwhile kills them at once) and ends
    /// the loop. Meanwhile the loop stays alive for `/healthz` and refuses reloads and scaling.
    async fn stop(mut self, stop: Stop, signals: &mut Signals) -> Result<(), SupervisorError> {
        self.policy.stop();
        self.reloads.cancel();
        self.recycler.cancel();
        self.readings.cancel();
        let (within, outcome) = match stop {
            Stop::PrimaryGone => {
                crate::systemd::stopping("the primary stopped");
                return Ok(());
            }
            Stop::Drain { within, outcome } => (within, outcome),
        };
        {
            let mut book = self.shared.book.lock().expect("not poisoned");
            book.phase = super::Phase::Draining;
            book.serving = 0;
        }
        // Forks under way end in workers the drain must see.
        while self.forks.next().await.is_some() {}
        let draining = self.primary.disconnect_within(within);
        let mut draining = std::pin::pin!(draining);
        loop {
            tokio::select! {
                done = &mut draining => {
                    done.map_err(|_| SupervisorError::Stopped)?;
                    return outcome;
                }
                asked = signals.recv() => {
                    if matches!(asked, Asked::Terminate | Asked::Quit | Asked::Interrupt) {
                        kill_all(&self.primary).await;
                        return outcome;
                    }
                }
                Some(control) = self.controls.recv() => refuse(control),
            }
        }
    }
}

/// At most one log line a second.
#[derive(Default)]
struct RateLimit(Option<Instant>);

impl RateLimit {
    fn allows(&mut self) -> bool {
        let now = Instant::now();
        if self
            .0
            .is_some_and(|last| now.duration_since(last) < Duration::from_secs(1))
        {
            return false;
        }
        self.0 = Some(now);
        true
    }
}

/// Answers a command while the cluster shuts down: alive, but no reload and no scaling.
fn refuse(control: Control) {
    match control {
        Control::Ping { reply } => {
            let _ = reply.send(());
        }
        Control::Scale { reply, .. } => {
            let _ = reply.send(Err(SupervisorError::Stopped));
        }
        Control::Reload { reply } => {
            let _ = reply.send(Err(ReloadError::Stopped));
        }
    }
}

fn scale_error(error: ScaleError) -> SupervisorError {
    match error {
        ScaleError::TooMany { asked, max } => SupervisorError::TooManyWorkers(
            SettingsError::out_of_range("workers", asked, format!("from 0 to {max}")),
        ),
        ScaleError::Stopping => SupervisorError::Stopped,
    }
}

fn watchdog() -> Option<Stop> {
    crate::systemd::notify("WATCHDOG=1");
    None
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

/// The next tick of `period`, if there is one.
async fn tick(period: &mut Option<(tokio::time::Interval, usize)>) {
    match period {
        Some((period, _)) => {
            period.tick().await;
        }
        None => std::future::pending().await,
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
