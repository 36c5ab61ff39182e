//! The job store: `jobs/<id>/spec.yaml` and `jobs/<id>/status.json` below
//! the JobManager's data root. Writes a job's spec when it is submitted,
//! keeps its status current while this instance drives it, and reads every
//! job back (a new leader adopts them, a standby mirrors them).
//!
//! Invariant: a status is written only while this instance may write
//! ([`Leadership::fence`](crate::leadership::Leadership::fence) gives an
//! epoch), and it records that epoch.

use std::sync::Arc;

use chrono::{DateTime, Utc};
use ferry_core::JobId;
use ferry_core::manifest::{find_restorable_checked, job_dir};
use ferry_core::spec::JobSpec;
use ferry_core::storage::StorageLocation;

use crate::error::JmError;
use crate::job::JobEntry;
use crate::model::JobInfo;
use crate::state::JobState;

/// Name of the spec file in a job's directory.
pub const SPEC_FILE: &str = "spec.yaml";

/// Name of the job-store status file in a job's directory.
pub const STATUS_FILE: &str = "status.json";

/// How often a running job's status is refreshed in the job store (besides
/// every state change and checkpoint), for standbys' reads.
const STATUS_REFRESH: std::time::Duration = std::time::Duration::from_secs(2);

/// What the job store keeps per job in `jobs/<id>/status.json`: the job as
/// the API shows it, and who wrote it under which epoch.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct StoredStatus {
    pub job: JobInfo,
    /// Fencing epoch of the leader that wrote this (0 in embedded mode).
    pub jm_epoch: ferry_core::JmEpoch,
    /// Instance that wrote it.
    pub instance: String,
    pub updated_at: DateTime<Utc>,
}

/// Relative path of a job's spec below a storage root.
fn spec_file(id: &JobId) -> String {
    format!("{}/{SPEC_FILE}", job_dir(id))
}

/// Relative path of a job's status below the job store.
fn status_file(id: &JobId) -> String {
    format!("{}/{STATUS_FILE}", job_dir(id))
}

/// Ids of the jobs under `root`'s `jobs/`, oldest first.
pub async fn job_ids(root: &StorageLocation) -> Result<Vec<JobId>, JmError> {
    let mut ids: Vec<JobId> = root
        .list_dirs("jobs")
        .await?
        .iter()
        .filter_map(|d| d.parse().ok())
        .collect();
    ids.sort();
    Ok(ids)
}

/// Writes a submitted job's spec below `root` (its storage root, and the
/// job store when that is elsewhere).
pub(crate) async fn write_spec(
    root: &StorageLocation,
    id: &JobId,
    spec: &JobSpec,
) -> Result<(), JmError> {
    root.put(&spec_file(id), bytes::Bytes::from(spec.to_yaml()))
        .await?;
    Ok(())
}

/// Every job of the job store with its last recorded status, oldest
/// first. Unreadable entries are skipped with a warning. `known` gives the
/// entry this JobManager holds for an id, if any (a standby refreshes
/// often): jobs it knows to have ended are left out and the specs of
/// known jobs are not read again. Without it (`|_| None`) every job is
/// read in full.
pub(crate) async fn read_store(
    store: &StorageLocation,
    known: impl Fn(&JobId) -> Option<Arc<JobEntry>>,
) -> Result<Vec<(JobSpec, StoredStatus)>, JmError> {
    let ids = job_ids(store).await?;
    let mut out = Vec::new();
    for id in ids {
        let spec = match known(&id) {
            Some(j) if j.state().is_terminal() && !j.driven() => continue,
            Some(j) => j.spec.clone(),
            None => {
                let Some(raw_spec) = store.get_opt(&spec_file(&id)).await? else {
                    continue;
                };
                match ferry_core::spec::parse_spec(&String::from_utf8_lossy(&raw_spec)) {
                    Ok(s) => s,
                    Err(e) => {
                        tracing::warn!(job = %id, "skipping a job store entry whose spec does not parse: {e}");
                        continue;
                    }
                }
            }
        };
        let status = match store.get_opt(&status_file(&id)).await? {
            Some(raw) => match serde_json::from_slice::<StoredStatus>(&raw) {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(job = %id, "job store status unreadable ({e}); treating the job as not ended");
                    created_status(id, &spec)
                }
            },
            // The spec was written but not the status: the submission
            // was cut short. Treat the job as submitted.
            None => created_status(id, &spec),
        };
        out.push((spec, status));
    }
    Ok(out)
}

