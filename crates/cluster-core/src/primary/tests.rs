use std::time::{Duration, Instant};

use super::*;
use crate::lifecycle::KillReason;
use crate::link::LinkError;
use crate::registry::RegistryError;
use crate::user::{FRAGMENT_SIZE, MAX_MESSAGE};
use crate::wire::{Envelope, ListenFlags, ListenTarget, Seq, SocketKind, UserKind};

/// Drives a `Primary<u32>` with decoded messages and collects decoded outputs.
struct Harness {
    primary: Primary<u32>,
    now: Instant,
}

#[derive(Debug, PartialEq, Eq)]
enum Out {
    Send(WorkerId, PrimaryMessage, Option<Attachment<u32>>),
    Other(Output<u32>),
}

impl Harness {
    fn new() -> Self {
        Self {
            primary: Primary::new(Config::default()),
            now: Instant::now(),
        }
    }

    fn outputs(&mut self) -> Vec<Out> {
        let mut buf = Vec::new();
        std::iter::from_fn(|| {
            self.primary.poll_output(&mut buf).map(|o| match o {
                Output::Transmit(t) => {
                    Out::Send(t.worker, wire::decode(&buf).unwrap(), t.attachment)
                }
                other => Out::Other(other),
            })
        })
        .collect()
    }

    fn events(&mut self) -> Vec<Event> {
        self.outputs()
            .into_iter()
            .filter_map(|o| match o {
                Out::Other(Output::Event(e)) => Some(e),
                _ => None,
            })
            .collect()
    }

    fn recv(&mut self, worker: WorkerId, message: &WorkerMessage) {
        let mut buf = Vec::new();
        wire::encode(message, &mut buf).unwrap();
        self.primary.handle_frame(self.now, worker, &buf, &[]);
    }

    fn online(&mut self) -> WorkerId {
        let w = self.primary.add_worker();
        self.recv(
            w,
            &WorkerMessage::Online {
                version: PROTOCOL_VERSION,
                pid: 1000 + w.get() as u32,
            },
        );
        w
    }

    /// Two online workers listening on one round-robin handle, outputs drained.
    fn two_workers_on_one_handle(&mut self) -> (WorkerId, WorkerId, HandleId) {
        let w1 = self.online();
        let w2 = self.online();
        let handle = self.listen(w1, 1, "127.0.0.1:0");
        assert_eq!(self.listen(w2, 1, "127.0.0.1:0"), handle);
        self.outputs();
        (w1, w2, handle)
    }

    /// Worker `w` listens on `addr` (binding it if new); returns the handle.
    fn listen(&mut self, w: WorkerId, seq: u64, addr: &str) -> HandleId {
        let request = ListenRequest {
            target: ListenTarget::Ip(addr.parse().unwrap()),
            kind: SocketKind::Stream,
            backlog: 0,
            flags: ListenFlags::default(),
        };
        self.recv(
            w,
            &WorkerMessage::QueryServer {
                seq: Seq::new(seq),
                request,
            },
        );
        let mut handle = None;
        let mut outs = self.outputs();
        let bind = outs.iter().find_map(|o| match o {
            Out::Other(Output::Bind { handle, .. }) => Some(*handle),
            _ => None,
        });
        if let Some(h) = bind {
            self.primary.handle_bound(
                self.now,
                h,
                Ok(BoundAddr::Ip("127.0.0.1:4321".parse().unwrap())),
            );
            outs = self.outputs();
        }
        for o in outs {
            if let Out::Send(
                _,
                PrimaryMessage::ListenReply {
                    result: Ok(info), ..
                },
                _,
            ) = o
            {
                handle = Some(info.handle);
            }
        }
        let handle = handle.expect("listen succeeded");
        self.recv(w, &WorkerMessage::Listening { handle });
        handle
    }
}

#[test]
fn lifecycle_events_follow_node_order() {
    let mut h = Harness::new();
    let w = h.primary.add_worker();
    assert_eq!(w, WorkerId::new(1));
    assert_eq!(
        h.outputs(),
        [Out::Send(
            w,
            PrimaryMessage::Hello {
                version: PROTOCOL_VERSION
            },
            None
        )]
    );
    h.recv(
        w,
        &WorkerMessage::Online {
            version: PROTOCOL_VERSION,
            pid: 42,
        },
    );
    assert_eq!(h.events(), [Event::Online { worker: w, pid: 42 }]);
    assert_eq!(h.primary.state(w), Some(WorkerState::Online));
    let handle = h.listen(w, 1, "127.0.0.1:0");
    assert!(matches!(&h.events()[..], [Event::Listening { handle: x, .. }] if *x == handle));
    assert_eq!(h.primary.state(w), Some(WorkerState::Listening));
    // Exit seen before the link closes: Disconnect still comes first.
    h.primary.handle_exit(w, ExitStatus::Signal(9));
    assert_eq!(h.events(), []);
    h.primary.handle_link_closed(h.now, w);
    assert_eq!(
        h.events(),
        [
            Event::Disconnect { worker: w },
            Event::Exit {
                worker: w,
                status: ExitStatus::Signal(9),
                exited_after_disconnect: false,
                killed: None,
            }
        ]
    );
    assert_eq!(h.primary.workers().count(), 0);
    // The last worker died without closing its listener: the socket stays open (its port, its
    // backlog) for the worker that replaces it, which gets the same handle.
    assert!(!h.primary.registry().is_empty());
    // Ids are never reused.
    let next = h.primary.add_worker();
    assert_eq!(next, WorkerId::new(2));
    let _ = h.outputs();
    h.recv(
        next,
        &WorkerMessage::Online {
            version: PROTOCOL_VERSION,
            pid: 43,
        },
    );
    let _ = h.events();
    assert_eq!(h.listen(next, 1, "127.0.0.1:0"), handle);
}

#[test]
fn a_socket_kept_for_a_replacement_is_closed_when_none_comes() {
    let mut h = Harness::new();
    let w = h.online();
    let handle = h.listen(w, 1, "127.0.0.1:0");
    let _ = (h.outputs(), h.events());
    h.primary.handle_exit(w, ExitStatus::Signal(9));
    h.primary.handle_link_closed(h.now, w);
    let _ = (h.outputs(), h.events());
    assert!(!h.primary.registry().is_empty(), "kept for a replacement");
    let release = h.primary.poll_timeout().expect("a release deadline");
    assert_eq!(
        release,
        h.now + RegistryConfig::default().keep_for_replacement
    );
    h.primary.handle_timeout(release);
    assert!(
        h.outputs().contains(&Out::Other(Output::Unbind { handle })),
        "closed once nobody came"
    );
    assert!(h.primary.registry().is_empty());
}

#[test]
fn garbage_from_a_worker_disconnects_only_that_worker() {
    let mut h = Harness::new();
    let w1 = h.online();
    let w2 = h.online();
    h.outputs();
    h.primary.handle_frame(h.now, w1, &[0xff, 0xff, 0xff], &[]);
    let outs = h.outputs();
    assert!(
        matches!(&outs[0], Out::Other(Output::Event(Event::Error { worker, error: ProtocolError::Decode(_) })) if *worker == w1)
    );
    assert_eq!(outs[1], Out::Other(Output::CloseLink { worker: w1 }));
    // And it is killed: what it took goes with it, and its slot is refilled as usual.
    assert_eq!(
        outs[2],
        Out::Other(Output::Kill {
            worker: w1,
            reason: KillReason::ProtocolViolation
        })
    );
    assert_eq!(outs.len(), 3);
    // Frames from it are ignored from now on, before and after the driver closes its link.
    h.recv(w1, &user_message(vec![1]));
    assert_eq!(h.events(), []);
    h.primary.handle_link_closed(h.now, w1);
    assert_eq!(h.events(), [Event::Disconnect { worker: w1 }]);
    h.recv(w1, &user_message(vec![1]));
    assert_eq!(h.events(), []);
    h.recv(w2, &user_message(vec![2]));
    assert_eq!(
        h.events(),
        [Event::Message {
            worker: w2,
            payload: vec![2],
            fd: false,
            request: None,
        }]
    );
}

