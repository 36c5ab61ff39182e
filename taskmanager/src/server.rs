//! The TaskManager process's core: its task slots, the deployments it runs
//! and the gRPC service (`ferry.v1.TaskManager`) the leading JobManager
//! drives them through.
//!
//! Invariants:
//! - every command carries the sender's fencing epoch; an epoch older than
//!   the newest this TaskManager has seen is rejected (`FAILED_PRECONDITION`),
//!   so a deposed leader can neither trigger nor commit checkpoints here;
//! - with an epoch check ([`TaskManager::confirm_epochs_with`], what a
//!   region's TaskManager has) a newer epoch is believed only once the
//!   region's leader lease shows it: a client that never won the lease
//!   cannot push a made-up epoch and lock the real leader out
//!   (`PERMISSION_DENIED`);
//! - a deployment's tasks keep running when its JobManager goes away; a new
//!   leader attaches, reads every deployment's progress from the
//!   registration and adopts them without a restart;
//! - each task event is either part of the registration an attaching
//!   JobManager receives or sent on its stream afterwards, never lost in
//!   between (both happen under one lock);
//! - with cross-region coordination, tasks run only while the region fence
//!   the leader renews ([`TaskManager::watch_fence`]) holds: when it runs
//!   out — the JobManager frozen or cut off, the region no longer primary —
//!   every deployment stops here on its own, before a standby region may
//!   take over; and a deployment of an older region epoch than one seen is
//!   never started, and stopped when a newer one is confirmed;
//! - a hot standby's held deployment (`hold`) has its operator state loaded
//!   and nothing else: no task runs, no source is open, no sink writes,
//!   and no region fence or epoch applies to it until `Release` starts it
//!   under the region epoch that made this region primary.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use ferry_core::manifest::read_verified;
use ferry_core::proto::{self, task_manager_server};
use ferry_core::{CheckpointId, JmEpoch, JobId, RegionEpoch};
use futures::Stream;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::{Request, Response, Status};

use crate::link::Exchange;
use crate::metrics::TaskMetrics;
use crate::protocol::{Barrier, TaskCommand, TaskEvent, TaskId};
use crate::runtime::{
    Counters, DeployedJob, JobPlan, Part, Prepared, deploy_part, deploy_prepared, prepare,
};
use crate::wire::{event_to_proto, kind_from_proto};

/// How often a running deployment's counters are sent to the JobManager
/// (only when they changed).
const COUNTERS_INTERVAL: Duration = Duration::from_secs(1);

type EventTx = mpsc::UnboundedSender<Result<proto::TmEvent, Status>>;

/// Counters of this TaskManager, exported by its `/metrics`.
#[derive(Debug, Default)]
pub struct TmStats {
    /// Deployments started (a restart of a job is a new deployment; an
    /// adoption by a new leader is not).
    pub deployments_started: AtomicU64,
    /// Tasks started.
    pub tasks_started: AtomicU64,
    /// Commands rejected for carrying an older epoch.
    pub stale_commands: AtomicU64,
    /// JobManager attachments accepted.
    pub attachments: AtomicU64,
    /// Deployments stopped because the region fence ran out or a newer
    /// region epoch was confirmed.
    pub fenced_stops: AtomicU64,
    /// Commands refused because their epoch was above the region's
    /// leader lease (not a leader's).
    pub unconfirmed_epochs: AtomicU64,
}

/// Reads the epoch of the region's leader lease now (`None`: no one holds
/// it). A read may be stale, never ahead: an epoch at or below what it
/// returns was granted by the lease.
pub type EpochCheck = Arc<
    dyn Fn() -> futures::future::BoxFuture<'static, Result<Option<JmEpoch>, String>> + Send + Sync,
>;

/// Lease reads before an epoch above the lease's is refused (a read from a
/// lagging replica can trail a just-won lease), and the pause between them.
const EPOCH_CHECK_READS: u32 = 4;
const EPOCH_CHECK_PAUSE: Duration = Duration::from_millis(250);
/// One lease read longer than this counts as failed.
const EPOCH_CHECK_TIMEOUT: Duration = Duration::from_secs(2);

/// A TaskManager: slots and deployments. Cheap to clone.
#[derive(Clone)]
pub struct TaskManager {
    inner: Arc<Inner>,
}

struct Inner {
    id: String,
    slots: u32,
    started_at: DateTime<Utc>,
    shared: Mutex<Shared>,
    stats: TmStats,
    tasks: TaskTracker,
    shutdown: CancellationToken,
    /// Wakes [`TaskManager::watch_fence`] when `fence_until` changed.
    fence_changed: tokio::sync::Notify,
    /// Confirms a newer epoch against the region's leader lease.
    epoch_check: std::sync::OnceLock<EpochCheck>,
    /// The highest lease epoch a check has seen: epochs up to it need no
    /// new read.
    confirmed: AtomicU64,
    /// The exchange port's service, for parts of jobs spread over
    /// TaskManagers (none: this TaskManager runs only whole jobs).
    exchange: std::sync::OnceLock<Exchange>,
    /// Wakes [`TaskManager::wait_drained`] when a deployment ended.
    deployments_changed: tokio::sync::Notify,
}

#[derive(Default)]
struct Shared {
    /// Newest JobManager epoch seen.
    epoch: JmEpoch,
    /// Newest region epoch a deployment, fence renewal or commit carried.
    region_epoch: RegionEpoch,
    /// Until when the region fence holds (`None`: no region fence yet, or
    /// it ran out and every deployment was stopped).
    fence_until: Option<std::time::Instant>,
    /// The attached JobManager's event stream.
    attached: Option<EventTx>,
    deployments: HashMap<String, Running>,
    /// A hot standby's held deployments, by deployment id.
    held: HashMap<String, Held>,
    /// Slots promised to deployments still starting.
    reserved: u32,
    /// Draining: the leader moves its jobs elsewhere and places nothing
    /// new here.
    draining: bool,
}

