//! Listener kinds beyond TCP ports: Unix sockets, UDP, inherited fds, and binds that bypass the
//! primary (reference scenarios 5, 20–23, 25–28).

mod support;

use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};

use cluster::primary::{Signal, WorkerHandle};
use cluster::settings::SchedulingPolicy;
use cluster_tests::{Command, Listen, Options, Reply, UdpTarget};
use support::program::free_port;
use support::{Cluster, POLICIES, WAIT, who};
use tokio::io::AsyncReadExt;

/// A fresh directory for this test's socket files, removed when dropped.
struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("cluster-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A path `connect` takes even when `path` is longer than `sun_path`: through the directory.
fn reachable(path: &Path) -> (PathBuf, Option<std::fs::File>) {
    if path.as_os_str().len() < 100 {
        return (path.to_owned(), None);
    }
    let dir = std::fs::File::open(path.parent().unwrap()).unwrap();
    let short =
        PathBuf::from(format!("/proc/self/fd/{}", dir.as_raw_fd())).join(path.file_name().unwrap());
    (short, Some(dir))
}

/// Connects to the Unix socket at `path` and returns the id of the worker that answered.
async fn who_unix(path: &Path) -> u64 {
    let (short, _dir) = reachable(path);
    let answer = async {
        let mut stream = tokio::net::UnixStream::connect(&short).await?;
        let mut text = String::new();
        stream.read_to_string(&mut text).await?;
        Ok::<_, std::io::Error>(text)
    };
    let text = tokio::time::timeout(WAIT, answer)
        .await
        .expect("timed out")
        .expect("connect");
    text.trim().parse().unwrap()
}

async fn listen(cluster: &mut Cluster, worker: &WorkerHandle, spec: Listen) -> Reply {
    cluster.ask(worker, Command::ListenSpec(spec)).await
}

fn unix(path: &Path, options: Options) -> Listen {
    Listen::Unix {
        path: path.to_str().unwrap().into(),
        options,
    }
}

fn tcp(addr: &str, options: Options) -> Listen {
    Listen::Tcp {
        addr: addr.into(),
        options,
    }
}

fn port_of(reply: &Reply) -> u16 {
    match reply {
        Reply::Listening { port, .. } | Reply::UdpBound { port } => *port,
        other => panic!("bind failed: {other:?}"),
    }
}

fn failure_kind(reply: &Reply) -> &str {
    match reply {
        Reply::BindFailed { kind, .. } => kind,
        other => panic!("expected a bind failure, got {other:?}"),
    }
}

#[tokio::test]
async fn unix_socket_paths_are_distributed_like_ports_and_removed_with_the_last_worker() {
    for policy in POLICIES {
        let scratch = Scratch::new(&format!("unix-{policy:?}"));
        let path = scratch.0.join("app.sock");
        let mut cluster = Cluster::start(policy);
        let (w1, w2) = (cluster.fork().await, cluster.fork().await);
        for w in [&w1, &w2] {
            let reply = listen(&mut cluster, w, unix(&path, Options::default())).await;
            assert!(matches!(reply, Reply::Listening { .. }), "{reply:?}");
        }
        assert!(std::fs::metadata(&path).unwrap().file_type().is_socket());
        let mut served = Vec::new();
        for _ in 0..10 {
            served.push(who_unix(&path).await);
        }
        let ids = [w1.id().get(), w2.id().get()];
        assert!(served.iter().all(|id| ids.contains(id)), "{served:?}");
        if policy == SchedulingPolicy::RoundRobin {
            // Strict rotation, as for TCP.
            assert!(served.windows(2).all(|w| w[0] != w[1]), "{served:?}");
        }
        // The first worker leaves: the file stays for the second; when it leaves, it goes.
        cluster.ask(&w1, Command::Close { index: 0 }).await;
        assert!(
            path.exists(),
            "{policy:?}: removed while a worker still listens"
        );
        assert_eq!(who_unix(&path).await, w2.id().get());
        cluster.ask(&w2, Command::Close { index: 0 }).await;
        assert!(
            !path.exists(),
            "{policy:?}: the socket file outlived its last worker"
        );
        assert_eq!(cluster.primary.counters().await.unwrap().listeners, 0);
    }
}

#[tokio::test]
async fn long_unix_paths_permissions_and_stale_files() {
    let scratch = Scratch::new("unix-long");
    let deep = scratch
        .0
        .join("a-directory-name-long-enough-to-push-the-path-past-sun-path-limit");
    std::fs::create_dir_all(&deep).unwrap();
    let path = deep.join("service-with-a-long-name.sock");
    assert!(path.as_os_str().len() > 108, "{}", path.display());
    // A crashed run left its socket file behind: nothing accepts on it.
    {
        let (short, _dir) = reachable(&path);
        drop(std::os::unix::net::UnixListener::bind(short).unwrap());
    }
    assert!(path.exists());

    let mut cluster = Cluster::start(SchedulingPolicy::RoundRobin);
    let w = cluster.fork().await;
    let options = Options {
        readable_all: true,
        writable_all: true,
        ..Options::default()
    };
    let reply = listen(&mut cluster, &w, unix(&path, options)).await;
    assert!(matches!(reply, Reply::Listening { .. }), "{reply:?}");
    let mode = std::fs::metadata(&path).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o777, "{mode:o}");
    assert_eq!(who_unix(&path).await, w.id().get());

    // A live socket someone else serves is not taken over, nor is a file that is no socket.
    let live = scratch.0.join("live.sock");
    let _holder = std::os::unix::net::UnixListener::bind(&live).unwrap();
    let reply = listen(&mut cluster, &w, unix(&live, Options::default())).await;
    assert_eq!(failure_kind(&reply), "AddrInUse");
    let plain = scratch.0.join("plain-file");
    std::fs::write(&plain, b"keep me").unwrap();
    let reply = listen(&mut cluster, &w, unix(&plain, Options::default())).await;
    assert_eq!(failure_kind(&reply), "AddrInUse");
    assert_eq!(std::fs::read(&plain).unwrap(), b"keep me");
    // And a directory that does not exist is a clear error, not a crash.
    let nowhere = scratch.0.join("missing/app.sock");
    let reply = listen(&mut cluster, &w, unix(&nowhere, Options::default())).await;
    assert_eq!(failure_kind(&reply), "NotFound");

    cluster.ask(&w, Command::Close { index: 0 }).await;
    assert!(!path.exists());
    assert!(live.exists(), "someone else's socket file was removed");
}

