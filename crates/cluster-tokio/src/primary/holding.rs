//! What a worker holds: the sockets of a worker that would not leave, so that the log line of its
//! kill at the disconnect deadline points at the cause, and the connections a worker is serving,
//! for the cluster's status.
//!
//! A process's sockets are the `socket:[inode]` links of `/proc/<pid>/fd`; which of them are TCP
//! connections, and on which port, the kernel says through `sock_diag` netlink, asked for the
//! sockets in one state only. Not `/proc/net/tcp`: that lists every socket of the namespace,
//! `TIME_WAIT` ones included, hundreds of thousands under connection churn.
//!
//! Hand-written rather than with the `netlink-packet-*` crates: one fixed request and the first
//! 72 bytes of one fixed reply, with no `unsafe`, against four more dependencies.

use std::collections::HashSet;
use std::fmt;
use std::io::{self, Read};
use std::time::Duration;

use socket2::{Domain, Protocol, Socket, Type};

/// The sockets a worker process had open.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Holding {
    /// Established TCP connections.
    pub(crate) connections: usize,
    /// Every other socket (listeners, Unix sockets, UDP).
    pub(crate) other_sockets: usize,
}

impl Holding {
    /// What process `pid` holds; `None` if the kernel does not tell (it is gone, or not ours).
    pub(crate) fn of(pid: u32) -> Option<Self> {
        let sockets = socket_inodes(pid)?;
        let established = tcp_sockets(ESTABLISHED)
            .ok()?
            .iter()
            .filter(|s| sockets.contains(&s.inode))
            .count();
        Some(Self {
            connections: established,
            other_sockets: sockets.len().saturating_sub(established),
        })
    }
}

/// Who serves how many TCP connections on this process's listening ports: read once for every
/// worker of a status.
#[derive(Debug)]
pub(crate) struct Serving {
    ports: HashSet<u16>,
    established: Vec<TcpSocket>,
}

impl Serving {
    /// The kernel's view now; `None` if it does not answer.
    ///
    /// Listing the established sockets walks the kernel's whole TCP hash table, milliseconds
    /// whatever the load (listing the listening ones is cheap): done only for the address
    /// families this process listens on.
    pub(crate) fn read() -> Option<Self> {
        let ours = socket_inodes(std::process::id())?;
        let mut ports = HashSet::new();
        let mut established = Vec::new();
        for family in [libc::AF_INET, libc::AF_INET6] {
            let mut listening = Vec::new();
            dump(family, LISTEN, &mut listening).ok()?;
            let mut listens = false;
            for socket in listening.iter().filter(|s| ours.contains(&s.inode)) {
                ports.insert(socket.local_port);
                listens = true;
            }
            // Per family, even for a port already seen in the other one (`0.0.0.0:P` and
            // `[::]:P`): each family's connections are its own sockets.
            if listens {
                dump(family, ESTABLISHED, &mut established).ok()?;
            }
        }
        Some(Self { ports, established })
    }

    /// How many established TCP connections to one of this process's listening ports `pid`
    /// holds: the clients it is serving (its own outgoing connections, to a database say, are
    /// not counted). `None` if its fds cannot be read.
    pub(crate) fn by(&self, pid: u32) -> Option<usize> {
        let sockets = socket_inodes(pid)?;
        Some(
            self.established
                .iter()
                .filter(|s| self.ports.contains(&s.local_port) && sockets.contains(&s.inode))
                .count(),
        )
    }
}

/// TCP states (`include/net/tcp_states.h`).
const ESTABLISHED: u8 = 1;
const LISTEN: u8 = 10;

/// The inodes of `pid`'s sockets.
fn socket_inodes(pid: u32) -> Option<HashSet<u64>> {
    let mut sockets = HashSet::new();
    for entry in std::fs::read_dir(format!("/proc/{pid}/fd")).ok()? {
        let Ok(target) = entry.and_then(|e| std::fs::read_link(e.path())) else {
            continue;
        };
        if let Some(inode) = target
            .to_str()
            .and_then(|t| t.strip_prefix("socket:["))
            .and_then(|t| t.strip_suffix(']'))
            .and_then(|t| t.parse::<u64>().ok())
        {
            sockets.insert(inode);
        }
    }
    Some(sockets)
}

