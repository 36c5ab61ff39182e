//! The JobManager wired to its region side ([`ferry_region::RegionSide`]):
//! the adapter through which the region coordinator drives this
//! JobManager ([`ferry_region::RegionJobs`]), the coordinator behind the
//! `/v1/regions/*` and `/v1/drills/outage` endpoints ([`RegionOps`]),
//! checkpoint announcements turned into replication events, and the
//! restore check that decodes state with the streaming runtime.
//!
//! Invariant: the region side decides when this JobManager's jobs start or
//! stand by; nothing here changes a job except through the calls the
//! coordinator makes.

use std::sync::Arc;
use std::time::Duration;

use ferry_core::api::{CheckpointMark, OutageReport, SavepointRef, SwitchoverReport};
use ferry_core::config::ProcessConfig;
use ferry_core::manifest::VerifiedCheckpoint;
use ferry_core::{JmEpoch, JobId, RegionEpoch};
use ferry_region::{
    Announcements, CheckpointEvent, Coordinator, RegionError, RegionEvent, RegionJob, RegionJobs,
    RegionSide, RestoreCheck,
};
use ferry_taskmanager::runtime::{JobPlan, check_restore};
use futures::StreamExt;
use tokio_stream::wrappers::BroadcastStream;
use tokio_util::sync::CancellationToken;

use crate::model::{CompletedCheckpoint, RegionFailure, RegionOps, RegionResult};
use crate::service::JobManager;

/// Starts the region side of `jm` (REST URL `api_url`) as `cfg` says, with
/// the global KV opened from `rt` (retried until `stop`). `None` when
/// neither `regions.stores` nor `regions.global` is configured; otherwise
/// the handle ends once everything it started has stopped.
pub async fn start_region_side(
    cfg: &ProcessConfig,
    jm: &JobManager,
    api_url: &str,
    rt: &tokio::runtime::Handle,
    stop: CancellationToken,
) -> Result<Option<tokio::task::JoinHandle<()>>, RegionError> {
    let completed = BroadcastStream::new(jm.subscribe_completed()).filter_map(|c| async move {
        match c {
            Ok(c) => Some(CheckpointEvent::from(c)),
            Err(e) => {
                // The next announcement replicates the skipped ones too.
                tracing::warn!("replication fell behind the checkpoint announcements: {e}");
                None
            }
        }
    });
    let ended = BroadcastStream::new(jm.subscribe_ended())
        .filter_map(|e| async move { e.ok().map(|e| (e.job, e.store)) });
    if !cfg.regions.global.urls.is_empty() {
        // Commits and deployments need a confirmed region lease from now on.
        jm.enable_region_fence();
    }
    jm.set_standby_mode(cfg.regions.standby);
    let side = RegionSide::start(
        cfg,
        jm.instance_id(),
        api_url,
        Arc::new(JmRegion {
            jm: jm.clone(),
            region: cfg.region.clone(),
        }),
        Arc::new(RuntimeCheck),
        Announcements {
            completed: Box::pin(completed),
            ended: Box::pin(ended),
        },
        rt,
        stop,
    )
    .await?;
    let Some((side, handle)) = side else {
        return Ok(None);
    };
    if let Some(c) = &side.coordinator {
        jm.set_region_control(Arc::new(RegionCtl(c.clone())));
    }
    if let Some(s) = &side.sync {
        jm.set_sync_replication(s.clone());
    }
    jm.set_regions_view(Arc::new(move || side.status()));
    Ok(Some(handle))
}

impl From<CompletedCheckpoint> for CheckpointEvent {
    fn from(c: CompletedCheckpoint) -> Self {
        CheckpointEvent {
            job: c.job,
            root: c.root,
            dir: c.dir,
            checkpoint: c.checkpoint,
            completed_at: c.completed_at,
            records_in: c.records_in,
            watermark: c.watermark,
        }
    }
}

/// Decodes a checkpoint's state with the streaming runtime, as a restore
/// would (the region verifier's and `ferry region verify`'s check).
pub struct RuntimeCheck;

impl RestoreCheck for RuntimeCheck {
    fn check(&self, spec_yaml: &str, cp: &VerifiedCheckpoint) -> Result<usize, String> {
        let spec = ferry_core::spec::parse_and_validate(spec_yaml)
            .map_err(|e| format!("the stored job spec is invalid:\n{e}"))?;
        let plan = JobPlan::new(&spec)?;
        check_restore(&plan, cp)
    }
}

/// The JobManager as the region coordinator drives it.
struct JmRegion {
    jm: JobManager,
    region: String,
}

#[async_trait::async_trait]
impl RegionJobs for JmRegion {
    fn leading(&self) -> Option<JmEpoch> {
        self.jm.leadership().fence()
    }

    fn jobs(&self) -> Vec<RegionJob> {
        self.jm
            .list()
            .into_iter()
            .map(|j| RegionJob {
                id: j.id,
                active: !j.state.is_terminal() || j.moved_to.is_some(),
                running: !j.state.is_terminal(),
                last_checkpoint: j.last_checkpoint.map(|c| CheckpointMark {
                    id: c.id,
                    records_in: c.records_in,
                    records_out: c.records_out,
                    watermark: c.watermark,
                }),
                name: j.name,
            })
            .collect()
    }

