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
async fn a_worker_that_leaves_on_its_own_disconnects_once_its_connections_are_done() {
    for policy in POLICIES {
        let mut cluster = Cluster::start(policy);
        let worker = cluster.fork().await;
        let port = cluster.listen(&worker, "127.0.0.1:0").await;
        // The worker stays until this client closes its connection.
        let client = served_client(port).await;
        worker.send(&Command::Disconnect).unwrap();
        // Node's order: `disconnect` once its servers' connections are done, then `exit`.
        assert_no_disconnect_for(&mut cluster, &worker, HOLD).await;
        assert!(
            worker.is_connected(),
            "{policy:?}: its client is still open"
        );
        drop(client);
        let life = cluster.life_of(&worker).await;
        assert_eq!(names(&life), ["disconnect", "exit"], "{policy:?}");
        assert_eq!(worker.exit_status(), Some(ExitStatus::Code(0)));
        assert_eq!(worker.exited_after_disconnect(), Some(true));
    }
}

/// How long the tests hold a client open while its worker is asked to leave.
const HOLD: std::time::Duration = std::time::Duration::from_secs(1);

/// Asserts that `worker` neither disconnects nor exits within `window` (other events are
/// dropped).
async fn assert_no_disconnect_for(
    cluster: &mut Cluster,
    worker: &cluster::primary::WorkerHandle,
    window: std::time::Duration,
) {
    let until = tokio::time::Instant::now() + window;
    while let Ok(event) = tokio::time::timeout_at(until, cluster.event()).await {
        assert!(
            support::worker_of(&event) != Some(worker.id())
                || !matches!(event, Event::Disconnect(_) | Event::Exit { .. }),
            "{event:?} while its client was open"
        );
    }
}

/// A Unix socket the fixture reports its view of the link to (`Command::WatchLink`), and the
/// worker's connection to it.
async fn watch_link(
    worker: &cluster::primary::WorkerHandle,
    name: &str,
) -> tokio::io::BufReader<tokio::net::UnixStream> {
    let path = std::env::temp_dir().join(format!(
        "cluster-link-{}-{name}-{}.sock",
        std::process::id(),
        worker.id()
    ));
    let _ = std::fs::remove_file(&path);
    let report = tokio::net::UnixListener::bind(&path).unwrap();
    worker
        .send(&Command::WatchLink {
            report: path.display().to_string(),
        })
        .unwrap();
    let (from_worker, _) = tokio::time::timeout(support::WAIT, report.accept())
        .await
        .expect("the worker connected to report")
        .unwrap();
    let _ = std::fs::remove_file(&path);
    tokio::io::BufReader::new(from_worker)
}

/// The next line the worker reports.
async fn reported(from_worker: &mut tokio::io::BufReader<tokio::net::UnixStream>) -> String {
    use tokio::io::AsyncBufReadExt;
    let mut line = String::new();
    tokio::time::timeout(support::WAIT, from_worker.read_line(&mut line))
        .await
        .expect("the worker reported")
        .unwrap();
    line.trim_end().to_owned()
}

/// One round of [`the_primarys_disconnect_closes_the_link_once_the_workers_connections_are_done`].
async fn disconnect_once_the_connections_are_done(
    policy: cluster::settings::SchedulingPolicy,
    round: usize,
) {
    let mut cluster = Cluster::start(policy);
    let worker = cluster.fork().await;
    let port = cluster.listen(&worker, "127.0.0.1:0").await;
    let mut from_worker = watch_link(&worker, &format!("{policy:?}")).await;
    // Served, and held open: the worker's accept loop holds its link until this closes.
    let client = served_client(port).await;
    let disconnecting = {
        let worker = worker.clone();
        tokio::spawn(async move { worker.disconnect().await })
    };
    // Inside the worker: asked to leave, its listeners closed, its link still open.
    assert_eq!(
        reported(&mut from_worker).await,
        "shutdown connected=true",
        "{policy:?} round {round}"
    );
    // Node's order: no `disconnect` while the client is open (its link stays open inside the
    // worker too: nothing more is reported)...
    assert_no_disconnect_for(&mut cluster, &worker, HOLD).await;
    let mut byte = [0; 1];
    assert_eq!(
        from_worker
            .get_ref()
            .try_read(&mut byte)
            .map_err(|e| e.kind()),
        Err(std::io::ErrorKind::WouldBlock),
        "{policy:?} round {round}: the worker's link closed while its client was open"
    );
    assert!(worker.is_connected(), "{policy:?} round {round}");
    assert!(running(worker.pid()), "{policy:?} round {round}");
    assert_eq!(worker.state(), WorkerState::Listening);
    // ... then `disconnect` once it closes, and `exit`.
    drop(client);
    let life = cluster.life_of(&worker).await;
    assert_eq!(
        names(&life),
        ["disconnect", "exit"],
        "{policy:?} round {round}"
    );
    let seen = reported(&mut from_worker).await;
    let (state, left) = seen.split_once(" ms_left=").unwrap();
    assert_eq!(
        state, "disconnected connected=false shutting_down=true",
        "{policy:?} round {round}"
    );
    // The primary's deadline came with its request: the harness's 10 s disconnect timeout.
    let left: u64 = left
        .strip_prefix("Some(")
        .and_then(|ms| ms.strip_suffix(')'))
        .unwrap_or_else(|| panic!("no deadline: {seen}"))
        .parse()
        .unwrap();
    assert!(left <= 10_000, "{seen}");
    tokio::time::timeout(support::WAIT, disconnecting)
        .await
        .expect("the worker exited once its client closed")
        .unwrap()
        .unwrap();
    assert_eq!(worker.exit_status(), Some(ExitStatus::Code(0)));
    assert_eq!(worker.exited_after_disconnect(), Some(true));
    assert_eq!(worker.killed(), None);
}

