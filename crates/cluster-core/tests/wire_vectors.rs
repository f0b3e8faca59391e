//! Byte-exact wire vectors: every example in `docs/PROTOCOL.md` encodes to exactly its bytes,
//! decodes back to its message, and appears verbatim in the document, so neither can drift.

use std::net::{SocketAddr, SocketAddrV6};

use cluster_core::wire::{
    self, BoundAddr, Distribution, Envelope, Errno, HandleId, ListenFlags, ListenInfo,
    ListenRequest, ListenTarget, PROTOCOL_VERSION, PrimaryMessage, Seq, SocketKind, UserKind,
    WorkerMessage,
};

const PROTOCOL_MD: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/PROTOCOL.md");

/// The heading of the section whose table lists the vectors.
const SECTION: &str = "## 5. Byte examples";

#[derive(Debug)]
enum Message {
    Worker(WorkerMessage),
    Primary(PrimaryMessage),
}

struct Vector {
    message: Message,
    hex: &'static str,
}

fn worker(message: WorkerMessage, hex: &'static str) -> Vector {
    Vector {
        message: Message::Worker(message),
        hex,
    }
}

fn primary(message: PrimaryMessage, hex: &'static str) -> Vector {
    Vector {
        message: Message::Primary(message),
        hex,
    }
}

fn tcp(addr: SocketAddr, backlog: u32, flags: ListenFlags) -> ListenRequest {
    ListenRequest {
        target: ListenTarget::Ip(addr),
        kind: SocketKind::Stream,
        backlog,
        flags,
    }
}

