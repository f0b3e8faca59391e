//! The cluster where services run in containers: the shutdown delay that replaces a `preStop`
//! sleep (`/readyz` fails at once on SIGTERM, the cluster serves on for the delay, then drains),
//! and the primary as a reaper of orphans, as a child subreaper and as PID 1 of a pid namespace.

mod support;

use std::time::{Duration, Instant};

use support::program::{Program, WAIT, endpoint_port, free_port, get, wait_readyz};

/// `http_fixture` with two workers, its endpoint on a free port and the shutdown delay given;
/// returns it with the endpoint's port and the workers' port once both listen and `/readyz`
/// says ready.
fn start(delay: &str) -> (Program, u16, u16) {
    let (program, endpoint, app, _) = start_with_pids(delay);
    (program, endpoint, app)
}

/// As [`start`], with the workers' pids.
fn start_with_pids(delay: &str) -> (Program, u16, u16, Vec<u32>) {
    let mut program = Program::start(
        env!("CARGO_BIN_EXE_http_fixture"),
        &[
            ("CLUSTER_WORKERS", "2"),
            ("CLUSTER_METRICS_ADDR", "127.0.0.1:0"),
            ("CLUSTER_SHUTDOWN_DELAY", delay),
            ("RUST_LOG", "info"),
        ],
    );
    let (_, first, app) = program.worker();
    let (_, second, _) = program.worker();
    let endpoint = endpoint_port(&program);
    wait_readyz(endpoint, 200);
    (program, endpoint, app, vec![first, second])
}

#[test]
fn on_sigterm_readyz_fails_at_once_and_the_cluster_serves_through_the_delay() {
    let delay = Duration::from_secs(3);
    let (mut program, endpoint, app) = start("3s");
    program.signal(libc::SIGTERM);
    let signalled = Instant::now();
    wait_readyz(endpoint, 503);
    let unready_after = signalled.elapsed();
    // Connections that a load balancer still sends meanwhile are all served.
    let mut served = 0;
    while signalled.elapsed() < delay / 2 {
        let (status, body) = get(app, "/").expect("served during the delay");
        assert_eq!(status, 200, "{body}");
        served += 1;
    }
    assert!(program.is_running(), "still serving during the delay");
    let status = program.wait();
    let stopped_after = signalled.elapsed();
    assert!(status.success(), "{status:?}: {}", program.stderr());
    assert!(
        stopped_after >= delay,
        "stopped {stopped_after:?} after SIGTERM, within the delay"
    );
    let log = program.stderr();
    assert!(
        log.contains("the shutdown delay is over: draining"),
        "{log}"
    );
    eprintln!(
        "/readyz failed {unready_after:?} after SIGTERM; {served} requests served during the \
         delay; stopped {stopped_after:?} after SIGTERM"
    );
}

#[test]
fn a_second_sigterm_skips_the_rest_of_the_delay() {
    let (mut program, endpoint, app) = start("10m");
    program.signal(libc::SIGTERM);
    wait_readyz(endpoint, 503);
    assert_eq!(get(app, "/").unwrap().0, 200, "serving during the delay");
    program.signal(libc::SIGTERM);
    // Bounded by WAIT, far below the ten minutes of the delay.
    let status = program.wait();
    assert!(status.success(), "{status:?}: {}", program.stderr());
    assert!(
        program
            .stderr()
            .contains("the rest of the shutdown delay skipped")
    );
}

#[test]
fn a_malformed_shutdown_delay_stops_the_program_naming_it() {
    for bad in ["5", "-1s", "5 s", "25h", ""] {
        let mut program = Program::start(
            env!("CARGO_BIN_EXE_http_fixture"),
            &[("CLUSTER_WORKERS", "1"), ("CLUSTER_SHUTDOWN_DELAY", bad)],
        );
        let status = program.wait();
        assert_eq!(status.code(), Some(78), "{bad:?}: {}", program.stderr());
        // The line names the variable and the value (read as the pipe delivers it).
        program.wait_for_log(&format!("CLUSTER_SHUTDOWN_DELAY={bad:?}"));
    }
}

