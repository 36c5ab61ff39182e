//! The job driver: runs one job from submission (or adoption) until it
//! ends. Each round deploys the job's tasks (adopting ones a previous
//! leader left running, or deploying anew from the snapshot to restore),
//! runs the deployment (`attempt`), and after a failure restarts it from
//! its newest verified checkpoint as the restart strategy decides.
//!
//! Invariant: a job has at most one deployment at a time: the next one is
//! deployed (or adopted) only after the previous one was stopped or
//! released; a restart restores from the newest snapshot that verifies
//! (or, before the first checkpoint, from the savepoint the run started
//! from).

use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry_core::CheckpointId;
use ferry_core::manifest::{
    VerifiedCheckpoint, find_restorable, find_restorable_checked, read_verified, snapshot_dir,
};
use ferry_core::storage::StorageLocation;
use ferry_taskmanager::runtime::{JobPlan, deploy};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::attempt::{AttemptCtx, Outcome, run_attempt};
use crate::checkpoint::{newest_lineage, next_checkpoint_id};
use crate::deployment::{Deployment, RemoteDeployment};
use crate::error::JmError;
use crate::job::{JobCommand, JobEntry};
use crate::metrics::Metrics;
use crate::model::{SubmitOptions, manifest_info};
use crate::restart::{Decision, RestartPolicy};
use crate::state::JobState;

/// Where the next deployment restores from.
enum RestoreFrom {
    Nothing,
    Savepoint(String),
    LatestCheckpoint,
}

/// First and longest wait before reading checkpoints again from a store
/// that could not be reached.
const STORE_RETRY_FIRST: Duration = Duration::from_secs(1);
const STORE_RETRY_MAX: Duration = Duration::from_secs(30);

