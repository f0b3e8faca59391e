//! A worker for the multi-process tests: does what the test (its primary) tells it.

use std::future::{Future, IntoFuture};
use std::io;
use std::time::Duration;

use cluster::message::Message;
use cluster::net::{ClusterUdpSocket, ClusterUnixListener};
use cluster::{ClusterListener, Role, Settings, Worker};
use cluster_tests::{Command, Listen, Reply, UdpTarget};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::watch;
use tokio::task::{JoinHandle, JoinSet};

fn main() {
    cluster::run(Settings::new(), |role| async move {
        match role {
            Role::Worker(worker) => serve(worker).await,
            Role::Primary(_) => {
                eprintln!("fixture: this binary is started by a test's primary");
                std::process::exit(2);
            }
        }
    });
}

struct Listener {
    task: JoinHandle<()>,
    pause: watch::Sender<bool>,
}

async fn serve(worker: Worker) {
    let id = worker.id().get();
    let mut listeners: Vec<Option<Listener>> = Vec::new();
    let mut udp = Vec::new();
    let mut series = Series::default();
    let mut handles_sent = false;
    let mut axum_servers = Vec::new();
    loop {
        let message = tokio::select! {
            message = worker.recv_message() => message,
            () = worker.shutdown() => break,
        };
        let Some(mut message) = message else { break };
        let command = match message.decode::<Command>() {
            Ok(command) => command,
            Err(error) => panic!("undecodable command: {error}"),
        };
        match command {
            Command::Listen { addr } => {
                let bound = ClusterListener::bind(addr).await;
                listened(&worker, &mut listeners, bound, |l| {
                    l.local_addr().expect("bound").port()
                });
            }
            Command::ServeAxum => {
                let listener = ClusterListener::bind("127.0.0.1:0").await.expect("bind");
                let port = listener.local_addr().expect("bound").port();
                let to_primary = worker.clone();
                let delay = move |axum::extract::Path(ms): axum::extract::Path<u64>| async move {
                    to_primary.send(&Reply::Delaying { ms }).expect("send");
                    tokio::time::sleep(Duration::from_millis(ms)).await;
                    format!("worker {id}\n")
                };
                let app = axum::Router::new().route("/delay/{ms}", axum::routing::get(delay));
                axum_servers.push(tokio::spawn(
                    cluster::axum::serve(listener, app).into_future(),
                ));
                worker
                    .send(&Reply::Listening { index: 0, port })
                    .expect("send");
            }
            Command::ListenSpec(spec) => match spec {
                Listen::Tcp { addr, options } => {
                    let bound = ClusterListener::bind_with(addr, options.to_listen_options()).await;
                    listened(&worker, &mut listeners, bound, |l| {
                        l.local_addr().expect("bound").port()
                    });
                }
                Listen::Unix { path, options } => {
                    let bound =
                        ClusterUnixListener::bind_with(path, options.to_listen_options()).await;
                    listened(&worker, &mut listeners, bound, |_| 0);
                }
                Listen::PrimaryFd { fd, unix: false } => {
                    let bound = ClusterListener::from_primary_fd(fd).await;
                    listened(&worker, &mut listeners, bound, |l| {
                        l.local_addr().expect("bound").port()
                    });
                }
                Listen::PrimaryFd { fd, unix: true } => {
                    let bound = ClusterUnixListener::from_primary_fd(fd).await;
                    listened(&worker, &mut listeners, bound, |_| 0);
                }
                Listen::Own { addr } => {
                    let bound =
                        std::net::TcpListener::bind(addr).and_then(ClusterListener::from_std);
                    listened(&worker, &mut listeners, bound, |l| {
                        l.local_addr().expect("bound").port()
                    });
                }
            },
            Command::Udp { target, options } => {
                let bound = match target {
                    UdpTarget::Addr(addr) => {
                        ClusterUdpSocket::bind_with(addr, options.to_listen_options()).await
                    }
                    UdpTarget::PrimaryFd(fd) => ClusterUdpSocket::from_primary_fd(fd).await,
                };
                match bound {
                    Ok(socket) => {
                        let port = socket.local_addr().expect("bound").port();
                        udp.push(tokio::spawn(udp_echo(id, socket)));
                        worker.send(&Reply::UdpBound { port }).expect("send");
                    }
                    Err(error) => worker.send(&bind_failed(&error)).expect("send"),
                }
            }
            Command::UdpCancelled { addr } => {
                {
                    let mut bind = std::pin::pin!(ClusterUdpSocket::bind(addr));
                    // Polled once (the request goes out), then dropped before any answer.
                    let polled =
                        std::future::poll_fn(|cx| std::task::Poll::Ready(bind.as_mut().poll(cx)))
                            .await;
                    assert!(polled.is_pending(), "answered within one poll: {polled:?}");
                }
                // The answer comes back on the link; a round trip after it proves it was handled.
                let _ = ClusterUdpSocket::bind("127.0.0.1:0").await.expect("bind");
                worker
                    .send(&Reply::Fds { count: open_fds() })
                    .expect("send");
            }
            Command::CountFds => worker
                .send(&Reply::Fds { count: open_fds() })
                .expect("send"),
            Command::Flood { count, size } => {
                for index in 0..count {
                    let payload = vec![(index % 251) as u8; size];
                    worker
                        .send(&Reply::Numbered { index, payload })
                        .expect("send");
                    // As fast as the link takes them, without piling them up here: a send only
                    // queues, a flush waits for the link's buffer.
                    if index % 64 == 63 {
                        worker.flush().await.expect("flush");
                    }
                }
            }
            Command::Numbered { index, payload } => series.push(index, &payload),
            Command::Check => worker.send(&series.report()).expect("send"),
            Command::Ask { text, timeout_ms } => {
                let worker = worker.clone();
                tokio::spawn(async move {
                    let timeout = Duration::from_millis(timeout_ms);
                    let result = worker
                        .request_with_timeout::<_, String>(&text, timeout)
                        .await
                        // The error's kind, not its wording: what a test can rely on.
                        .map_err(|e| format!("{:?}", io::Error::from(e).kind()));
                    worker.send(&Reply::Answer { result }).expect("send");
                });
            }
            Command::Question { text } => answer(id, &mut message, &text),
            Command::Handle { send_back } => {
                let mut stream = message
                    .take_tcp_stream()
                    .expect("a TCP stream came with it");
                tokio::spawn(async move {
                    let _ = stream.write_all(format!("{id}\n").as_bytes()).await;
                    let _ = stream.shutdown().await;
                });
                if !handles_sent {
                    handles_sent = true;
                    let worker = worker.clone();
                    // Sent while the primary is still sending its own: both ways at once.
                    tokio::spawn(async move {
                        for index in 0..send_back {
                            let socket = std::net::UdpSocket::bind("127.0.0.1:0").expect("udp");
                            worker
                                .send_with_fd(&Reply::Handle { index }, socket)
                                .expect("send");
                            tokio::task::yield_now().await;
                        }
                    });
                }
            }
            Command::Pause { index } => {
                listeners[index]
                    .as_ref()
                    .expect("open")
                    .pause
                    .send_replace(true);
                worker.send(&Reply::Paused { index }).expect("send");
            }
            Command::Resume { index } => {
                listeners[index]
                    .as_ref()
                    .expect("open")
                    .pause
                    .send_replace(false);
            }
            Command::Close { index } => {
                if let Some(listener) = listeners.get_mut(index).and_then(Option::take) {
                    listener.task.abort();
                    let _ = listener.task.await;
                }
                worker.send(&Reply::Closed { index }).expect("send");
            }
            Command::Env { name } => {
                let value = std::env::var(&name).ok();
                let cwd = std::env::current_dir().expect("cwd").display().to_string();
                worker.send(&Reply::Env { value, cwd }).expect("send");
            }
            Command::Block { ms } => std::thread::sleep(Duration::from_millis(ms)),
            Command::Exit { code } => std::process::exit(code),
            Command::Disconnect => {
                worker.disconnect().await.expect("disconnect");
                break;
            }
            Command::WatchLink { report } => {
                let worker = worker.clone();
                tokio::spawn(async move {
                    let mut to = tokio::net::UnixStream::connect(report)
                        .await
                        .expect("report");
                    worker.shutdown().await;
                    let line = format!("shutdown connected={}\n", worker.is_connected());
                    to.write_all(line.as_bytes()).await.expect("report");
                    worker.disconnected().await;
                    let left = worker.leave_deadline().map(|deadline| {
                        deadline
                            .saturating_duration_since(tokio::time::Instant::now())
                            .as_millis()
                    });
                    let line = format!(
                        "disconnected connected={} shutting_down={} ms_left={left:?}\n",
                        worker.is_connected(),
                        worker.is_shutting_down()
                    );
                    to.write_all(line.as_bytes()).await.expect("report");
                });
            }
            Command::SendAndReturn { size } => {
                let socket = std::net::UdpSocket::bind("127.0.0.1:0").expect("udp");
                let payload = vec![(size % 251) as u8; size];
                worker
                    .send_with_fd(&Reply::Numbered { index: 0, payload }, socket)
                    .expect("send");
                for listener in listeners.into_iter().flatten() {
                    listener.task.abort();
                }
                return;
            }
        }
    }
    for task in udp {
        task.abort();
    }
    if !axum_servers.is_empty() {
        // Only the serve helpers' drains can close the link now (nothing else holds it, and
        // `main` has not returned): the test sees the `Disconnect` or a kill at the deadline.
        worker.disconnected().await;
        for server in axum_servers {
            server.await.expect("served").expect("served");
        }
    }
    // Leaving: every listener stopped accepting; wait until the clients close what was accepted.
    for Listener { task, pause } in listeners.into_iter().flatten() {
        // A paused accept loop ends when its pause channel closes.
        drop(pause);
        let _ = task.await;
    }
}

