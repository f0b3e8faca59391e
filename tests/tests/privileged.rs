//! A privileged port is `PermissionDenied` in the worker (reference scenario 15). As root, the
//! whole program runs as `nobody`, for whom ports below 1024 are privileged.

use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::Duration;

#[test]
fn privileged_port_is_permission_denied_in_the_worker() {
    let is_root = cluster_tests::is_root();
    let fixture = std::path::Path::new(env!("CARGO_BIN_EXE_primary_fixture"));
    let (scratch, program) = if is_root {
        let (dir, copy) = cluster_tests::copy_for_nobody(fixture, "privileged");
        (Some(dir), copy)
    } else {
        (None, fixture.to_path_buf())
    };
    let mut command = Command::new(&program);
    command
        .env("CLUSTER_WORKERS", "1")
        .env("ADDR", "127.0.0.1:42")
        .env("RUST_LOG", "warn")
        .current_dir(std::env::temp_dir());
    command.stdout(Stdio::null()).stderr(Stdio::piped());
    if is_root {
        command.uid(65534).gid(65534);
    }
    let mut primary = command.spawn().expect("spawn");
    let status = cluster_tests::wait_for_exit(&mut primary, Duration::from_secs(20));
    let stderr = cluster_tests::read_all(primary.stderr.take());
    // The worker's bind failed with EACCES, it returned the error and exited 1; with no worker
    // left the primary reports it and exits non-zero.
    if let Some(scratch) = scratch {
        let _ = std::fs::remove_dir_all(scratch);
    }
    assert!(!status.success(), "{stderr}");
    assert!(stderr.contains("Permission denied"), "{stderr}");
}
