//! Replication of checkpoints, savepoints and job specs from one region's
//! object store to another's.
//!
//! Per checkpoint directory: the source manifest is read first (a directory
//! without one is not a checkpoint and is not copied); every file it lists
//! that the target lacks is read from the source, checked against the
//! manifest's size and SHA-256 (a corrupt source is never replicated),
//! written to the target, read back and checked again — a copy damaged on
//! the way is written again, up to [`MAX_ATTEMPTS`] times. The files of a
//! snapshot go at once (up to 16), so a copy to a distant store costs a
//! few round trips, not a few per file. `MANIFEST.json` goes last,
//! create-only, with the source's exact bytes ([`CopyMode`] says when).
//!
//! Invariant: a target directory has a manifest only once every file it
//! lists is there and verified ([`CopyMode::Resume`]), or while they are
//! being verified and never after one failed ([`CopyMode::Fresh`]: a
//! checkpoint the primary completes only after the copy succeeded), so a
//! standby never lists a partial checkpoint and never restores a damaged
//! one (its restore check hashes every file); and paths inside a
//! checkpoint are relative, so the copy restores unchanged in the other
//! region.

use std::collections::BTreeMap;

use bytes::Bytes;
use ferry_core::manifest::{
    FileEntry, MANIFEST_FILE, Manifest, checkpoint_dir, job_dir, list_checkpoint_ids,
    savepoint_dir, savepoints_root,
};
use ferry_core::storage::{StorageLocation, sha256_hex};
use ferry_core::{CheckpointId, CoreError, JobId};

use crate::fence::WriteFence;

/// Writes of one file before its copy counts as failed.
pub const MAX_ATTEMPTS: u32 = 3;

/// Why a checkpoint (or a job) could not be replicated.
#[derive(Debug, thiserror::Error)]
pub enum ReplicationError {
    /// The source directory has no manifest: not a (complete) checkpoint.
    #[error("{0} has no {MANIFEST_FILE}: not a complete checkpoint, nothing to replicate")]
    Incomplete(String),
    /// The source itself does not match its manifest: never replicated.
    #[error("source {path} is corrupt: {reason}; not replicated")]
    SourceCorrupt { path: String, reason: String },
    /// Every copy of a file read back different from the manifest.
    #[error("copying {path} failed verification {attempts} times: {reason}")]
    Transfer {
        path: String,
        attempts: u32,
        reason: String,
    },
    /// The target already holds a different manifest for this checkpoint.
    #[error(
        "{path} already exists with different contents: two primaries wrote this checkpoint number (check the region epochs)"
    )]
    Conflict { path: String },
    /// The target holds a newer lineage (a higher region epoch) than the
    /// source: the source is a region that lost the primary role.
    #[error(
        "job {job}: the target holds checkpoint {checkpoint} of region epoch {target_epoch}, newer than the source's lineage (region epoch {source_epoch}); a region that lost the primary role does not replicate over a newer one"
    )]
    StaleSource {
        job: JobId,
        source_epoch: ferry_core::RegionEpoch,
        target_epoch: ferry_core::RegionEpoch,
        checkpoint: u64,
    },
    /// This region does not hold the primary role with a confirmed lease
    /// (see [`crate::fence`]): it writes nothing into other stores.
    #[error(
        "{what} not written: this region does not hold the primary role with a confirmed region lease, so it writes nothing into other regions' stores"
    )]
    Fenced { what: String },
    #[error(transparent)]
    Storage(#[from] CoreError),
}

/// What copying one checkpoint directory did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CheckpointCopy {
    /// Directory relative to the storage roots.
    pub dir: String,
    pub checkpoint: u64,
    /// Files written to the target (verified).
    pub files_copied: usize,
    /// Files the target already had with the right size.
    pub files_present: usize,
    pub bytes_copied: u64,
    /// Extra writes after a copy read back wrong.
    pub retries: u32,
    /// The target already had this manifest: nothing was done.
    pub already_complete: bool,
    /// Records in, from the manifest (for lag in records).
    pub records_in: u64,
    /// Watermark, from the manifest (for lag in event time).
    pub watermark: i64,
}

/// What replicating one job did.
#[derive(Clone, Debug, Default)]
pub struct JobCopy {
    pub job: Option<JobId>,
    /// The spec was written (it was missing or different).
    pub spec_copied: bool,
    /// Checkpoints and savepoints copied (or found complete) in this pass.
    pub copied: Vec<CheckpointCopy>,
    /// Source checkpoints left out, and why (corrupt, failed copies).
    pub skipped: Vec<(String, String)>,
    /// Target checkpoint directories deleted because the source no longer
    /// retains them.
    pub removed: Vec<u64>,
    /// Target snapshots archived and removed because they diverged from
    /// the source's lineage (see [`crate::diverge`]).
    pub diverged: Vec<ferry_core::api::Diverged>,
    /// The checkpoints the target holds after the pass, as far as it
    /// looked (what [`replicate_new`] may delete later).
    pub target_checkpoints: Vec<u64>,
    /// Shared state files (incremental checkpoints) deleted from the
    /// target because none of its checkpoints lists them any more.
    pub shared_removed: usize,
}

impl JobCopy {
    /// The newest checkpoint the target now holds completely.
    pub fn newest(&self) -> Option<&CheckpointCopy> {
        self.copied
            .iter()
            .filter(|c| c.dir.contains("/checkpoints/"))
            .max_by_key(|c| c.checkpoint)
    }
}

/// Copies the checkpoint or savepoint directory `dir` (relative to both
/// roots) from `source` to `target`.
#[tracing::instrument(name = "replicate", skip_all, fields(dir = %dir, target = %target.url()))]
pub async fn replicate_checkpoint(
    source: &StorageLocation,
    target: &StorageLocation,
    dir: &str,
    fence: &WriteFence,
) -> Result<CheckpointCopy, ReplicationError> {
    let Some(raw) = source.child(dir).get_opt(MANIFEST_FILE).await? else {
        return Err(ReplicationError::Incomplete(
            source.child(dir).url().to_string(),
        ));
    };
    copy_snapshot(source, target, dir, raw, fence).await
}

