use super::*;

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// A crash: the worker's own fault (or the supervisor's kill).
fn crash(status: ExitStatus) -> WorkerExit {
    WorkerExit {
        status,
        on_purpose: false,
        killed: None,
        signal_from_outside: false,
    }
}

/// A worker that left on purpose.
fn left(status: ExitStatus) -> WorkerExit {
    WorkerExit {
        on_purpose: true,
        ..crash(status)
    }
}

/// SIGKILL from someone else.
fn from_outside() -> WorkerExit {
    WorkerExit {
        signal_from_outside: true,
        ..crash(ExitStatus::Signal(9))
    }
}

fn drain(s: &mut Supervisor) -> Vec<SupervisorOutput> {
    std::iter::from_fn(|| s.poll_output()).collect()
}

fn spawns(outputs: &[SupervisorOutput]) -> Vec<usize> {
    outputs
        .iter()
        .filter_map(|o| match o {
            SupervisorOutput::Spawn { slot } => Some(slot.index()),
            _ => None,
        })
        .collect()
}

/// Starts every pending slot with fresh worker ids; returns them in slot order.
fn start_all(s: &mut Supervisor, now: Instant, next: &mut u64) -> Vec<WorkerId> {
    let mut started = Vec::new();
    for slot in spawns(&drain(s)) {
        let worker = WorkerId::new(*next);
        *next += 1;
        assert!(s.handle_spawned(now, SlotId(slot), worker));
        s.handle_listening(now, worker);
        started.push(worker);
    }
    started
}

#[test]
fn starts_every_slot_then_respawns_a_crash_after_a_jittered_backoff() {
    let t0 = Instant::now();
    let mut s = Supervisor::new(SupervisorConfig::default(), 3, 7);
    let mut next = 1;
    let workers = start_all(&mut s, t0, &mut next);
    assert_eq!(workers.len(), 3);
    s.handle_exit(t0 + ms(5), workers[1], crash(ExitStatus::Signal(9)));
    let out = drain(&mut s);
    let [
        SupervisorOutput::Event(SupervisorEvent::Respawning {
            slot,
            delay,
            recent_failures: 1,
        }),
    ] = out[..]
    else {
        panic!("{out:?}")
    };
    assert_eq!(slot.index(), 1);
    assert!(
        delay <= ms(100),
        "full jitter below the first ceiling: {delay:?}"
    );
    assert_eq!(s.poll_timeout(), Some(t0 + ms(5) + delay));
    s.handle_timeout(t0 + ms(5) + delay);
    assert_eq!(spawns(&drain(&mut s)), [1]);
}

#[test]
fn backoff_ceiling_doubles_caps_and_resets_after_a_healthy_run() {
    let config = SupervisorConfig {
        crash_loop_failures: 100,
        ..SupervisorConfig::default()
    };
    let mut s = Supervisor::new(config, 1, 1);
    let mut now = Instant::now();
    let mut next = 1;
    let mut worker = start_all(&mut s, now, &mut next)[0];
    let mut ceilings_exceeded = 0;
    for attempt in 0..12u32 {
        s.handle_exit(now, worker, crash(ExitStatus::Code(1)));
        let out = drain(&mut s);
        let SupervisorOutput::Event(SupervisorEvent::Respawning { delay, .. }) = out[0] else {
            panic!("{out:?}")
        };
        let ceiling = ms(100)
            .saturating_mul(1 << attempt)
            .min(Duration::from_secs(15));
        ceilings_exceeded += usize::from(delay > ceiling);
        now += delay + ms(1);
        s.handle_timeout(now);
        worker = start_all(&mut s, now, &mut next)[0];
    }
    assert_eq!(ceilings_exceeded, 0);
    // After 30 s of health the next crash waits at most the first ceiling again.
    now += Duration::from_secs(31);
    s.handle_exit(now, worker, crash(ExitStatus::Code(1)));
    let SupervisorOutput::Event(SupervisorEvent::Respawning { delay, .. }) = drain(&mut s)[0]
    else {
        panic!()
    };
    assert!(delay <= ms(100), "{delay:?}");
}

