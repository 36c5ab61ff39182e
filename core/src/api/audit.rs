//! Bodies of the audit trail: one [`AuditEntry`] per mutating API call.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// One mutating API call: who, with which grants, what, on which job or
/// region, and how it ended.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
pub struct AuditEntry {
    /// When the answer was sent.
    pub at: DateTime<Utc>,
    /// The caller: a static token's name, a JWT's `sub`, a client
    /// certificate's identity, or `anonymous` when the API is open.
    pub actor: String,
    /// How the caller authenticated: `token`, `jwt`, `certificate` or
    /// `none`.
    pub auth: String,
    /// The caller's grants (`namespace:role`).
    #[serde(default)]
    pub grants: Vec<String>,
    /// `METHOD /path` as called.
    pub action: String,
    /// The job the call named or created, if any.
    #[serde(default)]
    pub job: Option<String>,
    /// The region the call named, if any.
    #[serde(default)]
    pub region: Option<String>,
    /// HTTP status of the answer.
    pub status: u16,
    /// `ok`, or the error code of the answer (`forbidden`, `conflict`, …).
    pub result: String,
    /// The error message, for a refused or failed call.
    #[serde(default)]
    pub message: Option<String>,
    /// The JobManager that carried the call out.
    pub instance: String,
    /// The standby that forwarded the call, if one did.
    #[serde(default)]
    pub forwarded_by: Option<String>,
}

/// Body of `GET /v1/audit`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
pub struct AuditList {
    /// Newest first.
    pub entries: Vec<AuditEntry>,
}
