//! `axum`: an axum 0.8 app in every worker, with the client's address from `ConnectInfo`.
//!
//! ```sh
//! CLUSTER_WORKERS=2 cargo run --release --example axum
//! curl http://127.0.0.1:3000/
//! ```
//!
//! `ADDR` sets the address (default `127.0.0.1:3000`). SIGTERM or Ctrl-C drains and exits.

use std::net::SocketAddr;

use axum::Router;
use axum::extract::ConnectInfo;
use axum::routing::get;
use axum::serve::ListenerExt;

#[cluster::main]
async fn main() -> std::io::Result<()> {
    let addr = std::env::var("ADDR").unwrap_or_else(|_| "127.0.0.1:3000".to_owned());
    let listener = cluster::ClusterListener::bind(&addr).await?;
    let app = Router::new().route("/", get(hello));
    // `tap_io` makes axum's `ConnectInfo<SocketAddr>` available for a custom listener.
    axum::serve(
        listener.tap_io(|_| {}),
        app.into_make_service_with_connect_info::<SocketAddr>(),
    )
    .with_graceful_shutdown(cluster::shutdown())
    .await
}

async fn hello(ConnectInfo(peer): ConnectInfo<SocketAddr>) -> String {
    let id = cluster::worker().map_or(0, |w| w.id().get());
    format!(
        "Hello {peer} from worker {id} (pid {})\n",
        std::process::id()
    )
}
