//! Planned moves of the primary role: switchover (`POST
//! /v1/regions/{target}/failover`), forced failover (`?force=true`, when
//! the primary is unreachable) and fail-back (`POST
//! /v1/regions/{target}/failback`, the jobs go home with a divergence
//! report).
//!
//! A switchover stops every job with a savepoint, waits until every
//! savepoint is complete in the target's store, then moves the lease by
//! compare-and-set; the target resumes every job from its savepoint —
//! nothing lost, nothing repeated.
//!
//! Invariant: every job ends up running in exactly one region. Before the
//! lease moved, any failure resumes the jobs here. When the lease cannot be
//! moved because the global KV has no quorum, the move is retried for
//! [`LEASE_MOVE_RETRY`]; then a renewal decides: the lease is still ours
//! (resume here), or it cannot be confirmed (the jobs stay stopped and
//! resume wherever the lease names once the global KV answers).

use std::time::Duration;

use ferry_core::api::{DivergenceReport, JobDivergence, SavepointRef, SwitchoverReport};
use ferry_core::manifest::{MANIFEST_FILE, SnapshotKind, snapshot_dir};
use ferry_core::{CheckpointId, JobId, RegionEpoch};
use tokio::time::Instant;

use crate::coordinator::Coordinator;
use crate::diverge;
use crate::error::RegionError;
use crate::lease::{self, Lease, LeaseError};
use crate::role::Role;

/// How long a switchover keeps trying to move the lease while the global
/// KV cannot take writes (a new stream leader is elected in about 7 s).
pub const LEASE_MOVE_RETRY: Duration = Duration::from_secs(30);

/// How long a switchover waits for its savepoints in the target's store.
pub const SAVEPOINT_WAIT: Duration = Duration::from_secs(60);

impl Coordinator {
    /// Makes `target` the primary: planned, or `force`d (move the lease now;
    /// the old primary's work after its last replicated checkpoint is
    /// lost), or with `dry_run` only the plan. `actor` (who asked) goes
    /// into the lease record and the webhook's announcements.
    pub async fn switchover(
        &self,
        target: &str,
        force: bool,
        dry_run: bool,
        actor: &str,
    ) -> Result<SwitchoverReport, RegionError> {
        self.known(target)?;
        let _op = self.ops.try_lock().map_err(|_| busy())?;
        if force {
            return self.forced(target, dry_run, actor).await;
        }
        self.planned(target, dry_run, actor).await
    }

    /// Moves the jobs home to `target` (default: the home region) once it
    /// is healthy (waiting up to `wait`) and has caught up, with the
    /// report of what it committed after the latest failover away from it;
    /// on behalf of `actor`.
    pub async fn failback(
        &self,
        target: Option<&str>,
        dry_run: bool,
        wait: Duration,
        actor: &str,
    ) -> Result<SwitchoverReport, RegionError> {
        let Some(target) = target.or(self.s.home.as_deref()).map(str::to_string) else {
            return Err(RegionError::BadRequest(
                "no home region is configured (regions.primary): name the region to fail back to (--to REGION)".into(),
            ));
        };
        let target_store = self.known(&target)?.clone();
        let _op = self.ops.try_lock().map_err(|_| busy())?;
        let lease = self.holding_primary("fail-back").await?;
        let me = self.s.region.clone();
        if target == me {
            return Err(RegionError::AlreadyPrimary {
                region: target,
                epoch: lease.epoch,
                what: "; nothing to fail back".into(),
            });
        }
        let started = Instant::now();
        while !self
            .seen()
            .views
            .iter()
            .any(|v| v.region == target && v.healthy)
        {
            if started.elapsed() >= wait {
                return Err(RegionError::Timeout(format!(
                    "{target} did not become healthy within {} (no region heartbeat): start its JobManagers and TaskManagers, wait until `ferry region status` shows it healthy, then retry",
                    humantime::format_duration(wait)
                )));
            }
            tokio::time::sleep(self.s.interval).await;
        }
        let source = self.s.stores.get(&me).cloned().ok_or_else(|| {
            RegionError::BadRequest(format!("this region {me} has no entry in regions.stores"))
        })?;
        // Catch up now: the switchover's savepoints then only add the
        // last bit. Replication archives what the target committed beyond
        // this lineage.
        let mut jobs = Vec::new();
        for j in self.jobs.jobs() {
            crate::replicate_job(&source, &target_store, &j.id, self.replicator.fence())
                .await
                .map_err(|e| {
                    RegionError::Store(format!(
                        "replicating job {} to {target} failed: {e}; nothing was moved",
                        j.id
                    ))
                })?;
            let lineage = diverge::lineage_epoch(&source, &j.id)
                .await
                .map_err(|e| RegionError::Store(format!("reading job {}: {e}", j.id)))?;
            let archived: Vec<_> = diverge::archived(&target_store, &j.id)
                .await
                .map_err(|e| {
                    RegionError::Store(format!(
                        "reading the divergence of job {} in {target}: {e}",
                        j.id
                    ))
                })?
                .into_iter()
                .filter(|d| Some(d.replaced_by_epoch) == lineage)
                .collect();
            if !archived.is_empty() {
                jobs.push(diverge::summarise(j.id, archived));
            }
        }
        let divergence = divergence_report(&target, lease.epoch, jobs);
        if dry_run {
            let mut plan = self.plan(&target, &lease, &target_store);
            plan.failback = true;
            plan.steps.insert(
                0,
                format!("{target} has caught up (every job replicated into its store)"),
            );
            plan.divergence = Some(divergence);
            return Ok(plan);
        }
        let mut report = self.planned(&target, false, actor).await?;
        report.failback = true;
        report.divergence = Some(divergence);
        Ok(report)
    }

