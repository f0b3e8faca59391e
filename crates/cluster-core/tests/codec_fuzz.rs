//! The decoder is total: arbitrary and mutated bytes give a message or a typed error, never a
//! panic, and whatever decodes re-encodes to a frame that decodes to the same message.

use cluster_core::wire::{
    self, BoundAddr, DecodeError, Distribution, Envelope, Errno, HandleId, ListenFlags, ListenInfo,
    ListenRequest, ListenTarget, MAX_FRAME, PrimaryMessage, Seq, SocketKind, UserKind,
    WorkerMessage,
};
use proptest::prelude::*;

fn seq() -> impl Strategy<Value = Seq> {
    any::<u64>().prop_map(Seq::new)
}

fn handle() -> impl Strategy<Value = HandleId> {
    any::<u32>().prop_map(HandleId::new)
}

fn target() -> impl Strategy<Value = ListenTarget> {
    prop_oneof![
        any::<i32>().prop_map(ListenTarget::Fd),
        any::<std::net::SocketAddr>().prop_map(ListenTarget::Ip),
        proptest::collection::vec(any::<u8>(), 0..120).prop_map(ListenTarget::Path),
    ]
}

fn request() -> impl Strategy<Value = ListenRequest> {
    (target(), any::<bool>(), any::<u32>(), any::<[bool; 4]>()).prop_map(
        |(target, stream, backlog, f)| ListenRequest {
            target,
            kind: if stream {
                SocketKind::Stream
            } else {
                SocketKind::Datagram
            },
            backlog,
            flags: ListenFlags {
                ipv6_only: f[0],
                reuse_addr: f[1],
                readable_all: f[2],
                writable_all: f[3],
            },
        },
    )
}

fn payload() -> impl Strategy<Value = Vec<u8>> {
    proptest::collection::vec(any::<u8>(), 0..300)
}

fn envelope() -> impl Strategy<Value = Envelope> {
    let kind = prop_oneof![
        Just(UserKind::Message),
        seq().prop_map(|seq| UserKind::Request { seq }),
        seq().prop_map(|ack| UserKind::Reply { ack }),
        seq().prop_map(|ack| UserKind::Refusal { ack }),
    ];
    (kind, any::<bool>(), payload()).prop_map(|(kind, fd, payload)| Envelope { kind, fd, payload })
}

fn worker_message() -> impl Strategy<Value = WorkerMessage> {
    prop_oneof![
        (any::<u16>(), any::<u32>())
            .prop_map(|(version, pid)| WorkerMessage::Online { version, pid }),
        (seq(), request()).prop_map(|(seq, request)| WorkerMessage::QueryServer { seq, request }),
        handle().prop_map(|handle| WorkerMessage::Listening { handle }),
        (seq(), any::<u64>())
            .prop_map(|(through, ended)| WorkerMessage::Accepted { through, ended }),
        seq().prop_map(|ack| WorkerMessage::Refused { ack }),
        handle().prop_map(|handle| WorkerMessage::Ready { handle }),
        handle().prop_map(|handle| WorkerMessage::Close { handle }),
        seq().prop_map(|seq| WorkerMessage::ExitedAfterDisconnect { seq }),
        envelope().prop_map(WorkerMessage::User),
        handle().prop_map(|handle| WorkerMessage::Return { handle }),
        (handle(), proptest::collection::vec(any::<u8>(), 0..64))
            .prop_map(|(handle, prefix)| WorkerMessage::HandBack { handle, prefix }),
        handle().prop_map(|handle| WorkerMessage::TakesPrefixes { handle }),
        any::<u64>().prop_map(|ended| WorkerMessage::Heartbeat { ended }),
        payload().prop_map(|data| WorkerMessage::Fragment { data }),
    ]
}

