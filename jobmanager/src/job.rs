//! One job as this JobManager holds it: its spec, its mutable status, the
//! channels its driver and the API share, and every change of its state.
//!
//! Invariant: a job's state changes only in `JobEntry::apply` (through
//! [`JobEntry::set_state`] and [`JobEntry::mirror`]): a job this instance
//! drives moves only along [`JobState::can_transition`], a mirrored job
//! takes the state the job store recorded ([`Change::Mirror`] says why), and
//! the per-state job gauge moves with every change it makes.

use std::sync::{Arc, Mutex};

use chrono::{DateTime, Utc};
use ferry_core::JobId;
use ferry_core::manifest::checkpoints_root;
use ferry_core::spec::{JobSpec, SinkSpec};
use ferry_core::storage::StorageLocation;
use ferry_core::value::format_ts;
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;

use crate::deployment::LiveCounters;

/// Where a job finds synchronous replication (set once, by the region side).
pub(crate) type SyncSlot = Arc<std::sync::OnceLock<Arc<ferry_region::SyncReplicator>>>;
use crate::error::JmError;
use crate::leadership::{Leadership, RegionFence};
use crate::metrics::{Metrics, StateLabels};
use crate::model::{CheckpointInfo, CompletedCheckpoint, JobInfo, SavepointInfo};
use crate::state::JobState;
use crate::taskmanagers::TaskManagers;

/// Requests from the API to a job's driver.
pub(crate) enum JobCommand {
    Savepoint(oneshot::Sender<Result<SavepointInfo, JmError>>),
    Stop {
        savepoint: bool,
        reply: oneshot::Sender<Result<Option<SavepointInfo>, JmError>>,
    },
    /// Move the job's tasks: stop with a savepoint, then deploy again from
    /// it (draining a TaskManager, rebalancing). `to`: the TaskManager to
    /// prefer when it has room. The reply comes once the savepoint is
    /// taken.
    Move {
        reason: String,
        to: Option<String>,
        reply: oneshot::Sender<Result<Option<SavepointInfo>, JmError>>,
    },
}

/// Where a job's remote tasks run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Placed {
    /// The first part's TaskManager.
    pub taskmanager: String,
    pub deployment: String,
    pub parts: Vec<ferry_core::api::jobs::JobPart>,
}

impl Placed {
    /// As the job store recorded it.
    fn of(job: &JobInfo) -> Option<Self> {
        Some(Self {
            taskmanager: job.taskmanager.clone()?,
            deployment: job.deployment.clone()?,
            parts: job.parts.clone(),
        })
    }

    /// From a running deployment's location; `parallelism` fills in the
    /// subtasks of a part that runs the whole job.
    pub(crate) fn from_location(l: crate::deployment::Location, parallelism: u32) -> Option<Self> {
        let parts: Vec<ferry_core::api::jobs::JobPart> = l
            .parts
            .into_iter()
            .map(|(tm, subtasks)| ferry_core::api::jobs::JobPart {
                taskmanager: tm,
                subtasks: if subtasks.is_empty() {
                    (0..parallelism.max(1)).collect()
                } else {
                    subtasks
                },
            })
            .collect();
        Some(Self {
            taskmanager: parts.first()?.taskmanager.clone(),
            deployment: l.id,
            parts,
        })
    }
}

/// Mutable status of a job.
#[derive(Debug)]
pub(crate) struct Status {
    /// Changed only by `JobEntry::apply`.
    state: JobState,
    pub(crate) restarts: u32,
    pub(crate) attempt: u32,
    /// (TaskManager, deployment id) of remote tasks.
    pub(crate) placement: Option<Placed>,
    /// See `JobInfo::moved_to`.
    pub(crate) moved_to: Option<String>,
    pub(crate) failure: Option<String>,
    pub(crate) last_checkpoint: Option<CheckpointInfo>,
    pub(crate) last_restore: Option<ferry_core::api::RestoreInfo>,
    pub(crate) ended_at: Option<DateTime<Utc>>,
}

