//! Worker recycling with real processes under real HTTP load: `CLUSTER_MAX_REQUESTS=100+10`
//! replaces every worker, one at a time, without failing a request; a worker that grows past
//! `CLUSTER_MAX_MEMORY` is replaced.

mod support;

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use support::program::{Program, WAIT, endpoint_port, get};

/// The value of `name` (with its labels) in a Prometheus scrape, if it is there.
fn metric(scrape: &str, name: &str) -> Option<u64> {
    scrape
        .lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
}

/// Workers not yet exited, over every state, as `/metrics` counts them.
fn workers_alive(scrape: &str) -> u64 {
    ["none", "online", "listening", "disconnected"]
        .iter()
        .filter_map(|state| metric(scrape, &format!("cluster_workers{{state=\"{state}\"}}")))
        .sum()
}

/// The value of `key=` in a log line.
fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    let (_, rest) = line.split_once(&format!(" {key}="))?;
    rest.split_whitespace().next()
}

/// The recycling lines of the log, in order: `(true, worker)` when one starts, `(false,
/// worker)` when it ends.
fn recycles(log: &str) -> Vec<(bool, u64)> {
    log.lines()
        .filter_map(|line| {
            if line.contains("recycling worker") {
                Some((true, field(line, "worker")?.parse().ok()?))
            } else if line.contains("worker recycled") {
                let old = field(line, "old").or_else(|| field(line, "worker"))?;
                Some((false, old.parse().ok()?))
            } else {
                None
            }
        })
        .collect()
}

