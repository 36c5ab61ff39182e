//! The leader's view of its region's TaskManagers: it finds them in the
//! membership records, attaches to each at its fencing epoch (the
//! TaskManager answers with its registration: slots and running
//! deployments), routes their task events to the job drivers, places new
//! deployments on free slots (a job on one TaskManager when one holds it,
//! else in parts over several), and turns a TaskManager whose heartbeat
//! expired into a failure of every deployment it ran a part of.
//!
//! Invariant: the pool acts only for the epoch the leader holds; when the
//! leadership is lost or changes, every attachment is dropped and the
//! TaskManagers keep their tasks running for the next leader to adopt.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ferry_core::config::Strategy;
use ferry_core::proto::{self, task_manager_client::TaskManagerClient};
use ferry_core::{JmEpoch, JobId, RegionEpoch};
use ferry_ha::{Coordination, Membership};
use ferry_taskmanager::protocol::{TaskError, TaskEvent, TaskId};
use ferry_taskmanager::wire::{RemoteEvent, event_from_proto};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tonic::transport::{Channel, Endpoint};

use crate::leadership::Leadership;

/// Role name of TaskManagers in membership records.
pub const TASKMANAGER_ROLE: &str = "taskmanager";

/// A gRPC client of one TaskManager.
pub(crate) type TmClient = TaskManagerClient<Channel>;

/// The region's TaskManagers as the leader sees them.
pub struct TaskManagers {
    region: String,
    instance: String,
    backend: Arc<dyn Coordination>,
    expiry: Duration,
    interval: Duration,
    /// Mutual TLS to TaskManagers (`tls.grpc`), if set.
    tls: Option<ferry_core::tls::Connector>,
    /// `scheduling.strategy`.
    strategy: Strategy,
    state: Mutex<PoolState>,
    changed: watch::Sender<u64>,
    /// The last membership listing failed (warned once per streak).
    list_failing: std::sync::atomic::AtomicBool,
    /// Wakes the pool at once (the leadership changed).
    wake: tokio::sync::Notify,
}

#[derive(Default)]
struct PoolState {
    /// The epoch attachments were made at (`None` while not leading).
    epoch: Option<JmEpoch>,
    /// True once the membership was read at this epoch.
    listed: bool,
    tms: HashMap<String, Tm>,
    /// Event routes of the deployments a driver owns, by deployment id.
    routes: HashMap<String, Route>,
}

struct Tm {
    address: String,
    /// Its exchange URL (none: it runs only whole jobs).
    exchange: Option<String>,
    slots: u32,
    client: TmClient,
    /// The registration of the current attachment arrived.
    registered: bool,
    /// Since when no attachment is up (`None` while attached).
    detached_since: Option<std::time::Instant>,
    /// Deployments as the registration reported them.
    reported: Vec<proto::DeploymentStatus>,
    /// Slots used by deployments on it, by deployment id.
    used: HashMap<String, u32>,
    /// Slots promised to deployments being started.
    reserved: u32,
    /// Draining: its jobs move elsewhere, nothing new goes here.
    draining: bool,
    stop: CancellationToken,
}

impl Tm {
    fn used_slots(&self) -> u32 {
        self.used.values().sum::<u32>() + self.reserved
    }

    fn free(&self) -> u32 {
        self.slots.saturating_sub(self.used_slots())
    }

    /// Free slots new deployments may take (none while draining).
    fn placeable(&self) -> u32 {
        if self.draining { 0 } else { self.free() }
    }
}

/// One TaskManager as the leader sees it (`GET /v1/cluster`, the drain and
/// the rebalancer).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TmView {
    pub id: String,
    pub slots: u32,
    /// Slots used by deployments (and promised to ones starting).
    pub used: u32,
    pub draining: bool,
    /// Whether it takes parts of jobs spread over TaskManagers.
    pub exchange: bool,
    /// Jobs with tasks on it, with the slots each uses here.
    pub jobs: Vec<(JobId, u32)>,
}

struct Route {
    tm: String,
    job: JobId,
    /// Which part of its deployment this is (events carry it).
    part: usize,
    tx: mpsc::UnboundedSender<PartEvent>,
}

/// An event of one part of a deployment, by part index.
pub(crate) type PartEvent = (usize, RemoteEvent);

/// A deployment part found running on a TaskManager.
pub(crate) struct Found {
    pub tm: String,
    pub client: TmClient,
    pub status: proto::DeploymentStatus,
}

/// Where one part of a new deployment goes.
pub(crate) struct Placement {
    pub tm: String,
    pub client: TmClient,
    pub slots: u32,
    /// The TaskManager's exchange URL (set whenever a job is split).
    pub exchange: Option<String>,
}

/// Why a drain could not start.
#[derive(Debug, thiserror::Error)]
pub enum DrainError {
    #[error("this JobManager does not lead the region")]
    NotLeading,
    #[error("no registered TaskManager '{0}' in this region")]
    Unknown(String),
    #[error("{0}")]
    Unreachable(String),
}

