//! The cross-region coordinator of one JobManager: a loop that, every
//! health-check interval, publishes the region heartbeat (or a
//! reachability probe), lists every region's health, and steps the region
//! role ([`crate::role::Role`], one module per state in
//! [`crate::states`]). It also runs the replicator (primary) and the
//! restore verifier (standby), and serves the cross-region operations —
//! switchover, fail-back ([`crate::switchover`]) and the drill outage
//! ([`crate::outage`]) — and the `/v1/regions` view.
//!
//! Invariant: every change of the role goes through [`Coordinator::enter`],
//! which refuses transitions [`crate::role::allowed`] does not list; the
//! role lock is held while a step or an operation acts on the lease, so no
//! two of them interleave their compare-and-sets.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use ferry_core::RegionEpoch;
use ferry_core::api::{RegionHeartbeat, RegionRole, RegionView, RegionsStatus};
use ferry_core::storage::StorageLocation;
use ferry_ha::Coordination;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::clock::Unchanged;
use crate::error::RegionError;
use crate::health::{self, Health};
use crate::hold::{self, DRILL_HOLD};
use crate::jobs::{RegionEvent, RegionJobs};
use crate::lease::{self, Lease, LeaseError};
use crate::replicator::{CheckpointEvent, Replicator};
use crate::role::{Role, allowed};
use crate::states;
use crate::verifier::Verifier;
use crate::webhook::{Announce, Announcement};

/// What a coordinator is configured with.
#[derive(Clone, Debug)]
pub struct Settings {
    /// This region.
    pub region: String,
    /// This JobManager's instance id and REST URL (for the heartbeat).
    pub instance: String,
    pub api_url: String,
    /// Where the jobs belong (`regions.primary`): it creates the first
    /// lease, and fail-back goes there by default.
    pub home: Option<String>,
    /// Every region's store, this one's included (`regions.stores` plus
    /// `storage`).
    pub stores: BTreeMap<String, StorageLocation>,
    /// Health-check interval: heartbeats, lease renewals, decisions.
    pub interval: Duration,
    /// A primary whose lease is not renewed this long may be replaced; a
    /// primary stops acting half of it after its last confirmation.
    pub timeout: Duration,
    /// Standbys take over a silent primary by themselves.
    pub auto_failover: bool,
    /// Where to announce that this region took or lost the primary role
    /// (`regions.webhook`, [`crate::webhook::Webhook`]).
    pub webhook: Option<Arc<dyn Announce>>,
}

/// What the loop last saw, for `/v1/regions` (never blocks on the loop).
#[derive(Clone, Debug)]
pub(crate) struct Seen {
    pub role: RegionRole,
    pub primary: Option<String>,
    pub epoch: RegionEpoch,
    /// Who moved the lease to `primary`, and why, as its record says.
    pub by: Option<String>,
    pub reason: Option<String>,
    pub views: Vec<RegionView>,
}

impl Seen {
    /// Notes whom `lease` names, under which epoch, moved there by whom.
    pub(crate) fn lease(&mut self, lease: &Lease) {
        self.primary = lease.primary().map(str::to_string);
        self.epoch = lease.epoch;
        self.by = lease.record.as_ref().and_then(|r| r.by.clone());
        self.reason = lease.record.as_ref().map(|r| r.reason.clone());
    }
}

/// One JobManager's region coordinator.
pub struct Coordinator {
    pub(crate) s: Settings,
    pub(crate) jobs: Arc<dyn RegionJobs>,
    /// The global bucket holding the region lease and the drill hold (no
    /// expiry).
    pub(crate) lease_kv: Arc<dyn Coordination>,
    /// The global bucket of heartbeats and probes (entries expire).
    pub(crate) health_kv: Arc<dyn Coordination>,
    pub(crate) replicator: Arc<Replicator>,
    pub(crate) verifier: Arc<Verifier>,
    pub(crate) role: tokio::sync::Mutex<Role>,
    pub(crate) seen: Mutex<Seen>,
    /// How long the lease and the drill hold have been unchanged here.
    pub(crate) silence: Mutex<Unchanged>,
    /// The newest probe write into the lease bucket failed.
    lease_deaf: std::sync::atomic::AtomicBool,
    health: Mutex<Health>,
    /// One cross-region operation at a time.
    pub(crate) ops: tokio::sync::Mutex<()>,
    /// Standby decisions already logged (so each is said once).
    pub(crate) said: Mutex<Option<String>>,
    wake: tokio::sync::Notify,
    /// The lease watch saw the lease move to this region: the next tick
    /// of a standby takes it before anything else.
    moved_here: std::sync::atomic::AtomicBool,
}

