//! The job registry: every job this JobManager drives, its status, and the
//! public operations on it (submit, get, cancel, savepoint, checkpoints,
//! wait, shutdown).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, RwLock};

use chrono::{DateTime, Utc};
use ferry_core::JobId;
use ferry_core::manifest::{
    MANIFEST_FILE, Manifest, checkpoints_root, find_restorable, job_dir, list_checkpoint_ids,
    savepoint_dir, savepoints_root,
};
use ferry_core::spec::{JobSpec, SinkSpec};
use ferry_core::storage::StorageLocation;
use ferry_core::value::format_ts;
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::coordinator::{JobCommand, drive};
use crate::deployment::LiveCounters;
use crate::error::JmError;
use crate::leadership::Leadership;
use crate::metrics::{Metrics, StateLabels};
use crate::model::{
    CheckpointInfo, JobInfo, JobManagerConfig, SavepointInfo, SubmitOptions, manifest_info,
};
use crate::service::JobManager;
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
    pub jm_epoch: u64,
    /// Instance that wrote it.
    pub instance: String,
    pub updated_at: DateTime<Utc>,
}

pub(crate) struct Inner {
    pub(crate) config: JobManagerConfig,
    pub(crate) leadership: Arc<Leadership>,
    /// The job store: `jobs/<id>/spec.yaml` and `jobs/<id>/status.json`.
    pub(crate) store: Result<StorageLocation, String>,
    pub(crate) metrics: Arc<Metrics>,
    jobs: RwLock<BTreeMap<JobId, Arc<JobEntry>>>,
    pub(crate) shutdown: CancellationToken,
    /// The region's TaskManagers, when tasks run on them (distributed
    /// mode); unset: tasks run in this process.
    pub(crate) taskmanagers: std::sync::OnceLock<Arc<crate::taskmanagers::TaskManagers>>,
    drivers: TaskTracker,
    /// (this region, the primary region) when this region is a standby: it
    /// runs no job (the replicated ones wait for a promotion).
    pub(crate) standby_region: RwLock<Option<(String, String)>>,
    /// Set while this region is being demoted: abandoned jobs stop their
    /// tasks instead of leaving them to a next leader.
    pub(crate) demoting: Arc<std::sync::atomic::AtomicBool>,
    /// The region epoch as last read (0 without a region lease).
    pub(crate) region_epoch: Arc<std::sync::atomic::AtomicU64>,
    /// How long this region may still commit checkpoints.
    pub(crate) region_fence: Arc<RegionFence>,
    /// What `POST /v1/regions/{name}/failover` runs.
    pub(crate) region_control: std::sync::OnceLock<crate::model::RegionControl>,
    /// What `/v1/regions` reports (set when replicating to other regions).
    pub(crate) regions_view: std::sync::OnceLock<crate::model::RegionsView>,
    /// Announces completed checkpoints (see `subscribe_completed`).
    pub(crate) completed: tokio::sync::broadcast::Sender<crate::model::CompletedCheckpoint>,
    /// Where job drivers run (the runtime the JobManager was created on).
    runtime: tokio::runtime::Handle,
}

/// The region lease as a commit fence. With cross-region coordination a
/// region may commit a checkpoint only while a recent read of the region
/// lease named it primary: a region cut off from the global KV stops
/// committing when its last confirmation runs out, before any standby can
/// have taken over. Without cross-region coordination it never refuses.
#[derive(Debug, Default)]
pub(crate) struct RegionFence {
    /// `None`: not fenced; `Some(None)`: fenced, never confirmed.
    until: Mutex<Option<Option<std::time::Instant>>>,
}

impl RegionFence {
    /// From now on commits need a confirmation.
    pub(crate) fn enable(&self) {
        let mut u = self.until.lock().unwrap_or_else(|p| p.into_inner());
        if u.is_none() {
            *u = Some(None);
        }
    }

