//! One deployment of a job as its driver sees it: tasks running in this
//! process (`ferry local`) or on a TaskManager reached over gRPC. The
//! checkpoint coordinator talks to both through [`Deployment`].
//!
//! Invariant: a remote deployment is cancelled only when its job ends or
//! fails here; when the driver lets go for a leader change or a shutdown of
//! this JobManager it is released, and its tasks keep running for the next
//! leader to adopt.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use ferry_core::proto;
use ferry_core::{CheckpointId, JmEpoch, RegionEpoch};
use ferry_taskmanager::protocol::{Barrier, TaskCommand, TaskEvent, TaskId};
use ferry_taskmanager::runtime::{Counters, DeployedJob};
use ferry_taskmanager::wire::{RemoteEvent, kind_to_proto};
use tokio::sync::mpsc;

use crate::taskmanagers::{Found, Placement, TaskManagers, TmClient};

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
    Remote(Arc<Mutex<Counters>>),
}

impl LiveCounters {
    pub(crate) fn read(&self) -> Counters {
        match self {
            LiveCounters::Local(m) => Counters::of(m),
            LiveCounters::Remote(c) => *c.lock().unwrap_or_else(|p| p.into_inner()),
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
                match r.events.recv().await? {
                    RemoteEvent::Task(e) => {
                        if let TaskEvent::Ack(a) = &e {
                            let mut c = r.counters.lock().unwrap_or_else(|p| p.into_inner());
                            c.watermark = c.watermark.max(a.watermark);
                        }
                        return Some(e);
                    }
                    RemoteEvent::Counters(c) => {
                        *r.counters.lock().unwrap_or_else(|p| p.into_inner()) = c;
                    }
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

    /// The TaskManager and deployment id (remote deployments).
    pub(crate) fn location(&self) -> Option<(String, String)> {
        match self {
            Deployment::Local(_) => None,
            Deployment::Remote(r) => Some((r.tm.clone(), r.id.clone())),
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
                tracing::info!(deployment = %r.id, taskmanager = %r.tm, "released the deployment: its tasks keep running for the next leader");
                r.pool.unroute(&r.id);
            }
        }
    }
}

enum Command {
    Trigger(Barrier),
    /// Commit a checkpoint of a region epoch.
    Complete(CheckpointId, RegionEpoch),
}

/// A job's tasks on one TaskManager.
pub(crate) struct RemoteDeployment {
    pool: Arc<TaskManagers>,
    pub(crate) tm: String,
    pub(crate) id: String,
    client: TmClient,
    epoch: JmEpoch,
    sources: usize,
    events: mpsc::UnboundedReceiver<RemoteEvent>,
    counters: Arc<Mutex<Counters>>,
    commands: mpsc::UnboundedSender<Command>,
}

impl RemoteDeployment {
    fn new(
        pool: Arc<TaskManagers>,
        (tm, client): (String, TmClient),
        id: String,
        epoch: JmEpoch,
        sources: usize,
        counters: Counters,
        events: mpsc::UnboundedReceiver<RemoteEvent>,
    ) -> Self {
        let (tx, mut rx) = mpsc::unbounded_channel::<Command>();
        // One sender per deployment keeps commands in order.
        let (mut c, dep, t) = (client.clone(), id.clone(), tm.clone());
        tokio::spawn(async move {
            while let Some(cmd) = rx.recv().await {
                let (what, r) = match cmd {
                    Command::Trigger(b) => (
                        format!("triggering checkpoint {}", b.id),
                        tokio::time::timeout(
                            RPC_TIMEOUT,
                            c.trigger(proto::TriggerRequest {
                                epoch: epoch.0,
                                deployment: dep.clone(),
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
                                deployment: dep.clone(),
                                checkpoint: id.0,
                                region_epoch: region_epoch.0,
                            }),
                        )
                        .await
                        .map(|r| r.map(drop)),
                    ),
                };
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
        Self {
            pool,
            tm,
            id,
            client,
            epoch,
            sources,
            events,
            counters: Arc::new(Mutex::new(counters)),
            commands: tx,
        }
    }

    /// Takes over a deployment claimed from the pool (after a leader
    /// change): its tasks go on.
    pub(crate) fn adopt(
        pool: &Arc<TaskManagers>,
        found: Found,
        events: mpsc::UnboundedReceiver<RemoteEvent>,
        epoch: JmEpoch,
    ) -> Self {
        let st = &found.status;
        Self::new(
            pool.clone(),
            (found.tm.clone(), found.client.clone()),
            st.deployment.clone(),
            epoch,
            st.sources as usize,
            st.counters.unwrap_or_default().into(),
            events,
        )
    }

    /// Starts a new deployment on the placed TaskManager.
    pub(crate) async fn deploy(
        pool: &Arc<TaskManagers>,
        placed: Placement,
        epoch: JmEpoch,
        req: proto::DeployRequest,
    ) -> Result<Self, tonic::Status> {
        let mut client = placed.client.clone();
        let job = req.job_id.parse().unwrap_or_default();
        let id = req.deployment.clone();
        // Route before deploying: events may come before the reply.
        let rx = pool.route(&placed.tm, job, &id, placed.slots);
        let r = tokio::time::timeout(Duration::from_secs(60), client.deploy(req)).await;
        pool.unreserve(&placed.tm, placed.slots);
        let reply = match r {
            Ok(Ok(r)) => r.into_inner(),
            Ok(Err(e)) => {
                pool.forget(&placed.tm, &id);
                return Err(e);
            }
            Err(_) => {
                pool.forget(&placed.tm, &id);
                return Err(tonic::Status::deadline_exceeded(
                    "the TaskManager did not answer the deployment within 60 s",
                ));
            }
        };
        Ok(Self::new(
            pool.clone(),
            (placed.tm, placed.client),
            id,
            epoch,
            reply.sources as usize,
            reply.counters.unwrap_or_default().into(),
            rx,
        ))
    }

    async fn cancel(self) {
        let r = tokio::time::timeout(
            RPC_TIMEOUT,
            self.client.clone().cancel(proto::CancelRequest {
                epoch: self.epoch.0,
                deployment: self.id.clone(),
            }),
        )
        .await;
        match r {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => {
                tracing::warn!(deployment = %self.id, taskmanager = %self.tm, "cancelling failed: {}", e.message())
            }
            Err(_) => {
                tracing::warn!(deployment = %self.id, taskmanager = %self.tm, "cancelling timed out")
            }
        }
        self.pool.forget(&self.tm, &self.id);
    }
}
