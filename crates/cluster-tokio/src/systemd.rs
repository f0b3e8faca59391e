//! The primary under systemd, over systemd's plain protocols (no libsystemd): state
//! notifications and the watchdog (`NOTIFY_SOCKET`, `WATCHDOG_USEC`), and socket activation
//! (`LISTEN_FDS`). The environment is read once, when the first primary of this process starts
//! ([`init`]); workers never see it (the spawn removes [`ENV_VARS`]).
//!
//! A notification is one datagram, sent without blocking; an error is logged once and
//! otherwise ignored: nothing systemd does or fails to do can stall or stop the primary.

use std::ffi::OsStr;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::linux::net::SocketAddrExt;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use proto::wire::{BoundAddr, ListenRequest, ListenTarget, SocketKind};
use socket2::{Socket, Type};

use crate::settings::Settings;
use crate::socket::{self, Bound};

/// The service manager's variables: no worker inherits them.
pub(crate) const ENV_VARS: [&str; 6] = [
    "LISTEN_FDS",
    "LISTEN_PID",
    "LISTEN_FDNAMES",
    "NOTIFY_SOCKET",
    "WATCHDOG_USEC",
    "WATCHDOG_PID",
];

/// The first fd of socket activation (`SD_LISTEN_FDS_START`).
const LISTEN_FDS_START: RawFd = 3;

/// More sockets than this is a malformed `LISTEN_FDS`, not a configuration.
const MAX_LISTEN_FDS: u32 = 4096;

/// What this process got from its service manager.
struct Systemd {
    notifier: Option<Notifier>,
    /// How often to send `WATCHDOG=1`: half of `WATCHDOG_USEC`.
    watchdog: Option<Duration>,
    /// Never dropped (a static): the fds stay open at their numbers for the life of the
    /// process, so a socket stays available however often its handle is closed and bound
    /// again, and `from_primary_fd(n)` keeps working on them.
    sockets: Vec<Activated>,
}

static SYSTEMD: OnceLock<Systemd> = OnceLock::new();

/// Reads `NOTIFY_SOCKET`, `WATCHDOG_*` and `LISTEN_*` and takes the activated sockets; once per
/// process, later calls do nothing. Called by [`Primary::start`](crate::Primary::start), so a
/// worker (whose environment has none of them anyway) never does.
pub(crate) fn init() {
    SYSTEMD.get_or_init(|| Systemd {
        notifier: Notifier::from_env(),
        watchdog: watchdog_from_env(),
        sockets: sockets_from_env(),
    });
}

/// Sends `state` (newline-separated `KEY=value` assignments) to systemd, if it listens.
pub(crate) fn notify(state: &str) {
    if let Some(notifier) = SYSTEMD.get().and_then(|s| s.notifier.as_ref()) {
        notifier.send(state);
    }
}

/// `RELOADING=1` with the time it started, as `Type=notify-reload` requires, and the time its
/// first step may take ([`reload_step`]).
pub(crate) fn reloading(cause: &str, step: Duration) {
    let now = crate::sys::monotonic_usec();
    let step = step.as_micros();
    notify(&format!(
        "RELOADING=1\nMONOTONIC_USEC={now}\nEXTEND_TIMEOUT_USEC={step}\nSTATUS=rolling reload ({cause})"
    ));
}

/// A worker was replaced: the reload moves on, and its next step may take `step` (systemd
/// bounds a reload by `TimeoutStartSec=`, 90 s by default, which the drains of a few workers
/// exceed; each step extends it).
pub(crate) fn reload_progress(step: Duration) {
    notify(&format!("EXTEND_TIMEOUT_USEC={}", step.as_micros()));
}

/// The longest one step of a rolling reload takes: a replacement's boot, then its
/// predecessor's drain (then SIGKILL), with room to spare.
pub(crate) fn reload_step(settings: &Settings) -> Duration {
    settings.boot_timeout + settings.disconnect_timeout + Duration::from_secs(5)
}

