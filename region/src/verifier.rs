//! Continuous restore verification in a standby region: its leader
//! test-restores every checkpoint replicated into its store once (hashes
//! plus decoding all state, [`crate::verify`]) and keeps, per job, the
//! newest one that verified. That is what the region can promise to
//! restore: it goes into the region's heartbeat, `/v1/regions`, and ranks
//! the standbys when the primary goes silent.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ferry_core::JobId;
use ferry_core::api::JobVerified;
use ferry_core::storage::StorageLocation;
use tokio_util::sync::CancellationToken;

use crate::ReplicationError;
use crate::verify::{RestoreCheck, verify_new};

/// Verifies a region's store, incrementally.
pub struct Verifier {
    store: StorageLocation,
    check: Arc<dyn RestoreCheck>,
    state: Mutex<BTreeMap<JobId, (BTreeSet<u64>, JobVerified)>>,
}

impl Verifier {
    pub fn new(store: StorageLocation, check: Arc<dyn RestoreCheck>) -> Self {
        Self {
            store,
            check,
            state: Mutex::new(BTreeMap::new()),
        }
    }

    /// Checks every checkpoint of every job not checked before.
    pub async fn pass(&self) -> Result<(), ReplicationError> {
        let mut jobs = Vec::new();
        for d in self.store.list_dirs("jobs").await? {
            if let Ok(id) = d.parse::<JobId>() {
                jobs.push(id);
            }
        }
        for job in jobs {
            let done = self
                .lock()
                .get(&job)
                .map(|(d, _)| d.clone())
                .unwrap_or_default();
            let v = verify_new(&self.store, &job, self.check.as_ref(), &done).await?;
            let mut st = self.lock();
            let (done, summary) = st.entry(job).or_default();
            for c in &v.checkpoints {
                done.insert(c.checkpoint);
                if c.ok {
                    if summary.checkpoint < Some(c.checkpoint) {
                        summary.checkpoint = Some(c.checkpoint);
                        summary.verified_at = Some(v.verified_at);
                    }
                } else {
                    let why = c.error.clone().unwrap_or_default();
                    tracing::warn!(job = %job, checkpoint = c.checkpoint, "a replicated checkpoint does not restore: {why}");
                    summary.last_failure = Some((c.checkpoint, why));
                }
            }
        }
        Ok(())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<JobId, (BTreeSet<u64>, JobVerified)>> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Per job (id as text): the newest verified checkpoint.
    pub fn status(&self) -> BTreeMap<String, JobVerified> {
        self.lock()
            .iter()
            .map(|(j, (_, s))| (j.to_string(), s.clone()))
            .collect()
    }

    /// Per job: the newest verified checkpoint number (for heartbeats).
    pub fn newest(&self) -> BTreeMap<String, u64> {
        self.lock()
            .iter()
            .filter_map(|(j, (_, s))| s.checkpoint.map(|c| (j.to_string(), c)))
            .collect()
    }

    /// Verifies every `interval` while `active()` (this instance leads a
    /// standby region), until `stop`.
    pub async fn run(
        self: Arc<Self>,
        interval: Duration,
        active: impl Fn() -> bool,
        stop: CancellationToken,
    ) {
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tick.tick() => {}
            }
            if !active() {
                continue;
            }
            if let Err(e) = self.pass().await {
                tracing::warn!("restore verification of {} failed: {e}", self.store.url());
            }
        }
    }
}
