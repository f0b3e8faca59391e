//! The primary as its own process: its death takes the workers with it (reference scenario 38),
//! SIGTERM drains them, only its thread runs under `SCHED_BATCH`, and a silent primary passes its
//! workers' output on.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const WAIT: Duration = Duration::from_secs(20);

/// A primary process and its workers' pids; all are killed on drop.
struct Program {
    primary: Child,
    workers: Vec<u32>,
}

impl Program {
    fn start(workers: usize) -> Self {
        Self::start_with(workers, &[])
    }

    fn start_with(workers: usize, env: &[(&str, &str)]) -> Self {
        let mut primary = Command::new(env!("CARGO_BIN_EXE_primary_fixture"))
            .env("CLUSTER_WORKERS", workers.to_string())
            .env("RUST_LOG", "warn")
            .envs(env.iter().copied())
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn the primary");
        let mut lines = BufReader::new(primary.stdout.take().unwrap()).lines();
        let mut pids = Vec::new();
        // Each worker prints one line once it listens; reading blocks at most until the primary
        // exits (EOF), and the primary exits if its workers cannot start.
        for _ in 0..workers {
            let line = lines.next().expect("a worker line").expect("read");
            let pid = line
                .split_whitespace()
                .nth(3)
                .and_then(|p| p.parse().ok())
                .expect("pid");
            pids.push(pid);
        }
        Self {
            primary,
            workers: pids,
        }
    }
}

impl Drop for Program {
    fn drop(&mut self) {
        let _ = self.primary.kill();
        let _ = self.primary.wait();
        for pid in &self.workers {
            let _ = cluster_tests::signal(*pid, libc::SIGKILL);
        }
    }
}

/// Whether `pid` is gone (no process, or a zombie nobody reaped).
fn is_gone(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rsplit(')')
            .next()
            .is_some_and(|rest| rest.trim_start().starts_with('Z')),
    }
}

fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn workers_do_not_outlive_a_killed_primary() {
    let mut program = Program::start(2);
    assert!(program.workers.iter().all(|pid| !is_gone(*pid)));
    program.primary.kill().unwrap();
    program.primary.wait().unwrap();
    let workers = program.workers.clone();
    wait_until("every worker is gone", || {
        workers.iter().all(|pid| is_gone(*pid))
    });
}

#[test]
fn sigterm_drains_workers_and_exits_zero() {
    let mut program = Program::start(2);
    cluster_tests::signal(program.primary.id(), libc::SIGTERM).unwrap();
    let status = cluster_tests::wait_for_exit(&mut program.primary, WAIT);
    assert!(status.success(), "{status:?}");
    let workers = program.workers.clone();
    wait_until("every worker is gone", || {
        workers.iter().all(|pid| is_gone(*pid))
    });
}

#[test]
fn zero_workers_runs_the_same_program_unclustered() {
    let mut primary = Command::new(env!("CARGO_BIN_EXE_primary_fixture"))
        .env("CLUSTER_WORKERS", "0")
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn");
    let mut lines = BufReader::new(primary.stdout.take().unwrap()).lines();
    let line = lines.next().expect("a line").expect("read");
    let fields: Vec<&str> = line.split_whitespace().collect();
    assert_eq!(fields[1], "0", "no worker id: {line}");
    assert_eq!(
        fields[3].parse::<u32>().unwrap(),
        primary.id(),
        "served from the process itself"
    );
    let port: u16 = fields[5].parse().unwrap();
    let mut answer = String::new();
    std::io::Read::read_to_string(
        &mut std::net::TcpStream::connect(("127.0.0.1", port)).unwrap(),
        &mut answer,
    )
    .unwrap();
    assert_eq!(answer.trim(), "0");
    cluster_tests::signal(primary.id(), libc::SIGTERM).unwrap();
    assert!(primary.wait().unwrap().success());
}