/// `READY=1` after a reload, whatever its outcome (`systemctl reload` waits for it), with
/// `status` saying how it went.
pub(crate) fn reloaded(status: &str) {
    notify(&format!("READY=1\nSTATUS={status}"));
}

/// `STOPPING=1`, with why.
pub(crate) fn stopping(why: &str) {
    notify(&format!("STOPPING=1\nSTATUS={why}"));
}

/// The socket systemd passed for `request`'s address, as a new copy, if there is one: a worker
/// that asks for the address of an activated socket gets that socket, its queue included,
/// instead of a new bind (which would fail with `EADDRINUSE`).
pub(crate) fn activated(request: &ListenRequest) -> Option<io::Result<Bound>> {
    let wanted = match &request.target {
        ListenTarget::Ip(addr) => BoundAddr::Ip(*addr),
        ListenTarget::Path(path) => BoundAddr::Path(path.clone()),
        ListenTarget::Fd(_) | ListenTarget::Name(_) => return None,
    };
    let socket = SYSTEMD.get()?.sockets.iter().find(|s| {
        s.listen
            .as_ref()
            .is_some_and(|(kind, addr)| *kind == request.kind && *addr == wanted)
    })?;
    let fd = socket.fd.as_raw_fd();
    tracing::info!(fd, name = socket.name.as_deref(), address = %shown(&wanted), "listening on a socket systemd passed");
    Some(socket::inherit(fd, request.kind))
}

/// A new copy of the socket passed under `name` (`LISTEN_FDNAMES`), which must be of `kind`.
/// Reads the environment first if this process has not yet: an unclustered program takes the
/// sockets passed to it.
pub(crate) fn named(name: &str, kind: SocketKind) -> io::Result<Bound> {
    init();
    let sockets = SYSTEMD.get().map_or(&[][..], |s| &s.sockets[..]);
    let Some(socket) = sockets.iter().find(|s| s.name.as_deref() == Some(name)) else {
        let passed: Vec<_> = sockets.iter().filter_map(|s| s.name.as_deref()).collect();
        tracing::warn!(
            name,
            passed = %passed.join(", "),
            "no socket of that name was passed by the service manager"
        );
        // The errno a worker gets back; the log line above says the rest.
        return Err(io::Error::from_raw_os_error(libc::ENOENT));
    };
    let fd = socket.fd.as_raw_fd();
    tracing::info!(fd, name, "listening on a socket systemd passed");
    socket::inherit(fd, kind)
}

/// Status lines and the first `READY=1`, as the supervisor's workers come up.
#[derive(Debug, Default)]
pub(crate) struct Progress {
    ready: bool,
    /// (serving, active, generation) as last told.
    told: Option<(usize, usize, u64)>,
}

impl Progress {
    /// Called on every turn of the supervisor's loop: says `READY=1` the first time every
    /// active slot serves, and a new `STATUS=` when the numbers change.
    pub(crate) fn update(&mut self, serving: usize, active: usize, generation: u64) {
        if SYSTEMD.get().is_none_or(|s| s.notifier.is_none()) {
            return;
        }
        let now = (serving, active, generation);
        if self.told == Some(now) {
            return;
        }
        self.told = Some(now);
        let status = status_line(serving, active, generation);
        if !self.ready && serving >= active {
            self.ready = true;
            notify(&format!("READY=1\nSTATUS={status}"));
        } else {
            notify(&format!("STATUS={status}"));
        }
    }
}

/// `2 workers serving, generation 3`, or `1 of 2 workers serving, generation 3`.
pub(crate) fn status_line(serving: usize, active: usize, generation: u64) -> String {
    let plural = if active == 1 { "" } else { "s" };
    if serving >= active {
        format!("{active} worker{plural} serving, generation {generation}")
    } else {
        format!("{serving} of {active} worker{plural} serving, generation {generation}")
    }
}

/// Ticks every half of `WATCHDOG_USEC`, or never: a `select!` arm of the supervisor's loop, so a
/// wedged loop stops sending `WATCHDOG=1`.
#[derive(Debug)]
pub(crate) struct Watchdog(Option<tokio::time::Interval>);

