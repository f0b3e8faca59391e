//! The status page (`GET /status` on the metrics address) in a real headless browser: it
//! renders, shows every worker, draws the handoff-latency histogram, and updates itself after a
//! worker is killed, within one page load. Skipped, with the reason printed, where `chromium`
//! is missing (`apt-get install -y chromium`).
//!
//! The browser runs on virtual time (`--virtual-time-budget`), which stands still while a fetch
//! is pending: the page is served through a proxy that holds its second `/status.json` until
//! the worker was killed and replaced, so the page sees the cluster before and after, in that
//! order, without the test guessing at timing.

mod support;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use support::program::{Program, WAIT, endpoint_port, get, wait_readyz};

/// The browser, if one is installed.
fn chromium() -> Option<&'static str> {
    ["chromium", "chromium-browser"].into_iter().find(|name| {
        Command::new(name)
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    })
}

/// Forwards each request it accepts to `127.0.0.1:upstream`, one per connection. Before it
/// forwards the `hold`-th request for `/status.json`, it says so on the returned channel and
/// waits for a word back.
fn proxy(upstream: u16, hold: usize) -> (u16, mpsc::Receiver<()>, mpsc::Sender<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let (held, held_rx) = mpsc::channel();
    let (release_tx, release) = mpsc::channel::<()>();
    std::thread::spawn(move || {
        let mut statuses = 0;
        for client in listener.incoming() {
            let Ok(mut client) = client else { return };
            client.set_read_timeout(Some(WAIT)).unwrap();
            let Some(head) = read_head(&mut client) else {
                continue;
            };
            if head.starts_with("GET /status.json ") {
                statuses += 1;
                if statuses == hold {
                    let _ = held.send(());
                    if release.recv_timeout(WAIT).is_err() {
                        return;
                    }
                }
            }
            // Each answer ends its connection (the endpoint answers one request per connection).
            let path = head.split_whitespace().nth(1).unwrap_or("/").to_owned();
            let mut upstream = TcpStream::connect(("127.0.0.1", upstream)).unwrap();
            write!(
                upstream,
                "GET {path} HTTP/1.1\r\nHost: proxy\r\nConnection: close\r\n\r\n"
            )
            .unwrap();
            let mut response = Vec::new();
            let _ = upstream.read_to_end(&mut response);
            let _ = client.write_all(&response);
        }
    });
    (port, held_rx, release_tx)
}

/// The request head's first line.
fn read_head(stream: &mut TcpStream) -> Option<String> {
    let mut buf = Vec::new();
    let mut byte = [0u8; 1];
    while !buf.ends_with(b"\r\n\r\n") {
        if stream.read(&mut byte).ok()? == 0 {
            return None;
        }
        buf.push(byte[0]);
    }
    Some(String::from_utf8_lossy(&buf).lines().next()?.to_owned())
}

/// The element of `dom` opened by `start` (its first match), up to the end of that tag.
fn tag<'a>(dom: &'a str, start: &str) -> Option<&'a str> {
    let at = dom.find(start)?;
    let end = dom[at..].find('>')?;
    Some(&dom[at..=at + end])
}

/// The `attr="..."` value in `tag`.
fn attr<'a>(tag: &'a str, attr: &str) -> Option<&'a str> {
    let (_, rest) = tag.split_once(&format!(" {attr}=\""))?;
    rest.split('"').next()
}

