//! The leader's scheduler: drains TaskManagers and evens out the slot load
//! by moving jobs — stop with a savepoint, then deploy again from it on
//! other slots ([`JobCommand::Move`]). A drain moves every job with tasks
//! on a draining TaskManager (nothing new is placed there meanwhile); a
//! rebalance moves whole jobs from the most to the least loaded
//! TaskManagers while that lowers the load's spread
//! ([`slot_load_variance`]), by hand (`ferry cluster rebalance`) or by
//! itself with `scheduling.rebalance: auto`.
//!
//! Invariants: only the leader moves jobs; a job moves at most once at a
//! time, and at most `scheduling.maxConcurrentMoves` jobs move at once;
//! a move is a savepoint and a restore, never a restart from an older
//! checkpoint, so it loses and repeats nothing.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ferry_core::JobId;
use ferry_core::api::{DrainReport, PlannedMove, RebalancePlan, TaskManagerJob, TaskManagerView};
use ferry_core::config::{Rebalance, SchedulingConfig};
use tokio::sync::{Semaphore, oneshot};
use tokio_util::sync::CancellationToken;

use crate::error::JmError;
use crate::job::JobCommand;
use crate::service::JobManager;
use crate::state::JobState;
use crate::taskmanagers::{DrainError, TaskManagers, TmView, slot_load_variance};

/// A move lowers the spread by at least this much, or is not worth its
/// savepoint.
const MIN_GAIN: f64 = 0.005;

/// How long a move may take to get its job running again before the
/// scheduler stops counting it as in flight.
const MOVE_LIMIT: Duration = Duration::from_secs(120);

/// Moves at once when no scheduler loop set its own bound.
const DEFAULT_MAX_MOVES: u32 = 4;

/// The pool's TaskManagers in the API's form.
pub(crate) fn views(pool: &TaskManagers) -> Vec<TaskManagerView> {
    pool.view()
        .into_iter()
        .map(|t| TaskManagerView {
            id: t.id,
            slots: t.slots,
            used: t.used,
            draining: t.draining,
            exchange: t.exchange,
            jobs: t
                .jobs
                .into_iter()
                .map(|(job, slots)| TaskManagerJob {
                    job: job.to_string(),
                    slots,
                })
                .collect(),
        })
        .collect()
}

/// The moves that bring the slot load's spread to `target` or as close as
/// whole-job moves get it: repeatedly the job on the most loaded
/// TaskManager whose move to the least loaded one lowers the spread most
/// (by at least [`MIN_GAIN`]). Draining TaskManagers and jobs spread over
/// several TaskManagers are left alone. Pure, for tests and `--dry-run`.
pub fn plan_rebalance(tms: &[TmView], target: f64) -> RebalancePlan {
    let live: Vec<&TmView> = tms.iter().filter(|t| !t.draining).collect();
    let mut used: Vec<u32> = live.iter().map(|t| t.used).collect();
    let slots: Vec<u32> = live.iter().map(|t| t.slots).collect();
    // Jobs on exactly one TaskManager (whole), by TaskManager index.
    let mut places: HashMap<JobId, usize> = HashMap::new();
    for t in tms {
        for (job, _) in &t.jobs {
            *places.entry(*job).or_default() += 1;
        }
    }
    let mut jobs: Vec<Vec<(JobId, u32)>> = live
        .iter()
        .map(|t| {
            t.jobs
                .iter()
                .filter(|(j, _)| places.get(j) == Some(&1))
                .copied()
                .collect()
        })
        .collect();
    let spread = |used: &[u32]| {
        let loads: Vec<(u32, u32)> = used.iter().copied().zip(slots.iter().copied()).collect();
        slot_load_variance(&loads)
    };
    let before = spread(&used);
    let mut now = before;
    let mut moves = Vec::new();
    let load = |i: usize, used: &[u32]| f64::from(used[i]) / f64::from(slots[i].max(1));
    for _ in 0..places.len() {
        if now <= target || live.len() < 2 {
            break;
        }
        let src = (0..live.len())
            .filter(|&i| !jobs[i].is_empty())
            .max_by(|&a, &b| load(a, &used).total_cmp(&load(b, &used)));
        let dst = (0..live.len()).min_by(|&a, &b| load(a, &used).total_cmp(&load(b, &used)));
        let (Some(src), Some(dst)) = (src, dst) else {
            break;
        };
        if src == dst {
            break;
        }
        let free = slots[dst].saturating_sub(used[dst]);
        let best = jobs[src]
            .iter()
            .enumerate()
            .filter(|(_, (_, s))| *s <= free)
            .map(|(k, (_, s))| {
                let mut after = used.clone();
                after[src] -= s;
                after[dst] += s;
                (k, spread(&after))
            })
            .min_by(|a, b| a.1.total_cmp(&b.1));
        let Some((k, after)) = best.filter(|(_, after)| *after <= now - MIN_GAIN) else {
            break;
        };
        let (job, s) = jobs[src].remove(k);
        used[src] -= s;
        used[dst] += s;
        jobs[dst].push((job, s));
        now = after;
        moves.push(PlannedMove {
            job: job.to_string(),
            from: live[src].id.clone(),
            to: live[dst].id.clone(),
            slots: s,
        });
    }
    RebalancePlan {
        variance_before: before,
        variance_after: now,
        moves,
        dry_run: false,
    }
}