/// Starts serving a bound listener and reports it, or reports the bind error.
fn listened<L: Accept>(
    worker: &Worker,
    listeners: &mut Vec<Option<Listener>>,
    bound: io::Result<L>,
    port: impl FnOnce(&L) -> u16,
) {
    let reply = match bound {
        Ok(listener) => {
            let index = listeners.len();
            let port = port(&listener);
            let (pause, paused) = watch::channel(false);
            let id = worker.id().get();
            listeners.push(Some(Listener {
                task: tokio::spawn(accept_loop(id, listener, paused)),
                pause,
            }));
            Reply::Listening { index, port }
        }
        Err(error) => bind_failed(&error),
    };
    worker.send(&reply).expect("send");
}

fn bind_failed(error: &io::Error) -> Reply {
    Reply::BindFailed {
        kind: format!("{:?}", error.kind()),
        errno: error.raw_os_error(),
    }
}

/// Answers a `Question` request.
fn answer(id: u64, message: &mut Message, text: &str) {
    assert!(message.is_request(), "questions come as requests");
    match text {
        "refuse" => message.refuse("nope").expect("refuse"),
        // Dropped unanswered: the runtime refuses it on our behalf.
        "drop" => {}
        _ => message
            .reply(&Reply::Answer {
                result: Ok(format!("{id}: {text}")),
            })
            .expect("reply"),
    }
}

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").expect("/proc").count()
}

