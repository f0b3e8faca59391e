//! The primary's fd count returns to its baseline across connections, listens, worker deaths
//! and restarts (design invariant 4). One test per file: fd counts are per process.

mod support;

use cluster::{Event, SchedulingPolicy};
use support::{Cluster, open_fds, who};

#[tokio::test]
async fn primary_fds_return_to_baseline() {
    let mut cluster = Cluster::start(SchedulingPolicy::RoundRobin);
    // Warm up the runtime's own fds (signal pipes, the blocking pool) before the baseline.
    let w = cluster.fork().await;
    w.disconnect().await.unwrap();
    cluster
        .expect(&w, |e| matches!(e, Event::Exit { .. }))
        .await;
    let baseline = open_fds();

    for round in 0..3 {
        let a = cluster.fork().await;
        let b = cluster.fork().await;
        let port = cluster.listen(&a, "127.0.0.1:0").await;
        assert_eq!(cluster.listen(&b, "127.0.0.1:0").await, port);
        for _ in 0..50 {
            who(port).await;
        }
        // One dies hard with a handoff in flight, the other leaves gracefully.
        a.kill(libc::SIGSTOP).unwrap();
        let client = tokio::spawn(who(port));
        let client2 = tokio::spawn(who(port));
        a.kill(libc::SIGKILL).unwrap();
        cluster
            .expect(&a, |e| matches!(e, Event::Exit { .. }))
            .await;
        for c in [client, client2] {
            assert_eq!(c.await.unwrap(), b.id().get(), "round {round}");
        }
        b.disconnect().await.unwrap();
        cluster
            .expect(&b, |e| matches!(e, Event::Exit { .. }))
            .await;
        let stats = cluster.primary.stats().await.unwrap();
        assert_eq!(
            (stats.connections_held, stats.listeners),
            (0, 0),
            "round {round}: {stats:?}"
        );
        assert_eq!(open_fds(), baseline, "round {round}: fds leaked");
    }
}