/// Drives one job until it ends.
pub(crate) async fn drive(
    job: Arc<JobEntry>,
    mut cmds: mpsc::UnboundedReceiver<JobCommand>,
    opts: SubmitOptions,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) {
    let plan = match JobPlan::new(&job.spec) {
        Ok(p) => p,
        Err(e) => {
            job.set_state(JobState::Failed, Some(format!("invalid job: {e}")));
            return;
        }
    };
    let mut policy = RestartPolicy::new(job.spec.spec.restart_strategy.clone());
    let mut restore_from = match (&opts.from_savepoint, opts.resume) {
        (Some(p), _) => RestoreFrom::Savepoint(p.clone()),
        (None, true) => RestoreFrom::LatestCheckpoint,
        (None, false) => RestoreFrom::Nothing,
    };
    let labels = Metrics::job(&job.id.to_string());
    metrics.start_job(&labels);
    // Only the first deployment of a resumed job can be an adoption.
    let mut try_adopt = opts.resume;
    // The TaskManager a move asked for, for the next deployment.
    let mut prefer: Option<String> = None;
    let mut store_wait = STORE_RETRY_FIRST;
    let mut restore_started = Instant::now();
    loop {
        if job.abandon.is_cancelled() {
            tracing::info!(job = %job.id, "leadership lost: no longer driving the job");
            return;
        }
        // A new leader first looks for the job's tasks still running on a
        // TaskManager and adopts them: no restart, no replay.
        let adopted = match job.pool() {
            Some(pool) if std::mem::take(&mut try_adopt) => adopt(&job, &pool).await,
            _ => None,
        };
        let (restored, deployment) = match adopted {
            Some((d, last_barrier)) => {
                // The adopted run goes on in the lineage its newest
                // checkpoint records.
                *job.restored_from.lock().unwrap_or_else(|p| p.into_inner()) =
                    newest_lineage(&job).await;
                let next = match next_checkpoint_id(&job, None).await {
                    Ok(n) => n,
                    Err(e) => {
                        job.set_state(JobState::Failed, Some(e.to_string()));
                        return;
                    }
                };
                (None, Ok((d, next.max(CheckpointId(last_barrier).next()))))
            }
            None => {
                restore_started = Instant::now();
                let restored = match load_restore(&job, &plan, &restore_from).await {
                    Ok(r) => {
                        store_wait = STORE_RETRY_FIRST;
                        r
                    }
                    // The store may come back: wait for it, however long,
                    // without spending restart attempts.
                    Err(JmError::Storage(e)) if e.is_transient() => {
                        tracing::warn!(job = %job.id, "cannot read the job's checkpoints: {}; retrying in {:?}", e.describe(), store_wait);
                        job.set_state(
                            JobState::Restarting,
                            Some(format!(
                                "waiting for the checkpoint store: {}; retrying in {} s",
                                e.describe(),
                                store_wait.as_secs()
                            )),
                        );
                        if !pause(&job, store_wait, &mut cmds, &shutdown).await {
                            return;
                        }
                        store_wait = (store_wait * 2).min(STORE_RETRY_MAX);
                        continue;
                    }
                    Err(e) => {
                        let why = match &e {
                            JmError::Storage(c) => c.describe(),
                            e => e.to_string(),
                        };
                        job.set_state(JobState::Failed, Some(why));
                        reject_pending_commands(&mut cmds);
                        return;
                    }
                };
                crate::checkpoint::abort_incomplete(
                    &job,
                    restored.as_ref().map(|c| c.manifest.checkpoint_id),
                )
                .await;
                // A job whose newest snapshot is its final one has
                // finished (e.g. in the region it ran in before a
                // failover): nothing is left to run, nothing restarts.
                if let Some(cp) = restored.as_ref().filter(|c| c.manifest.finished) {
                    tracing::info!(job = %job.id, checkpoint = %cp.manifest.checkpoint_id, "the job's newest checkpoint is its final one: it has finished, nothing to run");
                    job.status
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .last_checkpoint = Some(manifest_info(
                        &cp.manifest,
                        &restored_dir(&job, cp, &restore_from),
                    ));
                    job.set_state(JobState::Finished, None);
                    reject_pending_commands(&mut cmds);
                    return;
                }
                *job.restored_from.lock().unwrap_or_else(|p| p.into_inner()) =
                    restored.as_ref().map(|c| c.manifest.checkpoint_id.0);
                let next_id = match next_checkpoint_id(&job, restored.as_ref()).await {
                    Ok(n) => n,
                    Err(e) => {
                        job.set_state(JobState::Failed, Some(e.to_string()));
                        return;
                    }
                };
                let started = start_tasks(
                    &job,
                    &plan,
                    restored.as_ref(),
                    &restore_from,
                    prefer.take(),
                    &mut cmds,
                    &shutdown,
                )
                .await
                .map(|d| (d, next_id));
                (restored, started)
            }
        };
        let started = Instant::now();
        let outcome = match deployment {
            Ok((mut deployed, mut next_id)) => {
                *job.live.lock().unwrap_or_else(|p| p.into_inner()) = Some(deployed.live());
                {
                    let mut st = job.status.lock().unwrap_or_else(|p| p.into_inner());
                    st.placement = deployed
                        .location()
                        .and_then(|l| crate::job::Placed::from_location(l, plan.parallelism));
                    if let Some(cp) = &restored {
                        let took = restore_started.elapsed();
                        let bytes = cp.manifest.total_size();
                        tracing::info!(
                            job = %job.id,
                            checkpoint = %cp.manifest.checkpoint_id,
                            bytes,
                            ms = took.as_millis() as u64,
                            "restored from checkpoint {} ({:.1} MB of state) in {} ms",
                            cp.manifest.checkpoint_id,
                            bytes as f64 / 1e6,
                            took.as_millis()
                        );
                        st.last_restore = Some(ferry_core::api::RestoreInfo {
                            checkpoint_id: cp.manifest.checkpoint_id.0,
                            size_bytes: bytes,
                            duration_ms: took.as_millis() as u64,
                            restored_at: chrono::Utc::now(),
                        });
                        st.last_checkpoint = Some(manifest_info(
                            &cp.manifest,
                            &restored_dir(&job, cp, &restore_from),
                        ));
                    }
                }
                job.set_state(JobState::Running, None);
                // Counters restart from the restored checkpoint's totals.
                let baseline = match &restored {
                    Some(c) => (c.manifest.records_in, c.manifest.records_out),
                    None => {
                        let c = deployed.counters();
                        (c.records_in, c.records_out)
                    }
                };
                // The restored files (large ones mapped from the spool) are
                // not needed while the job runs.
                drop(restored);
                let ctx = AttemptCtx {
                    job: &job,
                    plan: &plan,
                    metrics: &metrics,
                    shutdown: &shutdown,
                };
                let o = run_attempt(&ctx, baseline, &mut deployed, &mut cmds, &mut next_id).await;
                match o {
                    // Leaving tasks running for the next leader — only on
                    // a pure in-region leader change. A demoted region, or
                    // one whose region lease is no longer confirmed (its
                    // leader was frozen or cut off past half the region
                    // timeout), stops its tasks: the jobs may run in
                    // another region now.
                    Outcome::Abandoned
                        if job.demoting.load(std::sync::atomic::Ordering::SeqCst)
                            || job.region_fence.check().is_err() =>
                    {
                        deployed.stop().await
                    }
                    Outcome::Abandoned | Outcome::Shutdown => deployed.release().await,
                    _ => deployed.stop().await,
                }
                o
            }
            Err(o) => o,
        };
        match outcome {
            Outcome::Finished => {
                job.set_state(JobState::Finished, None);
                return;
            }
            Outcome::Stopped => {
                job.set_state(JobState::Cancelled, None);
                return;
            }
            Outcome::Moved(why, to) => {
                // Not a failure: no restart counted, no delay. The newest
                // snapshot is the savepoint just taken.
                tracing::info!(job = %job.id, "stopped with a savepoint to move ({why}); deploying it again");
                metrics.moves.get_or_create(&labels).inc();
                job.set_state(JobState::Restarting, Some(format!("moving: {why}")));
                restore_from = RestoreFrom::LatestCheckpoint;
                prefer = to;
            }
            Outcome::Abandoned => {
                tracing::info!(job = %job.id, "leadership lost: tasks stopped, nothing written; the next leader resumes the job");
                return;
            }
            Outcome::Shutdown => {
                if !job.state().is_terminal() {
                    job.set_state(JobState::Cancelling, None);
                    job.set_state(JobState::Cancelled, None);
                }
                return;
            }
            Outcome::Unrecoverable(err) => {
                tracing::error!(job = %job.id, "job failed: {err}");
                job.set_state(
                    JobState::Failed,
                    Some(format!(
                        "{err} (not restarted: a restart would fail the same way; fix the cause and run the job again to resume from its last checkpoint)"
                    )),
                );
                reject_pending_commands(&mut cmds);
                return;
            }
            Outcome::Failed(err) => {
                tracing::warn!(job = %job.id, "job failed: {err}");
                match policy.on_failure_random(started.elapsed()) {
                    Decision::GiveUp(why) => {
                        job.set_state(JobState::Failed, Some(format!("{err} ({why})")));
                        reject_pending_commands(&mut cmds);
                        return;
                    }
                    Decision::RestartAfter(delay) => {
                        metrics.restarts.get_or_create(&labels).inc();
                        job.status
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .restarts += 1;
                        job.set_state(
                            JobState::Restarting,
                            Some(format!("{err}; restarting in {} ms", delay.as_millis())),
                        );
                        if !pause(&job, delay, &mut cmds, &shutdown).await {
                            return;
                        }
                        // Restore from the newest checkpoint; if none was taken
                        // yet, from where this run started.
                        restore_from = match restore_from {
                            RestoreFrom::Savepoint(p) => {
                                match find_restorable(&job.root, &job.id).await {
                                    Ok(c) if c.checkpoint.is_some() => {
                                        RestoreFrom::LatestCheckpoint
                                    }
                                    _ => RestoreFrom::Savepoint(p),
                                }
                            }
                            _ => RestoreFrom::LatestCheckpoint,
                        };
                    }
                }
            }
        }
    }
}

