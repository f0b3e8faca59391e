//! A worker's lifecycle as the primary sees it (Node's `worker.state`).
//!
//! ```text
//!  None ──Online──▶ Online ──Listening──▶ Listening
//!    │                 │                      │
//!    └─────────────────┴──── link closed ─────┴──▶ Disconnected ──exit──▶ Dead
//! ```
//!
//! Events follow Node's order: `Disconnect` always comes before `Exit`. When the process exit is
//! seen first (the driver's `wait` can beat the IPC reader to it), `Exit` is held back until the
//! link closes. `exited_after_disconnect` is unset until the first disconnect or exit, then a
//! boolean; it is true only when the primary asked the worker to disconnect or the worker left
//! on purpose (a primary `kill` is just a signal and leaves it false, as in Node ≥ 15).

use std::fmt;

/// Where a worker is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum WorkerState {
    /// Spawned; its runtime has not said `Online` yet.
    None,
    /// Its runtime is up and the handshake is done.
    Online,
    /// It listens on at least one handle.
    Listening,
    /// Its link is closed.
    Disconnected,
    /// Its link is closed and its process has exited.
    Dead,
}

impl fmt::Display for WorkerState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::None => "none",
            Self::Online => "online",
            Self::Listening => "listening",
            Self::Disconnected => "disconnected",
            Self::Dead => "dead",
        })
    }
}

/// How a worker process ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ExitStatus {
    /// It exited with this code.
    Code(i32),
    /// It was killed by this signal.
    Signal(i32),
}

impl fmt::Display for ExitStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Code(code) => write!(f, "exit code {code}"),
            Self::Signal(signal) => write!(f, "signal {signal}"),
        }
    }
}

/// Why the primary or the supervisor killed a worker.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum KillReason {
    /// It did not listen within the boot deadline.
    BootTimeout,
    /// It did not ack a handed-off connection in time.
    HandoffTimeout,
    /// Asked to disconnect, it was still there at the deadline the primary gave it (still
    /// serving its connections, or stuck).
    DisconnectTimeout,
    /// Its runtime sent no heartbeat (nor anything else) in time: it is hung.
    HeartbeatTimeout,
    /// It broke the protocol (the `Event::Error` before its exit says which rule): whatever
    /// it holds is not to be trusted, and the connections it took are freed with it.
    ProtocolViolation,
}

impl fmt::Display for KillReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::BootTimeout => "did not listen within the boot deadline",
            Self::HandoffTimeout => "did not ack a connection in time",
            Self::DisconnectTimeout => "did not exit within the disconnect timeout",
            Self::HeartbeatTimeout => "missed its heartbeats (hung runtime)",
            Self::ProtocolViolation => "broke the protocol",
        })
    }
}

/// A lifecycle transition the primary reports as an event.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transition {
    /// The link closed.
    Disconnect,
    /// The process is gone and its link closed.
    Exit {
        /// How it ended.
        status: ExitStatus,
        /// Whether it left on purpose.
        exited_after_disconnect: bool,
    },
}

/// The state machine of one worker.
#[derive(Clone, Debug)]
pub struct Lifecycle {
    state: WorkerState,
    exited_after_disconnect: Option<bool>,
    exit: Option<ExitStatus>,
}

impl Default for Lifecycle {
    fn default() -> Self {
        Self::new()
    }
}

impl Lifecycle {
    /// A just-spawned worker.
    pub fn new() -> Self {
        Self {
            state: WorkerState::None,
            exited_after_disconnect: None,
            exit: None,
        }
    }

    /// The current state.
    pub fn state(&self) -> WorkerState {
        self.state
    }

    /// `None` until the first disconnect or exit, then whether the worker left on purpose.
    pub fn exited_after_disconnect(&self) -> Option<bool> {
        self.exited_after_disconnect
    }

    /// The exit status, once the process has exited.
    pub fn exit_status(&self) -> Option<ExitStatus> {
        self.exit
    }

    /// Whether the link is closed.
    pub fn is_disconnected(&self) -> bool {
        self.state >= WorkerState::Disconnected
    }

