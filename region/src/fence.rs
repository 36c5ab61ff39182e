//! The write fence of replication: a region writes into another region's
//! store only while it holds the primary role with a confirmed region
//! lease.
//!
//! A region that lost the role (its lease ran out, it was cut off, its
//! leader stepped down) may still have copies under way, retrying through
//! a store outage. Without a fence such a copy lands after a standby has
//! been promoted and restored, in the new primary's own store: a manifest
//! of the old region epoch numbered above the new primary's checkpoints,
//! which a later restore there would take for the newest.
//!
//! The coordinator opens the fence until half the region timeout after
//! each lease renewal it sends (as long as the TaskManagers' region fence
//! lasts) and closes it when the region leaves the primary role (a
//! drill's dark primary, playing a region that just died, lets it run
//! out instead, as a real one's copies under way would). Every
//! write of a copy checks the fence first, and every write a restore sees
//! — a manifest, a deletion, an archive, a spec or status — must also
//! finish before the fence expires. A standby takes over only once the
//! primary has been silent for the whole timeout, so such a write lands
//! after a promotion only if the network held it back for more than half
//! the timeout; and a restore skips a manifest whose region epoch is older
//! than that of a lower-numbered snapshot (see
//! `ferry_core::manifest::find_restorable_checked`).

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use crate::ReplicationError;

/// Whether (and until when) this process may write into other regions'
/// stores. Clones share one fence.
#[derive(Clone, Debug)]
pub struct WriteFence(Option<Arc<Mutex<Fence>>>);

#[derive(Debug, Default)]
struct Fence {
    until: Option<Instant>,
    /// Times the fence opened after being closed or expired.
    term: u64,
}

impl WriteFence {
    /// No fence: every write goes (an operator's one-off copy).
    pub fn unfenced() -> Self {
        Self(None)
    }

    /// A fence that is closed until [`WriteFence::open_until`].
    pub fn closed() -> Self {
        Self(Some(Arc::new(Mutex::new(Fence::default()))))
    }

    fn lock(f: &Mutex<Fence>) -> std::sync::MutexGuard<'_, Fence> {
        f.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Writes may go until `until` (a later renewal moves it on).
    pub fn open_until(&self, until: Instant) {
        if let Some(f) = &self.0 {
            let mut f = Self::lock(f);
            if f.until.is_none_or(|u| u <= Instant::now()) {
                f.term += 1;
            }
            f.until = Some(until);
        }
    }

    /// No write goes until the fence is opened again.
    pub fn close(&self) {
        if let Some(f) = &self.0 {
            Self::lock(f).until = None;
        }
    }

    /// Which uninterrupted opening of the fence this is: it changes
    /// whenever the fence opens again after it was closed or had expired
    /// (the region may have lost the primary role in between, and another
    /// region may have written into the standbys' stores). Unfenced: 0.
    /// What a replicator learned about a standby's store holds only within
    /// one term.
    pub fn term(&self) -> u64 {
        match &self.0 {
            None => 0,
            Some(f) => Self::lock(f).term,
        }
    }

    /// How long writes may still go: `None` unfenced, zero when closed or
    /// expired.
    pub fn remaining(&self) -> Option<Duration> {
        let f = self.0.as_ref()?;
        let until = Self::lock(f).until;
        Some(until.map_or(Duration::ZERO, |u| {
            u.saturating_duration_since(Instant::now())
        }))
    }

    /// True when a write may start now.
    pub fn is_open(&self) -> bool {
        self.remaining().is_none_or(|r| !r.is_zero())
    }

    /// Fails unless a write may start now. For the writes a restore does
    /// not see by themselves — a checkpoint's data files, which count only
    /// once its manifest lists them — and may take long (a large state
    /// file): they start only while the fence is open, but may finish
    /// after it expires.
    pub fn check(&self, what: &str) -> Result<(), ReplicationError> {
        if self.is_open() {
            Ok(())
        } else {
            Err(ReplicationError::Fenced {
                what: what.to_string(),
            })
        }
    }

    /// Runs the write `op` (to `what`) if the fence is open, and only until
    /// it expires: for every write that changes what a restore finds — a
    /// manifest, a deletion, an archived divergence, a job's spec or
    /// status.
    pub async fn write<T, F>(&self, what: &str, op: F) -> Result<T, ReplicationError>
    where
        F: Future<Output = Result<T, ferry_core::CoreError>>,
    {
        match self.remaining() {
            None => Ok(op.await?),
            Some(r) if r.is_zero() => Err(ReplicationError::Fenced {
                what: what.to_string(),
            }),
            Some(r) => match tokio::time::timeout(r, op).await {
                Ok(done) => Ok(done?),
                Err(_) => Err(ReplicationError::Fenced {
                    what: what.to_string(),
                }),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_write_goes_only_while_the_fence_is_open_and_not_past_it() {
        let f = WriteFence::closed();
        let ok = || async { Ok::<_, ferry_core::CoreError>(7) };
        assert!(!f.is_open());
        assert!(matches!(
            f.write("x", ok()).await,
            Err(ReplicationError::Fenced { .. })
        ));
        assert!(f.check("x").is_err());
        f.open_until(Instant::now() + Duration::from_secs(2));
        assert!(f.is_open() && f.check("x").is_ok());
        assert_eq!(f.write("x", ok()).await.unwrap(), 7);
        // A write still under way when the fence expires is abandoned.
        let slow = async {
            tokio::time::sleep(Duration::from_secs(3)).await;
            Ok::<_, ferry_core::CoreError>(1)
        };
        assert!(matches!(
            f.write("slow", slow).await,
            Err(ReplicationError::Fenced { what }) if what == "slow"
        ));
        assert!(!f.is_open(), "expired");
        f.open_until(Instant::now() + Duration::from_secs(2));
        f.close();
        assert!(!f.is_open());
        // Clones share the fence; an unfenced one always writes.
        let g = f.clone();
        f.open_until(Instant::now() + Duration::from_secs(1));
        assert!(g.is_open());
        let u = WriteFence::unfenced();
        assert!(u.is_open() && u.remaining().is_none());
        assert_eq!(u.write("x", ok()).await.unwrap(), 7);
    }

    #[tokio::test(start_paused = true)]
    async fn the_term_changes_only_when_the_fence_opens_after_a_gap() {
        let f = WriteFence::closed();
        let t0 = f.term();
        f.open_until(Instant::now() + Duration::from_secs(2));
        let t1 = f.term();
        assert_ne!(t0, t1, "opened");
        // Renewed in time: the same term.
        tokio::time::advance(Duration::from_secs(1)).await;
        f.open_until(Instant::now() + Duration::from_secs(2));
        assert_eq!(f.term(), t1);
        // Ran out, then renewed: a new term.
        tokio::time::advance(Duration::from_secs(3)).await;
        f.open_until(Instant::now() + Duration::from_secs(2));
        let t2 = f.term();
        assert_ne!(t2, t1);
        // Closed, then opened: a new term.
        f.close();
        f.open_until(Instant::now() + Duration::from_secs(2));
        assert_ne!(f.term(), t2);
        assert_eq!(WriteFence::unfenced().term(), 0);
    }
}
