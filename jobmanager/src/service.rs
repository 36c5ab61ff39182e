//! The JobManager service: the operations the REST API and `ferry local`
//! call (submit, list, get, cancel, savepoint, checkpoints, wait), over the
//! set of jobs this JobManager drives.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use ferry_core::JobId;

use crate::state::JobState;

/// Settings of a JobManager.
#[derive(Clone, Debug)]
pub struct JobManagerConfig {
    /// Storage root for checkpoints and job specs when a spec names none.
    pub data_url: String,
    /// Name of this instance, reported in API responses.
    pub instance_id: String,
}

/// Summary and status of one job, as the API returns it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
pub struct JobInfo {
    /// 32 hex digits.
    #[schema(value_type = String, example = "01a2058a42c477a285a8423b5e819224")]
    pub id: JobId,
    pub name: String,
    pub state: JobState,
    pub parallelism: u32,
    pub submitted_at: DateTime<Utc>,
    pub ended_at: Option<DateTime<Utc>>,
    /// Restarts after failures (not counting resumes of a new process).
    pub restarts: u32,
    /// Deployments of the job's tasks so far: 1 after the first start, +1
    /// for each restart or resume that started tasks again. A new leader
    /// that adopts running tasks does not add one.
    #[serde(default)]
    pub attempt: u32,
    /// The TaskManager running the job's tasks (distributed mode).
    #[serde(default)]
    pub taskmanager: Option<String>,
    /// Id of the current deployment on that TaskManager.
    #[serde(default)]
    pub deployment: Option<String>,
    /// The region a planned switchover moved the job to (it was stopped
    /// here with a savepoint and resumes there); a region that becomes
    /// primary resumes such jobs although they are CANCELLED here.
    #[serde(default)]
    pub moved_to: Option<String>,
    pub records_in: u64,
    pub records_out: u64,
    /// Records dropped because they were later than their window allowed.
    pub late_records: u64,
    /// Records whose filter or map expression failed to evaluate.
    pub expression_errors: u64,
    /// Malformed input records skipped by the source (`onBadLine: skip`).
    #[serde(default)]
    pub skipped_records: u64,
    /// Lowest watermark over the tasks, RFC 3339, if any record was seen.
    pub watermark: Option<String>,
    pub last_checkpoint: Option<CheckpointInfo>,
    /// Why the job failed or is restarting.
    pub failure: Option<String>,
    /// Where the sink writes, if it writes to storage.
    pub output: Option<String>,
    /// Where the job's checkpoints live.
    pub checkpoint_root: String,
}

/// One completed checkpoint or savepoint.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
pub struct CheckpointInfo {
    pub id: u64,
    /// `checkpoint` or `savepoint`.
    pub kind: String,
    pub completed_at: DateTime<Utc>,
    pub duration_ms: u64,
    pub size_bytes: u64,
    pub watermark: Option<String>,
    pub records_in: u64,
    pub records_out: u64,
    /// Full URL of the checkpoint directory.
    pub path: String,
    /// Final checkpoint of a bounded job.
    pub finished: bool,
}

/// A checkpoint or savepoint this JobManager completed (its manifest is
/// written), as announced to [`JobManager::subscribe_completed`] — the
/// cross-region replicator follows these.
#[derive(Clone, Debug)]
pub struct CompletedCheckpoint {
    pub job: JobId,
    /// The job's storage root (its checkpoints live below `jobs/<id>/`).
    pub root: ferry_core::storage::StorageLocation,
    /// The snapshot's directory relative to `root`.
    pub dir: String,
    pub checkpoint: u64,
    pub savepoint: bool,
    pub completed_at: DateTime<Utc>,
    pub records_in: u64,
    pub watermark: i64,
}

/// A job whose final status (finished, cancelled, failed) was just written
/// to the job store `store`, as announced to
/// [`JobManager::subscribe_ended`]: the replicator copies it to the
/// standbys, so that none lists it as running or restarts it.
#[derive(Clone, Debug)]
pub struct JobEnded {
    pub job: JobId,
    pub store: ferry_core::storage::StorageLocation,
}

/// Produces the `/v1/regions` body (the cross-region coordinator's view).
pub type RegionsView = Arc<dyn Fn() -> ferry_core::api::RegionsStatus + Send + Sync>;

/// Why a cross-region operation cannot be done now: its kind (an HTTP
/// status) and a message that says what state the jobs are in.
#[derive(Clone, Debug)]
pub struct RegionFailure {
    pub kind: ferry_core::api::RegionErrorKind,
    pub message: String,
}

/// A cross-region operation's report, or why it cannot be done now.
pub type RegionResult<T> = futures::future::BoxFuture<'static, Result<T, RegionFailure>>;

