//! `Signal`: the signals the primary sends its workers, without a raw libc number in the API.

use std::fmt;

/// A Unix signal to send a worker ([`WorkerHandle::kill`](super::WorkerHandle::kill)).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Signal(i32);

impl Signal {
    /// `SIGHUP`.
    pub const HUP: Self = Self(libc::SIGHUP);
    /// `SIGINT`.
    pub const INT: Self = Self(libc::SIGINT);
    /// `SIGQUIT`.
    pub const QUIT: Self = Self(libc::SIGQUIT);
    /// `SIGKILL`: ends the process at once.
    pub const KILL: Self = Self(libc::SIGKILL);
    /// `SIGUSR1`.
    pub const USR1: Self = Self(libc::SIGUSR1);
    /// `SIGUSR2`.
    pub const USR2: Self = Self(libc::SIGUSR2);
    /// `SIGTERM`: asks the process to end.
    pub const TERM: Self = Self(libc::SIGTERM);
    /// `SIGCONT`: resumes a stopped process.
    pub const CONT: Self = Self(libc::SIGCONT);
    /// `SIGSTOP`: stops the process until `SIGCONT`.
    pub const STOP: Self = Self(libc::SIGSTOP);

    /// Any other signal by its number, if it is one (1 to `SIGRTMAX`).
    pub fn from_raw(number: i32) -> Option<Self> {
        (1..=libc::SIGRTMAX())
            .contains(&number)
            .then_some(Self(number))
    }

    /// Its number.
    pub const fn as_raw(self) -> i32 {
        self.0
    }
}

impl fmt::Debug for Signal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl fmt::Display for Signal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = match self.0 {
            libc::SIGHUP => "SIGHUP",
            libc::SIGINT => "SIGINT",
            libc::SIGQUIT => "SIGQUIT",
            libc::SIGKILL => "SIGKILL",
            libc::SIGUSR1 => "SIGUSR1",
            libc::SIGUSR2 => "SIGUSR2",
            libc::SIGTERM => "SIGTERM",
            libc::SIGCONT => "SIGCONT",
            libc::SIGSTOP => "SIGSTOP",
            other => return write!(f, "signal {other}"),
        };
        f.write_str(name)
    }
}

#[cfg(test)]
mod tests {
    use super::Signal;

    #[test]
    fn only_real_signal_numbers_are_signals() {
        assert_eq!(Signal::from_raw(9), Some(Signal::KILL));
        assert_eq!(Signal::from_raw(0), None);
        assert_eq!(Signal::from_raw(-9), None);
        assert_eq!(Signal::from_raw(1000), None);
        assert_eq!(Signal::TERM.to_string(), "SIGTERM");
    }
}