/// How [`copy_snapshot_with`] copies a snapshot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CopyMode {
    /// Looks first at what the target has — its manifest (identical: done;
    /// different: a conflict) and the files of the right size, kept —
    /// then writes every other file, reads each back and checks it, and
    /// writes the manifest last. Resumes an interrupted copy. Four round
    /// trips to a remote store: the asynchronous replicator and `ferry
    /// region replicate`.
    Resume,
    /// A checkpoint that just completed on the primary, which the target
    /// cannot hold yet (synchronous replication): no look first; every
    /// file is written, and the manifest is written *while* the files are
    /// read back. Should one read back wrong, the manifest is deleted
    /// again before the file is rewritten, and the copy reports success
    /// only once every file checked out with the manifest in place. Two
    /// round trips, which is what a checkpoint waits for. (A standby that
    /// looks in that instant finds a manifest whose file is wrong: its
    /// restore check refuses that checkpoint and takes the one before —
    /// which is the right one, since the primary has not completed this
    /// checkpoint.)
    Fresh,
}

/// Files of one snapshot copied (and read back) at once.
const CONCURRENT_FILES: usize = 16;

/// Copies the snapshot directory `dir` whose manifest is `raw` from
/// `source` to `target`, as [`replicate_checkpoint`] does
/// ([`CopyMode::Resume`]); the manifest need not be in `source` yet.
pub async fn copy_snapshot(
    source: &StorageLocation,
    target: &StorageLocation,
    dir: &str,
    raw: Bytes,
    fence: &WriteFence,
) -> Result<CheckpointCopy, ReplicationError> {
    copy_snapshot_with(source, target, dir, raw, fence, CopyMode::Resume).await
}

/// [`copy_snapshot`] in either [`CopyMode`]: synchronous replication puts
/// a checkpoint into the standbys' stores ([`CopyMode::Fresh`]) before
/// its manifest is in the primary's.
pub async fn copy_snapshot_with(
    source: &StorageLocation,
    target: &StorageLocation,
    dir: &str,
    raw: Bytes,
    fence: &WriteFence,
    mode: CopyMode,
) -> Result<CheckpointCopy, ReplicationError> {
    use futures::{StreamExt as _, TryStreamExt as _};
    let src = source.child(dir);
    let dst = target.child(dir);
    let manifest: Manifest =
        serde_json::from_slice(&raw).map_err(|e| ReplicationError::SourceCorrupt {
            path: format!("{}/{MANIFEST_FILE}", src.url()),
            reason: format!("unreadable manifest: {e}"),
        })?;
    let mut report = CheckpointCopy {
        dir: dir.to_string(),
        checkpoint: manifest.checkpoint_id.0,
        records_in: manifest.records_in,
        watermark: manifest.watermark,
        ..Default::default()
    };
    if let Err(reason) = manifest.check_files() {
        return Err(ReplicationError::SourceCorrupt {
            path: format!("{}/{MANIFEST_FILE}", src.url()),
            reason,
        });
    }
    // Shared files (incremental checkpoints) lie in the job's `shared/`
    // folder, two levels above the snapshot's directory, on both sides.
    let (src_job, dst_job) = (src.parent().parent(), dst.parent().parent());
    let side = |f: &FileEntry| -> (StorageLocation, StorageLocation) {
        if f.shared {
            (src_job.clone(), dst_job.clone())
        } else {
            (src.clone(), dst.clone())
        }
    };
    let present: BTreeMap<String, u64> = match mode {
        CopyMode::Resume => {
            let (existing, listed) = tokio::join!(dst.get_opt(MANIFEST_FILE), dst.list_files(""));
            if let Some(existing) = existing? {
                if existing == raw {
                    report.already_complete = true;
                    return Ok(report);
                }
                return Err(ReplicationError::Conflict {
                    path: format!("{}/{MANIFEST_FILE}", dst.url()),
                });
            }
            listed?.into_iter().collect()
        }
        CopyMode::Fresh => BTreeMap::new(),
    };
    // A shared file named by its content that the target has at the right
    // size is this file (a delta an earlier checkpoint brought along, or
    // the full snapshot under it): only the new ones cross.
    let shared_present: BTreeMap<String, u64> = {
        let heads: Vec<_> = manifest
            .files
            .iter()
            .filter(|f| f.shared)
            .map(|f| {
                let (dst_job, path) = (dst_job.clone(), f.path.clone());
                async move { dst_job.size(&path).await.map(|s| (path, s)) }
            })
            .collect();
        futures::stream::iter(heads)
            .buffered(CONCURRENT_FILES)
            .try_collect::<Vec<_>>()
            .await?
            .into_iter()
            .filter_map(|(p, s)| s.map(|s| (p, s)))
            .collect()
    };
    // Incremental: a file of the right size is kept (it was verified when
    // this replicator wrote it; the standby's restore check re-hashes
    // everything).
    let (kept, todo): (Vec<_>, Vec<_>) = manifest.files.iter().partition(|f| {
        let have = if f.shared { &shared_present } else { &present };
        have.get(&f.path) == Some(&f.size)
    });
    report.files_present = kept.len();
    // The source's bytes, checked: a corrupt source is never replicated.
    // (Each future owns what it uses: the stream is spawned by callers.)
    let reads: Vec<_> = todo
        .iter()
        .map(|f| {
            let ((from, _), f) = (side(f), (*f).clone());
            let src = src.clone();
            async move {
                let Some(data) = from.get_opt(&f.path).await? else {
                    return Err(missing_source_file(&src, &from, &f.path).await);
                };
                check(&data, f.size, &f.sha256).map_err(|reason| {
                    ReplicationError::SourceCorrupt {
                        path: format!("{}/{}", from.url(), f.path),
                        reason,
                    }
                })?;
                Ok((f, data))
            }
        })
        .collect();
    let mut pending: Vec<(FileEntry, Bytes)> = futures::stream::iter(reads)
        .buffered(CONCURRENT_FILES)
        .try_collect()
        .await?;
    let mut manifest_in_place = false;
    let mut attempt = 0;
    loop {
        attempt += 1;
        // Write every pending file at once, then read each back. A write
        // the store refused (e.g. its payload checksum did not match what
        // arrived) counts as a failed attempt like a copy that reads back
        // wrong.
        for (f, _) in &pending {
            fence.check(&f.path)?;
        }
        let writes: Vec<_> = pending
            .iter()
            .map(|(f, data)| {
                let ((_, dst), path, data) = (side(f), f.path.clone(), data.clone());
                async move {
                    dst.put(&path, data)
                        .await
                        .map_err(|e| format!("the target refused the write: {e}"))
                }
            })
            .collect();
        let copies: Vec<Result<(), String>> = futures::stream::iter(writes)
            .buffered(CONCURRENT_FILES)
            .collect()
            .await;
        let written = copies.iter().all(Result::is_ok);
        let reads: Vec<_> = pending
            .iter()
            .zip(copies)
            .map(|((f, _), copied)| {
                let ((_, dst), f) = (side(f), f.clone());
                async move {
                    copied?;
                    match dst.get_opt(&f.path).await {
                        Ok(Some(back)) => check(&back, f.size, &f.sha256),
                        Ok(None) => Err("missing right after it was written".into()),
                        Err(e) => Err(format!("reading it back failed: {e}")),
                    }
                }
            })
            .collect();
        let read_back = futures::stream::iter(reads)
            .buffered(CONCURRENT_FILES)
            .collect::<Vec<Result<(), String>>>();
        // Fresh: the manifest goes beside the read-back (see CopyMode).
        let with_manifest = mode == CopyMode::Fresh && written && !manifest_in_place;
        let (checked, manifest_written) = tokio::join!(read_back, async {
            if with_manifest {
                Some(put_manifest(&dst, &raw, fence).await)
            } else {
                None
            }
        });
        let failed: Vec<(String, String)> = pending
            .iter()
            .zip(checked)
            .filter_map(|((f, _), r)| r.err().map(|why| (f.path.clone(), why)))
            .collect();
        match manifest_written {
            Some(Ok(())) => manifest_in_place = true,
            // A conflict or a closed fence ends the copy; the files of
            // another manifest are not ours to judge.
            Some(Err(e)) => return Err(e),
            None => {}
        }
        if failed.is_empty() {
            if !manifest_in_place {
                // Last, create-only: from here on the checkpoint exists in
                // the target.
                put_manifest(&dst, &raw, fence).await?;
            }
            break;
        }
        if manifest_in_place {
            let path = format!("{}/{MANIFEST_FILE}", dst.url());
            fence.write(&path, dst.delete(MANIFEST_FILE)).await?;
            manifest_in_place = false;
        }
        let (f, reason) = &failed[0];
        if attempt >= MAX_ATTEMPTS {
            return Err(ReplicationError::Transfer {
                path: format!("{}/{f}", dst.url()),
                attempts: attempt,
                reason: reason.clone(),
            });
        }
        for (f, reason) in &failed {
            tracing::warn!(
                file = %format!("{}/{f}", dst.url()),
                attempt,
                "replicated file read back wrong ({reason}); writing it again"
            );
        }
        report.retries += failed.len() as u32;
        let again: std::collections::BTreeSet<&str> =
            failed.iter().map(|(f, _)| f.as_str()).collect();
        pending.retain(|(f, _)| again.contains(f.path.as_str()));
    }
    report.files_copied = todo.len();
    report.bytes_copied = todo.iter().map(|f| f.size).sum();
    Ok(report)
}

