//! The object-store fault proxy of `ferry chaos`: an HTTP proxy in front of
//! the S3 server (moto) that answers as a failing S3 would — `503
//! SlowDown` to every request, `403 AccessDenied` to writes only, or every
//! answer late. Timeouts and connection resets are a TCP matter: the
//! [`ferry_testkit::FaultProxy`] links in front of this proxy make those.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderName, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use tokio_util::sync::CancellationToken;

/// How the store answers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StoreMode {
    /// Every request forwarded.
    Pass,
    /// `503 SlowDown` to every request (throttling, an outage).
    Unavailable,
    /// `403 AccessDenied` to writes (PUT, POST, DELETE); reads forwarded.
    RefuseWrites,
    /// Every request forwarded after this delay.
    Slow(Duration),
}

/// Largest request or response body the proxy buffers.
const MAX_BODY: usize = 512 << 20;

#[derive(Clone)]
struct Shared {
    mode: Arc<Mutex<StoreMode>>,
    target: String,
    http: reqwest::Client,
}

/// A running proxy; stops when dropped.
pub struct StoreProxy {
    pub port: u16,
    mode: Arc<Mutex<StoreMode>>,
    stop: CancellationToken,
}

impl StoreProxy {
    /// Starts a proxy on a free loopback port forwarding to the HTTP server
    /// at `target_port`.
    pub async fn start(target_port: u16) -> anyhow::Result<Self> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let port = listener.local_addr()?.port();
        let mode = Arc::new(Mutex::new(StoreMode::Pass));
        let shared = Shared {
            mode: mode.clone(),
            target: format!("http://127.0.0.1:{target_port}"),
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(60))
                .build()?,
        };
        let app = axum::Router::new().fallback(forward).with_state(shared);
        let stop = CancellationToken::new();
        let s = stop.clone();
        tokio::spawn(async move {
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(async move { s.cancelled().await })
                .await;
        });
        Ok(Self { port, mode, stop })
    }

    /// Answers as `mode` from now on.
    pub fn set(&self, mode: StoreMode) {
        *self.mode.lock().unwrap_or_else(|p| p.into_inner()) = mode;
    }
}

impl Drop for StoreProxy {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// An S3 error document.
fn s3_error(status: StatusCode, code: &str, message: &str) -> Response {
    let body = format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error><Code>{code}</Code><Message>{message}</Message></Error>"
    );
    (status, [("content-type", "application/xml")], body).into_response()
}

/// Hop-by-hop headers, not forwarded.
fn hop_by_hop(name: &HeaderName) -> bool {
    matches!(
        name.as_str(),
        "connection" | "keep-alive" | "transfer-encoding" | "content-length" | "upgrade"
    )
}

async fn forward(State(s): State<Shared>, req: Request) -> Response {
    let mode = *s.mode.lock().unwrap_or_else(|p| p.into_inner());
    let write = matches!(*req.method(), Method::PUT | Method::POST | Method::DELETE);
    match mode {
        StoreMode::Unavailable => {
            return s3_error(
                StatusCode::SERVICE_UNAVAILABLE,
                "SlowDown",
                "Please reduce your request rate (injected by ferry chaos).",
            );
        }
        StoreMode::RefuseWrites if write => {
            return s3_error(
                StatusCode::FORBIDDEN,
                "AccessDenied",
                "Access Denied (writes refused by ferry chaos).",
            );
        }
        StoreMode::Slow(d) => tokio::time::sleep(d).await,
        StoreMode::Pass | StoreMode::RefuseWrites => {}
    }
    let (parts, body) = req.into_parts();
    let path = parts
        .uri
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or("/");
    let Ok(bytes) = axum::body::to_bytes(body, MAX_BODY).await else {
        return s3_error(StatusCode::BAD_REQUEST, "IncompleteBody", "unreadable body");
    };
    let mut out = s
        .http
        .request(parts.method.clone(), format!("{}{path}", s.target))
        .body(bytes);
    for (name, value) in &parts.headers {
        if !hop_by_hop(name) {
            out = out.header(name, value);
        }
    }
    let resp = match out.send().await {
        Ok(r) => r,
        Err(e) => {
            return s3_error(
                StatusCode::BAD_GATEWAY,
                "ProxyError",
                &format!("the S3 server did not answer: {e}"),
            );
        }
    };
    let status = resp.status();
    let headers = resp.headers().clone();
    let body = resp.bytes().await.unwrap_or_default();
    let mut answer = Response::new(Body::from(body));
    *answer.status_mut() = status;
    for (name, value) in &headers {
        if !hop_by_hop(name) {
            answer.headers_mut().append(name, value.clone());
        }
    }
    answer
}
