//! Conversions between the runtime's task messages and their protobuf form
//! (`ferry_core::proto`), used on both ends of the JobManager <-> TaskManager
//! gRPC protocol.

use std::time::Duration;

use ferry_core::CheckpointId;
use ferry_core::manifest::{FileEntry, SinkTransaction, SnapshotKind};
use ferry_core::proto;

use crate::protocol::{TaskAck, TaskError, TaskEvent, TaskId};
use crate::runtime::Counters;

impl From<TaskId> for proto::TaskRef {
    fn from(t: TaskId) -> Self {
        Self {
            stage: t.stage,
            subtask: t.subtask,
        }
    }
}

impl From<proto::TaskRef> for TaskId {
    fn from(t: proto::TaskRef) -> Self {
        Self {
            stage: t.stage,
            subtask: t.subtask,
        }
    }
}

fn task_of(t: Option<proto::TaskRef>) -> TaskId {
    t.map(TaskId::from).unwrap_or(TaskId {
        stage: 0,
        subtask: 0,
    })
}

impl From<Counters> for proto::Counters {
    fn from(c: Counters) -> Self {
        Self {
            records_in: c.records_in,
            records_out: c.records_out,
            late_records: c.late_records,
            expression_errors: c.expression_errors,
            skipped_records: c.skipped_records,
            watermark: c.watermark,
        }
    }
}

impl From<proto::Counters> for Counters {
    fn from(c: proto::Counters) -> Self {
        Self {
            records_in: c.records_in,
            records_out: c.records_out,
            late_records: c.late_records,
            expression_errors: c.expression_errors,
            skipped_records: c.skipped_records,
            watermark: c.watermark,
        }
    }
}

impl From<&TaskError> for proto::TaskFailure {
    fn from(e: &TaskError) -> Self {
        Self {
            task: None,
            message: e.message().to_string(),
            permanent: matches!(e, TaskError::Permanent(_)),
        }
    }
}

impl From<&proto::TaskFailure> for TaskError {
    fn from(f: &proto::TaskFailure) -> Self {
        if f.permanent {
            TaskError::Permanent(f.message.clone())
        } else {
            TaskError::Transient(f.message.clone())
        }
    }
}

/// A task acknowledgement in protobuf form.
pub fn ack_to_proto(a: &TaskAck) -> proto::TaskAck {
    proto::TaskAck {
        checkpoint: a.checkpoint.0,
        task: Some(a.task.into()),
        files: a
            .files
            .iter()
            .map(|f| proto::FileEntry {
                path: f.path.clone(),
                size: f.size,
                sha256: f.sha256.clone(),
                operator: f.operator.clone(),
                subtask: f.subtask,
                shared: f.shared,
                chain: f.chain,
            })
            .collect(),
        source_offsets_json: serde_json::to_string(&a.source_offsets).unwrap_or_default(),
        sink_transactions: a
            .sink_transactions
            .iter()
            .map(|t| proto::SinkTransaction {
                subtask: t.subtask,
                txn: t.txn.clone(),
                records: t.records,
            })
            .collect(),
        watermark: a.watermark,
        records_in: a.records_in,
        records_out: a.records_out,
        sync_micros: a.sync_duration.as_micros() as u64,
        async_micros: a.async_duration.as_micros() as u64,
    }
}

/// A task acknowledgement from its protobuf form.
pub fn ack_from_proto(a: proto::TaskAck) -> Result<TaskAck, String> {
    let source_offsets = if a.source_offsets_json.is_empty() {
        Default::default()
    } else {
        serde_json::from_str(&a.source_offsets_json)
            .map_err(|e| format!("malformed source offsets in an acknowledgement: {e}"))?
    };
    Ok(TaskAck {
        checkpoint: CheckpointId(a.checkpoint),
        task: task_of(a.task),
        files: a
            .files
            .into_iter()
            .map(|f| FileEntry {
                path: f.path,
                size: f.size,
                sha256: f.sha256,
                operator: f.operator,
                subtask: f.subtask,
                shared: f.shared,
                chain: f.chain,
            })
            .collect(),
        source_offsets,
        sink_transactions: a
            .sink_transactions
            .into_iter()
            .map(|t| SinkTransaction {
                subtask: t.subtask,
                txn: t.txn,
                records: t.records,
            })
            .collect(),
        watermark: a.watermark,
        records_in: a.records_in,
        records_out: a.records_out,
        sync_duration: Duration::from_micros(a.sync_micros),
        async_duration: Duration::from_micros(a.async_micros),
    })
}

