//! A worker that sends faster than the primary's code reads cannot grow the primary's memory:
//! `Primary::messages()` is bounded, and the driver stops reading that worker's link while it is
//! full. Alone in its binary: the test process is the primary, and its RSS is what is measured.

mod support;

use std::time::{Duration, Instant};

use cluster::settings::SchedulingPolicy;
use cluster_tests::{Command, Reply};
use support::Cluster;

/// Messages the worker sends, as fast as it can: 1,000,000 take over a minute in a debug build
/// on a busy 2-CPU machine; 200,000 take 10 to 20 s. If they all piled up in the primary (as
/// before `Primary::messages()` was bounded) they would take it far past [`BOUND_KB`]: about
/// 1.3 kB each (measured, unbounded: 55 MB after 38,000), 260 MB for 200,000.
const COUNT: u32 = 200_000;
/// Bytes of each message's payload.
const SIZE: usize = 1024;
/// The primary's resident memory may never exceed this.
const BOUND_KB: u64 = 64 * 1024;

/// This process's resident memory, in kB.
fn rss_kb() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS")
}

/// The user and system CPU time of process `pid`, in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("/proc/<pid>/stat");
    // After the command's closing parenthesis: state is field 3, utime 14, stime 15.
    let fields: Vec<&str> = stat[stat.rfind(')').expect("comm") + 2..]
        .split_whitespace()
        .collect();
    fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
}

#[tokio::test]
async fn a_flooding_worker_cannot_grow_the_primary_and_every_message_arrives_in_order() {
    let mut cluster = Cluster::start(SchedulingPolicy::RoundRobin);
    let worker = cluster.fork().await;
    let baseline = rss_kb();
    let started = Instant::now();
    worker
        .send(&Command::Flood {
            count: COUNT,
            size: SIZE,
        })
        .unwrap();
    let mut peak = baseline;
    // The primary's code reads nothing until the worker stops sending: blocked by the link (its
    // CPU time stands still), or done. Unbounded, everything it sent would be in the primary.
    let mut last = (cpu_ticks(worker.pid()), Instant::now());
    loop {
        peak = peak.max(rss_kb());
        assert!(peak < BOUND_KB, "RSS {peak} kB while the reader stalled");
        assert!(
            started.elapsed() < support::WAIT,
            "the worker never stopped (RSS peak {peak} kB)"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
        let ticks = cpu_ticks(worker.pid());
        if ticks != last.0 {
            last = (ticks, Instant::now());
        } else if last.1.elapsed() >= Duration::from_millis(200) {
            break;
        }
    }
    let stalled_for = started.elapsed();
    // Then it reads everything: in order, intact, and the memory stays bounded throughout.
    for index in 0..COUNT {
        let (from, message) = cluster.message().await;
        assert_eq!(from.id(), worker.id());
        let Reply::Numbered {
            index: got,
            payload,
        } = message.decode().unwrap()
        else {
            panic!("unexpected message");
        };
        assert_eq!(got, index, "in order");
        assert_eq!(payload.len(), SIZE);
        assert!(payload.iter().all(|b| u32::from(*b) == index % 251));
        if index % 1000 == 0 {
            peak = peak.max(rss_kb());
            assert!(peak < BOUND_KB, "RSS {peak} kB at message {index}");
        }
    }
    let after = rss_kb();
    eprintln!(
        "{COUNT} messages of {SIZE} B in {:?} (reader stalled for the first {stalled_for:?}): \
         RSS baseline {baseline} kB, peak {peak} kB, after {after} kB",
        started.elapsed()
    );
    assert!(peak < BOUND_KB, "RSS peak {peak} kB");
    assert!(
        after < baseline + 8 * 1024,
        "RSS back near its baseline: {after} kB, baseline {baseline} kB"
    );
    // The worker was held, not presumed hung: it still answers.
    assert!(matches!(
        cluster.ask(&worker, Command::CountFds).await,
        Reply::Fds { .. }
    ));
    assert_eq!(cluster.primary.messages_dropped(), 0);
}
