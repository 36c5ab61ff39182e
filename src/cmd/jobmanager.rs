//! `ferry jobmanager --config FILE`: one JobManager of a region. It
//! heartbeats into the region's NATS KV, competes for the leader lease, and
//! serves the REST API: the leader drives every job of the job store; a
//! standby answers reads from the store and forwards writes to the leader.
//! The leader runs job tasks on the region's TaskManagers (or in its own
//! process with `scheduling.placement: inProcess`). SIGTERM or Ctrl-C hands
//! the leadership over at once (this instance lets go of its jobs and
//! releases the lease, so a standby takes them over without waiting for the
//! lease to expire; tasks on TaskManagers keep running throughout).

use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use ferry_core::config::{Placement, ProcessConfig};
use ferry_ha::{ElectorConfig, MembershipConfig};
use ferry_jobmanager::ha::HaSettings;
use ferry_jobmanager::leadership::{HaContext, Leadership};
use ferry_jobmanager::{JobManager, JobManagerConfig};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::process::{
    ProcessArgs, connect_coordination, default_instance_id, run_process, shutdown_signal,
};

pub fn run(args: ProcessArgs) -> anyhow::Result<ExitCode> {
    run_process(args, "ferry-jm", run_async)
}

async fn run_async(cfg: ProcessConfig, ha_rt: tokio::runtime::Handle) -> anyhow::Result<ExitCode> {
    let instance_id = cfg
        .instance_id
        .clone()
        .unwrap_or_else(|| default_instance_id("jm"));
    let listener = tokio::net::TcpListener::bind(&cfg.api.listen)
        .await
        .with_context(|| format!("cannot listen on api.listen {}", cfg.api.listen))?;
    let bound = listener.local_addr()?.to_string();
    let api_url = cfg.advertised_url(&bound);
    let h = &cfg.ha;
    let Some(backend) = connect_coordination(&cfg, &ha_rt).await else {
        return Ok(ExitCode::from(1));
    };
    let leadership = Leadership::ha(HaContext {
        backend: backend.clone(),
        region: cfg.region.clone(),
        member_expiry: h.member_expiry.get(),
        heartbeat_failures: Default::default(),
    });
    let jm = JobManager::with_leadership(
        JobManagerConfig {
            data_url: cfg.storage.clone(),
            instance_id: instance_id.clone(),
        },
        leadership,
    );
    let settings = HaSettings {
        region: cfg.region.clone(),
        instance_id: instance_id.clone(),
        api_url: api_url.clone(),
        membership: MembershipConfig {
            interval: h.heartbeat_interval.get(),
            expiry: h.member_expiry.get(),
        },
        elector: ElectorConfig {
            key: "leader".to_string(),
            holder: instance_id.clone(),
            ttl: h.lease_ttl.get(),
            renew_interval: h.renew_interval.get(),
            renew_deadline: h.renew_deadline.get(),
        },
        min_instances: h.min_instances_for_election,
    };
    settings
        .elector
        .validate()
        .map_err(|e| anyhow::anyhow!("ha timing: {e}"))?;
    let pool_stop = CancellationToken::new();
    let pool = match cfg.scheduling.placement {
        Placement::Taskmanagers => {
            let pool = ferry_jobmanager::taskmanagers::TaskManagers::new(
                cfg.region.clone(),
                instance_id.clone(),
                backend.clone(),
                h.member_expiry.get(),
                h.heartbeat_interval.get(),
            );
            jm.use_taskmanagers(pool.clone());
            Some(tokio::spawn(
                pool.run(jm.leadership().clone(), pool_stop.clone()),
            ))
        }
        Placement::InProcess => None,
    };
    if cfg.is_standby_region()
        && let Some(primary) = &cfg.regions.primary
    {
        tracing::info!(%primary, "standby region: running no job; replicated jobs wait for a promotion");
        jm.set_standby_region(&cfg.region, primary);
    } else if !cfg.regions.global.urls.is_empty() {
        // With a region lease, even the configured primary runs nothing
        // until the lease says it is primary: a restarted old primary must
        // not resume jobs another region took over meanwhile.
        tracing::info!("running no job until the region lease names this region");
        jm.set_standby_region(&cfg.region, "(not known until the region lease is read)");
    }
    let replication_stop = CancellationToken::new();
    let replication = start_regions(&cfg, &jm, &api_url, &ha_rt, replication_stop.clone()).await?;
    let api_stop = CancellationToken::new();
    let api = tokio::spawn(ferry_jobmanager::api::serve(
        jm.clone(),
        listener,
        api_stop.clone(),
    ));
    tracing::info!(instance = %instance_id, region = %cfg.region, api = %api_url, listen = %bound, "jobmanager started");
    let ha_stop = CancellationToken::new();
    let ha = ha_rt.spawn(ferry_jobmanager::ha::run(
        jm.clone(),
        backend,
        settings,
        ha_stop.clone(),
    ));
    shutdown_signal().await;
    tracing::info!("stopping: handing the leadership over");
    ha_stop.cancel();
    let _ = ha.await;
    pool_stop.cancel();
    if let Some(p) = pool {
        let _ = p.await;
    }
    replication_stop.cancel();
    if let Some(r) = replication {
        let _ = r.await;
    }
    api_stop.cancel();
    let _ = api.await;
    tracing::info!("stopped");
    Ok(ExitCode::SUCCESS)
}

