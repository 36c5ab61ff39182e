//! Divergence: what a region committed that the primary's lineage does not
//! contain. After an unplanned failover the new primary restores from the
//! newest checkpoint the old one had replicated; whatever the old primary
//! completed after that (its sinks committed it) is no longer part of the
//! job's history. When the old primary comes back as a standby, the
//! replication into its store finds those snapshots, archives their
//! manifests under `jobs/<id>/diverged/` — the evidence for the fail-back's
//! divergence report — and removes them, so that neither a conflict nor a
//! later restore can pick them up.
//!
//! A target snapshot diverges when it is newer than the point the source's
//! current run restored from (`Manifest::restored_from`), carries an older
//! region epoch than the source's newest snapshot, and is not the same
//! snapshot in the source.

use bytes::Bytes;
use chrono::Utc;
use ferry_core::JobId;
use ferry_core::RegionEpoch;
use ferry_core::api::{Diverged, DivergenceBase as Base, JobDivergence};
use ferry_core::manifest::{
    MANIFEST_FILE, Manifest, checkpoint_dir, job_dir, list_checkpoint_ids, read_manifest,
    savepoint_dir, savepoint_number, savepoints_root,
};
use ferry_core::storage::StorageLocation;

use crate::ReplicationError;

/// Where archived manifests of diverged snapshots live, per job.
pub fn diverged_dir(job: &JobId) -> String {
    format!("{}/diverged", job_dir(job))
}

/// Summarises the archived snapshots of one job: what the diverged region
/// committed beyond the point the surviving lineage restored from.
pub fn summarise(job: JobId, mut snapshots: Vec<Diverged>) -> JobDivergence {
    snapshots.sort_by_key(|d| d.checkpoint);
    let base = snapshots.iter().find_map(|d| d.base.clone());
    let (b_in, b_out, b_wm) = base
        .as_ref()
        .map(|b| (b.records_in, b.records_out, Some(b.watermark)))
        .unwrap_or((0, 0, None));
    let max_out = snapshots.iter().map(|d| d.records_out).max().unwrap_or(0);
    let max_in = snapshots.iter().map(|d| d.records_in).max().unwrap_or(0);
    let max_wm = snapshots.iter().map(|d| d.watermark).max();
    let event_time_ms = match (max_wm, b_wm) {
        (Some(m), Some(b)) if m > b && b > i64::MIN => m - b,
        _ => 0,
    };
    JobDivergence {
        job: Some(job),
        checkpoints: snapshots.iter().map(|d| d.checkpoint).collect(),
        records_out: max_out.saturating_sub(b_out),
        records_in: max_in.saturating_sub(b_in),
        event_time_ms,
        base,
        snapshots,
    }
}

/// Every snapshot directory of `job` in `store` with its number:
/// checkpoints and `savepoint-<n>` savepoints.
async fn snapshot_dirs(
    store: &StorageLocation,
    job: &JobId,
) -> Result<Vec<(u64, String)>, ReplicationError> {
    let mut out: Vec<(u64, String)> = list_checkpoint_ids(store, job)
        .await?
        .into_iter()
        .map(|id| (id.0, checkpoint_dir(job, id)))
        .collect();
    for name in store.list_dirs(&savepoints_root(job)).await? {
        if let Some(n) = savepoint_number(&name) {
            out.push((n.0, savepoint_dir(job, &name)));
        }
    }
    out.sort();
    Ok(out)
}

/// The newest complete snapshot of `job` in `store`.
async fn newest_manifest(
    store: &StorageLocation,
    job: &JobId,
) -> Result<Option<Manifest>, ReplicationError> {
    for (_, dir) in snapshot_dirs(store, job).await?.iter().rev() {
        match read_manifest(&store.child(dir)).await {
            Ok(Some(m)) => return Ok(Some(m)),
            Ok(None) | Err(ferry_core::CoreError::Corrupt { .. }) => continue,
            Err(e) => return Err(e.into()),
        }
    }
    Ok(None)
}

/// The region epoch of the lineage `store` holds for `job`: that of its
/// newest complete snapshot.
pub async fn lineage_epoch(
    store: &StorageLocation,
    job: &JobId,
) -> Result<Option<RegionEpoch>, ReplicationError> {
    Ok(newest_manifest(store, job).await?.map(|m| m.region_epoch))
}

