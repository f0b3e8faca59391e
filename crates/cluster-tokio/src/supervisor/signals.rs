//! The signals a supervisor owns, and what each one asks for.

use tokio::signal::unix::{Signal, SignalKind, signal};

use super::SupervisorError;

/// What a signal to the primary asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Asked {
    /// SIGTERM: drain every worker within the disconnect timeout.
    Terminate,
    /// SIGQUIT (nginx's "graceful stop", sent out of habit): as SIGTERM.
    Quit,
    /// SIGINT (Ctrl-C): drain within 5 s at most.
    Interrupt,
    /// SIGHUP when the terminal this primary runs in the foreground of closed: as SIGTERM.
    TerminalClosed,
    /// SIGHUP otherwise: a rolling reload.
    Reload,
    /// SIGTTIN, SIGTTOU: one worker more, or fewer.
    Scale { more: bool },
    /// SIGUSR1 (logrotate's "reopen your logs"): passed on to every worker, as an init passes
    /// on what it does not handle; a worker's runtime survives it, and its code may listen.
    Forward(i32),
    /// SIGUSR2 (nginx's and gunicorn's "upgrade"): nothing does that here yet; ignored with a
    /// warning rather than killing the service.
    Ignored(&'static str),
}

/// The supervisor's signal handlers, installed once.
pub(super) struct Signals {
    terminate: Signal,
    interrupt: Signal,
    hangup: Signal,
    more: Signal,
    fewer: Signal,
    quit: Signal,
    user1: Signal,
    user2: Signal,
    /// Whether this primary runs in the foreground of a terminal: its SIGHUP may be the
    /// terminal's hangup (asked before our handler replaces an inherited `nohup`).
    in_terminal: bool,
}

impl Signals {
    pub(super) fn install() -> Result<Self, SupervisorError> {
        let in_terminal = crate::sys::in_foreground_of_terminal();
        let install = |kind| signal(kind).map_err(SupervisorError::Signals);
        Ok(Self {
            terminate: install(SignalKind::terminate())?,
            interrupt: install(SignalKind::interrupt())?,
            hangup: install(SignalKind::hangup())?,
            more: install(SignalKind::from_raw(libc::SIGTTIN))?,
            fewer: install(SignalKind::from_raw(libc::SIGTTOU))?,
            quit: install(SignalKind::quit())?,
            user1: install(SignalKind::user_defined1())?,
            user2: install(SignalKind::user_defined2())?,
            in_terminal,
        })
    }

    /// The next signal that came.
    pub(super) async fn recv(&mut self) -> Asked {
        tokio::select! {
            biased;
            _ = self.terminate.recv() => Asked::Terminate,
            _ = self.interrupt.recv() => Asked::Interrupt,
            _ = self.hangup.recv() => {
                if self.in_terminal && !crate::sys::has_controlling_terminal() {
                    Asked::TerminalClosed
                } else {
                    Asked::Reload
                }
            }
            _ = self.quit.recv() => Asked::Quit,
            _ = self.more.recv() => Asked::Scale { more: true },
            _ = self.fewer.recv() => Asked::Scale { more: false },
            _ = self.user1.recv() => Asked::Forward(libc::SIGUSR1),
            _ = self.user2.recv() => Asked::Ignored("SIGUSR2"),
        }
    }
}
