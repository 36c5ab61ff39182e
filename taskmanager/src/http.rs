//! The TaskManager's HTTP server: `/healthz` (the process answers),
//! `/readyz` (it is in its region), `/metrics` (Prometheus text, read
//! from the TaskManager's state on each scrape) and `/drain` (for the
//! pod's `preStop` hook: `POST` starts draining, `GET` tells how many
//! deployments are left).
//!
//! Invariants: a scrape only reads the TaskManager's state; it never waits
//! on a task. The port is plaintext and unauthenticated, so `/drain`
//! answers only callers on this host's loopback (a hook run inside the
//! pod); anyone else gets 403.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::server::TaskManager;

/// Serves [`router`] on `listener` until `stop` is cancelled.
pub async fn serve(
    listener: tokio::net::TcpListener,
    metrics: Arc<TmMetrics>,
    stop: tokio_util::sync::CancellationToken,
) {
    let _ = axum::serve(
        listener,
        router(metrics).into_make_service_with_connect_info::<std::net::SocketAddr>(),
    )
    .with_graceful_shutdown(async move { stop.cancelled().await })
    .await;
}

/// The HTTP app over `metrics`.
pub fn router(metrics: Arc<TmMetrics>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics_text))
        .route("/drain", get(drain_state).post(drain))
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
    /// Per task: share of the last second it waited to send downstream.
    backpressure: Family<TaskLabels, Gauge<f64, std::sync::atomic::AtomicU64>>,
    /// The exchange, per peer TaskManager and direction.
    exchange_bytes: Family<PeerLabels, Counter>,
    exchange_records: Family<PeerLabels, Counter>,
    exchange_batches: Family<PeerLabels, Counter>,
    exchange_channels: Family<PeerLabels, Gauge>,
    exchange_credit_wait: Family<PeerLabels, Counter<f64, std::sync::atomic::AtomicU64>>,
    exchange_inflight: Gauge,
}

/// Labels of a per-peer exchange metric.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PeerLabels {
    peer: String,
    /// `out`: this TaskManager sends; `in`: it receives.
    direction: String,
}

/// Raises `c` to `value` (the source counts on its own; a counter only
/// goes up).
fn raise_to(c: &Counter, value: u64) {
    let now = c.get();
    if value > now {
        c.inc_by(value - now);
    }
}

/// Labels of a per-task metric.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TaskLabels {
    job: String,
    stage: u32,
    subtask: u32,
}