/// A process's state letter, parent and pid namespace, from `/proc`.
fn proc_entry(pid: u32) -> Option<(char, u32, String)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (_, rest) = stat.rsplit_once(')')?;
    let mut fields = rest.split_whitespace();
    let state = fields.next()?.chars().next()?;
    let parent = fields.next()?.parse().ok()?;
    let namespace = std::fs::read_link(format!("/proc/{pid}/ns/pid"))
        .ok()?
        .to_string_lossy()
        .into_owned();
    Some((state, parent, namespace))
}

/// Every process on the machine, as (pid, state, parent, pid namespace).
fn processes() -> Vec<(u32, char, u32, String)> {
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|entry| entry.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(|pid| {
            let (state, parent, namespace) = proc_entry(pid)?;
            Some((pid, state, parent, namespace))
        })
        .collect()
}

#[test]
fn orphans_a_worker_leaves_behind_are_reaped_and_workers_exits_still_seen() {
    let (mut program, _, app, workers) = start_with_pids("0");
    let primary = program.pid();
    let (status, body) = get(app, "/abandon/1000").unwrap();
    assert_eq!(status, 200, "{body}");
    // The orphans still alive are the primary's children now, not init's.
    let orphans = processes()
        .iter()
        .filter(|(pid, _, parent, _)| *parent == primary && !workers.contains(pid))
        .count();
    assert!(orphans > 0, "no orphan came to the primary");
    // Once they exit, none stays a zombie: every child of the primary is a worker again.
    let deadline = Instant::now() + WAIT;
    loop {
        let left: Vec<_> = processes()
            .into_iter()
            .filter(|(pid, _, parent, _)| *parent == primary && !workers.contains(pid))
            .collect();
        if left.is_empty() {
            break;
        }
        let zombies = left.iter().filter(|(_, state, ..)| *state == 'Z').count();
        assert!(
            Instant::now() < deadline,
            "{} orphans left, {zombies} of them zombies",
            left.len()
        );
        std::thread::yield_now();
    }
    eprintln!("1000 abandoned: {orphans} came to the primary alive; all reaped");
    // A worker's exit is still the primary's to see: a SIGKILL is a kill from outside.
    cluster_tests::signal(workers[0], libc::SIGKILL).unwrap();
    program.wait_for_log("worker killed from outside; restarting it");
    assert!(!program.stderr().contains("waiting for worker failed"));
    program.signal(libc::SIGTERM);
    assert!(program.wait().success(), "{}", program.stderr());
}

#[test]
fn as_pid_1_of_a_pid_namespace_it_reaps_every_orphan_and_stops_cleanly() {
    let probe = std::process::Command::new("unshare")
        .args(["--pid", "--fork", "--mount-proc", "--kill-child", "true"])
        .output();
    match probe {
        Ok(output) if output.status.success() => {}
        Ok(output) => {
            eprintln!(
                "skipped: cannot make a pid namespace here (unshare: {})",
                String::from_utf8_lossy(&output.stderr).trim()
            );
            return;
        }
        Err(error) => {
            eprintln!("skipped: unshare cannot be run ({error})");
            return;
        }
    }
    let app = free_port();
    let addr = format!("127.0.0.1:{app}");
    // Worker lines carry the namespace's pids: the test reads none of them (`Program` would
    // take them for the machine's), and `--kill-child` takes the namespace down with `unshare`.
    let mut program = Program::start_with(
        "unshare",
        &[
            ("CLUSTER_WORKERS", "2"),
            ("CLUSTER_METRICS_ADDR", "127.0.0.1:0"),
            ("ADDR", addr.as_str()),
            ("RUST_LOG", "info"),
        ],
        |command| {
            command
                .args(["--pid", "--fork", "--mount-proc", "--kill-child"])
                .arg(env!("CARGO_BIN_EXE_http_fixture"));
        },
    );
    let endpoint = endpoint_port(&program);
    wait_readyz(endpoint, 200);
    let unshare = program.pid();
    let (primary, _, namespace) = processes()
        .into_iter()
        .find(|(_, _, parent, _)| *parent == unshare)
        .map(|(pid, state, _, namespace)| (pid, state, namespace))
        .expect("the namespace's init");
    let (status, body) = get(app, "/abandon/1000").unwrap();
    assert_eq!(status, 200, "{body}");
    let in_namespace = |ns: &str| ns == namespace;
    // Until the orphans are gone: the primary and its two workers are all that is left.
    let deadline = Instant::now() + WAIT;
    loop {
        let left: Vec<_> = processes()
            .into_iter()
            .filter(|(_, _, _, ns)| in_namespace(ns))
            .collect();
        let zombies = left.iter().filter(|(_, state, ..)| *state == 'Z').count();
        if left.len() == 3 && zombies == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{} processes in the namespace, {zombies} zombies",
            left.len()
        );
        std::thread::yield_now();
    }
    cluster_tests::signal(primary, libc::SIGTERM).unwrap();
    let status = program.wait();
    assert!(status.success(), "{status:?}: {}", program.stderr());
    program.wait_for_log("cluster stopped");
    assert!(
        processes().iter().all(|(_, _, _, ns)| !in_namespace(ns)),
        "processes outlived the namespace's init"
    );
}

