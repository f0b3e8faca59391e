//! Model-based property tests of the supervisor's policy: a driver that carries out every
//! output faithfully, under random schedules of boots, readiness, listen failures, crashes,
//! kills from outside, leaving, scaling, reload replacements, handoff and memory readings,
//! recycles that succeed or fail, reloads pausing them, time and a stop.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use cluster_core::supervisor::{
    GiveUp, RecycleReason, SlotId, Supervisor, SupervisorConfig, SupervisorOutput, WorkerExit,
};
use cluster_core::{ExitStatus, KillReason, WorkerId};
use proptest::prelude::*;

const MAX_WORKERS: usize = 4;
const MAX_REQUESTS: u64 = 100;
const JITTER: u64 = 10;
const MAX_MEMORY: u64 = 1 << 30;

#[derive(Clone, Debug)]
enum Op {
    /// The next fork under way ends (in a worker, or failed).
    Forked {
        fails: bool,
    },
    Listening(usize),
    Ready(usize),
    ListenFailed,
    Exit {
        pick: usize,
        how: u8,
    },
    Scale(usize),
    ByOne(bool),
    /// A reload replaces a live worker with a new one.
    Replace(usize),
    Advance(u64),
    Stop,
    /// The primary counted this many handoffs to a worker.
    Handoffs(usize, u64),
    /// A worker's resident memory.
    Memory(usize, u64),
    /// The recycle under way ends: its replacement came up (and the old worker drained), or
    /// not.
    RecycleEnds {
        replaced: bool,
    },
    /// A rolling reload starts or ends.
    Reloading(bool),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => prop::bool::weighted(0.1).prop_map(|fails| Op::Forked { fails }),
        4 => any::<usize>().prop_map(Op::Listening),
        2 => any::<usize>().prop_map(Op::Ready),
        1 => Just(Op::ListenFailed),
        5 => (any::<usize>(), 0u8..6).prop_map(|(pick, how)| Op::Exit { pick, how }),
        1 => (0..=MAX_WORKERS + 1).prop_map(Op::Scale),
        1 => any::<bool>().prop_map(Op::ByOne),
        1 => any::<usize>().prop_map(Op::Replace),
        4 => (1u64..20_000).prop_map(Op::Advance),
        1 => Just(Op::Stop),
        4 => (any::<usize>(), 0..=MAX_REQUESTS + JITTER + 5).prop_map(|(p, n)| Op::Handoffs(p, n)),
        2 => (any::<usize>(), MAX_MEMORY - 2..=MAX_MEMORY + 2).prop_map(|(p, b)| Op::Memory(p, b)),
        3 => any::<bool>().prop_map(|replaced| Op::RecycleEnds { replaced }),
        1 => any::<bool>().prop_map(Op::Reloading),
    ]
}

/// What the driver knows.
#[derive(Default)]
struct Model {
    next_id: u64,
    /// Forks asked for and not answered yet, by slot.
    forking: Vec<SlotId>,
    /// Processes alive, with whether the policy put them in a slot.
    alive: BTreeSet<WorkerId>,
    /// Workers the policy killed, and those it disconnected.
    killed: BTreeSet<WorkerId>,
    disconnected: BTreeSet<WorkerId>,
    stopped: bool,
    /// The recycle asked for and not ended yet.
    recycling: Option<WorkerId>,
    /// Every worker a recycle was asked for.
    recycled: BTreeSet<WorkerId>,
    reloading: bool,
}

impl Model {
    fn pick(&self, pick: usize) -> Option<WorkerId> {
        let alive: Vec<_> = self.alive.iter().copied().collect();
        (!alive.is_empty()).then(|| alive[pick % alive.len()])
    }
}