/// Writes a snapshot's manifest `raw` into `dst`, create-only, through
/// `fence`; the same manifest already there counts as written, another
/// one is a conflict.
async fn put_manifest(
    dst: &StorageLocation,
    raw: &Bytes,
    fence: &WriteFence,
) -> Result<(), ReplicationError> {
    let path = format!("{}/{MANIFEST_FILE}", dst.url());
    if !fence
        .write(&path, dst.put_create(MANIFEST_FILE, raw.clone()))
        .await?
    {
        let existing = dst.get_opt(MANIFEST_FILE).await?.unwrap_or_default();
        if existing != *raw {
            return Err(ReplicationError::Conflict { path });
        }
    }
    Ok(())
}

/// Why a file the source's manifest lists is missing: the checkpoint was
/// deleted since its manifest was read (retention on the primary deletes
/// the manifest first, then the files) — then it is simply no longer a
/// checkpoint — or the source is corrupt.
/// `from` is where the file should be (the snapshot's directory `src`, or
/// the job's for a shared file).
async fn missing_source_file(
    src: &StorageLocation,
    from: &StorageLocation,
    file: &str,
) -> ReplicationError {
    match src.get_opt(MANIFEST_FILE).await {
        Ok(None) => ReplicationError::Incomplete(src.url().to_string()),
        Ok(Some(_)) => ReplicationError::SourceCorrupt {
            path: format!("{}/{file}", from.url()),
            reason: "listed in the manifest but missing".into(),
        },
        Err(e) => e.into(),
    }
}

fn check(data: &Bytes, size: u64, sha256: &str) -> Result<(), String> {
    if data.len() as u64 != size {
        return Err(format!("size {} but the manifest says {size}", data.len()));
    }
    let hash = sha256_hex(data);
    if hash != sha256 {
        return Err(format!("SHA-256 {hash} but the manifest says {sha256}"));
    }
    Ok(())
}

/// How old an unlisted shared file in a standby's store must be before a
/// reconciliation deletes it: far longer than any copy takes between its
/// files and its manifest.
pub const SHARED_GRACE: chrono::TimeDelta = chrono::TimeDelta::minutes(10);

