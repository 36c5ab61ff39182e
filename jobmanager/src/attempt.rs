//! One deployment of a job: runs its tasks until they finish, stop or fail
//! (or the JobManager shuts down or loses the leadership), triggering
//! checkpoints on the job's interval, queuing savepoints, collecting
//! acknowledgements for the checkpoint coordinator, and sampling the task
//! counters into the job's metrics.
//!
//! Invariant: at most one snapshot is in flight per deployment; savepoints
//! asked for meanwhile wait their turn, and nothing new is triggered once
//! the job is stopping.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry_core::CheckpointId;
use ferry_taskmanager::protocol::{TaskError, TaskEvent};
use ferry_taskmanager::runtime::{Counters, JobPlan};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::checkpoint::{
    NotCompleted, Pending, Reply, SnapshotRequest, abort_checkpoint, complete_checkpoint,
    fail_reply, trigger,
};
use crate::deployment::Deployment;
use crate::error::JmError;
use crate::job::{JobCommand, JobEntry};
use crate::metrics::{JobLabels, Metrics};
use crate::state::JobState;

/// How one deployment of a job ended.
pub(crate) enum Outcome {
    Finished,
    Stopped,
    /// A failure the restart strategy handles.
    Failed(String),
    /// A failure every restart would repeat (bad input): the job fails now.
    Unrecoverable(String),
    Shutdown,
    /// Leadership lost: stop at once, write nothing; the next leader resumes.
    Abandoned,
    /// Stopped with a savepoint to be deployed again elsewhere (why, and
    /// the TaskManager to prefer).
    Moved(String, Option<String>),
}

/// What stays the same across the deployments of one job.
pub(crate) struct AttemptCtx<'a> {
    pub(crate) job: &'a Arc<JobEntry>,
    pub(crate) plan: &'a JobPlan,
    pub(crate) metrics: &'a Metrics,
    pub(crate) shutdown: &'a CancellationToken,
}

/// Counts failed snapshots against `checkpointing.tolerableFailures`.
struct Failures {
    /// Snapshots failed since the last one completed.
    in_row: u32,
    tolerable: u32,
}

impl Failures {
    /// After snapshot `p` failed (its waiter already told): removes its
    /// partial files; `Some` ends the attempt. A failed stop-with-savepoint
    /// left its tasks stopping, so the job restarts; a failed final
    /// checkpoint of a bounded job is simply triggered again. Only a
    /// failure that `counts` goes against `tolerableFailures` (not one of
    /// blocked synchronous replication: the job itself is fine).
    async fn failed(
        &mut self,
        job: &JobEntry,
        p: Pending,
        why: &str,
        final_triggered: &mut bool,
        counts: bool,
    ) -> Option<Outcome> {
        if p.barrier.stop && !p.finished {
            return Some(Outcome::Failed(format!(
                "stop-with-savepoint failed: {why}"
            )));
        }
        abort_checkpoint(job, &p).await;
        if p.finished {
            *final_triggered = false;
        }
        self.in_row += u32::from(counts);
        (counts && self.in_row > self.tolerable).then(|| {
            Outcome::Failed(format!(
                "{} checkpoints failed in a row (checkpointing.tolerableFailures is {}); the last: {why}",
                self.in_row, self.tolerable
            ))
        })
    }
}

