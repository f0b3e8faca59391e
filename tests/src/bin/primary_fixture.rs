//! A whole clustered program for tests that need the primary in its own process: every worker
//! listens on `ADDR` (default `127.0.0.1:0`), prints `worker <id> pid <pid> port <port>` and
//! answers each connection with its id. With `FIXTURE_EXIT_AT_BOOT=<code>` workers exit at once.

use std::io::Write;

use cluster::ClusterListener;
use tokio::io::AsyncWriteExt;

#[cluster::main(workers = 2)]
async fn main() -> std::io::Result<()> {
    if let Ok(code) = std::env::var("FIXTURE_EXIT_AT_BOOT") {
        // A worker that crashes before it listens (for the supervisor's tests).
        std::process::exit(code.parse().expect("an exit code"));
    }
    let addr = std::env::var("ADDR").unwrap_or_else(|_| "127.0.0.1:0".to_owned());
    let mut listener = ClusterListener::bind(addr).await?;
    // Unclustered (`CLUSTER_WORKERS=0`), the body runs in the primary process: id 0.
    let id = cluster::Worker::current().map_or(0, |w| w.id().get());
    let port = listener.local_addr()?.port();
    let mut out = std::io::stdout().lock();
    writeln!(out, "worker {id} pid {} port {port}", std::process::id())?;
    out.flush()?;
    drop(out);
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((mut stream, _)) = accepted else { break };
                tokio::spawn(async move {
                    let _ = stream.write_all(format!("{id}\n").as_bytes()).await;
                    let _ = stream.shutdown().await;
                });
            }
            () = cluster::shutdown() => break,
        }
    }
    Ok(())
}