/// What a drain does now: the jobs on draining TaskManagers that fit on
/// the others, and those that do not (yet).
#[derive(Debug, Default, PartialEq)]
pub struct DrainPlan {
    /// (job, a draining TaskManager it runs on): move it now.
    pub moves: Vec<(JobId, String)>,
    /// (job, slots it needs, slots it would find): it keeps running where
    /// it is until that many are free on TaskManagers that are not
    /// draining — stopping it would only stop its output.
    pub blocked: Vec<(JobId, u32, u32)>,
}

/// Plans a drain step over `tms`, skipping jobs in `skip` (moving
/// already, or not running). A job fits when the free slots of the
/// TaskManagers that are not draining, plus the slots it uses there
/// itself (freed when it stops), hold all of its slots; each job planned
/// to move takes its share of those free slots, so two jobs never count
/// on the same ones. Pure, for tests.
pub fn plan_drain(tms: &[TmView], skip: impl Fn(JobId) -> bool) -> DrainPlan {
    let mut free: u32 = tms
        .iter()
        .filter(|t| !t.draining)
        .map(|t| t.slots.saturating_sub(t.used))
        .sum();
    // Per job: (slots in all, slots on TaskManagers not draining).
    let mut slots: HashMap<JobId, (u32, u32)> = HashMap::new();
    for t in tms {
        for (job, s) in &t.jobs {
            let e = slots.entry(*job).or_default();
            e.0 += s;
            if !t.draining {
                e.1 += s;
            }
        }
    }
    let mut plan = DrainPlan::default();
    let mut seen = HashSet::new();
    for t in tms.iter().filter(|t| t.draining) {
        for (job, _) in &t.jobs {
            if !seen.insert(*job) || skip(*job) {
                continue;
            }
            let (need, own) = slots[job];
            let room = free + own;
            if need <= room {
                free -= need - own;
                plan.moves.push((*job, t.id.clone()));
            } else {
                plan.blocked.push((*job, need, room));
            }
        }
    }
    plan
}

/// Jobs moving now (shared by the loop and the API's rebalance).
#[derive(Clone)]
pub(crate) struct Moves {
    inner: Arc<MovesInner>,
}

struct MovesInner {
    moving: Mutex<HashSet<JobId>>,
    permits: Semaphore,
}

