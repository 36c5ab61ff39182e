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
use ferry_jobmanager::ha::HaSettings;
use ferry_jobmanager::leadership::{HaContext, Leadership};
use ferry_jobmanager::{JobManager, JobManagerConfig};
use tokio_util::sync::CancellationToken;

use super::process::{
    ProcessArgs, connect_coordination, default_instance_id, run_process, stop_on_signal,
};

pub fn run(args: ProcessArgs) -> anyhow::Result<ExitCode> {
    run_process(args, "ferry-jm", run_async)
}

async fn run_async(cfg: ProcessConfig, ha_rt: tokio::runtime::Handle) -> anyhow::Result<ExitCode> {
    let signal = stop_on_signal();
    let instance_id = cfg
        .instance_id
        .clone()
        .unwrap_or_else(|| default_instance_id("jm"));
    let auth = std::sync::Arc::new(
        ferry_jobmanager::auth::ApiAuth::from_config(&cfg.api.auth)
            .map_err(|e| anyhow::anyhow!("{e}"))?,
    );
    auth.start(cfg.tls.reload_interval.get()).await;
    if !auth.enabled() {
        tracing::warn!(
            "api.auth is not set: anyone who reaches the REST API may submit and cancel jobs and fail regions over (see docs/security.md)"
        );
    }
    let grpc_tls = match &cfg.tls.grpc {
        Some(t) => Some(ferry_core::tls::Connector::new(
            ferry_core::tls::ClientTls::load(t.files(), &[b"h2"], cfg.tls.reload_interval.get())?,
            t.server_name.clone(),
        )),
        None => None,
    };
    let api_tls = match &cfg.tls.api {
        Some(t) => {
            let mut files = t.files();
            // Callers may bring a certificate of their own CA; another
            // JobManager (forwarding a write) one of the region's.
            let client_auth = match &cfg.api.auth.client_certificates {
                Some(c) => {
                    files.callers_ca = Some(c.ca_file.clone().into());
                    ferry_core::tls::ClientAuth::Optional
                }
                None => ferry_core::tls::ClientAuth::None,
            };
            Some(ferry_core::tls::ServerTls::load(
                files,
                client_auth,
                &[b"http/1.1"],
                cfg.tls.reload_interval.get(),
            )?)
        }
        None => None,
    };
    let forward_tls = match &cfg.tls.api {
        Some(t) => Some(ferry_core::tls::ClientTls::load(
            t.files(),
            &[b"http/1.1"],
            cfg.tls.reload_interval.get(),
        )?),
        None => None,
    };
    let listener = tokio::net::TcpListener::bind(&cfg.api.listen)
        .await
        .with_context(|| format!("cannot listen on api.listen {}", cfg.api.listen))?;
    let bound = listener.local_addr()?.to_string();
    let api_url = cfg.advertised_url(&bound);
    let h = &cfg.ha;
    // Checked by the config's validation already.
    let access = cfg.access_policy().map_err(anyhow::Error::msg)?;
    let Some(backend) = connect_coordination(&cfg, &ha_rt, &signal).await else {
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
            access,
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
                grpc_tls,
                cfg.scheduling.strategy,
            );
            jm.use_taskmanagers(pool.clone());
            // Drains and rebalancing, while this instance leads.
            tokio::spawn(ferry_jobmanager::scheduler::run(
                jm.clone(),
                pool.clone(),
                cfg.scheduling.clone(),
                pool_stop.clone(),
            ));
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
    let replication =
        ferry_jobmanager::start_region_side(&cfg, &jm, &api_url, &ha_rt, replication_stop.clone())
            .await?;
    let api_stop = CancellationToken::new();
    if let Some(tls) = forward_tls {
        jm.forward_with(tls)
            .map_err(|e| anyhow::anyhow!("tls.api: {e}"))?;
    }
    let api = tokio::spawn(ferry_jobmanager::api::serve_with_auth(
        jm.clone(),
        listener,
        auth,
        api_tls,
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
    signal.cancelled().await;
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
