//! The primary's control socket ([`Settings::control_socket`](crate::Settings::control_socket)):
//! a Unix stream socket that answers one line with one line of JSON.
//!
//! ```text
//! status        {"ok":true,"status":{"pid":..,"workers":[..],..}}
//! reload        {"ok":true,"reload":{"generation":2,"replaced":4,"complete":true,..}}
//! scale <n>     {"ok":true,"scale":<n>}
//! anything else {"ok":false,"error":"..."}
//! ```
//!
//! The socket file is mode 0600, and every peer is checked with `SO_PEERCRED`: only the
//! primary's user and root are answered. Lines are bounded, a connection idle for long is
//! closed, and a few connections are served at once.

use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};

use super::ClusterStatus;
use crate::env::ErrorChain;
use crate::socket::SocketFile;
use crate::supervisor::SupervisorHandle;

/// The longest command line.
const MAX_LINE: usize = 1024;
/// How long a connection may stay silent before it is closed.
const IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// Connections served at once; more are closed at once.
const MAX_CONNECTIONS: usize = 8;

/// A bound control socket; the file is removed when it is dropped.
#[derive(Debug)]
pub(crate) struct ControlSocket {
    listener: UnixListener,
    _file: SocketFile,
}

/// Binds the control socket at `path`, mode 0600; a stale socket file is replaced, a live one
/// (something accepts on it) is `AddrInUse`.
pub(crate) fn bind(path: &Path) -> io::Result<ControlSocket> {
    let (socket, file) = crate::socket::bind_unix(path, 16, false, false)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    let listener = std::os::unix::net::UnixListener::from(std::os::fd::OwnedFd::from(socket));
    Ok(ControlSocket {
        listener: UnixListener::from_std(listener)?,
        _file: file,
    })
}

/// Serves the control socket until dropped.
pub(crate) async fn serve(socket: ControlSocket, handle: SupervisorHandle) {
    let ours = crate::sys::effective_uid();
    let listener = &socket.listener;
    super::local_server::accept_loop(
        "control socket",
        MAX_CONNECTIONS,
        || async { Ok(listener.accept().await?.0) },
        |stream| {
            let handle = handle.clone();
            async move {
                let _ = converse(stream, ours, &handle).await;
            }
        },
    )
    .await;
}

async fn converse(stream: UnixStream, ours: u32, handle: &SupervisorHandle) -> io::Result<()> {
    let peer = stream.peer_cred()?;
    let (reader, mut writer) = stream.into_split();
    if peer.uid() != ours && peer.uid() != 0 {
        tracing::warn!(
            uid = peer.uid(),
            pid = peer.pid(),
            "control socket: refused a client of another user"
        );
        let refusal = error(format!(
            "refused: uid {} is neither this primary's user ({ours}) nor root",
            peer.uid()
        ));
        return reply(&mut writer, &refusal).await;
    }
    let mut reader = BufReader::new(reader).take(0);
    let mut line = Vec::new();
    loop {
        line.clear();
        // One byte more than a line may have: a line that long is refused.
        reader.set_limit(MAX_LINE as u64 + 1);
        let read = tokio::time::timeout(IDLE_TIMEOUT, reader.read_until(b'\n', &mut line));
        match read.await {
            Ok(Ok(0)) | Err(_) => return Ok(()),
            Ok(Ok(_)) => {}
            Ok(Err(error)) => return Err(error),
        }
        if line.last() != Some(&b'\n') {
            let message = if line.len() > MAX_LINE {
                format!("a command is at most {MAX_LINE} bytes")
            } else {
                "a command ends with a newline".to_owned()
            };
            return reply(&mut writer, &error(message)).await;
        }
        let answer = match std::str::from_utf8(&line) {
            Ok(command) => execute(command.trim(), handle).await,
            Err(_) => error("a command is UTF-8 text".to_owned()),
        };
        reply(&mut writer, &answer).await?;
    }
}

async fn reply(writer: &mut tokio::net::unix::OwnedWriteHalf, value: &Value) -> io::Result<()> {
    let mut line = value.to_string();
    line.push('\n');
    let write = writer.write_all(line.as_bytes());
    tokio::time::timeout(IDLE_TIMEOUT, write)
        .await
        .unwrap_or_else(|_| Err(io::ErrorKind::TimedOut.into()))
}

fn error(message: String) -> Value {
    json!({ "ok": false, "error": message })
}

async fn execute(command: &str, handle: &SupervisorHandle) -> Value {
    let mut words = command.split_ascii_whitespace();
    match (words.next(), words.next(), words.next()) {
        (Some("status"), None, None) => match handle.status().await {
            Ok(status) => json!({ "ok": true, "status": status_json(&status) }),
            Err(e) => error(ErrorChain(&e).to_string()),
        },
        (Some("reload"), None, None) => {
            tracing::info!("control socket: reload asked");
            match handle.reload().await {
                Ok(report) => json!({
                    "ok": true,
                    "reload": {
                        "generation": report.generation,
                        "replaced": report.replaced.len(),
                        "complete": report.is_complete(),
                        "binary_changed": report.binary_changed(),
                        "aborted": report.aborted.as_ref().map(|a| format!("worker {}: {}", a.worker, a.reason)),
                    }
                }),
                Err(e) => error(ErrorChain(&e).to_string()),
            }
        }
        (Some("scale"), Some(count), None) => {
            let Some(workers) = count
                .bytes()
                .all(|b| b.is_ascii_digit())
                .then(|| count.parse::<usize>().ok())
                .flatten()
            else {
                return error(format!(
                    "`scale` takes a whole number of workers, not `{count}`"
                ));
            };
            tracing::info!(workers, "control socket: scale asked");
            match handle.scale(workers).await {
                Ok(()) => json!({ "ok": true, "scale": workers }),
                Err(e) => error(ErrorChain(&e).to_string()),
            }
        }
        _ => {
            let shown: String = command.chars().take(40).collect();
            error(format!(
                "unknown command `{shown}`: expected `status`, `reload` or `scale <workers>`"
            ))
        }
    }
}

fn status_json(status: &ClusterStatus) -> Value {
    let workers: Vec<Value> = status
        .workers
        .iter()
        .map(|w| {
            json!({
                "id": w.counters.id.get(),
                "pid": w.counters.pid,
                "slot": w.slot.map(|s| s.index()),
                "generation": w.generation,
                "state": w.counters.state.to_string(),
                "uptime_seconds": w.uptime.as_secs_f64(),
                "restarts": w.restarts,
                "resident_bytes": w.usage.map(|u| u.resident_bytes),
                "cpu_seconds": w.usage.map(|u| u.cpu_time.as_secs_f64()),
                "handoffs": w.counters.handoffs,
                "connections": w.connections,
                "in_flight": w.counters.in_flight,
                "refused": w.counters.refused,
                "returned": w.counters.returned,
                "previous": w.previous.map(|p| json!({
                    "id": p.worker.get(),
                    "status": p.status.to_string(),
                    "killed": p.killed.map(|k| k.to_string()),
                })),
            })
        })
        .collect();
    json!({
        "pid": status.pid,
        "uptime_seconds": status.uptime.as_secs_f64(),
        "generation": status.generation,
        "wanted": status.wanted,
        "serving": status.serving,
        "restarts": status.restarts,
        "reloads": {
            "complete": status.reloads.complete,
            "aborted": status.reloads.aborted,
            "failed": status.reloads.failed,
        },
        "connections_held": status.connections_held,
        "listeners": status.listeners,
        "handoffs": status.handoffs,
        "accept_errors": status.accept_errors,
        "workers": workers,
    })
}