/// Replicates one job: its spec, every complete savepoint and checkpoint
/// the target lacks (oldest first), and retention — target checkpoints
/// older than the source's oldest complete one are deleted, never the
/// newest complete one the target has. A checkpoint that cannot be copied
/// is reported in `skipped` and the others still go.
///
/// Every write into `target` goes through `fence` (see [`crate::fence`]):
/// the replicator passes the region's, an operator's one-off copy
/// [`WriteFence::unfenced`].
pub async fn replicate_job(
    source: &StorageLocation,
    target: &StorageLocation,
    job: &JobId,
    fence: &WriteFence,
) -> Result<JobCopy, ReplicationError> {
    let mut out = JobCopy {
        job: Some(*job),
        ..Default::default()
    };
    // What the target completed beyond the source's lineage goes first:
    // it would conflict with the source's snapshots of the same numbers.
    // A source whose lineage is older than the target's copies nothing.
    out.diverged = crate::diverge::archive_divergence(source, target, job, fence).await?;
    let spec_rel = format!("{}/spec.yaml", job_dir(job));
    if let Some(spec) = source.get_opt(&spec_rel).await?
        && target.get_opt(&spec_rel).await?.as_ref() != Some(&spec)
    {
        fence.write(&spec_rel, target.put(&spec_rel, spec)).await?;
        out.spec_copied = true;
    }
    // The job's lifecycle status too: a job cancelled or finished in the
    // primary must not be resumed by a promoted standby.
    let status_rel = format!("{}/status.json", job_dir(job));
    if let Some(status) = source.get_opt(&status_rel).await?
        && target.get_opt(&status_rel).await?.as_ref() != Some(&status)
    {
        fence
            .write(&status_rel, target.put(&status_rel, status))
            .await?;
    }
    let mut dirs: Vec<String> = Vec::new();
    for name in source.list_dirs(&savepoints_root(job)).await? {
        dirs.push(savepoint_dir(job, &name));
    }
    let ids = list_checkpoint_ids(source, job).await?;
    let mut complete_src = Vec::new();
    for id in &ids {
        dirs.push(checkpoint_dir(job, *id));
    }
    for dir in dirs {
        match replicate_checkpoint(source, target, &dir, fence).await {
            Ok(c) => {
                if dir.contains("/checkpoints/") {
                    complete_src.push(CheckpointId(c.checkpoint));
                }
                out.copied.push(c);
            }
            // Still being written (or abandoned): not a checkpoint yet.
            Err(ReplicationError::Incomplete(_)) => {}
            Err(e @ (ReplicationError::Storage(_) | ReplicationError::Fenced { .. })) => {
                return Err(e);
            }
            Err(e) => {
                tracing::warn!(job = %job, %dir, "not replicated: {e}");
                out.skipped.push((dir, e.to_string()));
            }
        }
    }
    let newest_dst = out.newest().map(|c| c.checkpoint);
    for id in list_checkpoint_ids(target, job).await? {
        if complete_src.iter().min().is_some_and(|o| id < *o) && Some(id.0) != newest_dst {
            let dir = checkpoint_dir(job, id);
            fence.write(&dir, target.delete_prefix(&dir)).await?;
            out.removed.push(id.0);
        } else {
            out.target_checkpoints.push(id.0);
        }
    }
    // Shared state files no checkpoint of the target lists any more. A
    // copy in flight (a synchronous one, or the next pass) writes its
    // files before its manifest: only files older than any such copy go.
    let cutoff = chrono::Utc::now() - SHARED_GRACE;
    let shared = ferry_core::manifest::shared_dir(job);
    match fence
        .write(
            &shared,
            ferry_core::manifest::collect_shared(target, job, Some(cutoff)),
        )
        .await
    {
        Ok(removed) => out.shared_removed = removed.len(),
        Err(e @ ReplicationError::Fenced { .. }) => return Err(e),
        // Kept for now (e.g. an unreadable manifest may list them).
        Err(e) => tracing::warn!(job = %job, "unlisted shared state files kept: {e}"),
    }
    Ok(out)
}

