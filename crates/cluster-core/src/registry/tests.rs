use std::time::Instant;

use super::*;
use crate::wire::{ListenFlags, ListenTarget, SocketKind};

const W1: WorkerId = WorkerId::new(1);
const W2: WorkerId = WorkerId::new(2);

fn request(addr: &str, kind: SocketKind) -> ListenRequest {
    ListenRequest {
        target: ListenTarget::Ip(addr.parse().unwrap()),
        kind,
        backlog: 0,
        flags: ListenFlags::default(),
    }
}

fn tcp(addr: &str) -> ListenRequest {
    request(addr, SocketKind::Stream)
}

fn drain(reg: &mut Registry<u32>) -> Vec<RegistryOutput<u32>> {
    std::iter::from_fn(|| reg.poll()).collect()
}

fn seq(n: u64) -> Seq {
    Seq::new(n)
}

/// Queries and completes the bind, returning the handle.
fn listen(reg: &mut Registry<u32>, worker: WorkerId, s: u64, addr: &str) -> HandleId {
    reg.query(worker, seq(s), tcp(addr));
    let mut handle = None;
    for out in drain(reg) {
        match out {
            RegistryOutput::Bind { handle: h, .. } => {
                reg.bound(h, Ok(BoundAddr::Ip("127.0.0.1:4000".parse().unwrap())));
                handle = Some(h);
            }
            RegistryOutput::Reply {
                result: Ok(info), ..
            } => handle = Some(info.handle),
            other => panic!("unexpected {other:?}"),
        }
    }
    for out in drain(reg) {
        assert!(
            matches!(out, RegistryOutput::Reply { result: Ok(_), .. }),
            "{out:?}"
        );
    }
    handle.unwrap()
}

#[test]
fn one_bind_serves_every_worker_asking_meanwhile() {
    let mut reg = Registry::new(RegistryConfig::default());
    reg.query(W1, seq(1), tcp("127.0.0.1:0"));
    reg.query(W2, seq(1), tcp("127.0.0.1:0"));
    let outs = drain(&mut reg);
    assert_eq!(outs.len(), 1, "one bind for both: {outs:?}");
    let RegistryOutput::Bind {
        handle,
        distribution,
        ..
    } = outs[0].clone()
    else {
        panic!()
    };
    assert_eq!(distribution, Distribution::RoundRobin);
    let addr = BoundAddr::Ip("127.0.0.1:40000".parse().unwrap());
    reg.bound(handle, Ok(addr.clone()));
    let info = ListenInfo {
        handle,
        addr,
        distribution,
        report_ends: false,
    };
    assert_eq!(
        drain(&mut reg),
        [
            RegistryOutput::Reply {
                worker: W1,
                seq: seq(1),
                result: Ok(info.clone())
            },
            RegistryOutput::Reply {
                worker: W2,
                seq: seq(1),
                result: Ok(info)
            },
        ]
    );
}

#[test]
fn failed_bind_answers_all_waiters_and_forgets_the_key() {
    let mut reg = Registry::<u32>::new(RegistryConfig::default());
    reg.query(W1, seq(1), tcp("127.0.0.1:80"));
    reg.query(W2, seq(5), tcp("127.0.0.1:80"));
    let RegistryOutput::Bind { handle, .. } = drain(&mut reg)[0].clone() else {
        panic!()
    };
    reg.bound(handle, Err(Errno(13)));
    assert_eq!(
        drain(&mut reg),
        [
            RegistryOutput::Reply {
                worker: W1,
                seq: seq(1),
                result: Err(Errno(13))
            },
            RegistryOutput::Reply {
                worker: W2,
                seq: seq(5),
                result: Err(Errno(13))
            },
        ]
    );
    assert!(reg.is_empty());
    // The retry binds again (scenario retry-after-release).
    reg.query(W1, seq(2), tcp("127.0.0.1:80"));
    assert!(matches!(drain(&mut reg)[..], [RegistryOutput::Bind { .. }]));
}

#[test]
fn same_worker_binding_a_fixed_port_twice_gets_eaddrinuse() {
    let mut reg = Registry::<u32>::new(RegistryConfig::default());
    listen(&mut reg, W1, 1, "127.0.0.1:8080");
    reg.query(W1, seq(2), tcp("127.0.0.1:8080"));
    assert_eq!(
        drain(&mut reg),
        [RegistryOutput::Reply {
            worker: W1,
            seq: seq(2),
            result: Err(Errno::EADDRINUSE)
        }]
    );
    // Another worker shares it.
    reg.query(W2, seq(1), tcp("127.0.0.1:8080"));
    assert!(matches!(
        drain(&mut reg)[..],
        [RegistryOutput::Reply { result: Ok(_), .. }]
    ));
}

#[test]
fn port_zero_index_gives_each_ordinal_its_own_shared_port() {
    let mut reg = Registry::<u32>::new(RegistryConfig::default());
    let a1 = listen(&mut reg, W1, 1, "127.0.0.1:0");
    let b1 = listen(&mut reg, W1, 2, "127.0.0.1:0");
    assert_ne!(a1, b1);
    let a2 = listen(&mut reg, W2, 1, "127.0.0.1:0");
    let b2 = listen(&mut reg, W2, 2, "127.0.0.1:0");
    assert_eq!((a1, b1), (a2, b2));
    // Closing the first frees index 0 for this worker: a re-bind rejoins it.
    reg.close(W1, a1).unwrap();
    assert_eq!(drain(&mut reg), []);
    assert_eq!(listen(&mut reg, W1, 3, "127.0.0.1:0"), a1);
}

