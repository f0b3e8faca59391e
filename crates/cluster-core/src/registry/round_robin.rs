//! The round-robin handle: the primary accepts, queues, and hands each connection to one worker.

use std::collections::{BTreeMap, VecDeque};
use std::num::NonZeroUsize;

use crate::wire::WorkerId;

/// How a round-robin handle picks the worker for the next connection.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Pick {
    /// Each eligible worker in turn.
    #[default]
    InTurn,
    /// The eligible worker with the fewest open connections; ties in turn.
    LeastOutstanding,
}

/// The connections each worker has open, over all its handles: the counts the scheduler reads,
/// and the per-worker cap.
///
/// A connection counts from its handoff until the worker refuses it, gives it back, reports it
/// ended ([`Self::release`]), or goes away ([`Self::forget`]).
#[derive(Clone, Debug, Default)]
pub struct Loads {
    pick: Pick,
    cap: Option<NonZeroUsize>,
    open: BTreeMap<WorkerId, usize>,
}

impl Loads {
    /// Counts for handles that pick with `pick` and offer a worker nothing once it has `cap`
    /// connections open.
    pub fn new(pick: Pick, cap: Option<NonZeroUsize>) -> Self {
        Self {
            pick,
            cap,
            open: BTreeMap::new(),
        }
    }

    /// How the next worker is picked.
    pub fn pick(&self) -> Pick {
        self.pick
    }

    /// The most connections a worker may have open, if bounded.
    pub fn cap(&self) -> Option<NonZeroUsize> {
        self.cap
    }

    /// The connections `worker` has open.
    pub fn open(&self, worker: WorkerId) -> usize {
        self.open.get(&worker).copied().unwrap_or(0)
    }

    /// Whether `worker` is at its cap: it is offered nothing.
    pub fn is_full(&self, worker: WorkerId) -> bool {
        self.cap.is_some_and(|cap| self.open(worker) >= cap.get())
    }

    /// How many more connections `worker` may take before its cap (`usize::MAX` without one).
    pub fn spare(&self, worker: WorkerId) -> usize {
        self.cap.map_or(usize::MAX, |cap| {
            cap.get().saturating_sub(self.open(worker))
        })
    }

    /// `n` of `worker`'s connections are no longer open (they ended, were refused or given
    /// back). Never below zero: the caller checks what a worker reports.
    pub fn release(&mut self, worker: WorkerId, n: usize) {
        if let Some(open) = self.open.get_mut(&worker) {
            *open = open.saturating_sub(n);
            if *open == 0 {
                self.open.remove(&worker);
            }
        }
    }

    /// `worker` is gone: its count goes with it.
    pub fn forget(&mut self, worker: WorkerId) {
        self.open.remove(&worker);
    }

    fn opened(&mut self, worker: WorkerId) {
        *self.open.entry(worker).or_default() += 1;
    }
}

/// What a [`RoundRobin`] asks its driver to do with a connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RoundRobinOutput<C> {
    /// Close the connection without serving it: its last worker left the handle.
    Close(C),
    /// The worker acked the connection; the primary drops its copy (the worker owns it now).
    Delivered {
        /// The worker that owns it.
        worker: WorkerId,
        /// The connection.
        conn: C,
    },
    /// Send the connection to `worker`; it stays in flight until acked or the worker is removed.
    Dispatch {
        /// The receiving worker.
        worker: WorkerId,
        /// The connection.
        conn: C,
    },
}

/// Why a [`RoundRobin`] refused an input (always the caller's or the peer's mistake).
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RoundRobinError {
    /// The worker is not a member of this handle.
    #[error("{0} is not a member of this handle")]
    NotMember(WorkerId),
    /// The worker acked a connection that is not in flight to it.
    #[error("{0} acked a connection that is not in flight to it")]
    NotInFlight(WorkerId),
}

#[derive(Debug)]
struct Member<C> {
    in_flight: Vec<C>,
    /// Refused a connection and has not said `Ready` since: offered nothing.
    paused: bool,
    /// Closed the handle (or is disconnecting): offered nothing, kept until its acks arrive.
    leaving: bool,
    /// Present in `RoundRobin::ready` (each member is there at most once).
    in_ready: bool,
    /// Takes connections that carry a prefix (bytes another worker read from them).
    takes_prefixes: bool,
}

