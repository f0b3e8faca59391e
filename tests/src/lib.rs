//! Multi-process tests of `cluster`.
//!
//! Most tests are the primary themselves: they start a [`cluster::Primary`] whose workers run the
//! `fixture` binary, and drive each worker with [`Command`]s sent as cluster messages; the
//! fixture answers with [`Reply`]s. `primary_fixture` is a whole clustered program, for tests
//! that need the primary in another process (its death, its signals).

use serde::{Deserialize, Serialize};

/// What a test asks a fixture worker to do.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum Command {
    /// Bind `addr`. Every connection is answered with `"<worker id>\n"` and a FIN, and held until
    /// the client closes it. On shutdown the worker stops accepting and exits once every
    /// connection it accepted has been closed by its client.
    Listen {
        /// Passed to `ClusterListener::bind`.
        addr: String,
    },
    /// Stop calling `accept` on listener `index` (connections handed over queue up in it).
    Pause {
        /// Which listener.
        index: usize,
    },
    /// Accept on listener `index` again.
    Resume {
        /// Which listener.
        index: usize,
    },
    /// Drop listener number `index` (counted in `Listen` order).
    Close {
        /// Which listener.
        index: usize,
    },
    /// Report an environment variable and the working directory.
    Env {
        /// The variable's name.
        name: String,
    },
    /// Block the worker's runtime for `ms` milliseconds (a hung worker).
    Block {
        /// How long.
        ms: u64,
    },
    /// Exit the process at once with `code`.
    Exit {
        /// The exit code.
        code: i32,
    },
    /// Leave the cluster on purpose, then exit 0.
    Disconnect,
    /// Connect to the Unix socket at `report` now; when the worker is asked to leave
    /// (`shutdown()` resolves) write `"shutdown connected=<is_connected>\n"`, and when the link
    /// to the primary closes `"disconnected connected=<is_connected>
    /// shutting_down=<is_shutting_down> ms_left=<Some(ms)|None>\n"`, `ms_left` being what is left
    /// of `leave_deadline()` (the link is closed then, so the test learns of it another way).
    /// Each listener's accept loop holds the link (`Worker::hold_link`) until its connections
    /// are done.
    WatchLink {
        /// A Unix stream socket the test listens on.
        report: String,
    },
    /// Send `Reply::Numbered` with a `size`-byte payload and a UDP socket attached, then return
    /// from `main` at once (the worker's listeners are dropped unwaited).
    SendAndReturn {
        /// Payload size.
        size: usize,
    },
    /// Serve `GET /delay/<ms>` (answered `worker <id>` after `ms` milliseconds) on
    /// 127.0.0.1:0 with `cluster::axum::serve`, and nothing else on that listener; replies
    /// `Listening { index: 0, port }`, and `Delaying { ms }` when a request arrives. On leaving, `main` returns only once the link has closed:
    /// the serve helper's end of drain must close it.
    ServeAxum,
    /// Like `Listen`, with a listener of another kind or with options.
    ListenSpec(Listen),
    /// Bind a UDP socket that answers every datagram with `"worker <id>: <payload>"`.
    Udp {
        /// Where.
        target: UdpTarget,
        /// Options.
        options: Options,
    },
    /// Start a UDP bind and drop it at once, before the primary's answer; then report the
    /// worker's open fd count once the answer has come and gone.
    UdpCancelled {
        /// Where.
        addr: String,
    },
    /// Report this process's open fd count.
    CountFds,
    /// Send `count` messages `Reply::Numbered` of `size` bytes each to the primary, in order.
    Flood {
        /// How many.
        count: u32,
        /// Payload size.
        size: usize,
    },
    /// One of a numbered series; the worker checks the order and reports it on `Check`.
    Numbered {
        /// Its place in the series, from 0.
        index: u32,
        /// Filler.
        #[serde(with = "serde_bytes")]
        payload: Vec<u8>,
    },
    /// Report how many `Numbered` arrived and whether in order.
    Check,
    /// Ask the primary `text` as a request and report its answer, or the `io::ErrorKind` of its
    /// error (`"TimedOut"`), as `Reply::Answer`.
    Ask {
        /// The question.
        text: String,
        /// The request's timeout.
        timeout_ms: u64,
    },
    /// Sent as a request by the primary: answered with `Reply::Answer` `"<id>: <text>"`, refused
    /// if `text` is `"refuse"`, dropped unanswered if it is `"drop"`.
    Question {
        /// The question.
        text: String,
    },
    /// Comes with a TCP stream: the worker writes `"<id>\n"` to it, and sends a UDP socket back
    /// with `Reply::Handle` for each of `send_back` (sent while the primary keeps sending).
    Handle {
        /// How many handles the worker sends back, starting when the first `Handle` arrives.
        send_back: u32,
    },
}

