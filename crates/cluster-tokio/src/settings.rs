//! Settings of the primary (Node's `cluster.setupPrimary`).

use std::ffi::OsString;
use std::path::PathBuf;
use std::time::Duration;

use proto::SchedulingPolicy;

/// The environment variable that overrides the scheduling policy: `rr` or `none`.
pub const ENV_SCHED_POLICY: &str = "CLUSTER_SCHED_POLICY";

/// The environment variable that overrides [`Settings::heartbeat_timeout`], in milliseconds
/// (`0` disables hang detection).
pub const ENV_HEARTBEAT_TIMEOUT_MS: &str = "CLUSTER_HEARTBEAT_TIMEOUT_MS";

/// The environment variable that overrides [`Settings::window`] (a positive number).
pub const ENV_HANDOFF_WINDOW: &str = "CLUSTER_HANDOFF_WINDOW";

/// The environment variable that overrides [`Settings::batch_scheduling`]: `1` or `0`.
pub const ENV_BATCH_SCHEDULING: &str = "CLUSTER_BATCH_SCHEDULING";

/// How the primary starts and treats its workers.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct Settings {
    /// The program workers run; `None` re-executes this binary through `/proc/self/exe`, which
    /// works even after a deploy deleted the file.
    pub exec: Option<PathBuf>,
    /// Worker arguments; `None` passes this process's own arguments.
    pub args: Option<Vec<OsString>>,
    /// Extra environment for every worker.
    pub env: Vec<(OsString, OsString)>,
    /// Working directory of workers; `None` inherits the primary's.
    pub cwd: Option<PathBuf>,
    /// Pipe worker stdout/stderr through the primary, each line prefixed with the worker id
    /// (`[worker 3] ...`). A worker's exit is reported once its output is through (waiting at
    /// most a second, in case a process it started still holds the pipes).
    pub silent: bool,
    /// Round robin (default) or shared listening sockets; `CLUSTER_SCHED_POLICY=rr|none`
    /// overrides what is set here.
    pub policy: SchedulingPolicy,
    /// Connections handed to one worker and not yet acked (1 is Node's behaviour);
    /// `CLUSTER_HANDOFF_WINDOW` overrides it.
    pub window: usize,
    /// Connections the primary holds per listener while no worker has room; past this bound,
    /// new connections wait in the kernel's backlog.
    pub max_queued: usize,
    /// How long a worker may take to ack a handed-off connection before it is presumed hung
    /// and killed.
    pub handoff_timeout: Duration,
    /// How long `disconnect` waits for a worker to exit before killing it.
    pub disconnect_timeout: Duration,
    /// How long a worker may stay silent before it is presumed hung, killed and (under a
    /// supervisor) replaced. Its runtime sends a heartbeat every second from a task, so a
    /// current-thread runtime blocked by user code is caught; `None` disables the check.
    /// `CLUSTER_HEARTBEAT_TIMEOUT_MS` overrides it.
    pub heartbeat_timeout: Option<Duration>,
    /// How long a rolling reload waits for a replacement worker to listen before it gives up
    /// (and keeps the old workers).
    pub boot_timeout: Duration,
    /// The accept backlog of listening sockets created by the primary (Node's default: 511).
    pub backlog: u32,
    /// Under round robin, run the primary's thread with Linux's `SCHED_BATCH` policy (default
    /// `true`; `CLUSTER_BATCH_SCHEDULING=0|1` overrides it). The thread keeps its CPU share but
    /// no longer preempts a busy worker each time a connection arrives: it runs a moment later
    /// and hands off every connection that arrived meanwhile, for about a quarter less CPU per
    /// connection (docs/benchmarks.md). The cost is latency when every CPU is busy, bounded by
    /// the kernel's time slice (a few milliseconds; p99 no worse in the benchmarks).
    ///
    /// Applied only on a current-thread runtime (`#[cluster::main]`'s primary), to the thread
    /// that runs the primary, and only if that thread is under the default policy (a policy set
    /// by `chrt` or a unit file is kept). Workers are reset to the default policy; other
    /// processes the primary's own code spawns inherit `SCHED_BATCH`.
    pub batch_scheduling: bool,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            exec: None,
            args: None,
            env: Vec::new(),
            cwd: None,
            silent: false,
            policy: SchedulingPolicy::RoundRobin,
            window: 8,
            max_queued: 1024,
            handoff_timeout: Duration::from_secs(10),
            disconnect_timeout: Duration::from_secs(30),
            boot_timeout: Duration::from_secs(60),
            heartbeat_timeout: Some(Duration::from_secs(30)),
            backlog: 511,
            batch_scheduling: true,
        }
    }
}

impl Settings {
    /// The policy after the `CLUSTER_SCHED_POLICY` override.
    pub(crate) fn effective_policy(&self) -> SchedulingPolicy {
        match std::env::var(ENV_SCHED_POLICY).as_deref() {
            Ok("rr") => SchedulingPolicy::RoundRobin,
            Ok("none") => SchedulingPolicy::Shared,
            _ => self.policy,
        }
    }

    /// Whether the primary should switch its thread to `SCHED_BATCH`, after the
    /// `CLUSTER_BATCH_SCHEDULING` override: only round robin has work to batch.
    pub(crate) fn effective_batch_scheduling(&self) -> bool {
        let wanted = match std::env::var(ENV_BATCH_SCHEDULING).as_deref() {
            Ok("1") => true,
            Ok("0") => false,
            _ => self.batch_scheduling,
        };
        wanted && self.effective_policy() == SchedulingPolicy::RoundRobin
    }

    pub(crate) fn core_config(&self) -> proto::Config {
        let mut config = proto::Config::default();
        config.registry.policy = self.effective_policy();
        let window = std::env::var(ENV_HANDOFF_WINDOW)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(self.window);
        config.registry.window = window.max(1);
        config.registry.max_queued = self.max_queued.max(1);
        config.handoff_timeout = self.handoff_timeout;
        config.heartbeat_timeout = match std::env::var(ENV_HEARTBEAT_TIMEOUT_MS)
            .ok()
            .and_then(|v| v.parse().ok())
        {
            Some(0) => None,
            Some(ms) => Some(Duration::from_millis(ms)),
            None => self.heartbeat_timeout,
        };
        config
    }
}
