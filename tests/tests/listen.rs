//! Listening through the primary (reference scenarios 2–4, 14, 16, 17, 19, and bad input).

mod support;

use cluster::settings::SchedulingPolicy;
use cluster_tests::{Command, Reply};
use support::{Cluster, POLICIES, who};

#[tokio::test]
async fn port_zero_is_one_real_port_shared_by_all_workers() {
    for policy in POLICIES {
        let mut cluster = Cluster::start(policy);
        let mut ports = Vec::new();
        let mut ids = Vec::new();
        for _ in 0..3 {
            let w = cluster.fork().await;
            ports.push(cluster.listen(&w, "127.0.0.1:0").await);
            ids.push(w.id().get());
        }
        assert!(
            ports[0] != 0 && ports.iter().all(|p| *p == ports[0]),
            "{policy:?}: {ports:?}"
        );
        if policy == SchedulingPolicy::RoundRobin {
            // Every worker gets its turn.
            let mut seen = Vec::new();
            for _ in 0..6 {
                seen.push(who(ports[0]).await);
            }
            for id in &ids {
                assert!(seen.contains(id), "worker {id} never served: {seen:?}");
            }
        } else {
            // The kernel picks; any worker of ours may answer.
            assert!(ids.contains(&who(ports[0]).await));
        }
    }
}

#[tokio::test]
async fn second_port_zero_of_one_worker_is_another_shared_port() {
    for policy in POLICIES {
        let mut cluster = Cluster::start(policy);
        let a = cluster.fork().await;
        let b = cluster.fork().await;
        let a0 = cluster.listen(&a, "127.0.0.1:0").await;
        let a1 = cluster.listen(&a, "127.0.0.1:0").await;
        assert_ne!(a0, a1, "{policy:?}");
        assert_eq!(cluster.listen(&b, "127.0.0.1:0").await, a0);
        assert_eq!(cluster.listen(&b, "127.0.0.1:0").await, a1);
    }
}

#[tokio::test]
async fn port_taken_outside_the_cluster_is_addr_in_use_and_retry_works() {
    for policy in POLICIES {
        let holder = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = holder.local_addr().unwrap().port();
        let mut cluster = Cluster::start(policy);
        let w = cluster.fork().await;
        let addr = format!("127.0.0.1:{port}");
        let failed = cluster
            .ask(&w, Command::Listen { addr: addr.clone() })
            .await;
        assert_eq!(
            failed,
            Reply::BindFailed {
                kind: "AddrInUse".into(),
                errno: Some(libc::EADDRINUSE)
            },
            "{policy:?}"
        );
        // The worker stays alive, the primary kept no stale key: once released, the retry binds.
        // Other tests in this process fork workers concurrently, and a child between fork and
        // exec briefly holds a copy of every fd, so the released port may stay busy for a moment.
        drop(holder);
        let deadline = tokio::time::Instant::now() + support::WAIT;
        loop {
            match cluster
                .ask(&w, Command::Listen { addr: addr.clone() })
                .await
            {
                Reply::Listening { port: bound, .. } => {
                    assert_eq!(bound, port);
                    break;
                }
                Reply::BindFailed {
                    errno: Some(libc::EADDRINUSE),
                    ..
                } if tokio::time::Instant::now() < deadline => {
                    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                }
                other => panic!("{policy:?}: retry failed: {other:?}"),
            }
        }
        assert_eq!(who(port).await, w.id().get());
    }
}

#[tokio::test]
async fn same_worker_binding_a_fixed_port_twice_gets_a_clean_addr_in_use() {
    let free = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = free.local_addr().unwrap().port();
    drop(free);
    let mut cluster = Cluster::start(SchedulingPolicy::RoundRobin);
    let w = cluster.fork().await;
    let addr = format!("127.0.0.1:{port}");
    cluster.listen(&w, &addr).await;
    let again = cluster
        .ask(&w, Command::Listen { addr: addr.clone() })
        .await;
    assert_eq!(
        again,
        Reply::BindFailed {
            kind: "AddrInUse".into(),
            errno: Some(libc::EADDRINUSE)
        }
    );
    // Close and re-bind, then another worker shares it (port reuse between workers).
    assert_eq!(
        cluster.ask(&w, Command::Close { index: 0 }).await,
        Reply::Closed { index: 0 }
    );
    let other = cluster.fork().await;
    assert_eq!(cluster.listen(&other, &addr).await, port);
    assert_eq!(cluster.listen(&w, &addr).await, port);
    assert!(w.is_connected(), "the failed bind did not hurt the worker");
}

#[tokio::test]
async fn closing_and_rebinding_port_zero_while_others_listen() {
    for policy in POLICIES {
        let mut cluster = Cluster::start(policy);
        let a = cluster.fork().await;
        let b = cluster.fork().await;
        let port = cluster.listen(&a, "127.0.0.1:0").await;
        assert_eq!(cluster.listen(&b, "127.0.0.1:0").await, port);
        assert_eq!(
            cluster.ask(&b, Command::Close { index: 0 }).await,
            Reply::Closed { index: 0 }
        );
        assert_eq!(
            cluster.listen(&b, "127.0.0.1:0").await,
            port,
            "{policy:?}: rejoins the shared port"
        );
        assert!([a.id().get(), b.id().get()].contains(&who(port).await));
    }
}

#[tokio::test]
async fn unresolvable_address_is_a_typed_error_in_the_worker() {
    let mut cluster = Cluster::start(SchedulingPolicy::RoundRobin);
    let w = cluster.fork().await;
    let reply = cluster
        .ask(
            &w,
            Command::Listen {
                addr: "not an address".into(),
            },
        )
        .await;
    assert!(
        matches!(reply, Reply::BindFailed { ref kind, .. } if kind == "InvalidInput"),
        "{reply:?}"
    );
    let port = cluster.listen(&w, "127.0.0.1:0").await;
    assert_eq!(who(port).await, w.id().get());
}

#[tokio::test]
async fn unspecified_ipv6_is_dual_stack_and_shared() {
    for policy in POLICIES {
        let mut cluster = Cluster::start(policy);
        let a = cluster.fork().await;
        let b = cluster.fork().await;
        let port = cluster.listen(&a, "[::]:0").await;
        assert_eq!(cluster.listen(&b, "[::]:0").await, port);
        // An IPv4 client reaches the `::` socket.
        assert!(
            [a.id().get(), b.id().get()].contains(&who(port).await),
            "{policy:?}"
        );
    }
}

#[tokio::test]
async fn poll_accept_yields_the_peer_address_as_tokio_does() {
    // Unclustered (this process is no worker): the listener binds itself.
    let mut listener = cluster::ClusterListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let client = tokio::net::TcpStream::connect(addr).await.unwrap();
    let accepted = tokio::time::timeout(
        support::WAIT,
        std::future::poll_fn(|cx| listener.poll_accept(cx)),
    )
    .await
    .expect("a connection in time");
    let (stream, peer) = accepted.unwrap();
    assert_eq!(peer, client.local_addr().unwrap());
    assert_eq!(stream.peer_addr().unwrap(), peer);
}
