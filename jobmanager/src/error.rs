//! JobManager errors. Each maps to one HTTP status and a JSON body whose
//! message tells the caller what to do.

use ferry_core::JobId;
use ferry_core::spec::SpecErrors;
use thiserror::Error;

use crate::state::JobState;

#[derive(Debug, Error)]
pub enum JmError {
    #[error("job '{0}' not found; list jobs with `ferry job list`")]
    NotFound(String),

    #[error("invalid job spec:\n{0}")]
    InvalidSpec(SpecErrors),

    #[error("job {job} is {state}; {action}")]
    WrongState {
        job: JobId,
        state: JobState,
        action: String,
    },

    #[error("storage error: {0}")]
    Storage(#[from] ferry_core::CoreError),

    #[error("{0}")]
    Runtime(String),

    #[error("the job manager is shutting down; retry against another instance")]
    ShuttingDown,

    #[error("this job manager is not the leader{}; send writes to the leader (the CLI does this when given every JobManager in --url) or retry shortly", match leader { Some(l) => format!(" (the leader is at {l})"), None => " and no leader is known yet".to_string() })]
    NotLeader { leader: Option<String> },

    #[error(
        "region {region} is a standby region; jobs run in the primary region {primary}: submit there (`ferry region status` lists the regions)"
    )]
    NotPrimaryRegion { region: String, primary: String },

    #[error("{0}")]
    BadRequest(String),

    /// Something other than a job that does not exist.
    #[error("{0}")]
    Missing(String),

    /// A cross-region operation that cannot be carried out now.
    #[error("{message}")]
    Region {
        kind: ferry_core::api::RegionErrorKind,
        message: String,
    },

    /// The spec names locations its namespace may not use: (spec field,
    /// why) per problem.
    #[error("the job may not use these locations:\n{}", .0.iter().map(|(f, m)| format!("  {f}: {m}")).collect::<Vec<_>>().join("\n"))]
    LocationNotAllowed(Vec<(&'static str, String)>),
}

impl JmError {
    /// Stable machine-readable code used in API error bodies.
    pub fn code(&self) -> &'static str {
        match self {
            JmError::NotFound(_) => "not_found",
            JmError::InvalidSpec(_) => "invalid_spec",
            JmError::WrongState { .. } => "conflict",
            JmError::Storage(_) => "storage_error",
            JmError::Runtime(_) => "runtime_error",
            JmError::ShuttingDown => "unavailable",
            JmError::NotLeader { .. } => "not_leader",
            JmError::NotPrimaryRegion { .. } => "not_primary_region",
            JmError::BadRequest(_) => "bad_request",
            JmError::Missing(_) => "not_found",
            JmError::Region { kind, .. } => kind.code(),
            JmError::LocationNotAllowed(_) => "location_not_allowed",
        }
    }
}

impl From<crate::model::RegionFailure> for JmError {
    fn from(f: crate::model::RegionFailure) -> Self {
        JmError::Region {
            kind: f.kind,
            message: f.message,
        }
    }
}
