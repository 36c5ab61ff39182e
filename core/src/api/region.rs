//! Bodies of the cross-region endpoints: `/v1/regions`, `/health/regions`,
//! `/v1/regions/{name}/failover|failback`, `/v1/drills/outage`, and the
//! region heartbeat every region's leader keeps in the global KV.

use std::collections::BTreeMap;
use std::fmt;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::{JobId, RegionEpoch};

/// What a region coordinator is doing, as `/v1/regions` reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum RegionRole {
    /// This JobManager does not lead its region: it takes no region action.
    Follower,
    /// Leading; the region lease has not been read yet: nothing runs.
    Starting,
    /// The region is a standby: it receives copies and runs nothing.
    Standby,
    /// The region took the primary role: its jobs are starting.
    Promoting,
    /// The region holds the primary role and runs the jobs.
    Primary,
    /// The region lost the primary role: its jobs are stopping.
    Demoting,
    /// A primary that could not confirm the region lease within half the
    /// region timeout: its jobs are stopped until it can.
    Isolated,
    /// A planned switchover is moving the primary role away.
    SwitchingOver,
    /// Playing dead for a drill (`/v1/drills/outage`).
    Dark,
}

impl fmt::Display for RegionRole {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            RegionRole::Follower => "follower",
            RegionRole::Starting => "starting",
            RegionRole::Standby => "standby",
            RegionRole::Promoting => "promoting",
            RegionRole::Primary => "primary",
            RegionRole::Demoting => "demoting",
            RegionRole::Isolated => "isolated",
            RegionRole::SwitchingOver => "switching_over",
            RegionRole::Dark => "dark",
        })
    }
}

/// What a region's leader publishes about it in the global KV
/// (`regions.<name>`), every health-check interval.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
pub struct RegionHeartbeat {
    pub region: String,
    /// The region's leading JobManager and its REST URL.
    pub leader: String,
    pub api_url: String,
    /// When it was written (the writer's clock; for display only: ages are
    /// measured on the reader's own clock).
    pub at: Option<DateTime<Utc>>,
    /// Its replication to every other region: (region, lag seconds, lag
    /// checkpoints).
    #[serde(default)]
    pub replication: Vec<(String, f64, u64)>,
    /// A standby's newest restore-verified checkpoint per job.
    #[serde(default)]
    pub verified: BTreeMap<String, u64>,
    /// What the region holds ready and uses (`None`: an older Ferry).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<RegionResources>,
}

/// A region's task slots and what a hot standby holds in them, as its
/// leader sees its TaskManagers.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
pub struct RegionResources {
    /// `regions.standby`: `cold` or `hot`.
    pub standby: String,
    pub taskmanagers: usize,
    pub slots: u32,
    /// Slots in use: running jobs and held ones.
    pub slots_used: u32,
    /// Slots a hot standby's held jobs take.
    pub held_slots: u32,
    /// Bytes of the held jobs' state as checkpointed, and roughly the
    /// memory it takes loaded on the TaskManagers.
    pub held_state_bytes: u64,
    #[serde(default)]
    pub held_memory_bytes: u64,
    /// Per job: the checkpoint it is held at.
    #[serde(default)]
    pub held: BTreeMap<String, u64>,
}

/// A known region as one JobManager sees it in the global KV.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
pub struct RegionView {
    pub region: String,
    /// Its heartbeat changed within the region timeout, on this
    /// JobManager's clock.
    pub healthy: bool,
    /// How long its heartbeat has not changed, on this JobManager's clock
    /// (`None`: never heard from).
    pub heartbeat_age_ms: Option<u64>,
    pub heartbeat: Option<RegionHeartbeat>,
}

/// One job's replication towards one standby.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
pub struct JobProgress {
    pub primary_checkpoint: u64,
    pub replicated_checkpoint: Option<u64>,
    pub replicated_at: Option<DateTime<Utc>>,
}

/// How far one standby region's store is.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
pub struct StandbyStatus {
    pub region: String,
    pub store: String,
    /// Age of the oldest completed snapshot not yet in the standby (0 when
    /// caught up).
    pub lag_seconds: f64,
    /// Completed snapshots not yet in the standby.
    pub lag_checkpoints: u64,
    /// Records the primary's newest checkpoints read beyond the standby's.
    pub lag_records: u64,
    /// Event time between the primary's newest watermark and the standby's.
    pub lag_event_time_ms: i64,
    pub snapshots_replicated: u64,
    pub bytes_replicated: u64,
    /// Files written again after a damaged copy.
    pub retries: u64,
    pub last_replicated_at: Option<DateTime<Utc>>,
    pub last_error: Option<String>,
    pub jobs: BTreeMap<String, JobProgress>,
}

/// The newest restore-verified checkpoint of one job in this region's store.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
pub struct JobVerified {
    pub checkpoint: Option<u64>,
    pub verified_at: Option<DateTime<Utc>>,
    /// The last checkpoint that failed verification, and why.
    pub last_failure: Option<(u64, String)>,
}

