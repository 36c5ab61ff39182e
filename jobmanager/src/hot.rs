//! Hot standby (`regions.standby: hot`). While its region is a standby,
//! the leader keeps every active job of the job store *held* on one of the
//! region's TaskManagers: its operator state loaded from the newest
//! complete snapshot in the region's store, no task running, no source
//! open, no sink writing. Each newer snapshot that arrives is loaded into a
//! new held deployment that replaces the old one (same slots) once loaded.
//! A promotion releases every held job whose snapshot is still the newest
//! in the store — its sinks and sources restore from that snapshot and its
//! tasks start, with no state to read — and the drivers then adopt the
//! released tasks like any running ones. The others restore cold.
//!
//! Invariants: a held deployment is never adopted as running (only
//! [`JobManager::release_held`] starts one, under the region epoch that
//! made this region primary, and only at the snapshot a cold restore would
//! pick); every held deployment a promotion does not release is cancelled
//! before the jobs are adopted (they need its slots); no load starts from
//! the promotion until the next demotion.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use ferry_core::api::RegionResources;
use ferry_core::config::StandbyMode;
use ferry_core::manifest::newest_complete;
use ferry_core::proto;
use ferry_core::{JobId, RegionEpoch};

use crate::job::JobEntry;
use crate::service::JobManager;
use crate::taskmanagers::TaskManagers;

/// How long a promotion waits for loads in flight (a newer snapshot being
/// loaded is still faster to start from than a cold restore of it).
const RELEASE_WAIT: Duration = Duration::from_secs(60);

/// The hot standby's bookkeeping (the held deployments themselves are
/// what the TaskManagers report).
#[derive(Default)]
pub(crate) struct Warm {
    mode: OnceLock<StandbyMode>,
    /// Loads in flight: job → the snapshot being loaded.
    loading: Mutex<HashMap<JobId, u64>>,
    /// Woken whenever a load ends.
    loaded: tokio::sync::Notify,
    /// A pass over the jobs runs.
    passing: AtomicBool,
    /// Set by a promotion: no new load starts until the next demotion.
    frozen: AtomicBool,
    /// Jobs already said to have no room (said once each).
    no_room: Mutex<HashSet<JobId>>,
}

impl Warm {
    fn hot(&self) -> bool {
        self.mode.get() == Some(&StandbyMode::Hot)
    }

