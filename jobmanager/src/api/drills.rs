//! Failover drill endpoints: `ferry drill run` asks the primary region to
//! play dead (`/v1/drills/outage`) and records its measured report in the
//! region it failed over to (`/v1/drills`), where the drill metrics show the
//! last result.

use axum::Extension;
use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;

use ferry_core::api::{DrillList, DrillReport, DrillReportError};

use super::error::{ApiError, ErrorBody};
use crate::error::JmError;
use crate::service::JobManager;

/// Query of `POST /v1/drills/outage`.
#[derive(Debug, serde::Deserialize)]
pub(super) struct OutageQuery {
    duration: Option<String>,
    target: Option<String>,
}

/// Parses a duration query parameter (`60s`, `500ms`, `2m`).
pub(super) fn parse_duration(name: &str, value: &str) -> Result<std::time::Duration, ApiError> {
    humantime::parse_duration(value).map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            format!("{name}={value:?} is not a duration ({e}); use e.g. {name}=60s"),
        )
    })
}

/// Longest simulated outage: a drill that forgets to end one does not keep
/// a region dark for good.
const MAX_OUTAGE: std::time::Duration = std::time::Duration::from_secs(600);

/// `POST /v1/drills/outage?duration=60s&target=REGION`: this region plays
/// dead for a drill — its leader stops every job without a savepoint,
/// stops renewing the region lease and heartbeating into the global KV, as
/// if the region were gone, for `duration` (default 60 s, at most 10 min)
/// or until `DELETE`. With `target`, every other standby stands aside so
/// that the target takes over. Answers each job's progress at the moment
/// it stopped.
#[utoipa::path(
    post,
    path = "/v1/drills/outage",
    tag = "drills",
    summary = "simulate this region's outage for a drill (?duration=60s): stop every job without a savepoint and stop the region heartbeat",
    params(
        ("duration" = Option<String>, Query, description = "how long the region plays dead, e.g. 60s (default), at most 10m"),
        ("target" = Option<String>, Query, description = "the standby that is to take over (the others stand aside)"),
    ),
    responses(
        (status = 200, description = "each job's progress at the moment it stopped", body = ferry_core::api::OutageReport),
        (status = 400, description = "invalid_request: a bad duration", body = ErrorBody),
        (status = 404, description = "unknown_region: no such target", body = ErrorBody),
        (status = 409, description = "region_conflict: not the primary region's leader, or the target is not healthy", body = ErrorBody),
        (status = 503, description = "global_unavailable: the drill hold could not be written; nothing was stopped", body = ErrorBody),
    )
)]
pub(super) async fn start_outage(
    State(jm): State<JobManager>,
    Extension(caller): Extension<crate::auth::Caller>,
    query: Result<Query<OutageQuery>, QueryRejection>,
) -> Result<Json<ferry_core::api::OutageReport>, ApiError> {
    let Query(q) = query?;
    let duration = match q.duration.as_deref() {
        None => std::time::Duration::from_secs(60),
        Some(d) => parse_duration("duration", d)?,
    };
    if duration.is_zero() || duration > MAX_OUTAGE {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "duration must be more than 0 and at most 10m".to_string(),
        ));
    }
    // The target's takeover is recorded as the caller's.
    Ok(Json(
        jm.region_outage(Some((duration, q.target)), caller.name)
            .await?,
    ))
}

/// `DELETE /v1/drills/outage`: the simulated outage ends; the region
/// follows the region lease again (a standby if another region took over).
#[utoipa::path(
    delete,
    path = "/v1/drills/outage",
    tag = "drills",
    summary = "end a simulated outage",
    responses(
        (status = 200, description = "the outage has ended", body = ferry_core::api::OutageReport),
        (status = 409, description = "region_conflict", body = ErrorBody),
    )
)]
pub(super) async fn end_outage(
    State(jm): State<JobManager>,
    Extension(caller): Extension<crate::auth::Caller>,
) -> Result<Json<ferry_core::api::OutageReport>, ApiError> {
    Ok(Json(jm.region_outage(None, caller.name).await?))
}

/// `POST /v1/drills`: record a drill report (JSON with `id`, `passed`,
/// `rto_ms`).
#[utoipa::path(
    post,
    path = "/v1/drills",
    tag = "drills",
    summary = "record a failover drill report (ferry drill run does this)",
    request_body(content = Object, description = "the drill report: JSON with id, passed, rto_ms, ..."),
    responses(
        (status = 201, description = "the report was stored in the region's store", body = Object),
        (status = 400, description = "invalid_request or bad_request: not a JSON report, or without id or passed", body = ErrorBody),
    )
)]
pub(super) async fn record(
    State(jm): State<JobManager>,
    Extension(caller): Extension<crate::auth::Caller>,
    body: Result<Bytes, BytesRejection>,
) -> Result<(StatusCode, Json<DrillReport>), ApiError> {
    let body = body?;
    let mut report = DrillReport::from_json(&body).map_err(|e| match e {
        DrillReportError::NotJson(e) => ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            format!("the body is not a JSON drill report: {e}"),
        ),
        DrillReportError::Invalid(message) => JmError::BadRequest(message).into(),
    })?;
    // Who ran the drill is whoever is authenticated, whatever the body says.
    report.actor = Some(caller.name.clone());
    Ok((StatusCode::CREATED, Json(jm.record_drill(report).await?)))
}

/// `GET /v1/drills`: the drill reports recorded in this region, newest
/// first.
#[utoipa::path(
    get,
    path = "/v1/drills",
    tag = "drills",
    summary = "failover drill reports recorded in this region, newest first",
    responses((status = 200, description = r#"{"drills": [report, ...]}"#, body = Object))
)]
pub(super) async fn list(State(jm): State<JobManager>) -> Result<Json<DrillList>, ApiError> {
    Ok(Json(DrillList {
        drills: jm.drills().await?,
    }))
}

/// `GET /v1/drills/{id}`: one drill report.
#[utoipa::path(
    get,
    path = "/v1/drills/{id}",
    tag = "drills",
    summary = "one failover drill report",
    params(("id" = String, Path, description = "the drill's id")),
    responses(
        (status = 200, description = "the report", body = Object),
        (status = 404, description = "not_found", body = ErrorBody),
    )
)]
pub(super) async fn get(
    State(jm): State<JobManager>,
    id: Result<Path<String>, PathRejection>,
) -> Result<Json<DrillReport>, ApiError> {
    let Path(id) = id?;
    Ok(Json(jm.drill(&id).await?))
}
