//! Synchronous replication (`regions.replication: sync`): before the
//! primary writes a checkpoint's manifest — the moment the checkpoint
//! completes and its sinks may commit — the checkpoint's files and its
//! manifest are copied into the standby regions' stores and verified there
//! ([`crate::replicate::CopyMode::Fresh`]: every file written at once,
//! then read back and hashed while the manifest is written — two round
//! trips to a remote store; a file that reads back wrong takes the
//! manifest out again and the copy has not succeeded). The checkpoint
//! completes once `regions.syncStandbys` standbys hold it, with every file
//! verified.
//!
//! Invariant: in the `sync` state, every manifest in the primary's store
//! — and so everything a sink commits, or a restore in the primary region
//! commits again — is already in `syncStandbys` standby stores. A promoted
//! standby restores at least up to what was committed: RPO 0.
//!
//! Without enough standbys within `regions.syncTimeout`,
//! `regions.onStandbyLoss` decides: `block` fails the checkpoint (output
//! stays uncommitted; every checkpoint tries again) and reports
//! [`SyncState::Blocked`]; `async` completes it anyway and reports
//! [`SyncState::Degraded`] — checkpoints then complete at once and the
//! asynchronous replicator copies them, while a probe copies the newest
//! one to the standbys in the background; the first probe that reaches
//! `syncStandbys` of them returns to [`SyncState::Sync`].

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use chrono::{DateTime, Utc};
use ferry_core::JobId;
use ferry_core::api::{SyncReplicationStatus, SyncState};
use ferry_core::config::OnStandbyLoss;
use ferry_core::manifest::job_dir;
use ferry_core::storage::StorageLocation;

use crate::ReplicationError;
use crate::fence::WriteFence;
use crate::replicate::{CopyMode, copy_snapshot_with};
use crate::replicator::Standby;

/// How synchronous replication behaves (`regions.*`).
#[derive(Clone, Debug)]
pub struct SyncSettings {
    /// Standby stores that must hold a checkpoint (`syncStandbys`).
    pub required: usize,
    pub on_loss: OnStandbyLoss,
    /// How long a checkpoint waits for them (`syncTimeout`).
    pub timeout: Duration,
}

/// What became of one checkpoint.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SyncOutcome {
    /// In these standbys' stores (at least `syncStandbys` of them).
    Replicated(Vec<String>),
    /// Not (yet) in enough standby stores, and `onStandbyLoss: async` lets
    /// it complete anyway.
    Degraded,
}

/// The most recent completion latencies kept for the status.
const LATENCIES: usize = 1024;

struct Inner {
    state: SyncState,
    since: DateTime<Utc>,
    reason: Option<String>,
    degradations: u64,
    blocked_checkpoints: u64,
    probing: bool,
    /// (standby, job) whose spec is known to be in the standby's store.
    specs: BTreeSet<(usize, JobId)>,
    /// Time from the start of the copy to `syncStandbys` standbys holding
    /// it, ms, newest last.
    latencies: Vec<f64>,
}

/// Copies each checkpoint into the standby stores before it completes.
pub struct SyncReplicator {
    standbys: Vec<Standby>,
    settings: SyncSettings,
    fence: WriteFence,
    inner: Mutex<Inner>,
}