/// Waits `delay` before the next deployment, answering commands meanwhile:
/// `false` when the job ended (stopped, shut down, or leadership lost).
async fn pause(
    job: &JobEntry,
    delay: Duration,
    cmds: &mut mpsc::UnboundedReceiver<JobCommand>,
    shutdown: &CancellationToken,
) -> bool {
    let wake = tokio::time::sleep(delay);
    tokio::pin!(wake);
    loop {
        tokio::select! {
            _ = &mut wake => return true,
            _ = job.abandon.cancelled() => return false,
            _ = shutdown.cancelled() => {
                job.set_state(JobState::Cancelling, None);
                job.set_state(JobState::Cancelled, None);
                return false;
            }
            cmd = cmds.recv() => match cmd {
                Some(JobCommand::Stop { reply, .. }) => {
                    job.set_state(JobState::Cancelling, None);
                    job.set_state(JobState::Cancelled, None);
                    let _ = reply.send(Ok(None));
                    return false;
                }
                Some(JobCommand::Savepoint(reply)) => {
                    let _ = reply.send(Err(JmError::WrongState {
                        job: job.id,
                        state: JobState::Restarting,
                        action: "retry once it is RUNNING again".into(),
                    }));
                }
                Some(JobCommand::Move { reply, .. }) => {
                    let _ = reply.send(Err(JmError::WrongState {
                        job: job.id,
                        state: JobState::Restarting,
                        action: "it is not running (it restarts)".into(),
                    }));
                }
                None => {
                    // No more commands can come: just wait.
                    (&mut wake).await;
                    return true;
                }
            }
        }
    }
}

