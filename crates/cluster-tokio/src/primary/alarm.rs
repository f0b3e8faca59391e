//! The driver's deadlines (handoff acks, heartbeats, the accept pause) on a timer fd of its own.
//!
//! While any tokio timer is armed, the runtime parks with a timeout and runs its timer wheel on
//! every wakeup, and the driver's earliest deadline moves on nearly every handoff (it is the
//! oldest unacked handoff's). With a tokio `Sleep` that cost about 0.7 µs per handoff under churn
//! (paired runs). The alarm is set again only when a deadline comes earlier than the one it is set
//! for; a later deadline lets it ring early, and the driver checks the clock and sets it again: a
//! few syscalls per handoff timeout period, not per handoff.

use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::task::{Context, Poll};
use std::time::Instant;

use tokio::io::Interest;
use tokio::io::unix::AsyncFd;

use crate::sys;

pub(super) struct Alarm {
    timer: AsyncFd<OwnedFd>,
    /// When the timer is set to expire; `None` once its expiry was read.
    set_for: Option<Instant>,
}

impl Alarm {
    pub(super) fn new() -> io::Result<Self> {
        Ok(Self {
            timer: sys::register(sys::timer()?, Interest::READABLE)?,
            set_for: None,
        })
    }

    /// Makes the alarm ring at `deadline` or before, and `cx` woken when it does. `Ok(true)`: it
    /// rang (maybe early); the caller checks the clock and calls again.
    pub(super) fn poll_ring(
        &mut self,
        cx: &mut Context<'_>,
        deadline: Instant,
    ) -> io::Result<bool> {
        if self.set_for.is_none_or(|set_for| deadline < set_for) {
            let after = deadline.saturating_duration_since(Instant::now());
            sys::arm_timer(self.timer.get_ref().as_fd(), after)?;
            self.set_for = Some(deadline);
        }
        loop {
            let mut ready = match self.timer.poll_read_ready(cx) {
                Poll::Pending => return Ok(false),
                Poll::Ready(ready) => ready?,
            };
            // Not expired (readiness was stale): cleared, poll again to wait.
            if let Ok(read) = ready.try_io(|timer| sys::read_timer(timer.get_ref().as_fd())) {
                read?;
                self.set_for = None;
                return Ok(true);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    /// Waits until `alarm` rings for `deadline`; returns when.
    async fn ring(alarm: &mut Alarm, deadline: Instant) -> Instant {
        std::future::poll_fn(|cx| match alarm.poll_ring(cx, deadline) {
            Ok(true) => Poll::Ready(Instant::now()),
            Ok(false) => Poll::Pending,
            Err(e) => panic!("{e}"),
        })
        .await
    }

    /// It rings at the deadline; set for a later deadline while armed, it rings at the earlier
    /// one; set for an earlier one, it rings then, not at the later one.
    #[tokio::test]
    async fn rings_by_the_earliest_deadline_asked() {
        let mut alarm = Alarm::new().unwrap();
        let start = Instant::now();

        let rang = tokio::time::timeout(
            Duration::from_secs(5),
            ring(&mut alarm, start + Duration::from_millis(20)),
        )
        .await
        .unwrap();
        assert!(rang >= start + Duration::from_millis(20));

        // Armed for +50 ms, then asked for +10 s: it still rings at +50 ms (early, by design).
        let start = Instant::now();
        let mut cx = Context::from_waker(std::task::Waker::noop());
        assert!(
            !alarm
                .poll_ring(&mut cx, start + Duration::from_millis(50))
                .unwrap()
        );
        let rang = tokio::time::timeout(
            Duration::from_secs(5),
            ring(&mut alarm, start + Duration::from_secs(10)),
        )
        .await
        .unwrap();
        assert!(rang >= start + Duration::from_millis(50));
        assert!(rang < start + Duration::from_secs(5));

        // Armed for +10 s, then asked for +30 ms: it rings at +30 ms.
        let start = Instant::now();
        assert!(
            !alarm
                .poll_ring(&mut cx, start + Duration::from_secs(10))
                .unwrap()
        );
        let rang = tokio::time::timeout(
            Duration::from_secs(5),
            ring(&mut alarm, start + Duration::from_millis(30)),
        )
        .await
        .unwrap();
        assert!(rang >= start + Duration::from_millis(30));
    }
}
