//! Identifiers that travel between processes: job ids and checkpoint numbers.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// A job's identity: one per submission (a resumed run keeps its id).
///
/// Rendered as a 32-digit lowercase hex string, like Apache Flink's JobID.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct JobId(uuid::Uuid);

impl JobId {
    /// A new, time-ordered id (UUID v7), so listings sort by submission time.
    pub fn new() -> Self {
        Self(uuid::Uuid::now_v7())
    }

    /// The first 8 hex digits, used in file names and tables.
    pub fn short(&self) -> String {
        self.to_string()[..8].to_string()
    }
}

impl Default for JobId {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Display for JobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0.simple())
    }
}

impl FromStr for JobId {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        uuid::Uuid::parse_str(s)
            .map(JobId)
            .map_err(|_| format!("'{s}' is not a job id (expected 32 hex digits)"))
    }
}

impl TryFrom<String> for JobId {
    type Error = String;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<JobId> for String {
    fn from(id: JobId) -> String {
        id.to_string()
    }
}

/// A checkpoint or savepoint number: strictly increasing within a job, never
/// reused, also after a restore (a new run continues above every number that
/// has a directory in storage).
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, Default,
)]
#[serde(transparent)]
pub struct CheckpointId(pub u64);

impl CheckpointId {
    pub fn next(self) -> Self {
        Self(self.0 + 1)
    }
}

impl fmt::Display for CheckpointId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn job_id_round_trips_through_its_string_form() {
        let id = JobId::new();
        let s = id.to_string();
        assert_eq!(s.len(), 32);
        assert_eq!(s.parse::<JobId>().unwrap(), id);
        assert!("not-an-id".parse::<JobId>().is_err());
    }
}