/// A held deployment: state loaded, nothing started.
struct Held {
    status: proto::DeploymentStatus,
    plan: JobPlan,
    job: JobId,
    prepared: Prepared,
}

/// Drops a held deployment's state off the async workers (it may be
/// gigabytes).
fn drop_held(held: Held) {
    tokio::task::spawn_blocking(move || drop(held));
}

struct Running {
    status: proto::DeploymentStatus,
    metrics: Vec<(TaskId, Arc<TaskMetrics>)>,
    sources: Vec<mpsc::UnboundedSender<TaskCommand>>,
    all: Vec<mpsc::UnboundedSender<TaskCommand>>,
    cancel: CancellationToken,
    tasks: TaskTracker,
}

impl Shared {
    /// Accepts `epoch` if it is not older than the newest seen; a newer one
    /// ends the older JobManager's attachment.
    fn check_epoch(&mut self, epoch: JmEpoch, stats: &TmStats) -> Result<(), Status> {
        if epoch < self.epoch {
            stats.stale_commands.fetch_add(1, Ordering::Relaxed);
            return Err(Status::failed_precondition(format!(
                "stale epoch {epoch}: this TaskManager follows the leader at epoch {}",
                self.epoch
            )));
        }
        if epoch > self.epoch {
            self.epoch = epoch;
            self.attached = None;
        }
        Ok(())
    }

    fn used_slots(&self) -> u32 {
        self.reserved
            + self
                .deployments
                .values()
                .map(|d| d.status.slots)
                .sum::<u32>()
            + self.held.values().map(|h| h.status.slots).sum::<u32>()
    }

    fn send(&mut self, event: proto::tm_event::Event) {
        if let Some(tx) = &self.attached
            && tx.send(Ok(proto::TmEvent { event: Some(event) })).is_err()
        {
            self.attached = None;
        }
    }

    /// Takes the deployments `stale` selects out (their tasks are stopped
    /// by the caller) and tells the attached JobManager each one failed.
    fn take_fenced(
        &mut self,
        stale: impl Fn(&Running) -> bool,
        why: &str,
    ) -> Vec<(String, Running)> {
        let ids: Vec<String> = self
            .deployments
            .iter()
            .filter(|(_, d)| stale(d))
            .map(|(id, _)| id.clone())
            .collect();
        let mut out = Vec::new();
        for id in ids {
            if let Some(d) = self.deployments.remove(&id) {
                self.send(proto::tm_event::Event::Deployment(proto::DeploymentEvent {
                    deployment: id.clone(),
                    event: Some(proto::deployment_event::Event::Failed(proto::TaskFailure {
                        task: None,
                        message: why.to_string(),
                        permanent: false,
                    })),
                }));
                out.push((id, d));
            }
        }
        out
    }

    /// Accepts `epoch` for `what` if it is not older than the newest region
    /// epoch seen here. A newer one becomes the newest, and the deployments
    /// of older ones are taken out (the caller stops their tasks): their
    /// region lost the primary role.
    fn check_region_epoch(
        &mut self,
        epoch: RegionEpoch,
        what: &str,
        stats: &TmStats,
    ) -> Result<Vec<(String, Running)>, Status> {
        if epoch < self.region_epoch {
            stats.stale_commands.fetch_add(1, Ordering::Relaxed);
            return Err(Status::failed_precondition(format!(
                "{what} refused: region epoch {epoch} is older than region epoch {} seen here (the sender's region lost the primary role)",
                self.region_epoch
            )));
        }
        if epoch == self.region_epoch {
            return Ok(Vec::new());
        }
        self.region_epoch = epoch;
        Ok(self.take_fenced(
            |d| RegionEpoch(d.status.region_epoch) < epoch,
            "a newer region epoch was confirmed: this deployment belongs to a region that lost the primary role",
        ))
    }

    fn deployment(&mut self, id: &str) -> Result<&mut Running, Status> {
        self.deployments
            .get_mut(id)
            .ok_or_else(|| Status::not_found(format!("no deployment '{id}' on this TaskManager")))
    }
}

impl TaskManager {
    pub fn new(id: impl Into<String>, slots: u32) -> Self {
        Self {
            inner: Arc::new(Inner {
                id: id.into(),
                slots,
                started_at: Utc::now(),
                shared: Mutex::new(Shared::default()),
                stats: TmStats::default(),
                tasks: TaskTracker::new(),
                shutdown: CancellationToken::new(),
                fence_changed: tokio::sync::Notify::new(),
                epoch_check: std::sync::OnceLock::new(),
                confirmed: AtomicU64::new(0),
                exchange: std::sync::OnceLock::new(),
                deployments_changed: tokio::sync::Notify::new(),
            }),
        }
    }

    /// From now on, an epoch newer than any seen here is believed only
    /// once `check` (the region's leader lease) shows it. Set once, before
    /// the gRPC service takes commands; later calls change nothing.
    pub fn confirm_epochs_with(&self, check: EpochCheck) {
        let _ = self.inner.epoch_check.set(check);
    }

    /// Starts (or ends) draining: the attached leader hears it at once,
    /// and a new leader from the registration. Returns whether it changed.
    pub fn set_draining(&self, on: bool) -> bool {
        let mut s = self.lock();
        if s.draining == on {
            return false;
        }
        s.draining = on;
        s.send(proto::tm_event::Event::Drain(proto::DrainState {
            draining: on,
        }));
        drop(s);
        if on {
            tracing::info!("draining: the leader moves this TaskManager's jobs elsewhere");
        } else {
            tracing::info!("no longer draining");
        }
        true
    }

    /// Whether it is draining.
    pub fn draining(&self) -> bool {
        self.lock().draining
    }