#[test]
fn the_status_page_renders_every_worker_and_updates_itself_after_a_kill() {
    let Some(browser) = chromium() else {
        eprintln!("skipped: chromium is not installed (`apt-get install -y chromium`)");
        return;
    };
    let mut program = Program::start(
        env!("CARGO_BIN_EXE_http_fixture"),
        &[
            ("CLUSTER_METRICS_ADDR", "127.0.0.1:0"),
            ("RUST_LOG", "info"),
        ],
    );
    let (killed, killed_pid, port) = program.worker();
    let (sibling, sibling_pid, _) = program.worker();
    let endpoint = endpoint_port(&program);
    wait_readyz(endpoint, 200);
    // Handoffs for the histogram.
    for _ in 0..40 {
        assert_eq!(get(port, "/").unwrap().0, 200);
    }

    let (proxied, held, release) = proxy(endpoint, 2);
    let dir = std::env::temp_dir().join(format!("cluster-chromium-{}", std::process::id()));
    let mut command = Command::new(browser);
    command
        .args([
            "--headless",
            "--disable-gpu",
            "--no-first-run",
            "--hide-scrollbars",
            // Four refreshes (every 2 s) of virtual time, which stands still while a fetch is
            // pending: the held one does not eat into it.
            "--virtual-time-budget=7000",
            "--dump-dom",
        ])
        .arg(format!("--user-data-dir={}", dir.display()))
        .arg(format!("http://127.0.0.1:{proxied}/status"))
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    if cluster_tests::is_root() {
        // Chromium refuses to run its sandbox as root.
        command.arg("--no-sandbox");
    }
    let mut chromium = cluster_tests::spawn(&mut command);
    let mut stdout = chromium.stdout.take().unwrap();
    let dom = std::thread::spawn(move || {
        let mut dom = String::new();
        let _ = stdout.read_to_string(&mut dom);
        dom
    });

    // The page rendered its first status and asks again: a worker dies meanwhile, and its
    // slot's replacement is up before the page hears of it.
    if held.recv_timeout(WAIT).is_err() {
        let _ = chromium.kill();
        let _ = chromium.wait();
        panic!("the page never asked for the status twice");
    }
    cluster_tests::signal(killed_pid, libc::SIGKILL).unwrap();
    let (replacement, replacement_pid, _) = program.worker();
    let deadline = Instant::now() + WAIT;
    loop {
        let (_, json) = get(endpoint, "/status.json").unwrap();
        let gone = !json.contains(&format!("\"pid\":{killed_pid},"));
        if gone
            && json.contains(&format!("\"pid\":{replacement_pid},"))
            && json.contains("\"ready\":true")
        {
            break;
        }
        assert!(Instant::now() < deadline, "no replacement in {json}");
        std::thread::sleep(Duration::from_millis(20));
    }
    release.send(()).unwrap();
    let status = cluster_tests::wait_for_exit(&mut chromium, WAIT);
    let dom = dom.join().unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    assert!(status.success(), "chromium: {status}");

    // It rendered, from its own script, more than once.
    let updated = tag(&dom, "<p class=\"muted\" id=\"updated\"").unwrap_or_else(|| panic!("{dom}"));
    let updates: u32 = attr(updated, "data-updates").unwrap().parse().unwrap();
    assert!(updates >= 3, "{updates} updates: {dom}");
    let readiness = tag(&dom, "<span id=\"readiness\"").unwrap();
    assert_eq!(attr(readiness, "data-ready"), Some("true"), "{dom}");
    // Every worker, as the cluster has them now: the sibling and the replacement, each with
    // its pid; the killed one is gone from the table, and said to be gone.
    for (id, pid) in [(sibling, sibling_pid), (replacement, replacement_pid)] {
        let row = tag(&dom, &format!("<tr data-worker=\"{id}\""))
            .unwrap_or_else(|| panic!("no worker {id}: {dom}"));
        assert_eq!(
            attr(row, "data-pid"),
            Some(pid.to_string().as_str()),
            "{dom}"
        );
    }
    assert_eq!(dom.matches("<tr data-worker=").count(), 2, "{dom}");
    assert!(
        !dom.contains(&format!("<tr data-worker=\"{killed}\"")),
        "{dom}"
    );
    assert!(
        dom.contains(&format!(
            "<li data-change=\"gone\" data-worker=\"{killed}\">"
        )),
        "{dom}"
    );
    assert!(
        dom.contains(&format!(
            "<li data-change=\"started\" data-worker=\"{replacement}\">"
        )),
        "{dom}"
    );
    assert!(
        dom.contains("signal 9"),
        "the slot's previous worker: {dom}"
    );
    let restarts = tag(&dom, "<div data-total=\"restarts\"").unwrap();
    let restarts_at = dom.find(restarts).unwrap();
    assert!(
        dom[restarts_at..].starts_with(&format!("{restarts}<dt>restarts</dt><dd>1</dd>")),
        "{dom}"
    );
    // The histogram: a bar per bucket, holding every handoff so far.
    let bars: Vec<u64> = dom
        .match_indices("<div class=\"bar\"")
        .map(|(at, _)| {
            attr(tag(&dom[at..], "<div").unwrap(), "data-count")
                .unwrap()
                .parse()
                .unwrap()
        })
        .collect();
    assert_eq!(bars.len(), 14, "{dom}");
    assert!(bars.iter().sum::<u64>() >= 40, "{bars:?}");
    // No fetch failed (the script says so in a banner it shows).
    let banner = tag(&dom, "<div id=\"error\"").unwrap();
    assert_eq!(attr(banner, "class"), Some("banner hidden"), "{dom}");
    program.new_workers();
}

#[test]
fn the_grafana_dashboard_runs_the_documented_queries_over_metrics_the_program_exports() {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/..");
    let dashboard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(format!("{root}/deploy/grafana-dashboard.json")).unwrap(),
    )
    .unwrap();
    let operations = std::fs::read_to_string(format!("{root}/docs/operations.md")).unwrap();
    let documented: Vec<&str> = operations
        .split("Queries for a dashboard:")
        .nth(1)
        .and_then(|rest| rest.split("```text").nth(1))
        .and_then(|block| block.split("```").next())
        .unwrap()
        .lines()
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect();
    let queries: Vec<&str> = dashboard["panels"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|panel| panel["targets"].as_array().unwrap())
        .map(|target| target["expr"].as_str().unwrap())
        .collect();
    // Every documented query has its panel, and every panel's query is documented.
    let mut sorted_queries = queries.clone();
    sorted_queries.sort_unstable();
    let mut sorted_documented = documented.clone();
    sorted_documented.sort_unstable();
    assert_eq!(sorted_queries, sorted_documented);

    // Each metric a query names is in a scrape of the program.
    let mut program = Program::start(
        env!("CARGO_BIN_EXE_http_fixture"),
        &[("CLUSTER_METRICS_ADDR", "127.0.0.1:0")],
    );
    // Both workers known by pid, for the cleanup.
    program.worker();
    program.worker();
    let endpoint = endpoint_port(&program);
    wait_readyz(endpoint, 200);
    let (_, scrape) = get(endpoint, "/metrics").unwrap();
    for query in queries {
        for (at, _) in query.match_indices("cluster_") {
            let name: String = query[at..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            let exported = scrape.lines().any(|line| {
                line.starts_with(&format!("{name}{{")) || line.starts_with(&format!("{name} "))
            });
            assert!(exported, "{name} (in `{query}`) is not exported: {scrape}");
        }
    }
}
