//! The baseline: a plain 2-process hyper server sharing the port with SO_REUSEPORT (no primary,
//! no handoff), answering like `examples/hello.rs`. The parent starts `WORKERS` (default 2)
//! children and kills them on SIGTERM. `ADDR` sets the address.

use std::convert::Infallible;
use std::net::SocketAddr;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use socket2::{Domain, Socket, Type};

fn main() -> std::io::Result<()> {
    let addr: SocketAddr = std::env::var("ADDR")
        .unwrap_or_else(|_| "127.0.0.1:3000".to_owned())
        .parse()
        .map_err(std::io::Error::other)?;
    match std::env::var("REUSEPORT_CHILD") {
        Ok(id) => serve(addr, id),
        Err(_) => parent(),
    }
}

fn parent() -> std::io::Result<()> {
    let workers: usize = std::env::var("WORKERS")
        .ok()
        .and_then(|w| w.parse().ok())
        .unwrap_or(2);
    let mut children = Vec::new();
    for id in 1..=workers {
        children.push(
            std::process::Command::new(std::env::current_exe()?)
                .env("REUSEPORT_CHILD", id.to_string())
                .spawn()?,
        );
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let mut terminate =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        terminate.recv().await;
        std::io::Result::Ok(())
    })?;
    for mut child in children {
        let _ = child.kill();
        let _ = child.wait();
    }
    Ok(())
}

fn serve(addr: SocketAddr, id: String) -> std::io::Result<()> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.bind(&addr.into())?;
    socket.listen(511)?;
    socket.set_nonblocking(true)?;
    let greeting = Bytes::from(format!(
        "Hello from worker {id} (pid {})\n",
        std::process::id()
    ));
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::from_std(socket.into())?;
        loop {
            let (stream, _) = listener.accept().await?;
            let greeting = greeting.clone();
            let service = service_fn(move |_: Request<Incoming>| {
                let greeting = greeting.clone();
                async move { Ok::<_, Infallible>(Response::new(Full::new(greeting))) }
            });
            tokio::spawn(http1::Builder::new().serve_connection(TokioIo::new(stream), service));
        }
    })
}
