//! `hello`: a clustered HTTP server. Every worker answers `Hello from worker <id> (pid <pid>)`.
//!
//! ```sh
//! CLUSTER_WORKERS=2 cargo run --release --example hello
//! curl http://127.0.0.1:3000/      # twice: two workers answer in turn
//! ```
//!
//! `GET /delay/<ms>` answers after `ms` milliseconds, to watch a reload or a shutdown drain it.
//!
//! `ADDR` sets the address (default `127.0.0.1:3000`; `unix:<path>` listens on a Unix socket,
//! `curl --unix-socket <path> http://localhost/`), `CLUSTER_WORKERS` the number of workers
//! (default: one per CPU; `0` runs the same program unclustered, in one process),
//! `CLUSTER_SCHED_POLICY=none` shares the listening socket instead of handing connections out
//! round robin. SIGTERM or Ctrl-C drains the workers and exits.

use std::convert::Infallible;
use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::header::{CONNECTION, HeaderValue};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::io::{AsyncRead, AsyncWrite};

/// How long a worker waits for open connections once asked to leave.
const DRAIN: Duration = Duration::from_secs(10);

/// How long a leaving worker keeps idle keep-alive connections open, answering any request on
/// them with `Connection: close`, before it closes them.
const KEEP_ALIVE_GRACE: Duration = Duration::from_millis(500);

#[cluster::main]
async fn main() -> io::Result<()> {
    let addr = std::env::var("ADDR").unwrap_or_else(|_| "127.0.0.1:3000".to_owned());
    match addr.strip_prefix("unix:") {
        Some(path) => serve(cluster::net::ClusterUnixListener::bind(path).await?).await,
        None => serve(cluster::ClusterListener::bind(&addr).await?).await,
    }
}

/// The two listeners `hello` serves alike.
trait Accept {
    type Stream: AsyncRead + AsyncWrite + Unpin + Send + 'static;
    async fn accept(&mut self) -> io::Result<Self::Stream>;
}

impl Accept for cluster::ClusterListener {
    type Stream = tokio::net::TcpStream;
    async fn accept(&mut self) -> io::Result<Self::Stream> {
        Self::accept(self).await.map(|(stream, _peer)| stream)
    }
}

impl Accept for cluster::net::ClusterUnixListener {
    type Stream = tokio::net::UnixStream;
    async fn accept(&mut self) -> io::Result<Self::Stream> {
        Self::accept(self).await.map(|(stream, _peer)| stream)
    }
}

async fn serve(mut listener: impl Accept) -> io::Result<()> {
    let id = cluster::worker().map_or(0, |w| w.id().get());
    let greeting = Bytes::from(format!(
        "Hello from worker {id} (pid {})\n",
        std::process::id()
    ));
    let connections = GracefulShutdown::new();
    let draining = Arc::new(AtomicBool::new(false));
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(stream) => stream,
                Err(_) => break,
            },
            () = cluster::shutdown() => break,
        };
        let greeting = greeting.clone();
        let draining = draining.clone();
        let service = service_fn(move |request: Request<Incoming>| {
            let greeting = greeting.clone();
            let draining = draining.clone();
            // `/delay/<ms>` answers after that long: a request in flight, to watch drains.
            let delay = request
                .uri()
                .path()
                .strip_prefix("/delay/")
                .and_then(|ms| ms.parse().ok());
            async move {
                if let Some(ms) = delay {
                    tokio::time::sleep(Duration::from_millis(ms)).await;
                }
                let mut response = Response::new(Full::new(greeting));
                if draining.load(Ordering::Relaxed) {
                    // Leaving: tell keep-alive clients to reconnect (to the other workers).
                    response
                        .headers_mut()
                        .insert(CONNECTION, HeaderValue::from_static("close"));
                }
                Ok::<_, Infallible>(response)
            }
        });
        let connection = http1::Builder::new().serve_connection(TokioIo::new(stream), service);
        let connection = connections.watch(connection);
        tokio::spawn(async move {
            let _ = connection.await;
        });
    }
    drop(listener);
    // Closing a connection hyper considers idle races with a request the client is sending on it
    // (an idle keep-alive connection, or a fresh one whose first request has not arrived yet).
    // First answer every request with `Connection: close` for a moment, so busy clients move on
    // cleanly; then close what is left.
    draining.store(true, Ordering::Relaxed);
    tokio::time::sleep(KEEP_ALIVE_GRACE).await;
    let _ = tokio::time::timeout(DRAIN, connections.shutdown()).await;
    Ok(())
}
