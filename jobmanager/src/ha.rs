//! A JobManager in a region: its membership heartbeat, the wait for enough
//! instances before the first election, the competition for the leader
//! lease, and what a role change means — the leader adopts every job of the
//! job store; a standby drives nothing and mirrors the store for reads.
//!
//! Invariant: a JobManager that stops leading stops driving its jobs before
//! it does anything else ([`JobManager::step_down`]), and on a graceful stop
//! it releases the lease only after that, so the next leader never overlaps
//! with it.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use chrono::Utc;
use ferry_ha::{
    Coordination, Elector, ElectorConfig, LeaderInfo, Member, Membership, MembershipConfig, Role,
};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::service::JobManager;
pub use ferry_core::api::{HaHealth, LeaderView};

/// Role name of JobManagers in membership records.
pub const JOBMANAGER_ROLE: &str = "jobmanager";

/// How a JobManager takes part in its region.
#[derive(Clone, Debug)]
pub struct HaSettings {
    pub region: String,
    pub instance_id: String,
    /// Advertised REST URL, published with the lease and the heartbeat.
    pub api_url: String,
    pub membership: MembershipConfig,
    pub elector: ElectorConfig,
    /// JobManagers to hear from before first competing.
    pub min_instances: u32,
}

impl HaSettings {
    /// The settings of a process configured by `cfg` (`ha.*`), known as
    /// `instance_id` and reached at `api_url`.
    pub fn from_config(
        cfg: &ferry_core::config::ProcessConfig,
        instance_id: &str,
        api_url: &str,
    ) -> Self {
        let h = &cfg.ha;
        Self {
            region: cfg.region.clone(),
            instance_id: instance_id.to_string(),
            api_url: api_url.to_string(),
            membership: MembershipConfig {
                interval: h.heartbeat_interval.get(),
                expiry: h.member_expiry.get(),
            },
            elector: ElectorConfig {
                key: LEADER_KEY.to_string(),
                holder: instance_id.to_string(),
                ttl: h.lease_ttl.get(),
                renew_interval: h.renew_interval.get(),
                renew_deadline: h.renew_deadline.get(),
            },
            min_instances: h.min_instances_for_election,
        }
    }
}

/// The key of the region's leader lease in its KV bucket.
pub const LEADER_KEY: &str = "leader";

/// The leader as the API reports it.
fn leader_view(l: LeaderInfo) -> LeaderView {
    LeaderView {
        instance: l.holder,
        url: l.payload,
        epoch: l.epoch.0,
    }
}

impl JobManager {
    /// What `/health/ha` and `/v1/cluster` report.
    pub async fn ha_health(&self) -> HaHealth {
        let l = &self.inner.leadership;
        let mut h = HaHealth {
            role: l.role(),
            instance: self.instance_id().to_string(),
            region: None,
            leader: None,
            epoch: None,
            healthy_members: 0,
            total_members: 0,
            members: Vec::new(),
            leader_changes: l.leader_changes.load(Ordering::Relaxed),
            heartbeat_failures: 0,
            last_renew_ms: None,
            backend_reachable: true,
            taskmanagers: Vec::new(),
            slot_load_variance: None,
        };
        let Some(ctx) = l.ha_context() else {
            h.epoch = Some(0);
            h.leader = Some(LeaderView {
                instance: h.instance.clone(),
                url: String::new(),
                epoch: 0,
            });
            return h;
        };
        h.region = Some(ctx.region.clone());
        // Short bounds: this answers health probes, which must not hang
        // when NATS is unreachable.
        match tokio::time::timeout(
            Duration::from_millis(500),
            ctx.backend.list(ferry_ha::membership::MEMBERS_PREFIX),
        )
        .await
        {
            Ok(Ok(all)) => {
                h.total_members = all.len();
                if let Ok(Ok(healthy)) = tokio::time::timeout(
                    Duration::from_millis(500),
                    Membership::list(ctx.backend.as_ref(), ctx.member_expiry),
                )
                .await
                {
                    h.healthy_members = healthy.len();
                    h.members = healthy;
                }
            }
            _ => h.backend_reachable = false,
        }
        // The role last, as it is when the answer leaves: the listing
        // above may wait up to a second on an unreachable NATS, and a
        // leader that stepped down meanwhile must not answer "leader".
        h.role = l.role();
        h.heartbeat_failures = ctx.heartbeat_failures.load(Ordering::Relaxed);
        h.epoch = l.fence().map(|e| e.0);
        h.leader = l.leader().map(leader_view);
        if let Some(e) = l.elector()
            && h.epoch.is_some()
        {
            h.last_renew_ms =
                Some(e.stats.last_renew_micros.load(Ordering::Relaxed) as f64 / 1000.0);
        }
        if h.epoch.is_some()
            && let Some(pool) = self.inner.taskmanagers.get()
        {
            h.taskmanagers = crate::scheduler::views(pool);
            h.slot_load_variance = Some(pool.capacity().variance);
        }
        h
    }
}

