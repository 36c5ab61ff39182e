//! A rate limit shared by the paced file source and the paced blackhole
//! sink: at most `per_second` records per second on average since the
//! limit started.

use std::time::{Duration, Instant};

/// Records taken so far against a rate.
#[derive(Debug)]
pub struct Pace {
    per_second: u64,
    start: Instant,
    taken: u64,
}

impl Pace {
    /// A pace of `per_second` (at least 1) starting now.
    pub fn new(per_second: u64) -> Self {
        Self {
            per_second: per_second.max(1),
            start: Instant::now(),
            taken: 0,
        }
    }

    /// Counts `records` as taken.
    pub fn take(&mut self, records: usize) {
        self.taken += records as u64;
    }

    /// When the rate has caught up with everything taken so far.
    pub fn due(&self) -> Instant {
        self.start + Duration::from_secs_f64(self.taken as f64 / self.per_second as f64)
    }

    /// How long to wait before taking more (zero when the rate is ahead).
    pub fn wait(&self) -> Duration {
        self.due().saturating_duration_since(Instant::now())
    }

    /// Records in about 10 ms at this rate, between 1 and `max`: batches
    /// that small keep a paced stream steady instead of bursting.
    pub fn batch(&self, max: usize) -> usize {
        ((self.per_second / 100) as usize).clamp(1, max)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_wait_grows_with_what_was_taken_and_batches_are_about_10_ms() {
        let mut p = Pace::new(1000);
        assert_eq!(p.batch(4096), 10);
        assert_eq!(Pace::new(10).batch(4096), 1);
        assert_eq!(Pace::new(10_000_000).batch(4096), 4096);
        p.take(500);
        let w = p.wait();
        assert!(
            w > Duration::from_millis(400) && w <= Duration::from_millis(500),
            "{w:?}"
        );
        assert_eq!(
            Pace::new(0).batch(8),
            1,
            "a zero rate is one record per second"
        );
    }
}