/// Where a `ListenSpec` listens.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum Listen {
    /// `ClusterListener::bind_with`.
    Tcp {
        /// The address.
        addr: String,
        /// Options.
        options: Options,
    },
    /// `ClusterUnixListener::bind_with`.
    Unix {
        /// The path.
        path: String,
        /// Options.
        options: Options,
    },
    /// `ClusterListener::from_primary_fd` (or the Unix one with `unix`).
    PrimaryFd {
        /// The primary's fd.
        fd: i32,
        /// Whether it is a Unix socket.
        unix: bool,
    },
    /// `ClusterListener::from_std` of a listener the worker binds itself.
    Own {
        /// The address.
        addr: String,
    },
}

/// Where a `Udp` socket binds.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum UdpTarget {
    /// `ClusterUdpSocket::bind_with`.
    Addr(String),
    /// `ClusterUdpSocket::from_primary_fd`.
    PrimaryFd(i32),
}

/// `ListenOptions`, as data.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize)]
#[allow(clippy::struct_excessive_bools)]
pub struct Options {
    /// Backlog.
    pub backlog: u32,
    /// `ipv6_only`.
    pub ipv6_only: bool,
    /// `reuse_addr`.
    pub reuse_addr: bool,
    /// `reuse_port`.
    pub reuse_port: bool,
    /// `exclusive`.
    pub exclusive: bool,
    /// `readable_all`.
    pub readable_all: bool,
    /// `writable_all`.
    pub writable_all: bool,
}

impl Options {
    /// As `cluster::net::ListenOptions`.
    pub fn to_listen_options(self) -> cluster::net::ListenOptions {
        cluster::net::ListenOptions::new()
            .backlog(self.backlog)
            .ipv6_only(self.ipv6_only)
            .reuse_addr(self.reuse_addr)
            .reuse_port(self.reuse_port)
            .exclusive(self.exclusive)
            .readable_all(self.readable_all)
            .writable_all(self.writable_all)
    }
}

/// What a fixture worker answers.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Reply {
    /// `Listen` succeeded.
    Listening {
        /// The listener's index.
        index: usize,
        /// Its real port.
        port: u16,
    },
    /// A `ServeAxum` server received `GET /delay/<ms>` and answers in `ms` milliseconds.
    Delaying {
        /// The delay asked for.
        ms: u64,
    },
    /// `Listen` failed.
    BindFailed {
        /// `io::ErrorKind` as text.
        kind: String,
        /// The OS error code, if any.
        errno: Option<i32>,
    },
    /// `Env`: the variable's value and the working directory.
    Env {
        /// The value, if set.
        value: Option<String>,
        /// The current directory.
        cwd: String,
    },
    /// `Pause` done.
    Paused {
        /// The listener's index.
        index: usize,
    },
    /// `Close` done.
    Closed {
        /// The listener's index.
        index: usize,
    },
    /// `Udp` bound.
    UdpBound {
        /// Its real port.
        port: u16,
    },
    /// `CountFds`, `UdpCancelled`.
    Fds {
        /// Open fds.
        count: usize,
    },
    /// One of `Flood`.
    Numbered {
        /// Its place, from 0.
        index: u32,
        /// Filler.
        #[serde(with = "serde_bytes")]
        payload: Vec<u8>,
    },
    /// `Check`.
    Checked {
        /// How many `Numbered` came.
        count: u32,
        /// Whether each came in order.
        in_order: bool,
        /// Total payload bytes.
        bytes: usize,
    },
    /// `Ask`'s result, or the answer to a `Question`.
    Answer {
        /// The answer or the error.
        result: Result<String, String>,
    },
    /// Sent with a UDP socket, for `Handle`.
    Handle {
        /// Its place, from 0.
        index: u32,
    },
}

