//! Orphans. The primary is a child subreaper (`PR_SET_CHILD_SUBREAPER`), and may be a
//! container's PID 1: a process that outlives its parent (a worker's subprocess left behind, a
//! daemon that double-forked) becomes the primary's child, and its zombie must be reaped here or
//! it holds a pid until the pids limit is reached.
//!
//! Only orphans are reaped, never a child the primary's own code waits for: a worker (the driver
//! waits for each, for its exit status), or what the program starts itself. Workers run in
//! process groups of their own, and what they leave behind stays in them: a zombie in a
//! worker's group (present or past) is an orphan. As PID 1 (a container's init) every orphan of
//! the container comes here, daemons that made groups of their own included, so there a zombie
//! of any group but the primary's own is reaped: a child the program starts itself in a group of
//! its own is then reaped too, and its waiter finds it gone (documented).

use std::collections::{BTreeSet, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use rustix::process::{Pid, WaitOptions};
use tokio::signal::unix::{SignalKind, signal};

/// How often the primary looks for zombies even without a SIGCHLD (signals coalesce, and one
/// may come while a scan runs).
const SWEEP: Duration = Duration::from_secs(1);

/// The pids of every worker process of every primary in this process, kept by the drivers:
/// added before a spawn can be seen (the lock is held across it) and removed once the driver
/// reaped the worker. One set and one reaper per process: the children of a process are all
/// its primaries' (a test harness may run several).
static WORKER_PIDS: Mutex<Workers> = Mutex::new(Workers {
    live: BTreeSet::new(),
    groups: VecDeque::new(),
});

/// How many past workers' process groups are remembered: their orphans may outlive them.
const GROUPS_KEPT: usize = 4096;

/// The workers' processes: those alive, and the process groups of the latest ones.
pub(crate) struct Workers {
    live: BTreeSet<u32>,
    /// A worker's group is its pid (it leads a group of its own), kept after it exits.
    groups: VecDeque<u32>,
}

impl Workers {
    /// A worker was spawned.
    pub(crate) fn insert(&mut self, pid: u32) {
        self.live.insert(pid);
        if self.groups.len() == GROUPS_KEPT {
            self.groups.pop_front();
        }
        self.groups.push_back(pid);
    }

    /// A worker was reaped by its driver.
    pub(crate) fn remove(&mut self, pid: u32) {
        self.live.remove(&pid);
    }
}

/// Whether a reaper task runs (on the runtime of the primary that started it; the next primary
/// starts another once that runtime is gone).
static RUNNING: AtomicBool = AtomicBool::new(false);

/// The set of workers' pids, locked.
pub(crate) fn worker_pids() -> MutexGuard<'static, Workers> {
    WORKER_PIDS
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Makes this process a child subreaper and reaps orphans until the runtime stops: at each
/// SIGCHLD, and every second.
pub(crate) fn start() {
    if RUNNING.swap(true, Ordering::SeqCst) {
        return;
    }
    if let Err(error) = rustix::process::set_child_subreaper(Some(rustix::process::getpid())) {
        tracing::debug!(%error, "cannot become a child subreaper; orphans go to init");
    }
    let mut children = signal(SignalKind::child())
        .inspect_err(
            |error| tracing::warn!(%error, "cannot watch SIGCHLD; orphans are reaped every second"),
        )
        .ok();
    tokio::spawn(async move {
        let _running = Running;
        let mut sweep = tokio::time::interval(SWEEP);
        sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let child = async {
                match &mut children {
                    Some(children) => children.recv().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = sweep.tick() => {}
                _ = child => {}
            }
            // `/proc` is read off the runtime's thread, which hands off connections.
            let reaped = tokio::task::spawn_blocking(reap_orphans).await.unwrap_or(0);
            if reaped > 0 {
                tracing::debug!(reaped, "reaped orphaned processes");
            }
        }
    });
}

/// Clears [`RUNNING`] when the reaper's task ends with its runtime.
struct Running;

impl Drop for Running {
    fn drop(&mut self) {
        RUNNING.store(false, Ordering::SeqCst);
    }
}

/// Reaps every zombie child that is an orphan; returns how many.
fn reap_orphans() -> usize {
    // Read from `/proc` like the children's: in a pid namespace made by `unshare --fork`, the
    // primary's group belongs to the parent namespace, and shows as 0 here.
    let Some((_, ours)) = std::fs::read_to_string("/proc/self/stat")
        .ok()
        .and_then(|stat| parse_stat(&stat))
    else {
        return 0;
    };
    let as_init = rustix::process::getpid().as_raw_nonzero().get() == 1;
    let mut reaped = 0;
    for pid in children() {
        let Some((state, group)) = state_and_group(pid) else {
            continue;
        };
        if state != 'Z' || group == ours {
            continue;
        }
        // Held while reaping: a worker just spawned is in the set before it can be a zombie.
        let workers = worker_pids();
        let left_by_a_worker = workers.groups.contains(&group.unsigned_abs());
        if workers.live.contains(&pid.unsigned_abs()) || !(left_by_a_worker || as_init) {
            continue;
        }
        let Some(raw) = Pid::from_raw(pid) else {
            continue;
        };
        if let Ok(Some(_)) = rustix::process::waitpid(Some(raw), WaitOptions::NOHANG) {
            reaped += 1;
        }
    }
    reaped
}

/// This process's children: every thread's, as `/proc` lists them.
fn children() -> Vec<i32> {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return Vec::new();
    };
    let mut pids = Vec::new();
    for task in tasks.flatten() {
        if let Ok(list) = std::fs::read_to_string(task.path().join("children")) {
            pids.extend(
                list.split_whitespace()
                    .filter_map(|pid| pid.parse::<i32>().ok()),
            );
        }
    }
    pids
}

/// A process's state letter and process group, from `/proc/<pid>/stat`.
fn state_and_group(pid: i32) -> Option<(char, i32)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_stat(&stat)
}

fn parse_stat(stat: &str) -> Option<(char, i32)> {
    // The command name (field 2) may hold spaces and parentheses: fields after it start after
    // the last `)`. Then: state (3), ppid (4), pgrp (5).
    let (_, rest) = stat.rsplit_once(')')?;
    let mut fields = rest.split_whitespace();
    let state = fields.next()?.chars().next()?;
    let group = fields.nth(1)?.parse().ok()?;
    Some((state, group))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_state_and_group_follow_the_command_name() {
        let stat = "4242 (odd) name) Z 1 4000 4000 0 -1 4194560 0 0";
        assert_eq!(parse_stat(stat), Some(('Z', 4000)));
        assert_eq!(parse_stat("garbage"), None);
    }
}
