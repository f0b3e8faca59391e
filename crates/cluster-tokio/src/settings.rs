//! Every knob of a cluster in one builder: the primary's (Node's `cluster.setupPrimary`), the
//! supervisor's, and the workers' runtime.

use std::ffi::OsString;
use std::fmt;
use std::net::SocketAddr;
use std::num::NonZeroUsize;
use std::path::PathBuf;
use std::time::Duration;

pub use proto::SchedulingPolicy;
use proto::supervisor::SupervisorConfig;

/// How often [`Settings::workers_follow_cpu_limit`] reads the CPU limit again.
pub const CPU_LIMIT_PERIOD: Duration = Duration::from_secs(10);

/// The shutdown delay by default in a Kubernetes pod (where `KUBERNETES_SERVICE_HOST` is set):
/// long enough for kube-proxy and the usual ingress controllers to drop a terminating pod's
/// endpoints, which they do within a few seconds of its deletion.
pub const KUBERNETES_SHUTDOWN_DELAY: Duration = Duration::from_secs(5);

/// The most workers one primary starts (`CLUSTER_WORKERS` and [`Settings::workers`] alike). A
/// worker is a process: past a thousand, a machine is better served by more hosts.
pub const MAX_WORKERS: usize = 1024;

/// The largest handoff window ([`Settings::window`]).
pub const MAX_WINDOW: usize = 4096;

/// The largest per-worker cap ([`Settings::max_connections_per_worker`]): past a million open
/// connections a worker runs out of fds first.
pub const MAX_CONNECTIONS_PER_WORKER: usize = 1 << 20;

/// The longest any timeout may be: a day. Longer is a typo, and would overflow deadlines.
pub const MAX_TIMEOUT: Duration = Duration::from_secs(24 * 60 * 60);

/// The shortest heartbeat timeout: two heartbeat intervals, so one late heartbeat is not a hang.
pub const MIN_HEARTBEAT_TIMEOUT: Duration = Duration::from_secs(2);

/// The smallest [`Settings::max_memory`]: below it every worker, however idle, would be over
/// it at once.
pub const MIN_MAX_MEMORY: u64 = 1 << 20;

/// How often the supervisor reads the handoffs of each worker, for [`Settings::max_requests`].
pub const MAX_REQUESTS_PERIOD: Duration = Duration::from_millis(100);

/// How often the supervisor reads the resident memory of each worker, for
/// [`Settings::max_memory`].
pub const MAX_MEMORY_PERIOD: Duration = Duration::from_secs(1);

/// The Tokio runtime flavor of workers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Flavor {
    /// One thread per worker process (the default: scale with processes, not threads).
    #[default]
    CurrentThread,
    /// A work-stealing runtime in each worker.
    MultiThread,
}

/// How a cluster runs: how many workers, which program they run, how the primary treats them,
/// how the supervisor restarts them, and the workers' runtime.
///
/// Built by value, like [`ListenOptions`](crate::net::ListenOptions); every setting has a default
/// (the table in the guide's "Configuration"), and the `CLUSTER_*` environment variables override
/// some of them: [`run`](crate::run), [`run_workers`](crate::run_workers) and
/// `#[cluster::main]` all apply them ([`Self::apply_env`]) before anything starts, unless
/// [`Self::env_overrides`] is off. Settings that contradict each other are refused when the
/// primary starts, with a [`SettingsError`].
///
/// Each builder method has a getter of the same name with `get_` in front, as
/// [`std::process::Command`] names its own (`arg` and `get_args`): [`Self::get_window`] reads
/// back what [`Self::window`] set. [`Self::worker_count`] resolves the default worker count.
///
/// # Examples
///
/// ```
/// use std::time::Duration;
///
/// let settings = cluster_tokio::Settings::new()
///     .workers(4)
///     .disconnect_timeout(Duration::from_secs(20))
///     .silent(true);
/// assert_eq!(settings.worker_count(), 4);
/// ```
#[derive(Clone, Debug)]
#[must_use]
pub struct Settings {
    pub(crate) workers: Option<usize>,
    pub(crate) flavor: Flavor,
    pub(crate) worker_threads: Option<usize>,
    pub(crate) exec: Option<PathBuf>,
    pub(crate) args: Option<Vec<OsString>>,
    pub(crate) env: Vec<(OsString, OsString)>,
    pub(crate) cwd: Option<PathBuf>,
    pub(crate) silent: bool,
    pub(crate) policy: SchedulingPolicy,
    pub(crate) window: usize,
    pub(crate) max_queued: usize,
    pub(crate) max_connections_per_worker: Option<usize>,
    pub(crate) handoff_timeout: Duration,
    pub(crate) disconnect_timeout: Duration,
    pub(crate) shutdown_delay: Option<Duration>,
    pub(crate) heartbeat_timeout: Option<Duration>,
    pub(crate) boot_timeout: Duration,
    pub(crate) backlog: u32,
    pub(crate) batch_scheduling: bool,
    pub(crate) backoff_initial: Duration,
    pub(crate) backoff_max: Duration,
    pub(crate) healthy_after: Duration,
    pub(crate) crash_loop_failures: usize,
    pub(crate) crash_loop_window: Duration,
    pub(crate) fatal_exit_code: Option<i32>,
    pub(crate) retry_bind_errors: bool,
    pub(crate) wait_ready: bool,
    pub(crate) hand_back: bool,
    pub(crate) metrics_addr: Option<SocketAddr>,
    pub(crate) control_socket: Option<PathBuf>,
    pub(crate) env_overrides: bool,
    pub(crate) workers_follow_cpu_limit: bool,
    /// The `CLUSTER_*` variables applied to these settings: where those settings came from.
    pub(crate) from_env: Vec<&'static str>,
    pub(crate) max_requests: Option<(u64, u64)>,
    pub(crate) max_memory: Option<u64>,
}

impl Default for Settings {
    fn default() -> Self {
        Self::new()
    }
}

impl Settings {
    /// The defaults (listed in the guide's "Configuration").
    pub fn new() -> Self {
        // The core's defaults are the ones documented; they are not written twice.
        let core = proto::Config::default();
        let supervisor = SupervisorConfig::default();
        Self {
            workers: None,
            flavor: Flavor::CurrentThread,
            worker_threads: None,
            exec: None,
            args: None,
            env: Vec::new(),
            cwd: None,
            silent: false,
            policy: core.registry.policy,
            window: core.registry.window,
            max_queued: core.registry.max_queued,
            max_connections_per_worker: core
                .registry
                .max_connections_per_worker
                .map(NonZeroUsize::get),
            handoff_timeout: core.handoff_timeout,
            disconnect_timeout: Duration::from_secs(30),
            shutdown_delay: None,
            heartbeat_timeout: core.heartbeat_timeout,
            boot_timeout: supervisor.boot_timeout.unwrap_or(Duration::from_secs(60)),
            backlog: 511,
            batch_scheduling: true,
            backoff_initial: supervisor.backoff_initial,
            backoff_max: supervisor.backoff_max,
            healthy_after: supervisor.healthy_after,
            crash_loop_failures: supervisor.crash_loop_failures,
            crash_loop_window: supervisor.crash_loop_window,
            fatal_exit_code: supervisor.fatal_exit_code,
            retry_bind_errors: false,
            wait_ready: false,
            hand_back: true,
            metrics_addr: None,
            control_socket: None,
            env_overrides: true,
            workers_follow_cpu_limit: false,
            from_env: Vec::new(),
            max_requests: None,
            max_memory: None,
        }
    }

