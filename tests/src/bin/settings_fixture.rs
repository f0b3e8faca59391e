//! A program configured only through `#[cluster::main(settings = ..)]`: two workers and a
//! disconnect timeout of 2 s (and the program `FIXTURE_EXEC` names as the workers' program,
//! if set). Each worker listens on `127.0.0.1:0`, prints
//! `worker <id> pid <pid> port <port>`, answers every connection with `"hi\n"` and holds it
//! open, and ignores `cluster::shutdown()`: a SIGTERM ends the primary only once the disconnect
//! timeout has killed them.

use std::io::Write;
use std::time::Duration;

fn settings() -> cluster::Settings {
    let settings = cluster::Settings::new()
        .workers(2)
        .disconnect_timeout(Duration::from_secs(2));
    match std::env::var_os("FIXTURE_EXEC") {
        Some(program) => settings.exec(program),
        None => settings,
    }
}

#[cluster::main(settings = settings)]
async fn main() -> std::io::Result<()> {
    let mut listener = cluster::ClusterListener::bind("127.0.0.1:0").await?;
    let id = cluster::Worker::current().map_or(0, |w| w.id().get());
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "worker {id} pid {} port {}",
        std::process::id(),
        listener.local_addr()?.port()
    )?;
    out.flush()?;
    drop(out);
    // Holds every connection and never looks at `cluster::shutdown()` (its listener ends then).
    let mut held = Vec::new();
    while let Ok((mut stream, _)) = listener.accept().await {
        use tokio::io::AsyncWriteExt;
        stream.write_all(b"hi\n").await?;
        held.push(stream);
    }
    std::future::pending::<()>().await;
    drop(held);
    Ok(())
}
