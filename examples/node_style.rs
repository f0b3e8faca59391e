//! `node_style`: Node's classic cluster example, with an explicit `Role` match: the primary forks
//! one worker per CPU and logs each death; workers serve HTTP.
//!
//! ```sh
//! cargo run --release --example node_style
//! curl http://127.0.0.1:8000/
//! ```
//!
//! The Node original:
//!
//! ```js
//! if (cluster.isPrimary) {
//!   for (let i = 0; i < numCPUs; i++) cluster.fork();
//!   cluster.on('exit', (worker, code, signal) => console.log(`worker ${worker.process.pid} died`));
//! } else {
//!   http.createServer((req, res) => { res.writeHead(200); res.end('hello world\n'); }).listen(8000);
//! }
//! ```

use std::convert::Infallible;

use cluster::Role;
use cluster::primary::Event;
use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;

#[cluster::main]
async fn main(role: Role) -> std::io::Result<()> {
    match role {
        Role::Primary(primary) => {
            tracing_subscriber::fmt().init();
            let mut events = primary.events();
            for _ in 0..primary.settings().worker_count() {
                primary.fork().await?;
            }
            loop {
                tokio::select! {
                    event = events.recv() => match event {
                        Some(Event::Listening { worker, address }) => {
                            tracing::info!("{} (pid {}) listening on {address}", worker.id(), worker.pid());
                        }
                        Some(Event::Exit { worker, status, .. }) => {
                            tracing::warn!("{} (pid {}) died: {status}", worker.id(), worker.pid());
                        }
                        Some(_) => {}
                        None => return Ok(()),
                    },
                    () = cluster::shutdown() => return primary.disconnect().await,
                }
            }
        }
        Role::Worker(_) => {
            let mut listener = cluster::ClusterListener::bind("127.0.0.1:8000").await?;
            loop {
                let stream = tokio::select! {
                    accepted = listener.accept() => accepted?.0,
                    () = cluster::shutdown() => return Ok(()),
                };
                let service = service_fn(|_: Request<Incoming>| async {
                    Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(
                        b"hello world\n",
                    ))))
                });
                tokio::spawn(http1::Builder::new().serve_connection(TokioIo::new(stream), service));
            }
        }
    }
}
