//! Sinks: where records leave a job.
//!
//! The file sink is exactly-once by two-phase commit: records written between
//! two barriers form a transaction; at the barrier the transaction is closed
//! and its bytes become part of the sink's checkpoint state (pre-commit);
//! when the checkpoint completes, the transaction is committed by a
//! create-only put of a part file with a deterministic name. A restore
//! commits every pending transaction of the restored state again, which is a
//! no-op for those already committed. Output committed *beyond* the restored
//! checkpoint (by a lineage that was lost: a failover that restored an older
//! checkpoint than the old primary had committed, or a newer checkpoint that
//! no longer verifies) is held back: the restored sink reads those part files
//! and leaves each of their rows out once when it produces it again
//! ([`FileSink::reconcile`]), so deterministic replays do not repeat
//! committed output. The NATS JetStream sink ([`nats`])
//! follows the same protocol, publishing a transaction when its checkpoint
//! completes, and holds back what a lost lineage published likewise. `stdout` (at-least-once) and `blackhole` are for demos and
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
use crate::pace::Pace;

/// Name of the sink's state in checkpoints.
pub const SINK_STATE: &str = "sink";

/// A sink subtask.
pub enum Sink {
    File(FileSink),
    Nats(Box<nats::NatsSink>),
    Stdout,
    /// Drops records, at most at a pace when given.
    Blackhole(Option<Pace>),
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
            Sink::Blackhole(_) => {}
        }
    }

    /// Waits until the sink may take `records` more (a blackhole with
    /// `recordsPerSecond`); at once for every other sink.
    pub async fn pace(&mut self, records: usize) {
        if let Sink::Blackhole(Some(p)) = self {
            p.take(records);
            tokio::time::sleep_until(p.due().into()).await;
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
            Sink::Stdout | Sink::Blackhole(_) => {
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
            Sink::Stdout | Sink::Blackhole(_) => Ok(()),
        }
    }

    /// Decodes one snapshot part of a sink of this spec without restoring
    /// it (restore checks: nothing is committed).
    pub fn check_state(spec: &ferry_core::spec::SinkSpec, bytes: &[u8]) -> Result<(), String> {
        match spec {
            ferry_core::spec::SinkSpec::Nats(_) => nats::NatsSink::check_state(bytes),
            _ => FileSinkState::decode(bytes).map(drop),
        }
    }

    /// Restores from old subtasks' states `(old subtask, bytes)` of
    /// checkpoint `restored` (0: none): keeps the ones with
    /// `old % parallelism == subtask`, commits their pending transactions,
    /// holds back output committed beyond `restored`, and returns their
    /// records-out count.
    pub async fn restore(
        &mut self,
        parts: &[(u32, Bytes)],
        subtask: u32,
        parallelism: u32,
        restored: CheckpointId,
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
            let st = FileSinkState::decode(bytes)?;
            records += st.records_out;
            if let Sink::File(f) = self {
                f.adopt(st);
            }
        }
        match self {
            Sink::File(f) => {
                f.remove_stale_staging();
                f.commit(CheckpointId(u64::MAX)).await?;
                f.reconcile(restored).await?;
            }
            Sink::Nats(n) => {
                // Before the restored transactions are published again:
                // the lost lineage's messages follow the restored state's.
                n.reconcile(restored).await?;
                n.recommit().await?;
            }
            Sink::Stdout | Sink::Blackhole(_) => {}
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
    /// Added after the first version; states written before lack it.
    guard: ReplayGuard,
}

/// What a restored sink holds back: rows a lost lineage committed beyond
/// the restored checkpoint, not yet produced again.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
struct ReplayGuard {
    /// JSON line (without its newline) and how many times it is still owed.
    owed: Vec<(String, u32)>,
    /// Part files whose rows were taken into `owed` (never twice).
    counted: Vec<String>,
    /// Tag of this lineage's part-file names, set when a restore found
    /// output beyond its checkpoint (the numbers may be taken).
    tag: Option<String>,
}

/// The first version of [`FileSinkState`] (no replay guard), as older
/// checkpoints hold it.
#[derive(Debug, Deserialize)]
struct FileSinkStateV1 {
    pending: Vec<(u64, String, Vec<u8>, u64)>,
    open: Vec<u8>,
    open_records: u64,
    records_out: u64,
}

impl FileSinkState {
    /// Decodes a state of either version.
    fn decode(bytes: &[u8]) -> Result<Self, String> {
        if let Ok(st) = postcard::from_bytes::<FileSinkState>(bytes) {
            return Ok(st);
        }
        let v1: FileSinkStateV1 =
            postcard::from_bytes(bytes).map_err(|e| format!("sink state is unreadable: {e}"))?;
        Ok(FileSinkState {
            pending: v1.pending,
            open: v1.open,
            open_records: v1.open_records,
            records_out: v1.records_out,
            guard: ReplayGuard::default(),
        })
    }
}

/// Most bytes of rows a restored sink holds back; beyond it the rows are
/// committed again (at-least-once for that window) with a warning.
const MAX_OWED_BYTES: usize = 64 << 20;

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
    /// What a restore holds back (boxed: rarely more than empty).
    held: Box<Held>,
}