    /// How many workers the supervisor keeps running (default: one per CPU; at most
    /// [`MAX_WORKERS`]). `CLUSTER_WORKERS` overrides it. `0` runs a program of
    /// [`run_workers`](crate::run_workers) (`#[cluster::main]` without a parameter)
    /// unclustered: the body runs in this process, with no primary. In the `Role` form it is
    /// only what [`Self::worker_count`] reports: the program forks its workers itself.
    pub fn workers(mut self, workers: usize) -> Self {
        self.workers = Some(workers);
        self
    }

    /// The Tokio runtime flavor of each worker (default: current-thread). The primary always
    /// runs on a current-thread runtime.
    pub fn flavor(mut self, flavor: Flavor) -> Self {
        self.flavor = flavor;
        self
    }

    /// The threads of each worker's runtime, with [`Flavor::MultiThread`] only (default: one per
    /// CPU).
    pub fn worker_threads(mut self, threads: usize) -> Self {
        self.worker_threads = Some(threads);
        self
    }

    /// The program workers run (default: this binary). The primary holds the file open, so
    /// workers restarted after a deploy renamed a new build over it still run the same code as
    /// their siblings; a rolling reload opens this path again and runs what is there now.
    pub fn exec(mut self, program: impl Into<PathBuf>) -> Self {
        self.exec = Some(program.into());
        self
    }

    /// The workers' arguments (default: this process's own).
    pub fn args<I, A>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = A>,
        A: Into<OsString>,
    {
        self.args = Some(args.into_iter().map(Into::into).collect());
        self
    }

    /// Adds one variable to every worker's environment (on top of the primary's own).
    pub fn env(mut self, key: impl Into<OsString>, value: impl Into<OsString>) -> Self {
        self.env.push((key.into(), value.into()));
        self
    }

    /// The workers' working directory (default: the primary's).
    pub fn cwd(mut self, dir: impl Into<PathBuf>) -> Self {
        self.cwd = Some(dir.into());
        self
    }

    /// Pipes workers' stdout and stderr through the primary, each line prefixed with the worker
    /// id (`[worker 3] ...`; default: off, workers write to the primary's stdout and stderr
    /// directly). A worker's exit is then reported once its output is through (waiting at most
    /// a second, in case a process it started still holds the pipes).
    pub fn silent(mut self, silent: bool) -> Self {
        self.silent = silent;
        self
    }

    /// How connections reach workers: round robin (the default: the primary accepts and hands
    /// each connection to the next worker), least-outstanding (to the worker with the fewest
    /// connections open), or shared listening sockets (workers accept). The guide's
    /// "Scheduling" says when to choose which. `CLUSTER_SCHED_POLICY=rr|least-outstanding|none`
    /// overrides it.
    pub fn policy(mut self, policy: SchedulingPolicy) -> Self {
        self.policy = policy;
        self
    }

    /// The most connections one worker may have open at once over all its listeners (Node's
    /// `server.maxConnections`, per worker; default: no cap). A worker at its cap is offered
    /// nothing; when every worker is at its cap, the primary stops accepting and new
    /// connections wait in the kernel's backlog until one ends. Applies to connections the
    /// primary hands over (round robin and least-outstanding, not shared sockets); how a
    /// connection's end is known is in the guide's "Scheduling". 0 is refused.
    /// `CLUSTER_MAX_CONNECTIONS_PER_WORKER` overrides it.
    pub fn max_connections_per_worker(mut self, connections: impl Into<Option<usize>>) -> Self {
        self.max_connections_per_worker = connections.into();
        self
    }

    /// Connections handed to one worker and not yet acked, from 1 (Node's behaviour) to
    /// [`MAX_WINDOW`] (default: 8). `CLUSTER_HANDOFF_WINDOW` overrides it.
    pub fn window(mut self, window: usize) -> Self {
        self.window = window;
        self
    }

    /// Connections the primary holds per listener while no worker has room (default: 1024);
    /// past this bound, new connections wait in the kernel's backlog.
    pub fn max_queued(mut self, connections: usize) -> Self {
        self.max_queued = connections;
        self
    }

    /// How long a worker may take to ack a handed-off connection before it is presumed hung and
    /// killed (default: 10 s). `CLUSTER_HANDOFF_TIMEOUT` overrides it.
    pub fn handoff_timeout(mut self, timeout: Duration) -> Self {
        self.handoff_timeout = timeout;
        self
    }

    /// How long a disconnected worker may take to finish its connections and exit before it is
    /// killed (default: 30 s). SIGTERM, a rolling reload and scaling down all wait this long at
    /// most. `CLUSTER_DISCONNECT_TIMEOUT` overrides it.
    pub fn disconnect_timeout(mut self, timeout: Duration) -> Self {
        self.disconnect_timeout = timeout;
        self
    }

    /// How long the cluster keeps serving after SIGTERM before it drains (default: 0, or
    /// [`KUBERNETES_SHUTDOWN_DELAY`] in a Kubernetes pod). Meanwhile `/readyz` answers 503, the
    /// primary keeps accepting and the workers keep serving: a load balancer that health-checks
    /// `/readyz`, or Kubernetes removing the pod from its Service's endpoints, stops sending new
    /// connections before the listeners close, so none is refused (what a `preStop` sleep does
    /// otherwise). A second SIGTERM, or SIGINT, skips the rest of the delay. Give the platform
    /// time for both: Kubernetes' `terminationGracePeriodSeconds` above the delay plus
    /// [`Self::disconnect_timeout`]. `CLUSTER_SHUTDOWN_DELAY` overrides it.
    pub fn shutdown_delay(mut self, delay: Duration) -> Self {
        self.shutdown_delay = Some(delay);
        self
    }

    /// The shutdown delay in force ([`Self::shutdown_delay`]), and where it came from.
    pub(crate) fn shutdown_delay_in_force(&self) -> (Duration, &'static str) {
        match self.shutdown_delay {
            Some(delay) => (delay, "set"),
            None if std::env::var_os("KUBERNETES_SERVICE_HOST").is_some() => {
                (KUBERNETES_SHUTDOWN_DELAY, "a Kubernetes pod's default")
            }
            None => (Duration::ZERO, "default"),
        }
    }