/// `GET /v1/regions`: the cross-region view of one JobManager.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
pub struct RegionsStatus {
    /// This JobManager's region.
    pub region: Option<String>,
    pub instance: String,
    /// What this region's coordinator is doing (as this JobManager sees it).
    pub region_role: Option<RegionRole>,
    /// The primary region as the region lease names it (`None`: unknown).
    pub primary: Option<String>,
    /// The region epoch as last read (0: no region lease yet).
    #[schema(value_type = u64)]
    pub epoch: RegionEpoch,
    /// Where the jobs belong (`regions.primary`): fail-back's default.
    pub home: Option<String>,
    /// A write to the global KV succeeded within the region timeout (a
    /// read alone proves nothing: a minority node answers reads). `None`:
    /// no global KV configured.
    pub global_reachable: Option<bool>,
    /// Every known region's health.
    #[serde(default)]
    pub regions: Vec<RegionView>,
    /// Replication to every other region (while this region is primary).
    #[serde(default)]
    pub standbys: Vec<StandbyStatus>,
    /// This region's restore-verified checkpoints per job.
    #[serde(default)]
    pub verified: BTreeMap<String, JobVerified>,
    /// Set when cross-region coordination is not configured here.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
    /// Synchronous replication (`regions.replication: sync`) as this
    /// JobManager runs it; absent in `async` mode.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sync: Option<SyncReplicationStatus>,
}

/// Where synchronous replication stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum SyncState {
    /// Every checkpoint completes only once `regions.syncStandbys` standby
    /// stores hold it: a failover loses no committed output.
    Sync,
    /// Too few standbys (`regions.onStandbyLoss: block`): checkpoints fail
    /// and output stays uncommitted until a standby is back.
    Blocked,
    /// Too few standbys (`regions.onStandbyLoss: async`): checkpoints
    /// complete without them until they have caught up.
    Degraded,
}

impl SyncState {
    pub fn as_str(self) -> &'static str {
        match self {
            SyncState::Sync => "sync",
            SyncState::Blocked => "blocked",
            SyncState::Degraded => "degraded",
        }
    }
}

/// `/v1/regions` `sync`: synchronous replication's state.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
pub struct SyncReplicationStatus {
    pub state: SyncState,
    /// When it entered `state`.
    pub since: DateTime<Utc>,
    /// Why it is not `sync` (the standbys that failed and how).
    pub reason: Option<String>,
    /// `regions.syncStandbys`.
    pub sync_standbys: usize,
    /// `regions.onStandbyLoss`: `block` or `async`.
    pub on_standby_loss: String,
    /// Times it degraded to asynchronous.
    pub degradations: u64,
    /// Checkpoints that failed because too few standbys took them.
    pub blocked_checkpoints: u64,
    /// What synchronous replication adds to a checkpoint's completion
    /// (copying it into the standbys), recent p50 and p99, ms.
    pub latency_p50_ms: Option<f64>,
    pub latency_p99_ms: Option<f64>,
}

impl RegionsStatus {
    /// The view of `region`, if known.
    pub fn view(&self, region: &str) -> Option<&RegionView> {
        self.regions.iter().find(|v| v.region == region)
    }

    /// True when `region` is known and healthy.
    pub fn healthy(&self, region: &str) -> bool {
        self.view(region).is_some_and(|v| v.healthy)
    }

    /// The REST URL of `region`'s leader from its last heartbeat.
    pub fn api_url(&self, region: &str) -> Option<&str> {
        self.view(region)
            .and_then(|v| v.heartbeat.as_ref())
            .map(|h| h.api_url.as_str())
            .filter(|u| !u.is_empty())
    }
}

/// `GET /health/regions`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
pub struct RegionsHealth {
    pub region: Option<String>,
    pub global_reachable: Option<bool>,
    pub regions: Vec<RegionView>,
}

/// A savepoint a switchover took.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
pub struct SavepointRef {
    #[schema(value_type = String)]
    pub job_id: JobId,
    pub checkpoint_id: u64,
    /// Full URL of the savepoint directory.
    pub path: String,
}

/// The snapshot a run restored from, as far as the stores still know it.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
pub struct DivergenceBase {
    pub checkpoint: u64,
    pub records_in: u64,
    pub records_out: u64,
    /// Watermark (epoch ms).
    pub watermark: i64,
}

/// One snapshot a region completed that the surviving lineage does not
/// contain; archived under `jobs/<id>/diverged/`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
pub struct Diverged {
    #[schema(value_type = String)]
    pub job: JobId,
    /// `checkpoints/<n>` or `savepoints/savepoint-<n>`.
    pub dir: String,
    pub checkpoint: u64,
    #[schema(value_type = u64)]
    pub region_epoch: RegionEpoch,
    pub created_at: DateTime<Utc>,
    pub records_in: u64,
    pub records_out: u64,
    /// Watermark (epoch ms).
    pub watermark: i64,
    /// Sink transactions it committed.
    pub sink_transactions: usize,
    /// The region epoch of the lineage that replaced it.
    #[schema(value_type = u64)]
    pub replaced_by_epoch: RegionEpoch,
    /// Where that lineage started (`None`: it started empty).
    pub base: Option<DivergenceBase>,
    pub archived_at: DateTime<Utc>,
}

