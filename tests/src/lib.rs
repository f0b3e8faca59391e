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
}

/// Sends `signal` to process `pid` (the tests' one `unsafe` call).
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
    use std::os::unix::process::CommandExt;
    // SAFETY: the hook runs between fork and exec and only calls setrlimit(2), which is
    // async-signal-safe and allocates nothing.
    unsafe {
        command.pre_exec(move || {
            let rlimit = libc::rlimit {
                rlim_cur: limit,
                rlim_max: limit,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &rlimit) < 0 {
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

/// Blocks until the link at fd 3 reaches end of stream (the primary closed it).
pub fn wait_for_link_eof() {
    let mut buf = [0u8; 70_000];
    loop {
        // SAFETY: recv(2) into a live local buffer of the stated size.
        let n = unsafe { libc::recv(3, buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n <= 0 {
            return;
        }
    }
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
