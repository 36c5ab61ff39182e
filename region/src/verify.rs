//! Restore verification of checkpoints in a (standby) store: every
//! complete checkpoint of a job is read with every hash checked, and its
//! state is decoded by a [`RestoreCheck`] exactly as a restore would,
//! without starting anything — so a broken copy is found before the
//! disaster, not during it.

use chrono::{DateTime, Utc};
use ferry_core::manifest::{
    MANIFEST_FILE, VerifiedCheckpoint, checkpoint_dir, job_dir, list_checkpoint_ids, read_verified,
};
use ferry_core::storage::StorageLocation;
use ferry_core::{CoreError, JobId};
use serde::Serialize;

use crate::ReplicationError;

/// Decodes a checkpoint's state as a restore of the job would (the binary
/// implements it with the streaming runtime; tests with anything).
pub trait RestoreCheck: Send + Sync {
    /// Ok with the number of state files decoded, or why it would not
    /// restore.
    fn check(&self, spec_yaml: &str, cp: &VerifiedCheckpoint) -> Result<usize, String>;
}

/// The verdict on one checkpoint.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct CheckpointVerdict {
    pub checkpoint: u64,
    pub ok: bool,
    /// State files decoded (when ok).
    pub files: usize,
    pub error: Option<String>,
}

/// The verdicts on every complete checkpoint of one job.
#[derive(Clone, Debug, Serialize)]
pub struct Verification {
    pub job: JobId,
    pub verified_at: DateTime<Utc>,
    /// Oldest first.
    pub checkpoints: Vec<CheckpointVerdict>,
    /// Why the whole job cannot be checked (no spec), if so.
    pub error: Option<String>,
}

impl Verification {
    /// The newest checkpoint that verified: what a failover would restore.
    pub fn last_verified(&self) -> Option<u64> {
        self.checkpoints
            .iter()
            .filter(|c| c.ok)
            .map(|c| c.checkpoint)
            .max()
    }

    /// True if every checkpoint verified (and there is at least one).
    pub fn all_ok(&self) -> bool {
        self.error.is_none()
            && !self.checkpoints.is_empty()
            && self.checkpoints.iter().all(|c| c.ok)
    }
}

/// Verifies every complete checkpoint of `job` in `store`.
pub async fn verify_job(
    store: &StorageLocation,
    job: &JobId,
    check: &dyn RestoreCheck,
) -> Result<Verification, ReplicationError> {
    verify_new(store, job, check, &Default::default()).await
}

/// [`verify_job`] for the checkpoints not in `done` only.
pub async fn verify_new(
    store: &StorageLocation,
    job: &JobId,
    check: &dyn RestoreCheck,
    done: &std::collections::BTreeSet<u64>,
) -> Result<Verification, ReplicationError> {
    let mut out = Verification {
        job: *job,
        verified_at: Utc::now(),
        checkpoints: Vec::new(),
        error: None,
    };
    let Some(spec) = store
        .get_opt(&format!("{}/spec.yaml", job_dir(job)))
        .await?
    else {
        out.error = Some(format!(
            "{}/{}/spec.yaml is missing: the job cannot be restored here",
            store.url(),
            job_dir(job)
        ));
        return Ok(out);
    };
    let spec = String::from_utf8_lossy(&spec).into_owned();
    for id in list_checkpoint_ids(store, job).await? {
        let dir = store.child(&checkpoint_dir(job, id));
        if done.contains(&id.0) || dir.size(MANIFEST_FILE).await?.is_none() {
            continue; // checked before, or not a checkpoint (yet)
        }
        let verdict = match read_verified(&dir).await {
            Ok(Some(cp)) => match check.check(&spec, &cp) {
                Ok(files) => CheckpointVerdict {
                    checkpoint: id.0,
                    ok: true,
                    files,
                    error: None,
                },
                Err(e) => CheckpointVerdict {
                    checkpoint: id.0,
                    ok: false,
                    files: 0,
                    error: Some(e),
                },
            },
            Ok(None) => continue,
            Err(e @ CoreError::Corrupt { .. }) => CheckpointVerdict {
                checkpoint: id.0,
                ok: false,
                files: 0,
                error: Some(e.to_string()),
            },
            Err(e) => return Err(e.into()),
        };
        if let Some(e) = &verdict.error {
            tracing::warn!(job = %job, checkpoint = id.0, "checkpoint does not verify: {e}");
        }
        out.checkpoints.push(verdict);
    }
    Ok(out)
}