#[test]
fn crash_loop_opens_the_breaker_which_cools_down_and_tries_again() {
    let mut s = Supervisor::new(SupervisorConfig::default(), 2, 3);
    let mut now = Instant::now();
    let mut next = 1;
    let workers = start_all(&mut s, now, &mut next);
    let (mut looping, healthy) = (workers[0], workers[1]);
    for failure in 1..=5 {
        s.handle_exit(now, looping, crash(ExitStatus::Code(1)));
        let out = drain(&mut s);
        if failure < 5 {
            let SupervisorOutput::Event(SupervisorEvent::Respawning {
                delay,
                recent_failures,
                ..
            }) = out[0]
            else {
                panic!("{out:?}")
            };
            assert_eq!(recent_failures, failure);
            now += delay;
            s.handle_timeout(now);
            looping = start_all(&mut s, now, &mut next)[0];
        } else {
            assert_eq!(
                out,
                [SupervisorOutput::Event(SupervisorEvent::CrashLoop {
                    slot: SlotId(0),
                    failures: 5,
                    at_boot: false,
                    cooldown: SupervisorConfig::default().backoff_max,
                })]
            );
        }
    }
    assert_eq!(s.broken(), 1);
    assert!(!s.is_done(), "the healthy sibling still runs");
    assert_eq!(s.gave_up(), None);
    assert_eq!(s.slot_of(healthy), Some(1));
    // The slot is not empty for good: after the cool-down it starts a worker again, with a
    // fresh window of tries.
    let cooled = now + SupervisorConfig::default().backoff_max;
    assert_eq!(s.poll_timeout(), Some(cooled));
    s.handle_timeout(cooled - ms(1));
    assert_eq!(drain(&mut s), []);
    s.handle_timeout(cooled);
    let again = start_all(&mut s, cooled, &mut next);
    assert_eq!(again.len(), 1);
    assert_eq!(s.slot_of(again[0]), Some(0));
    assert_eq!(s.broken(), 0);
    s.handle_exit(cooled, again[0], crash(ExitStatus::Code(1)));
    assert!(matches!(
        drain(&mut s)[..],
        [SupervisorOutput::Event(SupervisorEvent::Respawning {
            recent_failures: 1,
            ..
        })]
    ));
}

#[test]
fn every_slot_crashing_before_it_listens_is_given_up() {
    let mut s = Supervisor::new(SupervisorConfig::default(), 2, 4);
    let now = Instant::now();
    let mut next = 1;
    let mut booting: Vec<(usize, WorkerId)> = Vec::new();
    let boot = |s: &mut Supervisor, next: &mut u64, booting: &mut Vec<(usize, WorkerId)>| {
        for slot in spawns(&drain(s)) {
            let worker = WorkerId::new(*next);
            *next += 1;
            assert!(s.handle_spawned(now, SlotId(slot), worker));
            booting.push((slot, worker));
        }
    };
    boot(&mut s, &mut next, &mut booting);
    for round in 0..5 {
        for (_, worker) in std::mem::take(&mut booting) {
            s.handle_exit(now, worker, crash(ExitStatus::Code(1)));
        }
        if round < 4 {
            assert!(!s.is_done());
            s.handle_timeout(now + Duration::from_secs(20));
            boot(&mut s, &mut next, &mut booting);
        }
    }
    assert!(
        s.is_done(),
        "no slot can serve, and a restart will not change that"
    );
    assert_eq!(
        s.gave_up(),
        Some(GiveUp::BootLoop {
            slot: SlotId(0),
            failures: 5
        })
    );
}

#[test]
fn a_slot_crashing_at_boot_beside_a_serving_sibling_keeps_trying() {
    let mut s = Supervisor::new(SupervisorConfig::default(), 2, 4);
    let now = Instant::now();
    let mut next = 1;
    let workers = start_all(&mut s, now, &mut next);
    s.handle_exit(now, workers[0], crash(ExitStatus::Code(1)));
    for _ in 0..5 {
        let _ = drain(&mut s);
        s.handle_timeout(now + Duration::from_secs(20));
        for slot in spawns(&drain(&mut s)) {
            let worker = WorkerId::new(next);
            next += 1;
            assert!(s.handle_spawned(now, SlotId(slot), worker));
            s.handle_exit(now, worker, crash(ExitStatus::Code(1)));
        }
    }
    assert!(!s.is_done(), "slot 1 still serves");
    assert_eq!(s.gave_up(), None);
    assert!(
        s.poll_timeout().is_some(),
        "slot 0 tries again after its cool-down"
    );
}

#[test]
fn kills_from_outside_restart_promptly_and_never_open_the_breaker() {
    let config = SupervisorConfig::default();
    let mut s = Supervisor::new(config, 1, 8);
    let mut now = Instant::now();
    let mut next = 1;
    let mut worker = start_all(&mut s, now, &mut next)[0];
    // A storm: killed every 200 ms, far more often than the breaker allows crashes.
    for kill in 0..50 {
        now += ms(200);
        s.handle_exit(now, worker, from_outside());
        let out = drain(&mut s);
        let [SupervisorOutput::Event(SupervisorEvent::Killed { delay, .. })] = out[..] else {
            panic!("kill {kill}: {out:?}")
        };
        assert!(delay <= KILL_BACKOFF_MAX, "{delay:?}");
        now += delay;
        s.handle_timeout(now);
        worker = start_all(&mut s, now, &mut next)[0];
    }
    assert_eq!(s.broken(), 0);
    // A crash still counts from zero: the kills are not crashes.
    s.handle_exit(now, worker, crash(ExitStatus::Code(1)));
    assert!(matches!(
        drain(&mut s)[..],
        [SupervisorOutput::Event(SupervisorEvent::Respawning {
            recent_failures: 1,
            ..
        })]
    ));
}

