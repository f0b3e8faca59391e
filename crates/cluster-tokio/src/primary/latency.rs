//! How long accepted connections wait in the primary before they are handed to a worker.

use std::time::Duration;

/// Upper bounds of the buckets of [`HandoffLatency`], in microseconds; a last bucket holds the
/// rest.
const BOUNDS_US: [u64; 13] = [
    25, 50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000,
];

/// A histogram of handoff latency: from the moment the primary accepted a connection to the
/// moment its fd was in the chosen worker's link (round robin only; a connection handed over
/// again after a refusal counts once, for its first handoff). It is where a busy primary or
/// full workers show: the worker's acknowledgement comes later, batched, and is not part of it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HandoffLatency {
    /// One count per bucket of `BOUNDS_US`, then the rest.
    counts: [u64; BOUNDS_US.len() + 1],
    sum: Duration,
}

impl HandoffLatency {
    pub(crate) fn observe(&mut self, latency: Duration) {
        let micros = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
        let bucket = BOUNDS_US
            .iter()
            .position(|bound| micros <= *bound)
            .unwrap_or(BOUNDS_US.len());
        self.counts[bucket] += 1;
        self.sum = self.sum.saturating_add(latency);
    }

    /// The buckets, each with its upper bound (`None`: no bound, the last) and how many
    /// handoffs fell in it, not counting the buckets before (not cumulative).
    pub fn buckets(&self) -> impl Iterator<Item = (Option<Duration>, u64)> + '_ {
        BOUNDS_US
            .iter()
            .map(|us| Some(Duration::from_micros(*us)))
            .chain([None])
            .zip(self.counts.iter().copied())
    }

    /// How many handoffs were measured.
    pub fn count(&self) -> u64 {
        self.counts.iter().sum()
    }

    /// Their latencies added up.
    pub fn sum(&self) -> Duration {
        self.sum
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_latency_lands_in_the_first_bucket_that_holds_it() {
        let mut h = HandoffLatency::default();
        for us in [10, 25, 26, 999, 1_000, 300_000] {
            h.observe(Duration::from_micros(us));
        }
        let counts: Vec<u64> = h.buckets().map(|(_, n)| n).collect();
        assert_eq!(counts, [2, 1, 0, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0, 1]);
        assert_eq!(h.count(), 6);
        assert_eq!(
            h.sum(),
            Duration::from_micros(10 + 25 + 26 + 999 + 1_000 + 300_000)
        );
        assert_eq!(h.buckets().last(), Some((None, 1)));
    }
}
