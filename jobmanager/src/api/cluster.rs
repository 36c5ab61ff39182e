//! `/v1/cluster` and `/health/ha`: the region's HA state as this instance
//! sees it (role, leader, epoch, members and their heartbeat ages).

use axum::Json;
use axum::extract::State;

use crate::ha::HaHealth;
use crate::service::JobManager;

/// `GET /health/ha`: this instance's role, the leader, the epoch, healthy
/// and total members, heartbeat ages, renew timing.
pub(super) async fn health_ha(State(jm): State<JobManager>) -> Json<HaHealth> {
    Json(jm.ha_health().await)
}

/// `GET /v1/cluster`: the same view, for `ferry cluster status`.
pub(super) async fn cluster(State(jm): State<JobManager>) -> Json<HaHealth> {
    Json(jm.ha_health().await)
}

/// `GET /v1/regions`: replication to the standby regions — per region its
/// store, lag (seconds, checkpoints, records, event time) and per-job
/// progress, as the leader replicating them sees it.
pub(super) async fn regions(State(jm): State<JobManager>) -> Json<serde_json::Value> {
    Json(jm.regions())
}
