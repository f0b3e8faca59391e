//! Message throughput between the primary and one worker (issue #4's number).
//!
//! ```sh
//! cargo run --release -p benches --bin messages
//! ```
//!
//! The primary sends `COUNT` small messages (a `u64` and 16 bytes) to one worker, which
//! acknowledges the last one; then the worker sends as many back; then `ROUND_TRIPS` requests
//! are answered one at a time; then 64 messages of 1 MiB go to the worker. Prints messages per
//! second for each.

use std::time::{Duration, Instant};

use cluster::{Role, Settings};
use serde::{Deserialize, Serialize};

const COUNT: u64 = 200_000;
const ROUND_TRIPS: u64 = 20_000;
const LARGE: u64 = 64;
const LARGE_SIZE: usize = 1 << 20;

#[derive(Serialize, Deserialize)]
enum ToWorker {
    Small(u64, [u8; 16]),
    Large(u64, Vec<u8>),
    /// Send `COUNT` messages back.
    Flood,
    Question(u64),
}

#[derive(Serialize, Deserialize)]
enum ToPrimary {
    Got(u64),
    Small(u64, [u8; 16]),
}

fn main() {
    cluster::run(Settings::new(), |role| async move {
        match role {
            Role::Primary(primary) => measure(primary).await,
            Role::Worker(worker) => answer(worker).await,
        }
    });
}

async fn measure(primary: cluster::Primary) {
    let mut messages = primary.messages();
    let worker = primary.fork().await.expect("fork");
    let mut next_message =
        async || match tokio::time::timeout(Duration::from_secs(60), messages.recv()).await {
            Ok(Some((_, message))) => message,
            Ok(None) | Err(_) => panic!("no message from the worker"),
        };

    let started = Instant::now();
    for i in 0..COUNT {
        worker.send(&ToWorker::Small(i, [7; 16])).expect("send");
    }
    let last = next_message().await.decode::<ToPrimary>().expect("decode");
    assert!(matches!(last, ToPrimary::Got(n) if n == COUNT - 1));
    report("primary → worker, small", COUNT, started.elapsed());

    worker.send(&ToWorker::Flood).expect("send");
    let started = Instant::now();
    for i in 0..COUNT {
        let message = next_message().await;
        assert!(matches!(message.decode(), Ok(ToPrimary::Small(n, _)) if n == i));
    }
    report("worker → primary, small", COUNT, started.elapsed());

    let started = Instant::now();
    for i in 0..ROUND_TRIPS {
        let answer: u64 = worker
            .request(&ToWorker::Question(i))
            .await
            .expect("request");
        assert_eq!(answer, i + 1);
    }
    report(
        "request → reply, one at a time",
        ROUND_TRIPS,
        started.elapsed(),
    );

    let started = Instant::now();
    for i in 0..LARGE {
        worker
            .send(&ToWorker::Large(i, vec![1; LARGE_SIZE]))
            .expect("send");
    }
    let last = next_message().await.decode::<ToPrimary>().expect("decode");
    assert!(matches!(last, ToPrimary::Got(n) if n == LARGE - 1));
    let elapsed = started.elapsed();
    report("primary → worker, 1 MiB", LARGE, elapsed);
    println!(
        "{:<34} {:>10.0} MiB/s",
        "  (throughput)",
        LARGE as f64 / elapsed.as_secs_f64()
    );
    worker.disconnect().await.expect("disconnect");
}

fn report(what: &str, count: u64, elapsed: Duration) {
    println!(
        "{what:<34} {:>10.0} msg/s  ({count} in {elapsed:.2?})",
        count as f64 / elapsed.as_secs_f64()
    );
}

async fn answer(worker: cluster::Worker) {
    while let Some(mut message) = worker.recv_message().await {
        match message.decode::<ToWorker>().expect("decode") {
            ToWorker::Small(i, _) if i == COUNT - 1 => {
                worker.send(&ToPrimary::Got(i)).expect("send")
            }
            ToWorker::Large(i, _) if i == LARGE - 1 => {
                worker.send(&ToPrimary::Got(i)).expect("send")
            }
            ToWorker::Small(..) | ToWorker::Large(..) => {}
            ToWorker::Flood => {
                for i in 0..COUNT {
                    worker.send(&ToPrimary::Small(i, [7; 16])).expect("send");
                }
            }
            ToWorker::Question(i) => message.reply(&(i + 1)).expect("reply"),
        }
    }
}