/// Rows held back (see [`ReplayGuard`]), their total size, the part files
/// already counted, and this lineage's part-name tag.
#[derive(Default)]
struct Held {
    owed: std::collections::HashMap<String, u32>,
    owed_bytes: usize,
    counted: std::collections::BTreeSet<String>,
    tag: Option<String>,
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
            held: Box::default(),
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

    /// Deterministic part-file name of a transaction. A lineage that
    /// restored behind committed output tags its names
    /// (`part-<job>-<subtask>-<checkpoint>.<tag>.jsonl`), as its numbers may
    /// already be taken.
    pub fn part_name(prefix: &str, subtask: u32, cp: CheckpointId) -> String {
        Self::tagged_part_name(prefix, subtask, cp, None)
    }

    fn tagged_part_name(prefix: &str, subtask: u32, cp: CheckpointId, tag: Option<&str>) -> String {
        match tag {
            None => format!("part-{prefix}-{subtask:04}-{:08}.jsonl", cp.0),
            Some(t) => format!("part-{prefix}-{subtask:04}-{:08}.{t}.jsonl", cp.0),
        }
    }

    /// (subtask, checkpoint) of a committed part file of the job with
    /// part-file prefix `prefix`.
    fn parse_part(prefix: &str, name: &str) -> Option<(u32, u64)> {
        let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
        let (subtask, rest) = name
            .strip_prefix("part-")?
            .strip_prefix(prefix)?
            .strip_prefix('-')?
            .strip_suffix(".jsonl")?
            .split_once('-')?;
        let cp = match rest.split_once('.') {
            Some((cp, tag)) if !tag.is_empty() && tag.bytes().all(|b| b.is_ascii_hexdigit()) => cp,
            Some(_) => return None,
            None => rest,
        };
        if !(digits(subtask) && digits(cp)) {
            return None;
        }
        Some((subtask.parse().ok()?, cp.parse().ok()?))
    }

    /// Whether `name` is a committed part file of the job with part-file
    /// prefix `prefix` (any subtask and checkpoint): exactly the names
    /// [`Self::part_name`] makes, not another job's and not the staging file
    /// (`<part>#<n>`) a crash can leave behind.
    pub fn is_part_of(prefix: &str, name: &str) -> bool {
        Self::parse_part(prefix, name).is_some()
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
            let mut text = std::mem::take(&mut self.buffer);
            let mut records = std::mem::take(&mut self.buffer_records);
            if !self.held.owed.is_empty() {
                (text, records) = self.hold_back(&text);
            }
            if records > 0 {
                let name = Self::tagged_part_name(
                    &self.prefix,
                    self.subtask,
                    cp,
                    self.held.tag.as_deref(),
                );
                self.pending.insert(
                    (cp.0, name.clone()),
                    Pending {
                        name,
                        data: Bytes::from(text.into_bytes()),
                        records,
                    },
                );
            }
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
            guard: ReplayGuard {
                owed: self
                    .held
                    .owed
                    .iter()
                    .map(|(k, v)| (k.clone(), *v))
                    .collect(),
                counted: self.held.counted.iter().cloned().collect(),
                tag: self.held.tag.clone(),
            },
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
        for (row, n) in st.guard.owed {
            self.held.owed_bytes += row.len() * n as usize;
            *self.held.owed.entry(row).or_default() += n;
        }
        self.held.counted.extend(st.guard.counted);
        if st.guard.tag.is_some() {
            self.held.tag = st.guard.tag;
        }
    }

