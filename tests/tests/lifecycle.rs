//! Worker lifecycle and events in Node's order (reference scenarios 1, 29, 32–36, 39, 44).

mod support;

use cluster::primary::{Event, ExitStatus, Signal, WorkerState};
use cluster_tests::{Command, Reply};
use support::{Cluster, POLICIES, who};

fn names(events: &[Event]) -> Vec<&'static str> {
    events
        .iter()
        .map(|e| match e {
            Event::Fork(_) => "fork",
            Event::Online(_) => "online",
            Event::Listening { .. } => "listening",
            Event::Disconnect(_) => "disconnect",
            Event::Exit { .. } => "exit",
            _ => "other",
        })
        .collect()
}

/// A connection to `port` that a worker has served (its id line read) and that stays open: the
/// fixture worker does not exit before its client closes it.
async fn served_client(port: u16) -> tokio::net::TcpStream {
    use tokio::io::AsyncReadExt;
    let mut client = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    let mut line = [0; 2];
    client.read_exact(&mut line).await.unwrap();
    client
}

/// Whether process `pid` exists and has not exited (a zombie has).
fn running(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        stat.rsplit(") ")
            .next()
            .is_some_and(|s| !s.starts_with('Z'))
    })
}

#[tokio::test]
async fn lifecycle_basic_in_node_order() {
    for policy in POLICIES {
        let mut cluster = Cluster::start(policy);
        let worker = cluster.primary.fork().await.unwrap();
        assert_eq!(worker.id().get(), 1, "ids start at 1");
        assert!(matches!(cluster.event().await, Event::Fork(w) if w.id() == worker.id()));
        assert!(matches!(cluster.event().await, Event::Online(_)));
        assert_eq!(worker.state(), WorkerState::Online);
        let port = cluster.listen(&worker, "127.0.0.1:0").await;
        assert_ne!(port, 0);
        let listening = cluster
            .expect(&worker, |e| matches!(e, Event::Listening { .. }))
            .await;
        let Event::Listening { address, .. } = listening else {
            unreachable!()
        };
        assert_eq!(
            address,
            cluster::primary::ListenAddress::Ip(([127, 0, 0, 1], port).into()),
            "the real port, never 0"
        );
        assert_eq!(worker.state(), WorkerState::Listening);
        assert_eq!(who(port).await, 1);
        worker.kill(Signal::TERM).unwrap();
        let life = cluster.life_of(&worker).await;
        assert_eq!(names(&life), ["disconnect", "exit"], "{policy:?}");
        assert!(matches!(
            life[1],
            Event::Exit {
                status: ExitStatus::Signal(libc::SIGTERM),
                ..
            }
        ));
        assert_eq!(worker.state(), WorkerState::Dead);
        assert!(worker.is_dead() && !worker.is_connected());
        assert_eq!(
            worker.exited_after_disconnect(),
            Some(false),
            "a kill is just a signal (Node >= 15)"
        );
        assert!(cluster.primary.workers().is_empty());
    }
}

#[tokio::test]
async fn exit_code_is_reported_once_with_its_events() {
    let mut cluster = Cluster::start(cluster::settings::SchedulingPolicy::RoundRobin);
    let worker = cluster.fork().await;
    worker.send(&Command::Exit { code: 42 }).unwrap();
    let life = cluster.life_of(&worker).await;
    assert_eq!(names(&life), ["disconnect", "exit"]);
    assert!(matches!(
        life[1],
        Event::Exit {
            status: ExitStatus::Code(42),
            ..
        }
    ));
    assert_eq!(worker.exited_after_disconnect(), Some(false));
}

#[tokio::test]
async fn kill_from_primary_and_external_sigkill() {
    let mut cluster = Cluster::start(cluster::settings::SchedulingPolicy::RoundRobin);
    let killed = cluster.fork().await;
    let external = cluster.fork().await;
    killed.kill(Signal::KILL).unwrap();
    // Someone else kills the other one: the primary learns it the same way.
    cluster_tests::signal(external.pid(), libc::SIGKILL).unwrap();
    for worker in [&killed, &external] {
        let life = cluster.life_of(worker).await;
        assert_eq!(names(&life), ["disconnect", "exit"]);
        assert_eq!(
            worker.exit_status(),
            Some(ExitStatus::Signal(libc::SIGKILL))
        );
        assert_eq!(worker.exited_after_disconnect(), Some(false));
    }
    // Killing a dead worker does nothing (its pid may belong to someone else by now).
    killed.kill(Signal::KILL).unwrap();
}