fn envelope(payload: Vec<u8>) -> Envelope {
    Envelope {
        kind: UserKind::Message,
        fd: false,
        payload,
    }
}

fn user_message(payload: Vec<u8>) -> WorkerMessage {
    WorkerMessage::User(envelope(payload))
}

#[test]
fn protocol_violations_are_typed_errors() {
    let cases: Vec<(WorkerMessage, ProtocolError)> = vec![
        (
            WorkerMessage::Accepted {
                through: Seq::new(5),
                ended: 0,
            },
            LinkError::UnknownAck { ack: Seq::new(5) }.into(),
        ),
        (
            WorkerMessage::Refused { ack: Seq::new(1) },
            ProtocolError::UnexpectedFds {
                expected: 1,
                got: 0,
            },
        ),
        (
            WorkerMessage::Online {
                version: PROTOCOL_VERSION,
                pid: 1,
            },
            LinkError::DuplicateHandshake.into(),
        ),
        (
            WorkerMessage::Close {
                handle: HandleId::new(9),
            },
            RegistryError::NotHeld {
                worker: WorkerId::new(1),
                handle: HandleId::new(9),
            }
            .into(),
        ),
    ];
    for (message, expected) in cases {
        let mut h = Harness::new();
        let w = h.online();
        h.outputs();
        h.recv(w, &message);
        assert_eq!(
            h.events()[0],
            Event::Error {
                worker: w,
                error: expected
            }
        );
    }
    let mut h = Harness::new();
    let w = h.primary.add_worker();
    h.recv(w, &user_message(vec![]));
    assert_eq!(
        h.events()[0],
        Event::Error {
            worker: w,
            error: LinkError::HandshakeExpected.into()
        }
    );
    let mut h = Harness::new();
    let w = h.primary.add_worker();
    h.recv(w, &WorkerMessage::Online { version: 0, pid: 1 });
    assert!(matches!(
        &h.events()[0],
        Event::Error {
            error: ProtocolError::Link(LinkError::VersionMismatch { .. }),
            ..
        }
    ));
    let mut h = Harness::new();
    let w = h.online();
    let mut buf = Vec::new();
    wire::encode(&user_message(vec![]), &mut buf).unwrap();
    h.primary
        .handle_frame(h.now, w, &buf, &[FdKind::Other, FdKind::Other]);
    assert!(h.events().contains(&Event::Error {
        worker: w,
        error: ProtocolError::UnexpectedFds {
            expected: 0,
            got: 2
        }
    }));
}

/// The `NewConn`s in `outs`: (worker, seq, reply, conn).
fn handoffs(outs: &[Out]) -> Vec<(WorkerId, Seq, bool, u32)> {
    outs.iter()
        .filter_map(|o| match o {
            Out::Send(
                w,
                PrimaryMessage::NewConn { seq, reply, .. },
                Some(Attachment::Conn { conn, .. }),
            ) => Some((*w, *seq, *reply, *conn)),
            _ => None,
        })
        .collect()
}

fn receive_with_fd(h: &mut Harness, worker: WorkerId, message: &WorkerMessage) {
    let mut buf = Vec::new();
    wire::encode(message, &mut buf).unwrap();
    h.primary
        .handle_frame(h.now, worker, &buf, &[FdKind::Connection]);
}

#[test]
fn handoffs_ask_for_an_ack_every_half_window_and_one_ack_settles_them_all() {
    let mut h = Harness::new();
    let w = h.online();
    let handle = h.listen(w, 1, "127.0.0.1:0");
    h.outputs();
    assert!(h.primary.wants_connections(handle));
    for conn in 1..=5 {
        h.primary.handle_connection(h.now, handle, conn).unwrap();
    }
    let sent = handoffs(&h.outputs());
    // The default window is 8: every fourth handoff asks.
    let asked: Vec<_> = sent.iter().map(|(_, _, reply, _)| *reply).collect();
    assert_eq!(asked, [false, false, false, true, false]);
    assert!(sent.iter().all(|(to, ..)| *to == w));
    assert_eq!(h.primary.in_flight(w), 5);
    h.recv(
        w,
        &WorkerMessage::Accepted {
            through: sent[3].1,
            ended: 0,
        },
    );
    assert_eq!(
        h.outputs(),
        (1..=4)
            .map(|conn| Out::Other(Output::Delivered { worker: w, conn }))
            .collect::<Vec<_>>()
    );
    assert_eq!(h.primary.in_flight(w), 1);
    assert_eq!(h.primary.counters(w).unwrap().delivered, 4);
    // The same ack again covers nothing: a protocol error.
    h.recv(
        w,
        &WorkerMessage::Accepted {
            through: sent[3].1,
            ended: 0,
        },
    );
    assert_eq!(
        h.events()[0],
        Event::Error {
            worker: w,
            error: LinkError::DuplicateAck { ack: sent[3].1 }.into()
        }
    );
}

#[test]
fn a_window_of_one_asks_for_every_ack() {
    let mut h = Harness {
        primary: Primary::new(Config {
            registry: RegistryConfig {
                window: 1,
                ..RegistryConfig::default()
            },
            ..Config::default()
        }),
        now: Instant::now(),
    };
    let w = h.online();
    let handle = h.listen(w, 1, "127.0.0.1:0");
    h.outputs();
    h.primary.handle_connection(h.now, handle, 1).unwrap();
    let sent = handoffs(&h.outputs());
    assert_eq!(sent, [(w, Seq::new(1), true, 1)]);
}

#[test]
fn a_refused_connection_comes_back_with_its_fd_and_goes_to_another_worker() {
    let mut h = Harness::new();
    let (w1, w2, handle) = h.two_workers_on_one_handle();
    h.primary.handle_connection(h.now, handle, 1).unwrap();
    let [(to, seq, _, 1)] = handoffs(&h.outputs())[..] else {
        panic!()
    };
    assert_eq!(to, w1);
    receive_with_fd(&mut h, w1, &WorkerMessage::Refused { ack: seq });
    let outs = h.outputs();
    assert_eq!(
        outs[0],
        Out::Other(Output::Reclaimed {
            worker: w1,
            conn: 1
        }),
        "the driver holds the fd again before it is sent on"
    );
    let [(to, _, _, 1)] = handoffs(&outs)[..] else {
        panic!("{outs:?}")
    };
    assert_eq!(to, w2);
    let c1 = h.primary.counters(w1).unwrap();
    assert_eq!((c1.handoffs, c1.refused, c1.delivered), (1, 1, 0));
}