#[test]
fn crashes_spread_beyond_the_window_do_not_open_the_breaker() {
    let mut s = Supervisor::new(SupervisorConfig::default(), 1, 9);
    let mut now = Instant::now();
    let mut next = 1;
    let mut worker = start_all(&mut s, now, &mut next)[0];
    for _ in 0..10 {
        now += Duration::from_secs(4);
        s.handle_exit(now, worker, crash(ExitStatus::Code(1)));
        let out = drain(&mut s);
        let SupervisorOutput::Event(SupervisorEvent::Respawning {
            delay,
            recent_failures,
            ..
        }) = out[0]
        else {
            panic!("{out:?}")
        };
        assert!(recent_failures <= 3);
        now += delay;
        s.handle_timeout(now);
        worker = start_all(&mut s, now, &mut next)[0];
    }
    assert_eq!(s.broken(), 0);
}

#[test]
fn fatal_exit_and_leaving_on_purpose_are_not_respawned() {
    let mut s = Supervisor::new(SupervisorConfig::default(), 2, 5);
    let now = Instant::now();
    let mut next = 1;
    let workers = start_all(&mut s, now, &mut next);
    s.handle_exit(now, workers[0], crash(ExitStatus::Code(FATAL_EXIT_CODE)));
    assert_eq!(
        drain(&mut s),
        [SupervisorOutput::Event(SupervisorEvent::Fatal {
            slot: SlotId(0),
            worker: workers[0],
            code: FATAL_EXIT_CODE,
        })]
    );
    s.handle_exit(now, workers[1], left(ExitStatus::Code(0)));
    assert_eq!(drain(&mut s), []);
    assert!(s.is_done());
    assert!(matches!(
        s.gave_up(),
        Some(GiveUp::Fatal {
            code: FATAL_EXIT_CODE,
            ..
        })
    ));
}

#[test]
fn a_worker_that_never_listens_is_killed_at_the_boot_deadline_and_counts_as_a_crash() {
    let config = SupervisorConfig {
        boot_timeout: Some(Duration::from_secs(60)),
        ..SupervisorConfig::default()
    };
    let mut s = Supervisor::new(config, 1, 2);
    let t0 = Instant::now();
    assert_eq!(spawns(&drain(&mut s)), [0]);
    let worker = WorkerId::new(1);
    assert!(s.handle_spawned(t0, SlotId(0), worker));
    assert_eq!(s.poll_timeout(), Some(t0 + Duration::from_secs(60)));
    s.handle_timeout(t0 + Duration::from_secs(60));
    assert_eq!(
        drain(&mut s),
        [SupervisorOutput::Kill {
            worker,
            reason: KillReason::BootTimeout
        }]
    );
    assert_eq!(s.poll_timeout(), None, "killed once");
    s.handle_exit(
        t0 + Duration::from_secs(61),
        worker,
        crash(ExitStatus::Signal(9)),
    );
    assert!(matches!(
        drain(&mut s)[..],
        [SupervisorOutput::Event(SupervisorEvent::Respawning { .. })]
    ));
}

#[test]
fn a_clean_exit_is_finished_not_crashed() {
    let mut s = Supervisor::new(SupervisorConfig::default(), 1, 6);
    let now = Instant::now();
    let mut next = 1;
    let worker = start_all(&mut s, now, &mut next)[0];
    s.handle_exit(now, worker, crash(ExitStatus::Code(0)));
    assert_eq!(drain(&mut s), []);
    assert!(s.is_done());
    assert_eq!(s.broken(), 0);
}

#[test]
fn stopping_cancels_pending_respawns() {
    let mut s = Supervisor::new(SupervisorConfig::default(), 2, 4);
    let now = Instant::now();
    let mut next = 1;
    let workers = start_all(&mut s, now, &mut next);
    s.handle_exit(now, workers[0], crash(ExitStatus::Code(1)));
    drain(&mut s);
    s.stop();
    s.handle_timeout(now + Duration::from_secs(60));
    assert_eq!(drain(&mut s), []);
    s.handle_exit(now, workers[1], left(ExitStatus::Code(0)));
    assert!(s.is_done());
}

