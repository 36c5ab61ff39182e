//! The failover drill report: what `ferry drill run` measured, recorded with
//! `POST /v1/drills` in the region the jobs went to and served by
//! `GET /v1/drills[/{id}]`.
//!
//! Invariant: the fields are those of the reports recorded so far, so every
//! stored report still parses; fields a report has beyond these are kept
//! as they are (`extra`), and every field but `id` and `passed` may be
//! missing (it then reads as its default).

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::{CheckpointInfo, CheckpointMark, SwitchoverReport};

/// One failover drill's measurements and verdict.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct DrillReport {
    /// Letters, digits and `-`, 1 to 64 of them (a UUID).
    pub id: String,
    /// `region-outage` or `switchover`.
    #[serde(default)]
    pub scenario: String,
    /// The primary region the drill failed over from.
    #[serde(default)]
    pub from: String,
    /// The region that took over (the target, unless another won or none
    /// did).
    #[serde(default)]
    pub to: String,
    /// The region the drill wanted to take over.
    #[serde(default)]
    pub target: String,
    /// The region epoch after the failover (before it, if none happened).
    #[serde(default)]
    pub region_epoch: u64,
    #[serde(default)]
    pub started_at: Option<DateTime<Utc>>,
    #[serde(default)]
    pub jobs: Vec<DrillJob>,
    /// From the start of the drill: until the target saw the primary down.
    #[serde(default)]
    pub detection_ms: Option<u64>,
    /// ... until the region lease named another region.
    #[serde(default)]
    pub promotion_ms: Option<u64>,
    /// ... until every job ran there.
    #[serde(default)]
    pub restore_ms: Option<u64>,
    /// ... until every job had committed output there.
    #[serde(default)]
    pub first_output_ms: Option<u64>,
    /// The recovery time (`None` when the drill failed before recovery).
    #[serde(default)]
    pub rto_ms: Option<u64>,
    /// Input records the primary had committed beyond what the target
    /// restored (all jobs).
    #[serde(default)]
    pub rpo_records: u64,
    /// Output records the primary had committed beyond what the target
    /// restored (all jobs).
    #[serde(default)]
    pub rpo_records_out: u64,
    /// Event time the primary had committed beyond what the target
    /// restored (the largest over the jobs).
    #[serde(default)]
    pub rpo_event_time_ms: i64,
    #[serde(default)]
    pub targets: DrillTargets,
    /// The primary's replication mode when the drill started: `async`,
    /// `sync`, or `sync (blocked)` / `sync (degraded)` when synchronous
    /// replication was not in sync (`None`: an older Ferry, or unknown).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replication: Option<String>,
    /// The target region's standby mode when the drill started: `cold`, or
    /// `hot (N of M jobs held)` (`None`: an older Ferry, or unknown).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub standby: Option<String>,
    pub passed: bool,
    /// Why the drill failed, one line each.
    #[serde(default)]
    pub failures: Vec<String>,
    /// The fail-back afterwards (`--revert`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revert: Option<DrillRevert>,
    /// Who recorded the report: the authenticated caller of
    /// `POST /v1/drills` (a token's name or a JWT's `sub`; `anonymous`
    /// without `api.auth`). Set by the JobManager, never taken from the
    /// body.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub actor: Option<String>,
    /// Fields of a report this version does not know, kept as they are.
    #[serde(flatten)]
    pub extra: BTreeMap<String, serde_json::Value>,
}

/// What the drill was judged against.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct DrillTargets {
    #[serde(default)]
    pub rto_ms: u64,
    #[serde(default)]
    pub rpo_event_time_ms: u64,
    #[serde(default)]
    pub rpo_records: Option<u64>,
}

/// One job's way through a drill.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct DrillJob {
    pub job: String,
    /// The primary's last committed checkpoint when its jobs stopped.
    #[serde(default)]
    pub primary_last_checkpoint: Option<DrillCheckpoint>,
    /// The checkpoint the job ran from in the region that took over.
    #[serde(default)]
    pub restored_checkpoint: Option<DrillCheckpoint>,
    #[serde(default)]
    pub restore_ms: Option<u64>,
    #[serde(default)]
    pub first_output_ms: Option<u64>,
    #[serde(default)]
    pub rpo_records: u64,
    #[serde(default)]
    pub rpo_records_out: u64,
    #[serde(default)]
    pub rpo_event_time_ms: i64,
}

/// A checkpoint as a drill saw it: the whole record from a job's
/// `last_checkpoint`, or the mark a simulated outage reported.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum DrillCheckpoint {
    Info(CheckpointInfo),
    Mark(CheckpointMark),
}

impl DrillCheckpoint {
    pub fn id(&self) -> u64 {
        match self {
            DrillCheckpoint::Info(c) => c.id,
            DrillCheckpoint::Mark(c) => c.id,
        }
    }

    pub fn records_in(&self) -> u64 {
        match self {
            DrillCheckpoint::Info(c) => c.records_in,
            DrillCheckpoint::Mark(c) => c.records_in,
        }
    }

    pub fn records_out(&self) -> u64 {
        match self {
            DrillCheckpoint::Info(c) => c.records_out,
            DrillCheckpoint::Mark(c) => c.records_out,
        }
    }

