//! The cluster where services run in containers: the shutdown delay that replaces a `preStop`
//! sleep (`/readyz` fails at once on SIGTERM, the cluster serves on for the delay, then drains).

mod support;

use std::time::{Duration, Instant};

use support::program::{Program, WAIT, get};

/// The port the primary logged for its endpoint.
fn endpoint_port(program: &Program) -> u16 {
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

/// `http_fixture` with two workers, its endpoint on a free port and the shutdown delay given;
/// returns it with the endpoint's port and the workers' port once both listen and `/readyz`
/// says ready.
fn start(delay: &str) -> (Program, u16, u16) {
    let mut program = Program::start(
        env!("CARGO_BIN_EXE_http_fixture"),
        &[
            ("CLUSTER_WORKERS", "2"),
            ("CLUSTER_METRICS_ADDR", "127.0.0.1:0"),
            ("CLUSTER_SHUTDOWN_DELAY", delay),
            ("RUST_LOG", "info"),
        ],
    );
    let app = program.worker().2;
    program.worker();
    let endpoint = endpoint_port(&program);
    wait_readyz(endpoint, 200);
    (program, endpoint, app)
}

/// Waits (bounded) until `/readyz` answers `expected`.
fn wait_readyz(port: u16, expected: u16) {
    let deadline = Instant::now() + WAIT;
    loop {
        let (status, body) = get(port, "/readyz").unwrap();
        if status == expected {
            return;
        }
        assert!(Instant::now() < deadline, "/readyz stayed {status}: {body}");
        std::thread::yield_now();
    }
}

#[test]
fn on_sigterm_readyz_fails_at_once_and_the_cluster_serves_through_the_delay() {
    let delay = Duration::from_secs(3);
    let (mut program, endpoint, app) = start("3s");
    program.signal(libc::SIGTERM);
    let signalled = Instant::now();
    wait_readyz(endpoint, 503);
    let unready_after = signalled.elapsed();
    // Connections that a load balancer still sends meanwhile are all served.
    let mut served = 0;
    while signalled.elapsed() < delay / 2 {
        let (status, body) = get(app, "/").expect("served during the delay");
        assert_eq!(status, 200, "{body}");
        served += 1;
    }
    assert!(program.is_running(), "still serving during the delay");
    let status = program.wait();
    let stopped_after = signalled.elapsed();
    assert!(status.success(), "{status:?}: {}", program.stderr());
    assert!(
        stopped_after >= delay,
        "stopped {stopped_after:?} after SIGTERM, within the delay"
    );
    let log = program.stderr();
    assert!(
        log.contains("the shutdown delay is over: draining"),
        "{log}"
    );
    eprintln!(
        "/readyz failed {unready_after:?} after SIGTERM; {served} requests served during the \
         delay; stopped {stopped_after:?} after SIGTERM"
    );
}

#[test]
fn a_second_sigterm_skips_the_rest_of_the_delay() {
    let (mut program, endpoint, app) = start("10m");
    program.signal(libc::SIGTERM);
    wait_readyz(endpoint, 503);
    assert_eq!(get(app, "/").unwrap().0, 200, "serving during the delay");
    program.signal(libc::SIGTERM);
    // Bounded by WAIT, far below the ten minutes of the delay.
    let status = program.wait();
    assert!(status.success(), "{status:?}: {}", program.stderr());
    assert!(
        program
            .stderr()
            .contains("the rest of the shutdown delay skipped")
    );
}

#[test]
fn a_malformed_shutdown_delay_stops_the_program_naming_it() {
    for bad in ["5", "-1s", "5 s", "25h", ""] {
        let mut program = Program::start(
            env!("CARGO_BIN_EXE_http_fixture"),
            &[("CLUSTER_WORKERS", "1"), ("CLUSTER_SHUTDOWN_DELAY", bad)],
        );
        let status = program.wait();
        assert_eq!(status.code(), Some(78), "{bad:?}: {}", program.stderr());
        // The line names the variable and the value (read as the pipe delivers it).
        program.wait_for_log(&format!("CLUSTER_SHUTDOWN_DELAY={bad:?}"));
    }
}
