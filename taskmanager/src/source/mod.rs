//! Sources: where records enter a job. Each source subtask owns some
//! partitions, reads them in batches, tracks per-partition offsets for
//! checkpoints and derives its watermark.

pub mod file;
pub mod generator;
mod lines;
pub mod nats;

use std::collections::BTreeMap;
use std::time::Duration;

use bytes::Bytes;

use crate::batch::Batch;
use crate::protocol::TaskError;

/// The watermark of input whose newest event time is `max_ts` with bounded
/// out-of-orderness `ooo` (ms): every record still to come is later than it.
/// `i64::MIN` before any record.
pub(crate) fn bounded_watermark(max_ts: i64, ooo: i64) -> i64 {
    if max_ts == i64::MIN {
        i64::MIN
    } else {
        max_ts - ooo - 1
    }
}

/// What a source returns when polled.
pub enum Poll {
    /// A batch of records; the watermark may have advanced.
    Batch(Batch),
    /// Nothing now (rate limit); poll again after this long.
    Idle(Duration),
    /// Nothing now; poll again once [`Source::ready`] returns.
    Wait,
    /// Every partition of this subtask is exhausted.
    End,
}

/// A source subtask.
pub enum Source {
    Generator(generator::GeneratorSource),
    File(Box<file::FileSource>),
    Nats(Box<nats::NatsSource>),
}

impl Source {
    pub async fn poll(&mut self) -> Result<Poll, TaskError> {
        match self {
            Source::Generator(g) => Ok(g.poll()),
            Source::File(f) => f.poll().await,
            Source::Nats(n) => n.poll().await,
        }
    }

    /// After [`Poll::Wait`]: resolves when input may be ready. Cancel-safe,
    /// so a task can wait for it and for commands at once.
    pub async fn ready(&mut self) {
        match self {
            Source::Nats(n) => n.ready().await,
            Source::Generator(_) | Source::File(_) => {}
        }
    }

    /// This subtask's watermark (epoch ms; `i64::MIN` before any record).
    pub fn watermark(&self) -> i64 {
        match self {
            Source::Generator(g) => g.watermark(),
            Source::File(f) => f.watermark(),
            Source::Nats(n) => n.watermark(),
        }
    }

    /// State bytes and human-readable offsets per partition.
    pub fn snapshot(&self) -> Result<(Vec<u8>, BTreeMap<String, serde_json::Value>), String> {
        match self {
            Source::Generator(g) => g.snapshot(),
            Source::File(f) => f.snapshot(),
            Source::Nats(n) => n.snapshot(),
        }
    }

    /// Restores offsets from the snapshots of all old subtasks.
    pub fn restore(&mut self, parts: &[Bytes]) -> Result<(), String> {
        match self {
            Source::Generator(g) => g.restore(parts),
            Source::File(f) => f.restore(parts),
            Source::Nats(n) => n.restore(parts),
        }
    }

    /// Records read so far (including before a restore).
    pub fn records_read(&self) -> u64 {
        match self {
            Source::Generator(g) => g.records_read(),
            Source::File(f) => f.records_read(),
            Source::Nats(n) => n.records_read(),
        }
    }

    /// Malformed records skipped so far (a file source's including before
    /// a restore; a NATS source's since its task started).
    pub fn skipped_records(&self) -> u64 {
        match self {
            Source::Generator(_) => 0,
            Source::File(f) => f.skipped_records(),
            Source::Nats(n) => n.skipped_records(),
        }
    }
}