#[test]
fn when_a_link_closes_what_the_worker_never_read_is_dispatched_again_and_the_rest_was_its() {
    let mut h = Harness::new();
    let (w1, w2, handle) = h.two_workers_on_one_handle();
    for conn in [1, 2, 3] {
        h.primary.handle_connection(h.now, handle, conn).unwrap();
    }
    let sent = handoffs(&h.outputs());
    let to_w1: Vec<_> = sent.iter().filter(|s| s.0 == w1).collect();
    assert_eq!(to_w1.iter().map(|s| s.3).collect::<Vec<_>>(), [1, 3]);
    // Connection 4 is dispatched to w2, whose `NewConn` has not been sent yet when w2's link
    // closes: the driver still holds it, so it counts as reclaimed without being named.
    h.primary.handle_connection(h.now, handle, 4).unwrap();
    // The driver read connection 3's `NewConn` back from w1's end: w1 never saw it.
    assert_eq!(h.primary.handle_reclaimed(h.now, w1, to_w1[1].1), Some(3));
    assert_eq!(
        h.primary.handle_reclaimed(h.now, w1, to_w1[1].1),
        None,
        "once"
    );
    assert_eq!(h.primary.handle_reclaimed(h.now, w1, Seq::new(99)), None);
    assert_eq!(
        h.primary.handle_reclaimed(h.now, w2, Seq::new(3)),
        None,
        "w2 has seqs 1 and 2 only"
    );
    h.primary.handle_link_closed(h.now, w1);
    let outs = h.outputs();
    // Connection 1 was read by w1, which went away with it.
    assert!(outs.contains(&Out::Other(Output::Delivered {
        worker: w1,
        conn: 1
    })));
    assert_eq!(h.primary.counters(w1).unwrap().delivered, 1);
    let again = handoffs(&outs);
    assert!(
        again.iter().any(|s| s.0 == w2 && s.3 == 4),
        "connection 4 went out to w2: {outs:?}"
    );
    assert!(
        again.iter().any(|s| s.0 == w2 && s.3 == 3),
        "connection 3 is served by w2: {outs:?}"
    );
    // Connection 5 goes to w2, whose link closes before the core handed that `NewConn` to the
    // driver: the driver still holds it, so it is not w2's.
    h.primary.handle_connection(h.now, handle, 5).unwrap();
    h.primary.handle_link_closed(h.now, w2);
    let outs = h.outputs();
    // No worker is left, so it is closed; 2, 3 and 4 reached w2 and went with it.
    assert_eq!(
        outs.iter()
            .filter(|o| matches!(o, Out::Other(Output::Close(_))))
            .collect::<Vec<_>>(),
        [&Out::Other(Output::Close(5))]
    );
    assert_eq!(h.primary.counters(w2).unwrap().delivered, 3);
}

#[test]
fn hung_worker_is_killed_and_its_handoffs_wait_for_its_link_to_close() {
    let mut h = Harness::new();
    let (w1, w2, handle) = h.two_workers_on_one_handle();
    h.primary.handle_connection(h.now, handle, 1).unwrap();
    h.outputs();
    let deadline = h.primary.poll_timeout().unwrap();
    // Unasked acks may wait for a heartbeat: the handoff timeout plus one interval.
    assert_eq!(deadline, h.now + Duration::from_secs(11));
    h.primary
        .handle_timeout(deadline - Duration::from_millis(1));
    assert_eq!(h.outputs(), []);
    h.primary.handle_timeout(deadline);
    let outs = h.outputs();
    assert!(
        matches!(&outs[..], [Out::Other(Output::Event(Event::Error { error: ProtocolError::HandoffTimeout { .. }, .. })), Out::Other(Output::Kill { worker, reason: KillReason::HandoffTimeout })] if *worker == w1),
        "{outs:?}"
    );
    // The hung worker's deadline is not re-armed; what remains is its healthy sibling's heartbeat.
    assert_eq!(
        h.primary.poll_timeout(),
        Some(h.now + Duration::from_secs(30))
    );
    // New connections skip the hung worker.
    h.primary.handle_connection(h.now, handle, 2).unwrap();
    assert!(
        matches!(&h.outputs()[..], [Out::Send(w, _, Some(Attachment::Conn { conn: 2, .. }))] if *w == w2)
    );
    // Its link closes after the kill; the driver read connection 1 back from its end (it was
    // stopped, not reading): it is re-dispatched.
    let mut unread = Vec::new();
    wire::encode(
        &PrimaryMessage::NewConn {
            seq: Seq::new(1),
            handle,
            reply: false,
            prefix: Vec::new(),
        },
        &mut unread,
    )
    .unwrap();
    assert_eq!(h.primary.handle_read_back(w1, &unread, 1), Some(1));
    assert_eq!(h.primary.handle_read_back(w1, &unread, 1), None, "once");
    h.primary.handle_link_closed(h.now, w1);
    assert!(
        h.outputs().iter().any(
            |o| matches!(o, Out::Send(w, _, Some(Attachment::Conn { conn: 1, .. })) if *w == w2)
        )
    );
}

#[test]
fn primary_disconnect_sets_exited_after_disconnect_and_refuses_new_listens() {
    let mut h = Harness::new();
    let w = h.online();
    h.outputs();
    assert!(
        h.primary
            .disconnect(h.now, w, Duration::from_secs(30), true)
    );
    assert!(
        !h.primary
            .disconnect(h.now, w, Duration::from_secs(30), true),
        "only once"
    );
    assert_eq!(
        h.outputs(),
        [Out::Send(
            w,
            PrimaryMessage::Disconnect {
                within_ms: 30_000,
                hand_back: false,
            },
            None
        )]
    );
    let request = ListenRequest {
        target: ListenTarget::Ip("127.0.0.1:0".parse().unwrap()),
        kind: SocketKind::Stream,
        backlog: 0,
        flags: ListenFlags::default(),
    };
    h.recv(
        w,
        &WorkerMessage::QueryServer {
            seq: Seq::new(1),
            request,
        },
    );
    assert_eq!(
        h.outputs(),
        [Out::Send(
            w,
            PrimaryMessage::ListenReply {
                ack: Seq::new(1),
                result: Err(Errno::ESHUTDOWN)
            },
            None
        )]
    );
    h.primary.handle_link_closed(h.now, w);
    h.primary.handle_exit(w, ExitStatus::Code(0));
    assert_eq!(
        h.events(),
        [
            Event::Disconnect { worker: w },
            Event::Exit {
                worker: w,
                status: ExitStatus::Code(0),
                exited_after_disconnect: true,
                killed: None,
            }
        ]
    );
}

#[test]
fn worker_initiated_disconnect_is_acked_and_on_purpose() {
    let mut h = Harness::new();
    let w = h.online();
    h.outputs();
    h.recv(
        w,
        &WorkerMessage::ExitedAfterDisconnect { seq: Seq::new(3) },
    );
    // Nothing was handed to it: its end of the link is released at once.
    assert_eq!(
        h.outputs(),
        [
            Out::Send(w, PrimaryMessage::DisconnectAck { ack: Seq::new(3) }, None),
            Out::Other(Output::ReleasePeer { worker: w })
        ]
    );
    assert_eq!(
        h.primary.lifecycle(w).unwrap().exited_after_disconnect(),
        Some(true)
    );
}

/// How many `ReleasePeer` for `w` are in `outs`.
fn releases(outs: &[Out], w: WorkerId) -> usize {
    outs.iter()
        .filter(|o| matches!(o, Out::Other(Output::ReleasePeer { worker }) if *worker == w))
        .count()
}

#[test]
fn a_leaving_worker_releases_its_peer_once_its_handoffs_are_settled() {
    let mut h = Harness::new();
    let w = h.online();
    let handle = h.listen(w, 1, "127.0.0.1:0");
    assert_eq!(releases(&h.outputs(), w), 0, "it may be handed connections");
    h.primary.handle_connection(h.now, handle, 1).unwrap();
    let [(_, seq, _, 1)] = handoffs(&h.outputs())[..] else {
        panic!()
    };
    // It announces leaving before it has read that handoff.
    h.recv(
        w,
        &WorkerMessage::ExitedAfterDisconnect { seq: Seq::new(2) },
    );
    assert_eq!(
        releases(&h.outputs(), w),
        0,
        "the handoff may still be in its receive queue"
    );
    receive_with_fd(&mut h, w, &WorkerMessage::Refused { ack: seq });
    assert_eq!(releases(&h.outputs(), w), 1, "nothing left to take back");
    // No more connections go its way, and it is released once.
    h.primary.handle_connection(h.now, handle, 2).unwrap_err();
    h.recv(w, &WorkerMessage::Heartbeat { ended: 0 });
    assert_eq!(releases(&h.outputs(), w), 0);
}