#[tokio::test]
async fn listening_on_an_inherited_fd_shares_the_primarys_socket() {
    for policy in POLICIES {
        let mut cluster = Cluster::start(policy);
        let (w1, w2) = (cluster.fork().await, cluster.fork().await);
        let ids = [w1.id().get(), w2.id().get()];
        // This test process is the primary: its fds are the primary's.
        let tcp_listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = tcp_listener.local_addr().unwrap().port();
        let fd = tcp_listener.as_raw_fd();
        for w in [&w1, &w2] {
            let reply = listen(&mut cluster, w, Listen::PrimaryFd { fd, unix: false }).await;
            assert_eq!(port_of(&reply), port, "{policy:?}");
        }
        for _ in 0..4 {
            assert!(ids.contains(&who(port).await));
        }

        let scratch = Scratch::new(&format!("fd-{policy:?}"));
        let path = scratch.0.join("inherited.sock");
        let unix_listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let fd = unix_listener.as_raw_fd();
        let reply = listen(&mut cluster, &w1, Listen::PrimaryFd { fd, unix: true }).await;
        assert!(matches!(reply, Reply::Listening { .. }), "{reply:?}");
        assert_eq!(who_unix(&path).await, w1.id().get());

        // Asking for the wrong kind, or an fd that is not open, is a clear error.
        let reply = listen(&mut cluster, &w2, Listen::PrimaryFd { fd, unix: false }).await;
        assert_eq!(failure_kind(&reply), "InvalidInput");
        let reply = listen(
            &mut cluster,
            &w1,
            Listen::PrimaryFd {
                fd: 9999,
                unix: false,
            },
        )
        .await;
        assert!(
            matches!(reply, Reply::BindFailed { errno: Some(9), .. }),
            "{reply:?}"
        );

        // The same fd asked for as the other kind is another handle, refused on its own.
        let tcp_fd = UdpTarget::PrimaryFd(tcp_listener.as_raw_fd());
        let reply = cluster
            .ask(
                &w2,
                Command::Udp {
                    target: tcp_fd,
                    options: Options::default(),
                },
            )
            .await;
        assert_eq!(failure_kind(&reply), "InvalidInput", "{policy:?}");

        let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let udp_port = udp.local_addr().unwrap().port();
        let target = UdpTarget::PrimaryFd(udp.as_raw_fd());
        let options = Options::default();
        let reply = cluster.ask(&w2, Command::Udp { target, options }).await;
        assert_eq!(port_of(&reply), udp_port);
        assert_eq!(
            udp_exchange(udp_port, "hi").await,
            format!("worker {}: hi", ids[1])
        );
        // The primary's own fds stay open and usable: it listened on copies.
        drop(cluster);
        assert!(tcp_listener.local_addr().is_ok() && unix_listener.local_addr().is_ok());
    }
}

