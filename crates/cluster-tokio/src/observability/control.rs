//! The primary's control socket ([`Settings::control_socket`](crate::Settings::control_socket)):
//! a Unix stream socket that answers one line with one line of JSON. The messages are typed in
//! `cluster_core::control`, which `cluster-ctl` shares; this module reads requests, does them and
//! writes the answers.
//!
//! The socket file is mode 0600, and every peer is checked with `SO_PEERCRED`: only the
//! primary's user and root are answered. Lines are bounded, a connection idle for long is
//! closed, and a few connections are served at once.

use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

use proto::control::{self, Answer, Command, ErrorKind, Request, Versioned};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};

use super::ClusterStatus;
use super::local_server::Idle;
use crate::env::ErrorChain;
use crate::socket::SocketFile;
use crate::supervisor::SupervisorHandle;

/// The longest command line.
const MAX_LINE: usize = 1024;
/// How long a connection may stay silent before it is closed: `cluster-ctl` sends its command
/// at once.
const IDLE_TIMEOUT: Duration = Duration::from_secs(5);
/// Connections served at once (when they are all taken, the oldest waiting for a command gives
/// way).
const MAX_CONNECTIONS: usize = 32;

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
        |stream, idle| {
            let handle = handle.clone();
            async move {
                let _ = converse(stream, ours, &handle, idle).await;
            }
        },
    )
    .await;
}

async fn converse(
    stream: UnixStream,
    ours: u32,
    handle: &SupervisorHandle,
    idle: Idle,
) -> io::Result<()> {
    let peer = stream.peer_cred()?;
    let (reader, mut writer) = stream.into_split();
    if peer.uid() != ours && peer.uid() != 0 {
        tracing::warn!(
            uid = peer.uid(),
            pid = peer.pid(),
            "control socket: refused a client of another user"
        );
        let refusal = error(
            ErrorKind::Refused,
            format!(
                "refused: uid {} is neither this primary's user ({ours}) nor root",
                peer.uid()
            ),
        );
        return reply(&mut writer, &refusal).await;
    }
    let mut reader = BufReader::new(reader).take(0);
    let mut line = Vec::new();
    loop {
        line.clear();
        // One byte more than a line may have: a line that long is refused.
        reader.set_limit(MAX_LINE as u64 + 1);
        idle.idle();
        let read = tokio::time::timeout(IDLE_TIMEOUT, reader.read_until(b'\n', &mut line));
        match read.await {
            Ok(Ok(0)) | Err(_) => return Ok(()),
            Ok(Ok(_)) => {}
            Ok(Err(error)) => return Err(error),
        }
        // A command came: it runs to its end, unless the connection was given away first.
        if !idle.busy() {
            return Ok(());
        }
        if line.last() != Some(&b'\n') {
            let message = if line.len() > MAX_LINE {
                format!("a command is at most {MAX_LINE} bytes")
            } else {
                "a command ends with a newline".to_owned()
            };
            return reply(&mut writer, &error(ErrorKind::Malformed, message)).await;
        }
        let answer = match std::str::from_utf8(&line) {
            Ok(line) => match parse(line) {
                Ok(command) => execute(command, handle).await,
                Err(refusal) => Answer::Error(refusal),
            },
            Err(_) => error(ErrorKind::Malformed, "a command is UTF-8 text".to_owned()),
        };
        reply(&mut writer, &answer).await?;
    }
}

async fn reply(writer: &mut tokio::net::unix::OwnedWriteHalf, answer: &Answer) -> io::Result<()> {
    let mut line = serde_json::to_string(answer).map_err(io::Error::other)?;
    line.push('\n');
    let write = writer.write_all(line.as_bytes());
    tokio::time::timeout(IDLE_TIMEOUT, write)
        .await
        .unwrap_or_else(|_| Err(io::ErrorKind::TimedOut.into()))
}

fn error(kind: ErrorKind, message: String) -> Answer {
    Answer::Error(control::Error::new(kind, message))
}