/// Free capacity, for "waiting for slots" messages.
#[derive(Clone, Copy, Debug)]
pub struct Capacity {
    pub taskmanagers: usize,
    pub slots: u32,
    /// Slots new deployments may take (not on draining TaskManagers).
    pub free: u32,
    pub used: u32,
    pub draining: usize,
    /// [`slot_load_variance`] of the TaskManagers not draining.
    pub variance: f64,
}

/// How unevenly slots are used: the standard deviation of each
/// TaskManager's used/total slots, divided by their mean (the coefficient
/// of variation; 0 when even, or when nothing runs).
pub fn slot_load_variance(loads: &[(u32, u32)]) -> f64 {
    let l: Vec<f64> = loads
        .iter()
        .filter(|(_, slots)| *slots > 0)
        .map(|(used, slots)| f64::from(*used) / f64::from(*slots))
        .collect();
    if l.is_empty() {
        return 0.0;
    }
    let mean = l.iter().sum::<f64>() / l.len() as f64;
    if mean <= 0.0 {
        return 0.0;
    }
    let var = l.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / l.len() as f64;
    var.sqrt() / mean
}

impl TaskManagers {
    pub fn new(
        region: String,
        instance: String,
        backend: Arc<dyn Coordination>,
        expiry: Duration,
        interval: Duration,
        tls: Option<ferry_core::tls::Connector>,
        strategy: Strategy,
    ) -> Arc<Self> {
        Arc::new(Self {
            region,
            instance,
            backend,
            expiry,
            interval,
            tls,
            strategy,
            state: Mutex::new(PoolState::default()),
            changed: watch::channel(0).0,
            list_failing: Default::default(),
            wake: tokio::sync::Notify::new(),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, PoolState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn bump(&self) {
        self.changed.send_modify(|v| *v += 1);
    }

    /// Follows the leadership and the membership until `shutdown`.
    pub async fn run(self: Arc<Self>, leadership: Arc<Leadership>, shutdown: CancellationToken) {
        let mut tick = tokio::time::interval(self.interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tick.tick() => {}
                _ = self.wake.notified() => {}
            }
            self.sync(leadership.fence()).await;
        }
        self.detach_all();
    }

    /// Makes the pool follow a leadership change now rather than at its
    /// next tick (a new leader attaches to the TaskManagers at once).
    pub fn wake(&self) {
        self.wake.notify_one();
    }

    /// Drops every attachment (the TaskManagers keep their tasks).
    fn detach_all(&self) {
        let mut s = self.lock();
        for (_, tm) in s.tms.drain() {
            tm.stop.cancel();
        }
        s.routes.clear();
        s.epoch = None;
        s.listed = false;
        drop(s);
        self.bump();
    }

    async fn sync(self: &Arc<Self>, epoch: Option<JmEpoch>) {
        let current = self.lock().epoch;
        if current != epoch {
            self.detach_all();
            self.lock().epoch = epoch;
        }
        let Some(epoch) = epoch else { return };
        let listing = std::time::Instant::now();
        let listed = Membership::list(self.backend.as_ref(), self.expiry).await;
        tracing::debug!(
            epoch = %epoch,
            ms = listing.elapsed().as_millis() as u64,
            "listed the members"
        );
        let members = match listed {
            Ok(m) => {
                self.list_failing
                    .store(false, std::sync::atomic::Ordering::Relaxed);
                m
            }
            Err(e) => {
                if !self
                    .list_failing
                    .swap(true, std::sync::atomic::Ordering::Relaxed)
                {
                    tracing::warn!(
                        "listing the region's members failed (retrying every {}): {e}",
                        humantime::format_duration(self.interval)
                    );
                }
                return;
            }
        };
        let live: HashMap<String, (String, u32, Option<String>)> = members
            .into_iter()
            .filter(|m| m.member.role == TASKMANAGER_ROLE && m.member.region == self.region)
            .map(|m| {
                (
                    m.member.id,
                    (m.member.address, m.member.slots, m.member.exchange),
                )
            })
            .collect();
        let mut s = self.lock();
        if s.epoch != Some(epoch) {
            return;
        }
        // Gone: every deployment it ran has failed.
        let gone: Vec<String> = s
            .tms
            .keys()
            .filter(|id| !live.contains_key(*id))
            .cloned()
            .collect();
        for id in gone {
            if let Some(tm) = s.tms.remove(&id) {
                tm.stop.cancel();
            }
            tracing::warn!(taskmanager = %id, "TaskManager lost: no heartbeat within the member expiry");
            let why = format!(
                "TaskManager {id} lost: no heartbeat for {} (member expiry)",
                humantime::format_duration(self.expiry)
            );
            fail_routes(&mut s, &id, &why);
        }
        // Alive in the membership but unreachable over gRPC for longer than
        // the member expiry (a partition between JobManager and
        // TaskManager): its deployments count as failed, like a lost one.
        let cut_off: Vec<String> = s
            .tms
            .iter()
            .filter(|(_, t)| t.detached_since.is_some_and(|d| d.elapsed() > self.expiry))
            .map(|(id, _)| id.clone())
            .collect();
        for id in cut_off {
            let why = format!(
                "TaskManager {id} unreachable over gRPC for more than {} although its heartbeat goes on",
                humantime::format_duration(self.expiry)
            );
            if s.routes.values().any(|r| r.tm == id) {
                tracing::warn!(taskmanager = %id, "{why}");
            }
            fail_routes(&mut s, &id, &why);
        }
        for (id, (address, slots, exchange)) in live {
            if let Some(tm) = s.tms.get_mut(&id)
                && tm.address == address
            {
                tm.exchange = exchange;
                continue;
            }
            let Ok(endpoint) = Endpoint::from_shared(address.clone()) else {
                tracing::warn!(taskmanager = %id, %address, "TaskManager advertises an unusable address");
                continue;
            };
            let endpoint = endpoint
                .connect_timeout(Duration::from_secs(1))
                .tcp_nodelay(true)
                .http2_keep_alive_interval(Duration::from_secs(5))
                .keep_alive_timeout(Duration::from_secs(5));
            let channel = match (&self.tls, address.starts_with("https://")) {
                (Some(tls), true) => endpoint.connect_with_connector_lazy(tls.clone()),
                (None, false) => endpoint.connect_lazy(),
                (Some(_), false) => {
                    tracing::warn!(taskmanager = %id, %address, "TaskManager advertises a plaintext address but tls.grpc is set here: not dialing it (set tls.grpc on the TaskManager too)");
                    continue;
                }
                (None, true) => {
                    tracing::warn!(taskmanager = %id, %address, "TaskManager advertises an https address but tls.grpc is not set here: not dialing it (set tls.grpc on this JobManager too)");
                    continue;
                }
            };
            let stop = CancellationToken::new();
            if let Some(old) = s.tms.insert(
                id.clone(),
                Tm {
                    address,
                    exchange,
                    slots,
                    client: TaskManagerClient::new(channel),
                    registered: false,
                    detached_since: Some(std::time::Instant::now()),
                    reported: Vec::new(),
                    used: HashMap::new(),
                    reserved: 0,
                    draining: false,
                    stop: stop.clone(),
                },
            ) {
                old.stop.cancel();
            }
            tokio::spawn(self.clone().attach(id, epoch, stop));
        }
        s.listed = true;
        drop(s);
        self.bump();
    }

    /// Keeps one TaskManager attached at `epoch` until `stop`.
    async fn attach(self: Arc<Self>, tm: String, epoch: JmEpoch, stop: CancellationToken) {
        let mut delay = Duration::from_millis(100);
        loop {
            let Some(mut client) = self.lock().tms.get(&tm).map(|t| t.client.clone()) else {
                return;
            };
            let req = proto::AttachRequest {
                epoch: epoch.0,
                jobmanager: self.instance.clone(),
            };
            tracing::debug!(taskmanager = %tm, %epoch, "attaching");
            let stream = tokio::select! {
                _ = stop.cancelled() => return,
                r = client.attach(req) => r,
            };
            match stream {
                Ok(stream) => {
                    delay = Duration::from_millis(100);
                    let mut stream = stream.into_inner();
                    loop {
                        let msg = tokio::select! {
                            _ = stop.cancelled() => return,
                            m = stream.message() => m,
                        };
                        match msg {
                            Ok(Some(proto::TmEvent { event: Some(e) })) => self.on_event(&tm, e),
                            Ok(Some(_)) => {}
                            Ok(None) => break,
                            Err(e) => {
                                tracing::debug!(taskmanager = %tm, "attachment ended: {e}");
                                break;
                            }
                        }
                    }
                    if let Some(t) = self.lock().tms.get_mut(&tm) {
                        t.registered = false;
                        t.detached_since.get_or_insert_with(std::time::Instant::now);
                    }
                    self.bump();
                }
                Err(e) if e.code() == tonic::Code::FailedPrecondition => {
                    tracing::warn!(taskmanager = %tm, %epoch, "TaskManager refused the attachment: {}", e.message());
                }
                Err(e) => tracing::debug!(taskmanager = %tm, "attaching failed: {e}"),
            }
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(delay) => {}
            }
            delay = (delay * 2).min(self.interval);
        }
    }

    fn on_event(&self, tm: &str, event: proto::tm_event::Event) {
        match event {
            proto::tm_event::Event::Registration(reg) => {
                let mut s = self.lock();
                let Some(t) = s.tms.get_mut(tm) else { return };
                tracing::info!(
                    taskmanager = %tm,
                    slots = reg.slots,
                    deployments = reg.deployments.len(),
                    "TaskManager registered"
                );
                t.registered = true;
                t.detached_since = None;
                t.slots = reg.slots;
                if reg.draining != t.draining {
                    tracing::info!(taskmanager = %tm, draining = reg.draining, "TaskManager drain state from its registration");
                }
                t.draining = reg.draining;
                t.used = reg
                    .deployments
                    .iter()
                    .map(|d| (d.deployment.clone(), d.slots))
                    .collect();
                t.reported = reg.deployments;
                let here: Vec<String> = t.used.keys().cloned().collect();
                // A deployment this leader drives that the TaskManager no
                // longer has (it restarted) has failed.
                let lost: Vec<String> = s
                    .routes
                    .iter()
                    .filter(|(d, r)| r.tm == tm && !here.contains(d))
                    .map(|(d, _)| d.clone())
                    .collect();
                for d in lost {
                    if let Some(r) = s.routes.remove(&d) {
                        let _ = r.tx.send((
                            r.part,
                            failure(&format!(
                                "TaskManager {tm} no longer runs deployment {d} (it restarted)"
                            )),
                        ));
                    }
                }
                // Deployments of jobs whose driver owns another deployment
                // are leftovers (the job moved while this TaskManager was
                // unreachable): stop them.
                let stale: Vec<String> = here
                    .iter()
                    .filter(|d| !s.routes.contains_key(*d))
                    .filter(|d| {
                        let job = s.tms[tm]
                            .reported
                            .iter()
                            .find(|r| &r.deployment == *d)
                            .map(|r| r.job_id.clone());
                        s.routes.values().any(|r| Some(r.job.to_string()) == job)
                    })
                    .cloned()
                    .collect();
                drop(s);
                for d in stale {
                    self.cancel_quietly(tm, d);
                }
                self.bump();
            }
            proto::tm_event::Event::Drain(d) => {
                if let Some(t) = self.lock().tms.get_mut(tm) {
                    tracing::info!(taskmanager = %tm, draining = d.draining, "TaskManager drain state changed");
                    t.draining = d.draining;
                }
                self.bump();
            }
            proto::tm_event::Event::Deployment(ev) => {
                let Some(e) = ev.event else { return };
                let mut s = self.lock();
                let Some(route) = s.routes.get(&ev.deployment) else {
                    // Not claimed by a driver yet: keep its status current
                    // for the adoption.
                    if let Some(d) = s.tms.get_mut(tm).and_then(|t| {
                        t.reported
                            .iter_mut()
                            .find(|d| d.deployment == ev.deployment)
                    }) {
                        apply(d, e);
                    }
                    return;
                };
                match event_from_proto(e) {
                    Ok(e) => {
                        let _ = route.tx.send((route.part, e));
                    }
                    Err(e) => tracing::warn!(deployment = %ev.deployment, "malformed event: {e}"),
                }
            }
        }
    }

    /// Waits until every live TaskManager registered at the current epoch
    /// (bounded by `timeout`), so adoption sees every running deployment.
    /// Returns false if the membership could not be read at this epoch yet
    /// (then nobody knows which TaskManagers exist).
    pub(crate) async fn wait_registered(&self, epoch: JmEpoch, timeout: Duration) -> bool {
        let mut rx = self.changed.subscribe();
        let all = |s: &PoolState| {
            s.epoch == Some(epoch) && s.listed && s.tms.values().all(|t| t.registered)
        };
        let _ = tokio::time::timeout(timeout, async {
            loop {
                if all(&self.lock()) {
                    return;
                }
                if rx.changed().await.is_err() {
                    return;
                }
            }
        })
        .await;
        let s = self.lock();
        s.epoch == Some(epoch) && s.listed
    }

    /// Claims the newest healthy deployment of `job` running on the
    /// TaskManagers — every part of it, covering every subtask: from now on
    /// their events go to the returned receiver, starting with a replay of
    /// what they reported before (ended sources, stopped tasks) — one
    /// lock, so nothing falls in between. A deployment missing a part (its
    /// TaskManager is gone or not registered) is not adopted: the job
    /// restarts from its checkpoint.
    pub(crate) fn claim(
        &self,
        job: &JobId,
        region_epoch: RegionEpoch,
    ) -> Option<(Vec<Found>, mpsc::UnboundedReceiver<PartEvent>)> {
        let mut s = self.lock();
        let id = job.to_string();
        let stale: Vec<(String, String, u64)> = s
            .tms
            .iter()
            .flat_map(|(tm, t)| t.reported.iter().map(move |d| (tm, d)))
            .filter(|(_, d)| {
                d.job_id == id && !d.held && RegionEpoch(d.region_epoch) != region_epoch
            })
            .map(|(tm, d)| (tm.clone(), d.deployment.clone(), d.region_epoch))
            .collect();
        for (tm, d, e) in &stale {
            tracing::warn!(job = %job, taskmanager = %tm, deployment = %d, deployment_region_epoch = e, %region_epoch, "not adopting tasks started under another region epoch: they are stopped and the job restores from its newest checkpoint");
        }
        // Healthy parts by deployment (group).
        let mut groups: HashMap<String, Vec<Found>> = HashMap::new();
        for (tm, t) in s.tms.iter().filter(|(_, t)| t.registered) {
            for d in &t.reported {
                if d.job_id == id
                    && !d.held
                    && d.failure.is_none()
                    && RegionEpoch(d.region_epoch) == region_epoch
                    && t.used.contains_key(&d.deployment)
                {
                    let group = if d.group.is_empty() {
                        d.deployment.clone()
                    } else {
                        d.group.clone()
                    };
                    groups.entry(group).or_default().push(Found {
                        tm: tm.clone(),
                        client: t.client.clone(),
                        status: d.clone(),
                    });
                }
            }
        }
        let mut complete: Vec<Vec<Found>> = groups
            .into_iter()
            .filter_map(|(group, parts)| {
                if covers_every_subtask(&parts) {
                    Some(parts)
                } else {
                    tracing::warn!(job = %job, deployment = %group, parts = parts.len(), "not adopting a deployment whose parts do not cover every subtask (a TaskManager running one is gone): the job restores from its newest checkpoint");
                    None
                }
            })
            .collect();
        complete.sort_by_key(|parts| {
            parts
                .first()
                .map(|f| (f.status.epoch, f.status.attempt))
                .unwrap_or_default()
        });
        let mut parts = complete.pop()?;
        parts.sort_by_key(|f| f.status.subtasks.first().copied().unwrap_or(0));
        let (tx, rx) = mpsc::unbounded_channel();
        for (k, found) in parts.iter().enumerate() {
            let st = &found.status;
            for t in &st.sources_ended {
                let _ = tx.send((k, RemoteEvent::Task(TaskEvent::SourceEnded((*t).into()))));
            }
            for t in &st.stopped {
                let _ = tx.send((k, RemoteEvent::Task(TaskEvent::Stopped((*t).into()))));
            }
            s.routes.insert(
                st.deployment.clone(),
                Route {
                    tm: found.tm.clone(),
                    job: *job,
                    part: k,
                    tx: tx.clone(),
                },
            );
        }
        Some((parts, rx))
    }

    /// Routes the events of part `part` of a deployment to `tx`.
    pub(crate) fn route(
        &self,
        tm: &str,
        job: JobId,
        deployment: &str,
        slots: u32,
        part: usize,
        tx: &mpsc::UnboundedSender<PartEvent>,
    ) {
        let mut s = self.lock();
        match s.tms.get_mut(tm) {
            Some(t) => {
                t.used.insert(deployment.to_string(), slots);
            }
            None => {
                let _ = tx.send((part, failure(&format!("TaskManager {tm} is gone"))));
            }
        }
        s.routes.insert(
            deployment.to_string(),
            Route {
                tm: tm.to_string(),
                job,
                part,
                tx: tx.clone(),
            },
        );
    }

    /// Stops routing a deployment's events (the driver let go of it).
    pub(crate) fn unroute(&self, deployment: &str) {
        self.lock().routes.remove(deployment);
    }

    /// The deployment was cancelled: its slots are free again.
    pub(crate) fn forget(&self, tm: &str, deployment: &str) {
        let mut s = self.lock();
        s.routes.remove(deployment);
        if let Some(t) = s.tms.get_mut(tm) {
            t.used.remove(deployment);
            t.reported.retain(|d| d.deployment != deployment);
        }
        drop(s);
        self.bump();
    }

    /// Every other deployment of `job` on any TaskManager is stopped
    /// (`keep`: the part ids of the one that goes on).
    pub(crate) fn cancel_others(&self, job: &JobId, keep: &[String]) {
        let id = job.to_string();
        let others: Vec<(String, String)> = {
            let s = self.lock();
            s.tms
                .iter()
                .flat_map(|(tm, t)| t.reported.iter().map(move |d| (tm, d)))
                .filter(|(_, d)| d.job_id == id && !keep.contains(&d.deployment))
                .map(|(tm, d)| (tm.clone(), d.deployment.clone()))
                .collect()
        };
        for (tm, d) in others {
            self.cancel_quietly(&tm, d);
        }
    }

    /// Cancels a deployment no driver owns, in the background.
    fn cancel_quietly(&self, tm: &str, deployment: String) {
        let (client, epoch) = {
            let s = self.lock();
            let Some(t) = s.tms.get(tm) else { return };
            let Some(epoch) = s.epoch else { return };
            (t.client.clone(), epoch)
        };
        tracing::info!(taskmanager = %tm, %deployment, "stopping a leftover deployment");
        self.forget(tm, &deployment);
        tokio::spawn(async move {
            let mut client = client;
            if let Err(e) = client
                .cancel(proto::CancelRequest {
                    epoch: epoch.0,
                    deployment,
                })
                .await
            {
                tracing::warn!("stopping a leftover deployment failed: {e}");
            }
        });
    }

    /// The region lease was just confirmed under `region_epoch` for
    /// `valid_for`: every registered TaskManager hears it (in the
    /// background, each bounded by `valid_for`), so its tasks go on; a
    /// TaskManager that does not hear it in time stops them by itself.
    pub fn renew_fence(&self, region_epoch: RegionEpoch, valid_for: Duration) {
        let called = std::time::Instant::now();
        let (epoch, clients): (Option<JmEpoch>, Vec<(String, TmClient)>) = {
            let s = self.lock();
            (
                s.epoch,
                s.tms
                    .iter()
                    .filter(|(_, t)| t.registered)
                    .map(|(id, t)| (id.clone(), t.client.clone()))
                    .collect(),
            )
        };
        let Some(epoch) = epoch else { return };
        for (tm, mut client) in clients {
            tokio::spawn(async move {
                // What is left of the validity when the request leaves.
                let left = valid_for.saturating_sub(called.elapsed());
                if left.is_zero() {
                    return;
                }
                let req = proto::FenceRequest {
                    epoch: epoch.0,
                    region_epoch: region_epoch.0,
                    valid_for_ms: left.as_millis() as u64,
                };
                match tokio::time::timeout(left, client.fence(req)).await {
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => {
                        tracing::warn!(taskmanager = %tm, "renewing the region fence failed: {}", e.message())
                    }
                    Err(_) => {
                        tracing::warn!(taskmanager = %tm, "renewing the region fence timed out")
                    }
                }
            });
        }
    }

    /// Reserves `need` slots for a job as `strategy` says: on one
    /// TaskManager when one has them free, else in parts over the fewest
    /// TaskManagers with exchange ports that hold it (most free slots
    /// first). `None` while the region as a whole lacks the slots.
    pub(crate) fn place(&self, need: u32, prefer: Option<&str>) -> Option<Vec<Placement>> {
        let strategy = self.strategy;
        let mut s = self.lock();
        let free: Vec<(String, u32, bool)> = s
            .tms
            .iter()
            .filter(|(_, t)| t.registered)
            .map(|(id, t)| (id.clone(), t.placeable(), t.exchange.is_some()))
            .collect();
        // A move's target, when it has room; else the strategy decides.
        let chosen = match prefer.and_then(|p| free.iter().find(|(id, f, _)| id == p && *f >= need))
        {
            Some((id, _, _)) => vec![(id.clone(), need)],
            None => plan_placement(&free, need, strategy)?,
        };
        Some(
            chosen
                .into_iter()
                .map(|(id, slots)| {
                    let t = s.tms.get_mut(&id).expect("chosen among the registered");
                    t.reserved += slots;
                    Placement {
                        tm: id,
                        client: t.client.clone(),
                        slots,
                        exchange: t.exchange.clone(),
                    }
                })
                .collect(),
        )
    }

    /// Reserves `need` slots on one TaskManager (the one with the most
    /// free), for a hot standby's held deployment of a whole job.
    pub(crate) fn place_whole(&self, need: u32) -> Option<Placement> {
        let mut s = self.lock();
        let (id, t) = s
            .tms
            .iter_mut()
            .filter(|(_, t)| t.registered && t.placeable() >= need)
            .max_by(|(a, x), (b, y)| x.placeable().cmp(&y.placeable()).then(b.cmp(a)))?;
        t.reserved += need;
        Some(Placement {
            tm: id.clone(),
            client: t.client.clone(),
            slots: need,
            exchange: t.exchange.clone(),
        })
    }

    /// The client of a registered TaskManager and the epoch to call it at.
    pub(crate) fn client_of(&self, tm: &str) -> Option<(TmClient, JmEpoch)> {
        let s = self.lock();
        let epoch = s.epoch?;
        s.tms
            .get(tm)
            .filter(|t| t.registered)
            .map(|t| (t.client.clone(), epoch))
    }

    /// A hot standby's held deployments on the registered TaskManagers.
    pub(crate) fn held(&self) -> Vec<(String, proto::DeploymentStatus)> {
        let s = self.lock();
        let mut out: Vec<(String, proto::DeploymentStatus)> = s
            .tms
            .iter()
            .filter(|(_, t)| t.registered)
            .flat_map(|(tm, t)| {
                t.reported
                    .iter()
                    .filter(|d| d.held)
                    .map(move |d| (tm.clone(), d.clone()))
            })
            .collect();
        out.sort_by(|a, b| a.1.deployment.cmp(&b.1.deployment));
        out
    }

    /// Records a deployment a TaskManager reported in a reply (a held one
    /// it loaded, replacing `replaces`, or a held one it released and now
    /// runs): its slots count, and an adoption finds it.
    pub(crate) fn record(&self, tm: &str, status: proto::DeploymentStatus, replaces: &str) {
        let mut s = self.lock();
        if let Some(t) = s.tms.get_mut(tm) {
            if !replaces.is_empty() {
                t.used.remove(replaces);
            }
            t.used.insert(status.deployment.clone(), status.slots);
            t.reported
                .retain(|d| d.deployment != status.deployment && d.deployment != replaces);
            t.reported.push(status);
        }
        drop(s);
        self.bump();
    }

    /// Ends a reservation made by [`TaskManagers::place`].
    pub(crate) fn unreserve(&self, tm: &str, slots: u32) {
        if let Some(t) = self.lock().tms.get_mut(tm) {
            t.reserved = t.reserved.saturating_sub(slots);
        }
        self.bump();
    }

    /// Registered TaskManagers and their slots.
    pub fn capacity(&self) -> Capacity {
        let s = self.lock();
        let reg = s.tms.values().filter(|t| t.registered);
        let loads: Vec<(u32, u32)> = reg
            .clone()
            .filter(|t| !t.draining)
            .map(|t| (t.used_slots(), t.slots))
            .collect();
        Capacity {
            taskmanagers: reg.clone().count(),
            slots: reg.clone().map(|t| t.slots).sum(),
            free: reg.clone().map(|t| t.placeable()).sum(),
            used: reg.clone().map(|t| t.used_slots().min(t.slots)).sum(),
            draining: reg.filter(|t| t.draining).count(),
            variance: slot_load_variance(&loads),
        }
    }

    /// The registered TaskManagers, by id.
    pub fn view(&self) -> Vec<TmView> {
        let s = self.lock();
        let mut out: Vec<TmView> = s
            .tms
            .iter()
            .filter(|(_, t)| t.registered)
            .map(|(id, t)| {
                let mut jobs: HashMap<JobId, u32> = HashMap::new();
                for (d, slots) in &t.used {
                    let job = s.routes.get(d).map(|r| r.job).or_else(|| {
                        t.reported
                            .iter()
                            .find(|r| &r.deployment == d)
                            .and_then(|r| r.job_id.parse().ok())
                    });
                    if let Some(job) = job {
                        *jobs.entry(job).or_default() += slots;
                    }
                }
                let mut jobs: Vec<(JobId, u32)> = jobs.into_iter().collect();
                jobs.sort();
                TmView {
                    id: id.clone(),
                    slots: t.slots,
                    used: t.used_slots(),
                    draining: t.draining,
                    exchange: t.exchange.is_some(),
                    jobs,
                }
            })
            .collect();
        out.sort_by(|a, b| a.id.cmp(&b.id));
        out
    }

    /// Starts (or ends) draining TaskManager `tm`: it is told (so a new
    /// leader finds it draining in its registration) and nothing new is
    /// placed on it from now on; the scheduler moves its jobs.
    pub async fn set_draining(&self, tm: &str, on: bool) -> Result<(), DrainError> {
        let (mut client, epoch) = {
            let s = self.lock();
            let epoch = s.epoch.ok_or(DrainError::NotLeading)?;
            let t = s
                .tms
                .get(tm)
                .filter(|t| t.registered)
                .ok_or_else(|| DrainError::Unknown(tm.to_string()))?;
            (t.client.clone(), epoch)
        };
        let req = proto::DrainRequest {
            epoch: epoch.0,
            draining: on,
        };
        match tokio::time::timeout(Duration::from_secs(10), client.drain(req)).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => {
                return Err(DrainError::Unreachable(format!(
                    "TaskManager {tm} refused: {}",
                    e.message()
                )));
            }
            Err(_) => {
                return Err(DrainError::Unreachable(format!(
                    "TaskManager {tm} did not answer within 10 s"
                )));
            }
        }
        if let Some(t) = self.lock().tms.get_mut(tm) {
            t.draining = on;
        }
        self.bump();
        Ok(())
    }

