//! The system calls that std, socket2 and Tokio do not offer, and the crate's only `unsafe` code.
//!
//! rustix makes the cold ones safe: `sysconf` (clock ticks, page size), the user ids, the
//! process group and the terminal's foreground group, the resource limits, the thread name
//! (`PR_SET_NAME`), `fcntl` on a borrowed fd (close-on-exec, `F_DUPFD_CLOEXEC`), the
//! zero-timeout `poll`, the monotonic clock and the timer fd.
//!
//! `unsafe` remains, as raw `libc` calls or claims the compiler cannot check, for:
//! - what must happen between `fork` and `exec` of a worker ([`prepare_child`]);
//! - the connection path, which changes only with a benchmark: `accept4` without a reactor,
//!   `sendmsg`/`recvmsg` with fds for the links, and registering fds with the reactor;
//! - the fds this process is handed by number (systemd's socket activation, a worker's IPC fd,
//!   `listen({ fd })`): `fcntl(F_GETFD)` on the bare number before it is borrowed, and taking
//!   ownership of those it keeps;
//! - `SO_PEERCRED`, whose pid may be 0, which rustix's `UCred` cannot hold;
//! - `kill`, since rustix's `Signal` names the real-time signals a worker may be sent only
//!   through an `unsafe` constructor;
//! - what rustix does not offer safely: the scheduling policy, and whether SIGHUP is ignored
//!   (`sigaction`);
//! - removing environment variables (`std::env::remove_var`) while this process has one thread.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

use tokio::io::Interest;
use tokio::io::unix::AsyncFd;

/// The fd number at which a worker finds its end of the IPC socket.
pub(crate) const IPC_FD: RawFd = 3;

/// Makes `command`'s child find `ipc` at [`IPC_FD`] and die with the thread that spawns it;
/// with `reset_scheduling`, the child runs under `SCHED_OTHER` whatever the forking thread's
/// policy (see [`use_batch_scheduling`]).
pub(crate) fn prepare_child(
    command: &mut tokio::process::Command,
    ipc: RawFd,
    reset_scheduling: bool,
) {
    let primary = libc::pid_t::try_from(std::process::id()).expect("pids fit in pid_t");
    // SAFETY: the hook runs in the child between fork and exec and only calls
    // `child_after_fork`, which is async-signal-safe and allocation-free.
    unsafe {
        command.pre_exec(move || child_after_fork(ipc, primary, reset_scheduling));
    }
}

/// Sets up a child between `fork` and `exec`: moves `ipc` to [`IPC_FD`] without `CLOEXEC`, asks
/// the kernel to SIGKILL the child when the forking thread dies, and exits if the primary already
/// died before that request took effect.
///
/// # Safety
///
/// Must only be called in the child between `fork` and `exec` (in a `pre_exec` hook): it calls
/// only async-signal-safe functions (and `sched_setscheduler`, a bare syscall wrapper) and
/// allocates nothing.
unsafe fn child_after_fork(
    ipc: RawFd,
    primary: libc::pid_t,
    reset_scheduling: bool,
) -> io::Result<()> {
    // SAFETY: plain syscalls on fds this process owns; no allocation, no locks (async-signal-safe
    // as `pre_exec` requires).
    unsafe {
        if ipc == IPC_FD {
            // dup2(3, 3) is a no-op that would leave CLOEXEC set.
            let flags = libc::fcntl(IPC_FD, libc::F_GETFD);
            if flags < 0 || libc::fcntl(IPC_FD, libc::F_SETFD, flags & !libc::FD_CLOEXEC) < 0 {
                return Err(io::Error::last_os_error());
            }
        } else if libc::dup2(ipc, IPC_FD) < 0 {
            return Err(io::Error::last_os_error());
        }
        if libc::prctl(
            libc::PR_SET_PDEATHSIG,
            libc::SIGKILL as libc::c_ulong,
            0,
            0,
            0,
        ) < 0
        {
            return Err(io::Error::last_os_error());
        }
        if libc::getppid() != primary {
            libc::_exit(1);
        }
        // In a process group of its own, a worker is a background job of the primary's
        // terminal: under `stty tostop` its first write there would stop it.
        libc::signal(libc::SIGTTOU, libc::SIG_IGN);
        if reset_scheduling {
            let param = libc::sched_param { sched_priority: 0 };
            if libc::sched_setscheduler(0, libc::SCHED_OTHER, &raw const param) < 0 {
                return Err(io::Error::last_os_error());
            }
        }
    }
    Ok(())
}

