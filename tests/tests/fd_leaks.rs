//! The primary's fd count returns to its baseline across connections, listens (TCP, Unix, UDP),
//! fds sent with messages, worker deaths and restarts (design invariant 4). One test per file:
//! fd counts are per process.

mod support;

use cluster::primary::{Event, Signal};
use cluster::settings::SchedulingPolicy;
use cluster_tests::{Command, Listen, Options, Reply, UdpTarget};
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
        let path =
            std::env::temp_dir().join(format!("cluster-fd-leaks-{}.sock", std::process::id()));
        let unix = Listen::Unix {
            path: path.to_str().unwrap().into(),
            options: Options::default(),
        };
        let reply = cluster.ask(&b, Command::ListenSpec(unix)).await;
        assert!(matches!(reply, Reply::Listening { .. }), "{reply:?}");
        let udp = Command::Udp {
            target: UdpTarget::Addr("127.0.0.1:0".into()),
            options: Options::default(),
        };
        assert!(matches!(cluster.ask(&b, udp).await, Reply::UdpBound { .. }));
        // One dies hard with a handoff in flight and, queued behind megabytes it will never
        // read, an fd sent with a message; the other leaves gracefully.
        a.kill(Signal::STOP).unwrap();
        for index in 0..4 {
            let payload = vec![0; 1_000_000];
            a.send(&Command::Numbered { index, payload }).unwrap();
        }
        let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        a.send_with_fd(&Command::CountFds, socket).unwrap();
        let client = tokio::spawn(who(port));
        let client2 = tokio::spawn(who(port));
        a.kill(Signal::KILL).unwrap();
        cluster
            .expect(&a, |e| matches!(e, Event::Exit { .. }))
            .await;
        for c in [client, client2] {
            assert_eq!(c.await.unwrap(), b.id().get(), "round {round}");
        }
        if round == 1 {
            // On its own: the primary lets go of its copy of the worker's end before the exit.
            b.send(&Command::Disconnect).unwrap();
        } else {
            b.disconnect().await.unwrap();
        }
        cluster
            .expect(&b, |e| matches!(e, Event::Exit { .. }))
            .await;
        let stats = cluster.primary.counters().await.unwrap();
        assert_eq!(
            (stats.connections_held, stats.listeners),
            (0, 0),
            "round {round}: {stats:?}"
        );
        assert_eq!(open_fds(), baseline, "round {round}: fds leaked");
        assert!(
            !path.exists(),
            "round {round}: the socket file outlived its worker"
        );
    }
}
