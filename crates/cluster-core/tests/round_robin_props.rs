//! Model-based property tests of the round-robin handle against design.md §3 invariants 1 and 2,
//! under both picks, with and without a per-worker cap: the cap is never exceeded, and
//! least-outstanding never picks a worker with more open connections than another eligible one.

use std::collections::{BTreeMap, BTreeSet};
use std::num::NonZeroUsize;

use cluster_core::WorkerId;
use cluster_core::registry::{Loads, Pick, RoundRobin, RoundRobinOutput};
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
    /// The worker reports some of its open connections ended.
    Release {
        worker: u64,
        n: usize,
    },
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
        2 => w.clone().prop_map(Op::Ready),
        4 => (w, 1usize..=3).prop_map(|(worker, n)| Op::Release { worker, n }),
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
    /// Open connections per worker, counted by the test.
    open: BTreeMap<WorkerId, usize>,
    /// Unacked handoffs per worker, counted by the test.
    in_flight: BTreeMap<WorkerId, usize>,
}

impl Model {
    fn open(&self, w: WorkerId) -> usize {
        self.open.get(&w).copied().unwrap_or(0)
    }

    /// Whether `w` could take a connection now: active, not paused, room in its window, under
    /// its cap.
    fn eligible(&self, w: WorkerId, window: usize, cap: Option<usize>) -> bool {
        self.active.get(&w) == Some(&false)
            && self.in_flight.get(&w).copied().unwrap_or(0) < window
            && cap.is_none_or(|cap| self.open(w) < cap)
    }
}

fn check(
    rr: &RoundRobin<u32>,
    loads: &Loads,
    model: &Model,
    window: usize,
    max_queued: usize,
) -> Result<(), TestCaseError> {
    let cap = loads.cap().map(NonZeroUsize::get);
    for w in 1..=WORKERS {
        let w = WorkerId::new(w);
        prop_assert_eq!(loads.open(w), model.open(w), "open count of {}", w);
        // Caps are never exceeded.
        if let Some(cap) = cap {
            prop_assert!(loads.open(w) <= cap, "{w} has {} open", loads.open(w));
        }
    }
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
                *paused || rr.in_flight(*w).len() >= window || loads.is_full(*w),
                "{w} idle while connections wait"
            );
        }
    }
    // Every active member at its cap: nothing more is accepted.
    if cap.is_some() && model.active.keys().all(|w| loads.is_full(*w)) {
        prop_assert!(!rr.has_spare(loads));
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

fn drain(
    rr: &mut RoundRobin<u32>,
    loads: &mut Loads,
    model: &mut Model,
    window: usize,
) -> Result<(), TestCaseError> {
    rr.pump(loads);
    let cap = loads.cap().map(NonZeroUsize::get);
    while let Some(out) = rr.poll() {
        match out {
            RoundRobinOutput::Dispatch { worker, conn } => {
                // Invariant 2: nothing is offered to a paused or inactive worker, nor to one at
                // its cap or with a full window.
                prop_assert!(
                    model.eligible(worker, window, cap),
                    "dispatch to {} which is not eligible",
                    worker
                );
                // Least-outstanding: nobody eligible had fewer open connections.
                if loads.pick() == Pick::LeastOutstanding {
                    for other in model.active.keys() {
                        prop_assert!(
                            !model.eligible(*other, window, cap)
                                || model.open(worker) <= model.open(*other),
                            "{} picked with {} open, {} had {}",
                            worker,
                            model.open(worker),
                            other,
                            model.open(*other)
                        );
                    }
                }
                *model.open.entry(worker).or_default() += 1;
                *model.in_flight.entry(worker).or_default() += 1;
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

fn run(
    ops: Vec<Op>,
    window: usize,
    max_queued: usize,
    pick: Pick,
    cap: Option<NonZeroUsize>,
) -> Result<(), TestCaseError> {
    let mut rr = RoundRobin::new(window, max_queued);
    let mut loads = Loads::new(pick, cap);
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
                loads.forget(w);
                model.active.remove(&w);
                model.open.remove(&w);
                model.in_flight.remove(&w);
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
                    *model.in_flight.get_mut(&w).unwrap() -= 1;
                    if !accepted {
                        // As the registry does: a refused connection is no longer open there.
                        loads.release(w, 1);
                        *model.open.get_mut(&w).unwrap() -= 1;
                        if let Some(paused) = model.active.get_mut(&w) {
                            *paused = true;
                        }
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
            Op::Release { worker, n } => {
                // Only what was delivered (open and acked) can end.
                let w = WorkerId::new(worker);
                let delivered = model.open(w) - model.in_flight.get(&w).copied().unwrap_or(0);
                let n = n.min(delivered);
                loads.release(w, n);
                if n > 0 {
                    *model.open.get_mut(&w).unwrap() -= n;
                }
            }
        }
        drain(&mut rr, &mut loads, &mut model, window)?;
        check(&rr, &loads, &model, window, max_queued)?;
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
        run(ops, window, max_queued, Pick::InTurn, None)?;
    }

    #[test]
    fn least_outstanding_picks_a_least_loaded_worker_and_caps_hold(
        ops in proptest::collection::vec(op(), 0..150),
        window in 1usize..=4,
        max_queued in 1usize..=6,
        least in any::<bool>(),
        cap in proptest::option::of(1usize..=5),
    ) {
        let pick = if least { Pick::LeastOutstanding } else { Pick::InTurn };
        run(ops, window, max_queued, pick, cap.and_then(NonZeroUsize::new))?;
    }
}