    /// Waits until no deployment runs here (drained), up to `limit`;
    /// returns the deployments still running.
    pub async fn wait_drained(&self, limit: Duration) -> usize {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let changed = self.inner.deployments_changed.notified();
            let left = self.lock().deployments.len();
            if left == 0 {
                return 0;
            }
            if tokio::time::timeout_at(deadline, changed).await.is_err() {
                return self.lock().deployments.len();
            }
        }
    }

    /// Gives this TaskManager its exchange (set once, before the gRPC
    /// service takes commands): from then on it runs parts of jobs spread
    /// over TaskManagers.
    pub fn set_exchange(&self, exchange: Exchange) {
        let _ = self.inner.exchange.set(exchange);
    }

    /// The exchange, if set.
    pub fn exchange(&self) -> Option<&Exchange> {
        self.inner.exchange.get()
    }

    /// Lets `epoch` through if it is not newer than the newest seen here,
    /// or if the region's leader lease shows it (or a later one). Stale
    /// epochs are refused afterwards by `check_epoch`, as without a check.
    async fn admit_epoch(&self, epoch: JmEpoch) -> Result<(), Status> {
        let Some(check) = self.inner.epoch_check.get() else {
            return Ok(());
        };
        if epoch <= self.lock().epoch || epoch.0 <= self.inner.confirmed.load(Ordering::Relaxed) {
            return Ok(());
        }
        let mut seen = None;
        let mut last_err = None;
        for i in 0..EPOCH_CHECK_READS {
            if i > 0 {
                tokio::time::sleep(EPOCH_CHECK_PAUSE).await;
            }
            match tokio::time::timeout(EPOCH_CHECK_TIMEOUT, check()).await {
                Ok(Ok(lease)) => {
                    if let Some(l) = lease {
                        self.inner.confirmed.fetch_max(l.0, Ordering::Relaxed);
                        if l >= epoch {
                            return Ok(());
                        }
                    }
                    seen = Some(lease);
                }
                Ok(Err(e)) => last_err = Some(e),
                Err(_) => last_err = Some(format!("no answer within {EPOCH_CHECK_TIMEOUT:?}")),
            }
        }
        match seen {
            Some(lease) => {
                self.inner
                    .stats
                    .unconfirmed_epochs
                    .fetch_add(1, Ordering::Relaxed);
                let lease =
                    lease.map_or_else(|| "held by no one".to_string(), |l| format!("at epoch {l}"));
                tracing::warn!(%epoch, "refused a command whose epoch the region's leader lease does not show (lease {lease})");
                Err(Status::permission_denied(format!(
                    "epoch {epoch} refused: the region's leader lease is {lease}; only the JobManager that won the lease can take this TaskManager over at a new epoch"
                )))
            }
            None => Err(Status::unavailable(format!(
                "epoch {epoch} not confirmed: cannot read the region's leader lease ({}); retry",
                last_err.unwrap_or_default()
            ))),
        }
    }

    pub fn id(&self) -> &str {
        &self.inner.id
    }

    pub fn slots(&self) -> u32 {
        self.inner.slots
    }

    pub fn stats(&self) -> &TmStats {
        &self.inner.stats
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Shared> {
        self.inner.shared.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// (slots in use, running deployments, running tasks, newest epoch,
    /// a JobManager attached).
    pub fn usage(&self) -> (u32, usize, u32, u64, bool) {
        let s = self.lock();
        let tasks = s
            .deployments
            .values()
            .filter(|d| d.status.failure.is_none())
            .map(|d| d.status.tasks - d.status.stopped.len() as u32)
            .sum();
        (
            s.used_slots(),
            s.deployments.len(),
            tasks,
            s.epoch.0,
            s.attached.is_some(),
        )
    }

    /// Every running task's metrics, with its job id.
    pub fn task_metrics(&self) -> Vec<(String, TaskId, Arc<TaskMetrics>)> {
        let s = self.lock();
        s.deployments
            .values()
            .flat_map(|d| {
                d.metrics
                    .iter()
                    .map(|(t, m)| (d.status.job_id.clone(), *t, m.clone()))
            })
            .collect()
    }

    /// How long the region fence still holds (`None`: no fence).
    pub fn fence_remaining(&self) -> Option<Duration> {
        self.lock()
            .fence_until
            .map(|u| u.saturating_duration_since(std::time::Instant::now()))
    }

    /// Stops every deployment once the region fence runs out, until
    /// `stop`: a TaskManager whose leader cannot confirm the region lease
    /// (frozen, cut off, or no longer primary) runs no task. Sleeps until
    /// the fence's deadline (woken when a renewal moves it), so a
    /// TaskManager without a region fence does no work here.
    pub async fn watch_fence(self, stop: CancellationToken) {
        loop {
            let until = self.lock().fence_until;
            let runs_out = async move {
                match until {
                    Some(u) => tokio::time::sleep_until(u.into()).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = self.inner.fence_changed.notified() => continue,
                _ = runs_out => {}
            }
            let stopped = {
                let mut s = self.lock();
                match s.fence_until {
                    Some(until) if std::time::Instant::now() >= until => {
                        s.fence_until = None;
                        s.take_fenced(
                            |_| true,
                            "the region fence ran out: the leading JobManager did not confirm the region lease in time (frozen, cut off from the global KV, or the region is no longer primary)",
                        )
                    }
                    _ => Vec::new(),
                }
            };
            self.stop_fenced(stopped, "the region fence ran out").await;
        }
    }

    async fn stop_fenced(&self, stopped: Vec<(String, Running)>, why: &str) {
        if !stopped.is_empty() {
            self.inner.deployments_changed.notify_waiters();
        }
        for (id, d) in stopped {
            tracing::error!(deployment = %id, job = %d.status.job_id, "{why}: stopping every task of the deployment");
            self.inner
                .stats
                .fenced_stops
                .fetch_add(1, Ordering::Relaxed);
            stop_tasks(d.cancel, d.tasks).await;
        }
    }

    /// The gRPC service.
    pub fn service(&self) -> task_manager_server::TaskManagerServer<Self> {
        task_manager_server::TaskManagerServer::new(self.clone())
    }

    /// Stops every task (the process is ending) and waits for them.
    pub async fn shutdown(&self) {
        self.inner.shutdown.cancel();
        let running: Vec<(CancellationToken, TaskTracker)> = self
            .lock()
            .deployments
            .drain()
            .map(|(_, d)| (d.cancel, d.tasks))
            .collect();
        for (cancel, tasks) in running {
            stop_tasks(cancel, tasks).await;
        }
        self.inner.tasks.close();
        self.inner.tasks.wait().await;
    }

    fn registration(&self, s: &Shared) -> proto::Registration {
        let mut deployments: Vec<proto::DeploymentStatus> = s
            .deployments
            .values()
            .map(|d| d.status.clone())
            .chain(s.held.values().map(|h| h.status.clone()))
            .collect();
        deployments.sort_by(|a, b| a.deployment.cmp(&b.deployment));
        proto::Registration {
            taskmanager: self.inner.id.clone(),
            slots: self.inner.slots,
            deployments,
            started_at: self.inner.started_at.to_rfc3339(),
            draining: s.draining,
        }
    }

    /// Forwards one deployment's task events (and changed counters) to the
    /// attached JobManager, recording them in its status on the way.
    fn spawn_pump(&self, deployment: String, mut deployed: DeployedJob) {
        let this = self.clone();
        let mut events = std::mem::replace(&mut deployed.events, mpsc::unbounded_channel().1);
        let metrics = deployed.metrics.clone();
        let stop = deployed.cancel.clone();
        self.inner.tasks.spawn(async move {
            let mut tick = tokio::time::interval(COUNTERS_INTERVAL);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut last = Counters::default();
            let mut blocked: Vec<u64> = vec![0; metrics.len()];
            let mut sampled = std::time::Instant::now();
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    ev = events.recv() => {
                        let Some(ev) = ev else { return };
                        // Counters first, so they are final when a task
                        // reports that it stopped.
                        let now = Counters::of(&metrics);
                        let fresh = !matches!(ev, TaskEvent::Ack(_)) && now != last;
                        let mut s = this.lock();
                        let Some(d) = s.deployments.get_mut(&deployment) else { return };
                        if fresh {
                            last = now;
                            d.status.counters = Some(now.into());
                        }
                        match &ev {
                            TaskEvent::SourceEnded(t) => d.status.sources_ended.push((*t).into()),
                            TaskEvent::Stopped(t) => d.status.stopped.push((*t).into()),
                            TaskEvent::Failed { task, error } => {
                                tracing::warn!(deployment = %deployment, %task, "task failed: {error}");
                                d.status.failure = Some(proto::TaskFailure {
                                    task: Some((*task).into()),
                                    ..proto::TaskFailure::from(error)
                                });
                            }
                            TaskEvent::Ack(_) | TaskEvent::Declined { .. } => {}
                        }
                        if fresh {
                            s.send(proto::tm_event::Event::Deployment(proto::DeploymentEvent {
                                deployment: deployment.clone(),
                                event: Some(proto::deployment_event::Event::Counters(now.into())),
                            }));
                        }
                        s.send(proto::tm_event::Event::Deployment(proto::DeploymentEvent {
                            deployment: deployment.clone(),
                            event: Some(event_to_proto(&ev)),
                        }));
                    }
                    _ = tick.tick() => {
                        // Each task's backpressure over the last tick.
                        let span = sampled.elapsed().as_nanos().max(1) as u64;
                        sampled = std::time::Instant::now();
                        for ((_, m), prev) in metrics.iter().zip(blocked.iter_mut()) {
                            let total = m.backpressure_ns.load(Ordering::Relaxed);
                            let permille = (total.saturating_sub(*prev).saturating_mul(1000) / span).min(1000);
                            m.backpressure_permille.store(permille, Ordering::Relaxed);
                            *prev = total;
                        }
                        let now = Counters::of(&metrics);
                        if now == last {
                            continue;
                        }
                        last = now;
                        let mut s = this.lock();
                        let Some(d) = s.deployments.get_mut(&deployment) else { return };
                        d.status.counters = Some(now.into());
                        s.send(proto::tm_event::Event::Deployment(proto::DeploymentEvent {
                            deployment: deployment.clone(),
                            event: Some(proto::deployment_event::Event::Counters(now.into())),
                        }));
                    }
                }
            }
        });
    }
}

