//! Restart strategies: after a task failure, how long to wait before
//! restoring the job from its last checkpoint, or whether to give up.

use std::time::Duration;

use ferry_core::spec::RestartStrategy;
use rand::Rng;

/// Decides restarts for one job according to its strategy.
#[derive(Debug)]
pub struct RestartPolicy {
    strategy: RestartStrategy,
    /// Delay the next failure gets (exponential), before jitter.
    next_delay: Duration,
    /// Restarts so far (fixed attempts).
    attempts: u32,
}

/// What to do after a failure.
#[derive(Debug, PartialEq)]
pub enum Decision {
    RestartAfter(Duration),
    GiveUp(String),
}

impl RestartPolicy {
    pub fn new(strategy: RestartStrategy) -> Self {
        let next_delay = match &strategy {
            RestartStrategy::ExponentialDelay { initial_delay, .. } => initial_delay.get(),
            RestartStrategy::FixedAttempts { delay, .. } => delay.get(),
            RestartStrategy::None => Duration::ZERO,
        };
        Self {
            strategy,
            next_delay,
            attempts: 0,
        }
    }

    /// A failure happened after the job ran for `ran_for` since its last
    /// (re)start. `unit` is a random number in [0, 1) for jitter.
    pub fn on_failure(&mut self, ran_for: Duration, unit: f64) -> Decision {
        match &self.strategy {
            RestartStrategy::None => Decision::GiveUp("restart strategy is 'none'".to_string()),
            RestartStrategy::FixedAttempts { attempts, delay } => {
                if self.attempts >= *attempts {
                    Decision::GiveUp(format!(
                        "gave up after {attempts} restart attempts (restartStrategy.attempts)"
                    ))
                } else {
                    self.attempts += 1;
                    Decision::RestartAfter(delay.get())
                }
            }
            RestartStrategy::ExponentialDelay {
                initial_delay,
                max_delay,
                multiplier,
                jitter,
                reset_after,
            } => {
                if ran_for >= reset_after.get() {
                    self.next_delay = initial_delay.get();
                }
                let base = self.next_delay;
                self.next_delay = base.mul_f64(*multiplier).min(max_delay.get());
                let factor = 1.0 + jitter * (2.0 * unit - 1.0);
                Decision::RestartAfter(base.mul_f64(factor.max(0.0)).min(max_delay.get()))
            }
        }
    }

    /// Same as [`Self::on_failure`] with a random jitter.
    pub fn on_failure_random(&mut self, ran_for: Duration) -> Decision {
        let unit: f64 = rand::rng().random();
        self.on_failure(ran_for, unit)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_core::spec::DurationSpec;

    fn exp() -> RestartPolicy {
        RestartPolicy::new(RestartStrategy::ExponentialDelay {
            initial_delay: DurationSpec::from_millis(1000),
            max_delay: DurationSpec::from_millis(60_000),
            multiplier: 1.5,
            jitter: 0.1,
            reset_after: DurationSpec::from_millis(600_000),
        })
    }

    #[test]
    fn exponential_delays_grow_cap_and_reset() {
        let mut p = exp();
        let short = Duration::from_secs(1);
        // unit 0.5 means no jitter.
        let delays: Vec<u128> = (0..12)
            .map(|_| match p.on_failure(short, 0.5) {
                Decision::RestartAfter(d) => d.as_millis(),
                d => panic!("{d:?}"),
            })
            .collect();
        assert_eq!(&delays[..5], &[1000, 1500, 2250, 3375, 5062]);
        assert_eq!(*delays.last().unwrap(), 60_000);
        // A stable period resets the delay.
        assert_eq!(
            p.on_failure(Duration::from_secs(601), 0.5),
            Decision::RestartAfter(Duration::from_millis(1000))
        );
        // Jitter stays within ±10 %.
        for u in [0.0, 0.99] {
            let mut q = exp();
            let Decision::RestartAfter(d) = q.on_failure(short, u) else {
                panic!()
            };
            assert!((900..=1100).contains(&d.as_millis()), "{d:?}");
        }
    }

    #[test]
    fn fixed_attempts_give_up() {
        let mut p = RestartPolicy::new(RestartStrategy::FixedAttempts {
            attempts: 2,
            delay: DurationSpec::from_millis(10),
        });
        let z = Duration::ZERO;
        assert_eq!(
            p.on_failure(z, 0.0),
            Decision::RestartAfter(Duration::from_millis(10))
        );
        assert_eq!(
            p.on_failure(z, 0.0),
            Decision::RestartAfter(Duration::from_millis(10))
        );
        assert!(matches!(p.on_failure(z, 0.0), Decision::GiveUp(_)));
        let mut n = RestartPolicy::new(RestartStrategy::None);
        assert!(matches!(n.on_failure(z, 0.0), Decision::GiveUp(_)));
    }
}