impl TmMetrics {
    /// The metrics of `tm`, not ready yet.
    pub fn new(tm: &TaskManager) -> Self {
        let mut registry = Registry::with_prefix("ferry_tm");
        let mut gauges: Vec<(Gauge, Read)> = Vec::new();
        let defs: [(&str, &str, Read); 19] = [
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
                "state_cache_bytes",
                "Bytes the window caches of the state store hold (taskmanager.stateMemory; 0 without it)",
                |_| crate::state::process_store().map_or(0, |s| s.usage().0 as i64),
            ),
            (
                "state_cache_limit_bytes",
                "What the window caches of the state store may hold: half of taskmanager.stateMemory (0 without it)",
                |_| crate::state::process_store().map_or(0, |s| s.usage().1 as i64),
            ),
            (
                "state_cache_evictions",
                "Times a window operator wrote its cache back to the state store and emptied it because the caches were full",
                |_| crate::state::process_store().map_or(0, |s| s.usage().2 as i64),
            ),
            (
                "state_write_buffer_bytes",
                "Bytes in the state store's memtables, active and waiting to be flushed to disk",
                |_| crate::state::process_store().map_or(0, |s| s.write_buffer_bytes() as i64),
            ),
            (
                "state_disk_bytes",
                "Bytes the state store takes on disk (taskmanager.stateDir)",
                |_| crate::state::process_store().map_or(0, |s| s.usage().3 as i64),
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
        let backpressure = Family::default();
        registry.register(
            "task_backpressure_ratio",
            "Share of the last second a task waited to send downstream because the channel (in memory, or the exchange to another TaskManager) was full: 0 flows freely, 1 is fully backpressured",
            backpressure.clone(),
        );
        let (exchange_bytes, exchange_records, exchange_batches) =
            (Family::default(), Family::default(), Family::default());
        let (exchange_channels, exchange_credit_wait, exchange_inflight) =
            (Family::default(), Family::default(), Gauge::default());
        registry.register(
            "exchange_bytes",
            "Arrow IPC bytes of the batches exchanged with another TaskManager (jobs spread over TaskManagers)",
            exchange_bytes.clone(),
        );
        registry.register(
            "exchange_records",
            "Records exchanged with another TaskManager",
            exchange_records.clone(),
        );
        registry.register(
            "exchange_batches",
            "Batches exchanged with another TaskManager",
            exchange_batches.clone(),
        );
        registry.register(
            "exchange_channels",
            "Exchange channels open with another TaskManager",
            exchange_channels.clone(),
        );
        registry.register(
            "exchange_credit_wait_seconds",
            "Time channels to another TaskManager waited with every credit in use (the receiver is slower: backpressure over the network)",
            exchange_credit_wait.clone(),
        );
        registry.register(
            "exchange_inflight_batches",
            "Exchange frames sent to other TaskManagers and not yet taken by their tasks (buffers in use; at most credits per channel)",
            exchange_inflight.clone(),
        );
        Self {
            tm: tm.clone(),
            ready: Default::default(),
            heartbeat_failures: Default::default(),
            tls_handshake_failures: Default::default(),
            registry,
            gauges,
            backpressure,
            exchange_bytes,
            exchange_records,
            exchange_batches,
            exchange_channels,
            exchange_credit_wait,
            exchange_inflight,
        }
    }

    /// Where the membership heartbeat counts its failures.
    pub fn set_heartbeat_failures(&self, f: Arc<std::sync::atomic::AtomicU64>) {
        let _ = self.heartbeat_failures.set(f);
    }
}

/// `/drain` answers only loopback callers.
fn local_only(
    peer: &std::net::SocketAddr,
) -> Result<(), (StatusCode, axum::Json<serde_json::Value>)> {
    if peer.ip().is_loopback() {
        return Ok(());
    }
    Err((
        StatusCode::FORBIDDEN,
        axum::Json(serde_json::json!({
            "error": "forbidden",
            "message": format!("/drain answers only callers on this host's loopback (you are {}): drain a TaskManager from elsewhere through the JobManager (ferry taskmanager drain ID)", peer.ip()),
        })),
    ))
}

fn drain_body(m: &TmMetrics) -> axum::Json<serde_json::Value> {
    let (used, deployments, ..) = m.tm.usage();
    axum::Json(serde_json::json!({
        "taskmanager": m.tm.id(),
        "draining": m.tm.draining(),
        "deployments": deployments,
        "slots_used": used,
    }))
}

async fn drain_state(
    State(m): State<Arc<TmMetrics>>,
    axum::extract::ConnectInfo(peer): axum::extract::ConnectInfo<std::net::SocketAddr>,
) -> axum::response::Response {
    match local_only(&peer) {
        Ok(()) => drain_body(&m).into_response(),
        Err(e) => e.into_response(),
    }
}

async fn drain(
    State(m): State<Arc<TmMetrics>>,
    axum::extract::ConnectInfo(peer): axum::extract::ConnectInfo<std::net::SocketAddr>,
) -> axum::response::Response {
    if let Err(e) = local_only(&peer) {
        return e.into_response();
    }
    m.tm.set_draining(true);
    (StatusCode::ACCEPTED, drain_body(&m)).into_response()
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
    m.backpressure.clear();
    for (job, task, t) in m.tm.task_metrics() {
        let labels = TaskLabels {
            job,
            stage: task.stage,
            subtask: task.subtask,
        };
        let permille = t.backpressure_permille.load(Ordering::Relaxed);
        m.backpressure
            .get_or_create(&labels)
            .set(permille as f64 / 1000.0);
    }
    if let Some(exchange) = m.tm.exchange() {
        for p in exchange.stats() {
            let labels = PeerLabels {
                peer: p.peer.clone(),
                direction: p.direction.to_string(),
            };
            raise_to(&m.exchange_bytes.get_or_create(&labels), p.bytes);
            raise_to(&m.exchange_records.get_or_create(&labels), p.records);
            raise_to(&m.exchange_batches.get_or_create(&labels), p.batches);
            m.exchange_channels
                .get_or_create(&labels)
                .set(p.channels as i64);
            let wait = m.exchange_credit_wait.get_or_create(&labels);
            let secs = p.credit_wait_ns as f64 / 1e9;
            if secs > wait.get() {
                wait.inc_by(secs - wait.get());
            }
        }
        m.exchange_inflight.set(exchange.inflight() as i64);
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