/// Archives and removes the snapshots of `job` in `target` that diverge
/// from `source`'s lineage (see the module docs). Returns what it archived
/// in this call.
pub async fn archive_divergence(
    source: &StorageLocation,
    target: &StorageLocation,
    job: &JobId,
    fence: &crate::fence::WriteFence,
) -> Result<Vec<Diverged>, ReplicationError> {
    let Some(newest) = newest_manifest(source, job).await? else {
        return Ok(Vec::new());
    };
    let lineage_epoch = newest.region_epoch;
    let start = newest.restored_from.unwrap_or(0);
    let mut theirs_all = Vec::new();
    for (n, dir) in snapshot_dirs(target, job).await? {
        if let Ok(Some(m)) = read_manifest(&target.child(&dir)).await {
            // The newer region epoch always wins: a source whose lineage
            // is older than what the target holds must not replace it.
            if m.region_epoch > lineage_epoch {
                return Err(ReplicationError::StaleSource {
                    job: *job,
                    source_epoch: lineage_epoch,
                    target_epoch: m.region_epoch,
                    checkpoint: n,
                });
            }
            theirs_all.push((n, dir, m));
        }
    }
    let mut base: Option<Option<Base>> = None;
    let mut out = Vec::new();
    for (n, dir, m) in theirs_all {
        if n <= start || m.region_epoch >= lineage_epoch {
            continue;
        }
        let theirs = target.child(&dir).get_opt(MANIFEST_FILE).await?;
        let ours = source.child(&dir).get_opt(MANIFEST_FILE).await?;
        if ours.is_some() && ours == theirs {
            continue;
        }
        if base.is_none() {
            base = Some(find_base(source, target, job, newest.restored_from).await?);
        }
        let d = Diverged {
            job: *job,
            dir: dir
                .strip_prefix(&format!("{}/", job_dir(job)))
                .unwrap_or(&dir)
                .to_string(),
            checkpoint: n,
            region_epoch: m.region_epoch,
            created_at: m.created_at,
            records_in: m.records_in,
            records_out: m.records_out,
            watermark: m.watermark,
            sink_transactions: m.sink_transactions.len(),
            replaced_by_epoch: lineage_epoch,
            base: base.clone().flatten(),
            archived_at: Utc::now(),
        };
        let kind = if dir.contains("/savepoints/") {
            "savepoint"
        } else {
            "checkpoint"
        };
        let name = format!(
            "{}/{kind}-{n}-epoch-{}.json",
            diverged_dir(job),
            m.region_epoch
        );
        let body = serde_json::json!({ "diverged": d, "manifest": m });
        let body = Bytes::from(serde_json::to_vec_pretty(&body).unwrap_or_default());
        fence.write(&name, target.put(&name, body)).await?;
        fence.write(&dir, target.delete_prefix(&dir)).await?;
        tracing::warn!(
            job = %job,
            target = %target.url(),
            checkpoint = n,
            region_epoch = %m.region_epoch,
            lineage_epoch = lineage_epoch.0,
            "snapshot diverged from the primary's lineage (completed after the checkpoint the failover restored from): archived in {name} and removed"
        );
        out.push(d);
    }
    Ok(out)
}

async fn find_base(
    source: &StorageLocation,
    target: &StorageLocation,
    job: &JobId,
    restored_from: Option<u64>,
) -> Result<Option<Base>, ReplicationError> {
    let Some(n) = restored_from else {
        return Ok(None);
    };
    for store in [source, target] {
        for (id, dir) in snapshot_dirs(store, job).await? {
            if id != n {
                continue;
            }
            if let Ok(Some(m)) = read_manifest(&store.child(&dir)).await {
                return Ok(Some(Base {
                    checkpoint: n,
                    records_in: m.records_in,
                    records_out: m.records_out,
                    watermark: m.watermark,
                }));
            }
        }
    }
    Ok(Some(Base {
        checkpoint: n,
        ..Default::default()
    }))
}

/// Every diverged snapshot archived for `job` in `store`, oldest first.
pub async fn archived(
    store: &StorageLocation,
    job: &JobId,
) -> Result<Vec<Diverged>, ReplicationError> {
    let root = diverged_dir(job);
    let mut out = Vec::new();
    for (name, _) in store.list_files(&root).await? {
        if !name.ends_with(".json") {
            continue;
        }
        let Some(raw) = store.get_opt(&format!("{root}/{name}")).await? else {
            continue;
        };
        match serde_json::from_slice::<serde_json::Value>(&raw)
            .ok()
            .and_then(|v| serde_json::from_value::<Diverged>(v["diverged"].clone()).ok())
        {
            Some(d) => out.push(d),
            None => {
                tracing::warn!(file = %format!("{}/{root}/{name}", store.url()), "unreadable divergence record skipped")
            }
        }
    }
    out.sort_by_key(|d| d.checkpoint);
    Ok(out)
}