    /// How long a worker may stay silent before it is presumed hung, killed and replaced
    /// (default: 30 s; at least [`MIN_HEARTBEAT_TIMEOUT`]); `None` disables the check. A
    /// worker's runtime sends a heartbeat every second from a task, so a current-thread runtime
    /// blocked by user code is caught. `CLUSTER_HEARTBEAT_TIMEOUT` overrides it.
    pub fn heartbeat_timeout(mut self, timeout: impl Into<Option<Duration>>) -> Self {
        self.heartbeat_timeout = timeout.into();
        self
    }

    /// How long a new worker may take to listen (default: 60 s). A worker started by the
    /// supervisor that does not listen in time is killed and restarted; a rolling reload whose
    /// replacement does not listen in time is aborted, and the old workers keep serving.
    /// `CLUSTER_BOOT_TIMEOUT` overrides it.
    pub fn boot_timeout(mut self, timeout: Duration) -> Self {
        self.boot_timeout = timeout;
        self
    }

    /// The accept backlog of listening sockets the primary creates (default: 511, Node's).
    pub fn backlog(mut self, backlog: u32) -> Self {
        self.backlog = backlog;
        self
    }

    /// Under round robin, runs the primary's thread with Linux's `SCHED_BATCH` policy (default:
    /// on; `CLUSTER_BATCH_SCHEDULING=0|1` overrides it). The thread keeps its CPU share but no
    /// longer preempts a busy worker each time a connection arrives: it runs a moment later and
    /// hands off every connection that arrived meanwhile, for about a quarter less CPU per
    /// connection (docs/benchmarks.md). The cost is latency when every CPU is busy, bounded by
    /// the kernel's time slice (a few milliseconds; p99 no worse in the benchmarks).
    ///
    /// Applied only on a current-thread runtime (`#[cluster::main]`'s primary), to the thread
    /// that runs the primary, and only if that thread is under the default policy (a policy set
    /// by `chrt` or a unit file is kept). Workers are reset to the default policy; other
    /// processes the primary's own code spawns inherit `SCHED_BATCH`.
    pub fn batch_scheduling(mut self, on: bool) -> Self {
        self.batch_scheduling = on;
        self
    }

    /// The supervisor's restart backoff: the first delay after a crash and the longest (default:
    /// 100 ms doubling up to 15 s, with full jitter).
    pub fn backoff(mut self, initial: Duration, max: Duration) -> Self {
        self.backoff_initial = initial;
        self.backoff_max = max;
        self
    }

    /// A worker that ran this long resets its slot's backoff (default: 30 s).
    pub fn healthy_after(mut self, uptime: Duration) -> Self {
        self.healthy_after = uptime;
        self
    }

    /// The crash-loop breaker: a slot whose workers crash `failures` times within `window` cools
    /// down for the longest backoff before it tries again, while its siblings keep serving
    /// (default: 5 crashes in 10 s). Workers killed by a signal from outside do not count.
    pub fn crash_loop(mut self, failures: usize, window: Duration) -> Self {
        self.crash_loop_failures = failures;
        self.crash_loop_window = window;
        self
    }

    /// An exit code that means "do not restart me", for a worker that found its configuration
    /// unusable (default: 78, [`FATAL_EXIT_CODE`](crate::supervisor::FATAL_EXIT_CODE)); `None` restarts every crash.
    pub fn fatal_exit_code(mut self, code: impl Into<Option<i32>>) -> Self {
        self.fatal_exit_code = code.into();
        self
    }

    /// Whether the supervisor restarts workers whose listening socket could not be bound while
    /// no worker serves (default: off). Off, such an error (a port another process holds, a
    /// privileged port) stops the cluster at once with one line naming the address and the
    /// cause: every worker would fail the same way. On, the workers crash and are restarted with
    /// backoff, for a port that is expected to free up.
    pub fn retry_bind_errors(mut self, retry: bool) -> Self {
        self.retry_bind_errors = retry;
        self
    }

    /// Whether a worker is up only once it declared itself ready with
    /// [`cluster::ready()`](crate::ready) (default: off, up once it listens). On, the
    /// supervisor counts a worker as serving from its [`Event::Ready`](crate::primary::Event::Ready),
    /// a rolling reload retires an old worker only once its replacement is ready, and systemd
    /// hears `READY=1` only once every worker is: for workers that warm up (fill caches, open
    /// database pools) after they bind. A worker that is not ready within
    /// [`Self::boot_timeout`] counts as failing at boot. The program must call
    /// `cluster::ready()` in every worker.
    pub fn wait_ready(mut self, wait: bool) -> Self {
        self.wait_ready = wait;
        self
    }

    /// Whether a worker that leaves while others stay (a rolling reload, a scale-down) hands its
    /// idle keep-alive connections back to the primary, for another worker to go on serving
    /// (default: on). The serve helpers then stop each HTTP/1.1 connection between two requests
    /// and hand it back with the bytes they read from it, so its client neither reconnects nor
    /// meets a closing connection; a program of its own does the same with
    /// [`HandBack`](crate::net::HandBack). Off, a leaving worker closes them as when the whole
    /// cluster stops: each HTTP/1.1 client gets one `Connection: close` and reconnects.
    pub fn hand_back(mut self, hand_back: bool) -> Self {
        self.hand_back = hand_back;
        self
    }

    /// Where the primary serves its HTTP endpoint while a [`Supervisor`](crate::Supervisor)
    /// runs (default: nowhere): `GET /healthz` (200 while the supervisor's loop answers),
    /// `GET /readyz` (200 while at least one worker serves, 503 otherwise), `GET /status` (a
    /// page for people that refreshes itself: the workers, the totals, the handoff latency),
    /// `GET /status.json` (the same status as `cluster-ctl status --json`) and, with the
    /// `metrics` feature, `GET /metrics` in the Prometheus text format. An address that cannot be
    /// bound stops the supervisor at start with an error naming it. Port 0 picks a free port;
    /// the primary logs the address it bound.
    pub fn metrics_addr(mut self, addr: impl Into<Option<SocketAddr>>) -> Self {
        self.metrics_addr = addr.into();
        self
    }

    /// Where the primary listens for commands while a [`Supervisor`](crate::Supervisor) runs
    /// (default: nowhere): a Unix stream socket at this absolute path, mode 0600, that answers
    /// `status`, `reload` and `scale <n>` to peers of the primary's user or root only
    /// (`SO_PEERCRED`). The `cluster-ctl` program speaks it. A socket file that something still
    /// accepts on stops the supervisor at start; one left by a crashed run is replaced.
    pub fn control_socket(mut self, path: impl Into<Option<PathBuf>>) -> Self {
        self.control_socket = path.into();
        self
    }