impl Coordinator {
    pub fn new(
        s: Settings,
        jobs: Arc<dyn RegionJobs>,
        lease_kv: Arc<dyn Coordination>,
        health_kv: Arc<dyn Coordination>,
        replicator: Arc<Replicator>,
        verifier: Arc<Verifier>,
    ) -> Arc<Self> {
        let mut known: Vec<String> = s.stores.keys().cloned().collect();
        if !known.contains(&s.region) {
            known.push(s.region.clone());
        }
        let health = Health::new(known, s.timeout);
        Arc::new(Self {
            seen: Mutex::new(Seen {
                role: RegionRole::Follower,
                primary: None,
                epoch: RegionEpoch::NONE,
                by: None,
                reason: None,
                views: Vec::new(),
            }),
            s,
            jobs,
            lease_kv,
            health_kv,
            replicator,
            verifier,
            role: tokio::sync::Mutex::new(Role::Follower),
            silence: Mutex::new(Unchanged::new()),
            lease_deaf: std::sync::atomic::AtomicBool::new(false),
            health: Mutex::new(health),
            ops: tokio::sync::Mutex::new(()),
            said: Mutex::new(None),
            wake: tokio::sync::Notify::new(),
            moved_here: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// Runs the coordinator loop, the replicator (fed by `completed`) and
    /// the restore verifier until `stop`; the returned handle ends after
    /// all of them.
    pub fn spawn(
        self: &Arc<Self>,
        completed: mpsc::UnboundedReceiver<CheckpointEvent>,
        verify_interval: Duration,
        stop: CancellationToken,
    ) -> tokio::task::JoinHandle<()> {
        let tracker = tokio_util::task::TaskTracker::new();
        let me = self.clone();
        let s = stop.clone();
        tracker.spawn(async move { me.run(s).await });
        let r = self.replicator.clone();
        let s = stop.clone();
        tracker.spawn(async move { r.run(completed, s.cancelled_owned()).await });
        let me = self.clone();
        let s = stop.clone();
        tracker.spawn(async move { me.follow_lease_moves(s).await });
        let me = self.clone();
        let s = stop.clone();
        tracker.spawn(async move { me.follow_heartbeats(s).await });
        let me = self.clone();
        tracker.spawn(self.verifier.clone().run(
            verify_interval,
            move || me.seen().role == RegionRole::Standby,
            stop,
        ));
        tracker.close();
        tokio::spawn(async move { tracker.wait().await })
    }

    async fn run(self: Arc<Self>, stop: CancellationToken) {
        let mut tick = tokio::time::interval(self.s.interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tick.tick() => {}
                _ = self.wake.notified() => {}
            }
            self.tick().await;
        }
    }

    /// Wakes the loop as soon as the lease names another region than the
    /// one last seen (a switchover or failover elsewhere), instead of at
    /// its next tick: the new primary starts its jobs at once. Notes every
    /// renewal as it arrives.
    async fn follow_lease_moves(&self, stop: CancellationToken) {
        use futures::StreamExt;
        loop {
            let watched = tokio::select! {
                _ = stop.cancelled() => return,
                w = self.lease_kv.watch(lease::REGION_LEASE) => w,
            };
            match watched {
                Ok(mut events) => loop {
                    let ev = tokio::select! {
                        _ = stop.cancelled() => return,
                        ev = events.next() => ev,
                    };
                    let Some(ev) = ev else { break };
                    let ferry_ha::Event::Put(e) = ev else {
                        continue;
                    };
                    // A renewal's silence counts from its arrival, as a
                    // heartbeat's does (see `follow_heartbeats`).
                    self.silence_of(lease::REGION_LEASE, e.revision);
                    if let Ok(r) = serde_json::from_slice::<lease::LeaseRecord>(&e.value)
                        && self.seen().primary.as_deref() != Some(r.primary.as_str())
                    {
                        if r.primary == self.s.region {
                            self.moved_here
                                .store(true, std::sync::atomic::Ordering::SeqCst);
                        }
                        self.wake();
                    }
                },
                Err(e) => tracing::debug!("watching the region lease failed: {e}"),
            }
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(self.s.interval) => {}
            }
        }
    }

    /// Notes every region heartbeat the moment the global KV delivers it,
    /// so a region's silence is measured from its last heartbeat rather
    /// than from the next listing (which would add up to one interval to
    /// every failover). The listing each tick still decides; this only
    /// makes what it measures exact.
    async fn follow_heartbeats(&self, stop: CancellationToken) {
        use futures::StreamExt;
        loop {
            let watched = tokio::select! {
                _ = stop.cancelled() => return,
                w = self.health_kv.watch(health::REGIONS_PREFIX) => w,
            };
            match watched {
                Ok(mut events) => loop {
                    let ev = tokio::select! {
                        _ = stop.cancelled() => return,
                        ev = events.next() => ev,
                    };
                    match ev {
                        Some(ferry_ha::Event::Put(e)) => self.health().heard(&e.key, e.revision),
                        Some(ferry_ha::Event::Gone { .. }) => {}
                        None => break,
                    }
                },
                Err(e) => tracing::debug!("watching the region heartbeats failed: {e}"),
            }
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(self.s.interval) => {}
            }
        }
    }

