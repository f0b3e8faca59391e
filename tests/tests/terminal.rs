//! A cluster started in a terminal, as a person runs it: closing the terminal stops it (no
//! process left behind, the port free again); its workers are in process groups of their own.

use std::io::Read;
use std::os::fd::AsRawFd;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const WAIT: Duration = Duration::from_secs(20);

/// Reads what the terminal shows until `count` worker lines have appeared (bounded).
fn worker_lines(master: &std::fs::File, count: usize) -> Vec<(u32, u16)> {
    let deadline = Instant::now() + WAIT;
    let mut shown = String::new();
    loop {
        let workers: Vec<(u32, u16)> = shown
            .lines()
            .filter_map(|line| {
                let f: Vec<&str> = line.split_whitespace().collect();
                match f[..] {
                    ["worker", _, "pid", pid, "port", port] => {
                        Some((pid.parse().ok()?, port.parse().ok()?))
                    }
                    _ => None,
                }
            })
            .collect();
        if workers.len() >= count {
            return workers;
        }
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(!left.is_zero(), "no {count} workers in: {shown}");
        let mut poll = libc::pollfd {
            fd: master.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: poll(2) reads and writes one pollfd we own.
        let ready = unsafe { libc::poll(&raw mut poll, 1, left.as_millis() as i32) };
        if ready > 0 {
            let mut buf = [0; 4096];
            let read = (&*master).read(&mut buf).expect("read the terminal");
            shown.push_str(&String::from_utf8_lossy(&buf[..read]));
        }
    }
}

fn process_group_of(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // pid (comm) state ppid pgrp ...
    stat.rsplit(") ")
        .next()?
        .split_whitespace()
        .nth(2)?
        .parse()
        .ok()
}

#[test]
fn closing_the_terminal_stops_the_cluster_and_frees_its_port() {
    let (master, slave) = cluster_tests::open_pty();
    let mut command = Command::new(env!("CARGO_BIN_EXE_primary_fixture"));
    command
        .env("CLUSTER_WORKERS", "2")
        .env("RUST_LOG", "info")
        .stdin(Stdio::from(slave.try_clone().unwrap()))
        .stdout(Stdio::from(slave.try_clone().unwrap()))
        .stderr(Stdio::from(slave));
    cluster_tests::in_terminal_session(&mut command);
    let mut primary = cluster_tests::spawn(&mut command);
    // The test's copies of the slave are gone with `command`.
    drop(command);
    let master = std::fs::File::from(master);
    let workers = worker_lines(&master, 2);
    let port = workers[0].1;
    for (pid, _) in &workers {
        // Not in the primary's group: the terminal's signals do not reach them directly.
        assert_eq!(process_group_of(*pid), Some(*pid), "worker {pid}");
    }
    assert!(std::net::TcpStream::connect(("127.0.0.1", port)).is_ok());

    // The terminal window closes.
    drop(master);
    let status = cluster_tests::wait_for_exit(&mut primary, WAIT);
    assert!(status.success(), "{status:?}");
    for (pid, _) in &workers {
        cluster_tests::wait_gone(*pid, WAIT);
    }
    let refused = std::net::TcpStream::connect(("127.0.0.1", port))
        .expect_err("the port is free once the cluster is gone");
    assert_eq!(refused.kind(), std::io::ErrorKind::ConnectionRefused);
}