#[test]
fn a_connection_given_back_must_be_a_stream_socket() {
    let mut h = Harness::new();
    let (_, _, handle) = h.two_workers_on_one_handle();
    h.primary.handle_connection(h.now, handle, 1).unwrap();
    let sent = handoffs(&h.outputs());
    let (to, seq, _, _) = sent[0];
    let mut buf = Vec::new();
    wire::encode(&WorkerMessage::Refused { ack: seq }, &mut buf).unwrap();
    h.primary.handle_frame(h.now, to, &buf, &[FdKind::Other]);
    assert!(h.events().contains(&Event::Error {
        worker: to,
        error: ProtocolError::NotAConnection
    }));
}

#[test]
fn shared_reply_carries_the_listener() {
    let mut config = Config::default();
    config.registry.policy = crate::SchedulingPolicy::Shared;
    let mut h = Harness {
        primary: Primary::new(config),
        now: Instant::now(),
    };
    let w = h.online();
    h.outputs();
    let request = ListenRequest {
        target: ListenTarget::Ip("127.0.0.1:0".parse().unwrap()),
        kind: SocketKind::Stream,
        backlog: 0,
        flags: ListenFlags::default(),
    };
    h.recv(
        w,
        &WorkerMessage::QueryServer {
            seq: Seq::new(1),
            request,
        },
    );
    let [
        Out::Other(Output::Bind {
            handle,
            distribution: Distribution::Shared,
            ..
        }),
    ] = h.outputs()[..]
    else {
        panic!()
    };
    h.primary.handle_bound(
        h.now,
        handle,
        Ok(BoundAddr::Ip("127.0.0.1:9".parse().unwrap())),
    );
    let outs = h.outputs();
    assert!(
        matches!(&outs[..], [Out::Send(_, PrimaryMessage::ListenReply { .. }, Some(Attachment::Listener(x)))] if *x == handle)
    );
}

#[test]
fn user_messages_are_size_checked_before_queueing() {
    let mut h = Harness::new();
    let w = h.online();
    h.outputs();
    let refused = h
        .primary
        .send_message(w, vec![0; MAX_MESSAGE + 1], Some(9))
        .unwrap_err();
    assert_eq!(refused.1, Some(9), "the fd comes back to the caller");
    assert_eq!(h.outputs(), []);
    h.primary.send_message(w, vec![1, 2], None).unwrap();
    assert_eq!(
        h.outputs(),
        [Out::Send(
            w,
            PrimaryMessage::User(envelope(vec![1, 2])),
            None
        )]
    );
}

#[test]
fn a_large_message_goes_out_in_fragments_with_its_fd_on_the_last_frame() {
    let mut h = Harness::new();
    let w = h.online();
    h.outputs();
    let payload: Vec<u8> = (0..200_000u32).map(|i| i as u8).collect();
    h.primary.send_message(w, payload.clone(), Some(4)).unwrap();
    let outs = h.outputs();
    assert_eq!(outs.len(), 200_000 / FRAGMENT_SIZE + 1);
    let mut joined = Vec::new();
    for (i, out) in outs.into_iter().enumerate() {
        match out {
            Out::Send(to, PrimaryMessage::Fragment { data }, None) if to == w => {
                joined.extend(data);
            }
            Out::Send(to, PrimaryMessage::User(e), Some(Attachment::Owned(4))) if to == w => {
                assert!(e.fd);
                joined.extend(e.payload);
            }
            other => panic!("frame {i}: {other:?}"),
        }
    }
    assert_eq!(joined, payload);
}

#[test]
fn fragments_from_a_worker_are_put_back_together_and_bounded() {
    let mut h = Harness::new();
    let w = h.online();
    h.outputs();
    h.recv(w, &WorkerMessage::Fragment { data: vec![1, 2] });
    h.recv(w, &WorkerMessage::Heartbeat { ended: 0 });
    h.recv(w, &user_message(vec![3]));
    assert_eq!(
        h.events(),
        [Event::Message {
            worker: w,
            payload: vec![1, 2, 3],
            fd: false,
            request: None,
        }]
    );
    // A worker that never ends its message is cut off at the limit.
    let chunk = vec![0; FRAGMENT_SIZE];
    for _ in 0..=MAX_MESSAGE / chunk.len() {
        h.recv(
            w,
            &WorkerMessage::Fragment {
                data: chunk.clone(),
            },
        );
    }
    let events = h.events();
    assert!(
        matches!(&events[..], [Event::Error { worker, error: ProtocolError::MessageTooLarge(_) }] if *worker == w),
        "{events:?}"
    );
    h.primary.handle_link_closed(h.now, w);
    assert_eq!(h.events(), [Event::Disconnect { worker: w }]);
}

#[test]
fn an_fd_sent_to_a_worker_whose_link_closed_is_handed_back_to_be_closed() {
    let mut h = Harness::new();
    let w = h.online();
    h.outputs();
    h.primary.send_message(w, vec![1], Some(5)).unwrap();
    h.primary.handle_link_closed(h.now, w);
    let outs = h.outputs();
    assert!(outs.contains(&Out::Other(Output::Close(5))), "{outs:?}");
}

#[test]
fn a_worker_taken_off_its_handles_may_still_name_them() {
    // The primary disconnects w while w's `Listening` and `Close` are already on the wire.
    let mut h = Harness::new();
    let w = h.online();
    let handle = h.listen(w, 1, "127.0.0.1:0");
    h.outputs();
    h.primary
        .disconnect(h.now, w, Duration::from_secs(30), true);
    h.outputs();
    h.recv(w, &WorkerMessage::Listening { handle });
    h.recv(w, &WorkerMessage::Ready { handle });
    h.recv(w, &WorkerMessage::Close { handle });
    assert_eq!(h.events(), []);
}

#[test]
fn listening_on_another_workers_handle_is_a_violation() {
    let mut h = Harness::new();
    let w1 = h.online();
    let w2 = h.online();
    let handle = h.listen(w1, 1, "127.0.0.1:0");
    h.outputs();
    h.recv(w2, &WorkerMessage::Listening { handle });
    assert_eq!(
        h.events()[0],
        Event::Error {
            worker: w2,
            error: RegistryError::NotHeld { worker: w2, handle }.into()
        }
    );
}

#[test]
fn a_worker_that_failed_to_spawn_is_forgotten_quietly() {
    let mut h = Harness::new();
    let w = h.primary.add_worker();
    h.primary.handle_spawn_failed(w);
    assert_eq!(h.outputs(), []);
    assert_eq!(h.primary.workers().count(), 0);
    assert_eq!(
        h.primary.add_worker(),
        WorkerId::new(2),
        "ids are still never reused"
    );
}

#[test]
fn counters_track_handoffs_refusals_and_deliveries() {
    let mut h = Harness::new();
    let (w1, w2, handle) = h.two_workers_on_one_handle();
    h.primary.handle_connection(h.now, handle, 1).unwrap();
    let seq = h
        .outputs()
        .into_iter()
        .find_map(|o| match o {
            Out::Send(w, PrimaryMessage::NewConn { seq, .. }, _) if w == w1 => Some(seq),
            _ => None,
        })
        .unwrap();
    receive_with_fd(&mut h, w1, &WorkerMessage::Refused { ack: seq });
    let c1 = h.primary.counters(w1).unwrap();
    assert_eq!((c1.handoffs, c1.refused, c1.delivered), (1, 1, 0));
    // Re-dispatched to w2, which takes it.
    let seq2 = h
        .outputs()
        .into_iter()
        .find_map(|o| match o {
            Out::Send(w, PrimaryMessage::NewConn { seq, .. }, _) if w == w2 => Some(seq),
            _ => None,
        })
        .unwrap();
    h.recv(
        w2,
        &WorkerMessage::Accepted {
            through: seq2,
            ended: 0,
        },
    );
    let c2 = h.primary.counters(w2).unwrap();
    assert_eq!((c2.handoffs, c2.refused, c2.delivered), (1, 0, 1));
}

