//! Wire messages exchanged between the primary and its workers.
//!
//! One message travels in one `SOCK_SEQPACKET` datagram, encoded with postcard (see [`codec`]).
//! [`WorkerMessage`] flows from a worker to the primary and [`PrimaryMessage`] the other way. The
//! first message on each side is the handshake ([`WorkerMessage::Online`] and
//! [`PrimaryMessage::Hello`]); both are variant 0 of their enum with the protocol version as their
//! first field, and must stay so in every future version so that a mismatch is always detected.
//!
//! Requests carry a [`Seq`]; their replies carry the same number as `ack`. `docs/PROTOCOL.md` lists
//! every message with a byte example.

pub mod codec;

use std::fmt;
use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

pub use codec::{
    DecodeError, EncodeError, MAX_FRAME, MAX_PAYLOAD, decode, encode, handshake_version,
};

/// The version of this protocol. Both handshake messages carry it; a peer speaking another
/// version is disconnected with [`crate::LinkError::VersionMismatch`].
pub const PROTOCOL_VERSION: u16 = 4;

/// The most unread bytes a connection may carry when a worker hands it back
/// ([`WorkerMessage::HandBack`]) and when it is handed over again ([`PrimaryMessage::NewConn`]):
/// half a frame, so both messages always fit in one. A partial request head at an idle point is
/// far smaller; a connection holding more is served and closed where it is.
pub const MAX_PREFIX: usize = MAX_FRAME / 2;

/// How often a worker's runtime sends [`WorkerMessage::Heartbeat`].
pub const HEARTBEAT_INTERVAL: std::time::Duration = std::time::Duration::from_secs(1);

/// A request number, unique per link and direction, starting at 1.
///
/// Unlike Node (one counter per process), each link numbers its own requests, so a duplicate or
/// stale ack is detectable per worker.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Seq(u64);

impl Seq {
    /// Wraps a raw sequence number (as read off the wire or in tests).
    pub const fn new(raw: u64) -> Self {
        Self(raw)
    }

    /// The raw number.
    pub const fn get(self) -> u64 {
        self.0
    }
}

impl fmt::Display for Seq {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "#{}", self.0)
    }
}

/// The primary's name for one listening handle, assigned when a listen is first requested and
/// echoed in every later message about it (a compact stand-in for the [`crate::HandleKey`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct HandleId(u32);

impl HandleId {
    /// Wraps a raw handle number.
    pub const fn new(raw: u32) -> Self {
        Self(raw)
    }

    /// The raw number.
    pub const fn get(self) -> u32 {
        self.0
    }
}

impl fmt::Display for HandleId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "handle {}", self.0)
    }
}

/// A worker's id: assigned by the primary from 1 upwards and never reused (as Node's).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct WorkerId(u64);

impl WorkerId {
    /// Wraps a raw id, e.g. one read from `CLUSTER_WORKER_ID`.
    pub const fn new(raw: u64) -> Self {
        Self(raw)
    }

    /// The raw id.
    pub const fn get(self) -> u64 {
        self.0
    }
}

impl fmt::Display for WorkerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "worker {}", self.0)
    }
}

/// A Linux `errno` value carried across the link, so that a worker can rebuild the exact
/// `io::Error` the primary saw (`io::Error::from_raw_os_error`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Errno(pub i32);

impl Errno {
    /// `EINVAL`: the request is malformed.
    pub const EINVAL: Self = Self(22);
    /// `EADDRINUSE`: the address is taken (also: this worker already listens on this fixed port).
    pub const EADDRINUSE: Self = Self(98);
    /// `ESHUTDOWN`: the worker is disconnecting and may not start new listens.
    pub const ESHUTDOWN: Self = Self(108);
    /// `EMFILE`: the worker holds too many handles.
    pub const EMFILE: Self = Self(24);
}

impl fmt::Display for Errno {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "errno {}", self.0)
    }
}

/// What a listen is bound to.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum ListenTarget {
    /// A file descriptor the primary already holds (Node's `listen({fd})`: fd N *in the primary*).
    Fd(i32),
    /// An IP address and port; port 0 asks for one ephemeral port shared by all workers.
    Ip(#[serde(with = "socket_addr")] SocketAddr),
    /// A Unix socket path, as raw bytes (paths need not be UTF-8).
    Path(Vec<u8>),
    /// A socket the primary's service manager passed under this name (systemd's
    /// `FileDescriptorName=`, in `LISTEN_FDNAMES`).
    Name(String),
}

