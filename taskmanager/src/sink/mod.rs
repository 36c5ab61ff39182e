//! Sinks: where records leave a job.
//!
//! The file sink is exactly-once by two-phase commit: records written between
//! two barriers form a transaction; at the barrier the transaction is closed
//! and its bytes become part of the sink's checkpoint state (pre-commit);
//! when the checkpoint completes, the transaction is committed by a
//! create-only put of a part file with a deterministic name. A restore
//! commits every pending transaction of the restored state again, which is a
//! no-op for those already committed. The NATS JetStream sink ([`nats`])
//! follows the same protocol, publishing a transaction when its checkpoint
//! completes. `stdout` (at-least-once) and `blackhole` are for demos and
//! benchmarks.

pub mod nats;

use std::collections::BTreeMap;
use std::io::Write;
use std::sync::atomic::Ordering;

use bytes::Bytes;
use ferry_core::manifest::SinkTransaction;
use ferry_core::storage::StorageLocation;
use ferry_core::{CheckpointId, JobId};
use serde::{Deserialize, Serialize};

use crate::batch::Batch;
use crate::metrics::TaskMetrics;

/// Name of the sink's state in checkpoints.
pub const SINK_STATE: &str = "sink";

/// A sink subtask.
pub enum Sink {
    File(FileSink),
    Nats(Box<nats::NatsSink>),
    Stdout,
    Blackhole,
}

impl Sink {
    /// Hands a batch to the sink.
    pub fn write(&mut self, batch: &Batch, m: &TaskMetrics) {
        m.records_out
            .fetch_add(batch.len() as u64, Ordering::Relaxed);
        match self {
            Sink::File(f) => f.write(batch),
            Sink::Nats(n) => n.write(batch),
            Sink::Stdout => {
                let mut s = String::with_capacity(batch.len() * 64);
                for i in 0..batch.len() {
                    batch.write_json_row(i, &mut s);
                }
                let mut out = std::io::stdout().lock();
                let _ = out.write_all(s.as_bytes());
                let _ = out.flush();
            }
            Sink::Blackhole => {}
        }
    }

    /// Snapshot at a barrier. `close_txn` closes the open transaction
    /// (checkpoints, stop-with-savepoint); an intermediate savepoint keeps it
    /// open and stores its records as still open.
    pub fn snapshot(
        &mut self,
        cp: CheckpointId,
        close_txn: bool,
        records_out: u64,
    ) -> Result<(Option<Vec<u8>>, Vec<SinkTransaction>), String> {
        match self {
            Sink::File(f) => f.snapshot(cp, close_txn, records_out),
            Sink::Nats(n) => {
                let (bytes, txns) = n.snapshot(cp, close_txn, records_out)?;
                Ok((Some(bytes), txns))
            }
            Sink::Stdout | Sink::Blackhole => {
                let st = FileSinkState {
                    records_out,
                    ..Default::default()
                };
                Ok((
                    Some(postcard::to_stdvec(&st).map_err(|e| e.to_string())?),
                    Vec::new(),
                ))
            }
        }
    }

    /// Commits every pending transaction up to `cp` (checkpoint completed).
    pub async fn commit(&mut self, cp: CheckpointId) -> Result<(), String> {
        match self {
            Sink::File(f) => f.commit(cp).await,
            Sink::Nats(n) => n.commit(cp).await,
            Sink::Stdout | Sink::Blackhole => Ok(()),
        }
    }

    /// Decodes one snapshot part of a sink of this spec without restoring
    /// it (restore checks: nothing is committed).
    pub fn check_state(spec: &ferry_core::spec::SinkSpec, bytes: &[u8]) -> Result<(), String> {
        match spec {
            ferry_core::spec::SinkSpec::Nats(_) => nats::NatsSink::check_state(bytes),
            _ => postcard::from_bytes::<FileSinkState>(bytes)
                .map(drop)
                .map_err(|e| format!("sink state is unreadable: {e}")),
        }
    }

