//! The REST API (axum): the JobManager's operations over HTTP/JSON for the
//! `ferry job` CLI, tools and load balancers. See `docs/api.md`.
//!
//! Invariant: every response — success, error, unknown route, wrong method,
//! oversize body or a handler panic — carries `x-ferry-instance`, and every
//! error is the JSON shape of [`error::ErrorBody`]. [`ROUTES`] is the one
//! list of routes; the router, the 404 listing and the 405 `Allow` advice are
//! all derived from it or checked against it.

mod cluster;
mod drills;
pub mod error;
mod forward;
mod health;
mod jobs;

use std::panic::AssertUnwindSafe;
use std::time::Duration;

use axum::Router;
use axum::extract::{DefaultBodyLimit, Request};
use axum::http::{HeaderName, HeaderValue, Method, StatusCode, Uri};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use futures::FutureExt;
use tokio_util::sync::CancellationToken;

pub use error::{ApiError, ErrorBody, ErrorDetail, ErrorObject};
pub use health::PROMETHEUS_CONTENT_TYPE;
pub use jobs::{CancelResponse, CheckpointList, JobList};

use crate::service::JobManager;

/// Largest request body accepted (a job spec), in bytes.
pub const MAX_BODY_BYTES: usize = 4 * 1024 * 1024;

/// Header naming the JobManager instance that answered.
pub const INSTANCE_HEADER: &str = "x-ferry-instance";

/// Header with the role (`leader`, `standby`, `embedded`) of the instance
/// that received the request.
pub const ROLE_HEADER: &str = "x-ferry-role";

/// Header naming the standby that forwarded a write to the leader (on the
/// forwarded request, and on the response the client gets).
pub const FORWARDED_BY_HEADER: &str = "x-ferry-forwarded-by";

/// How long [`serve`] waits for in-flight requests after shutdown is asked.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// One route of the API.
#[derive(Clone, Copy, Debug)]
pub struct RouteInfo {
    pub method: &'static str,
    /// axum path syntax: `{id}` matches one path segment.
    pub path: &'static str,
    pub summary: &'static str,
}

/// Every route the API serves.
pub const ROUTES: &[RouteInfo] = &[
    RouteInfo {
        method: "POST",
        path: "/v1/jobs",
        summary: "submit a job (body: YAML or JSON spec)",
    },
    RouteInfo {
        method: "GET",
        path: "/v1/jobs",
        summary: "list jobs, newest first",
    },
    RouteInfo {
        method: "GET",
        path: "/v1/jobs/{id}",
        summary: "one job by id, id prefix or name",
    },
    RouteInfo {
        method: "DELETE",
        path: "/v1/jobs/{id}",
        summary: "cancel a job (?savepoint=true to take a savepoint first)",
    },
    RouteInfo {
        method: "POST",
        path: "/v1/jobs/{id}/savepoints",
        summary: "take a savepoint of a running job",
    },
    RouteInfo {
        method: "GET",
        path: "/v1/jobs/{id}/checkpoints",
        summary: "completed checkpoints and savepoints of a job",
    },
    RouteInfo {
        method: "GET",
        path: "/v1/cluster",
        summary: "the region's JobManagers and TaskManagers, the leader and its epoch",
    },
    RouteInfo {
        method: "GET",
        path: "/v1/regions",
        summary: "replication to the standby regions: lag and per-job progress",
    },
    RouteInfo {
        method: "GET",
        path: "/health/regions",
        summary: "every region's health from the global KV (503 while it is unreachable)",
    },
    RouteInfo {
        method: "POST",
        path: "/v1/regions/{name}/failover",
        summary: "make a region the primary (?force=true when the primary is unreachable, ?dry_run=true for the plan)",
    },
    RouteInfo {
        method: "POST",
        path: "/v1/regions/{name}/failback",
        summary: "move the jobs home to a region that is a standby again after a failover, with the divergence report (?dry_run=true for the plan)",
    },
    RouteInfo {
        method: "GET",
        path: "/v1/drills",
        summary: "failover drill reports recorded in this region, newest first",
    },
    RouteInfo {
        method: "POST",
        path: "/v1/drills",
        summary: "record a failover drill report (ferry drill run does this)",
    },
    RouteInfo {
        method: "GET",
        path: "/v1/drills/{id}",
        summary: "one failover drill report",
    },
    RouteInfo {
        method: "POST",
        path: "/v1/drills/outage",
        summary: "simulate this region's outage for a drill (?duration=60s): stop every job without a savepoint and stop the region heartbeat",
    },
    RouteInfo {
        method: "DELETE",
        path: "/v1/drills/outage",
        summary: "end a simulated outage",
    },
    RouteInfo {
        method: "GET",
        path: "/health/ha",
        summary: "this instance's role, the leader, epoch, healthy/total members, heartbeat ages",
    },
    RouteInfo {
        method: "GET",
        path: "/healthz",
        summary: "liveness",
    },
    RouteInfo {
        method: "GET",
        path: "/readyz",
        summary: "readiness (503 while not accepting jobs)",
    },
    RouteInfo {
        method: "GET",
        path: "/metrics",
        summary: "Prometheus metrics",
    },
];