/// Sends `text` to 127.0.0.1:`port` and returns the answer.
async fn udp_exchange(port: u16, text: &str) -> String {
    let client = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    client
        .send_to(text.as_bytes(), ("127.0.0.1", port))
        .await
        .unwrap();
    let mut buf = [0; 1500];
    let (len, _) = tokio::time::timeout(WAIT, client.recv_from(&mut buf))
        .await
        .expect("no answer")
        .unwrap();
    String::from_utf8(buf[..len].to_vec()).unwrap()
}

#[tokio::test]
async fn exclusive_own_and_reuse_port_binds_bypass_the_primary() {
    let mut cluster = Cluster::start(SchedulingPolicy::RoundRobin);
    let (w1, w2) = (cluster.fork().await, cluster.fork().await);
    let exclusive = Options {
        exclusive: true,
        ..Options::default()
    };
    // Scenario 5: port 0 gives each worker its own port; a fixed one is taken by the first.
    let p1 = port_of(&listen(&mut cluster, &w1, tcp("127.0.0.1:0", exclusive)).await);
    let p2 = port_of(&listen(&mut cluster, &w2, tcp("127.0.0.1:0", exclusive)).await);
    assert_ne!(p1, p2);
    assert_eq!(who(p1).await, w1.id().get());
    assert_eq!(who(p2).await, w2.id().get());
    let taken = format!("127.0.0.1:{p1}");
    assert_eq!(
        failure_kind(&listen(&mut cluster, &w2, tcp(&taken, exclusive)).await),
        "AddrInUse"
    );
    // Scenario 23: a worker that brings its own socket.
    let own = port_of(
        &listen(
            &mut cluster,
            &w1,
            Listen::Own {
                addr: "127.0.0.1:0".into(),
            },
        )
        .await,
    );
    assert_eq!(who(own).await, w1.id().get());
    // Scenario 28: every worker binds the same port with SO_REUSEPORT.
    let free = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let reuse = Options {
        reuse_port: true,
        ..Options::default()
    };
    let addr = format!("127.0.0.1:{free}");
    for w in [&w1, &w2] {
        assert_eq!(
            port_of(&listen(&mut cluster, w, tcp(&addr, reuse)).await),
            free
        );
    }
    assert!([w1.id().get(), w2.id().get()].contains(&who(free).await));
    // The primary holds none of these sockets.
    assert_eq!(cluster.primary.counters().await.unwrap().listeners, 0);
}

#[tokio::test]
async fn ipv6_only_leaves_ipv4_to_others() {
    for policy in POLICIES {
        let mut cluster = Cluster::start(policy);
        let w = cluster.fork().await;
        let v6only = Options {
            ipv6_only: true,
            ..Options::default()
        };
        // The IPv6 socket leaves the IPv4 port free; another test of this process may take
        // that port number meanwhile, so a few tries (a primary that ignored `ipv6_only` takes
        // it every time).
        let mut tries = Vec::new();
        let port = loop {
            let port = port_of(&listen(&mut cluster, &w, tcp("[::]:0", v6only)).await);
            match std::net::TcpListener::bind(("0.0.0.0", port)) {
                Ok(_) => break port,
                Err(error) => tries.push((port, error)),
            }
            assert!(tries.len() < 5, "{policy:?}: IPv4 ports taken: {tries:?}");
        };
        let v6 = tokio::net::TcpStream::connect(("::1", port)).await;
        assert!(v6.is_ok(), "{policy:?}: {v6:?}");
    }
}

