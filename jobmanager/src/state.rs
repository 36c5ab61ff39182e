//! The job lifecycle as an explicit state machine: every allowed transition
//! is listed in [`JobState::can_transition`], nowhere else.
//!
//! The table binds the JobManager that drives a job. A JobManager that only
//! mirrors a job from the job store (a standby) copies the state the driver
//! recorded, which may skip steps it did not see; that copy is the one
//! other, documented path (`job::JobEntry::mirror`).

use std::fmt;

use serde::{Deserialize, Serialize};

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