    /// The lease this region holds as the primary, or why an operation
    /// that must run here cannot. A region still starting up or starting
    /// its jobs is waited for, up to the region timeout.
    pub(crate) async fn holding_primary(&self, what: &str) -> Result<Lease, RegionError> {
        let deadline = Instant::now() + self.s.timeout;
        let role = loop {
            let role = self.role.lock().await.clone();
            if matches!(role, Role::Promoting { .. } | Role::Starting) && Instant::now() < deadline
            {
                tokio::time::sleep(self.s.interval).await;
                continue;
            }
            break role;
        };
        match &role {
            Role::Primary { lease, .. } => Ok(lease.clone()),
            Role::Follower => Err(RegionError::NotLeader(self.s.region.clone())),
            Role::Promoting { .. } | Role::Starting => Err(RegionError::Conflict(format!(
                "region {} is still starting its jobs as the primary after {}; retry in a moment (`ferry region status` shows its role)",
                self.s.region,
                humantime::format_duration(self.s.timeout)
            ))),
            other => {
                let seen = self.seen();
                match seen.primary {
                    Some(p) if p != self.s.region => Err(RegionError::NotPrimary {
                        what: what.to_string(),
                        url: self
                            .seen()
                            .views
                            .iter()
                            .find(|v| v.region == p)
                            .and_then(|v| v.heartbeat.as_ref())
                            .map(|h| h.api_url.clone()),
                        primary: p,
                    }),
                    _ => Err(RegionError::Conflict(format!(
                        "region {} is {other} now, not the primary: {what} is not possible ({}); `ferry region status` shows every region",
                        self.s.region,
                        other.jobs_here()
                    ))),
                }
            }
        }
    }

    fn plan(
        &self,
        target: &str,
        lease: &Lease,
        target_store: &ferry_core::storage::StorageLocation,
    ) -> SwitchoverReport {
        SwitchoverReport {
            from: self.s.region.clone(),
            to: target.to_string(),
            epoch: lease.epoch,
            dry_run: true,
            jobs: running(self),
            steps: vec![
                "stop every job with a savepoint".into(),
                format!("wait until the savepoints are in {}", target_store.url()),
                "move the region lease".into(),
                format!("{target} resumes every job from its savepoint"),
            ],
            ..Default::default()
        }
    }