/// The directory a restored snapshot was read from: the savepoint given to
/// start from, or the job's own checkpoint or `savepoint-<n>` directory.
fn restored_dir(job: &JobEntry, cp: &VerifiedCheckpoint, from: &RestoreFrom) -> StorageLocation {
    if let RestoreFrom::Savepoint(p) = from
        && let Ok(l) = ferry_core::manifest::open_snapshot_dir(p)
    {
        return l;
    }
    job.root.child(&snapshot_dir(
        &job.id,
        cp.manifest.kind,
        cp.manifest.checkpoint_id,
    ))
}

/// How long a new leader waits for every TaskManager's registration before
/// deciding a job has no running tasks to adopt.
const ADOPT_WAIT: Duration = Duration::from_secs(5);

/// Claims the job's tasks still running on a TaskManager (after a leader
/// change). Returns the deployment and the highest barrier it has seen.
async fn adopt(
    job: &Arc<JobEntry>,
    pool: &Arc<crate::taskmanagers::TaskManagers>,
) -> Option<(Deployment, u64)> {
    let epoch = job.leadership.fence()?;
    // Until the membership is readable nobody knows which TaskManagers
    // exist, and deploying anew could duplicate running tasks: keep waiting.
    loop {
        tokio::select! {
            listed = pool.wait_registered(epoch, ADOPT_WAIT) => if listed { break },
            _ = job.abandon.cancelled() => return None,
        }
        tracing::warn!(job = %job.id, "cannot read the region's membership yet: waiting to adopt the job's tasks");
    }
    // Only tasks of the current region epoch: tasks started under an
    // older one belong to a lineage another region may have continued.
    let region_epoch = job.region_epoch.get();
    let (found, events) = pool.claim(&job.id, region_epoch)?;
    let last_barrier = found
        .iter()
        .map(|f| f.status.last_barrier)
        .max()
        .unwrap_or(0);
    let attempt = found.first().map(|f| f.status.attempt).unwrap_or(0);
    let d = RemoteDeployment::adopt(pool, found, events, epoch);
    tracing::info!(
        job = %job.id,
        taskmanagers = ?d.taskmanagers(),
        deployment = %d.id,
        attempt,
        "adopted the job's running tasks: no restart"
    );
    pool.cancel_others(&job.id, &d.part_ids());
    Some((Deployment::Remote(d), last_barrier))
}

/// Starts the job's tasks, in this process or on a TaskManager with free
/// slots (waiting for one and saying so in the job's status).
async fn start_tasks(
    job: &Arc<JobEntry>,
    plan: &JobPlan,
    restored: Option<&VerifiedCheckpoint>,
    from: &RestoreFrom,
    prefer: Option<String>,
    cmds: &mut mpsc::UnboundedReceiver<JobCommand>,
    shutdown: &CancellationToken,
) -> Result<Deployment, Outcome> {
    let Some(pool) = job.pool() else {
        let d = deploy(plan, restored, &job.id)
            .await
            .map_err(|e| Outcome::Failed(format!("deploying the job failed: {e}")))?;
        job.count_attempt();
        return Ok(Deployment::Local(d));
    };
    let restore_url = match (restored, from) {
        (None, _) | (_, RestoreFrom::Nothing) => String::new(),
        (Some(cp), from) => restored_dir(job, cp, from).url().to_string(),
    };
    let need = plan.parallelism;
    let mut changed = pool.subscribe();
    let mut said_waiting = false;
    loop {
        let Some(epoch) = job.leadership.fence() else {
            return Err(Outcome::Abandoned);
        };
        // Tasks start only under a confirmed region lease (the region
        // coordinator confirms it, or demotes this region and abandons
        // the job).
        let fenced = job.region_fence.check().is_err();
        if fenced {
            tracing::debug!(job = %job.id, "waiting for the region lease to be confirmed before deploying");
        } else if let Some(placed) = pool.place(need, prefer.as_deref()) {
            let tm = placed
                .iter()
                .map(|p| p.tm.as_str())
                .collect::<Vec<_>>()
                .join(", ");
            let attempt = job.status.lock().unwrap_or_else(|p| p.into_inner()).attempt + 1;
            let req = ferry_core::proto::DeployRequest {
                epoch: epoch.0,
                deployment: uuid::Uuid::now_v7().to_string(),
                job_id: job.id.to_string(),
                attempt,
                spec: job.spec.to_yaml(),
                restore_from: restore_url.clone(),
                region_epoch: job.region_epoch.get().0,
                fence_ms: job
                    .region_fence
                    .remaining()
                    .map(|d| d.as_millis() as u64)
                    .unwrap_or(0),
                ..Default::default()
            };
            match RemoteDeployment::deploy(&pool, placed, epoch, req).await {
                Ok(d) => {
                    tracing::info!(job = %job.id, taskmanagers = %tm, deployment = %d.id, parts = d.parts.len(), attempt, "tasks deployed");
                    job.count_attempt();
                    pool.cancel_others(&job.id, &d.part_ids());
                    return Ok(Deployment::Remote(d));
                }
                Err(e) if e.code() == tonic::Code::ResourceExhausted => {
                    tracing::info!(job = %job.id, taskmanager = %tm, "{}", e.message());
                }
                Err(e) if e.code() == tonic::Code::InvalidArgument => {
                    return Err(Outcome::Unrecoverable(format!(
                        "TaskManager {tm} refused the job: {}",
                        e.message()
                    )));
                }
                Err(e) => {
                    return Err(Outcome::Failed(format!(
                        "deploying on TaskManager {tm} failed: {}",
                        e.message()
                    )));
                }
            }
        } else if !said_waiting {
            said_waiting = true;
            let c = pool.capacity();
            let draining = match c.draining {
                0 => String::new(),
                n => format!(", {n} draining: their slots take nothing new"),
            };
            let msg = format!(
                "waiting for {need} free task slots in the region ({} TaskManagers registered{draining}; {} of {} slots free)",
                c.taskmanagers, c.free, c.slots
            );
            tracing::warn!(job = %job.id, "{msg}");
            job.set_state(job.state(), Some(msg));
            job.touch();
        }
        tokio::select! {
            r = changed.changed() => if r.is_err() { return Err(Outcome::Shutdown) },
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            _ = job.abandon.cancelled() => return Err(Outcome::Abandoned),
            _ = shutdown.cancelled() => return Err(Outcome::Shutdown),
            cmd = cmds.recv() => match cmd {
                Some(JobCommand::Stop { reply, .. }) => {
                    job.set_state(JobState::Cancelling, None);
                    let _ = reply.send(Ok(None));
                    return Err(Outcome::Stopped);
                }
                Some(JobCommand::Savepoint(reply)) => {
                    let _ = reply.send(Err(JmError::WrongState {
                        job: job.id,
                        state: job.state(),
                        action: "retry once it is RUNNING (it waits for task slots)".into(),
                    }));
                }
                Some(JobCommand::Move { reply, .. }) => {
                    let _ = reply.send(Err(JmError::WrongState {
                        job: job.id,
                        state: job.state(),
                        action: "it is not running yet (it waits for task slots)".into(),
                    }));
                }
                None => {}
            },
        }
    }
}

