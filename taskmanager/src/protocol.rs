//! Messages between the JobManager and tasks, and between tasks. Later they
//! travel over gRPC; in `ferry local` over in-process channels.

use std::collections::BTreeMap;
use std::fmt;

use ferry_core::CheckpointId;
use ferry_core::manifest::{FileEntry, SinkTransaction, SnapshotKind};
use ferry_core::storage::StorageLocation;

use crate::batch::Batch;

/// Identity of one task: a stage of the job and a subtask index in it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TaskId {
    pub stage: u32,
    pub subtask: u32,
}

impl fmt::Display for TaskId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "stage {} subtask {}", self.stage, self.subtask)
    }
}

/// A checkpoint barrier, injected at the sources and aligned downstream.
#[derive(Clone, Debug)]
pub struct Barrier {
    pub id: CheckpointId,
    pub kind: SnapshotKind,
    /// Close the sinks' open transactions (checkpoints and
    /// stop-with-savepoint; not intermediate savepoints).
    pub close_txn: bool,
    /// Tasks stop once this snapshot is complete (stop-with-savepoint, or
    /// the final checkpoint of a bounded job).
    pub stop: bool,
    /// Where the snapshot's state files go.
    pub dir: StorageLocation,
}

/// Data flowing between tasks.
pub enum Msg {
    Batch(Batch),
    Watermark(i64),
    Barrier(Barrier),
    /// The channel broke (a network channel of the exchange, [`crate::link`]):
    /// the receiving task fails transiently, with this reason. Never sent
    /// by a task.
    Fail(String),
}

/// From the JobManager to a task.
#[derive(Debug)]
pub enum TaskCommand {
    /// Take a snapshot and send the barrier downstream (source tasks only).
    Trigger(Barrier),
    /// Checkpoint `id` completed: commit sinks' transactions up to it.
    Complete(CheckpointId),
}

/// One task's part of a snapshot.
#[derive(Clone, Debug)]
pub struct TaskAck {
    pub checkpoint: CheckpointId,
    pub task: TaskId,
    pub files: Vec<FileEntry>,
    pub source_offsets: BTreeMap<String, serde_json::Value>,
    pub sink_transactions: Vec<SinkTransaction>,
    pub watermark: i64,
    pub records_in: u64,
    pub records_out: u64,
    /// Time the task spent taking its snapshot on the record path (it
    /// processes no records meanwhile), like Flink's sync duration.
    pub sync_duration: std::time::Duration,
    /// Time from the snapshot to the state files uploaded, off the record
    /// path (hashing and writing), like Flink's async duration.
    pub async_duration: std::time::Duration,
}

/// From a task to the JobManager.
#[derive(Debug)]
pub enum TaskEvent {
    Ack(TaskAck),
    /// The task's sources are exhausted (bounded input).
    SourceEnded(TaskId),
    /// The task stopped after a `stop` snapshot completed.
    Stopped(TaskId),
    Failed {
        task: TaskId,
        error: TaskError,
    },
    /// The task could not complete its part of `checkpoint` (its state
    /// upload failed): that checkpoint fails; the task keeps running.
    Declined {
        task: TaskId,
        checkpoint: CheckpointId,
        reason: String,
    },
}

/// Why a task stopped with an error, and whether a restart can help.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TaskError {
    /// May go away when the job restarts from its last checkpoint (storage
    /// or network errors, a lost peer task): the restart strategy applies.
    Transient(String),
    /// Happens again on every restart, such as a malformed input line read
    /// again from the same offset: the job fails without restarting.
    Permanent(String),
}

impl TaskError {
    pub fn message(&self) -> &str {
        match self {
            TaskError::Transient(m) | TaskError::Permanent(m) => m,
        }
    }
}

impl fmt::Display for TaskError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.message())
    }
}

impl From<String> for TaskError {
    fn from(message: String) -> Self {
        TaskError::Transient(message)
    }
}
