//! One deployment of a job as its driver sees it: tasks running in this
//! process (`ferry local`) or on TaskManagers reached over gRPC — the whole
//! job on one, or one part per TaskManager when it is spread over several.
//! The checkpoint coordinator talks to both through [`Deployment`].
//!
//! Invariants: a remote deployment is cancelled only when its job ends or
//! fails here; when the driver lets go for a leader change or a shutdown of
//! this JobManager it is released, and its tasks keep running for the next
//! leader to adopt. Its parts live and die together: a failure of one
//! fails the deployment, and stopping it cancels every part.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use ferry_core::proto;
use ferry_core::{CheckpointId, JmEpoch, RegionEpoch};
use ferry_taskmanager::protocol::{Barrier, TaskCommand, TaskEvent, TaskId};
use ferry_taskmanager::runtime::{Counters, DeployedJob};
use ferry_taskmanager::wire::{RemoteEvent, kind_to_proto};
use tokio::sync::mpsc;

use crate::taskmanagers::{Found, PartEvent, Placement, TaskManagers, TmClient};

/// Bound on one command to a TaskManager.
const RPC_TIMEOUT: Duration = Duration::from_secs(10);

/// The driver's handle on a job's running tasks.
pub(crate) enum Deployment {
    Local(DeployedJob),
    Remote(RemoteDeployment),
}

/// A snapshot of a deployment's counters, readable while it runs.
#[derive(Clone)]
pub(crate) enum LiveCounters {
    Local(Arc<Vec<(TaskId, Arc<ferry_taskmanager::metrics::TaskMetrics>)>>),
    /// Per part.
    Remote(Arc<Mutex<Vec<Counters>>>),
}

impl LiveCounters {
    pub(crate) fn read(&self) -> Counters {
        match self {
            LiveCounters::Local(m) => Counters::of(m),
            LiveCounters::Remote(c) => {
                Counters::combine(&c.lock().unwrap_or_else(|p| p.into_inner()))
            }
        }
    }
}

impl Deployment {
    pub(crate) fn source_count(&self) -> usize {
        match self {
            Deployment::Local(d) => d.sources.len(),
            Deployment::Remote(r) => r.sources,
        }
    }

    pub(crate) fn trigger(&self, barrier: &Barrier) {
        match self {
            Deployment::Local(d) => {
                for s in &d.sources {
                    let _ = s.send(TaskCommand::Trigger(barrier.clone()));
                }
            }
            Deployment::Remote(r) => {
                let _ = r.commands.send(Command::Trigger(barrier.clone()));
            }
        }
    }

    pub(crate) fn complete(&self, id: CheckpointId, region_epoch: RegionEpoch) {
        match self {
            Deployment::Local(d) => {
                for t in &d.all {
                    let _ = t.send(TaskCommand::Complete(id));
                }
            }
            Deployment::Remote(r) => {
                let _ = r.commands.send(Command::Complete(id, region_epoch));
            }
        }
    }

    /// The next task event; `None` once no more can come.
    pub(crate) async fn next_event(&mut self) -> Option<TaskEvent> {
        match self {
            Deployment::Local(d) => d.events.recv().await,
            Deployment::Remote(r) => loop {
                let (part, event) = r.events.recv().await?;
                let mut counters = r.counters.lock().unwrap_or_else(|p| p.into_inner());
                let Some(c) = counters.get_mut(part) else {
                    continue;
                };
                match event {
                    RemoteEvent::Task(e) => {
                        if let TaskEvent::Ack(a) = &e {
                            c.watermark = c.watermark.max(a.watermark);
                        }
                        return Some(e);
                    }
                    RemoteEvent::Counters(n) => *c = n,
                }
            },
        }
    }

    pub(crate) fn counters(&self) -> Counters {
        self.live().read()
    }

    pub(crate) fn live(&self) -> LiveCounters {
        match self {
            Deployment::Local(d) => LiveCounters::Local(Arc::new(d.metrics.clone())),
            Deployment::Remote(r) => LiveCounters::Remote(r.counters.clone()),
        }
    }

    /// Where a remote deployment runs.
    pub(crate) fn location(&self) -> Option<Location> {
        match self {
            Deployment::Local(_) => None,
            Deployment::Remote(r) => Some(Location {
                id: r.id.clone(),
                parts: r
                    .parts
                    .iter()
                    .map(|p| (p.tm.clone(), p.subtasks.clone()))
                    .collect(),
            }),
        }
    }

    /// Stops every task and waits for them (the job ended or failed here).
    pub(crate) async fn stop(self) {
        match self {
            Deployment::Local(d) => d.shutdown().await,
            Deployment::Remote(r) => r.cancel().await,
        }
    }

