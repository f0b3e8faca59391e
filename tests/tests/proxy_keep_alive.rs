//! A reverse proxy in front with a pool of keep-alive connections to the cluster, as most
//! services have: nginx (`keepalive` upstream pool, `proxy_next_upstream off`, so nothing is
//! retried), mostly idle clients through it, and 20 rolling reloads. No response is a 502 or a
//! 504, and the primary accepts no new connection from nginx once its pool is warm: the
//! reloads moved nginx's connections to the new workers instead of closing them. Skipped, with
//! the reason printed, where `nginx` is missing (`.ci/run` installs it).

mod support;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use support::program::{Program, WAIT, endpoint_port, free_port, get};

/// How many requests through nginx can be in flight at once: the clients.
const CLIENTS: usize = 4;

/// nginx in front of `upstream`, in the foreground, killed on drop.
struct Nginx {
    child: Child,
    port: u16,
    dir: PathBuf,
}

impl Nginx {
    fn start(upstream: u16) -> Self {
        let dir = std::env::temp_dir().join(format!("cluster-nginx-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("logs")).unwrap();
        let port = free_port();
        // One worker process, so one pool; a pool larger than the clients can ever use at once,
        // and no limit on requests per connection that the test could reach.
        let conf = format!(
            "worker_processes 1;
error_log {dir}/logs/error.log warn;
pid {dir}/nginx.pid;
events {{ worker_connections 256; }}
http {{
    access_log off;
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    upstream cluster {{
        server 127.0.0.1:{upstream};
        keepalive 16;
        keepalive_requests 1000000;
        keepalive_timeout 300s;
    }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://cluster;
            proxy_http_version 1.1;
            proxy_set_header Connection \"\";
            proxy_next_upstream off;
            proxy_read_timeout 30s;
        }}
    }}
}}
",
            dir = dir.display()
        );
        let path = dir.join("nginx.conf");
        std::fs::write(&path, conf).unwrap();
        let child = cluster_tests::spawn(
            Command::new("nginx")
                .arg("-p")
                .arg(&dir)
                .arg("-c")
                .arg(&path)
                .args(["-g", "daemon off;"])
                .stdout(Stdio::null())
                .stderr(Stdio::piped()),
        );
        let nginx = Self { child, port, dir };
        let deadline = Instant::now() + WAIT;
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "nginx never listened");
            std::thread::sleep(Duration::from_millis(10));
        }
        nginx
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        // Its master stops its worker process on SIGTERM; one left behind anyway (the master
        // gone first) is killed by pid.
        let workers = cluster_tests::children(self.child.id());
        let _ = cluster_tests::signal(self.child.id(), libc::SIGTERM);
        let deadline = Instant::now() + WAIT;
        while matches!(self.child.try_wait(), Ok(None)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        for pid in workers {
            let _ = cluster_tests::signal(pid, libc::SIGKILL);
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The primary's count of connections it accepted and handed to a worker (each is measured
/// once in the handoff histogram; connections handed back are not counted again).
fn accepted(metrics: u16) -> f64 {
    let (status, text) = get(metrics, "/metrics").expect("scrape");
    assert_eq!(status, 200);
    text.lines()
        .find_map(|l| {
            l.strip_prefix("cluster_handoff_duration_seconds_count ")?
                .parse()
                .ok()
        })
        .unwrap_or_else(|| panic!("no handoff count in {text}"))
}

/// One request through nginx on a connection of the client's own, kept alive.
fn request(
    connection: &mut Option<TcpStream>,
    port: u16,
    method: &str,
    path: &str,
) -> std::io::Result<u16> {
    let stream = match connection {
        Some(stream) => stream,
        None => {
            let stream = TcpStream::connect(("127.0.0.1", port))?;
            stream.set_read_timeout(Some(WAIT))?;
            connection.insert(stream)
        }
    };
    let body = "idle client";
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: test\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )?;
    let mut head = Vec::new();
    let mut byte = [0; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if stream.read(&mut byte)? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head).to_ascii_lowercase();
    let status = head.split_whitespace().nth(1).and_then(|s| s.parse().ok());
    let length: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    let mut rest = vec![0; length];
    stream.read_exact(&mut rest)?;
    Ok(status.unwrap_or(0))
}

#[test]
fn reloads_behind_nginx_with_a_keep_alive_pool_cost_no_502_and_no_reconnect() {
    match Command::new("nginx").arg("-v").output() {
        Ok(output) if output.status.success() => {}
        _ => {
            eprintln!("skipped: nginx is not installed (`apt-get install -y nginx`)");
            return;
        }
    }
    let mut program = Program::start(
        env!("CARGO_BIN_EXE_axum_fixture"),
        &[
            ("CLUSTER_WORKERS", "2"),
            ("CLUSTER_METRICS_ADDR", "127.0.0.1:0"),
            ("RUST_LOG", "info"),
        ],
    );
    let (_, _, upstream) = program.worker();
    program.worker();
    let metrics = endpoint_port(&program);
    let nginx = Nginx::start(upstream);

    // The pool, warmed: as many slow requests at once as there are clients, so nginx holds one
    // upstream connection per client from now on.
    let warm: Vec<_> = (0..CLIENTS)
        .map(|_| {
            let port = nginx.port;
            std::thread::spawn(move || request(&mut None, port, "GET", "/delay/300"))
        })
        .collect();
    for request in warm {
        assert_eq!(request.join().unwrap().unwrap(), 200);
    }
    let warm = accepted(metrics);
    assert!(warm >= CLIENTS as f64, "{warm} connections for {CLIENTS}");

    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicUsize::new(0));
    let failures = Arc::new(Mutex::new(Vec::new()));
    let clients: Vec<_> = (0..CLIENTS)
        .map(|client| {
            let (stop, ok, failures, port) =
                (stop.clone(), ok.clone(), failures.clone(), nginx.port);
            std::thread::spawn(move || {
                let mut seed = 0x2545_f491_4f6c_dd1d_u64 ^ (client as u64 + 1);
                let mut connection = None;
                for _ in 0..100_000 {
                    if stop.load(Ordering::Relaxed) {
                        return;
                    }
                    seed ^= seed << 13;
                    seed ^= seed >> 7;
                    seed ^= seed << 17;
                    // Mostly idle: the client's own pace, not a synchronisation.
                    std::thread::sleep(Duration::from_millis(seed % 201));
                    match request(&mut connection, port, "POST", "/echo") {
                        Ok(200) => {
                            ok.fetch_add(1, Ordering::Relaxed);
                        }
                        Ok(status) => failures.lock().unwrap().push(status.to_string()),
                        Err(error) => {
                            failures.lock().unwrap().push(error.to_string());
                            connection = None;
                        }
                    }
                }
            })
        })
        .collect();
    for done in 1..=20 {
        let before = ok.load(Ordering::Relaxed);
        program.signal(libc::SIGHUP);
        program.wait_for_logs("reload complete", done);
        // Traffic between reloads, so that the reloads meet busy and idle connections alike.
        let deadline = Instant::now() + WAIT;
        while ok.load(Ordering::Relaxed) < before + CLIENTS {
            assert!(Instant::now() < deadline, "no traffic: {:?}", failures);
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    stop.store(true, Ordering::Relaxed);
    for client in clients {
        client.join().unwrap();
    }
    let failures = failures.lock().unwrap().clone();
    let answered = ok.load(Ordering::Relaxed);
    let after = accepted(metrics);
    eprintln!(
        "behind nginx, 20 reloads: {answered} POSTs answered, {} failed; the primary accepted \
         {} connections after the pool was warm",
        failures.len(),
        after - warm
    );
    assert!(failures.is_empty(), "through nginx: {failures:?}");
    assert_eq!(after, warm, "nginx had to open new upstream connections");
    program.signal(libc::SIGTERM);
    assert!(program.wait().success(), "{}", program.stderr());
}