    /// Resolves when the pool changed (a registration, a loss, freed slots).
    pub(crate) fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }
}

/// Whether the parts of one deployment run every subtask of the job: a
/// lone part without a subtask list is the whole job.
fn covers_every_subtask(parts: &[Found]) -> bool {
    match parts {
        [] => false,
        [one] if one.status.subtasks.is_empty() => true,
        parts => {
            let p = parts[0].status.parallelism;
            let mut seen = vec![false; p as usize];
            for f in parts {
                if f.status.subtasks.is_empty() || f.status.parallelism != p {
                    return false;
                }
                for &j in &f.status.subtasks {
                    match seen.get_mut(j as usize) {
                        Some(x) if !*x => *x = true,
                        _ => return false,
                    }
                }
            }
            seen.iter().all(|x| *x)
        }
    }
}

/// Where a job needing `need` slots goes, given each registered
/// TaskManager's (id, free slots, has an exchange port): (id, slots) per
/// part. Pure, so the rules are tested on their own.
pub(crate) fn plan_placement(
    free: &[(String, u32, bool)],
    need: u32,
    strategy: Strategy,
) -> Option<Vec<(String, u32)>> {
    let whole = free.iter().filter(|(_, f, _)| *f >= need);
    let one = match strategy {
        // Most free slots; ties by id, for a stable choice.
        Strategy::Spread => whole.max_by(|a, b| a.1.cmp(&b.1).then(b.0.cmp(&a.0))),
        // Fewest free slots that still hold the job.
        Strategy::Pack => whole.min_by(|a, b| a.1.cmp(&b.1).then(a.0.cmp(&b.0))),
    };
    if let Some((id, _, _)) = one {
        return Some(vec![(id.clone(), need)]);
    }
    // Split: the fewest TaskManagers that hold it, most free first.
    let mut split: Vec<&(String, u32, bool)> =
        free.iter().filter(|(_, f, x)| *x && *f > 0).collect();
    split.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    let mut left = need;
    let mut out = Vec::new();
    for (id, f, _) in split {
        if left == 0 {
            break;
        }
        let take = (*f).min(left);
        out.push((id.clone(), take));
        left -= take;
    }
    (left == 0 && need > 0).then_some(out)
}

