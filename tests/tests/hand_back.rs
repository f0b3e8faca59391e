//! Deploys no keep-alive client notices: a worker replaced by a rolling reload hands its idle
//! connections back, and the new generation goes on serving them. Clients that hold one
//! connection each and send non-idempotent POSTs at random moments (never retried) see no
//! failure and no reconnect; a request half sent when the reload comes is answered whole by the
//! new build. With hand-back off, the same clients reconnect, as with any server that closes
//! idle connections on deploy.

mod support;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use support::program::{Program, WAIT, endpoint_port, get};

/// Where a test deploys its builds: `app`, replaced by rename.
struct Deploys {
    dir: PathBuf,
}

impl Deploys {
    fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("cluster-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        Self { dir }
    }

    fn app(&self) -> PathBuf {
        self.dir.join("app")
    }

    /// Writes `build` beside the running one, then renames it over it, as a deploy does.
    fn deploy(&self, build: &str) {
        let staged = self.dir.join(format!("app.{build}"));
        cluster_tests::stamp(
            Path::new(env!("CARGO_BIN_EXE_axum_fixture")),
            &staged,
            build,
        );
        std::fs::rename(&staged, self.app()).unwrap();
    }
}

impl Drop for Deploys {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A response read off a keep-alive connection.
struct Answer {
    status: u16,
    body: String,
    close: bool,
}

/// Reads one response (with `Content-Length`) from `stream`.
fn read_answer(stream: &mut TcpStream) -> std::io::Result<Answer> {
    let mut head = Vec::new();
    let mut byte = [0; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if stream.read(&mut byte)? == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                format!(
                    "connection closed before the response ({} bytes of it)",
                    head.len()
                ),
            ));
        }
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head).to_ascii_lowercase();
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let length: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    let close = head
        .lines()
        .any(|l| l.starts_with("connection:") && l.contains("close"));
    let mut body = vec![0; length];
    stream.read_exact(&mut body)?;
    Ok(Answer {
        status,
        body: String::from_utf8_lossy(&body).trim().to_owned(),
        close,
    })
}