    /// Restores from old subtasks' states `(old subtask, bytes)`: keeps the
    /// ones with `old % parallelism == subtask`, commits their pending
    /// transactions, and returns their records-out count.
    pub async fn restore(
        &mut self,
        parts: &[(u32, Bytes)],
        subtask: u32,
        parallelism: u32,
    ) -> Result<u64, String> {
        let mut records = 0;
        for (old, bytes) in parts {
            if old % parallelism != subtask {
                continue;
            }
            if let Sink::Nats(n) = self {
                records += n.adopt(bytes)?;
                continue;
            }
            let st: FileSinkState = postcard::from_bytes(bytes)
                .map_err(|e| format!("sink state is unreadable: {e}"))?;
            records += st.records_out;
            if let Sink::File(f) = self {
                f.adopt(st);
            }
        }
        match self {
            Sink::File(f) => {
                f.remove_stale_staging();
                f.commit(CheckpointId(u64::MAX)).await?;
            }
            Sink::Nats(n) => n.recommit().await?,
            Sink::Stdout | Sink::Blackhole => {}
        }
        Ok(records)
    }
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct FileSinkState {
    /// (checkpoint, part-file name, JSON-lines bytes, records)
    pending: Vec<(u64, String, Vec<u8>, u64)>,
    open: Vec<u8>,
    open_records: u64,
    records_out: u64,
}

struct Pending {
    name: String,
    data: Bytes,
    records: u64,
}

/// Exactly-once JSON-lines part files.
pub struct FileSink {
    out: StorageLocation,
    prefix: String,
    subtask: u32,
    buffer: String,
    buffer_records: u64,
    /// By (checkpoint, part name): after a rescale one subtask adopts the
    /// pending transactions of several old subtasks for the same checkpoint.
    pending: BTreeMap<(u64, String), Pending>,
}

impl FileSink {
    /// `prefix` makes part names unique per job ([`Self::job_prefix`]).
    pub fn new(out: StorageLocation, prefix: &str, subtask: u32) -> Self {
        Self {
            out,
            prefix: prefix.to_string(),
            subtask,
            buffer: String::new(),
            buffer_records: 0,
            pending: BTreeMap::new(),
        }
    }

    /// The part-file prefix of a job: its full id. Short ids (the UUIDv7's
    /// leading time bits) repeat for jobs submitted within about a minute,
    /// and two jobs writing part files with the same names into one
    /// directory would lose output (a create-only commit takes an existing
    /// file for "already committed").
    pub fn job_prefix(job: &JobId) -> String {
        job.to_string()
    }

    /// Deterministic part-file name of a transaction.
    pub fn part_name(prefix: &str, subtask: u32, cp: CheckpointId) -> String {
        format!("part-{prefix}-{subtask:04}-{:08}.jsonl", cp.0)
    }

    /// Whether `name` is a committed part file of the job with part-file
    /// prefix `prefix` (any subtask and checkpoint): exactly the names
    /// [`Self::part_name`] makes, not another job's and not the staging file
    /// (`<part>#<n>`) a crash can leave behind.
    pub fn is_part_of(prefix: &str, name: &str) -> bool {
        let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
        name.strip_prefix("part-")
            .and_then(|r| r.strip_prefix(prefix))
            .and_then(|r| r.strip_prefix('-'))
            .and_then(|r| r.strip_suffix(".jsonl"))
            .and_then(|r| r.split_once('-'))
            .is_some_and(|(subtask, cp)| digits(subtask) && digits(cp))
    }

    fn write(&mut self, batch: &Batch) {
        for i in 0..batch.len() {
            batch.write_json_row(i, &mut self.buffer);
        }
        self.buffer_records += batch.len() as u64;
    }

