//! `udp_echo`: a clustered UDP server. Every worker answers each datagram with
//! `worker <id>: <payload>`; the workers share one socket (UDP is never round robin).
//!
//! ```sh
//! CLUSTER_WORKERS=2 cargo run --release --example udp_echo
//! echo -n hi | nc -u -w1 127.0.0.1 4000      # worker 1: hi  (or worker 2)
//! ```
//!
//! `ADDR` sets the address (default `127.0.0.1:4000`), `CLUSTER_WORKERS` the number of workers.

#[cluster::main]
async fn main() -> std::io::Result<()> {
    let addr = std::env::var("ADDR").unwrap_or_else(|_| "127.0.0.1:4000".to_owned());
    let socket = cluster::net::ClusterUdpSocket::bind(&addr).await?;
    let id = cluster::Worker::current().map_or(0, |w| w.id().get());
    let mut buf = vec![0; 65_536];
    loop {
        let (len, peer) = tokio::select! {
            received = socket.recv_from(&mut buf) => received?,
            () = cluster::shutdown() => return Ok(()),
        };
        let mut answer = format!("worker {id}: ").into_bytes();
        answer.extend_from_slice(&buf[..len]);
        // A peer that went away is its problem, not the server's.
        if let Err(error) = socket.send_to(&answer, peer).await {
            tracing::debug!(%peer, %error, "answer not sent");
        }
    }
}