#[tokio::test]
async fn primary_disconnect_is_graceful_and_on_purpose() {
    for policy in POLICIES {
        let mut cluster = Cluster::start(policy);
        let worker = cluster.fork().await;
        let port = cluster.listen(&worker, "127.0.0.1:0").await;
        assert_eq!(who(port).await, worker.id().get());
        worker.disconnect().await.unwrap();
        let life = cluster.life_of(&worker).await;
        assert_eq!(
            names(&life)
                .iter()
                .filter(|n| **n != "listening")
                .collect::<Vec<_>>(),
            [&"disconnect", &"exit"]
        );
        assert_eq!(worker.exit_status(), Some(ExitStatus::Code(0)));
        assert_eq!(worker.exited_after_disconnect(), Some(true));
        // The last worker left: the port is closed.
        assert!(
            tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_err(),
            "{policy:?}"
        );
    }
}

#[tokio::test]
async fn worker_initiated_disconnect_is_on_purpose() {
    let mut cluster = Cluster::start(cluster::settings::SchedulingPolicy::RoundRobin);
    let worker = cluster.fork().await;
    worker.send(&Command::Disconnect).unwrap();
    let life = cluster.life_of(&worker).await;
    assert_eq!(names(&life), ["disconnect", "exit"]);
    // The ack handshake makes it true before the events are emitted.
    assert_eq!(worker.exited_after_disconnect(), Some(true));
    assert_eq!(worker.exit_status(), Some(ExitStatus::Code(0)));
}

#[tokio::test]
async fn a_worker_that_leaves_is_disconnected_while_it_finishes_its_connections() {
    for policy in POLICIES {
        let mut cluster = Cluster::start(policy);
        let worker = cluster.fork().await;
        let port = cluster.listen(&worker, "127.0.0.1:0").await;
        // The worker stays until this client closes its connection.
        let client = served_client(port).await;
        worker.send(&Command::Disconnect).unwrap();
        // Node's order: `disconnect` when the worker closes its channel, `exit` when it ends.
        let disconnect = cluster
            .expect(&worker, |e| !matches!(e, Event::Listening { .. }))
            .await;
        assert!(
            matches!(disconnect, Event::Disconnect(_)),
            "{policy:?}: {disconnect:?}"
        );
        assert!(
            running(worker.pid()),
            "{policy:?}: its client is still open"
        );
        assert_eq!(worker.state(), WorkerState::Disconnected);
        assert_eq!(worker.exited_after_disconnect(), Some(true));
        drop(client);
        let life = cluster.life_of(&worker).await;
        assert_eq!(names(&life), ["exit"], "{policy:?}");
        assert_eq!(worker.exit_status(), Some(ExitStatus::Code(0)));
    }
}

#[tokio::test]
async fn the_primarys_disconnect_closes_the_link_while_the_worker_finishes_its_connections() {
    use tokio::io::AsyncReadExt;
    for policy in POLICIES {
        let mut cluster = Cluster::start(policy);
        let worker = cluster.fork().await;
        let port = cluster.listen(&worker, "127.0.0.1:0").await;
        let path = std::env::temp_dir().join(format!(
            "cluster-link-{}-{policy:?}.sock",
            std::process::id()
        ));
        let _ = std::fs::remove_file(&path);
        let report = tokio::net::UnixListener::bind(&path).unwrap();
        worker
            .send(&Command::WatchLink {
                report: path.display().to_string(),
            })
            .unwrap();
        // Served, and held open: the worker cannot exit before this client closes.
        let client = served_client(port).await;
        let disconnecting = {
            let worker = worker.clone();
            tokio::spawn(async move { worker.disconnect().await })
        };
        // Node's order: `disconnect` when the worker has closed its listeners and its channel,
        // while it is still serving; `exit` when it ends.
        let disconnect = cluster
            .expect(&worker, |e| !matches!(e, Event::Listening { .. }))
            .await;
        assert!(
            matches!(disconnect, Event::Disconnect(_)),
            "{policy:?}: {disconnect:?}"
        );
        assert!(running(worker.pid()), "{policy:?}: its client is open");
        assert!(!worker.is_dead(), "{policy:?}");
        assert_eq!(worker.state(), WorkerState::Disconnected);
        // Inside the worker, at that moment, the link is closed too.
        let (mut from_worker, _) = tokio::time::timeout(support::WAIT, report.accept())
            .await
            .expect("the worker saw its link close")
            .unwrap();
        let mut seen = String::new();
        tokio::time::timeout(support::WAIT, from_worker.read_to_string(&mut seen))
            .await
            .unwrap()
            .unwrap();
        let (state, left) = seen.trim_end().split_once(" ms_left=").unwrap();
        assert_eq!(state, "connected=false shutting_down=true", "{policy:?}");
        // The primary's deadline came with its request: the harness's 10 s disconnect timeout.
        let left: u64 = left
            .strip_prefix("Some(")
            .and_then(|ms| ms.strip_suffix(')'))
            .unwrap_or_else(|| panic!("no deadline: {seen}"))
            .parse()
            .unwrap();
        assert!(left <= 10_000, "{seen}");
        let _ = std::fs::remove_file(&path);
        drop(client);
        tokio::time::timeout(support::WAIT, disconnecting)
            .await
            .expect("the worker exited once its client closed")
            .unwrap()
            .unwrap();
        let life = cluster.life_of(&worker).await;
        assert_eq!(names(&life), ["exit"], "{policy:?}");
        assert_eq!(worker.exit_status(), Some(ExitStatus::Code(0)));
        assert_eq!(worker.exited_after_disconnect(), Some(true));
    }
}

