//! `cluster-ctl`, the client of a `cluster` primary's control socket
//! (`Settings::control_socket`, `CLUSTER_CONTROL_SOCKET`).
//!
//! ```text
//! cluster-ctl [--socket PATH] [--json] status     every worker, as a table
//! cluster-ctl [--socket PATH] [--json] reload     a rolling reload; waits until it ends
//! cluster-ctl [--socket PATH] [--json] scale N    keep N workers (0 only with --force)
//! ```
//!
//! `scale 0` stops every worker and so empties the service: it is refused unless `--force` is
//! given too.
//!
//! The socket is `--socket`, or else `CLUSTER_CONTROL_SOCKET` (the variable the service reads,
//! so the service's environment file serves both). Only the primary's user and root are
//! answered. Exit codes: 0 done, 1 the primary refused (the reason is printed), 2 a usage error,
//! 69 (`EX_UNAVAILABLE`) the primary could not be reached.
//!
//! The protocol is one line of JSON per request (`{"version":1,"command":"status"}`), answered
//! with one line of JSON; its messages are typed in `cluster_core::control`, which the primary
//! shares. The primary also takes the bare words (`status`, `reload`, `scale N`), so
//! `echo status | socat - UNIX-CONNECT:/run/my-service/control.sock` works as well; `--json`
//! prints the answer as it came.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use proto::control::{Answer, Command, ErrorKind, Request, Status};

/// The variable the socket's path is read from when `--socket` is not given.
pub const CONTROL_SOCKET: &str = "CLUSTER_CONTROL_SOCKET";

/// How long `status` and `scale` wait for their answer; a reload waits as long as it runs.
const TIMEOUT: Duration = Duration::from_secs(30);

const USAGE: &str = "usage: cluster-ctl [--socket PATH] [--json] <status | reload | scale N [--force]>\n\
                     The socket is --socket, or else $CLUSTER_CONTROL_SOCKET. \
                     `scale 0` (no worker left) needs --force.";

/// Runs `cluster-ctl` with this process's arguments and environment.
pub fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (code, out, err) = run(&args, std::env::var_os(CONTROL_SOCKET).map(PathBuf::from));
    let _ = std::io::stdout().write_all(out.as_bytes());
    let _ = std::io::stderr().write_all(err.as_bytes());
    ExitCode::from(code)
}

/// Runs `cluster-ctl` with `args` (without the program's name) and the socket of the environment
/// (`env_socket`); returns the exit code and what goes to stdout and stderr.
pub fn run(args: &[String], env_socket: Option<PathBuf>) -> (u8, String, String) {
    let mut socket = env_socket;
    let mut json = false;
    let mut force = false;
    let mut words = Vec::new();
    let mut args = args.iter();
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--socket" | "-s" => match args.next() {
                Some(path) => socket = Some(PathBuf::from(path)),
                None => return usage("--socket needs a path"),
            },
            "--json" => json = true,
            "--force" => force = true,
            "--help" | "-h" => return (0, format!("{USAGE}\n"), String::new()),
            _ => words.push(arg.as_str()),
        }
    }
    let command = match words.as_slice() {
        ["status"] => Command::Status,
        ["reload"] => Command::Reload,
        ["scale", n] => match Command::from_words(&format!("scale {n}")) {
            Ok(command) => command,
            Err(error) => return usage(&error.message),
        },
        _ => return usage("expected one command: status, reload or scale N"),
    };
    if command == (Command::Scale { workers: 0 }) && !force {
        return (
            1,
            String::new(),
            "cluster-ctl: scale 0 stops every worker: nothing would serve. \
             Add --force to do it anyway.\n"
                .to_owned(),
        );
    }
    let Some(socket) = socket else {
        return usage("no socket: pass --socket PATH or set CLUSTER_CONTROL_SOCKET");
    };
    let answer = match ask(&socket, command) {
        Ok(answer) => answer,
        Err(error) => {
            return (
                69,
                String::new(),
                format!("cluster-ctl: {}: {error}\n", socket.display()),
            );
        }
    };
    let as_came = if json {
        format!("{answer}\n")
    } else {
        String::new()
    };
    let parsed = match serde_json::from_str::<Answer>(&answer) {
        Ok(parsed) => parsed,
        Err(error) => {
            return (
                1,
                as_came,
                format!("cluster-ctl: cannot read the primary's answer ({error}): {answer:?}\n"),
            );
        }
    };
    match parsed {
        Answer::Error(error) => {
            let reason = match error.kind {
                ErrorKind::UnknownVersion => format!(
                    "the primary does not speak this cluster-ctl's protocol: {}",
                    error.message
                ),
                _ => error.message,
            };
            (1, as_came, format!("cluster-ctl: {reason}\n"))
        }
        // An aborted reload left old workers serving: not what was asked.
        Answer::Reload(reload) if json => {
            (u8::from(reload.aborted.is_some()), as_came, String::new())
        }
        _ if json => (0, as_came, String::new()),
        Answer::Status(status) => (0, table(&status), String::new()),
        Answer::Reload(reload) if reload.aborted.is_some() => (1, String::new(), reloaded(&reload)),
        Answer::Reload(reload) => (0, reloaded(&reload), String::new()),
        Answer::Scale(workers) => (0, format!("scaling to {workers} workers\n"), String::new()),
    }
}