    /// Recycles a worker once the primary has handed it `requests` connections, plus a number
    /// drawn once per worker from 0 to `jitter` (default: never), as gunicorn's `--max-requests`
    /// and `--max-requests-jitter` do: a leak is contained without a deploy, and workers started
    /// together are not all recycled together. The worker is replaced as one step of a rolling
    /// reload replaces it: a replacement starts and must be up within [`Self::boot_timeout`],
    /// then the old worker drains (within [`Self::disconnect_timeout`]). One worker is recycled
    /// at a time, and none while a rolling reload runs; a replacement that fails leaves the old
    /// worker serving, to be tried again after the longest [`Self::backoff`].
    ///
    /// Connections are counted, not requests: a keep-alive connection counts once, however many
    /// requests it carries. The count is read ten times a second
    /// ([`MAX_REQUESTS_PERIOD`]), and the worker serves on until its replacement is up, so it
    /// is handed a few more than its limit under load. Only round robin hands connections out
    /// ([`Self::policy`]): with shared sockets the settings are refused. `CLUSTER_MAX_REQUESTS`
    /// overrides it (`1000`, or `1000+100` with jitter).
    pub fn max_requests(mut self, requests: u64, jitter: u64) -> Self {
        self.max_requests = Some((requests, jitter));
        self
    }

    /// Recycles a worker whose resident memory (RSS, as the status reports it) is over `bytes`
    /// (default: never; at least [`MIN_MAX_MEMORY`]), as PM2's `max_memory_restart` does,
    /// replaced like [`Self::max_requests`] replaces it. Memory is read every second
    /// ([`MAX_MEMORY_PERIOD`]). `CLUSTER_MAX_MEMORY` overrides it (`512MiB`).
    pub fn max_memory(mut self, bytes: impl Into<Option<u64>>) -> Self {
        self.max_memory = bytes.into();
        self
    }

    /// What [`Self::max_requests`] set, if anything: the connections, and the jitter.
    #[must_use]
    pub fn get_max_requests(&self) -> Option<(u64, u64)> {
        self.max_requests
    }

    /// What [`Self::max_memory`] set, if anything.
    #[must_use]
    pub fn get_max_memory(&self) -> Option<u64> {
        self.max_memory
    }

    /// Whether [`run`](crate::run), [`run_workers`](crate::run_workers) and `#[cluster::main]`
    /// apply the `CLUSTER_*` overrides of the environment ([`crate::env`]) to these settings
    /// before they start anything (default: on). Off, the program runs with exactly the settings
    /// of its code, and a bad `CLUSTER_*` value is ignored instead of stopping it: for a program
    /// whose environment is not its operators' to set (a test harness, a tool that embeds a
    /// cluster). `#[cluster::main(env = false)]` turns it off.
    pub fn env_overrides(mut self, apply: bool) -> Self {
        self.env_overrides = apply;
        self
    }

    /// How many workers the supervisor starts: the configured number, or one per CPU.
    #[must_use]
    pub fn worker_count(&self) -> usize {
        self.workers
            .unwrap_or_else(|| crate::cgroup::available().count)
    }

    /// What [`Self::workers`] set, if anything (`None`: one per CPU, as [`Self::worker_count`]
    /// resolves it).
    #[must_use]
    pub fn get_workers(&self) -> Option<usize> {
        self.workers
    }

    /// What [`Self::flavor`] set.
    #[must_use]
    pub fn get_flavor(&self) -> Flavor {
        self.flavor
    }

    /// What [`Self::worker_threads`] set, if anything (`None`: one per CPU).
    #[must_use]
    pub fn get_worker_threads(&self) -> Option<usize> {
        self.worker_threads
    }

    /// What [`Self::exec`] set, if anything (`None`: this binary).
    #[must_use]
    pub fn get_exec(&self) -> Option<&std::path::Path> {
        self.exec.as_deref()
    }

    /// What [`Self::args`] set, if anything (`None`: this process's own arguments).
    #[must_use]
    pub fn get_args(&self) -> Option<&[OsString]> {
        self.args.as_deref()
    }

    /// The variables [`Self::env`] added to the workers' environment, in the order they were
    /// added.
    pub fn get_env(&self) -> impl ExactSizeIterator<Item = (&std::ffi::OsStr, &std::ffi::OsStr)> {
        self.env.iter().map(|(k, v)| (k.as_os_str(), v.as_os_str()))
    }

    /// What [`Self::cwd`] set, if anything (`None`: the primary's).
    #[must_use]
    pub fn get_cwd(&self) -> Option<&std::path::Path> {
        self.cwd.as_deref()
    }

    /// What [`Self::silent`] set.
    #[must_use]
    pub fn get_silent(&self) -> bool {
        self.silent
    }

    /// What [`Self::policy`] set.
    #[must_use]
    pub fn get_policy(&self) -> SchedulingPolicy {
        self.policy
    }

    /// What [`Self::window`] set.
    #[must_use]
    pub fn get_window(&self) -> usize {
        self.window
    }

    /// What [`Self::max_queued`] set.
    #[must_use]
    pub fn get_max_queued(&self) -> usize {
        self.max_queued
    }

    /// What [`Self::handoff_timeout`] set.
    #[must_use]
    pub fn get_handoff_timeout(&self) -> Duration {
        self.handoff_timeout
    }

    /// What [`Self::disconnect_timeout`] set.
    #[must_use]
    pub fn get_disconnect_timeout(&self) -> Duration {
        self.disconnect_timeout
    }

    /// What [`Self::heartbeat_timeout`] set (`None`: the check is off).
    #[must_use]
    pub fn get_heartbeat_timeout(&self) -> Option<Duration> {
        self.heartbeat_timeout
    }

    /// What [`Self::boot_timeout`] set.
    #[must_use]
    pub fn get_boot_timeout(&self) -> Duration {
        self.boot_timeout
    }

    /// What [`Self::backlog`] set.
    #[must_use]
    pub fn get_backlog(&self) -> u32 {
        self.backlog
    }

    /// What [`Self::max_connections_per_worker`] set.
    pub fn get_max_connections_per_worker(&self) -> Option<usize> {
        self.max_connections_per_worker
    }

    /// What [`Self::batch_scheduling`] set.
    #[must_use]
    pub fn get_batch_scheduling(&self) -> bool {
        self.batch_scheduling
    }

    /// What [`Self::backoff`] set: the first delay and the longest.
    #[must_use]
    pub fn get_backoff(&self) -> (Duration, Duration) {
        (self.backoff_initial, self.backoff_max)
    }