/// Runs this JobManager's part in its region until `shutdown`, then steps
/// down and releases the lease (graceful handover). Returns when done.
pub async fn run(
    jm: JobManager,
    backend: Arc<dyn Coordination>,
    s: HaSettings,
    shutdown: CancellationToken,
) {
    let leadership = jm.inner.leadership.clone();
    let Some(ctx) = leadership.ha_context() else {
        tracing::error!("ha::run needs a JobManager created with Leadership::ha");
        return;
    };
    let member = Member {
        id: s.instance_id.clone(),
        role: JOBMANAGER_ROLE.to_string(),
        region: s.region.clone(),
        address: s.api_url.clone(),
        slots: 0,
        started_at: Utc::now(),
        exchange: None,
    };
    let heartbeat_stop = CancellationToken::new();
    let (membership, heartbeat) = Membership::spawn(
        backend.clone(),
        s.membership.clone(),
        member,
        heartbeat_stop.clone(),
    );
    let failures = ctx.heartbeat_failures.clone();
    let copy_failures = {
        let from = membership.failures.clone();
        move || failures.store(from.load(Ordering::Relaxed), Ordering::Relaxed)
    };

    // Wait until enough JobManagers are heard from (a rolling start must not
    // leave one lone instance leading before its peers exist).
    if s.min_instances > 1 {
        tracing::info!(
            min = s.min_instances,
            "waiting for JobManagers before the first election"
        );
        loop {
            let n = Membership::list(backend.as_ref(), s.membership.expiry)
                .await
                .map(|m| {
                    m.iter()
                        .filter(|v| v.member.role == JOBMANAGER_ROLE && v.member.region == s.region)
                        .count()
                })
                .unwrap_or(0);
            if n >= s.min_instances as usize {
                break;
            }
            tokio::select! {
                _ = shutdown.cancelled() => {
                    heartbeat_stop.cancel();
                    let _ = heartbeat.await;
                    return;
                }
                _ = tokio::time::sleep(s.membership.interval) => {}
            }
        }
    }

    let elector_stop = CancellationToken::new();
    let elector = Elector::spawn(
        backend.clone(),
        s.elector.clone(),
        s.api_url.clone(),
        elector_stop.clone(),
    );
    leadership.set_elector(elector.clone());
    let mut role = elector.role();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut leading: Option<ferry_core::JmEpoch> = None;
    let mut adopted = false;
    let metrics = jm.inner.metrics.clone();
    loop {
        let current = role.borrow_and_update().clone();
        match current {
            Role::Leader { epoch } => {
                if leading != Some(epoch) {
                    if leading.is_some() {
                        // Lost and won again before this loop saw the
                        // loss: let go of the old term first.
                        jm.step_down().await;
                        jm.forget_region_role();
                    }
                    leading = Some(epoch);
                    adopted = false;
                    leadership.set_leader(Some(LeaderInfo {
                        holder: s.instance_id.clone(),
                        payload: s.api_url.clone(),
                        epoch,
                    }));
                    tracing::info!(epoch = epoch.0, "leading: adopting the job store");
                    if let Some(pool) = jm.inner.taskmanagers.get() {
                        pool.wake();
                    }
                }
                if !adopted {
                    let span = tracing::info_span!(
                        "leader_change",
                        instance = %s.instance_id,
                        epoch = epoch.0,
                        role = "leader"
                    );
                    match jm.lead(epoch).instrument(span).await {
                        Ok(n) => {
                            adopted = true;
                            tracing::info!(epoch = epoch.0, resumed = n, "leader ready");
                        }
                        Err(e) => tracing::warn!("adopting the job store failed (retrying): {e}"),
                    }
                }
            }
            Role::Standby { leader } => {
                if leading.take().is_some() {
                    let span = tracing::info_span!(
                        "leader_change",
                        instance = %s.instance_id,
                        role = "standby"
                    );
                    async {
                        tracing::warn!("lost the leadership: stopping every job here");
                        jm.step_down().await;
                        jm.forget_region_role();
                    }
                    .instrument(span)
                    .await;
                    if let Some(pool) = jm.inner.taskmanagers.get() {
                        pool.wake();
                    }
                }
                if leader.is_some() {
                    leadership.set_leader(leader);
                } else if let Ok(Some(l)) = read_leader(backend.as_ref(), &s.elector.key).await {
                    leadership.set_leader(Some(l));
                }
            }
        }
        metrics.set_ha(leading.is_some(), &leadership, &elector);
        copy_failures();
        tokio::select! {
            _ = shutdown.cancelled() => break,
            r = role.changed() => if r.is_err() { break },
            _ = tick.tick() => {
                // Standbys, and the leader of a standby region (it drives
                // nothing), mirror the job store for reads.
                if (leading.is_none() || jm.is_standby_region())
                    && let Err(e) = jm.refresh_from_store().await
                {
                    tracing::debug!("refreshing jobs from the store failed: {e}");
                }
                if let Ok(m) = Membership::list(backend.as_ref(), s.membership.expiry).await {
                    metrics.set_members(m.len());
                }
                if let Some(pool) = jm.inner.taskmanagers.get() {
                    metrics.set_capacity(pool.capacity());
                }
            }
        }
    }
    // Graceful stop: stop driving jobs first, then hand the lease over.
    jm.step_down().await;
    elector.resign().await;
    heartbeat_stop.cancel();
    let _ = heartbeat.await;
    metrics.set_ha(false, &leadership, &elector);
    tracing::info!("left the region's HA group");
}

/// The leader as the lease record says (for standbys that joined late).
async fn read_leader(
    backend: &dyn Coordination,
    key: &str,
) -> Result<Option<LeaderInfo>, ferry_ha::HaError> {
    #[derive(serde::Deserialize)]
    struct Lease {
        holder: String,
        payload: String,
        epoch: Option<u64>,
    }
    Ok(backend.get(key).await?.and_then(|e| {
        let v: Lease = serde_json::from_slice(&e.value).ok()?;
        Some(LeaderInfo {
            holder: v.holder,
            payload: v.payload,
            epoch: ferry_ha::Epoch(v.epoch.unwrap_or(e.revision)),
        })
    }))
}
