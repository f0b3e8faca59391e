//! Model-based property tests of the round-robin handle against design.md §3 invariants 1 and 2.

use std::collections::{BTreeMap, BTreeSet};

use cluster_core::WorkerId;
use cluster_core::registry::{RoundRobin, RoundRobinOutput};
use proptest::prelude::*;

const WORKERS: u64 = 4;

#[derive(Clone, Debug)]
enum Op {
    Add(u64),
    Remove(u64),
    Leave(u64),
    Push,
    Ack {
        worker: u64,
        pick: usize,
        accepted: bool,
    },
    Ready(u64),
}

fn op() -> impl Strategy<Value = Op> {
    let w = 1..=WORKERS;
    prop_oneof![
        2 => w.clone().prop_map(Op::Add),
        1 => w.clone().prop_map(Op::Remove),
        1 => w.clone().prop_map(Op::Leave),
        6 => Just(Op::Push),
        6 => (w.clone(), any::<usize>(), prop::bool::weighted(0.8))
            .prop_map(|(worker, pick, accepted)| Op::Ack { worker, pick, accepted }),
        2 => w.prop_map(Op::Ready),
    ]
}

#[derive(Default)]
struct Model {
    next_conn: u32,
    accepted_by_handle: BTreeSet<u32>,
    delivered: BTreeMap<u32, WorkerId>,
    closed: BTreeSet<u32>,
    /// Active members as the test sees them, with their paused flag.
    active: BTreeMap<WorkerId, bool>,
    dispatches: u64,
}

fn check(
    rr: &RoundRobin<u32>,
    model: &Model,
    window: usize,
    max_queued: usize,
) -> Result<(), TestCaseError> {
    // Invariant 1: every connection is in exactly one place.
    let mut places: BTreeMap<u32, usize> = BTreeMap::new();
    for c in rr.queued() {
        *places.entry(*c).or_default() += 1;
    }
    for w in rr.members() {
        prop_assert!(rr.in_flight(w).len() <= window, "window exceeded for {w}");
        for c in rr.in_flight(w) {
            *places.entry(*c).or_default() += 1;
        }
    }
    for c in model.delivered.keys().chain(&model.closed) {
        *places.entry(*c).or_default() += 1;
    }
    for c in &model.accepted_by_handle {
        prop_assert_eq!(
            places.get(c).copied(),
            Some(1),
            "connection {} is in {:?} places",
            c,
            places.get(c)
        );
    }
    prop_assert_eq!(places.len(), model.accepted_by_handle.len());
    // Work conservation: a non-empty queue means no active, unpaused member has room.
    if rr.queued().len() > 0 {
        for (w, paused) in &model.active {
            prop_assert!(
                *paused || rr.in_flight(*w).len() >= window,
                "{w} idle while connections wait"
            );
        }
    }
    // Orphaned connections are closed, never kept.
    if model.active.is_empty() {
        prop_assert_eq!(rr.queued().len(), 0);
        prop_assert!(!rr.wants_connections());
    }
    // The bound: a full queue stops accepting.
    if rr.queued().len() >= max_queued {
        prop_assert!(!rr.wants_connections());
    }
    for w in model.active.keys() {
        prop_assert!(rr.is_active_member(*w));
    }
    Ok(())
}

fn drain(rr: &mut RoundRobin<u32>, model: &mut Model) -> Result<(), TestCaseError> {
    while let Some(out) = rr.poll() {
        match out {
            RoundRobinOutput::Dispatch { worker, conn } => {
                // Invariant 2: nothing is offered to a paused or inactive worker.
                prop_assert_eq!(
                    model.active.get(&worker),
                    Some(&false),
                    "dispatch to {} which is not ready",
                    worker
                );
                model.dispatches += 1;
                let _ = conn;
            }
            RoundRobinOutput::Delivered { worker, conn } => {
                prop_assert!(model.delivered.insert(conn, worker).is_none());
            }
            RoundRobinOutput::Close(conn) => prop_assert!(model.closed.insert(conn)),
        }
    }
    Ok(())
}

fn run(ops: Vec<Op>, window: usize, max_queued: usize) -> Result<(), TestCaseError> {
    let mut rr = RoundRobin::new(window, max_queued);
    let mut model = Model::default();
    for op in ops {
        match op {
            Op::Add(w) => {
                let w = WorkerId::new(w);
                rr.add(w);
                model.active.insert(w, false);
            }
            Op::Remove(w) => {
                let w = WorkerId::new(w);
                rr.remove(w);
                model.active.remove(&w);
            }
            Op::Leave(w) => {
                let w = WorkerId::new(w);
                if rr.leave(w).is_ok() {
                    model.active.remove(&w);
                }
            }
            Op::Push => {
                let conn = model.next_conn;
                model.next_conn += 1;
                let wanted = rr.wants_connections();
                match rr.push(conn) {
                    Ok(()) => {
                        prop_assert!(wanted);
                        model.accepted_by_handle.insert(conn);
                    }
                    Err(back) => {
                        prop_assert!(!wanted);
                        prop_assert_eq!(back, conn);
                    }
                }
            }
            Op::Ack {
                worker,
                pick,
                accepted,
            } => {
                let w = WorkerId::new(worker);
                let in_flight = rr.in_flight(w).to_vec();
                if in_flight.is_empty() {
                    prop_assert!(rr.ack(w, 999_999, accepted).is_err());
                } else {
                    rr.ack(w, in_flight[pick % in_flight.len()], accepted)
                        .unwrap();
                    if !accepted && let Some(paused) = model.active.get_mut(&w) {
                        *paused = true;
                    }
                }
            }
            Op::Ready(w) => {
                let w = WorkerId::new(w);
                if rr.ready(w).is_ok()
                    && let Some(paused) = model.active.get_mut(&w)
                {
                    *paused = false;
                }
            }
        }
        drain(&mut rr, &mut model)?;
        check(&rr, &model, window, max_queued)?;
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1024))]

    #[test]
    fn round_robin_keeps_every_connection_in_exactly_one_place(
        ops in proptest::collection::vec(op(), 0..150),
        window in 1usize..=4,
        max_queued in 1usize..=6,
    ) {
        run(ops, window, max_queued)?;
    }
}
