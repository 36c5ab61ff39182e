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

/// Query of `POST /v1/regions/{name}/failover`.
#[derive(Debug, serde::Deserialize)]
pub(super) struct FailoverQuery {
    force: Option<String>,
    dry_run: Option<String>,
}

/// `POST /v1/regions/{name}/failover`: make `name` the primary region.
/// Planned (default; on the primary's leader): stop every job with a
/// savepoint, wait until the savepoints are in `name`'s store, move the
/// region lease. `?force=true`: move the lease at once (the primary is
/// unreachable; what it did after its last replicated checkpoint is lost).
/// `?dry_run=true`: only the plan.
pub(super) async fn failover(
    State(jm): State<JobManager>,
    name: Result<axum::extract::Path<String>, axum::extract::rejection::PathRejection>,
    query: Result<axum::extract::Query<FailoverQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<serde_json::Value>, super::error::ApiError> {
    let axum::extract::Path(name) = name?;
    let axum::extract::Query(q) = query?;
    let force = super::jobs::parse_flag("force", q.force.as_deref())?;
    let dry_run = super::jobs::parse_flag("dry_run", q.dry_run.as_deref())?;
    Ok(Json(jm.region_failover(name, force, dry_run).await?))
}

/// Query of `POST /v1/regions/{name}/failback`.
#[derive(Debug, serde::Deserialize)]
pub(super) struct FailbackQuery {
    dry_run: Option<String>,
}

/// `POST /v1/regions/{name}/failback`: the jobs go home to `name`, a
/// region that failed earlier and is a standby again: once it has caught
/// up by replication from the current primary, a planned switchover moves
/// them. The answer carries the divergence report: what `name` committed
/// after its last checkpoint that the current primary restored from.
pub(super) async fn failback(
    State(jm): State<JobManager>,
    name: Result<axum::extract::Path<String>, axum::extract::rejection::PathRejection>,
    query: Result<axum::extract::Query<FailbackQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<serde_json::Value>, super::error::ApiError> {
    let axum::extract::Path(name) = name?;
    let axum::extract::Query(q) = query?;
    let dry_run = super::jobs::parse_flag("dry_run", q.dry_run.as_deref())?;
    Ok(Json(jm.region_failback(name, dry_run).await?))
}
