//! The cross-region side of a JobManager: whether its region is the
//! primary or a standby (and of which primary), the region lease as the
//! commit fence, the hooks the binary wires in from the region coordinator
//! (failover, failback, drills' outages, the `/v1/regions` view), the
//! switchover's stop-with-savepoint of every job, completed-checkpoint
//! announcements for the replicator, and failover drill reports.
//!
//! Invariant: while this region is a standby (from `set_standby_region`
//! until `promote` clears it) it accepts no job and starts none: submission
//! refuses, and a leader only mirrors the jobs of its store.

use ferry_core::JobId;
use ferry_core::api::DrillReport;

use crate::error::JmError;
use crate::model::{CompletedCheckpoint, JobEnded, RegionControl, RegionsView, SavepointInfo};
use crate::service::JobManager;

impl JobManager {
    /// Makes this JobManager's region a standby of `primary`: it accepts no
    /// job and starts none of the jobs replicated into its store. Set once,
    /// before leading.
    pub fn set_standby_region(&self, region: &str, primary: &str) {
        self.inner.metrics.region_is_primary.set(0);
        *self
            .inner
            .standby_region
            .write()
            .unwrap_or_else(|p| p.into_inner()) = Some((region.to_string(), primary.to_string()));
    }

    /// This instance lost its region's leadership. What it knew of the
    /// region lease — that this region is the primary, under which region
    /// epoch — may be stale by the time it leads again (the primary role
    /// can move away and back meanwhile), so it starts and adopts no job
    /// until its region coordinator has read the lease afresh, as at
    /// start. Without a region lease (no `regions.global`) nothing changes.
    pub fn forget_region_role(&self) {
        if self.inner.region_fence.remaining().is_none() {
            return;
        }
        self.inner.region_fence.revoke();
        if self.inner.standby().is_none() {
            let region = self
                .inner
                .leadership
                .ha_context()
                .map(|c| c.region.clone())
                .unwrap_or_default();
            self.set_standby_region(&region, "(not known until the region lease is read)");
        }
    }

    /// True while this region is a standby.
    pub fn is_standby_region(&self) -> bool {
        self.inner.standby().is_some()
    }

    /// The primary region this standby region follows (`None` while this
    /// region is the primary).
    pub fn standby_of(&self) -> Option<String> {
        self.inner.standby().map(|(_, p)| p)
    }

    /// Sends every checkpoint through synchronous replication from now on
    /// (`regions.replication: sync`); set once.
    pub fn set_sync_replication(&self, sync: std::sync::Arc<ferry_region::SyncReplicator>) {
        let _ = self.inner.sync.set(sync);
    }

    /// Fences checkpoint commits with the region lease: from now on a
    /// checkpoint completes only within `valid_for` of the last
    /// [`confirm_region_lease`](Self::confirm_region_lease).
    pub fn enable_region_fence(&self) {
        self.inner.region_fence.enable();
    }

    /// A compare-and-set renewal of the region lease just confirmed this
    /// region as the primary under `epoch`: it accepts jobs, commits may go
    /// on for `valid_for`, and the region's TaskManagers hear it (their
    /// tasks stop by themselves when it runs out).
    pub fn confirm_region_lease(
        &self,
        epoch: ferry_core::RegionEpoch,
        valid_for: std::time::Duration,
    ) {
        self.set_region_epoch(epoch);
        self.inner.region_fence.confirm(valid_for);
        if let Some(pool) = self.inner.taskmanagers.get() {
            pool.renew_fence(epoch, valid_for);
        }
        if self.inner.standby().is_some() {
            *self
                .inner
                .standby_region
                .write()
                .unwrap_or_else(|p| p.into_inner()) = None;
        }
    }

    /// The region epoch new checkpoint manifests record.
    pub fn set_region_epoch(&self, epoch: ferry_core::RegionEpoch) {
        self.inner.region_epoch.set(epoch);
    }

    /// Sets what `POST /v1/regions/{name}/failover` runs.
    pub fn set_region_control(&self, control: RegionControl) {
        let _ = self.inner.region_control.set(control);
    }