#[test]
fn a_silent_worker_is_killed_at_its_heartbeat_deadline_and_the_reason_is_in_its_exit() {
    let mut h = Harness::new();
    let w = h.online();
    h.outputs();
    let deadline = h.primary.poll_timeout().expect("a heartbeat deadline");
    assert_eq!(deadline, h.now + Duration::from_secs(30));
    // A heartbeat (any frame) moves the deadline.
    h.now += Duration::from_secs(20);
    h.recv(w, &WorkerMessage::Heartbeat { ended: 0 });
    assert_eq!(
        h.primary.poll_timeout(),
        Some(h.now + Duration::from_secs(30))
    );
    h.primary.handle_timeout(h.now + Duration::from_secs(29));
    assert_eq!(h.outputs(), []);
    h.primary.handle_timeout(h.now + Duration::from_secs(30));
    assert_eq!(
        h.outputs(),
        [Out::Other(Output::Kill {
            worker: w,
            reason: KillReason::HeartbeatTimeout
        })]
    );
    assert_eq!(h.primary.poll_timeout(), None, "killed once");
    h.primary.handle_link_closed(h.now, w);
    h.primary.handle_exit(w, ExitStatus::Signal(9));
    assert!(h.events().contains(&Event::Exit {
        worker: w,
        status: ExitStatus::Signal(9),
        exited_after_disconnect: false,
        killed: Some(KillReason::HeartbeatTimeout),
    }));
}

#[test]
fn a_workers_readiness_is_reported_once_and_not_while_it_leaves() {
    let mut h = Harness::new();
    let w = h.online();
    h.outputs();
    h.recv(w, &WorkerMessage::ServiceReady);
    assert_eq!(h.events(), [Event::Ready { worker: w }]);
    h.recv(w, &WorkerMessage::ServiceReady);
    assert_eq!(h.events(), []);

    let leaving = h.online();
    h.outputs();
    assert!(
        h.primary
            .disconnect(h.now, leaving, Duration::from_secs(30), true)
    );
    h.recv(leaving, &WorkerMessage::ServiceReady);
    assert_eq!(h.events(), []);
}

#[test]
fn a_deaf_worker_is_offered_nothing_and_its_unsent_handoffs_go_elsewhere_at_once() {
    let mut h = Harness::new();
    let (w1, w2, handle) = h.two_workers_on_one_handle();
    h.primary.handle_connection(h.now, handle, 1).unwrap();
    let sent = handoffs(&h.outputs());
    let [(to, seq, _, 1)] = sent[..] else {
        panic!("{sent:?}")
    };
    let other = if to == w1 { w2 } else { w1 };
    // Its link refuses the send: the driver says so and takes the frame back.
    h.primary.handle_deaf(h.now, to);
    assert_eq!(h.primary.handle_reclaimed(h.now, to, seq), Some(1));
    assert_eq!(handoffs(&h.outputs()), [(other, Seq::new(1), false, 1)]);
    // Every later connection goes to the other worker.
    for conn in 2..6 {
        h.primary.handle_connection(h.now, handle, conn).unwrap();
        let sent = handoffs(&h.outputs());
        assert!(sent.iter().all(|(w, ..)| *w == other), "{sent:?}");
    }
}

fn answer_frame(kind: UserKind, payload: &[u8]) -> WorkerMessage {
    WorkerMessage::User(Envelope {
        kind,
        fd: false,
        payload: payload.to_vec(),
    })
}

/// The seq of the one `Request` frame in `outs`.
fn request_seq(outs: &[Out]) -> Seq {
    let seqs: Vec<Seq> = outs
        .iter()
        .filter_map(|o| match o {
            Out::Send(
                _,
                PrimaryMessage::User(Envelope {
                    kind: UserKind::Request { seq },
                    ..
                }),
                None,
            ) => Some(*seq),
            _ => None,
        })
        .collect();
    assert_eq!(seqs.len(), 1, "{outs:?}");
    seqs[0]
}

#[test]
fn a_request_is_numbered_in_the_link_and_its_answer_comes_once() {
    let mut h = Harness::new();
    let w = h.online();
    let handle = h.listen(w, 1, "127.0.0.1:0");
    h.outputs();
    // A handoff and a request in flight together: one numbering, each answered in its kind.
    h.primary.handle_connection(h.now, handle, 7).unwrap();
    let handoff = handoffs(&h.outputs())[0].1;
    let seq = h.primary.send_request(w, b"ping".to_vec()).unwrap();
    assert_eq!(request_seq(&h.outputs()), seq);
    assert_ne!(seq, handoff);
    assert_eq!(h.primary.in_flight(w), 1, "requests are not connections");
    // The worker's cumulative ack covers the handoff, not the request.
    h.recv(
        w,
        &WorkerMessage::Accepted {
            through: seq,
            ended: 0,
        },
    );
    assert_eq!(
        h.outputs(),
        [Out::Other(Output::Delivered { worker: w, conn: 7 })]
    );
    h.recv(w, &answer_frame(UserKind::Reply { ack: seq }, b"pong"));
    assert_eq!(
        h.events(),
        [Event::Answer {
            worker: w,
            seq,
            answer: Answer::Reply(b"pong".to_vec()),
        }]
    );
    // The same answer again is late (as for a request whose waiter gave up): dropped.
    h.recv(w, &answer_frame(UserKind::Refusal { ack: seq }, b"no"));
    assert_eq!(h.outputs(), []);
}

#[test]
fn a_forgotten_request_drops_its_answer() {
    let mut h = Harness::new();
    let w = h.online();
    let seq = h.primary.send_request(w, vec![1]).unwrap();
    h.outputs();
    h.primary.forget_request(w, seq);
    h.recv(w, &answer_frame(UserKind::Refusal { ack: seq }, b"busy"));
    assert_eq!(h.outputs(), []);
    // A refusal of a request still waited for is an answer.
    let seq = h.primary.send_request(w, vec![2]).unwrap();
    h.outputs();
    h.recv(w, &answer_frame(UserKind::Refusal { ack: seq }, b"busy"));
    assert_eq!(
        h.events(),
        [Event::Answer {
            worker: w,
            seq,
            answer: Answer::Refusal("busy".into()),
        }]
    );
}

#[test]
fn answers_to_requests_never_sent_or_of_another_kind_break_the_protocol() {
    let mut h = Harness::new();
    let (w1, w2, handle) = h.two_workers_on_one_handle();
    // Never issued.
    h.recv(
        w1,
        &answer_frame(UserKind::Reply { ack: Seq::new(99) }, b""),
    );
    let events = h.events();
    assert_eq!(
        events[0],
        Event::Error {
            worker: w1,
            error: LinkError::UnknownAck { ack: Seq::new(99) }.into()
        }
    );
    // A user answer naming a handoff.
    h.primary.handle_connection(h.now, handle, 3).unwrap();
    let sent = handoffs(&h.outputs());
    let [(to, seq, _, 3)] = sent[..] else {
        panic!("{sent:?}")
    };
    assert_eq!(to, w2, "w1 broke the protocol and is offered nothing");
    h.recv(w2, &answer_frame(UserKind::Reply { ack: seq }, b""));
    assert_eq!(
        h.events()[0],
        Event::Error {
            worker: w2,
            error: LinkError::WrongReply { ack: seq }.into()
        }
    );
}

