//! Round-robin distribution (reference scenarios 6 and 12).

mod support;

use cluster::{Event, SchedulingPolicy};
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
    let mut cluster = Cluster::with(SchedulingPolicy::RoundRobin, |s| s.window = 1);
    let hung = cluster.fork().await;
    let port = cluster.listen(&hung, "127.0.0.1:0").await;
    // It stops reading its link: the next connection is handed to it and never acked.
    hung.kill(libc::SIGSTOP).unwrap();
    let client = tokio::spawn(who(port));
    // Wait until the handoff is in flight to it (it is the only worker, so it gets it).
    let deadline = tokio::time::Instant::now() + support::WAIT;
    loop {
        let stats = cluster.primary.stats().await.unwrap();
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
    hung.kill(libc::SIGKILL).unwrap();
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
        s.window = 1;
        s.handoff_timeout = std::time::Duration::from_millis(300);
    });
    let stopped = cluster.fork().await;
    let healthy = cluster.fork().await;
    let port = cluster.listen(&stopped, "127.0.0.1:0").await;
    assert_eq!(cluster.listen(&healthy, "127.0.0.1:0").await, port);
    stopped.kill(libc::SIGSTOP).unwrap();
    // Round robin sends one of these to the stopped worker; nobody kills it but the primary.
    let clients: Vec<_> = (0..4).map(|_| tokio::spawn(who(port))).collect();
    let error = cluster
        .expect(&stopped, |e| matches!(e, Event::Error { .. }))
        .await;
    assert!(matches!(
        error,
        Event::Error {
            error: cluster::proto::ProtocolError::HandoffTimeout { .. },
            ..
        }
    ));
    cluster
        .expect(&stopped, |e| matches!(e, Event::Exit { .. }))
        .await;
    assert_eq!(
        stopped.exit_status(),
        Some(cluster::ExitStatus::Signal(libc::SIGKILL))
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
        while cluster.primary.stats().await.unwrap().connections_held > 0
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
