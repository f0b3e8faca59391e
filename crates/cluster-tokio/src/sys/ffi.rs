//! The calls of [`sys`](super) that need `unsafe`, and the crate's only `unsafe` code: raw
//! `libc` calls, or claims the compiler cannot check. Every `unsafe` block says why it is sound
//! (`// SAFETY:`). What is here, and why rustix or std do not do it safely:
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
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

use tokio::io::Interest;
use tokio::io::unix::AsyncFd;

use super::{IPC_FD, set_cloexec};

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
pub(super) fn with_fd_number<T>(
    fd: RawFd,
    f: impl FnOnce(BorrowedFd<'_>) -> io::Result<T>,
) -> io::Result<T> {
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

/// Registers `fd` with the reactor for `interest` only.
pub(crate) fn register(fd: OwnedFd, interest: Interest) -> io::Result<AsyncFd<OwnedFd>> {
    // SAFETY: the `OwnedFd` owns its fd, is moved into the `AsyncFd` and stays there, and
    // returns the same open fd for as long as it lives.
    Ok(unsafe { AsyncFd::register_with_interest(fd, interest) }?)
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

/// Whether SIGHUP is ignored (`SIG_IGN`), as `nohup` leaves it; `false` if that cannot be read.
pub(crate) fn sighup_ignored() -> bool {
    // SAFETY: with a null new action, sigaction(2) only writes the current one into a struct
    // we own.
    unsafe {
        let mut current: libc::sigaction = std::mem::zeroed();
        libc::sigaction(libc::SIGHUP, std::ptr::null(), &raw mut current) == 0
            && current.sa_sigaction == libc::SIG_IGN
    }
}