/// The cross-region operations the binary wires in from the region
/// coordinator (the JobManager does not depend on it).
pub trait RegionOps: Send + Sync {
    /// `POST /v1/regions/{target}/failover`: make `target` the primary
    /// (planned switchover, or `force`d), or with `dry_run` only the plan.
    fn failover(
        &self,
        target: String,
        force: bool,
        dry_run: bool,
    ) -> RegionResult<ferry_core::api::SwitchoverReport>;
    /// `POST /v1/regions/{target}/failback`: move the jobs home to
    /// `target` once it is healthy (waiting up to `wait`) and has caught
    /// up, with the divergence report.
    fn failback(
        &self,
        target: String,
        dry_run: bool,
        wait: std::time::Duration,
    ) -> RegionResult<ferry_core::api::SwitchoverReport>;
    /// `POST /v1/drills/outage` (`Some((how long, target))`) / `DELETE`
    /// (`None`): this region plays dead for a drill, or comes back.
    fn outage(
        &self,
        start: Option<(std::time::Duration, Option<String>)>,
    ) -> RegionResult<ferry_core::api::OutageReport>;
}

/// What the region endpoints run.
pub type RegionControl = Arc<dyn RegionOps>;

/// A savepoint that was taken.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
pub struct SavepointInfo {
    #[schema(value_type = String)]
    pub job_id: JobId,
    pub checkpoint_id: u64,
    /// Full URL of the savepoint directory, for `--from-savepoint`.
    pub path: String,
}

use std::sync::Arc;

use crate::error::JmError;
use crate::metrics::Metrics;

/// Options for starting a job beyond its spec.
#[derive(Clone, Debug, Default)]
pub struct SubmitOptions {
    /// Reuse this id (resuming a job in `ferry local`); new id otherwise.
    pub job_id: Option<JobId>,
    /// Start from this savepoint or checkpoint directory (URL or path).
    pub from_savepoint: Option<String>,
    /// Restore from the job's own newest verified checkpoint if there is one.
    pub resume: bool,
}

/// The JobManager: a cheap-to-clone handle to the jobs it drives.
#[derive(Clone)]
pub struct JobManager {
    pub(crate) inner: Arc<crate::jobs::Inner>,
}

impl JobManager {
    /// Parses, validates and starts a job from spec text (YAML or JSON).
    pub async fn submit(&self, text: &str) -> Result<JobInfo, JmError> {
        let spec = ferry_core::spec::parse_and_validate(text).map_err(JmError::InvalidSpec)?;
        self.submit_spec(spec, SubmitOptions::default()).await
    }

    /// All jobs, newest first.
    pub fn list(&self) -> Vec<JobInfo> {
        self.inner.list()
    }

    /// One job, by full id, unique id prefix, or unique name.
    pub fn get(&self, id: &str) -> Result<JobInfo, JmError> {
        self.inner.find(id).map(|j| j.info())
    }

    /// Prometheus metrics of this JobManager.
    pub fn metrics(&self) -> &Metrics {
        &self.inner.metrics
    }

    /// This instance's role.
    pub fn role(&self) -> crate::leadership::RoleName {
        self.inner.leadership.role()
    }

    /// The leader as last seen (standbys forward writes to it).
    pub fn leader(&self) -> Option<ferry_ha::LeaderInfo> {
        self.inner.leadership.leader()
    }

    /// The leadership handle (HA mode wires the elector into it).
    pub fn leadership(&self) -> &std::sync::Arc<crate::leadership::Leadership> {
        &self.inner.leadership
    }

    /// Runs jobs' tasks on the region's TaskManagers instead of in this
    /// process. Set once, before jobs are submitted or adopted.
    pub fn use_taskmanagers(&self, pool: Arc<crate::taskmanagers::TaskManagers>) {
        let _ = self.inner.taskmanagers.set(pool);
    }

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

    /// Fences checkpoint commits with the region lease: from now on a
    /// checkpoint completes only within `valid_for` of the last
    /// [`confirm_region_lease`](Self::confirm_region_lease).
    pub fn enable_region_fence(&self) {
        self.inner.region_fence.enable();
    }

