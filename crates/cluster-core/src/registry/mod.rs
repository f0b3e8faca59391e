//! The handle registry: which sockets the primary holds, who listens on them, and where each
//! accepted connection is.
//!
//! A listen request ([`Registry::query`]) finds or creates the handle for its [`HandleKey`]. A new
//! handle is bound by the driver ([`RegistryOutput::Bind`], then [`Registry::bound`]); requests
//! that arrive meanwhile wait for the same bind. A failed bind is answered to every waiter and
//! forgets the key, so a retry binds again. When the last active member leaves, the driver closes
//! the socket ([`RegistryOutput::Unbind`]) and the key is forgotten.

mod round_robin;

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::num::NonZeroUsize;
use std::time::{Duration, Instant};

pub use round_robin::{Loads, Pick, RoundRobin, RoundRobinError, RoundRobinOutput};

use crate::key::HandleKey;
use crate::wire::{
    BoundAddr, Distribution, Errno, HandleId, ListenInfo, ListenRequest, Seq, SocketKind, WorkerId,
};

/// How TCP and Unix stream connections reach workers (datagram sockets are always shared).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum SchedulingPolicy {
    /// The primary accepts and hands connections out in turn (Node's `SCHED_RR`, the default).
    #[default]
    RoundRobin,
    /// Workers receive the listening socket and the kernel picks who accepts (Node's
    /// `SCHED_NONE`).
    Shared,
    /// The primary accepts and hands each connection to the worker with the fewest connections
    /// open (ties in turn).
    LeastOutstanding,
}

impl SchedulingPolicy {
    /// How a handle the primary accepts on picks its worker under this policy.
    pub fn pick(self) -> Pick {
        match self {
            Self::LeastOutstanding => Pick::LeastOutstanding,
            Self::RoundRobin | Self::Shared => Pick::InTurn,
        }
    }
}

/// Limits of the registry.
#[derive(Clone, Copy, Debug)]
pub struct RegistryConfig {
    /// TCP/Unix distribution.
    pub policy: SchedulingPolicy,
    /// Unacked handoffs per worker per handle.
    pub window: usize,
    /// Connections the primary holds per handle while no worker has room.
    pub max_queued: usize,
    /// Listens one worker may hold or wait for at once (a bound on what a worker can make the
    /// primary allocate).
    pub max_listens_per_worker: usize,
    /// How long a socket whose last worker died stays open for a replacement to listen on it.
    pub keep_for_replacement: Duration,
    /// The most connections one worker may have open over all its handles (Node's
    /// `maxConnections`); a worker at its cap is offered nothing. `None`: no cap.
    pub max_connections_per_worker: Option<NonZeroUsize>,
}

impl RegistryConfig {
    /// Whether the primary needs timely reports of ended connections from workers: its policy
    /// or a cap depends on how many each has open.
    pub fn counts_connections(&self) -> bool {
        self.policy == SchedulingPolicy::LeastOutstanding
            || self.max_connections_per_worker.is_some()
    }
}

impl Default for RegistryConfig {
    fn default() -> Self {
        Self {
            policy: SchedulingPolicy::RoundRobin,
            window: 8,
            max_queued: 1024,
            max_listens_per_worker: 1024,
            keep_for_replacement: Duration::from_secs(60),
            max_connections_per_worker: None,
        }
    }
}

/// What the registry asks its driver (the primary) to do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RegistryOutput<C> {
    /// Create the socket for `handle` and report with [`Registry::bound`].
    Bind {
        /// The new handle.
        handle: HandleId,
        /// The first request for it.
        request: ListenRequest,
        /// Whether the socket is accepted on by the primary or shared with workers.
        distribution: Distribution,
    },
    /// Close the connection without serving it.
    Close(C),
    /// Drop the primary's copy of `conn`: `worker` acked it.
    Delivered {
        /// The owner.
        worker: WorkerId,
        /// The connection.
        conn: C,
    },
    /// Send `conn` to `worker` as a `NewConn` on `handle`.
    Dispatch {
        /// The receiver.
        worker: WorkerId,
        /// The handle it was accepted on.
        handle: HandleId,
        /// The connection.
        conn: C,
    },
    /// Answer `worker`'s query `seq` (for a shared handle, with the listening fd attached).
    Reply {
        /// The asker.
        worker: WorkerId,
        /// Its query.
        seq: Seq,
        /// The answer.
        result: Result<ListenInfo, Errno>,
    },
    /// Close the socket of `handle`: nobody listens on it any more.
    Unbind {
        /// The handle.
        handle: HandleId,
    },
}

