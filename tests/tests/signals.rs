//! Signals an operator sends out of habit, under load: SIGUSR1 (logrotate's "reopen your logs")
//! is passed on to the workers, who survive it; SIGUSR2 (the "upgrade" of nginx and gunicorn) is
//! ignored with a warning; a storm of either kills nothing and logs once a second at most;
//! SIGQUIT (nginx's "graceful stop") drains and exits 0. No request fails meanwhile.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Instant;

use support::program::{Program, get};

#[test]
fn habitual_signals_kill_nothing_and_fail_no_request() {
    let mut program = Program::start(env!("CARGO_BIN_EXE_http_fixture"), &[("RUST_LOG", "info")]);
    let (_, first, port) = program.worker();
    let (_, second, _) = program.worker();
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let load = {
        let (stop, ok, failed) = (stop.clone(), ok.clone(), failed.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                match get(port, "/") {
                    Ok((200, _)) => ok.fetch_add(1, Ordering::Relaxed),
                    _ => failed.fetch_add(1, Ordering::Relaxed),
                };
            }
        })
    };
    program.signal(libc::SIGUSR1);
    program.wait_for_log("passing the signal on to the workers");
    program.signal(libc::SIGUSR2);
    program.wait_for_log("SIGUSR2: ignored");
    // A storm: a thousand of each as fast as they go.
    let storm = Instant::now();
    for _ in 0..1000 {
        program.signal(libc::SIGUSR1);
        program.signal(libc::SIGUSR2);
    }
    let seconds = storm.elapsed().as_secs() as usize;
    // Both still serve: the primary's answer comes after every signal above was handled.
    for _ in 0..4 {
        assert_eq!(get(port, "/").unwrap().0, 200);
    }
    assert!(program.is_running());
    for worker in [first, second] {
        assert!(
            cluster_tests::signal(worker, 0).is_ok(),
            "worker {worker} died: {}",
            program.stderr()
        );
    }
    let log = program.stderr();
    assert!(!log.contains("worker exited"), "{log}");
    let lines = log.matches("passing the signal on").count();
    assert!(
        lines <= seconds + 3,
        "{lines} lines in {seconds} s of storm"
    );
    stop.store(true, Ordering::Relaxed);
    load.join().unwrap();
    let failed = failed.load(Ordering::Relaxed);
    assert_eq!(
        failed,
        0,
        "{failed} failed of {}",
        ok.load(Ordering::Relaxed)
    );
    program.signal(libc::SIGQUIT);
    assert!(program.wait().success(), "{}", program.stderr());
    program.wait_for_log("SIGQUIT: a graceful stop");
}