#[test]
fn failed_spawns_back_off_like_crashes() {
    let mut s = Supervisor::new(SupervisorConfig::default(), 1, 8);
    let now = Instant::now();
    drain(&mut s);
    s.handle_spawn_failed(now, SlotId(0));
    assert!(matches!(
        drain(&mut s)[..],
        [SupervisorOutput::Event(SupervisorEvent::Respawning { .. })]
    ));
}

#[test]
fn a_replacement_takes_the_slot_and_the_old_exit_is_not_restarted() {
    let mut s = Supervisor::new(SupervisorConfig::default(), 2, 10);
    let now = Instant::now();
    let mut next = 1;
    let workers = start_all(&mut s, now, &mut next);
    let new = WorkerId::new(10);
    assert!(s.handle_replaced(now, workers[0], new));
    assert_eq!(s.slot_of(new), Some(0));
    s.handle_exit(now, workers[0], left(ExitStatus::Code(0)));
    assert_eq!(drain(&mut s), []);
    // The replacement is supervised like any worker: its crash is restarted.
    s.handle_exit(now, new, crash(ExitStatus::Signal(9)));
    assert!(matches!(
        drain(&mut s)[..],
        [SupervisorOutput::Event(SupervisorEvent::Respawning { .. })]
    ));
}

#[test]
fn a_replacement_fills_a_slot_whose_old_worker_crashed_mid_reload() {
    let mut s = Supervisor::new(SupervisorConfig::default(), 1, 11);
    let now = Instant::now();
    let mut next = 1;
    let old = start_all(&mut s, now, &mut next)[0];
    s.handle_exit(now, old, crash(ExitStatus::Signal(9)));
    drain(&mut s);
    let new = WorkerId::new(10);
    assert!(s.handle_replaced(now, old, new));
    // The pending restart is cancelled.
    s.handle_timeout(now + Duration::from_secs(60));
    assert_eq!(drain(&mut s), []);
    assert_eq!(s.slot_of(new), Some(0));
}

#[test]
fn a_spawn_that_lost_its_slot_to_a_replacement_is_refused() {
    let mut s = Supervisor::new(SupervisorConfig::default(), 1, 12);
    let now = Instant::now();
    let mut next = 1;
    let old = start_all(&mut s, now, &mut next)[0];
    s.handle_exit(now, old, crash(ExitStatus::Signal(9)));
    drain(&mut s);
    s.handle_timeout(now + Duration::from_secs(20));
    assert_eq!(spawns(&drain(&mut s)), [0]);
    // The fork is under way when the replacement arrives.
    assert!(s.handle_replaced(now, old, WorkerId::new(10)));
    assert!(
        !s.handle_spawned(now, SlotId(0), WorkerId::new(11)),
        "the slot is taken"
    );
}

#[test]
fn scaling_adds_slots_and_removes_the_newest_draining_its_worker() {
    let mut s = Supervisor::new(SupervisorConfig::default(), 2, 13);
    let now = Instant::now();
    let mut next = 1;
    let workers = start_all(&mut s, now, &mut next);
    let added = s.add_slot();
    assert_eq!(added.index(), 2);
    let third = start_all(&mut s, now, &mut next);
    assert_eq!(s.active(), 3);
    assert_eq!(s.remove_slot(), Some((SlotId(2), Some(third[0]))));
    assert_eq!(s.active(), 2);
    assert_eq!(
        drain(&mut s),
        [SupervisorOutput::Disconnect { worker: third[0] }]
    );
    // Its exit (it drains on purpose) is not restarted, and neither would a crash be.
    s.handle_exit(now, third[0], crash(ExitStatus::Signal(9)));
    assert_eq!(drain(&mut s), []);
    assert_eq!(s.remove_slot(), Some((SlotId(1), Some(workers[1]))));
    assert_eq!(s.remove_slot(), Some((SlotId(0), Some(workers[0]))));
    assert_eq!(s.remove_slot(), None);
    assert!(!s.is_done(), "scaled to zero is idle, not done");
    s.add_slot();
    assert_eq!(spawns(&drain(&mut s)), [3]);
}

#[test]
fn removing_a_slot_waiting_to_restart_cancels_the_restart() {
    let mut s = Supervisor::new(SupervisorConfig::default(), 1, 14);
    let now = Instant::now();
    let mut next = 1;
    let worker = start_all(&mut s, now, &mut next)[0];
    s.handle_exit(now, worker, crash(ExitStatus::Code(1)));
    drain(&mut s);
    // The slot goes, with no worker to disconnect.
    assert_eq!(s.remove_slot(), Some((SlotId(0), None)));
    assert_eq!(s.remove_slot(), None);
    s.handle_timeout(now + Duration::from_secs(60));
    assert_eq!(drain(&mut s), []);
}