    /// What [`Self::healthy_after`] set.
    #[must_use]
    pub fn get_healthy_after(&self) -> Duration {
        self.healthy_after
    }

    /// What [`Self::crash_loop`] set: the crashes and the window they count within.
    #[must_use]
    pub fn get_crash_loop(&self) -> (usize, Duration) {
        (self.crash_loop_failures, self.crash_loop_window)
    }

    /// What [`Self::fatal_exit_code`] set (`None`: every crash is restarted).
    #[must_use]
    pub fn get_fatal_exit_code(&self) -> Option<i32> {
        self.fatal_exit_code
    }

    /// What [`Self::retry_bind_errors`] set.
    #[must_use]
    pub fn get_retry_bind_errors(&self) -> bool {
        self.retry_bind_errors
    }

    /// What [`Self::hand_back`] set.
    #[must_use]
    pub fn get_hand_back(&self) -> bool {
        self.hand_back
    }

    /// What [`Self::wait_ready`] set.
    #[must_use]
    pub fn get_wait_ready(&self) -> bool {
        self.wait_ready
    }

    /// What [`Self::metrics_addr`] set, if anything.
    #[must_use]
    pub fn get_metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_addr
    }

    /// What [`Self::control_socket`] set, if anything.
    #[must_use]
    pub fn get_control_socket(&self) -> Option<&std::path::Path> {
        self.control_socket.as_deref()
    }

    /// What [`Self::env_overrides`] set.
    #[must_use]
    pub fn get_env_overrides(&self) -> bool {
        self.env_overrides
    }

    /// [`Self::shutdown_delay`]; `None` when it was not set (the default then depends on where
    /// the program runs: 5 s in a Kubernetes pod, else 0).
    #[must_use]
    pub fn get_shutdown_delay(&self) -> Option<Duration> {
        self.shutdown_delay
    }

    /// [`Self::workers_follow_cpu_limit`].
    #[must_use]
    pub fn get_workers_follow_cpu_limit(&self) -> bool {
        self.workers_follow_cpu_limit
    }

    /// Whether the supervisor keeps as many workers as the CPU limit allows, re-reading it every
    /// [`CPU_LIMIT_PERIOD`] (default: off). The cgroup's quota is what a container's CPU limit
    /// sets, and Kubernetes can change it under a running pod (an in-place resize); the count
    /// is the quota rounded down (at least 1), bounded by the CPU affinity and the host's CPUs,
    /// and changes like any scaling (new workers start, removed ones drain). A pod with CPU
    /// requests but no limit sees the whole node: set [`Self::workers`] (`CLUSTER_WORKERS`)
    /// there instead. `CLUSTER_WORKERS_FOLLOW_CPU_LIMIT=1` turns it on.
    pub fn workers_follow_cpu_limit(mut self, follow: bool) -> Self {
        self.workers_follow_cpu_limit = follow;
        self
    }

    /// How many workers run by default, and why: [`Self::workers`], else one per CPU this
    /// process may use (the cgroup's CPU quota, the CPU affinity, or the host's CPUs).
    pub(crate) fn worker_count_and_source(&self) -> (usize, String) {
        match self.workers {
            Some(workers) if self.from_env.contains(&crate::env::WORKERS) => {
                (workers, crate::env::WORKERS.to_owned())
            }
            Some(workers) => (workers, "code".to_owned()),
            None => {
                let cpus = crate::cgroup::available();
                (cpus.count, format!("one per CPU: {}", cpus.source))
            }
        }
    }

    /// Every setting in force, as a person reads it, with where it came from: the `CLUSTER_*`
    /// variable that set it, `default`, or `code` (a value other than the default, set by the
    /// program). What the startup line, `CLUSTER_CHECK_CONFIG=1` and the control socket's status
    /// show.
    pub(crate) fn in_force(&self) -> Vec<InForce> {
        use crate::env;
        let defaults = Self::new();
        let from = |variable: Option<&'static str>, is_default: bool| -> String {
            match variable {
                Some(variable) if self.from_env.contains(&variable) => variable.to_owned(),
                _ if is_default => "default".to_owned(),
                _ => "code".to_owned(),
            }
        };
        let on = |on: bool| if on { "on" } else { "off" }.to_owned();
        let or_none = |value: Option<String>| value.unwrap_or_else(|| "none".to_owned());
        let (workers, workers_from) = self.worker_count_and_source();
        let (delay, delay_from) = self.shutdown_delay_in_force();
        let mut list = vec![InForce::new("workers", workers.to_string(), workers_from)];
        let mut add = |name: &'static str, value: String, source: String| {
            list.push(InForce::new(name, value, source));
        };
        let policy = match self.policy {
            SchedulingPolicy::RoundRobin => "rr",
            SchedulingPolicy::LeastOutstanding => "least-outstanding",
            SchedulingPolicy::Shared => "none",
        };
        add(
            "policy",
            policy.to_owned(),
            from(Some(env::SCHED_POLICY), self.policy == defaults.policy),
        );
        add(
            "window",
            self.window.to_string(),
            from(Some(env::HANDOFF_WINDOW), self.window == defaults.window),
        );
        let timeouts = [
            (
                "handoff_timeout",
                env::HANDOFF_TIMEOUT,
                self.handoff_timeout,
                defaults.handoff_timeout,
            ),
            (
                "disconnect_timeout",
                env::DISCONNECT_TIMEOUT,
                self.disconnect_timeout,
                defaults.disconnect_timeout,
            ),
            (
                "boot_timeout",
                env::BOOT_TIMEOUT,
                self.boot_timeout,
                defaults.boot_timeout,
            ),
        ];
        for (name, variable, value, default) in timeouts {
            add(
                name,
                Shown(value).to_string(),
                from(Some(variable), value == default),
            );
        }
        add(
            "heartbeat_timeout",
            self.heartbeat_timeout
                .map_or_else(|| "off".to_owned(), |t| Shown(t).to_string()),
            from(
                Some(env::HEARTBEAT_TIMEOUT),
                self.heartbeat_timeout == defaults.heartbeat_timeout,
            ),
        );
        let delay_from = if self.from_env.contains(&env::SHUTDOWN_DELAY) {
            env::SHUTDOWN_DELAY.to_owned()
        } else if delay_from == "set" {
            "code".to_owned()
        } else {
            delay_from.to_owned()
        };
        add("shutdown_delay", Shown(delay).to_string(), delay_from);
        add(
            "metrics_addr",
            or_none(self.metrics_addr.map(|a| a.to_string())),
            from(Some(env::METRICS_ADDR), self.metrics_addr.is_none()),
        );
        add(
            "control_socket",
            or_none(
                self.control_socket
                    .as_ref()
                    .map(|p| p.display().to_string()),
            ),
            from(Some(env::CONTROL_SOCKET), self.control_socket.is_none()),
        );
        add(
            "batch_scheduling",
            on(self.batch_scheduling),
            from(
                Some(env::BATCH_SCHEDULING),
                self.batch_scheduling == defaults.batch_scheduling,
            ),
        );
        add(
            "workers_follow_cpu_limit",
            on(self.workers_follow_cpu_limit),
            from(
                Some(env::WORKERS_FOLLOW_CPU_LIMIT),
                !self.workers_follow_cpu_limit,
            ),
        );
        add(
            "max_connections_per_worker",
            self.max_connections_per_worker
                .map_or_else(|| "off".to_owned(), |n| n.to_string()),
            from(
                Some(env::MAX_CONNECTIONS_PER_WORKER),
                self.max_connections_per_worker.is_none(),
            ),
        );
        add(
            "hand_back",
            on(self.hand_back),
            from(Some(env::HAND_BACK), self.hand_back == defaults.hand_back),
        );
        add(
            "max_requests",
            self.max_requests.map_or_else(
                || "off".to_owned(),
                |(n, jitter)| {
                    if jitter == 0 {
                        n.to_string()
                    } else {
                        format!("{n}+{jitter}")
                    }
                },
            ),
            from(Some(env::MAX_REQUESTS), self.max_requests.is_none()),
        );
        add(
            "max_memory",
            self.max_memory
                .map_or_else(|| "off".to_owned(), |bytes| format!("{bytes}B")),
            from(Some(env::MAX_MEMORY), self.max_memory.is_none()),
        );
        // Set in code only.
        let flavor = match self.flavor {
            Flavor::CurrentThread => "current_thread",
            Flavor::MultiThread => "multi_thread",
        };
        add(
            "flavor",
            flavor.to_owned(),
            from(None, self.flavor == defaults.flavor),
        );
        add(
            "wait_ready",
            on(self.wait_ready),
            from(None, !self.wait_ready),
        );
        add(
            "max_queued",
            self.max_queued.to_string(),
            from(None, self.max_queued == defaults.max_queued),
        );
        add(
            "backlog",
            self.backlog.to_string(),
            from(None, self.backlog == defaults.backlog),
        );
        add(
            "backoff",
            format!(
                "{} to {}",
                Shown(self.backoff_initial),
                Shown(self.backoff_max)
            ),
            from(
                None,
                (self.backoff_initial, self.backoff_max)
                    == (defaults.backoff_initial, defaults.backoff_max),
            ),
        );
        add(
            "crash_loop",
            format!(
                "{} crashes in {}",
                self.crash_loop_failures,
                Shown(self.crash_loop_window)
            ),
            from(
                None,
                (self.crash_loop_failures, self.crash_loop_window)
                    == (defaults.crash_loop_failures, defaults.crash_loop_window),
            ),
        );
        add(
            "fatal_exit_code",
            or_none(self.fatal_exit_code.map(|c| c.to_string())),
            from(None, self.fatal_exit_code == defaults.fatal_exit_code),
        );
        add(
            "retry_bind_errors",
            on(self.retry_bind_errors),
            from(None, !self.retry_bind_errors),
        );
        add(
            "exec",
            self.exec
                .as_ref()
                .map_or_else(|| "this program".to_owned(), |p| p.display().to_string()),
            from(None, self.exec.is_none()),
        );
        list
    }

    /// Checks the settings against each other and against their bounds.
    ///
    /// # Errors
    ///
    /// The first setting out of its range, or two that contradict each other.
    pub fn validate(&self) -> Result<(), SettingsError> {
        if let Some(workers) = self.workers
            && workers > MAX_WORKERS
        {
            return Err(SettingsError::out_of_range(
                "workers",
                workers,
                "from 0 to 1024",
            ));
        }
        if let Some(threads) = self.worker_threads {
            if self.flavor != Flavor::MultiThread {
                return Err(SettingsError::WorkerThreadsNeedMultiThread);
            }
            check_range("worker_threads", threads, 1, 4096)?;
        }
        check_range("window", self.window, 1, MAX_WINDOW)?;
        check_range("max_queued", self.max_queued, 1, 1 << 20)?;
        if let Some(cap) = self.max_connections_per_worker {
            check_range(
                "max_connections_per_worker",
                cap,
                1,
                MAX_CONNECTIONS_PER_WORKER,
            )?;
        }
        check_range("backlog", self.backlog as usize, 1, i32::MAX as usize)?;
        check_range("crash_loop failures", self.crash_loop_failures, 1, 1000)?;
        for (setting, timeout) in [
            ("handoff_timeout", self.handoff_timeout),
            ("disconnect_timeout", self.disconnect_timeout),
            ("boot_timeout", self.boot_timeout),
            ("backoff initial", self.backoff_initial),
            ("backoff max", self.backoff_max),
            ("healthy_after", self.healthy_after),
            ("crash_loop window", self.crash_loop_window),
        ] {
            check_timeout(setting, timeout, Duration::from_millis(1))?;
        }
        if let Some(timeout) = self.heartbeat_timeout {
            check_timeout("heartbeat_timeout", timeout, MIN_HEARTBEAT_TIMEOUT)?;
        }
        if let Some(delay) = self.shutdown_delay {
            check_timeout("shutdown_delay", delay, Duration::ZERO)?;
        }
        if self.backoff_initial > self.backoff_max {
            return Err(SettingsError::BackoffInverted {
                initial: self.backoff_initial,
                max: self.backoff_max,
            });
        }
        if let Some(path) = &self.control_socket
            && !is_socket_path(path)
        {
            return Err(SettingsError::ControlSocket { path: path.clone() });
        }
        if let Some((requests, jitter)) = self.max_requests {
            if requests == 0 || requests.checked_add(jitter).is_none() {
                return Err(SettingsError::out_of_range(
                    "max_requests",
                    format_args!("{requests} + {jitter}"),
                    "at least 1 connection, and a sum below 2^64",
                ));
            }
            if self.policy != SchedulingPolicy::RoundRobin {
                return Err(SettingsError::MaxRequestsNeedRoundRobin);
            }
        }
        if let Some(bytes) = self.max_memory
            && bytes < MIN_MAX_MEMORY
        {
            return Err(SettingsError::out_of_range(
                "max_memory",
                format_args!("{bytes} bytes"),
                "at least 1 MiB",
            ));
        }
        Ok(())
    }

    pub(crate) fn supervisor_config(&self) -> SupervisorConfig {
        let mut config = SupervisorConfig::default();
        config.backoff_initial = self.backoff_initial;
        config.backoff_max = self.backoff_max;
        config.healthy_after = self.healthy_after;
        config.crash_loop_failures = self.crash_loop_failures;
        config.crash_loop_window = self.crash_loop_window;
        config.fatal_exit_code = self.fatal_exit_code;
        config.boot_timeout = Some(self.boot_timeout);
        config.wait_ready = self.wait_ready;
        config.retry_bind_errors = self.retry_bind_errors;
        config.max_workers = MAX_WORKERS;
        config.max_requests = self.max_requests.map(|(requests, _)| requests);
        config.max_requests_jitter = self.max_requests.map_or(0, |(_, jitter)| jitter);
        config.max_memory = self.max_memory;
        config
    }

    /// Whether the primary should switch its thread to `SCHED_BATCH`: only round robin has work
    /// to batch.
    pub(crate) fn wants_batch_scheduling(&self) -> bool {
        self.batch_scheduling && self.policy != SchedulingPolicy::Shared
    }

    pub(crate) fn core_config(&self) -> proto::Config {
        let mut config = proto::Config::default();
        config.registry.policy = self.policy;
        config.registry.window = self.window;
        config.registry.max_queued = self.max_queued;
        config.registry.max_connections_per_worker =
            self.max_connections_per_worker.and_then(NonZeroUsize::new);
        config.handoff_timeout = self.handoff_timeout;
        config.heartbeat_timeout = self.heartbeat_timeout;
        config
    }

    /// The Tokio runtime of a worker (or of an unclustered run).
    pub(crate) fn worker_runtime(&self) -> std::io::Result<tokio::runtime::Runtime> {
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

/// One setting in force ([`Settings::in_force`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct InForce {
    /// As its builder method is named.
    pub(crate) name: &'static str,
    /// As a person reads it, in the form its `CLUSTER_*` variable takes when it has one.
    pub(crate) value: String,
    /// A variable's name, `code`, `default`, or how a default was found.
    pub(crate) source: String,
}

