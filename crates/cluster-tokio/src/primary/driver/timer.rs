//! The core's deadlines: a timer fd of the driver's own, or a tokio timer when there is none.

use std::future::Future;
use std::pin::Pin;
use std::task::Context;
use std::time::Duration;

use tokio::time::Sleep;

use super::super::alarm::Alarm;
use super::{Driver, now};

/// How the driver waits for its next deadline.
pub(super) enum Timer {
    /// Not needed yet (the timer fd is made on the first deadline, inside the runtime).
    Unset,
    /// A timer fd of the driver's own (see [`Alarm`]).
    Alarm(Alarm),
    /// The fallback when no timer fd can be had.
    Sleep(Pin<Box<Sleep>>),
}

impl Timer {
    /// The fallback; `poll_timer` sets it for its deadline before polling it.
    pub(super) fn sleep() -> Self {
        Self::Sleep(Box::pin(tokio::time::sleep(Duration::ZERO)))
    }
}

impl Driver {
    pub(super) fn poll_timer(&mut self, cx: &mut Context<'_>) -> bool {
        let deadline = [self.core.poll_timeout(), self.accept_resume]
            .into_iter()
            .flatten()
            .min();
        let Some(deadline) = deadline else {
            return false;
        };
        if now() >= deadline {
            self.core.handle_timeout(now());
            self.drain_core();
            return true;
        }
        if let Timer::Unset = self.timer {
            self.timer = match Alarm::new() {
                Ok(alarm) => Timer::Alarm(alarm),
                Err(error) => {
                    tracing::debug!(%error, "no timer fd; deadlines use a tokio timer");
                    Timer::sleep()
                }
            };
        }
        match &mut self.timer {
            Timer::Alarm(alarm) => match alarm.poll_ring(cx, deadline) {
                // Rang early (the deadline moved later): set it again on the next turn.
                Ok(rang) => rang,
                Err(error) => {
                    tracing::debug!(%error, "timer fd failed; deadlines use a tokio timer");
                    self.timer = Timer::sleep();
                    true
                }
            },
            Timer::Sleep(sleep) => {
                let deadline = tokio::time::Instant::from_std(deadline);
                if sleep.deadline() != deadline {
                    sleep.as_mut().reset(deadline);
                }
                // Registers the waker; the clock comparison above decides (a Sleep may be held
                // back by the cooperative budget).
                let _ = sleep.as_mut().poll(cx);
                false
            }
            Timer::Unset => false,
        }
    }
}