/// A worker referred to a handle it does not hold.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RegistryError {
    /// No such handle, or the worker is not listening on it.
    #[error("{worker} does not hold {handle}")]
    NotHeld {
        /// The worker.
        worker: WorkerId,
        /// The handle it named.
        handle: HandleId,
    },
    /// A round-robin rule was broken (e.g. an ack for a connection not in flight to it).
    #[error(transparent)]
    RoundRobin(#[from] RoundRobinError),
}

#[derive(Debug)]
enum Mode<C> {
    RoundRobin(RoundRobin<C>),
    Shared(BTreeSet<WorkerId>),
}

#[derive(Debug)]
enum State<C> {
    /// Waiting for the driver's bind; the queries to answer when it completes.
    Binding(Vec<(WorkerId, Seq)>),
    Bound(BoundAddr, Mode<C>),
    /// The socket is closed and the key forgotten, but leaving members still have connections in
    /// flight; kept until they are acked or the members are removed.
    Closing(RoundRobin<C>),
}

#[derive(Debug)]
struct Handle<C> {
    key: HandleKey,
    distribution: Distribution,
    state: State<C>,
    /// Its last member died (it did not close its listener): the socket stays open, with its
    /// port and its backlog, for the worker that replaces it, until this deadline. Node closes
    /// it, and a restart then refuses connections meanwhile, or listens on another port for
    /// port 0.
    kept: Option<Instant>,
}

impl<C: Copy + Ord> Handle<C> {
    /// Whether no worker listens on it (or, closing, still has connections in flight).
    fn is_orphaned(&self) -> bool {
        match &self.state {
            State::Bound(_, Mode::RoundRobin(rr)) => !rr.has_active_members(),
            State::Bound(_, Mode::Shared(members)) => members.is_empty(),
            State::Closing(rr) => rr.is_empty(),
            State::Binding(_) => false,
        }
    }

    /// Whether `worker` holds this handle or waits for it (what makes a fixed-port re-bind an
    /// `EADDRINUSE` and moves a port-0 request to the next index).
    fn is_held_by(&self, worker: WorkerId) -> bool {
        match &self.state {
            State::Binding(waiters) => waiters.iter().any(|(w, _)| *w == worker),
            State::Bound(_, Mode::RoundRobin(rr)) => rr.is_active_member(worker),
            State::Bound(_, Mode::Shared(members)) => members.contains(&worker),
            State::Closing(_) => false,
        }
    }
}

/// The primary's handles, generic over the driver's connection token `C`.
///
/// `C` is opaque: the driver keeps the real socket (an `OwnedFd`) under it and acts on
/// [`RegistryOutput`]s. The registry never holds an fd.
#[derive(Debug)]
pub struct Registry<C> {
    config: RegistryConfig,
    handles: BTreeMap<HandleId, Handle<C>>,
    by_key: HashMap<HandleKey, HandleId>,
    next_id: u32,
    /// Open connections per worker, over every round-robin handle.
    loads: Loads,
    out: VecDeque<RegistryOutput<C>>,
}

impl<C: Copy + Ord> Registry<C> {
    /// An empty registry.
    pub fn new(config: RegistryConfig) -> Self {
        Self {
            config,
            handles: BTreeMap::new(),
            by_key: HashMap::new(),
            next_id: 0,
            loads: Loads::new(config.policy.pick(), config.max_connections_per_worker),
            out: VecDeque::new(),
        }
    }

    /// The configuration.
    pub fn config(&self) -> &RegistryConfig {
        &self.config
    }

