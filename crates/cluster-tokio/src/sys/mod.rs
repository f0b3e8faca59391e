//! The system calls that std, socket2 and Tokio do not offer.
//!
//! rustix makes the cold ones safe: `sysconf` (clock ticks, page size), the user ids, the
//! process group and the terminal's foreground group, the resource limits, the thread name
//! (`PR_SET_NAME`), `fcntl` on a borrowed fd (close-on-exec, `F_DUPFD_CLOEXEC`), the
//! zero-timeout `poll`, the monotonic clock and the timer fd. They are here, with no `unsafe`
//! (denied). What needs `unsafe` is in [`ffi`], the crate's one module allowed it, re-exported
//! here so that every call site says `sys::`.

#![deny(unsafe_code)]

#[allow(unsafe_code)]
mod ffi;

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};

use tokio::io::Interest;
use tokio::io::unix::AsyncFd;

pub(crate) use ffi::{
    Datagram, accept, kill, prepare_child, recv_frame, register, remove_env_if_single_threaded,
    send_frame, take_activated_socket, take_inherited_ipc_fd, use_batch_scheduling,
};

/// The fd number at which a worker finds its end of the IPC socket.
pub(crate) const IPC_FD: RawFd = 3;

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

/// Marks `fd` close-on-exec.
pub(super) fn set_cloexec(fd: BorrowedFd<'_>) -> io::Result<()> {
    use rustix::io::{FdFlags, fcntl_getfd, fcntl_setfd};
    Ok(fcntl_setfd(fd, fcntl_getfd(fd)? | FdFlags::CLOEXEC)?)
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

/// A close-on-exec duplicate of fd number `fd` of this process (Node's `listen({ fd })`): the
/// caller gets its own copy and the original stays where it was.
///
/// # Errors
///
/// `EBADF` when `fd` is not open.
pub(crate) fn duplicate_fd(fd: RawFd) -> io::Result<OwnedFd> {
    // The stdio fds are never sockets a cluster listens on.
    ffi::with_fd_number(fd, |fd| duplicate_at_least(fd, 3))
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
    foreground && !ffi::sighup_ignored()
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