/// The vectors, in the order of the table in `docs/PROTOCOL.md`.
fn vectors() -> Vec<Vector> {
    let link_local: SocketAddr = SocketAddrV6::new("fe80::1".parse().unwrap(), 8080, 0, 2).into();
    vec![
        worker(
            WorkerMessage::Online {
                version: PROTOCOL_VERSION,
                pid: 4242,
            },
            "00 04 92 21",
        ),
        worker(
            WorkerMessage::QueryServer {
                seq: Seq::new(1),
                request: tcp("127.0.0.1:0".parse().unwrap(), 0, ListenFlags::default()),
            },
            "01 01 01 00 7f 00 00 01 00 01 00 00 00 00 00",
        ),
        worker(
            WorkerMessage::QueryServer {
                seq: Seq::new(2),
                request: tcp(
                    link_local,
                    511,
                    ListenFlags {
                        ipv6_only: true,
                        ..ListenFlags::default()
                    },
                ),
            },
            "01 02 01 01 fe 80 00 00 00 00 00 00 00 00 00 00 00 00 00 01 90 3f 00 02 01 ff 03 01 00 00 00",
        ),
        worker(
            WorkerMessage::QueryServer {
                seq: Seq::new(3),
                request: ListenRequest {
                    target: ListenTarget::Ip("0.0.0.0:5353".parse().unwrap()),
                    kind: SocketKind::Datagram,
                    backlog: 0,
                    flags: ListenFlags {
                        reuse_addr: true,
                        ..ListenFlags::default()
                    },
                },
            },
            "01 03 01 00 00 00 00 00 e9 29 00 00 00 01 00 00",
        ),
        worker(
            WorkerMessage::QueryServer {
                seq: Seq::new(4),
                request: ListenRequest {
                    target: ListenTarget::Path(b"/tmp/app.sock".to_vec()),
                    kind: SocketKind::Stream,
                    backlog: 0,
                    flags: ListenFlags::default(),
                },
            },
            "01 04 02 0d 2f 74 6d 70 2f 61 70 70 2e 73 6f 63 6b 01 00 00 00 00 00",
        ),
        worker(
            WorkerMessage::QueryServer {
                seq: Seq::new(5),
                request: ListenRequest {
                    target: ListenTarget::Name("web".to_owned()),
                    kind: SocketKind::Stream,
                    backlog: 0,
                    flags: ListenFlags::default(),
                },
            },
            "01 05 03 03 77 65 62 01 00 00 00 00 00",
        ),
        worker(
            WorkerMessage::Listening {
                handle: HandleId::new(0),
            },
            "02 00",
        ),
        worker(
            WorkerMessage::Accepted {
                through: Seq::new(1),
                ended: 0,
            },
            "03 01 00",
        ),
        worker(
            WorkerMessage::Accepted {
                through: Seq::new(300),
                ended: 7,
            },
            "03 ac 02 07",
        ),
        worker(
            WorkerMessage::Ready {
                handle: HandleId::new(0),
            },
            "04 00",
        ),
        worker(
            WorkerMessage::Close {
                handle: HandleId::new(0),
            },
            "05 00",
        ),
        worker(
            WorkerMessage::ExitedAfterDisconnect { seq: Seq::new(5) },
            "06 05",
        ),
        worker(
            WorkerMessage::User(Envelope {
                kind: UserKind::Message,
                fd: false,
                payload: b"hi".to_vec(),
            }),
            "07 00 00 02 68 69",
        ),
        worker(
            WorkerMessage::User(Envelope {
                kind: UserKind::Request { seq: Seq::new(3) },
                fd: true,
                payload: b"hi".to_vec(),
            }),
            "07 01 03 01 02 68 69",
        ),
        worker(
            WorkerMessage::Return {
                handle: HandleId::new(0),
            },
            "08 00",
        ),
        worker(WorkerMessage::Heartbeat { ended: 2 }, "09 02"),
        worker(
            WorkerMessage::Fragment {
                data: b"hi".to_vec(),
            },
            "0a 02 68 69",
        ),
        worker(WorkerMessage::Refused { ack: Seq::new(7) }, "0b 07"),
        worker(WorkerMessage::ServiceReady, "0c"),
        worker(
            WorkerMessage::HandBack {
                handle: HandleId::new(0),
                prefix: b"GE".to_vec(),
            },
            "0d 00 02 47 45",
        ),
        worker(
            WorkerMessage::TakesPrefixes {
                handle: HandleId::new(0),
            },
            "0e 00",
        ),
        primary(
            PrimaryMessage::Hello {
                version: PROTOCOL_VERSION,
            },
            "00 04",
        ),
        primary(
            PrimaryMessage::ListenReply {
                ack: Seq::new(1),
                result: Ok(ListenInfo {
                    handle: HandleId::new(0),
                    addr: BoundAddr::Ip("127.0.0.1:40000".parse().unwrap()),
                    distribution: Distribution::RoundRobin,
                    report_ends: true,
                }),
            },
            "01 01 00 00 00 00 7f 00 00 01 c0 b8 02 00 01",
        ),
        primary(
            PrimaryMessage::ListenReply {
                ack: Seq::new(3),
                result: Ok(ListenInfo {
                    handle: HandleId::new(1),
                    addr: BoundAddr::Ip("0.0.0.0:5353".parse().unwrap()),
                    distribution: Distribution::Shared,
                    report_ends: false,
                }),
            },
            "01 03 00 01 00 00 00 00 00 00 e9 29 01 00",
        ),
        primary(
            PrimaryMessage::ListenReply {
                ack: Seq::new(2),
                result: Err(Errno::EADDRINUSE),
            },
            "01 02 01 c4 01",
        ),
        primary(
            PrimaryMessage::ListenReply {
                ack: Seq::new(4),
                result: Err(Errno::ESHUTDOWN),
            },
            "01 04 01 d8 01",
        ),
        primary(
            PrimaryMessage::NewConn {
                seq: Seq::new(1),
                handle: HandleId::new(0),
                reply: false,
                prefix: Vec::new(),
            },
            "02 01 00 00 00",
        ),
        primary(
            PrimaryMessage::NewConn {
                seq: Seq::new(4),
                handle: HandleId::new(2),
                reply: true,
                prefix: Vec::new(),
            },
            "02 04 02 01 00",
        ),
        primary(
            PrimaryMessage::NewConn {
                seq: Seq::new(5),
                handle: HandleId::new(0),
                reply: false,
                prefix: b"GE".to_vec(),
            },
            "02 05 00 00 02 47 45",
        ),
        primary(
            PrimaryMessage::Disconnect {
                within_ms: 30_000,
                hand_back: true,
            },
            "03 b0 ea 01 01",
        ),
        primary(PrimaryMessage::DisconnectAck { ack: Seq::new(5) }, "04 05"),
        primary(
            PrimaryMessage::User(Envelope {
                kind: UserKind::Reply { ack: Seq::new(3) },
                fd: false,
                payload: b"ok".to_vec(),
            }),
            "05 02 03 00 02 6f 6b",
        ),
        primary(
            PrimaryMessage::User(Envelope {
                kind: UserKind::Refusal { ack: Seq::new(3) },
                fd: false,
                payload: b"no".to_vec(),
            }),
            "05 03 03 00 02 6e 6f",
        ),
        primary(
            PrimaryMessage::Fragment {
                data: b"hi".to_vec(),
            },
            "06 02 68 69",
        ),
    ]
}

fn to_hex(bytes: &[u8]) -> String {
    bytes
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(" ")
}

fn from_hex(hex: &str) -> Vec<u8> {
    hex.split(' ')
        .map(|b| u8::from_str_radix(b, 16).expect("vectors are lowercase hex bytes"))
        .collect()
}

/// Whether `s` is written like a vector: lowercase hex bytes separated by single spaces.
fn is_hex_bytes(s: &str) -> bool {
    !s.is_empty()
        && s.split(' ')
            .all(|b| b.len() == 2 && b.bytes().all(|c| matches!(c, b'0'..=b'9' | b'a'..=b'f')))
}

fn encode(message: &Message) -> Vec<u8> {
    let mut buf = Vec::new();
    match message {
        Message::Worker(m) => wire::encode(m, &mut buf),
        Message::Primary(m) => wire::encode(m, &mut buf),
    }
    .expect("vectors fit in a frame");
    buf
}