fn usage(problem: &str) -> (u8, String, String) {
    (
        2,
        String::new(),
        format!("cluster-ctl: {problem}\n{USAGE}\n"),
    )
}

/// Sends `command` and reads the one-line answer.
fn ask(socket: &std::path::Path, command: Command) -> std::io::Result<String> {
    let mut request =
        serde_json::to_string(&Request::new(command)).map_err(std::io::Error::other)?;
    request.push('\n');
    let mut stream = UnixStream::connect(socket)?;
    let timeout = (command != Command::Reload).then_some(TIMEOUT);
    stream.set_read_timeout(timeout)?;
    stream.set_write_timeout(Some(TIMEOUT))?;
    // A primary that refuses this client answers and closes at once, maybe before the command
    // is written: its answer is still there to read.
    if let Err(error) = stream.write_all(request.as_bytes())
        && error.kind() != std::io::ErrorKind::BrokenPipe
    {
        return Err(error);
    }
    let mut answer = String::new();
    BufReader::new(stream).read_line(&mut answer)?;
    if answer.is_empty() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            "the primary closed the connection without an answer",
        ));
    }
    Ok(answer.trim_end().to_owned())
}

fn reloaded(reload: &proto::control::Reload) -> String {
    match &reload.aborted {
        None => format!(
            "reload complete: generation {}, {} workers replaced{}, {} idle connections handed back\n",
            reload.generation,
            reload.replaced,
            if reload.binary_changed {
                ", new binary"
            } else {
                ""
            },
            reload.handed_back,
        ),
        Some(reason) => format!(
            "reload aborted after {} workers, the old workers keep serving: {reason}\n",
            reload.replaced
        ),
    }
}

/// The status as `pm2 ls` would show it.
fn table(status: &Status) -> String {
    let reloads = &status.reloads;
    let phase = match status.phase.as_str() {
        "" | "serving" => String::new(),
        phase => format!(" ({phase})"),
    };
    let recycles = &status.recycles;
    let recycled = match recycles.requests + recycles.memory {
        0 => String::new(),
        total => format!(
            ", {total} recycled ({} at the request limit, {} over the memory limit)",
            recycles.requests, recycles.memory
        ),
    };
    let mut out = format!(
        "primary pid {}{phase}, up {}, generation {}, {} of {} workers serving, {} restarts, reloads: {} complete, {} aborted, {} failed, {} connections handed back{recycled}\n",
        status.pid,
        duration(Some(status.uptime_seconds)),
        status.generation,
        status.serving,
        status.wanted,
        status.restarts,
        reloads.complete,
        reloads.aborted,
        reloads.failed,
        status.handed_back,
    );
    // Readiness means something only when the primary waits for it, or a worker declared it.
    let wait_ready = status
        .settings
        .iter()
        .any(|s| s.name == "wait_ready" && s.value == "on");
    let header = [
        "id", "slot", "pid", "gen", "state", "ready", "uptime", "restarts", "rss", "cpu", "conns",
        "open", "handoffs",
    ];
    let mut rows = vec![header.map(str::to_owned).to_vec()];
    let number = |n: Option<String>| n.unwrap_or_else(|| "-".to_owned());
    for worker in &status.workers {
        rows.push(vec![
            worker.id.to_string(),
            number(worker.slot.map(|s| s.to_string())),
            worker.pid.to_string(),
            worker.generation.to_string(),
            worker.state.clone(),
            match (worker.ready, wait_ready) {
                (true, _) => "yes",
                (false, true) => "no",
                (false, false) => "-",
            }
            .to_owned(),
            duration(Some(worker.uptime_seconds)),
            worker.restarts.to_string(),
            bytes(worker.resident_bytes),
            cpu(worker.cpu_seconds),
            number(worker.connections.map(|c| c.to_string())),
            worker.outstanding.to_string(),
            worker.handoffs.to_string(),
        ]);
    }
    let widths: Vec<usize> = (0..header.len())
        .map(|i| rows.iter().map(|r| r[i].len()).max().unwrap_or(0))
        .collect();
    for row in rows {
        let cells: Vec<String> = row
            .iter()
            .zip(&widths)
            .map(|(cell, width)| format!("{cell:<width$}"))
            .collect();
        out.push_str(cells.join("  ").trim_end());
        out.push('\n');
    }
    for binary in &status.binaries {
        out.push_str(&format!(
            "generation {}: {} (inode {}, {} bytes, modified {})\n",
            binary.generation,
            binary.path,
            binary.inode,
            binary.len,
            utc(binary.modified_unix_seconds)
        ));
    }
    if !status.settings.is_empty() {
        let shown: Vec<String> = status
            .settings
            .iter()
            .map(|s| format!("{}={} ({})", s.name, s.value, s.source))
            .collect();
        out.push_str(&format!("settings: {}\n", shown.join(", ")));
    }
    out
}