/// The API's router over a JobManager.
pub fn router(jm: JobManager) -> Router {
    let instance = instance_header_value(jm.instance_id());
    let routes = Router::new()
        .route("/v1/jobs", post(jobs::submit).get(jobs::list))
        .route("/v1/jobs/{id}", get(jobs::get).delete(jobs::cancel))
        .route("/v1/jobs/{id}/savepoints", post(jobs::savepoint))
        .route("/v1/jobs/{id}/checkpoints", get(jobs::checkpoints))
        .route("/v1/cluster", get(cluster::cluster))
        .route("/v1/regions", get(cluster::regions))
        .route("/health/regions", get(cluster::health_regions))
        .route("/v1/regions/{name}/failover", post(cluster::failover))
        .route("/v1/regions/{name}/failback", post(cluster::failback))
        .route("/v1/drills", get(drills::list).post(drills::record))
        .route(
            "/v1/drills/outage",
            post(drills::start_outage).delete(drills::end_outage),
        )
        .route("/v1/drills/{id}", get(drills::get))
        .route("/health/ha", get(cluster::health_ha))
        .route("/healthz", get(health::healthz))
        .route("/readyz", get(health::readyz))
        .route("/metrics", get(health::metrics))
        .layer(middleware::from_fn_with_state(
            jm.clone(),
            forward::forward_writes,
        ))
        .with_state(jm);
    with_boundary(routes, instance)
}

/// What every route shares: JSON 404/405, the body limit, panics caught as
/// 500, and the instance header on every response.
fn with_boundary(routes: Router, instance: HeaderValue) -> Router {
    routes
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(middleware::from_fn(catch_panic))
        .layer(middleware::map_response(move |mut res: Response| {
            let instance = instance.clone();
            async move {
                // A forwarded write keeps the leader's name: it answered.
                res.headers_mut()
                    .entry(HeaderName::from_static(INSTANCE_HEADER))
                    .or_insert(instance);
                res
            }
        }))
}

/// Serves the API on `listener` until `shutdown` is cancelled, then lets
/// in-flight requests finish for up to [`SHUTDOWN_GRACE`].
pub async fn serve(
    jm: JobManager,
    listener: tokio::net::TcpListener,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let addr = listener.local_addr()?;
    tracing::info!(%addr, instance = jm.instance_id(), "REST API listening");
    let server = axum::serve(listener, router(jm))
        .with_graceful_shutdown(shutdown.clone().cancelled_owned());
    tokio::select! {
        res = server => res,
        () = async {
            shutdown.cancelled().await;
            tokio::time::sleep(SHUTDOWN_GRACE).await;
        } => {
            tracing::warn!(%addr, "REST API: requests still in flight after {SHUTDOWN_GRACE:?}; stopped waiting");
            Ok(())
        }
    }
}