    fn loading(&self) -> std::sync::MutexGuard<'_, HashMap<JobId, u64>> {
        self.loading.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Whether a job of the store runs in the primary region (so a standby
/// keeps it ready): not ended, or ended only because a switchover moved it.
fn active(job: &JobEntry) -> bool {
    let info = job.info();
    !info.state.is_terminal() || info.moved_to.is_some()
}

impl JobManager {
    /// Sets `regions.standby` (once, when the region side starts).
    pub fn set_standby_mode(&self, mode: StandbyMode) {
        let _ = self.inner.warm.mode.set(mode);
    }

    /// A standby region's tick: with `regions.standby: hot`, starts (in the
    /// background) one pass that loads every active job's newest snapshot
    /// on a TaskManager, unless one runs already.
    pub fn keep_warm(&self) {
        let warm = &self.inner.warm;
        if !warm.hot() || warm.frozen.load(Ordering::SeqCst) {
            return;
        }
        let Some(pool) = self.inner.taskmanagers.get().cloned() else {
            return;
        };
        if self.inner.leadership.fence().is_none() || warm.passing.swap(true, Ordering::SeqCst) {
            return;
        }
        let jm = self.clone();
        tokio::spawn(async move {
            jm.warm_pass(&pool).await;
            jm.inner.warm.passing.store(false, Ordering::SeqCst);
        });
    }

    async fn warm_pass(&self, pool: &Arc<TaskManagers>) {
        let held = pool.held();
        let (jobs, ended): (Vec<Arc<JobEntry>>, Vec<Arc<JobEntry>>) =
            self.inner.all().into_iter().partition(|j| active(j));
        let ended: HashSet<String> = ended.iter().map(|j| j.id.to_string()).collect();
        // Held jobs that ended free their slots. (One not known here yet is
        // left alone: a new leader may not have read the job store.)
        for (tm, st) in held.iter().filter(|(_, st)| ended.contains(&st.job_id)) {
            tracing::info!(job = %st.job_id, deployment = %st.deployment, "hot standby: the job ended; dropping its held state");
            cancel(pool, tm, &st.deployment).await;
        }
        for job in jobs {
            if self.inner.warm.frozen.load(Ordering::SeqCst) {
                return;
            }
            if self.inner.warm.loading().contains_key(&job.id) {
                continue;
            }
            let newest = match newest_complete(&job.root, &job.id).await {
                Ok(Some(n)) => n,
                Ok(None) => continue,
                Err(e) => {
                    tracing::debug!(job = %job.id, "hot standby: listing the job's snapshots failed: {e}");
                    continue;
                }
            };
            let id = job.id.to_string();
            let mut mine: Vec<&(String, proto::DeploymentStatus)> =
                held.iter().filter(|(_, st)| st.job_id == id).collect();
            mine.sort_by_key(|(_, st)| st.last_barrier);
            let current = mine.pop().cloned();
            // Older leftovers (a load that lost a race): only the newest stays.
            for (tm, st) in mine {
                cancel(pool, tm, &st.deployment).await;
            }
            if newest.2.finished {
                // A finished job starts nothing: nothing to hold.
                if let Some((tm, st)) = &current {
                    cancel(pool, tm, &st.deployment).await;
                }
                continue;
            }
            if current
                .as_ref()
                .is_some_and(|(_, st)| st.last_barrier >= newest.0.0)
            {
                continue;
            }
            self.inner.warm.loading().insert(job.id, newest.0.0);
            let jm = self.clone();
            let pool = pool.clone();
            tokio::spawn(async move {
                jm.load(&pool, &job, newest.0.0, &newest.1, current).await;
                jm.inner.warm.loading().remove(&job.id);
                jm.inner.warm.loaded.notify_waiters();
            });
        }
    }

    /// Loads snapshot `n` (directory `rel` under the job's root) of `job`
    /// into a held deployment, replacing `current` (on its TaskManager) or
    /// on the TaskManager with the most free slots.
    async fn load(
        &self,
        pool: &Arc<TaskManagers>,
        job: &Arc<JobEntry>,
        n: u64,
        rel: &str,
        current: Option<(String, proto::DeploymentStatus)>,
    ) {
        let Some(epoch) = self.inner.leadership.fence() else {
            return;
        };
        let need = job.spec.spec.parallelism.max(1);
        let (tm, mut client, reserved) = match &current {
            Some((tm, _)) => match pool.client_of(tm) {
                Some((c, _)) => (tm.clone(), c, 0),
                None => return,
            },
            None => match pool.place_whole(need) {
                Some(p) => (p.tm, p.client, p.slots),
                None => {
                    let first = self
                        .inner
                        .warm
                        .no_room
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .insert(job.id);
                    if first {
                        tracing::warn!(job = %job.id, slots = need, "hot standby: no TaskManager of this region has {need} free slots for the job; it stays cold (a promotion restores it from the store) until one has");
                    }
                    return;
                }
            },
        };
        let deployment = uuid::Uuid::now_v7().to_string();
        let replaces = current
            .as_ref()
            .map(|(_, st)| st.deployment.clone())
            .unwrap_or_default();
        let attempt = job.status.lock().unwrap_or_else(|p| p.into_inner()).attempt;
        let req = proto::DeployRequest {
            epoch: epoch.0,
            deployment: deployment.clone(),
            job_id: job.id.to_string(),
            attempt,
            spec: job.spec.to_yaml(),
            restore_from: job.root.child(rel).url().to_string(),
            hold: true,
            replaces: replaces.clone(),
            ..Default::default()
        };
        let started = std::time::Instant::now();
        let reply = client.deploy(req).await;
        if reserved > 0 {
            pool.unreserve(&tm, reserved);
        }
        match reply {
            Ok(r) => {
                let r = r.into_inner();
                self.inner
                    .warm
                    .no_room
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(&job.id);
                pool.record(
                    &tm,
                    proto::DeploymentStatus {
                        deployment: deployment.clone(),
                        job_id: job.id.to_string(),
                        attempt,
                        epoch: epoch.0,
                        slots: need,
                        tasks: r.tasks,
                        sources: r.sources,
                        last_barrier: n,
                        last_completed: n,
                        counters: r.counters,
                        parallelism: need,
                        held: true,
                        state_bytes: r.state_bytes,
                        memory_bytes: r.memory_bytes,
                        ..Default::default()
                    },
                    &replaces,
                );
                tracing::info!(job = %job.id, taskmanager = %tm, checkpoint = n, state_bytes = r.state_bytes, ms = started.elapsed().as_millis() as u64, "hot standby: job held at its newest checkpoint");
                if self.inner.warm.frozen.load(Ordering::SeqCst) {
                    // A promotion came meanwhile and did not wait for this
                    // load: the held state is nobody's now.
                    cancel(pool, &tm, &deployment).await;
                }
            }
            Err(e) if e.code() == tonic::Code::ResourceExhausted => {
                tracing::info!(job = %job.id, taskmanager = %tm, "hot standby: {}", e.message());
            }
            Err(e) => {
                tracing::warn!(job = %job.id, taskmanager = %tm, checkpoint = n, "hot standby: loading the job's checkpoint failed (tried again next tick): {}", e.message());
            }
        }
    }

    /// The region was promoted under `region_epoch`: starts every held job
    /// whose snapshot is still its newest (after waiting, bounded, for
    /// loads in flight), and cancels every other held deployment. Returns
    /// how many started hot.
    pub(crate) async fn release_held(&self, region_epoch: RegionEpoch) -> usize {
        let warm = &self.inner.warm;
        if !warm.hot() {
            return 0;
        }
        warm.frozen.store(true, Ordering::SeqCst);
        let Some(pool) = self.inner.taskmanagers.get().cloned() else {
            return 0;
        };
        let deadline = tokio::time::Instant::now() + RELEASE_WAIT;
        loop {
            let notified = warm.loaded.notified();
            let pending = warm.loading().len();
            if pending == 0 {
                break;
            }
            tracing::info!(
                loads = pending,
                "promotion: waiting for the hot standby's loads in flight"
            );
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                tracing::warn!(
                    loads = pending,
                    "promotion: hot standby loads still running after {RELEASE_WAIT:?}; their jobs restore cold"
                );
                break;
            }
        }
        let Some(epoch) = self.inner.leadership.fence() else {
            return 0;
        };
        let fence_ms = self
            .inner
            .region_fence
            .remaining()
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        let mut by_job: BTreeMap<String, Vec<(String, proto::DeploymentStatus)>> = BTreeMap::new();
        for (tm, st) in pool.held() {
            by_job.entry(st.job_id.clone()).or_default().push((tm, st));
        }
        let releases = by_job.into_values().map(|mut held| {
            let pool = pool.clone();
            async move {
                held.sort_by_key(|(_, st)| st.last_barrier);
                let newest_held = held.pop().expect("grouped: at least one");
                for (tm, st) in &held {
                    cancel(&pool, tm, &st.deployment).await;
                }
                let (tm, st) = newest_held;
                let released = self
                    .release_one(&pool, &tm, &st, epoch, region_epoch, fence_ms)
                    .await;
                if !released {
                    cancel(&pool, &tm, &st.deployment).await;
                }
                released
            }
        });
        let released = futures::future::join_all(releases)
            .await
            .into_iter()
            .filter(|r| *r)
            .count();
        self.refresh_held_metrics(&pool);
        released
    }

    /// Releases one held deployment if its snapshot is its job's newest.
    async fn release_one(
        &self,
        pool: &Arc<TaskManagers>,
        tm: &str,
        st: &proto::DeploymentStatus,
        epoch: ferry_core::JmEpoch,
        region_epoch: RegionEpoch,
        fence_ms: u64,
    ) -> bool {
        let m = self.metrics();
        let Some(job) = st
            .job_id
            .parse::<JobId>()
            .ok()
            .and_then(|id| self.inner.entry(&id))
            .filter(|j| active(j))
        else {
            return false;
        };
        match newest_complete(&job.root, &job.id).await {
            Ok(Some((n, _, manifest))) if n.0 == st.last_barrier && !manifest.finished => {}
            Ok(newest) => {
                let newest = newest
                    .map(|(n, _, _)| n.to_string())
                    .unwrap_or("none".into());
                tracing::info!(job = %job.id, held = st.last_barrier, %newest, "promotion: the held checkpoint is not the job's newest: restoring it from the store instead");
                m.standby_restored_cold.inc();
                return false;
            }
            Err(e) => {
                tracing::warn!(job = %job.id, "promotion: cannot list the job's snapshots ({e}): restoring it from the store instead");
                m.standby_restored_cold.inc();
                return false;
            }
        }
        let Some((mut client, _)) = pool.client_of(tm) else {
            m.standby_restored_cold.inc();
            return false;
        };
        let attempt = job.status.lock().unwrap_or_else(|p| p.into_inner()).attempt + 1;
        let started = std::time::Instant::now();
        let r = client
            .release(proto::ReleaseRequest {
                epoch: epoch.0,
                deployment: st.deployment.clone(),
                region_epoch: region_epoch.0,
                fence_ms,
                attempt,
            })
            .await;
        match r {
            Ok(status) => {
                pool.record(tm, status.into_inner(), "");
                job.count_attempt();
                m.standby_released.inc();
                tracing::info!(job = %job.id, taskmanager = %tm, checkpoint = st.last_barrier, %region_epoch, ms = started.elapsed().as_millis() as u64, "promotion: started the job from its held state (hot standby): no restore");
                true
            }
            Err(e) => {
                tracing::warn!(job = %job.id, taskmanager = %tm, "promotion: releasing the held job failed ({}): restoring it from the store instead", e.message());
                m.standby_restored_cold.inc();
                false
            }
        }
    }

    /// The region is a standby again: loads may start.
    pub(crate) fn thaw_warm(&self) {
        self.inner.warm.frozen.store(false, Ordering::SeqCst);
    }

    fn refresh_held_metrics(&self, pool: &TaskManagers) {
        let held = pool.held();
        let m = self.metrics();
        m.standby_held_jobs.set(held.len() as i64);
        m.standby_held_slots
            .set(held.iter().map(|(_, s)| i64::from(s.slots)).sum());
        m.standby_held_state_bytes
            .set(held.iter().map(|(_, s)| s.state_bytes as i64).sum());
        m.standby_held_memory_bytes
            .set(held.iter().map(|(_, s)| s.memory_bytes as i64).sum());
    }

    /// This region's slots and what its hot standby holds (for the region
    /// heartbeat); `None` while it has no TaskManagers to hold anything on.
    pub fn region_resources(&self) -> Option<RegionResources> {
        let pool = self.inner.taskmanagers.get()?;
        self.refresh_held_metrics(pool);
        let c = pool.capacity();
        let held = pool.held();
        Some(RegionResources {
            standby: self
                .inner
                .warm
                .mode
                .get()
                .copied()
                .unwrap_or_default()
                .as_str()
                .to_string(),
            taskmanagers: c.taskmanagers,
            slots: c.slots,
            slots_used: c.used,
            held_slots: held.iter().map(|(_, s)| s.slots).sum(),
            held_state_bytes: held.iter().map(|(_, s)| s.state_bytes).sum(),
            held_memory_bytes: held.iter().map(|(_, s)| s.memory_bytes).sum(),
            held: held
                .iter()
                .map(|(_, s)| (s.job_id.clone(), s.last_barrier))
                .collect(),
        })
    }
}

/// Cancels a held deployment and waits for the TaskManager to drop it
/// (its slots are free once this returns, unless it was unreachable).
async fn cancel(pool: &TaskManagers, tm: &str, deployment: &str) {
    let Some((mut client, epoch)) = pool.client_of(tm) else {
        return;
    };
    pool.forget(tm, deployment);
    if let Err(e) = client
        .cancel(proto::CancelRequest {
            epoch: epoch.0,
            deployment: deployment.to_string(),
        })
        .await
    {
        tracing::warn!(taskmanager = %tm, %deployment, "dropping a held deployment failed: {}", e.message());
    }
}