/// Seconds since the Unix epoch as a UTC date and time, `2026-03-21T14:05:09Z`.
fn utc(seconds: u64) -> String {
    let days = seconds / 86_400;
    let time = seconds % 86_400;
    // Howard Hinnant's days-to-civil, for days since 1970-01-01.
    let z = days + 719_468;
    let era = z / 146_097;
    let day_of_era = z % 146_097;
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let month_index = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * month_index + 2) / 5 + 1;
    let month = if month_index < 10 {
        month_index + 3
    } else {
        month_index - 9
    };
    let year = year_of_era + era * 400 + u64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        time / 3600,
        time % 3600 / 60,
        time % 60
    )
}

fn duration(seconds: Option<f64>) -> String {
    let Some(seconds) = seconds else {
        return "-".to_owned();
    };
    // Whole seconds are what a table shows.
    let s = seconds as u64;
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m{}s", s / 60, s % 60),
        3600..86_400 => format!("{}h{}m", s / 3600, s % 3600 / 60),
        _ => format!("{}d{}h", s / 86_400, s % 86_400 / 3600),
    }
}

fn cpu(seconds: Option<f64>) -> String {
    match seconds {
        None => "-".to_owned(),
        Some(s) if s < 60.0 => format!("{s:.2}s"),
        Some(s) => duration(Some(s)),
    }
}

