//! Probes and metrics: `/healthz` (the process answers), `/readyz` (it can
//! take jobs) and `/metrics` (Prometheus text).

use axum::Json;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use serde_json::json;

use super::error::{ApiError, ErrorBody};
use crate::service::JobManager;

/// Content type of the Prometheus text exposition format.
pub const PROMETHEUS_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Liveness: 200 whenever the process can answer at all.
#[utoipa::path(
    get,
    path = "/healthz",
    tag = "health",
    summary = "liveness",
    responses((status = 200, description = r#"{"status":"ok"}"#, body = Object))
)]
pub(super) async fn healthz() -> impl IntoResponse {
    Json(json!({"status": "ok"}))
}

/// Readiness: 200 while the JobManager accepts jobs, 503 otherwise (starting
/// up or shutting down), so load balancers route around it.
#[utoipa::path(
    get,
    path = "/readyz",
    tag = "health",
    summary = "readiness (503 while not accepting jobs)",
    responses(
        (status = 200, description = r#"{"status":"ready"}"#, body = Object),
        (status = 503, description = "unavailable: starting or shutting down", body = ErrorBody),
    )
)]
pub(super) async fn readyz(State(jm): State<JobManager>) -> Result<impl IntoResponse, ApiError> {
    if jm.is_ready() {
        Ok(Json(json!({"status": "ready"})))
    } else {
        Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            "the job manager is not ready to accept jobs (starting or shutting down); retry shortly or use another instance",
        ))
    }
}

/// Every metric in the Prometheus text format.
#[utoipa::path(
    get,
    path = "/metrics",
    tag = "health",
    summary = "Prometheus metrics",
    responses((status = 200, description = "Prometheus text format", body = String, content_type = "text/plain; version=0.0.4"))
)]
pub(super) async fn metrics(State(jm): State<JobManager>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, PROMETHEUS_CONTENT_TYPE)],
        jm.metrics().encode(),
    )
}