/// The cross-region part of a JobManager: replicates every snapshot it
/// completes to the other regions' stores (`regions.stores`), heartbeats
/// this region into the global KV while leading (`regions.global`), and
/// publishes both as metrics, `/v1/regions` and `/health/regions`. `None`
/// when neither is configured.
async fn start_regions(
    cfg: &ProcessConfig,
    jm: &JobManager,
    api_url: &str,
    ha_rt: &tokio::runtime::Handle,
    stop: CancellationToken,
) -> anyhow::Result<Option<tokio::task::JoinHandle<()>>> {
    let mut standbys = Vec::new();
    for (region, url) in cfg.regions.stores.iter().filter(|(r, _)| **r != cfg.region) {
        let store = ferry_core::storage::StorageLocation::open(url)
            .with_context(|| format!("regions.stores.{region}: {url}"))?;
        standbys.push(ferry_region::Standby {
            region: region.clone(),
            store,
        });
    }
    let g = &cfg.regions.global;
    if standbys.is_empty() && g.urls.is_empty() {
        return Ok(None);
    }
    let replicator = Arc::new(ferry_region::Replicator::new(standbys));
    // Set while this region plays dead for a drill (`/v1/drills/outage`).
    let dark: Dark = Default::default();
    // What this region could restore: its store's checkpoints, each
    // test-restored once while this instance leads a standby region.
    let verifier = Arc::new(ferry_region::Verifier::new(
        ferry_core::storage::StorageLocation::open(&cfg.storage)
            .with_context(|| format!("storage: {}", cfg.storage))?,
        Arc::new(super::region::RuntimeCheck),
    ));
    // Region health, refreshed in the background: (global KV readable, views).
    let regions: RegionsCache = Default::default();
    let region_epoch = Arc::new(std::sync::atomic::AtomicU64::new(0));
    if !g.urls.is_empty() {
        let interval = cfg.regions.health_check_interval.get();
        let timeout = cfg.regions.timeout.get();
        let bucket = g.bucket.clone().unwrap_or_else(|| "ferry-global".into());
        let Some(global) =
            super::process::connect_kv(&g.urls, &bucket, timeout * 4, g.replicas, ha_rt).await
        else {
            return Ok(None);
        };
        let mut known: Vec<String> = cfg.regions.stores.keys().cloned().collect();
        if !known.contains(&cfg.region) {
            known.push(cfg.region.clone());
        }
        {
            let (jm, dark) = (jm.clone(), dark.clone());
            tokio::spawn(verifier.clone().run(
                cfg.regions.verify_interval.get(),
                move || {
                    jm.leadership().fence().is_some() && jm.is_standby_region() && !is_dark(&dark)
                },
                stop.clone(),
            ));
        }
        let (jm2, r2, region, url, v2) = (
            jm.clone(),
            replicator.clone(),
            cfg.region.clone(),
            api_url.to_string(),
            verifier.clone(),
        );
        // Commits need a fresh confirmation of the region lease from now on.
        jm.enable_region_fence();
        let leading = {
            let (jm, dark) = (jm.clone(), dark.clone());
            move || jm.leadership().fence().is_some() && !is_dark(&dark)
        };
        let heartbeat = move || ferry_region::health::RegionHeartbeat {
            region: region.clone(),
            leader: jm2.instance_id().to_string(),
            api_url: url.clone(),
            at: None,
            replication: r2
                .status()
                .into_iter()
                .map(|s| (s.region, s.lag_seconds, s.lag_checkpoints))
                .collect(),
            verified: v2.newest(),
        };
        ha_rt.spawn(ferry_region::health::publish(
            global.clone(),
            interval,
            leading,
            heartbeat,
            stop.clone(),
        ));
        // The lease lives in a bucket of its own whose keys never expire
        // (heartbeats expire; the name of the primary must not).
        let Some(lease_kv) = super::process::connect_kv(
            &g.urls,
            &format!("{bucket}-lease"),
            std::time::Duration::ZERO,
            g.replicas,
            ha_rt,
        )
        .await
        else {
            return Ok(None);
        };
        let ctx = Arc::new(RegionCtx {
            cfg: cfg.clone(),
            jm: jm.clone(),
            kv: lease_kv,
            regions: regions.clone(),
            dark: dark.clone(),
        });
        jm.set_region_control(Arc::new(RegionCtl(ctx.clone())));
        tokio::spawn(follow_region_lease(
            ctx,
            region_epoch.clone(),
            verifier.clone(),
            stop.clone(),
        ));
        let (cache, s, jm3) = (regions.clone(), stop.clone(), jm.clone());
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(interval);
            loop {
                tokio::select! {
                    _ = s.cancelled() => return,
                    _ = tick.tick() => {}
                }
                let read = tokio::time::timeout(
                    interval,
                    ferry_region::health::list(global.as_ref(), &known, timeout),
                )
                .await;
                let mut c = cache.lock().unwrap_or_else(|p| p.into_inner());
                match read {
                    Ok(Ok(v)) => {
                        for r in &v {
                            jm3.metrics().set_region_health(
                                &r.region,
                                r.healthy,
                                r.heartbeat_age_ms.map(|ms| ms as f64 / 1e3),
                            );
                        }
                        *c = (true, v)
                    }
                    _ => c.0 = false,
                }
            }
        });
    }
    let view = {
        let (r, region, instance) = (
            replicator.clone(),
            cfg.region.clone(),
            jm.instance_id().to_string(),
        );
        let (jm, regions, health) = (jm.clone(), regions.clone(), !g.urls.is_empty());
        let epoch = region_epoch.clone();
        let verifier = verifier.clone();
        // Where the jobs belong (`regions.primary`): fail-back's default.
        let home = cfg.regions.primary.clone();
        Arc::new(move || {
            let (reachable, views) = regions.lock().unwrap_or_else(|p| p.into_inner()).clone();
            serde_json::json!({
                "region": region,
                "instance": instance,
                "role": jm.role(),
                "standbys": r.status(),
                "regions": views,
                "global_reachable": if health { Some(reachable) } else { None },
                "epoch": epoch.load(std::sync::atomic::Ordering::Relaxed),
                "home": home,
                "verified": verifier.status(),
            })
        })
    };
    jm.set_regions_view(view);
    let mut completed = jm.subscribe_completed();
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let glue_stop = stop.clone();
    tokio::spawn(async move {
        loop {
            let c = tokio::select! {
                _ = glue_stop.cancelled() => return,
                c = completed.recv() => c,
            };
            match c {
                Ok(c) => {
                    let _ = tx.send(super::region::replication_event(c));
                }
                Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                    // The next announcement replicates the skipped ones too.
                    tracing::warn!("replication fell {n} checkpoint announcements behind");
                }
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
            }
        }
    });
    let metrics_jm = jm.clone();
    let r = replicator.clone();
    let metrics_stop = stop.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
        loop {
            tokio::select! {
                _ = metrics_stop.cancelled() => return,
                _ = tick.tick() => {}
            }
            for s in r.status() {
                metrics_jm.metrics().set_replication_lag(
                    &s.region,
                    s.lag_seconds,
                    s.lag_checkpoints,
                    s.lag_records,
                );
            }
        }
    });
    Ok(Some(tokio::spawn(async move {
        replicator.run(rx, stop.cancelled_owned()).await;
    })))
}