    /// Lets go without stopping remote tasks (leader change, shutdown of
    /// this JobManager); local tasks end with this process's driver.
    pub(crate) async fn release(self) {
        match self {
            Deployment::Local(d) => d.shutdown().await,
            Deployment::Remote(r) => {
                for p in &r.parts {
                    tracing::info!(deployment = %p.id, taskmanager = %p.tm, "released the deployment: its tasks keep running for the next leader");
                    r.pool.unroute(&p.id);
                }
            }
        }
    }
}

/// Where a remote deployment runs: its id and, per part, the
/// TaskManager and the subtasks it runs (empty: every subtask).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Location {
    pub id: String,
    pub parts: Vec<(String, Vec<u32>)>,
}

#[derive(Clone)]
enum Command {
    Trigger(Barrier),
    /// Commit a checkpoint of a region epoch.
    Complete(CheckpointId, RegionEpoch),
}

/// One part of a remote deployment: the tasks on one TaskManager.
pub(crate) struct PartHandle {
    pub(crate) tm: String,
    /// The part's deployment id on that TaskManager.
    pub(crate) id: String,
    /// Subtasks it runs (empty: all).
    pub(crate) subtasks: Vec<u32>,
    client: TmClient,
}

/// A job's tasks on one TaskManager or, in parts, on several.
pub(crate) struct RemoteDeployment {
    pool: Arc<TaskManagers>,
    /// The deployment id (shared by its parts).
    pub(crate) id: String,
    pub(crate) parts: Vec<PartHandle>,
    epoch: JmEpoch,
    sources: usize,
    events: mpsc::UnboundedReceiver<PartEvent>,
    counters: Arc<Mutex<Vec<Counters>>>,
    commands: mpsc::UnboundedSender<Command>,
}

impl RemoteDeployment {
    fn new(
        pool: Arc<TaskManagers>,
        id: String,
        parts: Vec<PartHandle>,
        epoch: JmEpoch,
        sources: usize,
        counters: Vec<Counters>,
        events: mpsc::UnboundedReceiver<PartEvent>,
    ) -> Self {
        let (tx, mut rx) = mpsc::unbounded_channel::<Command>();
        // One sender per deployment keeps commands in order on every part;
        // the parts hear each command at the same time.
        let targets: Vec<(String, String, TmClient)> = parts
            .iter()
            .map(|p| (p.tm.clone(), p.id.clone(), p.client.clone()))
            .collect();
        tokio::spawn(async move {
            while let Some(cmd) = rx.recv().await {
                let sends = targets.iter().map(|(t, dep, c)| {
                    let (mut c, cmd) = (c.clone(), cmd.clone());
                    async move {
                        let (what, r) = send_command(&mut c, epoch, dep, cmd).await;
                        match r {
                            Ok(Ok(())) => {}
                            Ok(Err(e)) => {
                                tracing::warn!(deployment = %dep, taskmanager = %t, "{what} failed: {}", e.message())
                            }
                            Err(_) => {
                                tracing::warn!(deployment = %dep, taskmanager = %t, "{what} timed out")
                            }
                        }
                    }
                });
                futures::future::join_all(sends).await;
            }
        });
        Self {
            pool,
            id,
            parts,
            epoch,
            sources,
            events,
            counters: Arc::new(Mutex::new(counters)),
            commands: tx,
        }
    }

    /// Takes over a deployment claimed from the pool (after a leader
    /// change), every part of it: its tasks go on.
    pub(crate) fn adopt(
        pool: &Arc<TaskManagers>,
        found: Vec<Found>,
        events: mpsc::UnboundedReceiver<PartEvent>,
        epoch: JmEpoch,
    ) -> Self {
        let id = found
            .first()
            .map(|f| {
                if f.status.group.is_empty() {
                    f.status.deployment.clone()
                } else {
                    f.status.group.clone()
                }
            })
            .unwrap_or_default();
        let sources = found.iter().map(|f| f.status.sources as usize).sum();
        let counters = found
            .iter()
            .map(|f| f.status.counters.unwrap_or_default().into())
            .collect();
        let parts = found
            .into_iter()
            .map(|f| PartHandle {
                tm: f.tm,
                id: f.status.deployment,
                subtasks: f.status.subtasks,
                client: f.client,
            })
            .collect();
        Self::new(pool.clone(), id, parts, epoch, sources, counters, events)
    }