    /// A worker asks to listen. The answer comes as a [`RegistryOutput::Reply`], at once or after
    /// the bind.
    pub fn query(&mut self, worker: WorkerId, seq: Seq, request: ListenRequest) {
        let held = self
            .handles
            .values()
            .filter(|h| h.is_held_by(worker))
            .count();
        if held >= self.config.max_listens_per_worker {
            return self.reply(worker, seq, Err(Errno::EMFILE));
        }
        let Some(key) = self.key_for(worker, &request) else {
            return self.reply(worker, seq, Err(Errno::EINVAL));
        };
        if let Some(&id) = self.by_key.get(&key) {
            let handle = &self.handles[&id];
            if handle.is_held_by(worker) {
                // Only reachable for fixed ports: port-0 requests moved to a free index.
                return self.reply(worker, seq, Err(Errno::EADDRINUSE));
            }
            return self.join(id, worker, seq);
        }
        let id = HandleId::new(self.next_id);
        self.next_id = self.next_id.wrapping_add(1);
        let distribution = match self.config.policy {
            // UDP, and an inherited datagram fd: never round robin.
            _ if request.kind == SocketKind::Datagram => Distribution::Shared,
            SchedulingPolicy::RoundRobin | SchedulingPolicy::LeastOutstanding => {
                Distribution::RoundRobin
            }
            SchedulingPolicy::Shared => Distribution::Shared,
        };
        self.by_key.insert(key.clone(), id);
        self.handles.insert(
            id,
            Handle {
                key,
                distribution,
                state: State::Binding(vec![(worker, seq)]),
                kept: None,
            },
        );
        self.out.push_back(RegistryOutput::Bind {
            handle: id,
            request,
            distribution,
        });
    }

    /// The driver finished binding `handle`: answer everyone waiting for it.
    ///
    /// Unknown handles are ignored (a bind result can only be reported once).
    pub fn bound(&mut self, handle: HandleId, result: Result<BoundAddr, Errno>) {
        let Some(h) = self.handles.get_mut(&handle) else {
            return;
        };
        let State::Binding(waiters) = &mut h.state else {
            return;
        };
        let waiters = std::mem::take(waiters);
        match result {
            Err(errno) => {
                let h = self
                    .handles
                    .remove(&handle)
                    .expect("handle looked up above");
                self.by_key.remove(&h.key);
                for (worker, seq) in waiters {
                    self.reply(worker, seq, Err(errno));
                }
            }
            Ok(addr) if waiters.is_empty() => {
                let _ = addr;
                self.forget(handle);
            }
            Ok(addr) => {
                let mode = match h.distribution {
                    Distribution::RoundRobin => Mode::RoundRobin(RoundRobin::new(
                        self.config.window,
                        self.config.max_queued,
                    )),
                    Distribution::Shared => Mode::Shared(BTreeSet::new()),
                };
                h.state = State::Bound(addr, mode);
                for (worker, seq) in waiters {
                    self.join(handle, worker, seq);
                }
            }
        }
    }

    /// Whether the driver should accept on `handle` now (round-robin handles with an active
    /// member, room in the queue, and a member under its cap).
    pub fn wants_connections(&self, handle: HandleId) -> bool {
        matches!(self.handles.get(&handle), Some(Handle { state: State::Bound(_, Mode::RoundRobin(rr)), .. }) if rr.wants_connections() && rr.has_spare(&self.loads))
    }

    /// `n` of `worker`'s connections are no longer open: it reported them ended, or gave one
    /// back. Connections wait for it again if it was at its cap. The caller checks that a worker
    /// never releases more than it was given.
    pub fn release(&mut self, worker: WorkerId, n: usize) {
        if n == 0 {
            return;
        }
        let was_full = self.loads.is_full(worker);
        self.loads.release(worker, n);
        // Only a cap holds connections back from a member with room in its window.
        if was_full {
            let ids: Vec<HandleId> = self.handles.keys().copied().collect();
            for id in ids {
                self.collect(id);
            }
        }
    }

    /// The open connections per worker, as the scheduler counts them.
    pub fn loads(&self) -> &Loads {
        &self.loads
    }

