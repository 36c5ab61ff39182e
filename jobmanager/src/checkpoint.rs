//! Checkpoint coordination of a job: triggering a snapshot (a barrier into
//! every source task), completing it once every task acknowledged (the
//! manifest, written create-only, then the commit), retention, snapshot
//! numbering, and reading the completed ones back for the API.
//!
//! Invariant: a checkpoint exists once its manifest is written and only
//! then are sinks told to commit; the manifest is written only after every
//! task acknowledged, so every file it lists is durable — and, with
//! synchronous replication, only after `regions.syncStandbys` standby
//! stores hold the checkpoint.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Instant;

use chrono::Utc;
use ferry_core::CheckpointId;
use ferry_core::manifest::{
    FileEntry, MANIFEST_FILE, MANIFEST_FORMAT, Manifest, SnapshotKind, VerifiedCheckpoint,
    checkpoint_dir, list_checkpoint_ids, manifest_bytes, savepoint_dir, savepoint_number,
    savepoints_root, snapshot_dir, write_manifest_bytes,
};
use ferry_region::SyncOutcome;
use ferry_taskmanager::protocol::{Barrier, TaskAck};
use tokio::sync::oneshot;

use crate::deployment::Deployment;
use crate::error::JmError;
use crate::job::JobEntry;
use crate::metrics::Metrics;
use crate::model::{CheckpointInfo, CompletedCheckpoint, SavepointInfo, manifest_info};

/// What a snapshot is for; decides its kind and what the tasks do at its
/// barrier.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum SnapshotRequest {
    /// A periodic checkpoint: sinks close their transaction, tasks go on.
    Checkpoint,
    /// A savepoint. With `stop` (stop-with-savepoint) sinks close their
    /// transaction and the tasks stop once it completes; an intermediate
    /// savepoint keeps the open transaction open.
    Savepoint { stop: bool },
    /// The final checkpoint of a bounded job whose sources all ended:
    /// sinks close, tasks stop, and the manifest is marked finished.
    Final,
}

impl SnapshotRequest {
    fn kind(self) -> SnapshotKind {
        match self {
            SnapshotRequest::Checkpoint | SnapshotRequest::Final => SnapshotKind::Checkpoint,
            SnapshotRequest::Savepoint { .. } => SnapshotKind::Savepoint,
        }
    }

    fn close_txn(self) -> bool {
        match self {
            SnapshotRequest::Checkpoint | SnapshotRequest::Final => true,
            SnapshotRequest::Savepoint { stop } => stop,
        }
    }

    fn stop(self) -> bool {
        match self {
            SnapshotRequest::Checkpoint => false,
            SnapshotRequest::Savepoint { stop } => stop,
            SnapshotRequest::Final => true,
        }
    }

    fn finished(self) -> bool {
        self == SnapshotRequest::Final
    }
}

/// A snapshot waiting for acknowledgements.
pub(crate) struct Pending {
    pub(crate) barrier: Barrier,
    /// The snapshot's span, from trigger to manifest (or failure): entered
    /// when the barrier is sent and while the manifest is written, so it
    /// ends there. `outcome` is recorded at the end.
    pub(crate) span: tracing::Span,
    pub(crate) started: Instant,
    pub(crate) acks: Vec<TaskAck>,
    pub(crate) finished: bool,
    pub(crate) reply: Option<Reply>,
}

/// Who waits for a savepoint.
pub(crate) enum Reply {
    Savepoint(oneshot::Sender<Result<SavepointInfo, JmError>>),
    Stop(oneshot::Sender<Result<Option<SavepointInfo>, JmError>>),
}

impl Reply {
    /// The snapshot this caller asked for.
    pub(crate) fn request(&self) -> SnapshotRequest {
        SnapshotRequest::Savepoint {
            stop: matches!(self, Reply::Stop(_)),
        }
    }
}

