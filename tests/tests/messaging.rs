//! Typed messages between the primary and its workers: order, size, requests, fds, broadcast
//! (reference scenario 43).

mod support;

use std::io::Read;

use cluster::message::{EncodeError, RequestError};
use cluster::primary::Signal;
use cluster::settings::SchedulingPolicy;
use cluster_tests::{Command, Reply};
use support::{Cluster, WAIT};

/// The next message of any worker.
async fn next_reply(
    cluster: &mut Cluster,
) -> (cluster::primary::WorkerHandle, cluster::message::Message) {
    cluster.message().await
}

#[tokio::test]
async fn messages_arrive_in_order_both_ways_small_and_large() {
    let mut cluster = Cluster::start(SchedulingPolicy::RoundRobin);
    let w = cluster.fork().await;
    // Primary → worker: small ones, then ones of several frames (up to 3 MB), in one series.
    let sizes = (0..2000)
        .map(|_| 16)
        .chain([70_000, 1_000_000, 3_000_000, 16]);
    let mut expected_bytes = 0;
    let mut count = 0;
    for (index, size) in (0u32..).zip(sizes) {
        let payload = vec![(index % 251) as u8; size];
        w.send(&Command::Numbered { index, payload }).unwrap();
        expected_bytes += size;
        count += 1;
    }
    assert_eq!(
        cluster.ask(&w, Command::Check).await,
        Reply::Checked {
            count,
            in_order: true,
            bytes: expected_bytes
        }
    );
    // Worker → primary: the same, while the primary keeps sending.
    for (count, size) in [(2000, 16), (3, 2_500_000)] {
        w.send(&Command::Flood { count, size }).unwrap();
        for index in 0..count {
            let (from, message) = next_reply(&mut cluster).await;
            assert_eq!(from.id(), w.id());
            let Reply::Numbered {
                index: got,
                payload,
            } = message.decode().unwrap()
            else {
                panic!("unexpected message");
            };
            assert_eq!((got, payload.len()), (index, size));
            assert!(payload.iter().all(|b| u32::from(*b) == index % 251));
        }
    }
}

#[tokio::test]
async fn a_message_over_the_limit_is_refused_before_anything_is_sent() {
    let mut cluster = Cluster::start(SchedulingPolicy::RoundRobin);
    let w = cluster.fork().await;
    let too_large = vec![0u8; cluster::message::MAX_MESSAGE + 1];
    let error = w.send(&too_large).unwrap_err();
    assert_eq!(error.kind(), std::io::ErrorKind::InvalidInput, "{error}");
    let cause = error
        .get_ref()
        .and_then(|e| e.downcast_ref::<EncodeError>());
    assert!(
        matches!(cause, Some(EncodeError::TooLarge { len, max }) if *len > *max),
        "{error:?}"
    );
    let error = w.request::<_, Reply>(&too_large).await.unwrap_err();
    assert!(matches!(error, RequestError::Send(_)), "{error:?}");
    // The link is untouched.
    assert!(matches!(
        cluster.ask(&w, Command::CountFds).await,
        Reply::Fds { .. }
    ));
}

#[tokio::test]
async fn requests_are_answered_refused_or_timed_out_both_ways() {
    let mut cluster = Cluster::start(SchedulingPolicy::RoundRobin);
    let w = cluster.fork().await;
    let id = w.id().get();
    // Primary → worker.
    let question = |text: &str| Command::Question { text: text.into() };
    let answer: Reply = w.request(&question("hi")).await.unwrap();
    assert_eq!(
        answer,
        Reply::Answer {
            result: Ok(format!("{id}: hi"))
        }
    );
    let refused = w
        .request::<_, Reply>(&question("refuse"))
        .await
        .unwrap_err();
    assert!(
        matches!(&refused, RequestError::Refused(r) if r == "nope"),
        "{refused:?}"
    );
    // Dropped unanswered: refused at once, not at the timeout.
    let started = std::time::Instant::now();
    let dropped = w.request::<_, Reply>(&question("drop")).await.unwrap_err();
    assert!(matches!(dropped, RequestError::Refused(_)), "{dropped:?}");
    assert!(started.elapsed() < WAIT);
    // A reply of another type is a typed error.
    let wrong = w.request::<_, u64>(&question("hi")).await;
    assert!(wrong.is_err(), "{wrong:?}");

    // Worker → primary: answered.
    let ask = |text: &str, timeout_ms| Command::Ask {
        text: text.into(),
        timeout_ms,
    };
    w.send(&ask("ping", 20_000)).unwrap();
    let (_, mut request) = next_reply(&mut cluster).await;
    assert!(request.is_request());
    assert_eq!(request.decode::<String>().unwrap(), "ping");
    request.reply(&"pong".to_owned()).unwrap();
    assert!(
        request.reply(&"again".to_owned()).is_err(),
        "answered twice"
    );
    let (_, result) = next_reply(&mut cluster).await;
    assert_eq!(
        result.decode::<Reply>().unwrap(),
        Reply::Answer {
            result: Ok("pong".into())
        }
    );
    // Not answered in time: the worker gets a timeout; the late answer is dropped harmlessly.
    w.send(&ask("slow", 100)).unwrap();
    let (_, mut slow) = next_reply(&mut cluster).await;
    let (_, result) = next_reply(&mut cluster).await;
    let Reply::Answer { result: Err(error) } = result.decode().unwrap() else {
        panic!("answered without an answer")
    };
    assert_eq!(error, "TimedOut");
    slow.reply(&"too late".to_owned()).unwrap();
    // The worker carries on.
    w.send(&ask("again", 20_000)).unwrap();
    let (_, mut request) = next_reply(&mut cluster).await;
    request.reply(&"yes".to_owned()).unwrap();
    let (_, result) = next_reply(&mut cluster).await;
    assert_eq!(
        result.decode::<Reply>().unwrap(),
        Reply::Answer {
            result: Ok("yes".into())
        }
    );
    // A request to a worker that is gone fails as such.
    w.kill(Signal::KILL).unwrap();
    tokio::time::timeout(WAIT, w.exited()).await.unwrap();
    let gone = w.request::<_, Reply>(&question("hi")).await.unwrap_err();
    assert!(matches!(gone, RequestError::Disconnected), "{gone:?}");
}

