//! `tonic_health`: a gRPC server (the standard health service) in every worker, served from a
//! `ClusterListener` by `cluster::tonic::serve`, which drains it on shutdown within a deadline.
//! No `protoc` needed.
//!
//! ```sh
//! CLUSTER_WORKERS=2 cargo run --release --example tonic_health
//! printf '\0\0\0\0\0' > /tmp/check.bin     # one empty HealthCheckRequest, gRPC-framed
//! curl -s --http2-prior-knowledge -D - -o /dev/null -H 'content-type: application/grpc' \
//!     --data-binary @/tmp/check.bin http://127.0.0.1:50051/grpc.health.v1.Health/Check
//! # HTTP/2 200 ... grpc-status: 0
//! ```
//!
//! `ADDR` sets the address (default `127.0.0.1:50051`).

#[cluster::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let addr = std::env::var("ADDR").unwrap_or_else(|_| "127.0.0.1:50051".to_owned());
    let listener = cluster::ClusterListener::bind(&addr).await?;
    let (reporter, health) = tonic_health::server::health_reporter();
    reporter
        .set_service_status("", tonic_health::ServingStatus::Serving)
        .await;
    let router = tonic::transport::Server::builder().add_service(health);
    cluster::tonic::serve(listener, router).await?;
    Ok(())
}
