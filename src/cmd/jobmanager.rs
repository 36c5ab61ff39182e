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
use ferry_jobmanager::ha::HaSettings;
use ferry_jobmanager::leadership::{HaContext, Leadership};
use ferry_jobmanager::{JobManager, JobManagerConfig};
use tokio_util::sync::CancellationToken;

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
    let settings = HaSettings::from_config(&cfg, &instance_id, &api_url);
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

/// The cross-region part of a JobManager: the region coordinator of
/// `ferry_region` (region role, lease, failover, switchover, fail-back,
/// drills, replication, restore verification), wired to this JobManager
/// through [`JmRegion`]. `None` when neither `regions.stores` nor
/// `regions.global` is configured.
async fn start_regions(
    cfg: &ProcessConfig,
    jm: &JobManager,
    api_url: &str,
    ha_rt: &tokio::runtime::Handle,
    stop: CancellationToken,
) -> anyhow::Result<Option<tokio::task::JoinHandle<()>>> {
    let mut stores = std::collections::BTreeMap::new();
    for (region, url) in &cfg.regions.stores {
        let store = ferry_core::storage::StorageLocation::open(url)
            .with_context(|| format!("regions.stores.{region}: {url}"))?;
        stores.insert(region.clone(), store);
    }
    let own = ferry_core::storage::StorageLocation::open(&cfg.storage)
        .with_context(|| format!("storage: {}", cfg.storage))?;
    stores
        .entry(cfg.region.clone())
        .or_insert_with(|| own.clone());
    let g = &cfg.regions.global;
    if stores.len() < 2 && g.urls.is_empty() {
        return Ok(None);
    }
    let standbys = stores
        .iter()
        .filter(|(r, _)| **r != cfg.region)
        .map(|(r, s)| ferry_region::Standby {
            region: r.clone(),
            store: s.clone(),
        })
        .collect();
    let replicator = Arc::new(ferry_region::Replicator::new(standbys));
    let verifier = Arc::new(ferry_region::Verifier::new(
        own,
        Arc::new(super::region::RuntimeCheck),
    ));
    // Every completed snapshot goes to the replicator.
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let mut completed = jm.subscribe_completed();
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
    // Ended jobs' final status too, so no standby restarts them.
    let mut ended = jm.subscribe_ended();
    let (r, s) = (replicator.clone(), stop.clone());
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = s.cancelled() => return,
                e = ended.recv() => match e {
                    Ok(e) => r.job_ended(e.job, e.store),
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                },
            }
        }
    });
    if g.urls.is_empty() {
        // Replication only, without a region lease: this region is primary.
        let (view, region, instance) = (
            replicator.clone(),
            cfg.region.clone(),
            jm.instance_id().to_string(),
        );
        jm.set_regions_view(Arc::new(move || ferry_core::api::RegionsStatus {
            region: Some(region.clone()),
            instance: instance.clone(),
            region_role: None,
            primary: Some(region.clone()),
            epoch: ferry_core::RegionEpoch::NONE,
            home: None,
            global_reachable: None,
            regions: Vec::new(),
            standbys: view.status(),
            verified: Default::default(),
            note: Some("no global KV (regions.global): replication only, no failover".into()),
        }));
        // Its lag in the metrics, every second.
        let (r, s) = (replicator.clone(), stop.clone());
        let adapter = JmRegion {
            jm: jm.clone(),
            region: cfg.region.clone(),
        };
        tokio::spawn(async move {
            use ferry_region::RegionJobs;
            let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
            loop {
                tokio::select! {
                    _ = s.cancelled() => return,
                    _ = tick.tick() => {}
                }
                adapter.report(ferry_region::RegionEvent::Replication(&r.status()));
            }
        });
        let r = replicator.clone();
        let s = stop.clone();
        return Ok(Some(tokio::spawn(async move {
            r.run(rx, s.cancelled_owned()).await
        })));
    }
    let timeout = cfg.regions.timeout.get();
    let interval = cfg.regions.health_check_interval.get();
    if timeout / 2 <= cfg.ha.lease_ttl.get() + interval {
        tracing::warn!(
            "half of regions.timeout ({}) is not above ha.leaseTtl ({}) plus regions.healthCheckInterval ({}): an in-region JobManager failover in the primary takes longer than its TaskManagers' region fence lasts, so their tasks restart from checkpoints instead of being adopted; raise regions.timeout",
            cfg.regions.timeout,
            cfg.ha.lease_ttl,
            cfg.regions.health_check_interval
        );
    }
    let bucket = g.bucket.clone().unwrap_or_else(|| "ferry-global".into());
    // Heartbeats and probes expire; the lease and the drill hold live in a
    // bucket of their own whose keys never expire.
    let Some(health_kv) =
        super::process::connect_kv(&g.urls, &bucket, timeout * 4, g.replicas, ha_rt).await
    else {
        return Ok(None);
    };
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
    // Commits and deployments need a confirmed region lease from now on.
    jm.enable_region_fence();
    let coordinator = ferry_region::Coordinator::new(
        ferry_region::Settings {
            region: cfg.region.clone(),
            instance: jm.instance_id().to_string(),
            api_url: api_url.to_string(),
            home: cfg.regions.primary.clone(),
            stores,
            interval,
            timeout,
            auto_failover: cfg.regions.auto_failover,
            webhook: cfg.regions.webhook.clone(),
        },
        Arc::new(JmRegion {
            jm: jm.clone(),
            region: cfg.region.clone(),
        }),
        lease_kv,
        health_kv,
        replicator,
        verifier,
    );
    jm.set_region_control(Arc::new(RegionCtl(coordinator.clone())));
    let view = coordinator.clone();
    jm.set_regions_view(Arc::new(move || view.status()));
    Ok(Some(coordinator.spawn(
        rx,
        cfg.regions.verify_interval.get(),
        stop,
    )))
}