    fn snapshot(
        &mut self,
        cp: CheckpointId,
        close_txn: bool,
        records_out: u64,
    ) -> Result<(Option<Vec<u8>>, Vec<SinkTransaction>), String> {
        if close_txn && self.buffer_records > 0 {
            let data = Bytes::from(std::mem::take(&mut self.buffer).into_bytes());
            let name = Self::part_name(&self.prefix, self.subtask, cp);
            self.pending.insert(
                (cp.0, name.clone()),
                Pending {
                    name,
                    data,
                    records: std::mem::take(&mut self.buffer_records),
                },
            );
        }
        let st = FileSinkState {
            pending: self
                .pending
                .iter()
                .map(|((id, _), p)| (*id, p.name.clone(), p.data.to_vec(), p.records))
                .collect(),
            open: if close_txn {
                Vec::new()
            } else {
                self.buffer.as_bytes().to_vec()
            },
            open_records: if close_txn { 0 } else { self.buffer_records },
            records_out,
        };
        let txns = self
            .pending
            .values()
            .map(|p| SinkTransaction {
                subtask: self.subtask,
                txn: p.name.clone(),
                records: p.records,
            })
            .collect();
        Ok((
            Some(postcard::to_stdvec(&st).map_err(|e| e.to_string())?),
            txns,
        ))
    }

    async fn commit(&mut self, cp: CheckpointId) -> Result<(), String> {
        let due: Vec<(u64, String)> = self
            .pending
            .keys()
            .filter(|(id, _)| *id <= cp.0)
            .cloned()
            .collect();
        for id in due {
            let p = &self.pending[&id];
            // Create-only: an existing part file means "already committed".
            self.out
                .put_create(&p.name, p.data.clone())
                .await
                .map_err(|e| format!("committing {} failed: {e}", p.name))?;
            self.pending.remove(&id);
        }
        Ok(())
    }

    /// A process killed during a commit can leave the local store's staging
    /// file (`<part>#<n>`) beside the part file; remove this subtask's.
    fn remove_stale_staging(&self) {
        let Some(dir) = self.out.local_dir() else {
            return;
        };
        let own = format!("part-{}-{:04}-", self.prefix, self.subtask);
        for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            let name = e.file_name().to_string_lossy().to_string();
            if name.starts_with(&own) && name.contains('#') {
                tracing::info!(file = %name, "removing a partial commit left by a crash");
                let _ = std::fs::remove_file(e.path());
            }
        }
    }