#[test]
fn max_requests_replaces_every_worker_one_at_a_time_and_no_request_fails() {
    let mut program = Program::start(
        env!("CARGO_BIN_EXE_http_fixture"),
        &[
            ("CLUSTER_MAX_REQUESTS", "100+10"),
            ("CLUSTER_METRICS_ADDR", "127.0.0.1:0"),
            ("RUST_LOG", "info"),
        ],
    );
    let (first, _, port) = program.worker();
    let (second, _, _) = program.worker();
    let endpoint = endpoint_port(&program);

    // Meanwhile, the workers alive as the primary counts them, scraped again and again: one
    // replacement at a time is at most one worker more than the two.
    let done = Arc::new(AtomicBool::new(false));
    let most_alive = Arc::new(Mutex::new(0));
    let watcher = {
        let (done, most_alive) = (done.clone(), most_alive.clone());
        std::thread::spawn(move || {
            while !done.load(Ordering::Relaxed) {
                if let Ok((200, scrape)) = get(endpoint, "/metrics") {
                    let alive = workers_alive(&scrape);
                    let mut most = most_alive.lock().unwrap();
                    *most = (*most).max(alive);
                }
                // Paced, not synchronised: a scrape costs the primary a status.
                std::thread::sleep(Duration::from_millis(5));
            }
        })
    };

    // 1,000 requests, one connection each (a connection is what is counted), from 4 clients
    // that never retry.
    let clients: Vec<_> = (0..4)
        .map(|_| {
            std::thread::spawn(move || {
                let mut failures = Vec::new();
                let mut served_by = BTreeSet::new();
                for _ in 0..250 {
                    match get(port, "/") {
                        Ok((200, body)) => {
                            served_by.insert(body);
                        }
                        other => failures.push(format!("{other:?}")),
                    }
                }
                (failures, served_by)
            })
        })
        .collect();
    let mut failures = Vec::new();
    let mut served_by = BTreeSet::new();
    for client in clients {
        let (failed, served) = client.join().unwrap();
        failures.extend(failed);
        served_by.extend(served);
    }
    assert!(
        failures.is_empty(),
        "{} of 1000 failed: {failures:?}",
        failures.len()
    );

    // Each first worker was handed at least 100 connections: both are replaced, the second
    // perhaps after the load ended.
    let deadline = Instant::now() + WAIT;
    loop {
        let ended: BTreeSet<u64> = recycles(&program.stderr())
            .into_iter()
            .filter_map(|(started, worker)| (!started).then_some(worker))
            .collect();
        if ended.contains(&first) && ended.contains(&second) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "workers {first} and {second} were not both recycled: {}",
            program.stderr()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    done.store(true, Ordering::Relaxed);
    watcher.join().unwrap();
    program.new_workers();

    let log = program.stderr();
    // Never two at once: each recycle ends before the next starts.
    let lines = recycles(&log);
    for pair in lines.chunks(2) {
        match pair {
            [(true, started), (false, ended)] => assert_eq!(started, ended, "{log}"),
            [(true, _)] => {} // The last one may still be under way.
            _ => panic!("two recycles at once: {lines:?}\n{log}"),
        }
    }
    assert!(!log.contains("recycle aborted"), "{log}");
    // Each at its own limit, drawn from 100 to 110.
    for line in log.lines().filter(|l| l.contains("recycling worker")) {
        let limit: u64 = line
            .split("its limit is ")
            .nth(1)
            .and_then(|rest| rest.split(|c: char| !c.is_ascii_digit()).next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no limit in {line}"));
        assert!((100..=110).contains(&limit), "{line}");
    }
    let most_alive = *most_alive.lock().unwrap();
    assert!(
        (2..=3).contains(&most_alive),
        "{most_alive} workers alive at once"
    );

    // Counted, by reason, as many as the log says ended.
    let replaced = lines.iter().filter(|(started, _)| !started).count() as u64;
    let scrape = get(endpoint, "/metrics").unwrap().1;
    let counted = metric(
        &scrape,
        "cluster_worker_recycles_total{reason=\"requests\"}",
    );
    assert!(
        counted >= Some(replaced) && replaced >= 2,
        "{replaced}: {scrape}"
    );
    assert_eq!(
        metric(&scrape, "cluster_worker_recycles_total{reason=\"memory\"}"),
        Some(0)
    );
    // Replacements serve, and the first workers are gone.
    let (status, body) = get(port, "/").unwrap();
    assert_eq!(status, 200);
    assert!(
        body != format!("worker {first}") && body != format!("worker {second}"),
        "{body}"
    );
    eprintln!(
        "max_requests(100, 10): 1000 requests, 0 failed, {replaced} workers recycled, \
         at most {most_alive} alive at once, served by {} workers",
        served_by.len()
    );
}

#[test]
fn a_worker_past_max_memory_is_replaced_and_its_sibling_is_not() {
    let mut program = Program::start(
        env!("CARGO_BIN_EXE_http_fixture"),
        &[
            ("CLUSTER_MAX_MEMORY", "100MiB"),
            ("CLUSTER_METRICS_ADDR", "127.0.0.1:0"),
            ("RUST_LOG", "info"),
        ],
    );
    let (first, _, port) = program.worker();
    let (second, _, _) = program.worker();
    let endpoint = endpoint_port(&program);
    // One worker takes 150 MiB and keeps it.
    let (status, body) = get(port, "/allocate/150").unwrap();
    assert_eq!(status, 200);
    let grown: u64 = body.strip_prefix("worker ").unwrap().parse().unwrap();
    assert!([first, second].contains(&grown), "{body}");
    program.wait_for_log(&format!("worker recycled old={grown} "));
    let log = program.stderr();
    let started = log
        .lines()
        .find(|l| l.contains("recycling worker"))
        .unwrap();
    assert_eq!(field(started, "worker"), Some(grown.to_string().as_str()));
    assert!(started.contains("over the limit of 100.0 MiB"), "{started}");
    assert!(field(started, "reason").is_some(), "{started}");
    assert_eq!(log.matches("recycling worker").count(), 1, "{log}");
    // Its replacement serves beside the sibling, and it was counted.
    let (replacement, _, _) = program.worker();
    let scrape = get(endpoint, "/metrics").unwrap().1;
    assert_eq!(
        metric(&scrape, "cluster_worker_recycles_total{reason=\"memory\"}"),
        Some(1),
        "{scrape}"
    );
    let deadline = Instant::now() + WAIT;
    let mut seen = BTreeSet::new();
    while seen.len() < 2 {
        let (status, body) = get(port, "/").unwrap();
        assert_eq!(status, 200);
        seen.insert(body);
        assert!(Instant::now() < deadline, "served by {seen:?}");
    }
    let sibling = if grown == first { second } else { first };
    assert_eq!(
        seen,
        BTreeSet::from([format!("worker {replacement}"), format!("worker {sibling}")])
    );
}