    /// Starts a new deployment on the placed TaskManagers: one part per
    /// placement, all at once (the exchange channels between the parts wait
    /// for each other). If any part fails to start, the others are
    /// cancelled.
    pub(crate) async fn deploy(
        pool: &Arc<TaskManagers>,
        placed: Vec<Placement>,
        epoch: JmEpoch,
        req: proto::DeployRequest,
    ) -> Result<Self, tonic::Status> {
        let job = req.job_id.parse().unwrap_or_default();
        let id = req.deployment.clone();
        let split = placed.len() > 1;
        // Subtasks in order over the parts, and each one's exchange URL.
        let mut parts = Vec::new();
        let mut homes = Vec::new();
        let mut next = 0u32;
        for (k, p) in placed.iter().enumerate() {
            let subtasks: Vec<u32> = (next..next + p.slots).collect();
            next += p.slots;
            homes.extend(
                subtasks
                    .iter()
                    .map(|_| p.exchange.clone().unwrap_or_default()),
            );
            parts.push(PartHandle {
                tm: p.tm.clone(),
                id: if split {
                    format!("{id}-p{k}")
                } else {
                    id.clone()
                },
                subtasks: if split { subtasks } else { Vec::new() },
                client: p.client.clone(),
            });
        }
        let (tx, rx) = mpsc::unbounded_channel();
        // Route before deploying: events may come before the reply.
        for (k, (part, p)) in parts.iter().zip(&placed).enumerate() {
            pool.route(&part.tm, job, &part.id, p.slots, k, &tx);
        }
        let starts = parts.iter().map(|part| {
            let mut client = part.client.clone();
            let mut req = req.clone();
            req.deployment = part.id.clone();
            if split {
                req.subtasks = part.subtasks.clone();
                req.exchange_urls = homes.clone();
                req.group = id.clone();
            }
            async move {
                match tokio::time::timeout(Duration::from_secs(60), client.deploy(req)).await {
                    Ok(r) => r.map(|r| r.into_inner()),
                    Err(_) => Err(tonic::Status::deadline_exceeded(format!(
                        "TaskManager {} did not answer the deployment within 60 s",
                        part.tm
                    ))),
                }
            }
        });
        let replies = futures::future::join_all(starts).await;
        for p in &placed {
            pool.unreserve(&p.tm, p.slots);
        }
        let mut failed = None;
        let mut sources = 0;
        let mut counters = Vec::new();
        for (part, r) in parts.iter().zip(replies) {
            match r {
                Ok(reply) => {
                    sources += reply.sources as usize;
                    counters.push(reply.counters.unwrap_or_default().into());
                }
                Err(e) => {
                    let e = if split {
                        tonic::Status::new(
                            e.code(),
                            format!("part on TaskManager {}: {}", part.tm, e.message()),
                        )
                    } else {
                        e
                    };
                    failed.get_or_insert(e);
                }
            }
        }
        let deployment = Self::new(pool.clone(), id, parts, epoch, sources, counters, rx);
        match failed {
            None => Ok(deployment),
            Some(e) => {
                deployment.cancel().await;
                Err(e)
            }
        }
    }

    /// The part ids (to tell the pool which deployment to keep).
    pub(crate) fn part_ids(&self) -> Vec<String> {
        self.parts.iter().map(|p| p.id.clone()).collect()
    }

    /// The TaskManagers it runs on.
    pub(crate) fn taskmanagers(&self) -> Vec<String> {
        self.parts.iter().map(|p| p.tm.clone()).collect()
    }

    async fn cancel(self) {
        let cancels = self.parts.iter().map(|p| {
            let pool = &self.pool;
            let mut client = p.client.clone();
            let req = proto::CancelRequest {
                epoch: self.epoch.0,
                deployment: p.id.clone(),
            };
            async move {
                match tokio::time::timeout(RPC_TIMEOUT, client.cancel(req)).await {
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => {
                        tracing::warn!(deployment = %p.id, taskmanager = %p.tm, "cancelling failed: {}", e.message())
                    }
                    Err(_) => {
                        tracing::warn!(deployment = %p.id, taskmanager = %p.tm, "cancelling timed out")
                    }
                }
                pool.forget(&p.tm, &p.id);
            }
        });
        futures::future::join_all(cancels).await;
    }
}

/// Sends one command to one part; (what it was, the outcome).
async fn send_command(
    c: &mut TmClient,
    epoch: JmEpoch,
    deployment: &str,
    cmd: Command,
) -> (
    String,
    Result<Result<(), tonic::Status>, tokio::time::error::Elapsed>,
) {
    match cmd {
        Command::Trigger(b) => (
            format!("triggering checkpoint {}", b.id),
            tokio::time::timeout(
                RPC_TIMEOUT,
                c.trigger(proto::TriggerRequest {
                    epoch: epoch.0,
                    deployment: deployment.to_string(),
                    checkpoint: b.id.0,
                    kind: kind_to_proto(b.kind) as i32,
                    close_txn: b.close_txn,
                    stop: b.stop,
                    dir: b.dir.url().to_string(),
                }),
            )
            .await
            .map(|r| r.map(drop)),
        ),
        Command::Complete(id, region_epoch) => (
            format!("completing checkpoint {id}"),
            tokio::time::timeout(
                RPC_TIMEOUT,
                c.complete(proto::CompleteRequest {
                    epoch: epoch.0,
                    deployment: deployment.to_string(),
                    checkpoint: id.0,
                    region_epoch: region_epoch.0,
                }),
            )
            .await
            .map(|r| r.map(drop)),
        ),
    }
}