/// The socket type requested.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum SocketKind {
    /// Datagrams (UDP): always shared, never round-robin.
    Datagram,
    /// Streams (TCP or Unix stream sockets).
    Stream,
}

/// Options of a listen that change the socket the primary creates.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize,
)]
pub struct ListenFlags {
    /// `IPV6_V6ONLY` on an IPv6 socket (otherwise `::` is dual-stack).
    pub ipv6_only: bool,
    /// `SO_REUSEADDR` on a datagram socket.
    pub reuse_addr: bool,
    /// Unix sockets: make the socket file readable by all.
    pub readable_all: bool,
    /// Unix sockets: make the socket file writable by all.
    pub writable_all: bool,
}

/// A worker's listen request (Node's `queryServer`).
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ListenRequest {
    /// Where to listen.
    pub target: ListenTarget,
    /// Stream or datagram.
    pub kind: SocketKind,
    /// The accept backlog; 0 means the primary's default. The first worker's value is used.
    pub backlog: u32,
    /// Socket options.
    pub flags: ListenFlags,
}

/// How connections of one handle reach workers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Distribution {
    /// The primary accepts and hands each connection to one worker ([`PrimaryMessage::NewConn`]).
    RoundRobin,
    /// The worker received the listening socket itself and accepts on it (Node's `SCHED_NONE`).
    Shared,
}

/// The address a handle is bound to, as the primary's `getsockname` reports it.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum BoundAddr {
    /// An IP socket; for port 0 this carries the real port.
    Ip(#[serde(with = "socket_addr")] SocketAddr),
    /// A Unix socket path, or an fd-based listener with no name (empty).
    Path(Vec<u8>),
}

/// A successful listen.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListenInfo {
    /// The handle to name in `Listening`, `Close` and `Ready`.
    pub handle: HandleId,
    /// Where the handle is bound.
    pub addr: BoundAddr,
    /// Whether connections will come as `NewConn` or the listening fd is attached to this reply.
    pub distribution: Distribution,
    /// The primary schedules by the connections each worker has open (least-outstanding, or a
    /// per-worker cap): the worker reports a connection of this handle that ended as soon as
    /// it can (in an `Accepted`, or a `Heartbeat` if no ack is owed), not only with the next
    /// ack or heartbeat due.
    pub report_ends: bool,
}

