//! A privileged port is `PermissionDenied` in the worker (reference scenario 15). As root, the
//! whole program runs as `nobody`, for whom ports below 1024 are privileged.

use std::io::Read;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::Duration;

#[test]
fn privileged_port_is_permission_denied_in_the_worker() {
    let is_root = std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .any(|l| l.starts_with("Uid:\t0\t"));
    // `nobody` may not reach the build tree (a clone in a 0700 directory): run a copy of the
    // binary from a directory everyone can enter.
    let scratch = std::env::temp_dir().join(format!("cluster-privileged-{}", std::process::id()));
    let program = if is_root {
        use std::os::unix::fs::PermissionsExt;
        std::fs::create_dir_all(&scratch).unwrap();
        std::fs::set_permissions(&scratch, std::fs::Permissions::from_mode(0o755)).unwrap();
        let copy = scratch.join("primary_fixture");
        std::fs::copy(env!("CARGO_BIN_EXE_primary_fixture"), &copy).unwrap();
        std::fs::set_permissions(&copy, std::fs::Permissions::from_mode(0o755)).unwrap();
        copy
    } else {
        env!("CARGO_BIN_EXE_primary_fixture").into()
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
    let mut stderr = String::new();
    primary
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    // The worker's bind failed with EACCES, it returned the error and exited 1; with no worker
    // left the primary reports it and exits non-zero.
    let _ = std::fs::remove_dir_all(&scratch);
    assert!(!status.success(), "{stderr}");
    assert!(stderr.contains("Permission denied"), "{stderr}");
}
