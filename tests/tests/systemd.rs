//! The primary under systemd, with the test as the service manager: state notifications on a
//! `NOTIFY_SOCKET` the test listens on, and socket activation with a socket the test passes at
//! fd 3. The program is `http_fixture` with its 2 workers.

mod support;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::UnixDatagram;
use std::path::PathBuf;
use std::process::Command;
use std::time::Instant;

use support::program::{Program, WAIT, get};

const FIXTURE: &str = env!("CARGO_BIN_EXE_http_fixture");

/// What the test plays: the receiving end of `NOTIFY_SOCKET`.
struct Manager {
    socket: UnixDatagram,
    /// `NOTIFY_SOCKET`.
    address: String,
    /// The socket's file, if it has one.
    file: Option<PathBuf>,
    /// Every message received, in order.
    seen: Vec<String>,
}

impl Manager {
    fn new(tag: &str) -> Self {
        let path =
            std::env::temp_dir().join(format!("cluster-notify-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let socket = UnixDatagram::bind(&path).expect("bind the notify socket");
        Self {
            socket,
            address: path.to_str().expect("a UTF-8 temp dir").to_owned(),
            file: Some(path),
            seen: Vec::new(),
        }
    }

    /// On an abstract socket (`@name`), as systemd's own notify socket may be.
    fn new_abstract(tag: &str) -> Self {
        use std::os::linux::net::SocketAddrExt;
        let name = format!("cluster-notify-{tag}-{}", std::process::id());
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(&name).unwrap();
        let socket = UnixDatagram::bind_addr(&addr).expect("bind the notify socket");
        Self {
            socket,
            address: format!("@{name}"),
            file: None,
            seen: Vec::new(),
        }
    }

    fn path(&self) -> &str {
        &self.address
    }

    /// The next message with the line `line` (the others are skipped, and kept in `seen`).
    fn expect(&mut self, line: &str) -> String {
        let deadline = Instant::now() + WAIT;
        let mut buf = [0; 4096];
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(!left.is_zero(), "no `{line}`; received {:?}", self.seen);
            self.socket.set_read_timeout(Some(left)).unwrap();
            let n = self
                .socket
                .recv(&mut buf)
                .unwrap_or_else(|e| panic!("no `{line}` ({e}); received {:?}", self.seen));
            let message = String::from_utf8_lossy(&buf[..n]).into_owned();
            self.seen.push(message.clone());
            if message.lines().any(|l| l == line) {
                return message;
            }
        }
    }

    /// The state changes received so far, in order (`READY=1`, `RELOADING=1`, `STOPPING=1`).
    fn states(&self) -> Vec<&str> {
        self.seen
            .iter()
            .flat_map(|m| m.lines())
            .filter(|l| ["READY=1", "RELOADING=1", "STOPPING=1"].contains(l))
            .collect()
    }
}

impl Drop for Manager {
    fn drop(&mut self) {
        if let Some(file) = &self.file {
            let _ = std::fs::remove_file(file);
        }
    }
}

/// The value of `key` in a notification.
fn field<'a>(message: &'a str, key: &str) -> Option<&'a str> {
    message
        .lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix('='))
}

/// The service manager's variables found in process `pid`'s environment.
fn systemd_vars(pid: u32) -> Vec<String> {
    let environ = std::fs::read(format!("/proc/{pid}/environ")).expect("read the environment");
    environ
        .split(|b| *b == 0)
        .map(|v| String::from_utf8_lossy(v).into_owned())
        .filter(|v| {
            v.starts_with("LISTEN_")
                || v.starts_with("NOTIFY_SOCKET=")
                || v.starts_with("WATCHDOG_")
        })
        .collect()
}

/// Whether process `pid` has an fd on the socket with inode `inode`.
fn holds_socket(pid: u32, inode: u64) -> bool {
    let wanted = format!("socket:[{inode}]");
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("list the fds")
        .flatten()
        .any(|fd| std::fs::read_link(fd.path()).is_ok_and(|l| l.as_os_str() == wanted.as_str()))
}