    /// The driver accepted `conn` on `handle`.
    ///
    /// # Errors
    ///
    /// Hands `conn` back when the handle does not take connections now; the driver closes it.
    pub fn connection(&mut self, handle: HandleId, conn: C) -> Result<(), C> {
        match self.handles.get_mut(&handle) {
            Some(Handle {
                state: State::Bound(_, Mode::RoundRobin(rr)),
                ..
            }) => {
                rr.push(conn)?;
                self.collect(handle);
                Ok(())
            }
            _ => Err(conn),
        }
    }

    /// `worker` gives back `conn`, a connection of `handle` it acked but did not serve. Accepted
    /// from a worker that holds the handle or is leaving (it may have closed the handle just
    /// before).
    ///
    /// # Errors
    ///
    /// Hands `conn` back when the handle has no active member, or when `worker` has nothing to do
    /// with it; the driver closes it.
    pub fn give_back(
        &mut self,
        worker: WorkerId,
        handle: HandleId,
        conn: C,
        leaving: bool,
        prefixed: bool,
    ) -> Result<(), C> {
        match self.handles.get_mut(&handle) {
            Some(Handle {
                state: State::Bound(_, Mode::RoundRobin(rr)),
                ..
            }) if leaving || rr.is_member(worker) => {
                rr.give_back(conn, prefixed)?;
                self.collect(handle);
                Ok(())
            }
            _ => Err(conn),
        }
    }

    /// `worker` answered the handoff of `conn` on `handle`.
    ///
    /// # Errors
    ///
    /// [`RegistryError`] when the connection is not in flight to that worker on that handle.
    pub fn ack(
        &mut self,
        worker: WorkerId,
        handle: HandleId,
        conn: C,
        accepted: bool,
    ) -> Result<(), RegistryError> {
        let rr = self.round_robin(worker, handle)?;
        rr.ack(worker, conn, accepted)?;
        if !accepted {
            self.loads.release(worker, 1);
        }
        self.collect(handle);
        Ok(())
    }

    /// `worker`'s listener on `handle` takes connections that carry a prefix.
    ///
    /// # Errors
    ///
    /// [`RegistryError::NotHeld`] unless `worker` listens on the round-robin `handle`.
    pub fn takes_prefixes(
        &mut self,
        worker: WorkerId,
        handle: HandleId,
    ) -> Result<(), RegistryError> {
        self.round_robin(worker, handle)?.takes_prefixes(worker)?;
        self.collect(handle);
        Ok(())
    }

    /// Whether `conn`, held on `handle`, carries a prefix.
    pub fn is_prefixed(&self, handle: HandleId, conn: C) -> bool {
        match self.handles.get(&handle).map(|h| &h.state) {
            Some(State::Bound(_, Mode::RoundRobin(rr)) | State::Closing(rr)) => {
                rr.is_prefixed(conn)
            }
            _ => false,
        }
    }

    /// `worker` has room again on `handle` after refusing a connection.
    ///
    /// # Errors
    ///
    /// [`RegistryError::NotHeld`] unless `worker` listens on the round-robin `handle`.
    pub fn ready(&mut self, worker: WorkerId, handle: HandleId) -> Result<(), RegistryError> {
        self.round_robin(worker, handle)?.ready(worker)?;
        self.collect(handle);
        Ok(())
    }

    /// `worker` closed its listener on `handle`.
    ///
    /// # Errors
    ///
    /// [`RegistryError::NotHeld`] if it does not hold the handle (closing twice is not an error).
    pub fn close(&mut self, worker: WorkerId, handle: HandleId) -> Result<(), RegistryError> {
        let not_held = RegistryError::NotHeld { worker, handle };
        let h = self.handles.get_mut(&handle).ok_or(not_held)?;
        match &mut h.state {
            State::Bound(_, Mode::RoundRobin(rr)) | State::Closing(rr) if rr.is_member(worker) => {
                rr.leave(worker)?;
            }
            State::Bound(_, Mode::Shared(members)) if members.contains(&worker) => {
                members.remove(&worker);
            }
            _ => return Err(not_held),
        }
        self.collect(handle);
        Ok(())
    }

