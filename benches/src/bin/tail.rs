//! The tail benchmark's server: a clustered hyper server (`cluster::hyper::serve`, so the primary
//! knows when each connection ends) whose `GET /block/<ms>` blocks the worker's current-thread
//! runtime that long with `std::thread::sleep`, as a request that keeps its worker busy, without
//! using a CPU: many workers can be measured on a small machine. `ADDR` sets the address;
//! `CLUSTER_WORKERS` and `CLUSTER_SCHED_POLICY` the rest.

use std::convert::Infallible;
use std::time::Duration;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::service::service_fn;
use hyper::{Request, Response};

#[cluster::main]
async fn main() -> std::io::Result<()> {
    let service = service_fn(|request: Request<Incoming>| {
        let block = request
            .uri()
            .path()
            .strip_prefix("/block/")
            .and_then(|ms| ms.parse().ok());
        async move {
            if let Some(ms) = block {
                // On purpose: the worker's runtime serves nothing else meanwhile.
                std::thread::sleep(Duration::from_millis(ms));
            }
            Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"ok\n"))))
        }
    });
    let addr = std::env::var("ADDR").unwrap_or_else(|_| "127.0.0.1:3000".to_owned());
    let listener = cluster::ClusterListener::bind(&addr).await?;
    cluster::hyper::serve(listener, service).await
}