impl InForce {
    fn new(name: &'static str, value: String, source: String) -> Self {
        Self {
            name,
            value,
            source,
        }
    }
}

/// A duration as a person reads it, in the form the `CLUSTER_*` variables take: `30s`, `500ms`,
/// `2m`, `1h` (and `0`); under a millisecond, in microseconds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Shown(pub(crate) Duration);

impl fmt::Display for Shown {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let duration = self.0;
        if duration.is_zero() {
            return f.write_str("0");
        }
        if !duration.subsec_nanos().is_multiple_of(1_000_000) {
            return write!(f, "{}µs", duration.as_micros());
        }
        let millis = duration.as_millis();
        match millis {
            m if m.is_multiple_of(3_600_000) => write!(f, "{}h", m / 3_600_000),
            m if m.is_multiple_of(60_000) => write!(f, "{}m", m / 60_000),
            m if m.is_multiple_of(1000) => write!(f, "{}s", m / 1000),
            m => write!(f, "{m}ms"),
        }
    }
}

/// An absolute path with a file name and no NUL byte.
pub(crate) fn is_socket_path(path: &std::path::Path) -> bool {
    use std::os::unix::ffi::OsStrExt;
    path.is_absolute() && path.file_name().is_some() && !path.as_os_str().as_bytes().contains(&0)
}

