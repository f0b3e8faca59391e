//! A privileged port is `PermissionDenied` in the worker (reference scenario 15). As root, the
//! whole program runs as `nobody`, for whom ports below 1024 are privileged.

use std::io::Read;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::Duration;

#[test]
fn privileged_port_is_permission_denied_in_the_worker() {
    let mut command = Command::new(env!("CARGO_BIN_EXE_primary_fixture"));
    command
        .env("CLUSTER_WORKERS", "1")
        .env("ADDR", "127.0.0.1:42")
        .env("RUST_LOG", "warn");
    command.stdout(Stdio::null()).stderr(Stdio::piped());
    if std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .any(|l| l.starts_with("Uid:\t0\t"))
    {
        command.uid(65534).gid(65534);
    }
    let mut primary = command.spawn().expect("spawn");
    let status = cluster_tests::wait_for_exit(&mut primary, Duration::from_secs(20));
    let mut stderr = String::new();
    primary
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    // The worker's bind failed with EACCES, it returned the error and exited 1; with no worker
    // left the primary reports it and exits non-zero.
    assert!(!status.success(), "{stderr}");
    assert!(stderr.contains("Permission denied"), "{stderr}");
}