/// `http_fixture` run as systemd runs a socket-activated service: `LISTEN_PID` is its own pid
/// (set by a shell that then `exec`s it, so the pid is the same), `fd` at fd 3.
fn activated(fd: &impl AsRawFd, env: &[(&str, &str)]) -> Command {
    let mut command = Command::new("/bin/sh");
    command
        .arg("-c")
        .arg(r#"LISTEN_PID=$$ exec "$0" "$@""#)
        .arg(FIXTURE)
        .envs(env.iter().copied());
    cluster_tests::pass_fd(&mut command, fd.as_raw_fd(), 3);
    command
}

#[test]
fn ready_reloading_ready_stopping_with_status_and_watchdog() {
    let mut manager = Manager::new("states");
    let mut program = Program::start(
        FIXTURE,
        &[
            ("NOTIFY_SOCKET", manager.path()),
            // A pet every 100 ms.
            ("WATCHDOG_USEC", "200000"),
        ],
    );
    let ready = manager.expect("READY=1");
    assert_eq!(
        field(&ready, "STATUS"),
        Some("2 workers serving, generation 1"),
        "{ready:?}"
    );
    let workers = [program.worker(), program.worker()];
    let (status, _) = get(workers[0].2, "/").expect("served once ready");
    assert_eq!(status, 200);
    manager.expect("WATCHDOG=1");
    for (_, pid, _) in workers {
        assert_eq!(systemd_vars(pid), Vec::<String>::new(), "worker {pid}");
    }

    let before = cluster_tests::monotonic_usec();
    program.signal(libc::SIGHUP);
    let reloading = manager.expect("RELOADING=1");
    let after = cluster_tests::monotonic_usec();
    let stamp: u64 = field(&reloading, "MONOTONIC_USEC")
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no MONOTONIC_USEC in {reloading:?}"));
    assert!(
        (before..=after).contains(&stamp),
        "MONOTONIC_USEC {stamp} not within [{before}, {after}]"
    );
    assert!(field(&reloading, "STATUS").is_some(), "{reloading:?}");
    let reloaded = manager.expect("READY=1");
    let status = field(&reloaded, "STATUS").unwrap_or_default();
    assert!(status.starts_with("reload complete"), "{reloaded:?}");
    // The replacements, so that they are killed if the test fails from here on.
    program.worker();
    program.worker();

    program.signal(libc::SIGTERM);
    let stopping = manager.expect("STOPPING=1");
    assert!(field(&stopping, "STATUS").is_some(), "{stopping:?}");
    assert!(program.wait().success());
    assert_eq!(
        manager.states(),
        ["READY=1", "RELOADING=1", "READY=1", "STOPPING=1"]
    );
}

#[test]
fn a_failed_reload_still_ends_with_ready_and_says_why() {
    let mut manager = Manager::new_abstract("failed-reload");
    let fail_if = std::env::temp_dir().join(format!("cluster-systemd-fail-{}", std::process::id()));
    let _ = std::fs::remove_file(&fail_if);
    let mut program = Program::start(
        FIXTURE,
        &[
            ("NOTIFY_SOCKET", manager.path()),
            ("FIXTURE_FAIL_IF", fail_if.to_str().unwrap()),
        ],
    );
    manager.expect("READY=1");
    let (_, _, port) = program.worker();
    program.worker();
    // A bad deploy: the replacements exit at boot.
    std::fs::write(&fail_if, "").unwrap();
    program.signal(libc::SIGHUP);
    let reloading = manager.expect("RELOADING=1");
    assert!(
        field(&reloading, "EXTEND_TIMEOUT_USEC").is_some(),
        "{reloading:?}"
    );
    let ready = manager.expect("READY=1");
    let _ = std::fs::remove_file(&fail_if);
    let status = field(&ready, "STATUS").unwrap_or_default();
    assert!(
        status.starts_with("reload aborted, the old workers keep serving:"),
        "{ready:?}"
    );
    assert_eq!(get(port, "/").expect("the old workers serve").0, 200);
    program.signal(libc::SIGTERM);
    manager.expect("STOPPING=1");
    assert!(program.wait().success());
}

#[test]
fn a_sighup_during_a_reload_keeps_systemd_waiting_for_the_one_it_queued() {
    let mut manager = Manager::new("queued");
    let mut program = Program::start(
        FIXTURE,
        &[
            ("NOTIFY_SOCKET", manager.path()),
            ("FIXTURE_BOOT_DELAY_MS", "300"),
        ],
    );
    manager.expect("READY=1");
    program.worker();
    program.worker();
    program.signal(libc::SIGHUP);
    manager.expect("RELOADING=1");
    // The reload waits for its first replacement, which takes 300 ms to start: this one comes
    // during it, as a `systemctl reload` right after a deploy would.
    program.signal(libc::SIGHUP);
    let done = manager.expect("READY=1");
    let status = field(&done, "STATUS").unwrap_or_default();
    assert!(status.starts_with("reload complete"), "{done:?}");
    // `READY=1` only at the end of the queued reload: a second `systemctl reload` does not
    // return before its own reload ran.
    assert_eq!(
        manager.states(),
        ["READY=1", "RELOADING=1", "RELOADING=1", "READY=1"]
    );
    // The replacements of both reloads, so that they are cleaned up.
    for _ in 0..4 {
        program.worker();
    }
    program.signal(libc::SIGTERM);
    manager.expect("STOPPING=1");
    assert!(program.wait().success());
}

#[test]
fn socket_activation_serves_the_passed_socket_and_its_queue() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let inode = std::fs::metadata(format!("/proc/self/fd/{}", listener.as_raw_fd()))
        .unwrap()
        .ino();
    // Waits in the backlog until the program is there to accept it.
    let mut early = TcpStream::connect(addr).unwrap();
    early.set_read_timeout(Some(WAIT)).unwrap();
    write!(
        early,
        "GET / HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n"
    )
    .unwrap();

    let mut manager = Manager::new("activation");
    let address = addr.to_string();
    let mut program = Program::spawn(activated(
        &listener,
        &[
            ("LISTEN_FDS", "1"),
            ("LISTEN_FDNAMES", "web"),
            ("ADDR", &address),
            ("NOTIFY_SOCKET", manager.path()),
            ("WATCHDOG_USEC", "60000000"),
        ],
    ));
    let workers = [program.worker(), program.worker()];
    for (_, _, port) in workers {
        assert_eq!(port, addr.port());
    }
    let mut response = String::new();
    early.read_to_string(&mut response).unwrap();
    assert!(response.starts_with("HTTP/1.1 200"), "{response:?}");
    for _ in 0..4 {
        let (status, body) = get(addr.port(), "/").expect("served");
        assert_eq!(status, 200);
        assert!(body.starts_with("worker "), "{body:?}");
    }
    manager.expect("READY=1");
    program.wait_for_log("listening on a socket systemd passed");
    for (_, pid, _) in workers {
        assert_eq!(systemd_vars(pid), Vec::<String>::new(), "worker {pid}");
        // Round robin: the primary accepts; a worker has no copy of the listening socket.
        assert!(
            !holds_socket(pid, inode),
            "worker {pid} inherited the socket"
        );
    }
    program.signal(libc::SIGTERM);
    assert!(program.wait().success());
}

