//! The primary's HTTP endpoint ([`Settings::metrics_addr`](crate::Settings::metrics_addr)):
//! `/healthz`, `/readyz`, the status page `/status` and its data `/status.json`, and, with the
//! `metrics` feature, `/metrics`.
//!
//! A deliberately small HTTP/1.1 responder: one request per connection, answered with
//! `Connection: close`; the request head is bounded in size and in time, and connections beyond
//! a few at once are closed unanswered. A scraper or a probe cannot make the primary wait or
//! hold memory, and nothing here runs on the path of a handoff.

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use super::local_server::Idle;
use crate::supervisor::{Phase, SupervisorHandle};

/// The longest request head read.
const MAX_HEAD: usize = 8 * 1024;
/// How long a client may take to send its request head: a probe or a scraper sends it at
/// once, and a slow one holds a slot.
const HEAD_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a client may take to read the answer.
const IO_TIMEOUT: Duration = Duration::from_secs(5);
/// How long `/healthz` waits for the supervisor's loop to answer.
const PING_TIMEOUT: Duration = Duration::from_secs(1);
/// How long `/metrics` and `/status.json` wait for a snapshot.
const STATUS_TIMEOUT: Duration = Duration::from_secs(5);
/// Connections served at once: more than a slow or flooding client is likely to hold (and
/// when they are all taken, the oldest that has not sent its request gives way).
const MAX_CONNECTIONS: usize = 128;

/// Binds the endpoint's listener.
pub(crate) fn bind(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        None,
    )?;
    socket.set_reuse_address(true)?;
    socket.set_cloexec(true)?;
    socket.bind(&addr.into())?;
    socket.listen(64)?;
    socket.set_nonblocking(true)?;
    TcpListener::from_std(socket.into())
}

/// Serves the endpoint until dropped.
pub(crate) async fn serve(listener: TcpListener, handle: SupervisorHandle) {
    let listener = &listener;
    super::local_server::accept_loop(
        "metrics endpoint",
        MAX_CONNECTIONS,
        || async { Ok(listener.accept().await?.0) },
        |stream, idle| {
            let handle = handle.clone();
            async move {
                let _ = answer(stream, &handle, idle).await;
            }
        },
    )
    .await;
}

async fn answer(mut stream: TcpStream, handle: &SupervisorHandle, idle: Idle) -> io::Result<()> {
    let head = match tokio::time::timeout(HEAD_TIMEOUT, read_head(&mut stream)).await {
        Ok(Ok(Some(head))) => head,
        Ok(Ok(None)) => return respond(&mut stream, 431, TEXT, "request head too large\n").await,
        Ok(Err(error)) => return Err(error),
        Err(_) => return respond(&mut stream, 408, TEXT, "request timeout\n").await,
    };
    let mut words = head.split(' ');
    let (Some(method), Some(target), Some(version)) = (words.next(), words.next(), words.next())
    else {
        return respond(&mut stream, 400, TEXT, "bad request\n").await;
    };
    if !version.starts_with("HTTP/1.") {
        return respond(&mut stream, 400, TEXT, "bad request\n").await;
    }
    if method != "GET" && method != "HEAD" {
        return respond(&mut stream, 405, TEXT, "only GET\n").await;
    }
    // Asked: from now on it is not given away to a new client (unless it was just now).
    if !idle.busy() {
        return Ok(());
    }
    let path = target.split_once('?').map_or(target, |(path, _)| path);
    let (status, content_type, body) = route(path, handle).await;
    let body = if method == "HEAD" {
        String::new()
    } else {
        body
    };
    respond(&mut stream, status, content_type, &body).await
}

const TEXT: &str = "text/plain; charset=utf-8";

