//! The REST API (axum): the JobManager's operations over HTTP/JSON for the
//! `ferry job` CLI, tools and load balancers. See `docs/api.md`.
//!
//! Invariant: every response — success, error, unknown route, wrong method,
//! oversize body or a handler panic — carries `x-ferry-instance`, and every
//! error is the JSON shape of [`error::ErrorBody`]. The handlers'
//! `#[utoipa::path]` annotations are the one list of routes: the router, the
//! OpenAPI document at `/openapi.json`, the 404 listing and the 405 advice
//! are all built from them ([`api_routes`]).

mod audit;
mod auth;
mod cluster;
mod drills;
pub mod error;
mod forward;
mod health;
mod jobs;

use std::panic::AssertUnwindSafe;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use axum::extract::{DefaultBodyLimit, Request};
use axum::http::{HeaderName, HeaderValue, Method, StatusCode, Uri};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
#[cfg(test)]
use axum::routing::get;
use axum::{Json, Router};
use futures::FutureExt;
use tokio_util::sync::CancellationToken;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

pub use error::{ApiError, ErrorBody, ErrorDetail, ErrorObject};
pub use forward::ForwardTls;
pub use health::PROMETHEUS_CONTENT_TYPE;
pub use jobs::{CancelResponse, CheckpointList, JobList};

use crate::auth::ApiAuth;
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

/// Header with the caller a standby verified by its client certificate,
/// on a write it forwards to the leader over its own JobManager
/// certificate; taken from nothing else (see [`crate::auth`]).
pub const FORWARDED_IDENTITY_HEADER: &str = "x-ferry-forwarded-identity";

/// How long [`serve`] waits for in-flight requests after shutdown is asked.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// One route of the API, as the OpenAPI document describes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RouteInfo {
    /// `GET`, `POST`, `DELETE`.
    pub method: String,
    /// axum path syntax: `{id}` matches one path segment.
    pub path: String,
    pub summary: String,
}

/// Metadata of the OpenAPI document; its paths come from the handlers'
/// `#[utoipa::path]` annotations through [`api_routes`].
#[derive(utoipa::OpenApi)]
#[openapi(
    info(
        title = "Ferry REST API",
        description = "The JobManager's REST API: jobs, checkpoints, the region's HA state, cross-region replication and failover, probes and metrics. Every error is the ErrorBody shape. See docs/api.md."
    ),
    tags(
        (name = "jobs", description = "submit, inspect, cancel and savepoint jobs"),
        (name = "cluster", description = "the region's JobManagers: leader, epoch, members"),
        (name = "regions", description = "cross-region health, replication, failover and fail-back"),
        (name = "drills", description = "failover drills: simulated outages and their reports"),
        (name = "health", description = "probes, metrics and this document"),
    )
)]
struct ApiDoc;

/// Every route the API serves, each registered together with its OpenAPI
/// operation (`routes!` reads method and path from the handler's
/// `#[utoipa::path]`), so the router and the document cannot differ.
fn api_routes() -> OpenApiRouter<JobManager> {
    use utoipa::OpenApi as _;
    OpenApiRouter::with_openapi(ApiDoc::openapi())
        .routes(routes!(jobs::submit, jobs::list))
        .routes(routes!(jobs::get, jobs::cancel))
        .routes(routes!(jobs::savepoint))
        .routes(routes!(jobs::checkpoints))
        .routes(routes!(cluster::cluster))
        .routes(routes!(cluster::rebalance))
        .routes(routes!(cluster::drain, cluster::undrain))
        .routes(routes!(audit::list))
        .routes(routes!(cluster::regions))
        .routes(routes!(cluster::health_regions))
        .routes(routes!(cluster::failover))
        .routes(routes!(cluster::failback))
        .routes(routes!(drills::list, drills::record))
        .routes(routes!(drills::start_outage, drills::end_outage))
        .routes(routes!(drills::get))
        .routes(routes!(cluster::health_ha))
        .routes(routes!(health::healthz))
        .routes(routes!(health::readyz))
        .routes(routes!(health::metrics))
        .routes(routes!(openapi_json))
}