#[test]
fn requests_to_a_gone_or_deaf_worker_are_not_sent() {
    let mut h = Harness::new();
    let w1 = h.online();
    let w2 = h.online();
    h.outputs();
    h.primary.handle_deaf(h.now, w1);
    assert_eq!(h.primary.send_request(w1, vec![1]), Err(SendError::Closed));
    h.primary.handle_link_closed(h.now, w2);
    assert_eq!(h.primary.send_request(w2, vec![1]), Err(SendError::Closed));
    assert_eq!(
        h.primary.send_request(WorkerId::new(77), vec![1]),
        Err(SendError::Closed)
    );
    let online = h.online();
    assert!(matches!(
        h.primary.send_request(online, vec![0; MAX_MESSAGE + 1]),
        Err(SendError::TooLarge(_))
    ));
    let outs = h.outputs();
    assert!(
        !outs
            .iter()
            .any(|o| matches!(o, Out::Send(_, PrimaryMessage::User(_), _))),
        "{outs:?}"
    );
}

/// A harness whose workers are never killed for silence: only the disconnect deadline fires.
fn without_heartbeats() -> Harness {
    let config = Config {
        heartbeat_timeout: None,
        ..Config::default()
    };
    Harness {
        primary: Primary::new(config),
        now: Instant::now(),
    }
}

fn kills(outs: &[Out]) -> Vec<(WorkerId, KillReason)> {
    outs.iter()
        .filter_map(|o| match o {
            Out::Other(Output::Kill { worker, reason }) => Some((*worker, *reason)),
            _ => None,
        })
        .collect()
}

#[test]
fn a_worker_still_there_at_its_disconnect_deadline_is_killed_by_the_core() {
    let mut h = without_heartbeats();
    let w = h.online();
    let other = h.online();
    h.outputs();
    assert_eq!(h.primary.poll_timeout(), None);
    let asked = h.now;
    assert!(h.primary.disconnect(asked, w, Duration::from_secs(5), true));
    h.outputs();
    assert_eq!(
        h.primary.poll_timeout(),
        Some(asked + Duration::from_secs(5))
    );
    // It answers (leaves on purpose) and even closes its link, but its process stays.
    h.recv(
        w,
        &WorkerMessage::ExitedAfterDisconnect { seq: Seq::new(2) },
    );
    h.primary.handle_link_closed(h.now, w);
    assert_eq!(h.events(), [Event::Disconnect { worker: w }]);
    h.primary
        .handle_timeout(asked + Duration::from_secs(5) - Duration::from_millis(1));
    assert_eq!(kills(&h.outputs()), [], "not before its deadline");
    h.primary.handle_timeout(asked + Duration::from_secs(5));
    assert_eq!(
        kills(&h.outputs()),
        [(w, KillReason::DisconnectTimeout)],
        "only the late worker"
    );
    assert_eq!(h.primary.poll_timeout(), None, "killed once");
    h.primary.handle_timeout(asked + Duration::from_secs(6));
    assert_eq!(kills(&h.outputs()), []);
    h.primary.handle_exit(w, ExitStatus::Signal(9));
    assert_eq!(
        h.events(),
        [Event::Exit {
            worker: w,
            status: ExitStatus::Signal(9),
            exited_after_disconnect: true,
            killed: Some(KillReason::DisconnectTimeout),
        }]
    );
    assert!(h.primary.lifecycle(other).is_some());
}

#[test]
fn a_worker_that_exits_before_its_disconnect_deadline_is_not_killed() {
    let mut h = without_heartbeats();
    let w = h.online();
    h.outputs();
    assert!(h.primary.disconnect(h.now, w, Duration::from_secs(5), true));
    h.outputs();
    // The exit seen before the link's close (the driver's `wait` may win): no kill either.
    h.primary.handle_exit(w, ExitStatus::Code(0));
    assert_eq!(h.primary.poll_timeout(), None);
    h.primary.handle_timeout(h.now + Duration::from_secs(5));
    assert_eq!(kills(&h.outputs()), []);
    h.primary.handle_link_closed(h.now, w);
    h.primary.handle_timeout(h.now + Duration::from_secs(10));
    let outs = h.outputs();
    assert_eq!(kills(&outs), []);
    assert!(outs.contains(&Out::Other(Output::Event(Event::Exit {
        worker: w,
        status: ExitStatus::Code(0),
        exited_after_disconnect: true,
        killed: None,
    }))));
}

#[test]
fn a_worker_leaving_on_its_own_is_bounded_by_the_primarys_deadline() {
    let mut h = without_heartbeats();
    let w = h.online();
    h.outputs();
    // Leaving on its own: no deadline from the primary, none in the core.
    h.recv(
        w,
        &WorkerMessage::ExitedAfterDisconnect { seq: Seq::new(2) },
    );
    h.outputs();
    assert_eq!(h.primary.poll_timeout(), None);
    // The primary's disconnect (a reload) is not sent again, but its deadline holds.
    assert!(!h.primary.disconnect(h.now, w, Duration::from_secs(3), true));
    assert_eq!(h.outputs(), []);
    assert_eq!(
        h.primary.poll_timeout(),
        Some(h.now + Duration::from_secs(3))
    );
    // Asked again with a longer one: the earlier deadline stays.
    assert!(
        !h.primary
            .disconnect(h.now, w, Duration::from_secs(30), true)
    );
    h.primary.handle_timeout(h.now + Duration::from_secs(3));
    assert_eq!(kills(&h.outputs()), [(w, KillReason::DisconnectTimeout)]);
}

#[test]
fn a_worker_killed_for_another_reason_is_not_killed_again_at_its_disconnect_deadline() {
    let mut h = Harness::new();
    let w = h.online();
    h.outputs();
    assert!(
        h.primary
            .disconnect(h.now, w, Duration::from_secs(60), true)
    );
    h.outputs();
    // Silent past its heartbeat deadline (30 s), before its disconnect deadline.
    h.primary.handle_timeout(h.now + Duration::from_secs(30));
    assert_eq!(kills(&h.outputs()), [(w, KillReason::HeartbeatTimeout)]);
    h.primary.handle_timeout(h.now + Duration::from_secs(60));
    assert_eq!(kills(&h.outputs()), []);
}

#[test]
fn a_held_worker_is_not_presumed_hung_and_its_deadlines_resume_moved_by_the_hold() {
    let mut h = Harness::new();
    let w = h.online();
    h.outputs();
    let start = h.now;
    assert_eq!(
        h.primary.poll_timeout(),
        Some(start + Duration::from_secs(30))
    );
    // Held 10 s in: no deadline while held, however long.
    h.primary.hold(start + Duration::from_secs(10), w);
    assert_eq!(h.primary.poll_timeout(), None);
    h.primary.handle_timeout(start + Duration::from_secs(100));
    assert_eq!(h.outputs(), []);
    // Released at 100 s: 20 s of its 30 s remain.
    h.primary.release(start + Duration::from_secs(100), w);
    assert_eq!(
        h.primary.poll_timeout(),
        Some(start + Duration::from_secs(120))
    );
    h.primary.handle_timeout(start + Duration::from_secs(119));
    assert_eq!(h.outputs(), []);
    h.primary.handle_timeout(start + Duration::from_secs(120));
    assert_eq!(
        h.outputs(),
        [Out::Other(Output::Kill {
            worker: w,
            reason: KillReason::HeartbeatTimeout
        })]
    );
}

#[test]
fn the_disconnect_deadline_holds_while_the_driver_holds_the_workers_frames() {
    let mut h = Harness::new();
    let w = h.online();
    h.outputs();
    assert!(h.primary.disconnect(h.now, w, Duration::from_secs(5), true));
    h.outputs();
    h.primary.hold(h.now + Duration::from_secs(1), w);
    assert_eq!(
        h.primary.poll_timeout(),
        Some(h.now + Duration::from_secs(5)),
        "held, the disconnect deadline still counts"
    );
    h.primary.handle_timeout(h.now + Duration::from_secs(5));
    assert_eq!(
        h.outputs(),
        [Out::Other(Output::Kill {
            worker: w,
            reason: KillReason::DisconnectTimeout
        })]
    );
}

