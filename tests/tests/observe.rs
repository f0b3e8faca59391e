//! The cluster seen from outside while it runs: the primary's metrics endpoint (`/metrics`,
//! `/healthz`, `/readyz`), its control socket and `cluster-ctl`, and the summary it logs when it
//! stops.

mod support;

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use support::program::{Program, WAIT, endpoint_port, get, wait_readyz};

/// A directory of its own for a test's control socket, removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new(tag: &str) -> Self {
        let dir =
            std::env::temp_dir().join(format!("cluster-observe-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }

    fn socket(&self) -> PathBuf {
        self.0.join("control.sock")
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A running `http_fixture`: the endpoint on a free port, the control socket in a scratch
/// directory.
struct Cluster {
    program: Program,
    /// The endpoint's port.
    endpoint: u16,
    /// The port the workers serve on.
    app: u16,
    /// The workers' (id, pid) as they started.
    workers: Vec<(u64, u32)>,
    scratch: Scratch,
}

impl Cluster {
    /// Starts `workers` workers and waits until each listens.
    fn start(tag: &str, workers: usize) -> Self {
        let scratch = Scratch::new(tag);
        let count = workers.to_string();
        let socket = scratch.socket();
        let mut program = Program::start(
            env!("CARGO_BIN_EXE_http_fixture"),
            &[
                ("CLUSTER_WORKERS", &count),
                ("CLUSTER_METRICS_ADDR", "127.0.0.1:0"),
                ("CLUSTER_CONTROL_SOCKET", socket.to_str().unwrap()),
                ("RUST_LOG", "info"),
            ],
        );
        let mut started = Vec::new();
        let mut app = 0;
        for _ in 0..workers {
            let (id, pid, port) = program.worker();
            started.push((id, pid));
            app = port;
        }
        let endpoint = endpoint_port(&program);
        Self {
            program,
            endpoint,
            app,
            workers: started,
            scratch,
        }
    }

    fn socket(&self) -> PathBuf {
        self.scratch.socket()
    }
}

/// The value of the sample `name{labels}` (or `name` without labels) in a scrape.
fn sample(metrics: &str, series: &str) -> Option<f64> {
    metrics.lines().find_map(|line| {
        let (name, value) = line.rsplit_once(' ')?;
        (name == series).then(|| value.parse().unwrap())
    })
}

/// The sum of every sample of `name`, whatever its labels.
fn sum(metrics: &str, name: &str) -> f64 {
    metrics
        .lines()
        .filter(|line| line.starts_with(&format!("{name}{{")))
        .map(|line| line.rsplit_once(' ').unwrap().1.parse::<f64>().unwrap())
        .sum()
}

fn scrape(port: u16) -> String {
    let (status, body) = get(port, "/metrics").expect("scrape /metrics");
    assert_eq!(status, 200, "{body}");
    body
}

/// Runs the shipped client with `args`: (exit code, stdout, stderr).
fn ctl(socket: &Path, args: &[&str]) -> (i32, String, String) {
    ctl_command(
        Path::new(env!("CARGO_BIN_EXE_ctl_client")),
        socket,
        args,
        |_| {},
    )
}

fn ctl_command(
    binary: &Path,
    socket: &Path,
    args: &[&str],
    configure: impl FnOnce(&mut Command),
) -> (i32, String, String) {
    let mut command = Command::new(binary);
    command
        .arg("--socket")
        .arg(socket)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    configure(&mut command);
    let mut child = cluster_tests::spawn(&mut command);
    let status = cluster_tests::wait_for_exit(&mut child, WAIT);
    (
        status.code().unwrap_or(-1),
        cluster_tests::read_all(child.stdout.take()),
        cluster_tests::read_all(child.stderr.take()),
    )
}

/// The status as JSON, through the shipped client.
fn status(socket: &Path) -> serde_json::Value {
    let (code, out, err) = ctl(socket, &["--json", "status"]);
    assert_eq!(code, 0, "{err}");
    let answer: serde_json::Value = serde_json::from_str(&out).unwrap();
    answer["status"].clone()
}

#[test]
fn metrics_count_every_handoff_and_every_restart() {
    let mut cluster = Cluster::start("metrics", 2);
    const REQUESTS: usize = 60;
    // Scraped while the requests run: the endpoint answers under load.
    let endpoint = cluster.endpoint;
    let scraper = std::thread::spawn(move || {
        (0..5)
            .map(|_| sum(&scrape(endpoint), "cluster_handoffs_total"))
            .collect::<Vec<_>>()
    });
    for _ in 0..REQUESTS {
        let (status, body) = get(cluster.app, "/").unwrap();
        assert_eq!(status, 200, "{body}");
    }
    let during = scraper.join().unwrap();
    assert!(during.iter().all(|&n| n <= REQUESTS as f64), "{during:?}");

    // Every request was answered, so every connection was handed off, once (round robin).
    let metrics = scrape(cluster.endpoint);
    assert_eq!(
        sum(&metrics, "cluster_handoffs_total"),
        REQUESTS as f64,
        "{metrics}"
    );
    assert_eq!(
        sum(&metrics, "cluster_handoff_refused_total"),
        0.0,
        "{metrics}"
    );
    // Each waited in the primary once, and the histogram says so.
    assert_eq!(
        sample(&metrics, "cluster_handoff_duration_seconds_count"),
        Some(REQUESTS as f64),
        "{metrics}"
    );
    assert_eq!(
        sample(
            &metrics,
            "cluster_handoff_duration_seconds_bucket{le=\"+Inf\"}"
        ),
        Some(REQUESTS as f64),
        "{metrics}"
    );
    // A client that holds its connection open is counted by the worker serving it. The count
    // is a reading up to 5 s old, perhaps taken by the scraper during the load: wait for none.
    let deadline = Instant::now() + WAIT;
    while sum(&scrape(cluster.endpoint), "cluster_connections_active") != 0.0 {
        assert!(
            Instant::now() < deadline,
            "connections still counted after every request was answered"
        );
        std::thread::yield_now();
    }
    let held = std::net::TcpStream::connect(("127.0.0.1", cluster.app)).unwrap();
    let deadline = Instant::now() + WAIT;
    while sum(&scrape(cluster.endpoint), "cluster_connections_active") != 1.0 {
        assert!(
            Instant::now() < deadline,
            "the held connection never showed"
        );
        std::thread::yield_now();
    }
    drop(held);
    assert_eq!(
        sample(&metrics, "cluster_workers{state=\"listening\"}"),
        Some(2.0),
        "{metrics}"
    );
    assert_eq!(
        sample(&metrics, "cluster_generation"),
        Some(1.0),
        "{metrics}"
    );
    assert_eq!(
        sample(&metrics, "cluster_reloads_total{result=\"complete\"}"),
        Some(0.0),
        "{metrics}"
    );
    assert_eq!(
        sum(&metrics, "cluster_worker_restarts_total"),
        0.0,
        "{metrics}"
    );
    for (id, _) in &cluster.workers {
        let rss = sample(
            &metrics,
            &format!("cluster_worker_resident_memory_bytes{{worker=\"{id}\"}}"),
        );
        assert!(rss.is_some_and(|bytes| bytes > 1_000_000.0), "{metrics}");
        let cpu = sample(
            &metrics,
            &format!("cluster_worker_cpu_seconds_total{{worker=\"{id}\"}}"),
        );
        assert!(cpu.is_some_and(|seconds| seconds >= 0.0), "{metrics}");
    }
    assert!(
        metrics.contains("# TYPE cluster_handoffs_total counter"),
        "{metrics}"
    );

    // A worker killed from outside: one more restart, on its slot only.
    let (victim, pid) = cluster.workers[0];
    let before = status(&cluster.socket());
    let slot = before["workers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|w| w["id"] == victim)
        .unwrap()["slot"]
        .as_u64()
        .unwrap();
    cluster_tests::signal(pid, libc::SIGKILL).unwrap();
    let (replacement, _, _) = cluster.program.worker();
    let metrics = scrape(cluster.endpoint);
    assert_eq!(
        sample(
            &metrics,
            &format!("cluster_worker_restarts_total{{slot=\"{slot}\"}}")
        ),
        Some(1.0),
        "{metrics}"
    );
    assert_eq!(
        sum(&metrics, "cluster_worker_restarts_total"),
        1.0,
        "{metrics}"
    );
    let after = status(&cluster.socket());
    assert_eq!(after["restarts"], 1);
    let worker = after["workers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|w| w["id"] == replacement)
        .cloned()
        .unwrap();
    assert_eq!(worker["slot"], slot, "{after}");
    assert_eq!(worker["restarts"], 1, "{after}");
    assert_eq!(worker["previous"]["id"], victim, "{after}");
    assert_eq!(worker["previous"]["status"], "signal 9", "{after}");

    // The summary at shutdown counts what the killed worker was handed too (it was counted by
    // the status taken before it died).
    cluster.program.signal(libc::SIGTERM);
    assert!(
        cluster.program.wait().success(),
        "{}",
        cluster.program.stderr()
    );
    let log = cluster.program.stderr();
    let summary = log
        .lines()
        .find(|l| l.contains("cluster stopped"))
        .unwrap_or_else(|| panic!("{log}"));
    // The requests, and the connection held open (a killed worker's included).
    assert!(
        summary.contains(&format!("handed_off={}", REQUESTS + 1)),
        "{summary}"
    );
    assert!(
        summary.contains("restarts=1") && summary.contains("workers_started=3"),
        "{summary}"
    );
}

#[test]
fn probes_follow_the_workers() {
    let mut cluster = Cluster::start("probes", 1);
    assert_eq!(get(cluster.endpoint, "/healthz").unwrap().0, 200);
    assert_eq!(get(cluster.endpoint, "/readyz").unwrap().0, 200);
    assert_eq!(get(cluster.endpoint, "/nothing").unwrap().0, 404);

    // Emptying the service is refused unless forced: nothing changed.
    let (code, out, err) = ctl(&cluster.socket(), &["scale", "0"]);
    assert_eq!(code, 1, "{out}{err}");
    assert!(err.contains("--force"), "{err}");
    assert_eq!(get(cluster.endpoint, "/readyz").unwrap().0, 200);
    assert!(!cluster.program.stderr().contains("scale asked"));

    // No worker serves: not ready, still alive.
    let (code, out, err) = ctl(&cluster.socket(), &["scale", "0", "--force"]);
    assert_eq!(code, 0, "{out}{err}");
    wait_readyz(cluster.endpoint, 503);
    assert_eq!(get(cluster.endpoint, "/healthz").unwrap().0, 200);
    cluster_tests::wait_gone(cluster.workers[0].1, WAIT);

    let (code, out, err) = ctl(&cluster.socket(), &["scale", "1"]);
    assert_eq!(code, 0, "{out}{err}");
    cluster.program.worker();
    wait_readyz(cluster.endpoint, 200);
}

#[test]
fn the_control_socket_lists_and_reloads_the_workers() {
    let mut cluster = Cluster::start("control", 2);
    let socket = cluster.socket();
    let mode = std::fs::metadata(&socket).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);

    let (code, table, err) = ctl(&socket, &["status"]);
    assert_eq!(code, 0, "{err}");
    let lines: Vec<&str> = table.lines().collect();
    // The summary, the header, a row per worker, the binary, the settings.
    assert_eq!(lines.len(), 2 + 2 + 2, "{table}");
    assert!(
        lines[1].split_whitespace().eq([
            "id", "slot", "pid", "gen", "state", "ready", "uptime", "restarts", "rss", "cpu",
            "conns", "open", "handoffs"
        ]),
        "{table}"
    );
    let fixture = Path::new(env!("CARGO_BIN_EXE_http_fixture"));
    let inode = std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(fixture).unwrap());
    assert!(
        lines[4].starts_with(&format!(
            "generation 1: {} (inode {inode}, ",
            fixture.display()
        )),
        "{table}"
    );
    assert!(
        lines[5].starts_with("settings: workers=2 (CLUSTER_WORKERS), policy=rr (default)"),
        "{table}"
    );
    for (id, pid) in &cluster.workers {
        let row = lines
            .iter()
            .find(|l| l.split_whitespace().next() == Some(&id.to_string()))
            .unwrap_or_else(|| panic!("no row for worker {id}: {table}"));
        let cells: Vec<&str> = row.split_whitespace().collect();
        assert_eq!(cells[2], pid.to_string(), "{table}");
        assert_eq!(cells[3], "1", "{table}");
        assert_eq!(cells[4], "listening", "{table}");
        // The fixture declares itself ready (`cluster::ready()`).
        assert_eq!(cells[5], "yes", "{table}");
    }
    // The same in JSON: the settings with their sources, the binary, readiness.
    let before = status(&socket);
    let settings = before["settings"].as_array().unwrap();
    let setting = |name: &str| {
        settings
            .iter()
            .find(|s| s["name"] == name)
            .unwrap_or_else(|| panic!("{name}: {before}"))
            .clone()
    };
    assert_eq!(setting("workers")["value"], "2", "{before}");
    assert_eq!(setting("workers")["source"], "CLUSTER_WORKERS", "{before}");
    assert_eq!(setting("control_socket")["value"], socket.to_str().unwrap());
    assert_eq!(setting("disconnect_timeout")["value"], "30s", "{before}");
    assert_eq!(
        setting("disconnect_timeout")["source"],
        "default",
        "{before}"
    );
    assert_eq!(before["binaries"][0]["generation"], 1, "{before}");
    assert_eq!(before["binaries"][0]["inode"], inode, "{before}");
    assert!(
        before["workers"]
            .as_array()
            .unwrap()
            .iter()
            .all(|w| w["ready"] == true),
        "{before}"
    );

    let (code, out, err) = ctl(&socket, &["reload"]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.starts_with("reload complete: generation 2, 2 workers replaced"),
        "{out}"
    );
    cluster.program.worker();
    cluster.program.worker();
    let after = status(&socket);
    assert_eq!(after["generation"], 2, "{after}");
    assert_eq!(after["reloads"]["complete"], 1, "{after}");
    let workers = after["workers"].as_array().unwrap();
    assert!(workers.iter().all(|w| w["generation"] == 2), "{after}");
    // Nothing is being served: the scheduler counts no open connection.
    assert!(workers.iter().all(|w| w["outstanding"] == 0), "{after}");
    let metrics = scrape(cluster.endpoint);
    assert_eq!(
        sample(&metrics, "cluster_reloads_total{result=\"complete\"}"),
        Some(1.0),
        "{metrics}"
    );
    assert_eq!(
        sample(&metrics, "cluster_generation"),
        Some(2.0),
        "{metrics}"
    );
}

#[test]
fn garbage_on_the_control_socket_gets_an_error_and_the_primary_carries_on() {
    let mut cluster = Cluster::start("garbage", 1);
    let socket = cluster.socket();
    let ask = |bytes: &[u8]| {
        let mut stream = UnixStream::connect(&socket).unwrap();
        stream.set_read_timeout(Some(WAIT)).unwrap();
        stream.write_all(bytes).unwrap();
        let mut answer = String::new();
        BufReader::new(stream).read_line(&mut answer).unwrap();
        serde_json::from_str::<serde_json::Value>(&answer).unwrap()
    };
    for garbage in [
        &b"frobnicate\n"[..],
        b"scale -1\n",
        b"scale 99999999999999999999999\n",
        b"status now\n",
        b"\xff\xfe\n",
        b"\n",
    ] {
        let answer = ask(garbage);
        assert_eq!(answer["ok"], false, "{garbage:?}: {answer}");
        assert!(
            answer["error"].as_str().is_some_and(|e| !e.is_empty()),
            "{answer}"
        );
    }
    // A line that never ends: refused once it is too long, not buffered.
    let answer = ask(&[b'x'; 64 * 1024]);
    assert_eq!(answer["ok"], false, "{answer}");
    assert!(
        answer["error"].as_str().unwrap().contains("at most"),
        "{answer}"
    );
    // Half a command, then the client goes away.
    drop(UnixStream::connect(&socket).unwrap().write_all(b"sta"));
    // Several commands on one connection.
    let mut stream = UnixStream::connect(&socket).unwrap();
    stream.set_read_timeout(Some(WAIT)).unwrap();
    stream.write_all(b"bogus\nstatus\n").unwrap();
    let mut reader = BufReader::new(stream);
    let mut first = String::new();
    reader.read_line(&mut first).unwrap();
    let mut second = String::new();
    reader.read_line(&mut second).unwrap();
    assert!(first.contains("\"ok\":false"), "{first}");
    assert!(second.contains("\"ok\":true"), "{second}");

    // The primary carries on.
    assert!(cluster.program.is_running());
    assert_eq!(get(cluster.app, "/").unwrap().0, 200);
    assert_eq!(status(&socket)["workers"].as_array().unwrap().len(), 1);
    // Garbage on the endpoint too.
    let mut raw = std::net::TcpStream::connect(("127.0.0.1", cluster.endpoint)).unwrap();
    raw.set_read_timeout(Some(WAIT)).unwrap();
    raw.write_all(b"\x00\x01garbage\r\n\r\n").unwrap();
    let mut response = String::new();
    raw.read_to_string(&mut response).unwrap();
    assert!(response.starts_with("HTTP/1.1 400"), "{response}");
    assert_eq!(get(cluster.endpoint, "/healthz").unwrap().0, 200);
}

#[test]
fn json_requests_are_versioned_and_the_wrong_ones_get_typed_errors() {
    let mut cluster = Cluster::start("json", 1);
    let socket = cluster.socket();
    // Several requests on one connection, each answered by one line.
    let mut stream = UnixStream::connect(&socket).unwrap();
    stream.set_read_timeout(Some(WAIT)).unwrap();
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut ask = |request: &str| {
        stream.write_all(format!("{request}\n").as_bytes()).unwrap();
        let mut answer = String::new();
        reader.read_line(&mut answer).unwrap();
        serde_json::from_str::<serde_json::Value>(&answer).unwrap()
    };
    let answer = ask(r#"{"version":1,"command":"status"}"#);
    assert_eq!(
        (&answer["version"], &answer["ok"]),
        (&1.into(), &true.into()),
        "{answer}"
    );
    assert_eq!(
        answer["status"]["workers"].as_array().unwrap().len(),
        1,
        "{answer}"
    );
    // Another version: told so, whatever the rest of the request holds, and nothing is done.
    for request in [
        r#"{"version":2,"command":"scale","workers":0}"#,
        r#"{"version":0,"command":"status"}"#,
        r#"{"version":99,"what":"ever"}"#,
    ] {
        let answer = ask(request);
        assert_eq!(answer["ok"], false, "{request}: {answer}");
        assert_eq!(answer["kind"], "unknown_version", "{request}: {answer}");
        assert!(
            answer["error"].as_str().unwrap().contains("version 1"),
            "{request}: {answer}"
        );
    }
    // The right version, a wrong shape.
    for request in [
        r#"{"version":1,"command":"frobnicate"}"#,
        r#"{"version":1,"command":"scale"}"#,
        r#"{"version":1,"command":"scale","workers":-1}"#,
        r#"{"version":1}"#,
        r#"{"command":"status"}"#,
        r#"{"version":"1","command":"status"}"#,
        r#"{"version":1,"command":"status""#,
        "[1,2]",
    ] {
        let answer = ask(request);
        assert_eq!(answer["ok"], false, "{request}: {answer}");
        assert_eq!(answer["kind"], "malformed", "{request}: {answer}");
        assert!(
            answer["error"].as_str().is_some_and(|e| !e.is_empty()),
            "{request}: {answer}"
        );
    }
    // The same connection is still answered, the primary still serves and scaled nothing.
    let answer = ask(r#"{"version":1,"command":"status"}"#);
    assert_eq!(answer["ok"], true, "{answer}");
    assert_eq!(answer["status"]["wanted"], 1, "{answer}");
    assert!(cluster.program.is_running());
    assert_eq!(get(cluster.app, "/").unwrap().0, 200);
}

#[test]
fn a_client_of_another_user_is_refused() {
    if !cluster_tests::is_root() {
        eprintln!("not root: a client of another user cannot be started; skipped");
        return;
    }
    let mut cluster = Cluster::start("peer", 1);
    let socket = cluster.socket();
    let (dir, client) =
        cluster_tests::copy_for_nobody(Path::new(env!("CARGO_BIN_EXE_ctl_client")), "ctl");
    let as_nobody = |command: &mut Command| {
        use std::os::unix::process::CommandExt;
        command.uid(65534).gid(65534).current_dir("/");
    };
    std::fs::set_permissions(&cluster.scratch.0, std::fs::Permissions::from_mode(0o755)).unwrap();
    // Mode 0600: the socket file itself keeps other users out.
    let (code, _, err) = ctl_command(&client, &socket, &["status"], as_nobody);
    assert_eq!(code, 69, "{err}");
    assert!(err.contains("Permission denied"), "{err}");
    // Opened to everyone by mistake: the peer check still refuses, and says why.
    std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o666)).unwrap();
    let (code, _, err) = ctl_command(&client, &socket, &["reload"], as_nobody);
    let _ = std::fs::remove_dir_all(dir);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("refused: uid 65534"), "{err}");
    cluster
        .program
        .wait_for_log("refused a client of another user");
    // Nothing was reloaded, and the primary's user is still answered.
    assert_eq!(status(&socket)["reloads"]["complete"], 0);
    assert!(cluster.program.is_running());
}

#[test]
fn a_live_control_socket_is_refused_and_a_stale_one_replaced() {
    let cluster = Cluster::start("live", 1);
    let socket = cluster.socket();
    // A second primary on the same socket: refused, naming it, before any worker starts.
    let mut second = Command::new(env!("CARGO_BIN_EXE_http_fixture"));
    second
        .env("CLUSTER_WORKERS", "1")
        .env("CLUSTER_CONTROL_SOCKET", &socket)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cluster_tests::spawn(&mut second);
    let status = cluster_tests::wait_for_exit(&mut child, WAIT);
    let (out, err) = (
        cluster_tests::read_all(child.stdout.take()),
        cluster_tests::read_all(child.stderr.take()),
    );
    assert!(!status.success(), "{err}");
    assert!(
        err.contains(&format!(
            "cannot listen for commands on {}",
            socket.display()
        )),
        "{err}"
    );
    assert!(out.is_empty(), "no worker may start: {out}");
    assert_eq!(
        self::status(&socket)["workers"].as_array().unwrap().len(),
        1
    );
    drop(cluster);

    // A socket file nobody accepts on (a primary that was SIGKILLed): replaced.
    let scratch = Scratch::new("stale");
    let stale = scratch.socket();
    drop(std::os::unix::net::UnixListener::bind(&stale).unwrap());
    assert!(stale.exists());
    let mut program = Program::start(
        env!("CARGO_BIN_EXE_http_fixture"),
        &[
            ("CLUSTER_WORKERS", "1"),
            ("CLUSTER_CONTROL_SOCKET", stale.to_str().unwrap()),
        ],
    );
    program.worker();
    assert_eq!(self::status(&stale)["workers"].as_array().unwrap().len(), 1);
    // Removed when the primary stops.
    program.signal(libc::SIGTERM);
    assert!(program.wait().success(), "{}", program.stderr());
    assert!(!stale.exists());
}

#[test]
fn bad_endpoint_settings_stop_the_program_naming_them() {
    let run = |env: &[(&str, &str)]| {
        let mut command = Command::new(env!("CARGO_BIN_EXE_http_fixture"));
        command
            .envs(env.iter().copied())
            .env("CLUSTER_WORKERS", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cluster_tests::spawn(&mut command);
        let status = cluster_tests::wait_for_exit(&mut child, WAIT);
        (
            status.code(),
            cluster_tests::read_all(child.stdout.take()),
            cluster_tests::read_all(child.stderr.take()),
        )
    };
    for bad in ["localhost:9100", "9100", ""] {
        let (code, out, err) = run(&[("CLUSTER_METRICS_ADDR", bad)]);
        assert_eq!(code, Some(78), "{bad:?}: {err}");
        assert!(err.contains("CLUSTER_METRICS_ADDR="), "{err}");
        assert!(out.is_empty(), "{out}");
    }
    let (code, _, err) = run(&[("CLUSTER_CONTROL_SOCKET", "relative/control.sock")]);
    assert_eq!(code, Some(78), "{err}");
    assert!(err.contains("CLUSTER_CONTROL_SOCKET="), "{err}");

    // A port another process holds: an error naming the address, and no worker starts.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let address = taken.local_addr().unwrap().to_string();
    let (code, out, err) = run(&[("CLUSTER_METRICS_ADDR", &address)]);
    assert_ne!(code, Some(0), "{err}");
    assert!(
        err.contains(&format!("cannot serve the metrics endpoint on {address}")),
        "{err}"
    );
    assert!(err.contains("in use"), "{err}");
    assert!(out.is_empty(), "no worker may start: {out}");
}

/// A program that builds its own supervisor serves the endpoint with `observability::serve`:
/// probes are answered while the supervisor runs, say so once it stopped, and the endpoint
/// closes when what `serve` returned is dropped.
#[tokio::test]
async fn the_endpoint_served_by_hand_answers_until_it_is_dropped() {
    use cluster::primary::Event;
    use cluster::settings::SchedulingPolicy;
    let mut cluster = support::Cluster::with(SchedulingPolicy::RoundRobin, |s| {
        s.workers(1)
            .metrics_addr("127.0.0.1:0".parse::<std::net::SocketAddr>().unwrap())
    });
    let supervisor = cluster::Supervisor::new(cluster.primary.clone());
    let served = cluster::observability::serve(&supervisor.handle()).expect("binds");
    let port = served.endpoint_addr().expect("an endpoint").port();
    let probe = async |path: &'static str| {
        tokio::task::spawn_blocking(move || get(port, path))
            .await
            .unwrap()
    };
    let running = tokio::spawn(supervisor.run());
    loop {
        if let Event::Fork(worker) = cluster.event().await {
            cluster.adopt(&worker);
            break;
        }
    }
    assert_eq!(probe("/healthz").await.unwrap().0, 200);
    running.abort();
    assert!(running.await.unwrap_err().is_cancelled());
    assert_eq!(
        probe("/healthz").await.unwrap().0,
        503,
        "the supervisor is gone"
    );
    drop(served);
    let deadline = Instant::now() + WAIT;
    while probe("/healthz").await.is_ok() {
        assert!(Instant::now() < deadline, "the endpoint still answers");
        tokio::task::yield_now().await;
    }
}

/// A slowloris on the endpoint: 200 connections (more than its slots: the oldest give way)
/// that send half a request head and wait, each reopened as soon as the primary closes it.
/// Every probe meanwhile is answered.
#[test]
fn probes_are_answered_while_slow_clients_hold_the_endpoint() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    let cluster = Cluster::start("slowloris", 1);
    let port = cluster.endpoint;
    let stop = Arc::new(AtomicBool::new(false));
    let opened = Arc::new(AtomicUsize::new(0));
    let attackers: Vec<_> = (0..200)
        .map(|_| {
            let (stop, opened) = (stop.clone(), opened.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let Ok(mut stream) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
                        continue;
                    };
                    opened.fetch_add(1, Ordering::Relaxed);
                    let _ = stream.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: ");
                    // Until the primary closes it (or the test ends).
                    stream
                        .set_read_timeout(Some(Duration::from_millis(200)))
                        .unwrap();
                    let mut byte = [0; 1];
                    while !stop.load(Ordering::Relaxed) {
                        match stream.read(&mut byte) {
                            Ok(0) => break,
                            Ok(_) => {}
                            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                            Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {}
                            Err(_) => break,
                        }
                    }
                }
            })
        })
        .collect();
    // Let the attackers take their slots first.
    let deadline = Instant::now() + WAIT;
    while opened.load(Ordering::Relaxed) < 200 {
        assert!(Instant::now() < deadline, "the attackers never connected");
        std::thread::yield_now();
    }
    let mut slowest = Duration::ZERO;
    let mut answered = 0;
    for probe in 0..60 {
        let path = if probe % 2 == 0 {
            "/healthz"
        } else {
            "/readyz"
        };
        let asked = Instant::now();
        let (status, body) = get(port, path).unwrap_or_else(|e| panic!("probe {probe}: {e}"));
        assert_eq!(status, 200, "probe {probe} {path}: {body}");
        slowest = slowest.max(asked.elapsed());
        answered += 1;
        std::thread::sleep(Duration::from_millis(100));
    }
    stop.store(true, Ordering::Relaxed);
    for attacker in attackers {
        attacker.join().unwrap();
    }
    eprintln!(
        "{answered} of 60 probes answered, the slowest in {slowest:?}, while {} slow connections \
         were opened",
        opened.load(Ordering::Relaxed)
    );
}

/// 200 connections to the control socket that never say anything: `cluster-ctl status`
/// still answers.
#[test]
fn idle_connections_do_not_keep_cluster_ctl_out() {
    let cluster = Cluster::start("idle-control", 1);
    let idle: Vec<_> = (0..200)
        .map(|_| UnixStream::connect(cluster.socket()).expect("connect"))
        .collect();
    let asked = Instant::now();
    let (code, out, err) = ctl(&cluster.socket(), &["status"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("1 of 1 workers serving"), "{out}");
    eprintln!(
        "cluster-ctl status answered in {:?} past {} idle connections",
        asked.elapsed(),
        idle.len()
    );
}