/// Tells whoever waits for a snapshot that it failed.
pub(crate) fn fail_reply(reply: Option<Reply>, err: JmError) {
    match reply {
        Some(Reply::Savepoint(r)) => drop(r.send(Err(err))),
        Some(Reply::Stop(r)) => drop(r.send(Err(err))),
        None => {}
    }
}

/// Sends the barrier of snapshot `next_id` (numbering on from there) to
/// every source task.
pub(crate) fn trigger(
    job: &JobEntry,
    deployed: &Deployment,
    next_id: &mut CheckpointId,
    request: SnapshotRequest,
    reply: Option<Reply>,
) -> Pending {
    let id = *next_id;
    *next_id = id.next();
    let kind = request.kind();
    let barrier = Barrier {
        id,
        kind,
        close_txn: request.close_txn(),
        stop: request.stop(),
        dir: job.root.child(&snapshot_dir(&job.id, kind, id)),
    };
    let span = tracing::info_span!(
        "checkpoint",
        job = %job.id,
        checkpoint = id.0,
        kind = ?kind,
        tasks = tracing::field::Empty,
        outcome = tracing::field::Empty,
    );
    span.in_scope(|| {
        tracing::debug!(job = %job.id, checkpoint = %id, ?kind, "triggering snapshot");
        deployed.trigger(&barrier);
    });
    Pending {
        barrier,
        span,
        started: Instant::now(),
        acks: Vec::new(),
        finished: request.finished(),
        reply,
    }
}

/// Why a fully acknowledged snapshot did not complete.
#[derive(Debug)]
pub(crate) struct NotCompleted {
    pub(crate) why: String,
    /// Synchronous replication is blocked (too few standby stores, and
    /// `regions.onStandbyLoss: block`): the job is fine, its output waits;
    /// such failures do not count against `checkpointing.tolerableFailures`.
    pub(crate) blocked: bool,
}

impl From<String> for NotCompleted {
    fn from(why: String) -> Self {
        NotCompleted {
            why,
            blocked: false,
        }
    }
}

