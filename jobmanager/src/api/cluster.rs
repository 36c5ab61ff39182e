//! `/v1/cluster` and `/health/ha`: the region's HA state as this instance
//! sees it (role, leader, epoch, members and their heartbeat ages).

use axum::Json;
use axum::extract::State;

use super::error::ErrorBody;
use crate::ha::HaHealth;
use crate::service::JobManager;

/// `GET /health/ha`: this instance's role, the leader, the epoch, healthy
/// and total members, heartbeat ages, renew timing.
#[utoipa::path(
    get,
    path = "/health/ha",
    tag = "cluster",
    summary = "this instance's role, the leader, epoch, healthy/total members, heartbeat ages",
    responses((status = 200, description = "the region's HA as this instance sees it", body = HaHealth))
)]
pub(super) async fn health_ha(State(jm): State<JobManager>) -> Json<HaHealth> {
    Json(jm.ha_health().await)
}

/// `GET /v1/cluster`: the same view, for `ferry cluster status`.
#[utoipa::path(
    get,
    path = "/v1/cluster",
    tag = "cluster",
    summary = "the region's JobManagers and TaskManagers, the leader and its epoch",
    responses((status = 200, description = "the same object as /health/ha", body = HaHealth))
)]
pub(super) async fn cluster(State(jm): State<JobManager>) -> Json<HaHealth> {
    Json(jm.ha_health().await)
}

/// `GET /v1/regions`: replication to the standby regions — per region its
/// store, lag (seconds, checkpoints, records, event time) and per-job
/// progress, as the leader replicating them sees it.
#[utoipa::path(
    get,
    path = "/v1/regions",
    tag = "regions",
    summary = "replication to the standby regions: lag and per-job progress",
    responses((status = 200, description = "every region's health and the replication to each standby (see docs/api.md)", body = ferry_core::api::RegionsStatus))
)]
pub(super) async fn regions(State(jm): State<JobManager>) -> Json<ferry_core::api::RegionsStatus> {
    Json(jm.regions())
}

/// `GET /health/regions`: every region's health from the global KV;
/// `503` while no write to the global KV succeeded within the region
/// timeout (a minority node still answers reads, with stale data: this
/// region cannot tell who is alive and must not act on it).
#[utoipa::path(
    get,
    path = "/health/regions",
    tag = "regions",
    summary = "every region's health from the global KV (503 while it is unreachable)",
    responses(
        (status = 200, description = "every region's health", body = ferry_core::api::RegionsHealth),
        (status = 503, description = "the global KV takes no writes (unreachable, or no quorum)", body = ferry_core::api::RegionsHealth),
    )
)]
pub(super) async fn health_regions(
    State(jm): State<JobManager>,
) -> (axum::http::StatusCode, Json<ferry_core::api::RegionsHealth>) {
    let v = jm.regions();
    let body = ferry_core::api::RegionsHealth {
        region: v.region,
        global_reachable: v.global_reachable,
        regions: v.regions,
    };
    let status = if body.global_reachable == Some(false) {
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
#[utoipa::path(
    post,
    path = "/v1/regions/{name}/failover",
    tag = "regions",
    summary = "make a region the primary (?force=true when the primary is unreachable, ?dry_run=true for the plan)",
    params(
        ("name" = String, Path, description = "the region to make primary"),
        ("force" = Option<bool>, Query, description = "move the region lease now, without savepoints"),
        ("dry_run" = Option<bool>, Query, description = "only print the plan"),
    ),
    responses(
        (status = 200, description = "from, to, the new region epoch, savepoints, time taken (or the plan)", body = ferry_core::api::SwitchoverReport),
        (status = 400, description = "invalid_request: a bad query", body = ErrorBody),
        (status = 404, description = "unknown_region", body = ErrorBody),
        (status = 409, description = "region_conflict / not_primary_region / not_leader: it cannot be done here now; the message says where to send it or what to wait for", body = ErrorBody),
        (status = 503, description = "global_unavailable: the region lease could not be moved; the message says where the jobs run", body = ErrorBody),
        (status = 504, description = "timeout: savepoints did not reach the target in time; the jobs resumed here", body = ErrorBody),
    )
)]
pub(super) async fn failover(
    State(jm): State<JobManager>,
    axum::Extension(caller): axum::Extension<crate::auth::Caller>,
    name: Result<axum::extract::Path<String>, axum::extract::rejection::PathRejection>,
    query: Result<axum::extract::Query<FailoverQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<ferry_core::api::SwitchoverReport>, super::error::ApiError> {
    let axum::extract::Path(name) = name?;
    let axum::extract::Query(q) = query?;
    let force = super::jobs::parse_flag("force", q.force.as_deref())?;
    let dry_run = super::jobs::parse_flag("dry_run", q.dry_run.as_deref())?;
    // Who asked is whoever is authenticated: the lease records it and the
    // region webhook names it.
    Ok(Json(
        jm.region_failover(name, force, dry_run, caller.name)
            .await?,
    ))
}

/// Query of `POST /v1/regions/{name}/failback`.
#[derive(Debug, serde::Deserialize)]
pub(super) struct FailbackQuery {
    dry_run: Option<String>,
    wait: Option<String>,
}

/// How long a fail-back waits for its target to become healthy by default.
const FAILBACK_WAIT: std::time::Duration = std::time::Duration::from_secs(60);

/// `POST /v1/regions/{name}/failback`: the jobs go home to `name`, a
/// region that failed earlier and is a standby again: once it has caught
/// up by replication from the current primary, a planned switchover moves
/// them. The answer carries the divergence report: what `name` committed
/// after its last checkpoint that the current primary restored from.
#[utoipa::path(
    post,
    path = "/v1/regions/{name}/failback",
    tag = "regions",
    summary = "move the jobs home to a region that is a standby again after a failover, with the divergence report (?dry_run=true for the plan)",
    params(
        ("name" = String, Path, description = "the region the jobs go home to"),
        ("dry_run" = Option<bool>, Query, description = "only print the plan"),
        ("wait" = Option<String>, Query, description = "how long to wait for the region to become healthy, e.g. 60s (default)"),
    ),
    responses(
        (status = 200, description = "the switchover's report with the divergence report (or the plan)", body = ferry_core::api::SwitchoverReport),
        (status = 400, description = "invalid_request: a bad query", body = ErrorBody),
        (status = 404, description = "unknown_region", body = ErrorBody),
        (status = 409, description = "region_conflict / not_primary_region: it cannot be done here now; the message says where to send it or what to wait for", body = ErrorBody),
        (status = 504, description = "timeout: the region did not become healthy in time", body = ErrorBody),
    )
)]
pub(super) async fn failback(
    State(jm): State<JobManager>,
    axum::Extension(caller): axum::Extension<crate::auth::Caller>,
    name: Result<axum::extract::Path<String>, axum::extract::rejection::PathRejection>,
    query: Result<axum::extract::Query<FailbackQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<ferry_core::api::SwitchoverReport>, super::error::ApiError> {
    let axum::extract::Path(name) = name?;
    let axum::extract::Query(q) = query?;
    let dry_run = super::jobs::parse_flag("dry_run", q.dry_run.as_deref())?;
    let wait = match q.wait.as_deref() {
        None => FAILBACK_WAIT,
        Some(w) => super::drills::parse_duration("wait", w)?,
    };
    Ok(Json(
        jm.region_failback(name, dry_run, wait, caller.name).await?,
    ))
}

/// `POST /v1/taskmanagers/{id}/drain`: move every job with tasks on
/// TaskManager `id` elsewhere (stop-with-savepoint, then restore), and
/// place nothing new on it; the drain lasts until `DELETE` ends it (or the
/// TaskManager leaves). `ferry taskmanager drain ID --wait` waits until it
/// runs nothing.
#[utoipa::path(
    post,
    path = "/v1/taskmanagers/{id}/drain",
    tag = "cluster",
    summary = "drain a TaskManager: its jobs move elsewhere by savepoint, nothing new is placed on it",
    params(("id" = String, Path, description = "the TaskManager's instance id")),
    responses(
        (status = 200, description = "the jobs that move, the slots they need and the slots free elsewhere", body = ferry_core::api::DrainReport),
        (status = 404, description = "not_found: no such TaskManager registered with the leader", body = ErrorBody),
        (status = 503, description = "not_leader: send it to the leader", body = ErrorBody),
    )
)]
pub(super) async fn drain(
    State(jm): State<JobManager>,
    id: Result<axum::extract::Path<String>, axum::extract::rejection::PathRejection>,
) -> Result<Json<ferry_core::api::DrainReport>, super::error::ApiError> {
    let axum::extract::Path(id) = id?;
    Ok(Json(jm.drain_taskmanager(&id, true).await?))
}

