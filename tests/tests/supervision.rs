//! The supervisor of `#[cluster::main(workers = N)]` (`run_workers`): crashed workers are
//! replaced, crash loops and fatal exits stop restarts loudly.

use std::io::{BufRead, BufReader, Read};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const WAIT: Duration = Duration::from_secs(30);

fn primary(workers: usize, env: &[(&str, &str)]) -> Child {
    let mut command = Command::new(env!("CARGO_BIN_EXE_primary_fixture"));
    command
        .env("CLUSTER_WORKERS", workers.to_string())
        .env("RUST_LOG", "info");
    command
        .envs(env.iter().copied())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    command.spawn().expect("spawn")
}

/// Waits (bounded) for the primary to exit; returns its status and stderr.
fn wait_exit(mut child: Child) -> (std::process::ExitStatus, String) {
    let status = cluster_tests::wait_for_exit(&mut child, WAIT);
    (status, cluster_tests::read_all(child.stderr.take()))
}

fn ask(port: u16) -> String {
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
    stream.set_read_timeout(Some(WAIT)).unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).expect("answer");
    answer.trim().to_owned()
}

#[test]
fn a_killed_worker_is_replaced_and_serves() {
    let mut child = primary(2, &[]);
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut next = || {
        let line = lines.next().expect("a worker line").expect("read");
        let f: Vec<String> = line.split_whitespace().map(str::to_owned).collect();
        (
            f[1].clone(),
            f[3].parse::<u32>().unwrap(),
            f[5].parse::<u16>().unwrap(),
        )
    };
    let (_, first_pid, port) = next();
    let (_, second_pid, _) = next();
    cluster_tests::signal(first_pid, libc::SIGKILL).unwrap();
    // The replacement prints its own line once it listens on the same port.
    let (id, pid, replacement_port) = next();
    assert_eq!(id, "3", "ids are never reused");
    assert!(pid != first_pid && pid != second_pid);
    assert_eq!(replacement_port, port);
    let deadline = Instant::now() + WAIT;
    while ask(port) != "3" {
        assert!(Instant::now() < deadline, "the replacement never served");
    }
    cluster_tests::signal(child.id(), libc::SIGTERM).unwrap();
    let (status, stderr) = wait_exit(child);
    assert!(status.success(), "{stderr}");
    // A SIGKILL from outside is not the worker's fault: restarted, not counted as a crash.
    assert!(
        stderr.contains("worker killed from outside; restarting it"),
        "{stderr}"
    );
}

#[test]
fn a_worker_crashing_at_boot_opens_the_breaker() {
    let child = primary(1, &[("FIXTURE_EXIT_AT_BOOT", "3")]);
    let (status, stderr) = wait_exit(child);
    // Five crashes within ten seconds, then no more restarts; with no slot left, the primary
    // exits with an error naming the crash loop.
    assert_eq!(
        stderr.matches("worker exited worker=").count(),
        5,
        "{stderr}"
    );
    assert!(stderr.contains("crash loop"), "{stderr}");
    assert!(!status.success());
}

#[test]
fn the_fatal_exit_code_is_not_restarted() {
    let code = cluster::supervisor::FATAL_EXIT_CODE.to_string();
    let child = primary(1, &[("FIXTURE_EXIT_AT_BOOT", &code)]);
    let (status, stderr) = wait_exit(child);
    assert_eq!(
        stderr.matches("worker exited worker=").count(),
        1,
        "{stderr}"
    );
    assert!(stderr.contains("fatal exit code"), "{stderr}");
    assert!(!stderr.contains("restarting a crashed worker"), "{stderr}");
    assert!(!status.success());
}

#[test]
fn a_port_held_by_another_process_stops_the_cluster_at_once_naming_it() {
    let holder = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = holder.local_addr().unwrap().port();
    let address = format!("127.0.0.1:{port}");
    let child = primary(4, &[("ADDR", &address)]);
    let (status, stderr) = wait_exit(child);
    assert!(!status.success(), "{stderr}");
    let named: Vec<&str> = stderr
        .lines()
        .filter(|line| line.contains("cannot listen, and no worker serves"))
        .collect();
    assert_eq!(named.len(), 1, "{stderr}");
    assert!(
        named[0].contains(&address) && named[0].contains("Address already in use"),
        "{stderr}"
    );
    // Stopped, not restarted: every worker would have failed the same way.
    assert!(!stderr.contains("restarting a crashed worker"), "{stderr}");
    assert!(!stderr.contains("crash loop"), "{stderr}");
    drop(holder);
}