/// Region health as last read from the global KV: (readable, views).
type RegionsCache = Arc<std::sync::Mutex<(bool, Vec<ferry_region::health::RegionView>)>>;

/// Until when this region plays dead for a drill.
type Dark = Arc<std::sync::Mutex<Option<std::time::Instant>>>;

/// True while a simulated outage lasts (an expired one is cleared).
fn is_dark(dark: &Dark) -> bool {
    let mut d = dark.lock().unwrap_or_else(|p| p.into_inner());
    match *d {
        Some(until) if std::time::Instant::now() < until => true,
        Some(_) => {
            *d = None;
            tracing::warn!("drill: the simulated outage ended; following the region lease again");
            false
        }
        None => false,
    }
}

/// What the region endpoints work with.
struct RegionCtx {
    cfg: ProcessConfig,
    jm: JobManager,
    /// The global KV bucket holding the region lease.
    kv: Arc<dyn ferry_ha::Coordination>,
    regions: RegionsCache,
    dark: Dark,
}

/// The region coordinator's operations behind `/v1/regions/{name}/...` and
/// `/v1/drills/outage`.
struct RegionCtl(Arc<RegionCtx>);

impl ferry_jobmanager::service::RegionOps for RegionCtl {
    fn failover(
        &self,
        target: String,
        force: bool,
        dry_run: bool,
    ) -> ferry_jobmanager::service::RegionResult {
        let c = self.0.clone();
        Box::pin(async move { switchover(&c.cfg, &c.jm, &c.kv, &target, force, dry_run).await })
    }