    /// `worker` is disconnecting: it leaves every handle (keeping its in-flight connections until
    /// acked) and its pending queries are refused with `ESHUTDOWN`.
    pub fn leave_all(&mut self, worker: WorkerId) {
        let ids: Vec<HandleId> = self.handles.keys().copied().collect();
        for id in ids {
            let Some(h) = self.handles.get_mut(&id) else {
                continue;
            };
            match &mut h.state {
                State::Binding(waiters) => {
                    let (refused, kept) = std::mem::take(waiters)
                        .into_iter()
                        .partition(|(w, _)| *w == worker);
                    *waiters = kept;
                    for (_, seq) in refused {
                        self.reply(worker, seq, Err(Errno::ESHUTDOWN));
                    }
                }
                State::Bound(_, Mode::RoundRobin(rr)) | State::Closing(rr) => {
                    if rr.is_member(worker) {
                        let _ = rr.leave(worker);
                    }
                }
                State::Bound(_, Mode::Shared(members)) => {
                    members.remove(&worker);
                }
            }
            self.collect(id);
        }
    }

    /// `worker` is gone (its link closed): it leaves everything at once and its unacked
    /// connections are re-dispatched to other workers. A bound handle it was the last member of
    /// stays open for its replacement, for [`RegistryConfig::keep_for_replacement`] (a worker
    /// that closes its listener or disconnects first closes the handle as usual): new
    /// connections wait in the socket's backlog meanwhile; those already queued are closed.
    pub fn remove_worker(&mut self, now: Instant, worker: WorkerId) {
        self.loads.forget(worker);
        let ids: Vec<HandleId> = self.handles.keys().copied().collect();
        for id in ids {
            let Some(h) = self.handles.get_mut(&id) else {
                continue;
            };
            let was_member = h.is_held_by(worker);
            match &mut h.state {
                State::Binding(waiters) => waiters.retain(|(w, _)| *w != worker),
                State::Bound(_, Mode::RoundRobin(rr)) | State::Closing(rr) => rr.remove(worker),
                State::Bound(_, Mode::Shared(members)) => {
                    members.remove(&worker);
                }
            }
            if was_member && matches!(h.state, State::Bound(..)) && h.is_orphaned() {
                h.kept = Some(now + self.config.keep_for_replacement);
            }
            self.collect(id);
        }
    }

    /// Closes the handles kept open for a dead worker's replacement whose deadline is at or
    /// before `until` (`None`: all of them, for a shutdown).
    pub fn release_kept(&mut self, until: Option<Instant>) {
        let expired: Vec<HandleId> = self
            .handles
            .iter()
            .filter(|(_, h)| h.kept.is_some_and(|d| until.is_none_or(|until| d <= until)))
            .map(|(id, _)| *id)
            .collect();
        for id in expired {
            if let Some(h) = self.handles.get_mut(&id) {
                h.kept = None;
            }
            self.collect(id);
        }
    }

    /// When the next kept handle is to be released.
    pub fn next_release(&self) -> Option<Instant> {
        self.handles.values().filter_map(|h| h.kept).min()
    }

    /// Whether `worker` listens on `handle` (as an active member).
    pub fn is_held(&self, worker: WorkerId, handle: HandleId) -> bool {
        self.handles
            .get(&handle)
            .is_some_and(|h| matches!(h.state, State::Bound(..)) && h.is_held_by(worker))
    }

    /// The key and address of a bound handle.
    pub fn info(&self, handle: HandleId) -> Option<(&HandleKey, &BoundAddr)> {
        match self.handles.get(&handle) {
            Some(Handle {
                key,
                state: State::Bound(addr, _),
                ..
            }) => Some((key, addr)),
            _ => None,
        }
    }