/// Round-robin distribution of accepted connections over the members of one handle.
///
/// Every connection given to it is, at any instant, in exactly one place: the queue, in flight to
/// exactly one member, or handed back through [`Self::poll`] (`Delivered` or `Close`).
///
/// - A member takes up to `window` unacked connections (1 reproduces Node exactly).
/// - Members are offered connections in turn (a FIFO of members with room, as Node's free list),
///   or, with [`Pick::LeastOutstanding`], the one with the fewest open connections in [`Loads`]
///   (ties in turn). A member at its cap in [`Loads`] is offered nothing.
/// - Connections move to members only in [`Self::pump`], which the owner calls after every
///   change (counts are shared by every handle, so only the owner knows when they changed).
/// - A member that refuses a connection is offered nothing more until [`Self::ready`]: no
///   ping-pong when every worker is full.
/// - The queue holds at most `max_queued` connections taken from the kernel; past that,
///   [`Self::wants_connections`] is false and new connections wait in the kernel's backlog.
///   Refused and re-dispatched connections return to the front of the queue even past the bound,
///   so at most `max_queued + window × members` connections are ever held.
/// - A connection given back by a worker (leaving, it handed back an idle connection or one it
///   never accepted) goes to the youngest member with room: in a rolling reload, the leaving
///   worker's replacement, so that it moves once. One that carries a prefix (bytes the worker
///   read) goes only to a member that takes prefixes; with no such member left it is closed.
#[derive(Debug)]
pub struct RoundRobin<C> {
    window: usize,
    max_queued: usize,
    queue: VecDeque<C>,
    /// The connections held here (queued or in flight) that a worker gave back, and whether
    /// each carries a prefix (thousands in a reload under keep-alive load).
    given_back: BTreeMap<C, bool>,
    members: BTreeMap<WorkerId, Member<C>>,
    ready: VecDeque<WorkerId>,
    out: VecDeque<RoundRobinOutput<C>>,
}

impl<C: Copy + Ord> RoundRobin<C> {
    /// An empty handle. `window` and `max_queued` are raised to at least 1.
    pub fn new(window: usize, max_queued: usize) -> Self {
        Self {
            window: window.max(1),
            max_queued: max_queued.max(1),
            queue: VecDeque::new(),
            given_back: BTreeMap::new(),
            members: BTreeMap::new(),
            ready: VecDeque::new(),
            out: VecDeque::new(),
        }
    }

    /// Adds `worker` (or re-activates a leaving one); queued connections flow to it at once.
    pub fn add(&mut self, worker: WorkerId) {
        let member = self.members.entry(worker).or_insert_with(|| Member {
            in_flight: Vec::new(),
            paused: false,
            leaving: false,
            in_ready: false,
            takes_prefixes: false,
        });
        member.leaving = false;
        member.paused = false;
        self.make_ready(worker);
    }

    /// Takes a newly accepted connection.
    ///
    /// # Errors
    ///
    /// Hands `conn` back when the handle has no active member or the queue is at its bound
    /// (the driver should have checked [`Self::wants_connections`]); the caller closes it.
    pub fn push(&mut self, conn: C) -> Result<(), C> {
        if !self.wants_connections() {
            return Err(conn);
        }
        self.queue.push_back(conn);
        Ok(())
    }

    /// Takes back a connection a worker acked but did not serve, or served and handed back
    /// between two requests. It goes to the front of the queue, past the bound (it was
    /// accepted already). `prefixed`: it carries bytes read from it, for a member that takes
    /// them.
    ///
    /// # Errors
    ///
    /// Hands `conn` back when no active member (that takes prefixes, for `prefixed`) is left;
    /// the caller closes it.
    pub fn give_back(&mut self, conn: C, prefixed: bool) -> Result<(), C> {
        let taken = |m: &Member<C>| !m.leaving && (!prefixed || m.takes_prefixes);
        if !self.members.values().any(taken) {
            return Err(conn);
        }
        self.given_back.insert(conn, prefixed);
        self.queue.push_front(conn);
        Ok(())
    }