/// Writes the manifest of a fully acknowledged snapshot and tells the tasks
/// to commit (with synchronous replication, once the standbys hold the
/// snapshot); applies retention.
#[tracing::instrument(
    name = "checkpoint.complete",
    parent = &p.span,
    skip_all,
    fields(job = %job.id, checkpoint = p.barrier.id.0, size_bytes = tracing::field::Empty)
)]
pub(crate) async fn complete_checkpoint(
    job: &JobEntry,
    deployed: &Deployment,
    p: &Pending,
    metrics: &Metrics,
) -> Result<SavepointInfo, NotCompleted> {
    let mut files = Vec::new();
    let mut offsets = BTreeMap::new();
    let mut txns = Vec::new();
    for a in &p.acks {
        files.extend(a.files.iter().cloned());
        offsets.extend(a.source_offsets.clone());
        txns.extend(a.sink_transactions.iter().cloned());
    }
    // Sorted for a stable manifest; shared files' order in their chain is
    // their `chain` position, not their place here.
    files.sort_by(|a, b| {
        (&a.operator, a.subtask, a.chain, &a.path).cmp(&(&b.operator, b.subtask, b.chain, &b.path))
    });
    // Fenced: only a JobManager that leads right now may complete a
    // checkpoint, and the manifest records under which epoch it did.
    let Some(epoch) = job.leadership.fence() else {
        return Err(format!(
            "checkpoint {} abandoned: this JobManager no longer holds the leader lease",
            p.barrier.id
        )
        .into());
    };
    let duration = p.started.elapsed();
    if let Some(f) = job.shared_gc.inherited_removed(&files) {
        // The task built on a snapshot that retention has removed since (it
        // missed a completion): this checkpoint would not restore.
        return Err(format!(
            "checkpoint {} not completed: '{}' builds on '{}', which retention removed (the task missed a completion); after two such failures in a row the task writes its state in full again",
            p.barrier.id, f.operator, f.path
        )
        .into());
    }
    let mut manifest = Manifest {
        format: MANIFEST_FORMAT,
        job_id: job.id,
        job_name: job.spec.metadata.name.clone(),
        checkpoint_id: p.barrier.id,
        kind: p.barrier.kind,
        created_at: Utc::now(),
        jm_epoch: epoch,
        region_epoch: job.region_epoch.get(),
        parallelism: job.spec.spec.parallelism,
        watermark: p.acks.iter().map(|a| a.watermark).min().unwrap_or(i64::MIN),
        records_in: p.acks.iter().map(|a| a.records_in).sum(),
        records_out: p.acks.iter().map(|a| a.records_out).sum(),
        finished: p.finished,
        duration_ms: duration.as_millis() as u64,
        files,
        source_offsets: offsets,
        sink_transactions: txns,
        restored_from: *job.restored_from.lock().unwrap_or_else(|p| p.into_inner()),
    };
    manifest.format = manifest.needed_format();
    // Fenced across regions too: a region that may have lost the primary
    // role writes no checkpoint of the old region epoch.
    job.region_fence
        .check()
        .map_err(|e| format!("checkpoint {} abandoned: {e}", p.barrier.id))?;
    p.span.record("tasks", p.acks.len());
    tracing::Span::current().record("size_bytes", manifest.total_size());
    let data = manifest_bytes(&manifest).map_err(|e| e.to_string())?;
    // Synchronous replication: into the standbys' stores first.
    if let Some(sync) = job.sync.get() {
        let rel = snapshot_dir(&job.id, p.barrier.kind, p.barrier.id);
        let started = Instant::now();
        let outcome = sync.replicate(&job.id, &job.root, &rel, data.clone()).await;
        metrics.set_sync_state(sync.state());
        match outcome {
            Ok(SyncOutcome::Replicated(standbys)) => {
                metrics
                    .replication_sync_seconds
                    .get_or_create(&Metrics::job(&job.id.to_string()))
                    .observe(started.elapsed().as_secs_f64());
                tracing::debug!(job = %job.id, checkpoint = %p.barrier.id, ?standbys, "in the standby stores");
            }
            Ok(SyncOutcome::Degraded) => {}
            Err(e) => {
                return Err(NotCompleted {
                    why: format!("checkpoint {} not completed: {e}", p.barrier.id),
                    blocked: true,
                });
            }
        }
    }
    write_manifest_bytes(&p.barrier.dir, data)
        .await
        .map_err(|e| e.to_string())?;
    // The write may have taken long enough for the lease to lapse: then the
    // tasks must not commit their output for it (a new leader may already
    // have restored from the previous checkpoint).
    if job.leadership.fence() != Some(epoch) {
        return Err(format!(
            "checkpoint {} written, but the leader lease lapsed meanwhile: the sinks do not commit it; the next leader decides",
            p.barrier.id
        )
        .into());
    }
    if let Err(e) = job.region_fence.check() {
        return Err(format!(
            "checkpoint {} written, but the sinks do not commit it: {e}",
            p.barrier.id
        )
        .into());
    }
    deployed.complete(p.barrier.id, manifest.region_epoch);
    // From the trigger to now, the copy into the standbys included (the
    // manifest's own `duration_ms` ends before it: the copy carries it).
    let duration = p.started.elapsed();
    let labels = Metrics::job(&job.id.to_string());
    metrics.checkpoints_completed.get_or_create(&labels).inc();
    metrics
        .checkpoint_duration
        .get_or_create(&labels)
        .observe(duration.as_secs_f64());
    metrics
        .checkpoint_size
        .get_or_create(&labels)
        .set(manifest.total_size() as i64);
    metrics
        .checkpoint_written
        .get_or_create(&labels)
        .inc_by(manifest.written_size());
    let sync: f64 = p.acks.iter().map(|a| a.sync_duration.as_secs_f64()).sum();
    let upload: f64 = p.acks.iter().map(|a| a.async_duration.as_secs_f64()).sum();
    metrics
        .checkpoint_sync_seconds
        .get_or_create(&labels)
        .inc_by(sync);
    metrics
        .checkpoint_async_seconds
        .get_or_create(&labels)
        .inc_by(upload);
    metrics
        .last_checkpoint_timestamp
        .get_or_create(&labels)
        .set(Utc::now().timestamp());
    let info = CheckpointInfo {
        duration_ms: duration.as_millis() as u64,
        ..manifest_info(&manifest, &p.barrier.dir)
    };
    let _ = job.completed.send(CompletedCheckpoint {
        job: job.id,
        root: job.root.clone(),
        dir: snapshot_dir(&job.id, p.barrier.kind, p.barrier.id),
        checkpoint: p.barrier.id.0,
        savepoint: p.barrier.kind == SnapshotKind::Savepoint,
        completed_at: manifest.created_at,
        records_in: manifest.records_in,
        watermark: manifest.watermark,
    });
    tracing::info!(
        job = %job.id,
        checkpoint = %p.barrier.id,
        kind = ?p.barrier.kind,
        ms = duration.as_millis() as u64,
        bytes = manifest.total_size(),
        written = manifest.written_size(),
        "snapshot completed"
    );
    job.status
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .last_checkpoint = Some(info);
    job.touch();
    if p.barrier.kind == SnapshotKind::Checkpoint
        && let Err(e) = retain(job, p.barrier.id).await
    {
        tracing::warn!(job = %job.id, "checkpoint retention failed: {e}");
    }
    Ok(SavepointInfo {
        job_id: job.id,
        checkpoint_id: p.barrier.id.0,
        path: p.barrier.dir.url().to_string(),
    })
}