impl Status {
    /// The status of a job being registered: CREATED with nothing done
    /// yet, or — with `prior`, the job as the store recorded it — its
    /// counts and history, and its state too when this instance only
    /// mirrors it (`passive`).
    pub(crate) fn registered(prior: Option<&JobInfo>, passive: bool) -> Self {
        Status {
            state: match prior {
                Some(p) if passive => p.state,
                _ => JobState::Created,
            },
            restarts: prior.map(|p| p.restarts).unwrap_or(0),
            attempt: prior.map(|p| p.attempt).unwrap_or(0),
            placement: prior.and_then(Placed::of),
            // Driven here again: no longer moved away.
            moved_to: if passive {
                prior.and_then(|p| p.moved_to.clone())
            } else {
                None
            },
            failure: prior.and_then(|p| p.failure.clone()),
            last_checkpoint: prior.and_then(|p| p.last_checkpoint.clone()),
            last_restore: prior.and_then(|p| p.last_restore.clone()),
            ended_at: prior.and_then(|p| p.ended_at),
        }
    }

    pub(crate) fn state(&self) -> JobState {
        self.state
    }
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
    /// Its per-state job gauge is moved only by this module.
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) leadership: Arc<Leadership>,
    pub(crate) taskmanagers: Option<Arc<TaskManagers>>,
    pub(crate) completed: tokio::sync::broadcast::Sender<CompletedCheckpoint>,
    /// Told once the job's final status is in the job store.
    pub(crate) ended: tokio::sync::broadcast::Sender<crate::model::JobEnded>,
    /// The region is being demoted: stop tasks when abandoning.
    pub(crate) demoting: Arc<std::sync::atomic::AtomicBool>,
    /// The region epoch manifests record.
    pub(crate) region_epoch: Arc<crate::leadership::RegionEpochCell>,
    /// Checked before every checkpoint commit.
    pub(crate) region_fence: Arc<RegionFence>,
    /// Synchronous replication, once the region side set it up: every
    /// checkpoint goes into the standbys' stores before it completes.
    pub(crate) sync: SyncSlot,
    /// The checkpoint the current deployment restored from (see
    /// `Manifest::restored_from`).
    pub(crate) restored_from: Mutex<Option<u64>>,
    /// Shared state files retention removed (incremental checkpoints).
    pub(crate) shared_gc: crate::checkpoint::SharedGc,
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

/// A change of a job's state, by who makes it: that decides which changes
/// are allowed.
enum Change {
    /// This instance drives the job and moves it to `to`. Only the moves
    /// [`JobState::can_transition`] lists are made; any other is refused
    /// and logged as an error. `failure` says why (RUNNING clears an old
    /// reason); moving to the state the job is in only records `failure`.
    Drive {
        to: JobState,
        failure: Option<String>,
    },
    /// This instance mirrors the job from the job store (a standby, or a
    /// job that ended before this instance led): the entry becomes a copy
    /// of the status the leader recorded, state included. The leader made
    /// only allowed moves, but a mirror samples them and can miss steps
    /// (RUNNING to CANCELLED without CANCELLING seen), and a new leader
    /// records an adopted job as CREATED until its tasks run again. So a
    /// mirror takes the store's state even where the table has no such
    /// move (logged at debug): the store is the record, and a mirror that
    /// refused would report a state no JobManager holds.
    Mirror(Box<JobInfo>),
}

impl JobEntry {
    /// Moves the job this instance drives to `to` through the state
    /// machine, updating metrics (see [`Change::Drive`]).
    pub(crate) fn set_state(&self, to: JobState, failure: Option<String>) {
        self.apply(Change::Drive { to, failure });
    }

    /// Updates a mirrored (not driven) job from the store (see
    /// [`Change::Mirror`]).
    pub(crate) fn mirror(&self, job: JobInfo) {
        self.apply(Change::Mirror(Box::new(job)));
    }

