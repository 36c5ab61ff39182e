//! Bodies of the job endpoints (`/v1/jobs...`): a job's summary, its
//! checkpoints and savepoints, and the job lifecycle state with its
//! transition table (the one place that says which state may follow which).
//!
//! The table binds the JobManager that drives a job. A JobManager that only
//! mirrors a job from the job store (a standby) copies the state the driver
//! recorded, which may skip steps it did not see; that copy is the one
//! other, documented path (the JobManager's `job::JobEntry::mirror`).

use std::fmt;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::JobId;

/// Where a job is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum JobState {
    /// Accepted, not yet deployed.
    Created,
    /// Tasks are running.
    Running,
    /// A task failed; waiting out the restart delay, then restoring.
    Restarting,
    /// Stop requested; taking a savepoint if asked, then stopping tasks.
    Cancelling,
    /// Bounded input fully processed and committed. Terminal.
    Finished,
    /// Stopped by request. Terminal.
    Cancelled,
    /// Restart strategy exhausted or unrecoverable error. Terminal.
    Failed,
}

impl JobState {
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            JobState::Finished | JobState::Cancelled | JobState::Failed
        )
    }

    /// The one place that says which state may follow which.
    pub fn can_transition(self, to: JobState) -> bool {
        use JobState::*;
        matches!(
            (self, to),
            (Created, Running)
                // Restored from its final checkpoint: nothing left to run.
                | (Created, Finished)
                | (Created, Restarting)
                | (Created, Failed)
                | (Created, Cancelling)
                | (Running, Restarting)
                | (Running, Finished)
                | (Running, Cancelling)
                | (Running, Failed)
                | (Restarting, Running)
                | (Restarting, Failed)
                | (Restarting, Cancelling)
                | (Cancelling, Cancelled)
                | (Cancelling, Failed)
                // A stop-with-savepoint whose savepoint failed (a full or
                // refusing store, a failed task): the stop is abandoned
                // and the job goes on from its newest checkpoint.
                | (Cancelling, Restarting)
        )
    }

    /// Moves to `to` if allowed, returning the new state or the refusal.
    pub fn transition(&mut self, to: JobState) -> Result<(), String> {
        if self.can_transition(to) {
            *self = to;
            Ok(())
        } else {
            Err(format!("a {self} job cannot become {to}"))
        }
    }
}

impl fmt::Display for JobState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = match self {
            JobState::Created => "CREATED",
            JobState::Running => "RUNNING",
            JobState::Restarting => "RESTARTING",
            JobState::Cancelling => "CANCELLING",
            JobState::Finished => "FINISHED",
            JobState::Cancelled => "CANCELLED",
            JobState::Failed => "FAILED",
        };
        f.write_str(s)
    }
}

/// One TaskManager's share of a job.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq, utoipa::ToSchema)]
pub struct JobPart {
    pub taskmanager: String,
    /// The subtask indices it runs (each one slot).
    pub subtasks: Vec<u32>,
}