/// Reads one request: a JSON [`Request`] (its version checked before its shape) or the words
/// form.
fn parse(line: &str) -> Result<Command, control::Error> {
    let line = line.trim();
    if !line.starts_with('{') {
        return Command::from_words(line);
    }
    let malformed = |e: serde_json::Error| {
        control::Error::new(ErrorKind::Malformed, format!("not a request: {e}"))
    };
    serde_json::from_str::<Versioned>(line)
        .map_err(malformed)?
        .check()?;
    Ok(serde_json::from_str::<Request>(line)
        .map_err(malformed)?
        .command)
}

async fn execute(command: Command, handle: &SupervisorHandle) -> Answer {
    let failed = |e: &dyn std::error::Error| error(ErrorKind::Failed, ErrorChain(e).to_string());
    match command {
        Command::Status => match handle.status().await {
            Ok(status) => Answer::Status(status_of(&status, handle.primary().settings())),
            Err(e) => failed(&e),
        },
        Command::Reload => {
            tracing::info!("control socket: reload asked");
            match handle.reload().await {
                Ok(report) => Answer::Reload(control::Reload {
                    generation: report.generation,
                    replaced: report.replaced.len(),
                    handed_back: report.handed_back,
                    complete: report.is_complete(),
                    binary_changed: report.binary_changed(),
                    aborted: report.aborted.as_ref().map(ToString::to_string),
                }),
                Err(e) => failed(&e),
            }
        }
        Command::Scale { workers } => {
            tracing::info!(workers, "control socket: scale asked");
            match handle.scale(workers).await {
                Ok(()) => Answer::Scale(workers),
                Err(e) => failed(&e),
            }
        }
    }
}

/// `status` as the control protocol (and `/status.json`) shows it.
pub(super) fn status_of(status: &ClusterStatus, settings: &crate::Settings) -> control::Status {
    let workers = status
        .workers
        .iter()
        .map(|w| control::WorkerStatus {
            id: w.counters.id.get(),
            pid: w.counters.pid,
            slot: w.slot.map(|s| s.index()),
            generation: w.generation,
            state: w.counters.state.to_string(),
            ready: w.ready,
            uptime_seconds: w.uptime.as_secs_f64(),
            restarts: w.restarts,
            resident_bytes: w.usage.map(|u| u.resident_bytes),
            cpu_seconds: w.usage.map(|u| u.cpu_time.as_secs_f64()),
            handoffs: w.counters.handoffs,
            connections: w.connections,
            in_flight: w.counters.in_flight,
            outstanding: w.counters.outstanding,
            refused: w.counters.refused,
            returned: w.counters.returned,
            previous: w.previous.map(|p| control::PreviousWorker {
                id: p.worker.get(),
                status: p.status.to_string(),
                killed: p.killed.map(|k| k.to_string()),
                oom_killed: p.oom_killed,
            }),
        })
        .collect();
    control::Status {
        pid: status.pid,
        uptime_seconds: status.uptime.as_secs_f64(),
        generation: status.generation,
        phase: status.phase.to_string(),
        wanted: status.wanted,
        serving: status.serving,
        ready: status.phase == crate::supervisor::Phase::Serving && status.serving > 0,
        restarts: status.restarts,
        oom_kills: status.oom_kills,
        reloads: control::ReloadCounts {
            complete: status.reloads.complete,
            aborted: status.reloads.aborted,
            failed: status.reloads.failed,
        },
        recycles: control::RecycleCounts {
            requests: status.recycles.requests,
            memory: status.recycles.memory,
        },
        connections_held: status.connections_held,
        listeners: status.listeners,
        handoffs: status.handoffs,
        handed_back: status.handed_back,
        accept_errors: status.accept_errors,
        handoff_latency: status
            .handoff_latency
            .buckets()
            .map(|(bound, count)| control::LatencyBucket {
                le_seconds: bound.map(|b| b.as_secs_f64()),
                count,
            })
            .collect(),
        workers,
        settings: settings
            .in_force()
            .into_iter()
            .map(|s| control::Setting {
                name: s.name.to_owned(),
                value: s.value,
                source: s.source,
            })
            .collect(),
        binaries: status
            .binaries
            .iter()
            .map(|(generation, binary)| control::GenerationBinary {
                generation: *generation,
                path: binary.path.display().to_string(),
                inode: binary.inode,
                len: binary.len,
                modified_unix_seconds: binary
                    .modified
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs()),
            })
            .collect(),
    }
}
