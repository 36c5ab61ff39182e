//! `GET /v1/audit`, and the layer that records every mutating call the
//! JobManager carries out: it sits inside the forwarding layer, so the
//! leader records a forwarded call (naming the standby) and the standby
//! does not. Calls the gate refuses are recorded by the gate.

use axum::Json;
use axum::body::Body;
use axum::body::HttpBody as _;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, Request, State};
use axum::http::{Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse as _, Response};
use ferry_core::api::{AuditEntry, AuditList};
use serde::Deserialize;

use super::FORWARDED_BY_HEADER;
use super::error::{ApiError, ErrorBody};
use crate::auth::{Caller, Method as AuthMethod};
use crate::service::JobManager;

/// Largest answer read back to note its job id or error (answers of
/// mutating calls are small; a bigger one is recorded without them).
const MAX_ANSWER_BYTES: usize = 1024 * 1024;

/// Query of `GET /v1/audit`.
#[derive(Debug, Deserialize)]
pub(super) struct AuditQuery {
    limit: Option<usize>,
}

/// `GET /v1/audit[?limit=N]`: the newest entries of the trail.
#[utoipa::path(
    get,
    path = "/v1/audit",
    tag = "cluster",
    summary = "the audit trail: every mutating call, newest first (?limit=N, default 100, at most 1000)",
    params(("limit" = Option<usize>, Query, description = "entries to return (1 to 1000, default 100)")),
    responses(
        (status = 200, description = "newest first", body = AuditList),
        (status = 400, description = "invalid_request: a bad limit", body = ErrorBody),
    )
)]
pub(super) async fn list(
    State(jm): State<JobManager>,
    query: Result<Query<AuditQuery>, QueryRejection>,
) -> Result<Json<AuditList>, ApiError> {
    let Query(q) = query?;
    let limit = q.limit.unwrap_or(100);
    if limit == 0 || limit > crate::audit::MAX_ENTRIES {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            format!(
                "limit={limit} is out of range; give 1 to {}",
                crate::audit::MAX_ENTRIES
            ),
        ));
    }
    Ok(Json(AuditList {
        entries: jm.audit_entries(limit).await?,
    }))
}

fn auth_name(m: AuthMethod) -> &'static str {
    match m {
        AuthMethod::None => "none",
        AuthMethod::Token => "token",
        AuthMethod::Jwt => "jwt",
        AuthMethod::Certificate => "certificate",
    }
}

/// The job or region a path names: `/v1/jobs/{id}…`, `/v1/regions/{name}…`.
fn subject(path: &str) -> (Option<String>, Option<String>) {
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    match parts.as_slice() {
        ["v1", "jobs", id, ..] => (Some((*id).to_string()), None),
        ["v1", "regions", name, ..] => (None, Some((*name).to_string())),
        _ => (None, None),
    }
}

/// An entry for `caller`'s `method path`, answered `status`.
pub(super) fn entry(
    jm: &JobManager,
    caller: &Caller,
    method: &Method,
    path: &str,
    forwarded_by: Option<String>,
    status: StatusCode,
) -> AuditEntry {
    let (job, region) = subject(path);
    AuditEntry {
        at: chrono::Utc::now(),
        actor: caller.name.clone(),
        auth: auth_name(caller.method).to_string(),
        grants: caller.grants.iter().map(ToString::to_string).collect(),
        action: format!("{method} {path}"),
        job,
        region,
        status: status.as_u16(),
        result: if status.is_success() {
            "ok".into()
        } else {
            "error".into()
        },
        message: None,
        instance: jm.instance_id().to_string(),
        forwarded_by,
    }
}

/// Records every call but reads, once answered.
pub(super) async fn record(State(jm): State<JobManager>, req: Request, next: Next) -> Response {
    let method = req.method().clone();
    if matches!(method, Method::GET | Method::HEAD | Method::OPTIONS) {
        return next.run(req).await;
    }
    let path = req.uri().path().to_string();
    let caller = req
        .extensions()
        .get::<Caller>()
        .cloned()
        .unwrap_or_else(Caller::open);
    let forwarded_by = req
        .headers()
        .get(FORWARDED_BY_HEADER)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let res = next.run(req).await;
    let mut e = entry(&jm, &caller, &method, &path, forwarded_by, res.status());
    // Only an answer of known, small size is read (and then sent on as
    // read); any other goes on untouched.
    let small = res
        .body()
        .size_hint()
        .exact()
        .is_some_and(|n| n as usize <= MAX_ANSWER_BYTES);
    if !small {
        jm.audit(e).await;
        return res;
    }
    let (parts, body) = res.into_parts();
    let bytes = match axum::body::to_bytes(body, MAX_ANSWER_BYTES).await {
        Ok(b) => b,
        Err(err) => {
            e.message = Some(format!("the answer could not be read: {err}"));
            jm.audit(e).await;
            return ApiError::internal(&format!("{method} {path}")).into_response();
        }
    };
    if let Ok(v) = serde_json::from_slice::<serde_json::Value>(&bytes) {
        if let Some(err) = v.get("error") {
            if let Some(code) = err.get("code").and_then(|c| c.as_str()) {
                e.result = code.to_string();
            }
            e.message = err
                .get("message")
                .and_then(|m| m.as_str())
                .map(str::to_string);
        } else if e.job.is_none()
            && let Some(id) = v.get("id").and_then(|i| i.as_str())
        {
            // A submission: the job it created.
            e.job = Some(id.to_string());
        }
    }
    jm.audit(e).await;
    Response::from_parts(parts, Body::from(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_subject_of_a_call_is_read_from_its_path() {
        assert_eq!(subject("/v1/jobs/abc"), (Some("abc".into()), None));
        assert_eq!(
            subject("/v1/jobs/abc/savepoints"),
            (Some("abc".into()), None)
        );
        assert_eq!(
            subject("/v1/regions/west/failover"),
            (None, Some("west".into()))
        );
        assert_eq!(subject("/v1/jobs"), (None, None));
        assert_eq!(subject("/v1/drills/outage"), (None, None));
    }
}