fn config() -> SupervisorConfig {
    SupervisorConfig::default()
}

#[test]
fn with_wait_ready_a_worker_is_up_when_ready_not_when_listening() {
    let mut s = Supervisor::new(
        SupervisorConfig {
            wait_ready: true,
            ..config()
        },
        1,
        20,
    );
    let now = Instant::now();
    assert_eq!(spawns(&drain(&mut s)), [0]);
    let worker = WorkerId::new(1);
    assert!(s.handle_spawned(now, SlotId(0), worker));
    s.handle_listening(now, worker);
    assert_eq!(s.serving(), 0, "listening is not up");
    assert!(s.is_booting(worker));
    s.handle_ready(now, worker);
    assert_eq!(s.serving(), 1);

    // Without it, readiness changes nothing and listening is up.
    let mut s = Supervisor::new(config(), 1, 21);
    drain(&mut s);
    assert!(s.handle_spawned(now, SlotId(0), worker));
    s.handle_ready(now, worker);
    assert_eq!(s.serving(), 0);
    s.handle_listening(now, worker);
    assert_eq!(s.serving(), 1);
}

#[test]
fn a_listen_failure_while_nothing_serves_gives_the_cluster_up() {
    let mut s = Supervisor::new(config(), 2, 22);
    let now = Instant::now();
    assert_eq!(spawns(&drain(&mut s)), [0, 1]);
    let (first, second) = (WorkerId::new(1), WorkerId::new(2));
    assert!(s.handle_spawned(now, SlotId(0), first));
    assert!(s.handle_spawned(now, SlotId(1), second));
    s.handle_listen_failed("0.0.0.0:80".to_owned(), 13);
    s.handle_exit(now, first, crash(ExitStatus::Code(1)));
    assert!(
        s.is_done(),
        "the other worker still boots, but would fail alike"
    );
    assert_eq!(
        s.gave_up(),
        Some(GiveUp::Listen {
            address: "0.0.0.0:80".to_owned(),
            errno: 13
        })
    );
    assert_eq!(drain(&mut s), [], "nothing restarted");
    assert_eq!(s.scale(3), Err(ScaleError::Stopping));
}

#[test]
fn a_listen_failure_is_left_to_restarts_when_something_serves_or_it_is_asked() {
    let now = Instant::now();
    // A worker serves: the failing one is a crash like any other.
    let mut s = Supervisor::new(config(), 2, 23);
    drain(&mut s);
    assert!(s.handle_spawned(now, SlotId(0), WorkerId::new(1)));
    s.handle_listening(now, WorkerId::new(1));
    assert!(s.handle_spawned(now, SlotId(1), WorkerId::new(2)));
    s.handle_listen_failed("[::]:443".to_owned(), 98);
    s.handle_exit(now, WorkerId::new(2), crash(ExitStatus::Code(1)));
    assert!(!s.is_done());
    assert!(matches!(
        drain(&mut s)[..],
        [SupervisorOutput::Event(SupervisorEvent::Respawning { .. })]
    ));

    // `retry_bind_errors`: the same.
    let mut s = Supervisor::new(
        SupervisorConfig {
            retry_bind_errors: true,
            ..config()
        },
        1,
        24,
    );
    drain(&mut s);
    assert!(s.handle_spawned(now, SlotId(0), WorkerId::new(1)));
    s.handle_listen_failed("[::]:443".to_owned(), 98);
    s.handle_exit(now, WorkerId::new(1), crash(ExitStatus::Code(1)));
    assert!(!s.is_done());
    assert_eq!(s.gave_up(), None);

    // A listen that succeeded later clears the failure.
    let mut s = Supervisor::new(config(), 2, 25);
    drain(&mut s);
    assert!(s.handle_spawned(now, SlotId(0), WorkerId::new(1)));
    assert!(s.handle_spawned(now, SlotId(1), WorkerId::new(2)));
    s.handle_listen_failed("[::]:443".to_owned(), 98);
    s.handle_listening(now, WorkerId::new(2));
    s.handle_exit(now, WorkerId::new(2), crash(ExitStatus::Code(1)));
    s.handle_exit(now, WorkerId::new(1), crash(ExitStatus::Code(1)));
    assert_eq!(s.gave_up(), None);

    // A worker that exits 0 at boot has not failed.
    let mut s = Supervisor::new(config(), 1, 26);
    drain(&mut s);
    assert!(s.handle_spawned(now, SlotId(0), WorkerId::new(1)));
    s.handle_listen_failed("[::]:443".to_owned(), 98);
    s.handle_exit(now, WorkerId::new(1), crash(ExitStatus::Code(0)));
    assert_eq!(s.gave_up(), None);
}

