//! `/v1/jobs...`: submit, list, get, cancel, savepoint, checkpoints. Each
//! handler checks the caller's role in the job's namespace, turns HTTP into
//! one [`JobManager`] call and its result back into JSON; no job logic
//! lives here.

use axum::Extension;
use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::IntoResponse;
use serde::Deserialize;

use super::auth::require;
use super::error::{ApiError, ErrorBody, ErrorDetail};
use crate::auth::{Caller, Role};
use crate::model::{JobInfo, SavepointInfo};
use crate::service::JobManager;
pub use ferry_core::api::{CancelResponse, CheckpointList, JobList};

/// Query of `DELETE /v1/jobs/{id}`.
#[derive(Debug, Deserialize)]
pub(super) struct CancelQuery {
    savepoint: Option<String>,
}

/// Reads a boolean query flag: `true`/`1`/`yes`/empty (`?savepoint`) are
/// true, `false`/`0`/`no` false.
pub(super) fn parse_flag(name: &str, value: Option<&str>) -> Result<bool, ApiError> {
    match value.map(|v| v.trim().to_ascii_lowercase()).as_deref() {
        None | Some("false" | "0" | "no") => Ok(false),
        Some("" | "true" | "1" | "yes") => Ok(true),
        Some(other) => Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            format!(
                "query parameter {name}={other:?} is not a boolean; use {name}=true or {name}=false"
            ),
        )),
    }
}

/// The job id from the path, or a 400 saying why it could not be read.
fn job_key(path: Result<Path<String>, PathRejection>) -> Result<String, ApiError> {
    let Path(id) = path?;
    Ok(id)
}

/// Spec text from a request body: UTF-8, not empty.
fn spec_text(body: &[u8]) -> Result<&str, ApiError> {
    let text = std::str::from_utf8(body).map_err(|e| {
        let at = e.valid_up_to();
        let before = &body[..at];
        let line = before.iter().filter(|b| **b == b'\n').count() + 1;
        let line_start = before
            .iter()
            .rposition(|b| *b == b'\n')
            .map_or(0, |p| p + 1);
        let column = String::from_utf8_lossy(&before[line_start..])
            .chars()
            .count()
            + 1;
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_body",
            "the request body is not valid UTF-8; send the job spec as UTF-8 YAML or JSON text",
        )
        .with_details(vec![ErrorDetail {
            line: Some(line),
            column: Some(column),
            message: format!("invalid UTF-8 at byte offset {at}"),
            ..ErrorDetail::default()
        }])
    })?;
    if text.trim().is_empty() {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_body",
            "the request body is empty; send the job spec (YAML or JSON) as the body, e.g. `curl --data-binary @job.yaml`",
        ));
    }
    Ok(text)
}

/// `POST /v1/jobs`: 201 with the new job and its `Location`.
#[utoipa::path(
    post,
    path = "/v1/jobs",
    tag = "jobs",
    summary = "submit a job (body: YAML or JSON spec)",
    description = "The body is the job spec, YAML or JSON (detected; any content type). It is validated before anything starts; every problem is reported at once.",
    request_body(content = String, content_type = "application/yaml", description = "the job spec (YAML or JSON), at most 4 MiB"),
    responses(
        (status = 201, description = "the job was accepted", body = JobInfo, headers(("location" = String, description = "/v1/jobs/{id}"))),
        (status = 400, description = "invalid_spec or invalid_body: one detail per problem", body = ErrorBody),
        (status = 409, description = "not_primary_region: this region runs no jobs", body = ErrorBody),
        (status = 413, description = "payload_too_large", body = ErrorBody),
        (status = 503, description = "not_leader or unavailable: retry against another JobManager", body = ErrorBody),
    )
)]
#[tracing::instrument(skip_all, fields(content_type))]
pub(super) async fn submit(
    State(jm): State<JobManager>,
    Extension(caller): Extension<Caller>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<impl IntoResponse, ApiError> {
    // Any content type is accepted: the parser tells JSON from YAML itself.
    if let Some(ct) = headers.get(header::CONTENT_TYPE) {
        tracing::Span::current().record("content_type", ct.to_str().unwrap_or("?"));
    }
    let body = body?;
    let text = spec_text(&body)?;
    let spec = crate::service::parse_off_the_workers(text).await?;
    require(
        &caller,
        "submitting a job",
        Role::Operator,
        spec.metadata.namespace(),
    )?;
    let info = jm.submit_spec(spec, Default::default()).await?;
    let location = format!("/v1/jobs/{}", info.id);
    Ok((
        StatusCode::CREATED,
        [(header::LOCATION, location)],
        Json(info),
    ))
}

/// `GET /v1/jobs`: every job the caller may view, newest first.
#[utoipa::path(
    get,
    path = "/v1/jobs",
    tag = "jobs",
    summary = "list jobs, newest first",
    responses((status = 200, description = "every job in a namespace the caller may view", body = JobList))
)]
pub(super) async fn list(
    State(jm): State<JobManager>,
    Extension(caller): Extension<Caller>,
) -> Json<JobList> {
    let jobs = jm
        .list()
        .into_iter()
        .filter(|j| caller.may(Role::Viewer, &j.namespace))
        .collect();
    Json(JobList { jobs })
}

/// The job `key` names, if the caller holds `role` in its namespace.
fn job_for(
    jm: &JobManager,
    caller: &Caller,
    key: &str,
    what: &str,
    role: Role,
) -> Result<JobInfo, ApiError> {
    let job = jm.get(key)?;
    require(
        caller,
        &format!("{what} job {}", job.name),
        role,
        &job.namespace,
    )?;
    Ok(job)
}