/// Summary and status of one job, as the API returns it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
pub struct JobInfo {
    /// 32 hex digits.
    #[schema(value_type = String, example = "01a2058a42c477a285a8423b5e819224")]
    pub id: JobId,
    pub name: String,
    /// `metadata.namespace` of the spec (`default` when it names none).
    #[serde(default = "default_namespace")]
    pub namespace: String,
    pub state: JobState,
    pub parallelism: u32,
    pub submitted_at: DateTime<Utc>,
    pub ended_at: Option<DateTime<Utc>>,
    /// Restarts after failures (not counting resumes of a new process).
    pub restarts: u32,
    /// Deployments of the job's tasks so far: 1 after the first start, +1
    /// for each restart or resume that started tasks again. A new leader
    /// that adopts running tasks does not add one.
    #[serde(default)]
    pub attempt: u32,
    /// The TaskManager running the job's tasks (distributed mode).
    #[serde(default)]
    pub taskmanager: Option<String>,
    /// Id of the current deployment on that TaskManager.
    #[serde(default)]
    pub deployment: Option<String>,
    /// Where the job's subtasks run, one entry per TaskManager: one when
    /// the job fits on a TaskManager, several when it is spread over them
    /// (distributed mode; `taskmanager` is the first).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub parts: Vec<JobPart>,
    /// The region a planned switchover moved the job to (it was stopped
    /// here with a savepoint and resumes there); a region that becomes
    /// primary resumes such jobs although they are CANCELLED here.
    #[serde(default)]
    pub moved_to: Option<String>,
    pub records_in: u64,
    pub records_out: u64,
    /// Records dropped because they were later than their window allowed.
    pub late_records: u64,
    /// Records whose filter or map expression failed to evaluate.
    pub expression_errors: u64,
    /// Malformed input records skipped by the source (`onBadLine: skip`).
    #[serde(default)]
    pub skipped_records: u64,
    /// Lowest watermark over the tasks, RFC 3339, if any record was seen.
    pub watermark: Option<String>,
    pub last_checkpoint: Option<CheckpointInfo>,
    /// The last restore of the job's state from a snapshot: part of every
    /// restart's and failover's recovery time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_restore: Option<RestoreInfo>,
    /// Why the job failed or is restarting.
    pub failure: Option<String>,
    /// Where the sink writes, if it writes to storage.
    pub output: Option<String>,
    /// Where the job's checkpoints live.
    pub checkpoint_root: String,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

fn default_namespace() -> String {
    crate::spec::DEFAULT_NAMESPACE.to_string()
}

/// A restore of a job's state.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
pub struct RestoreInfo {
    /// The checkpoint or savepoint restored.
    pub checkpoint_id: u64,
    /// State read (every file its manifest lists).
    pub size_bytes: u64,
    /// From reading the snapshot to the tasks running again.
    pub duration_ms: u64,
    pub restored_at: DateTime<Utc>,
}

/// One completed checkpoint or savepoint.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
pub struct CheckpointInfo {
    pub id: u64,
    /// `checkpoint` or `savepoint`.
    pub kind: String,
    pub completed_at: DateTime<Utc>,
    pub duration_ms: u64,
    /// What a restore reads: every file the checkpoint lists.
    pub size_bytes: u64,
    /// What this checkpoint wrote itself (with incremental checkpoints its
    /// deltas, or a new full snapshot; otherwise `size_bytes`). Absent in
    /// records from before incremental checkpoints.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub written_bytes: u64,
    pub watermark: Option<String>,
    pub records_in: u64,
    pub records_out: u64,
    /// Full URL of the checkpoint directory.
    pub path: String,
    /// Final checkpoint of a bounded job.
    pub finished: bool,
}

/// A savepoint that was taken.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
pub struct SavepointInfo {
    #[schema(value_type = String)]
    pub job_id: JobId,
    pub checkpoint_id: u64,
    /// Full URL of the savepoint directory, for `--from-savepoint`.
    pub path: String,
}

/// Body of `GET /v1/jobs`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
pub struct JobList {
    /// Newest first.
    pub jobs: Vec<JobInfo>,
}

/// Body of `GET /v1/jobs/{id}/checkpoints`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
pub struct CheckpointList {
    /// Newest first; savepoints included (`kind: savepoint`).
    pub checkpoints: Vec<CheckpointInfo>,
}

/// Body of `DELETE /v1/jobs/{id}`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
pub struct CancelResponse {
    /// The job after it stopped.
    pub job: JobInfo,
    /// The savepoint taken before stopping, when `?savepoint=true`.
    pub savepoint: Option<SavepointInfo>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn terminal_states_have_no_way_out() {
        use JobState::*;
        let all = [
            Created, Running, Restarting, Cancelling, Finished, Cancelled, Failed,
        ];
        for from in all.iter().filter(|s| s.is_terminal()) {
            for to in all {
                assert!(!from.can_transition(to), "{from} -> {to}");
            }
        }
        let mut s = Running;
        assert!(s.transition(Finished).is_ok());
        assert!(s.transition(Running).is_err());
        assert_eq!(s, Finished);
    }
}