    /// Makes the loop take its next step now.
    pub(crate) fn wake(&self) {
        self.wake.notify_one();
    }

    /// One step: heartbeat (or probe), health, and the role's step. A
    /// leader that holds or is taking the region lease steps first and
    /// beats after: its renewal confirms the TaskManagers' region fence,
    /// and a slow global KV must not spend the fence on heartbeats first
    /// (an in-region failover has half of `regions.timeout` to confirm the
    /// lease again before the tasks stop).
    pub async fn tick(&self) {
        let mut role = self.role.lock().await;
        let was_promoting = matches!(*role, Role::Promoting { .. });
        let leading = self.jobs.leading();
        let dark = matches!(*role, Role::Dark { .. });
        // A standby to which the lease just moved (a switchover or
        // fail-back to here) takes it before its heartbeat and health
        // listing, which cost several round trips to a distant global
        // cluster; otherwise a standby decides on what it lists first.
        let moved_here = self
            .moved_here
            .swap(false, std::sync::atomic::Ordering::SeqCst);
        let lease_first = leading.is_some()
            && (matches!(
                *role,
                Role::Follower
                    | Role::Starting
                    | Role::Promoting { .. }
                    | Role::Primary { .. }
                    | Role::SwitchingOver { .. }
                    | Role::Isolated { .. }
            ) || (moved_here && matches!(*role, Role::Standby { .. })));
        if !dark && !lease_first {
            self.beat(leading.is_some()).await;
        }
        let next = match (leading, role.clone()) {
            (None, Role::Follower) => {
                // Followers learn who is primary for their views.
                let _ = self.read_lease().await;
                Role::Follower
            }
            (None, _) => Role::Follower,
            (Some(_), Role::Follower) => {
                // Just became the region's leader: take up the lease in
                // this tick, not the next.
                self.enter(&mut role, Role::Starting);
                states::starting::step(self).await
            }
            (Some(_), Role::Starting) => states::starting::step(self).await,
            (Some(_), Role::Standby { primary }) => states::standby::step(self, primary).await,
            (Some(e), Role::Promoting { lease, until }) => {
                states::promoting::step(self, lease, until, e).await
            }
            (
                Some(e),
                Role::Primary {
                    lease,
                    until,
                    started_for,
                },
            ) => states::primary::step(self, lease, until, started_for, e).await,
            (Some(_), Role::SwitchingOver { lease, until, to }) => {
                states::switching::step(self, lease, until, to).await
            }
            (Some(_), Role::Demoting { to }) => states::demoting::step(self, to).await,
            (Some(_), Role::Isolated { lease, since }) => {
                states::isolated::step(self, lease, since).await
            }
            (Some(_), Role::Dark { until }) => states::dark::step(until),
        };
        self.enter(&mut role, next);
        // Just promoted: the next tick (woken at once) starts the jobs
        // and beats after; a heartbeat now would only delay them.
        let promoting = !was_promoting && matches!(*role, Role::Promoting { .. });
        // The heartbeat needs no role: a switchover waiting to move the
        // lease need not wait for it.
        drop(role);
        if !dark && lease_first && !promoting {
            self.beat(true).await;
        }
        self.jobs
            .report(RegionEvent::Replication(&self.replicator.status()));
    }