/// `GET /v1/jobs/{id}`: one job by id, unique id prefix or name.
#[utoipa::path(
    get,
    path = "/v1/jobs/{id}",
    tag = "jobs",
    summary = "one job by id, id prefix or name",
    params(("id" = String, Path, description = "job id (32 hex digits), a unique prefix of at least 4, or the job's name (newest of that name)")),
    responses(
        (status = 200, description = "the job", body = JobInfo),
        (status = 404, description = "not_found", body = ErrorBody),
    )
)]
pub(super) async fn get(
    State(jm): State<JobManager>,
    Extension(caller): Extension<Caller>,
    id: Result<Path<String>, PathRejection>,
) -> Result<Json<JobInfo>, ApiError> {
    let id = job_key(id)?;
    Ok(Json(job_for(&jm, &caller, &id, "viewing", Role::Viewer)?))
}

/// `DELETE /v1/jobs/{id}[?savepoint=true]`: stops the job, after a savepoint
/// when asked, and answers once it has stopped.
#[utoipa::path(
    delete,
    path = "/v1/jobs/{id}",
    tag = "jobs",
    summary = "cancel a job (?savepoint=true to take a savepoint first)",
    params(
        ("id" = String, Path, description = "job id, unique prefix or name"),
        ("savepoint" = Option<bool>, Query, description = "take a savepoint before stopping (true, 1, yes or empty)"),
    ),
    responses(
        (status = 200, description = "the job has stopped", body = CancelResponse),
        (status = 400, description = "invalid_request: a bad query", body = ErrorBody),
        (status = 404, description = "not_found", body = ErrorBody),
        (status = 409, description = "conflict: the job has already ended", body = ErrorBody),
    )
)]
#[tracing::instrument(skip_all, fields(job, savepoint))]
pub(super) async fn cancel(
    State(jm): State<JobManager>,
    Extension(caller): Extension<Caller>,
    id: Result<Path<String>, PathRejection>,
    query: Result<Query<CancelQuery>, QueryRejection>,
) -> Result<Json<CancelResponse>, ApiError> {
    let id = job_key(id)?;
    let Query(q) = query?;
    let with_savepoint = parse_flag("savepoint", q.savepoint.as_deref())?;
    // By id from here on: the name could come to mean a newer job.
    let id = job_for(&jm, &caller, &id, "cancelling", Role::Operator)?
        .id
        .to_string();
    let span = tracing::Span::current();
    span.record("job", id.as_str());
    span.record("savepoint", with_savepoint);
    let (job, savepoint) = jm.cancel(&id, with_savepoint).await?;
    Ok(Json(CancelResponse { job, savepoint }))
}

/// `POST /v1/jobs/{id}/savepoints`: a savepoint of a running job, which keeps
/// running.
#[utoipa::path(
    post,
    path = "/v1/jobs/{id}/savepoints",
    tag = "jobs",
    summary = "take a savepoint of a running job",
    params(("id" = String, Path, description = "job id, unique prefix or name")),
    responses(
        (status = 201, description = "the savepoint is complete (its manifest written)", body = SavepointInfo),
        (status = 404, description = "not_found", body = ErrorBody),
        (status = 409, description = "conflict: the job is not running", body = ErrorBody),
    )
)]
#[tracing::instrument(skip_all, fields(job))]
pub(super) async fn savepoint(
    State(jm): State<JobManager>,
    Extension(caller): Extension<Caller>,
    id: Result<Path<String>, PathRejection>,
) -> Result<impl IntoResponse, ApiError> {
    let id = job_key(id)?;
    let id = job_for(&jm, &caller, &id, "taking a savepoint of", Role::Operator)?
        .id
        .to_string();
    tracing::Span::current().record("job", id.as_str());
    let sp = jm.savepoint(&id).await?;
    Ok((StatusCode::CREATED, Json(sp)))
}

/// `GET /v1/jobs/{id}/checkpoints`: completed checkpoints and savepoints.
#[utoipa::path(
    get,
    path = "/v1/jobs/{id}/checkpoints",
    tag = "jobs",
    summary = "completed checkpoints and savepoints of a job",
    params(("id" = String, Path, description = "job id, unique prefix or name")),
    responses(
        (status = 200, description = "newest first; savepoints have kind savepoint", body = CheckpointList),
        (status = 404, description = "not_found", body = ErrorBody),
    )
)]
pub(super) async fn checkpoints(
    State(jm): State<JobManager>,
    Extension(caller): Extension<Caller>,
    id: Result<Path<String>, PathRejection>,
) -> Result<Json<CheckpointList>, ApiError> {
    let id = job_key(id)?;
    let id = job_for(
        &jm,
        &caller,
        &id,
        "viewing the checkpoints of",
        Role::Viewer,
    )?
    .id
    .to_string();
    Ok(Json(CheckpointList {
        checkpoints: jm.checkpoints(&id).await?,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_parse_leniently_but_reject_nonsense() {
        assert!(!parse_flag("savepoint", None).unwrap());
        assert!(parse_flag("savepoint", Some("")).unwrap());
        assert!(parse_flag("savepoint", Some("TRUE")).unwrap());
        assert!(!parse_flag("savepoint", Some("0")).unwrap());
        let e = parse_flag("savepoint", Some("maybe")).unwrap_err();
        assert_eq!(e.status, StatusCode::BAD_REQUEST);
    }

    #[test]
    fn non_utf8_body_is_located() {
        let e = spec_text(b"a: 1\nb: \xff\n").unwrap_err();
        assert_eq!(e.body.code, "invalid_body");
        assert_eq!(e.body.details[0].line, Some(2));
        assert_eq!(e.body.details[0].column, Some(4));
        assert!(spec_text(b" \n").is_err());
        assert_eq!(spec_text(b"a: 1").unwrap(), "a: 1");
    }
}