    fn region_ops(&self) -> Result<RegionControl, JmError> {
        self.inner.region_control.get().cloned().ok_or_else(|| JmError::Region {
            kind: ferry_core::api::RegionErrorKind::NotConfigured,
            message: "cross-region failover is not configured here (regions.global and regions.stores, see docs/config.md)".into(),
        })
    }

    /// Moves the primary role to `target` (see [`RegionOps::failover`](crate::model::RegionOps::failover)).
    pub async fn region_failover(
        &self,
        target: String,
        force: bool,
        dry_run: bool,
        actor: String,
    ) -> Result<ferry_core::api::SwitchoverReport, JmError> {
        let ops = self.region_ops()?;
        Ok(ops.failover(target, force, dry_run, actor).await?)
    }

    /// Moves the jobs back to `target` (see [`RegionOps::failback`](crate::model::RegionOps::failback)).
    pub async fn region_failback(
        &self,
        target: String,
        dry_run: bool,
        wait: std::time::Duration,
        actor: String,
    ) -> Result<ferry_core::api::SwitchoverReport, JmError> {
        let ops = self.region_ops()?;
        Ok(ops.failback(target, dry_run, wait, actor).await?)
    }

    /// Starts (`Some`) or ends (`None`) a simulated outage of this region
    /// (see [`RegionOps::outage`](crate::model::RegionOps::outage)).
    pub async fn region_outage(
        &self,
        start: Option<(std::time::Duration, Option<String>)>,
        actor: String,
    ) -> Result<ferry_core::api::OutageReport, JmError> {
        let ops = self.region_ops()?;
        Ok(ops.outage(start, actor).await?)
    }

    /// Stops every running job with a savepoint for a planned switchover
    /// to `target` (their status records `moved_to`).
    pub async fn stop_all_with_savepoints(
        &self,
        target: &str,
    ) -> Vec<(JobId, Result<SavepointInfo, JmError>)> {
        let mut out = Vec::new();
        for job in self.inner.all() {
            if job.state().is_terminal() || !job.driven() {
                continue;
            }
            job.status
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .moved_to = Some(target.to_string());
            let r = self
                .cancel(&job.id.to_string(), true)
                .await
                .and_then(|(_, sp)| {
                    sp.ok_or_else(|| JmError::Runtime("no savepoint was taken".into()))
                });
            out.push((job.id, r));
        }
        out
    }

    /// Sets what `/v1/regions` reports.
    pub fn set_regions_view(&self, view: RegionsView) {
        let _ = self.inner.regions_view.set(view);
    }

    /// The `/v1/regions` body: the cross-region view, or that replication
    /// is not configured.
    pub fn regions(&self) -> ferry_core::api::RegionsStatus {
        match self.inner.regions_view.get() {
            Some(v) => v(),
            None => ferry_core::api::RegionsStatus {
                region: self.inner.leadership.ha_context().map(|c| c.region.clone()),
                instance: self.instance_id().to_string(),
                region_role: None,
                primary: None,
                epoch: ferry_core::RegionEpoch::NONE,
                home: None,
                global_reachable: None,
                regions: Vec::new(),
                standbys: Vec::new(),
                verified: Default::default(),
                note: Some(
                    "cross-region replication is not configured (regions.stores, see docs/config.md)"
                        .into(),
                ),
                sync: None,
            },
        }
    }

    /// Every job whose final status reaches the job store from now on.
    pub fn subscribe_ended(&self) -> tokio::sync::broadcast::Receiver<JobEnded> {
        self.inner.ended.subscribe()
    }

    /// Every checkpoint and savepoint this JobManager completes from now on
    /// (a slow receiver misses the oldest ones and is told how many).
    pub fn subscribe_completed(&self) -> tokio::sync::broadcast::Receiver<CompletedCheckpoint> {
        self.inner.completed.subscribe()
    }

