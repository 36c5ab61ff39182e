//! The JobManager service: the `JobManager` handle and the state it shares
//! (the registry of jobs, the job store, leadership, metrics), and the
//! operations the REST API and `ferry local` call on jobs: submit, list,
//! get, cancel, savepoint, checkpoints, wait, shutdown. Leadership changes
//! are in `handover`, the cross-region side in `regions`; both add methods
//! to `JobManager` and import this module, which imports neither.
//!
//! Invariant: a job is registered (and its driver and status writer
//! started) only through `JobManager::start`; an earlier entry of the same
//! id that it replaces is abandoned, so its driver stops and writes nothing
//! more.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, RwLock};

use chrono::Utc;
use ferry_core::JobId;
use ferry_core::spec::JobSpec;
use ferry_core::storage::StorageLocation;
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::driver::drive;
use crate::error::JmError;
use crate::job::{JobCommand, JobEntry, Status};
use crate::leadership::{Leadership, RegionFence, RoleName};
use crate::metrics::Metrics;
pub use crate::model::{
    CheckpointInfo, CompletedCheckpoint, JobEnded, JobInfo, JobManagerConfig, RegionControl,
    RegionFailure, RegionOps, RegionResult, RegionsView, SavepointInfo, SubmitOptions,
};
use crate::state::JobState;
use crate::store::{
    PreviousRun, StoredStatus, previous_run, status_writer, write_spec, write_status,
};
use crate::taskmanagers::TaskManagers;

/// The JobManager: a cheap-to-clone handle to the jobs it drives.
#[derive(Clone)]
pub struct JobManager {
    pub(crate) inner: Arc<Inner>,
}

/// What every handle of one JobManager shares: its settings, the registry
/// of jobs, and its leadership and region state.
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
    pub(crate) taskmanagers: std::sync::OnceLock<Arc<TaskManagers>>,
    /// Jobs moving (drains, rebalancing), once the scheduler started.
    pub(crate) moves: std::sync::OnceLock<crate::scheduler::Moves>,
    drivers: TaskTracker,
    /// (this region, the primary region) when this region is a standby: it
    /// runs no job (the replicated ones wait for a promotion).
    pub(crate) standby_region: RwLock<Option<(String, String)>>,
    /// Set while this region is being demoted: abandoned jobs stop their
    /// tasks instead of leaving them to a next leader.
    pub(crate) demoting: Arc<std::sync::atomic::AtomicBool>,
    /// Held through every adoption of the job store (`lead`, `promote`,
    /// `refresh_from_store`): two at once would both find a job undriven
    /// and start it twice.
    pub(crate) adopting: tokio::sync::Mutex<()>,
    /// The TLS a standby forwards writes to the leader with, when the REST
    /// API speaks HTTPS (`tls.api`): it trusts the region's CA and presents
    /// this JobManager's certificate.
    pub(crate) forward_tls: std::sync::OnceLock<crate::api::ForwardTls>,
    /// The region epoch as last read (0 without a region lease).
    pub(crate) region_epoch: Arc<crate::leadership::RegionEpochCell>,
    /// How long this region may still commit checkpoints.
    pub(crate) region_fence: Arc<RegionFence>,
    /// Synchronous replication (`regions.replication: sync`), set once by
    /// the region side; shared by every job.
    pub(crate) sync: crate::job::SyncSlot,
    /// What `POST /v1/regions/{name}/failover` runs.
    pub(crate) region_control: std::sync::OnceLock<RegionControl>,
    /// What `/v1/regions` reports (set when replicating to other regions).
    pub(crate) regions_view: std::sync::OnceLock<RegionsView>,
    /// Announces completed checkpoints (see `subscribe_completed`).
    pub(crate) completed: tokio::sync::broadcast::Sender<CompletedCheckpoint>,
    /// Announces jobs whose final status is in the job store (see
    /// `subscribe_ended`).
    pub(crate) ended: tokio::sync::broadcast::Sender<JobEnded>,
    /// Hot standby: the jobs held loaded while this region is a standby.
    pub(crate) warm: crate::hot::Warm,
    /// Where job drivers run (the runtime the JobManager was created on).
    runtime: tokio::runtime::Handle,
}