    fn failback(&self, target: String, dry_run: bool) -> ferry_jobmanager::service::RegionResult {
        let c = self.0.clone();
        Box::pin(async move { failback(&c, &target, dry_run).await })
    }

    fn outage(
        &self,
        duration: Option<std::time::Duration>,
    ) -> ferry_jobmanager::service::RegionResult {
        let c = self.0.clone();
        Box::pin(async move { outage(&c, duration).await })
    }
}

/// The REST URL of `region`'s leader from its last heartbeat.
fn region_url(regions: &RegionsCache, region: &str) -> Option<String> {
    let (_, views) = regions.lock().unwrap_or_else(|p| p.into_inner()).clone();
    views
        .into_iter()
        .find(|v| v.region == region)
        .and_then(|v| v.heartbeat)
        .map(|h| h.api_url)
        .filter(|u| !u.is_empty())
}

/// Where to send an operation that must run on `primary`'s leader.
fn send_there(regions: &RegionsCache, primary: &str) -> String {
    match region_url(regions, primary) {
        Some(u) => format!("send it there ({u})"),
        None => "send it there".into(),
    }
}

/// The primary region and the region epoch, or why they are not known.
async fn current_primary(kv: &dyn ferry_ha::Coordination) -> Result<(String, u64), String> {
    match ferry_region::lease::read(kv).await {
        Ok(Some((l, rev))) => Ok((l.primary, rev)),
        Ok(None) => Err("there is no region lease yet: the primary region has not started".into()),
        Err(e) => Err(format!("cannot read the region lease: {e}")),
    }
}