impl Watchdog {
    pub(crate) fn new() -> Self {
        Self(SYSTEMD.get().and_then(|s| s.watchdog).map(|period| {
            let mut interval = tokio::time::interval(period);
            interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            interval
        }))
    }

    /// Resolves when `WATCHDOG=1` is due.
    pub(crate) async fn tick(&mut self) {
        match &mut self.0 {
            Some(interval) => {
                interval.tick().await;
            }
            None => std::future::pending().await,
        }
    }
}

/// Where notifications go, and a socket to send them from.
struct Notifier {
    socket: UnixDatagram,
    addr: SocketAddr,
    failed: AtomicBool,
}

impl Notifier {
    fn from_env() -> Option<Self> {
        let value = std::env::var_os("NOTIFY_SOCKET")?;
        let bytes = value.as_bytes();
        let addr = match bytes.first() {
            Some(b'/') => SocketAddr::from_pathname(&value),
            Some(b'@') => SocketAddr::from_abstract_name(&bytes[1..]),
            _ => {
                tracing::warn!(notify_socket = %value.to_string_lossy(), "NOTIFY_SOCKET is neither a path nor an abstract socket name: not notifying systemd");
                return None;
            }
        };
        let made = addr.and_then(|addr| {
            let socket = UnixDatagram::unbound()?;
            socket.set_nonblocking(true)?;
            Ok((socket, addr))
        });
        match made {
            Ok((socket, addr)) => Some(Self {
                socket,
                addr,
                failed: AtomicBool::new(false),
            }),
            Err(error) => {
                tracing::warn!(notify_socket = %value.to_string_lossy(), %error, "cannot notify systemd");
                None
            }
        }
    }

    fn send(&self, state: &str) {
        let sent = self.socket.send_to_addr(state.as_bytes(), &self.addr);
        if let Err(error) = sent {
            if self.failed.swap(true, Ordering::Relaxed) {
                tracing::debug!(%error, state, "systemd notification not sent");
            } else {
                tracing::warn!(%error, state, "systemd notification not sent (further failures are logged at debug level)");
            }
        }
    }
}

/// Half of `WATCHDOG_USEC`, if it is set for this process (`WATCHDOG_PID` absent or ours).
fn watchdog_from_env() -> Option<Duration> {
    let usec = std::env::var("WATCHDOG_USEC").ok()?;
    if let Some(pid) = std::env::var_os("WATCHDOG_PID")
        && pid.to_str().and_then(|p| p.parse::<u32>().ok()) != Some(std::process::id())
    {
        tracing::debug!(watchdog_pid = %pid.to_string_lossy(), "WATCHDOG_USEC is for another process");
        return None;
    }
    match usec.parse::<u64>() {
        Ok(usec) if usec > 0 => Some(Duration::from_micros(usec) / 2),
        _ => {
            tracing::warn!(
                watchdog_usec = usec,
                "WATCHDOG_USEC is not a positive number of microseconds: no watchdog"
            );
            None
        }
    }
}

/// A socket systemd passed.
struct Activated {
    fd: OwnedFd,
    /// Its `FileDescriptorName=`.
    name: Option<String>,
    /// What a bind request must ask for to get it; `None` for a socket no bind can name (a
    /// connected or unnamed socket, an abstract Unix address, a sequential-packet socket).
    listen: Option<(SocketKind, BoundAddr)>,
}

