//! The continuous replicator: follows the checkpoints the region's leader
//! completes and copies each job to every standby region's store at once
//! ([`crate::replicate_job`]), keeping per-standby progress and lag — in
//! time, checkpoints, records and event time — for metrics, `/v1/regions`
//! and the standbys' promotion decisions.
//!
//! A job's first pass towards a standby reconciles it in full (divergence,
//! spec and status, every retained snapshot, retention); after that, and
//! as long as the write fence stays open without a gap (one
//! [`WriteFence::term`]: no other region can have written into the
//! standby's store meanwhile), a pass copies only the snapshots completed
//! since and deletes the ones the primary no longer retains
//! ([`crate::replicate_new`]) — a distant store then costs each checkpoint
//! one copy's round trips. A failed pass, a new term, an ended job, or
//! [`FULL_PASS_EVERY`] reconciles in full again.
//!
//! Invariant: a snapshot counts as replicated to a standby only once its
//! manifest is in the standby's store (written last, after every file was
//! verified), so reported progress never runs ahead of what a failover
//! could restore.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::Mutex;
use std::time::Duration;

use chrono::{DateTime, Utc};
use ferry_core::JobId;
use ferry_core::api::{JobProgress, StandbyStatus};
use ferry_core::storage::StorageLocation;
use tokio::sync::mpsc;

use crate::fence::WriteFence;
use crate::{replicate_job, replicate_new};

/// A snapshot the primary completed.
#[derive(Clone, Debug)]
pub struct CheckpointEvent {
    pub job: JobId,
    /// The job's storage root in the primary region.
    pub root: StorageLocation,
    /// The snapshot's directory relative to `root`.
    pub dir: String,
    pub checkpoint: u64,
    pub completed_at: DateTime<Utc>,
    pub records_in: u64,
    pub watermark: i64,
}

/// One standby region's store.
#[derive(Clone, Debug)]
pub struct Standby {
    pub region: String,
    pub store: StorageLocation,
}

/// One job's replication state towards one standby.
#[derive(Clone, Debug, Default)]
struct JobState {
    progress: JobProgress,
    /// (records in, watermark) of the primary's newest snapshot.
    primary: (u64, i64),
    /// The same of the newest snapshot in the standby.
    replicated: (u64, i64),
    pending: VecDeque<CheckpointEvent>,
    /// The fence term and time of the last full pass ([`replicate_job`])
    /// that succeeded; within that term (and [`FULL_PASS_EVERY`]) a pass
    /// copies only what is new ([`replicate_new`]).
    reconciled: Option<(u64, std::time::Instant)>,
    /// Checkpoints the standby's store holds, as far as the passes saw.
    held: BTreeSet<u64>,
}

/// One standby's replication state.
#[derive(Clone, Debug, Default)]
struct StandbyState {
    status: StandbyStatus,
    jobs: BTreeMap<String, JobState>,
}

/// Follows completed checkpoints and replicates them to every standby.
pub struct Replicator {
    standbys: Vec<Standby>,
    /// Open while this region holds the primary role (see [`crate::fence`]).
    fence: WriteFence,
    state: Mutex<Vec<StandbyState>>,
    /// Jobs whose status changed without a new snapshot (they ended): the
    /// next pass copies their status to every standby.
    ended: Mutex<BTreeMap<JobId, StorageLocation>>,
    /// Completion-to-manifest-in-standby times, ms (for the benchmark).
    latencies: Mutex<Vec<f64>>,
}

/// How often failed replications are retried and lag is refreshed.
const RETRY: Duration = Duration::from_secs(1);

/// How often a job is reconciled in full with each standby's store even
/// when nothing suggests it changed (its spec, savepoints, divergence,
/// retention of what the target holds).
const FULL_PASS_EVERY: Duration = Duration::from_secs(60);

impl Replicator {
    /// A replicator writing through `fence`: the region coordinator's, or
    /// [`WriteFence::unfenced`] when regions have no global KV (no region
    /// lease: the operator decides which region is primary).
    pub fn new(standbys: Vec<Standby>, fence: WriteFence) -> Self {
        let state = standbys
            .iter()
            .map(|s| StandbyState {
                status: StandbyStatus {
                    region: s.region.clone(),
                    store: s.store.url().to_string(),
                    ..Default::default()
                },
                jobs: BTreeMap::new(),
            })
            .collect();
        Self {
            standbys,
            fence,
            state: Mutex::new(state),
            ended: Mutex::new(BTreeMap::new()),
            latencies: Mutex::new(Vec::new()),
        }
    }