    /// RFC 3339, if any record was seen.
    pub fn watermark(&self) -> Option<&str> {
        match self {
            DrillCheckpoint::Info(c) => c.watermark.as_deref(),
            DrillCheckpoint::Mark(c) => c.watermark.as_deref(),
        }
    }
}

/// A drill's fail-back: its answer, or why it did not happen.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum DrillRevert {
    Failed { error: String },
    Done(Box<SwitchoverReport>),
}

/// The body of `GET /v1/drills`.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct DrillList {
    /// Newest first.
    pub drills: Vec<DrillReport>,
}

/// Why `POST /v1/drills` refuses a body.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DrillReportError {
    /// The body is not JSON.
    NotJson(String),
    /// Something else is wrong (no valid `id`, no `passed`, a field of the
    /// wrong type).
    Invalid(String),
}

impl DrillReport {
    /// Parses a report as `POST /v1/drills` takes it: JSON with an `id` of
    /// 1 to 64 letters, digits or `-`, and `passed`.
    pub fn from_json(body: &[u8]) -> Result<Self, DrillReportError> {
        let raw: serde_json::Value =
            serde_json::from_slice(body).map_err(|e| DrillReportError::NotJson(e.to_string()))?;
        // Checked first, so that the answer names what every report needs.
        let id = raw.get("id").and_then(|v| v.as_str()).unwrap_or_default();
        check_id(id).map_err(DrillReportError::Invalid)?;
        if !raw.get("passed").is_some_and(|v| v.is_boolean()) {
            return Err(DrillReportError::Invalid(
                "a drill report needs \"passed\": true or false".into(),
            ));
        }
        serde_json::from_value(raw)
            .map_err(|e| DrillReportError::Invalid(format!("an invalid drill report: {e}")))
    }

    /// Checks what every recorded report must have: its id.
    pub fn validate(&self) -> Result<(), String> {
        check_id(&self.id)
    }
}

/// A drill id: 1 to 64 letters, digits or `-` (it names a file).
fn check_id(id: &str) -> Result<(), String> {
    if id.is_empty() || id.len() > 64 || !is_drill_id(id) {
        return Err("a drill report needs an \"id\" of 1 to 64 letters, digits or '-'".into());
    }
    Ok(())
}

/// Whether `id` has only the characters of a drill id.
pub fn is_drill_id(id: &str) -> bool {
    id.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports_need_an_id_and_passed() {
        let ok = DrillReport::from_json(br#"{"id": "d-1", "passed": true, "rto_ms": 5, "new": 1}"#)
            .unwrap();
        assert!(ok.passed);
        assert_eq!(ok.rto_ms, Some(5));
        assert_eq!(ok.extra["new"], 1);
        let bad = |b: &[u8]| DrillReport::from_json(b).unwrap_err();
        assert!(matches!(bad(b"nope"), DrillReportError::NotJson(_)));
        assert!(
            matches!(bad(br#"{"passed": true}"#), DrillReportError::Invalid(m) if m.contains("\"id\""))
        );
        assert!(
            matches!(bad(br#"{"id": "a/b", "passed": true}"#), DrillReportError::Invalid(m) if m.contains("\"id\""))
        );
        assert!(
            matches!(bad(br#"{"id": "a"}"#), DrillReportError::Invalid(m) if m.contains("\"passed\""))
        );
    }

    #[test]
    fn a_recorded_report_reads_back_as_it_was_written() {
        let text = r#"{"detection_ms":2100,"failures":[],"first_output_ms":4000,"from":"east",
            "id":"0b6c","jobs":[{"first_output_ms":4000,"job":"01a2",
            "primary_last_checkpoint":{"id":7,"records_in":10,"records_out":3,"watermark":null},
            "restore_ms":3000,"restored_checkpoint":{"completed_at":"2025-01-01T00:00:00Z",
            "duration_ms":5,"finished":false,"id":6,"kind":"checkpoint","path":"file:///x",
            "records_in":8,"records_out":2,"size_bytes":10,"watermark":null},
            "rpo_event_time_ms":0,"rpo_records":2,"rpo_records_out":1}],"passed":true,
            "promotion_ms":2500,"region_epoch":2,"restore_ms":3000,"rpo_event_time_ms":0,
            "rpo_records":2,"rpo_records_out":1,"rto_ms":4000,"scenario":"region-outage",
            "started_at":"2025-01-01T00:00:00Z","target":"west",
            "targets":{"rpo_event_time_ms":0,"rpo_records":null,"rto_ms":30000},"to":"west",
            "revert":{"error":"east did not become healthy again"}}"#;
        let raw: serde_json::Value = serde_json::from_str(text).unwrap();
        let r: DrillReport = serde_json::from_value(raw.clone()).unwrap();
        assert!(matches!(
            r.jobs[0].primary_last_checkpoint,
            Some(DrillCheckpoint::Mark(_))
        ));
        assert!(matches!(
            r.jobs[0].restored_checkpoint,
            Some(DrillCheckpoint::Info(_))
        ));
        assert_eq!(serde_json::to_value(&r).unwrap(), raw);
    }
}
