//! `ferry taskmanager --config FILE`: one TaskManager of a region. It
//! offers task slots, heartbeats into the region's NATS KV (its record
//! carries its gRPC address and slots, which is how the leading JobManager
//! finds it), runs the job deployments the leader sends it over gRPC, and
//! keeps them running when the leader changes. `/healthz`, `/readyz` and
//! `/metrics` are served on `taskmanager.httpListen`. SIGTERM or Ctrl-C
//! stops its tasks and removes its membership record, so the leader moves
//! its jobs to other TaskManagers at once.

use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use anyhow::Context;
use chrono::Utc;
use ferry_core::config::ProcessConfig;
use ferry_ha::{Member, Membership, MembershipConfig};
use ferry_taskmanager::http::TmMetrics;
use ferry_taskmanager::server::TaskManager;
use tokio_util::sync::CancellationToken;

use super::process::{
    ProcessArgs, connect_coordination, default_instance_id, run_process, stop_on_signal,
};

/// Role name of TaskManagers in membership records.
const ROLE: &str = ferry_jobmanager::taskmanagers::TASKMANAGER_ROLE;

pub fn run(args: ProcessArgs) -> anyhow::Result<ExitCode> {
    run_process(args, "ferry-tm", run_async)
}

async fn run_async(cfg: ProcessConfig, ha_rt: tokio::runtime::Handle) -> anyhow::Result<ExitCode> {
    let signal = stop_on_signal();
    let t = &cfg.taskmanager;
    let id = cfg
        .instance_id
        .clone()
        .unwrap_or_else(|| default_instance_id("tm"));
    let grpc = tokio::net::TcpListener::bind(&t.listen)
        .await
        .with_context(|| format!("cannot listen on taskmanager.listen {}", t.listen))?;
    let grpc_bound = grpc.local_addr()?.to_string();
    let url = cfg.taskmanager_url(&grpc_bound);
    let http = tokio::net::TcpListener::bind(&t.http_listen)
        .await
        .with_context(|| format!("cannot listen on taskmanager.httpListen {}", t.http_listen))?;
    let http_bound = http.local_addr()?.to_string();
    let tm = TaskManager::new(id.clone(), t.slots);
    let fence_stop = CancellationToken::new();
    let fence = tokio::spawn(tm.clone().watch_fence(fence_stop.clone()));

    let http_stop = CancellationToken::new();
    let metrics = Arc::new(TmMetrics::new(&tm));
    let http_task = tokio::spawn(ferry_taskmanager::http::serve(
        http,
        metrics.clone(),
        http_stop.clone(),
    ));

    // Serve gRPC before joining the membership: once the leader sees the
    // record it dials at once.
    let grpc_stop = CancellationToken::new();
    let stop = grpc_stop.clone();
    let service = tm.service();
    let grpc_task = tokio::spawn(async move {
        tonic::transport::Server::builder()
            .tcp_nodelay(true)
            .add_service(service)
            .serve_with_incoming_shutdown(
                tokio_stream::wrappers::TcpListenerStream::new(grpc),
                async move { stop.cancelled().await },
            )
            .await
    });
    tracing::info!(taskmanager = %id, region = %cfg.region, slots = t.slots, grpc = %url, http = %http_bound, "taskmanager started; joining the region");

    let Some(backend) = connect_coordination(&cfg, &ha_rt, &signal).await else {
        return Ok(ExitCode::from(1));
    };
    let member = Member {
        id: id.clone(),
        role: ROLE.to_string(),
        region: cfg.region.clone(),
        address: url,
        slots: t.slots,
        started_at: Utc::now(),
    };
    let heartbeat_stop = CancellationToken::new();
    let (membership, heartbeat) = {
        let (backend, stop) = (backend.clone(), heartbeat_stop.clone());
        let mcfg = MembershipConfig {
            interval: cfg.ha.heartbeat_interval.get(),
            expiry: cfg.ha.member_expiry.get(),
        };
        // Spawned from the coordination runtime so the heartbeat lives there.
        ha_rt
            .spawn(async move { Membership::spawn(backend, mcfg, member, stop) })
            .await?
    };
    metrics.set_heartbeat_failures(membership.failures.clone());
    metrics.ready.store(true, Ordering::Relaxed);

    signal.cancelled().await;
    tracing::info!("stopping: leaving the region and stopping every task");
    metrics.ready.store(false, Ordering::Relaxed);
    heartbeat_stop.cancel();
    let _ = heartbeat.await;
    tm.shutdown().await;
    fence_stop.cancel();
    let _ = fence.await;
    grpc_stop.cancel();
    match grpc_task.await {
        Ok(Err(e)) => tracing::warn!("gRPC server ended with an error: {e}"),
        Err(e) => tracing::warn!("gRPC server task failed: {e}"),
        Ok(Ok(())) => {}
    }
    http_stop.cancel();
    let _ = http_task.await;
    tracing::info!("stopped");
    Ok(ExitCode::SUCCESS)
}