/// The instance id as a header value; characters a header cannot carry
/// become `_` so a strange id never breaks every response.
fn instance_header_value(id: &str) -> HeaderValue {
    HeaderValue::from_str(id).unwrap_or_else(|_| {
        let clean: String = id
            .chars()
            .map(|c| {
                if c.is_ascii_graphic() || c == ' ' {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        HeaderValue::from_str(&clean).unwrap_or_else(|_| HeaderValue::from_static("unknown"))
    })
}

/// Turns a panic in a handler into a 500 JSON answer instead of a dropped
/// connection.
async fn catch_panic(req: Request, next: Next) -> Response {
    let what = format!("{} {}", req.method(), req.uri().path());
    match AssertUnwindSafe(next.run(req)).catch_unwind().await {
        Ok(res) => res,
        Err(panic) => {
            let msg = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "non-string panic payload".into());
            tracing::error!(request = %what, "handler panicked: {msg}");
            ApiError::internal(&what).into_response()
        }
    }
}

/// True when `path` matches the route pattern (`{x}` = one non-empty segment).
fn route_matches(pattern: &str, path: &str) -> bool {
    let pat: Vec<&str> = pattern.trim_matches('/').split('/').collect();
    let got: Vec<&str> = path.trim_matches('/').split('/').collect();
    pat.len() == got.len()
        && pat
            .iter()
            .zip(&got)
            .all(|(p, g)| (p.starts_with('{') && !g.is_empty()) || p == g)
}

fn route_details<'a>(routes: impl Iterator<Item = &'a RouteInfo>) -> Vec<ErrorDetail> {
    routes
        .map(|r| ErrorDetail::message(format!("{} {}: {}", r.method, r.path, r.summary)))
        .collect()
}

/// 404 for a path no route serves, listing the routes that exist.
async fn not_found(method: Method, uri: Uri) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "not_found",
        format!(
            "no route for {method} {}; the available routes are listed in details",
            uri.path()
        ),
    )
    .with_details(route_details(ROUTES.iter()))
}

/// 405 for a known path with a method it does not serve (axum adds `Allow`).
async fn method_not_allowed(method: Method, uri: Uri) -> ApiError {
    let path = uri.path();
    let here: Vec<&RouteInfo> = ROUTES
        .iter()
        .filter(|r| route_matches(r.path, path))
        .collect();
    let allowed: Vec<&str> = here.iter().map(|r| r.method).collect();
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        format!(
            "{method} is not allowed on {path}; use {}",
            if allowed.is_empty() {
                "one of the routes in details".to_string()
            } else {
                allowed.join(" or ")
            }
        ),
    )
    .with_details(route_details(here.into_iter()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn route_patterns_match_one_segment_per_parameter() {
        assert!(route_matches("/v1/jobs/{id}", "/v1/jobs/abc"));
        assert!(!route_matches("/v1/jobs/{id}", "/v1/jobs/"));
        assert!(!route_matches("/v1/jobs/{id}", "/v1/jobs/a/b"));
        assert!(route_matches("/v1/jobs", "/v1/jobs"));
        assert!(route_matches(
            "/v1/jobs/{id}/savepoints",
            "/v1/jobs/x/savepoints"
        ));
    }

    #[tokio::test]
    async fn a_panicking_handler_answers_500_json() {
        let routes = Router::new().route(
            "/boom",
            get(|| async {
                if true {
                    panic!("boom");
                }
                "unreachable"
            }),
        );
        let app = with_boundary(routes, HeaderValue::from_static("jm-test"));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move { axum::serve(listener, app).await });
        let http = reqwest::Client::builder().no_proxy().build().unwrap();
        let res = http
            .get(format!("http://{addr}/boom"))
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), StatusCode::INTERNAL_SERVER_ERROR);
        assert_eq!(res.headers()[INSTANCE_HEADER], "jm-test");
        let body: ErrorBody = res.json().await.unwrap();
        assert_eq!(body.error.code, "internal_error");
        assert!(body.error.message.contains("GET /boom"), "{body:?}");
        server.abort();
    }

    #[test]
    fn odd_instance_ids_still_make_a_header() {
        assert_eq!(instance_header_value("jm-1"), "jm-1");
        assert_eq!(instance_header_value("jm\n1"), "jm_1");
        assert_eq!(instance_header_value("jm\u{7f}x"), "jm_x");
        // UTF-8 bytes are legal (obs-text) and kept.
        assert_eq!(instance_header_value("jmé").as_bytes(), "jmé".as_bytes());
    }
}