/// Takes the sockets of `LISTEN_FDS`, if `LISTEN_PID` is this process; every value is checked,
/// and what does not check out is ignored with a warning.
fn sockets_from_env() -> Vec<Activated> {
    let Some(fds) = std::env::var_os("LISTEN_FDS") else {
        return Vec::new();
    };
    let pid = std::env::var_os("LISTEN_PID");
    match pid.as_deref().and_then(|p| p.to_str()?.parse::<u32>().ok()) {
        Some(pid) if pid == std::process::id() => {}
        Some(pid) => {
            tracing::warn!(
                listen_pid = pid,
                "LISTEN_FDS is meant for another process (LISTEN_PID): not taking its sockets"
            );
            return Vec::new();
        }
        None => {
            let pid = pid
                .as_deref()
                .map(OsStr::to_string_lossy)
                .unwrap_or_default();
            tracing::warn!(listen_pid = %pid, "LISTEN_FDS without a valid LISTEN_PID: not taking its sockets");
            return Vec::new();
        }
    }
    let count = match fds.to_str().and_then(|n| n.parse::<u32>().ok()) {
        Some(count) if count <= MAX_LISTEN_FDS => count,
        _ => {
            tracing::warn!(listen_fds = %fds.to_string_lossy(), "LISTEN_FDS is not a number of sockets: not taking any");
            return Vec::new();
        }
    };
    let mut names: Vec<Option<String>> = match std::env::var("LISTEN_FDNAMES") {
        Ok(names) => names.split(':').map(|n| Some(n.to_owned())).collect(),
        Err(std::env::VarError::NotPresent) => Vec::new(),
        Err(std::env::VarError::NotUnicode(names)) => {
            tracing::warn!(listen_fdnames = %names.to_string_lossy(), "LISTEN_FDNAMES is not UTF-8: ignoring the names");
            Vec::new()
        }
    };
    if !names.is_empty() && names.len() != count as usize {
        tracing::warn!(
            names = names.len(),
            sockets = count,
            "LISTEN_FDNAMES does not name every socket of LISTEN_FDS: ignoring the names"
        );
        names.clear();
    }
    names.resize(count as usize, None);
    let mut sockets = Vec::new();
    for (fd, name) in (LISTEN_FDS_START..).zip(names) {
        let socket = match crate::sys::take_activated_socket(fd) {
            Ok(fd) => Socket::from(fd),
            Err(error) => {
                tracing::warn!(fd, name, %error, "LISTEN_FDS: not an open socket; ignoring it");
                continue;
            }
        };
        let listen = listen_of(&socket);
        match &listen {
            Some((kind, addr)) => {
                tracing::info!(fd, name, kind = kind_name(*kind), address = %shown(addr), "systemd passed a socket");
            }
            None => {
                tracing::warn!(
                    fd,
                    name,
                    "systemd passed a socket no bind can ask for (not a listening stream or a \
                     datagram socket on an IP address or a Unix path); kept open, unused"
                );
            }
        }
        sockets.push(Activated {
            fd: socket.into(),
            name,
            listen,
        });
    }
    sockets
}

/// `addr` for a log line.
fn shown(addr: &BoundAddr) -> String {
    match addr {
        BoundAddr::Ip(addr) => addr.to_string(),
        BoundAddr::Path(path) => String::from_utf8_lossy(path).into_owned(),
    }
}

/// The kind and address a bind request names `socket` by, if it can.
/// What a passed socket is, for the log.
fn kind_name(kind: SocketKind) -> &'static str {
    match kind {
        SocketKind::Stream => "stream",
        SocketKind::Datagram => "datagram",
    }
}

fn listen_of(socket: &Socket) -> Option<(SocketKind, BoundAddr)> {
    let kind = match socket.r#type().ok()? {
        Type::STREAM if socket.is_listener().ok()? => SocketKind::Stream,
        Type::DGRAM => SocketKind::Datagram,
        _ => return None,
    };
    let local = socket.local_addr().ok()?;
    let addr = match (local.as_socket(), local.as_pathname()) {
        (Some(addr), _) => BoundAddr::Ip(addr),
        // Clustered Unix sockets are streams.
        (None, Some(path)) if kind == SocketKind::Stream => {
            BoundAddr::Path(path.as_os_str().as_bytes().to_vec())
        }
        _ => return None,
    };
    Some((kind, addr))
}

#[cfg(test)]
mod tests {
    use super::status_line;

    #[test]
    fn status_lines_read_well() {
        assert_eq!(status_line(4, 4, 3), "4 workers serving, generation 3");
        assert_eq!(status_line(1, 1, 1), "1 worker serving, generation 1");
        assert_eq!(status_line(1, 2, 1), "1 of 2 workers serving, generation 1");
    }
}