    /// Leaves out of `text` (JSON lines) every row still owed, once each;
    /// what remains and how many rows.
    fn hold_back(&mut self, text: &str) -> (String, u64) {
        let mut out = String::with_capacity(text.len());
        let mut records = 0;
        for line in text.lines() {
            if let Some(n) = self.held.owed.get_mut(line) {
                *n -= 1;
                if *n == 0 {
                    self.held.owed.remove(line);
                }
                self.held.owed_bytes = self.held.owed_bytes.saturating_sub(line.len());
                continue;
            }
            out.push_str(line);
            out.push('\n');
            records += 1;
        }
        (out, records)
    }

    /// After a restore from checkpoint `restored`: every committed part
    /// file of this job and subtask numbered above it — output of a lineage
    /// that was lost — is read once, and its rows are held back until this
    /// run produces them again. From then on this lineage tags its
    /// part-file names, as those numbers may be taken.
    async fn reconcile(&mut self, restored: CheckpointId) -> Result<(), String> {
        let files = self
            .out
            .list_files("")
            .await
            .map_err(|e| format!("listing the output {} failed: {e}", self.out.url()))?;
        let beyond: Vec<String> = files
            .into_iter()
            .map(|(name, _)| name)
            .filter(|name| {
                Self::parse_part(&self.prefix, name)
                    .is_some_and(|(sub, cp)| sub == self.subtask && cp > restored.0)
                    && !self.held.counted.contains(name)
            })
            .collect();
        if beyond.is_empty() {
            return Ok(());
        }
        let mut rows = 0u64;
        for name in &beyond {
            let Some(data) = self
                .out
                .get_opt(name)
                .await
                .map_err(|e| format!("reading {name} failed: {e}"))?
            else {
                continue;
            };
            for line in String::from_utf8_lossy(&data).lines() {
                if line.is_empty() {
                    continue;
                }
                self.held.owed_bytes += line.len();
                *self.held.owed.entry(line.to_string()).or_default() += 1;
                rows += 1;
            }
            self.held.counted.insert(name.clone());
        }
        if self.held.owed_bytes > MAX_OWED_BYTES {
            tracing::warn!(
                subtask = self.subtask,
                files = beyond.len(),
                mib = self.held.owed_bytes >> 20,
                "output committed beyond checkpoint {restored} is too large to hold back (over {} MiB): it is committed again (at-least-once for that window)",
                MAX_OWED_BYTES >> 20
            );
            self.held.owed.clear();
            self.held.owed_bytes = 0;
        } else {
            tracing::warn!(
                subtask = self.subtask,
                files = beyond.len(),
                rows,
                "output was committed beyond checkpoint {restored} (by a run that was lost, e.g. before a failover): its rows are held back until this run produces them again"
            );
        }
        // Distinct from every earlier lineage's (the time of this restore).
        self.held.tag = Some(format!(
            "{:x}",
            chrono::Utc::now().timestamp_micros() & 0xff_ffff_ffff
        ));
        Ok(())
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
            .restore(&[(0, Bytes::from(state2.unwrap()))], 0, 1, CheckpointId(2))
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
            .restore(&[(0, Bytes::from(state1.unwrap()))], 0, 1, CheckpointId(1))
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
        merged
            .restore(&states, 0, 1, CheckpointId(1))
            .await
            .unwrap();
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
        // A tagged lineage's names are the job's too; a bad tag is not.
        let tagged = FileSink::tagged_part_name(a, 3, CheckpointId(12), Some("1a2b"));
        assert_eq!(tagged, format!("part-{a}-0003-00000012.1a2b.jsonl"));
        assert_eq!(FileSink::parse_part(a, &tagged), Some((3, 12)));
        assert!(!FileSink::is_part_of(
            a,
            &format!("part-{a}-0003-00000012.x!.jsonl")
        ));
        assert!(!FileSink::is_part_of(
            a,
            &format!("part-{a}-0003-00000012..jsonl")
        ));
    }

    fn rows(dir: &std::path::Path) -> Vec<String> {
        let mut v = Vec::new();
        for name in parts(dir) {
            let text = std::fs::read_to_string(dir.join(&name)).unwrap();
            v.extend(text.lines().map(str::to_string));
        }
        v.sort();
        v
    }

