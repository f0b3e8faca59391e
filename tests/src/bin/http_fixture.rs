//! An HTTP server for the load tests (`hello` with more to say): every worker listens on `ADDR`
//! (default `127.0.0.1:0`; `name:<name>` for the socket systemd passed under that name) and prints `worker <id> pid <pid> port <port>`; `GET /` answers
//! `worker <id>`, `GET /delay/<ms>` prints `delaying <id> <ms>` and answers after `ms`
//! milliseconds, `GET /block/<ms>` blocks the worker's runtime that long (a hung worker),
//! `GET /version` answers `<build> worker <id>` with the build the binary was stamped as
//! (`cluster_tests::stamp`; a build stamped `exit` exits 1 at boot, a bad deploy). On
//! shutdown a worker finishes its open requests (within 30 s) and exits. Workers started while
//! the file named by `FIXTURE_FAIL_IF` exists exit 1 at once. With `FIXTURE_WAIT_READY=1` the
//! primary waits for readiness (`Settings::wait_ready`), and every worker calls
//! `cluster::ready()` once it listens, except in a build stamped `unready`, which never does.
//! `FIXTURE_BOOT_DELAY_MS` makes every worker wait that long before it binds;
//! `FIXTURE_DEFAULT_WORKERS=1` runs the default count instead of two. `GET /abandon/<n>`
//! leaves `n` orphaned processes behind (each lives 2 s) before it answers; `GET /allocate/<mb>`
//! takes that many megabytes and keeps them. Connections are taken with `accept_tracked`, so the
//! primary knows when each ends.

use std::convert::Infallible;
use std::io::Write;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use cluster::ClusterListener;
use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::header::{CONNECTION, HeaderValue};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use hyper_util::server::graceful::GracefulShutdown;

fn settings() -> cluster::Settings {
    let wait_ready = std::env::var_os("FIXTURE_WAIT_READY").is_some();
    let settings = cluster::Settings::new().wait_ready(wait_ready);
    // The default count (one per CPU this process may use), or two.
    if std::env::var_os("FIXTURE_DEFAULT_WORKERS").is_some() {
        settings
    } else {
        settings.workers(2)
    }
}

#[cluster::main(settings = settings)]
async fn main() -> std::io::Result<()> {
    if std::env::var_os("FIXTURE_FAIL_IF").is_some_and(|path| std::path::Path::new(&path).exists())
    {
        // Workers started after the file appeared crash at boot (a bad deploy).
        std::process::exit(1);
    }
    let build = cluster_tests::build_version();
    if build == "exit" {
        std::process::exit(1);
    }
    if let Some(ms) = std::env::var("FIXTURE_BOOT_DELAY_MS")
        .ok()
        .and_then(|ms| ms.parse().ok())
    {
        // A slow start (a warm-up before binding): a reload then takes at least this per worker.
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
    let addr = std::env::var("ADDR").unwrap_or_else(|_| "127.0.0.1:0".to_owned());
    let mut listener = match addr.strip_prefix("name:") {
        Some(name) => ClusterListener::from_activation(name).await?,
        None => ClusterListener::bind(addr).await?,
    };
    let id = cluster::Worker::current().map_or(0, |w| w.id().get());
    say(&format!(
        "worker {id} pid {} port {}",
        std::process::id(),
        listener.local_addr()?.port()
    ));
    if build != "unready" {
        cluster::ready();
    }
    let connections = GracefulShutdown::new();
    let draining = Arc::new(AtomicBool::new(false));
    loop {
        // The guard travels with the connection's task: the primary counts the connection as
        // this worker's until it ends (least-outstanding, per-worker caps).
        let (stream, guard) = tokio::select! {
            accepted = listener.accept_tracked() => match accepted {
                Ok((stream, _, guard)) => (stream, guard),
                Err(_) => break,
            },
            () = cluster::shutdown() => break,
        };
        let draining = draining.clone();
        let build = build.clone();
        let service = service_fn(move |request: Request<Incoming>| {
            let draining = draining.clone();
            let build = build.clone();
            async move {
                let path = request.uri().path();
                if let Some(ms) = path
                    .strip_prefix("/block/")
                    .and_then(|ms| ms.parse::<u64>().ok())
                {
                    // Blocks the whole (current-thread) runtime: a hung worker.
                    say(&format!("blocking {id} {ms}"));
                    std::thread::sleep(Duration::from_millis(ms));
                }
                if let Some(ms) = path
                    .strip_prefix("/delay/")
                    .and_then(|ms| ms.parse::<u64>().ok())
                {
                    say(&format!("delaying {id} {ms}"));
                    tokio::time::sleep(Duration::from_millis(ms)).await;
                }
                if let Some(megabytes) = path
                    .strip_prefix("/allocate/")
                    .and_then(|mb| mb.parse::<usize>().ok())
                {
                    // Takes that much memory for real (every page written), and keeps it.
                    let mut taken = vec![0u8; megabytes << 20];
                    for page in taken.chunks_mut(4096) {
                        page[0] = 1;
                    }
                    std::mem::forget(taken);
                }
                if let Some(count) = path
                    .strip_prefix("/abandon/")
                    .and_then(|count| count.parse::<u32>().ok())
                {
                    // Leaves `count` processes behind, each living 2 s: each is started by a
                    // subshell that exits at once, so it is orphaned (and goes to the nearest
                    // subreaper).
                    let script =
                        format!("i=0; while [ $i -lt {count} ]; do (sleep 2 &); i=$((i+1)); done");
                    let _ = tokio::process::Command::new("sh")
                        .arg("-c")
                        .arg(script)
                        .status()
                        .await;
                }
                let body = if path == "/version" {
                    format!("{build} worker {id}\n")
                } else {
                    format!("worker {id}\n")
                };
                let mut response = Response::new(Full::new(Bytes::from(body)));
                if draining.load(Ordering::Relaxed) {
                    response
                        .headers_mut()
                        .insert(CONNECTION, HeaderValue::from_static("close"));
                }
                Ok::<_, Infallible>(response)
            }
        });
        let connection = connections
            .watch(http1::Builder::new().serve_connection(TokioIo::new(stream), service));
        tokio::spawn(async move {
            let _ = connection.await;
            drop(guard);
        });
    }
    drop(listener);
    // As `examples/hello.rs`: closing a connection hyper considers idle races with a request
    // the client is sending on it (a fresh connection counts as idle until its first request
    // arrives). Answer with `Connection: close` for a moment, then close what is left.
    draining.store(true, Ordering::Relaxed);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let _ = tokio::time::timeout(Duration::from_secs(30), connections.shutdown()).await;
    Ok(())
}

fn say(line: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}