/// Removes the partial files of a checkpoint attempt that failed (best
/// effort: a task still uploading may add a file afterwards, which the
/// next completed checkpoint's retention or the next deployment removes).
pub(crate) async fn abort_checkpoint(job: &JobEntry, p: &Pending) {
    if p.barrier.kind != SnapshotKind::Checkpoint {
        return;
    }
    if let Err(e) =
        ferry_core::manifest::abort_snapshot_dir(&p.barrier.dir, "the checkpoint failed").await
    {
        tracing::debug!(job = %job.id, checkpoint = %p.barrier.id, "removing the failed checkpoint's files failed: {e}");
    }
}

/// Removes the partial files of every incomplete checkpoint directory
/// above `restored` (attempts of the previous deployment, none of them in
/// flight any more), leaving their markers.
pub(crate) async fn abort_incomplete(job: &JobEntry, restored: Option<CheckpointId>) {
    let ids = match list_checkpoint_ids(&job.root, &job.id).await {
        Ok(ids) => ids,
        Err(e) => {
            tracing::debug!(job = %job.id, "listing checkpoints to clean up failed: {e}");
            return;
        }
    };
    for id in ids.into_iter().filter(|id| Some(*id) > restored) {
        let dir = job.root.child(&checkpoint_dir(&job.id, id));
        if let Err(e) = ferry_core::manifest::abort_snapshot_dir(
            &dir,
            "the deployment ended before it completed",
        )
        .await
        {
            tracing::debug!(job = %job.id, checkpoint = %id, "removing an incomplete checkpoint failed: {e}");
        }
    }
}

/// Keeps the newest `retained` complete checkpoints up to `completed`;
/// deletes older directories (complete or not), the partial files of
/// failed attempts between them, and the shared state files no retained
/// checkpoint lists.
async fn retain(job: &JobEntry, completed: CheckpointId) -> Result<(), String> {
    let keep = job.spec.spec.checkpointing.retained.max(1) as usize;
    let ids = list_checkpoint_ids(&job.root, &job.id)
        .await
        .map_err(|e| e.to_string())?;
    let mut complete = Vec::new();
    for id in ids.iter().filter(|i| **i <= completed) {
        let dir = job.root.child(&checkpoint_dir(&job.id, *id));
        if dir
            .size(MANIFEST_FILE)
            .await
            .map_err(|e| e.to_string())?
            .is_some()
        {
            complete.push(*id);
        }
    }
    for id in ids
        .iter()
        .filter(|i| **i < completed && !complete.contains(i))
    {
        ferry_core::manifest::abort_snapshot_dir(
            &job.root.child(&checkpoint_dir(&job.id, *id)),
            "the checkpoint failed",
        )
        .await
        .map_err(|e| e.to_string())?;
    }
    if complete.len() > keep {
        let oldest_kept = complete[complete.len() - keep];
        for id in ids.iter().filter(|i| **i < oldest_kept) {
            job.root
                .delete_prefix(&checkpoint_dir(&job.id, *id))
                .await
                .map_err(|e| e.to_string())?;
        }
    }
    collect_shared(job).await
}