    fn confirm(&self, epoch: RegionEpoch, valid_for: Duration) {
        self.jm.confirm_region_lease(epoch, valid_for);
    }

    async fn start(&self, epoch: RegionEpoch) -> Result<usize, String> {
        self.jm.set_region_epoch(epoch);
        self.jm.promote().await.map_err(|e| e.to_string())
    }

    async fn stand_by(&self, primary: Option<&str>) {
        self.jm
            .demote(&self.region, primary.unwrap_or("(unknown)"))
            .await
    }

    async fn stop_with_savepoints(
        &self,
        target: &str,
    ) -> Vec<(JobId, Result<SavepointRef, String>)> {
        self.jm
            .stop_all_with_savepoints(target)
            .await
            .into_iter()
            .map(|(job, r)| {
                let r = r
                    .map(|sp| SavepointRef {
                        job_id: sp.job_id,
                        checkpoint_id: sp.checkpoint_id,
                        path: sp.path,
                    })
                    .map_err(|e| e.to_string());
                (job, r)
            })
            .collect()
    }

    fn keep_warm(&self) {
        self.jm.keep_warm();
    }

    fn resources(&self) -> Option<ferry_core::api::RegionResources> {
        self.jm.region_resources()
    }

    fn report(&self, event: RegionEvent<'_>) {
        let m = self.jm.metrics();
        match event {
            RegionEvent::Role { primary, epoch } => {
                m.region_is_primary.set(i64::from(primary));
                m.region_epoch.set(epoch.0 as i64);
            }
            RegionEvent::Failover => {
                m.failovers.inc();
            }
            RegionEvent::Health(views) => {
                for r in views {
                    let age = r.heartbeat_age_ms.map(|ms| ms as f64 / 1e3);
                    m.set_region_health(&r.region, r.healthy, age);
                }
            }
            RegionEvent::Replication(standbys) => {
                if let Some(sync) = self.jm.inner.sync.get() {
                    m.set_sync_state(sync.state());
                }
                for s in standbys {
                    m.set_replication_lag(
                        &s.region,
                        s.lag_seconds,
                        s.lag_checkpoints,
                        s.lag_records,
                    );
                }
            }
        }
    }
}

/// `/v1/regions/{name}/failover|failback` and `/v1/drills/outage`, served
/// by the region coordinator.
struct RegionCtl(Arc<Coordinator>);

/// Runs a cross-region operation as a task of its own, to its end even
/// when its caller stops waiting: dropping a switchover halfway (an HTTP
/// client that timed out or went away) left its jobs stopped with
/// savepoints while the lease still named this region — nobody resumed
/// them. The caller gets the result if it still waits.
fn detached<T: Send + 'static>(
    op: impl std::future::Future<Output = Result<T, RegionFailure>> + Send + 'static,
) -> RegionResult<T> {
    let task = tokio::spawn(op);
    Box::pin(async move {
        task.await.unwrap_or_else(|e| {
            Err(RegionFailure {
                kind: ferry_core::api::RegionErrorKind::Conflict,
                message: format!(
                    "the cross-region operation ended abnormally ({e}); check `ferry region status`"
                ),
            })
        })
    })
}

fn failure(e: RegionError) -> RegionFailure {
    RegionFailure {
        kind: e.kind(),
        message: e.to_string(),
    }
}

impl RegionOps for RegionCtl {
    fn failover(
        &self,
        target: String,
        force: bool,
        dry_run: bool,
        actor: String,
    ) -> RegionResult<SwitchoverReport> {
        let c = self.0.clone();
        detached(async move {
            c.switchover(&target, force, dry_run, &actor)
                .await
                .map_err(failure)
        })
    }

    fn failback(
        &self,
        target: String,
        dry_run: bool,
        wait: Duration,
        actor: String,
    ) -> RegionResult<SwitchoverReport> {
        let c = self.0.clone();
        detached(async move {
            c.failback(Some(&target), dry_run, wait, &actor)
                .await
                .map_err(failure)
        })
    }

    fn outage(
        &self,
        start: Option<(Duration, Option<String>)>,
        actor: String,
    ) -> RegionResult<OutageReport> {
        let c = self.0.clone();
        detached(async move { c.outage(start, &actor).await.map_err(failure) })
    }
}

#[cfg(test)]
mod detached_tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};

    /// The HTTP handler of a switchover is dropped when its client times
    /// out; the switchover itself must go on to its end (move the lease,
    /// or roll back and resume the jobs).
    #[tokio::test]
    async fn a_detached_operation_finishes_when_its_caller_stops_waiting() {
        let done = Arc::new(AtomicBool::new(false));
        let d = done.clone();
        let op = detached(async move {
            tokio::time::sleep(Duration::from_millis(50)).await;
            d.store(true, Ordering::SeqCst);
            Ok::<_, RegionFailure>(())
        });
        // The caller gives up long before the operation ends.
        assert!(
            tokio::time::timeout(Duration::from_millis(5), op)
                .await
                .is_err()
        );
        let finished = async {
            while !done.load(Ordering::SeqCst) {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        };
        tokio::time::timeout(Duration::from_secs(5), finished)
            .await
            .expect("the operation was dropped with its caller");
    }
}