    /// The fence every write into a standby's store goes through.
    pub fn fence(&self) -> &WriteFence {
        &self.fence
    }

    /// This region left the primary role: what was pending is no longer
    /// its to copy (the new primary replicates its own lineage, and
    /// archives what this region committed beyond it).
    pub fn stand_down(&self) {
        self.fence.close();
        let mut st = self.lock();
        for s in st.iter_mut() {
            for j in s.jobs.values_mut() {
                j.pending.clear();
            }
        }
        drop(st);
        self.ended.lock().unwrap_or_else(|p| p.into_inner()).clear();
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<StandbyState>> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Every standby's progress, lag computed as of now.
    pub fn status(&self) -> Vec<StandbyStatus> {
        let now = Utc::now();
        let st = self.lock();
        let mut out = Vec::with_capacity(st.len());
        for s in st.iter() {
            let mut status = s.status.clone();
            let mut oldest: Option<DateTime<Utc>> = None;
            let (mut cps, mut records, mut event_time) = (0u64, 0u64, 0i64);
            for (id, j) in &s.jobs {
                status.jobs.insert(id.clone(), j.progress.clone());
                cps += j.pending.len() as u64;
                if let Some(p) = j.pending.front() {
                    oldest = Some(oldest.map_or(p.completed_at, |o| o.min(p.completed_at)));
                    records += j.primary.0.saturating_sub(j.replicated.0);
                    let (a, b) = (j.primary.1, j.replicated.1);
                    if a != i64::MIN && a != i64::MAX && b != i64::MIN && b != i64::MAX {
                        event_time = event_time.max(a.saturating_sub(b));
                    }
                }
            }
            status.lag_checkpoints = cps;
            status.lag_records = records;
            status.lag_event_time_ms = event_time;
            status.lag_seconds = oldest
                .map(|o| (now - o).num_milliseconds().max(0) as f64 / 1000.0)
                .unwrap_or(0.0);
            out.push(status);
        }
        out
    }

    /// Completion-to-standby times so far, ms.
    pub fn latencies(&self) -> Vec<f64> {
        self.latencies
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The job ended (finished, cancelled, failed): its status goes to
    /// every standby at the next pass, so no standby lists it as running
    /// or restarts it when promoted.
    pub fn job_ended(&self, job: JobId, root: StorageLocation) {
        self.ended
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(job, root);
    }

    /// Replicates what `events` announce until the channel closes or
    /// `stop` resolves.
    pub async fn run(
        &self,
        mut events: mpsc::UnboundedReceiver<CheckpointEvent>,
        stop: impl std::future::Future<Output = ()>,
    ) {
        tokio::pin!(stop);
        let mut tick = tokio::time::interval(RETRY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = &mut stop => return,
                ev = events.recv() => match ev {
                    Some(e) => self.record(e),
                    None => return,
                },
                _ = tick.tick() => {}
            }
            // Coalesce: whatever else arrived goes in the same pass.
            while let Ok(e) = events.try_recv() {
                self.record(e);
            }
            self.pass().await;
        }
    }

    fn record(&self, e: CheckpointEvent) {
        let mut st = self.lock();
        for s in st.iter_mut() {
            let j = s.jobs.entry(e.job.to_string()).or_default();
            j.progress.primary_checkpoint = j.progress.primary_checkpoint.max(e.checkpoint);
            j.primary = (e.records_in, e.watermark);
            j.pending.push_back(e.clone());
        }
    }

    /// Replicates every job with pending snapshots (or an ended status) to
    /// every standby.
    async fn pass(&self) {
        if !self.fence.is_open() {
            return;
        }
        let ended: Vec<(JobId, StorageLocation)> = self
            .ended
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(j, r)| (*j, r.clone()))
            .collect();
        let mut ended_done = true;
        // What this pass learns about a standby holds within this term.
        let term = self.fence.term();
        for (i, standby) in self.standbys.iter().enumerate() {
            // Per job: (job, root, the dirs to copy and the checkpoints
            // the standby holds when only new snapshots need copying).
            type Work = (JobId, StorageLocation, Option<(Vec<String>, BTreeSet<u64>)>);
            let mut work: Vec<Work> = self.lock()[i]
                .jobs
                .values()
                .filter_map(|j| {
                    let e = j.pending.back()?;
                    let fast = j
                        .reconciled
                        .is_some_and(|(t, at)| t == term && at.elapsed() < FULL_PASS_EVERY);
                    let dirs = || j.pending.iter().map(|e| e.dir.clone()).collect();
                    Some((
                        e.job,
                        e.root.clone(),
                        fast.then(|| (dirs(), j.held.clone())),
                    ))
                })
                .collect();
            for (job, root) in &ended {
                // An ended job's status goes with a full pass.
                match work.iter_mut().find(|(j, _, _)| j == job) {
                    Some(w) => w.2 = None,
                    None => work.push((*job, root.clone(), None)),
                }
            }
            for (job, root, fast) in work {
                let result = match &fast {
                    Some((dirs, held)) => {
                        replicate_new(&root, &standby.store, &job, dirs, held, &self.fence).await
                    }
                    None => replicate_job(&root, &standby.store, &job, &self.fence).await,
                };
                let now = Utc::now();
                let mut st = self.lock();
                let s = &mut st[i];
                match result {
                    Ok(copy) => {
                        s.status.last_error = None;
                        let done: Vec<&str> = copy.copied.iter().map(|c| c.dir.as_str()).collect();
                        for c in copy.copied.iter().filter(|c| !c.already_complete) {
                            s.status.snapshots_replicated += 1;
                            s.status.bytes_replicated += c.bytes_copied;
                            s.status.retries += u64::from(c.retries);
                        }
                        // Everything up to the newest snapshot now in the
                        // standby is done (or superseded: the primary's
                        // retention removed it before it could be copied).
                        let upto = copy.copied.iter().map(|c| c.checkpoint).max().unwrap_or(0);
                        let j = s.jobs.entry(job.to_string()).or_default();
                        j.held = copy.target_checkpoints.iter().copied().collect();
                        j.reconciled = match (fast.is_some(), j.reconciled) {
                            (true, Some((_, at))) => Some((term, at)),
                            _ => Some((term, std::time::Instant::now())),
                        };
                        let mut lat = Vec::new();
                        j.pending.retain(|e| {
                            if done.contains(&e.dir.as_str()) {
                                let us = (now - e.completed_at).num_microseconds().unwrap_or(0);
                                lat.push(us as f64 / 1000.0);
                                false
                            } else {
                                e.checkpoint > upto
                            }
                        });
                        if let Some(n) = copy.newest() {
                            j.progress.replicated_checkpoint = Some(n.checkpoint);
                            j.replicated = (n.records_in, n.watermark);
                            j.progress.replicated_at = Some(now);
                            s.status.last_replicated_at = Some(now);
                        }
                        drop(st);
                        self.latencies
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .extend(lat);
                    }
                    Err(e @ crate::ReplicationError::Fenced { .. }) => {
                        s.jobs.entry(job.to_string()).or_default().reconciled = None;
                        tracing::info!(region = %standby.region, job = %job, "replication paused: {e}");
                        s.status.last_error = Some(e.to_string());
                        return;
                    }
                    Err(e) => {
                        s.jobs.entry(job.to_string()).or_default().reconciled = None;
                        tracing::warn!(region = %standby.region, job = %job, "replication failed (retrying): {e}");
                        s.status.last_error = Some(e.to_string());
                        if ended.iter().any(|(j, _)| *j == job) {
                            ended_done = false;
                        }
                    }
                }
            }
        }
        if ended_done {
            let mut e = self.ended.lock().unwrap_or_else(|p| p.into_inner());
            for (job, _) in ended {
                e.remove(&job);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use ferry_core::CheckpointId;
    use ferry_core::manifest::{checkpoint_dir, list_checkpoint_ids};
    use tokio::time::Instant;

    use super::*;
    use crate::replicate::tests::lineage_checkpoint;

    const RTT: Duration = Duration::from_millis(100);

    /// The standby's store one round trip per request away (virtual time).
    fn distant(inner: Arc<object_store::memory::InMemory>) -> StorageLocation {
        let throttled = object_store::throttle::ThrottledStore::new(
            inner,
            object_store::throttle::ThrottleConfig {
                wait_put_per_call: RTT,
                wait_get_per_call: RTT,
                wait_list_per_call: RTT,
                wait_list_with_delimiter_per_call: RTT,
                wait_delete_per_call: RTT,
                ..Default::default()
            },
        );
        StorageLocation::with_store("memory:///standby", Arc::new(throttled)).unwrap()
    }

    /// Checkpoint `n` completes in the source, which retains three.
    async fn complete(
        src: &StorageLocation,
        job: &JobId,
        n: u64,
        tx: &mpsc::UnboundedSender<CheckpointEvent>,
    ) {
        lineage_checkpoint(src, job, n, &[("window-0.state", &[n as u8; 64])], 0, None).await;
        if n > 3 {
            src.delete_prefix(&checkpoint_dir(job, CheckpointId(n - 3)))
                .await
                .unwrap();
        }
        tx.send(CheckpointEvent {
            job: *job,
            root: src.clone(),
            dir: checkpoint_dir(job, CheckpointId(n)),
            checkpoint: n,
            completed_at: Utc::now(),
            records_in: n,
            watermark: n as i64,
        })
        .unwrap();
    }

    /// Waits (virtual time) until the standby holds checkpoint `n`.
    async fn replicated(r: &Replicator, job: &JobId, n: u64) -> Duration {
        let t0 = Instant::now();
        loop {
            let done = r.status()[0]
                .jobs
                .get(&job.to_string())
                .and_then(|p| p.replicated_checkpoint)
                == Some(n);
            if done {
                return t0.elapsed();
            }
            assert!(
                t0.elapsed() < Duration::from_secs(60),
                "checkpoint {n} never arrived"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    async fn held(store: &StorageLocation, job: &JobId) -> Vec<u64> {
        list_checkpoint_ids(store, job)
            .await
            .unwrap()
            .into_iter()
            .map(|c| c.0)
            .collect()
    }

    /// The first pass reconciles a job with the standby in full; later
    /// ones copy only the new checkpoint and delete what the source no
    /// longer retains, at once: one copy's four round trips. Once the
    /// fence has been closed (the region may have lost the primary role
    /// and another may have written into the store) the next pass
    /// reconciles in full again — it finds a checkpoint the quick passes
    /// could not know of.
    #[tokio::test(start_paused = true)]
    async fn steady_passes_copy_only_what_is_new_and_a_new_fence_term_reconciles_again() {
        let src = StorageLocation::with_store(
            "memory:///primary",
            Arc::new(object_store::memory::InMemory::new()),
        )
        .unwrap();
        let inner = Arc::new(object_store::memory::InMemory::new());
        let dst = distant(inner.clone());
        let plain = StorageLocation::with_store("memory:///standby", inner).unwrap();
        let fence = WriteFence::closed();
        fence.open_until(Instant::now() + Duration::from_secs(3600));
        let r = Arc::new(Replicator::new(
            vec![Standby {
                region: "west".into(),
                store: dst,
            }],
            fence.clone(),
        ));
        let (tx, rx) = mpsc::unbounded_channel();
        let stop = tokio_util::sync::CancellationToken::new();
        let (r2, s) = (r.clone(), stop.clone());
        let running = tokio::spawn(async move { r2.run(rx, s.cancelled_owned()).await });
        let job = JobId::new();
        let mut took = Vec::new();
        for n in 1..=6 {
            complete(&src, &job, n, &tx).await;
            took.push(replicated(&r, &job, n).await);
        }
        assert!(took[0] > RTT * 5, "the first pass is a full one: {took:?}");
        for t in &took[1..] {
            assert!(*t < RTT * 4 + RTT / 2, "a steady pass: {took:?}");
        }
        assert_eq!(held(&plain, &job).await, vec![4, 5, 6]);
        // Another region wrote into the store while this one had no lease.
        lineage_checkpoint(&plain, &job, 2, &[("window-0.state", b"x")], 0, None).await;
        fence.close();
        fence.open_until(Instant::now() + Duration::from_secs(3600));
        complete(&src, &job, 7, &tx).await;
        let t = replicated(&r, &job, 7).await;
        assert!(t > RTT * 5, "a full pass again: {t:?}");
        assert_eq!(held(&plain, &job).await, vec![5, 6, 7]);
        stop.cancel();
        running.await.unwrap();
    }
}