    /// `worker`'s listener takes connections that carry a prefix.
    ///
    /// # Errors
    ///
    /// [`RoundRobinError::NotMember`].
    pub fn takes_prefixes(&mut self, worker: WorkerId) -> Result<(), RoundRobinError> {
        self.members
            .get_mut(&worker)
            .ok_or(RoundRobinError::NotMember(worker))?
            .takes_prefixes = true;
        Ok(())
    }

    /// Whether `conn` carries a prefix.
    pub fn is_prefixed(&self, conn: C) -> bool {
        self.given_back(conn) == Some(true)
    }

    /// For a connection a worker gave back, whether it carries a prefix.
    fn given_back(&self, conn: C) -> Option<bool> {
        if self.given_back.is_empty() {
            return None;
        }
        self.given_back.get(&conn).copied()
    }

    /// `conn` leaves this handle: it is no longer one given back.
    fn forget_given_back(&mut self, conn: C) {
        if !self.given_back.is_empty() {
            self.given_back.remove(&conn);
        }
    }

    /// Whether the driver should accept more connections for this handle now (its queue bound
    /// and its members; see [`Self::has_spare`] for their caps).
    pub fn wants_connections(&self) -> bool {
        self.has_active_members() && self.queue.len() < self.max_queued
    }

    /// Whether the active members, under their caps in `loads`, have room for one connection
    /// more than the queue holds: when every one is at its cap, the driver stops accepting and
    /// the kernel's backlog holds the rest.
    pub fn has_spare(&self, loads: &Loads) -> bool {
        // Without a cap, not a walk of the members on every accept.
        if loads.cap().is_none() {
            return self.has_active_members();
        }
        let mut spare = 0usize;
        for (worker, member) in &self.members {
            if !member.leaving {
                spare = spare.saturating_add(loads.spare(*worker));
            }
        }
        spare > self.queue.len()
    }

    /// Records `worker`'s answer for `conn`.
    ///
    /// Accepted: `Delivered`. Refused: `conn` goes back to the front of the queue (or is closed if
    /// no active member is left) and `worker` is paused until [`Self::ready`].
    ///
    /// # Errors
    ///
    /// [`RoundRobinError::NotInFlight`] if `conn` is not in flight to `worker`; nothing changes.
    pub fn ack(
        &mut self,
        worker: WorkerId,
        conn: C,
        accepted: bool,
    ) -> Result<(), RoundRobinError> {
        let member = self
            .members
            .get_mut(&worker)
            .ok_or(RoundRobinError::NotMember(worker))?;
        let at = member
            .in_flight
            .iter()
            .position(|c| *c == conn)
            .ok_or(RoundRobinError::NotInFlight(worker))?;
        member.in_flight.swap_remove(at);
        if accepted {
            self.forget_given_back(conn);
            self.out
                .push_back(RoundRobinOutput::Delivered { worker, conn });
        } else {
            if !member.leaving {
                member.paused = true;
            }
            self.requeue_front([conn]);
        }
        self.settle(worker);
        Ok(())
    }

    /// `worker` has capacity again after refusing.
    ///
    /// # Errors
    ///
    /// [`RoundRobinError::NotMember`].
    pub fn ready(&mut self, worker: WorkerId) -> Result<(), RoundRobinError> {
        let member = self
            .members
            .get_mut(&worker)
            .ok_or(RoundRobinError::NotMember(worker))?;
        member.paused = false;
        self.make_ready(worker);
        Ok(())
    }

    /// `worker` closed the handle or is disconnecting: it is offered nothing more, and stays a
    /// (leaving) member until its in-flight connections are acked. When no active member is
    /// left, every queued connection is closed.
    ///
    /// # Errors
    ///
    /// [`RoundRobinError::NotMember`].
    pub fn leave(&mut self, worker: WorkerId) -> Result<(), RoundRobinError> {
        let member = self
            .members
            .get_mut(&worker)
            .ok_or(RoundRobinError::NotMember(worker))?;
        member.leaving = true;
        self.settle(worker);
        self.close_queue_if_orphaned();
        Ok(())
    }