/// Messages from a worker to the primary.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum WorkerMessage {
    /// The handshake, sent by the worker's runtime before user code runs (Node's `online`).
    /// Must stay variant 0 with `version` first.
    Online {
        /// The worker's [`PROTOCOL_VERSION`].
        version: u16,
        /// The worker's process id, as the worker sees it.
        pid: u32,
    },
    /// Asks the primary for a listening handle (Node's `queryServer`). Answered by
    /// [`PrimaryMessage::ListenReply`].
    QueryServer {
        /// The request number.
        seq: Seq,
        /// What to listen on.
        request: ListenRequest,
    },
    /// The worker's listener for `handle` is ready (Node's `listening`).
    Listening {
        /// The handle from the [`ListenInfo`].
        handle: HandleId,
    },
    /// Acknowledges every [`PrimaryMessage::NewConn`] up to `through` that the worker did not
    /// refuse: cumulative, so one frame answers many. Sent at once for a `NewConn` that asks for
    /// it (`reply`), otherwise with the next one that does, before the next heartbeat, or before
    /// `ExitedAfterDisconnect`, whichever comes first.
    Accepted {
        /// The highest `seq` acknowledged.
        through: Seq,
        /// How many connections handed to this worker have ended since its handshake
        /// (cumulative; see [`WorkerMessage::Heartbeat`]).
        ended: u64,
    },
    /// The worker has capacity again on `handle` after refusing a connection.
    Ready {
        /// The handle.
        handle: HandleId,
    },
    /// The worker closed its listener for `handle` (Node's `close`).
    Close {
        /// The handle.
        handle: HandleId,
    },
    /// The worker is leaving on purpose (Node's `exitedAfterDisconnect`); answered by
    /// [`PrimaryMessage::DisconnectAck`], after which the worker closes the link.
    ExitedAfterDisconnect {
        /// The request number.
        seq: Seq,
    },
    /// A user message, request or reply; with `fd`, one fd is attached.
    User(Envelope),
    /// Gives back a connection of `handle` that the worker acked but will not serve (its
    /// listener closed before the application accepted it); exactly one fd is attached. The
    /// primary hands it to another worker, or closes it if none is left.
    Return {
        /// The handle it was handed over on.
        handle: HandleId,
    },
    /// Sent every [`HEARTBEAT_INTERVAL`] by the worker's runtime: a blocked runtime stops
    /// sending it, and the primary kills a worker it has heard nothing from for its heartbeat
    /// timeout. Also sent to report ended connections when no ack is owed to carry them.
    Heartbeat {
        /// How many connections handed to this worker have ended since its handshake: closed
        /// after the application was done with them, or taken by an application that does not
        /// say when they end (see the guide). Cumulative, so a report is never lost or counted
        /// twice; it never decreases, and never exceeds the connections the worker acked and
        /// did not give back (both are protocol violations). Connections refused or given back
        /// are not in it: the primary counts those itself.
        ended: u64,
    },
    /// The next bytes of the payload of the next [`WorkerMessage::User`] (a message larger than
    /// one frame travels as fragments and a final `User`; see [`crate::user`]).
    Fragment {
        /// A slice of the payload.
        #[serde(with = "serde_bytes")]
        data: Vec<u8>,
    },
    /// Refuses one [`PrimaryMessage::NewConn`]; the connection's fd is attached (the primary
    /// kept no copy) and goes to another worker. The worker is then offered nothing more on that
    /// handle until it sends [`WorkerMessage::Ready`].
    Refused {
        /// The `seq` of the `NewConn`.
        ack: Seq,
    },
    /// The application declared itself ready to serve (its warm-up is done). Sent at most once.
    ServiceReady,
    /// Gives back a connection of `handle` that the worker served and stopped at an idle point
    /// (between requests) because it is leaving; exactly one fd is attached. `prefix` holds the
    /// bytes the worker read from it but did not use (at most [`MAX_PREFIX`]), to be read
    /// before what is still in the socket. The primary hands it to another worker as if it
    /// had just been accepted.
    HandBack {
        /// The handle it was handed over on.
        handle: HandleId,
        /// The bytes read from it and not used, in order.
        #[serde(with = "serde_bytes")]
        prefix: Vec<u8>,
    },
    /// The worker's listener for `handle` takes connections that carry a prefix
    /// ([`PrimaryMessage::NewConn::prefix`]); without this it is only offered connections
    /// without one.
    TakesPrefixes {
        /// The handle.
        handle: HandleId,
    },
}

/// Messages from the primary to a worker.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum PrimaryMessage {
    /// The handshake, the primary's first message to a new worker. Must stay variant 0 with
    /// `version` first.
    Hello {
        /// The primary's [`PROTOCOL_VERSION`].
        version: u16,
    },
    /// Answers a [`WorkerMessage::QueryServer`]. For [`Distribution::Shared`] the listening fd is
    /// attached to this datagram.
    ListenReply {
        /// The `seq` of the query.
        ack: Seq,
        /// The handle, or the errno of the failed bind.
        result: Result<ListenInfo, Errno>,
    },
    /// A connection accepted by the primary; exactly one fd is attached, and the primary closed
    /// its own copy when it sent it. Answered by [`WorkerMessage::Accepted`] (cumulative) or
    /// [`WorkerMessage::Refused`].
    NewConn {
        /// The request number.
        seq: Seq,
        /// The handle it was accepted on.
        handle: HandleId,
        /// Acknowledge at once: the primary's window for this worker is filling up. Otherwise
        /// the acknowledgement may wait (see [`WorkerMessage::Accepted`]).
        reply: bool,
        /// Bytes to read before what is in the socket: another worker read them before it
        /// handed the connection back ([`WorkerMessage::HandBack`]). Empty for a connection
        /// accepted by the primary, and for every worker that did not send
        /// [`WorkerMessage::TakesPrefixes`] for `handle`.
        #[serde(with = "serde_bytes")]
        prefix: Vec<u8>,
    },
    /// Asks the worker to close its listeners, finish its connections and leave (Node's
    /// `disconnect`) within `within_ms` milliseconds, after which the primary kills it.
    Disconnect {
        /// How long the worker has, from when the primary sent this.
        within_ms: u64,
        /// Other workers stay: the worker may hand its idle connections back
        /// ([`WorkerMessage::HandBack`]) instead of closing them. False when the whole cluster
        /// stops.
        hand_back: bool,
    },
    /// Answers [`WorkerMessage::ExitedAfterDisconnect`].
    DisconnectAck {
        /// The `seq` of the request.
        ack: Seq,
    },
    /// A user message, request or reply; with `fd`, one fd is attached.
    User(Envelope),
    /// The next bytes of the payload of the next [`PrimaryMessage::User`].
    Fragment {
        /// A slice of the payload.
        #[serde(with = "serde_bytes")]
        data: Vec<u8>,
    },
}