    /// The region lease named this region just now: commits may go on for
    /// `valid_for`.
    pub(crate) fn confirm(&self, valid_for: std::time::Duration) {
        *self.until.lock().unwrap_or_else(|p| p.into_inner()) =
            Some(Some(std::time::Instant::now() + valid_for));
    }

    /// The region lost the lease (or was demoted): no commit until the
    /// next confirmation.
    pub(crate) fn revoke(&self) {
        let mut u = self.until.lock().unwrap_or_else(|p| p.into_inner());
        if u.is_some() {
            *u = Some(None);
        }
    }

    /// `Err` with the reason when a commit must not happen now.
    pub(crate) fn check(&self) -> Result<(), String> {
        match *self.until.lock().unwrap_or_else(|p| p.into_inner()) {
            None => Ok(()),
            Some(Some(t)) if std::time::Instant::now() < t => Ok(()),
            Some(_) => Err(
                "the region lease has not been confirmed recently (global KV unreachable, or another region is primary)".into(),
            ),
        }
    }
}

/// Mutable status of a job.
#[derive(Debug)]
pub(crate) struct Status {
    pub(crate) state: JobState,
    pub(crate) restarts: u32,
    pub(crate) attempt: u32,
    /// (TaskManager, deployment id) of remote tasks.
    pub(crate) placement: Option<(String, String)>,
    /// See `JobInfo::moved_to`.
    pub(crate) moved_to: Option<String>,
    pub(crate) failure: Option<String>,
    pub(crate) last_checkpoint: Option<CheckpointInfo>,
    pub(crate) ended_at: Option<DateTime<Utc>>,
}

/// One job.
pub(crate) struct JobEntry {
    pub(crate) id: JobId,
    pub(crate) spec: JobSpec,
    /// Storage root holding `jobs/<id>/...`.
    pub(crate) root: StorageLocation,
    pub(crate) submitted_at: DateTime<Utc>,
    pub(crate) status: Mutex<Status>,
    pub(crate) commands: mpsc::UnboundedSender<JobCommand>,
    pub(crate) state_tx: watch::Sender<JobState>,
    /// Counters of the current (or last) deployment's tasks.
    pub(crate) live: Mutex<Option<LiveCounters>>,
    metrics: Arc<Metrics>,
    pub(crate) leadership: Arc<Leadership>,
    pub(crate) taskmanagers: Option<Arc<crate::taskmanagers::TaskManagers>>,
    pub(crate) completed: tokio::sync::broadcast::Sender<crate::model::CompletedCheckpoint>,
    /// The region is being demoted: stop tasks when abandoning.
    pub(crate) demoting: Arc<std::sync::atomic::AtomicBool>,
    /// The region epoch manifests record.
    pub(crate) region_epoch: Arc<std::sync::atomic::AtomicU64>,
    /// Checked before every checkpoint commit.
    pub(crate) region_fence: Arc<RegionFence>,
    /// The checkpoint the current deployment restored from (see
    /// `Manifest::restored_from`).
    pub(crate) restored_from: Mutex<Option<u64>>,
    /// Cancelled when this JobManager loses the leadership: the driver stops
    /// at once and writes nothing more; the new leader carries on.
    pub(crate) abandon: CancellationToken,
    /// The job as the store last recorded it: shown until a deployment has
    /// live counters (after adoption), and all there is for jobs this
    /// instance does not drive (ended jobs, and every job on a standby).
    pub(crate) stored: Mutex<Option<JobInfo>>,
    /// Bumped on every change worth persisting; the status writer follows.
    pub(crate) dirty: watch::Sender<u64>,
    /// True while a driver runs this job in this process.
    pub(crate) running: watch::Sender<bool>,
}

