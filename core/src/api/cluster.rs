//! Bodies of the region's HA endpoints: `/health/ha` and `/v1/cluster`
//! (the same object: this instance's role, the leader and its epoch, the
//! members with their heartbeat ages), and the membership record every
//! JobManager and TaskManager heartbeats into the region's KV.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// The role as the API reports it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum RoleName {
    /// `ferry local`: no election, this instance does everything.
    Embedded,
    Leader,
    Standby,
}

/// `/health/ha`: this instance's view of its region's HA.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
pub struct HaHealth {
    /// `embedded`, `leader` or `standby`.
    pub role: RoleName,
    pub instance: String,
    pub region: Option<String>,
    /// The leader as this instance knows it.
    pub leader: Option<LeaderView>,
    /// This instance's epoch while it leads.
    pub epoch: Option<u64>,
    /// Members heard from within the expiry.
    pub healthy_members: usize,
    /// Members with a heartbeat record (healthy or not yet expired from the
    /// store).
    pub total_members: usize,
    /// `{member: {id, role, region, address, slots, started_at}, heartbeat_age_ms}`.
    #[schema(value_type = Vec<Object>)]
    pub members: Vec<MemberView>,
    /// Leader changes this instance has seen since it started.
    pub leader_changes: u64,
    /// Membership heartbeats of this instance that failed.
    pub heartbeat_failures: u64,
    /// The TaskManagers registered with the leader, their slots and jobs
    /// (only the leader knows; empty on a standby).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub taskmanagers: Vec<TaskManagerView>,
    /// Spread of the slot load over the TaskManagers not draining:
    /// standard deviation of used/total slots over its mean (leader only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slot_load_variance: Option<f64>,
    /// Duration of the last successful lease renewal (leader only).
    pub last_renew_ms: Option<f64>,
    /// False when the coordination backend could not be read.
    pub backend_reachable: bool,
}

/// The leader as reported by the API.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
pub struct LeaderView {
    pub instance: String,
    /// Its REST URL.
    pub url: String,
    pub epoch: u64,
}

/// What a member announces about itself.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    pub id: String,
    /// `jobmanager` or `taskmanager`.
    pub role: String,
    pub region: String,
    /// Address others reach it at (REST for JMs, gRPC for TMs).
    pub address: String,
    /// Task slots (TaskManagers).
    pub slots: u32,
    pub started_at: DateTime<Utc>,
    /// URL other TaskManagers send a job's records to (TaskManagers with
    /// an exchange port; absent in records of older versions).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exchange: Option<String>,
}

/// A member and how long ago it was last heard from.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MemberView {
    pub member: Member,
    pub heartbeat_age_ms: u64,
}

/// One TaskManager as the leader sees it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct TaskManagerView {
    pub id: String,
    pub slots: u32,
    /// Slots in use (and promised to deployments starting).
    pub used: u32,
    /// Its jobs move elsewhere; nothing new is placed on it.
    pub draining: bool,
    /// It takes parts of jobs spread over TaskManagers (it has an
    /// exchange port).
    pub exchange: bool,
    /// The jobs with tasks on it and the slots each uses there.
    pub jobs: Vec<TaskManagerJob>,
}

/// A job's slots on one TaskManager.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct TaskManagerJob {
    pub job: String,
    pub slots: u32,
}

/// `POST /v1/taskmanagers/{id}/drain` (and `DELETE`, which ends a drain).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct DrainReport {
    pub taskmanager: String,
    pub draining: bool,
    /// The jobs that move (or would have) elsewhere.
    pub jobs: Vec<String>,
    /// Free slots on the other TaskManagers, and the slots the jobs need:
    /// with fewer free than needed, some jobs wait for slots.
    pub free_elsewhere: u32,
    pub needed: u32,
}

/// `POST /v1/cluster/rebalance`: the moves that even out the slot load.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct RebalancePlan {
    /// Slot-load spread now, and after the moves.
    pub variance_before: f64,
    pub variance_after: f64,
    pub moves: Vec<PlannedMove>,
    /// Only planned (`?dry_run=true`), nothing moved.
    pub dry_run: bool,
}

/// One job moving by savepoint from one TaskManager to another.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct PlannedMove {
    pub job: String,
    pub from: String,
    pub to: String,
    pub slots: u32,
}