/// `POST /v1/regions/{target}/failback`: on the primary's leader, after
/// an earlier failover away from `target`. Replicates every job into
/// `target`'s store now (archiving what `target` committed beyond the
/// lineage this region restored from), reports that divergence, then
/// switches over to `target` like a planned failover (nothing lost,
/// nothing repeated).
async fn failback(c: &RegionCtx, target: &str, dry_run: bool) -> Result<serde_json::Value, String> {
    use ferry_region::{JobDivergence, diverge};
    let me = &c.cfg.region;
    let (current, rev) = current_primary(c.kv.as_ref()).await?;
    if current == target {
        return Err(format!(
            "{target} is already the primary region (epoch {rev}); nothing to fail back"
        ));
    }
    if current != *me || c.jm.leadership().fence().is_none() {
        return Err(format!(
            "fail-back runs on the leader of the primary region {current}; {}",
            send_there(&c.regions, &current)
        ));
    }
    let Some(target_url) = c.cfg.regions.stores.get(target) else {
        return Err(format!(
            "unknown region '{target}': known regions are {}",
            c.cfg
                .regions
                .stores
                .keys()
                .cloned()
                .collect::<Vec<_>>()
                .join(", ")
        ));
    };
    let healthy = {
        let (readable, views) = c.regions.lock().unwrap_or_else(|p| p.into_inner()).clone();
        readable && views.iter().any(|v| v.region == target && v.healthy)
    };
    if !healthy {
        return Err(format!(
            "{target} is not healthy (no region heartbeat within {}): start its JobManagers and TaskManagers, wait until `ferry region status` shows it healthy, then retry",
            humantime::format_duration(c.cfg.regions.timeout.get())
        ));
    }
    let source =
        ferry_core::storage::StorageLocation::open(&c.cfg.storage).map_err(|e| e.to_string())?;
    let target_store =
        ferry_core::storage::StorageLocation::open(target_url).map_err(|e| e.to_string())?;
    // Catch up now: the switchover's savepoints then only add the last bit.
    let mut jobs = Vec::new();
    for j in c.jm.list() {
        ferry_region::replicate_job(&source, &target_store, &j.id)
            .await
            .map_err(|e| {
                format!(
                    "replicating job {} to {target} failed: {e}; nothing was moved",
                    j.id
                )
            })?;
        let archived = diverge::archived(&target_store, &j.id)
            .await
            .map_err(|e| format!("reading the divergence of job {} in {target}: {e}", j.id))?;
        if !archived.is_empty() {
            jobs.push(JobDivergence::summarise(j.id, archived));
        }
    }
    let divergence = serde_json::json!({
        "region": target,
        "records_out": jobs.iter().map(|j| j.records_out).sum::<u64>(),
        "records_in": jobs.iter().map(|j| j.records_in).sum::<u64>(),
        "event_time_ms": jobs.iter().map(|j| j.event_time_ms).max().unwrap_or(0),
        "jobs": jobs,
    });
    if dry_run {
        return Ok(serde_json::json!({
            "from": me, "to": target, "epoch": rev, "force": false, "failback": true,
            "divergence": divergence,
            "steps": [format!("{target} has caught up (every job replicated into {target_url})"),
                      "stop every job with a savepoint", format!("wait until the savepoints are in {target_url}"),
                      "move the region lease", format!("{target} resumes every job from its savepoint")],
        }));
    }
    let mut v = switchover(&c.cfg, &c.jm, &c.kv, target, false, false).await?;
    v["failback"] = true.into();
    v["divergence"] = divergence;
    Ok(v)
}

/// `POST`/`DELETE /v1/drills/outage`: this region (its leader) plays dead
/// for a drill — it stops every job without a savepoint, stops its region
/// heartbeat and ignores the region lease until the outage ends — so a
/// standby's automatic failover takes over exactly as after a real outage.
async fn outage(
    c: &RegionCtx,
    duration: Option<std::time::Duration>,
) -> Result<serde_json::Value, String> {
    let me = &c.cfg.region;
    let Some(duration) = duration else {
        let was = c
            .dark
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
            .is_some();
        if was {
            tracing::warn!("drill: the simulated outage ended; following the region lease again");
        }
        return Ok(serde_json::json!({"region": me, "outage": false, "was_dark": was}));
    };
    if let Some(p) = c.jm.standby_of() {
        return Err(format!(
            "a simulated outage runs on the primary region's leader; {me} is a standby of {p}: {}",
            send_there(&c.regions, &p)
        ));
    }
    if c.jm.leadership().fence().is_none() {
        return Err(format!(
            "this JobManager does not lead {me}; send it to the leader"
        ));
    }
    let running: Vec<String> =
        c.jm.list()
            .into_iter()
            .filter(|j| !j.state.is_terminal())
            .map(|j| j.id.to_string())
            .collect();
    *c.dark.lock().unwrap_or_else(|p| p.into_inner()) = Some(std::time::Instant::now() + duration);
    tracing::warn!(
        duration = %humantime::format_duration(duration),
        jobs = running.len(),
        "drill: simulating an outage of this region: every job stops without a savepoint and the region heartbeat stops"
    );
    c.jm.demote(me, "(unknown: simulated outage)").await;
    let jobs: Vec<serde_json::Value> = running
        .iter()
        .filter_map(|id| c.jm.get(id).ok())
        .map(|j| serde_json::to_value(j).unwrap_or_default())
        .collect();
    Ok(serde_json::json!({
        "region": me,
        "outage": true,
        "until": chrono::Utc::now() + chrono::Duration::from_std(duration).unwrap_or_default(),
        "jobs": jobs,
    }))
}