    /// Moves the role to `next` if the transition table allows it.
    pub(crate) fn enter(&self, role: &mut Role, next: Role) {
        let (from, to) = (role.name(), next.name());
        if from != to {
            if !allowed(from, to) {
                tracing::error!(%from, %to, "region coordinator: not an allowed transition; staying {from}");
                return;
            }
            tracing::info!(%from, %to, region = %self.s.region, "region role changed");
            let primary = matches!(
                to,
                RegionRole::Promoting | RegionRole::Primary | RegionRole::SwitchingOver
            );
            if !primary && to != RegionRole::Dark {
                // Nothing more goes into other regions' stores from here.
                // A drill's dark primary plays a region that just died or
                // was cut off: what it had under way may still land while
                // its last renewal's fence lasts, as it would then, and no
                // longer (it renews nothing).
                self.replicator.stand_down();
            }
            let epoch = next.epoch().unwrap_or_else(|| self.seen().epoch);
            self.jobs.report(RegionEvent::Role { primary, epoch });
            // A state whose step acts (claim confirmed: start the jobs;
            // stand by: stop them) takes it at once, not an interval later.
            if matches!(
                to,
                RegionRole::Starting | RegionRole::Promoting | RegionRole::Demoting
            ) {
                self.wake();
            }
            let announce = match (from, to, &next) {
                (RegionRole::Standby | RegionRole::Starting, RegionRole::Promoting, _) => {
                    Some(("promoted", self.s.region.clone()))
                }
                (_, RegionRole::Demoting, Role::Demoting { to: Some(p) }) => {
                    Some(("demoted", p.clone()))
                }
                _ => None,
            };
            self.see(&next, to);
            if let Some((event, primary)) = announce {
                self.notify(event, primary, epoch);
            }
        } else {
            self.see(&next, to);
        }
        *role = next;
    }

    /// Notes the role entered and the lease it holds, if any.
    fn see(&self, next: &Role, to: RegionRole) {
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        seen.role = to;
        if let Some(l) = next.lease() {
            seen.lease(l);
        }
    }

    /// Publishes the heartbeat (leading) or a probe, then lists every
    /// region's health.
    async fn beat(&self, leading: bool) {
        let write = if leading {
            let hb = RegionHeartbeat {
                region: self.s.region.clone(),
                leader: self.s.instance.clone(),
                api_url: self.s.api_url.clone(),
                at: None,
                replication: self
                    .replicator
                    .status()
                    .into_iter()
                    .map(|s| (s.region, s.lag_seconds, s.lag_checkpoints))
                    .collect(),
                verified: self.verifier.newest(),
                resources: self.jobs.resources(),
            };
            self.bounded(health::publish(self.health_kv.as_ref(), hb))
                .await
        } else {
            let key = health::probe_key(&self.s.region, &self.s.instance);
            self.bounded(self.health_kv.put(&key, Bytes::from_static(b"1")))
                .await
                .map(drop)
        };
        match write {
            Ok(()) => self.wrote(),
            Err(e) => {
                self.health().write_failed();
                tracing::debug!("region heartbeat failed: {e}")
            }
        }
        let listed = self
            .bounded(self.health_kv.list(health::REGIONS_PREFIX))
            .await;
        let views = match listed {
            Ok(entries) => Some(self.health().observe(entries)),
            Err(e) => {
                tracing::debug!("listing the region heartbeats failed: {e}");
                None
            }
        };
        if let Some(v) = views {
            self.jobs.report(RegionEvent::Health(&v));
            self.seen.lock().unwrap_or_else(|p| p.into_inner()).views = v;
        }
    }

