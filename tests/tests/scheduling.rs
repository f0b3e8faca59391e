//! Scheduling by open connections, with real processes and sockets: least-outstanding keeps new
//! connections away from a busy worker, and a per-worker cap leaves the connection past it in the
//! kernel's backlog until a worker frees, without refusing or resetting it.

mod support;

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use support::program::{Program, WAIT, endpoint_port, get};

/// Takes connections with `accept_tracked`.
const FIXTURE: &str = env!("CARGO_BIN_EXE_http_fixture");
/// Serves with `cluster::axum::serve`, which reports connection ends itself.
const AXUM: &str = env!("CARGO_BIN_EXE_axum_fixture");

/// Sends `GET path` on a new connection (`Connection: close`) and returns the connection, to
/// read the answer from later.
fn send(port: u16, path: &str) -> TcpStream {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    stream.set_read_timeout(Some(WAIT)).unwrap();
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n"
    )
    .expect("send the request");
    stream
}

/// The status and body of the answer on `stream` (read to its end: a reset is an error).
fn answer(mut stream: TcpStream) -> (u16, String) {
    let mut response = String::new();
    stream
        .read_to_string(&mut response)
        .expect("read the answer (no reset, no timeout)");
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("malformed answer {response:?}"));
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.trim().to_owned())
        .unwrap_or_default();
    (status, body)
}

/// `cluster_worker_outstanding` per worker id, from the primary's metrics.
fn outstanding(metrics: u16) -> BTreeMap<u64, u64> {
    let (status, body) = get(metrics, "/metrics").expect("metrics");
    assert_eq!(status, 200);
    body.lines()
        .filter_map(|line| line.strip_prefix("cluster_worker_outstanding{worker=\""))
        .map(|rest| {
            let (id, value) = rest.split_once("\"} ").expect("a sample");
            (id.parse().unwrap(), value.trim().parse().unwrap())
        })
        .collect()
}

/// Waits (bounded) until the primary counts exactly `expected` open connections per worker.
fn wait_outstanding(metrics: u16, expected: &BTreeMap<u64, u64>) {
    let deadline = Instant::now() + WAIT;
    loop {
        let now = outstanding(metrics);
        if &now == expected {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "outstanding stayed {now:?}, expected {expected:?}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The worker id in a `delaying <id> <ms>` line.
fn delaying(program: &mut Program) -> u64 {
    let line = program.line("delaying ");
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

#[test]
fn least_outstanding_sends_new_connections_to_the_workers_not_busy() {
    let mut program = Program::start(
        FIXTURE,
        &[
            ("CLUSTER_WORKERS", "3"),
            ("CLUSTER_SCHED_POLICY", "least-outstanding"),
            ("CLUSTER_METRICS_ADDR", "127.0.0.1:0"),
        ],
    );
    let workers = [program.worker(), program.worker(), program.worker()];
    let port = workers[0].2;
    let metrics = endpoint_port(&program);
    // One worker is held busy by a slow request.
    let slow = send(port, "/delay/60000");
    let busy = delaying(&mut program);
    let expected: BTreeMap<u64, u64> = workers
        .iter()
        .map(|(id, ..)| (*id, u64::from(*id == busy)))
        .collect();
    let mut served = BTreeMap::<String, usize>::new();
    for _ in 0..12 {
        // Each request starts once the last one's end was reported: one open connection, the
        // busy worker's. Round robin would send every third request to it.
        wait_outstanding(metrics, &expected);
        let (status, body) = get(port, "/").expect("request");
        assert_eq!(status, 200);
        assert_ne!(body, format!("worker {busy}"), "sent to the busy worker");
        *served.entry(body).or_default() += 1;
    }
    // Ties go in turn: both idle workers served.
    assert_eq!(served.len(), 2, "{served:?}");
    drop(slow);
}

#[test]
fn past_the_per_worker_cap_a_connection_waits_in_the_backlog_until_one_ends() {
    past_the_cap(FIXTURE);
}

#[test]
fn the_serve_helpers_report_connection_ends_for_the_cap() {
    past_the_cap(AXUM);
}

/// With `fixture`'s two workers at a cap of one connection each, a third connection is served
/// once one of theirs ends, by that worker.
fn past_the_cap(fixture: &str) {
    let mut program = Program::start(
        fixture,
        &[
            ("CLUSTER_WORKERS", "2"),
            ("CLUSTER_MAX_CONNECTIONS_PER_WORKER", "1"),
            ("CLUSTER_METRICS_ADDR", "127.0.0.1:0"),
        ],
    );
    let workers = [program.worker(), program.worker()];
    let port = workers[0].2;
    let metrics = endpoint_port(&program);
    // Each worker at its cap: one ends in 2 s, the other holds on.
    let ending = send(port, "/delay/2000");
    let first = delaying(&mut program);
    let held = send(port, "/delay/60000");
    let second = delaying(&mut program);
    assert_ne!(first, second, "a worker got more than its cap");
    let both: BTreeMap<u64, u64> = [(first, 1), (second, 1)].into();
    wait_outstanding(metrics, &both);
    // The third connection is completed by the kernel and waits in the backlog: not served
    // before the first worker frees, not refused, not reset.
    let sent = Instant::now();
    let waiting = send(port, "/");
    let (status, body) = answer(waiting);
    let waited = sent.elapsed();
    assert_eq!(status, 200);
    assert_eq!(body, format!("worker {first}"), "served past a cap");
    assert!(
        waited >= Duration::from_secs(1),
        "served after {waited:?}, while both workers were at their cap"
    );
    assert_eq!(answer(ending).0, 200);
    // Nobody is over the cap, and the held connection is still counted.
    let now = outstanding(metrics);
    assert!(now.values().all(|open| *open <= 1), "{now:?}");
    assert_eq!(now.get(&second), Some(&1), "{now:?}");
    drop(held);
}

#[test]
fn a_cap_of_zero_is_refused_at_start_naming_the_variable() {
    let mut program = Program::start(FIXTURE, &[("CLUSTER_MAX_CONNECTIONS_PER_WORKER", "0")]);
    let status = program.wait();
    assert_eq!(status.code(), Some(78), "{}", program.stderr());
    // Bounded: the pipe may still be read after the exit.
    program.wait_for_log("CLUSTER_MAX_CONNECTIONS_PER_WORKER=\"0\" is not valid");
}