fn primary_message() -> impl Strategy<Value = PrimaryMessage> {
    let info =
        (handle(), any::<std::net::SocketAddr>(), any::<bool>()).prop_map(|(handle, addr, rr)| {
            ListenInfo {
                handle,
                addr: BoundAddr::Ip(addr),
                distribution: if rr {
                    Distribution::RoundRobin
                } else {
                    Distribution::Shared
                },
                report_ends: rr,
            }
        });
    let result = prop_oneof![info.prop_map(Ok), any::<i32>().prop_map(|e| Err(Errno(e)))];
    prop_oneof![
        any::<u16>().prop_map(|version| PrimaryMessage::Hello { version }),
        (seq(), result).prop_map(|(ack, result)| PrimaryMessage::ListenReply { ack, result }),
        (
            seq(),
            handle(),
            any::<bool>(),
            proptest::collection::vec(any::<u8>(), 0..64)
        )
            .prop_map(|(seq, handle, reply, prefix)| PrimaryMessage::NewConn {
                seq,
                handle,
                reply,
                prefix
            }),
        (any::<u64>(), any::<bool>()).prop_map(|(within_ms, hand_back)| {
            PrimaryMessage::Disconnect {
                within_ms,
                hand_back,
            }
        }),
        seq().prop_map(|ack| PrimaryMessage::DisconnectAck { ack }),
        envelope().prop_map(PrimaryMessage::User),
        payload().prop_map(|data| PrimaryMessage::Fragment { data }),
    ]
}

fn encoded<M: serde::Serialize>(m: &M) -> Vec<u8> {
    let mut buf = Vec::new();
    wire::encode(m, &mut buf).unwrap();
    buf
}

/// Decoding must not panic; if it succeeds, the message must survive a round trip.
fn check_total(bytes: &[u8]) {
    if let Ok(m) = wire::decode::<WorkerMessage>(bytes) {
        assert_eq!(wire::decode::<WorkerMessage>(&encoded(&m)).unwrap(), m);
    }
    if let Ok(m) = wire::decode::<PrimaryMessage>(bytes) {
        assert_eq!(wire::decode::<PrimaryMessage>(&encoded(&m)).unwrap(), m);
    }
}

#[derive(Debug, Clone)]
enum Mutation {
    Flip(usize, u8),
    Truncate(usize),
    Insert(usize, u8),
    Append(Vec<u8>),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (any::<usize>(), 1..=255u8).prop_map(|(i, x)| Mutation::Flip(i, x)),
        any::<usize>().prop_map(Mutation::Truncate),
        (any::<usize>(), any::<u8>()).prop_map(|(i, b)| Mutation::Insert(i, b)),
        proptest::collection::vec(any::<u8>(), 1..8).prop_map(Mutation::Append),
    ]
}

fn mutate(mut bytes: Vec<u8>, mutations: &[Mutation]) -> Vec<u8> {
    for m in mutations {
        let n = bytes.len().max(1);
        match m {
            Mutation::Flip(i, x) => {
                if let Some(b) = bytes.get_mut(i % n) {
                    *b ^= x;
                }
            }
            Mutation::Truncate(i) => bytes.truncate(i % n),
            Mutation::Insert(i, b) => bytes.insert(i % (bytes.len() + 1), *b),
            Mutation::Append(tail) => bytes.extend_from_slice(tail),
        }
    }
    bytes
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2048))]

    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
        check_total(&bytes);
    }

    #[test]
    fn worker_messages_round_trip(m in worker_message()) {
        let bytes = encoded(&m);
        prop_assert!(bytes.len() <= MAX_FRAME);
        prop_assert_eq!(wire::decode::<WorkerMessage>(&bytes).unwrap(), m);
    }

    #[test]
    fn primary_messages_round_trip(m in primary_message()) {
        prop_assert_eq!(wire::decode::<PrimaryMessage>(&encoded(&m)).unwrap(), m);
    }

    #[test]
    fn mutated_worker_frames_never_panic(
        m in worker_message(),
        mutations in proptest::collection::vec(mutation(), 1..4),
    ) {
        check_total(&mutate(encoded(&m), &mutations));
    }

    #[test]
    fn mutated_primary_frames_never_panic(
        m in primary_message(),
        mutations in proptest::collection::vec(mutation(), 1..4),
    ) {
        check_total(&mutate(encoded(&m), &mutations));
    }

    #[test]
    fn every_strict_prefix_is_an_error(m in worker_message()) {
        let bytes = encoded(&m);
        for end in 0..bytes.len() {
            prop_assert!(wire::decode::<WorkerMessage>(&bytes[..end]).is_err());
        }
    }
}

#[test]
fn oversized_frames_are_refused_before_decoding() {
    let err = wire::decode::<WorkerMessage>(&vec![7; MAX_FRAME + 1]).unwrap_err();
    assert_eq!(
        err,
        DecodeError::TooLarge {
            len: MAX_FRAME + 1,
            max: MAX_FRAME
        }
    );
}
