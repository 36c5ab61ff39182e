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
}

/// A member and how long ago it was last heard from.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MemberView {
    pub member: Member,
    pub heartbeat_age_ms: u64,
}