impl JobEntry {
    /// Moves the job to `to` through the state machine, updating metrics.
    pub(crate) fn set_state(&self, to: JobState, failure: Option<String>) {
        let mut st = self.status.lock().unwrap_or_else(|p| p.into_inner());
        let from = st.state;
        if from == to {
            if failure.is_some() {
                st.failure = failure;
            }
            return;
        }
        if let Err(e) = st.state.transition(to) {
            tracing::error!(job = %self.id, "{e}");
            return;
        }
        if failure.is_some() || to == JobState::Running {
            st.failure = failure.or(if to == JobState::Running {
                None
            } else {
                st.failure.clone()
            });
        }
        if to.is_terminal() {
            st.ended_at = Some(Utc::now());
        }
        drop(st);
        self.metrics
            .jobs
            .get_or_create(&StateLabels {
                state: from.to_string(),
            })
            .dec();
        self.metrics
            .jobs
            .get_or_create(&StateLabels {
                state: to.to_string(),
            })
            .inc();
        tracing::info!(job = %self.id, name = %self.spec.metadata.name, from = %from, to = %to, "job state changed");
        // send_replace stores the state even when nobody is subscribed yet.
        self.state_tx.send_replace(to);
        self.touch();
    }

    /// The region's TaskManagers, when tasks run on them.
    pub(crate) fn pool(&self) -> Option<Arc<crate::taskmanagers::TaskManagers>> {
        self.taskmanagers.clone()
    }

    /// One more deployment of the job's tasks started.
    pub(crate) fn count_attempt(&self) {
        self.status
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .attempt += 1;
        self.touch();
    }

    /// Marks the status as changed, for the job-store writer.
    pub(crate) fn touch(&self) {
        self.dirty.send_modify(|v| *v += 1);
    }

    pub(crate) fn state(&self) -> JobState {
        self.status.lock().unwrap_or_else(|p| p.into_inner()).state
    }

    /// Current summary.
    pub(crate) fn info(&self) -> JobInfo {
        let live = self.live.lock().unwrap_or_else(|p| p.into_inner()).clone();
        if live.is_none()
            && let Some(mut stored) = self
                .stored
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone()
        {
            let st = self.status.lock().unwrap_or_else(|p| p.into_inner());
            stored.state = st.state;
            stored.restarts = st.restarts;
            stored.attempt = st.attempt;
            if let Some((tm, d)) = &st.placement {
                stored.taskmanager = Some(tm.clone());
                stored.deployment = Some(d.clone());
            }
            if st.last_checkpoint.is_some() {
                stored.last_checkpoint = st.last_checkpoint.clone();
            }
            if st.failure.is_some() {
                stored.failure = st.failure.clone();
            }
            stored.ended_at = st.ended_at.or(stored.ended_at);
            return stored;
        }
        let c = live.map(|l| l.read()).unwrap_or_default();
        let st = self.status.lock().unwrap_or_else(|p| p.into_inner());
        JobInfo {
            id: self.id,
            name: self.spec.metadata.name.clone(),
            state: st.state,
            parallelism: self.spec.spec.parallelism,
            submitted_at: self.submitted_at,
            ended_at: st.ended_at,
            restarts: st.restarts,
            attempt: st.attempt,
            taskmanager: st.placement.as_ref().map(|p| p.0.clone()),
            deployment: st.placement.as_ref().map(|p| p.1.clone()),
            moved_to: st.moved_to.clone(),
            records_in: c.records_in,
            records_out: c.records_out,
            late_records: c.late_records,
            expression_errors: c.expression_errors,
            skipped_records: c.skipped_records,
            watermark: Some(c.watermark).filter(|w| *w != i64::MIN).map(format_ts),
            last_checkpoint: st.last_checkpoint.clone(),
            failure: st.failure.clone(),
            output: match &self.spec.spec.sink {
                SinkSpec::File(f) => StorageLocation::parse(&f.path).ok().map(|p| {
                    if p.scheme == "file" {
                        p.path
                    } else {
                        f.path.clone()
                    }
                }),
                _ => None,
            },
            checkpoint_root: self
                .root
                .child(&checkpoints_root(&self.id))
                .url()
                .to_string(),
        }
    }
}

impl JobEntry {
    /// True while a driver runs this job in this process (false for jobs
    /// mirrored from the store).
    pub(crate) fn driven(&self) -> bool {
        *self.running.borrow()
    }

