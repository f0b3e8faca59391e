//! A program configured only through `#[cluster::main(settings = ..)]`: two workers and a
//! disconnect timeout of 2 s (and the program `FIXTURE_EXEC` names as the workers' program,
//! if set). Each worker listens on `127.0.0.1:0`, prints
//! `worker <id> pid <pid> port <port>`, and then ignores `cluster::shutdown()`: a SIGTERM ends
//! the primary only once the disconnect timeout has killed them.

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
    let listener = cluster::ClusterListener::bind("127.0.0.1:0").await?;
    let id = cluster::worker().map_or(0, |w| w.id().get());
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "worker {id} pid {} port {}",
        std::process::id(),
        listener.local_addr()?.port()
    )?;
    out.flush()?;
    drop(out);
    // Holds the listener and never looks at `cluster::shutdown()`.
    std::future::pending::<()>().await;
    drop(listener);
    Ok(())
}