#[test]
fn the_supervisors_own_kill_is_a_crash_and_a_kill_from_outside_is_not() {
    let now = Instant::now();
    let config = SupervisorConfig {
        crash_loop_failures: 2,
        ..config()
    };
    let mut s = Supervisor::new(config, 1, 27);
    let mut next = 1;
    // Killed from outside, twice: restarted after a short backoff, never a crash loop.
    for _ in 0..2 {
        let worker = start_all(&mut s, now, &mut next)[0];
        s.handle_exit(now, worker, from_outside());
        assert!(matches!(
            drain(&mut s)[..],
            [SupervisorOutput::Event(SupervisorEvent::Killed { .. })]
        ));
        s.handle_timeout(now + KILL_BACKOFF_MAX);
    }
    // The boot deadline's kill is the supervisor's own: its SIGKILL is a crash at boot.
    let worker = WorkerId::new(next);
    assert_eq!(spawns(&drain(&mut s)), [0]);
    assert!(s.handle_spawned(now, SlotId(0), worker));
    let deadline = s.poll_timeout().expect("a boot deadline");
    s.handle_timeout(deadline);
    assert_eq!(
        drain(&mut s),
        [SupervisorOutput::Kill {
            worker,
            reason: KillReason::BootTimeout
        }]
    );
    // It listened just before the SIGKILL landed: still the supervisor's own kill, a crash.
    s.handle_listening(deadline, worker);
    s.handle_exit(deadline, worker, from_outside());
    assert!(matches!(
        drain(&mut s)[..],
        [SupervisorOutput::Event(SupervisorEvent::Respawning { .. })]
    ));
    // The primary's kill (a hang) is a crash too, even by a signal from outside's number.
    s.handle_timeout(deadline + Duration::from_secs(60));
    let worker = start_all(&mut s, deadline, &mut next)[0];
    s.handle_exit(
        deadline,
        worker,
        WorkerExit {
            killed: Some(KillReason::HeartbeatTimeout),
            ..from_outside()
        },
    );
    assert!(matches!(
        drain(&mut s)[..],
        [SupervisorOutput::Event(SupervisorEvent::CrashLoop { .. })]
    ));
}

#[test]
fn scaling_is_bounded_and_by_one_never_empties() {
    let mut s = Supervisor::new(
        SupervisorConfig {
            max_workers: 3,
            ..config()
        },
        1,
        28,
    );
    let now = Instant::now();
    let mut next = 1;
    let first = start_all(&mut s, now, &mut next)[0];
    assert_eq!(s.scale(4), Err(ScaleError::TooMany { asked: 4, max: 3 }));
    assert_eq!(s.active(), 1, "nothing changed");
    assert_eq!(s.scale(3), Ok(vec![]));
    assert_eq!(spawns(&drain(&mut s)), [1, 2]);
    assert!(s.scale_by_one(true).is_err());
    assert_eq!(s.scale_by_one(false).map(|(n, _)| n), Ok(2));
    assert_eq!(s.scale_by_one(false).map(|(n, _)| n), Ok(1));
    assert_eq!(s.scale_by_one(false), Ok((1, vec![])), "never below one");
    assert_eq!(s.scale(0), Ok(vec![SlotId(0)]));
    assert_eq!(
        drain(&mut s),
        [SupervisorOutput::Disconnect { worker: first }]
    );
}

#[test]
fn a_worker_started_for_a_slot_scaled_away_meanwhile_is_disconnected() {
    let mut s = Supervisor::new(config(), 2, 29);
    let now = Instant::now();
    assert_eq!(spawns(&drain(&mut s)), [0, 1]);
    assert_eq!(s.scale(1), Ok(vec![SlotId(1)]));
    // The fork was under way.
    assert!(!s.handle_spawned(now, SlotId(1), WorkerId::new(2)));
    assert_eq!(
        drain(&mut s),
        [SupervisorOutput::Disconnect {
            worker: WorkerId::new(2)
        }]
    );
}

#[test]
fn a_failed_start_for_a_slot_scaled_away_meanwhile_does_not_bring_it_back() {
    let mut s = Supervisor::new(config(), 1, 30);
    let now = Instant::now();
    assert_eq!(spawns(&drain(&mut s)), [0]);
    assert_eq!(s.scale(0), Ok(vec![SlotId(0)]));
    // The fork under way fails.
    s.handle_spawn_failed(now, SlotId(0));
    assert_eq!(drain(&mut s), []);
    assert_eq!(s.active(), 0);
    s.handle_timeout(now + Duration::from_secs(60));
    assert_eq!(drain(&mut s), [], "no restart of a removed slot");
}