impl SyncReplicator {
    /// Writes through `fence`, the region's (as the replicator does).
    pub fn new(standbys: Vec<Standby>, settings: SyncSettings, fence: WriteFence) -> Self {
        Self {
            standbys,
            settings,
            fence,
            inner: Mutex::new(Inner {
                state: SyncState::Sync,
                since: Utc::now(),
                reason: None,
                degradations: 0,
                blocked_checkpoints: 0,
                probing: false,
                specs: BTreeSet::new(),
                latencies: Vec::new(),
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The state, for `/v1/regions`, metrics and alerts.
    pub fn status(&self) -> SyncReplicationStatus {
        let i = self.lock();
        let mut sorted = i.latencies.clone();
        sorted.sort_by(f64::total_cmp);
        let pct = |p: f64| {
            (!sorted.is_empty()).then(|| {
                let k = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len());
                sorted[k - 1]
            })
        };
        SyncReplicationStatus {
            state: i.state,
            since: i.since,
            reason: i.reason.clone(),
            sync_standbys: self.settings.required,
            on_standby_loss: match self.settings.on_loss {
                OnStandbyLoss::Block => "block".into(),
                OnStandbyLoss::Async => "async".into(),
            },
            degradations: i.degradations,
            blocked_checkpoints: i.blocked_checkpoints,
            latency_p50_ms: pct(0.5),
            latency_p99_ms: pct(0.99),
        }
    }

    /// The state alone.
    pub fn state(&self) -> SyncState {
        self.lock().state
    }

    /// Every completion latency kept so far, ms (for benchmarks).
    pub fn latencies(&self) -> Vec<f64> {
        self.lock().latencies.clone()
    }

    fn enter(&self, state: SyncState, reason: Option<String>) {
        let mut i = self.lock();
        if i.state != state {
            match state {
                SyncState::Sync => tracing::info!(
                    "synchronous replication restored: checkpoints complete only in {} standby store(s) again",
                    self.settings.required
                ),
                SyncState::Blocked => tracing::error!(
                    "synchronous replication blocked (regions.onStandbyLoss: block): checkpoints fail and output stays uncommitted until a standby store takes them again: {}",
                    reason.as_deref().unwrap_or("")
                ),
                SyncState::Degraded => {
                    i.degradations += 1;
                    tracing::error!(
                        "synchronous replication degraded to asynchronous (regions.onStandbyLoss: async): checkpoints complete without the standbys, so a failover now may repeat output already committed: {}",
                        reason.as_deref().unwrap_or("")
                    )
                }
            }
            i.state = state;
            i.since = Utc::now();
        }
        i.reason = reason;
    }

    /// Copies snapshot `dir` of `job` (manifest `manifest`, not yet in the
    /// primary's store `root`) into the standby stores; see the module
    /// docs for what happens without enough of them. `Err` says why the
    /// checkpoint must not complete.
    pub async fn replicate(
        self: &Arc<Self>,
        job: &JobId,
        root: &StorageLocation,
        dir: &str,
        manifest: Bytes,
    ) -> Result<SyncOutcome, String> {
        if self.lock().state == SyncState::Degraded {
            self.probe(*job, root.clone(), dir.to_string(), manifest);
            return Ok(SyncOutcome::Degraded);
        }
        let started = Instant::now();
        let (reached, errors, fenced) = self
            .copy_to_standbys(job, root, dir, manifest, CopyMode::Fresh)
            .await;
        if let Some(e) = fenced {
            return Err(format!("not replicated: {e}"));
        }
        if reached.len() >= self.settings.required {
            let ms = started.elapsed().as_secs_f64() * 1e3;
            {
                let mut i = self.lock();
                if i.latencies.len() == LATENCIES {
                    i.latencies.remove(0);
                }
                i.latencies.push(ms);
            }
            self.enter(SyncState::Sync, None);
            return Ok(SyncOutcome::Replicated(reached));
        }
        let why = format!(
            "{dir} reached {} of the {} standby store(s) regions.syncStandbys asks for within {:?}: {}",
            reached.len(),
            self.settings.required,
            self.settings.timeout,
            errors.join("; ")
        );
        match self.settings.on_loss {
            OnStandbyLoss::Block => {
                self.lock().blocked_checkpoints += 1;
                self.enter(SyncState::Blocked, Some(why.clone()));
                Err(format!(
                    "{why}; regions.onStandbyLoss is block: the checkpoint does not complete and its output stays uncommitted until a standby store is reachable again"
                ))
            }
            OnStandbyLoss::Async => {
                self.enter(SyncState::Degraded, Some(why));
                Ok(SyncOutcome::Degraded)
            }
        }
    }

    /// In the degraded state: copies the newest snapshot to the standbys in
    /// the background (one probe at a time); once enough hold it, back to
    /// `sync`.
    fn probe(self: &Arc<Self>, job: JobId, root: StorageLocation, dir: String, manifest: Bytes) {
        {
            let mut i = self.lock();
            if i.probing {
                return;
            }
            i.probing = true;
        }
        let me = self.clone();
        tokio::spawn(async move {
            // The newest snapshot may be in some standbys already.
            let (reached, _, _) = me
                .copy_to_standbys(&job, &root, &dir, manifest, CopyMode::Resume)
                .await;
            me.lock().probing = false;
            if reached.len() >= me.settings.required && me.lock().state == SyncState::Degraded {
                me.enter(SyncState::Sync, None);
            }
        });
    }

    /// Copies to every standby at once, each within the timeout; returns
    /// as soon as `required` of them hold it (the others go on in the
    /// background) or every copy ended: (standbys reached, errors, a fence
    /// error if the region no longer holds the primary role).
    async fn copy_to_standbys(
        self: &Arc<Self>,
        job: &JobId,
        root: &StorageLocation,
        dir: &str,
        manifest: Bytes,
        mode: CopyMode,
    ) -> (Vec<String>, Vec<String>, Option<String>) {
        let (tx, mut rx) = tokio::sync::mpsc::channel(self.standbys.len().max(1));
        for (i, standby) in self.standbys.iter().enumerate() {
            let (me, tx) = (self.clone(), tx.clone());
            let (job, root, dir, manifest) =
                (*job, root.clone(), dir.to_string(), manifest.clone());
            let store = standby.store.clone();
            tokio::spawn(async move {
                let copy = async {
                    me.ensure_spec(i, &job, &root, &store).await?;
                    copy_snapshot_with(&root, &store, &dir, manifest, &me.fence, mode).await
                };
                let result = tokio::time::timeout(me.settings.timeout, copy).await;
                let _ = tx.send((i, result)).await;
            });
        }
        drop(tx);
        let (mut reached, mut errors, mut fenced) = (Vec::new(), Vec::new(), None);
        while reached.len() < self.settings.required {
            let Some((i, result)) = rx.recv().await else {
                break;
            };
            let region = &self.standbys[i].region;
            match result {
                Ok(Ok(_)) => reached.push(region.clone()),
                Ok(Err(e @ ReplicationError::Fenced { .. })) => fenced = Some(e.to_string()),
                Ok(Err(e)) => errors.push(format!("{region}: {e}")),
                Err(_) => errors.push(format!(
                    "{region}: no answer within regions.syncTimeout ({:?})",
                    self.settings.timeout
                )),
            }
        }
        (reached, errors, fenced)
    }

    /// Copies the job's spec into standby `i`'s store once (a promoted
    /// standby needs it to restart the job from the checkpoint).
    async fn ensure_spec(
        &self,
        i: usize,
        job: &JobId,
        root: &StorageLocation,
        store: &StorageLocation,
    ) -> Result<(), ReplicationError> {
        if self.lock().specs.contains(&(i, *job)) {
            return Ok(());
        }
        let rel = format!("{}/spec.yaml", job_dir(job));
        if let Some(spec) = root.get_opt(&rel).await?
            && store.get_opt(&rel).await?.as_ref() != Some(&spec)
        {
            self.fence.write(&rel, store.put(&rel, spec)).await?;
        }
        self.lock().specs.insert((i, *job));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_core::CheckpointId;
    use ferry_core::manifest::{MANIFEST_FILE, checkpoint_dir, read_manifest};

    /// A primary store with one snapshot (one state file, manifest not yet
    /// written) and the job's spec; returns the snapshot's directory and
    /// its manifest's bytes.
    async fn snapshot(root: &StorageLocation, job: &JobId) -> (String, Bytes) {
        crate::replicate::tests::lineage_checkpoint(
            root,
            job,
            3,
            &[("op-0.bin", b"state of subtask 0")],
            0,
            None,
        )
        .await;
        root.put(
            &format!("{}/spec.yaml", job_dir(job)),
            Bytes::from_static(b"spec"),
        )
        .await
        .unwrap();
        let dir = checkpoint_dir(job, CheckpointId(3));
        let raw = root
            .child(&dir)
            .get_opt(MANIFEST_FILE)
            .await
            .unwrap()
            .unwrap();
        root.child(&dir).delete(MANIFEST_FILE).await.unwrap();
        (dir, raw)
    }

    fn store(path: &std::path::Path) -> StorageLocation {
        StorageLocation::open(&format!("file://{}", path.display())).unwrap()
    }

    fn replicator(
        standbys: Vec<(&str, StorageLocation)>,
        required: usize,
        on_loss: OnStandbyLoss,
    ) -> Arc<SyncReplicator> {
        Arc::new(SyncReplicator::new(
            standbys
                .into_iter()
                .map(|(r, s)| Standby {
                    region: r.into(),
                    store: s,
                })
                .collect(),
            SyncSettings {
                required,
                on_loss,
                timeout: Duration::from_secs(2),
            },
            WriteFence::unfenced(),
        ))
    }

    #[tokio::test]
    async fn a_checkpoint_is_in_the_standby_verified_before_it_completes() {
        let t = tempfile::tempdir().unwrap();
        let (primary, standby) = (store(&t.path().join("p")), store(&t.path().join("s")));
        let job = JobId::new();
        let (dir, manifest) = snapshot(&primary, &job).await;
        let sync = replicator(vec![("west", standby.clone())], 1, OnStandbyLoss::Block);
        let out = sync.replicate(&job, &primary, &dir, manifest.clone()).await;
        assert_eq!(out, Ok(SyncOutcome::Replicated(vec!["west".into()])));
        // The standby has the manifest (the same bytes), its file and the
        // spec; the primary does not have the manifest yet.
        let copied = standby.child(&dir).get_opt(MANIFEST_FILE).await.unwrap();
        assert_eq!(copied, Some(manifest));
        assert!(read_manifest(&standby.child(&dir)).await.unwrap().is_some());
        assert_eq!(
            standby
                .child(&dir)
                .get_opt("op-0.bin")
                .await
                .unwrap()
                .as_deref(),
            Some(&b"state of subtask 0"[..])
        );
        assert!(
            standby
                .get_opt(&format!("{}/spec.yaml", job_dir(&job)))
                .await
                .unwrap()
                .is_some()
        );
        assert!(
            primary
                .child(&dir)
                .get_opt(MANIFEST_FILE)
                .await
                .unwrap()
                .is_none()
        );
        assert_eq!(sync.status().state, SyncState::Sync);
        assert_eq!(sync.latencies().len(), 1);
    }

    /// A standby store that cannot be written: its root is replaced by a
    /// regular file (root ignores permissions); [`back`] restores it.
    fn unreachable(t: &std::path::Path) -> StorageLocation {
        let p = t.join("gone");
        let s = store(&p);
        std::fs::remove_dir_all(&p).unwrap();
        std::fs::write(&p, b"not a directory").unwrap();
        s
    }

    fn back(t: &std::path::Path) {
        let p = t.join("gone");
        std::fs::remove_file(&p).unwrap();
        std::fs::create_dir(&p).unwrap();
    }

    #[tokio::test]
    async fn without_enough_standbys_block_fails_the_checkpoint_until_one_is_back() {
        let t = tempfile::tempdir().unwrap();
        let primary = store(&t.path().join("p"));
        let ok = store(&t.path().join("s1"));
        let gone = unreachable(t.path());
        let job = JobId::new();
        let (dir, manifest) = snapshot(&primary, &job).await;
        // Two required, one reachable: the checkpoint must not complete.
        let sync = replicator(
            vec![("west", ok.clone()), ("south", gone)],
            2,
            OnStandbyLoss::Block,
        );
        let err = sync
            .replicate(&job, &primary, &dir, manifest.clone())
            .await
            .unwrap_err();
        assert!(err.contains("reached 1 of the 2"), "{err}");
        assert!(err.contains("south"), "{err}");
        assert!(err.contains("onStandbyLoss is block"), "{err}");
        let st = sync.status();
        assert_eq!(st.state, SyncState::Blocked);
        assert_eq!(st.blocked_checkpoints, 1);
        // The standby comes back: the next checkpoint completes, and the
        // state returns to sync.
        back(t.path());
        let out = sync
            .replicate(&job, &primary, &dir, manifest)
            .await
            .unwrap();
        assert!(
            matches!(out, SyncOutcome::Replicated(ref r) if r.len() == 2),
            "{out:?}"
        );
        assert_eq!(sync.status().state, SyncState::Sync);
    }

    #[tokio::test]
    async fn without_standbys_async_degrades_and_returns_to_sync_by_itself() {
        let t = tempfile::tempdir().unwrap();
        let primary = store(&t.path().join("p"));
        let gone = unreachable(t.path());
        let job = JobId::new();
        let (dir, manifest) = snapshot(&primary, &job).await;
        let sync = replicator(vec![("west", gone)], 1, OnStandbyLoss::Async);
        let out = sync.replicate(&job, &primary, &dir, manifest.clone()).await;
        assert_eq!(out, Ok(SyncOutcome::Degraded));
        let st = sync.status();
        assert_eq!((st.state, st.degradations), (SyncState::Degraded, 1));
        assert!(st.reason.unwrap().contains("west"));
        // Degraded: checkpoints complete at once; a background probe finds
        // the standby back and returns to sync.
        back(t.path());
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let out = sync.replicate(&job, &primary, &dir, manifest.clone()).await;
            if sync.status().state == SyncState::Sync {
                break;
            }
            assert_eq!(out, Ok(SyncOutcome::Degraded));
            assert!(Instant::now() < deadline, "never returned to sync");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(
            store(&t.path().join("gone"))
                .child(&dir)
                .get_opt(MANIFEST_FILE)
                .await
                .unwrap()
                .is_some()
        );
    }
}