#[tokio::test]
async fn handles_pass_both_ways_at_once() {
    const COUNT: u32 = 200;
    let mut cluster = Cluster::start(SchedulingPolicy::RoundRobin);
    let w = cluster.fork().await;
    let id = w.id().get();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let mut clients = Vec::new();
    // Every message carries a connection; the worker answers on it, and sends sockets back at
    // the same time.
    for _ in 0..COUNT {
        let client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (server_side, _) = listener.accept().unwrap();
        w.send_with_fd(&Command::Handle { send_back: COUNT }, server_side)
            .unwrap();
        clients.push(client);
    }
    let mut received = 0;
    while received < COUNT {
        let (_, mut message) = next_reply(&mut cluster).await;
        let Reply::Handle { index } = message.decode().unwrap() else {
            panic!("unexpected message")
        };
        assert_eq!(index, received);
        let socket = message
            .take_udp_socket()
            .expect("a UDP socket came with it");
        assert!(socket.local_addr().is_ok());
        assert!(message.take_fd().is_none(), "an fd is taken once");
        received += 1;
    }
    for mut client in clients {
        client.set_read_timeout(Some(WAIT)).unwrap();
        let mut text = String::new();
        client.read_to_string(&mut text).unwrap();
        assert_eq!(text, format!("{id}\n"));
    }
    drop(listener);
    // The primary kept no copy of what it sent (its fds wait in the connection slab until sent;
    // this binary's other tests open fds concurrently, so the slab is what is checked).
    let stats = cluster.primary.counters().await.unwrap();
    assert_eq!(stats.connections_held, 0, "{stats:?}");
}

#[tokio::test]
async fn broadcast_reaches_every_connected_worker() {
    let mut cluster = Cluster::start(SchedulingPolicy::RoundRobin);
    let mut workers = Vec::new();
    for _ in 0..3 {
        workers.push(cluster.fork().await);
    }
    assert_eq!(cluster.primary.broadcast(&Command::CountFds).unwrap(), 3);
    let mut from = Vec::new();
    for _ in 0..3 {
        let (worker, message) = tokio::time::timeout(WAIT, next_reply(&mut cluster))
            .await
            .unwrap();
        assert!(matches!(message.decode().unwrap(), Reply::Fds { .. }));
        from.push(worker.id());
    }
    from.sort();
    assert_eq!(from, workers.iter().map(|w| w.id()).collect::<Vec<_>>());
    // A worker that left is not counted.
    workers[0].disconnect().await.unwrap();
    assert_eq!(cluster.primary.broadcast(&Command::CountFds).unwrap(), 2);
}

#[tokio::test]
async fn large_messages_and_handoffs_share_the_link_without_losing_either() {
    let mut cluster = Cluster::start(SchedulingPolicy::RoundRobin);
    let w = cluster.fork().await;
    let port = cluster.listen(&w, "127.0.0.1:0").await;
    // Megabytes of fragments on the link while connections are handed over on it.
    let sender = {
        let w = w.clone();
        tokio::spawn(async move {
            for index in 0..20u32 {
                let payload = vec![(index % 251) as u8; 1_000_000];
                w.send(&Command::Numbered { index, payload }).unwrap();
                tokio::task::yield_now().await;
            }
        })
    };
    let clients: Vec<_> = (0..200).map(|_| tokio::spawn(support::who(port))).collect();
    for client in clients {
        assert_eq!(client.await.unwrap(), w.id().get());
    }
    sender.await.unwrap();
    assert_eq!(
        cluster.ask(&w, Command::Check).await,
        Reply::Checked {
            count: 20,
            in_order: true,
            bytes: 20_000_000
        }
    );
}