fn recycling(max_requests: u64, jitter: u64, max_memory: Option<u64>) -> SupervisorConfig {
    SupervisorConfig {
        max_requests: Some(max_requests),
        max_requests_jitter: jitter,
        max_memory,
        ..SupervisorConfig::default()
    }
}

fn recycles(outputs: &[SupervisorOutput]) -> Vec<(WorkerId, RecycleReason)> {
    outputs
        .iter()
        .filter_map(|o| match o {
            SupervisorOutput::Recycle { worker, reason } => Some((*worker, *reason)),
            _ => None,
        })
        .collect()
}

/// Carries out the recycle of `old` as the driver does: `new` comes up, takes the slot, and
/// `old` drains and exits.
fn recycle_with(s: &mut Supervisor, now: Instant, old: WorkerId, new: WorkerId) {
    s.handle_listening(now, new);
    assert!(s.handle_replaced(now, old, new));
    s.handle_exit(now, old, left(ExitStatus::Code(0)));
    s.handle_recycled(old);
}

#[test]
fn a_worker_is_recycled_at_its_drawn_limit_one_at_a_time_in_the_order_they_became_due() {
    let mut s = Supervisor::new(recycling(100, 10, None), 3, 21);
    let now = Instant::now();
    let mut next = 1;
    let workers = start_all(&mut s, now, &mut next);
    let limits: Vec<u64> = workers
        .iter()
        .map(|w| s.recycle_limit(*w).unwrap())
        .collect();
    assert!(limits.iter().all(|l| (100..=110).contains(l)), "{limits:?}");
    // Below its limit: nothing.
    s.handle_handoffs(now, workers[0], limits[0] - 1);
    assert_eq!(drain(&mut s), []);
    s.handle_handoffs(now, workers[2], limits[2]);
    assert_eq!(
        recycles(&drain(&mut s)),
        [(
            workers[2],
            RecycleReason::Requests {
                handoffs: limits[2],
                limit: limits[2]
            }
        )]
    );
    assert_eq!(s.recycling(), Some(workers[2]));
    // Two more due meanwhile wait; readings again do not ask twice.
    s.handle_handoffs(now, workers[0], limits[0] + 5);
    s.handle_handoffs(now, workers[1], limits[1] + 1);
    s.handle_handoffs(now, workers[0], limits[0] + 9);
    s.handle_handoffs(now, workers[2], limits[2] + 9);
    assert_eq!(drain(&mut s), []);
    let new = WorkerId::new(100);
    recycle_with(&mut s, now, workers[2], new);
    let out = drain(&mut s);
    assert_eq!(recycles(&out).len(), 1, "{out:?}");
    assert_eq!(recycles(&out)[0].0, workers[0], "first due, first recycled");
    // The replacement has a limit of its own, and its slot is not restarted.
    assert!((100..=110).contains(&s.recycle_limit(new).unwrap()));
    assert_eq!(s.slot_of(new), Some(2));
    assert_eq!(s.active(), 3);
    recycle_with(&mut s, now, workers[0], WorkerId::new(101));
    assert_eq!(recycles(&drain(&mut s))[0].0, workers[1]);
    recycle_with(&mut s, now, workers[1], WorkerId::new(102));
    assert_eq!(drain(&mut s), []);
    assert_eq!(s.recycling(), None);
}

#[test]
fn limits_are_drawn_over_the_whole_jitter() {
    let mut s = Supervisor::new(recycling(1000, 4, None), 200, 22);
    let now = Instant::now();
    let mut next = 1;
    let workers = start_all(&mut s, now, &mut next);
    let drawn: BTreeSet<u64> = workers
        .iter()
        .map(|w| s.recycle_limit(*w).unwrap())
        .collect();
    assert_eq!(drawn, (1000..=1004).collect(), "every value, none outside");
    // Without jitter every worker has the same limit.
    let mut s = Supervisor::new(recycling(7, 0, None), 5, 23);
    let workers = start_all(&mut s, now, &mut next);
    assert!(workers.iter().all(|w| s.recycle_limit(*w) == Some(7)));
    // Off: no limit, and no reading recycles.
    let mut s = Supervisor::new(SupervisorConfig::default(), 1, 24);
    let worker = start_all(&mut s, now, &mut next)[0];
    assert_eq!(s.recycle_limit(worker), None);
    s.handle_handoffs(now, worker, u64::MAX);
    s.handle_memory(now, worker, u64::MAX);
    assert_eq!(drain(&mut s), []);
}