    /// A write to the global KV succeeded. After a time in which none did
    /// (this process was cut off, or the KV had no quorum), the lease's and
    /// every region's silence count again from now: what this process
    /// could not see is no evidence that the primary was silent, and a
    /// primary that could not renew either gets a whole timeout to do so
    /// before a standby may claim the lease.
    fn wrote(&self) {
        if self.health().wrote() {
            self.silence
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .restart_all();
            tracing::debug!("the global KV takes writes from here again: silences count from now");
        }
    }

    /// Writes this region's probe into the lease bucket; true when it took
    /// it. The lease's stream can be without a leader while the heartbeat
    /// bucket's has one, and reads of the lease (answered by any replica)
    /// go on meanwhile: a standby judges the primary's silence only while
    /// its own writes into the lease bucket succeed, and counts it afresh
    /// from the first that does after any that failed.
    pub(crate) async fn probe_lease(&self) -> bool {
        use std::sync::atomic::Ordering;
        let key = health::probe_key(&self.s.region, "lease");
        let ok = self
            .bounded(self.lease_kv.put(&key, Bytes::from_static(b"1")))
            .await
            .is_ok();
        let was_deaf = self.lease_deaf.swap(!ok, Ordering::SeqCst);
        if ok && was_deaf {
            self.silence
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .restart_all();
            tracing::debug!(
                "the lease bucket takes writes from here again: its silence counts from now"
            );
        }
        ok
    }

    /// The global KV took this process's newest write, within the timeout.
    pub(crate) fn reachable(&self) -> bool {
        self.health().reachable()
    }