/// One TCP socket as `sock_diag` reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct TcpSocket {
    local_port: u16,
    inode: u64,
}

const NETLINK_SOCK_DIAG: i32 = 4;
const SOCK_DIAG_BY_FAMILY: u16 = 20;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_DUMP: u16 = 0x300;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
/// `struct nlmsghdr`.
const HEADER: usize = 16;
/// `struct inet_diag_msg`, up to and including `idiag_inode`.
const DIAG_MSG: usize = 72;

/// Every TCP socket (IPv4 and IPv6) of this process's network namespace in `state`.
fn tcp_sockets(state: u8) -> io::Result<Vec<TcpSocket>> {
    let mut found = Vec::new();
    for family in [libc::AF_INET, libc::AF_INET6] {
        dump(family, state, &mut found)?;
    }
    Ok(found)
}

/// One `SOCK_DIAG_BY_FAMILY` dump (`inet_diag_req_v2`) for `family` and `state`.
fn dump(family: i32, state: u8, found: &mut Vec<TcpSocket>) -> io::Result<()> {
    let socket = Socket::new(
        Domain::from(libc::AF_NETLINK),
        Type::DGRAM,
        Some(Protocol::from(NETLINK_SOCK_DIAG)),
    )?;
    socket.set_read_timeout(Some(Duration::from_secs(1)))?;
    let mut request = Vec::with_capacity(HEADER + 56);
    request.extend(((HEADER + 56) as u32).to_ne_bytes());
    request.extend(SOCK_DIAG_BY_FAMILY.to_ne_bytes());
    request.extend((NLM_F_REQUEST | NLM_F_DUMP).to_ne_bytes());
    request.extend(1u32.to_ne_bytes()); // sequence number
    request.extend(0u32.to_ne_bytes()); // port id: the kernel fills it in
    request.push(family as u8);
    request.push(libc::IPPROTO_TCP as u8);
    request.extend([0, 0]); // no extensions, padding
    request.extend((1u32 << state).to_ne_bytes());
    request.extend([0; 48]); // any address, port and interface
    // Unconnected, a netlink socket sends to the kernel.
    socket.send(&request)?;
    let mut buf = vec![0; 64 * 1024];
    let mut socket = socket;
    loop {
        let len = socket.read(&mut buf)?;
        if parse(&buf[..len], found)? {
            return Ok(());
        }
    }
}

/// Adds the sockets of one datagram of a dump to `found`; true once the dump is done.
fn parse(mut datagram: &[u8], found: &mut Vec<TcpSocket>) -> io::Result<bool> {
    let truncated = || io::Error::new(io::ErrorKind::InvalidData, "truncated sock_diag reply");
    while datagram.len() >= HEADER {
        let len = u32::from_ne_bytes(datagram[0..4].try_into().expect("4 bytes")) as usize;
        let kind = u16::from_ne_bytes(datagram[4..6].try_into().expect("2 bytes"));
        if len < HEADER || len > datagram.len() {
            return Err(truncated());
        }
        let payload = &datagram[HEADER..len];
        match kind {
            NLMSG_DONE => return Ok(true),
            NLMSG_ERROR => {
                let code = payload
                    .get(0..4)
                    .map(|b| i32::from_ne_bytes(b.try_into().expect("4 bytes")))
                    .ok_or_else(truncated)?;
                if code != 0 {
                    return Err(io::Error::from_raw_os_error(-code));
                }
                return Ok(true);
            }
            SOCK_DIAG_BY_FAMILY => {
                let message = payload.get(..DIAG_MSG).ok_or_else(truncated)?;
                found.push(TcpSocket {
                    local_port: u16::from_be_bytes([message[4], message[5]]),
                    inode: u64::from(u32::from_ne_bytes(
                        message[68..72].try_into().expect("4 bytes"),
                    )),
                });
            }
            _ => {}
        }
        // Messages are aligned to 4 bytes.
        datagram = datagram.get(len.next_multiple_of(4)..).unwrap_or_default();
    }
    Ok(false)
}