#[tokio::test]
async fn udp_is_shared_by_every_worker_even_under_round_robin() {
    let mut cluster = Cluster::start(SchedulingPolicy::RoundRobin);
    let mut workers = Vec::new();
    let mut ports = Vec::new();
    for _ in 0..4 {
        let w = cluster.fork().await;
        let target = UdpTarget::Addr("127.0.0.1:0".into());
        let reply = cluster
            .ask(
                &w,
                Command::Udp {
                    target,
                    options: Options::default(),
                },
            )
            .await;
        ports.push(port_of(&reply));
        workers.push(w);
    }
    assert!(ports.iter().all(|p| *p == ports[0] && *p != 0), "{ports:?}");
    // Whoever answers, every datagram is answered on the one port; take away the worker that
    // answered and another one answers next, until one is left.
    let mut answered = Vec::new();
    for round in 0..4 {
        let text = format!("ping {round}");
        let answer = udp_exchange(ports[0], &text).await;
        let (who, rest) = answer.split_once(": ").expect("worker <id>: <payload>");
        assert_eq!(rest, text);
        let id: u64 = who.strip_prefix("worker ").unwrap().parse().unwrap();
        assert!(
            !answered.contains(&id),
            "a killed worker answered: {answer}"
        );
        answered.push(id);
        if round < 3 {
            let w = workers.iter().find(|w| w.id().get() == id).unwrap();
            w.kill(Signal::KILL).unwrap();
            tokio::time::timeout(WAIT, w.exited()).await.unwrap();
        }
    }
    let stats = cluster.primary.counters().await.unwrap();
    assert_eq!(
        (stats.listeners, stats.connections_held),
        (1, 0),
        "{stats:?}"
    );
}

#[tokio::test]
async fn udp_reuse_addr_and_ipv6_only() {
    let mut cluster = Cluster::start(SchedulingPolicy::Shared);
    let w = cluster.fork().await;
    let udp = |addr: &str, options| Command::Udp {
        target: UdpTarget::Addr(addr.into()),
        options,
    };
    let reuse = Options {
        reuse_addr: true,
        ..Options::default()
    };
    let shared = port_of(&cluster.ask(&w, udp("127.0.0.1:0", reuse)).await);
    let plain = port_of(
        &cluster
            .ask(&w, udp("127.0.0.1:0", Options::default()))
            .await,
    );
    let bind_reusing = |port: u16| {
        let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::DGRAM, None)?;
        socket.set_reuse_address(true)?;
        socket.bind(&std::net::SocketAddr::from(([127, 0, 0, 1], port)).into())
    };
    assert!(bind_reusing(shared).is_ok(), "SO_REUSEADDR was not set");
    assert!(
        bind_reusing(plain).is_err(),
        "SO_REUSEADDR set without being asked"
    );
    let v6only = Options {
        ipv6_only: true,
        ..Options::default()
    };
    let port = port_of(&cluster.ask(&w, udp("[::]:0", v6only)).await);
    assert!(std::net::UdpSocket::bind(("0.0.0.0", port)).is_ok());
    // And it serves IPv6.
    let client = tokio::net::UdpSocket::bind("[::1]:0").await.unwrap();
    client.send_to(b"six", ("::1", port)).await.unwrap();
    let mut buf = [0; 64];
    let (len, _) = tokio::time::timeout(WAIT, client.recv_from(&mut buf))
        .await
        .expect("no answer over IPv6")
        .unwrap();
    assert_eq!(
        &buf[..len],
        format!("worker {}: six", w.id().get()).as_bytes()
    );
}