impl Inner {
    /// (this region, primary) while this region is a standby.
    pub(crate) fn standby(&self) -> Option<(String, String)> {
        self.standby_region
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The registered job with this exact id.
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

/// Parses and validates a spec on the blocking pool, a few at a time: a
/// 4 MiB spec takes about a second of CPU, which on the async workers would
/// stall every other request (health probes included).
pub async fn parse_off_the_workers(text: &str) -> Result<JobSpec, JmError> {
    static PARSERS: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(2);
    let _permit = PARSERS.acquire().await.map_err(|_| JmError::ShuttingDown)?;
    let text = text.to_owned();
    tokio::task::spawn_blocking(move || ferry_core::spec::parse_and_validate(&text))
        .await
        .map_err(|e| JmError::Runtime(format!("parsing the spec failed: {e}")))?
        .map_err(JmError::InvalidSpec)
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
                warm: crate::hot::Warm::default(),
                runtime: tokio::runtime::Handle::current(),
                taskmanagers: std::sync::OnceLock::new(),
                moves: std::sync::OnceLock::new(),
                completed: tokio::sync::broadcast::channel(1024).0,
                ended: tokio::sync::broadcast::channel(1024).0,
                regions_view: std::sync::OnceLock::new(),
                region_control: std::sync::OnceLock::new(),
                standby_region: RwLock::new(None),
                demoting: Default::default(),
                adopting: Default::default(),
                forward_tls: std::sync::OnceLock::new(),
                region_epoch: Default::default(),
                region_fence: Default::default(),
                sync: Default::default(),
            }),
        }
    }

    /// Parses, validates and starts a job from spec text (YAML or JSON).
    pub async fn submit(&self, text: &str) -> Result<JobInfo, JmError> {
        let spec = parse_off_the_workers(text).await?;
        self.submit_spec(spec, SubmitOptions::default()).await
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
        let store = self.store()?;
        self.check_access(&spec, &id, &root, &store)?;
        write_spec(&root, &id, &spec).await?;
        if store.url() != root.url() {
            write_spec(&store, &id, &spec).await?;
        }
        let entry = self.start(spec, root, opts, None)?;
        // Durable before the client hears of it: a new leader will know it.
        write_status(&entry, &store, &self.inner.config.instance_id).await?;
        Ok(entry.info())
    }

    /// Refuses a spec that names a location its namespace may not use, or
    /// writes into the job store or another job's directories.
    fn check_access(
        &self,
        spec: &JobSpec,
        id: &JobId,
        root: &StorageLocation,
        store: &StorageLocation,
    ) -> Result<(), JmError> {
        let others: Vec<(String, String)> = self
            .inner
            .list()
            .into_iter()
            .filter(|j| j.id != *id)
            .flat_map(|j| {
                let name = j.id.to_string();
                j.output
                    .map(|o| (name.clone(), o))
                    .into_iter()
                    .chain([(name, j.checkpoint_root)])
            })
            .filter(|(_, l)| !l.is_empty())
            .collect();
        let own = root.child(&ferry_core::manifest::checkpoints_root(id));
        self.inner
            .config
            .access
            .check(spec, Some(own.url()), Some(store.url()), &others)
            .map_err(JmError::LocationNotAllowed)
    }

    /// All jobs, newest first.
    pub fn list(&self) -> Vec<JobInfo> {
        self.inner.list()
    }

    /// One job, by full id, unique id prefix, or unique name.
    pub fn get(&self, id: &str) -> Result<JobInfo, JmError> {
        self.inner.find(id).map(|j| j.info())
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
        crate::checkpoint::completed(&job).await
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
    pub async fn previous_run(&self, spec: &JobSpec) -> Result<Option<PreviousRun>, JmError> {
        let root = self.storage_root(spec)?;
        previous_run(&root, &spec.metadata.name).await
    }

    /// Prometheus metrics of this JobManager.
    pub fn metrics(&self) -> &Metrics {
        &self.inner.metrics
    }

    /// This instance's role.
    pub fn role(&self) -> RoleName {
        self.inner.leadership.role()
    }

    /// The leader as last seen (standbys forward writes to it).
    pub fn leader(&self) -> Option<ferry_ha::LeaderInfo> {
        self.inner.leadership.leader()
    }

    /// The leadership handle (HA mode wires the elector into it).
    pub fn leadership(&self) -> &Arc<Leadership> {
        &self.inner.leadership
    }

    /// Runs jobs' tasks on the region's TaskManagers instead of in this
    /// process. Set once, before jobs are submitted or adopted.
    pub fn use_taskmanagers(&self, pool: Arc<TaskManagers>) {
        let _ = self.inner.taskmanagers.set(pool);
    }

    /// Name of this instance.
    pub fn instance_id(&self) -> &str {
        &self.inner.config.instance_id
    }

    pub(crate) fn storage_root(&self, spec: &JobSpec) -> Result<StorageLocation, JmError> {
        let url = spec
            .spec
            .checkpointing
            .storage
            .clone()
            .unwrap_or_else(|| self.inner.config.data_url.clone());
        Ok(StorageLocation::open(&url)?)
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
    pub(crate) fn start(
        &self,
        spec: JobSpec,
        root: StorageLocation,
        opts: SubmitOptions,
        prior: Option<(StoredStatus, bool)>,
    ) -> Result<Arc<JobEntry>, JmError> {
        let id = opts.job_id.unwrap_or_default();
        let (tx, rx) = mpsc::unbounded_channel();
        let passive = prior.as_ref().is_some_and(|(_, p)| *p);
        let prior_job = prior.map(|(p, _)| p.job);
        let status = Status::registered(prior_job.as_ref(), passive);
        let (state_tx, _) = watch::channel(status.state());
        let (dirty, _) = watch::channel(0u64);
        let (running, _) = watch::channel(!passive);
        let entry = Arc::new(JobEntry {
            id,
            spec,
            root,
            submitted_at: prior_job
                .as_ref()
                .map(|p| p.submitted_at)
                .unwrap_or_else(Utc::now),
            status: Mutex::new(status),
            commands: tx,
            state_tx,
            live: Mutex::new(None),
            metrics: self.inner.metrics.clone(),
            leadership: self.inner.leadership.clone(),
            taskmanagers: self.inner.taskmanagers.get().cloned(),
            completed: self.inner.completed.clone(),
            ended: self.inner.ended.clone(),
            demoting: self.inner.demoting.clone(),
            region_epoch: self.inner.region_epoch.clone(),
            region_fence: self.inner.region_fence.clone(),
            sync: self.inner.sync.clone(),
            restored_from: Mutex::new(None),
            shared_gc: Default::default(),
            abandon: CancellationToken::new(),
            stored: Mutex::new(prior_job),
            dirty,
            running,
        });
        // Counted before anyone else can change its state.
        entry.enter_gauge();
        let old = self
            .inner
            .jobs
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id, entry.clone());
        if let Some(old) = old {
            old.abandon.cancel();
            old.leave_gauge();
        }
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
}
