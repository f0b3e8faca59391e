//! Zero-downtime operations under real HTTP load: a rolling reload (SIGHUP) fails no request,
//! and SIGTERM lets requests in flight complete.

mod support;

use std::collections::BTreeSet;
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
        let stop = Arc::new(AtomicBool::new(false));
        let ok = Arc::new(AtomicUsize::new(0));
        let failures = Arc::new(Mutex::new(Vec::new()));
        let served_by = Arc::new(Mutex::new(BTreeSet::new()));
        let clients = (0..clients)
            .map(|_| {
                let (stop, ok, failures, served_by) = (
                    stop.clone(),
                    ok.clone(),
                    failures.clone(),
                    served_by.clone(),
                );
                std::thread::spawn(move || {
                    // Bounded: a client never sends more than this many requests.
                    for _ in 0..50_000 {
                        if stop.load(Ordering::Relaxed) {
                            return;
                        }
                        match get(port, "/") {
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
fn sigterm_lets_requests_in_flight_complete() {
    let mut program = Program::start(
        env!("CARGO_BIN_EXE_http_fixture"),
        &[("CLUSTER_WORKERS", "2")],
    );
    let (_, _, port) = program.worker();
    program.worker();
    let slow = std::thread::spawn(move || get(port, "/delay/1500"));
    program.line("delaying ");
    program.signal(libc::SIGTERM);
    let (status, body) = slow
        .join()
        .unwrap()
        .expect("the request in flight completed");
    assert_eq!(status, 200, "{body}");
    assert!(program.wait().success(), "{}", program.stderr());
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
            .contains("the replacement exited before listening"),
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
