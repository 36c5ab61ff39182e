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
use ferry_core::tls::{ClientAuth, ServerTls};
use ferry_ha::{Member, Membership, MembershipConfig};
use ferry_taskmanager::http::TmMetrics;
use ferry_taskmanager::server::TaskManager;
use tokio_util::sync::CancellationToken;

use super::process::{
    ProcessArgs, connect_coordination, default_instance_id, run_process, stop_on_signal,
};

/// The key of the region's leader lease (the JobManagers' elector).
const LEADER_KEY: &str = ferry_jobmanager::ha::LEADER_KEY;

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
    // Certificates first: a missing or broken file stops the process at
    // once, naming the file.
    let grpc_tls = match &cfg.tls.grpc {
        Some(tls) => Some(ServerTls::load(
            tls.files(),
            match &tls.client_name {
                Some(name) => ClientAuth::RequiredNamed(name.clone()),
                None => ClientAuth::Required,
            },
            &[b"h2"],
            cfg.tls.reload_interval.get(),
        )?),
        None => None,
    };
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

    let Some(backend) = connect_coordination(&cfg, &ha_rt, &signal).await else {
        return Ok(ExitCode::from(1));
    };
    // A newer JobManager epoch is believed only once the region's leader
    // lease shows it (read on the coordination runtime, where the NATS
    // client lives).
    {
        let (backend, rt) = (backend.clone(), ha_rt.clone());
        tm.confirm_epochs_with(Arc::new(move || {
            let (backend, rt) = (backend.clone(), rt.clone());
            Box::pin(async move {
                rt.spawn(async move { ferry_ha::read_leader(&*backend, LEADER_KEY).await })
                    .await
                    .map_err(|e| format!("the lease read stopped: {e}"))?
                    .map(|l| l.map(|l| l.epoch))
                    .map_err(|e| e.to_string())
            })
        }));
    }

    // Serve gRPC before joining the membership: once the leader sees the
    // record it dials at once.
    let grpc_stop = CancellationToken::new();
    let stop = grpc_stop.clone();
    let service = tm.service();
    let mut server = tonic::transport::Server::builder().tcp_nodelay(true);
    let grpc_task = match grpc_tls {
        Some(tls) => {
            let failures = metrics.tls_handshake_failures.clone();
            let incoming = ferry_core::tls::incoming(
                grpc,
                tls,
                Arc::new(move || {
                    failures.fetch_add(1, Ordering::Relaxed);
                }),
            );
            tokio::spawn(async move {
                server
                    .add_service(service)
                    .serve_with_incoming_shutdown(incoming, async move { stop.cancelled().await })
                    .await
            })
        }
        None => tokio::spawn(async move {
            server
                .add_service(service)
                .serve_with_incoming_shutdown(
                    tokio_stream::wrappers::TcpListenerStream::new(grpc),
                    async move { stop.cancelled().await },
                )
                .await
        }),
    };
    tracing::info!(taskmanager = %id, region = %cfg.region, slots = t.slots, grpc = %url, tls = cfg.tls.grpc.is_some(), http = %http_bound, "taskmanager started; joining the region");

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
