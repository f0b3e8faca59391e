//! What a worker holds, read from `/proc`: the sockets of a worker that would not leave, so that
//! the log line of its kill at the disconnect deadline points at the cause, and the connections
//! a worker is serving, for the cluster's status.

use std::collections::HashSet;
use std::fmt;

/// The sockets a worker process had open.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Holding {
    /// Established TCP connections.
    pub(crate) connections: usize,
    /// Every other socket (listeners, Unix sockets, UDP).
    pub(crate) other_sockets: usize,
}

impl Holding {
    /// What process `pid` holds; `None` if `/proc` does not tell (it is gone, or not ours).
    pub(crate) fn of(pid: u32) -> Option<Self> {
        let sockets = socket_inodes(pid)?;
        let established = tcp_rows(pid)
            .filter(|row| row.state == ESTABLISHED && sockets.contains(&row.inode))
            .count();
        Some(Self {
            connections: established,
            other_sockets: sockets.len() - established,
        })
    }
}

/// The TCP ports this process listens on (its sockets in the `LISTEN` state).
pub(crate) fn listening_ports() -> HashSet<u16> {
    let ours = socket_inodes(std::process::id()).unwrap_or_default();
    tcp_rows(std::process::id())
        .filter(|row| row.state == LISTEN && ours.contains(&row.inode))
        .map(|row| row.local_port)
        .collect()
}

/// How many established TCP connections to one of `ports` process `pid` holds: the clients it
/// is serving on the cluster's listeners (its own outgoing connections, to a database say, are
/// not counted). `None` if `/proc` does not tell.
pub(crate) fn serving(pid: u32, ports: &HashSet<u16>) -> Option<usize> {
    let sockets = socket_inodes(pid)?;
    Some(
        tcp_rows(pid)
            .filter(|row| {
                row.state == ESTABLISHED
                    && ports.contains(&row.local_port)
                    && sockets.contains(&row.inode)
            })
            .count(),
    )
}

const ESTABLISHED: u8 = 0x01;
const LISTEN: u8 = 0x0a;

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

/// One row of `/proc/<pid>/net/tcp{,6}`.
struct TcpRow {
    local_port: u16,
    state: u8,
    inode: u64,
}

/// The TCP sockets of `pid`'s network namespace, IPv4 and IPv6.
fn tcp_rows(pid: u32) -> impl Iterator<Item = TcpRow> {
    ["tcp", "tcp6"]
        .into_iter()
        .filter_map(move |table| std::fs::read_to_string(format!("/proc/{pid}/net/{table}")).ok())
        .flat_map(|table| {
            table
                .lines()
                .skip(1)
                .filter_map(parse_tcp_row)
                .collect::<Vec<_>>()
        })
}

/// `sl local_address rem_address st tx_queue:rx_queue tr:tm->when retrnsmt uid timeout inode`.
fn parse_tcp_row(row: &str) -> Option<TcpRow> {
    let columns: Vec<&str> = row.split_whitespace().collect();
    let (_, port) = columns.get(1)?.rsplit_once(':')?;
    Some(TcpRow {
        local_port: u16::from_str_radix(port, 16).ok()?,
        state: u8::from_str_radix(columns.get(3)?, 16).ok()?,
        inode: columns.get(9)?.parse().ok()?,
    })
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
    use super::*;

    #[test]
    fn reads_rows_of_proc_net_tcp() {
        let listening = "   0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000  1000        0 111 1 0000000000000000 100 0 0 10 0";
        let row = parse_tcp_row(listening).unwrap();
        assert_eq!((row.local_port, row.state, row.inode), (8080, LISTEN, 111));
        let v6 = "   1: 00000000000000000000000001000000:C350 00000000000000000000000001000000:1F90 01 00000000:00000000 00:00000000 00000000  1000        0 222 1 0000000000000000 20 4 30 10 -1";
        let row = parse_tcp_row(v6).unwrap();
        assert_eq!(
            (row.local_port, row.state, row.inode),
            (50000, ESTABLISHED, 222)
        );
        assert!(parse_tcp_row("  sl  local_address rem_address   st").is_none());
    }

    #[test]
    fn counts_the_connections_served_on_a_listening_port() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        assert!(listening_ports().contains(&port));
        let client = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        let (served, _) = listener.accept().unwrap();
        // Only the accepted end is on the listening port; the client's end is on another.
        let ports = HashSet::from([port]);
        assert_eq!(serving(std::process::id(), &ports), Some(1));
        drop((client, served));
    }

    #[test]
    fn reads_this_process() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (served, _) = listener.accept().unwrap();
        let holding = Holding::of(std::process::id()).unwrap();
        // Both ends of the connection are ours; other tests' sockets may come and go.
        assert!(holding.connections >= 2, "{holding:?}");
        assert!(holding.other_sockets >= 1, "{holding:?}");
        drop((client, served));
    }
}