fn check_range(
    setting: &'static str,
    value: usize,
    min: usize,
    max: usize,
) -> Result<(), SettingsError> {
    if (min..=max).contains(&value) {
        Ok(())
    } else {
        Err(SettingsError::out_of_range(
            setting,
            value,
            format!("from {min} to {max}"),
        ))
    }
}

fn check_timeout(
    setting: &'static str,
    value: Duration,
    min: Duration,
) -> Result<(), SettingsError> {
    if (min..=MAX_TIMEOUT).contains(&value) {
        Ok(())
    } else {
        Err(SettingsError::out_of_range(
            setting,
            Shown(value),
            format_args!("from {} to 24h", Shown(min)),
        ))
    }
}

/// Settings a cluster cannot run with.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SettingsError {
    /// A setting is out of its range.
    #[error("`{setting}` = {value} is out of range: expected {accepted}")]
    OutOfRange {
        /// The setting, as its builder method is named.
        setting: &'static str,
        /// Its value.
        value: String,
        /// What it accepts.
        accepted: String,
    },
    /// [`Settings::worker_threads`] was set for a current-thread worker runtime.
    #[error(
        "`worker_threads` needs the multi-thread worker runtime (`flavor(Flavor::MultiThread)`)"
    )]
    WorkerThreadsNeedMultiThread,
    /// [`Settings::max_requests`] was set with shared sockets, where the primary hands out no
    /// connection to count.
    #[error(
        "`max_requests` counts the connections the primary hands out, which only round robin does \
         (`policy(SchedulingPolicy::RoundRobin)`, `CLUSTER_SCHED_POLICY=rr`)"
    )]
    MaxRequestsNeedRoundRobin,
    /// The control socket's path is not an absolute path to a file.
    #[error("the control socket {} is not an absolute path to a file", path.display())]
    ControlSocket {
        /// The path.
        path: PathBuf,
    },
    /// The first backoff is longer than the longest.
    #[error(
        "the first restart backoff ({}) is longer than the longest ({})",
        Shown(*initial),
        Shown(*max)
    )]
    BackoffInverted {
        /// The first backoff.
        initial: Duration,
        /// The longest.
        max: Duration,
    },
    /// More workers than this user may start processes (`RLIMIT_NPROC`, as `ulimit -u` and
    /// systemd's `LimitNPROC=` set it).
    #[error(
        "{workers} workers need {workers} more processes, but this user may start only \
         {available} more (RLIMIT_NPROC is {limit}, {running} running)"
    )]
    ProcessLimit {
        /// The workers asked for.
        workers: usize,
        /// The processes this user may still start.
        available: u64,
        /// The limit.
        limit: u64,
        /// This user's processes (and threads) running now.
        running: u64,
    },
}

impl SettingsError {
    pub(crate) fn out_of_range(
        setting: &'static str,
        value: impl fmt::Display,
        accepted: impl fmt::Display,
    ) -> Self {
        Self::OutOfRange {
            setting,
            value: value.to_string(),
            accepted: accepted.to_string(),
        }
    }
}

