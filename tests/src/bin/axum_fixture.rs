//! An axum app written the obvious way, for the drain tests: every worker listens on `ADDR`
//! (default `127.0.0.1:0`; `unix:<path>` for a Unix socket) and prints
//! `worker <id> pid <pid> port <port>` (port 0 on a Unix socket), then serves with
//! `cluster::axum::serve` and nothing else: it never looks at `cluster::shutdown()` itself.
//! `GET /` answers `worker <id>`; `GET /peer` answers the peer's address from `ConnectInfo`;
//! `GET /version` answers `<build> worker <id>` with the build the binary was stamped as
//! (`cluster_tests::stamp`); `POST /echo` answers `<build> worker <id> <body>`;
//! `GET /delay/<ms>` prints `delaying <id> <ms>` and answers `worker <id>` after `ms`
//! milliseconds; `GET /upgrade` switches the connection to an echo protocol (`101`, then every
//! byte sent comes back); `POST /at-drain` answers `drained` once the worker is asked to leave,
//! without reading the request's body.
//! Workers log to stderr (`RUST_LOG`, default `warn`).

use std::io::Write;
use std::net::SocketAddr;

use axum::Router;
use axum::extract::{ConnectInfo, Path};
use axum::routing::{get, post};

#[cluster::main(workers = 2)]
async fn main() -> std::io::Result<()> {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
    let id = cluster::Worker::current().map_or(0, |w| w.id().get());
    let build = cluster_tests::build_version();
    let echo_build = build.clone();
    let app = Router::new()
        .route("/", get(move || async move { format!("worker {id}\n") }))
        .route(
            "/version",
            get(move || async move { format!("{build} worker {id}\n") }),
        )
        .route(
            "/echo",
            post(move |body: String| async move { format!("{echo_build} worker {id} {body}\n") }),
        )
        .route("/upgrade", get(upgrade))
        .route(
            "/at-drain",
            post(|| async {
                cluster::shutdown().await;
                // After the server's own drain has begun.
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                "drained\n"
            }),
        )
        .route(
            "/delay/{ms}",
            get(move |Path(ms): Path<u64>| async move {
                say(&format!("delaying {id} {ms}"));
                tokio::time::sleep(std::time::Duration::from_millis(ms)).await;
                format!("worker {id}\n")
            }),
        );
    let addr = std::env::var("ADDR").unwrap_or_else(|_| "127.0.0.1:0".to_owned());
    match addr.strip_prefix("unix:") {
        Some(path) => {
            let listener = cluster::net::ClusterUnixListener::bind(path).await?;
            say(&format!("worker {id} pid {} port 0", std::process::id()));
            let app = app.route(
                "/peer",
                get(
                    |ConnectInfo(peer): ConnectInfo<tokio::net::unix::SocketAddr>| async move {
                        format!("{peer:?}\n")
                    },
                ),
            );
            cluster::axum::serve(listener, app).await
        }
        None => {
            let listener = cluster::ClusterListener::bind(addr).await?;
            let port = listener.local_addr()?.port();
            say(&format!(
                "worker {id} pid {} port {port}",
                std::process::id()
            ));
            let app = app.route(
                "/peer",
                get(
                    |ConnectInfo(peer): ConnectInfo<SocketAddr>| async move { format!("{peer}\n") },
                ),
            );
            cluster::axum::serve(listener, app).await
        }
    }
}

/// Switches to echoing bytes back, as a WebSocket handler switches to its protocol.
async fn upgrade(mut request: axum::extract::Request) -> axum::response::Response {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let upgrade = hyper::upgrade::on(&mut request);
    tokio::spawn(async move {
        let Ok(upgraded) = upgrade.await else {
            return;
        };
        let mut io = hyper_util::rt::TokioIo::new(upgraded);
        let mut buf = [0; 1024];
        while let Ok(n @ 1..) = io.read(&mut buf).await {
            if io.write_all(&buf[..n]).await.is_err() {
                return;
            }
        }
    });
    axum::response::Response::builder()
        .status(101)
        .header("connection", "upgrade")
        .header("upgrade", "echo")
        .body(axum::body::Body::empty())
        .expect("a valid response")
}

fn say(line: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}
