//! Round-robin distribution (reference scenarios 6 and 12).

mod support;

use cluster::primary::{Event, Signal};
use cluster::settings::SchedulingPolicy;
use cluster_tests::{Command, Reply};
use support::{Cluster, who};

#[tokio::test]
async fn sequential_connections_rotate_strictly() {
    let mut cluster = Cluster::start(SchedulingPolicy::RoundRobin);
    let mut workers = Vec::new();
    let mut port = 0;
    for _ in 0..4 {
        let w = cluster.fork().await;
        port = cluster.listen(&w, "127.0.0.1:0").await;
        workers.push(w);
    }
    let mut counts = std::collections::BTreeMap::new();
    for _ in 0..200 {
        *counts.entry(who(port).await).or_insert(0) += 1;
    }
    assert_eq!(
        counts.values().copied().collect::<Vec<_>>(),
        [50, 50, 50, 50],
        "{counts:?}"
    );
}

#[tokio::test]
async fn connection_in_flight_to_a_killed_worker_is_served_by_another() {
    let mut cluster = Cluster::with(SchedulingPolicy::RoundRobin, |s| s.window(1));
    let hung = cluster.fork().await;
    let port = cluster.listen(&hung, "127.0.0.1:0").await;
    // It stops reading its link: the next connection is handed to it and never acked.
    hung.kill(Signal::STOP).unwrap();
    let client = tokio::spawn(who(port));
    // Wait until the handoff is in flight to it (it is the only worker, so it gets it).
    let deadline = tokio::time::Instant::now() + support::WAIT;
    loop {
        let stats = cluster.primary.counters().await.unwrap();
        if stats
            .workers
            .iter()
            .any(|w| w.id == hung.id() && w.in_flight == 1)
        {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the handoff never went out: {stats:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    let healthy = cluster.fork().await;
    assert_eq!(cluster.listen(&healthy, "127.0.0.1:0").await, port);
    hung.kill(Signal::KILL).unwrap();
    cluster
        .expect(&hung, |e| matches!(e, Event::Exit { .. }))
        .await;
    // Node leaks this connection (the client hangs); here it is re-dispatched.
    let served_by = tokio::time::timeout(support::WAIT, client)
        .await
        .expect("client hung")
        .unwrap();
    assert_eq!(served_by, healthy.id().get());
}

#[tokio::test]
async fn worker_that_never_acks_is_killed_at_the_deadline_and_its_connection_served() {
    let mut cluster = Cluster::with(SchedulingPolicy::RoundRobin, |s| {
        s.window(1)
            .handoff_timeout(std::time::Duration::from_millis(300))
    });
    let stopped = cluster.fork().await;
    let healthy = cluster.fork().await;
    let port = cluster.listen(&stopped, "127.0.0.1:0").await;
    assert_eq!(cluster.listen(&healthy, "127.0.0.1:0").await, port);
    stopped.kill(Signal::STOP).unwrap();
    // Round robin sends one of these to the stopped worker; nobody kills it but the primary.
    let clients: Vec<_> = (0..4).map(|_| tokio::spawn(who(port))).collect();
    let error = cluster
        .expect(&stopped, |e| matches!(e, Event::Error { .. }))
        .await;
    assert!(matches!(
        error,
        Event::Error { ref error, .. }
            if error.kind() == cluster::primary::ProtocolErrorKind::HandoffTimeout
    ));
    cluster
        .expect(&stopped, |e| matches!(e, Event::Exit { .. }))
        .await;
    assert_eq!(
        stopped.exit_status(),
        Some(cluster::primary::ExitStatus::Signal(libc::SIGKILL))
    );
    for client in clients {
        let served_by = tokio::time::timeout(support::WAIT, client)
            .await
            .expect("client hung")
            .unwrap();
        assert_eq!(served_by, healthy.id().get());
    }
}

#[tokio::test]
async fn connections_queued_in_a_closing_listener_go_to_another_worker() {
    for disconnect in [false, true] {
        let mut cluster = Cluster::start(SchedulingPolicy::RoundRobin);
        let slow = cluster.fork().await;
        let port = cluster.listen(&slow, "127.0.0.1:0").await;
        // It stops accepting: handed-over connections wait in its listener, acked but unserved.
        assert_eq!(
            cluster.ask(&slow, Command::Pause { index: 0 }).await,
            Reply::Paused { index: 0 }
        );
        let clients: Vec<_> = (0..3).map(|_| tokio::spawn(who(port))).collect();
        let deadline = tokio::time::Instant::now() + support::WAIT;
        while cluster.primary.counters().await.unwrap().connections_held > 0
            || !all_connected(&clients)
        {
            assert!(
                tokio::time::Instant::now() < deadline,
                "connections never reached the worker"
            );
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        let other = cluster.fork().await;
        assert_eq!(cluster.listen(&other, "127.0.0.1:0").await, port);
        // The slow worker leaves (its listener closes, or it is disconnected): nothing is lost.
        if disconnect {
            slow.disconnect().await.unwrap();
            // It left gracefully, within the deadline, not killed by it.
            assert_eq!(
                slow.exit_status(),
                Some(cluster::primary::ExitStatus::Code(0))
            );
        } else {
            assert_eq!(
                cluster.ask(&slow, Command::Close { index: 0 }).await,
                Reply::Closed { index: 0 }
            );
        }
        for client in clients {
            let served_by = tokio::time::timeout(support::WAIT, client)
                .await
                .expect("client hung")
                .unwrap();
            assert_eq!(served_by, other.id().get(), "disconnect: {disconnect}");
        }
    }
}

fn all_connected(clients: &[tokio::task::JoinHandle<u64>]) -> bool {
    // The clients are still waiting for an answer: they are connected (or connecting).
    clients.iter().all(|c| !c.is_finished())
}

/// Polls the primary's stats until `done` holds (bounded by `support::WAIT`).
async fn until(
    cluster: &Cluster,
    what: &str,
    done: impl Fn(&cluster::primary::Counters) -> bool,
) -> cluster::primary::Counters {
    let deadline = tokio::time::Instant::now() + support::WAIT;
    loop {
        let stats = cluster.primary.counters().await.unwrap();
        if done(&stats) {
            return stats;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting until {what}: {stats:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
}

fn worker_stats(
    stats: &cluster::primary::Counters,
    worker: &cluster::primary::WorkerHandle,
) -> cluster::primary::WorkerCounters {
    stats
        .workers
        .iter()
        .find(|w| w.id == worker.id())
        .cloned()
        .expect("worker in stats")
}

#[tokio::test]
async fn a_stuck_worker_holds_at_most_its_window_and_a_new_worker_drains_the_queue() {
    // Node's rule (window 1): the blocked worker holds one connection, the rest wait for the
    // next worker and flow to it as soon as it joins.
    let mut cluster = Cluster::with(SchedulingPolicy::RoundRobin, |s| s.window(1));
    let stuck = cluster.fork().await;
    let port = cluster.listen(&stuck, "127.0.0.1:0").await;
    stuck.kill(Signal::STOP).unwrap();
    let clients: Vec<_> = (0..4).map(|_| tokio::spawn(who(port))).collect();
    // One is in the stuck worker's receive queue (the primary keeps no copy of what it sent),
    // three wait in the primary.
    until(&cluster, "1 connection is in flight and 3 are held", |s| {
        worker_stats(s, &stuck).in_flight == 1 && s.connections_held == 3
    })
    .await;
    let fresh = cluster.fork().await;
    assert_eq!(cluster.listen(&fresh, "127.0.0.1:0").await, port);
    // The three queued connections flow to the new worker at once.
    until(&cluster, "the new worker took the queue", |s| {
        let w = worker_stats(s, &fresh);
        w.handoffs == 3 && w.in_flight == 0
    })
    .await;
    stuck.kill(Signal::CONT).unwrap();
    let mut served = std::collections::BTreeMap::new();
    for client in clients {
        let id = tokio::time::timeout(support::WAIT, client)
            .await
            .expect("client hung")
            .unwrap();
        *served.entry(id).or_insert(0) += 1;
    }
    assert_eq!(served.get(&stuck.id().get()), Some(&1), "{served:?}");
    assert_eq!(served.get(&fresh.id().get()), Some(&3), "{served:?}");
}

#[tokio::test]
async fn full_workers_are_not_ping_ponged_and_lose_nothing() {
    // Both workers stop accepting: each fills its listener queue, refuses what was in flight, and
    // is offered nothing more; the rest wait in the primary (bounded) until a worker has room.
    const WINDOW: usize = 8;
    let mut cluster = Cluster::with(SchedulingPolicy::RoundRobin, |s| {
        s.max_queued(64).window(WINDOW)
    });
    let a = cluster.fork().await;
    let b = cluster.fork().await;
    let port = cluster.listen(&a, "127.0.0.1:0").await;
    assert_eq!(cluster.listen(&b, "127.0.0.1:0").await, port);
    for w in [&a, &b] {
        assert_eq!(
            cluster.ask(w, Command::Pause { index: 0 }).await,
            Reply::Paused { index: 0 }
        );
    }
    let total = 2 * 128 + 40;
    let clients: Vec<_> = (0..total).map(|_| tokio::spawn(who(port))).collect();
    // Settled: every handoff answered (refusals of the last ones in flight may still be on
    // their way when the first ones are counted).
    let stats = until(&cluster, "both workers refused and the rest is held", |s| {
        s.workers.iter().all(|w| w.refused >= 1 && w.in_flight == 0) && s.connections_held >= 40
    })
    .await;
    // Handoffs already in flight when the queue filled are refused too: at most one window's
    // worth per worker, then nothing more. Node bounces such a connection thousands of times
    // a second.
    let window = u64::try_from(WINDOW).unwrap();
    for w in &stats.workers {
        assert!((1..=window).contains(&w.refused), "no ping-pong: {stats:?}");
        assert_eq!(
            w.handoffs - w.refused,
            128,
            "each took exactly its queue's worth: {stats:?}"
        );
    }
    // Room again: everything is served, nothing lost.
    for w in [&a, &b] {
        w.send(&Command::Resume { index: 0 }).unwrap();
    }
    let mut served = std::collections::BTreeMap::new();
    for client in clients {
        let id = tokio::time::timeout(support::WAIT, client)
            .await
            .expect("client hung")
            .unwrap();
        *served.entry(id).or_insert(0) += 1;
    }
    // Each serves at least the 128 its listener held; the 40 the primary held went to them too.
    assert_eq!(
        served.keys().copied().collect::<Vec<_>>(),
        [a.id().get(), b.id().get()],
        "{served:?}"
    );
    assert!(served.values().all(|n| *n >= 128), "{served:?}");
}

#[tokio::test]
async fn closing_with_a_connection_in_flight_serves_it_elsewhere() {
    let mut cluster = Cluster::with(SchedulingPolicy::RoundRobin, |s| s.window(1));
    let closing = cluster.fork().await;
    let port = cluster.listen(&closing, "127.0.0.1:0").await;
    closing.kill(Signal::STOP).unwrap();
    let client = tokio::spawn(who(port));
    until(&cluster, "the handoff is in flight", |s| {
        s.workers.iter().any(|w| w.in_flight == 1)
    })
    .await;
    let other = cluster.fork().await;
    assert_eq!(cluster.listen(&other, "127.0.0.1:0").await, port);
    // The close and the handoff cross. The closing worker may still accept the connection before
    // it closes; if not, the connection is refused or given back and served by the other worker.
    // Either way it is served, never dropped (Node's worker-handle-close).
    closing.send(&Command::Close { index: 0 }).unwrap();
    closing.kill(Signal::CONT).unwrap();
    let served_by = tokio::time::timeout(support::WAIT, client)
        .await
        .expect("client hung")
        .unwrap();
    // The closing worker's books agree with who served: it gave the connection back (refused
    // or returned) exactly when the other worker served it.
    let given_back = u64::from(served_by == other.id().get());
    let stats = until(&cluster, "the handoff is settled", |s| {
        s.workers.iter().all(|w| w.in_flight == 0)
    })
    .await;
    let books = stats
        .workers
        .iter()
        .find(|w| w.id == closing.id())
        .expect("the closing worker is alive");
    assert_eq!(books.handoffs, 1, "{stats:?}");
    assert_eq!(books.refused + books.returned, given_back, "{stats:?}");
}

/// Bursts of simultaneous connections: the primary accepts while connections keep arriving, and
/// stops when `poll(2)` says the queue is empty; a connection that lands between that answer and
/// the end of the burst must still be accepted (a lost wakeup would leave it unanswered).
#[tokio::test]
async fn bursts_of_simultaneous_connections_are_all_served() {
    const BURSTS: usize = 20;
    const CLIENTS: usize = 50;
    let mut cluster = Cluster::start(SchedulingPolicy::RoundRobin);
    let a = cluster.fork().await;
    let port = cluster.listen(&a, "127.0.0.1:0").await;
    let b = cluster.fork().await;
    assert_eq!(cluster.listen(&b, "127.0.0.1:0").await, port);
    let answered = tokio::task::spawn_blocking(move || {
        let mut answered = std::collections::BTreeMap::new();
        for _ in 0..BURSTS {
            let start = std::sync::Arc::new(std::sync::Barrier::new(CLIENTS));
            let clients: Vec<_> = (0..CLIENTS)
                .map(|_| {
                    let start = start.clone();
                    std::thread::spawn(move || {
                        start.wait();
                        let mut stream = std::net::TcpStream::connect(("127.0.0.1", port))?;
                        stream.set_read_timeout(Some(support::WAIT))?;
                        let mut text = String::new();
                        std::io::Read::read_to_string(&mut stream, &mut text)?;
                        Ok::<_, std::io::Error>(text.trim().parse::<u64>().ok())
                    })
                })
                .collect();
            for client in clients {
                let id = client.join().unwrap().expect("served in time");
                *answered.entry(id).or_insert(0) += 1;
            }
        }
        answered
    })
    .await
    .unwrap();
    let ids = [Some(a.id().get()), Some(b.id().get())];
    assert_eq!(
        answered.keys().copied().collect::<Vec<_>>(),
        ids,
        "{answered:?}"
    );
    // Round robin over two workers: neither is starved.
    assert!(
        answered.values().all(|n| *n >= BURSTS * CLIENTS / 4),
        "{answered:?}"
    );
}