/// Follows the region lease: this region runs jobs exactly while the lease
/// names it. The initial primary creates the lease; with
/// `regions.autoFailover`, a standby region's leader takes it (CAS) when the
/// primary's heartbeat is older than `regions.timeout`; a primary that sees
/// another region named — or cannot read the lease for `regions.timeout` —
/// stops every job and cancels its tasks.
async fn follow_region_lease(
    c: Arc<RegionCtx>,
    region_epoch: Arc<std::sync::atomic::AtomicU64>,
    verifier: Arc<ferry_region::Verifier>,
    stop: CancellationToken,
) {
    let (cfg, jm, global, regions, dark) = (&c.cfg, &c.jm, c.kv.clone(), &c.regions, &c.dark);
    use ferry_region::lease;
    let mut deferred = false;
    // (primary, region epoch) as last seen while leading.
    let mut seen: Option<(String, u64)> = None;
    let me = cfg.region.clone();
    let configured = cfg.regions.primary.clone().unwrap_or_else(|| me.clone());
    let interval = cfg.regions.health_check_interval.get();
    let timeout = cfg.regions.timeout.get();
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // The last time the lease was read. A primary stops its jobs when that
    // is older than half the region timeout: a standby takes over only once
    // the primary's heartbeat (written to the same KV) is older than the
    // whole timeout, so the two never run a job at the same time.
    let mut last_read = std::time::Instant::now();
    // The in-region epoch under which this instance started the primary
    // region's jobs.
    let mut led: Option<u64> = None;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        if is_dark(dark) {
            continue;
        }
        let leading = jm.leadership().fence().is_some();
        let read_started = std::time::Instant::now();
        let (primary, epoch, since) = match tokio::time::timeout(
            interval,
            lease::read(global.as_ref()),
        )
        .await
        {
            Ok(Ok(Some((l, rev)))) => (l.primary, Some(rev), Some(l.since)),
            Ok(Ok(None)) if configured == me && leading => {
                match lease::claim(&global, &me, None, "initial").await {
                    Ok(rev) => {
                        tracing::info!(
                            region_epoch = rev,
                            "took the region lease: this region is the primary"
                        );
                        (me.clone(), Some(rev), Some(chrono::Utc::now()))
                    }
                    Err(e) => {
                        tracing::debug!("creating the region lease failed: {e}");
                        continue;
                    }
                }
            }
            // No lease yet (the initial primary has not started): keep the
            // current role.
            Ok(Ok(None)) => {
                let current = if jm.is_standby_region() {
                    configured.clone()
                } else {
                    me.clone()
                };
                (current, None, None)
            }
            _ => {
                if !jm.is_standby_region() && last_read.elapsed() > timeout / 2 {
                    tracing::error!(
                        "cannot read the region lease for {:?} (global KV unreachable or without quorum): another region may take over; stopping every job here",
                        last_read.elapsed()
                    );
                    jm.demote(&me, "unknown").await;
                }
                continue;
            }
        };
        last_read = std::time::Instant::now();
        jm.set_region_epoch(epoch.unwrap_or(0));
        if let Some(e) = epoch {
            region_epoch.store(e, std::sync::atomic::Ordering::Relaxed);
            jm.metrics().region_epoch.set(e as i64);
        }
        let mut primary = primary;
        // Unplanned failover: the lease names a primary that went silent.
        if primary != me
            && cfg.regions.auto_failover
            && leading
            && let (Some(rev), Some(since)) = (epoch, since)
        {
            let silent = {
                let (readable, views) = regions.lock().unwrap_or_else(|p| p.into_inner()).clone();
                let lease_age = (chrono::Utc::now() - since).to_std().unwrap_or_default();
                match ferry_region::lease::takeover(
                    &me,
                    &primary,
                    &views,
                    &verifier.newest(),
                    timeout,
                    lease_age,
                ) {
                    _ if !readable => false,
                    ferry_region::lease::Takeover::Claim => true,
                    ferry_region::lease::Takeover::Wait => false,
                    ferry_region::lease::Takeover::Defer(better) => {
                        if !deferred {
                            deferred = true;
                            tracing::info!(
                                %better,
                                "primary {primary} is silent; {better} holds newer verified checkpoints and takes over first (this region steps in if it has not within {})",
                                humantime::format_duration(timeout)
                            );
                        }
                        false
                    }
                }
            };
            if silent {
                deferred = false;
                let reason = format!(
                    "failover: primary {primary} silent for more than {}",
                    humantime::format_duration(timeout)
                );
                let span =
                    tracing::info_span!("failover", from = %primary, to = %me, region_epoch = rev);
                match lease::claim(&global, &me, Some(rev), &reason)
                    .instrument(span)
                    .await
                {
                    Ok(new) => {
                        tracing::warn!(old_primary = %primary, region_epoch = new, "{reason}: this region is the primary now");
                        jm.metrics().failovers.inc();
                        region_epoch.store(new, std::sync::atomic::Ordering::Relaxed);
                        jm.metrics().region_epoch.set(new as i64);
                        primary = me.clone();
                    }
                    Err(e) => tracing::info!("another change of the region lease came first: {e}"),
                }
            }
        }
        if primary == me {
            // Commits may go on until half the region timeout after this
            // read began: a standby takes over only after the whole
            // timeout of silence.
            jm.confirm_region_lease((timeout / 2).saturating_sub(read_started.elapsed()));
        }
        if primary == me && jm.is_standby_region() {
            led = None;
            match jm.promote().await {
                Ok(n) => tracing::info!(
                    jobs = n,
                    "primary region: started every job from its newest replicated checkpoint"
                ),
                Err(e) => tracing::error!("starting the jobs after the promotion failed: {e}"),
            }
        }
        // Once per in-region leadership while primary, start whatever the
        // promotion could not: its fence may have been down for a moment
        // (a slow lease renewal), and then nothing would start the jobs.
        if primary == me
            && let Some(e) = jm.leadership().fence()
            && led != Some(e)
        {
            match jm.lead(e).await {
                Ok(n) => {
                    led = Some(e);
                    if n > 0 {
                        tracing::info!(jobs = n, "primary region: started jobs");
                    }
                }
                Err(e) => {
                    tracing::warn!("starting the primary region's jobs failed (retrying): {e}")
                }
            }
        } else if primary != me && !jm.is_standby_region() {
            tracing::warn!(%primary, "the region lease names another region: stopping every job here");
            jm.demote(&me, &primary).await;
            led = None;
        } else if primary != me && jm.standby_of().as_deref() != Some(primary.as_str()) {
            // Already a standby (e.g. restarted after losing the lease):
            // just learn whom it stands by for.
            jm.set_standby_region(&me, &primary);
        }
        // Tell the webhook about every move of the lease seen while leading.
        let now_epoch = region_epoch.load(std::sync::atomic::Ordering::Relaxed);
        if leading && now_epoch > 0 {
            if let Some((was, e)) = &seen
                && *e != now_epoch
            {
                if primary == me {
                    notify(cfg, "promoted", &primary, now_epoch);
                } else if *was == me {
                    notify(cfg, "demoted", &primary, now_epoch);
                }
            }
            seen = Some((primary.clone(), now_epoch));
        }
    }
}