fn failure(msg: &str) -> RemoteEvent {
    RemoteEvent::Task(TaskEvent::Failed {
        task: TaskId {
            stage: 0,
            subtask: 0,
        },
        error: TaskError::Transient(msg.to_string()),
    })
}

fn fail_routes(s: &mut PoolState, tm: &str, why: &str) {
    let lost: Vec<String> = s
        .routes
        .iter()
        .filter(|(_, r)| r.tm == tm)
        .map(|(d, _)| d.clone())
        .collect();
    for d in lost {
        if let Some(r) = s.routes.remove(&d) {
            let _ = r.tx.send((r.part, failure(why)));
        }
    }
}

/// Applies an event to a deployment's reported status (unclaimed
/// deployments, between the registration and their adoption).
fn apply(d: &mut proto::DeploymentStatus, e: proto::deployment_event::Event) {
    use proto::deployment_event::Event;
    match e {
        Event::SourceEnded(t) => d.sources_ended.push(t),
        Event::Stopped(t) => d.stopped.push(t),
        Event::Failed(f) => d.failure = Some(f),
        Event::Counters(c) => d.counters = Some(c),
        Event::Ack(a) => d.last_barrier = d.last_barrier.max(a.checkpoint),
        // The checkpoint it declined fails; the new leader triggers anew.
        Event::Declined(_) => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tms(free: &[(&str, u32, bool)]) -> Vec<(String, u32, bool)> {
        free.iter()
            .map(|(i, f, x)| (i.to_string(), *f, *x))
            .collect()
    }

    #[test]
    fn a_job_stays_whole_when_one_taskmanager_holds_it() {
        let free = tms(&[("a", 2, true), ("b", 6, true), ("c", 4, true)]);
        assert_eq!(
            plan_placement(&free, 3, Strategy::Spread),
            Some(vec![("b".into(), 3)])
        );
        // Pack: the fullest one that still holds it.
        assert_eq!(
            plan_placement(&free, 3, Strategy::Pack),
            Some(vec![("c".into(), 3)])
        );
        assert_eq!(
            plan_placement(&free, 2, Strategy::Pack),
            Some(vec![("a".into(), 2)])
        );
        // Ties go by id, both ways.
        let even = tms(&[("b", 4, true), ("a", 4, true)]);
        assert_eq!(
            plan_placement(&even, 1, Strategy::Spread),
            Some(vec![("a".into(), 1)])
        );
        assert_eq!(
            plan_placement(&even, 1, Strategy::Pack),
            Some(vec![("a".into(), 1)])
        );
    }

    #[test]
    fn a_job_no_taskmanager_holds_is_split_over_the_fewest() {
        let free = tms(&[
            ("a", 2, true),
            ("b", 3, true),
            ("c", 1, true),
            ("d", 0, true),
        ]);
        for strategy in [Strategy::Spread, Strategy::Pack] {
            assert_eq!(
                plan_placement(&free, 5, strategy),
                Some(vec![("b".into(), 3), ("a".into(), 2)])
            );
            assert_eq!(
                plan_placement(&free, 6, strategy),
                Some(vec![("b".into(), 3), ("a".into(), 2), ("c".into(), 1)])
            );
            // The region as a whole lacks slots: wait.
            assert_eq!(plan_placement(&free, 7, strategy), None);
        }
    }

    #[test]
    fn only_taskmanagers_with_an_exchange_port_take_parts() {
        let free = tms(&[("old", 3, false), ("a", 2, true), ("b", 2, true)]);
        // Whole on the one without an exchange port is fine.
        assert_eq!(
            plan_placement(&free, 3, Strategy::Spread),
            Some(vec![("old".into(), 3)])
        );
        assert_eq!(
            plan_placement(&free, 4, Strategy::Spread),
            Some(vec![("a".into(), 2), ("b".into(), 2)])
        );
        assert_eq!(plan_placement(&free, 5, Strategy::Spread), None);
        assert_eq!(plan_placement(&[], 1, Strategy::Spread), None);
    }

    fn found(tm: &str, parallelism: u32, subtasks: &[u32]) -> Found {
        let endpoint = tonic::transport::Endpoint::from_static("http://127.0.0.1:1");
        Found {
            tm: tm.into(),
            client: TaskManagerClient::new(endpoint.connect_lazy()),
            status: proto::DeploymentStatus {
                parallelism,
                subtasks: subtasks.to_vec(),
                ..Default::default()
            },
        }
    }

    #[tokio::test]
    async fn a_deployment_is_adopted_only_with_every_subtask_covered_once() {
        assert!(covers_every_subtask(&[found("a", 2, &[])]));
        assert!(covers_every_subtask(&[
            found("a", 4, &[0, 1]),
            found("b", 4, &[2, 3])
        ]));
        // A part is missing (its TaskManager is gone).
        assert!(!covers_every_subtask(&[found("a", 4, &[0, 1])]));
        // Overlapping, out of range, or disagreeing parts.
        assert!(!covers_every_subtask(&[
            found("a", 4, &[0, 1, 2]),
            found("b", 4, &[2, 3])
        ]));
        assert!(!covers_every_subtask(&[
            found("a", 2, &[0, 1]),
            found("b", 2, &[2])
        ]));
        assert!(!covers_every_subtask(&[
            found("a", 4, &[0, 1]),
            found("b", 2, &[2, 3])
        ]));
        assert!(!covers_every_subtask(&[]));
    }
}