#[tokio::test]
async fn messages_nobody_reads_are_dropped_and_counted_not_buffered() {
    let mut cluster = Cluster::start(SchedulingPolicy::RoundRobin);
    let w = cluster.fork().await;
    // Nobody reads: a stream that takes over from the harness's, dropped at once.
    drop(cluster.primary.messages());
    w.send(&Command::Flood {
        count: 10,
        size: 16,
    })
    .unwrap();
    // The answer to a request (not a message) comes after the flood on the same link: the
    // flood was handled by then.
    let question = Command::Question { text: "hi".into() };
    let answer: Reply = w.request(&question).await.unwrap();
    assert!(matches!(answer, Reply::Answer { .. }), "{answer:?}");
    assert_eq!(cluster.primary.messages_dropped(), 10);
    // Read again: nothing of the flood was kept.
    cluster.messages = cluster.primary.messages();
    let reply = cluster.ask(&w, Command::CountFds).await;
    assert!(matches!(reply, Reply::Fds { .. }), "{reply:?}");
}

/// The user and system CPU time of process `pid`, in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("/proc/<pid>/stat");
    let fields: Vec<&str> = stat[stat.rfind(')').expect("comm") + 2..]
        .split_whitespace()
        .collect();
    fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
}

#[tokio::test]
async fn a_worker_held_by_a_slow_reader_is_not_presumed_hung() {
    const COUNT: u32 = 5000;
    let heartbeat = std::time::Duration::from_secs(2);
    let mut cluster = Cluster::with(SchedulingPolicy::RoundRobin, |s| {
        s.heartbeat_timeout(heartbeat)
    });
    let w = cluster.fork().await;
    w.send(&Command::Flood {
        count: COUNT,
        size: 1024,
    })
    .unwrap();
    // Read nothing until the worker is blocked by its link (its CPU time stands still)...
    let started = std::time::Instant::now();
    let mut last = (cpu_ticks(w.pid()), std::time::Instant::now());
    while last.1.elapsed() < std::time::Duration::from_millis(200) {
        assert!(started.elapsed() < WAIT, "the worker never stopped sending");
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        let ticks = cpu_ticks(w.pid());
        if ticks != last.0 {
            last = (ticks, std::time::Instant::now());
        }
    }
    // ...and past its heartbeat deadline: its heartbeats are behind what the primary holds.
    let quiet = tokio::time::timeout(heartbeat + heartbeat / 2, cluster.event()).await;
    assert!(quiet.is_err(), "nothing happens to it: {quiet:?}");
    for index in 0..COUNT {
        let message = cluster.message_from(&w).await;
        let Reply::Numbered { index: got, .. } = message.decode().unwrap() else {
            panic!("unexpected message");
        };
        assert_eq!(got, index);
    }
    assert!(matches!(
        cluster.ask(&w, Command::CountFds).await,
        Reply::Fds { .. }
    ));
}

#[tokio::test]
async fn a_reader_that_leaves_frees_the_worker_it_held_and_its_messages_are_counted() {
    const COUNT: u32 = 3000;
    let mut cluster = Cluster::start(SchedulingPolicy::RoundRobin);
    let w = cluster.fork().await;
    w.send(&Command::Flood {
        count: COUNT,
        size: 1024,
    })
    .unwrap();
    // Held: the worker is blocked by its link.
    let started = std::time::Instant::now();
    let mut last = (cpu_ticks(w.pid()), std::time::Instant::now());
    while last.1.elapsed() < std::time::Duration::from_millis(200) {
        assert!(started.elapsed() < WAIT, "the worker never stopped sending");
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        let ticks = cpu_ticks(w.pid());
        if ticks != last.0 {
            last = (ticks, std::time::Instant::now());
        }
    }
    assert_eq!(cluster.primary.messages_dropped(), 0);
    // The reader leaves: what it had not read, what was held and what comes next are dropped,
    // and the worker is read again (its answer comes after the whole flood).
    drop(cluster.primary.messages());
    let question = Command::Question { text: "hi".into() };
    let answer: Reply = w.request(&question).await.unwrap();
    assert!(matches!(answer, Reply::Answer { .. }), "{answer:?}");
    assert_eq!(cluster.primary.messages_dropped(), u64::from(COUNT));
}

/// A worker that exits while its messages are held (the reader reads nothing yet): every one of
/// them is still delivered, in order, once the reader makes room.
#[tokio::test]
async fn messages_held_when_their_worker_exits_are_still_delivered() {
    const COUNT: u32 = 320;
    let mut cluster = Cluster::start(SchedulingPolicy::RoundRobin);
    let worker = cluster.fork().await;
    worker
        .send(&Command::Flood {
            count: COUNT,
            size: 512,
        })
        .unwrap();
    worker.send(&Command::Exit { code: 0 }).unwrap();
    tokio::time::timeout(WAIT, worker.exited())
        .await
        .expect("the worker exits");
    for index in 0..COUNT {
        let (_, message) = cluster.message().await;
        let Reply::Numbered { index: got, .. } = message.decode().unwrap() else {
            panic!("message {index}: not a numbered one");
        };
        assert_eq!(got, index);
    }
    assert_eq!(cluster.primary.messages_dropped(), 0);
}