/// Moves the calling thread from `SCHED_OTHER` to `SCHED_BATCH`, and says whether it did: a
/// thread under any other policy (set by whoever started the process) is left alone.
///
/// A `SCHED_BATCH` thread gets the same CPU share but does not preempt the running task when it
/// wakes; the primary then accepts several connections per wakeup instead of one.
pub(crate) fn use_batch_scheduling() -> io::Result<bool> {
    // SAFETY: sched_getscheduler and sched_setscheduler on the calling thread (0), with a
    // `sched_param` that lives across the call; neither has other preconditions.
    unsafe {
        let policy = libc::sched_getscheduler(0);
        if policy < 0 {
            return Err(io::Error::last_os_error());
        }
        if policy != libc::SCHED_OTHER {
            return Ok(false);
        }
        let param = libc::sched_param { sched_priority: 0 };
        if libc::sched_setscheduler(0, libc::SCHED_BATCH, &raw const param) < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(true)
}

/// Takes ownership of fd `fd`, which socket activation passed to this process (`LISTEN_FDS`,
/// with `LISTEN_PID` naming this process), once it is shown to be an open socket, and marks it
/// close-on-exec so that no worker inherits it (an open fd that is not a socket is marked too,
/// but not taken).
///
/// Only for [`crate::systemd`], which calls it once per process for each fd that `LISTEN_FDS`
/// names and never drops what it gets (so even an fd that something else in this process
/// believes it owns is never closed twice).
pub(crate) fn take_activated_socket(fd: RawFd) -> io::Result<OwnedFd> {
    with_fd_number(fd, |borrowed| {
        set_cloexec(borrowed)?;
        // Fails with ENOTSOCK for anything but a socket.
        socket2::SockRef::from(&borrowed).r#type()?;
        Ok(())
    })?;
    // SAFETY: `fd` is an open socket the service manager passed to this process for it to own
    // (`LISTEN_PID` is ours); the caller takes each such fd once and never closes it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// `CLOCK_MONOTONIC` in microseconds (systemd's `MONOTONIC_USEC`).
pub(crate) fn monotonic_usec() -> u64 {
    let now = rustix::time::clock_gettime(rustix::time::ClockId::Monotonic);
    let secs = u64::try_from(now.tv_sec).unwrap_or(0);
    let micros = u64::try_from(now.tv_nsec).unwrap_or(0) / 1_000;
    secs * 1_000_000 + micros
}

/// The kernel's clock ticks per second (`sysconf(_SC_CLK_TCK)`), the unit of the CPU times in
/// `/proc/<pid>/stat`: often 100, but not guaranteed to be.
pub(crate) fn clock_ticks_per_second() -> u64 {
    rustix::param::clock_ticks_per_second()
}

/// The size of a memory page in bytes (`sysconf(_SC_PAGESIZE)`), the unit of `/proc/<pid>/statm`.
pub(crate) fn page_size() -> u64 {
    rustix::param::page_size() as u64
}

/// This process's effective user id.
pub(crate) fn effective_uid() -> u32 {
    rustix::process::geteuid().as_raw()
}

/// Takes ownership of the IPC fd a worker inherited, marking it close-on-exec so the worker's own
/// children do not inherit the channel.
///
/// Returns `None` unless fd [`IPC_FD`] is a `SOCK_SEQPACKET` socket whose peer is this process's
/// parent (`SO_PEERCRED`): a grandchild that inherited the environment markers, or anything
/// else that happens to sit at fd 3, is not taken for a link.
pub(crate) fn take_inherited_ipc_fd() -> Option<OwnedFd> {
    let parent = rustix::process::Pid::as_raw(rustix::process::getppid());
    let ours = with_fd_number(IPC_FD, |fd| {
        if socket2::SockRef::from(&fd).r#type()? != socket2::Type::SEQPACKET
            || peer_pid(fd)? != parent
        {
            return Ok(false);
        }
        let _ = set_cloexec(fd);
        Ok(true)
    });
    if !ours.unwrap_or(false) {
        return None;
    }
    // SAFETY: the fd is open and is the link our parent made for us alone; the role is detected
    // once, so nothing else takes ownership of it.
    Some(unsafe { OwnedFd::from_raw_fd(IPC_FD) })
}

/// The pid of `socket`'s peer as it connected (`SO_PEERCRED`); 0 when there is none (an
/// unconnected socket) or it is not visible from this process's pid namespace.
fn peer_pid(socket: BorrowedFd<'_>) -> io::Result<libc::pid_t> {
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes of the peer's credentials into `cred`, a
    // properly sized local, or fails. (Not rustix's `socket_peercred`: its `UCred` holds a
    // non-zero `Pid`, and the kernel reports pid 0 in the cases above.)
    let peer = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&raw mut cred).cast(),
            &mut len,
        )
    };
    if peer < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(cred.pid)
}