    /// The one place a job's state changes, with the per-state gauge.
    fn apply(&self, change: Change) {
        let mut st = self.status.lock().unwrap_or_else(|p| p.into_inner());
        let from = st.state;
        match change {
            Change::Drive { to, failure } => {
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
                self.count(from, -1);
                self.count(to, 1);
                tracing::info!(job = %self.id, name = %self.spec.metadata.name, from = %from, to = %to, "job state changed");
                // send_replace stores the state even when nobody is subscribed yet.
                self.state_tx.send_replace(to);
                self.touch();
            }
            Change::Mirror(job) => {
                let to = job.state;
                if from != to {
                    if !from.can_transition(to) {
                        tracing::debug!(job = %self.id, from = %from, to = %to, "mirrored job state jumps as the job store recorded it (steps in between were missed, or a new leader adopted the job)");
                    }
                    self.count(from, -1);
                    self.count(to, 1);
                }
                st.state = to;
                st.restarts = job.restarts;
                st.attempt = job.attempt;
                st.placement = Placed::of(&job);
                st.moved_to = job.moved_to.clone();
                st.failure = job.failure.clone();
                st.last_checkpoint = job.last_checkpoint.clone();
                st.ended_at = job.ended_at;
                drop(st);
                self.state_tx.send_replace(to);
                // Counters of a deployment this instance drove before it
                // stepped down are stale now: the store's figures are the
                // current ones.
                *self.live.lock().unwrap_or_else(|p| p.into_inner()) = None;
                *self.stored.lock().unwrap_or_else(|p| p.into_inner()) = Some(*job);
            }
        }
    }

    /// Counts a newly registered job in the per-state gauge.
    pub(crate) fn enter_gauge(&self) {
        self.count(self.state(), 1);
    }

    /// Takes a job whose entry was replaced out of the per-state gauge.
    pub(crate) fn leave_gauge(&self) {
        self.count(self.state(), -1);
    }

    fn count(&self, state: JobState, delta: i64) {
        self.metrics
            .jobs
            .get_or_create(&StateLabels {
                state: state.to_string(),
            })
            .inc_by(delta);
    }

