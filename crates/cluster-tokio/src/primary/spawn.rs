//! Starting a worker process: re-exec with the IPC socket at a fixed fd.

use std::ffi::OsString;
use std::io;
use std::os::fd::OwnedFd;
use std::process::Stdio;

use proto::WorkerId;
use tokio::process::{Child, Command};
use tokio::task::JoinHandle;
use tokio_seqpacket::UnixSeqpacket;

use super::image::Image;
use crate::ipc::Channel;
use crate::role::{ENV_IPC_FD, ENV_WORKER_ID};
use crate::settings::Settings;
use crate::sys;

/// Spawns worker `id` from `image`; returns the process, the primary's end of its link, and a duplicate of the
/// worker's end (see the driver: what the worker never reads is read back from it).
///
/// Must run on a long-lived thread (the runtime's, never `spawn_blocking`): the worker's
/// `PR_SET_PDEATHSIG` fires when the thread that forked it exits.
///
/// With `reset_scheduling`, the worker runs under the default scheduling policy even though the
/// forking thread does not.
pub(crate) fn spawn(
    settings: &Settings,
    image: &Image,
    id: WorkerId,
    env: &[(OsString, OsString)],
    reset_scheduling: bool,
) -> io::Result<(Child, Channel, OwnedFd)> {
    let (ours, theirs) = UnixSeqpacket::pair()?;
    let ours = Channel::new(ours.into())?;
    let mut args = std::env::args_os();
    let arg0 = args.next();
    let mut command = Command::new(image.program());
    match (&settings.exec, arg0) {
        (None, Some(arg0)) => command.arg0(arg0),
        _ => command.arg0(&image.binary.path),
    };
    match &settings.args {
        Some(custom) => command.args(custom),
        None => command.args(args),
    };
    // The service manager's variables are the primary's; what the settings set is the user's.
    for name in crate::systemd::ENV_VARS {
        command.env_remove(name);
    }
    command.envs(settings.env.iter().map(|(k, v)| (k, v)));
    command.envs(env.iter().map(|(k, v)| (k, v)));
    command
        .env(ENV_WORKER_ID, id.get().to_string())
        .env(ENV_IPC_FD, sys::IPC_FD.to_string());
    if let Some(cwd) = &settings.cwd {
        command.current_dir(cwd);
    }
    if settings.silent {
        command.stdout(Stdio::piped()).stderr(Stdio::piped());
    }
    command.stdin(Stdio::null());
    // A process group of its own: a terminal's Ctrl-C and hangup reach the primary alone, which
    // drains or stops its workers as documented, instead of killing them mid-request.
    command.process_group(0);
    sys::prepare_child(&mut command, theirs.as_raw_fd(), reset_scheduling);
    let child = command.spawn()?;
    // The child has its copy at fd 3; ours (close-on-exec, so no other worker inherits it) stays.
    Ok((child, ours, theirs.into()))
}

/// Re-emits a silent worker's stdout and stderr line by line, attributed to it: `[worker <id>] `
/// before a line, or a first field `"cluster_worker":<id>` in a line that is a JSON object (it
/// parses as JSON), so that a log pipeline still reads JSON. The tasks end when the worker's end of the pipes
/// closes, after flushing what they wrote.
pub(crate) fn forward_output(id: WorkerId, child: &mut Child) -> Vec<JoinHandle<()>> {
    use tokio::io::{AsyncBufReadExt, AsyncWrite, AsyncWriteExt, BufReader};

    async fn forward(
        id: WorkerId,
        from: impl tokio::io::AsyncRead + Unpin,
        mut to: impl AsyncWrite + Unpin,
    ) {
        let mut from = BufReader::new(from);
        let mut line = Vec::new();
        let mut out = Vec::new();
        // Bytes, not `String` lines: output that is not UTF-8 passes through instead of ending
        // the forwarding (and then blocking the worker on a full pipe).
        while let Ok(read) = from.read_until(b'\n', &mut line).await
            && read > 0
        {
            attribute(id, &line, &mut out);
            // A closed stdout must not block the worker either: keep reading.
            let _ = to.write_all(&out).await;
            line.clear();
            out.clear();
        }
        // tokio's stdout writes from a blocking thread: without this the last line may still be
        // on its way when the primary exits.
        let _ = to.flush().await;
    }

    let mut tasks = Vec::new();
    if let Some(stdout) = child.stdout.take() {
        tasks.push(tokio::spawn(forward(id, stdout, tokio::io::stdout())));
    }
    if let Some(stderr) = child.stderr.take() {
        tasks.push(tokio::spawn(forward(id, stderr, tokio::io::stderr())));
    }
    tasks
}

/// `line` (with or without its newline) as worker `id`'s, into `out`, newline-terminated.
fn attribute(id: WorkerId, line: &[u8], out: &mut Vec<u8>) {
    let text = line.strip_suffix(b"\n").unwrap_or(line);
    let text = text.strip_suffix(b"\r").unwrap_or(text);
    let is_object = text.starts_with(b"{")
        && text.ends_with(b"}")
        && serde_json::from_slice::<serde::de::IgnoredAny>(text).is_ok();
    match text.strip_prefix(b"{") {
        // Its own field of that name wins: passed through as it is.
        Some(_) if is_object && contains(text, br#""cluster_worker""#) => {
            out.extend_from_slice(text);
        }
        Some(fields) if is_object => {
            out.extend_from_slice(format!("{{\"cluster_worker\":{}", id.get()).as_bytes());
            if fields.trim_ascii_start() != b"}" {
                out.push(b',');
            }
            out.extend_from_slice(fields);
        }
        _ => {
            out.extend_from_slice(format!("[{id}] ").as_bytes());
            out.extend_from_slice(text);
        }
    }
    out.push(b'\n');
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attributed(line: &str) -> String {
        let mut out = Vec::new();
        attribute(WorkerId::new(3), line.as_bytes(), &mut out);
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn json_lines_get_a_field_and_other_lines_a_prefix() {
        assert_eq!(
            attributed("{\"level\":\"info\",\"msg\":\"up\"}\n"),
            "{\"cluster_worker\":3,\"level\":\"info\",\"msg\":\"up\"}\n"
        );
        assert_eq!(attributed("{}"), "{\"cluster_worker\":3}\n");
        assert_eq!(attributed("{ }\r\n"), "{\"cluster_worker\":3 }\n");
        assert_eq!(
            attributed("listening on 3000\n"),
            "[worker 3] listening on 3000\n"
        );
        assert_eq!(attributed("{not closed\n"), "[worker 3] {not closed\n");
        // Braces are not JSON: `{:?}` of a set, a template.
        assert_eq!(attributed("{1, 2}\n"), "[worker 3] {1, 2}\n");
        assert_eq!(attributed("{a} and {b}\n"), "[worker 3] {a} and {b}\n");
        // A line that names its worker already is left alone.
        assert_eq!(
            attributed("{\"cluster_worker\":9,\"msg\":\"x\"}\n"),
            "{\"cluster_worker\":9,\"msg\":\"x\"}\n"
        );
        assert_eq!(attributed("no newline"), "[worker 3] no newline\n");
    }
}