/// The OpenAPI 3.1 document of the API.
pub fn openapi() -> &'static utoipa::openapi::OpenApi {
    static DOC: OnceLock<utoipa::openapi::OpenApi> = OnceLock::new();
    DOC.get_or_init(|| api_routes().split_for_parts().1)
}

/// Every route the API serves, read from [`openapi`]: by path, then
/// method.
pub fn routes() -> &'static [RouteInfo] {
    static ROUTES: OnceLock<Vec<RouteInfo>> = OnceLock::new();
    ROUTES.get_or_init(|| {
        let mut out = Vec::new();
        for (path, item) in &openapi().paths.paths {
            let ops = [
                ("GET", &item.get),
                ("POST", &item.post),
                ("PUT", &item.put),
                ("PATCH", &item.patch),
                ("DELETE", &item.delete),
            ];
            for (method, op) in ops {
                if let Some(op) = op {
                    out.push(RouteInfo {
                        method: method.to_string(),
                        path: path.clone(),
                        summary: op.summary.clone().unwrap_or_default(),
                    });
                }
            }
        }
        out
    })
}

/// The route table of `docs/api.md`, rendered from [`openapi`]: one row
/// per operation, grouped by tag, with the status codes it answers.
/// `ferry openapi --markdown` prints it.
pub fn openapi_markdown() -> String {
    let doc = openapi();
    let tags: Vec<String> = doc.tags.iter().flatten().map(|t| t.name.clone()).collect();
    let mut rows = Vec::new();
    for (path, item) in &doc.paths.paths {
        let ops = [
            ("GET", &item.get),
            ("POST", &item.post),
            ("PUT", &item.put),
            ("PATCH", &item.patch),
            ("DELETE", &item.delete),
        ];
        for (i, (method, op)) in ops.into_iter().enumerate() {
            let Some(op) = op else { continue };
            let tag = op
                .tags
                .iter()
                .flatten()
                .find_map(|t| tags.iter().position(|x| x == t))
                .unwrap_or(tags.len());
            let codes: Vec<String> = op
                .responses
                .responses
                .keys()
                .map(|c| format!("`{c}`"))
                .collect();
            let row = format!(
                "| `{method}` | `{path}` | {} | {} |",
                op.summary.as_deref().unwrap_or("").replace('|', "\\|"),
                codes.join(", ")
            );
            rows.push(((tag, path.clone(), i), row));
        }
    }
    rows.sort();
    let mut out = String::from("| Method | Path | Does | Answers |\n|---|---|---|---|\n");
    for (_, row) in rows {
        out.push_str(&row);
        out.push('\n');
    }
    out
}

/// `GET /openapi.json`: this API's OpenAPI document.
#[utoipa::path(
    get,
    path = "/openapi.json",
    tag = "health",
    summary = "the OpenAPI document of this API",
    responses((status = 200, description = "OpenAPI 3.1", body = Object))
)]
async fn openapi_json() -> impl IntoResponse {
    Json(openapi().clone())
}

/// The API's router over a JobManager, open to every caller.
pub fn router(jm: JobManager) -> Router {
    router_with_auth(jm, Arc::new(ApiAuth::open()))
}