#[test]
fn a_worker_whose_link_closed_still_gets_the_deadline_of_a_later_disconnect() {
    let mut h = without_heartbeats();
    let w = h.online();
    h.outputs();
    // Leaves on its own and closes its link once its connections are done; its process stays.
    h.recv(
        w,
        &WorkerMessage::ExitedAfterDisconnect { seq: Seq::new(2) },
    );
    h.primary.handle_link_closed(h.now, w);
    h.outputs();
    // The supervisor's shutdown now disconnects it, and waits for its exit.
    h.primary.disconnect(h.now, w, Duration::from_secs(3), true);
    h.outputs();
    assert_eq!(
        h.primary.poll_timeout(),
        Some(h.now + Duration::from_secs(3)),
        "no deadline: Primary::disconnect_within waits for this exit forever"
    );
    h.primary.handle_timeout(h.now + Duration::from_secs(3));
    assert_eq!(kills(&h.outputs()), [(w, KillReason::DisconnectTimeout)]);
}

fn scheduling(policy: crate::SchedulingPolicy, cap: Option<usize>) -> Harness {
    Harness {
        primary: Primary::new(Config {
            registry: RegistryConfig {
                policy,
                max_connections_per_worker: cap.and_then(std::num::NonZeroUsize::new),
                ..RegistryConfig::default()
            },
            ..Config::default()
        }),
        now: Instant::now(),
    }
}

#[test]
fn least_outstanding_sends_new_connections_away_from_a_busy_worker_until_it_reports() {
    let mut h = scheduling(crate::SchedulingPolicy::LeastOutstanding, None);
    let (w1, w2, handle) = h.two_workers_on_one_handle();
    // Ties in turn: one each.
    for conn in 1..=2 {
        h.primary.handle_connection(h.now, handle, conn).unwrap();
    }
    let sent = handoffs(&h.outputs());
    assert_eq!(
        sent.iter().map(|s| s.0).collect::<Vec<_>>(),
        [w1, w2],
        "{sent:?}"
    );
    // Both acked; worker 2 reports its connection ended, worker 1's stays open (busy).
    h.recv(
        w1,
        &WorkerMessage::Accepted {
            through: sent[0].1,
            ended: 0,
        },
    );
    h.recv(
        w2,
        &WorkerMessage::Accepted {
            through: sent[1].1,
            ended: 1,
        },
    );
    h.outputs();
    assert_eq!(
        (h.primary.outstanding(w1), h.primary.outstanding(w2)),
        (1, 0)
    );
    // Round robin would give the next one to worker 1; it goes to the idle worker 2. Then 1
    // each: a tie, broken in turn (worker 1 was served longest ago).
    for conn in 3..=4 {
        h.primary.handle_connection(h.now, handle, conn).unwrap();
    }
    let sent = handoffs(&h.outputs());
    assert_eq!(
        sent.iter().map(|s| s.0).collect::<Vec<_>>(),
        [w2, w1],
        "{sent:?}"
    );
    assert_eq!(
        (h.primary.outstanding(w1), h.primary.outstanding(w2)),
        (2, 1)
    );
    assert_eq!(h.primary.counters(w2).unwrap().ended, 1);
}

#[test]
fn a_worker_reporting_more_ended_connections_than_it_was_given_is_killed() {
    let mut h = scheduling(crate::SchedulingPolicy::LeastOutstanding, None);
    let (w1, w2, handle) = h.two_workers_on_one_handle();
    h.primary.handle_connection(h.now, handle, 1).unwrap();
    let sent = handoffs(&h.outputs());
    assert_eq!(sent[0].0, w1);
    // Not acked yet: nothing can have ended.
    h.recv(w1, &WorkerMessage::Heartbeat { ended: 1 });
    let outs = h.outputs();
    assert_eq!(kills(&outs), [(w1, KillReason::ProtocolViolation)]);
    assert!(outs.iter().any(|o| matches!(
        o,
        Out::Other(Output::Event(Event::Error {
            error: ProtocolError::EndedMiscounted {
                ended: 1,
                given: 0,
                previous: 0
            },
            ..
        }))
    )));
    // A count that goes back is a violation too.
    h.primary.handle_connection(h.now, handle, 2).unwrap();
    let sent = handoffs(&h.outputs());
    assert_eq!(sent[0].0, w2);
    h.recv(
        w2,
        &WorkerMessage::Accepted {
            through: sent[0].1,
            ended: 1,
        },
    );
    assert!(kills(&h.outputs()).is_empty());
    h.recv(w2, &WorkerMessage::Heartbeat { ended: 0 });
    assert_eq!(kills(&h.outputs()), [(w2, KillReason::ProtocolViolation)]);
}

#[test]
fn workers_at_their_cap_are_offered_nothing_and_accepting_stops_until_one_frees() {
    let mut h = scheduling(crate::SchedulingPolicy::RoundRobin, Some(1));
    let (w1, w2, handle) = h.two_workers_on_one_handle();
    for conn in 1..=2 {
        assert!(h.primary.wants_connections(handle));
        h.primary.handle_connection(h.now, handle, conn).unwrap();
    }
    let sent = handoffs(&h.outputs());
    assert_eq!(sent.iter().map(|s| s.0).collect::<Vec<_>>(), [w1, w2]);
    // Both at their cap: the kernel's backlog holds the rest.
    assert!(!h.primary.wants_connections(handle));
    // Acks alone free nothing; an ended connection does.
    h.recv(
        w1,
        &WorkerMessage::Accepted {
            through: sent[0].1,
            ended: 0,
        },
    );
    assert!(!h.primary.wants_connections(handle));
    h.recv(w1, &WorkerMessage::Heartbeat { ended: 1 });
    assert!(h.primary.wants_connections(handle));
    h.primary.handle_connection(h.now, handle, 3).unwrap();
    assert_eq!(handoffs(&h.outputs())[0].0, w1);
    assert!(!h.primary.wants_connections(handle));
    assert_eq!(
        (h.primary.outstanding(w1), h.primary.outstanding(w2)),
        (1, 1)
    );
}

#[test]
fn listen_replies_ask_for_prompt_reports_only_when_the_count_matters() {
    for (policy, cap, expected) in [
        (crate::SchedulingPolicy::RoundRobin, None, false),
        (crate::SchedulingPolicy::LeastOutstanding, None, true),
        (crate::SchedulingPolicy::RoundRobin, Some(4), true),
    ] {
        let mut h = scheduling(policy, cap);
        let w = h.online();
        let request = ListenRequest {
            target: ListenTarget::Ip("127.0.0.1:0".parse().unwrap()),
            kind: SocketKind::Stream,
            backlog: 0,
            flags: ListenFlags::default(),
        };
        h.recv(
            w,
            &WorkerMessage::QueryServer {
                seq: Seq::new(1),
                request,
            },
        );
        let handle = h
            .outputs()
            .iter()
            .find_map(|o| match o {
                Out::Other(Output::Bind { handle, .. }) => Some(*handle),
                _ => None,
            })
            .unwrap();
        h.primary.handle_bound(
            h.now,
            handle,
            Ok(BoundAddr::Ip("127.0.0.1:4321".parse().unwrap())),
        );
        let report_ends = h.outputs().iter().find_map(|o| match o {
            Out::Send(
                _,
                PrimaryMessage::ListenReply {
                    result: Ok(info), ..
                },
                _,
            ) => Some(info.report_ends),
            _ => None,
        });
        assert_eq!(report_ends, Some(expected), "{policy:?} {cap:?}");
    }
}

/// A leaving `from` hands connection `conn` back on `handle` with `prefix`; returns the outputs.
fn hand_back(h: &mut Harness, from: WorkerId, handle: HandleId, prefix: &[u8]) -> Vec<Out> {
    receive_with_fd(
        h,
        from,
        &WorkerMessage::HandBack {
            handle,
            prefix: prefix.to_vec(),
        },
    );
    h.outputs()
}