#[test]
fn a_worker_over_the_memory_limit_is_recycled() {
    let config = SupervisorConfig {
        max_memory: Some(512 << 20),
        ..SupervisorConfig::default()
    };
    let mut s = Supervisor::new(config, 2, 25);
    let now = Instant::now();
    let mut next = 1;
    let workers = start_all(&mut s, now, &mut next);
    s.handle_memory(now, workers[1], 512 << 20);
    assert_eq!(drain(&mut s), [], "at the limit is not over it");
    s.handle_memory(now, workers[1], (512 << 20) + 1);
    let out = recycles(&drain(&mut s));
    assert_eq!(
        out,
        [(
            workers[1],
            RecycleReason::Memory {
                resident: (512 << 20) + 1,
                limit: 512 << 20
            }
        )]
    );
    assert_eq!(out[0].1.label(), "memory");
    assert_eq!(
        out[0].1.to_string(),
        "resident memory 512.0 MiB over the limit of 512.0 MiB"
    );
}

#[test]
fn no_recycle_starts_during_a_reload_or_the_stop_and_one_due_waits_for_the_reload() {
    let mut s = Supervisor::new(recycling(10, 0, None), 2, 26);
    let now = Instant::now();
    let mut next = 1;
    let workers = start_all(&mut s, now, &mut next);
    s.pause_recycling(true);
    s.handle_handoffs(now, workers[0], 10);
    assert_eq!(drain(&mut s), []);
    s.pause_recycling(false);
    assert_eq!(recycles(&drain(&mut s))[0].0, workers[0]);
    recycle_with(&mut s, now, workers[0], WorkerId::new(50));
    // Due during a reload that then replaced it: nothing left to recycle.
    s.pause_recycling(true);
    s.handle_handoffs(now, workers[1], 10);
    let reloaded = WorkerId::new(51);
    s.handle_listening(now, reloaded);
    assert!(s.handle_replaced(now, workers[1], reloaded));
    s.pause_recycling(false);
    assert_eq!(drain(&mut s), []);
    // Stopping: nothing more.
    s.handle_handoffs(now, WorkerId::new(50), 10);
    assert_eq!(recycles(&drain(&mut s)).len(), 1);
    s.stop();
    s.handle_recycled(WorkerId::new(50));
    s.handle_handoffs(now, reloaded, 10);
    assert_eq!(drain(&mut s), []);
}

#[test]
fn a_failed_recycle_keeps_the_worker_and_tries_again_after_the_longest_backoff() {
    let mut s = Supervisor::new(recycling(10, 0, None), 2, 27);
    let now = Instant::now();
    let mut next = 1;
    let workers = start_all(&mut s, now, &mut next);
    s.handle_handoffs(now, workers[0], 10);
    s.handle_handoffs(now, workers[1], 10);
    assert_eq!(recycles(&drain(&mut s))[0].0, workers[0]);
    s.handle_recycle_failed(now, workers[0]);
    // The next one due goes; the failed one keeps its slot.
    assert_eq!(recycles(&drain(&mut s))[0].0, workers[1]);
    assert_eq!(s.slot_of(workers[0]), Some(0));
    s.handle_recycle_failed(now, workers[1]);
    drain(&mut s);
    s.handle_handoffs(now + Duration::from_secs(14), workers[0], 20);
    assert_eq!(drain(&mut s), []);
    s.handle_handoffs(now + Duration::from_secs(15), workers[0], 30);
    assert_eq!(recycles(&drain(&mut s))[0].0, workers[0]);
}

#[test]
fn a_worker_due_that_exits_or_is_booting_is_not_recycled() {
    let mut s = Supervisor::new(recycling(10, 0, None), 3, 28);
    let now = Instant::now();
    let mut next = 1;
    let workers = start_all(&mut s, now, &mut next);
    s.handle_handoffs(now, workers[0], 10);
    s.handle_handoffs(now, workers[1], 10);
    drain(&mut s);
    // Due and waiting, it crashes: its slot restarts it as usual.
    s.handle_exit(now, workers[1], crash(ExitStatus::Code(1)));
    assert!(matches!(
        drain(&mut s)[..],
        [SupervisorOutput::Event(SupervisorEvent::Respawning { .. })]
    ));
    // The worker being recycled crashes too: the driver still ends its recycle.
    s.handle_exit(now, workers[0], crash(ExitStatus::Code(1)));
    s.handle_recycled(workers[0]);
    assert!(recycles(&drain(&mut s)).is_empty());
    // A booting worker is not recycled.
    s.handle_timeout(now + Duration::from_secs(20));
    let slots = spawns(&drain(&mut s));
    let booting = WorkerId::new(60);
    assert!(s.handle_spawned(now, SlotId(slots[0]), booting));
    s.handle_handoffs(now, booting, 10);
    assert_eq!(drain(&mut s), []);
}