/// The JobManager as the region coordinator drives it.
struct JmRegion {
    jm: JobManager,
    region: String,
}

#[async_trait::async_trait]
impl ferry_region::RegionJobs for JmRegion {
    fn leading(&self) -> Option<ferry_core::JmEpoch> {
        self.jm.leadership().fence()
    }

    fn jobs(&self) -> Vec<ferry_region::RegionJob> {
        self.jm
            .list()
            .into_iter()
            .map(|j| ferry_region::RegionJob {
                id: j.id,
                active: !j.state.is_terminal() || j.moved_to.is_some(),
                running: !j.state.is_terminal(),
                last_checkpoint: j.last_checkpoint.map(|c| ferry_core::api::CheckpointMark {
                    id: c.id,
                    records_in: c.records_in,
                    records_out: c.records_out,
                    watermark: c.watermark,
                }),
                name: j.name,
            })
            .collect()
    }

    fn confirm(&self, epoch: ferry_core::RegionEpoch, valid_for: std::time::Duration) {
        self.jm.confirm_region_lease(epoch, valid_for);
    }

    async fn start(&self, epoch: ferry_core::RegionEpoch) -> Result<usize, String> {
        self.jm.set_region_epoch(epoch);
        self.jm.promote().await.map_err(|e| e.to_string())
    }

    async fn stand_by(&self, primary: Option<&str>) {
        self.jm
            .demote(&self.region, primary.unwrap_or("(unknown)"))
            .await
    }

    async fn stop_with_savepoints(
        &self,
        target: &str,
    ) -> Vec<(
        ferry_core::JobId,
        Result<ferry_core::api::SavepointRef, String>,
    )> {
        self.jm
            .stop_all_with_savepoints(target)
            .await
            .into_iter()
            .map(|(job, r)| {
                (
                    job,
                    r.map(|sp| ferry_core::api::SavepointRef {
                        job_id: sp.job_id,
                        checkpoint_id: sp.checkpoint_id,
                        path: sp.path,
                    })
                    .map_err(|e| e.to_string()),
                )
            })
            .collect()
    }

    fn report(&self, event: ferry_region::RegionEvent<'_>) {
        let m = self.jm.metrics();
        match event {
            ferry_region::RegionEvent::Role { primary, epoch } => {
                m.region_is_primary.set(i64::from(primary));
                m.region_epoch.set(epoch.0 as i64);
            }
            ferry_region::RegionEvent::Failover => {
                m.failovers.inc();
            }
            ferry_region::RegionEvent::Health(views) => {
                for r in views {
                    m.set_region_health(
                        &r.region,
                        r.healthy,
                        r.heartbeat_age_ms.map(|ms| ms as f64 / 1e3),
                    );
                }
            }
            ferry_region::RegionEvent::Replication(standbys) => {
                for s in standbys {
                    m.set_replication_lag(
                        &s.region,
                        s.lag_seconds,
                        s.lag_checkpoints,
                        s.lag_records,
                    );
                }
            }
        }
    }
}

/// `/v1/regions/{name}/failover|failback` and `/v1/drills/outage`, served
/// by the region coordinator.
struct RegionCtl(Arc<ferry_region::Coordinator>);

fn failure(e: ferry_region::RegionError) -> ferry_jobmanager::service::RegionFailure {
    ferry_jobmanager::service::RegionFailure {
        kind: e.kind(),
        message: e.to_string(),
    }
}

impl ferry_jobmanager::service::RegionOps for RegionCtl {
    fn failover(
        &self,
        target: String,
        force: bool,
        dry_run: bool,
    ) -> ferry_jobmanager::service::RegionResult<ferry_core::api::SwitchoverReport> {
        let c = self.0.clone();
        Box::pin(async move { c.switchover(&target, force, dry_run).await.map_err(failure) })
    }

    fn failback(
        &self,
        target: String,
        dry_run: bool,
        wait: std::time::Duration,
    ) -> ferry_jobmanager::service::RegionResult<ferry_core::api::SwitchoverReport> {
        let c = self.0.clone();
        Box::pin(async move {
            c.failback(Some(&target), dry_run, wait)
                .await
                .map_err(failure)
        })
    }

    fn outage(
        &self,
        start: Option<(std::time::Duration, Option<String>)>,
    ) -> ferry_jobmanager::service::RegionResult<ferry_core::api::OutageReport> {
        let c = self.0.clone();
        Box::pin(async move { c.outage(start).await.map_err(failure) })
    }
}
