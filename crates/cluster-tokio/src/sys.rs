//! The crate's only `unsafe` code: what must happen between `fork` and `exec` of a worker,
//! taking over the inherited IPC fd and environment in the worker before any thread starts, and
//! the few raw calls std and socket2 do not offer (`accept4` without a reactor, `poll`, `fcntl`,
//! scheduling policy).

use std::io;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};

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

/// Takes ownership of the IPC fd a worker inherited, marking it close-on-exec so the worker's own
/// children do not inherit the channel.
///
/// Returns `None` unless fd [`IPC_FD`] is a `SOCK_SEQPACKET` socket whose peer is this process's
/// parent (`SO_PEERCRED`): a grandchild that inherited the environment markers, or anything
/// else that happens to sit at fd 3, is not taken for a link.
pub(crate) fn take_inherited_ipc_fd() -> Option<OwnedFd> {
    // SAFETY: fcntl and getsockopt on a possibly closed fd number only read its state into
    // properly sized locals, or fail (EBADF, ENOTSOCK).
    unsafe {
        let flags = libc::fcntl(IPC_FD, libc::F_GETFD);
        if flags < 0 {
            return None;
        }
        let mut kind: libc::c_int = 0;
        let mut len = size_of::<libc::c_int>() as libc::socklen_t;
        let typed = libc::getsockopt(
            IPC_FD,
            libc::SOL_SOCKET,
            libc::SO_TYPE,
            (&raw mut kind).cast(),
            &mut len,
        );
        if typed < 0 || kind != libc::SOCK_SEQPACKET {
            return None;
        }
        let mut cred = libc::ucred {
            pid: 0,
            uid: 0,
            gid: 0,
        };
        let mut len = size_of::<libc::ucred>() as libc::socklen_t;
        let peer = libc::getsockopt(
            IPC_FD,
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&raw mut cred).cast(),
            &mut len,
        );
        if peer < 0 || cred.pid != libc::getppid() {
            return None;
        }
        libc::fcntl(IPC_FD, libc::F_SETFD, flags | libc::FD_CLOEXEC);
        // SAFETY: the fd is open and is the link our parent made for us alone; the role is
        // detected once, so nothing else takes ownership of it.
        Some(OwnedFd::from_raw_fd(IPC_FD))
    }
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
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit write and read a properly sized struct we own.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 && limit.rlim_cur < limit.rlim_max
        {
            limit.rlim_cur = limit.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        }
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
pub(crate) fn accept(listener: std::os::fd::BorrowedFd<'_>) -> io::Result<OwnedFd> {
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
pub(crate) fn connection_waiting(listener: std::os::fd::BorrowedFd<'_>) -> bool {
    use std::os::fd::AsRawFd;
    let mut entry = libc::pollfd {
        fd: listener.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: poll reads and writes only the one `pollfd` it is given, which lives across the
    // call; a zero timeout never blocks.
    let ready = unsafe { libc::poll(&raw mut entry, 1, 0) };
    ready != 0
}

/// Registers a listening socket with the reactor, for readiness only (see [`accept`]).
pub(crate) fn register_listener(
    listener: OwnedFd,
) -> io::Result<tokio::io::unix::AsyncFd<OwnedFd>> {
    // SAFETY: the `OwnedFd` owns its fd, is moved into the `AsyncFd` and stays there, and
    // returns the same open fd for as long as it lives.
    Ok(unsafe { tokio::io::unix::AsyncFd::register(listener) }?)
}

/// A close-on-exec duplicate of fd number `fd` of this process (Node's `listen({ fd })`): the
/// caller gets its own copy and the original stays where it was.
///
/// # Errors
///
/// `EBADF` when `fd` is not open.
pub(crate) fn duplicate_fd(fd: RawFd) -> io::Result<OwnedFd> {
    // The stdio fds are never sockets a cluster listens on, and `F_DUPFD_CLOEXEC` only reads `fd`.
    // SAFETY: fcntl(F_DUPFD_CLOEXEC) on any integer is memory-safe: it fails with EBADF when
    // `fd` is not open and otherwise returns a new fd, which we own at once.
    let duplicate = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 3) };
    if duplicate < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fcntl returned a new, open fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(duplicate) })
}
