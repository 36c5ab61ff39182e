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

/// `GET /health/regions`: every region's health from the global KV;
/// `503` while the global KV cannot be read (this region cannot tell who is
/// alive and must not act on it).
pub(super) async fn health_regions(
    State(jm): State<JobManager>,
) -> (axum::http::StatusCode, Json<serde_json::Value>) {
    let v = jm.regions();
    let body = serde_json::json!({
        "region": v["region"],
        "global_reachable": v["global_reachable"],
        "regions": v.get("regions").cloned().unwrap_or_else(|| serde_json::json!([])),
    });
    let status = if v["global_reachable"] == false {
        axum::http::StatusCode::SERVICE_UNAVAILABLE
    } else {
        axum::http::StatusCode::OK
    };
    (status, Json(body))
}