    /// The region's TaskManagers, when tasks run on them.
    pub(crate) fn pool(&self) -> Option<Arc<TaskManagers>> {
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

    /// True while a driver runs this job in this process (false for jobs
    /// mirrored from the store).
    pub(crate) fn driven(&self) -> bool {
        *self.running.borrow()
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
            stored.namespace = self.spec.metadata.namespace().to_string();
            stored.state = st.state;
            stored.restarts = st.restarts;
            stored.attempt = st.attempt;
            if let Some(p) = &st.placement {
                stored.taskmanager = Some(p.taskmanager.clone());
                stored.deployment = Some(p.deployment.clone());
                stored.parts = p.parts.clone();
            }
            if st.last_checkpoint.is_some() {
                stored.last_checkpoint = st.last_checkpoint.clone();
            }
            if st.last_restore.is_some() {
                stored.last_restore = st.last_restore.clone();
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
            namespace: self.spec.metadata.namespace().to_string(),
            state: st.state,
            parallelism: self.spec.spec.parallelism,
            submitted_at: self.submitted_at,
            ended_at: st.ended_at,
            restarts: st.restarts,
            attempt: st.attempt,
            taskmanager: st.placement.as_ref().map(|p| p.taskmanager.clone()),
            deployment: st.placement.as_ref().map(|p| p.deployment.clone()),
            parts: st
                .placement
                .as_ref()
                .map(|p| p.parts.clone())
                .unwrap_or_default(),
            moved_to: st.moved_to.clone(),
            records_in: c.records_in,
            records_out: c.records_out,
            late_records: c.late_records,
            expression_errors: c.expression_errors,
            skipped_records: c.skipped_records,
            watermark: Some(c.watermark).filter(|w| *w != i64::MIN).map(format_ts),
            last_checkpoint: st.last_checkpoint.clone(),
            last_restore: st.last_restore.clone(),
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

#[cfg(test)]
mod tests {
    use super::*;

    const SPEC: &str = r#"apiVersion: ferry.dev/v1
kind: Job
metadata: {name: job-entry-test}
spec:
  parallelism: 1
  source:
    generator:
      total: 10
      eventTime: {step: 10ms}
      fields:
        user: {type: key, cardinality: 10, prefix: "u"}
  operators:
    - key_by: user
    - window: {tumbling: 1m, aggregate: {clicks: count}}
  sink:
    file: {path: "/tmp/ferry-job-entry-test"}
"#;

    /// A registered entry (counted in the gauge), driven or mirrored.
    fn entry(prior: Option<&JobInfo>, passive: bool) -> JobEntry {
        let status = Status::registered(prior, passive);
        let e = JobEntry {
            id: JobId::default(),
            spec: ferry_core::spec::parse_and_validate(SPEC).expect("test spec"),
            root: StorageLocation::open("/tmp/ferry-job-entry-test").unwrap(),
            submitted_at: Utc::now(),
            state_tx: watch::channel(status.state()).0,
            status: Mutex::new(status),
            commands: mpsc::unbounded_channel().0,
            live: Mutex::new(None),
            metrics: Arc::new(Metrics::new()),
            leadership: Leadership::embedded(),
            taskmanagers: None,
            completed: tokio::sync::broadcast::channel(1).0,
            ended: tokio::sync::broadcast::channel(1).0,
            demoting: Default::default(),
            region_epoch: Default::default(),
            region_fence: Default::default(),
            sync: Default::default(),
            restored_from: Mutex::new(None),
            shared_gc: Default::default(),
            abandon: CancellationToken::new(),
            stored: Mutex::new(prior.cloned()),
            dirty: watch::channel(0).0,
            running: watch::channel(!passive).0,
        };
        e.enter_gauge();
        e
    }

    fn gauge(e: &JobEntry, state: JobState) -> i64 {
        e.metrics
            .jobs
            .get_or_create(&StateLabels {
                state: state.to_string(),
            })
            .get()
    }

    #[test]
    fn driven_changes_follow_the_table_and_the_gauge() {
        use JobState::*;
        let e = entry(None, false);
        assert_eq!((e.state(), gauge(&e, Created)), (Created, 1));
        e.set_state(Running, None);
        assert_eq!((gauge(&e, Created), gauge(&e, Running)), (0, 1));
        // Refused: no such move in the table; nothing changes.
        e.set_state(Created, Some("no".into()));
        assert_eq!(e.state(), Running);
        assert_eq!((gauge(&e, Created), gauge(&e, Running)), (0, 1));
        assert_eq!(e.info().failure, None);
        // Same state: only the reason is recorded.
        e.set_state(Running, Some("waiting for slots".into()));
        assert_eq!(e.info().failure.as_deref(), Some("waiting for slots"));
        e.set_state(Restarting, Some("task failed".into()));
        e.set_state(Running, None);
        assert_eq!(e.info().failure, None, "RUNNING clears the reason");
        e.set_state(Finished, None);
        assert_eq!(*e.state_tx.borrow(), Finished);
        assert!(e.info().ended_at.is_some());
        assert_eq!((gauge(&e, Running), gauge(&e, Finished)), (0, 1));
        e.set_state(Running, None);
        assert_eq!(e.state(), Finished, "a terminal state has no way out");
    }

    #[test]
    fn mirrored_changes_take_the_store_state_and_keep_the_gauge() {
        use JobState::*;
        let mut stored = entry(None, false).info();
        stored.state = Running;
        let e = entry(Some(&stored), true);
        assert_eq!((e.state(), gauge(&e, Running)), (Running, 1));
        // The store went RUNNING -> CANCELLING -> CANCELLED between two
        // reads: the mirror takes CANCELLED although the table has no
        // RUNNING -> CANCELLED move.
        stored.state = Cancelled;
        stored.moved_to = Some("west".into());
        e.mirror(stored.clone());
        assert_eq!(e.state(), Cancelled);
        assert_eq!(*e.state_tx.borrow(), Cancelled);
        assert_eq!(e.info().moved_to.as_deref(), Some("west"));
        assert_eq!((gauge(&e, Running), gauge(&e, Cancelled)), (0, 1));
        // Mirroring the same state again moves no gauge.
        e.mirror(stored);
        assert_eq!(gauge(&e, Cancelled), 1);
        e.leave_gauge();
        assert_eq!(gauge(&e, Cancelled), 0);
    }
}