fn reject_pending_commands(cmds: &mut mpsc::UnboundedReceiver<JobCommand>) {
    while let Ok(cmd) = cmds.try_recv() {
        let err = || JmError::Runtime("the job has failed".into());
        match cmd {
            JobCommand::Savepoint(r) => drop(r.send(Err(err()))),
            JobCommand::Stop { reply, .. } => drop(reply.send(Err(err()))),
            JobCommand::Move { reply, .. } => drop(reply.send(Err(err()))),
        }
    }
}

/// Reads and verifies the snapshot to restore from, warning about every
/// newer checkpoint that had to be skipped.
async fn load_restore(
    job: &JobEntry,
    plan: &JobPlan,
    from: &RestoreFrom,
) -> Result<Option<VerifiedCheckpoint>, JmError> {
    match from {
        RestoreFrom::Nothing => Ok(None),
        RestoreFrom::Savepoint(path) => {
            let dir = ferry_core::manifest::open_snapshot_dir(path)?;
            match read_verified(&dir).await? {
                Some(cp) => Ok(Some(cp)),
                None => Err(JmError::Runtime(format!(
                    "'{path}' has no MANIFEST.json: not a complete savepoint or checkpoint directory"
                ))),
            }
        }
        RestoreFrom::LatestCheckpoint => {
            let choice = find_restorable_checked(&job.root, &job.id, |cp| {
                ferry_taskmanager::runtime::check_restore(plan, cp).map(drop)
            })
            .await?;
            if choice.all_damaged() {
                return Err(JmError::Runtime(format!(
                    "no checkpoint of this job can be restored ({}); starting from the beginning would repeat output already committed, so the job stops here. Repair or remove the damaged checkpoints under {}, or submit the spec again as a new job to start over",
                    choice.skipped_reasons(),
                    job.root
                        .child(&ferry_core::manifest::checkpoints_root(&job.id))
                        .url()
                )));
            }
            for (id, why) in &choice.skipped {
                tracing::warn!(
                    job = %job.id,
                    checkpoint = %id,
                    "skipping checkpoint {id}: {why}; falling back to an older one (output committed after the checkpoint used may be repeated)"
                );
            }
            Ok(choice.checkpoint)
        }
    }
}