fn post(body: &str) -> Vec<u8> {
    format!(
        "POST /echo HTTP/1.1\r\nHost: test\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// Clients that each hold one keep-alive connection and send a POST at random moments, with
/// idle gaps of 0 to 200 ms between them. A client never retries: a request that fails is
/// counted, and so is every connection it opens (it opens a new one only after a failure or a
/// `Connection: close`).
struct IdleClients {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicUsize>,
    connects: Arc<AtomicUsize>,
    failures: Arc<Mutex<Vec<String>>>,
    /// Per client: the builds that answered since the last [`Self::forget_builds`].
    builds: Arc<Mutex<Vec<Vec<String>>>>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl IdleClients {
    fn start(port: u16, clients: usize) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let ok = Arc::new(AtomicUsize::new(0));
        let connects = Arc::new(AtomicUsize::new(0));
        let failures = Arc::new(Mutex::new(Vec::new()));
        let builds = Arc::new(Mutex::new(vec![Vec::new(); clients]));
        let threads = (0..clients)
            .map(|client| {
                let (stop, ok, connects, failures, builds) = (
                    stop.clone(),
                    ok.clone(),
                    connects.clone(),
                    failures.clone(),
                    builds.clone(),
                );
                std::thread::spawn(move || {
                    // A small xorshift: the gaps differ per client, and runs are repeatable.
                    let mut seed = 0x9e37_79b9_7f4a_7c15_u64 ^ (client as u64 + 1);
                    let mut connection: Option<TcpStream> = None;
                    // Bounded: a client never sends more than this many requests.
                    for n in 0..100_000u64 {
                        if stop.load(Ordering::Relaxed) {
                            return;
                        }
                        seed ^= seed << 13;
                        seed ^= seed >> 7;
                        seed ^= seed << 17;
                        // The client's own pace, not a synchronisation.
                        std::thread::sleep(Duration::from_millis(seed % 201));
                        let stream = match connection.as_mut() {
                            Some(stream) => stream,
                            None => {
                                connects.fetch_add(1, Ordering::Relaxed);
                                match TcpStream::connect(("127.0.0.1", port)) {
                                    Ok(stream) => {
                                        stream.set_read_timeout(Some(WAIT)).unwrap();
                                        connection.insert(stream)
                                    }
                                    Err(error) => {
                                        failures.lock().unwrap().push(format!("connect: {error}"));
                                        continue;
                                    }
                                }
                            }
                        };
                        let body = format!("c{client}n{n}");
                        let answer = stream
                            .write_all(&post(&body))
                            .and_then(|()| read_answer(stream));
                        match answer {
                            Ok(answer) if answer.status == 200 && answer.body.ends_with(&body) => {
                                ok.fetch_add(1, Ordering::Relaxed);
                                let build = answer.body.split(' ').next().unwrap_or("").to_owned();
                                builds.lock().unwrap()[client].push(build);
                                if answer.close {
                                    connection = None;
                                }
                            }
                            Ok(answer) => {
                                failures
                                    .lock()
                                    .unwrap()
                                    .push(format!("{} {}", answer.status, answer.body));
                                connection = None;
                            }
                            Err(error) => {
                                failures.lock().unwrap().push(error.to_string());
                                connection = None;
                            }
                        }
                    }
                })
            })
            .collect();
        Self {
            stop,
            ok,
            connects,
            failures,
            builds,
            threads,
        }
    }

    /// Waits (bounded) until every client has been answered at least `count` times since the
    /// last [`Self::forget_builds`].
    fn wait_each(&self, count: usize) {
        let deadline = Instant::now() + WAIT;
        while self.builds.lock().unwrap().iter().any(|b| b.len() < count) {
            assert!(
                Instant::now() < deadline,
                "clients stalled; failures: {:?}",
                self.failures.lock().unwrap()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn forget_builds(&self) {
        for builds in self.builds.lock().unwrap().iter_mut() {
            builds.clear();
        }
    }

    fn builds(&self) -> Vec<String> {
        self.builds.lock().unwrap().concat()
    }

    /// Stops the clients; returns (answered, connections opened, failures).
    fn stop(self) -> (usize, usize, Vec<String>) {
        self.stop.store(true, Ordering::Relaxed);
        for thread in self.threads {
            thread.join().unwrap();
        }
        let failures = self.failures.lock().unwrap().clone();
        (
            self.ok.load(Ordering::Relaxed),
            self.connects.load(Ordering::Relaxed),
            failures,
        )
    }
}

/// A series of the metrics endpoint's text.
fn sample(port: u16, series: &str) -> f64 {
    let (status, text) = get(port, "/metrics").expect("scrape");
    assert_eq!(status, 200);
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("no {series} in {text}"))
}

/// Runs `reloads` rolling reloads of `program` one after the other, each with the clients busy
/// between them.
fn reload(program: &Program, clients: &IdleClients, reloads: usize) {
    for done in 1..=reloads {
        clients.forget_builds();
        program.signal(libc::SIGHUP);
        program.wait_for_logs("reload complete", done);
        clients.wait_each(1);
    }
}

#[test]
fn keep_alive_clients_see_no_failure_and_no_reconnect_over_twenty_reloads() {
    const CLIENTS: usize = 64;
    let deploys = Deploys::new("hand-back");
    deploys.deploy("v1");
    let app = deploys.app();
    let mut program = Program::start(
        app.to_str().unwrap(),
        &[
            ("CLUSTER_WORKERS", "2"),
            ("CLUSTER_METRICS_ADDR", "127.0.0.1:0"),
            ("RUST_LOG", "info"),
        ],
    );
    let (_, _, port) = program.worker();
    program.worker();
    let metrics = endpoint_port(&program);
    let clients = IdleClients::start(port, CLIENTS);
    clients.wait_each(1);
    assert!(clients.builds().iter().all(|b| b == "v1"));

    deploys.deploy("v2");
    reload(&program, &clients, 20);
    // After the last reload, every answer on the same connections comes from the new build.
    clients.forget_builds();
    clients.wait_each(2);
    let builds = clients.builds();
    let (answered, connects, failures) = clients.stop();
    assert!(failures.is_empty(), "failed requests: {failures:?}");
    assert_eq!(connects, CLIENTS, "clients reconnected");
    assert!(builds.iter().all(|b| b == "v2"), "{builds:?}");
    let handed_back = sample(metrics, "cluster_connections_handed_back_total");
    // Every reload moves every connection that was idle at the time, at least once.
    assert!(handed_back >= 20.0, "{handed_back} connections handed back");
    eprintln!(
        "{CLIENTS} keep-alive clients, 20 reloads: {answered} POSTs answered, 0 failed, \
         {connects} connections opened, {handed_back} handed back"
    );

    program.signal(libc::SIGTERM);
    assert!(program.wait().success(), "{}", program.stderr());
}

#[test]
fn without_hand_back_the_same_clients_reconnect_at_every_reload() {
    // What the test above would see of a server that closes idle connections on deploy: the
    // clients measure reconnects, and they do happen here.
    const CLIENTS: usize = 16;
    let deploys = Deploys::new("no-hand-back");
    deploys.deploy("v1");
    let app = deploys.app();
    let mut program = Program::start(
        app.to_str().unwrap(),
        &[("CLUSTER_WORKERS", "2"), ("CLUSTER_HAND_BACK", "0")],
    );
    program.worker();
    let (_, _, port) = program.worker();
    let clients = IdleClients::start(port, CLIENTS);
    clients.wait_each(1);
    reload(&program, &clients, 3);
    let (answered, connects, failures) = clients.stop();
    assert!(
        connects > CLIENTS,
        "{connects} connections for {CLIENTS} clients"
    );
    eprintln!(
        "hand-back off, {CLIENTS} keep-alive clients, 3 reloads: {answered} answered, \
         {} failed, {connects} connections opened",
        failures.len()
    );
    program.signal(libc::SIGTERM);
    assert!(program.wait().success(), "{}", program.stderr());
}

/// Sends `first`, reloads to `build` (waiting until the reload is complete), then sends `rest`
/// on the same connection and returns the answer.
fn split_across_a_reload(
    program: &Program,
    deploys: &Deploys,
    stream: &mut TcpStream,
    first: &[u8],
    rest: &[u8],
    reloads: usize,
    build: &str,
) -> Answer {
    stream.write_all(first).unwrap();
    deploys.deploy(build);
    program.signal(libc::SIGHUP);
    program.wait_for_logs("reload complete", reloads);
    stream.write_all(rest).unwrap();
    read_answer(stream).expect("an answer")
}

#[test]
fn a_request_half_sent_when_the_reload_comes_is_answered_whole_by_the_new_build() {
    let deploys = Deploys::new("half-sent");
    deploys.deploy("v1");
    let app = deploys.app();
    let mut program = Program::start(
        app.to_str().unwrap(),
        &[("CLUSTER_WORKERS", "2"), ("RUST_LOG", "info")],
    );
    let (_, _, port) = program.worker();
    program.worker();
    let request = post("intact");
    let (head, tail) = request.split_at(30);

    // A connection that has served a request, then sends half of the next one.
    let mut served = TcpStream::connect(("127.0.0.1", port)).unwrap();
    served.set_read_timeout(Some(WAIT)).unwrap();
    served.write_all(&post("first")).unwrap();
    assert_eq!(read_answer(&mut served).unwrap().status, 200);
    let answer = split_across_a_reload(&program, &deploys, &mut served, head, tail, 1, "v2");
    assert_eq!(
        (answer.status, answer.close),
        (200, false),
        "{}",
        answer.body
    );
    assert!(answer.body.starts_with("v2 "), "{}", answer.body);
    assert!(answer.body.ends_with(" intact"), "{}", answer.body);

    // A fresh connection whose first request is half sent.
    let mut fresh = TcpStream::connect(("127.0.0.1", port)).unwrap();
    fresh.set_read_timeout(Some(WAIT)).unwrap();
    let answer = split_across_a_reload(&program, &deploys, &mut fresh, head, tail, 2, "v3");
    assert_eq!(
        (answer.status, answer.close),
        (200, false),
        "{}",
        answer.body
    );
    assert!(answer.body.starts_with("v3 "), "{}", answer.body);
    assert!(answer.body.ends_with(" intact"), "{}", answer.body);

    // A connection that never sent a byte moves too, and the first served one still works.
    let mut silent = TcpStream::connect(("127.0.0.1", port)).unwrap();
    silent.set_read_timeout(Some(WAIT)).unwrap();
    let answer = split_across_a_reload(&program, &deploys, &mut silent, b"", &request, 3, "v4");
    assert!(answer.body.starts_with("v4 "), "{}", answer.body);
    served.write_all(&post("again")).unwrap();
    let answer = read_answer(&mut served).unwrap();
    assert!(answer.body.starts_with("v4 "), "{}", answer.body);

    program.signal(libc::SIGTERM);
    assert!(program.wait().success(), "{}", program.stderr());
}

/// Asks `stream` to switch to the fixture's echo protocol and checks that it echoes.
fn upgrade_and_echo(stream: &mut TcpStream, what: &[u8]) {
    stream
        .write_all(
            b"GET /upgrade HTTP/1.1\r\nHost: test\r\nConnection: upgrade\r\nUpgrade: echo\r\n\r\n",
        )
        .unwrap();
    let answer = read_answer(stream).unwrap();
    assert_eq!(answer.status, 101, "{}", answer.body);
    stream.write_all(what).unwrap();
    let mut echoed = vec![0; what.len()];
    stream.read_exact(&mut echoed).unwrap();
    assert_eq!(echoed, what);
}

#[test]
fn connections_still_upgrade_and_upgraded_ones_are_not_moved() {
    let deploys = Deploys::new("upgrade");
    deploys.deploy("v1");
    let app = deploys.app();
    let mut program = Program::start(
        app.to_str().unwrap(),
        &[("CLUSTER_WORKERS", "2"), ("RUST_LOG", "info")],
    );
    let (_, _, port) = program.worker();
    program.worker();
    // On a fresh connection, and on one that served a request first (it starts as one that
    // can be handed back, and becomes one that can upgrade when a request asks).
    let mut fresh = TcpStream::connect(("127.0.0.1", port)).unwrap();
    fresh.set_read_timeout(Some(WAIT)).unwrap();
    upgrade_and_echo(&mut fresh, b"first");
    let mut served = TcpStream::connect(("127.0.0.1", port)).unwrap();
    served.set_read_timeout(Some(WAIT)).unwrap();
    served.write_all(&post("before")).unwrap();
    assert_eq!(read_answer(&mut served).unwrap().status, 200);
    upgrade_and_echo(&mut served, b"second");

    // A reload: the upgraded connections stay with their worker until it has drained (they are
    // not handed back, their protocol is not HTTP), and the other connections are served on.
    let mut idle = TcpStream::connect(("127.0.0.1", port)).unwrap();
    idle.set_read_timeout(Some(WAIT)).unwrap();
    idle.write_all(&post("idle")).unwrap();
    assert_eq!(read_answer(&mut idle).unwrap().status, 200);
    program.signal(libc::SIGHUP);
    program.wait_for_log("reload complete");
    idle.write_all(&post("after")).unwrap();
    let answer = read_answer(&mut idle).unwrap();
    assert_eq!((answer.status, answer.close), (200, false));
    program.signal(libc::SIGTERM);
    assert!(program.wait().success(), "{}", program.stderr());
}

#[test]
fn a_scale_down_moves_the_removed_workers_connections_too() {
    const CLIENTS: usize = 8;
    let deploys = Deploys::new("scale-down");
    deploys.deploy("v1");
    let app = deploys.app();
    let mut program = Program::start(
        app.to_str().unwrap(),
        &[
            ("CLUSTER_WORKERS", "2"),
            ("CLUSTER_METRICS_ADDR", "127.0.0.1:0"),
            ("RUST_LOG", "info"),
        ],
    );
    let (_, _, port) = program.worker();
    program.worker();
    let metrics = endpoint_port(&program);
    let clients = IdleClients::start(port, CLIENTS);
    // Round robin: half of them on each worker.
    clients.wait_each(1);
    program.signal(libc::SIGTTOU);
    program.wait_for_log("worker exited");
    clients.forget_builds();
    clients.wait_each(2);
    let (_, connects, failures) = clients.stop();
    assert!(failures.is_empty(), "failed requests: {failures:?}");
    assert_eq!(connects, CLIENTS, "clients reconnected");
    assert!(sample(metrics, "cluster_connections_handed_back_total") >= 1.0);
    program.signal(libc::SIGTERM);
    assert!(program.wait().success(), "{}", program.stderr());
}

#[test]
fn a_plain_listener_hands_connections_back_and_takes_them_with_their_bytes() {
    let dir = Deploys::new("plain");
    let app = dir.app();
    let stage = |build: &str| {
        let staged = dir.dir.join(format!("app.{build}"));
        cluster_tests::stamp(
            Path::new(env!("CARGO_BIN_EXE_line_fixture")),
            &staged,
            build,
        );
        std::fs::rename(&staged, &app).unwrap();
    };
    stage("v1");
    let mut program = Program::start(app.to_str().unwrap(), &[("RUST_LOG", "info")]);
    let (_, _, port) = program.worker();
    program.worker();
    let mut stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
    stream.set_read_timeout(Some(WAIT)).unwrap();
    let read_line = |stream: &mut TcpStream| {
        let mut line = Vec::new();
        let mut byte = [0; 1];
        while byte[0] != b'\n' {
            assert_eq!(stream.read(&mut byte).unwrap(), 1, "closed: {line:?}");
            line.push(byte[0]);
        }
        String::from_utf8(line).unwrap()
    };
    stream.write_all(b"one\n").unwrap();
    let first = read_line(&mut stream);
    assert!(
        first.starts_with("v1 ") && first.ends_with(" one\n"),
        "{first}"
    );
    // Half a line, a reload to a new build, the rest: one line, answered by the new build.
    stream.write_all(b"par").unwrap();
    stage("v2");
    program.signal(libc::SIGHUP);
    program.wait_for_log("reload complete");
    stream.write_all(b"tial\n").unwrap();
    let second = read_line(&mut stream);
    assert!(
        second.starts_with("v2 ") && second.ends_with(" partial\n"),
        "{second}"
    );
    program.signal(libc::SIGTERM);
    assert!(program.wait().success(), "{}", program.stderr());
}

#[test]
fn a_request_body_left_unread_is_never_handed_back_as_a_request() {
    let deploys = Deploys::new("unread-body");
    deploys.deploy("v1");
    let app = deploys.app();
    let mut program = Program::start(
        app.to_str().unwrap(),
        &[("CLUSTER_WORKERS", "1"), ("RUST_LOG", "info")],
    );
    let (_, _, port) = program.worker();
    let mut stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
    stream.set_read_timeout(Some(WAIT)).unwrap();
    // A body of 100 bytes announced, 10 sent; the application answers, once its worker is
    // asked to leave, without reading it.
    stream
        .write_all(
            b"POST /at-drain HTTP/1.1\r\nHost: test\r\nContent-Length: 100\r\n\r\n0123456789",
        )
        .unwrap();
    program.signal(libc::SIGHUP);
    let answer = read_answer(&mut stream).unwrap();
    assert_eq!((answer.status, answer.body.as_str()), (200, "drained"));
    program.wait_for_log("reload complete");
    // The rest of the body, which reads like a request: had the connection been handed back,
    // the new worker would answer it.
    let _ = stream.write_all(b"GET /version HTTP/1.1\r\nHost: test\r\n\r\n");
    let mut rest = Vec::new();
    let _ = stream.read_to_end(&mut rest);
    let rest = String::from_utf8_lossy(&rest);
    assert!(
        !rest.contains("HTTP/1.1"),
        "the body was served as a request: {rest}"
    );
    program.signal(libc::SIGTERM);
    assert!(program.wait().success(), "{}", program.stderr());
}