    fn adopt(&mut self, st: FileSinkState) {
        for (id, name, data, records) in st.pending {
            self.pending.insert(
                (id, name.clone()),
                Pending {
                    name,
                    data: Bytes::from(data),
                    records,
                },
            );
        }
        if !st.open.is_empty() {
            self.buffer.push_str(&String::from_utf8_lossy(&st.open));
            self.buffer_records += st.open_records;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use ferry_core::schema::Schema;
    use ferry_core::value::DataType;

    use super::*;
    use crate::batch::Column;

    fn batch(vals: &[i64]) -> Batch {
        Batch {
            schema: Arc::new(Schema::new([("n".to_string(), DataType::Int)])),
            columns: vec![Column::Int(vals.to_vec())],
            ts: vals.to_vec(),
        }
    }

    fn parts(dir: &std::path::Path) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
            .collect();
        v.sort();
        v
    }

    /// A crash after the checkpoint completed but before the sink committed:
    /// the restored sink commits the pending transaction, exactly once.
    #[tokio::test]
    async fn restore_commits_pending_transactions_once() {
        let dir = tempfile::tempdir().unwrap();
        let loc = StorageLocation::open(dir.path().to_str().unwrap()).unwrap();
        let m = TaskMetrics::default();
        let mut sink = Sink::File(FileSink::new(loc.clone(), "job", 0));
        sink.write(&batch(&[1, 2]), &m);
        let (state1, txns) = sink.snapshot(CheckpointId(1), true, 2).unwrap();
        assert_eq!(txns.len(), 1);
        assert!(
            parts(dir.path()).is_empty(),
            "nothing is visible before commit"
        );
        sink.write(&batch(&[3]), &m);
        let (state2, _) = sink.snapshot(CheckpointId(2), true, 3).unwrap();
        // Crash: neither checkpoint was committed. Restore from checkpoint 2.
        let mut restored = Sink::File(FileSink::new(loc.clone(), "job", 0));
        let out = restored
            .restore(&[(0, Bytes::from(state2.unwrap()))], 0, 1)
            .await
            .unwrap();
        assert_eq!(out, 3);
        assert_eq!(
            parts(dir.path()),
            vec![
                "part-job-0000-00000001.jsonl",
                "part-job-0000-00000002.jsonl"
            ]
        );
        // Restoring again (another crash) changes nothing.
        let mut again = Sink::File(FileSink::new(loc.clone(), "job", 0));
        again
            .restore(&[(0, Bytes::from(state1.unwrap()))], 0, 1)
            .await
            .unwrap();
        assert_eq!(parts(dir.path()).len(), 2);
        let text =
            std::fs::read_to_string(dir.path().join("part-job-0000-00000001.jsonl")).unwrap();
        assert_eq!(text, "{\"n\":1}\n{\"n\":2}\n");
    }

    /// Scaling 2 → 1 after a crash: the one new subtask adopts both old
    /// subtasks' uncommitted transactions of the same checkpoint and commits
    /// both (neither replaces the other).
    #[tokio::test]
    async fn rescale_down_commits_every_old_subtasks_transaction() {
        let dir = tempfile::tempdir().unwrap();
        let loc = StorageLocation::open(dir.path().to_str().unwrap()).unwrap();
        let m = TaskMetrics::default();
        let mut states = Vec::new();
        for (sub, vals) in [(0u32, &[1i64, 2][..]), (1, &[3][..])] {
            let mut sink = Sink::File(FileSink::new(loc.clone(), "job", sub));
            sink.write(&batch(vals), &m);
            let (st, _) = sink.snapshot(CheckpointId(1), true, 0).unwrap();
            states.push((sub, Bytes::from(st.unwrap())));
        }
        let mut merged = Sink::File(FileSink::new(loc.clone(), "job", 0));
        merged.restore(&states, 0, 1).await.unwrap();
        assert_eq!(
            parts(dir.path()),
            vec![
                "part-job-0000-00000001.jsonl",
                "part-job-0001-00000001.jsonl"
            ]
        );
        let one = std::fs::read_to_string(dir.path().join("part-job-0001-00000001.jsonl")).unwrap();
        assert_eq!(one, "{\"n\":3}\n");
    }

    /// Part files are told apart by the whole job prefix: another job's
    /// files (even one whose id starts the same) and staging files are not
    /// the job's.
    #[test]
    fn part_files_belong_to_exactly_one_job() {
        let a = "0195a3b4c5d67e8f9a0b1c2d3e4f5a6b";
        let b = "0195a3b4ffffffffffffffffffffffff";
        let name = FileSink::part_name(a, 3, CheckpointId(12));
        assert_eq!(name, format!("part-{a}-0003-00000012.jsonl"));
        assert!(FileSink::is_part_of(a, &name));
        assert!(!FileSink::is_part_of(b, &name));
        assert!(!FileSink::is_part_of(&a[..8], &name));
        assert!(!FileSink::is_part_of(a, &format!("{name}#1")));
        assert!(!FileSink::is_part_of(a, &format!("part-{a}-0003.jsonl")));
        assert!(!FileSink::is_part_of(a, "README.md"));
    }

    /// An intermediate savepoint keeps the open transaction open: its records
    /// are committed by the next checkpoint, not by the savepoint.
    #[tokio::test]
    async fn intermediate_savepoint_does_not_commit() {
        let dir = tempfile::tempdir().unwrap();
        let loc = StorageLocation::open(dir.path().to_str().unwrap()).unwrap();
        let m = TaskMetrics::default();
        let mut sink = Sink::File(FileSink::new(loc, "job", 0));
        sink.write(&batch(&[1]), &m);
        let (_, txns) = sink.snapshot(CheckpointId(5), false, 1).unwrap();
        assert!(txns.is_empty());
        sink.commit(CheckpointId(5)).await.unwrap();
        assert!(parts(dir.path()).is_empty());
        sink.snapshot(CheckpointId(6), true, 1).unwrap();
        sink.commit(CheckpointId(6)).await.unwrap();
        assert_eq!(parts(dir.path()), vec!["part-job-0000-00000006.jsonl"]);
    }
}
