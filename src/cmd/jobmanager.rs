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

use anyhow::Context;
use ferry_core::config::{Placement, ProcessConfig};
use ferry_ha::{ElectorConfig, MembershipConfig};
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
    api_stop.cancel();
    let _ = api.await;
    tracing::info!("stopped");
    Ok(ExitCode::SUCCESS)
}
