//! A worker that breaks the protocol is disconnected with a typed error; the primary carries on
//! (design invariant 3).

mod support;

use cluster::primary::{Event, ExitStatus, KillReason, ProtocolError, ProtocolErrorKind};
use cluster::settings::SchedulingPolicy;
use support::{Cluster, who};

type Expected = fn(&ProtocolError) -> bool;

#[tokio::test]
async fn a_rogue_worker_is_disconnected_and_the_primary_carries_on() {
    let mut cluster = Cluster::start(SchedulingPolicy::RoundRobin);
    let good = cluster.fork().await;
    let port = cluster.listen(&good, "127.0.0.1:0").await;
    let mut rogue_cluster = Cluster::with(SchedulingPolicy::RoundRobin, |s| {
        s.exec(env!("CARGO_BIN_EXE_rogue"))
    });
    let expectations: [(&str, Expected); 9] = [
        ("garbage", |e| e.kind() == ProtocolErrorKind::Decode),
        ("oversized", |e| e.kind() == ProtocolErrorKind::Truncated),
        ("version", |e| {
            e.kind() == ProtocolErrorKind::VersionMismatch
                && matches!(e.version_mismatch(), Some((_, 99)))
        }),
        ("fd", |e| {
            e.kind() == ProtocolErrorKind::UnexpectedFds
                && e.to_string() == "expected 0 file descriptors with the message, got 1"
        }),
        ("notconn", |e| e.kind() == ProtocolErrorKind::NotAConnection),
        // A hand-back of a connection it was never given (and without being asked to), of a
        // listening socket, and with more unread bytes than the bound.
        ("handback-ungiven", |e| {
            e.kind() == ProtocolErrorKind::HandBack && e.to_string().contains("not asked")
        }),
        ("handback-listener", |e| {
            e.kind() == ProtocolErrorKind::NotAConnection
        }),
        ("handback-long", |e| {
            e.kind() == ProtocolErrorKind::HandBack && e.to_string().contains("over the bound")
        }),
        ("ended", |e| e.kind() == ProtocolErrorKind::EndedMiscounted),
    ];
    for (offence, expected) in expectations {
        let rogue = rogue_cluster
            .primary
            .fork_with_env([("ROGUE", offence)])
            .await
            .unwrap();
        let error = rogue_cluster
            .expect(&rogue, |e| matches!(e, Event::Error { .. }))
            .await;
        let Event::Error { error, .. } = error else {
            unreachable!()
        };
        assert!(expected(&error), "{offence}: {error:?}");
        // Disconnected by the primary; the rogue sees end of stream and exits.
        rogue_cluster
            .expect(&rogue, |e| matches!(e, Event::Disconnect(_)))
            .await;
        rogue_cluster
            .expect(&rogue, |e| matches!(e, Event::Exit { .. }))
            .await;
    }
    // A rogue that would stay after breaking the protocol is killed for it, at once.
    let stubborn = rogue_cluster
        .primary
        .fork_with_env([("ROGUE", "garbage-and-stay")])
        .await
        .unwrap();
    let exit = rogue_cluster
        .expect(&stubborn, |e| matches!(e, Event::Exit { .. }))
        .await;
    assert!(
        matches!(
            exit,
            Event::Exit {
                status: ExitStatus::Signal(libc::SIGKILL),
                killed: Some(KillReason::ProtocolViolation),
                ..
            }
        ),
        "{exit:?}"
    );
    // The primary that met the rogues is still responsive, and holds nothing of theirs.
    let after = rogue_cluster.primary.counters().await.unwrap();
    assert!(after.workers.is_empty(), "{after:?}");
    // And a primary in the same process was never disturbed.
    assert_eq!(who(port).await, good.id().get());
}

/// A worker whose end of the link stops reading (a send of the primary fails with `EPIPE`) is
/// still heard: what it sends keeps arriving until its end closes. Dropping the link at the
/// failed send would lose, say, the error a worker reports just before it exits.
#[tokio::test]
async fn a_worker_that_stops_reading_is_still_heard() {
    let mut cluster = Cluster::with(SchedulingPolicy::RoundRobin, |s| {
        s.exec(env!("CARGO_BIN_EXE_rogue"))
    });
    let rogue = cluster
        .primary
        .fork_with_env([("ROGUE", "hangup")])
        .await
        .unwrap();
    cluster.adopt(&rogue);
    let first = next_tick(&mut cluster).await;
    // Fails with EPIPE in the primary: the rogue has shut down its reading side.
    rogue.send(&"are you there").unwrap();
    let mut last = first;
    for _ in 0..10 {
        let tick = next_tick(&mut cluster).await;
        assert!(tick > last, "ticks arrive in order: {tick} after {last}");
        last = tick;
    }
}

/// The next tick of the `hangup` rogue; any other event of it (a disconnect) fails the test.
async fn next_tick(cluster: &mut Cluster) -> u8 {
    loop {
        match cluster.message_or_event().await {
            Ok((_, message)) => return message.decode::<u8>().unwrap(),
            Err(Event::Fork(_) | Event::Online(_)) => {}
            Err(other) => panic!("expected a message, got {other:?}"),
        }
    }
}

#[tokio::test]
async fn connections_offered_to_a_worker_that_stopped_reading_are_served_by_another() {
    let mut cluster = Cluster::with(SchedulingPolicy::RoundRobin, |s| {
        s.exec(env!("CARGO_BIN_EXE_rogue"))
    });
    let healthy = cluster
        .primary
        .fork_with_env([
            ("ROGUE", "exec"),
            ("ROGUE_EXEC", env!("CARGO_BIN_EXE_fixture")),
        ])
        .await
        .unwrap();
    cluster.adopt(&healthy);
    cluster
        .expect(&healthy, |e| matches!(e, Event::Online(_)))
        .await;
    let port = cluster.listen(&healthy, "127.0.0.1:0").await;
    let rogue = cluster
        .primary
        .fork_with_env([("ROGUE", "listen-then-hangup")])
        .await
        .unwrap();
    cluster.adopt(&rogue);
    cluster
        .expect(&rogue, |e| matches!(e, Event::Listening { .. }))
        .await;
    // Round robin: some are handed to the rogue, whose link refuses every send. They are taken
    // back and served by the healthy worker at once, not when the rogue is killed for it (its
    // handoff timeout is 10 s, its heartbeat timeout 30 s).
    let clients: Vec<_> = (0..6).map(|_| tokio::spawn(who(port))).collect();
    for client in clients {
        assert_eq!(client.await.unwrap(), healthy.id().get());
    }
    assert!(!rogue.is_dead(), "served only once the rogue was gone");
    // It is offered nothing more, and what it sends is still read.
    let stats = cluster.primary.counters().await.unwrap();
    let books = stats.workers.iter().find(|w| w.id == rogue.id()).unwrap();
    assert!(books.handoffs >= 1, "{stats:?}");
    assert_eq!(books.in_flight, 0, "{stats:?}");
    assert_eq!(books.handoffs, books.refused, "{stats:?}");
    assert_eq!(who(port).await, healthy.id().get());
}