/// Stops a deployment's tasks and waits for them.
async fn stop_tasks(cancel: CancellationToken, tasks: TaskTracker) {
    cancel.cancel();
    tasks.close();
    tasks.wait().await;
}

type EventStream = Pin<Box<dyn Stream<Item = Result<proto::TmEvent, Status>> + Send>>;

#[tonic::async_trait]
impl task_manager_server::TaskManager for TaskManager {
    type AttachStream = EventStream;

    async fn attach(
        &self,
        req: Request<proto::AttachRequest>,
    ) -> Result<Response<Self::AttachStream>, Status> {
        let req = req.into_inner();
        self.admit_epoch(JmEpoch(req.epoch)).await?;
        let (tx, rx) = mpsc::unbounded_channel();
        let mut s = self.lock();
        s.check_epoch(JmEpoch(req.epoch), &self.inner.stats)?;
        let reg = self.registration(&s);
        tracing::info!(
            jobmanager = %req.jobmanager,
            epoch = req.epoch,
            deployments = reg.deployments.len(),
            "JobManager attached"
        );
        let _ = tx.send(Ok(proto::TmEvent {
            event: Some(proto::tm_event::Event::Registration(reg)),
        }));
        s.attached = Some(tx);
        self.inner.stats.attachments.fetch_add(1, Ordering::Relaxed);
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::UnboundedReceiverStream::new(rx),
        )))
    }

    async fn deploy(
        &self,
        req: Request<proto::DeployRequest>,
    ) -> Result<Response<proto::DeployReply>, Status> {
        let req = req.into_inner();
        self.admit_epoch(JmEpoch(req.epoch)).await?;
        let spec = ferry_core::spec::parse_and_validate(&req.spec).map_err(|issues| {
            Status::invalid_argument(format!("the job spec is invalid:\n{issues}"))
        })?;
        let plan = JobPlan::new(&spec).map_err(Status::invalid_argument)?;
        let job: JobId = req
            .job_id
            .parse()
            .map_err(|e| Status::invalid_argument(format!("job id '{}': {e}", req.job_id)))?;
        if req.hold {
            return self.deploy_held(req, plan, job).await.map(Response::new);
        }
        let part = if req.subtasks.is_empty() {
            None
        } else {
            let exchange = self.inner.exchange.get().cloned().ok_or_else(|| {
                Status::failed_precondition(format!(
                    "TaskManager {} has no exchange port: it runs only whole jobs",
                    self.inner.id
                ))
            })?;
            let part = Part {
                group: if req.group.is_empty() {
                    req.deployment.clone()
                } else {
                    req.group.clone()
                },
                local: req.subtasks.clone(),
                homes: req.exchange_urls.clone(),
                exchange,
            };
            part.check(plan.parallelism).map_err(|e| {
                Status::invalid_argument(format!("the deployment's part is inconsistent: {e}"))
            })?;
            Some(part)
        };
        let need = part
            .as_ref()
            .map_or(plan.parallelism, |p| p.local.len() as u32);
        let older = {
            let mut s = self.lock();
            s.check_epoch(JmEpoch(req.epoch), &self.inner.stats)?;
            let older = s.check_region_epoch(
                RegionEpoch(req.region_epoch),
                "deployment",
                &self.inner.stats,
            )?;
            self.extend_fence(&mut s, req.fence_ms);
            older
        };
        self.stop_fenced(older, "a newer region epoch was confirmed")
            .await;
        {
            let mut s = self.lock();
            if let Some(d) = s.deployments.get(&req.deployment) {
                // A retried request: the deployment already runs.
                return Ok(Response::new(proto::DeployReply {
                    tasks: d.status.tasks,
                    sources: d.status.sources,
                    counters: d.status.counters,
                    state_bytes: 0,
                    memory_bytes: 0,
                }));
            }
            let free = self.inner.slots.saturating_sub(s.used_slots());
            if free < need {
                return Err(Status::resource_exhausted(format!(
                    "TaskManager {} has {free} free slots of {}; the job needs {need}",
                    self.inner.id, self.inner.slots
                )));
            }
            s.reserved += need;
        }
        let started = self.start(&req, &plan, &job, part.as_ref()).await;
        let deployed = {
            let mut s = self.lock();
            s.reserved -= need;
            started?
        };
        let counters = deployed.counters();
        let status = proto::DeploymentStatus {
            deployment: req.deployment.clone(),
            job_id: req.job_id.clone(),
            attempt: req.attempt,
            epoch: req.epoch,
            slots: need,
            tasks: deployed.all.len() as u32,
            sources: deployed.sources.len() as u32,
            last_barrier: 0,
            last_completed: 0,
            sources_ended: Vec::new(),
            stopped: Vec::new(),
            failure: None,
            counters: Some(counters.into()),
            region_epoch: req.region_epoch,
            parallelism: plan.parallelism,
            subtasks: req.subtasks.clone(),
            group: req.group.clone(),
            held: false,
            state_bytes: 0,
            memory_bytes: 0,
        };
        let reply = proto::DeployReply {
            tasks: status.tasks,
            sources: status.sources,
            counters: status.counters,
            state_bytes: 0,
            memory_bytes: 0,
        };
        self.admit_started(&req.deployment, status, &deployed, "deploying")
            .await?;
        self.inner
            .stats
            .tasks_started
            .fetch_add(reply.tasks as u64, Ordering::Relaxed);
        tracing::info!(
            deployment = %req.deployment,
            job = %job,
            attempt = req.attempt,
            tasks = reply.tasks,
            restored = !req.restore_from.is_empty(),
            "deployment started"
        );
        self.spawn_pump(req.deployment, deployed);
        Ok(Response::new(reply))
    }

    async fn trigger(
        &self,
        req: Request<proto::TriggerRequest>,
    ) -> Result<Response<proto::Ack>, Status> {
        let req = req.into_inner();
        self.admit_epoch(JmEpoch(req.epoch)).await?;
        let dir = ferry_core::manifest::open_snapshot_dir(&req.dir)
            .map_err(|e| Status::invalid_argument(format!("checkpoint dir: {e}")))?;
        let mut s = self.lock();
        s.check_epoch(JmEpoch(req.epoch), &self.inner.stats)?;
        let d = s.deployment(&req.deployment)?;
        if req.checkpoint <= d.status.last_barrier {
            return Err(Status::failed_precondition(format!(
                "checkpoint {} is not above the last barrier {} of this deployment",
                req.checkpoint, d.status.last_barrier
            )));
        }
        d.status.last_barrier = req.checkpoint;
        let barrier = Barrier {
            id: CheckpointId(req.checkpoint),
            kind: kind_from_proto(req.kind),
            close_txn: req.close_txn,
            stop: req.stop,
            dir,
        };
        for t in &d.sources {
            let _ = t.send(TaskCommand::Trigger(barrier.clone()));
        }
        Ok(Response::new(proto::Ack {}))
    }

    async fn complete(
        &self,
        req: Request<proto::CompleteRequest>,
    ) -> Result<Response<proto::Ack>, Status> {
        let req = req.into_inner();
        self.admit_epoch(JmEpoch(req.epoch)).await?;
        let (older, found) = {
            let mut s = self.lock();
            s.check_epoch(JmEpoch(req.epoch), &self.inner.stats)?;
            // A commit of an older region epoch: that region has lost the
            // primary role since; its sinks must not commit.
            let older = s.check_region_epoch(
                RegionEpoch(req.region_epoch),
                &format!("commit of checkpoint {}", req.checkpoint),
                &self.inner.stats,
            )?;
            let found = s.deployment(&req.deployment).map(|d| {
                d.status.last_completed = d.status.last_completed.max(req.checkpoint);
                for t in &d.all {
                    let _ = t.send(TaskCommand::Complete(CheckpointId(req.checkpoint)));
                }
            });
            (older, found)
        };
        self.stop_fenced(older, "a newer region epoch was confirmed")
            .await;
        found?;
        Ok(Response::new(proto::Ack {}))
    }

    async fn cancel(
        &self,
        req: Request<proto::CancelRequest>,
    ) -> Result<Response<proto::Ack>, Status> {
        let req = req.into_inner();
        self.admit_epoch(JmEpoch(req.epoch)).await?;
        let (d, held) = {
            let mut s = self.lock();
            s.check_epoch(JmEpoch(req.epoch), &self.inner.stats)?;
            (
                s.deployments.remove(&req.deployment),
                s.held.remove(&req.deployment),
            )
        };
        if let Some(h) = held {
            tracing::info!(deployment = %req.deployment, job = %h.job, checkpoint = h.status.last_barrier, "held deployment dropped");
            drop_held(h);
        }
        if let Some(d) = d {
            stop_tasks(d.cancel, d.tasks).await;
            tracing::info!(deployment = %req.deployment, "deployment cancelled");
            self.inner.deployments_changed.notify_waiters();
        }
        Ok(Response::new(proto::Ack {}))
    }

    async fn release(
        &self,
        req: Request<proto::ReleaseRequest>,
    ) -> Result<Response<proto::DeploymentStatus>, Status> {
        let req = req.into_inner();
        self.admit_epoch(JmEpoch(req.epoch)).await?;
        let (held, older) = {
            let mut s = self.lock();
            s.check_epoch(JmEpoch(req.epoch), &self.inner.stats)?;
            if let Some(d) = s.deployments.get(&req.deployment) {
                // A retried request: it runs already.
                return Ok(Response::new(d.status.clone()));
            }
            if !s.held.contains_key(&req.deployment) {
                return Err(Status::not_found(format!(
                    "no held deployment '{}' on this TaskManager",
                    req.deployment
                )));
            }
            let older = s.check_region_epoch(
                RegionEpoch(req.region_epoch),
                "release of a held deployment",
                &self.inner.stats,
            )?;
            let held = s.held.remove(&req.deployment).expect("checked above");
            // Its slots stay promised while its tasks start.
            s.reserved += held.status.slots;
            self.extend_fence(&mut s, req.fence_ms);
            (held, older)
        };
        self.stop_fenced(older, "a newer region epoch was confirmed")
            .await;
        let Held {
            mut status,
            plan,
            job,
            prepared,
        } = held;
        let started = deploy_prepared(&plan, prepared, &job).await;
        self.lock().reserved -= status.slots;
        let deployed =
            started.map_err(|e| Status::unavailable(format!("starting the tasks failed: {e}")))?;
        status.held = false;
        status.attempt = req.attempt;
        status.epoch = req.epoch;
        status.region_epoch = req.region_epoch;
        status.tasks = deployed.all.len() as u32;
        status.sources = deployed.sources.len() as u32;
        status.counters = Some(deployed.counters().into());
        self.admit_started(&req.deployment, status.clone(), &deployed, "releasing")
            .await?;
        tracing::info!(deployment = %req.deployment, job = %job, checkpoint = status.last_barrier, region_epoch = req.region_epoch, "hot standby: held deployment released, its tasks run");
        self.spawn_pump(req.deployment, deployed);
        Ok(Response::new(status))
    }

    async fn drain(
        &self,
        req: Request<proto::DrainRequest>,
    ) -> Result<Response<proto::Ack>, Status> {
        let req = req.into_inner();
        self.admit_epoch(JmEpoch(req.epoch)).await?;
        self.lock()
            .check_epoch(JmEpoch(req.epoch), &self.inner.stats)?;
        self.set_draining(req.draining);
        Ok(Response::new(proto::Ack {}))
    }

    async fn fence(
        &self,
        req: Request<proto::FenceRequest>,
    ) -> Result<Response<proto::Ack>, Status> {
        let req = req.into_inner();
        self.admit_epoch(JmEpoch(req.epoch)).await?;
        let stale = {
            let mut s = self.lock();
            s.check_epoch(JmEpoch(req.epoch), &self.inner.stats)?;
            let stale = s.check_region_epoch(
                RegionEpoch(req.region_epoch),
                "region fence",
                &self.inner.stats,
            )?;
            s.fence_until =
                Some(std::time::Instant::now() + Duration::from_millis(req.valid_for_ms));
            self.inner.fence_changed.notify_one();
            stale
        };
        self.stop_fenced(stale, "a newer region epoch was confirmed")
            .await;
        Ok(Response::new(proto::Ack {}))
    }
}