async fn route(path: &str, handle: &SupervisorHandle) -> (u16, &'static str, String) {
    match path {
        "/healthz" => match tokio::time::timeout(PING_TIMEOUT, handle.ping()).await {
            Ok(true) => (200, TEXT, "ok\n".to_owned()),
            Ok(false) => (503, TEXT, "the supervisor stopped\n".to_owned()),
            Err(_) => (503, TEXT, "the supervisor does not answer\n".to_owned()),
        },
        "/readyz" => match handle.phase() {
            Phase::Serving if handle.is_serving() => (200, TEXT, "ready\n".to_owned()),
            Phase::Serving => (503, TEXT, "no worker serves\n".to_owned()),
            phase => (503, TEXT, format!("shutting down ({phase})\n")),
        },
        "/metrics" => metrics(handle).await,
        "/status" => (200, HTML, STATUS_PAGE.to_owned()),
        "/status.json" => status_json(handle).await,
        _ => (
            404,
            TEXT,
            "not found: try /status, /status.json, /metrics, /healthz or /readyz\n".to_owned(),
        ),
    }
}

const HTML: &str = "text/html; charset=utf-8";
const JSON: &str = "application/json";

/// The status page: self-contained (its style and script inline, nothing else fetched but
/// `/status.json`), it asks for the status every 2 s and draws it.
const STATUS_PAGE: &str = include_str!("status.html");

/// The status as `cluster-ctl status --json` shows it, for the status page and scripts.
async fn status_json(handle: &SupervisorHandle) -> (u16, &'static str, String) {
    match tokio::time::timeout(STATUS_TIMEOUT, handle.status()).await {
        Ok(Ok(status)) => match serde_json::to_string(&super::control::status_of(
            &status,
            handle.primary().settings(),
        )) {
            Ok(json) => (200, JSON, json),
            Err(_) => (500, TEXT, "could not encode the status\n".to_owned()),
        },
        Ok(Err(error)) => (503, TEXT, format!("{error}\n")),
        Err(_) => (503, TEXT, "the primary does not answer\n".to_owned()),
    }
}

#[cfg(feature = "metrics")]
async fn metrics(handle: &SupervisorHandle) -> (u16, &'static str, String) {
    match tokio::time::timeout(STATUS_TIMEOUT, handle.status()).await {
        Ok(Ok(status)) => match super::metrics::encode(&status) {
            Ok(text) => (200, super::metrics::CONTENT_TYPE, text),
            Err(_) => (500, TEXT, "could not encode the metrics\n".to_owned()),
        },
        Ok(Err(error)) => (503, TEXT, format!("{error}\n")),
        Err(_) => (503, TEXT, "the primary does not answer\n".to_owned()),
    }
}

#[cfg(not(feature = "metrics"))]
async fn metrics(_: &SupervisorHandle) -> (u16, &'static str, String) {
    let body = "this build has no metrics: enable the `metrics` feature of `cluster`\n";
    (404, TEXT, body.to_owned())
}

/// Reads up to the end of the request head; returns its first line, or `None` if the head is
/// larger than [`MAX_HEAD`].
async fn read_head(stream: &mut TcpStream) -> io::Result<Option<String>> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    loop {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]);
            return Ok(Some(head.lines().next().unwrap_or_default().to_owned()));
        }
        if buf.len() > MAX_HEAD {
            return Ok(None);
        }
    }
}

async fn respond(
    stream: &mut TcpStream,
    status: u16,
    content_type: &str,
    body: &str,
) -> io::Result<()> {
    let reason = match status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        _ => "Service Unavailable",
    };
    let head = format!(
        "HTTP/1.1 {status} {reason}\r\ncontent-type: {content_type}\r\ncontent-length: {}\r\n\
         cache-control: no-store\r\nconnection: close\r\n\r\n",
        body.len()
    );
    let write = async {
        stream.write_all(head.as_bytes()).await?;
        stream.write_all(body.as_bytes()).await?;
        stream.shutdown().await
    };
    tokio::time::timeout(IO_TIMEOUT, write)
        .await
        .unwrap_or_else(|_| Err(io::ErrorKind::TimedOut.into()))
}
