//! `axum`: an axum 0.8 app in every worker, with the client's address from `ConnectInfo`.
//!
//! ```sh
//! CLUSTER_WORKERS=2 cargo run --release --example axum
//! curl http://127.0.0.1:3000/
//! ```
//!
//! `ADDR` sets the address (default `127.0.0.1:3000`). SIGTERM or Ctrl-C drains and exits;
//! SIGHUP replaces the workers one at a time, and `cluster::axum::serve` drains each without
//! failing a request, keep-alive clients included.

use std::net::SocketAddr;

use axum::Router;
use axum::extract::ConnectInfo;
use axum::routing::get;

#[cluster::main]
async fn main() -> std::io::Result<()> {
    let addr = std::env::var("ADDR").unwrap_or_else(|_| "127.0.0.1:3000".to_owned());
    let listener = cluster::ClusterListener::bind(&addr).await?;
    let app = Router::new().route("/", get(hello));
    // Serves until the worker is asked to leave, then drains its connections.
    cluster::axum::serve(listener, app).await
}

async fn hello(ConnectInfo(peer): ConnectInfo<SocketAddr>) -> String {
    let id = cluster::Worker::current().map_or(0, |w| w.id().get());
    format!(
        "Hello {peer} from worker {id} (pid {})\n",
        std::process::id()
    )
}