impl Moves {
    pub(crate) fn new(max: u32) -> Self {
        Self {
            inner: Arc::new(MovesInner {
                moving: Mutex::new(HashSet::new()),
                permits: Semaphore::new(max.max(1) as usize),
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashSet<JobId>> {
        self.inner.moving.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn in_flight(&self) -> usize {
        self.lock().len()
    }

    /// The jobs moving now.
    fn moving(&self) -> HashSet<JobId> {
        self.lock().clone()
    }

    /// Moves `job` in the background unless it is moving already: waits for
    /// a permit, asks its driver to move, and counts it in flight until it
    /// runs again in a new deployment (bounded by [`MOVE_LIMIT`]) — which
    /// may be on `from` again when the drain that moved it was cancelled
    /// before the job found room elsewhere.
    pub(crate) fn start(
        &self,
        jm: &JobManager,
        job: JobId,
        from: String,
        to: Option<String>,
        reason: String,
    ) -> bool {
        if !self.lock().insert(job) {
            return false;
        }
        let (this, jm) = (self.clone(), jm.clone());
        tokio::spawn(async move {
            let Ok(_permit) = this.inner.permits.acquire().await else {
                return;
            };
            let started = Instant::now();
            let deployed = |jm: &JobManager| jm.get(&job.to_string()).ok().map(|i| i.deployment);
            let before = deployed(&jm);
            match jm.move_job(job, reason.clone(), to).await {
                Ok(()) => {
                    // In flight until it runs again, deployed anew.
                    let mut state = jm.job_state(job);
                    while started.elapsed() < MOVE_LIMIT {
                        let running_again = jm
                            .get(&job.to_string())
                            .map(|i| i.state == JobState::Running && Some(i.deployment) != before)
                            .unwrap_or(true);
                        if running_again || state.as_ref().is_none_or(|s| s.borrow().is_terminal())
                        {
                            break;
                        }
                        let Some(s) = state.as_mut() else { break };
                        let _ = tokio::time::timeout(Duration::from_secs(1), s.changed()).await;
                    }
                    tracing::info!(job = %job, from = %from, took_ms = started.elapsed().as_millis() as u64, "moved the job ({reason})");
                }
                Err(e) => tracing::warn!(job = %job, from = %from, "moving the job failed: {e}"),
            }
            this.lock().remove(&job);
        });
        true
    }
}

/// Drains and rebalances while this JobManager leads, until `shutdown`.
pub async fn run(
    jm: JobManager,
    pool: Arc<TaskManagers>,
    cfg: SchedulingConfig,
    shutdown: CancellationToken,
) {
    let moves = jm.moves(cfg.max_concurrent_moves);
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_rebalance = Instant::now();
    // Jobs a drain cannot move yet (logged once each while blocked).
    let mut blocked: HashSet<JobId> = HashSet::new();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        if jm.leadership().fence().is_none() {
            continue;
        }
        let tms = pool.view();
        let draining = tms.iter().any(|t| t.draining);
        let moving = moves.moving();
        let drain = plan_drain(&tms, |job| {
            moving.contains(&job) || jm.job_state_now(job) != Some(JobState::Running)
        });
        for (job, from) in drain.moves {
            moves.start(
                &jm,
                job,
                from.clone(),
                None,
                format!("TaskManager {from} is draining"),
            );
        }
        let now_blocked: HashSet<JobId> = drain.blocked.iter().map(|(j, ..)| *j).collect();
        for (job, need, room) in &drain.blocked {
            if !blocked.contains(job) {
                tracing::warn!(job = %job, needed = need, free = room, "a drain cannot move the job yet: it needs {need} slots and the TaskManagers that are not draining have {room} for it; it keeps running until there is room (add a TaskManager, or end the drain)");
            }
        }
        blocked = now_blocked;
        if cfg.rebalance != Rebalance::Auto
            || draining
            || moves.in_flight() > 0
            || last_rebalance.elapsed() < cfg.rebalance_interval.get()
        {
            continue;
        }
        let plan = plan_rebalance(&tms, cfg.rebalance_threshold / 2.0);
        if plan.variance_before <= cfg.rebalance_threshold || plan.moves.is_empty() {
            continue;
        }
        last_rebalance = Instant::now();
        tracing::info!(
            variance = plan.variance_before,
            planned = plan.variance_after,
            moves = plan.moves.len(),
            "slot load spread above scheduling.rebalanceThreshold ({}): rebalancing",
            cfg.rebalance_threshold
        );
        start_plan(&jm, &moves, &plan);
    }
}

/// Starts the moves of a plan.
fn start_plan(jm: &JobManager, moves: &Moves, plan: &RebalancePlan) {
    for m in &plan.moves {
        let Ok(job) = m.job.parse::<JobId>() else {
            continue;
        };
        if moves.start(
            jm,
            job,
            m.from.clone(),
            Some(m.to.clone()),
            format!("rebalancing: {} -> {}", m.from, m.to),
        ) {
            jm.metrics().rebalance_moves.inc();
        }
    }
}

impl JobManager {
    /// The scheduler's moves in flight (created on first use, with at
    /// most `max` at once).
    pub(crate) fn moves(&self, max: u32) -> Moves {
        self.inner.moves.get_or_init(|| Moves::new(max)).clone()
    }

    fn pool_for(&self, what: &str) -> Result<Arc<TaskManagers>, JmError> {
        let pool = self.inner.taskmanagers.get().cloned().ok_or_else(|| {
            JmError::BadRequest(format!(
                "{what} needs TaskManagers: this JobManager runs jobs in its own process (scheduling.placement: inProcess)"
            ))
        })?;
        if self.leadership().fence().is_none() {
            return Err(self.not_leader());
        }
        Ok(pool)
    }

    /// Moves a running job: stop with a savepoint, deploy again from it
    /// (preferring TaskManager `to`). Returns once the savepoint is taken.
    pub(crate) async fn move_job(
        &self,
        job: JobId,
        reason: String,
        to: Option<String>,
    ) -> Result<(), JmError> {
        let entry = self.inner.find(&job.to_string())?;
        let (tx, rx) = oneshot::channel();
        entry
            .commands
            .send(JobCommand::Move {
                reason,
                to,
                reply: tx,
            })
            .map_err(|_| JmError::Runtime("the job's driver has ended".into()))?;
        rx.await
            .map_err(|_| JmError::Runtime("the job ended before its savepoint".into()))?
            .map(drop)
    }

    fn job_state(&self, job: JobId) -> Option<tokio::sync::watch::Receiver<JobState>> {
        self.inner
            .find(&job.to_string())
            .ok()
            .map(|j| j.state_tx.subscribe())
    }

    fn job_state_now(&self, job: JobId) -> Option<JobState> {
        self.inner.find(&job.to_string()).ok().map(|j| j.state())
    }

    /// Starts (`on`) or ends draining TaskManager `id`.
    pub async fn drain_taskmanager(&self, id: &str, on: bool) -> Result<DrainReport, JmError> {
        let pool = self.pool_for("draining a TaskManager")?;
        pool.set_draining(id, on).await.map_err(|e| match e {
            DrainError::NotLeading => self.not_leader(),
            DrainError::Unknown(_) => JmError::Missing(format!(
                "{e}; `ferry cluster status` lists the TaskManagers"
            )),
            DrainError::Unreachable(m) => JmError::Runtime(format!(
                "{m}; retry, or stop the TaskManager (its jobs restart elsewhere from their checkpoints)"
            )),
        })?;
        let tms = pool.view();
        let this = tms.iter().find(|t| t.id == id);
        let jobs: Vec<String> = this
            .map(|t| t.jobs.iter().map(|(j, _)| j.to_string()).collect())
            .unwrap_or_default();
        let needed = this
            .map(|t| t.jobs.iter().map(|(_, s)| s).sum())
            .unwrap_or(0);
        let free_elsewhere = tms
            .iter()
            .filter(|t| t.id != id && !t.draining)
            .map(|t| t.slots.saturating_sub(t.used))
            .sum();
        if on {
            tracing::info!(taskmanager = %id, jobs = jobs.len(), needed, free_elsewhere, "draining the TaskManager");
        }
        Ok(DrainReport {
            taskmanager: id.to_string(),
            draining: on,
            jobs,
            free_elsewhere,
            needed,
        })
    }

    /// Plans (and unless `dry_run`, starts) the moves that even out the
    /// slot load.
    pub async fn rebalance(&self, dry_run: bool) -> Result<RebalancePlan, JmError> {
        let pool = self.pool_for("rebalancing")?;
        let mut plan = plan_rebalance(&pool.view(), 0.0);
        plan.dry_run = dry_run;
        if !dry_run {
            let moves = self.moves(DEFAULT_MAX_MOVES);
            if moves.in_flight() > 0 {
                return Err(JmError::BadRequest(format!(
                    "{} jobs are moving now (a drain or an earlier rebalance): retry once they run again",
                    moves.in_flight()
                )));
            }
            tracing::info!(
                moves = plan.moves.len(),
                variance = plan.variance_before,
                planned = plan.variance_after,
                "rebalancing by request"
            );
            start_plan(self, &moves, &plan);
        }
        Ok(plan)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tm(id: &str, slots: u32, jobs: &[(u128, u32)]) -> TmView {
        TmView {
            id: id.into(),
            slots,
            used: jobs.iter().map(|(_, s)| s).sum(),
            draining: false,
            exchange: true,
            jobs: jobs.iter().map(|(j, s)| (job(*j), *s)).collect(),
        }
    }

    fn job(n: u128) -> JobId {
        format!("{n:032x}").parse().unwrap()
    }

    #[test]
    fn a_drain_moves_only_jobs_that_fit_elsewhere_and_never_counts_a_slot_twice() {
        // a (draining): job 1 (2 slots), job 2 (3 slots), and 3 slots of
        // job 3, which has 1 more on b. b: 5 slots, 2 used (job 3, job 4).
        let mut a = tm("a", 8, &[(1, 2), (2, 3), (3, 3)]);
        a.draining = true;
        let b = tm("b", 5, &[(3, 1), (4, 1)]);
        let tms = vec![a, b];
        // Free on b: 3. Job 1 fits (3 → 1 free), job 2 then does not,
        // job 3 needs 4 and finds 1 + its own 1.
        let plan = plan_drain(&tms, |_| false);
        assert_eq!(plan.moves, vec![(job(1), "a".to_string())]);
        assert_eq!(plan.blocked, vec![(job(2), 3, 1), (job(3), 4, 2)]);
        // Skipped jobs (moving, not running) take nothing: job 2 fits.
        let plan = plan_drain(&tms, |j| j == job(1));
        assert_eq!(plan.moves, vec![(job(2), "a".to_string())]);
        assert_eq!(plan.blocked, vec![(job(3), 4, 1)]);
        // Nothing draining: nothing to do.
        let calm = vec![tm("a", 8, &[(1, 2)]), tm("b", 5, &[])];
        assert_eq!(plan_drain(&calm, |_| false), DrainPlan::default());
    }

    /// Applies a plan to the views, as the moves would.
    fn apply(tms: &mut [TmView], plan: &RebalancePlan) {
        for m in &plan.moves {
            let job: JobId = m.job.parse().unwrap();
            let from = tms.iter_mut().find(|t| t.id == m.from).unwrap();
            from.jobs.retain(|(j, _)| *j != job);
            from.used -= m.slots;
            let to = tms.iter_mut().find(|t| t.id == m.to).unwrap();
            to.jobs.push((job, m.slots));
            to.used += m.slots;
        }
    }

    #[test]
    fn a_joining_taskmanager_gets_a_fair_share() {
        // 60 one-slot jobs over three TaskManagers of 32 slots; a fourth
        // joins empty.
        let mut tms = vec![
            tm("a", 32, &(0..20).map(|j| (j, 1)).collect::<Vec<_>>()),
            tm("b", 32, &(20..40).map(|j| (j, 1)).collect::<Vec<_>>()),
            tm("c", 32, &(40..60).map(|j| (j, 1)).collect::<Vec<_>>()),
            tm("d", 32, &[]),
        ];
        let plan = plan_rebalance(&tms, 0.1);
        let loads = |t: &[TmView]| t.iter().map(|t| (t.used, t.slots)).collect::<Vec<_>>();
        assert!((plan.variance_before - slot_load_variance(&loads(&tms))).abs() < 1e-12);
        assert!(plan.variance_before > 0.5, "{plan:?}");
        assert!(plan.variance_after <= 0.1, "{plan:?}");
        assert!(plan.moves.iter().all(|m| m.to == "d"), "{plan:?}");
        apply(&mut tms, &plan);
        // The plan's own account agrees with the moved state.
        assert!((plan.variance_after - slot_load_variance(&loads(&tms))).abs() < 1e-12);
        // Nothing moves twice.
        let mut moved: Vec<&str> = plan.moves.iter().map(|m| m.job.as_str()).collect();
        moved.sort_unstable();
        moved.dedup();
        assert_eq!(moved.len(), plan.moves.len());
        // Asked for an even load, the rest follows: 15 each.
        let rest = plan_rebalance(&tms, 0.0);
        apply(&mut tms, &rest);
        assert!(tms.iter().all(|t| t.used == 15), "{tms:?}");
        assert_eq!(plan.moves.len() + rest.moves.len(), 15);
        assert!(plan_rebalance(&tms, 0.0).moves.is_empty());
    }

    #[test]
    fn an_even_load_plans_no_move_and_draining_or_split_jobs_stay() {
        let even = vec![tm("a", 4, &[(1, 2)]), tm("b", 4, &[(2, 2)])];
        let plan = plan_rebalance(&even, 0.0);
        assert!(plan.moves.is_empty(), "{plan:?}");
        assert_eq!(plan.variance_before, 0.0);

        // A job spread over a and b (job 9) never moves; the draining
        // TaskManager takes nothing and is not counted.
        let mut draining = tm("z", 8, &[]);
        draining.draining = true;
        let tms = vec![
            tm("a", 4, &[(1, 2), (9, 2)]),
            tm("b", 4, &[(9, 2)]),
            draining,
        ];
        let plan = plan_rebalance(&tms, 0.0);
        assert!(plan.moves.iter().all(|m| m.job != job(9).to_string()));
        assert!(plan.moves.iter().all(|m| m.to != "z"), "{plan:?}");
    }

    #[test]
    fn a_job_too_big_for_the_emptiest_taskmanager_stays() {
        let tms = vec![tm("a", 8, &[(1, 6)]), tm("b", 4, &[])];
        let plan = plan_rebalance(&tms, 0.0);
        assert!(plan.moves.is_empty(), "{plan:?}");
        assert_eq!(plan.variance_after, plan.variance_before);
    }
}