/// Per job: what a diverged region committed beyond the point the
/// surviving lineage restored from.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
pub struct JobDivergence {
    #[schema(value_type = Option<String>)]
    pub job: Option<JobId>,
    pub checkpoints: Vec<u64>,
    /// Records written by the sinks after the base (committed only there).
    pub records_out: u64,
    /// Records read after the base.
    pub records_in: u64,
    /// Event time covered after the base, in milliseconds.
    pub event_time_ms: i64,
    pub base: Option<DivergenceBase>,
    pub snapshots: Vec<Diverged>,
}

/// A fail-back's divergence report: what the region the jobs go home to
/// committed after the failover away from it (archived, not restored).
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
pub struct DivergenceReport {
    pub region: String,
    /// Only snapshots replaced by the lineage of this region epoch count:
    /// the latest failover's, not earlier ones'.
    #[schema(value_type = u64)]
    pub lineage_epoch: RegionEpoch,
    pub records_out: u64,
    pub records_in: u64,
    pub event_time_ms: i64,
    pub jobs: Vec<JobDivergence>,
}

/// `POST /v1/regions/{name}/failover` and `/failback`: the plan (dry run)
/// or what was done.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
pub struct SwitchoverReport {
    pub from: String,
    pub to: String,
    /// The region epoch before (plan) or after (done) the move.
    #[schema(value_type = u64)]
    pub epoch: RegionEpoch,
    /// The lease moved without savepoints (the old primary was unreachable).
    pub force: bool,
    /// Only the plan: nothing was changed.
    #[serde(default)]
    pub dry_run: bool,
    /// A fail-back (the jobs went home), with its divergence report.
    #[serde(default)]
    pub failback: bool,
    /// Jobs moved (or to move).
    #[serde(default)]
    #[schema(value_type = Vec<String>)]
    pub jobs: Vec<JobId>,
    /// The steps of the plan.
    #[serde(default)]
    pub steps: Vec<String>,
    #[serde(default)]
    pub savepoints: Vec<SavepointRef>,
    pub took_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub divergence: Option<DivergenceReport>,
}

/// A job's last committed checkpoint, as a drill measures RPO against it.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
pub struct CheckpointMark {
    pub id: u64,
    pub records_in: u64,
    pub records_out: u64,
    /// RFC 3339, if any record was seen.
    pub watermark: Option<String>,
}

/// A job a simulated outage stopped.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
pub struct StoppedJob {
    #[schema(value_type = String)]
    pub id: JobId,
    pub name: String,
    pub last_checkpoint: Option<CheckpointMark>,
}

/// `POST`/`DELETE /v1/drills/outage`.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
pub struct OutageReport {
    pub region: String,
    /// True while the region plays dead.
    pub outage: bool,
    pub until: Option<DateTime<Utc>>,
    /// The standby asked to take over (other standbys stand aside).
    pub target: Option<String>,
    /// `DELETE`: an outage was in progress.
    #[serde(default)]
    pub was_dark: bool,
    #[serde(default)]
    pub jobs: Vec<StoppedJob>,
}

/// What kind of failure a cross-region operation met; each maps to one
/// HTTP status and a stable error code.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RegionErrorKind {
    /// No such region in `regions.stores` (404).
    UnknownRegion,
    /// Sent to a region that is not the primary (409).
    NotPrimaryRegion,
    /// Sent to a JobManager that does not lead its region (409).
    NotLeader,
    /// Not possible in the current state (409): already primary, another
    /// operation in progress, a region not healthy.
    Conflict,
    /// The global KV is unreachable or has no quorum (503).
    GlobalUnavailable,
    /// An object store failed (502).
    Store,
    /// A bounded wait ran out (504).
    Timeout,
    /// A request that can never succeed as sent (400).
    BadRequest,
    /// Cross-region coordination is not configured here (409).
    NotConfigured,
}

impl RegionErrorKind {
    /// The HTTP status of this kind.
    pub fn status(self) -> u16 {
        match self {
            RegionErrorKind::UnknownRegion => 404,
            RegionErrorKind::NotPrimaryRegion
            | RegionErrorKind::NotLeader
            | RegionErrorKind::Conflict
            | RegionErrorKind::NotConfigured => 409,
            RegionErrorKind::GlobalUnavailable => 503,
            RegionErrorKind::Store => 502,
            RegionErrorKind::Timeout => 504,
            RegionErrorKind::BadRequest => 400,
        }
    }

    /// The stable error code of API error bodies.
    pub fn code(self) -> &'static str {
        match self {
            RegionErrorKind::UnknownRegion => "unknown_region",
            RegionErrorKind::NotPrimaryRegion => "not_primary_region",
            RegionErrorKind::NotLeader => "not_leader",
            RegionErrorKind::Conflict => "region_conflict",
            RegionErrorKind::GlobalUnavailable => "global_unavailable",
            RegionErrorKind::Store => "storage_error",
            RegionErrorKind::Timeout => "timeout",
            RegionErrorKind::BadRequest => "bad_request",
            RegionErrorKind::NotConfigured => "not_configured",
        }
    }
}