#[tokio::test]
async fn a_message_sent_just_before_main_returns_is_delivered() {
    const SIZE: usize = 800 * 1024;
    for policy in POLICIES {
        let mut cluster = Cluster::start(policy);
        let worker = cluster.fork().await;
        cluster.listen(&worker, "127.0.0.1:0").await;
        worker.send(&Command::SendAndReturn { size: SIZE }).unwrap();
        let mut message = cluster.message_from(&worker).await;
        let socket = message.take_fd().expect("the socket came with it");
        let reply: Reply = message.decode().unwrap();
        let Reply::Numbered { payload, .. } = reply else {
            panic!("{policy:?}: {reply:?}");
        };
        assert_eq!(payload.len(), SIZE, "{policy:?}");
        assert!(payload.iter().all(|b| usize::from(*b) == SIZE % 251));
        drop(socket);
        let life = cluster.life_of(&worker).await;
        assert_eq!(names(&life), ["disconnect", "exit"], "{policy:?}");
        assert_eq!(worker.exit_status(), Some(ExitStatus::Code(0)));
    }
}

#[tokio::test]
async fn cluster_disconnect_all_then_again() {
    let mut cluster = Cluster::start(cluster::settings::SchedulingPolicy::RoundRobin);
    // With no workers it completes at once.
    cluster.primary.disconnect().await.unwrap();
    for round in 0..2 {
        let a = cluster.fork().await;
        let b = cluster.fork().await;
        let port = cluster.listen(&a, "127.0.0.1:0").await;
        assert_eq!(cluster.listen(&b, "127.0.0.1:0").await, port);
        cluster.primary.disconnect().await.unwrap();
        assert!(cluster.primary.workers().is_empty(), "round {round}");
        for w in [&a, &b] {
            assert_eq!(w.exit_status(), Some(ExitStatus::Code(0)));
            assert_eq!(w.exited_after_disconnect(), Some(true));
        }
    }
    // Ids are never reused.
    let next = cluster.fork().await;
    assert_eq!(next.id().get(), 5);
}

#[tokio::test]
async fn disconnect_waits_for_open_connections() {
    for policy in POLICIES {
        disconnect_waits_for_open_connections_under(policy).await;
    }
}

async fn disconnect_waits_for_open_connections_under(policy: cluster::settings::SchedulingPolicy) {
    let mut cluster = Cluster::start(policy);
    let worker = cluster.fork().await;
    let port = cluster.listen(&worker, "127.0.0.1:0").await;
    // A client that keeps its connection open.
    let client = served_client(port).await;
    let disconnecting = {
        let worker = worker.clone();
        tokio::spawn(async move { worker.disconnect().await })
    };
    // The worker stops listening but stays until its client is done.
    cluster
        .expect(&worker, |e| matches!(e, Event::Listening { .. }))
        .await;
    let deadline = tokio::time::Instant::now() + support::WAIT;
    while tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .is_ok()
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the port stayed open"
        );
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    assert!(
        !worker.is_dead(),
        "the worker left while a client was connected"
    );
    drop(client);
    disconnecting.await.unwrap().unwrap();
    assert_eq!(worker.exit_status(), Some(ExitStatus::Code(0)));
    assert_eq!(worker.exited_after_disconnect(), Some(true));
}

#[tokio::test]
async fn concurrent_disconnects_and_kills_leave_a_working_primary() {
    let mut cluster = Cluster::start(cluster::settings::SchedulingPolicy::RoundRobin);
    let mut workers = Vec::new();
    for _ in 0..4 {
        let w = cluster.fork().await;
        cluster.listen(&w, "127.0.0.1:0").await;
        workers.push(w);
    }
    let mut storm = tokio::task::JoinSet::new();
    for (i, w) in workers.iter().cloned().enumerate() {
        storm.spawn(async move {
            match i % 3 {
                0 => w.disconnect().await.unwrap(),
                1 => w.kill(Signal::KILL).unwrap(),
                _ => w.send(&Command::Disconnect).unwrap(),
            }
        });
    }
    storm.spawn({
        let primary = cluster.primary.clone();
        async move { primary.disconnect().await.unwrap() }
    });
    while let Some(done) = storm.join_next().await {
        done.unwrap();
    }
    for w in &workers {
        tokio::time::timeout(support::WAIT, w.exited())
            .await
            .expect("a worker did not exit");
    }
    // The primary carries on.
    let next = cluster.fork().await;
    let port = cluster.listen(&next, "127.0.0.1:0").await;
    assert_eq!(who(port).await, next.id().get());
}