/// What became of the newest earlier run of a job of the same name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PreviousRun {
    /// It stopped before the end: resume it from this checkpoint.
    Resumable { id: JobId, checkpoint: u64 },
    /// Its newest checkpoint is its final one: its output is complete.
    Finished { id: JobId, checkpoint: u64 },
    /// It completed checkpoints, but none can be restored.
    Damaged { id: JobId, reasons: String },
}

/// The newest earlier run of a job named `name` under `root` that left
/// checkpoints, and what can be done with it.
pub(crate) async fn previous_run(
    root: &StorageLocation,
    name: &str,
) -> Result<Option<PreviousRun>, JmError> {
    let ids = job_ids(root).await?;
    for id in ids.into_iter().rev() {
        let Some(raw) = root.get_opt(&spec_file(&id)).await? else {
            continue;
        };
        let Ok(old) = ferry_core::spec::parse_spec(&String::from_utf8_lossy(&raw)) else {
            continue;
        };
        if old.metadata.name != name {
            continue;
        }
        let plan = ferry_taskmanager::runtime::JobPlan::new(&old).ok();
        let choice = find_restorable_checked(root, &id, |cp| match &plan {
            Some(plan) => ferry_taskmanager::runtime::check_restore(plan, cp).map(drop),
            None => Ok(()),
        })
        .await?;
        return Ok(match choice.checkpoint {
            Some(cp) if !cp.manifest.finished => Some(PreviousRun::Resumable {
                id,
                checkpoint: cp.manifest.checkpoint_id.0,
            }),
            Some(cp) => Some(PreviousRun::Finished {
                id,
                checkpoint: cp.manifest.checkpoint_id.0,
            }),
            None if choice.all_damaged() => Some(PreviousRun::Damaged {
                id,
                reasons: choice.skipped_reasons(),
            }),
            None => None,
        });
    }
    Ok(None)
}

/// The status of a job whose status file is missing or unreadable.
fn created_status(id: JobId, spec: &JobSpec) -> StoredStatus {
    StoredStatus {
        job: JobInfo {
            id,
            name: spec.metadata.name.clone(),
            namespace: spec.metadata.namespace().to_string(),
            state: JobState::Created,
            parallelism: spec.spec.parallelism,
            submitted_at: Utc::now(),
            ended_at: None,
            restarts: 0,
            attempt: 0,
            taskmanager: None,
            deployment: None,
            parts: Vec::new(),
            moved_to: None,
            records_in: 0,
            records_out: 0,
            late_records: 0,
            expression_errors: 0,
            skipped_records: 0,
            watermark: None,
            last_restore: None,
            last_checkpoint: None,
            failure: None,
            output: None,
            checkpoint_root: String::new(),
        },
        jm_epoch: ferry_core::JmEpoch(0),
        instance: String::new(),
        updated_at: Utc::now(),
    }
}

/// Writes the job's status to the job store, if this instance may write.
pub(crate) async fn write_status(
    job: &JobEntry,
    store: &StorageLocation,
    instance: &str,
) -> Result<(), JmError> {
    let Some(epoch) = job.leadership.fence() else {
        return Err(JmError::NotLeader { leader: None });
    };
    let status = StoredStatus {
        job: job.info(),
        jm_epoch: epoch,
        instance: instance.to_string(),
        updated_at: Utc::now(),
    };
    let body = serde_json::to_vec_pretty(&status)
        .map_err(|e| JmError::Runtime(format!("encoding the job status: {e}")))?;
    store
        .put(&status_file(&job.id), bytes::Bytes::from(body))
        .await?;
    Ok(())
}

/// Keeps the job's status in the job store current while this instance
/// drives it: on every change, and every few seconds while it runs.
pub(crate) async fn status_writer(job: Arc<JobEntry>, store: StorageLocation, instance: String) {
    let mut dirty = job.dirty.subscribe();
    let mut tick = tokio::time::interval(STATUS_REFRESH);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = job.abandon.cancelled() => return,
            r = dirty.changed() => if r.is_err() { return },
            _ = tick.tick() => {}
        }
        if job.abandon.is_cancelled() {
            return;
        }
        let terminal = job.state().is_terminal();
        match write_status(&job, &store, &instance).await {
            Ok(()) if terminal => {
                let _ = job.ended.send(crate::model::JobEnded {
                    job: job.id,
                    store: store.clone(),
                });
            }
            Ok(()) => {}
            Err(JmError::NotLeader { .. }) => return,
            Err(e) => {
                tracing::warn!(job = %job.id, "writing the job status to the job store failed: {e}")
            }
        }
        if terminal {
            return;
        }
    }
}
