//! The one error shape of the REST API and how every failure becomes it.
//!
//! Invariant: every non-2xx response the API sends — from a handler, an
//! extractor rejection, a fallback or a caught panic — is an [`ErrorBody`]
//! built here, so clients parse a single format.

use axum::Json;
use axum::extract::rejection::{BytesRejection, PathRejection, QueryRejection};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use ferry_core::CoreError;
use ferry_core::spec::SpecErrors;

use crate::error::JmError;
pub use ferry_core::api::{ErrorBody, ErrorDetail, ErrorObject};

/// An error on its way to becoming an HTTP response.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub body: ErrorObject,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &str, message: impl Into<String>) -> Self {
        Self {
            status,
            body: ErrorObject {
                code: code.to_string(),
                message: message.into(),
                details: Vec::new(),
            },
        }
    }

    pub fn with_details(mut self, details: Vec<ErrorDetail>) -> Self {
        self.body.details = details;
        self
    }

    /// 400 for a spec that failed to parse or validate, one detail per problem.
    fn invalid_spec(errs: &SpecErrors) -> Self {
        let n = errs.0.len();
        let message = if n == 1 {
            "the job spec has 1 problem; fix it and submit again (check locally with `ferry validate FILE`)".to_string()
        } else {
            format!(
                "the job spec has {n} problems; fix them and submit again (check locally with `ferry validate FILE`)"
            )
        };
        let details = errs
            .0
            .iter()
            .map(|e| ErrorDetail {
                path: Some(e.path.clone()),
                line: e.line,
                column: e.column,
                message: e.message.clone(),
            })
            .collect();
        Self::new(StatusCode::BAD_REQUEST, "invalid_spec", message).with_details(details)
    }

    /// 500 for a handler that panicked; the panic is logged, not sent.
    pub fn internal(what: &str) -> Self {
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal_error",
            format!(
                "internal error while handling {what}; the JobManager log has the cause. Retry, and report it if it repeats"
            ),
        )
    }
}

impl From<JmError> for ApiError {
    fn from(e: JmError) -> Self {
        let status = match &e {
            JmError::NotFound(_) => StatusCode::NOT_FOUND,
            JmError::InvalidSpec(errs) => return Self::invalid_spec(errs),
            JmError::LocationNotAllowed(problems) => {
                let n = problems.len();
                let details = problems
                    .iter()
                    .map(|(field, message)| ErrorDetail {
                        path: Some(field.to_string()),
                        line: None,
                        column: None,
                        message: message.clone(),
                    })
                    .collect();
                return Self::new(
                    StatusCode::FORBIDDEN,
                    e.code(),
                    format!(
                        "the job names {n} location{} its namespace may not use; use locations under the allowed roots, or ask an operator to allow them (security.allowedUrls, security.namespaces.<namespace>.allowedUrls)",
                        if n == 1 { "" } else { "s" }
                    ),
                )
                .with_details(details);
            }
            JmError::Storage(CoreError::Spec(errs)) => return Self::invalid_spec(errs),
            JmError::WrongState { .. } => StatusCode::CONFLICT,
            // The object store behind us failed: a gateway problem, not ours.
            JmError::Storage(CoreError::Store { .. }) => StatusCode::BAD_GATEWAY,
            JmError::Storage(_) => StatusCode::INTERNAL_SERVER_ERROR,
            JmError::Runtime(_) => StatusCode::INTERNAL_SERVER_ERROR,
            JmError::ShuttingDown => StatusCode::SERVICE_UNAVAILABLE,
            JmError::NotLeader { .. } => StatusCode::SERVICE_UNAVAILABLE,
            JmError::NotPrimaryRegion { .. } => StatusCode::CONFLICT,
            JmError::BadRequest(_) => StatusCode::BAD_REQUEST,
            JmError::Missing(_) => StatusCode::NOT_FOUND,
            JmError::Region { kind, .. } => {
                StatusCode::from_u16(kind.status()).unwrap_or(StatusCode::CONFLICT)
            }
        };
        Self::new(status, e.code(), e.to_string())
    }
}

impl From<BytesRejection> for ApiError {
    fn from(r: BytesRejection) -> Self {
        let status = r.status();
        if status == StatusCode::PAYLOAD_TOO_LARGE {
            Self::new(
                status,
                "payload_too_large",
                format!(
                    "the request body is larger than {} MiB; job specs must be smaller (move large data into storage and reference it)",
                    super::MAX_BODY_BYTES / (1024 * 1024)
                ),
            )
        } else {
            Self::new(
                status,
                "invalid_body",
                format!("could not read the request body: {}", r.body_text()),
            )
        }
    }
}

impl From<PathRejection> for ApiError {
    fn from(r: PathRejection) -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            format!("invalid path: {}", r.body_text()),
        )
    }
}

impl From<QueryRejection> for ApiError {
    fn from(r: QueryRejection) -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            format!("invalid query string: {}", r.body_text()),
        )
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if self.status.is_server_error() {
            tracing::error!(status = %self.status, code = %self.body.code, "{}", self.body.message);
        } else {
            tracing::debug!(status = %self.status, code = %self.body.code, "{}", self.body.message);
        }
        (self.status, Json(ErrorBody { error: self.body })).into_response()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_core::spec::SpecError;

    #[test]
    fn every_spec_problem_becomes_a_detail() {
        let errs = SpecErrors(vec![
            SpecError {
                path: "spec.parallelism".into(),
                line: Some(4),
                column: Some(16),
                message: "must be at least 1".into(),
            },
            SpecError {
                path: "spec.sink".into(),
                line: None,
                column: None,
                message: "missing".into(),
            },
        ]);
        let e = ApiError::from(JmError::InvalidSpec(errs));
        assert_eq!(e.status, StatusCode::BAD_REQUEST);
        assert_eq!(e.body.code, "invalid_spec");
        assert_eq!(e.body.details.len(), 2);
        assert_eq!(
            e.body.details[0].to_string(),
            "line 4, column 16: spec.parallelism: must be at least 1"
        );
        assert_eq!(e.body.details[1].to_string(), "spec.sink: missing");
    }

    #[test]
    fn job_manager_errors_map_to_statuses() {
        let cases = [
            (JmError::NotFound("x".into()), StatusCode::NOT_FOUND),
            (
                JmError::Runtime("x".into()),
                StatusCode::INTERNAL_SERVER_ERROR,
            ),
            (JmError::ShuttingDown, StatusCode::SERVICE_UNAVAILABLE),
            (
                JmError::Storage(CoreError::Other("x".into())),
                StatusCode::INTERNAL_SERVER_ERROR,
            ),
            (
                JmError::WrongState {
                    job: ferry_core::JobId::new(),
                    state: crate::state::JobState::Finished,
                    action: "it has already ended".into(),
                },
                StatusCode::CONFLICT,
            ),
        ];
        for (e, status) in cases {
            let code = e.code();
            let api = ApiError::from(e);
            assert_eq!(api.status, status, "{code}");
            assert_eq!(api.body.code, code);
        }
    }
}