    /// Records the report of a failover drill (`ferry drill run`) in this
    /// region's store under `drills/<id>.json` and in the drill metrics.
    /// The report's `id` must be letters, digits and `-`.
    pub async fn record_drill(&self, report: DrillReport) -> Result<DrillReport, JmError> {
        report.validate().map_err(JmError::BadRequest)?;
        let (id, passed, rto_ms) = (report.id.clone(), report.passed, report.rto_ms);
        let store = self.inner.store.clone().map_err(JmError::Runtime)?;
        let body = serde_json::to_vec_pretty(&report).unwrap_or_default();
        store
            .put(&format!("drills/{id}.json"), bytes::Bytes::from(body))
            .await?;
        let m = &self.inner.metrics;
        if let Some(rto) = rto_ms {
            m.drill_last_rto_seconds.set(rto as f64 / 1000.0);
        }
        m.drill_last_passed.set(i64::from(passed));
        m.drills
            .get_or_create(&crate::metrics::ResultLabels {
                result: if passed { "pass" } else { "fail" }.into(),
            })
            .inc();
        tracing::info!(drill = %id, passed, rto_ms = ?rto_ms, "failover drill recorded");
        Ok(report)
    }

    /// Drill reports recorded in this region's store, newest first.
    pub async fn drills(&self) -> Result<Vec<DrillReport>, JmError> {
        let store = self.inner.store.clone().map_err(JmError::Runtime)?;
        let mut out = Vec::new();
        for (name, _) in store.list_files("drills").await? {
            if !name.ends_with(".json") {
                continue;
            }
            if let Some(raw) = store.get_opt(&format!("drills/{name}")).await? {
                match serde_json::from_slice::<DrillReport>(&raw) {
                    Ok(v) => out.push(v),
                    Err(e) => {
                        tracing::warn!(file = %name, "skipping an unreadable drill report: {e}")
                    }
                }
            }
        }
        out.sort_by_key(|r| std::cmp::Reverse(r.started_at));
        Ok(out)
    }

    /// One drill report by id.
    pub async fn drill(&self, id: &str) -> Result<DrillReport, JmError> {
        let not_found = || {
            JmError::Missing(format!(
                "drill '{id}' not found; list drills with GET /v1/drills"
            ))
        };
        if !ferry_core::api::is_drill_id(id) {
            return Err(not_found());
        }
        let store = self.inner.store.clone().map_err(JmError::Runtime)?;
        let raw = store
            .get_opt(&format!("drills/{id}.json"))
            .await?
            .ok_or_else(not_found)?;
        serde_json::from_slice(&raw)
            .map_err(|e| JmError::Runtime(format!("drill {id}: unreadable report: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use ferry_core::RegionEpoch;

    use crate::leadership::{HaContext, Leadership};
    use crate::model::JobManagerConfig;
    use crate::service::JobManager;

    #[tokio::test]
    async fn a_leader_that_lost_its_region_leadership_forgets_the_region_role() {
        let dir = tempfile::tempdir().unwrap();
        let leadership = Leadership::ha(HaContext {
            backend: Arc::new(ferry_ha::in_process::InProcess::new(Duration::from_secs(
                60,
            ))),
            region: "east".into(),
            member_expiry: Duration::from_secs(3),
            heartbeat_failures: Default::default(),
        });
        let jm = JobManager::with_leadership(
            JobManagerConfig {
                data_url: format!("file://{}", dir.path().display()),
                instance_id: "jm-a".into(),
                access: ferry_core::access::AccessPolicy::unrestricted(),
            },
            leadership,
        );
        // Without a region lease in play nothing changes.
        jm.forget_region_role();
        assert!(!jm.is_standby_region());
        // The primary under region epoch 29, while this instance led ...
        jm.enable_region_fence();
        jm.confirm_region_lease(RegionEpoch(29), Duration::from_secs(60));
        assert!(!jm.is_standby_region());
        assert!(jm.inner.region_fence.check().is_ok());
        // ... is not known any more once it lost the leadership: it starts,
        // adopts and accepts no job (the region epoch may have moved on,
        // and adopting under 29 would stop tasks of a newer one) until its
        // region coordinator confirms the lease again.
        jm.forget_region_role();
        assert_eq!(jm.inner.standby().map(|(r, _)| r), Some("east".to_string()));
        assert!(jm.inner.region_fence.check().is_err());
        jm.confirm_region_lease(RegionEpoch(31), Duration::from_secs(60));
        assert!(!jm.is_standby_region());
        assert_eq!(jm.inner.region_epoch.get(), RegionEpoch(31));
    }
}