/// Runs `f` on fd number `fd` of this process, borrowed, once it is shown to be open (`EBADF`
/// otherwise).
///
/// Only for the fds this process was handed by number (socket activation's, a worker's IPC fd,
/// the one `listen({ fd })` names), which nothing in this process closes while it takes or
/// copies them.
fn with_fd_number<T>(fd: RawFd, f: impl FnOnce(BorrowedFd<'_>) -> io::Result<T>) -> io::Result<T> {
    // SAFETY: fcntl(F_GETFD) on any integer only reads that fd's flags, or fails (EBADF for a
    // closed or negative number). (rustix's `fcntl_getfd` takes a `BorrowedFd`, which must
    // already be open.)
    if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is open (fcntl succeeded, so it is not -1) and stays open while `f` runs (see
    // above); the borrow ends when `f` returns.
    f(unsafe { BorrowedFd::borrow_raw(fd) })
}

/// Marks `fd` close-on-exec.
fn set_cloexec(fd: BorrowedFd<'_>) -> io::Result<()> {
    use rustix::io::{FdFlags, fcntl_getfd, fcntl_setfd};
    Ok(fcntl_setfd(fd, fcntl_getfd(fd)? | FdFlags::CLOEXEC)?)
}

/// Removes `names` from the environment if this process has a single thread, so that nothing
/// can read the environment concurrently (`remove_var` is unsound otherwise). Returns whether it
/// did.
pub(crate) fn remove_env_if_single_threaded(names: &[&str]) -> bool {
    let threads = std::fs::read_dir("/proc/self/task")
        .map(Iterator::count)
        .unwrap_or(0);
    if threads != 1 {
        return false;
    }
    for name in names {
        // SAFETY: this process has one thread (checked above), which is the caller.
        unsafe { std::env::remove_var(name) };
    }
    true
}

/// Raises the soft `RLIMIT_NOFILE` to the hard limit: every connection in flight costs an fd in
/// the primary and the worker.
pub(crate) fn raise_fd_limit() {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    // `None` is `RLIM_INFINITY`.
    let limit = getrlimit(Resource::Nofile);
    if limit.current.unwrap_or(u64::MAX) < limit.maximum.unwrap_or(u64::MAX) {
        let _ = setrlimit(
            Resource::Nofile,
            Rlimit {
                current: limit.maximum,
                maximum: limit.maximum,
            },
        );
    }
}

/// Sends `signal` to process `pid`.
pub(crate) fn kill(pid: u32, signal: i32) -> io::Result<()> {
    let pid =
        libc::pid_t::try_from(pid).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: kill(2) has no memory-safety preconditions.
    if unsafe { libc::kill(pid, signal) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Accepts one connection as a non-blocking, close-on-exec fd (`accept4`): the primary only
/// passes it on, so it is never registered with the reactor; the worker that gets it registers
/// it (non-blocking travels with the open file description).
pub(crate) fn accept(listener: BorrowedFd<'_>) -> io::Result<OwnedFd> {
    use std::os::fd::AsRawFd;
    // SAFETY: accept4 with null address pointers only writes the new fd, which we own at once.
    let fd = unsafe {
        libc::accept4(
            listener.as_raw_fd(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: accept4 returned a new, open fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Whether a connection waits in `listener`'s accept queue, asked with a zero-timeout `poll(2)`.
///
/// Cheaper than finding out with [`accept`]: the kernel allocates the new socket and its file
/// before it looks at the queue, so an `accept4` that fails with `EAGAIN` costs as much as one
/// that succeeds (3.3 µs against 0.2 µs for `poll` on the benchmark machine). An error says
/// "maybe", so the caller falls back to accepting until `EAGAIN`.
pub(crate) fn connection_waiting(listener: BorrowedFd<'_>) -> bool {
    use rustix::event::{PollFd, PollFlags, Timespec, poll};
    let mut entry = [PollFd::new(&listener, PollFlags::IN)];
    // A zero timeout never blocks.
    poll(&mut entry, Some(&Timespec::default())) != Ok(0)
}

/// Registers a listening socket with the reactor, for readiness only (see [`accept`]).
pub(crate) fn register_listener(listener: OwnedFd) -> io::Result<AsyncFd<OwnedFd>> {
    register(listener, Interest::READABLE)
}

/// Registers `fd` with the reactor for `interest` only.
pub(crate) fn register(fd: OwnedFd, interest: Interest) -> io::Result<AsyncFd<OwnedFd>> {
    // SAFETY: the `OwnedFd` owns its fd, is moved into the `AsyncFd` and stays there, and
    // returns the same open fd for as long as it lives.
    Ok(unsafe { AsyncFd::register_with_interest(fd, interest) }?)
}

/// A close-on-exec duplicate of fd number `fd` of this process (Node's `listen({ fd })`): the
/// caller gets its own copy and the original stays where it was.
///
/// # Errors
///
/// `EBADF` when `fd` is not open.
pub(crate) fn duplicate_fd(fd: RawFd) -> io::Result<OwnedFd> {
    // The stdio fds are never sockets a cluster listens on.
    with_fd_number(fd, |fd| duplicate_at_least(fd, 3))
}

/// `fd`, moved above the fds a worker's spawn sets up ([`IPC_FD`] and below), where the child
/// would overwrite it before `exec`.
pub(crate) fn above_ipc_fd(fd: OwnedFd) -> io::Result<OwnedFd> {
    if fd.as_raw_fd() > IPC_FD {
        return Ok(fd);
    }
    duplicate_at_least(fd.as_fd(), IPC_FD + 1)
}

fn duplicate_at_least(fd: BorrowedFd<'_>, lowest: RawFd) -> io::Result<OwnedFd> {
    Ok(rustix::io::fcntl_dupfd_cloexec(fd, lowest)?)
}

/// Room for the control message of a few fds, 8-byte aligned as `cmsghdr` requires.
#[repr(C, align(8))]
struct ControlBuffer([u8; 128]);

/// Sends `frame` as one datagram on `socket` without blocking, with `fd` attached
/// (`SCM_RIGHTS`) if given. Returns the bytes sent.
pub(crate) fn send_frame(
    socket: BorrowedFd<'_>,
    frame: &[u8],
    fd: Option<BorrowedFd<'_>>,
) -> io::Result<usize> {
    let mut control = ControlBuffer([0; 128]);
    let mut iov = libc::iovec {
        iov_base: frame.as_ptr().cast_mut().cast(),
        iov_len: frame.len(),
    };
    // SAFETY: an all-zero msghdr is a valid empty one.
    let mut header: libc::msghdr = unsafe { std::mem::zeroed() };
    header.msg_iov = &raw mut iov;
    header.msg_iovlen = 1;
    if let Some(fd) = fd {
        let payload = u32::try_from(size_of::<RawFd>()).expect("an fd's size fits");
        // SAFETY: CMSG_SPACE and CMSG_LEN are pure arithmetic on the payload size.
        let (space, len) = unsafe { (libc::CMSG_SPACE(payload), libc::CMSG_LEN(payload)) };
        assert!(
            space as usize <= control.0.len(),
            "one fd fits the control buffer"
        );
        header.msg_control = control.0.as_mut_ptr().cast();
        header.msg_controllen = space as usize;
        // SAFETY: `msg_control` points at `space` bytes of 8-aligned, zeroed memory that outlive
        // `header`, so CMSG_FIRSTHDR returns a valid, aligned header for one fd, and CMSG_DATA
        // points inside that buffer with room for a `RawFd` (possibly unaligned, hence
        // `write_unaligned`).
        unsafe {
            let cmsg = libc::CMSG_FIRSTHDR(&raw const header);
            (*cmsg).cmsg_level = libc::SOL_SOCKET;
            (*cmsg).cmsg_type = libc::SCM_RIGHTS;
            (*cmsg).cmsg_len = len as usize;
            libc::CMSG_DATA(cmsg)
                .cast::<RawFd>()
                .write_unaligned(fd.as_raw_fd());
        }
    }
    // MSG_NOSIGNAL: a closed peer is an EPIPE error, not a SIGPIPE; MSG_DONTWAIT: never blocks,
    // whatever the socket's mode.
    let flags = libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT;
    // SAFETY: `header` points at `iov` (describing `frame`, read-only for sendmsg) and at the
    // control buffer, all alive for the call.
    let sent = unsafe { libc::sendmsg(socket.as_raw_fd(), &raw const header, flags) };
    usize::try_from(sent).map_err(|_| io::Error::last_os_error())
}

/// What [`recv_frame`] received.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Datagram {
    /// The bytes written to the buffer.
    pub(crate) len: usize,
    /// The datagram or its fds did not fit the buffers (the fds that did fit were kept).
    pub(crate) truncated: bool,
}

/// Receives one datagram from `socket` into `buf` without blocking (`WouldBlock` when none
/// waits); the fds that came with it are appended to `fds` (close-on-exec).
pub(crate) fn recv_frame(
    socket: BorrowedFd<'_>,
    buf: &mut [u8],
    fds: &mut Vec<OwnedFd>,
) -> io::Result<Datagram> {
    let mut control = ControlBuffer([0; 128]);
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: an all-zero msghdr is a valid empty one.
    let mut header: libc::msghdr = unsafe { std::mem::zeroed() };
    header.msg_iov = &raw mut iov;
    header.msg_iovlen = 1;
    header.msg_control = control.0.as_mut_ptr().cast();
    header.msg_controllen = control.0.len();
    // MSG_DONTWAIT: the primary also reads a worker's end, whose blocking mode the worker sets.
    let flags = libc::MSG_CMSG_CLOEXEC | libc::MSG_DONTWAIT;
    // SAFETY: `header` points at `iov` (describing `buf`, writable) and at the control buffer,
    // both alive for the call; the kernel writes at most their lengths.
    let received = unsafe { libc::recvmsg(socket.as_raw_fd(), &raw mut header, flags) };
    let len = usize::try_from(received).map_err(|_| io::Error::last_os_error())?;
    // SAFETY: after a successful recvmsg, `header.msg_control`/`msg_controllen` describe the
    // control messages the kernel wrote into `control`; CMSG_FIRSTHDR/NXTHDR walk only inside
    // them. Each SCM_RIGHTS payload holds `(cmsg_len - CMSG_LEN(0)) / size_of::<RawFd>()` fds the
    // kernel just installed in this process, owned by nobody else, so each becomes an OwnedFd
    // exactly once. Reads are unaligned-safe.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(&raw const header);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(cmsg).cast::<RawFd>();
                let bytes = (*cmsg).cmsg_len as usize - libc::CMSG_LEN(0) as usize;
                for i in 0..bytes / size_of::<RawFd>() {
                    fds.push(OwnedFd::from_raw_fd(data.add(i).read_unaligned()));
                }
            }
            cmsg = libc::CMSG_NXTHDR(&raw const header, cmsg);
        }
    }
    let truncated = header.msg_flags & (libc::MSG_TRUNC | libc::MSG_CTRUNC) != 0;
    Ok(Datagram { len, truncated })
}

/// A non-blocking, close-on-exec, disarmed timer on the monotonic clock (`timerfd_create(2)`).
pub(crate) fn timer() -> io::Result<OwnedFd> {
    use rustix::time::{TimerfdClockId, TimerfdFlags, timerfd_create};
    Ok(timerfd_create(
        TimerfdClockId::Monotonic,
        TimerfdFlags::NONBLOCK | TimerfdFlags::CLOEXEC,
    )?)
}

/// Arms `timer` to expire once, `after` from now (at least a nanosecond: zero would disarm it).
pub(crate) fn arm_timer(timer: BorrowedFd<'_>, after: std::time::Duration) -> io::Result<()> {
    use rustix::time::{Itimerspec, TimerfdTimerFlags, Timespec, timerfd_settime};
    let after = after.max(std::time::Duration::from_nanos(1));
    let value = Itimerspec {
        it_interval: Timespec::default(),
        it_value: Timespec {
            tv_sec: after.as_secs().try_into().unwrap_or(i64::MAX),
            tv_nsec: after.subsec_nanos().into(),
        },
    };
    timerfd_settime(timer, TimerfdTimerFlags::empty(), &value)?;
    Ok(())
}

/// Consumes an expiry of `timer`; `WouldBlock` if it has not expired since it was last read.
pub(crate) fn read_timer(timer: BorrowedFd<'_>) -> io::Result<()> {
    let mut expirations = [0u8; 8];
    rustix::io::read(timer, &mut expirations)?;
    Ok(())
}

/// Names the calling thread (`PR_SET_NAME`); for the main thread, that is the name `ps`, `top`
/// and `/proc/<pid>/comm` show. The kernel keeps the first 15 bytes.
pub(crate) fn set_thread_name(name: &str) {
    let Ok(name) = std::ffi::CString::new(name) else {
        return;
    };
    // It cannot fail for a valid string, so the result is not checked.
    let _ = rustix::thread::set_name(&name);
}

/// Whether this process has a controlling terminal (one it could open as `/dev/tty`). After the
/// terminal hangs up, the kernel detaches it from every process of the session first, then
/// sends SIGHUP: a SIGHUP that finds no terminal where there was one is a hangup.
pub(crate) fn has_controlling_terminal() -> bool {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOCTTY)
        .open("/dev/tty")
        .is_ok()
}

/// Whether a terminal can hang up on this process: it is in the foreground process group of its
/// controlling terminal (a background or `disown`ed job is not: a later `kill -HUP` from an
/// operator is a reload), and SIGHUP is not ignored, as `nohup` leaves it. Ask before installing
/// a SIGHUP handler.
pub(crate) fn in_foreground_of_terminal() -> bool {
    use std::os::unix::fs::OpenOptionsExt;
    let Ok(tty) = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOCTTY)
        .open("/dev/tty")
    else {
        return false;
    };
    let foreground = rustix::termios::tcgetpgrp(&tty) == Ok(rustix::process::getpgrp());
    // SAFETY: with a null new action, sigaction(2) only writes the current one into a struct
    // we own.
    let ignored = unsafe {
        let mut current: libc::sigaction = std::mem::zeroed();
        libc::sigaction(libc::SIGHUP, std::ptr::null(), &raw mut current) == 0
            && current.sa_sigaction == libc::SIG_IGN
    };
    foreground && !ignored
}

/// Checks that this user may start `workers` more processes (`RLIMIT_NPROC`, which the kernel
/// counts per real user id over processes and threads alike, and does not enforce for root).
/// Without this a worker count above the limit would be a storm of failing forks.
pub(crate) fn check_process_limit(workers: usize) -> Result<(), crate::SettingsError> {
    let uid = rustix::process::getuid();
    // `None` is `RLIM_INFINITY`.
    let Some(limit) = rustix::process::getrlimit(rustix::process::Resource::Nproc).current else {
        return Ok(());
    };
    if uid.is_root() {
        return Ok(());
    }
    let running = tasks_of_user(uid.as_raw());
    let available = limit.saturating_sub(running);
    if (workers as u64) <= available {
        return Ok(());
    }
    Err(crate::SettingsError::ProcessLimit {
        workers,
        available,
        limit,
        running,
    })
}

/// The tasks (threads) of processes whose real user id is `uid`, from `/proc`.
fn tasks_of_user(uid: u32) -> u64 {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return 0;
    };
    let mut tasks = 0;
    for entry in entries.flatten() {
        if !entry
            .file_name()
            .as_encoded_bytes()
            .iter()
            .all(u8::is_ascii_digit)
        {
            continue;
        }
        let Ok(status) = std::fs::read_to_string(entry.path().join("status")) else {
            continue;
        };
        let field = |name: &str| {
            status
                .lines()
                .find_map(|line| line.strip_prefix(name))
                .and_then(|rest| rest.split_whitespace().next())
                .and_then(|value| value.parse::<u64>().ok())
        };
        if field("Uid:") == Some(u64::from(uid)) {
            tasks += field("Threads:").unwrap_or(1);
        }
    }
    tasks
}