#[test]
fn port_reuse_between_workers_after_failure_and_close() {
    // Node's sequential/test-cluster-port-reuse-between-workers (fails on Node 20).
    let mut reg = Registry::<u32>::new(RegistryConfig::default());
    let h = listen(&mut reg, W1, 1, "127.0.0.1:9000");
    reg.query(W1, seq(2), tcp("127.0.0.1:9000"));
    assert!(matches!(
        drain(&mut reg)[..],
        [RegistryOutput::Reply {
            result: Err(Errno::EADDRINUSE),
            ..
        }]
    ));
    reg.close(W1, h).unwrap();
    assert_eq!(drain(&mut reg), [RegistryOutput::Unbind { handle: h }]);
    let h2 = listen(&mut reg, W2, 1, "127.0.0.1:9000");
    let h3 = listen(&mut reg, W1, 3, "127.0.0.1:9000");
    assert_eq!(h2, h3);
    assert_ne!(h, h2);
}

#[test]
fn datagrams_are_always_shared() {
    let mut reg = Registry::<u32>::new(RegistryConfig::default());
    reg.query(W1, seq(1), request("0.0.0.0:0", SocketKind::Datagram));
    assert!(matches!(
        drain(&mut reg)[..],
        [RegistryOutput::Bind {
            distribution: Distribution::Shared,
            ..
        }]
    ));
}

#[test]
fn shared_policy_shares_streams_and_last_leaver_unbinds() {
    let config = RegistryConfig {
        policy: SchedulingPolicy::Shared,
        ..RegistryConfig::default()
    };
    let mut reg = Registry::<u32>::new(config);
    let h = listen(&mut reg, W1, 1, "127.0.0.1:0");
    assert_eq!(listen(&mut reg, W2, 1, "127.0.0.1:0"), h);
    assert!(!reg.wants_connections(h));
    assert_eq!(reg.connection(h, 1), Err(1));
    reg.remove_worker(Instant::now(), W1);
    assert_eq!(drain(&mut reg), []);
    reg.close(W2, h).unwrap();
    assert_eq!(drain(&mut reg), [RegistryOutput::Unbind { handle: h }]);
    assert_eq!(
        reg.close(W2, h),
        Err(RegistryError::NotHeld {
            worker: W2,
            handle: h
        })
    );
}

#[test]
fn worker_gone_while_binding_is_not_answered_and_empty_bind_is_closed() {
    let mut reg = Registry::<u32>::new(RegistryConfig::default());
    reg.query(W1, seq(1), tcp("127.0.0.1:0"));
    let RegistryOutput::Bind { handle, .. } = drain(&mut reg)[0].clone() else {
        panic!()
    };
    reg.remove_worker(Instant::now(), W1);
    reg.bound(handle, Ok(BoundAddr::Ip("127.0.0.1:1".parse().unwrap())));
    assert_eq!(drain(&mut reg), [RegistryOutput::Unbind { handle }]);
    assert!(reg.is_empty());
}

#[test]
fn disconnecting_worker_pending_query_is_refused() {
    let mut reg = Registry::<u32>::new(RegistryConfig::default());
    reg.query(W1, seq(1), tcp("127.0.0.1:0"));
    reg.query(W2, seq(1), tcp("127.0.0.1:0"));
    drain(&mut reg);
    reg.leave_all(W1);
    assert_eq!(
        drain(&mut reg),
        [RegistryOutput::Reply {
            worker: W1,
            seq: seq(1),
            result: Err(Errno::ESHUTDOWN)
        }]
    );
}

#[test]
fn closing_handle_keeps_in_flight_until_acked_while_port_is_rebindable() {
    let mut reg = Registry::<u32>::new(RegistryConfig::default());
    let h = listen(&mut reg, W1, 1, "127.0.0.1:7000");
    reg.connection(h, 10).unwrap();
    assert_eq!(
        drain(&mut reg),
        [RegistryOutput::Dispatch {
            worker: W1,
            handle: h,
            conn: 10
        }]
    );
    reg.close(W1, h).unwrap();
    assert_eq!(drain(&mut reg), [RegistryOutput::Unbind { handle: h }]);
    // The port can be bound afresh while the old handle waits for its ack.
    let h2 = listen(&mut reg, W2, 1, "127.0.0.1:7000");
    assert_ne!(h, h2);
    reg.ack(W1, h, 10, false).unwrap();
    assert_eq!(drain(&mut reg), [RegistryOutput::Close(10)]);
    assert_eq!(reg.handles().collect::<Vec<_>>(), [h2]);
}

#[test]
fn listens_per_worker_are_bounded() {
    let config = RegistryConfig {
        max_listens_per_worker: 2,
        ..RegistryConfig::default()
    };
    let mut reg = Registry::<u32>::new(config);
    listen(&mut reg, W1, 1, "127.0.0.1:0");
    listen(&mut reg, W1, 2, "127.0.0.1:0");
    reg.query(W1, seq(3), tcp("127.0.0.1:0"));
    assert_eq!(
        drain(&mut reg),
        [RegistryOutput::Reply {
            worker: W1,
            seq: seq(3),
            result: Err(Errno::EMFILE)
        }]
    );
}

#[test]
fn acks_and_ready_for_foreign_handles_are_errors() {
    let mut reg = Registry::<u32>::new(RegistryConfig::default());
    let h = listen(&mut reg, W1, 1, "127.0.0.1:0");
    assert_eq!(
        reg.ready(W2, h),
        Err(RegistryError::NotHeld {
            worker: W2,
            handle: h
        })
    );
    assert_eq!(
        reg.ack(W1, h, 99, true),
        Err(RegistryError::RoundRobin(RoundRobinError::NotInFlight(W1)))
    );
    assert_eq!(
        reg.close(W1, HandleId::new(77)),
        Err(RegistryError::NotHeld {
            worker: W1,
            handle: HandleId::new(77)
        })
    );
}