/// Sends `signal` to process `pid` (`kill(2)`; the tests observe the OS through raw calls like
/// this one, each with its `SAFETY` comment).
///
/// # Errors
///
/// The process does not exist or may not be signalled.
pub fn signal(pid: u32, signal: i32) -> std::io::Result<()> {
    let pid = i32::try_from(pid).map_err(|_| std::io::ErrorKind::InvalidInput)?;
    // SAFETY: kill(2) has no memory-safety preconditions.
    if unsafe { libc::kill(pid, signal) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Makes `command`'s process start with at most `limit` open files (soft and hard), so that it
/// runs out of fds under load.
pub fn limit_open_files(command: &mut std::process::Command, limit: u64) {
    set_limit(command, libc::RLIMIT_NOFILE, limit);
}

/// Makes `command`'s process start with `RLIMIT_NPROC` at `limit` (soft and hard): its user
/// may then run at most `limit` processes and threads (not enforced for root).
pub fn limit_processes(command: &mut std::process::Command, limit: u64) {
    set_limit(command, libc::RLIMIT_NPROC, limit);
}

fn set_limit(command: &mut std::process::Command, resource: libc::__rlimit_resource_t, limit: u64) {
    use std::os::unix::process::CommandExt;
    // SAFETY: the hook runs between fork and exec and only calls setrlimit(2), which is
    // async-signal-safe and allocates nothing.
    unsafe {
        command.pre_exec(move || {
            let rlimit = libc::rlimit {
                rlim_cur: limit,
                rlim_max: limit,
            };
            if libc::setrlimit(resource, &rlimit) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// Sends `bytes` (and optionally `fd`) as one datagram on the inherited link at fd 3, bypassing
/// the runtime: for the `rogue` worker, which breaks the protocol on purpose.
///
/// # Errors
///
/// The send failed.
pub fn send_raw_on_link(
    bytes: &[u8],
    fd: Option<std::os::fd::BorrowedFd<'_>>,
) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let mut iov = libc::iovec {
        iov_base: bytes.as_ptr() as *mut libc::c_void,
        iov_len: bytes.len(),
    };
    #[repr(C, align(8))]
    struct Control([u8; 64]);
    let mut control = Control([0; 64]);
    // SAFETY: every pointer handed to sendmsg points into a live local buffer of the stated size;
    // the control message is built with the CMSG_* helpers inside `control`.
    unsafe {
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_iov = &raw mut iov;
        msg.msg_iovlen = 1;
        if let Some(fd) = fd {
            let space = libc::CMSG_SPACE(size_of::<libc::c_int>() as u32) as usize;
            msg.msg_control = control.0.as_mut_ptr().cast();
            msg.msg_controllen = space;
            let header = libc::CMSG_FIRSTHDR(&msg);
            (*header).cmsg_level = libc::SOL_SOCKET;
            (*header).cmsg_type = libc::SCM_RIGHTS;
            (*header).cmsg_len = libc::CMSG_LEN(size_of::<libc::c_int>() as u32) as usize;
            libc::CMSG_DATA(header)
                .cast::<libc::c_int>()
                .write_unaligned(fd.as_raw_fd());
        }
        if libc::sendmsg(3, &msg, libc::MSG_NOSIGNAL) < 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Blocks until the next datagram on the link at fd 3 and returns it (fds that came with it are
/// dropped); `None` at end of stream.
pub fn recv_raw_on_link() -> Option<Vec<u8>> {
    let mut buf = vec![0u8; 70_000];
    loop {
        // SAFETY: recv(2) into a live local buffer of the stated size.
        let n = unsafe { libc::recv(3, buf.as_mut_ptr().cast(), buf.len(), 0) };
        match n {
            0 => return None,
            n if n > 0 => {
                buf.truncate(n as usize);
                return Some(buf);
            }
            // The link is inherited non-blocking.
            _ if std::io::Error::last_os_error().kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::yield_now();
            }
            _ => return None,
        }
    }
}

/// Blocks until the link at fd 3 reaches end of stream (the primary closed it).
pub fn wait_for_link_eof() {
    let mut buf = [0u8; 70_000];
    // The link is inherited non-blocking; a blocking recv is what waits here.
    // SAFETY: fcntl on fd 3, which this process owns (the inherited link).
    unsafe {
        let flags = libc::fcntl(3, libc::F_GETFL);
        libc::fcntl(3, libc::F_SETFL, flags & !libc::O_NONBLOCK);
    }
    loop {
        // SAFETY: recv(2) into a live local buffer of the stated size.
        let n = unsafe { libc::recv(3, buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n <= 0 {
            return;
        }
    }
}

/// Shuts down the reading side of the inherited link at fd 3: the primary's sends fail with
/// `EPIPE` from now on, while what this process sends still arrives.
pub fn stop_reading_link() {
    // SAFETY: shutdown(2) on fd 3, which this process owns (the inherited link).
    let done = unsafe { libc::shutdown(3, libc::SHUT_RD) };
    assert_eq!(done, 0, "shutdown: {}", std::io::Error::last_os_error());
}

/// Waits for `child` to exit, at most `timeout`; kills it and panics past that.
pub fn wait_for_exit(
    child: &mut std::process::Child,
    timeout: std::time::Duration,
) -> std::process::ExitStatus {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            return status;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("process {} did not exit within {timeout:?}", child.id());
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

/// What a test build is stamped with: the trailer [`stamp`] appends to a copy of a binary (ELF
/// ignores bytes past its sections), so one compiled fixture makes distinct "builds".
const STAMP: &str = "\ncluster-test-build:";

/// Copies the binary `from` to `to` (mode 0755), stamped as build `version`.
///
/// # Panics
///
/// On any I/O error.
pub fn stamp(from: &std::path::Path, to: &std::path::Path, version: &str) {
    use std::os::unix::fs::PermissionsExt;
    let mut bytes = std::fs::read(from).expect("read the binary");
    bytes.extend_from_slice(STAMP.as_bytes());
    bytes.extend_from_slice(version.as_bytes());
    std::fs::write(to, bytes).expect("write the build");
    std::fs::set_permissions(to, std::fs::Permissions::from_mode(0o755)).expect("chmod");
}

/// The build this process runs, as [`stamp`] set it (`unstamped` if it was not).
pub fn build_version() -> String {
    use std::io::{Read, Seek, SeekFrom};
    let Ok(mut exe) = std::fs::File::open("/proc/self/exe") else {
        return "unstamped".to_owned();
    };
    let mut tail = Vec::new();
    let read = exe
        .seek(SeekFrom::End(-64))
        .and_then(|_| exe.read_to_end(&mut tail));
    let tail = String::from_utf8_lossy(&tail);
    match (read, tail.rsplit_once(STAMP)) {
        (Ok(_), Some((_, version))) => version.to_owned(),
        _ => "unstamped".to_owned(),
    }
}

/// Spawns `command`, trying again (for a bounded time) while its binary is "busy": a binary
/// this process just wrote may still be open in a child another test thread forked, until that
/// child's `exec` closes it.
///
/// # Panics
///
/// The spawn failed for another reason, or stayed busy.
pub fn spawn(command: &mut std::process::Command) -> std::process::Child {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        match command.spawn() {
            Err(error) if error.kind() == std::io::ErrorKind::ExecutableFileBusy => {
                assert!(std::time::Instant::now() < deadline, "{error}");
                std::thread::yield_now();
            }
            spawned => return spawned.expect("spawn"),
        }
    }
}

/// A new pseudo-terminal: (master, slave).
///
/// # Panics
///
/// If the system has no pseudo-terminal to give.
pub fn open_pty() -> (std::os::fd::OwnedFd, std::os::fd::OwnedFd) {
    use std::os::fd::FromRawFd;
    let (mut master, mut slave) = (-1, -1);
    // SAFETY: openpty writes two fds into the ints we pass; the name, termios and winsize
    // pointers may be null.
    let opened = unsafe {
        libc::openpty(
            &raw mut master,
            &raw mut slave,
            std::ptr::null_mut(),
            std::ptr::null(),
            std::ptr::null(),
        )
    };
    assert_eq!(opened, 0, "openpty: {}", std::io::Error::last_os_error());
    for fd in [master, slave] {
        // SAFETY: fcntl(F_SETFD) on an fd we own: openpty's fds are inherited by every child
        // otherwise, and a terminal stays up while any copy of its master is open.
        let set = unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
        assert_eq!(set, 0, "fcntl: {}", std::io::Error::last_os_error());
    }
    // SAFETY: openpty succeeded: both are new fds that nothing else owns.
    unsafe {
        (
            std::os::fd::OwnedFd::from_raw_fd(master),
            std::os::fd::OwnedFd::from_raw_fd(slave),
        )
    }
}

/// Runs `command` as a terminal program: in a session of its own whose controlling terminal is
/// its stdin (set that to a pty's slave), as a shell would start it in a terminal window. SIGHUP
/// is back to its default there, as a shell leaves it: a test run under `nohup` (which the
/// program honours: it then outlives its terminal) must not pass that on.
pub fn in_terminal_session(command: &mut std::process::Command) {
    use std::os::unix::process::CommandExt;
    // SAFETY: the hook runs between fork and exec and only calls signal(2), setsid(2) and
    // ioctl(2), which are async-signal-safe and allocate nothing.
    unsafe {
        command.pre_exec(|| {
            if libc::signal(libc::SIGHUP, libc::SIG_DFL) == libc::SIG_ERR
                || libc::setsid() < 0
                || libc::ioctl(0, libc::TIOCSCTTY, 0) < 0
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// Whether this process runs as root.
pub fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .expect("/proc/self/status")
        .lines()
        .any(|l| l.starts_with("Uid:\t0\t"))
}

/// A copy of `binary` that user `nobody` can run, in a new directory everyone can enter (a
/// clone of the project in a 0700 directory is out of `nobody`'s reach): (directory, copy).
/// Remove the directory when done.
///
/// # Panics
///
/// On any I/O error.
pub fn copy_for_nobody(
    binary: &std::path::Path,
    tag: &str,
) -> (std::path::PathBuf, std::path::PathBuf) {
    use std::os::unix::fs::PermissionsExt;
    let dir = std::env::temp_dir().join(format!("cluster-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("create the directory");
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let copy = dir.join(binary.file_name().expect("a file name"));
    std::fs::copy(binary, &copy).expect("copy the binary");
    std::fs::set_permissions(&copy, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    (dir, copy)
}

/// Whether process `pid` is gone (or a zombie: dead, not reaped yet).
pub fn is_gone(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat.rsplit(") ").next().is_some_and(|s| s.starts_with('Z')),
    }
}

/// Waits (bounded by `timeout`) until process `pid` is gone.
///
/// # Panics
///
/// It is still running after `timeout`.
pub fn wait_gone(pid: u32, timeout: std::time::Duration) {
    let deadline = std::time::Instant::now() + timeout;
    while !is_gone(pid) {
        assert!(
            std::time::Instant::now() < deadline,
            "process {pid} outlived its primary"
        );
        std::thread::yield_now();
    }
}

/// Everything `child` wrote on the pipe `from` (its stdout or stderr), to the end.
///
/// # Panics
///
/// The pipe was not captured, or reading it failed.
pub fn read_all(from: Option<impl std::io::Read>) -> String {
    let mut text = String::new();
    from.expect("a captured pipe")
        .read_to_string(&mut text)
        .expect("read the pipe");
    text
}

/// Makes `command`'s process find `fd` (an fd of this process) at fd number `at`, without
/// close-on-exec, as a service manager passes sockets (socket activation puts them at 3 and up).
pub fn pass_fd(
    command: &mut std::process::Command,
    fd: std::os::fd::RawFd,
    at: std::os::fd::RawFd,
) {
    use std::os::unix::process::CommandExt;
    // SAFETY: the hook runs between fork and exec and only calls dup2(2) and fcntl(2), which
    // are async-signal-safe and allocate nothing; `fd` stays open in this process (the caller
    // keeps it) until the spawn returns.
    unsafe {
        command.pre_exec(move || {
            if fd == at {
                // dup2(n, n) is a no-op that would leave close-on-exec set.
                let flags = libc::fcntl(at, libc::F_GETFD);
                if flags < 0 || libc::fcntl(at, libc::F_SETFD, flags & !libc::FD_CLOEXEC) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            } else if libc::dup2(fd, at) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// `CLOCK_MONOTONIC` in microseconds, the clock of systemd's `MONOTONIC_USEC`.
pub fn monotonic_usec() -> u64 {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes a properly sized struct we own.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &raw mut now) };
    u64::try_from(now.tv_sec).unwrap_or(0) * 1_000_000
        + u64::try_from(now.tv_nsec).unwrap_or(0) / 1_000
}

/// The pids of `parent`'s children, from `/proc`.
pub fn children(parent: u32) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|entry| {
            let pid: u32 = entry.ok()?.file_name().to_str()?.parse().ok()?;
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            let (_, rest) = stat.rsplit_once(')')?;
            let ppid: u32 = rest.split_whitespace().nth(1)?.parse().ok()?;
            (ppid == parent).then_some(pid)
        })
        .collect()
}
