//! The job registry: every job this JobManager drives, its status, and the
//! public operations on it (submit, get, cancel, savepoint, checkpoints,
//! wait, shutdown).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, RwLock};

use chrono::{DateTime, Utc};
use ferry_core::JobId;
use ferry_core::manifest::{
    MANIFEST_FILE, Manifest, checkpoints_root, find_restorable, job_dir, list_checkpoint_ids,
};
use ferry_core::spec::{JobSpec, SinkSpec};
use ferry_core::storage::StorageLocation;
use ferry_core::value::format_ts;
use ferry_taskmanager::metrics::TaskMetrics;
use ferry_taskmanager::protocol::TaskId;
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::coordinator::{JobCommand, drive};
use crate::error::JmError;
use crate::metrics::{Metrics, StateLabels};
use crate::service::{
    CheckpointInfo, JobInfo, JobManager, JobManagerConfig, SavepointInfo, SubmitOptions,
};
use crate::state::JobState;

/// Name of the spec file in a job's directory.
pub const SPEC_FILE: &str = "spec.yaml";

pub(crate) struct Inner {
    pub(crate) config: JobManagerConfig,
    pub(crate) metrics: Arc<Metrics>,
    jobs: RwLock<BTreeMap<JobId, Arc<JobEntry>>>,
    pub(crate) shutdown: CancellationToken,
    drivers: TaskTracker,
}

/// The task counters of a deployment, shared with the task loops.
pub(crate) type LiveCounters = Arc<Vec<(TaskId, Arc<TaskMetrics>)>>;

/// Mutable status of a job.
#[derive(Debug)]
pub(crate) struct Status {
    pub(crate) state: JobState,
    pub(crate) restarts: u32,
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
    pub(crate) live: Mutex<LiveCounters>,
    metrics: Arc<Metrics>,
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
    }

    pub(crate) fn state(&self) -> JobState {
        self.status.lock().unwrap_or_else(|p| p.into_inner()).state
    }

    /// Current summary.
    pub(crate) fn info(&self) -> JobInfo {
        let live = self.live.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let sum = |f: &dyn Fn(&TaskMetrics) -> u64| live.iter().map(|(_, m)| f(m)).sum::<u64>();
        use std::sync::atomic::Ordering::Relaxed;
        let last_stage = live.iter().map(|(t, _)| t.stage).max().unwrap_or(0);
        let wm = live
            .iter()
            .filter(|(t, _)| t.stage == last_stage)
            .map(|(_, m)| m.watermark.load(Relaxed))
            .min();
        let st = self.status.lock().unwrap_or_else(|p| p.into_inner());
        JobInfo {
            id: self.id,
            name: self.spec.metadata.name.clone(),
            state: st.state,
            parallelism: self.spec.spec.parallelism,
            submitted_at: self.submitted_at,
            ended_at: st.ended_at,
            restarts: st.restarts,
            records_in: sum(&|m| m.records_in.load(Relaxed)),
            records_out: sum(&|m| m.records_out.load(Relaxed)),
            late_records: sum(&|m| m.late_records.load(Relaxed)),
            expression_errors: sum(&|m| m.expr_errors.load(Relaxed)),
            skipped_records: sum(&|m| m.skipped_records.load(Relaxed)),
            watermark: wm.filter(|w| *w != i64::MIN).map(format_ts),
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

fn checkpoint_info(m: &Manifest, url: &str) -> CheckpointInfo {
    CheckpointInfo {
        id: m.checkpoint_id.0,
        kind: match m.kind {
            ferry_core::manifest::SnapshotKind::Checkpoint => "checkpoint".into(),
            ferry_core::manifest::SnapshotKind::Savepoint => "savepoint".into(),
        },
        completed_at: m.created_at,
        duration_ms: m.duration_ms,
        size_bytes: m.total_size(),
        watermark: (m.watermark != i64::MIN).then(|| format_ts(m.watermark)),
        records_in: m.records_in,
        records_out: m.records_out,
        path: url.to_string(),
        finished: m.finished,
    }
}

pub(crate) fn manifest_info(m: &Manifest, dir: &StorageLocation) -> CheckpointInfo {
    checkpoint_info(m, dir.url())
}

impl Inner {
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
    /// Creates a JobManager with no jobs.
    pub fn new(config: JobManagerConfig) -> Self {
        Self {
            inner: Arc::new(Inner {
                config,
                metrics: Arc::new(Metrics::new()),
                jobs: RwLock::new(BTreeMap::new()),
                shutdown: CancellationToken::new(),
                drivers: TaskTracker::new(),
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
    #[tracing::instrument(skip_all, fields(job = %spec.metadata.name))]
    pub async fn submit_spec(
        &self,
        spec: JobSpec,
        opts: SubmitOptions,
    ) -> Result<JobInfo, JmError> {
        if self.inner.shutdown.is_cancelled() {
            return Err(JmError::ShuttingDown);
        }
        let root = self.storage_root(&spec)?;
        let id = opts.job_id.unwrap_or_default();
        root.put(
            &format!("{}/{SPEC_FILE}", job_dir(&id)),
            bytes::Bytes::from(spec.to_yaml()),
        )
        .await?;
        let (tx, rx) = mpsc::unbounded_channel();
        let (state_tx, _) = watch::channel(JobState::Created);
        let entry = Arc::new(JobEntry {
            id,
            spec,
            root,
            submitted_at: Utc::now(),
            status: Mutex::new(Status {
                state: JobState::Created,
                restarts: 0,
                failure: None,
                last_checkpoint: None,
                ended_at: None,
            }),
            commands: tx,
            state_tx,
            live: Mutex::new(Arc::new(Vec::new())),
            metrics: self.inner.metrics.clone(),
        });
        self.inner
            .metrics
            .jobs
            .get_or_create(&StateLabels {
                state: JobState::Created.to_string(),
            })
            .inc();
        self.inner
            .jobs
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id, entry.clone());
        tracing::info!(job = %id, "job submitted");
        let shutdown = self.inner.shutdown.clone();
        let metrics = self.inner.metrics.clone();
        let driven = entry.clone();
        self.inner
            .drivers
            .spawn(async move { drive(driven, rx, opts, metrics, shutdown).await });
        Ok(entry.info())
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
        let sp_root = format!("{}/savepoints", job_dir(&job.id));
        for name in job.root.list_dirs(&sp_root).await? {
            dirs.push(format!("{sp_root}/{name}"));
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
        let jobs: Vec<Arc<JobEntry>> = self
            .inner
            .jobs
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect();
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
        let mut ids: Vec<JobId> = root
            .list_dirs("jobs")
            .await?
            .iter()
            .filter_map(|d| d.parse().ok())
            .collect();
        ids.sort();
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