/// The scheduling policy of thread `tid` (field 41 of its `stat`).
fn policy(pid: u32, tid: u32) -> u32 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/stat")).expect("stat");
    let fields: Vec<&str> = stat
        .rsplit(')')
        .next()
        .unwrap()
        .split_whitespace()
        .collect();
    // Fields after the command start at field 3.
    fields[41 - 3].parse().expect("a policy number")
}

#[test]
fn the_primary_thread_is_batch_scheduled_under_round_robin_and_workers_are_not() {
    let batch = u32::try_from(libc::SCHED_BATCH).unwrap();
    let other = u32::try_from(libc::SCHED_OTHER).unwrap();
    let program = Program::start(2);
    let primary = program.primary.id();
    // The main thread runs the current-thread runtime, hence the driver.
    assert_eq!(policy(primary, primary), batch, "the primary's thread");
    for worker in &program.workers {
        assert_eq!(policy(*worker, *worker), other, "worker {worker}");
    }
    drop(program);

    for env in [
        [
            ("CLUSTER_BATCH_SCHEDULING", "0"),
            ("CLUSTER_SCHED_POLICY", "rr"),
        ],
        // Shared sockets leave the primary nothing to batch.
        [
            ("CLUSTER_BATCH_SCHEDULING", "1"),
            ("CLUSTER_SCHED_POLICY", "none"),
        ],
    ] {
        let program = Program::start_with(2, &env);
        let primary = program.primary.id();
        assert_eq!(policy(primary, primary), other, "{env:?}");
    }
}

#[test]
fn silent_workers_output_is_prefixed_and_complete_when_the_primary_exits_with_them() {
    const LINES: usize = 1000;
    let mut primary = Command::new(env!("CARGO_BIN_EXE_silent_fixture"))
        .env("FIXTURE_LINES", LINES.to_string())
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn the primary");
    // Bytes, not UTF-8: each worker writes one line that is not.
    let read_all = |pipe: Box<dyn std::io::Read + Send>| {
        std::thread::spawn(move || {
            BufReader::new(pipe)
                .split(b'\n')
                .map(|line| String::from_utf8_lossy(&line.expect("read")).into_owned())
                .collect::<Vec<_>>()
        })
    };
    let stdout = read_all(Box::new(primary.stdout.take().unwrap()));
    let stderr = read_all(Box::new(primary.stderr.take().unwrap()));
    let status = cluster_tests::wait_for_exit(&mut primary, WAIT);
    assert!(status.success(), "{status:?}");
    // The pipes close when the primary and its workers are gone (bounded by the exit above).
    let (stdout, stderr) = (stdout.join().unwrap(), stderr.join().unwrap());
    for worker in [1, 2] {
        let raw = format!("[worker {worker}] raw {worker} \u{fffd}");
        assert!(stdout.contains(&raw), "no {raw:?} in the output");
        // A JSON line stays JSON, attributed by a field.
        let json = stdout
            .iter()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .find(|v| v["id"] == worker)
            .unwrap_or_else(|| panic!("no JSON line of worker {worker}"));
        assert_eq!(json["cluster_worker"], worker, "{json}");
        assert_eq!(json["msg"], "json", "{json}");
    }
    let stdout: Vec<String> = stdout
        .into_iter()
        .filter(|l| !l.contains(" raw ") && !l.starts_with('{'))
        .collect();
    for (stream, lines) in [("out", &stdout), ("err", &stderr)] {
        for worker in [1, 2] {
            let ours: Vec<&String> = lines
                .iter()
                .filter(|l| l.starts_with(&format!("[worker {worker}] ")))
                .collect();
            let expected: Vec<String> = (0..LINES)
                .map(|n| format!("[worker {worker}] {stream} {worker} {n}"))
                .collect();
            assert_eq!(
                ours.len(),
                LINES,
                "{stream} of worker {worker}: {} of {LINES} lines",
                ours.len()
            );
            assert!(
                ours.iter().zip(&expected).all(|(a, b)| *a == b),
                "{stream} of worker {worker} out of order or altered"
            );
        }
    }
}