fn decodes_to(bytes: &[u8], message: &Message) -> bool {
    match message {
        Message::Worker(m) => wire::decode::<WorkerMessage>(bytes).as_ref() == Ok(m),
        Message::Primary(m) => wire::decode::<PrimaryMessage>(bytes).as_ref() == Ok(m),
    }
}

/// The variant index, which postcard writes as the first byte (all indices are below 128).
/// Exhaustive on purpose: a new variant does not compile until it is given a vector.
fn variant_index(message: &Message) -> u8 {
    match message {
        Message::Worker(m) => match m {
            WorkerMessage::Online { .. } => 0,
            WorkerMessage::QueryServer { .. } => 1,
            WorkerMessage::Listening { .. } => 2,
            WorkerMessage::Accepted { .. } => 3,
            WorkerMessage::Ready { .. } => 4,
            WorkerMessage::Close { .. } => 5,
            WorkerMessage::ExitedAfterDisconnect { .. } => 6,
            WorkerMessage::User(_) => 7,
            WorkerMessage::Return { .. } => 8,
            WorkerMessage::Heartbeat { .. } => 9,
            WorkerMessage::Fragment { .. } => 10,
            WorkerMessage::Refused { .. } => 11,
            WorkerMessage::ServiceReady => 12,
            WorkerMessage::HandBack { .. } => 13,
            WorkerMessage::TakesPrefixes { .. } => 14,
        },
        Message::Primary(m) => match m {
            PrimaryMessage::Hello { .. } => 0,
            PrimaryMessage::ListenReply { .. } => 1,
            PrimaryMessage::NewConn { .. } => 2,
            PrimaryMessage::Disconnect { .. } => 3,
            PrimaryMessage::DisconnectAck { .. } => 4,
            PrimaryMessage::User(_) => 5,
            PrimaryMessage::Fragment { .. } => 6,
        },
    }
}

fn protocol_md() -> String {
    std::fs::read_to_string(PROTOCOL_MD).unwrap_or_else(|e| panic!("reading {PROTOCOL_MD}: {e}"))
}

/// The hex cell of each row of the byte-example table, in order.
fn documented_vectors(doc: &str) -> Vec<String> {
    let start = doc
        .find(SECTION)
        .unwrap_or_else(|| panic!("PROTOCOL.md has no `{SECTION}` section"));
    let section = &doc[start + SECTION.len()..];
    let section = section.find("\n## ").map_or(section, |end| &section[..end]);
    section
        .lines()
        .filter(|line| line.starts_with('|'))
        .filter_map(|row| {
            let mut cells = row
                .split('`')
                .skip(1)
                .step_by(2)
                .filter(|c| is_hex_bytes(c));
            let hex = cells.next()?;
            assert_eq!(cells.next(), None, "two hex cells in row {row:?}");
            Some(hex.to_owned())
        })
        .collect()
}

#[test]
fn vectors_encode_to_their_bytes() {
    for v in vectors() {
        assert_eq!(to_hex(&encode(&v.message)), v.hex, "{:?}", v.message);
    }
}

#[test]
fn vectors_decode_to_their_messages() {
    for v in vectors() {
        assert!(decodes_to(&from_hex(v.hex), &v.message), "{}", v.hex);
    }
}

#[test]
fn every_variant_has_a_vector_led_by_its_index() {
    let mut worker = [false; 15];
    let mut primary = [false; 7];
    for v in vectors() {
        let index = variant_index(&v.message);
        assert_eq!(from_hex(v.hex)[0], index, "{}", v.hex);
        match v.message {
            Message::Worker(_) => worker[usize::from(index)] = true,
            Message::Primary(_) => primary[usize::from(index)] = true,
        }
    }
    assert_eq!(
        worker, [true; 15],
        "WorkerMessage variants without a vector"
    );
    assert_eq!(
        primary, [true; 7],
        "PrimaryMessage variants without a vector"
    );
}

#[test]
fn protocol_md_shows_every_vector() {
    let doc = protocol_md();
    for v in vectors() {
        assert!(
            doc.contains(&format!("`{}`", v.hex)),
            "PROTOCOL.md lacks `{}` ({:?})",
            v.hex,
            v.message
        );
    }
}

#[test]
fn protocol_md_table_lists_exactly_the_vectors_in_order() {
    let documented = documented_vectors(&protocol_md());
    let tested: Vec<_> = vectors().iter().map(|v| v.hex.to_owned()).collect();
    assert_eq!(documented, tested);
}

#[test]
fn protocol_md_states_the_current_constants() {
    let doc = protocol_md();
    for fact in [
        format!("`PROTOCOL_VERSION = {PROTOCOL_VERSION}`"),
        format!("`MAX_FRAME = {}`", wire::MAX_FRAME),
    ] {
        assert!(doc.contains(&fact), "PROTOCOL.md lacks {fact}");
    }
}