    /// `worker` is gone (its link closed): its unacked connections are re-dispatched to the others
    /// (or closed if no active member is left).
    pub fn remove(&mut self, worker: WorkerId) {
        let Some(member) = self.members.remove(&worker) else {
            return;
        };
        if member.in_ready {
            self.ready.retain(|w| *w != worker);
        }
        self.requeue_front(member.in_flight);
    }

    /// Whether some member still takes new connections.
    pub fn has_active_members(&self) -> bool {
        self.members.values().any(|m| !m.leaving)
    }

    /// Whether no member at all remains (active or leaving), so the handle can be forgotten.
    pub fn is_empty(&self) -> bool {
        self.members.is_empty() && self.queue.is_empty()
    }

    /// Whether `worker` is an active (not leaving) member.
    pub fn is_active_member(&self, worker: WorkerId) -> bool {
        self.members.get(&worker).is_some_and(|m| !m.leaving)
    }

    /// Whether `worker` is a member, active or leaving.
    pub fn is_member(&self, worker: WorkerId) -> bool {
        self.members.contains_key(&worker)
    }

    /// The connections waiting for a worker, oldest first.
    pub fn queued(&self) -> impl ExactSizeIterator<Item = &C> {
        self.queue.iter()
    }

    /// The connections in flight to `worker`.
    pub fn in_flight(&self, worker: WorkerId) -> &[C] {
        self.members.get(&worker).map_or(&[], |m| &m.in_flight)
    }