#[test]
fn a_handed_back_connection_goes_to_the_youngest_worker_that_takes_its_bytes() {
    let mut h = Harness::new();
    let (w1, w2, handle) = h.two_workers_on_one_handle();
    h.primary.handle_connection(h.now, handle, 1).unwrap();
    let [(to, seq, _, 1)] = handoffs(&h.outputs())[..] else {
        panic!()
    };
    assert_eq!(to, w1);
    h.recv(
        w1,
        &WorkerMessage::Accepted {
            through: seq,
            ended: 0,
        },
    );
    h.outputs();
    // A third worker (the replacement) that takes prefixes, a second that does not.
    let w3 = h.online();
    assert_eq!(h.listen(w3, 1, "127.0.0.1:0"), handle);
    h.recv(w3, &WorkerMessage::TakesPrefixes { handle });
    h.outputs();
    // Asked to leave while others stay: it may hand back.
    assert!(
        h.primary
            .disconnect(h.now, w1, Duration::from_secs(5), true)
    );
    assert!(h.outputs().contains(&Out::Send(
        w1,
        PrimaryMessage::Disconnect {
            within_ms: 5_000,
            hand_back: true
        },
        None
    )));
    let outs = hand_back(&mut h, w1, handle, b"GE");
    let [
        Out::Other(Output::Returned {
            worker,
            handle: back,
            ref prefix,
            handed_back: true,
        }),
    ] = outs[..]
    else {
        panic!("{outs:?}")
    };
    assert_eq!((worker, back, &prefix[..]), (w1, handle, &b"GE"[..]));
    // The driver keeps it under a new token and gives it to the core with its bytes: it goes
    // to w3 (the youngest, and it takes prefixes), never to w2, with the bytes.
    h.primary
        .handle_returned(h.now, w1, handle, 7, b"GE".to_vec())
        .unwrap();
    let outs = h.outputs();
    let sent: Vec<_> = outs
        .iter()
        .filter_map(|o| match o {
            Out::Send(w, PrimaryMessage::NewConn { seq, prefix, .. }, Some(_)) => {
                Some((*w, *seq, prefix.clone()))
            }
            _ => None,
        })
        .collect();
    assert_eq!(sent.len(), 1, "{outs:?}");
    let (to, seq, prefix) = sent[0].clone();
    assert_eq!((to, &prefix[..]), (w3, &b"GE"[..]));
    assert_eq!(h.primary.counters(w1).unwrap().handed_back, 1);
    // Refused, it goes out again with its bytes; w2 never gets it.
    receive_with_fd(&mut h, w3, &WorkerMessage::Refused { ack: seq });
    let outs = h.outputs();
    assert!(
        !outs
            .iter()
            .any(|o| matches!(o, Out::Send(w, PrimaryMessage::NewConn { .. }, _) if *w == w2)),
        "{outs:?}"
    );
    h.recv(w3, &WorkerMessage::Ready { handle });
    let outs = h.outputs();
    assert!(outs.iter().any(|o| matches!(
        o,
        Out::Send(w, PrimaryMessage::NewConn { prefix, .. }, _) if *w == w3 && prefix == b"GE"
    )));
}

#[test]
fn a_connection_with_bytes_nobody_takes_is_closed_and_one_without_goes_anywhere() {
    let mut h = Harness::new();
    let (w1, w2, handle) = h.two_workers_on_one_handle();
    for conn in 1..=2 {
        h.primary.handle_connection(h.now, handle, conn).unwrap();
    }
    for (to, seq, _, _) in handoffs(&h.outputs()) {
        h.recv(
            to,
            &WorkerMessage::Accepted {
                through: seq,
                ended: 0,
            },
        );
    }
    h.outputs();
    h.primary
        .disconnect(h.now, w1, Duration::from_secs(5), true);
    h.outputs();
    hand_back(&mut h, w1, handle, b"");
    h.primary
        .handle_returned(h.now, w1, handle, 8, Vec::new())
        .unwrap();
    assert_eq!(handoffs(&h.outputs()), [(w2, Seq::new(2), false, 8)]);
    // w2 never said it takes prefixes: a connection with bytes cannot go to it.
    hand_back(&mut h, w1, handle, b"GE");
    assert_eq!(
        h.primary
            .handle_returned(h.now, w1, handle, 9, b"GE".to_vec()),
        Err(9)
    );
}

#[test]
fn hand_backs_are_bounded_by_what_the_worker_was_given() {
    let mut h = Harness::new();
    let (w1, _, handle) = h.two_workers_on_one_handle();
    h.primary.handle_connection(h.now, handle, 1).unwrap();
    let [(to, seq, _, 1)] = handoffs(&h.outputs())[..] else {
        panic!()
    };
    assert_eq!(to, w1);
    h.recv(
        w1,
        &WorkerMessage::Accepted {
            through: seq,
            ended: 0,
        },
    );
    h.outputs();
    // Not asked to hand back (it is not leaving): refused, whatever it sends.
    let outs = hand_back(&mut h, w1, handle, b"");
    assert!(outs.contains(&Out::Other(Output::Event(Event::Error {
        worker: w1,
        error: ProtocolError::HandBackNotAsked
    }))));

    // Too many bytes.
    let mut h = Harness::new();
    let (w1, _, handle) = h.two_workers_on_one_handle();
    h.primary
        .disconnect(h.now, w1, Duration::from_secs(5), true);
    h.outputs();
    let long = vec![b'x'; wire::MAX_PREFIX + 1];
    let outs = hand_back(&mut h, w1, handle, &long);
    assert!(outs.contains(&Out::Other(Output::Event(Event::Error {
        worker: w1,
        error: ProtocolError::PrefixTooLong {
            len: wire::MAX_PREFIX + 1
        }
    }))));

    // A second worker: one connection given, two handed back.
    let mut h = Harness::new();
    let (w1, _, handle) = h.two_workers_on_one_handle();
    h.primary.handle_connection(h.now, handle, 1).unwrap();
    let [(_, seq, _, _)] = handoffs(&h.outputs())[..] else {
        panic!()
    };
    h.recv(
        w1,
        &WorkerMessage::Accepted {
            through: seq,
            ended: 0,
        },
    );
    h.outputs();
    h.primary
        .disconnect(h.now, w1, Duration::from_secs(5), true);
    h.outputs();
    let first = hand_back(&mut h, w1, handle, b"");
    assert!(matches!(first[..], [Out::Other(Output::Returned { .. })]));
    let second = hand_back(&mut h, w1, handle, b"");
    assert!(second.contains(&Out::Other(Output::Event(Event::Error {
        worker: w1,
        error: ProtocolError::NotGiven { handle }
    }))));

    // A worker never given a connection on the handle.
    let mut h = Harness::new();
    let (_, w2, handle) = h.two_workers_on_one_handle();
    h.primary
        .disconnect(h.now, w2, Duration::from_secs(5), true);
    h.outputs();
    let outs = hand_back(&mut h, w2, handle, b"");
    assert!(outs.contains(&Out::Other(Output::Event(Event::Error {
        worker: w2,
        error: ProtocolError::NotGiven { handle }
    }))));
}

#[test]
fn the_last_worker_to_leave_is_not_told_to_hand_back() {
    let mut h = Harness::new();
    let (w1, w2, _) = h.two_workers_on_one_handle();
    assert!(
        h.primary
            .disconnect(h.now, w1, Duration::from_secs(5), true)
    );
    assert!(
        h.primary
            .disconnect(h.now, w2, Duration::from_secs(5), true)
    );
    let disconnects: Vec<_> = h
        .outputs()
        .into_iter()
        .filter_map(|o| match o {
            Out::Send(w, PrimaryMessage::Disconnect { hand_back, .. }, _) => Some((w, hand_back)),
            _ => None,
        })
        .collect();
    assert_eq!(disconnects, [(w1, true), (w2, false)]);
}