    /// A compare-and-set renewal of the region lease just confirmed this
    /// region as the primary under `epoch`: it accepts jobs, and commits
    /// may go on for `valid_for`.
    pub fn confirm_region_lease(&self, epoch: u64, valid_for: std::time::Duration) {
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
    pub fn set_region_epoch(&self, epoch: u64) {
        self.inner
            .region_epoch
            .store(epoch, std::sync::atomic::Ordering::Relaxed);
    }

    /// The primary region this standby region follows (`None` while this
    /// region is the primary).
    pub fn standby_of(&self) -> Option<String> {
        self.inner.standby().map(|(_, p)| p)
    }

    /// True while this region is a standby.
    pub fn is_standby_region(&self) -> bool {
        self.inner.standby().is_some()
    }

    /// This region lost the primary role to `primary`: every job stops here
    /// and its tasks are cancelled (not left for a next leader), nothing
    /// more is written for them, and no job is accepted. Returns once the
    /// drivers have stopped.
    #[tracing::instrument(name = "region.demote", skip(self))]
    pub async fn demote(&self, region: &str, primary: &str) {
        self.inner.region_fence.revoke();
        self.set_standby_region(region, primary);
        self.inner
            .demoting
            .store(true, std::sync::atomic::Ordering::SeqCst);
        self.step_down().await;
        self.inner
            .demoting
            .store(false, std::sync::atomic::Ordering::SeqCst);
    }

    /// This region became the primary: if this instance leads its region,
    /// it starts every unfinished job of its store from its newest
    /// (replicated) checkpoint. Returns how many it started.
    #[tracing::instrument(name = "region.promote", skip(self))]
    pub async fn promote(&self) -> Result<usize, JmError> {
        *self
            .inner
            .standby_region
            .write()
            .unwrap_or_else(|p| p.into_inner()) = None;
        self.inner.metrics.region_is_primary.set(1);
        match self.inner.leadership.fence() {
            Some(epoch) => self.lead(epoch).await,
            None => Ok(0),
        }
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

    /// Moves the primary role to `target` (see [`RegionOps::failover`]).
    pub async fn region_failover(
        &self,
        target: String,
        force: bool,
        dry_run: bool,
    ) -> Result<ferry_core::api::SwitchoverReport, JmError> {
        let ops = self.region_ops()?;
        Ok(ops.failover(target, force, dry_run).await?)
    }

    /// Moves the jobs back to `target` (see [`RegionOps::failback`]).
    pub async fn region_failback(
        &self,
        target: String,
        dry_run: bool,
        wait: std::time::Duration,
    ) -> Result<ferry_core::api::SwitchoverReport, JmError> {
        let ops = self.region_ops()?;
        Ok(ops.failback(target, dry_run, wait).await?)
    }

    /// Starts (`Some`) or ends (`None`) a simulated outage of this region
    /// (see [`RegionOps::outage`]).
    pub async fn region_outage(
        &self,
        start: Option<(std::time::Duration, Option<String>)>,
    ) -> Result<ferry_core::api::OutageReport, JmError> {
        let ops = self.region_ops()?;
        Ok(ops.outage(start).await?)
    }

    /// Records the report of a failover drill (`ferry drill run`) in this
    /// region's store under `drills/<id>.json` and in the drill metrics.
    /// The report must carry `id` (letters, digits, `-`), `passed` and
    /// `rto_ms`.
    pub async fn record_drill(
        &self,
        report: serde_json::Value,
    ) -> Result<serde_json::Value, JmError> {
        let id = report["id"].as_str().unwrap_or_default().to_string();
        if id.is_empty()
            || id.len() > 64
            || !id.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        {
            return Err(JmError::BadRequest(
                "a drill report needs an \"id\" of 1 to 64 letters, digits or '-'".into(),
            ));
        }
        let Some(passed) = report["passed"].as_bool() else {
            return Err(JmError::BadRequest(
                "a drill report needs \"passed\": true or false".into(),
            ));
        };
        let rto_ms = report["rto_ms"].as_f64();
        let store = self.inner.store.clone().map_err(JmError::Runtime)?;
        let body = serde_json::to_vec_pretty(&report).unwrap_or_default();
        store
            .put(&format!("drills/{id}.json"), bytes::Bytes::from(body))
            .await?;
        let m = &self.inner.metrics;
        if let Some(rto) = rto_ms {
            m.drill_last_rto_seconds.set(rto / 1000.0);
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
    pub async fn drills(&self) -> Result<Vec<serde_json::Value>, JmError> {
        let store = self.inner.store.clone().map_err(JmError::Runtime)?;
        let mut out = Vec::new();
        for (name, _) in store.list_files("drills").await? {
            if !name.ends_with(".json") {
                continue;
            }
            if let Some(raw) = store.get_opt(&format!("drills/{name}")).await? {
                match serde_json::from_slice::<serde_json::Value>(&raw) {
                    Ok(v) => out.push(v),
                    Err(e) => {
                        tracing::warn!(file = %name, "skipping an unreadable drill report: {e}")
                    }
                }
            }
        }
        out.sort_by(|a, b| {
            b["started_at"]
                .as_str()
                .unwrap_or_default()
                .cmp(a["started_at"].as_str().unwrap_or_default())
        });
        Ok(out)
    }

    /// One drill report by id.
    pub async fn drill(&self, id: &str) -> Result<serde_json::Value, JmError> {
        let not_found = || {
            JmError::Missing(format!(
                "drill '{id}' not found; list drills with GET /v1/drills"
            ))
        };
        if !id.chars().all(|c| c.is_ascii_alphanumeric() || c == '-') {
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
            },
        }
    }

    /// Every checkpoint and savepoint this JobManager completes from now on
    /// (a slow receiver misses the oldest ones and is told how many).
    pub fn subscribe_completed(&self) -> tokio::sync::broadcast::Receiver<CompletedCheckpoint> {
        self.inner.completed.subscribe()
    }

    /// Every job whose final status reaches the job store from now on.
    pub fn subscribe_ended(&self) -> tokio::sync::broadcast::Receiver<JobEnded> {
        self.inner.ended.subscribe()
    }

    /// Name of this instance.
    pub fn instance_id(&self) -> &str {
        &self.inner.config.instance_id
    }
}