/// The replicator's pass for a job it reconciled with [`replicate_job`]
/// before, within the same fence term ([`WriteFence::term`]: no other
/// region can have written into the target since): copies the snapshot
/// directories `dirs` — the ones completed since, oldest first — and at
/// the same time deletes the target checkpoints of `held` (what the
/// target is known to hold) that the source no longer retains, never the
/// newest. No look at the target beyond the copies' own: over a WAN a
/// pass costs one copy's round trips, not a reconciliation's.
pub async fn replicate_new(
    source: &StorageLocation,
    target: &StorageLocation,
    job: &JobId,
    dirs: &[String],
    held: &std::collections::BTreeSet<u64>,
    fence: &WriteFence,
) -> Result<JobCopy, ReplicationError> {
    let mut out = JobCopy {
        job: Some(*job),
        ..Default::default()
    };
    let oldest = list_checkpoint_ids(source, job).await?.into_iter().min();
    let newest_held = held.last().copied();
    let expired: Vec<u64> = held
        .iter()
        .copied()
        .filter(|id| oldest.is_some_and(|o| *id < o.0) && Some(*id) != newest_held)
        .collect();
    let copies = async {
        let (mut copied, mut skipped) = (Vec::new(), Vec::new());
        for dir in dirs {
            match replicate_checkpoint(source, target, dir, fence).await {
                Ok(c) => copied.push(c),
                // Superseded: the source's retention removed it already.
                Err(ReplicationError::Incomplete(_)) => {}
                Err(e @ (ReplicationError::Storage(_) | ReplicationError::Fenced { .. })) => {
                    return Err(e);
                }
                Err(e) => {
                    tracing::warn!(job = %job, %dir, "not replicated: {e}");
                    skipped.push((dir.clone(), e.to_string()));
                }
            }
        }
        Ok((copied, skipped))
    };
    let deletes = async {
        let mut removed = Vec::new();
        for id in &expired {
            let dir = checkpoint_dir(job, CheckpointId(*id));
            fence.write(&dir, target.delete_prefix(&dir)).await?;
            removed.push(*id);
        }
        Ok::<_, ReplicationError>(removed)
    };
    let (copies, deletes) = tokio::join!(copies, deletes);
    let (copied, skipped) = copies?;
    out.removed = deletes?;
    out.target_checkpoints = held
        .iter()
        .copied()
        .chain(
            copied
                .iter()
                .filter(|c| c.dir.contains("/checkpoints/"))
                .map(|c| c.checkpoint),
        )
        .filter(|id| !out.removed.contains(id))
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    out.copied = copied;
    out.skipped = skipped;
    Ok(out)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use ferry_core::manifest::{
        MANIFEST_FORMAT, SnapshotKind, find_restorable, newest_complete, write_manifest,
    };
    use std::sync::Arc;

    /// A copy of a deposed primary that landed in the new primary's store
    /// anyway (held back on the network beyond the write fence) is never
    /// restored there: its region epoch is older than that of a checkpoint
    /// numbered below it.
    #[tokio::test]
    async fn a_late_copy_of_a_deposed_primary_is_never_restored() {
        let tmp = tempfile::tempdir().unwrap();
        let root = StorageLocation::open(&format!("file://{}", tmp.path().display())).unwrap();
        let job = JobId::new();
        for n in [1, 2] {
            lineage_checkpoint(&root, &job, n, &[("s", b"old")], 1, None).await;
        }
        // Promoted under region epoch 2 from checkpoint 1, numbered on
        // from 3; then the old primary's 4 arrives late.
        lineage_checkpoint(&root, &job, 3, &[("s", b"new")], 2, Some(1)).await;
        lineage_checkpoint(&root, &job, 4, &[("s", b"late")], 1, None).await;
        let choice = find_restorable(&root, &job).await.unwrap();
        let cp = choice.checkpoint.expect("a checkpoint");
        assert_eq!(cp.manifest.checkpoint_id, CheckpointId(3));
        // A hot standby judges by the manifests alone, the same way (and
        // an incomplete directory above it is no snapshot).
        root.child(&checkpoint_dir(&job, CheckpointId(5)))
            .put("window-0.state", Bytes::from_static(b"partial"))
            .await
            .unwrap();
        let (n, rel, m) = newest_complete(&root, &job).await.unwrap().unwrap();
        assert_eq!(
            (n, rel, m.checkpoint_id),
            (
                CheckpointId(3),
                checkpoint_dir(&job, CheckpointId(3)),
                CheckpointId(3)
            )
        );
        assert_eq!(choice.skipped.len(), 1, "{:?}", choice.skipped);
        assert_eq!(choice.skipped[0].0, CheckpointId(4));
        assert!(
            choice.skipped[0].1.contains("lost the primary role"),
            "{}",
            choice.skipped[0].1
        );
        assert_eq!(choice.damaged, 0, "not corrupt: skipped quietly");
        // Without the newer epoch's checkpoint, 4 is simply the newest.
        root.delete_prefix(&checkpoint_dir(&job, CheckpointId(3)))
            .await
            .unwrap();
        let choice = find_restorable(&root, &job).await.unwrap();
        assert_eq!(
            choice.checkpoint.unwrap().manifest.checkpoint_id,
            CheckpointId(4)
        );
        let newest = newest_complete(&root, &job).await.unwrap().unwrap();
        assert_eq!(newest.0, CheckpointId(4));
    }

    /// An operator's one-off copy (no fence).
    pub(crate) async fn copy(
        source: &StorageLocation,
        target: &StorageLocation,
        job: &JobId,
    ) -> Result<JobCopy, ReplicationError> {
        replicate_job(source, target, job, &crate::WriteFence::unfenced()).await
    }

    async fn checkpoint(root: &StorageLocation, job: &JobId, n: u64, files: &[(&str, &[u8])]) {
        lineage_checkpoint(root, job, n, files, 0, None).await
    }

    /// A checkpoint of region epoch `epoch` in a run restored from
    /// `restored_from`.
    pub(crate) async fn lineage_checkpoint(
        root: &StorageLocation,
        job: &JobId,
        n: u64,
        files: &[(&str, &[u8])],
        epoch: u64,
        restored_from: Option<u64>,
    ) {
        let dir = root.child(&checkpoint_dir(job, CheckpointId(n)));
        let mut entries = Vec::new();
        for (subtask, (name, data)) in files.iter().enumerate() {
            dir.put(name, Bytes::copy_from_slice(data)).await.unwrap();
            entries.push(FileEntry {
                path: name.to_string(),
                size: data.len() as u64,
                sha256: sha256_hex(data),
                operator: "window".into(),
                subtask: subtask as u32,
                shared: false,
                chain: 0,
            });
        }
        let m = Manifest {
            format: MANIFEST_FORMAT,
            job_id: *job,
            job_name: "t".into(),
            checkpoint_id: CheckpointId(n),
            kind: SnapshotKind::Checkpoint,
            created_at: chrono::Utc::now(),
            jm_epoch: ferry_core::JmEpoch(1),
            region_epoch: ferry_core::RegionEpoch(epoch),
            parallelism: 1,
            watermark: n as i64 * 1000,
            records_in: n * 10,
            records_out: n,
            finished: false,
            duration_ms: 1,
            files: entries,
            source_offsets: Default::default(),
            sink_transactions: Vec::new(),
            restored_from,
        };
        write_manifest(&dir, &m).await.unwrap();
    }

    /// An incremental checkpoint `n`: a chain per (shared) file content in
    /// the job's `shared/` folder, listed in order, plus an own file.
    async fn chain_checkpoint(root: &StorageLocation, job: &JobId, n: u64, chain: &[&[u8]]) {
        let dir = root.child(&checkpoint_dir(job, CheckpointId(n)));
        let job_dir = root.child(&job_dir(job));
        let mut files = Vec::new();
        for (pos, data) in chain.iter().enumerate() {
            let sha256 = sha256_hex(data);
            let path = ferry_core::manifest::shared_file("window", 0, &sha256);
            job_dir
                .put(&path, Bytes::copy_from_slice(data))
                .await
                .unwrap();
            files.push(FileEntry {
                path,
                size: data.len() as u64,
                sha256,
                operator: "window".into(),
                subtask: 0,
                shared: true,
                chain: pos as u32,
            });
        }
        let own = format!("source of {n}").into_bytes();
        dir.put("source-0.state", Bytes::from(own.clone()))
            .await
            .unwrap();
        files.push(FileEntry {
            path: "source-0.state".into(),
            size: own.len() as u64,
            sha256: sha256_hex(&own),
            operator: "source".into(),
            subtask: 0,
            shared: false,
            chain: 0,
        });
        let mut m = Manifest {
            format: MANIFEST_FORMAT,
            job_id: *job,
            job_name: "t".into(),
            checkpoint_id: CheckpointId(n),
            kind: SnapshotKind::Checkpoint,
            created_at: chrono::Utc::now(),
            jm_epoch: ferry_core::JmEpoch(1),
            region_epoch: ferry_core::RegionEpoch(0),
            parallelism: 1,
            watermark: n as i64,
            records_in: n,
            records_out: n,
            finished: false,
            duration_ms: 1,
            files,
            source_offsets: Default::default(),
            sink_transactions: Vec::new(),
            restored_from: None,
        };
        m.format = m.needed_format();
        write_manifest(&dir, &m).await.unwrap();
    }

    /// Only the shared files a standby lacks cross: a delta per checkpoint
    /// after the first; the copy restores with its whole chain; files no
    /// checkpoint lists any more are removed from the standby once old.
    #[tokio::test]
    async fn only_new_shared_files_are_copied_and_unlisted_ones_are_collected() {
        let (_tmp, a, b) = stores();
        let job = JobId::new();
        let full = vec![7u8; 50_000];
        chain_checkpoint(&a, &job, 1, &[&full]).await;
        let first = copy(&a, &b, &job).await.unwrap();
        let c1 = first.newest().unwrap();
        assert_eq!((c1.files_copied, c1.bytes_copied), (2, 50_000 + 11));

        chain_checkpoint(&a, &job, 2, &[&full, b"delta two"]).await;
        let second = copy(&a, &b, &job).await.unwrap();
        let c2 = second.newest().unwrap();
        assert_eq!(c2.checkpoint, 2);
        // The delta and checkpoint 2's own file; the full snapshot stays.
        assert_eq!(c2.files_copied, 2, "{second:?}");
        assert_eq!(c2.files_present, 1);
        assert_eq!(c2.bytes_copied, 9 + 11);
        let restored = find_restorable(&b, &job).await.unwrap();
        let cp = restored.checkpoint.expect("the standby restores the chain");
        assert_eq!(cp.manifest.checkpoint_id, CheckpointId(2));
        let chains = cp.manifest.chains("window");
        let chain: Vec<&[u8]> = chains[&0].iter().map(|f| &cp.files[&f.path][..]).collect();
        assert_eq!(chain, vec![&full[..], &b"delta two"[..]]);

        // Checkpoint 3 starts a new chain and 1 and 2 are retained no
        // more: once the source drops them, the old chain's files go from
        // the standby too — but only when older than the cutoff.
        chain_checkpoint(&a, &job, 3, &[b"new full"]).await;
        copy(&a, &b, &job).await.unwrap();
        for n in [1, 2] {
            a.delete_prefix(&checkpoint_dir(&job, CheckpointId(n)))
                .await
                .unwrap();
            b.delete_prefix(&checkpoint_dir(&job, CheckpointId(n)))
                .await
                .unwrap();
        }
        let kept =
            ferry_core::manifest::collect_shared(&b, &job, Some(chrono::Utc::now() - SHARED_GRACE))
                .await
                .unwrap();
        assert!(kept.is_empty(), "written just now: kept ({kept:?})");
        let removed = ferry_core::manifest::collect_shared(
            &b,
            &job,
            Some(chrono::Utc::now() + chrono::TimeDelta::seconds(1)),
        )
        .await
        .unwrap();
        assert_eq!(
            removed.len(),
            2,
            "the old full snapshot and delta: {removed:?}"
        );
        let left = b
            .list_files(&ferry_core::manifest::shared_dir(&job))
            .await
            .unwrap();
        assert_eq!(left.len(), 1, "{left:?}");
        assert!(
            find_restorable(&b, &job)
                .await
                .unwrap()
                .checkpoint
                .is_some()
        );
    }

    fn stores() -> (tempfile::TempDir, StorageLocation, StorageLocation) {
        let tmp = tempfile::tempdir().unwrap();
        let a = StorageLocation::open(&format!("file://{}/a", tmp.path().display())).unwrap();
        let b = StorageLocation::open(&format!("file://{}/b", tmp.path().display())).unwrap();
        (tmp, a, b)
    }

    #[tokio::test]
    async fn a_file_gone_with_its_manifest_is_a_deleted_checkpoint_not_a_corrupt_one() {
        let (_tmp, src, _) = stores();
        let job = JobId::new();
        checkpoint(&src, &job, 4, &[("window-0.state", b"state")]).await;
        let dir = src.child(&checkpoint_dir(&job, CheckpointId(4)));
        // Retention halfway through: the state file is gone, the manifest
        // still there — corrupt as far as anyone can tell.
        dir.delete("window-0.state").await.unwrap();
        let e = missing_source_file(&dir, &dir, "window-0.state").await;
        assert!(matches!(e, ReplicationError::SourceCorrupt { .. }), "{e}");
        // Retention done (manifest first, then files): what a replicator
        // that read the manifest before finds is a deleted checkpoint.
        dir.delete(MANIFEST_FILE).await.unwrap();
        let e = missing_source_file(&dir, &dir, "window-0.state").await;
        assert!(matches!(e, ReplicationError::Incomplete(_)), "{e}");
    }

    #[tokio::test]
    async fn a_job_replicates_and_restores_from_the_copy() {
        let (_tmp, src, dst) = stores();
        let job = JobId::default();
        src.put(
            &format!("jobs/{job}/spec.yaml"),
            Bytes::from_static(b"spec"),
        )
        .await
        .unwrap();
        checkpoint(&src, &job, 1, &[("window-0.state", b"one")]).await;
        checkpoint(&src, &job, 2, &[("window-0.state", b"two!")]).await;
        // An in-progress checkpoint (no manifest) is not copied.
        src.child(&checkpoint_dir(&job, CheckpointId(3)))
            .put("window-0.state", Bytes::from_static(b"partial"))
            .await
            .unwrap();
        let r = copy(&src, &dst, &job).await.unwrap();
        assert!(r.spec_copied);
        assert_eq!(r.copied.len(), 2);
        assert_eq!(r.newest().unwrap().checkpoint, 2);
        assert_eq!(r.newest().unwrap().records_in, 20);
        assert!(r.skipped.is_empty());
        let restored = find_restorable(&dst, &job).await.unwrap();
        let cp = restored.checkpoint.expect("the copy restores");
        assert_eq!(cp.manifest.checkpoint_id, CheckpointId(2));
        assert_eq!(&cp.files["window-0.state"][..], b"two!");
        assert!(
            dst.list_files(&checkpoint_dir(&job, CheckpointId(3)))
                .await
                .unwrap()
                .is_empty()
        );
        // A second pass copies nothing.
        let again = copy(&src, &dst, &job).await.unwrap();
        assert!(!again.spec_copied);
        assert!(again.copied.iter().all(|c| c.already_complete));
        assert_eq!(
            again.copied.iter().map(|c| c.files_copied).sum::<usize>(),
            0
        );
    }

    #[tokio::test]
    async fn only_missing_files_are_copied_and_the_manifest_goes_last() {
        let (_tmp, src, dst) = stores();
        let job = JobId::default();
        checkpoint(&src, &job, 5, &[("a.state", b"aaaa"), ("b.state", b"bb")]).await;
        // A previous pass died after copying one file.
        let rel = checkpoint_dir(&job, CheckpointId(5));
        dst.child(&rel)
            .put("a.state", Bytes::from_static(b"aaaa"))
            .await
            .unwrap();
        assert!(
            find_restorable(&dst, &job)
                .await
                .unwrap()
                .checkpoint
                .is_none()
        );
        let c = replicate_checkpoint(&src, &dst, &rel, &crate::WriteFence::unfenced())
            .await
            .unwrap();
        assert_eq!((c.files_present, c.files_copied, c.bytes_copied), (1, 1, 2));
        assert!(
            find_restorable(&dst, &job)
                .await
                .unwrap()
                .checkpoint
                .is_some()
        );
    }

    #[tokio::test]
    async fn a_corrupt_source_is_never_replicated() {
        let (_tmp, src, dst) = stores();
        let job = JobId::default();
        checkpoint(&src, &job, 1, &[("w.state", b"good")]).await;
        checkpoint(&src, &job, 2, &[("w.state", b"good")]).await;
        let rel = checkpoint_dir(&job, CheckpointId(2));
        src.child(&rel)
            .put("w.state", Bytes::from_static(b"bad!"))
            .await
            .unwrap();
        let r = copy(&src, &dst, &job).await.unwrap();
        assert_eq!(r.skipped.len(), 1, "{r:?}");
        assert!(r.skipped[0].1.contains("SHA-256"), "{r:?}");
        assert_eq!(r.newest().unwrap().checkpoint, 1);
        assert!(
            dst.child(&rel)
                .get_opt(MANIFEST_FILE)
                .await
                .unwrap()
                .is_none()
        );
    }

    #[tokio::test]
    async fn retention_follows_the_source_but_keeps_the_newest_copy() {
        let (_tmp, src, dst) = stores();
        let job = JobId::default();
        for n in 1..=3 {
            checkpoint(&src, &job, n, &[("w.state", b"x")]).await;
        }
        copy(&src, &dst, &job).await.unwrap();
        // The source retained only 3 and 4 meanwhile.
        for n in 1..=2 {
            src.delete_prefix(&checkpoint_dir(&job, CheckpointId(n)))
                .await
                .unwrap();
        }
        checkpoint(&src, &job, 4, &[("w.state", b"y")]).await;
        let r = copy(&src, &dst, &job).await.unwrap();
        assert_eq!(r.removed, vec![1, 2]);
        let left = list_checkpoint_ids(&dst, &job).await.unwrap();
        assert_eq!(left, vec![CheckpointId(3), CheckpointId(4)]);
    }

    /// The old primary (epoch 1) completed 4 and 5 after replicating 3; the
    /// new primary (epoch 2) restored from 3 and completed 4 and 6. Reverse
    /// replication archives the old 4 and 5, then copies the new ones.
    #[tokio::test]
    async fn snapshots_beyond_the_restored_lineage_are_archived_as_divergence() {
        let (_tmp, new_primary, old_primary) = stores();
        let job = JobId::default();
        // 1-3 were the old primary's and replicated (identical copies).
        for n in 1..=3 {
            lineage_checkpoint(&new_primary, &job, n, &[("w.state", b"old")], 1, None).await;
        }
        copy(&new_primary, &old_primary, &job).await.unwrap();
        for n in [4, 5] {
            lineage_checkpoint(&old_primary, &job, n, &[("w.state", b"old")], 1, None).await;
        }
        for n in [4, 6] {
            lineage_checkpoint(&new_primary, &job, n, &[("w.state", b"new")], 2, Some(3)).await;
        }
        let r = copy(&new_primary, &old_primary, &job).await.unwrap();
        let diverged: Vec<u64> = r.diverged.iter().map(|d| d.checkpoint).collect();
        assert_eq!(diverged, vec![4, 5]);
        assert!(r.skipped.is_empty(), "no conflict is left: {:?}", r.skipped);
        // The old primary now holds exactly the new lineage.
        let left = list_checkpoint_ids(&old_primary, &job).await.unwrap();
        assert_eq!(
            left.iter().map(|c| c.0).collect::<Vec<_>>(),
            vec![1, 2, 3, 4, 6]
        );
        let m4 = ferry_core::manifest::read_manifest(
            &old_primary.child(&checkpoint_dir(&job, CheckpointId(4))),
        )
        .await
        .unwrap()
        .unwrap();
        assert_eq!(m4.region_epoch, ferry_core::RegionEpoch(2));
        // The archive is the report: 5 committed 5 records (helper: n),
        // the base 3 had 3 → 2 records and 2 s of event time diverged.
        let archived = crate::diverge::archived(&old_primary, &job).await.unwrap();
        let s = crate::diverge::summarise(job, archived);
        assert_eq!(s.checkpoints, vec![4, 5]);
        assert_eq!(s.records_out, 2);
        assert_eq!(s.records_in, 20);
        assert_eq!(s.event_time_ms, 2000);
        assert_eq!(s.base.as_ref().map(|b| b.checkpoint), Some(3));
        // A second pass finds nothing new.
        let again = copy(&new_primary, &old_primary, &job).await.unwrap();
        assert!(again.diverged.is_empty());
        // A standby that only ever received copies has no divergence.
        let (_tmp2, a, b) = stores();
        for n in 1..=3 {
            lineage_checkpoint(&a, &job, n, &[("w.state", b"x")], 1, None).await;
        }
        copy(&a, &b, &job).await.unwrap();
        lineage_checkpoint(&a, &job, 4, &[("w.state", b"y")], 1, None).await;
        assert!(copy(&a, &b, &job).await.unwrap().diverged.is_empty());
    }

    #[tokio::test]
    async fn a_different_manifest_for_the_same_number_is_a_conflict() {
        let (_tmp, src, dst) = stores();
        let job = JobId::default();
        checkpoint(&src, &job, 7, &[("w.state", b"source")]).await;
        checkpoint(&dst, &job, 7, &[("w.state", b"target")]).await;
        let e = replicate_checkpoint(
            &src,
            &dst,
            &checkpoint_dir(&job, CheckpointId(7)),
            &crate::WriteFence::unfenced(),
        )
        .await
        .unwrap_err();
        assert!(matches!(e, ReplicationError::Conflict { .. }), "{e}");
    }

    /// Latency of a distant store, one round trip per request (virtual
    /// time: the tests run with tokio's clock paused, so a copy's time is
    /// exactly its round trips).
    fn distant(store: Arc<dyn object_store::ObjectStore>, url: &str) -> StorageLocation {
        let rtt = std::time::Duration::from_millis(100);
        let throttled = object_store::throttle::ThrottledStore::new(
            store,
            object_store::throttle::ThrottleConfig {
                wait_put_per_call: rtt,
                wait_get_per_call: rtt,
                wait_list_per_call: rtt,
                wait_delete_per_call: rtt,
                ..Default::default()
            },
        );
        StorageLocation::with_store(url, Arc::new(throttled)).unwrap()
    }

    fn memory(url: &str) -> StorageLocation {
        StorageLocation::with_store(url, Arc::new(object_store::memory::InMemory::new())).unwrap()
    }

    async fn five_file_checkpoint(src: &StorageLocation, job: &JobId) -> (String, Bytes) {
        let files: Vec<(String, Vec<u8>)> = (0..5)
            .map(|i| (format!("window-{i}.state"), vec![i as u8; 1000 + i]))
            .collect();
        let refs: Vec<(&str, &[u8])> = files
            .iter()
            .map(|(n, d)| (n.as_str(), d.as_slice()))
            .collect();
        checkpoint(src, job, 7, &refs).await;
        let dir = checkpoint_dir(job, CheckpointId(7));
        let raw = src.child(&dir).get(MANIFEST_FILE).await.unwrap();
        (dir, raw)
    }

    /// Synchronous replication waits for its copy on every checkpoint: two
    /// round trips (all files; then the read-back beside the manifest),
    /// however many files. The resuming copy looks first and verifies
    /// before the manifest: four.
    #[tokio::test(start_paused = true)]
    async fn a_fresh_copy_costs_two_round_trips_and_a_resuming_one_four() {
        let src = memory("memory:///src");
        let job = JobId::new();
        let (dir, raw) = five_file_checkpoint(&src, &job).await;
        let fence = crate::WriteFence::unfenced();
        for (mode, trips) in [(CopyMode::Fresh, 2), (CopyMode::Resume, 4)] {
            let inner: Arc<dyn object_store::ObjectStore> =
                Arc::new(object_store::memory::InMemory::new());
            let dst = distant(inner.clone(), "memory:///dst");
            let t0 = tokio::time::Instant::now();
            let copy = copy_snapshot_with(&src, &dst, &dir, raw.clone(), &fence, mode)
                .await
                .unwrap();
            let took = t0.elapsed();
            assert_eq!(copy.files_copied, 5, "{mode:?}");
            assert_eq!(
                took,
                std::time::Duration::from_millis(100 * trips),
                "{mode:?}: {took:?}"
            );
            // What arrived restores: every file matches the manifest.
            let plain = StorageLocation::with_store("memory:///dst", inner).unwrap();
            let m: Manifest =
                serde_json::from_slice(&plain.child(&dir).get(MANIFEST_FILE).await.unwrap())
                    .unwrap();
            for f in &m.files {
                let data = plain.child(&dir).get(&f.path).await.unwrap();
                check(&data, f.size, &f.sha256).unwrap();
            }
        }
    }

    /// A store that damages the first `n` writes of objects whose path ends
    /// in `name` (bytes damaged on the way, stored as they arrived).
    #[derive(Debug)]
    struct Damaging {
        inner: object_store::memory::InMemory,
        name: String,
        left: std::sync::Mutex<u32>,
    }

    impl std::fmt::Display for Damaging {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "Damaging")
        }
    }

    #[async_trait::async_trait]
    impl object_store::ObjectStore for Damaging {
        async fn put_opts(
            &self,
            location: &object_store::path::Path,
            payload: object_store::PutPayload,
            opts: object_store::PutOptions,
        ) -> object_store::Result<object_store::PutResult> {
            let damage = {
                let mut left = self.left.lock().unwrap();
                let damage = location.as_ref().ends_with(&self.name) && *left > 0;
                if damage {
                    *left -= 1;
                }
                damage
            };
            let payload = if damage {
                let mut bytes: Vec<u8> = Bytes::from(payload).to_vec();
                bytes[0] ^= 0xFF;
                object_store::PutPayload::from(bytes)
            } else {
                payload
            };
            self.inner.put_opts(location, payload, opts).await
        }
        async fn put_multipart_opts(
            &self,
            location: &object_store::path::Path,
            opts: object_store::PutMultipartOptions,
        ) -> object_store::Result<Box<dyn object_store::MultipartUpload>> {
            self.inner.put_multipart_opts(location, opts).await
        }
        async fn get_opts(
            &self,
            location: &object_store::path::Path,
            options: object_store::GetOptions,
        ) -> object_store::Result<object_store::GetResult> {
            self.inner.get_opts(location, options).await
        }
        fn delete_stream(
            &self,
            locations: futures::stream::BoxStream<
                'static,
                object_store::Result<object_store::path::Path>,
            >,
        ) -> futures::stream::BoxStream<'static, object_store::Result<object_store::path::Path>>
        {
            self.inner.delete_stream(locations)
        }
        fn list(
            &self,
            prefix: Option<&object_store::path::Path>,
        ) -> futures::stream::BoxStream<'static, object_store::Result<object_store::ObjectMeta>>
        {
            self.inner.list(prefix)
        }
        async fn list_with_delimiter(
            &self,
            prefix: Option<&object_store::path::Path>,
        ) -> object_store::Result<object_store::ListResult> {
            self.inner.list_with_delimiter(prefix).await
        }
        async fn copy_opts(
            &self,
            from: &object_store::path::Path,
            to: &object_store::path::Path,
            options: object_store::CopyOptions,
        ) -> object_store::Result<()> {
            self.inner.copy_opts(from, to, options).await
        }
    }

    /// A fresh copy writes the manifest while it reads the files back; a
    /// file that arrived damaged takes the manifest out again, is written
    /// again, and the copy succeeds only with every file right. Damaged
    /// on every attempt, the copy fails and leaves no manifest behind.
    #[tokio::test]
    async fn a_fresh_copy_that_reads_back_wrong_never_leaves_its_manifest() {
        let src = memory("memory:///src");
        let job = JobId::new();
        let (dir, raw) = five_file_checkpoint(&src, &job).await;
        let fence = crate::WriteFence::unfenced();
        for (damaged, ok) in [(1, true), (MAX_ATTEMPTS, false)] {
            let store = Arc::new(Damaging {
                inner: object_store::memory::InMemory::new(),
                name: "window-3.state".into(),
                left: std::sync::Mutex::new(damaged),
            });
            let dst = StorageLocation::with_store("memory:///dst", store.clone()).unwrap();
            let copy =
                copy_snapshot_with(&src, &dst, &dir, raw.clone(), &fence, CopyMode::Fresh).await;
            assert_eq!(*store.left.lock().unwrap(), 0, "every damage happened");
            let manifest = dst.child(&dir).get_opt(MANIFEST_FILE).await.unwrap();
            if ok {
                let copy = copy.unwrap();
                assert_eq!(copy.retries, 1);
                assert_eq!(manifest.as_ref(), Some(&raw));
                let m: Manifest = serde_json::from_slice(&raw).unwrap();
                for f in &m.files {
                    let data = dst.child(&dir).get(&f.path).await.unwrap();
                    check(&data, f.size, &f.sha256).unwrap();
                }
            } else {
                let e = copy.unwrap_err();
                assert!(
                    matches!(&e, ReplicationError::Transfer { attempts, path, .. }
                        if *attempts == MAX_ATTEMPTS && path.ends_with("window-3.state")),
                    "{e}"
                );
                assert_eq!(manifest, None, "a failed copy leaves no manifest");
            }
        }
    }
}