    /// The members, active or leaving.
    pub fn members(&self) -> impl Iterator<Item = WorkerId> + '_ {
        self.members.keys().copied()
    }

    /// The next thing for the driver to do.
    #[must_use]
    pub fn poll(&mut self) -> Option<RoundRobinOutput<C>> {
        self.out.pop_front()
    }

    fn requeue_front(&mut self, conns: impl IntoIterator<Item = C, IntoIter: DoubleEndedIterator>) {
        for conn in conns.into_iter().rev() {
            self.queue.push_front(conn);
        }
        self.close_queue_if_orphaned();
    }

    fn close_queue_if_orphaned(&mut self) {
        if !self.has_active_members() {
            self.given_back.clear();
            self.out
                .extend(self.queue.drain(..).map(RoundRobinOutput::Close));
        }
    }

    /// Re-evaluates `worker`'s place after its in-flight set or flags changed.
    fn settle(&mut self, worker: WorkerId) {
        let Some(member) = self.members.get(&worker) else {
            return;
        };
        if member.leaving && member.in_flight.is_empty() {
            self.members.remove(&worker);
            self.ready.retain(|w| *w != worker);
        } else if member.leaving || member.paused {
            if member.in_ready {
                self.ready.retain(|w| *w != worker);
                if let Some(m) = self.members.get_mut(&worker) {
                    m.in_ready = false;
                }
            }
        } else {
            self.make_ready(worker);
        }
    }

    fn make_ready(&mut self, worker: WorkerId) {
        let window = self.window;
        if let Some(m) = self.members.get_mut(&worker)
            && !m.in_ready
            && !m.paused
            && !m.leaving
            && m.in_flight.len() < window
        {
            m.in_ready = true;
            self.ready.push_back(worker);
        }
    }

    /// Hands queued connections to members with room, as `loads` says, counting each one in
    /// `loads`. A connection a worker gave back goes to the youngest member with room (that
    /// takes prefixes, if it carries one).
    pub fn pump(&mut self, loads: &mut Loads) {
        while let Some(&conn) = self.queue.front() {
            let picked = match self.given_back(conn) {
                None => self.next_member(loads),
                Some(prefixed) => match self.youngest_member(loads, prefixed) {
                    Some(at) => Some(at),
                    None if !prefixed
                        || self
                            .members
                            .values()
                            .any(|m| !m.leaving && m.takes_prefixes) =>
                    {
                        None
                    }
                    None => {
                        // Nobody left can read its bytes first: closed, as its last worker
                        // would have closed it.
                        self.queue.pop_front();
                        self.forget_given_back(conn);
                        self.out.push_back(RoundRobinOutput::Close(conn));
                        continue;
                    }
                },
            };
            let Some(at) = picked else {
                break;
            };
            let worker = self.ready.remove(at).expect("index from the ready list");
            let Some(member) = self.members.get_mut(&worker) else {
                continue;
            };
            member.in_ready = false;
            self.queue.pop_front();
            member.in_flight.push(conn);
            loads.opened(worker);
            self.out
                .push_back(RoundRobinOutput::Dispatch { worker, conn });
            self.make_ready(worker);
        }
    }

    /// Where in the ready list the next member is: the first under its cap, or with
    /// [`Pick::LeastOutstanding`] the first of those with the fewest open connections (the list
    /// is in turn order: whoever was served last is at its end).
    /// For a connection a worker gave back, where in `ready` the youngest member is that has
    /// room and can take it: in a rolling reload, the leaving worker's replacement.
    fn youngest_member(&self, loads: &Loads, prefixed: bool) -> Option<usize> {
        self.ready
            .iter()
            .enumerate()
            .filter(|(_, w)| !loads.is_full(**w))
            .filter(|(_, w)| !prefixed || self.members.get(w).is_some_and(|m| m.takes_prefixes))
            .max_by_key(|(_, w)| **w)
            .map(|(at, _)| at)
    }

    fn next_member(&self, loads: &Loads) -> Option<usize> {
        let mut eligible = self
            .ready
            .iter()
            .enumerate()
            .filter(|(_, w)| !loads.is_full(**w));
        match loads.pick() {
            Pick::InTurn => eligible.next().map(|(at, _)| at),
            Pick::LeastOutstanding => eligible
                .min_by_key(|(at, w)| (loads.open(**w), *at))
                .map(|(at, _)| at),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const W1: WorkerId = WorkerId::new(1);
    const W2: WorkerId = WorkerId::new(2);
    const W3: WorkerId = WorkerId::new(3);

    /// Pumps (in turn, no caps) and takes the outputs.
    fn drain(rr: &mut RoundRobin<u32>) -> Vec<RoundRobinOutput<u32>> {
        rr.pump(&mut Loads::default());
        std::iter::from_fn(|| rr.poll()).collect()
    }

    fn dispatch(worker: WorkerId, conn: u32) -> RoundRobinOutput<u32> {
        RoundRobinOutput::Dispatch { worker, conn }
    }

    #[test]
    fn window_one_rotates_strictly_like_node() {
        let mut rr = RoundRobin::new(1, 16);
        for w in [W1, W2, W3] {
            rr.add(w);
        }
        let mut order = Vec::new();
        for conn in 0..9 {
            rr.push(conn).unwrap();
            for out in drain(&mut rr) {
                if let RoundRobinOutput::Dispatch { worker, conn } = out {
                    order.push(worker.get());
                    rr.ack(worker, conn, true).unwrap();
                }
            }
        }
        assert_eq!(order, [1, 2, 3, 1, 2, 3, 1, 2, 3]);
    }

    #[test]
    fn window_bounds_unacked_handoffs_per_worker() {
        let mut rr = RoundRobin::new(2, 16);
        rr.add(W1);
        for conn in 0..5 {
            rr.push(conn).unwrap();
        }
        assert_eq!(drain(&mut rr), [dispatch(W1, 0), dispatch(W1, 1)]);
        assert_eq!(rr.queued().count(), 3);
        rr.ack(W1, 0, true).unwrap();
        assert_eq!(
            drain(&mut rr),
            [
                RoundRobinOutput::Delivered {
                    worker: W1,
                    conn: 0
                },
                dispatch(W1, 2)
            ]
        );
    }

    #[test]
    fn queued_connections_flow_to_a_new_worker_at_once() {
        let mut rr = RoundRobin::new(1, 16);
        rr.add(W1);
        for conn in 0..3 {
            rr.push(conn).unwrap();
        }
        assert_eq!(drain(&mut rr), [dispatch(W1, 0)]);
        rr.add(W2);
        assert_eq!(drain(&mut rr), [dispatch(W2, 1)]);
    }

    #[test]
    fn refusing_worker_is_paused_until_ready_no_ping_pong() {
        let mut rr = RoundRobin::new(1, 16);
        rr.add(W1);
        rr.add(W2);
        rr.push(7).unwrap();
        assert_eq!(drain(&mut rr), [dispatch(W1, 7)]);
        rr.ack(W1, 7, false).unwrap();
        assert_eq!(drain(&mut rr), [dispatch(W2, 7)]);
        rr.ack(W2, 7, false).unwrap();
        // Both refused: the connection waits, nobody is offered it again.
        assert_eq!(drain(&mut rr), []);
        assert_eq!(rr.queued().copied().collect::<Vec<_>>(), [7]);
        rr.ready(W2).unwrap();
        assert_eq!(drain(&mut rr), [dispatch(W2, 7)]);
    }

    #[test]
    fn removed_worker_unacked_connections_are_redispatched_first() {
        let mut rr = RoundRobin::new(2, 16);
        rr.add(W1);
        for conn in 0..3 {
            rr.push(conn).unwrap();
        }
        drain(&mut rr);
        rr.add(W2);
        assert_eq!(drain(&mut rr), [dispatch(W2, 2)]);
        rr.remove(W1);
        // 0 and 1 go back in front; W2 has room for one more.
        assert_eq!(drain(&mut rr), [dispatch(W2, 0)]);
        assert_eq!(rr.queued().copied().collect::<Vec<_>>(), [1]);
        assert_eq!(rr.ack(W1, 0, true), Err(RoundRobinError::NotMember(W1)));
    }

    #[test]
    fn last_worker_leaving_closes_the_queue_and_late_refusals() {
        let mut rr = RoundRobin::new(1, 16);
        rr.add(W1);
        rr.push(1).unwrap();
        rr.push(2).unwrap();
        drain(&mut rr);
        rr.leave(W1).unwrap();
        assert_eq!(drain(&mut rr), [RoundRobinOutput::Close(2)]);
        assert!(!rr.wants_connections());
        assert_eq!(rr.push(3), Err(3));
        assert!(rr.is_member(W1), "leaving member kept until its ack");
        rr.ack(W1, 1, false).unwrap();
        assert_eq!(drain(&mut rr), [RoundRobinOutput::Close(1)]);
        assert!(rr.is_empty());
    }

    #[test]
    fn queue_bound_stops_accepting() {
        let mut rr = RoundRobin::new(1, 2);
        rr.add(W1);
        rr.push(0).unwrap();
        drain(&mut rr); // 0 in flight
        rr.push(1).unwrap();
        rr.push(2).unwrap();
        assert!(!rr.wants_connections());
        assert_eq!(rr.push(3), Err(3));
        drain(&mut rr);
        rr.ack(W1, 0, true).unwrap();
        drain(&mut rr);
        assert!(rr.wants_connections());
    }

    #[test]
    fn given_back_connections_go_first_or_are_refused_when_orphaned() {
        let mut rr = RoundRobin::new(1, 1);
        rr.add(W1);
        rr.push(1).unwrap();
        drain(&mut rr);
        rr.push(2).unwrap();
        assert!(!rr.wants_connections(), "queue at its bound");
        rr.give_back(9, false).unwrap();
        assert_eq!(rr.queued().copied().collect::<Vec<_>>(), [9, 2]);
        rr.leave(W1).unwrap();
        drain(&mut rr);
        assert_eq!(rr.give_back(10, false), Err(10));
    }

    #[test]
    fn bad_acks_change_nothing() {
        let mut rr = RoundRobin::new(1, 4);
        rr.add(W1);
        rr.push(5).unwrap();
        drain(&mut rr);
        assert_eq!(rr.ack(W1, 6, true), Err(RoundRobinError::NotInFlight(W1)));
        assert_eq!(rr.ack(W2, 5, true), Err(RoundRobinError::NotMember(W2)));
        assert_eq!(rr.in_flight(W1), [5]);
    }
}