/// `DELETE /v1/taskmanagers/{id}/drain`: end a drain; the TaskManager
/// takes new jobs again (moved jobs stay where they went).
#[utoipa::path(
    delete,
    path = "/v1/taskmanagers/{id}/drain",
    tag = "cluster",
    summary = "end a drain: the TaskManager takes new jobs again",
    params(("id" = String, Path, description = "the TaskManager's instance id")),
    responses(
        (status = 200, description = "the TaskManager no longer drains", body = ferry_core::api::DrainReport),
        (status = 404, description = "not_found: no such TaskManager registered with the leader", body = ErrorBody),
        (status = 503, description = "not_leader: send it to the leader", body = ErrorBody),
    )
)]
pub(super) async fn undrain(
    State(jm): State<JobManager>,
    id: Result<axum::extract::Path<String>, axum::extract::rejection::PathRejection>,
) -> Result<Json<ferry_core::api::DrainReport>, super::error::ApiError> {
    let axum::extract::Path(id) = id?;
    Ok(Json(jm.drain_taskmanager(&id, false).await?))
}

/// Query of `POST /v1/cluster/rebalance`.
#[derive(Debug, serde::Deserialize)]
pub(super) struct RebalanceQuery {
    dry_run: Option<String>,
}

/// `POST /v1/cluster/rebalance`: even out the slot load by moving whole
/// jobs (stop-with-savepoint, then restore) from the most to the least
/// loaded TaskManagers; `?dry_run=true`: only the plan.
#[utoipa::path(
    post,
    path = "/v1/cluster/rebalance",
    tag = "cluster",
    summary = "even out the slot load over the TaskManagers by moving jobs (?dry_run=true for the plan)",
    params(("dry_run" = Option<bool>, Query, description = "only print the plan")),
    responses(
        (status = 200, description = "the load's spread before and after, and the moves (started unless dry_run)", body = ferry_core::api::RebalancePlan),
        (status = 400, description = "bad_request: jobs are moving already, or tasks run in the JobManager", body = ErrorBody),
        (status = 503, description = "not_leader: send it to the leader", body = ErrorBody),
    )
)]
pub(super) async fn rebalance(
    State(jm): State<JobManager>,
    query: Result<axum::extract::Query<RebalanceQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<ferry_core::api::RebalancePlan>, super::error::ApiError> {
    let axum::extract::Query(q) = query?;
    let dry_run = super::jobs::parse_flag("dry_run", q.dry_run.as_deref())?;
    Ok(Json(jm.rebalance(dry_run).await?))
}