fn bytes(bytes: Option<u64>) -> String {
    let Some(bytes) = bytes else {
        return "-".to_owned();
    };
    let mib = bytes as f64 / (1024.0 * 1024.0);
    if mib >= 1024.0 {
        format!("{:.1} GiB", mib / 1024.0)
    } else {
        format!("{mib:.1} MiB")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_has_a_row_per_worker() {
        let status: Status = serde_json::from_str(
            r#"{"pid":10,"uptime_seconds":3700.5,"generation":2,"wanted":2,"serving":2,
                "restarts":1,"reloads":{"complete":1,"aborted":0,"failed":0},
                "workers":[
                  {"id":3,"slot":0,"pid":11,"generation":2,"state":"listening",
                   "uptime_seconds":65.2,"restarts":1,"resident_bytes":12582912,
                   "cpu_seconds":1.5,"outstanding":7,"handoffs":42},
                  {"id":4,"slot":null,"pid":12,"generation":2,"state":"online",
                   "uptime_seconds":0.2,"restarts":0,"resident_bytes":null,
                   "cpu_seconds":null,"handoffs":0}]}"#,
        )
        .unwrap();
        let table = table(&status);
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines.len(), 4, "{table}");
        assert!(lines[0].contains("up 1h1m"), "{table}");
        assert!(lines[1].starts_with("id  slot  pid"), "{table}");
        assert!(lines[1].contains("conns  open  handoffs"), "{table}");
        assert!(lines[2].ends_with("7     42"), "{table}");
        assert!(
            lines[2].contains("12.0 MiB") && lines[2].contains("1m5s"),
            "{table}"
        );
        assert!(lines[3].contains(" -  "), "{table}");
        assert!(!lines[0].contains("recycled"), "{table}");
        let recycled = Status {
            recycles: proto::control::RecycleCounts {
                requests: 2,
                memory: 1,
            },
            ..status
        };
        let table = super::table(&recycled);
        assert!(
            table.contains(", 3 recycled (2 at the request limit, 1 over the memory limit)\n"),
            "{table}"
        );
    }

    #[test]
    fn the_table_shows_readiness_binaries_and_settings() {
        let status: Status = serde_json::from_str(
            r#"{"pid":10,"generation":2,
                "workers":[{"id":3,"pid":11,"generation":2,"state":"listening","ready":false}],
                "settings":[{"name":"wait_ready","value":"on","source":"code"},
                            {"name":"workers","value":"1","source":"CLUSTER_WORKERS"}],
                "binaries":[{"generation":2,"path":"/srv/app","inode":42,"len":7,
                             "modified_unix_seconds":1774101909}]}"#,
        )
        .unwrap();
        let table = table(&status);
        let lines: Vec<&str> = table.lines().collect();
        assert!(lines[1].contains("state      ready"), "{table}");
        // Waited for, and not declared: `no`, not only `listening`.
        assert!(lines[2].contains("listening  no"), "{table}");
        assert_eq!(
            lines[3],
            "generation 2: /srv/app (inode 42, 7 bytes, modified 2026-03-21T14:05:09Z)"
        );
        assert_eq!(
            lines[4],
            "settings: wait_ready=on (code), workers=1 (CLUSTER_WORKERS)"
        );
        assert_eq!(utc(0), "1970-01-01T00:00:00Z");
        assert_eq!(utc(951_782_400), "2000-02-29T00:00:00Z");
    }

    #[test]
    fn the_wire_is_readable_json_with_a_version() {
        let request = |command| serde_json::to_string(&Request::new(command)).unwrap();
        assert_eq!(
            request(Command::Status),
            r#"{"version":1,"command":"status"}"#
        );
        assert_eq!(
            request(Command::Scale { workers: 4 }),
            r#"{"version":1,"command":"scale","workers":4}"#
        );
        let answer = |answer| serde_json::to_string(&answer).unwrap();
        assert_eq!(
            answer(Answer::Scale(4)),
            r#"{"version":1,"ok":true,"scale":4}"#
        );
        let refusal = Answer::Error(proto::control::Error::new(ErrorKind::UnknownVersion, "no"));
        let line = answer(refusal.clone());
        assert_eq!(
            line,
            r#"{"version":1,"ok":false,"kind":"unknown_version","error":"no"}"#
        );
        assert_eq!(serde_json::from_str::<Answer>(&line).unwrap(), refusal);
        let status = Answer::Status(Status {
            pid: 7,
            ..Status::default()
        });
        assert_eq!(
            serde_json::from_str::<Answer>(&answer(status.clone())).unwrap(),
            status
        );
        // An answer of another version, or of no known shape, is not taken for one.
        for line in [
            r#"{"version":2,"ok":true,"scale":4}"#,
            r#"{"version":1,"ok":true}"#,
            r#"{"ok":true,"scale":4}"#,
        ] {
            assert!(serde_json::from_str::<Answer>(line).is_err(), "{line}");
        }
        // A kind from a newer primary still reads, as `other`.
        let newer = r#"{"version":1,"ok":false,"kind":"on_fire","error":"x"}"#;
        let Answer::Error(error) = serde_json::from_str::<Answer>(newer).unwrap() else {
            panic!("not an error")
        };
        assert_eq!(error.kind, ErrorKind::Other);
    }

    #[test]
    fn a_primary_of_another_version_is_reported_readably() {
        // A primary that speaks only version 2, on a real socket: one request, one answer.
        let dir = std::env::temp_dir().join(format!("cluster-ctl-version-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("control.sock");
        let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let primary = std::thread::spawn(move || {
            let (stream, _) = listener.accept().unwrap();
            stream.set_read_timeout(Some(TIMEOUT)).unwrap();
            let mut request = String::new();
            BufReader::new(&stream).read_line(&mut request).unwrap();
            let answer = r#"{"version":2,"ok":false,"kind":"unknown_version","error":"control protocol version 1 is unknown: this primary speaks version 2"}"#;
            (&stream)
                .write_all(format!("{answer}\n").as_bytes())
                .unwrap();
            request
        });
        let (code, out, err) = run(&["reload".to_owned()], Some(path));
        let request = primary.join().unwrap();
        let _ = std::fs::remove_dir_all(&dir);
        assert_eq!(request, "{\"version\":1,\"command\":\"reload\"}\n");
        assert_eq!((code, out.as_str()), (1, ""), "{err}");
        assert_eq!(
            err,
            "cluster-ctl: the primary does not speak this cluster-ctl's protocol: control protocol version 1 is unknown: this primary speaks version 2\n"
        );
    }

    #[test]
    fn usage_errors_exit_2() {
        let args = |a: &[&str]| a.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
        assert_eq!(run(&args(&["status"]), None).0, 2);
        assert_eq!(run(&args(&["scale", "x"]), Some("/x".into())).0, 2);
        assert_eq!(run(&args(&["frobnicate"]), Some("/x".into())).0, 2);
        // Refused before the socket is even tried.
        let (code, out, err) = run(&args(&["scale", "0"]), Some("/nonexistent/ctl.sock".into()));
        assert_eq!((code, out.as_str()), (1, ""));
        assert!(err.contains("--force"), "{err}");
        let forced = run(
            &args(&["scale", "0", "--force"]),
            Some("/nonexistent/ctl.sock".into()),
        );
        assert_eq!(forced.0, 69, "with --force it asks the primary");
        assert_eq!(
            run(&args(&["status"]), Some("/nonexistent/ctl.sock".into())).0,
            69
        );
    }
}