/// Runs one deployment until it finishes, stops, fails or the JM shuts down.
/// `baseline` is the records in/out already counted by the restored state.
pub(crate) async fn run_attempt(
    ctx: &AttemptCtx<'_>,
    baseline: (u64, u64),
    deployed: &mut Deployment,
    cmds: &mut mpsc::UnboundedReceiver<JobCommand>,
    next_id: &mut CheckpointId,
) -> Outcome {
    let AttemptCtx {
        job,
        plan,
        metrics,
        shutdown,
    } = *ctx;
    let cp = &job.spec.spec.checkpointing;
    let labels = Metrics::job(&job.id.to_string());
    let mut ticker = tokio::time::interval(cp.interval.get());
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticker.tick().await;
    let mut sampler = tokio::time::interval(Duration::from_secs(1));
    let mut last_sample = Sampled::start(baseline.0, baseline.1);
    let mut pending: Option<Pending> = None;
    let mut queued: VecDeque<Reply> = VecDeque::new();
    let mut sources_ended = 0usize;
    let mut final_triggered = false;
    let mut stopping = false;
    let mut moving: Option<(String, Option<String>)> = None;
    let mut stopped_tasks = 0usize;
    let task_count = plan.task_count();
    // The epoch this attempt runs under.
    let leading = job.leadership.fence();
    let mut failures = Failures {
        in_row: 0,
        tolerable: cp.tolerable_failures,
    };
    loop {
        let deadline = pending
            .as_ref()
            .map(|p| p.started + cp.timeout.get())
            .unwrap_or_else(|| Instant::now() + Duration::from_secs(3600));
        tokio::select! {
            _ = shutdown.cancelled() => return Outcome::Shutdown,
            _ = job.abandon.cancelled() => return Outcome::Abandoned,
            _ = ticker.tick() => {
                if pending.is_none() && !stopping && sources_ended < deployed.source_count() {
                    pending = Some(trigger(job, deployed, next_id, SnapshotRequest::Checkpoint, None));
                }
            }
            _ = sampler.tick() => sample(metrics, &labels, deployed, &mut last_sample),
            _ = tokio::time::sleep_until(deadline.into()), if pending.is_some() => {
                let mut p = pending.take().expect("pending checkpoint");
                p.span.record("outcome", "timed out");
                metrics.checkpoint_failures.get_or_create(&labels).inc();
                let msg = format!(
                    "checkpoint {} timed out after {} (checkpointing.timeout)",
                    p.barrier.id, cp.timeout
                );
                p.span.in_scope(|| tracing::warn!(job = %job.id, "{msg}"));
                fail_reply(p.reply.take(), JmError::Runtime(msg.clone()));
                                if let Some(o) = failures.failed(job, p, &msg, &mut final_triggered, true).await {
                    return o;
                }
            }
            cmd = cmds.recv() => match cmd {
                Some(JobCommand::Savepoint(r)) => queued.push_back(Reply::Savepoint(r)),
                Some(JobCommand::Stop { savepoint: false, reply }) => {
                    job.set_state(JobState::Cancelling, None);
                    let _ = reply.send(Ok(None));
                    return Outcome::Stopped;
                }
                Some(JobCommand::Stop { savepoint: true, reply }) => {
                    job.set_state(JobState::Cancelling, None);
                    // A stop outranks a move in flight: the job ends.
                    moving = None;
                    queued.push_back(Reply::Stop(reply));
                }
                Some(JobCommand::Move { reply, .. }) if moving.is_some() || stopping || job.state() == JobState::Cancelling => {
                    let _ = reply.send(Err(JmError::WrongState {
                        job: job.id,
                        state: job.state(),
                        action: "it is already moving or stopping".into(),
                    }));
                }
                Some(JobCommand::Move { reason, to, reply }) => {
                    tracing::info!(job = %job.id, "moving the job: {reason}; stopping it with a savepoint first");
                    moving = Some((reason, to));
                    queued.push_back(Reply::Stop(reply));
                }
                None => {}
            },
            ev = deployed.next_event() => match ev {
                // A remote deployment's events stop when the pool lets go
                // of its TaskManagers: this instance no longer leads at the
                // epoch it deployed under. Its tasks belong to the next
                // leader now: they must not be cancelled as failed.
                None if job.abandon.is_cancelled() || job.leadership.fence() != leading => {
                    tracing::info!(job = %job.id, "the deployment's events stopped with the leadership: leaving its tasks to the next leader");
                    return Outcome::Abandoned;
                }
                None => return Outcome::Failed("every task ended unexpectedly".into()),
                Some(TaskEvent::Failed { task, error }) => {
                    fail_reply(pending.take().and_then(|p| p.reply), JmError::Runtime(format!("task failed: {error}")));
                    for r in queued.drain(..) {
                        fail_reply(Some(r), JmError::Runtime(format!("task failed: {error}")));
                    }
                    let why = format!("{task} failed: {error}");
                    return match error {
                        TaskError::Transient(_) => Outcome::Failed(why),
                        TaskError::Permanent(_) => Outcome::Unrecoverable(why),
                    };
                }
                Some(TaskEvent::SourceEnded(_)) => sources_ended += 1,
                Some(TaskEvent::Declined { task, checkpoint, reason }) => {
                    let Some(mut p) = pending.take_if(|p| p.barrier.id == checkpoint) else {
                        continue; // an abandoned checkpoint's late news
                    };
                    p.span.record("outcome", "declined");
                    metrics.checkpoint_failures.get_or_create(&labels).inc();
                    let msg = format!("checkpoint {checkpoint} failed: {task}: {reason}");
                    p.span.in_scope(|| tracing::warn!(job = %job.id, "{msg}"));
                    fail_reply(p.reply.take(), JmError::Runtime(msg.clone()));
                                        if let Some(o) = failures.failed(job, p, &msg, &mut final_triggered, true).await {
                        return o;
                    }
                }
                Some(TaskEvent::Stopped(_)) => {
                    stopped_tasks += 1;
                    if stopped_tasks == task_count {
                        sample(metrics, &labels, deployed, &mut last_sample);
                        return match (stopping, moving.take()) {
                            (true, Some((why, to))) => Outcome::Moved(why, to),
                            (true, None) => Outcome::Stopped,
                            (false, _) => Outcome::Finished,
                        };
                    }
                }
                Some(TaskEvent::Ack(ack)) => {
                    let complete = match pending.as_mut() {
                        Some(p) if p.barrier.id == ack.checkpoint => {
                            p.acks.push(ack);
                            p.acks.len() == task_count
                        }
                        _ => false, // a late ack of an abandoned checkpoint
                    };
                    if complete {
                        let mut p = pending.take().expect("pending checkpoint");
                        // Entered while completing: the span ends when the
                        // manifest is written (or the commit fails).
                        match complete_checkpoint(job, deployed, &p, metrics)
                            .instrument(p.span.clone())
                            .await
                        {
                            Ok(info) => {
                                failures.in_row = 0;
                                p.span.record("outcome", "completed");
                                if p.barrier.stop {
                                    stopping = stopping || !p.finished;
                                }
                                match p.reply.take() {
                                    Some(Reply::Savepoint(r)) => drop(r.send(Ok(info))),
                                    Some(Reply::Stop(r)) => drop(r.send(Ok(Some(info)))),
                                    None => {}
                                }
                            }
                            Err(NotCompleted { why: e, blocked }) => {
                                p.span.record("outcome", "failed");
                                metrics.checkpoint_failures.get_or_create(&labels).inc();
                                tracing::warn!(job = %job.id, "checkpoint {} failed: {e}", p.barrier.id);
                                fail_reply(p.reply.take(), JmError::Runtime(e.clone()));
                                let msg = format!("checkpoint {} failed: {e}", p.barrier.id);
                                if let Some(o) = failures.failed(job, p, &msg, &mut final_triggered, !blocked).await {
                                    return o;
                                }
                            }
                        }
                    }
                }
            }
        }
        // Start queued work once no snapshot is in flight.
        if pending.is_none() && !stopping {
            if let Some(r) = queued.pop_front() {
                pending = Some(trigger(job, deployed, next_id, r.request(), Some(r)));
            } else if sources_ended == deployed.source_count() && !final_triggered {
                final_triggered = true;
                pending = Some(trigger(
                    job,
                    deployed,
                    next_id,
                    SnapshotRequest::Final,
                    None,
                ));
            }
        }
    }
}

