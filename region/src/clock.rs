//! Silence measured on this process's own monotonic clock.
//!
//! A KV entry's timestamp is the writing server's wall clock; subtracting
//! it from this host's wall clock mixes two clocks, and a host whose clock
//! runs ahead would see every other region silent (a false failover) while
//! one running behind would delay a real one. Instead, [`Unchanged`]
//! remembers when this process first saw each key's current revision: a
//! key has been silent for as long as no newer revision arrived here.
//!
//! Invariant: a key seen for the first time counts as just written, so a
//! process that starts next to a dead writer waits a full timeout before
//! calling it silent — never less.

use std::collections::HashMap;
use std::time::Duration;

use tokio::time::Instant;

/// When each key's current revision was first seen.
#[derive(Debug, Default)]
pub struct Unchanged {
    seen: HashMap<String, (u64, Instant)>,
}

impl Unchanged {
    pub fn new() -> Self {
        Self::default()
    }

    /// Records that `key` has `revision` now; returns how long it has had
    /// it, on this process's clock.
    pub fn observe(&mut self, key: &str, revision: u64) -> Duration {
        let now = Instant::now();
        match self.seen.get_mut(key) {
            // An older revision (a lagging replica's listing after a watch
            // delivered the newer one) is no news.
            Some((r, since)) if *r >= revision => now.saturating_duration_since(*since),
            Some(slot) => {
                *slot = (revision, now);
                Duration::ZERO
            }
            None => {
                self.seen.insert(key.to_string(), (revision, now));
                Duration::ZERO
            }
        }
    }

    /// How long `key` has had the revision last observed, without a new
    /// observation (`None`: never seen, or forgotten).
    pub fn age(&self, key: &str) -> Option<Duration> {
        self.seen
            .get(key)
            .map(|(_, since)| Instant::now().saturating_duration_since(*since))
    }

    /// Every key's silence starts again now: this process could not see
    /// (its own reads and writes failed), so what it missed meanwhile is
    /// no evidence of anyone's silence.
    pub fn restart_all(&mut self) {
        let now = Instant::now();
        for (_, since) in self.seen.values_mut() {
            *since = now;
        }
    }

    /// The key is gone (deleted or expired): forget it.
    pub fn forget(&mut self, key: &str) {
        self.seen.remove(key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn silence_counts_from_the_first_sight_of_a_revision() {
        let mut u = Unchanged::new();
        assert_eq!(u.observe("k", 5), Duration::ZERO);
        tokio::time::advance(Duration::from_secs(3)).await;
        assert_eq!(u.observe("k", 5), Duration::from_secs(3));
        // A new revision resets it; an older one is no news.
        assert_eq!(u.observe("k", 6), Duration::ZERO);
        tokio::time::advance(Duration::from_millis(200)).await;
        assert_eq!(u.observe("k", 5), Duration::from_millis(200));
        tokio::time::advance(Duration::from_millis(300)).await;
        assert_eq!(u.age("k"), Some(Duration::from_millis(500)));
        u.restart_all();
        assert_eq!(u.age("k"), Some(Duration::ZERO));
        u.forget("k");
        assert_eq!(u.age("k"), None);
        assert_eq!(u.observe("k", 6), Duration::ZERO);
    }
}