    /// Updates a mirrored (not driven) job from the store.
    fn refresh_passive(&self, job: JobInfo) {
        let mut st = self.status.lock().unwrap_or_else(|p| p.into_inner());
        if st.state != job.state {
            for (state, delta) in [(st.state, -1), (job.state, 1)] {
                self.metrics
                    .jobs
                    .get_or_create(&StateLabels {
                        state: state.to_string(),
                    })
                    .inc_by(delta);
            }
        }
        st.state = job.state;
        st.restarts = job.restarts;
        st.attempt = job.attempt;
        st.placement = job.taskmanager.clone().zip(job.deployment.clone());
        st.moved_to = job.moved_to.clone();
        st.failure = job.failure.clone();
        st.last_checkpoint = job.last_checkpoint.clone();
        st.ended_at = job.ended_at;
        drop(st);
        self.state_tx.send_replace(job.state);
        // Counters of a deployment this instance drove before it stepped
        // down are stale now: the store's figures are the current ones.
        *self.live.lock().unwrap_or_else(|p| p.into_inner()) = None;
        *self.stored.lock().unwrap_or_else(|p| p.into_inner()) = Some(job);
    }
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

/// The status of a job whose status file is missing or unreadable.
fn created_status(id: JobId, spec: &JobSpec) -> StoredStatus {
    StoredStatus {
        job: JobInfo {
            id,
            name: spec.metadata.name.clone(),
            state: JobState::Created,
            parallelism: spec.spec.parallelism,
            submitted_at: Utc::now(),
            ended_at: None,
            restarts: 0,
            attempt: 0,
            taskmanager: None,
            deployment: None,
            moved_to: None,
            records_in: 0,
            records_out: 0,
            late_records: 0,
            expression_errors: 0,
            skipped_records: 0,
            watermark: None,
            last_checkpoint: None,
            failure: None,
            output: None,
            checkpoint_root: String::new(),
        },
        jm_epoch: 0,
        instance: String::new(),
        updated_at: Utc::now(),
    }
}

/// Writes the job's status to the job store, if this instance may write.
async fn write_status(
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
        .put(
            &format!("{}/{STATUS_FILE}", job_dir(&job.id)),
            bytes::Bytes::from(body),
        )
        .await?;
    Ok(())
}

/// Keeps the job's status in the job store current while this instance
/// drives it: on every change, and every few seconds while it runs.
async fn status_writer(job: Arc<JobEntry>, store: StorageLocation, instance: String) {
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

impl Inner {
    /// The registered job with this exact id.
    /// (this region, primary) while this region is a standby.
    pub(crate) fn standby(&self) -> Option<(String, String)> {
        self.standby_region
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub(crate) fn entry(&self, id: &JobId) -> Option<Arc<JobEntry>> {
        self.jobs
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(id)
            .cloned()
    }

    /// Every registered job.
    pub(crate) fn all(&self) -> Vec<Arc<JobEntry>> {
        self.jobs
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect()
    }

    pub(crate) fn list(&self) -> Vec<JobInfo> {
        let jobs = self.jobs.read().unwrap_or_else(|p| p.into_inner());
        jobs.values().rev().map(|j| j.info()).collect()
    }

    /// Finds a job by full id, unique id prefix, or unique name (newest wins
    /// among jobs with the same name).
    pub(crate) fn find(&self, key: &str) -> Result<Arc<JobEntry>, JmError> {
        let jobs = self.jobs.read().unwrap_or_else(|p| p.into_inner());
        if let Some(j) = key.parse::<JobId>().ok().and_then(|id| jobs.get(&id)) {
            return Ok(j.clone());
        }
        let by_prefix: Vec<_> = jobs
            .values()
            .filter(|j| key.len() >= 4 && j.id.to_string().starts_with(key))
            .collect();
        if by_prefix.len() == 1 {
            return Ok(by_prefix[0].clone());
        }
        if by_prefix.len() > 1 {
            return Err(JmError::NotFound(format!(
                "{key}' is ambiguous ({} jobs start with it); give more characters of the id",
                by_prefix.len()
            )));
        }
        jobs.values()
            .rev()
            .find(|j| j.spec.metadata.name == key)
            .cloned()
            .ok_or_else(|| JmError::NotFound(key.to_string()))
    }
}

impl JobManager {
    /// Creates an embedded JobManager (no election) with no jobs.
    pub fn new(config: JobManagerConfig) -> Self {
        Self::with_leadership(config, Leadership::embedded())
    }

    /// Creates a JobManager that acts only while `leadership` allows. Must
    /// be called on the tokio runtime that is to run the jobs.
    pub fn with_leadership(config: JobManagerConfig, leadership: Arc<Leadership>) -> Self {
        let store = StorageLocation::open(&config.data_url).map_err(|e| e.to_string());
        let metrics = Arc::new(Metrics::new());
        metrics.region_is_primary.set(1);
        if leadership.ha_context().is_none() {
            metrics.ha_is_leader.set(1);
        }
        Self {
            inner: Arc::new(Inner {
                config,
                leadership,
                store,
                metrics,
                jobs: RwLock::new(BTreeMap::new()),
                shutdown: CancellationToken::new(),
                drivers: TaskTracker::new(),
                runtime: tokio::runtime::Handle::current(),
                taskmanagers: std::sync::OnceLock::new(),
                completed: tokio::sync::broadcast::channel(1024).0,
                regions_view: std::sync::OnceLock::new(),
                region_control: std::sync::OnceLock::new(),
                standby_region: RwLock::new(None),
                demoting: Default::default(),
                region_epoch: Default::default(),
                region_fence: Default::default(),
            }),
        }
    }

    fn storage_root(&self, spec: &JobSpec) -> Result<StorageLocation, JmError> {
        let url = spec
            .spec
            .checkpointing
            .storage
            .clone()
            .unwrap_or_else(|| self.inner.config.data_url.clone());
        Ok(StorageLocation::open(&url)?)
    }

    /// Starts a validated spec.
    #[tracing::instrument(name = "job.submit", skip_all, fields(job = %spec.metadata.name))]
    pub async fn submit_spec(
        &self,
        spec: JobSpec,
        opts: SubmitOptions,
    ) -> Result<JobInfo, JmError> {
        if self.inner.shutdown.is_cancelled() {
            return Err(JmError::ShuttingDown);
        }
        if self.inner.leadership.fence().is_none() {
            return Err(self.not_leader());
        }
        if let Some((region, primary)) = self.inner.standby() {
            return Err(JmError::NotPrimaryRegion { region, primary });
        }
        let root = self.storage_root(&spec)?;
        let id = opts.job_id.unwrap_or_default();
        let opts = SubmitOptions {
            job_id: Some(id),
            ..opts
        };
        let spec_rel = format!("{}/{SPEC_FILE}", job_dir(&id));
        let spec_bytes = bytes::Bytes::from(spec.to_yaml());
        root.put(&spec_rel, spec_bytes.clone()).await?;
        let store = self.store()?;
        if store.url() != root.url() {
            store.put(&spec_rel, spec_bytes).await?;
        }
        let entry = self.start(spec, root, opts, None)?;
        // Durable before the client hears of it: a new leader will know it.
        write_status(&entry, &store, &self.inner.config.instance_id).await?;
        Ok(entry.info())
    }

    /// The job store.
    pub(crate) fn store(&self) -> Result<StorageLocation, JmError> {
        self.inner
            .store
            .clone()
            .map_err(|e| JmError::Runtime(format!("the job store is unusable: {e}")))
    }

    /// The error for a write on an instance that does not lead.
    pub(crate) fn not_leader(&self) -> JmError {
        JmError::NotLeader {
            leader: self.inner.leadership.leader().map(|l| l.payload),
        }
    }

    /// Registers a job and, unless the store says it has ended (`prior`
    /// with `passive`), starts its driver and its status writer.
    fn start(
        &self,
        spec: JobSpec,
        root: StorageLocation,
        opts: SubmitOptions,
        prior: Option<(StoredStatus, bool)>,
    ) -> Result<Arc<JobEntry>, JmError> {
        let id = opts.job_id.unwrap_or_default();
        let (tx, rx) = mpsc::unbounded_channel();
        let passive = prior.as_ref().is_some_and(|(_, p)| *p);
        let state = match &prior {
            Some((p, true)) => p.job.state,
            _ => JobState::Created,
        };
        let (state_tx, _) = watch::channel(state);
        let (dirty, _) = watch::channel(0u64);
        let (running, _) = watch::channel(!passive);
        let prior_job = prior.map(|(p, _)| p.job);
        let entry = Arc::new(JobEntry {
            id,
            spec,
            root,
            submitted_at: prior_job
                .as_ref()
                .map(|p| p.submitted_at)
                .unwrap_or_else(Utc::now),
            status: Mutex::new(Status {
                state,
                restarts: prior_job.as_ref().map(|p| p.restarts).unwrap_or(0),
                attempt: prior_job.as_ref().map(|p| p.attempt).unwrap_or(0),
                placement: prior_job
                    .as_ref()
                    .and_then(|p| p.taskmanager.clone().zip(p.deployment.clone())),
                // Driven here again: no longer moved away.
                moved_to: if passive {
                    prior_job.as_ref().and_then(|p| p.moved_to.clone())
                } else {
                    None
                },
                failure: prior_job.as_ref().and_then(|p| p.failure.clone()),
                last_checkpoint: prior_job.as_ref().and_then(|p| p.last_checkpoint.clone()),
                ended_at: prior_job.as_ref().and_then(|p| p.ended_at),
            }),
            commands: tx,
            state_tx,
            live: Mutex::new(None),
            metrics: self.inner.metrics.clone(),
            leadership: self.inner.leadership.clone(),
            taskmanagers: self.inner.taskmanagers.get().cloned(),
            completed: self.inner.completed.clone(),
            demoting: self.inner.demoting.clone(),
            region_epoch: self.inner.region_epoch.clone(),
            region_fence: self.inner.region_fence.clone(),
            restored_from: Mutex::new(None),
            abandon: CancellationToken::new(),
            stored: Mutex::new(prior_job),
            dirty,
            running,
        });
        let old = self
            .inner
            .jobs
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id, entry.clone());
        if let Some(old) = old {
            old.abandon.cancel();
            self.inner
                .metrics
                .jobs
                .get_or_create(&StateLabels {
                    state: old.state().to_string(),
                })
                .dec();
        }
        self.inner
            .metrics
            .jobs
            .get_or_create(&StateLabels {
                state: state.to_string(),
            })
            .inc();
        if passive {
            return Ok(entry);
        }
        tracing::info!(job = %id, "job submitted");
        let shutdown = self.inner.shutdown.clone();
        let metrics = self.inner.metrics.clone();
        let driven = entry.clone();
        // On the JobManager's own runtime, whoever calls (the HA loop runs
        // on a separate one so job load cannot starve lease renewals).
        let rt = &self.inner.runtime;
        self.inner.drivers.spawn_on(
            async move {
                drive(driven.clone(), rx, opts, metrics, shutdown).await;
                driven.running.send_replace(false);
            },
            rt,
        );
        if let Ok(store) = self.inner.store.clone() {
            let written = entry.clone();
            let instance = self.inner.config.instance_id.clone();
            self.inner.drivers.spawn_on(
                async move { status_writer(written, store, instance).await },
                rt,
            );
        }
        Ok(entry)
    }

    /// Takes over every job of the job store after winning the leadership
    /// at `epoch`: jobs that had not ended are resumed from their newest
    /// verified checkpoint; ended ones are listed. Returns how many resumed.
    pub async fn lead(&self, epoch: u64) -> Result<usize, JmError> {
        let stored = self.read_store(false).await?;
        let mut resumed = 0;
        for (spec, status) in stored {
            if self.inner.leadership.fence().is_none() {
                break;
            }
            let id = status.job.id;
            let driven = self
                .inner
                .entry(&id)
                .is_some_and(|j| j.driven() && !j.abandon.is_cancelled());
            if driven {
                continue;
            }
            let root = self.storage_root(&spec)?;
            // A standby region's store holds replicated jobs: they run
            // only in the primary region.
            // A job a switchover moved away is CANCELLED here but resumes
            // when this region is primary again.
            let passive = (status.job.state.is_terminal() && status.job.moved_to.is_none())
                || self.inner.standby().is_some();
            let opts = SubmitOptions {
                job_id: Some(id),
                from_savepoint: None,
                resume: true,
            };
            if !passive {
                tracing::info!(job = %id, name = %spec.metadata.name, epoch, state = %status.job.state, "adopting job: resuming it from its newest checkpoint");
                resumed += 1;
            }
            self.start(spec, root, opts, Some((status, passive)))?;
        }
        Ok(resumed)
    }

    /// Stops driving every job at once, writing nothing (the leadership is
    /// lost or being handed over): the next leader resumes them from their
    /// checkpoints. Returns once the drivers have let go of their tasks.
    pub async fn step_down(&self) {
        let jobs: Vec<Arc<JobEntry>> = self.inner.all();
        let mut waits = Vec::new();
        for job in jobs.into_iter().filter(|j| j.driven()) {
            job.abandon.cancel();
            let mut rx = job.running.subscribe();
            waits.push(async move {
                let _ = rx.wait_for(|r| !*r).await;
            });
        }
        let n = waits.len();
        let started = std::time::Instant::now();
        if tokio::time::timeout(
            std::time::Duration::from_secs(10),
            futures::future::join_all(waits),
        )
        .await
        .is_err()
        {
            tracing::error!("stepping down: some job drivers did not stop within 10 s");
        }
        if n > 0 {
            tracing::info!(
                jobs = n,
                ms = started.elapsed().as_millis() as u64,
                "stepped down: no longer driving any job"
            );
        }
    }

    /// Refreshes the list of jobs from the job store (standbys serve reads
    /// from it).
    pub async fn refresh_from_store(&self) -> Result<(), JmError> {
        let stored = self.read_store(true).await?;
        for (spec, status) in stored {
            let id = status.job.id;
            let existing = self.inner.entry(&id);
            match existing {
                Some(j) if j.driven() => continue,
                Some(j) => j.refresh_passive(status.job),
                None => {
                    let root = self.storage_root(&spec)?;
                    let opts = SubmitOptions {
                        job_id: Some(id),
                        ..SubmitOptions::default()
                    };
                    self.start(spec, root, opts, Some((status, true)))?;
                }
            }
        }
        Ok(())
    }

    /// Every job of the job store with its last recorded status, oldest
    /// first. Unreadable entries are skipped with a warning. With
    /// `incremental`, jobs already known to have ended are left out and the
    /// specs of known jobs are not read again (a standby refreshes often).
    async fn read_store(&self, incremental: bool) -> Result<Vec<(JobSpec, StoredStatus)>, JmError> {
        let store = self.store()?;
        let ids = job_ids(&store).await?;
        let mut out = Vec::new();
        for id in ids {
            let dir = job_dir(&id);
            let known = incremental.then(|| self.inner.entry(&id)).flatten();
            let spec = match known {
                Some(j) if j.state().is_terminal() && !j.driven() => continue,
                Some(j) => j.spec.clone(),
                None => {
                    let Some(raw_spec) = store.get_opt(&format!("{dir}/{SPEC_FILE}")).await? else {
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
            let status = match store.get_opt(&format!("{dir}/{STATUS_FILE}")).await? {
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

    /// Stops a job, optionally taking a savepoint first (returned if taken),
    /// and waits until it has stopped.
    pub async fn cancel(
        &self,
        id: &str,
        with_savepoint: bool,
    ) -> Result<(JobInfo, Option<SavepointInfo>), JmError> {
        let job = self.inner.find(id)?;
        let state = job.state();
        if state.is_terminal() {
            return Err(JmError::WrongState {
                job: job.id,
                state,
                action: "it has already ended".into(),
            });
        }
        let (tx, rx) = oneshot::channel();
        job.commands
            .send(JobCommand::Stop {
                savepoint: with_savepoint,
                reply: tx,
            })
            .map_err(|_| JmError::Runtime("the job's driver has ended".into()))?;
        let sp = rx
            .await
            .map_err(|_| JmError::Runtime("the job ended before answering".into()))??;
        self.wait(job.id).await?;
        Ok((job.info(), sp))
    }

    /// Takes a savepoint of a running job without stopping it.
    pub async fn savepoint(&self, id: &str) -> Result<SavepointInfo, JmError> {
        let job = self.inner.find(id)?;
        let state = job.state();
        if state != JobState::Running {
            return Err(JmError::WrongState {
                job: job.id,
                state,
                action: "savepoints need a RUNNING job".into(),
            });
        }
        let (tx, rx) = oneshot::channel();
        job.commands
            .send(JobCommand::Savepoint(tx))
            .map_err(|_| JmError::Runtime("the job's driver has ended".into()))?;
        rx.await.map_err(|_| {
            JmError::Runtime("the job stopped before the savepoint completed".into())
        })?
    }

    /// Completed checkpoints and savepoints of a job, newest first.
    pub async fn checkpoints(&self, id: &str) -> Result<Vec<CheckpointInfo>, JmError> {
        let job = self.inner.find(id)?;
        let mut dirs: Vec<String> = list_checkpoint_ids(&job.root, &job.id)
            .await?
            .into_iter()
            .map(|cp| ferry_core::manifest::checkpoint_dir(&job.id, cp))
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

    /// Waits until a job reaches a terminal state and returns it.
    pub async fn wait(&self, id: JobId) -> Result<JobState, JmError> {
        let job = self.inner.find(&id.to_string())?;
        let mut rx = job.state_tx.subscribe();
        let state = *rx
            .wait_for(|s| s.is_terminal())
            .await
            .map_err(|_| JmError::Runtime("job driver ended".into()))?;
        Ok(state)
    }

    /// Stops every job (with savepoints when asked) and waits for them.
    pub async fn shutdown(&self, with_savepoints: bool) {
        let jobs: Vec<Arc<JobEntry>> = self.inner.all();
        for job in jobs {
            if !job.state().is_terminal()
                && let Err(e) = self.cancel(&job.id.to_string(), with_savepoints).await
            {
                tracing::warn!(job = %job.id, "stopping the job failed: {e}");
            }
        }
        self.inner.shutdown.cancel();
        self.inner.drivers.close();
        self.inner.drivers.wait().await;
    }

    /// True once the JobManager can accept jobs.
    pub fn is_ready(&self) -> bool {
        !self.inner.shutdown.is_cancelled()
    }

    /// The newest job with this name under the default storage root whose
    /// newest verified checkpoint is not final: the run to resume.
    pub async fn find_resumable(&self, spec: &JobSpec) -> Result<Option<(JobId, u64)>, JmError> {
        let root = self.storage_root(spec)?;
        let ids = job_ids(&root).await?;
        for id in ids.into_iter().rev() {
            let Some(raw) = root
                .get_opt(&format!("{}/{SPEC_FILE}", job_dir(&id)))
                .await?
            else {
                continue;
            };
            let Ok(old) = ferry_core::spec::parse_spec(&String::from_utf8_lossy(&raw)) else {
                continue;
            };
            if old.metadata.name != spec.metadata.name {
                continue;
            }
            let choice = find_restorable(&root, &id).await?;
            return Ok(match choice.checkpoint {
                Some(cp) if !cp.manifest.finished => Some((id, cp.manifest.checkpoint_id.0)),
                _ => None,
            });
        }
        Ok(None)
    }
}