#[tokio::test]
async fn environment_cwd_and_hidden_role_markers() {
    let dir = std::env::temp_dir();
    let mut cluster = Cluster::with(cluster::settings::SchedulingPolicy::RoundRobin, |s| {
        s.env("FROM_SETTINGS", "all").cwd(&dir)
    });
    let worker = cluster
        .primary
        .fork_with_env([("FROM_FORK", "one"), ("FROM_SETTINGS", "overridden")])
        .await
        .unwrap();
    let ask = |name: &str| Command::Env { name: name.into() };
    let env = |reply| match reply {
        Reply::Env { value, cwd } => (value, cwd),
        other => panic!("{other:?}"),
    };
    let (value, cwd) = env(cluster.ask(&worker, ask("FROM_FORK")).await);
    assert_eq!(value.as_deref(), Some("one"));
    assert_eq!(
        std::path::Path::new(&cwd).canonicalize().unwrap(),
        dir.canonicalize().unwrap()
    );
    assert_eq!(
        env(cluster.ask(&worker, ask("FROM_SETTINGS")).await)
            .0
            .as_deref(),
        Some("overridden")
    );
    // The role markers are gone before user code runs (grandchildren do not inherit them).
    assert_eq!(
        env(cluster.ask(&worker, ask("CLUSTER_WORKER_ID")).await).0,
        None
    );
    assert_eq!(
        env(cluster.ask(&worker, ask("CLUSTER_IPC_FD")).await).0,
        None
    );
    // The primary's own environment is passed on.
    assert_eq!(
        env(cluster.ask(&worker, ask("PATH")).await).0,
        std::env::var("PATH").ok()
    );
}

#[tokio::test]
async fn a_worker_whose_runtime_blocks_is_killed_for_missing_heartbeats() {
    let mut cluster = Cluster::with(cluster::settings::SchedulingPolicy::RoundRobin, |s| {
        s.heartbeat_timeout(std::time::Duration::from_secs(3))
    });
    let blocked = cluster.fork().await;
    let healthy = cluster.fork().await;
    blocked.send(&Command::Block { ms: 60_000 }).unwrap();
    let exit = cluster
        .expect(&blocked, |e| matches!(e, Event::Exit { .. }))
        .await;
    let Event::Exit { status, killed, .. } = exit else {
        unreachable!()
    };
    assert_eq!(status, ExitStatus::Signal(libc::SIGKILL));
    assert_eq!(killed, Some(cluster::primary::KillReason::HeartbeatTimeout));
    assert_eq!(
        blocked.killed(),
        Some(cluster::primary::KillReason::HeartbeatTimeout)
    );
    // Its sibling keeps beating and serving.
    let port = cluster.listen(&healthy, "127.0.0.1:0").await;
    assert_eq!(who(port).await, healthy.id().get());
    assert!(!healthy.is_dead());
}

#[tokio::test]
async fn a_supervisor_handle_scales_and_is_refused_once_its_supervisor_is_gone() {
    use cluster::supervisor::{Supervisor, SupervisorError};
    let mut cluster = Cluster::with(cluster::settings::SchedulingPolicy::RoundRobin, |s| {
        s.workers(1)
    });
    let supervisor = Supervisor::new(cluster.primary.clone());
    let handle = supervisor.handle();
    let running = tokio::spawn(supervisor.run());
    let mut forked = Vec::new();
    let next_fork = async |cluster: &mut Cluster| loop {
        if let Event::Fork(worker) = cluster.event().await {
            cluster.adopt(&worker);
            return worker;
        }
    };
    forked.push(next_fork(&mut cluster).await);
    handle.scale(2).await.expect("the supervisor runs");
    forked.push(next_fork(&mut cluster).await);
    assert_ne!(forked[0].id(), forked[1].id());
    assert!(matches!(
        handle.scale(cluster::settings::MAX_WORKERS + 1).await,
        Err(SupervisorError::TooManyWorkers(_))
    ));
    running.abort();
    assert!(running.await.unwrap_err().is_cancelled());
    assert!(matches!(
        handle.scale(3).await,
        Err(SupervisorError::Stopped)
    ));
    assert!(matches!(
        handle.reload().await,
        Err(cluster::supervisor::ReloadError::Stopped)
    ));
}
