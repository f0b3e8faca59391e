//! `echo`: a raw TCP echo server in every worker.
//!
//! ```sh
//! CLUSTER_WORKERS=2 cargo run --release --example echo
//! echo hello | nc -q1 127.0.0.1 4000
//! ```
//!
//! `ADDR` sets the address (default `127.0.0.1:4000`).

use tokio::io::AsyncWriteExt;

#[cluster::main]
async fn main() -> std::io::Result<()> {
    let addr = std::env::var("ADDR").unwrap_or_else(|_| "127.0.0.1:4000".to_owned());
    let mut listener = cluster::ClusterListener::bind(&addr).await?;
    loop {
        let mut stream = tokio::select! {
            accepted = listener.accept() => accepted?.0,
            () = cluster::shutdown() => return Ok(()),
        };
        tokio::spawn(async move {
            let (mut reader, mut writer) = stream.split();
            let _ = tokio::io::copy(&mut reader, &mut writer).await;
            let _ = writer.shutdown().await;
        });
    }
}
