//! The TaskManager's HTTP server: `/healthz` (the process answers),
//! `/readyz` (it is in its region) and `/metrics` (Prometheus text, read
//! from the TaskManager's state on each scrape).
//!
//! Invariant: a scrape only reads the TaskManager's state; it never waits
//! on a task.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::server::TaskManager;

/// Serves [`router`] on `listener` until `stop` is cancelled.
pub async fn serve(
    listener: tokio::net::TcpListener,
    metrics: Arc<TmMetrics>,
    stop: tokio_util::sync::CancellationToken,
) {
    let _ = axum::serve(listener, router(metrics))
        .with_graceful_shutdown(async move { stop.cancelled().await })
        .await;
}

/// The HTTP app over `metrics`.
pub fn router(metrics: Arc<TmMetrics>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics_text))
        .with_state(metrics)
}

/// Reads one metric's value from the TaskManager's state.
type Read = fn(&TmMetrics) -> i64;

/// The TaskManager's Prometheus metrics, read from its state on scrape.
pub struct TmMetrics {
    tm: TaskManager,
    /// True while the TaskManager is in its region (`/readyz` answers 200).
    pub ready: std::sync::atomic::AtomicBool,
    heartbeat_failures: std::sync::OnceLock<Arc<std::sync::atomic::AtomicU64>>,
    /// gRPC connections refused in the TLS handshake.
    pub tls_handshake_failures: Arc<std::sync::atomic::AtomicU64>,
    registry: Registry,
    gauges: Vec<(Gauge, Read)>,
}

impl TmMetrics {
    /// The metrics of `tm`, not ready yet.
    pub fn new(tm: &TaskManager) -> Self {
        let mut registry = Registry::with_prefix("ferry_tm");
        let mut gauges: Vec<(Gauge, Read)> = Vec::new();
        let defs: [(&str, &str, Read); 14] = [
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
                "unconfirmed_epochs",
                "Commands refused because the region's leader lease did not show their epoch (not sent by a leader)",
                |m| m.tm.stats().unconfirmed_epochs.load(Ordering::Relaxed) as i64,
            ),
            (
                "tls_handshake_failures",
                "gRPC connections refused in the TLS handshake (plaintext, no certificate, another CA)",
                |m| m.tls_handshake_failures.load(Ordering::Relaxed) as i64,
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
            tls_handshake_failures: Default::default(),
            registry,
            gauges,
        }
    }

    /// Where the membership heartbeat counts its failures.
    pub fn set_heartbeat_failures(&self, f: Arc<std::sync::atomic::AtomicU64>) {
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