impl fmt::Display for Holding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.connections {
            0 => write!(
                f,
                "it held no open TCP connection ({} other sockets): something else kept it \
                 running, such as a task or thread that does not end when `cluster::shutdown()` \
                 resolves",
                self.other_sockets
            ),
            n => write!(
                f,
                "it still held {n} open TCP connections: its server probably does not stop on \
                 `cluster::shutdown()` (axum: `.with_graceful_shutdown(cluster::shutdown())`), or \
                 its clients keep them busy longer than the disconnect timeout"
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsRawFd;

    use super::*;

    #[test]
    fn counts_the_connections_served_on_a_listening_port() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let client = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        let (served, _) = listener.accept().unwrap();
        let serving = Serving::read().expect("the kernel answers");
        assert!(serving.ports.contains(&port), "{serving:?}");
        // Both ends are this process's; only the accepted one is on the listening port. Other
        // tests' listeners and connections come and go meanwhile, hence at least.
        assert!(serving.by(std::process::id()).unwrap() >= 1);
        let holding = Holding::of(std::process::id()).unwrap();
        assert!(holding.connections >= 2, "{holding:?}");
        assert!(holding.other_sockets >= 1, "{holding:?}");
        drop((client, served));
    }

    #[test]
    fn connections_on_a_port_open_in_both_families_are_all_found() {
        use std::os::unix::fs::MetadataExt;
        let v4 = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = v4.local_addr().unwrap().port();
        let v6 = std::net::TcpListener::bind(("::1", port)).unwrap();
        let client = std::net::TcpStream::connect(("::1", port)).unwrap();
        let (served, _) = v6.accept().unwrap();
        let inode = std::fs::metadata(format!("/proc/self/fd/{}", served.as_raw_fd()))
            .unwrap()
            .ino();
        let serving = Serving::read().expect("the kernel answers");
        assert!(
            serving
                .established
                .iter()
                .any(|s| s.inode == inode && s.local_port == port),
            "{serving:?}"
        );
        drop((client, served, v4));
    }

    #[test]
    fn a_dump_ends_at_done_and_an_error_is_an_error() {
        let mut message = Vec::new();
        message.extend(((HEADER + DIAG_MSG) as u32).to_ne_bytes());
        message.extend(SOCK_DIAG_BY_FAMILY.to_ne_bytes());
        message.extend([0; 10]);
        let mut diag = [0u8; DIAG_MSG];
        diag[4..6].copy_from_slice(&8080u16.to_be_bytes());
        diag[68..72].copy_from_slice(&4242u32.to_ne_bytes());
        message.extend(diag);
        let mut done = Vec::new();
        done.extend((HEADER as u32 + 4).to_ne_bytes());
        done.extend(NLMSG_DONE.to_ne_bytes());
        done.extend([0; 14]);
        let mut found = Vec::new();
        assert!(!parse(&message, &mut found).unwrap());
        assert!(parse(&[message.clone(), done].concat(), &mut found).unwrap());
        assert_eq!(
            found,
            [TcpSocket {
                local_port: 8080,
                inode: 4242
            }; 2]
        );
        let mut error = Vec::new();
        error.extend((HEADER as u32 + 4).to_ne_bytes());
        error.extend(NLMSG_ERROR.to_ne_bytes());
        error.extend([0; 10]);
        error.extend((-libc::EPERM).to_ne_bytes());
        assert_eq!(
            parse(&error, &mut found).unwrap_err().raw_os_error(),
            Some(libc::EPERM)
        );
        assert!(parse(&message[..20], &mut found).is_err());
    }
}