/// Deletes the files of the job's `shared/` folder that no snapshot of it
/// lists. Runs when no checkpoint is in flight (one at a time per job), so
/// a file not yet listed is an orphan of a failed attempt; a task that
/// still builds on a removed file is caught when its checkpoint completes
/// ([`SharedGc::inherited_removed`]).
async fn collect_shared(job: &JobEntry) -> Result<(), String> {
    let removed = ferry_core::manifest::collect_shared(&job.root, &job.id, None)
        .await
        .map_err(|e| format!("shared state files kept: {e}"))?;
    for path in removed {
        job.shared_gc.removed(&path);
    }
    Ok(())
}

/// The shared state files this JobManager's retention removed lately: a
/// checkpoint that lists one of them would not restore.
#[derive(Default)]
pub(crate) struct SharedGc {
    removed: Mutex<(
        std::collections::HashSet<String>,
        std::collections::VecDeque<String>,
    )>,
}

impl SharedGc {
    /// Names kept (the oldest forgotten first): far more than one
    /// checkpoint's chains hold.
    const REMEMBERED: usize = 65_536;

    fn removed(&self, path: &str) {
        let mut g = self.removed.lock().unwrap_or_else(|p| p.into_inner());
        let (set, order) = &mut *g;
        if set.insert(path.to_string()) {
            order.push_back(path.to_string());
            if order.len() > Self::REMEMBERED
                && let Some(old) = order.pop_front()
            {
                set.remove(&old);
            }
        }
    }

    /// The first file of `files` (a checkpoint's) that its chain took over
    /// from an earlier checkpoint and that retention removed since. The
    /// newest file of each chain was written for this checkpoint — after
    /// any removal, as retention runs between checkpoints — so it exists
    /// even when a removed orphan had the same content (an empty state's
    /// full snapshot is the same bytes every time): it is forgotten as
    /// removed instead.
    pub(crate) fn inherited_removed<'a>(&self, files: &'a [FileEntry]) -> Option<&'a FileEntry> {
        let mut newest: BTreeMap<(&str, u32), u32> = BTreeMap::new();
        for f in files.iter().filter(|f| f.shared) {
            let n = newest.entry((f.operator.as_str(), f.subtask)).or_default();
            *n = (*n).max(f.chain);
        }
        let mut g = self.removed.lock().unwrap_or_else(|p| p.into_inner());
        let (set, _) = &mut *g;
        let mut refused = None;
        for f in files.iter().filter(|f| f.shared) {
            if newest.get(&(f.operator.as_str(), f.subtask)) == Some(&f.chain) {
                set.remove(&f.path);
            } else if refused.is_none() && set.contains(&f.path) {
                refused = Some(f);
            }
        }
        refused
    }
}

/// The first checkpoint number of a deployment: above every number that
/// has a directory, so no number is ever reused.
pub(crate) async fn next_checkpoint_id(
    job: &JobEntry,
    restored: Option<&VerifiedCheckpoint>,
) -> Result<CheckpointId, JmError> {
    let highest = list_checkpoint_ids(&job.root, &job.id)
        .await?
        .last()
        .copied()
        .unwrap_or_default();
    let restored = restored
        .map(|c| c.manifest.checkpoint_id)
        .unwrap_or_default();
    let mut sp_high = CheckpointId(0);
    for name in job.root.list_dirs(&savepoints_root(&job.id)).await? {
        if let Some(n) = savepoint_number(&name) {
            sp_high = sp_high.max(n);
        }
    }
    Ok(highest.max(restored).max(sp_high).next())
}