fn carry_out(s: &mut Supervisor, model: &mut Model) -> Result<(), TestCaseError> {
    while let Some(output) = s.poll_output() {
        match output {
            SupervisorOutput::Spawn { slot } => {
                prop_assert!(!model.stopped, "a spawn after the stop");
                model.forking.push(slot);
            }
            SupervisorOutput::Kill { worker, reason } => {
                prop_assert_eq!(reason, KillReason::BootTimeout);
                prop_assert!(
                    model.alive.contains(&worker),
                    "killing {worker:?}, not alive"
                );
                model.killed.insert(worker);
            }
            SupervisorOutput::Disconnect { worker } => {
                prop_assert!(
                    model.disconnected.insert(worker),
                    "{worker:?} disconnected twice"
                );
            }
            SupervisorOutput::Recycle { worker, reason } => {
                prop_assert!(!model.stopped, "a recycle after the stop");
                prop_assert!(!model.reloading, "a recycle during a reload");
                prop_assert_eq!(model.recycling, None, "two recycles at once");
                prop_assert!(model.alive.contains(&worker));
                prop_assert!(s.slot_of(worker).is_some(), "{worker:?} has no slot");
                prop_assert!(!s.is_booting(worker), "{worker:?} still boots");
                prop_assert!(model.recycled.insert(worker), "{worker:?} recycled twice");
                match reason {
                    RecycleReason::Requests { handoffs, limit } => {
                        prop_assert!((MAX_REQUESTS..=MAX_REQUESTS + JITTER).contains(&limit));
                        prop_assert!(handoffs >= limit);
                        prop_assert_eq!(s.recycle_limit(worker), Some(limit));
                    }
                    RecycleReason::Memory { resident, limit } => {
                        prop_assert_eq!(limit, MAX_MEMORY);
                        prop_assert!(resident > limit);
                    }
                }
                model.recycling = Some(worker);
            }
            SupervisorOutput::Event(_) => {}
        }
    }
    prop_assert_eq!(s.recycling(), model.recycling);
    Ok(())
}