    /// A run restored from checkpoint 1 while checkpoints 2 and 3 of a lost
    /// lineage were already committed: replaying the same input, it commits
    /// none of their rows again — under tagged names, as the numbers are
    /// taken — and every row beyond them once.
    #[tokio::test]
    async fn output_committed_beyond_the_restored_checkpoint_is_not_repeated() {
        let dir = tempfile::tempdir().unwrap();
        let loc = StorageLocation::open(dir.path().to_str().unwrap()).unwrap();
        let m = TaskMetrics::default();
        // The lost lineage: checkpoints 1-3, all committed.
        let mut first = Sink::File(FileSink::new(loc.clone(), "job", 0));
        let mut state1 = None;
        for (cp, vals) in [(1, vec![1, 2]), (2, vec![3, 4]), (3, vec![5])] {
            first.write(&batch(&vals), &m);
            let (st, _) = first.snapshot(CheckpointId(cp), true, 0).unwrap();
            first.commit(CheckpointId(cp)).await.unwrap();
            if cp == 1 {
                state1 = st;
            }
        }
        // The new lineage restores 1 and replays 3..7 with other barriers.
        let mut next = Sink::File(FileSink::new(loc.clone(), "job", 0));
        next.restore(&[(0, Bytes::from(state1.unwrap()))], 0, 1, CheckpointId(1))
            .await
            .unwrap();
        next.write(&batch(&[3]), &m);
        let (state2, _) = next.snapshot(CheckpointId(2), true, 0).unwrap();
        next.commit(CheckpointId(2)).await.unwrap();
        // It crashes and restores its own checkpoint 2: what is still owed
        // (4 and 5) comes with the state, and the old files are not counted
        // twice.
        let mut again = Sink::File(FileSink::new(loc.clone(), "job", 0));
        again
            .restore(&[(0, Bytes::from(state2.unwrap()))], 0, 1, CheckpointId(2))
            .await
            .unwrap();
        again.write(&batch(&[4, 5, 6]), &m);
        again.snapshot(CheckpointId(3), true, 0).unwrap();
        again.commit(CheckpointId(3)).await.unwrap();
        again.write(&batch(&[7]), &m);
        again.snapshot(CheckpointId(4), true, 0).unwrap();
        again.commit(CheckpointId(4)).await.unwrap();
        let want: Vec<String> = (1..=7).map(|n| format!("{{\"n\":{n}}}")).collect();
        let mut want = want;
        want.sort();
        assert_eq!(rows(dir.path()), want, "{:?}", parts(dir.path()));
        // The old lineage's files are untouched; the new one's are tagged.
        let names = parts(dir.path());
        assert!(names.contains(&"part-job-0000-00000002.jsonl".to_string()));
        assert!(names.contains(&"part-job-0000-00000003.jsonl".to_string()));
        assert!(
            names.iter().filter(|n| n.matches('.').count() == 2).count() >= 2,
            "{names:?}"
        );
    }

    /// States written before the replay guard existed still restore.
    #[tokio::test]
    async fn a_state_of_the_first_version_restores() {
        #[derive(Serialize)]
        struct V1 {
            pending: Vec<(u64, String, Vec<u8>, u64)>,
            open: Vec<u8>,
            open_records: u64,
            records_out: u64,
        }
        let bytes = postcard::to_stdvec(&V1 {
            pending: vec![(
                1,
                "part-job-0000-00000001.jsonl".into(),
                b"{\"n\":1}\n".to_vec(),
                1,
            )],
            open: Vec::new(),
            open_records: 0,
            records_out: 1,
        })
        .unwrap();
        Sink::check_state(
            &ferry_core::spec::SinkSpec::Blackhole(Default::default()),
            &bytes,
        )
        .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let loc = StorageLocation::open(dir.path().to_str().unwrap()).unwrap();
        let mut sink = Sink::File(FileSink::new(loc, "job", 0));
        let out = sink
            .restore(&[(0, Bytes::from(bytes))], 0, 1, CheckpointId(1))
            .await
            .unwrap();
        assert_eq!(out, 1);
        assert_eq!(rows(dir.path()), vec!["{\"n\":1}".to_string()]);
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