/// `http_fixture` started inside the cgroup whose `cgroup.procs` is `procs`: a shell moves
/// itself there, then execs the program.
fn start_in_cgroup(procs: &std::path::Path, env: &[(&str, &str)]) -> Program {
    Program::start_with("sh", env, |command| {
        command
            .arg("-c")
            .arg(r#"echo $$ > "$1" && exec "$0""#)
            .arg(env!("CARGO_BIN_EXE_http_fixture"))
            .arg(procs);
    })
}

/// A cgroup of its own with a CPU quota, removed on drop (after what ran in it is gone).
struct CpuCgroup {
    dir: std::path::PathBuf,
    v2: bool,
}

impl CpuCgroup {
    /// A new cgroup under the root of the `cpu` hierarchy (v1) or of the unified one (v2);
    /// `Err` says why there cannot be one here.
    fn new() -> Result<Self, String> {
        let name = format!("cluster-test-{}", std::process::id());
        let v1 = std::path::Path::new("/sys/fs/cgroup/cpu");
        let (dir, v2) = if v1.join("cpu.cfs_quota_us").exists() {
            (v1.join(name), false)
        } else if std::fs::read_to_string("/sys/fs/cgroup/cgroup.subtree_control")
            .is_ok_and(|controllers| controllers.split_whitespace().any(|c| c == "cpu"))
        {
            (std::path::Path::new("/sys/fs/cgroup").join(name), true)
        } else {
            return Err("no cgroup hierarchy with the cpu controller".to_owned());
        };
        std::fs::create_dir(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        Ok(Self { dir, v2 })
    }

    fn set_cpus(&self, cpus: u32) {
        let quota = u64::from(cpus) * 100_000;
        if self.v2 {
            std::fs::write(self.dir.join("cpu.max"), format!("{quota} 100000")).unwrap();
        } else {
            std::fs::write(self.dir.join("cpu.cfs_period_us"), "100000").unwrap();
            std::fs::write(self.dir.join("cpu.cfs_quota_us"), quota.to_string()).unwrap();
        }
    }
}

impl Drop for CpuCgroup {
    fn drop(&mut self) {
        // Its processes were killed with their `Program`: a moment for the kernel to let go.
        let deadline = Instant::now() + WAIT;
        while std::fs::remove_dir(&self.dir).is_err() && Instant::now() < deadline {
            std::thread::yield_now();
        }
    }
}

#[test]
fn workers_start_one_per_cpu_of_the_limit_and_follow_it_when_asked() {
    let cgroup = match CpuCgroup::new() {
        Ok(cgroup) => cgroup,
        Err(why) => {
            eprintln!("skipped: {why}");
            return;
        }
    };
    cgroup.set_cpus(1);
    let procs = cgroup.dir.join("cgroup.procs");
    let mut program = start_in_cgroup(
        &procs,
        &[
            ("FIXTURE_DEFAULT_WORKERS", "1"),
            ("CLUSTER_WORKERS_FOLLOW_CPU_LIMIT", "1"),
            ("RUST_LOG", "info"),
        ],
    );
    program.worker();
    program.wait_for_log("one per CPU: the cgroup's CPU quota");
    assert!(
        program.stderr().contains("workers=1"),
        "{}",
        program.stderr()
    );
    assert!(program.new_workers().is_empty(), "one worker for one CPU");
    // An in-place resize: two CPUs, two workers within a period of the follower.
    cgroup.set_cpus(2);
    program.worker();
    program.wait_for_log("the CPU limit changed");
    program.signal(libc::SIGTERM);
    assert!(program.wait().success(), "{}", program.stderr());
}

/// A memory cgroup of its own under this process's, limited, removed on drop.
struct MemoryCgroup {
    dir: std::path::PathBuf,
}

impl MemoryCgroup {
    fn new(limit_bytes: u64) -> Result<Self, String> {
        let cgroups = std::fs::read_to_string("/proc/self/cgroup").map_err(|e| e.to_string())?;
        let name = format!("cluster-oom-{}", std::process::id());
        let v1 = cgroups
            .lines()
            .find_map(|line| line.split_once(":memory:").map(|(_, path)| path.to_owned()));
        let (dir, file) = match v1 {
            Some(path) => (
                std::path::Path::new("/sys/fs/cgroup/memory")
                    .join(path.trim_start_matches('/'))
                    .join(&name),
                "memory.limit_in_bytes",
            ),
            None => {
                let path = cgroups
                    .lines()
                    .find_map(|line| line.strip_prefix("0::"))
                    .ok_or("no memory cgroup")?;
                (
                    std::path::Path::new("/sys/fs/cgroup")
                        .join(path.trim_start_matches('/'))
                        .join(&name),
                    "memory.max",
                )
            }
        };
        std::fs::create_dir(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        let cgroup = Self { dir };
        std::fs::write(cgroup.dir.join(file), limit_bytes.to_string())
            .map_err(|e| format!("cannot limit {}: {e}", cgroup.dir.display()))?;
        Ok(cgroup)
    }
}

impl Drop for MemoryCgroup {
    fn drop(&mut self) {
        let deadline = Instant::now() + WAIT;
        while std::fs::remove_dir(&self.dir).is_err() && Instant::now() < deadline {
            std::thread::yield_now();
        }
    }
}

fn oom_score_adj(pid: u32) -> i32 {
    std::fs::read_to_string(format!("/proc/{pid}/oom_score_adj"))
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

#[test]
fn the_oom_killer_takes_a_worker_not_the_primary_and_it_is_reported() {
    let cgroup = match MemoryCgroup::new(256 << 20) {
        Ok(cgroup) => cgroup,
        Err(why) => {
            eprintln!("skipped: {why}");
            return;
        }
    };
    let procs = cgroup.dir.join("cgroup.procs");
    let mut program = start_in_cgroup(
        &procs,
        &[
            ("CLUSTER_METRICS_ADDR", "127.0.0.1:0"),
            ("RUST_LOG", "info"),
        ],
    );
    let (_, first, app) = program.worker();
    let (_, second, _) = program.worker();
    let primary = oom_score_adj(program.pid());
    for worker in [first, second] {
        assert!(
            oom_score_adj(worker) > primary,
            "worker {worker}: {} <= the primary's {primary}",
            oom_score_adj(worker)
        );
    }
    // Past the limit: the kernel kills the worker that asked (it dies mid-request).
    let _ = get(app, "/allocate/512");
    program.wait_for_log("killed by the kernel's OOM killer");
    program.worker();
    assert!(program.is_running(), "the primary lives");
    let metrics = get(endpoint_port(&program), "/metrics").unwrap().1;
    assert!(
        metrics.contains("cluster_worker_oom_kills_total 1"),
        "{metrics}"
    );
    program.signal(libc::SIGTERM);
    assert!(program.wait().success(), "{}", program.stderr());
}

/// A child the primary's own code starts in a process group of its own (`process_group(0)`, as
/// one shields a child from a terminal's Ctrl-C) keeps its exit status for that code: the
/// reaper takes only what workers leave behind (this primary is not PID 1).
#[tokio::test]
async fn a_child_of_the_primarys_own_code_keeps_its_exit_status() {
    use std::os::unix::process::CommandExt;
    let _cluster = support::Cluster::start(cluster::settings::SchedulingPolicy::RoundRobin);
    let mut child = std::process::Command::new("sh")
        .args(["-c", "exit 7"])
        .process_group(0)
        .spawn()
        .expect("spawn");
    // Not a synchronization: the program's code waits late on purpose, past a few of the
    // reaper's sweeps (every second, and at each SIGCHLD).
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let status = child.wait().expect("the exit status was taken");
    assert_eq!(status.code(), Some(7));
}