impl From<SettingsError> for std::io::Error {
    fn from(error: SettingsError) -> Self {
        Self::new(std::io::ErrorKind::InvalidInput, error)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_builder_reads_back() {
        let settings = Settings::new()
            .workers(3)
            .flavor(Flavor::MultiThread)
            .worker_threads(2)
            .exec("/bin/true")
            .args(["a"])
            .env("K", "V")
            .cwd("/tmp")
            .silent(true)
            .policy(SchedulingPolicy::Shared)
            .window(5)
            .max_queued(7)
            .max_connections_per_worker(64)
            .handoff_timeout(Duration::from_secs(1))
            .disconnect_timeout(Duration::from_secs(2))
            .heartbeat_timeout(None)
            .boot_timeout(Duration::from_secs(3))
            .backlog(9)
            .batch_scheduling(false)
            .backoff(Duration::from_secs(4), Duration::from_secs(5))
            .healthy_after(Duration::from_secs(6))
            .crash_loop(2, Duration::from_secs(7))
            .fatal_exit_code(None)
            .retry_bind_errors(true)
            .wait_ready(true)
            .metrics_addr("127.0.0.1:1".parse::<SocketAddr>().unwrap())
            .control_socket(PathBuf::from("/run/c.sock"))
            .env_overrides(false)
            .max_requests(100, 10)
            .max_memory(512 << 20);
        assert_eq!(settings.get_workers(), Some(3));
        assert_eq!(settings.get_flavor(), Flavor::MultiThread);
        assert_eq!(settings.get_worker_threads(), Some(2));
        assert_eq!(settings.get_exec(), Some(std::path::Path::new("/bin/true")));
        assert_eq!(settings.get_args(), Some(&[OsString::from("a")][..]));
        assert_eq!(
            settings.get_env().collect::<Vec<_>>(),
            [(std::ffi::OsStr::new("K"), std::ffi::OsStr::new("V"))]
        );
        assert_eq!(settings.get_cwd(), Some(std::path::Path::new("/tmp")));
        assert!(settings.get_silent());
        assert_eq!(settings.get_policy(), SchedulingPolicy::Shared);
        assert_eq!(settings.get_window(), 5);
        assert_eq!(settings.get_max_queued(), 7);
        assert_eq!(settings.get_max_connections_per_worker(), Some(64));
        assert_eq!(settings.get_handoff_timeout(), Duration::from_secs(1));
        assert_eq!(settings.get_disconnect_timeout(), Duration::from_secs(2));
        assert_eq!(settings.get_heartbeat_timeout(), None);
        assert_eq!(settings.get_boot_timeout(), Duration::from_secs(3));
        assert_eq!(settings.get_backlog(), 9);
        assert!(!settings.get_batch_scheduling());
        assert_eq!(
            settings.get_backoff(),
            (Duration::from_secs(4), Duration::from_secs(5))
        );
        assert_eq!(settings.get_healthy_after(), Duration::from_secs(6));
        assert_eq!(settings.get_crash_loop(), (2, Duration::from_secs(7)));
        assert_eq!(settings.get_fatal_exit_code(), None);
        assert!(settings.get_retry_bind_errors());
        assert!(settings.get_wait_ready());
        assert_eq!(settings.get_metrics_addr(), "127.0.0.1:1".parse().ok());
        assert_eq!(
            settings.get_control_socket(),
            Some(std::path::Path::new("/run/c.sock"))
        );
        assert!(!settings.get_env_overrides());
        assert!(Settings::new().get_env_overrides());
        assert_eq!(settings.get_max_requests(), Some((100, 10)));
        assert_eq!(settings.get_max_memory(), Some(512 << 20));
        let config = settings.supervisor_config();
        assert_eq!(
            (
                config.max_requests,
                config.max_requests_jitter,
                config.max_memory
            ),
            (Some(100), 10, Some(512 << 20))
        );
        assert_eq!(Settings::new().get_max_requests(), None);
        assert_eq!(Settings::new().get_max_memory(), None);
    }

    #[test]
    fn durations_read_as_the_variables_take_them() {
        let shown = |d: Duration| Shown(d).to_string();
        assert_eq!(shown(Duration::ZERO), "0");
        assert_eq!(shown(Duration::from_millis(500)), "500ms");
        assert_eq!(shown(Duration::from_millis(1500)), "1500ms");
        assert_eq!(shown(Duration::from_secs(30)), "30s");
        assert_eq!(shown(Duration::from_secs(120)), "2m");
        assert_eq!(shown(Duration::from_secs(7200)), "2h");
        assert_eq!(shown(Duration::from_micros(1500)), "1500µs");
    }

    #[test]
    fn the_defaults_are_valid() {
        assert_eq!(Settings::new().validate(), Ok(()));
    }

    #[test]
    fn contradictions_and_ranges_are_refused() {
        let refused = |settings: Settings| settings.validate().unwrap_err();
        assert!(matches!(
            refused(Settings::new().boot_timeout(Duration::ZERO)),
            SettingsError::OutOfRange {
                setting: "boot_timeout",
                ..
            }
        ));
        assert!(matches!(
            refused(Settings::new().workers(MAX_WORKERS + 1)),
            SettingsError::OutOfRange {
                setting: "workers",
                ..
            }
        ));
        // A cap of 0 would serve nothing.
        assert!(matches!(
            refused(Settings::new().max_connections_per_worker(0)),
            SettingsError::OutOfRange {
                setting: "max_connections_per_worker",
                ..
            }
        ));
        assert!(matches!(
            refused(Settings::new().window(0)),
            SettingsError::OutOfRange {
                setting: "window",
                ..
            }
        ));
        assert!(matches!(
            refused(Settings::new().heartbeat_timeout(Duration::from_secs(1))),
            SettingsError::OutOfRange {
                setting: "heartbeat_timeout",
                ..
            }
        ));
        assert!(matches!(
            refused(Settings::new().disconnect_timeout(Duration::from_secs(2 * 86_400))),
            SettingsError::OutOfRange {
                setting: "disconnect_timeout",
                ..
            }
        ));
        assert_eq!(
            refused(Settings::new().worker_threads(4)),
            SettingsError::WorkerThreadsNeedMultiThread
        );
        assert!(matches!(
            refused(Settings::new().backoff(Duration::from_secs(2), Duration::from_secs(1))),
            SettingsError::BackoffInverted { .. }
        ));
        for (requests, jitter) in [(0, 0), (u64::MAX, 1)] {
            assert!(matches!(
                refused(Settings::new().max_requests(requests, jitter)),
                SettingsError::OutOfRange {
                    setting: "max_requests",
                    ..
                }
            ));
        }
        assert_eq!(
            refused(
                Settings::new()
                    .max_requests(100, 0)
                    .policy(SchedulingPolicy::Shared)
            ),
            SettingsError::MaxRequestsNeedRoundRobin
        );
        assert!(matches!(
            refused(Settings::new().max_memory(MIN_MAX_MEMORY - 1)),
            SettingsError::OutOfRange {
                setting: "max_memory",
                ..
            }
        ));
        assert!(
            Settings::new()
                .max_requests(1, u64::MAX - 1)
                .max_memory(MIN_MAX_MEMORY)
                .validate()
                .is_ok()
        );
        assert!(
            Settings::new()
                .flavor(Flavor::MultiThread)
                .worker_threads(4)
                .heartbeat_timeout(None)
                .workers(0)
                .validate()
                .is_ok()
        );
    }
}
