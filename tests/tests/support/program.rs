//! A clustered program in its own process: its stdout lines, its stderr, its signals. Every
//! process it started (the primary and the workers it printed) is killed on drop.

use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub const WAIT: Duration = Duration::from_secs(60);

pub struct Program {
    child: Child,
    lines: mpsc::Receiver<String>,
    stderr: Arc<Mutex<String>>,
    pids: Vec<u32>,
}

impl Program {
    pub fn start(binary: &str, env: &[(&str, &str)]) -> Self {
        Self::start_with(binary, env, |_| {})
    }

    /// As [`Self::start`], with the command set up further by `configure` first.
    pub fn start_with(
        binary: &str,
        env: &[(&str, &str)],
        configure: impl FnOnce(&mut Command),
    ) -> Self {
        let mut command = Command::new(binary);
        command.envs(env.iter().copied());
        configure(&mut command);
        Self::spawn(command)
    }

    /// Starts `command` (its stdout and stderr are taken over).
    pub fn spawn(mut command: Command) -> Self {
        let mut child = cluster_tests::spawn(command.stdout(Stdio::piped()).stderr(Stdio::piped()));
        let (tx, lines) = mpsc::channel();
        let stdout = child.stdout.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { return };
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        let stderr = Arc::new(Mutex::new(String::new()));
        let mut pipe = child.stderr.take().unwrap();
        let sink = stderr.clone();
        std::thread::spawn(move || {
            let mut buf = [0; 4096];
            while let Ok(n @ 1..) = pipe.read(&mut buf) {
                sink.lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        });
        Self {
            child,
            lines,
            stderr,
            pids: Vec::new(),
        }
    }

    /// The primary's pid.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The next stdout line starting with `prefix` (others are skipped).
    pub fn line(&mut self, prefix: &str) -> String {
        let deadline = Instant::now() + WAIT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = self
                .lines
                .recv_timeout(left)
                .unwrap_or_else(|_| panic!("no `{prefix}` line: {}", self.stderr()));
            if let Some(pid) = line
                .strip_prefix("worker ")
                .and_then(|rest| rest.split_whitespace().nth(2))
            {
                self.pids.extend(pid.parse::<u32>().ok());
            }
            if line.starts_with(prefix) {
                return line;
            }
        }
    }

    /// The next `worker <id> pid <pid> port <port>` line, as (id, pid, port).
    pub fn worker(&mut self) -> (u64, u32, u16) {
        let line = self.line("worker ");
        parse_worker(&line)
    }

    /// Worker lines printed so far and not read yet (without waiting), as (id, pid, port).
    pub fn new_workers(&mut self) -> Vec<(u64, u32, u16)> {
        let mut workers = Vec::new();
        while let Ok(line) = self.lines.try_recv() {
            if line.starts_with("worker ") {
                let worker = parse_worker(&line);
                self.pids.push(worker.1);
                workers.push(worker);
            }
        }
        workers
    }

    /// Whether the primary is still running.
    pub fn is_running(&mut self) -> bool {
        self.child.try_wait().expect("try_wait").is_none()
    }

    /// Waits until stderr contains `needle`.
    pub fn wait_for_log(&self, needle: &str) {
        self.wait_for_logs(needle, 1);
    }

    /// Waits until stderr contains `needle` `count` times.
    pub fn wait_for_logs(&self, needle: &str, count: usize) {
        let deadline = Instant::now() + WAIT;
        while self.stderr().matches(needle).count() < count {
            assert!(
                Instant::now() < deadline,
                "not {count} `{needle}` in the log: {}",
                self.stderr()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    pub fn signal(&self, signal: i32) {
        cluster_tests::signal(self.child.id(), signal).expect("signal the primary");
    }

    /// Waits (bounded) for the primary to exit.
    pub fn wait(&mut self) -> std::process::ExitStatus {
        cluster_tests::wait_for_exit(&mut self.child, WAIT)
    }
}

impl Drop for Program {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        for pid in &self.pids {
            let _ = cluster_tests::signal(*pid, libc::SIGKILL);
        }
    }
}

fn parse_worker(line: &str) -> (u64, u32, u16) {
    let f: Vec<&str> = line.split_whitespace().collect();
    (
        f[1].parse().unwrap(),
        f[3].parse().unwrap(),
        f[5].parse().unwrap(),
    )
}

/// One HTTP/1.1 request on a new connection (`Connection: close`); returns status and body.
pub fn get(port: u16, path: &str) -> std::io::Result<(u16, String)> {
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port))?;
    stream.set_read_timeout(Some(WAIT))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n"
    )?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok());
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.trim().to_owned());
    match (status, body) {
        (Some(status), Some(body)) => Ok((status, body)),
        _ => Err(std::io::Error::other(format!(
            "malformed response {response:?}"
        ))),
    }
}

/// A port nobody listens on now (the kernel's choice, closed again for a program to take).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The port the primary logged for its metrics endpoint.
pub fn endpoint_port(program: &Program) -> u16 {
    program.wait_for_log("serving /metrics");
    let log = program.stderr();
    let line = log
        .lines()
        .find(|l| l.contains("serving /metrics"))
        .unwrap();
    let address = line.split("address=").nth(1).unwrap();
    let address = address.split_whitespace().next().unwrap();
    address.rsplit(':').next().unwrap().parse().unwrap()
}

/// Waits (bounded) until `/readyz` on `port` answers `expected`.
pub fn wait_readyz(port: u16, expected: u16) {
    let deadline = Instant::now() + WAIT;
    loop {
        let (status, body) = get(port, "/readyz").unwrap();
        if status == expected {
            return;
        }
        assert!(Instant::now() < deadline, "/readyz stayed {status}: {body}");
        std::thread::sleep(Duration::from_millis(20));
    }
}