#[tokio::test]
async fn outside_a_worker_the_listeners_bind_themselves() {
    // This test process is no worker: the same API binds here, as a plain server would.
    let scratch = Scratch::new("unclustered");
    let path = scratch.0.join("plain.sock");
    let mut unix = cluster::net::ClusterUnixListener::bind(&path)
        .await
        .unwrap();
    assert_eq!(unix.path(), path);
    let client = tokio::net::UnixStream::connect(&path).await.unwrap();
    let (_served, _) = tokio::time::timeout(WAIT, unix.accept())
        .await
        .unwrap()
        .unwrap();
    drop((client, unix));
    assert!(
        !path.exists(),
        "an unclustered listener removes its socket file"
    );

    let udp = cluster::net::ClusterUdpSocket::bind("127.0.0.1:0")
        .await
        .unwrap();
    let port = udp.local_addr().unwrap().port();
    let client = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    client.send_to(b"x", ("127.0.0.1", port)).await.unwrap();
    let mut buf = [0; 8];
    let (len, _) = tokio::time::timeout(WAIT, udp.recv_from(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&buf[..len], b"x");
}

#[tokio::test]
async fn a_udp_bind_dropped_before_the_reply_leaves_nothing_behind() {
    let mut cluster = Cluster::start(SchedulingPolicy::RoundRobin);
    let w = cluster.fork().await;
    let Reply::Fds { count: before } = cluster.ask(&w, Command::CountFds).await else {
        panic!()
    };
    let addr = "127.0.0.1:0".to_owned();
    let Reply::Fds { count: after } = cluster.ask(&w, Command::UdpCancelled { addr }).await else {
        panic!()
    };
    assert_eq!(
        after, before,
        "the worker kept the socket of a cancelled bind"
    );
    let stats = cluster.primary.counters().await.unwrap();
    assert_eq!(
        stats.listeners, 0,
        "the primary kept a handle nobody uses: {stats:?}"
    );
}

/// The accept backlog of the IPv4 TCP socket listening on `port`, as the kernel reports it to
/// `ss` (`sock_diag` over netlink: for a listener, `idiag_wqueue` is its backlog).
fn listen_backlog(port: u16) -> Option<u32> {
    use socket2::{Domain, Protocol, Socket, Type};
    const NETLINK_SOCK_DIAG: i32 = 4;
    const SOCK_DIAG_BY_FAMILY: u16 = 20;
    const NLMSG_DONE: u16 = 3;
    const NLM_F_REQUEST_DUMP: u16 = 0x1 | 0x300;
    const TCP_LISTEN: u32 = 10;
    let socket = Socket::new(
        Domain::from(libc::AF_NETLINK),
        Type::DGRAM,
        Some(Protocol::from(NETLINK_SOCK_DIAG)),
    )
    .unwrap();
    // nlmsghdr (16 bytes), then inet_diag_req_v2 (56 bytes), all in native byte order.
    let mut request = Vec::new();
    request.extend_from_slice(&72u32.to_ne_bytes());
    request.extend_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
    request.extend_from_slice(&NLM_F_REQUEST_DUMP.to_ne_bytes());
    request.extend_from_slice(&[0; 8]); // seq, pid
    request.extend_from_slice(&[libc::AF_INET as u8, libc::IPPROTO_TCP as u8, 0, 0]);
    request.extend_from_slice(&(1u32 << TCP_LISTEN).to_ne_bytes());
    request.extend_from_slice(&[0; 48]); // inet_diag_sockid: match all
    socket.send(&request).unwrap();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let len = std::io::Read::read(&mut &socket, &mut buf).unwrap();
        let bytes = &buf[..len];
        let mut at = 0;
        while at + 16 <= bytes.len() {
            let msg_len = u32::from_ne_bytes(bytes[at..at + 4].try_into().unwrap()) as usize;
            let msg_type = u16::from_ne_bytes(bytes[at + 4..at + 6].try_into().unwrap());
            if msg_type == NLMSG_DONE || msg_len < 16 {
                return None;
            }
            // inet_diag_msg: family, state, timer, retrans, then sockid (sport big-endian first).
            let body = &bytes[at + 16..at + msg_len];
            let sport = u16::from_be_bytes([body[4], body[5]]);
            if sport == port {
                // After sockid (48 bytes): expires, rqueue, wqueue.
                return Some(u32::from_ne_bytes(body[60..64].try_into().unwrap()));
            }
            at += (msg_len + 3) & !3;
        }
    }
}

#[tokio::test]
async fn the_first_workers_backlog_is_the_one_the_primary_applies() {
    for policy in POLICIES {
        let mut cluster = Cluster::start(policy);
        let (w1, w2) = (cluster.fork().await, cluster.fork().await);
        let with_backlog = |backlog| Options {
            backlog,
            ..Options::default()
        };
        let port = free_port();
        let addr = format!("127.0.0.1:{port}");
        for (w, backlog) in [(&w1, 7), (&w2, 100)] {
            let bound = port_of(&listen(&mut cluster, w, tcp(&addr, with_backlog(backlog))).await);
            assert_eq!(bound, port);
        }
        assert_eq!(listen_backlog(port), Some(7), "{policy:?}");
        // No backlog asked: the primary's setting (Node's default, 511).
        let other =
            port_of(&listen(&mut cluster, &w2, tcp("127.0.0.1:0", Options::default())).await);
        assert_eq!(listen_backlog(other), Some(511), "{policy:?}");
    }
}