impl TaskManager {
    /// A deployment (or release) carries `fence_ms` more of the region
    /// fence (0: none): the fence holds at least that long from now.
    fn extend_fence(&self, s: &mut Shared, fence_ms: u64) {
        if fence_ms > 0 {
            let until = std::time::Instant::now() + Duration::from_millis(fence_ms);
            s.fence_until = Some(s.fence_until.map_or(until, |u| u.max(until)));
            self.inner.fence_changed.notify_one();
        }
    }

    /// Records a deployment whose tasks just started (`Deploy`, `Release`)
    /// — unless a newer JobManager or region epoch appeared meanwhile: then
    /// a deposed leader asked for it, and its tasks stop again.
    async fn admit_started(
        &self,
        id: &str,
        status: proto::DeploymentStatus,
        deployed: &DeployedJob,
        doing: &str,
    ) -> Result<(), Status> {
        let stale = {
            let mut s = self.lock();
            let stale = JmEpoch(status.epoch) < s.epoch
                || RegionEpoch(status.region_epoch) < s.region_epoch;
            if !stale {
                s.deployments.insert(
                    id.to_string(),
                    Running {
                        status,
                        metrics: deployed.metrics.clone(),
                        sources: deployed.sources.clone(),
                        all: deployed.all.clone(),
                        cancel: deployed.cancel.clone(),
                        tasks: deployed.tasks.clone(),
                    },
                );
            }
            stale
        };
        if stale {
            deployed.shutdown().await;
            self.inner
                .stats
                .stale_commands
                .fetch_add(1, Ordering::Relaxed);
            return Err(Status::failed_precondition(format!(
                "a newer epoch appeared while {doing}: deployment withdrawn"
            )));
        }
        self.inner
            .stats
            .deployments_started
            .fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// A hot standby's `Deploy` with `hold`: loads the checkpoint's operator
    /// state into a held deployment (replacing `req.replaces`, whose slots
    /// it reuses, once loaded).
    async fn deploy_held(
        &self,
        req: proto::DeployRequest,
        plan: JobPlan,
        job: JobId,
    ) -> Result<proto::DeployReply, Status> {
        if !req.subtasks.is_empty() {
            return Err(Status::invalid_argument(
                "a held (hot standby) deployment runs the whole job on one TaskManager: no subtasks",
            ));
        }
        if req.restore_from.is_empty() {
            return Err(Status::invalid_argument(
                "a held (hot standby) deployment needs the checkpoint to load (restore_from)",
            ));
        }
        let need = plan.parallelism;
        let reply = |st: &proto::DeploymentStatus| proto::DeployReply {
            tasks: st.tasks,
            sources: st.sources,
            counters: st.counters,
            state_bytes: st.state_bytes,
            memory_bytes: st.memory_bytes,
        };
        let extra = {
            let mut s = self.lock();
            s.check_epoch(JmEpoch(req.epoch), &self.inner.stats)?;
            if let Some(h) = s.held.get(&req.deployment) {
                return Ok(reply(&h.status));
            }
            let reused = s
                .held
                .get(&req.replaces)
                .filter(|h| h.status.job_id == req.job_id)
                .map_or(0, |h| h.status.slots);
            let free = self.inner.slots.saturating_sub(s.used_slots()) + reused;
            if free < need {
                return Err(Status::resource_exhausted(format!(
                    "TaskManager {} has {free} free slots of {}; holding the job needs {need}",
                    self.inner.id, self.inner.slots
                )));
            }
            let extra = need.saturating_sub(reused);
            s.reserved += extra;
            extra
        };
        let started = std::time::Instant::now();
        let loaded = async {
            let dir = ferry_core::manifest::open_snapshot_dir(&req.restore_from)
                .map_err(|e| Status::invalid_argument(format!("restore point: {e}")))?;
            let cp = match read_verified(&dir).await {
                Ok(Some(cp)) => cp,
                Ok(None) => {
                    return Err(Status::failed_precondition(format!(
                        "'{}' has no MANIFEST.json: not a complete checkpoint",
                        req.restore_from
                    )));
                }
                Err(e) => {
                    return Err(Status::failed_precondition(format!(
                        "reading the checkpoint '{}' failed: {e}",
                        req.restore_from
                    )));
                }
            };
            let p = plan.clone();
            tokio::task::spawn_blocking(move || prepare(&p, cp))
                .await
                .map_err(|e| Status::internal(format!("loading the state ended abnormally: {e}")))?
                .map_err(|e| Status::failed_precondition(format!("loading the state failed: {e}")))
        }
        .await;
        let mut s = self.lock();
        s.reserved -= extra;
        let prepared = loaded?;
        if JmEpoch(req.epoch) < s.epoch {
            drop(s);
            tokio::task::spawn_blocking(move || drop(prepared));
            return Err(Status::failed_precondition(
                "a newer JobManager epoch appeared while loading: held deployment withdrawn",
            ));
        }
        let mut replaced = None;
        if extra < need {
            match s.held.remove(&req.replaces) {
                Some(old) => replaced = Some(old),
                None => {
                    // The held deployment it was to replace was released or
                    // dropped meanwhile: its slots are not ours to reuse.
                    drop(s);
                    tokio::task::spawn_blocking(move || drop(prepared));
                    return Err(Status::aborted(format!(
                        "held deployment '{}' to replace is gone: load again",
                        req.replaces
                    )));
                }
            }
        }
        let m = &prepared.checkpoint.manifest;
        let status = proto::DeploymentStatus {
            deployment: req.deployment.clone(),
            job_id: req.job_id.clone(),
            attempt: req.attempt,
            epoch: req.epoch,
            slots: need,
            tasks: plan.task_count() as u32,
            sources: plan.parallelism,
            last_barrier: m.checkpoint_id.0,
            last_completed: m.checkpoint_id.0,
            counters: Some(proto::Counters {
                records_in: m.records_in,
                records_out: m.records_out,
                watermark: m.watermark,
                ..Default::default()
            }),
            parallelism: plan.parallelism,
            held: true,
            state_bytes: prepared.state_bytes,
            memory_bytes: prepared.memory_bytes,
            ..Default::default()
        };
        let out = reply(&status);
        tracing::info!(
            deployment = %req.deployment,
            job = %job,
            checkpoint = m.checkpoint_id.0,
            state_bytes = prepared.state_bytes,
            memory_bytes = prepared.memory_bytes,
            ms = started.elapsed().as_millis() as u64,
            replaces = %req.replaces,
            "hot standby: checkpoint loaded and held"
        );
        s.held.insert(
            req.deployment.clone(),
            Held {
                status,
                plan,
                job,
                prepared,
            },
        );
        drop(s);
        if let Some(old) = replaced {
            drop_held(old);
        }
        Ok(out)
    }

    /// Reads the restore point (verifying it) and starts the tasks.
    async fn start(
        &self,
        req: &proto::DeployRequest,
        plan: &JobPlan,
        job: &JobId,
        part: Option<&Part>,
    ) -> Result<DeployedJob, Status> {
        let restore = if req.restore_from.is_empty() {
            None
        } else {
            let dir = ferry_core::manifest::open_snapshot_dir(&req.restore_from)
                .map_err(|e| Status::invalid_argument(format!("restore point: {e}")))?;
            match read_verified(&dir).await {
                Ok(Some(cp)) => Some(cp),
                Ok(None) => {
                    return Err(Status::failed_precondition(format!(
                        "'{}' has no MANIFEST.json: not a complete checkpoint",
                        req.restore_from
                    )));
                }
                Err(e) => {
                    return Err(Status::failed_precondition(format!(
                        "reading the restore point '{}' failed: {e}",
                        req.restore_from
                    )));
                }
            }
        };
        deploy_part(plan, restore.as_ref(), job, part)
            .await
            .map_err(|e| Status::unavailable(format!("starting the tasks failed: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use super::*;

    async fn fence(tm: &TaskManager, valid_for_ms: u64) {
        let req = Request::new(proto::FenceRequest {
            epoch: 1,
            region_epoch: 1,
            valid_for_ms,
        });
        task_manager_server::TaskManager::fence(tm, req)
            .await
            .expect("fence accepted");
    }

    /// The watcher sleeps until the deadline a renewal set, not the one
    /// it went to sleep on, and clears the fence when it runs out.
    #[tokio::test]
    async fn a_renewed_fence_runs_out_at_its_new_deadline() {
        let tm = TaskManager::new("tm", 1);
        let stop = CancellationToken::new();
        let watcher = tokio::spawn(tm.clone().watch_fence(stop.clone()));
        let start = Instant::now();
        fence(&tm, 200).await;
        fence(&tm, 1_000).await;
        // Past the first deadline: the renewal still holds.
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert!(tm.fence_remaining().is_some_and(|r| r > Duration::ZERO));
        let limit = start + Duration::from_secs(5);
        while tm.fence_remaining().is_some() {
            assert!(Instant::now() < limit, "the fence never ran out");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(start.elapsed() >= Duration::from_millis(1_000));
        stop.cancel();
        watcher.await.expect("watcher ends on stop");
    }

    fn fence_req(epoch: u64) -> Request<proto::FenceRequest> {
        Request::new(proto::FenceRequest {
            epoch,
            region_epoch: 1,
            valid_for_ms: 60_000,
        })
    }

    /// A lease that says `epoch` (or nothing, or cannot be read).
    fn lease(answer: Arc<Mutex<Result<Option<u64>, String>>>) -> EpochCheck {
        Arc::new(move || {
            let a = answer.lock().unwrap().clone().map(|e| e.map(JmEpoch));
            Box::pin(async move { a })
        })
    }

    #[tokio::test(start_paused = true)]
    async fn an_epoch_the_leader_lease_does_not_show_is_refused_and_locks_no_one_out() {
        let tm = TaskManager::new("tm", 1);
        let answer = Arc::new(Mutex::new(Ok(Some(7))));
        tm.confirm_epochs_with(lease(answer.clone()));
        let svc = task_manager_server::TaskManager::fence;

        // The leader at epoch 7, as the lease says.
        svc(&tm, fence_req(7)).await.expect("the leader's epoch");
        // A made-up epoch from a client that never won the lease.
        let err = svc(&tm, fence_req(1_000_000_000)).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::PermissionDenied);
        assert!(
            err.message().contains("lease is at epoch 7"),
            "{}",
            err.message()
        );
        assert_eq!(tm.stats().unconfirmed_epochs.load(Ordering::Relaxed), 1);
        // The real leader keeps working.
        svc(&tm, fence_req(7)).await.expect("still the leader");
        assert_eq!(tm.usage().3, 7);

        // No lease at all: refused; a lease that cannot be read: retry.
        *answer.lock().unwrap() = Ok(None);
        let err = svc(&tm, fence_req(8)).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::PermissionDenied);
        assert!(
            err.message().contains("held by no one"),
            "{}",
            err.message()
        );
        *answer.lock().unwrap() = Err("NATS unreachable".into());
        let err = svc(&tm, fence_req(8)).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::Unavailable);
        assert!(
            err.message().contains("NATS unreachable"),
            "{}",
            err.message()
        );

        // A new leader won the lease at 9: believed, and the old one is
        // now stale as before.
        *answer.lock().unwrap() = Ok(Some(9));
        svc(&tm, fence_req(9)).await.expect("the new leader");
        let err = svc(&tm, fence_req(7)).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::FailedPrecondition);
    }

    #[tokio::test(start_paused = true)]
    async fn a_lease_read_that_trails_a_new_leader_is_read_again() {
        let tm = TaskManager::new("tm", 1);
        let answer = Arc::new(Mutex::new(Ok(Some(3))));
        tm.confirm_epochs_with(lease(answer.clone()));
        let reader = {
            let answer = answer.clone();
            tokio::spawn(async move {
                // A lagging replica answers 3 for a while, then 4.
                tokio::time::sleep(EPOCH_CHECK_PAUSE * 2).await;
                *answer.lock().unwrap() = Ok(Some(4));
            })
        };
        task_manager_server::TaskManager::fence(&tm, fence_req(4))
            .await
            .expect("confirmed on a later read");
        reader.await.unwrap();
        assert_eq!(tm.stats().unconfirmed_epochs.load(Ordering::Relaxed), 0);
    }
}