/// A task event in protobuf form.
pub fn event_to_proto(e: &TaskEvent) -> proto::deployment_event::Event {
    use proto::deployment_event::Event;
    match e {
        TaskEvent::Ack(a) => Event::Ack(ack_to_proto(a)),
        TaskEvent::SourceEnded(t) => Event::SourceEnded((*t).into()),
        TaskEvent::Stopped(t) => Event::Stopped((*t).into()),
        TaskEvent::Failed { task, error } => Event::Failed(proto::TaskFailure {
            task: Some((*task).into()),
            ..proto::TaskFailure::from(error)
        }),
        TaskEvent::Declined {
            task,
            checkpoint,
            reason,
        } => Event::Declined(proto::TaskDecline {
            task: Some((*task).into()),
            checkpoint: checkpoint.0,
            reason: reason.clone(),
        }),
    }
}

/// What a JobManager makes of one deployment event.
#[derive(Debug)]
pub enum RemoteEvent {
    Task(TaskEvent),
    Counters(Counters),
}

/// A task event from its protobuf form.
pub fn event_from_proto(e: proto::deployment_event::Event) -> Result<RemoteEvent, String> {
    use proto::deployment_event::Event;
    Ok(match e {
        Event::Ack(a) => RemoteEvent::Task(TaskEvent::Ack(ack_from_proto(a)?)),
        Event::SourceEnded(t) => RemoteEvent::Task(TaskEvent::SourceEnded(t.into())),
        Event::Stopped(t) => RemoteEvent::Task(TaskEvent::Stopped(t.into())),
        Event::Failed(f) => RemoteEvent::Task(TaskEvent::Failed {
            task: task_of(f.task),
            error: TaskError::from(&f),
        }),
        Event::Counters(c) => RemoteEvent::Counters(c.into()),
        Event::Declined(d) => RemoteEvent::Task(TaskEvent::Declined {
            task: task_of(d.task),
            checkpoint: CheckpointId(d.checkpoint),
            reason: d.reason,
        }),
    })
}

pub fn kind_to_proto(k: SnapshotKind) -> proto::SnapshotKind {
    match k {
        SnapshotKind::Checkpoint => proto::SnapshotKind::Checkpoint,
        SnapshotKind::Savepoint => proto::SnapshotKind::Savepoint,
    }
}

pub fn kind_from_proto(k: i32) -> SnapshotKind {
    match proto::SnapshotKind::try_from(k) {
        Ok(proto::SnapshotKind::Savepoint) => SnapshotKind::Savepoint,
        _ => SnapshotKind::Checkpoint,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ack_round_trips() {
        let ack = TaskAck {
            checkpoint: CheckpointId(7),
            task: TaskId {
                stage: 1,
                subtask: 2,
            },
            files: vec![FileEntry {
                path: "window-2.state".into(),
                size: 42,
                sha256: "ab".repeat(32),
                operator: "window".into(),
                subtask: 2,
                shared: true,
                chain: 3,
            }],
            source_offsets: [("p2".to_string(), serde_json::json!({"offset": 9}))]
                .into_iter()
                .collect(),
            sink_transactions: vec![SinkTransaction {
                subtask: 2,
                txn: "t-7".into(),
                records: 3,
            }],
            watermark: -5,
            records_in: 10,
            records_out: 3,
            sync_duration: Duration::from_micros(120),
            async_duration: Duration::from_micros(3400),
        };
        let back = ack_from_proto(ack_to_proto(&ack)).unwrap();
        assert_eq!(back.checkpoint, ack.checkpoint);
        assert_eq!(back.task, ack.task);
        assert_eq!(back.files, ack.files);
        assert_eq!(back.source_offsets, ack.source_offsets);
        assert_eq!(back.sink_transactions, ack.sink_transactions);
        assert_eq!(back.watermark, -5);
        assert_eq!(back.sync_duration, ack.sync_duration);
        assert_eq!(back.async_duration, ack.async_duration);
    }

    #[test]
    fn failures_keep_their_kind() {
        for e in [
            TaskError::Permanent("bad line".into()),
            TaskError::Transient("io".into()),
        ] {
            let p = event_to_proto(&TaskEvent::Failed {
                task: TaskId {
                    stage: 0,
                    subtask: 1,
                },
                error: e.clone(),
            });
            match event_from_proto(p).unwrap() {
                RemoteEvent::Task(TaskEvent::Failed { task, error }) => {
                    assert_eq!(task.subtask, 1);
                    assert_eq!(error, e);
                }
                other => panic!("unexpected {other:?}"),
            }
        }
    }

    #[test]
    fn malformed_offsets_are_an_error_not_a_panic() {
        let mut p = ack_to_proto(&TaskAck {
            checkpoint: CheckpointId(1),
            task: TaskId {
                stage: 0,
                subtask: 0,
            },
            files: vec![],
            source_offsets: Default::default(),
            sink_transactions: vec![],
            watermark: 0,
            records_in: 0,
            records_out: 0,
            sync_duration: Duration::ZERO,
            async_duration: Duration::ZERO,
        });
        p.source_offsets_json = "{not json".into();
        assert!(ack_from_proto(p).unwrap_err().contains("source offsets"));
    }
}
