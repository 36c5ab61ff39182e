//! What the JobManager's operations take and return: its settings, a job's
//! summary, checkpoint and savepoint records, submission options, and the
//! cross-region hooks the binary wires in. Plain data; `service` re-exports
//! all of it under its old paths.
//!
//! The API bodies among them (`JobInfo`, `CheckpointInfo`, `SavepointInfo`)
//! live in `ferry_core::api`, shared with the clients, and are re-exported
//! here under their old paths.
//!
//! Invariant: these types import nothing of the JobManager, so every other
//! module can use them without an import cycle.

use std::sync::Arc;

use chrono::{DateTime, Utc};
use ferry_core::JobId;
pub use ferry_core::api::{CheckpointInfo, JobInfo, SavepointInfo};
use ferry_core::manifest::{Manifest, SnapshotKind};
use ferry_core::storage::StorageLocation;
use ferry_core::value::format_ts;

/// Settings of a JobManager.
#[derive(Clone, Debug)]
pub struct JobManagerConfig {
    /// Storage root for checkpoints and job specs when a spec names none.
    pub data_url: String,
    /// Name of this instance, reported in API responses.
    pub instance_id: String,
    /// What jobs may touch, per namespace.
    pub access: ferry_core::access::AccessPolicy,
}

/// A checkpoint or savepoint this JobManager completed (its manifest is
/// written), as announced to `JobManager::subscribe_completed` — the
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
/// [`JobManager::subscribe_ended`](crate::service::JobManager::subscribe_ended):
/// the replicator copies it to the standbys, so that none lists it as
/// running or restarts it.
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
    /// `actor` is the authenticated caller: the lease records it and the
    /// region webhook names it.
    fn failover(
        &self,
        target: String,
        force: bool,
        dry_run: bool,
        actor: String,
    ) -> RegionResult<ferry_core::api::SwitchoverReport>;
    /// `POST /v1/regions/{target}/failback`: move the jobs home to
    /// `target` once it is healthy (waiting up to `wait`) and has caught
    /// up, with the divergence report.
    fn failback(
        &self,
        target: String,
        dry_run: bool,
        wait: std::time::Duration,
        actor: String,
    ) -> RegionResult<ferry_core::api::SwitchoverReport>;
    /// `POST /v1/drills/outage` (`Some((how long, target))`) / `DELETE`
    /// (`None`): this region plays dead for a drill, or comes back; the
    /// target's takeover is `actor`'s.
    fn outage(
        &self,
        start: Option<(std::time::Duration, Option<String>)>,
        actor: String,
    ) -> RegionResult<ferry_core::api::OutageReport>;
}

/// What the region endpoints run.
pub type RegionControl = Arc<dyn RegionOps>;

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

/// A snapshot's record as the API shows it, from its manifest and the
/// directory it is in.
pub(crate) fn manifest_info(m: &Manifest, dir: &StorageLocation) -> CheckpointInfo {
    CheckpointInfo {
        id: m.checkpoint_id.0,
        kind: match m.kind {
            SnapshotKind::Checkpoint => "checkpoint".into(),
            SnapshotKind::Savepoint => "savepoint".into(),
        },
        completed_at: m.created_at,
        duration_ms: m.duration_ms,
        size_bytes: m.total_size(),
        written_bytes: m.written_size(),
        watermark: (m.watermark != i64::MIN).then(|| format_ts(m.watermark)),
        records_in: m.records_in,
        records_out: m.records_out,
        path: dir.url().to_string(),
        finished: m.finished,
    }
}