    /// Whether both the link is closed and the process has exited.
    pub fn is_dead(&self) -> bool {
        self.state == WorkerState::Dead
    }

    /// The handshake arrived. Returns whether this changed the state.
    pub fn online(&mut self) -> bool {
        let changed = self.state == WorkerState::None;
        if changed {
            self.state = WorkerState::Online;
        }
        changed
    }

    /// The worker reported a listener ready. Returns whether the worker is now `Listening`.
    pub fn listening(&mut self) -> bool {
        if matches!(self.state, WorkerState::Online | WorkerState::Listening) {
            self.state = WorkerState::Listening;
        }
        self.state == WorkerState::Listening
    }

    /// The primary asked it to disconnect, or it announced it is leaving.
    pub fn leaving_on_purpose(&mut self) {
        self.exited_after_disconnect = Some(true);
    }

    /// The link closed. Returns the transitions to report, in order (none if already closed).
    pub fn link_closed(&mut self) -> impl Iterator<Item = Transition> + use<> {
        let mut out = Vec::new();
        if !self.is_disconnected() {
            self.state = WorkerState::Disconnected;
            let on_purpose = *self.exited_after_disconnect.get_or_insert(false);
            out.push(Transition::Disconnect);
            if let Some(status) = self.exit {
                self.state = WorkerState::Dead;
                out.push(Transition::Exit {
                    status,
                    exited_after_disconnect: on_purpose,
                });
            }
        }
        out.into_iter()
    }

    /// The process exited. Returns `Exit` if the link is already closed; otherwise it is held
    /// back until [`Self::link_closed`]. A second exit is ignored.
    pub fn exited(&mut self, status: ExitStatus) -> Option<Transition> {
        if self.exit.is_some() {
            return None;
        }
        self.exit = Some(status);
        let on_purpose = *self.exited_after_disconnect.get_or_insert(false);
        if self.state == WorkerState::Disconnected {
            self.state = WorkerState::Dead;
            return Some(Transition::Exit {
                status,
                exited_after_disconnect: on_purpose,
            });
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normal_life_in_node_order() {
        let mut l = Lifecycle::new();
        assert_eq!(l.state(), WorkerState::None);
        assert!(!l.listening(), "cannot listen before online");
        assert!(l.online());
        assert!(!l.online());
        assert!(l.listening());
        assert_eq!(l.exited_after_disconnect(), None);
        assert_eq!(
            l.link_closed().collect::<Vec<_>>(),
            [Transition::Disconnect]
        );
        assert_eq!(l.state(), WorkerState::Disconnected);
        assert_eq!(l.exited_after_disconnect(), Some(false));
        assert_eq!(
            l.exited(ExitStatus::Code(42)),
            Some(Transition::Exit {
                status: ExitStatus::Code(42),
                exited_after_disconnect: false
            })
        );
        assert!(l.is_dead());
    }

    #[test]
    fn exit_seen_first_is_held_until_disconnect() {
        let mut l = Lifecycle::new();
        l.online();
        l.leaving_on_purpose();
        assert_eq!(l.exited(ExitStatus::Code(0)), None);
        assert_eq!(l.state(), WorkerState::Online);
        assert_eq!(
            l.link_closed().collect::<Vec<_>>(),
            [
                Transition::Disconnect,
                Transition::Exit {
                    status: ExitStatus::Code(0),
                    exited_after_disconnect: true
                }
            ]
        );
        assert_eq!(l.link_closed().count(), 0, "exactly one disconnect");
        assert_eq!(l.exited(ExitStatus::Signal(9)), None, "exactly one exit");
    }

    #[test]
    fn killed_before_online_still_disconnects_then_exits() {
        let mut l = Lifecycle::new();
        assert_eq!(
            l.link_closed().collect::<Vec<_>>(),
            [Transition::Disconnect]
        );
        assert!(!l.online(), "no online after disconnect");
        assert_eq!(
            l.exited(ExitStatus::Signal(9)),
            Some(Transition::Exit {
                status: ExitStatus::Signal(9),
                exited_after_disconnect: false
            })
        );
    }
}
