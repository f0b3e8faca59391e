//! A real load balancer in front, as most services have: HAProxy health-checking `/readyz` of
//! two instances every 500 ms, clients that never retry (HAProxy's own retries off, as
//! kube-proxy does not retry), and a rolling update: each instance SIGTERMed and started again,
//! five times. With the shutdown delay no request fails; without it, the ones that arrive
//! between SIGTERM and the next health check do (counted and printed, not asserted: that
//! window is a matter of timing). Skipped, with the reason printed, where `haproxy` is missing
//! (`.ci/run` installs it).

mod support;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Instant;

use support::program::{Program, WAIT, free_port, get};

/// One instance of the service: `http_fixture` (two workers) on fixed ports.
struct Instance {
    app: u16,
    metrics: u16,
    delay: &'static str,
    program: Option<Program>,
}

impl Instance {
    fn new(delay: &'static str) -> Self {
        let mut instance = Self {
            app: free_port(),
            metrics: free_port(),
            delay,
            program: None,
        };
        instance.start();
        instance
    }

    /// Starts it (again) and waits until `/readyz` answers 200.
    fn start(&mut self) {
        let addr = format!("127.0.0.1:{}", self.app);
        let metrics = format!("127.0.0.1:{}", self.metrics);
        let mut program = Program::start(
            env!("CARGO_BIN_EXE_http_fixture"),
            &[
                ("ADDR", addr.as_str()),
                ("CLUSTER_METRICS_ADDR", metrics.as_str()),
                ("CLUSTER_SHUTDOWN_DELAY", self.delay),
                ("RUST_LOG", "info"),
            ],
        );
        program.worker();
        program.worker();
        let deadline = Instant::now() + WAIT;
        while !get(self.metrics, "/readyz").is_ok_and(|(status, _)| status == 200) {
            assert!(
                Instant::now() < deadline,
                "never ready: {}",
                program.stderr()
            );
            std::thread::yield_now();
        }
        self.program = Some(program);
    }

    /// SIGTERM, as a rolling update sends it, and waits for a clean exit.
    fn stop(&mut self) {
        let mut program = self.program.take().expect("running");
        program.signal(libc::SIGTERM);
        let status = program.wait();
        assert!(status.success(), "{status:?}: {}", program.stderr());
    }
}

/// HAProxy in front of the instances, killed on drop.
struct Haproxy {
    child: Child,
    dir: PathBuf,
    port: u16,
}

impl Haproxy {
    fn start(instances: &[Instance]) -> Self {
        let dir = std::env::temp_dir().join(format!("cluster-haproxy-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let port = free_port();
        let mut config = format!(
            "global\n  stats socket {}/stats.sock mode 600 level admin\n\
             defaults\n  mode http\n  timeout connect 1s\n  timeout client 10s\n  timeout server 10s\n\
             \x20 retries 0\n  option http-server-close\n  http-reuse never\n\
             frontend front\n  bind 127.0.0.1:{port}\n  default_backend service\n\
             backend service\n  option httpchk GET /readyz\n  http-check expect status 200\n",
            dir.display()
        );
        for (index, instance) in instances.iter().enumerate() {
            config += &format!(
                "  server s{index} 127.0.0.1:{} check port {} inter 500 fall 1 rise 1\n",
                instance.app, instance.metrics
            );
        }
        let path = dir.join("haproxy.cfg");
        std::fs::write(&path, config).unwrap();
        let child = Command::new("haproxy")
            .arg("-db")
            .arg("-f")
            .arg(&path)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("haproxy starts");
        let haproxy = Self { child, dir, port };
        for index in 0..instances.len() {
            haproxy.wait_up(index);
        }
        haproxy
    }

    /// Waits (bounded) until HAProxy's health checks say server `index` is up.
    fn wait_up(&self, index: usize) {
        let deadline = Instant::now() + WAIT;
        while self.status(index).as_deref() != Some("UP") {
            assert!(Instant::now() < deadline, "s{index} never up in HAProxy");
            std::thread::yield_now();
        }
    }

    /// Server `index`'s status in HAProxy's `show stat` (`UP`, `DOWN`, ...).
    fn status(&self, index: usize) -> Option<String> {
        let mut socket = UnixStream::connect(self.dir.join("stats.sock")).ok()?;
        socket.write_all(b"show stat\n").ok()?;
        let mut stats = String::new();
        socket.read_to_string(&mut stats).ok()?;
        let name = format!("s{index}");
        stats.lines().find_map(|line| {
            let fields: Vec<&str> = line.split(',').collect();
            (fields.first() == Some(&"service") && fields.get(1) == Some(&name.as_str()))
                .then(|| fields.get(17).map(|s| (*s).to_owned()))
                .flatten()
        })
    }
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Five rolling updates of two instances behind HAProxy under load from clients that never
/// retry: (requests, failed).
fn rolling_updates(delay: &'static str) -> (usize, usize) {
    let mut instances = [Instance::new(delay), Instance::new(delay)];
    let haproxy = Haproxy::start(&instances);
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let clients: Vec<_> = (0..4)
        .map(|_| {
            let (stop, ok, failed) = (stop.clone(), ok.clone(), failed.clone());
            let port = haproxy.port;
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    match get(port, "/") {
                        Ok((200, _)) => ok.fetch_add(1, Ordering::Relaxed),
                        _ => failed.fetch_add(1, Ordering::Relaxed),
                    };
                }
            })
        })
        .collect();
    for _ in 0..5 {
        for (index, instance) in instances.iter_mut().enumerate() {
            instance.stop();
            instance.start();
            haproxy.wait_up(index);
        }
    }
    stop.store(true, Ordering::Relaxed);
    for client in clients {
        client.join().unwrap();
    }
    let failed = failed.load(Ordering::Relaxed);
    (ok.load(Ordering::Relaxed) + failed, failed)
}

#[test]
fn a_rolling_update_behind_haproxy_fails_no_request_with_the_shutdown_delay() {
    match Command::new("haproxy").arg("-v").output() {
        Ok(output) if output.status.success() => {}
        _ => {
            eprintln!("skipped: haproxy is not installed (`apt-get install -y haproxy`)");
            return;
        }
    }
    let (requests, failed) = rolling_updates("3s");
    eprintln!("with a 3 s shutdown delay: {failed} of {requests} requests failed");
    assert!(requests > 0);
    assert_eq!(failed, 0, "{failed} of {requests} requests failed");
    let (requests, failed) = rolling_updates("0");
    eprintln!("without it: {failed} of {requests} requests failed");
}
