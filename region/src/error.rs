//! Errors of the cross-region operations (switchover, fail-back, drills).
//! Each has a kind ([`RegionErrorKind`]) that maps to an HTTP status, and a
//! message that says what state the region and its jobs are in and what to
//! do.

use ferry_core::RegionEpoch;
use ferry_core::api::RegionErrorKind;

#[derive(Debug, thiserror::Error)]
pub enum RegionError {
    #[error("unknown region '{name}': known regions are {known}")]
    UnknownRegion { name: String, known: String },

    #[error("{region} is already the primary region (region epoch {epoch}){what}")]
    AlreadyPrimary {
        region: String,
        epoch: RegionEpoch,
        what: String,
    },

    #[error(
        "{what} runs on the leader of the primary region {primary}; send it there{}, or to any JobManager with the CLI, which finds the primary's leader itself",
        url.as_ref().map(|u| format!(" ({u})")).unwrap_or_default()
    )]
    NotPrimary {
        what: String,
        primary: String,
        url: Option<String>,
    },

    #[error(
        "this JobManager does not lead region {0}; send it to the region's leader (`ferry cluster status` shows it)"
    )]
    NotLeader(String),

    #[error("{0}")]
    Conflict(String),

    #[error("{0}")]
    GlobalUnavailable(String),

    #[error("{0}")]
    Store(String),

    #[error("{0}")]
    Timeout(String),

    #[error("{0}")]
    BadRequest(String),

    /// A setting that cannot work (the key and value are in the message).
    #[error("{0}")]
    Config(String),

    #[error(
        "cross-region failover is not configured here (regions.global and regions.stores, see docs/config.md)"
    )]
    NotConfigured,
}

impl RegionError {
    pub fn kind(&self) -> RegionErrorKind {
        match self {
            RegionError::UnknownRegion { .. } => RegionErrorKind::UnknownRegion,
            RegionError::AlreadyPrimary { .. } | RegionError::Conflict(_) => {
                RegionErrorKind::Conflict
            }
            RegionError::NotPrimary { .. } => RegionErrorKind::NotPrimaryRegion,
            RegionError::NotLeader(_) => RegionErrorKind::NotLeader,
            RegionError::GlobalUnavailable(_) => RegionErrorKind::GlobalUnavailable,
            RegionError::Store(_) => RegionErrorKind::Store,
            RegionError::Timeout(_) => RegionErrorKind::Timeout,
            RegionError::BadRequest(_) | RegionError::Config(_) => RegionErrorKind::BadRequest,
            RegionError::NotConfigured => RegionErrorKind::NotConfigured,
        }
    }
}
