//! Who may act: this JobManager's role (embedded, leader at an epoch, or
//! standby) and the fence every leader-only write checks; and the region
//! lease as the fence of checkpoint commits (`RegionFence`).
//!
//! Invariant: a write that makes something durable on behalf of a job (a
//! checkpoint manifest, the job's status in the job store) is made only
//! while [`Leadership::fence`] returns an epoch, and carries that epoch. In
//! embedded mode (`ferry local`) there is no election and the epoch is 0.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::Duration;

pub use ferry_core::api::RoleName;
use ferry_ha::{Coordination, Elector, LeaderInfo};

/// The region coordination an HA JobManager takes part in.
pub struct HaContext {
    pub backend: Arc<dyn Coordination>,
    pub region: String,
    pub member_expiry: Duration,
    /// Heartbeats that failed or timed out.
    pub heartbeat_failures: Arc<AtomicU64>,
}

/// This JobManager's standing.
pub struct Leadership {
    ha: Option<HaContext>,
    elector: OnceLock<Elector>,
    /// The leader as last seen (standbys forward writes to it).
    leader: RwLock<Option<LeaderInfo>>,
    /// Times this instance saw the leader change.
    pub leader_changes: AtomicU64,
}

impl Leadership {
    /// Embedded mode: always allowed, epoch 0.
    pub fn embedded() -> Arc<Self> {
        Arc::new(Self {
            ha: None,
            elector: OnceLock::new(),
            leader: RwLock::new(None),
            leader_changes: AtomicU64::new(0),
        })
    }

    /// HA mode: nothing is allowed until [`Leadership::set_elector`] has an
    /// elector that wins.
    pub fn ha(ctx: HaContext) -> Arc<Self> {
        Arc::new(Self {
            ha: Some(ctx),
            elector: OnceLock::new(),
            leader: RwLock::new(None),
            leader_changes: AtomicU64::new(0),
        })
    }

    /// Attaches the elector once it competes.
    pub fn set_elector(&self, e: Elector) {
        let _ = self.elector.set(e);
    }

    pub fn elector(&self) -> Option<&Elector> {
        self.elector.get()
    }

    pub fn ha_context(&self) -> Option<&HaContext> {
        self.ha.as_ref()
    }

    /// The epoch to act under, if this instance may write *now*.
    pub fn fence(&self) -> Option<ferry_core::JmEpoch> {
        match &self.ha {
            None => Some(ferry_core::JmEpoch(0)),
            Some(_) => self.elector.get().and_then(|e| e.fence()),
        }
    }

    pub fn role(&self) -> RoleName {
        match &self.ha {
            None => RoleName::Embedded,
            Some(_) if self.fence().is_some() => RoleName::Leader,
            Some(_) => RoleName::Standby,
        }
    }

    /// Records the leader as seen by the role watcher.
    pub fn set_leader(&self, leader: Option<LeaderInfo>) {
        let mut cur = self.leader.write().unwrap_or_else(|p| p.into_inner());
        let changed = match (&*cur, &leader) {
            (Some(a), Some(b)) => a.epoch != b.epoch,
            (None, Some(_)) => true,
            _ => false,
        };
        if changed {
            self.leader_changes.fetch_add(1, Ordering::Relaxed);
        }
        *cur = leader;
    }

    /// The leader as last seen.
    pub fn leader(&self) -> Option<LeaderInfo> {
        self.leader
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

/// The region lease as a commit fence. With cross-region coordination a
/// region may commit a checkpoint only while a recent read of the region
/// lease named it primary: a region cut off from the global KV stops
/// committing when its last confirmation runs out, before any standby can
/// have taken over. Without cross-region coordination it never refuses.
#[derive(Debug, Default)]
pub(crate) struct RegionFence {
    /// `None`: not fenced; `Some(None)`: fenced, never confirmed.
    until: Mutex<Option<Option<std::time::Instant>>>,
}

impl RegionFence {
    /// From now on commits need a confirmation.
    pub(crate) fn enable(&self) {
        let mut u = self.until.lock().unwrap_or_else(|p| p.into_inner());
        if u.is_none() {
            *u = Some(None);
        }
    }

    /// The region lease named this region just now: commits may go on for
    /// `valid_for`.
    pub(crate) fn confirm(&self, valid_for: std::time::Duration) {
        *self.until.lock().unwrap_or_else(|p| p.into_inner()) =
            Some(Some(std::time::Instant::now() + valid_for));
    }

    /// The region lost the lease (or was demoted): no commit until the
    /// next confirmation.
    pub(crate) fn revoke(&self) {
        let mut u = self.until.lock().unwrap_or_else(|p| p.into_inner());
        if u.is_some() {
            *u = Some(None);
        }
    }

    /// How long the fence still holds: `None` without region fencing,
    /// zero once it ran out (or was never confirmed).
    pub(crate) fn remaining(&self) -> Option<std::time::Duration> {
        match *self.until.lock().unwrap_or_else(|p| p.into_inner()) {
            None => None,
            Some(Some(t)) => Some(t.saturating_duration_since(std::time::Instant::now())),
            Some(None) => Some(std::time::Duration::ZERO),
        }
    }

    /// `Err` with the reason when a commit must not happen now.
    pub(crate) fn check(&self) -> Result<(), String> {
        match *self.until.lock().unwrap_or_else(|p| p.into_inner()) {
            None => Ok(()),
            Some(Some(t)) if std::time::Instant::now() < t => Ok(()),
            Some(_) => Err(
                "the region lease has not been confirmed recently (global KV unreachable, or another region is primary)".into(),
            ),
        }
    }
}

/// The region epoch this JobManager acts under (shared by its jobs: the
/// manifests and commits carry it). `RegionEpoch::NONE` without a region
/// lease.
#[derive(Debug, Default)]
pub(crate) struct RegionEpochCell(std::sync::atomic::AtomicU64);

impl RegionEpochCell {
    pub(crate) fn get(&self) -> ferry_core::RegionEpoch {
        ferry_core::RegionEpoch(self.0.load(Ordering::Relaxed))
    }

    pub(crate) fn set(&self, epoch: ferry_core::RegionEpoch) {
        self.0.store(epoch.0, Ordering::Relaxed);
    }
}