    async fn planned(
        &self,
        target: &str,
        dry_run: bool,
        actor: &str,
    ) -> Result<SwitchoverReport, RegionError> {
        let started = Instant::now();
        let me = self.s.region.clone();
        let target_store = self.known(target)?.clone();
        let lease = self.holding_primary("a planned switchover").await?;
        if lease.names(target) {
            return Err(RegionError::AlreadyPrimary {
                region: target.to_string(),
                epoch: lease.epoch,
                what: String::new(),
            });
        }
        if !self
            .seen()
            .views
            .iter()
            .any(|v| v.region == target && v.healthy)
        {
            return Err(RegionError::Conflict(format!(
                "{target} is not healthy (no region heartbeat within {}): a switchover to it would stop every job for nothing; start its JobManagers and TaskManagers and retry",
                humantime::format_duration(self.s.timeout)
            )));
        }
        if dry_run {
            return Ok(self.plan(target, &lease, &target_store));
        }
        // From here the loop renews the lease but starts no job.
        {
            let mut role = self.role.lock().await;
            match role.clone() {
                Role::Primary { lease, until, .. } => self.enter(
                    &mut role,
                    Role::SwitchingOver {
                        lease,
                        until,
                        to: target.to_string(),
                    },
                ),
                other => {
                    return Err(RegionError::Conflict(format!(
                        "the region role changed to {other} meanwhile; nothing was moved, and {}; `ferry region status` shows every region",
                        other.jobs_here()
                    )));
                }
            }
        }
        tracing::info!(to = %target, "switchover: stopping every job with a savepoint");
        let mut savepoints: Vec<SavepointRef> = Vec::new();
        for (job, r) in self.jobs.stop_with_savepoints(target).await {
            match r {
                Ok(sp) => savepoints.push(sp),
                Err(e) => {
                    self.roll_back().await;
                    return Err(RegionError::Conflict(format!(
                        "stopping job {job} with a savepoint failed: {e}; the region lease was not moved and every job resumes here in {me}"
                    )));
                }
            }
        }
        // Every savepoint complete in the target before the lease moves.
        // The jobs are stopped until it does: copy the savepoints now, all
        // at once, rather than wait for the replicator's next pass (which
        // may be busy); what fails here the replicator still brings.
        let copies = savepoints.iter().map(|sp| {
            copy_savepoint_now(
                self.s.stores.get(&me),
                &target_store,
                sp,
                self.replicator.fence(),
            )
        });
        let copied = futures::future::join_all(copies).await;
        let deadline = Instant::now() + SAVEPOINT_WAIT;
        for (sp, copied) in savepoints.iter().zip(copied) {
            let rel = snapshot_dir(
                &sp.job_id,
                SnapshotKind::Savepoint,
                CheckpointId(sp.checkpoint_id),
            );
            match copied {
                Ok(()) => continue,
                Err(e) => tracing::warn!(
                    "copying {rel} into {target} at once failed: {e}; waiting for the replicator"
                ),
            }
            loop {
                match target_store.child(&rel).size(MANIFEST_FILE).await {
                    Ok(Some(_)) => break,
                    Ok(None) => {}
                    Err(e) => tracing::warn!("checking {rel} in {target}: {e}"),
                }
                if Instant::now() > deadline {
                    self.roll_back().await;
                    return Err(RegionError::Timeout(format!(
                        "savepoint {rel} did not reach {} within {}; the region lease was not moved and every job resumes here in {me} (check `ferry region status` for replication errors, then retry)",
                        target_store.url(),
                        humantime::format_duration(SAVEPOINT_WAIT)
                    )));
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        let reason = format!("switchover from {me}");
        let moved = self.move_lease(target, &reason, actor).await?;
        tracing::info!(to = %target, region_epoch = %moved.epoch, jobs = savepoints.len(), "switchover: the region lease moved");
        Ok(SwitchoverReport {
            from: me,
            to: target.to_string(),
            epoch: moved.epoch,
            jobs: savepoints.iter().map(|s| s.job_id).collect(),
            savepoints,
            took_ms: Some(started.elapsed().as_millis() as u64),
            ..Default::default()
        })
    }

    /// A switchover failed before the lease moved: the jobs resume here.
    async fn roll_back(&self) {
        let mut role = self.role.lock().await;
        if let Role::SwitchingOver { lease, until, .. } = role.clone() {
            self.enter(
                &mut role,
                Role::Primary {
                    lease,
                    until,
                    started_for: None,
                },
            );
        }
        drop(role);
        self.wake();
    }

    /// Moves the lease from this region (in `SwitchingOver`) to `target`
    /// on behalf of `actor`, retrying while the global KV takes no writes.
    async fn move_lease(
        &self,
        target: &str,
        reason: &str,
        actor: &str,
    ) -> Result<Lease, RegionError> {
        let me = self.s.region.clone();
        let deadline = Instant::now() + LEASE_MOVE_RETRY;
        let mut last_error = String::new();
        loop {
            let mut role = self.role.lock().await;
            let Role::SwitchingOver { lease: current, .. } = role.clone() else {
                let now = role.name();
                return Err(RegionError::Conflict(format!(
                    "the region role changed to {now} during the switchover (the lease names {}); every job resumes wherever the lease names",
                    self.seen()
                        .primary
                        .unwrap_or_else(|| "an unknown region".into())
                )));
            };
            let moved = match self
                .bounded(lease::claim(
                    &self.lease_kv,
                    &current,
                    target,
                    reason,
                    actor,
                ))
                .await
            {
                Ok(moved) => Some(moved),
                Err(LeaseError::Changed) | Err(LeaseError::Exists) => {
                    match self.read_lease().await {
                        // An earlier attempt went through after all.
                        Ok((Some(l), _)) if l.names(target) => Some(l),
                        // Our copy was stale (a renewal raced): retry.
                        Ok((Some(l), _)) if l.names(&me) && l.epoch == current.epoch => {
                            if let Role::SwitchingOver { until, to, .. } = role.clone() {
                                *role = Role::SwitchingOver {
                                    lease: l,
                                    until,
                                    to,
                                };
                            }
                            continue;
                        }
                        Ok((Some(l), _)) => {
                            let other = l.primary().unwrap_or("an unknown region").to_string();
                            self.enter(
                                &mut role,
                                Role::Demoting {
                                    to: l.primary().map(str::to_string),
                                },
                            );
                            drop(role);
                            self.wake();
                            return Err(RegionError::Conflict(format!(
                                "{other} took the primary role during the switchover (region epoch {}); the jobs stopped here with savepoints resume there",
                                l.epoch
                            )));
                        }
                        Ok((None, _)) | Err(_) => None,
                    }
                }
                Err(LeaseError::Unavailable(e)) => {
                    last_error = e;
                    None
                }
            };
            if let Some(moved) = moved {
                // The demotion announces the lease as moved.
                self.seen
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .lease(&moved);
                self.enter(
                    &mut role,
                    Role::Demoting {
                        to: Some(target.to_string()),
                    },
                );
                drop(role);
                self.wake();
                return Ok(moved);
            }
            if Instant::now() >= deadline {
                return Err(self.unmovable(&mut role, target, &last_error).await);
            }
            drop(role);
            tokio::time::sleep(self.s.interval).await;
        }
    }

    /// The lease could not be moved within [`LEASE_MOVE_RETRY`]: resume
    /// here if a renewal proves the lease is still ours, else leave every
    /// job stopped for whichever region the lease names.
    async fn unmovable(&self, role: &mut Role, target: &str, why: &str) -> RegionError {
        let me = self.s.region.clone();
        let Role::SwitchingOver { lease, .. } = role.clone() else {
            return RegionError::Conflict("the region role changed during the switchover".into());
        };
        let waited = humantime::format_duration(LEASE_MOVE_RETRY);
        match self.renew(&lease).await {
            Ok((lease, until)) => {
                self.enter(
                    role,
                    Role::Primary {
                        lease,
                        until,
                        started_for: None,
                    },
                );
                self.wake();
                RegionError::GlobalUnavailable(format!(
                    "moving the region lease to {target} failed for {waited} (the global KV takes no writes: {why}); the lease still names {me}, so every job resumes here from its savepoint; retry once `ferry region status` shows the global KV reachable"
                ))
            }
            Err(e) => {
                self.enter(
                    role,
                    Role::Isolated {
                        lease,
                        since: Instant::now(),
                    },
                );
                RegionError::GlobalUnavailable(format!(
                    "moving the region lease to {target} failed for {waited} ({why}), and the lease could not be confirmed either ({e}): every job is stopped with a savepoint in {me} and resumes in whichever region the lease names once the global KV answers again; nothing runs twice"
                ))
            }
        }
    }

    /// `force`: moves the lease to `target` now, from any region.
    async fn forced(
        &self,
        target: &str,
        dry_run: bool,
        actor: &str,
    ) -> Result<SwitchoverReport, RegionError> {
        let started = Instant::now();
        let me = &self.s.region;
        let current = match self.read_lease().await {
            Ok((Some(l), _)) => l,
            Ok((None, _)) => {
                return Err(RegionError::Conflict(
                    "there is no region lease yet: the primary region has not started".into(),
                ));
            }
            Err(e) => {
                return Err(RegionError::GlobalUnavailable(format!(
                    "cannot read the region lease: {e}"
                )));
            }
        };
        if current.names(target) {
            return Err(RegionError::AlreadyPrimary {
                region: target.to_string(),
                epoch: current.epoch,
                what: String::new(),
            });
        }
        let from = current.primary().unwrap_or("(unknown)").to_string();
        if dry_run {
            return Ok(SwitchoverReport {
                from,
                to: target.to_string(),
                epoch: current.epoch,
                force: true,
                dry_run: true,
                steps: vec![
                    "move the region lease now".into(),
                    format!("{target} starts every job from its newest replicated checkpoint"),
                ],
                ..Default::default()
            });
        }
        let reason = format!("forced failover from {from} (requested in {me})");
        let moved = self
            .bounded(lease::claim(
                &self.lease_kv,
                &current,
                target,
                &reason,
                actor,
            ))
            .await
            .map_err(|e| match e {
                LeaseError::Unavailable(e) => RegionError::GlobalUnavailable(format!(
                    "moving the region lease failed: {e}; nothing was moved"
                )),
                e => RegionError::Conflict(format!(
                    "moving the region lease failed: {e}; read `ferry region status` and retry"
                )),
            })?;
        tracing::warn!(%from, to = %target, region_epoch = %moved.epoch, "forced failover");
        // If this region held the lease, its next renewal loses and demotes.
        self.wake();
        Ok(SwitchoverReport {
            from,
            to: target.to_string(),
            epoch: moved.epoch,
            force: true,
            took_ms: Some(started.elapsed().as_millis() as u64),
            ..Default::default()
        })
    }
}

fn busy() -> RegionError {
    RegionError::Conflict(
        "another cross-region operation (switchover, fail-back or drill) is in progress here; retry when it has ended".into(),
    )
}

/// Ids of the jobs running here.
fn running(c: &Coordinator) -> Vec<JobId> {
    c.jobs
        .jobs()
        .into_iter()
        .filter(|j| j.running)
        .map(|j| j.id)
        .collect()
}

fn divergence_report(
    region: &str,
    epoch: RegionEpoch,
    jobs: Vec<JobDivergence>,
) -> DivergenceReport {
    DivergenceReport {
        region: region.to_string(),
        lineage_epoch: epoch,
        records_out: jobs.iter().map(|j| j.records_out).sum(),
        records_in: jobs.iter().map(|j| j.records_in).sum(),
        event_time_ms: jobs.iter().map(|j| j.event_time_ms).max().unwrap_or(0),
        jobs,
    }
}

/// Copies savepoint `sp` from `source` (this region's store) into
/// `target` with the job's spec: the new checkpoint directory in two
/// round trips ([`CopyMode::Fresh`](crate::replicate::CopyMode)), the
/// spec beside it.
async fn copy_savepoint_now(
    source: Option<&ferry_core::storage::StorageLocation>,
    target: &ferry_core::storage::StorageLocation,
    sp: &SavepointRef,
    fence: &crate::WriteFence,
) -> Result<(), String> {
    let source = source.ok_or("this region has no entry in regions.stores")?;
    let rel = snapshot_dir(
        &sp.job_id,
        SnapshotKind::Savepoint,
        CheckpointId(sp.checkpoint_id),
    );
    let raw = source
        .child(&rel)
        .get(MANIFEST_FILE)
        .await
        .map_err(|e| e.to_string())?;
    let spec_rel = format!("{}/spec.yaml", ferry_core::manifest::job_dir(&sp.job_id));
    let spec = async {
        if let Some(spec) = source.get_opt(&spec_rel).await?
            && target.get_opt(&spec_rel).await?.as_ref() != Some(&spec)
        {
            fence.write(&spec_rel, target.put(&spec_rel, spec)).await?;
        }
        Ok::<_, crate::ReplicationError>(())
    };
    let copy = crate::copy_snapshot_with(source, target, &rel, raw, fence, crate::CopyMode::Fresh);
    let (spec, copy) = tokio::join!(spec, copy);
    spec.map_err(|e| e.to_string())?;
    copy.map(|_| ()).map_err(|e| e.to_string())
}
