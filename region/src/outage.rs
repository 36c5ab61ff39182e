//! A simulated region outage for failover drills (`POST`/`DELETE
//! /v1/drills/outage`): the primary's leader stops every job without a
//! savepoint (cancelling its tasks), stops renewing the lease and
//! publishing its heartbeat, and ignores the lease until the outage ends —
//! so a standby's automatic failover takes over exactly as after a real
//! outage. With a target, a drill hold makes every other standby stand
//! aside for it ([`crate::hold`]).

use std::time::Duration;

use ferry_core::api::{OutageReport, StoppedJob};
use tokio::time::Instant;

use crate::coordinator::Coordinator;
use crate::error::RegionError;
use crate::hold::{self, DrillHold};
use crate::role::Role;

impl Coordinator {
    /// Starts an outage of `duration` (asking `target` to take over), or
    /// ends one (`None`), on behalf of `actor` (the target's takeover is
    /// recorded as theirs).
    pub async fn outage(
        &self,
        start: Option<(Duration, Option<String>)>,
        actor: &str,
    ) -> Result<OutageReport, RegionError> {
        let me = self.s.region.clone();
        let Some((duration, target)) = start else {
            return Ok(self.end_outage().await);
        };
        if let Some(t) = &target {
            self.known(t)?;
            if *t == me {
                return Err(RegionError::BadRequest(format!(
                    "{t} is the region that plays dead; name a standby as the drill's target"
                )));
            }
            if !self
                .seen()
                .views
                .iter()
                .any(|v| v.region == *t && v.healthy)
            {
                return Err(RegionError::Conflict(format!(
                    "{t} is not healthy (no region heartbeat within {}): it could not take over; `ferry region status` shows every region",
                    humantime::format_duration(self.s.timeout)
                )));
            }
        }
        self.holding_primary("a simulated outage").await?;
        let _op = self.ops.try_lock().map_err(|_| {
            RegionError::Conflict(
                "another cross-region operation is in progress here; retry when it has ended"
                    .into(),
            )
        })?;
        let mut role = self.role.lock().await;
        match &*role {
            Role::Primary { .. } => {}
            Role::Follower => return Err(RegionError::NotLeader(me)),
            other => {
                let primary = self.seen().primary.unwrap_or_else(|| "unknown".into());
                return Err(RegionError::Conflict(format!(
                    "a simulated outage runs on the primary region's leader; {me} is {other} (the primary is {primary}): send it there"
                )));
            }
        }
        if let Some(t) = &target {
            let h = DrillHold {
                from: me.clone(),
                target: t.clone(),
                duration_ms: duration.as_millis() as u64,
                by: Some(actor.to_string()),
            };
            self.bounded(hold::set(&self.lease_kv, &h))
                .await
                .map_err(|e| {
                    RegionError::GlobalUnavailable(format!(
                        "writing the drill hold failed ({e}); the drill did not start and nothing was stopped"
                    ))
                })?;
        }
        let jobs: Vec<StoppedJob> = self
            .jobs
            .jobs()
            .into_iter()
            .filter(|j| j.running)
            .map(|j| StoppedJob {
                id: j.id,
                name: j.name,
                last_checkpoint: j.last_checkpoint,
            })
            .collect();
        tracing::warn!(
            duration = %humantime::format_duration(duration),
            jobs = jobs.len(),
            target = ?target,
            "drill: simulating an outage of this region: every job stops without a savepoint, the lease is no longer renewed and the heartbeat stops"
        );
        self.enter(
            &mut role,
            Role::Dark {
                until: Instant::now() + duration,
            },
        );
        drop(role);
        self.jobs.stand_by(None).await;
        Ok(OutageReport {
            region: me,
            outage: true,
            until: Some(
                chrono::Utc::now() + chrono::Duration::from_std(duration).unwrap_or_default(),
            ),
            target,
            was_dark: false,
            jobs,
        })
    }

    async fn end_outage(&self) -> OutageReport {
        let mut role = self.role.lock().await;
        let was_dark = matches!(*role, Role::Dark { .. });
        if was_dark {
            tracing::warn!("drill: the simulated outage ended; following the region lease again");
            self.enter(&mut role, Role::Starting);
        }
        drop(role);
        if let Err(e) = self.bounded(hold::clear(&self.lease_kv)).await {
            tracing::warn!("clearing the drill hold failed (it expires by itself): {e}");
        }
        self.wake();
        OutageReport {
            region: self.s.region.clone(),
            outage: false,
            was_dark,
            ..Default::default()
        }
    }
}
