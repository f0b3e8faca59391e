//! What a worker that would not leave still holds, read from `/proc`, so that the log line of
//! its kill at the disconnect deadline points at the cause.

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
        // The tables of the process's own network namespace.
        let established = ["tcp", "tcp6"]
            .iter()
            .filter_map(|table| std::fs::read_to_string(format!("/proc/{pid}/net/{table}")).ok())
            .map(|table| established_among(&table, &sockets))
            .sum::<usize>();
        Some(Self {
            connections: established,
            other_sockets: sockets.len() - established,
        })
    }
}

/// How many rows of a `/proc/net/tcp` table are established connections with an inode in
/// `sockets`.
fn established_among(table: &str, sockets: &HashSet<u64>) -> usize {
    const ESTABLISHED: &str = "01";
    table
        .lines()
        .skip(1)
        .filter(|row| {
            let columns: Vec<&str> = row.split_whitespace().collect();
            // sl local_address rem_address st tx_queue:rx_queue tr:tm->when retrnsmt uid
            // timeout inode ...
            columns.get(3) == Some(&ESTABLISHED)
                && columns
                    .get(9)
                    .and_then(|inode| inode.parse::<u64>().ok())
                    .is_some_and(|inode| sockets.contains(&inode))
        })
        .count()
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
    fn counts_established_connections_of_the_process_only() {
        let table = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000  1000        0 111 1 0000000000000000 100 0 0 10 0
   1: 0100007F:1F90 0100007F:C350 01 00000000:00000000 00:00000000 00000000  1000        0 222 1 0000000000000000 20 4 30 10 -1
   2: 0100007F:1F90 0100007F:C351 01 00000000:00000000 00:00000000 00000000  1000        0 333 1 0000000000000000 20 4 30 10 -1
   3: 0100007F:1F90 0100007F:C352 06 00000000:00000000 03:00000000 00000000     0        0 0 3 0000000000000000
";
        let ours = HashSet::from([111, 222, 444]);
        assert_eq!(established_among(table, &ours), 1);
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
