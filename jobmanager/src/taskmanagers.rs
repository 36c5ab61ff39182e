//! The leader's view of its region's TaskManagers: it finds them in the
//! membership records, attaches to each at its fencing epoch (the
//! TaskManager answers with its registration: slots and running
//! deployments), routes their task events to the job drivers, places new
//! deployments on free slots, and turns a TaskManager whose heartbeat
//! expired into a failure of every deployment it ran.
//!
//! Invariant: the pool acts only for the epoch the leader holds; when the
//! leadership is lost or changes, every attachment is dropped and the
//! TaskManagers keep their tasks running for the next leader to adopt.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

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
    stop: CancellationToken,
}

impl Tm {
    fn free(&self) -> u32 {
        self.slots
            .saturating_sub(self.used.values().sum::<u32>() + self.reserved)
    }
}

struct Route {
    tm: String,
    job: JobId,
    tx: mpsc::UnboundedSender<RemoteEvent>,
}

/// A deployment found running on a TaskManager.
pub(crate) struct Found {
    pub tm: String,
    pub client: TmClient,
    pub status: proto::DeploymentStatus,
}

/// Where a new deployment goes.
pub(crate) struct Placement {
    pub tm: String,
    pub client: TmClient,
    pub slots: u32,
}

/// Free capacity, for "waiting for slots" messages.
#[derive(Clone, Copy, Debug)]
pub struct Capacity {
    pub taskmanagers: usize,
    pub slots: u32,
    pub free: u32,
}

impl TaskManagers {
    pub fn new(
        region: String,
        instance: String,
        backend: Arc<dyn Coordination>,
        expiry: Duration,
        interval: Duration,
        tls: Option<ferry_core::tls::Connector>,
    ) -> Arc<Self> {
        Arc::new(Self {
            region,
            instance,
            backend,
            expiry,
            interval,
            tls,
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
        let live: HashMap<String, (String, u32)> = members
            .into_iter()
            .filter(|m| m.member.role == TASKMANAGER_ROLE && m.member.region == self.region)
            .map(|m| (m.member.id, (m.member.address, m.member.slots)))
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
        for (id, (address, slots)) in live {
            if let Some(tm) = s.tms.get(&id)
                && tm.address == address
            {
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
                    slots,
                    client: TaskManagerClient::new(channel),
                    registered: false,
                    detached_since: Some(std::time::Instant::now()),
                    reported: Vec::new(),
                    used: HashMap::new(),
                    reserved: 0,
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
                        let _ = r.tx.send(failure(&format!(
                            "TaskManager {tm} no longer runs deployment {d} (it restarted)"
                        )));
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
                        let _ = route.tx.send(e);
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

    /// Claims the newest healthy deployment of `job` running on a
    /// TaskManager: from now on its events go to the returned receiver,
    /// starting with a replay of what it reported before (ended sources,
    /// stopped tasks) — one lock, so nothing falls in between.
    pub(crate) fn claim(
        &self,
        job: &JobId,
        region_epoch: RegionEpoch,
    ) -> Option<(Found, mpsc::UnboundedReceiver<RemoteEvent>)> {
        let mut s = self.lock();
        let id = job.to_string();
        let stale: Vec<(String, String, u64)> = s
            .tms
            .iter()
            .flat_map(|(tm, t)| t.reported.iter().map(move |d| (tm, d)))
            .filter(|(_, d)| d.job_id == id && RegionEpoch(d.region_epoch) != region_epoch)
            .map(|(tm, d)| (tm.clone(), d.deployment.clone(), d.region_epoch))
            .collect();
        for (tm, d, e) in &stale {
            tracing::warn!(job = %job, taskmanager = %tm, deployment = %d, deployment_region_epoch = e, %region_epoch, "not adopting tasks started under another region epoch: they are stopped and the job restores from its newest checkpoint");
        }
        let found = s
            .tms
            .iter()
            .filter(|(_, t)| t.registered)
            .flat_map(|(tm, t)| t.reported.iter().map(move |d| (tm, t, d)))
            .filter(|(_, t, d)| {
                d.job_id == id
                    && d.failure.is_none()
                    && RegionEpoch(d.region_epoch) == region_epoch
                    && t.used.contains_key(&d.deployment)
            })
            .max_by_key(|(_, _, d)| (d.epoch, d.attempt))
            .map(|(tm, t, d)| Found {
                tm: tm.clone(),
                client: t.client.clone(),
                status: d.clone(),
            })?;
        let (tx, rx) = mpsc::unbounded_channel();
        let st = &found.status;
        for t in &st.sources_ended {
            let _ = tx.send(RemoteEvent::Task(TaskEvent::SourceEnded((*t).into())));
        }
        for t in &st.stopped {
            let _ = tx.send(RemoteEvent::Task(TaskEvent::Stopped((*t).into())));
        }
        s.routes.insert(
            st.deployment.clone(),
            Route {
                tm: found.tm.clone(),
                job: *job,
                tx,
            },
        );
        Some((found, rx))
    }

    /// Routes a deployment's events to its driver.
    pub(crate) fn route(
        &self,
        tm: &str,
        job: JobId,
        deployment: &str,
        slots: u32,
    ) -> mpsc::UnboundedReceiver<RemoteEvent> {
        let (tx, rx) = mpsc::unbounded_channel();
        let mut s = self.lock();
        match s.tms.get_mut(tm) {
            Some(t) => {
                t.used.insert(deployment.to_string(), slots);
            }
            None => {
                let _ = tx.send(failure(&format!("TaskManager {tm} is gone")));
            }
        }
        s.routes.insert(
            deployment.to_string(),
            Route {
                tm: tm.to_string(),
                job,
                tx,
            },
        );
        rx
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

    /// Every other deployment of `job` on any TaskManager is stopped.
    pub(crate) fn cancel_others(&self, job: &JobId, keep: &str) {
        let id = job.to_string();
        let others: Vec<(String, String)> = {
            let s = self.lock();
            s.tms
                .iter()
                .flat_map(|(tm, t)| t.reported.iter().map(move |d| (tm, d)))
                .filter(|(_, d)| d.job_id == id && d.deployment != keep)
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

    /// Reserves `slots` on the TaskManager with the most free slots.
    pub(crate) fn place(&self, slots: u32) -> Option<Placement> {
        let mut s = self.lock();
        let (id, t) = s
            .tms
            .iter_mut()
            .filter(|(_, t)| t.registered && t.free() >= slots)
            .max_by(|a, b| a.1.free().cmp(&b.1.free()).then(b.0.cmp(a.0)))?;
        t.reserved += slots;
        Some(Placement {
            tm: id.clone(),
            client: t.client.clone(),
            slots,
        })
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
        Capacity {
            taskmanagers: reg.clone().count(),
            slots: reg.clone().map(|t| t.slots).sum(),
            free: reg.map(|t| t.free()).sum(),
        }
    }

    /// Resolves when the pool changed (a registration, a loss, freed slots).
    pub(crate) fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }
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
            let _ = r.tx.send(failure(why));
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