#[test]
fn a_passed_socket_is_found_by_its_name() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let mut program = Program::spawn(activated(
        &listener,
        &[
            ("LISTEN_FDS", "1"),
            ("LISTEN_FDNAMES", "web"),
            ("ADDR", "name:web"),
        ],
    ));
    for _ in 0..2 {
        let (_, _, bound) = program.worker();
        assert_eq!(bound, port);
    }
    for _ in 0..4 {
        assert_eq!(get(port, "/").expect("served").0, 200);
    }
    program.signal(libc::SIGTERM);
    assert!(program.wait().success());

    // A name nobody passed: the primary stops at once, naming it.
    let mut program = Program::spawn(activated(
        &listener,
        &[
            ("LISTEN_FDS", "1"),
            ("LISTEN_FDNAMES", "web"),
            ("ADDR", "name:admin"),
        ],
    ));
    let status = program.wait();
    assert!(!status.success());
    let log = program.stderr();
    assert!(log.contains("the socket named admin"), "{log}");
    assert!(log.contains("no socket of that name was passed"), "{log}");
}

#[test]
fn listen_pid_of_another_process_is_ignored() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let mut command = Command::new(FIXTURE);
    command.envs([("LISTEN_FDS", "1"), ("LISTEN_PID", "1")]);
    cluster_tests::pass_fd(&mut command, listener.as_raw_fd(), 3);
    let mut program = Program::spawn(command);
    // The program binds its own port.
    let (_, pid, port) = program.worker();
    assert_ne!(port, listener.local_addr().unwrap().port());
    assert_eq!(get(port, "/").expect("served").0, 200);
    program.wait_for_log("LISTEN_FDS is meant for another process");
    assert_eq!(systemd_vars(pid), Vec::<String>::new());
    program.worker();
    program.signal(libc::SIGTERM);
    assert!(program.wait().success());
}

#[test]
fn a_passed_fd_that_is_not_a_socket_is_not_trusted() {
    let file = std::fs::File::open("/dev/null").unwrap();
    // Two names for one fd: the names are ignored too.
    let mut program = Program::spawn(activated(
        &file,
        &[("LISTEN_FDS", "1"), ("LISTEN_FDNAMES", "web:admin")],
    ));
    let (_, _, port) = program.worker();
    assert_eq!(get(port, "/").expect("served").0, 200);
    program.wait_for_log("not an open socket");
    program.wait_for_log("LISTEN_FDNAMES does not name every socket");
    program.worker();
    program.signal(libc::SIGTERM);
    assert!(program.wait().success());
}