/// Posts a region event to `regions.webhook` (if set), in the background:
/// `{"event", "region", "primary", "epoch", "at"}`; 5 s timeout, failures
/// logged.
fn notify(cfg: &ProcessConfig, event: &'static str, primary: &str, epoch: u64) {
    let Some(url) = cfg.regions.webhook.clone() else {
        return;
    };
    let body = serde_json::json!({
        "event": event, "region": cfg.region, "primary": primary, "epoch": epoch,
        "at": chrono::Utc::now(),
    });
    tokio::spawn(async move {
        let client = match reqwest::Client::builder()
            .no_proxy()
            .timeout(std::time::Duration::from_secs(5))
            .build()
        {
            Ok(c) => c,
            Err(e) => return tracing::warn!("regions.webhook: {e}"),
        };
        match client.post(&url).json(&body).send().await {
            Ok(r) if r.status().is_success() => {
                tracing::info!(%url, event, "region event sent to the webhook")
            }
            Ok(r) => {
                tracing::warn!(%url, event, status = %r.status(), "the webhook refused the region event")
            }
            Err(e) => {
                tracing::warn!(%url, event, "sending the region event to the webhook failed: {e}")
            }
        }
    });
}

/// `POST /v1/regions/{target}/failover`. Planned (on the primary's leader):
/// stop every job with a savepoint, wait until each savepoint is in the
/// target's store, move the region lease by compare-and-set; this region
/// then runs nothing and the target resumes every job from its savepoint —
/// nothing lost, nothing repeated. `force`: move the lease now (the primary
/// is unreachable; its work after the last replicated checkpoint is lost).
async fn switchover(
    cfg: &ProcessConfig,
    jm: &JobManager,
    kv: &Arc<dyn ferry_ha::Coordination>,
    target: &str,
    force: bool,
    dry_run: bool,
) -> Result<serde_json::Value, String> {
    use ferry_region::lease;
    let started = std::time::Instant::now();
    let me = &cfg.region;
    let Some(target_url) = cfg.regions.stores.get(target) else {
        return Err(format!(
            "unknown region '{target}': known regions are {}",
            cfg.regions
                .stores
                .keys()
                .cloned()
                .collect::<Vec<_>>()
                .join(", ")
        ));
    };
    let (current, rev) = current_primary(kv.as_ref()).await?;
    if current == target {
        return Err(format!(
            "{target} is already the primary region (epoch {rev})"
        ));
    }
    if force {
        let plan = serde_json::json!({"from": current, "to": target, "epoch": rev, "force": true,
            "steps": ["move the region lease now", "the target starts every job from its newest replicated checkpoint"]});
        if dry_run {
            return Ok(plan);
        }
        let new = lease::claim(
            kv,
            target,
            Some(rev),
            &format!("forced failover from {current} (requested in {me})"),
        )
        .await
        .map_err(|e| format!("moving the region lease failed: {e}"))?;
        tracing::warn!(from = %current, to = %target, region_epoch = new, "forced failover");
        return Ok(
            serde_json::json!({"from": current, "to": target, "epoch": new, "force": true,
            "took_ms": started.elapsed().as_millis() as u64}),
        );
    }
    if current != *me || jm.leadership().fence().is_none() {
        return Err(format!(
            "a planned switchover runs on the leader of the primary region {current}; send it there, or use force=true if {current} is unreachable"
        ));
    }
    let running: Vec<String> = jm
        .list()
        .into_iter()
        .filter(|j| !j.state.is_terminal())
        .map(|j| j.id.to_string())
        .collect();
    if dry_run {
        return Ok(
            serde_json::json!({"from": me, "to": target, "epoch": rev, "force": false, "jobs": running,
            "steps": ["stop every job with a savepoint", format!("wait until the savepoints are in {target_url}"),
                      "move the region lease", "the target resumes every job from its savepoint"]}),
        );
    }
    let target_store =
        ferry_core::storage::StorageLocation::open(target_url).map_err(|e| e.to_string())?;
    let mut savepoints = Vec::new();
    for (job, r) in jm.stop_all_with_savepoints(target).await {
        let sp = r.map_err(|e| {
            format!(
                "stopping job {job} with a savepoint failed: {e}; the region lease was not moved"
            )
        })?;
        savepoints.push(sp);
    }
    // Every savepoint must be complete in the target before the lease moves.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    for sp in &savepoints {
        let rel = format!(
            "jobs/{}/savepoints/savepoint-{}",
            sp.job_id, sp.checkpoint_id
        );
        loop {
            if target_store
                .child(&rel)
                .size(ferry_core::manifest::MANIFEST_FILE)
                .await
                .map_err(|e| e.to_string())?
                .is_some()
            {
                break;
            }
            if std::time::Instant::now() > deadline {
                return Err(format!(
                    "savepoint {rel} did not reach {target_url} within 60 s; the region lease was not moved (the jobs are stopped here; resume them or retry)"
                ));
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }
    let new = lease::claim(kv, target, Some(rev), &format!("switchover from {me}"))
        .await
        .map_err(|e| format!("moving the region lease failed: {e}"))?;
    jm.demote(me, target).await;
    tracing::info!(to = %target, region_epoch = new, jobs = savepoints.len(), "switchover: the region lease moved");
    Ok(serde_json::json!({
        "from": me, "to": target, "epoch": new, "force": false,
        "savepoints": savepoints, "took_ms": started.elapsed().as_millis() as u64,
    }))
}