/// The API's router over a JobManager; callers authenticate as `auth`
/// says before anything else (a standby forwarding a write included).
pub fn router_with_auth(jm: JobManager, auth: Arc<ApiAuth>) -> Router {
    let instance = instance_header_value(jm.instance_id());
    let (routes, _) = api_routes().split_for_parts();
    // Outermost first: the gate, then forwarding, then the audit record
    // (so only the instance that carries a call out records it).
    let gate = auth::Gate {
        auth,
        jm: jm.clone(),
    };
    let routes = routes
        .layer(middleware::from_fn_with_state(jm.clone(), audit::record))
        .layer(middleware::from_fn_with_state(
            jm.clone(),
            forward::forward_writes,
        ))
        .layer(middleware::from_fn_with_state(gate, auth::gate))
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

/// Serves the API, open to every caller, on `listener` until `shutdown`
/// is cancelled, then lets in-flight requests finish for up to
/// [`SHUTDOWN_GRACE`].
pub async fn serve(
    jm: JobManager,
    listener: tokio::net::TcpListener,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    serve_with_auth(jm, listener, Arc::new(ApiAuth::open()), None, shutdown).await
}

/// What a plaintext HTTP request to the HTTPS port is answered.
const HTTPS_REQUIRED: &[u8] = b"HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\nconnection: close\r\ncontent-length: 138\r\n\r\n{\"error\":{\"code\":\"https_required\",\"message\":\"this JobManager's REST API speaks HTTPS: use https:// (and --ca-cert with the region's CA)\"}}";

/// The REST API's connections over TLS ([`ferry_core::tls::accept`]).
struct TlsListener {
    rx: tokio::sync::mpsc::Receiver<(ferry_core::tls::ServerStream, std::net::SocketAddr)>,
    local: std::net::SocketAddr,
    tls: ferry_core::tls::ServerTls,
}

/// Who is at the other end of a connection to the API: its address and
/// the client certificate it presented, read once per connection.
#[derive(Clone, Debug)]
pub struct Peer {
    pub addr: std::net::SocketAddr,
    pub cert: Option<Arc<crate::auth::PeerCert>>,
}

impl axum::extract::connect_info::Connected<axum::serve::IncomingStream<'_, TlsListener>> for Peer {
    fn connect_info(stream: axum::serve::IncomingStream<'_, TlsListener>) -> Self {
        stream.remote_addr().clone()
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = ferry_core::tls::ServerStream;
    type Addr = Peer;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        let Some((io, addr)) = self.rx.recv().await else {
            // The accept loop ended (never while this listener lives).
            return std::future::pending().await;
        };
        let cert = io.get_ref().1.peer_certificates().and_then(|chain| {
            let leaf = chain.first()?;
            Some(Arc::new(crate::auth::PeerCert {
                names: ferry_core::tls::certificate_names(leaf),
                from_region_jobmanager: self.tls.from_link_ca(chain),
            }))
        });
        (io, Peer { addr, cert })
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(Peer {
            addr: self.local,
            cert: None,
        })
    }
}

/// [`serve`] with callers authenticated as `auth` says.
pub async fn serve_with_auth(
    jm: JobManager,
    listener: tokio::net::TcpListener,
    auth: Arc<ApiAuth>,
    tls: Option<ferry_core::tls::ServerTls>,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let addr = listener.local_addr()?;
    tracing::info!(%addr, instance = jm.instance_id(), auth = auth.enabled(), tls = tls.is_some(), "REST API listening");
    let router = router_with_auth(jm.clone(), auth);
    let stop = shutdown.clone().cancelled_owned();
    let server = async move {
        match tls {
            None => {
                axum::serve(listener, router)
                    .with_graceful_shutdown(stop)
                    .await
            }
            Some(tls) => {
                let rx = ferry_core::tls::accept(
                    listener,
                    tls.clone(),
                    {
                        let c = jm.inner.metrics.api_tls_refused.clone();
                        Arc::new(move || {
                            c.inc();
                        })
                    },
                    Some(HTTPS_REQUIRED),
                );
                axum::serve(
                    TlsListener {
                        rx,
                        local: addr,
                        tls,
                    },
                    router.into_make_service_with_connect_info::<Peer>(),
                )
                .with_graceful_shutdown(stop)
                .await
            }
        }
    };
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
            let msg = ferry_core::error::panic_message(panic.as_ref());
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
    .with_details(route_details(routes().iter()))
}

/// 405 for a known path with a method it does not serve (axum adds `Allow`).
async fn method_not_allowed(method: Method, uri: Uri) -> ApiError {
    let path = uri.path();
    let here: Vec<&RouteInfo> = routes()
        .iter()
        .filter(|r| route_matches(&r.path, path))
        .collect();
    let allowed: Vec<&str> = here.iter().map(|r| r.method.as_str()).collect();
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
    fn the_https_required_answer_is_a_whole_json_response() {
        let text = std::str::from_utf8(HTTPS_REQUIRED).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        let len: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length: "))
            .unwrap()
            .parse()
            .unwrap();
        assert_eq!(len, body.len());
        let v: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(v["error"]["code"], "https_required");
    }

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