#[tokio::test]
async fn the_primarys_disconnect_closes_the_link_once_the_workers_connections_are_done() {
    // Both policies side by side, 30 rounds each.
    let [round_robin, shared] = POLICIES;
    let rounds = |policy| async move {
        for round in 0..30 {
            disconnect_once_the_connections_are_done(policy, round).await;
        }
    };
    tokio::join!(rounds(round_robin), rounds(shared));
}

#[tokio::test]
async fn a_serve_helper_keeps_the_link_open_until_its_drain_ends() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    for policy in POLICIES {
        let mut cluster = Cluster::start(policy);
        let worker = cluster.fork().await;
        let Reply::Listening { port, .. } = cluster.ask(&worker, Command::ServeAxum).await else {
            panic!("{policy:?}: not serving");
        };
        let mut client = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .unwrap();
        let ms = HOLD.as_millis();
        client
            .write_all(format!("GET /delay/{ms} HTTP/1.1\r\nHost: test\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let message = cluster.message_from(&worker).await;
        assert!(
            matches!(message.decode(), Ok(Reply::Delaying { .. })),
            "{policy:?}"
        );
        // The request is in the handler: asked to leave, the worker drains it first.
        let asked = tokio::time::Instant::now();
        let disconnecting = {
            let worker = worker.clone();
            tokio::spawn(async move { worker.disconnect().await })
        };
        let responding = tokio::spawn(async move {
            let mut response = String::new();
            client.read_to_string(&mut response).await.map(|_| response)
        });
        let Event::Disconnect(_) = cluster
            .expect(&worker, |e| !matches!(e, Event::Listening { .. }))
            .await
        else {
            panic!("{policy:?}: not a disconnect first");
        };
        // Not before the request in flight was answered: its handler took `HOLD` from a moment
        // just before the request to leave.
        assert!(
            asked.elapsed() >= HOLD / 2,
            "{policy:?}: {:?}",
            asked.elapsed()
        );
        let response = responding.await.unwrap().unwrap();
        assert!(
            response.starts_with("HTTP/1.1 200"),
            "{policy:?}: {response}"
        );
        assert!(response.ends_with("worker 1\n"), "{policy:?}: {response}");
        let life = cluster.life_of(&worker).await;
        assert_eq!(names(&life), ["exit"], "{policy:?}");
        tokio::time::timeout(support::WAIT, disconnecting)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(
            worker.exit_status(),
            Some(ExitStatus::Code(0)),
            "{policy:?}"
        );
        assert_eq!(worker.killed(), None, "{policy:?}");
    }
}

#[tokio::test]
async fn a_worker_is_killed_at_its_disconnect_deadline_though_nobody_waits_for_it() {
    const DEADLINE: std::time::Duration = std::time::Duration::from_millis(500);
    for policy in POLICIES {
        let mut cluster = Cluster::with(policy, |s| s.disconnect_timeout(DEADLINE));
        let worker = cluster.fork().await;
        let port = cluster.listen(&worker, "127.0.0.1:0").await;
        let mut from_worker = watch_link(&worker, "killed").await;
        // Held open for longer than the deadline: the worker will not leave in time.
        let mut client = served_client(port).await;
        let asked = tokio::time::Instant::now();
        // Polled once (the request goes out), then dropped: a reload cancelled.
        let waited = tokio::time::timeout(std::time::Duration::ZERO, worker.disconnect()).await;
        assert!(waited.is_err(), "{policy:?}: it left at once");
        assert_eq!(
            reported(&mut from_worker).await,
            "shutdown connected=true",
            "{policy:?}: the request went out"
        );
        let life = cluster.life_of(&worker).await;
        let killed_after = asked.elapsed();
        assert_eq!(names(&life), ["disconnect", "exit"], "{policy:?}");
        assert!(
            matches!(
                life[1],
                Event::Exit {
                    status: ExitStatus::Signal(libc::SIGKILL),
                    killed: Some(cluster::primary::KillReason::DisconnectTimeout),
                    ..
                }
            ),
            "{policy:?}: {:?}",
            life[1]
        );
        assert!(killed_after >= DEADLINE, "{policy:?}: {killed_after:?}");
        assert_eq!(
            worker.killed(),
            Some(cluster::primary::KillReason::DisconnectTimeout)
        );
        assert_eq!(worker.exited_after_disconnect(), Some(true));
        // Its connection went with it.
        use tokio::io::AsyncReadExt;
        let mut rest = Vec::new();
        let _ = tokio::time::timeout(support::WAIT, client.read_to_end(&mut rest))
            .await
            .expect("the connection ended with the worker");
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
