//! Zero-downtime operations under real HTTP load: a rolling reload (SIGHUP) fails no request,
//! and SIGTERM lets requests in flight complete; `cluster::axum::serve` does the same for an app
//! that does nothing but call it.

mod support;

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use support::program::{Program, WAIT, get};

/// Clients hammering `port` with one request per connection until told to stop.
struct Load {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicUsize>,
    failures: Arc<Mutex<Vec<String>>>,
    served_by: Arc<Mutex<BTreeSet<String>>>,
    clients: Vec<std::thread::JoinHandle<()>>,
}

impl Load {
    fn start(port: u16, clients: usize) -> Self {
        Self::start_with(port, clients, 0, "/")
    }

    /// `churn` clients making one connection per request and `keep_alive` clients reusing
    /// theirs, all asking for `path`. No client retries: a request that fails is counted.
    fn start_with(port: u16, churn: usize, keep_alive: usize, path: &'static str) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let ok = Arc::new(AtomicUsize::new(0));
        let failures = Arc::new(Mutex::new(Vec::new()));
        let served_by = Arc::new(Mutex::new(BTreeSet::new()));
        let clients = (0..churn + keep_alive)
            .map(|index| {
                let keeps_alive = index >= churn;
                let (stop, ok, failures, served_by) = (
                    stop.clone(),
                    ok.clone(),
                    failures.clone(),
                    served_by.clone(),
                );
                std::thread::spawn(move || {
                    let mut connection = None;
                    // Bounded: a client never sends more than this many requests.
                    for _ in 0..50_000 {
                        if stop.load(Ordering::Relaxed) {
                            return;
                        }
                        let answer = if keeps_alive {
                            keep_alive_get(&mut connection, port, path)
                        } else {
                            get(port, path)
                        };
                        match answer {
                            Ok((200, body)) => {
                                ok.fetch_add(1, Ordering::Relaxed);
                                served_by.lock().unwrap().insert(body);
                            }
                            Ok((status, body)) => {
                                failures.lock().unwrap().push(format!("{status} {body}"))
                            }
                            Err(error) => failures.lock().unwrap().push(error.to_string()),
                        }
                    }
                })
            })
            .collect();
        Self {
            stop,
            ok,
            failures,
            served_by,
            clients,
        }
    }

    /// Waits until `more` further requests have succeeded.
    fn wait_for(&self, more: usize) {
        let target = self.ok.load(Ordering::Relaxed) + more;
        let deadline = Instant::now() + WAIT;
        while self.ok.load(Ordering::Relaxed) < target {
            assert!(
                Instant::now() < deadline,
                "the load stalled; failures: {:?}",
                self.failures.lock().unwrap()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    fn ok(&self) -> usize {
        self.ok.load(Ordering::Relaxed)
    }

    fn stop(self) -> (usize, Vec<String>, BTreeSet<String>) {
        self.stop.store(true, Ordering::Relaxed);
        for client in self.clients {
            client.join().unwrap();
        }
        let failures = self.failures.lock().unwrap().clone();
        let served_by = self.served_by.lock().unwrap().clone();
        (self.ok.load(Ordering::Relaxed), failures, served_by)
    }
}

/// One request on `connection`, kept open for the next one unless the server answered
/// `Connection: close` (a new connection is opened when there is none). A failure drops the
/// connection; nothing is retried.
fn keep_alive_get(
    connection: &mut Option<BufReader<TcpStream>>,
    port: u16,
    path: &str,
) -> std::io::Result<(u16, String)> {
    let mut stream = match connection.take() {
        Some(stream) => stream,
        None => {
            let stream = TcpStream::connect(("127.0.0.1", port))?;
            stream.set_read_timeout(Some(WAIT))?;
            BufReader::new(stream)
        }
    };
    write!(
        stream.get_mut(),
        "GET {path} HTTP/1.1\r\nHost: test\r\n\r\n"
    )?;
    let mut line = String::new();
    if stream.read_line(&mut line)? == 0 {
        return Err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            "the connection closed before the response",
        ));
    }
    let status = line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("malformed status line {line:?}")))?;
    let (mut length, mut close) = (0, false);
    loop {
        line.clear();
        stream.read_line(&mut line)?;
        let header = line.trim_end();
        if header.is_empty() {
            break;
        }
        if let Some((name, value)) = header.split_once(':') {
            if name.eq_ignore_ascii_case("content-length") {
                length = value.trim().parse().map_err(std::io::Error::other)?;
            } else if name.eq_ignore_ascii_case("connection") {
                close = value.trim().eq_ignore_ascii_case("close");
            }
        }
    }
    let mut body = vec![0; length];
    stream.read_exact(&mut body)?;
    if !close {
        *connection = Some(stream);
    }
    Ok((status, String::from_utf8_lossy(&body).trim().to_owned()))
}

