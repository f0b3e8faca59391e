//! Creating listening sockets: what the primary binds for a handle, and what a process binds
//! itself (unclustered, `exclusive`, `reuse_port`). One place, so both bind alike.

use std::ffi::OsStr;
use std::fs;
use std::io;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use proto::wire::{BoundAddr, ListenRequest, ListenTarget, SocketKind};
use socket2::{Domain, SockAddr, Socket, Type};

/// The longest path `sockaddr_un` holds (108 bytes with the terminating NUL).
const SUN_PATH_MAX: usize = 107;

/// A bound socket, non-blocking and close-on-exec (socket2 sets it); stream sockets are
/// listening.
#[derive(Debug)]
pub(crate) struct Bound {
    pub(crate) socket: Socket,
    /// Where it is bound (the real port for port 0).
    pub(crate) addr: BoundAddr,
    /// The socket file this bind created, removed when dropped.
    pub(crate) file: Option<SocketFile>,
}

/// Binds what `request` asks for. `backlog` applies when the request has none; with
/// `reuse_port` the socket sets `SO_REUSEPORT` (a bind that bypasses the primary).
pub(crate) fn bind(request: &ListenRequest, backlog: u32, reuse_port: bool) -> io::Result<Bound> {
    let backlog = if request.backlog > 0 {
        request.backlog
    } else {
        backlog
    };
    let backlog = i32::try_from(backlog).unwrap_or(i32::MAX);
    let flags = request.flags;
    match (&request.target, request.kind) {
        (ListenTarget::Ip(addr), kind) => {
            let ty = match kind {
                SocketKind::Stream => Type::STREAM,
                SocketKind::Datagram => Type::DGRAM,
            };
            let socket = Socket::new(Domain::for_address(*addr), ty, None)?;
            // As libuv: every TCP listener may rebind a port in TIME_WAIT; UDP only on request.
            if kind == SocketKind::Stream || flags.reuse_addr {
                socket.set_reuse_address(true)?;
            }
            if reuse_port {
                socket.set_reuse_port(true)?;
            }
            if addr.is_ipv6() {
                socket.set_only_v6(flags.ipv6_only)?;
            }
            socket.bind(&(*addr).into())?;
            if kind == SocketKind::Stream {
                socket.listen(backlog)?;
            }
            socket.set_nonblocking(true)?;
            let addr = BoundAddr::Ip(ip_addr(&socket)?);
            Ok(Bound {
                socket,
                addr,
                file: None,
            })
        }
        (ListenTarget::Path(bytes), SocketKind::Stream) => {
            let path = Path::new(OsStr::from_bytes(bytes));
            let (socket, file) = bind_unix(path, backlog, flags.readable_all, flags.writable_all)?;
            Ok(Bound {
                socket,
                addr: BoundAddr::Path(bytes.clone()),
                file: Some(file),
            })
        }
        (ListenTarget::Path(_), SocketKind::Datagram) => Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "Unix datagram sockets cannot be clustered",
        )),
        (ListenTarget::Fd(fd), kind) => inherit(*fd, kind),
        (ListenTarget::Name(name), kind) => crate::systemd::named(name, kind),
    }
}

/// Takes a copy of this process's fd `fd`, which must be a socket of `kind` (listening, for
/// streams) as Node's `listen({ fd })` requires. The copy shares the open file description, so
/// `fd` becomes non-blocking too (as in Node, whose event loop needs it so).
pub(crate) fn inherit(fd: i32, kind: SocketKind) -> io::Result<Bound> {
    let socket = Socket::from(crate::sys::duplicate_fd(fd)?);
    let invalid = |what: &str| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("fd {fd} is not {what}"),
        )
    };
    let ty = socket.r#type().map_err(|_| invalid("a socket"))?;
    match kind {
        SocketKind::Stream if ty != Type::STREAM => return Err(invalid("a stream socket")),
        SocketKind::Stream if !socket.is_listener()? => return Err(invalid("listening")),
        SocketKind::Datagram if ty != Type::DGRAM => return Err(invalid("a datagram socket")),
        _ => {}
    }
    socket.set_nonblocking(true)?;
    let local = socket.local_addr()?;
    let addr = match local.as_socket() {
        Some(addr) => BoundAddr::Ip(addr),
        None => BoundAddr::Path(
            local
                .as_pathname()
                .map(|p| p.as_os_str().as_bytes().to_vec())
                .unwrap_or_default(),
        ),
    };
    Ok(Bound {
        socket,
        addr,
        file: None,
    })
}

