//! `counter`: Node's documented request counter, with typed messages. Each worker tells the
//! primary about every request it serves; `GET /count` on any worker asks the primary (a
//! request with a reply) and answers with the total over the whole cluster.
//!
//! ```sh
//! CLUSTER_WORKERS=2 cargo run --release --example counter
//! curl http://127.0.0.1:3000/          # counted
//! curl http://127.0.0.1:3000/count     # total 2 requests
//! ```
//!
//! `ADDR` sets the address (default `127.0.0.1:3000`), `CLUSTER_WORKERS` the number of workers.
//!
//! The Node original (from the `cluster` documentation):
//!
//! ```js
//! if (cluster.isPrimary) {
//!   let numReqs = 0;
//!   function messageHandler(msg) { if (msg.cmd && msg.cmd === 'notifyRequest') numReqs += 1; }
//!   for (const id in cluster.workers) cluster.workers[id].on('message', messageHandler);
//! } else {
//!   http.Server((req, res) => { res.end('hello world\n'); process.send({ cmd: 'notifyRequest' }); })
//! }
//! ```

use std::convert::Infallible;

use cluster::{Role, Supervisor};
use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde::{Deserialize, Serialize};

/// What workers tell or ask the primary.
#[derive(Debug, Serialize, Deserialize)]
enum ToPrimary {
    /// One request was served (Node's `notifyRequest`).
    Served,
    /// How many so far? Answered with a `u64`.
    Total,
}

#[cluster::main]
async fn main(role: Role) -> std::io::Result<()> {
    match role {
        Role::Primary(primary) => count(primary).await,
        Role::Worker(worker) => serve(worker).await,
    }
}

async fn count(primary: cluster::Primary) -> std::io::Result<()> {
    tracing_subscriber::fmt().init();
    let mut messages = primary.messages();
    // The supervisor forks, respawns, reloads and drains; this task only counts.
    let mut supervisor = tokio::spawn(Supervisor::new(primary).run());
    let mut total: u64 = 0;
    loop {
        tokio::select! {
            received = messages.recv() => {
                let Some((worker, mut message)) = received else { continue };
                match message.decode::<ToPrimary>() {
                    Ok(ToPrimary::Served) => total += 1,
                    Ok(ToPrimary::Total) => {
                        if let Err(error) = message.reply(&total) {
                            tracing::warn!(worker = %worker.id(), %error, "count not sent");
                        }
                    }
                    Err(error) => tracing::warn!(worker = %worker.id(), %error, "unknown message"),
                }
            }
            finished = &mut supervisor => {
                return Ok(finished.map_err(std::io::Error::other)??);
            }
        }
    }
}

async fn serve(worker: cluster::Worker) -> std::io::Result<()> {
    let addr = std::env::var("ADDR").unwrap_or_else(|_| "127.0.0.1:3000".to_owned());
    let mut listener = cluster::ClusterListener::bind(&addr).await?;
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => accepted?.0,
            () = cluster::shutdown() => return Ok(()),
        };
        let worker = worker.clone();
        let service = service_fn(move |request: Request<Incoming>| {
            let worker = worker.clone();
            async move {
                // Messages on one link arrive in order: the total asked next includes this one.
                let _ = worker.send(&ToPrimary::Served);
                let response = if request.uri().path() == "/count" {
                    match worker.request::<_, u64>(&ToPrimary::Total).await {
                        Ok(total) => Response::new(Full::new(Bytes::from(format!(
                            "total {total} requests\n"
                        )))),
                        Err(error) => {
                            let mut response =
                                Response::new(Full::new(Bytes::from(format!("{error}\n"))));
                            *response.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
                            response
                        }
                    }
                } else {
                    Response::new(Full::new(Bytes::from_static(b"hello world\n")))
                };
                Ok::<_, Infallible>(response)
            }
        });
        tokio::spawn(http1::Builder::new().serve_connection(TokioIo::new(stream), service));
    }
}