fn check(s: &Supervisor, model: &Model) -> Result<(), TestCaseError> {
    prop_assert!(s.serving() <= s.active());
    prop_assert!(s.active() <= MAX_WORKERS);
    // One worker per slot, and only live ones.
    let mut slots = BTreeMap::new();
    for &worker in &model.alive {
        if let Some(slot) = s.slot_of(worker) {
            prop_assert!(
                slots.insert(slot, worker).is_none(),
                "two workers in slot {slot}"
            );
        }
    }
    if s.is_done() && !matches!(s.gave_up(), Some(GiveUp::Listen { .. })) {
        prop_assert!(slots.is_empty(), "done, yet {slots:?} are supervised");
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn the_policy_keeps_its_invariants(
        workers in 0..=MAX_WORKERS,
        wait_ready in any::<bool>(),
        retry_bind_errors in any::<bool>(),
        seed in any::<u64>(),
        ops in prop::collection::vec(op(), 1..200),
    ) {
        let mut config = SupervisorConfig::default();
        config.wait_ready = wait_ready;
        config.retry_bind_errors = retry_bind_errors;
        config.max_workers = MAX_WORKERS;
        config.boot_timeout = Some(Duration::from_secs(5));
        config.max_requests = Some(MAX_REQUESTS);
        config.max_requests_jitter = JITTER;
        config.max_memory = Some(MAX_MEMORY);
        let mut s = Supervisor::new(config, workers, seed);
        let mut model = Model::default();
        let mut now = Instant::now();
        carry_out(&mut s, &mut model)?;
        for op in ops {
            match op {
                Op::Forked { fails } => {
                    if model.forking.is_empty() {
                        continue;
                    }
                    let slot = model.forking.remove(0);
                    if fails {
                        s.handle_spawn_failed(now, slot);
                    } else {
                        model.next_id += 1;
                        let worker = WorkerId::new(model.next_id);
                        model.alive.insert(worker);
                        let kept = s.handle_spawned(now, slot, worker);
                        prop_assert_eq!(kept, s.slot_of(worker) == Some(slot.index()));
                    }
                }
                Op::Listening(pick) => {
                    if let Some(worker) = model.pick(pick) {
                        s.handle_listening(now, worker);
                        if !wait_ready && s.slot_of(worker).is_some() {
                            prop_assert!(!s.is_booting(worker));
                        }
                    }
                }
                Op::Ready(pick) => {
                    if let Some(worker) = model.pick(pick) {
                        s.handle_ready(now, worker);
                    }
                }
                Op::ListenFailed => s.handle_listen_failed("127.0.0.1:1".to_owned(), 13),
                Op::Exit { pick, how } => {
                    let Some(worker) = model.pick(pick) else { continue };
                    model.alive.remove(&worker);
                    let status = match how {
                        0 => ExitStatus::Code(0),
                        1 => ExitStatus::Code(1),
                        2 => ExitStatus::Code(78),
                        _ => ExitStatus::Signal(9),
                    };
                    let killed_by_us = model.killed.remove(&worker);
                    s.handle_exit(now, worker, WorkerExit {
                        status,
                        on_purpose: how == 3 || model.disconnected.contains(&worker),
                        killed: (how == 4).then_some(KillReason::HeartbeatTimeout),
                        signal_from_outside: how >= 4 || killed_by_us,
                    });
                    prop_assert_eq!(s.slot_of(worker), None, "an exited worker keeps a slot");
                }
                Op::Scale(target) => {
                    let result = s.scale(target);
                    if result.is_ok() {
                        prop_assert_eq!(s.active(), target);
                    } else {
                        prop_assert!(target > MAX_WORKERS || model.stopped);
                    }
                }
                Op::ByOne(more) => {
                    let before = s.active();
                    if let Ok((target, _)) = s.scale_by_one(more) {
                        prop_assert!(target >= 1);
                        prop_assert_eq!(s.active(), target);
                        if !more {
                            prop_assert!(target <= before.max(1));
                        }
                    }
                }
                Op::Replace(pick) => {
                    let Some(old) = model.pick(pick) else { continue };
                    model.next_id += 1;
                    let new = WorkerId::new(model.next_id);
                    model.alive.insert(new);
                    s.handle_listening(now, new);
                    if s.handle_replaced(now, old, new) {
                        prop_assert_eq!(s.slot_of(old), None);
                        // The old worker drains on purpose, as a reload disconnects it.
                        model.disconnected.insert(old);
                    }
                }
                Op::Advance(ms) => {
                    now += Duration::from_millis(ms);
                    if s.poll_timeout().is_some_and(|t| t <= now) {
                        s.handle_timeout(now);
                    }
                }
                Op::Stop => {
                    s.stop();
                    model.stopped = true;
                    model.forking.clear();
                }
                Op::Handoffs(pick, handoffs) => {
                    if let Some(worker) = model.pick(pick) {
                        s.handle_handoffs(now, worker, handoffs);
                    }
                }
                Op::Memory(pick, resident) => {
                    if let Some(worker) = model.pick(pick) {
                        s.handle_memory(now, worker, resident);
                    }
                }
                Op::RecycleEnds { replaced } => {
                    let Some(old) = model.recycling.take() else { continue };
                    if replaced && model.alive.contains(&old) {
                        model.next_id += 1;
                        let new = WorkerId::new(model.next_id);
                        model.alive.insert(new);
                        s.handle_listening(now, new);
                        s.handle_ready(now, new);
                        if s.handle_replaced(now, old, new) {
                            model.disconnected.insert(old);
                        } else {
                            // Its slot is gone meanwhile: the driver disconnects the new one.
                            model.disconnected.insert(new);
                        }
                        s.handle_recycled(old);
                    } else {
                        // Held back, then tried again: a second recycle of it is allowed (the
                        // hold's length is the unit tests' business).
                        model.recycled.remove(&old);
                        s.handle_recycle_failed(now, old);
                    }
                }
                Op::Reloading(on) => {
                    model.reloading = on;
                    s.pause_recycling(on);
                }
            }
            if s.is_done() {
                // As the driver does: the cluster is over, it drains what is left.
                s.stop();
                model.stopped = true;
                model.forking.clear();
            }
            carry_out(&mut s, &mut model)?;
            check(&s, &model)?;
        }
        // Liveness: once every backoff and cooldown elapsed, no active slot is forgotten: each
        // has a worker, or a fork on the way.
        if !model.stopped {
            now += Duration::from_secs(3600);
            s.handle_timeout(now);
            carry_out(&mut s, &mut model)?;
            let supervised = model.alive.iter().filter(|w| s.slot_of(**w).is_some()).count();
            let forking: BTreeSet<_> = model.forking.iter().collect();
            prop_assert!(
                s.active() <= supervised + forking.len(),
                "{} active slots, {supervised} workers, {} forks",
                s.active(),
                forking.len()
            );
        }
    }
}