async fn udp_echo(id: u64, socket: ClusterUdpSocket) {
    let mut buf = vec![0; 65_536];
    while let Ok((len, peer)) = socket.recv_from(&mut buf).await {
        let mut answer = format!("worker {id}: ").into_bytes();
        answer.extend_from_slice(&buf[..len]);
        let _ = socket.send_to(&answer, peer).await;
    }
}

/// A numbered series of messages, checked for order.
#[derive(Default)]
struct Series {
    count: u32,
    in_order: bool,
    bytes: usize,
}

impl Series {
    fn push(&mut self, index: u32, payload: &[u8]) {
        if self.count == 0 {
            self.in_order = true;
        }
        self.in_order &=
            index == self.count && payload.iter().all(|b| u32::from(*b) == index % 251);
        self.count += 1;
        self.bytes += payload.len();
    }

    fn report(&self) -> Reply {
        Reply::Checked {
            count: self.count,
            in_order: self.in_order,
            bytes: self.bytes,
        }
    }
}

/// The listeners the fixture serves alike.
trait Accept: Send + 'static {
    type Stream: AsyncRead + AsyncWrite + Unpin + Send + 'static;
    fn accept(&mut self) -> impl Future<Output = io::Result<Self::Stream>> + Send;
}

impl Accept for ClusterListener {
    type Stream = tokio::net::TcpStream;
    async fn accept(&mut self) -> io::Result<Self::Stream> {
        Self::accept(self).await.map(|(stream, _)| stream)
    }
}

impl Accept for ClusterUnixListener {
    type Stream = tokio::net::UnixStream;
    async fn accept(&mut self) -> io::Result<Self::Stream> {
        Self::accept(self).await.map(|(stream, _)| stream)
    }
}

async fn accept_loop<L: Accept>(id: u64, mut listener: L, mut paused: watch::Receiver<bool>) {
    // Once the worker leaves, its link stays open until these connections are done.
    let link = Worker::current().map(|worker| worker.hold_link());
    let mut connections = JoinSet::new();
    loop {
        // While paused, connections queue up in the listener unaccepted.
        if paused.wait_for(|p| !*p).await.is_err() {
            break;
        }
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            // `accept` is cancel safe: pausing loses no connection.
            _ = paused.wait_for(|p| *p) => continue,
        };
        let Ok(mut stream) = accepted else { break };
        connections.spawn(async move {
            let _ = stream.write_all(format!("{id}\n").as_bytes()).await;
            let _ = stream.shutdown().await;
            // Held until the client closes it.
            let _ = stream.read(&mut [0; 1]).await;
        });
    }
    drop(listener);
    while connections.join_next().await.is_some() {}
    drop(link);
}