    fn health(&self) -> std::sync::MutexGuard<'_, Health> {
        self.health.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A global-KV operation bounded by the health-check interval.
    pub(crate) async fn bounded<T, E: Into<LeaseError>>(
        &self,
        f: impl Future<Output = Result<T, E>>,
    ) -> Result<T, LeaseError> {
        match tokio::time::timeout(self.s.interval, f).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(e.into()),
            Err(_) => Err(LeaseError::Unavailable(format!(
                "no answer within {}",
                humantime::format_duration(self.s.interval)
            ))),
        }
    }

    /// Reads the lease (possibly stale), noting how long it has been
    /// unchanged here and whom it names.
    pub(crate) async fn read_lease(&self) -> Result<(Option<Lease>, Duration), LeaseError> {
        let read = self.bounded(lease::read(self.lease_kv.as_ref())).await?;
        let silent = match &read {
            Some(l) => {
                self.seen.lock().unwrap_or_else(|p| p.into_inner()).lease(l);
                self.silence_of(lease::REGION_LEASE, l.revision)
            }
            None => Duration::ZERO,
        };
        Ok((read, silent))
    }

    fn silence_of(&self, key: &str, revision: u64) -> Duration {
        self.silence
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .observe(key, revision)
    }

    /// The hold of an ongoing failover drill (naming the standby it wants
    /// to take over), if any.
    pub(crate) async fn drill_target(&self) -> Option<hold::DrillHold> {
        match self.bounded(hold::read(self.lease_kv.as_ref())).await {
            Ok(Some((h, rev))) if self.silence_of(DRILL_HOLD, rev) < h.duration() => Some(h),
            _ => None,
        }
    }

    /// Renews `lease`: on success the JobManager's fence is confirmed for
    /// half the timeout from when the renewal was sent.
    pub(crate) async fn renew(&self, lease: &Lease) -> Result<(Lease, Instant), LeaseError> {
        let sent = Instant::now();
        let renewed = self
            .bounded(lease::renew(&self.lease_kv, lease))
            .await
            .inspect_err(|e| {
                if matches!(e, LeaseError::Unavailable(_)) {
                    self.health().write_failed()
                }
            })?;
        Ok((renewed.clone(), self.confirmed(&renewed, sent)))
    }

    /// A compare-and-set on the lease sent at `sent` succeeded: the fence
    /// holds until half the timeout after it was sent.
    pub(crate) fn confirmed(&self, lease: &Lease, sent: Instant) -> Instant {
        self.wrote();
        let until = sent + self.s.timeout / 2;
        self.replicator.fence().open_until(until);
        self.jobs
            .confirm(lease.epoch, until.saturating_duration_since(Instant::now()));
        self.seen
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .lease(lease);
        until
    }

    /// A renewal of `held` lost its compare-and-set: learn who holds the
    /// lease now. `Ok`: still this region under the same epoch (the held
    /// copy was stale, e.g. a renewal whose answer was lost) — renewed
    /// with the fresh revision. `Err`: the next role — `Promoting` when the
    /// lease names this region under a new epoch (moved here again),
    /// `Demoting` when it names another region or cannot be read.
    pub(crate) async fn lost(&self, held: &Lease) -> Result<(Lease, Instant), Role> {
        match self.read_lease().await {
            Ok((Some(l), _)) if l.names(&self.s.region) => match self.renew(&l).await {
                Ok((lease, until)) if lease.epoch == held.epoch => Ok((lease, until)),
                Ok((lease, until)) => Err(Role::Promoting { lease, until }),
                Err(_) => Err(Role::Demoting { to: None }),
            },
            Ok((Some(l), _)) => {
                tracing::warn!(primary = ?l.primary(), epoch = %l.epoch, "the region lease names another region: stopping every job here");
                Err(Role::Demoting {
                    to: l.primary().map(str::to_string),
                })
            }
            _ => {
                tracing::warn!(
                    "the region lease changed and cannot be read: stopping every job here"
                );
                Err(Role::Demoting { to: None })
            }
        }
    }

    /// Says a standby's decision once (until it changes).
    pub(crate) fn say_once(&self, what: String) {
        let mut said = self.said.lock().unwrap_or_else(|p| p.into_inner());
        if said.as_deref() != Some(what.as_str()) {
            tracing::info!("{what}");
            *said = Some(what);
        }
    }

    pub(crate) fn seen(&self) -> Seen {
        self.seen.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Checks that `region` is one of `regions.stores`.
    pub(crate) fn known(&self, region: &str) -> Result<&StorageLocation, RegionError> {
        self.s
            .stores
            .get(region)
            .ok_or_else(|| RegionError::UnknownRegion {
                name: region.to_string(),
                known: self.s.stores.keys().cloned().collect::<Vec<_>>().join(", "),
            })
    }

    /// `GET /v1/regions`.
    pub fn status(&self) -> RegionsStatus {
        let seen = self.seen();
        RegionsStatus {
            region: Some(self.s.region.clone()),
            instance: self.s.instance.clone(),
            region_role: Some(seen.role),
            primary: seen.primary,
            epoch: seen.epoch,
            home: self.s.home.clone(),
            // Computed now, not at the last tick: a tick cut off from the
            // global KV takes several bounded waits.
            global_reachable: Some(self.health().reachable()),
            regions: seen.views,
            standbys: self.replicator.status(),
            verified: self.verifier.status(),
            note: None,
            sync: None,
        }
    }

    /// Announces a change of the primary role to the webhook (if set), in
    /// the background, naming who moved the lease (as its record says).
    fn notify(&self, event: &'static str, primary: String, epoch: RegionEpoch) {
        let Some(hook) = &self.s.webhook else {
            return;
        };
        let seen = self.seen();
        hook.announce(Announcement {
            event,
            region: self.s.region.clone(),
            primary,
            epoch,
            actor: seen.by.unwrap_or_else(|| "unknown".into()),
            reason: seen.reason,
            at: chrono::Utc::now(),
        });
    }
}
