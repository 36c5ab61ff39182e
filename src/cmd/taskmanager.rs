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
use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use chrono::Utc;
use ferry_core::config::ProcessConfig;
use ferry_ha::{Member, Membership, MembershipConfig};
use ferry_taskmanager::server::TaskManager;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio_util::sync::CancellationToken;

use super::process::{
    ProcessArgs, connect_coordination, default_instance_id, run_process, shutdown_signal,
};

/// Role name of TaskManagers in membership records.
const ROLE: &str = ferry_jobmanager::taskmanagers::TASKMANAGER_ROLE;

pub fn run(args: ProcessArgs) -> anyhow::Result<ExitCode> {
    run_process(args, "ferry-tm", run_async)
}

async fn run_async(cfg: ProcessConfig, ha_rt: tokio::runtime::Handle) -> anyhow::Result<ExitCode> {
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
    let app = Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics_text))
        .with_state(metrics.clone());
    let stop = http_stop.clone();
    let http_task = tokio::spawn(async move {
        let _ = axum::serve(http, app)
            .with_graceful_shutdown(async move { stop.cancelled().await })
            .await;
    });

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

    let Some(backend) = connect_coordination(&cfg, &ha_rt).await else {
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

    shutdown_signal().await;
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

/// Reads one metric's value from the TaskManager's state.
type Read = fn(&TmMetrics) -> i64;

/// The TaskManager's Prometheus metrics, read from its state on scrape.
struct TmMetrics {
    tm: TaskManager,
    ready: std::sync::atomic::AtomicBool,
    heartbeat_failures: std::sync::OnceLock<Arc<std::sync::atomic::AtomicU64>>,
    registry: Registry,
    gauges: Vec<(Gauge, Read)>,
}

impl TmMetrics {
    fn new(tm: &TaskManager) -> Self {
        let mut registry = Registry::with_prefix("ferry_tm");
        let mut gauges: Vec<(Gauge, Read)> = Vec::new();
        let defs: [(&str, &str, Read); 12] = [
            ("slots", "Task slots of this TaskManager", |m| {
                m.tm.slots() as i64
            }),
            ("slots_used", "Task slots used by deployments", |m| {
                m.tm.usage().0 as i64
            }),
            ("deployments", "Job deployments on this TaskManager", |m| {
                m.tm.usage().1 as i64
            }),
            ("tasks_running", "Tasks running", |m| m.tm.usage().2 as i64),
            ("epoch", "Newest JobManager epoch seen", |m| {
                m.tm.usage().3 as i64
            }),
            (
                "attached",
                "1 while a leading JobManager is attached",
                |m| m.tm.usage().4 as i64,
            ),
            (
                "deployments_started",
                "Deployments started since the process started (adoptions by a new leader are not counted)",
                |m| m.tm.stats().deployments_started.load(Ordering::Relaxed) as i64,
            ),
            (
                "tasks_started",
                "Tasks started since the process started",
                |m| m.tm.stats().tasks_started.load(Ordering::Relaxed) as i64,
            ),
            (
                "stale_commands",
                "JobManager commands rejected for an older epoch, and commits of an older region epoch",
                |m| m.tm.stats().stale_commands.load(Ordering::Relaxed) as i64,
            ),
            (
                "fenced_stops",
                "Deployments stopped because the region fence ran out or a newer region epoch was confirmed",
                |m| m.tm.stats().fenced_stops.load(Ordering::Relaxed) as i64,
            ),
            (
                "fence_remaining_milliseconds",
                "How long the region fence still holds (-1: no region fence)",
                |m| {
                    m.tm.fence_remaining()
                        .map(|d| d.as_millis() as i64)
                        .unwrap_or(-1)
                },
            ),
            (
                "heartbeat_failures",
                "Membership heartbeats that failed",
                |m| {
                    m.heartbeat_failures
                        .get()
                        .map(|f| f.load(Ordering::Relaxed) as i64)
                        .unwrap_or(0)
                },
            ),
        ];
        for (name, help, read) in defs {
            let g = Gauge::default();
            registry.register(name, help, g.clone());
            gauges.push((g, read));
        }
        Self {
            tm: tm.clone(),
            ready: Default::default(),
            heartbeat_failures: Default::default(),
            registry,
            gauges,
        }
    }

    fn set_heartbeat_failures(&self, f: Arc<std::sync::atomic::AtomicU64>) {
        let _ = self.heartbeat_failures.set(f);
    }
}

async fn readyz(State(m): State<Arc<TmMetrics>>) -> impl IntoResponse {
    if m.ready.load(Ordering::Relaxed) {
        (StatusCode::OK, "ready")
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: joining or leaving the region",
        )
    }
}

async fn metrics_text(State(m): State<Arc<TmMetrics>>) -> impl IntoResponse {
    for (g, read) in &m.gauges {
        g.set(read(&m));
    }
    let mut body = String::new();
    if let Err(e) = encode(&mut body, &m.registry) {
        return (
            StatusCode::INTERNAL_SERVER_ERROR,
            [(header::CONTENT_TYPE, "text/plain")],
            format!("encoding metrics failed: {e}"),
        );
    }
    (
        StatusCode::OK,
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        body,
    )
}
