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
//! round robin. SIGTERM or Ctrl-C drains the workers and exits; SIGHUP replaces them one at a
//! time.
//!
//! `cluster::hyper::serve` does the draining: once a worker is asked to leave it stops
//! accepting, answers with `Connection: close` for a moment so keep-alive clients move on
//! cleanly, then closes what is left (the operations page, "Draining HTTP keep-alive
//! connections", says why and how to do it by hand).

use std::convert::Infallible;
use std::io;
use std::time::Duration;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::service::service_fn;
use hyper::{Request, Response};

/// How long a worker waits for open connections once asked to leave.
const DRAIN: Duration = Duration::from_secs(10);

#[cluster::main]
async fn main() -> io::Result<()> {
    let id = cluster::Worker::current().map_or(0, |w| w.id().get());
    let greeting = Bytes::from(format!(
        "Hello from worker {id} (pid {})\n",
        std::process::id()
    ));
    let service = service_fn(move |request: Request<Incoming>| {
        let greeting = greeting.clone();
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
            Ok::<_, Infallible>(Response::new(Full::new(greeting)))
        }
    });
    let addr = std::env::var("ADDR").unwrap_or_else(|_| "127.0.0.1:3000".to_owned());
    match addr.strip_prefix("unix:") {
        Some(path) => {
            let listener = cluster::net::ClusterUnixListener::bind(path).await?;
            cluster::hyper::serve(listener, service)
                .drain_timeout(DRAIN)
                .await
        }
        None => {
            let listener = cluster::ClusterListener::bind(&addr).await?;
            cluster::hyper::serve(listener, service)
                .drain_timeout(DRAIN)
                .await
        }
    }
}