/// `restored_from` of the job's newest checkpoint, if any.
pub(crate) async fn newest_lineage(job: &JobEntry) -> Option<u64> {
    let ids = list_checkpoint_ids(&job.root, &job.id).await.ok()?;
    for id in ids.iter().rev() {
        let dir = job.root.child(&checkpoint_dir(&job.id, *id));
        if let Ok(Some(m)) = ferry_core::manifest::read_manifest(&dir).await {
            return m.restored_from;
        }
    }
    None
}

/// Completed checkpoints and savepoints of a job, newest first.
pub(crate) async fn completed(job: &JobEntry) -> Result<Vec<CheckpointInfo>, JmError> {
    let mut dirs: Vec<String> = list_checkpoint_ids(&job.root, &job.id)
        .await?
        .into_iter()
        .map(|cp| checkpoint_dir(&job.id, cp))
        .collect();
    for name in job.root.list_dirs(&savepoints_root(&job.id)).await? {
        dirs.push(savepoint_dir(&job.id, &name));
    }
    let mut out = Vec::new();
    for rel in dirs {
        let dir = job.root.child(&rel);
        // A directory without a readable manifest is not a checkpoint.
        if let Some(raw) = dir.get_opt(MANIFEST_FILE).await?
            && let Ok(m) = serde_json::from_slice::<Manifest>(&raw)
        {
            out.push(manifest_info(&m, &dir));
        }
    }
    out.sort_by_key(|c| std::cmp::Reverse(c.id));
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_set_the_barrier_as_the_boolean_arguments_did() {
        use SnapshotKind::{Checkpoint, Savepoint};
        // (kind, close_txn, stop, finished) as the call sites passed them.
        let cases = [
            (
                SnapshotRequest::Checkpoint,
                (Checkpoint, true, false, false),
            ),
            (
                SnapshotRequest::Savepoint { stop: false },
                (Savepoint, false, false, false),
            ),
            (
                SnapshotRequest::Savepoint { stop: true },
                (Savepoint, true, true, false),
            ),
            (SnapshotRequest::Final, (Checkpoint, true, true, true)),
        ];
        for (r, want) in cases {
            assert_eq!(
                (r.kind(), r.close_txn(), r.stop(), r.finished()),
                want,
                "{r:?}"
            );
        }
        let (tx, _rx) = oneshot::channel();
        assert_eq!(
            Reply::Stop(tx).request(),
            SnapshotRequest::Savepoint { stop: true }
        );
        let (tx, _rx) = oneshot::channel();
        assert_eq!(
            Reply::Savepoint(tx).request(),
            SnapshotRequest::Savepoint { stop: false }
        );
    }

    fn shared(path: &str, subtask: u32, chain: u32) -> FileEntry {
        FileEntry {
            path: format!("shared/{path}"),
            size: 1,
            sha256: String::new(),
            operator: "window".into(),
            subtask,
            shared: true,
            chain,
        }
    }

    #[test]
    fn only_inherited_files_that_retention_removed_refuse_a_checkpoint() {
        let gc = SharedGc::default();
        gc.removed("shared/base");
        gc.removed("shared/empty");
        // Subtask 0 builds on the removed base; subtask 1 wrote a full
        // snapshot whose bytes equal a removed orphan's.
        let files = vec![
            shared("base", 0, 0),
            shared("delta", 0, 1),
            shared("empty", 1, 0),
        ];
        assert_eq!(
            gc.inherited_removed(&files).map(|f| f.path.as_str()),
            Some("shared/base")
        );
        // Written anew, "empty" is no longer removed: a later chain may
        // build on it.
        let later = vec![shared("empty", 1, 0), shared("d2", 1, 1)];
        assert!(gc.inherited_removed(&later).is_none());
    }
}