/// What a user frame is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum UserKind {
    /// A message; nothing answers it.
    Message,
    /// A request, answered by one `Reply` or `Refusal` with the same number.
    Request {
        /// The request number, chosen by the sender (unique per link and direction).
        seq: Seq,
    },
    /// The answer to a request.
    Reply {
        /// The request's `seq`.
        ack: Seq,
    },
    /// A request that was not answered: the payload is the reason, as UTF-8 text.
    Refusal {
        /// The request's `seq`.
        ack: Seq,
    },
}

/// A user frame: a postcard-encoded user value, opaque to the core, and maybe one fd.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Envelope {
    /// Message, request or reply.
    pub kind: UserKind,
    /// Whether one fd travels with this frame.
    pub fd: bool,
    /// The encoded value (the whole of it, once fragments are put back together).
    #[serde(with = "serde_bytes")]
    pub payload: Vec<u8>,
}

/// Socket addresses on the wire. serde's own encoding of `SocketAddrV6` drops `flowinfo` and
/// `scope_id`, which would silently move a link-local listen (`fe80::1%2`) off its interface.
mod socket_addr {
    use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};

    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    #[derive(Serialize, Deserialize)]
    enum Wire {
        V4([u8; 4], u16),
        V6([u8; 16], u16, u32, u32),
    }

    pub(super) fn serialize<S: Serializer>(addr: &SocketAddr, s: S) -> Result<S::Ok, S::Error> {
        match addr {
            SocketAddr::V4(a) => Wire::V4(a.ip().octets(), a.port()),
            SocketAddr::V6(a) => Wire::V6(a.ip().octets(), a.port(), a.flowinfo(), a.scope_id()),
        }
        .serialize(s)
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<SocketAddr, D::Error> {
        Ok(match Wire::deserialize(d)? {
            Wire::V4(ip, port) => SocketAddrV4::new(Ipv4Addr::from(ip), port).into(),
            Wire::V6(ip, port, flowinfo, scope_id) => {
                SocketAddrV6::new(Ipv6Addr::from(ip), port, flowinfo, scope_id).into()
            }
        })
    }
}

/// A message of either direction.
pub trait Message: Serialize + serde::de::DeserializeOwned {
    /// How many fds must travel with this message.
    fn fd_count(&self) -> usize;
}

impl Message for PrimaryMessage {
    fn fd_count(&self) -> usize {
        Self::fd_count(self)
    }
}

impl Message for WorkerMessage {
    fn fd_count(&self) -> usize {
        Self::fd_count(self)
    }
}

impl PrimaryMessage {
    /// How many fds must travel with this message (for [`Distribution::Shared`] replies, one).
    pub fn fd_count(&self) -> usize {
        match self {
            Self::NewConn { .. } => 1,
            Self::User(Envelope { fd: true, .. }) => 1,
            Self::ListenReply {
                result:
                    Ok(ListenInfo {
                        distribution: Distribution::Shared,
                        ..
                    }),
                ..
            } => 1,
            _ => 0,
        }
    }
}

impl WorkerMessage {
    /// How many fds must travel with this message (one with `Refused`, `Return` and
    /// `HandBack`).
    pub fn fd_count(&self) -> usize {
        match self {
            Self::Refused { .. }
            | Self::Return { .. }
            | Self::HandBack { .. }
            | Self::User(Envelope { fd: true, .. }) => 1,
            _ => 0,
        }
    }
}