fn ip_addr(socket: &Socket) -> io::Result<SocketAddr> {
    socket
        .local_addr()?
        .as_socket()
        .ok_or_else(|| io::Error::from(io::ErrorKind::InvalidData))
}

/// A Unix socket file this process created; dropping it removes the file, unless something
/// else has replaced it since.
#[derive(Debug)]
pub(crate) struct SocketFile {
    path: PathBuf,
    dev: u64,
    ino: u64,
}

impl Drop for SocketFile {
    fn drop(&mut self) {
        let ours = fs::symlink_metadata(&self.path)
            .is_ok_and(|m| m.dev() == self.dev && m.ino() == self.ino);
        if ours {
            let _ = fs::remove_file(&self.path);
        }
    }
}

/// Binds and listens on a Unix stream socket at `path`.
///
/// A path longer than `sun_path` is bound through its directory (`/proc/self/fd/N/name`), as
/// Node binds such paths relatively. A socket file left by a crashed run (nobody accepts on it)
/// is replaced; a live one, or a file that is not a socket, is `AddrInUse`.
pub(crate) fn bind_unix(
    path: &Path,
    backlog: i32,
    readable_all: bool,
    writable_all: bool,
) -> io::Result<(Socket, SocketFile)> {
    let short = ShortPath::new(path)?;
    let addr = short.path();
    remove_if_stale(&addr)?;
    let socket = Socket::new(Domain::UNIX, Type::STREAM, None)?;
    socket.bind(&SockAddr::unix(&addr)?)?;
    let meta = fs::symlink_metadata(&addr)?;
    let file = SocketFile {
        path: path.to_owned(),
        dev: meta.dev(),
        ino: meta.ino(),
    };
    // As libuv's `uv_pipe_chmod`: add read and/or write for everyone.
    let mut added = 0;
    if readable_all {
        added |= 0o444;
    }
    if writable_all {
        added |= 0o222;
    }
    if added != 0 {
        let mode = meta.permissions().mode() | added;
        fs::set_permissions(&addr, fs::Permissions::from_mode(mode))?;
    }
    socket.listen(backlog)?;
    socket.set_nonblocking(true)?;
    Ok((socket, file))
}

/// A Unix socket path that fits in `sun_path`, maybe through a handle on its directory.
pub(crate) struct ShortPath<'a> {
    path: &'a Path,
    dir: Option<fs::File>,
}

impl<'a> ShortPath<'a> {
    /// `path` itself if short enough; otherwise its directory, opened for path lookups only.
    pub(crate) fn new(path: &'a Path) -> io::Result<Self> {
        if path.as_os_str().len() <= SUN_PATH_MAX {
            return Ok(Self { path, dir: None });
        }
        let too_long = || io::Error::from_raw_os_error(libc::ENAMETOOLONG);
        let (Some(parent), Some(_)) = (path.parent(), path.file_name()) else {
            return Err(too_long());
        };
        let dir = fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_PATH | libc::O_DIRECTORY)
            .open(parent)?;
        let short = Self {
            path,
            dir: Some(dir),
        };
        if short.path().as_os_str().len() > SUN_PATH_MAX {
            return Err(too_long());
        }
        Ok(short)
    }

    /// The path to hand to `bind` or `connect`.
    pub(crate) fn path(&self) -> PathBuf {
        match (&self.dir, self.path.file_name()) {
            (Some(dir), Some(name)) => {
                Path::new(&format!("/proc/self/fd/{}", dir.as_raw_fd())).join(name)
            }
            _ => self.path.to_owned(),
        }
    }
}

/// Removes a socket file nobody accepts on any more.
///
/// The probe is a non-blocking `connect`, because the primary binds from its one driver task: a
/// blocking connect to a live listener with a full backlog would stall it. Only a refused
/// connection means stale; anything else (connected, in progress, a socket of another type) means
/// the path is someone's.
fn remove_if_stale(path: &Path) -> io::Result<()> {
    let Ok(meta) = fs::symlink_metadata(path) else {
        return Ok(());
    };
    // A raw errno, so the worker gets the very error a plain bind would give.
    let in_use = || io::Error::from_raw_os_error(libc::EADDRINUSE);
    if !meta.file_type().is_socket() {
        return Err(in_use());
    }
    let probe = Socket::new(Domain::UNIX, Type::STREAM, None)?;
    probe.set_nonblocking(true)?;
    match probe.connect(&SockAddr::unix(path)?) {
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
            tracing::info!(path = %path.display(), "removing a stale socket file");
            match fs::remove_file(path) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
                _ => Ok(()),
            }
        }
        Err(e) if e.kind() == io::ErrorKind::PermissionDenied => Err(e),
        _ => Err(in_use()),
    }
}
