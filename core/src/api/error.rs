//! The one error shape of the REST API: every non-2xx response is an
//! [`ErrorBody`], so clients parse a single format.

use serde::{Deserialize, Serialize};

/// The JSON body of every error response:
/// `{"error": {"code": "...", "message": "...", "details": [...]}}`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
pub struct ErrorBody {
    pub error: ErrorObject,
}

/// What went wrong, for machines (`code`) and for people (`message`).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
pub struct ErrorObject {
    /// Stable machine-readable code, e.g. `not_found`, `invalid_spec`.
    pub code: String,
    /// One sentence saying what happened and what to do about it.
    pub message: String,
    /// Individual problems (every spec problem, the available routes, ...).
    #[serde(default)]
    pub details: Vec<ErrorDetail>,
}

/// One problem, located by field path and line/column where that applies.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
pub struct ErrorDetail {
    /// Dotted field path in the submitted spec, e.g. `spec.operators[1].window`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// 1-based line in the submitted text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub line: Option<usize>,
    /// 1-based column in the submitted text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub column: Option<usize>,
    pub message: String,
}

impl ErrorDetail {
    /// A detail that is only a message.
    pub fn message(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            ..Self::default()
        }
    }
}

impl std::fmt::Display for ErrorDetail {
    /// `line 3, column 7: spec.source: message`, leaving out what is unknown.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (self.line, self.column) {
            (Some(l), Some(c)) => write!(f, "line {l}, column {c}: ")?,
            (Some(l), None) => write!(f, "line {l}: ")?,
            _ => {}
        }
        match self.path.as_deref() {
            Some(p) if !p.is_empty() => write!(f, "{p}: {}", self.message),
            _ => f.write_str(&self.message),
        }
    }
}