/// The build that answers `/version` (`<build> worker <id>`).
fn build_at(port: u16) -> String {
    match get(port, "/version") {
        Ok((200, body)) => body
            .split_whitespace()
            .next()
            .unwrap_or_default()
            .to_owned(),
        other => panic!("no version: {other:?}"),
    }
}

#[test]
fn a_reload_runs_the_build_deployed_by_rename_and_refuses_bad_builds() {
    let dir = std::env::temp_dir().join(format!("cluster-deploy-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let fixture = Path::new(env!("CARGO_BIN_EXE_http_fixture"));
    let app = dir.join("app");
    // A deploy: the new build is written beside the old one, then renamed over it.
    let deploy = |from: &Path, build: &str| {
        let staged = dir.join(format!("app.{build}"));
        cluster_tests::stamp(from, &staged, build);
        std::fs::rename(&staged, &app).unwrap();
    };
    deploy(fixture, "v1");
    let mut program = Program::start(
        app.to_str().unwrap(),
        &[
            ("CLUSTER_WORKERS", "2"),
            ("RUST_LOG", "info"),
            // Read only by the `rogue` build deployed last.
            ("ROGUE", "version"),
        ],
    );
    let (_, first, port) = program.worker();
    program.worker();
    assert_eq!(build_at(port), "v1");

    deploy(fixture, "v2");
    // A crash respawn before the reload runs its generation's build, as its sibling does.
    cluster_tests::signal(first, libc::SIGKILL).unwrap();
    let (respawned, _, _) = program.worker();
    let deadline = Instant::now() + WAIT;
    loop {
        match get(port, "/version") {
            Ok((200, body)) if body.ends_with(&format!("worker {respawned}")) => {
                assert!(body.starts_with("v1 "), "the respawn runs {body}");
                break;
            }
            Ok((200, body)) => assert!(body.starts_with("v1 "), "{body}"),
            other => panic!("{other:?}"),
        }
        assert!(Instant::now() < deadline, "the respawn never served");
    }

    // The reload, under load from clients that never retry.
    let load = Load::start_with(port, 2, 2, "/version");
    load.wait_for(200);
    let before = load.ok();
    program.signal(libc::SIGHUP);
    program.wait_for_log("reload complete");
    load.wait_for(200);
    let (ok, failures, served) = load.stop();
    assert!(
        failures.is_empty(),
        "{} failed: {failures:?}",
        failures.len()
    );
    assert!(served.iter().any(|b| b.starts_with("v1 ")), "{served:?}");
    assert!(served.iter().any(|b| b.starts_with("v2 ")), "{served:?}");
    for _ in 0..20 {
        assert_eq!(build_at(port), "v2");
    }
    let log = program.stderr();
    assert!(log.contains("rolling reload to a new binary"), "{log}");
    assert!(log.contains("binary_changed=true"), "{log}");
    eprintln!(
        "deploy: {ok} requests ({} during the reload), 0 failed",
        ok - before
    );

    // A build that exits at start: the reload is aborted, v2 serves on.
    deploy(fixture, "exit");
    program.signal(libc::SIGHUP);
    // The supervisor's line, which follows the reload's own `reload aborted`.
    program.wait_for_log("reload aborted, the old workers keep serving");
    let log = program.stderr();
    // One readable line: which worker, what happened, no `Some(ReloadAborted { .. })`.
    assert!(
        log.contains("reload aborted, the old workers keep serving: replacing worker"),
        "{log}"
    );
    assert!(log.contains("exited before it was up"), "{log}");
    assert!(!log.contains("ReloadAborted"), "{log}");
    assert_eq!(build_at(port), "v2");

    // A build that speaks another protocol version.
    deploy(Path::new(env!("CARGO_BIN_EXE_rogue")), "rogue");
    program.signal(libc::SIGHUP);
    program.wait_for_logs("reload aborted,", 2);
    assert!(
        program.stderr().contains("speaks protocol version 99"),
        "{}",
        program.stderr()
    );
    assert_eq!(build_at(port), "v2");

    // No binary at all.
    std::fs::remove_file(&app).unwrap();
    program.signal(libc::SIGHUP);
    program.wait_for_log("reload failed");
    assert!(
        program.stderr().contains("No such file"),
        "{}",
        program.stderr()
    );
    assert_eq!(build_at(port), "v2");

    program.signal(libc::SIGTERM);
    assert!(program.wait().success(), "{}", program.stderr());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn with_wait_ready_a_reload_waits_for_readiness_not_only_for_listening() {
    let dir = std::env::temp_dir().join(format!("cluster-ready-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let fixture = Path::new(env!("CARGO_BIN_EXE_http_fixture"));
    let app = dir.join("app");
    let deploy = |build: &str| {
        let staged = dir.join(format!("app.{build}"));
        cluster_tests::stamp(fixture, &staged, build);
        std::fs::rename(&staged, &app).unwrap();
    };
    deploy("v1");
    let mut program = Program::start(
        app.to_str().unwrap(),
        &[
            ("CLUSTER_WORKERS", "2"),
            ("CLUSTER_BOOT_TIMEOUT", "2s"),
            ("FIXTURE_WAIT_READY", "1"),
            ("RUST_LOG", "info"),
        ],
    );
    let (_, _, port) = program.worker();
    program.worker();
    program.wait_for_logs("worker ready", 2);
    assert_eq!(build_at(port), "v1");

    // A build that listens but never says it is ready: not up, so the reload is aborted at
    // the boot timeout, although the replacement listened at once.
    deploy("unready");
    program.signal(libc::SIGHUP);
    let (_, unready, _) = program.worker();
    program.wait_for_log("reload aborted");
    let log = program.stderr();
    assert!(
        log.contains("the replacement was not up within the boot timeout"),
        "{log}"
    );
    cluster_tests::wait_gone(unready, WAIT);
    for _ in 0..20 {
        assert_eq!(build_at(port), "v1");
    }

    // A build that says it is ready replaces every worker.
    deploy("v2");
    program.signal(libc::SIGHUP);
    program.wait_for_log("reload complete");
    for _ in 0..20 {
        assert_eq!(build_at(port), "v2");
    }
    assert!(program.stderr().matches("worker ready").count() >= 4);
    program.signal(libc::SIGTERM);
    assert!(program.wait().success());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_storm_of_kills_from_outside_never_empties_the_service() {
    let mut program = Program::start(
        env!("CARGO_BIN_EXE_http_fixture"),
        &[("CLUSTER_WORKERS", "4"), ("RUST_LOG", "info")],
    );
    let mut live: Vec<u32> = Vec::new();
    let mut port = 0;
    for _ in 0..4 {
        let (_, pid, p) = program.worker();
        live.push(pid);
        port = p;
    }
    let load = Load::start(port, 2);
    load.wait_for(100);
    // The OOM killer's or an operator's pattern: a random worker SIGKILLed every 200 ms, for
    // 4 s: far more deaths than the crash-loop breaker allows crashes (5 in 10 s a slot).
    let started = Instant::now();
    let mut kills = 0;
    let mut seed = u64::from(std::process::id());
    while started.elapsed() < Duration::from_secs(4) {
        live.extend(program.new_workers().into_iter().map(|(_, pid, _)| pid));
        if !live.is_empty() {
            seed = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
            let victim = live.swap_remove((seed >> 33) as usize % live.len());
            if cluster_tests::signal(victim, libc::SIGKILL).is_ok() {
                kills += 1;
            }
        }
        std::thread::sleep(Duration::from_millis(200));
        assert!(
            program.is_running(),
            "the primary died: {}",
            program.stderr()
        );
    }
    let served_during = load.ok();
    // Full capacity again: four live workers, each new one listening.
    let storm_end = Instant::now();
    let deadline = storm_end + WAIT;
    while live.len() < 4 {
        live.extend(program.new_workers().into_iter().map(|(_, pid, _)| pid));
        assert!(
            Instant::now() < deadline,
            "capacity never came back: {}",
            program.stderr()
        );
        std::thread::yield_now();
    }
    let restored = storm_end.elapsed();
    load.wait_for(100);
    let (ok, failures, _) = load.stop();
    let log = program.stderr();
    // Only requests open on a killed worker can fail: each client has one at a time.
    assert!(
        failures.len() <= kills,
        "{} failed for {kills} kills: {failures:?}",
        failures.len()
    );
    assert!(served_during > 100, "the service stalled during the storm");
    assert!(!log.contains("crash loop"), "{log}");
    assert!(
        log.contains("worker killed from outside; restarting it"),
        "{log}"
    );
    eprintln!(
        "storm: {kills} kills in 4 s, {ok} requests, {} failed, capacity back {restored:?} after it",
        failures.len()
    );
    program.signal(libc::SIGTERM);
    assert!(program.wait().success(), "{}", program.stderr());
}

#[test]
fn sighups_during_a_reload_queue_one_more() {
    let mut program = Program::start(
        env!("CARGO_BIN_EXE_http_fixture"),
        &[("CLUSTER_WORKERS", "1"), ("RUST_LOG", "info")],
    );
    let (_, _, port) = program.worker();
    // A request held open for 2 s keeps the old worker draining, so the reload lasts that long.
    let held = std::thread::spawn(move || get(port, "/delay/2000"));
    program.line("delaying ");
    program.signal(libc::SIGHUP);
    program.wait_for_log("cause=\"SIGHUP\"");
    // The replacement listens; the reload now waits for the old worker's held request.
    program.worker();
    program.signal(libc::SIGHUP);
    program.wait_for_log("another reload follows");
    program.signal(libc::SIGHUP);
    assert_eq!(held.join().unwrap().unwrap().0, 200);
    program.wait_for_logs("reload complete", 2);
    program.signal(libc::SIGTERM);
    assert!(program.wait().success(), "{}", program.stderr());
    let log = program.stderr();
    // Three signals, two reloads: the two that came during the first are one.
    assert_eq!(log.matches("reload complete").count(), 2, "{log}");
    assert_eq!(log.matches("another reload follows").count(), 1, "{log}");
}

#[test]
fn rolling_reload_under_load_fails_no_request() {
    for policy in ["rr", "none"] {
        let env = [
            ("CLUSTER_WORKERS", "2"),
            ("CLUSTER_SCHED_POLICY", policy),
            ("RUST_LOG", "info"),
        ];
        let mut program = Program::start(env!("CARGO_BIN_EXE_http_fixture"), &env);
        let (_, _, port) = program.worker();
        program.worker();
        let load = Load::start(port, 4);
        load.wait_for(200);
        program.signal(libc::SIGHUP);
        // Both replacements come up (ids 3 and 4), each before its predecessor leaves.
        let replacements = [program.worker(), program.worker()];
        assert_eq!(
            replacements.map(|(id, _, p)| (id, p)),
            [(3, port), (4, port)],
            "{policy}"
        );
        program.wait_for_log("reload complete");
        load.wait_for(200);
        let (ok, failures, served_by) = load.stop();
        assert!(
            failures.is_empty(),
            "{policy}: {} of {} requests failed: {failures:?}",
            failures.len(),
            ok + failures.len()
        );
        for id in ["worker 1", "worker 2", "worker 3", "worker 4"] {
            assert!(
                served_by.contains(id),
                "{policy}: {id} never served: {served_by:?}"
            );
        }
        eprintln!("{policy}: {ok} requests across the reload, 0 failed");
        program.signal(libc::SIGTERM);
        assert!(program.wait().success(), "{}", program.stderr());
    }
}

#[test]
fn sigterm_and_ctrl_c_let_requests_in_flight_complete() {
    // SIGTERM drains within `disconnect_timeout`; SIGINT (Ctrl-C) within 5 s at most.
    for signal in [libc::SIGTERM, libc::SIGINT] {
        let mut program = Program::start(
            env!("CARGO_BIN_EXE_http_fixture"),
            &[("CLUSTER_WORKERS", "2")],
        );
        let (_, _, port) = program.worker();
        program.worker();
        let slow = std::thread::spawn(move || get(port, "/delay/1500"));
        program.line("delaying ");
        program.signal(signal);
        let (status, body) = slow
            .join()
            .unwrap()
            .expect("the request in flight completed");
        assert_eq!(status, 200, "{signal}: {body}");
        assert!(program.wait().success(), "{signal}: {}", program.stderr());
    }
}

#[test]
fn a_hung_worker_is_detected_and_replaced() {
    let env = [
        ("CLUSTER_WORKERS", "2"),
        ("CLUSTER_HEARTBEAT_TIMEOUT", "3s"),
        ("RUST_LOG", "info"),
    ];
    let mut program = Program::start(env!("CARGO_BIN_EXE_http_fixture"), &env);
    let (_, _, port) = program.worker();
    program.worker();
    // This request blocks the runtime of whichever worker gets it, for a minute.
    std::thread::spawn(move || get(port, "/block/60000"));
    program.line("blocking ");
    let (id, _, replacement_port) = program.worker();
    assert_eq!((id, replacement_port), (3, port), "a replacement listens");
    program.wait_for_log("missed its heartbeats");
    // The cluster serves on.
    let deadline = Instant::now() + WAIT;
    while !matches!(get(port, "/"), Ok((200, body)) if body == "worker 3") {
        assert!(Instant::now() < deadline, "the replacement never served");
    }
    program.signal(libc::SIGTERM);
    assert!(program.wait().success(), "{}", program.stderr());
}

#[test]
fn sigttin_and_sigttou_scale_up_and_drain_down() {
    let mut program = Program::start(
        env!("CARGO_BIN_EXE_http_fixture"),
        &[("CLUSTER_WORKERS", "2"), ("RUST_LOG", "info")],
    );
    let (_, _, port) = program.worker();
    program.worker();
    program.signal(libc::SIGTTIN);
    let (id, _, third_port) = program.worker();
    assert_eq!((id, third_port), (3, port));
    let deadline = Instant::now() + WAIT;
    while !matches!(get(port, "/"), Ok((200, body)) if body == "worker 3") {
        assert!(Instant::now() < deadline, "the added worker never served");
    }
    // One fewer: the newest slot's worker drains and exits 0, and is not replaced.
    program.signal(libc::SIGTTOU);
    program.wait_for_log("worker exited worker=3");
    assert!(
        program.stderr().contains("from=3 to=2"),
        "{}",
        program.stderr()
    );
    let load = Load::start(port, 2);
    load.wait_for(50);
    let (_, failures, served_by) = load.stop();
    assert!(failures.is_empty(), "{failures:?}");
    assert!(!served_by.contains("worker 3"), "{served_by:?}");
    program.signal(libc::SIGTERM);
    assert!(program.wait().success(), "{}", program.stderr());
}

#[test]
fn a_failed_replacement_aborts_the_reload_and_the_old_workers_keep_serving() {
    let flag = std::env::temp_dir().join(format!("cluster-bad-deploy-{}", std::process::id()));
    let _ = std::fs::remove_file(&flag);
    let env = [
        ("CLUSTER_WORKERS", "2"),
        ("RUST_LOG", "info"),
        ("FIXTURE_FAIL_IF", flag.to_str().unwrap()),
    ];
    let mut program = Program::start(env!("CARGO_BIN_EXE_http_fixture"), &env);
    let (_, _, port) = program.worker();
    program.worker();
    // A bad deploy: new workers crash at boot.
    std::fs::write(&flag, b"").unwrap();
    let load = Load::start(port, 2);
    program.signal(libc::SIGHUP);
    program.wait_for_log("reload aborted");
    assert!(
        program
            .stderr()
            .contains("the replacement exited before it was up"),
        "{}",
        program.stderr()
    );
    load.wait_for(100);
    let (_, failures, served_by) = load.stop();
    std::fs::remove_file(&flag).unwrap();
    assert!(failures.is_empty(), "{failures:?}");
    assert_eq!(
        served_by,
        ["worker 1", "worker 2"].map(str::to_owned).into(),
        "the old workers kept serving"
    );
    program.signal(libc::SIGTERM);
    assert!(program.wait().success(), "{}", program.stderr());
}

#[test]
fn axum_serve_fails_no_request_over_five_rolling_reloads_under_keep_alive_load() {
    // `axum_fixture` serves with `cluster::axum::serve` and nothing else. Closing idle keep-alive
    // connections at once (what `axum::serve(..).with_graceful_shutdown(..)` does) fails about
    // one request per keep-alive client per reload; the helper's drain fails none.
    for policy in ["rr", "none"] {
        let env = [
            ("CLUSTER_WORKERS", "2"),
            ("CLUSTER_SCHED_POLICY", policy),
            ("RUST_LOG", "info"),
        ];
        let mut program = Program::start(env!("CARGO_BIN_EXE_axum_fixture"), &env);
        let (_, _, port) = program.worker();
        program.worker();
        let load = Load::start_with(port, 2, 4, "/");
        load.wait_for(200);
        for reload in 1..=5 {
            program.signal(libc::SIGHUP);
            // Both replacements come up, each before its predecessor leaves.
            let ids = [program.worker().0, program.worker().0];
            assert_eq!(ids, [2 * reload + 1, 2 * reload + 2], "{policy}");
            program.wait_for_logs("reload complete", reload as usize);
            load.wait_for(1000);
        }
        let (ok, failures, served_by) = load.stop();
        assert!(
            failures.is_empty(),
            "{policy}: {} of {} requests failed: {failures:?}",
            failures.len(),
            ok + failures.len()
        );
        assert!(
            served_by.contains("worker 11") || served_by.contains("worker 12"),
            "{policy}: the last replacements never served: {served_by:?}"
        );
        eprintln!("{policy}: {ok} requests across 5 reloads, 0 failed");
        // `ConnectInfo` carries the client's address.
        let (status, peer) = get(port, "/peer").expect("GET /peer");
        assert_eq!(status, 200, "{peer}");
        assert!(peer.starts_with("127.0.0.1:"), "{peer}");
        program.signal(libc::SIGTERM);
        assert!(program.wait().success(), "{}", program.stderr());
        assert!(
            !program.stderr().contains("killing it"),
            "{}",
            program.stderr()
        );
    }
}

#[test]
fn axum_serve_stops_promptly_on_sigterm_with_an_idle_keep_alive_connection_open() {
    // With the default 30 s disconnect timeout: an app that never looks at `cluster::shutdown()`
    // itself leaves as soon as its connections are drained, instead of being killed at 30 s.
    let mut program = Program::start(
        env!("CARGO_BIN_EXE_axum_fixture"),
        &[("CLUSTER_WORKERS", "2"), ("RUST_LOG", "info")],
    );
    let (_, _, port) = program.worker();
    program.worker();
    let mut idle = None;
    let (status, body) = keep_alive_get(&mut idle, port, "/").expect("GET /");
    assert_eq!((status, idle.is_some()), (200, true), "{body}");
    let signalled = Instant::now();
    program.signal(libc::SIGTERM);
    assert!(program.wait().success(), "{}", program.stderr());
    let took = signalled.elapsed();
    assert!(took < Duration::from_secs(10), "SIGTERM took {took:?}");
    assert!(
        !program.stderr().contains("killing it"),
        "{}",
        program.stderr()
    );
    eprintln!("stopped {took:?} after SIGTERM, an idle keep-alive connection open");
    // The server closed the idle connection: end of stream, not a response.
    let mut rest = String::new();
    let read = idle.unwrap().read_to_string(&mut rest).expect("read");
    assert_eq!(read, 0, "{rest}");
}

#[test]
fn axum_serve_serves_and_drains_a_unix_socket() {
    let dir = std::env::temp_dir().join(format!("cluster-axum-unix-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("app.sock");
    let addr = format!("unix:{}", path.display());
    let mut program = Program::start(
        env!("CARGO_BIN_EXE_axum_fixture"),
        &[("CLUSTER_WORKERS", "2"), ("ADDR", &addr)],
    );
    program.worker();
    program.worker();
    for path_asked in ["/", "/peer"] {
        let mut stream = std::os::unix::net::UnixStream::connect(&path).expect("connect");
        stream.set_read_timeout(Some(WAIT)).unwrap();
        write!(
            stream,
            "GET {path_asked} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).unwrap();
        assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    }
    let signalled = Instant::now();
    program.signal(libc::SIGTERM);
    assert!(program.wait().success(), "{}", program.stderr());
    assert!(signalled.elapsed() < Duration::from_secs(10));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn axum_serve_keeps_serving_after_running_out_of_fds() {
    // One worker accepting on the shared socket itself, with few fds: idle connections use them
    // up, accepts fail with EMFILE, and the worker must carry on once they are closed.
    let mut program = Program::start_with(
        env!("CARGO_BIN_EXE_axum_fixture"),
        &[
            ("CLUSTER_WORKERS", "1"),
            ("CLUSTER_SCHED_POLICY", "none"),
            ("RUST_LOG", "warn"),
        ],
        |command| cluster_tests::limit_open_files(command, 64),
    );
    let (_, _, port) = program.worker();
    let idle: Vec<TcpStream> = (0..100)
        .map(|_| TcpStream::connect(("127.0.0.1", port)).expect("connect"))
        .collect();
    program.wait_for_log("accept failed; retrying in 1s");
    drop(idle);
    let (status, body) = get(port, "/").expect("a request after the fds came back");
    assert_eq!((status, body.as_str()), (200, "worker 1"));
    let signalled = Instant::now();
    program.signal(libc::SIGTERM);
    assert!(program.wait().success(), "{}", program.stderr());
    assert!(signalled.elapsed() < Duration::from_secs(10));
}

/// What the h2c client of [`h2c_client`] saw.
#[derive(Debug)]
enum H2c {
    /// A `200` with this body.
    Answer(String),
    /// The server said `GOAWAY` (no error): the next request goes on a new connection.
    GoAway,
    /// A request that failed, or any other answer.
    Failure(String),
}

/// An HTTP/2 client with prior knowledge (h2c) sending `GET /` to `port` one after another on
/// the connection it holds, until `stop`. A `GOAWAY` from the server makes it open a new
/// connection: h2 refuses locally to send on a connection that was told to go away, so no
/// request is lost by that. Nothing is retried: a request that fails is reported as one.
async fn h2c_client(port: u16, stop: Arc<AtomicBool>, seen: std::sync::mpsc::Sender<H2c>) {
    let mut held: Option<h2::client::SendRequest<&'static [u8]>> = None;
    // Bounded: never more than this many requests.
    for _ in 0..100_000 {
        if stop.load(Ordering::Relaxed) {
            return;
        }
        let outcome = tokio::time::timeout(WAIT, h2c_get(&mut held, port))
            .await
            .unwrap_or_else(|_| H2c::Failure("no answer in time".to_owned()));
        if seen.send(outcome).is_err() {
            return;
        }
    }
}

/// One `GET /` on `held` (a new connection when there is none); `held` is emptied when its
/// connection is of no more use.
async fn h2c_get(held: &mut Option<h2::client::SendRequest<&'static [u8]>>, port: u16) -> H2c {
    let sender = match held.take() {
        Some(sender) => sender,
        None => {
            let stream = match tokio::net::TcpStream::connect(("127.0.0.1", port)).await {
                Ok(stream) => stream,
                Err(error) => return H2c::Failure(format!("connect: {error}")),
            };
            let handshake = h2::client::Builder::new().handshake::<_, &'static [u8]>(stream);
            let (sender, connection) = match handshake.await {
                Ok(handshake) => handshake,
                Err(error) => return H2c::Failure(format!("h2 handshake: {error}")),
            };
            tokio::spawn(connection);
            sender
        }
    };
    let went_away = |error: &h2::Error| {
        error.is_go_away() && error.is_remote() && error.reason() == Some(h2::Reason::NO_ERROR)
    };
    let mut sender = match sender.ready().await {
        Ok(sender) => sender,
        Err(error) if went_away(&error) => return H2c::GoAway,
        Err(error) => return H2c::Failure(format!("ready: {error}")),
    };
    let request = http::Request::get(format!("http://127.0.0.1:{port}/"))
        .body(())
        .unwrap();
    let response = match sender.send_request(request, true) {
        Ok((response, _)) => response,
        Err(error) if went_away(&error) => return H2c::GoAway,
        Err(error) => return H2c::Failure(format!("send: {error}")),
    };
    // Sent: from here on, any error is a failed request.
    let response = match response.await {
        Ok(response) => response,
        Err(error) => return H2c::Failure(format!("response: {error}")),
    };
    let status = response.status();
    let mut body = response.into_body();
    let mut text = Vec::new();
    while let Some(chunk) = body.data().await {
        match chunk {
            Ok(chunk) => {
                let _ = body.flow_control().release_capacity(chunk.len());
                text.extend_from_slice(&chunk);
            }
            Err(error) => return H2c::Failure(format!("body: {error}")),
        }
    }
    let text = String::from_utf8_lossy(&text).trim().to_owned();
    *held = Some(sender);
    match status.as_u16() {
        200 => H2c::Answer(text),
        other => H2c::Failure(format!("{other} {text}")),
    }
}

#[test]
fn axum_serve_answers_h2c_and_a_reload_moves_its_clients_with_a_goaway() {
    // `cluster::axum::serve` speaks HTTP/2 with prior knowledge as `axum::serve` does. A client
    // holding an h2c connection across a rolling reload is told to go away (`GOAWAY`) by the
    // draining worker, and goes on on a new connection to the new workers without a failure.
    let mut program = Program::start(
        env!("CARGO_BIN_EXE_axum_fixture"),
        &[("CLUSTER_WORKERS", "2"), ("RUST_LOG", "info")],
    );
    let (_, _, port) = program.worker();
    program.worker();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let (tx, seen) = std::sync::mpsc::channel();
    let client = runtime.spawn(h2c_client(port, stop.clone(), tx));
    let (mut answers, mut goaways) = (BTreeSet::new(), 0);
    let mut record = |deadline: Instant, until: &dyn Fn(&BTreeSet<String>, usize) -> bool| {
        while !until(&answers, goaways) {
            let left = deadline.saturating_duration_since(Instant::now());
            match seen.recv_timeout(left) {
                Ok(H2c::Answer(body)) => {
                    answers.insert(body);
                }
                Ok(H2c::GoAway) => goaways += 1,
                // No point going on: the test fails on the first failed request.
                Ok(H2c::Failure(failure)) => panic!(
                    "a request failed: {failure}; answered by {answers:?}, {goaways} GOAWAYs"
                ),
                Err(error) => panic!("{error}: answered by {answers:?}, {goaways} GOAWAYs"),
            }
        }
    };
    // Served over h2c by the first workers.
    record(Instant::now() + WAIT, &|answers, _| !answers.is_empty());
    program.signal(libc::SIGHUP);
    let ids = [program.worker().0, program.worker().0];
    assert_eq!(ids, [3, 4]);
    program.wait_for_logs("reload complete", 1);
    // The old workers are gone: the client was told to go away at least once, and the new
    // workers answer it.
    record(Instant::now() + WAIT, &|answers, goaways| {
        goaways >= 1 && (answers.contains("worker 3") || answers.contains("worker 4"))
    });
    stop.store(true, Ordering::Relaxed);
    runtime
        .block_on(async { tokio::time::timeout(WAIT, client).await })
        .expect("the client stops")
        .unwrap();
    let failures: Vec<_> = (seen.try_iter().filter_map(|seen| match seen {
        H2c::Failure(failure) => Some(failure),
        _ => None,
    }))
    .collect();
    assert!(failures.is_empty(), "failed requests: {failures:?}");
    eprintln!("h2c: answered by {answers:?}, {goaways} GOAWAYs, 0 failures");
    program.signal(libc::SIGTERM);
    assert!(program.wait().success(), "{}", program.stderr());
    assert!(
        !program.stderr().contains("killing it"),
        "{}",
        program.stderr()
    );
}

/// Clients of the `echo` example: each connects, sends a line, reads it back, until stopped.
/// Returns the stop flag and how many round trips succeeded.
fn echo_load(port: u16, clients: usize) -> (Arc<AtomicBool>, Arc<AtomicUsize>) {
    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicUsize::new(0));
    for _ in 0..clients {
        let (stop, ok) = (stop.clone(), ok.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let round_trip = || -> std::io::Result<bool> {
                    let mut stream = TcpStream::connect(("127.0.0.1", port))?;
                    stream.set_read_timeout(Some(WAIT))?;
                    stream.write_all(b"ping\n")?;
                    stream.shutdown(std::net::Shutdown::Write)?;
                    let mut back = Vec::new();
                    stream.read_to_end(&mut back)?;
                    Ok(back == b"ping\n")
                };
                // Connections cut by a leaving worker are expected: `echo` does not drain.
                if round_trip().unwrap_or(false) {
                    ok.fetch_add(1, Ordering::Relaxed);
                }
            }
        });
    }
    (stop, ok)
}

#[test]
fn every_leaving_echo_worker_exits_0_over_five_reloads_and_a_sigterm() {
    for policy in ["rr", "none"] {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let addr = format!("127.0.0.1:{port}");
        let env = [
            ("CLUSTER_WORKERS", "2"),
            ("CLUSTER_SCHED_POLICY", policy),
            ("RUST_LOG", "info"),
            ("ADDR", addr.as_str()),
        ];
        let program = Program::start(env!("CARGO_BIN_EXE_echo"), &env);
        program.wait_for_logs("listening", 2);
        let (stop, ok) = echo_load(port, 4);
        for reload in 1..=5 {
            let before = ok.load(Ordering::Relaxed);
            program.signal(libc::SIGHUP);
            program.wait_for_logs("reload complete", reload);
            // The supervisor logs an exit as it learns of it, which may be just after the
            // reload completes: a SIGTERM then would leave it unlogged.
            program.wait_for_logs("worker exited", 2 * reload);
            // Served between reloads: the load is real. Bounded by the log waits' deadline.
            let deadline = Instant::now() + WAIT;
            while ok.load(Ordering::Relaxed) < before + 20 {
                assert!(
                    Instant::now() < deadline,
                    "{policy}: no echo after reload {reload}"
                );
                std::thread::yield_now();
            }
        }
        program.signal(libc::SIGTERM);
        let mut program = program;
        let status = program.wait();
        stop.store(true, Ordering::Relaxed);
        let log = program.stderr();
        assert!(status.success(), "{policy}: {log}");
        // 2 workers replaced 5 times: 10 left during the reloads, each logged with its code.
        let exits: Vec<&str> = log
            .lines()
            .filter(|l| l.contains("worker exited"))
            .collect();
        assert_eq!(exits.len(), 10, "{policy}: {log}");
        let failed: Vec<&&str> = exits
            .iter()
            .filter(|l| !l.contains("status=exit code 0"))
            .collect();
        assert!(
            failed.is_empty(),
            "{policy}: {} of 10 leaving workers did not exit 0: {failed:#?}",
            failed.len()
        );
        // The last 2 left with the primary (exits not logged then): a `main` that returned an
        // error says so on the stderr the primary forwards, and exits 1.
        assert!(!log.contains("Error:"), "{policy}: {log}");
        eprintln!(
            "{policy}: every leaving worker exited 0 (10 logged); {} echoes",
            ok.load(Ordering::Relaxed)
        );
    }
}

/// A rolling reload while a scaled-away worker drains: the reload leaves it to go and replaces
/// the others only, so no worker runs beyond the count asked for.
#[test]
fn a_reload_during_a_scale_down_drain_starts_no_worker_beyond_the_target() {
    let mut program = Program::start(
        env!("CARGO_BIN_EXE_http_fixture"),
        &[("CLUSTER_WORKERS", "1"), ("RUST_LOG", "info")],
    );
    let (_, _, port) = program.worker();
    program.signal(libc::SIGTTIN);
    let (two, _, _) = program.worker();
    // A slow request on worker `two`, so that its drain lasts: round robin gives the
    // connection after one of worker 1's to `two`.
    loop {
        let (_, body) = get(port, "/").unwrap();
        if body.trim() == "worker 1" {
            break;
        }
    }
    let slow = std::thread::spawn(move || get(port, "/delay/5000"));
    let line = program.line("delaying ");
    assert_eq!(
        line.split_whitespace().nth(1),
        Some(two.to_string().as_str()),
        "{line}"
    );
    program.signal(libc::SIGTTOU);
    program.wait_for_log("from=2 to=1");
    program.signal(libc::SIGHUP);
    program.wait_for_log("reload complete");
    let alive: Vec<_> = program
        .new_workers()
        .into_iter()
        .filter(|(_, pid, _)| cluster_tests::signal(*pid, 0).is_ok())
        .collect();
    assert_eq!(alive.len(), 1, "one worker wanted, alive: {alive:?}");
    let (status, _) = slow.join().unwrap().expect("the slow request is answered");
    assert_eq!(status, 200);
}