    /// The handles the registry knows (bound, binding or closing).
    pub fn handles(&self) -> impl Iterator<Item = HandleId> + '_ {
        self.handles.keys().copied()
    }

    /// The round-robin state of `handle`, if it is one (for inspection and statistics).
    pub fn round_robin_state(&self, handle: HandleId) -> Option<&RoundRobin<C>> {
        match &self.handles.get(&handle)?.state {
            State::Bound(_, Mode::RoundRobin(rr)) | State::Closing(rr) => Some(rr),
            _ => None,
        }
    }

    /// Whether no handle is left at all.
    pub fn is_empty(&self) -> bool {
        self.handles.is_empty()
    }

    /// The next thing for the driver to do.
    #[must_use]
    pub fn poll(&mut self) -> Option<RegistryOutput<C>> {
        self.out.pop_front()
    }

    /// The key for `request` from `worker`: for port 0, at the lowest index this worker does not
    /// hold yet (a failed or closed listen frees its index: Node's PR #60141 fix).
    fn key_for(&self, worker: WorkerId, request: &ListenRequest) -> Option<HandleKey> {
        let first = HandleKey::new(request, 0)?;
        if !first.is_indexed() {
            return Some(first);
        }
        (0..=u32::MAX)
            .map(|index| HandleKey::new(request, index).expect("request was valid at index 0"))
            .find(|key| {
                !self
                    .by_key
                    .get(key)
                    .is_some_and(|id| self.handles[id].is_held_by(worker))
            })
    }

    fn join(&mut self, id: HandleId, worker: WorkerId, seq: Seq) {
        let h = self
            .handles
            .get_mut(&id)
            .expect("join is only called for known handles");
        h.kept = None;
        let addr = match &mut h.state {
            State::Binding(waiters) => return waiters.push((worker, seq)),
            State::Bound(addr, Mode::RoundRobin(rr)) => {
                rr.add(worker);
                addr.clone()
            }
            State::Bound(addr, Mode::Shared(members)) => {
                members.insert(worker);
                addr.clone()
            }
            State::Closing(_) => unreachable!("closing handles are not reachable by key"),
        };
        let info = ListenInfo {
            handle: id,
            addr,
            distribution: h.distribution,
            report_ends: h.distribution == Distribution::RoundRobin
                && self.config.counts_connections(),
        };
        self.reply(worker, seq, Ok(info));
        self.collect(id);
    }

    fn round_robin(
        &mut self,
        worker: WorkerId,
        handle: HandleId,
    ) -> Result<&mut RoundRobin<C>, RegistryError> {
        match self.handles.get_mut(&handle).map(|h| &mut h.state) {
            Some(State::Bound(_, Mode::RoundRobin(rr)) | State::Closing(rr))
                if rr.is_member(worker) =>
            {
                Ok(rr)
            }
            _ => Err(RegistryError::NotHeld { worker, handle }),
        }
    }

    fn reply(&mut self, worker: WorkerId, seq: Seq, result: Result<ListenInfo, Errno>) {
        self.out.push_back(RegistryOutput::Reply {
            worker,
            seq,
            result,
        });
    }

    /// Moves a handle's round-robin outputs to the registry's, and retires the handle when its
    /// last active member has left.
    fn collect(&mut self, id: HandleId) {
        let Some(h) = self.handles.get_mut(&id) else {
            return;
        };
        if let State::Bound(_, Mode::RoundRobin(rr)) | State::Closing(rr) = &mut h.state {
            rr.pump(&mut self.loads);
            while let Some(out) = rr.poll() {
                self.out.push_back(match out {
                    RoundRobinOutput::Close(conn) => RegistryOutput::Close(conn),
                    RoundRobinOutput::Delivered { worker, conn } => {
                        RegistryOutput::Delivered { worker, conn }
                    }
                    RoundRobinOutput::Dispatch { worker, conn } => RegistryOutput::Dispatch {
                        worker,
                        handle: id,
                        conn,
                    },
                });
            }
        }
        if h.is_orphaned() && h.kept.is_none() {
            self.forget(id);
        }
    }

    /// Closes the socket of `id` and forgets its key; keeps the round-robin state while leaving
    /// members still have connections in flight.
    fn forget(&mut self, id: HandleId) {
        let Some(h) = self.handles.remove(&id) else {
            return;
        };
        if !matches!(h.state, State::Closing(_)) {
            self.by_key.remove(&h.key);
            self.out.push_back(RegistryOutput::Unbind { handle: id });
        }
        if let State::Bound(_, Mode::RoundRobin(rr)) | State::Closing(rr) = h.state
            && !rr.is_empty()
        {
            self.handles.insert(
                id,
                Handle {
                    key: h.key,
                    distribution: h.distribution,
                    state: State::Closing(rr),
                    kept: None,
                },
            );
        }
    }
}

#[cfg(test)]
mod tests;
