//! The harness: the test process is the primary; workers run the `fixture` binary.

#![allow(dead_code, unreachable_pub)]

pub mod program;

use std::collections::VecDeque;
use std::time::Duration;

use cluster::message::Message;
use cluster::primary::{Event, Events, Messages, Signal, WorkerHandle};
use cluster::settings::SchedulingPolicy;
use cluster::{Primary, Settings};
use cluster_tests::{Command, Reply};
use tokio::io::AsyncReadExt;

/// Every wait in these tests is bounded by this.
pub const WAIT: Duration = Duration::from_secs(20);

pub const POLICIES: [SchedulingPolicy; 2] =
    [SchedulingPolicy::RoundRobin, SchedulingPolicy::Shared];

pub struct Cluster {
    pub primary: Primary,
    events: Events,
    pending: VecDeque<Event>,
    pub messages: Messages,
    pending_messages: VecDeque<(WorkerHandle, Message)>,
    workers: Vec<WorkerHandle>,
}

impl Cluster {
    pub fn start(policy: SchedulingPolicy) -> Self {
        Self::with(policy, |s| s)
    }

    pub fn with(policy: SchedulingPolicy, configure: impl FnOnce(Settings) -> Settings) -> Self {
        let settings = Settings::new()
            .exec(env!("CARGO_BIN_EXE_fixture"))
            .args(Vec::<String>::new())
            .policy(policy)
            .disconnect_timeout(Duration::from_secs(10));
        let primary = Primary::start(configure(settings)).expect("valid settings");
        let events = primary.events();
        let messages = primary.messages();
        Self {
            primary,
            events,
            pending: VecDeque::new(),
            messages,
            pending_messages: VecDeque::new(),
            workers: Vec::new(),
        }
    }

    /// Makes `worker`, forked some other way, go (SIGKILL) with the cluster.
    pub fn adopt(&mut self, worker: &WorkerHandle) {
        self.workers.push(worker.clone());
    }

    /// Forks a worker and waits until it is online.
    pub async fn fork(&mut self) -> WorkerHandle {
        let worker = self.primary.fork().await.expect("fork");
        self.workers.push(worker.clone());
        self.expect(&worker, |e| matches!(e, Event::Fork(_))).await;
        self.expect(&worker, |e| matches!(e, Event::Online(_)))
            .await;
        worker
    }

    /// The next event, in order.
    pub async fn event(&mut self) -> Event {
        if let Some(event) = self.pending.pop_front() {
            return event;
        }
        tokio::time::timeout(WAIT, self.events.recv())
            .await
            .expect("timed out waiting for an event")
            .expect("events")
    }

    /// The next event of `worker` matching `want`; every other event is kept, in order, for later.
    pub async fn expect(&mut self, worker: &WorkerHandle, want: impl Fn(&Event) -> bool) -> Event {
        let mut skipped = VecDeque::new();
        let found = loop {
            let event = self.event().await;
            if worker_of(&event) == Some(worker.id()) && want(&event) {
                break event;
            }
            skipped.push_back(event);
        };
        skipped.extend(self.pending.drain(..));
        self.pending = skipped;
        found
    }

    /// The next message of any worker, in order.
    pub async fn message(&mut self) -> (WorkerHandle, Message) {
        if let Some(message) = self.pending_messages.pop_front() {
            return message;
        }
        tokio::time::timeout(WAIT, self.messages.recv())
            .await
            .expect("timed out waiting for a message")
            .expect("messages")
    }

    /// The next message or event, whichever comes first (messages first when both wait).
    pub async fn message_or_event(&mut self) -> Result<(WorkerHandle, Message), Event> {
        if let Some(message) = self.pending_messages.pop_front() {
            return Ok(message);
        }
        if let Some(event) = self.pending.pop_front() {
            return Err(event);
        }
        let next = async {
            tokio::select! {
                biased;
                message = self.messages.recv() => Ok(message.expect("messages")),
                event = self.events.recv() => Err(event.expect("events")),
            }
        };
        tokio::time::timeout(WAIT, next)
            .await
            .expect("timed out waiting for a message or an event")
    }

    /// The next message of `worker`; every other worker's is kept, in order, for later.
    pub async fn message_from(&mut self, worker: &WorkerHandle) -> Message {
        let mut skipped = VecDeque::new();
        let found = loop {
            let (from, message) = self.message().await;
            if from.id() == worker.id() {
                break message;
            }
            skipped.push_back((from, message));
        };
        skipped.extend(self.pending_messages.drain(..));
        self.pending_messages = skipped;
        found
    }

    /// Lifecycle events of `worker` (not `Listening`), until and including its exit.
    pub async fn life_of(&mut self, worker: &WorkerHandle) -> Vec<Event> {
        let mut seen = Vec::new();
        loop {
            let event = self
                .expect(worker, |e| !matches!(e, Event::Listening { .. }))
                .await;
            let done = matches!(event, Event::Exit { .. });
            seen.push(event);
            if done {
                return seen;
            }
        }
    }

    /// Sends a command and waits for the worker's reply.
    pub async fn ask(&mut self, worker: &WorkerHandle, command: Command) -> Reply {
        worker.send(&command).expect("send");
        self.message_from(worker).await.decode().expect("reply")
    }

    /// Makes `worker` listen on `addr`; returns the real port.
    pub async fn listen(&mut self, worker: &WorkerHandle, addr: &str) -> u16 {
        match self
            .ask(worker, Command::Listen { addr: addr.into() })
            .await
        {
            Reply::Listening { port, .. } => port,
            other => panic!("listen on {addr} failed: {other:?}"),
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // Every child this test started goes, by pid (a dead one is never signalled again).
        for worker in &self.workers {
            let _ = worker.kill(Signal::KILL);
        }
    }
}

pub fn worker_of(event: &Event) -> Option<cluster::primary::WorkerId> {
    Some(match event {
        Event::Fork(w) | Event::Online(w) | Event::Disconnect(w) => w.id(),
        Event::Listening { worker, .. } | Event::Exit { worker, .. } => worker.id(),
        Event::Error { worker, .. } => worker.id(),
        _ => return None,
    })
}

/// Connects to `port` and returns the id of the worker that answered.
pub async fn who(port: u16) -> u64 {
    let answer = async {
        let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
        let mut text = String::new();
        stream.read_to_string(&mut text).await?;
        Ok::<_, std::io::Error>(text)
    };
    let text = tokio::time::timeout(WAIT, answer)
        .await
        .expect("timed out waiting for an answer")
        .expect("connect");
    text.trim()
        .parse()
        .unwrap_or_else(|_| panic!("unexpected answer {text:?}"))
}

/// How many fds this process has open, leaving out the files of `/proc` that a background
/// task of the primary may be reading at that instant (the orphan reaper, every second): what
/// could leak is sockets, pipes and the like.
pub fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd")
        .expect("/proc/self/fd")
        .flatten()
        .filter(|fd| std::fs::read_link(fd.path()).is_ok_and(|target| !target.starts_with("/proc")))
        .count()
}