/// Task counter totals at the last metrics sample.
struct Sampled {
    at: Instant,
    records_in: u64,
    records_out: u64,
    late: u64,
    expr_errors: u64,
    skipped: u64,
}

impl Sampled {
    /// Before the first sample: counters start from the restored totals.
    fn start(records_in: u64, records_out: u64) -> Self {
        Self {
            at: Instant::now(),
            records_in,
            records_out,
            late: 0,
            expr_errors: 0,
            skipped: 0,
        }
    }
}

/// Updates the job's Prometheus counters from the task counters.
fn sample(metrics: &Metrics, labels: &JobLabels, deployed: &Deployment, last: &mut Sampled) {
    let now = Instant::now();
    let Counters {
        records_in: rin,
        records_out: rout,
        late_records: late,
        expression_errors: errs,
        skipped_records: skipped,
        watermark: wm,
    } = deployed.counters();
    let dt = now.duration_since(last.at).as_secs_f64().max(1e-3);
    let inc = |c: &Family<JobLabels, Counter>, now: u64, before: u64| {
        c.get_or_create(labels).inc_by(now.saturating_sub(before));
    };
    inc(&metrics.records_in, rin, last.records_in);
    inc(&metrics.records_out, rout, last.records_out);
    inc(&metrics.late_records, late, last.late);
    inc(&metrics.expression_errors, errs, last.expr_errors);
    inc(&metrics.skipped_records, skipped, last.skipped);
    metrics
        .records_in_rate
        .get_or_create(labels)
        .set(rin.saturating_sub(last.records_in) as f64 / dt);
    if wm != i64::MIN && wm != i64::MAX {
        metrics.watermark.get_or_create(labels).set(wm);
    }
    *last = Sampled {
        at: now,
        records_in: rin.max(last.records_in),
        records_out: rout.max(last.records_out),
        late: late.max(last.late),
        expr_errors: errs.max(last.expr_errors),
        skipped: skipped.max(last.skipped),
    };
}
