//! Standbys forward writes: a `POST`/`PUT`/`DELETE` that reaches a standby
//! JobManager is sent on to the leader (whose URL it publishes with its
//! lease) and the leader's answer is returned, marked with
//! `x-ferry-forwarded-by`, with the caller's `Authorization` header (the
//! leader checks it again). A caller known by its client certificate is
//! named in `x-ferry-forwarded-identity` instead, on a connection where the
//! standby presents its own JobManager certificate, which is what lets the
//! leader believe the name. Reads are answered locally from the job store.
//! Every response carries `x-ferry-role`.
//!
//! Invariant: a request is forwarded at most once (a request that already
//! carries `x-ferry-forwarded-by` is answered here, with 503 `not_leader`
//! if this instance does not lead), so two standbys with stale views of the
//! leader cannot bounce a request between them.

use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderName, HeaderValue, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::error::ApiError;
use super::{FORWARDED_BY_HEADER, FORWARDED_IDENTITY_HEADER, MAX_BODY_BYTES, ROLE_HEADER};
use crate::auth::{Caller, Method as AuthMethod};
use crate::leadership::RoleName;
use crate::service::JobManager;

/// How long a forwarded write may take (a cancel with savepoint waits for
/// the savepoint).
const FORWARD_TIMEOUT: Duration = Duration::from_secs(120);

fn builder() -> reqwest::ClientBuilder {
    reqwest::Client::builder()
        .no_proxy()
        .connect_timeout(Duration::from_secs(2))
        .timeout(FORWARD_TIMEOUT)
}

/// The TLS a standby forwards with: the region's CA to check the leader,
/// this JobManager's certificate to show it is one. The client is built
/// again when the files change (cert-manager rotated them).
pub struct ForwardTls {
    tls: ferry_core::tls::ClientTls,
    client: Mutex<Option<(Arc<rustls::ClientConfig>, reqwest::Client)>>,
}

impl ForwardTls {
    /// The client for the material in use now.
    fn client(&self) -> Result<reqwest::Client, String> {
        let config = self.tls.config();
        let mut cached = self.client.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((c, client)) = cached.as_ref()
            && Arc::ptr_eq(c, &config)
        {
            return Ok(client.clone());
        }
        let client = builder()
            .tls_backend_preconfigured((*config).clone())
            .https_only(true)
            .build()
            .map_err(|e| format!("cannot set up the forwarding client: {e}"))?;
        *cached = Some((config, client.clone()));
        Ok(client)
    }
}

/// The client forwarding goes through: over HTTPS when the API speaks it,
/// else a plain one.
fn client(jm: &JobManager) -> Result<reqwest::Client, String> {
    static PLAIN: OnceLock<reqwest::Client> = OnceLock::new();
    match jm.inner.forward_tls.get() {
        Some(t) => t.client(),
        None => Ok(PLAIN
            .get_or_init(|| builder().build().expect("reqwest client"))
            .clone()),
    }
}

impl JobManager {
    /// Forwarded writes go over HTTPS to leaders whose certificate `tls`'s
    /// CA signed, and to no other, presenting `tls`'s certificate.
    pub fn forward_with(&self, tls: ferry_core::tls::ClientTls) -> Result<(), String> {
        let f = ForwardTls {
            tls,
            client: Mutex::new(None),
        };
        f.client()?;
        self.inner
            .forward_tls
            .set(f)
            .map_err(|_| "the forwarding client is already set".to_string())
    }
}

pub(super) async fn forward_writes(
    State(jm): State<JobManager>,
    req: Request,
    next: Next,
) -> Response {
    let role = jm.role();
    let is_write = !matches!(*req.method(), Method::GET | Method::HEAD | Method::OPTIONS);
    let mut res = if is_write && role == RoleName::Standby {
        if req.headers().contains_key(FORWARDED_BY_HEADER) {
            ApiError::from(jm.not_leader()).into_response()
        } else {
            forward(&jm, req).await
        }
    } else {
        next.run(req).await
    };
    let role = match role {
        RoleName::Embedded => "embedded",
        RoleName::Leader => "leader",
        RoleName::Standby => "standby",
    };
    res.headers_mut().insert(
        HeaderName::from_static(ROLE_HEADER),
        HeaderValue::from_static(role),
    );
    res
}

async fn forward(jm: &JobManager, req: Request) -> Response {
    let Some(leader) = jm.leader() else {
        return ApiError::from(jm.not_leader()).into_response();
    };
    let path = req
        .uri()
        .path_and_query()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "/".into());
    let url = format!("{}{path}", leader.payload.trim_end_matches('/'));
    let method = req.method().clone();
    let content_type = req.headers().get(header::CONTENT_TYPE).cloned();
    // The caller's own credential goes on: the leader authenticates it
    // again, so no header a client could forge stands for an identity.
    let authorization = req.headers().get(header::AUTHORIZATION).cloned();
    // ... except for one known by its client certificate, which cannot go
    // on: this JobManager vouches for it with its own.
    let certified = req
        .extensions()
        .get::<Caller>()
        .filter(|c| c.method == AuthMethod::Certificate && authorization.is_none())
        .and_then(|c| HeaderValue::from_str(&c.name).ok());
    let body = match axum::body::to_bytes(req.into_body(), MAX_BODY_BYTES).await {
        Ok(b) => b,
        Err(e) => {
            return ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "invalid_body",
                format!("could not read the request body to forward it: {e}"),
            )
            .into_response();
        }
    };
    let http = match client(jm) {
        Ok(c) => c,
        Err(e) => {
            return ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "not_leader", format!(
                "this JobManager is a standby and cannot forward the write to the leader: {e}; check tls.api"
            ))
            .into_response();
        }
    };
    let mut out = http
        .request(method.clone(), &url)
        .header(FORWARDED_BY_HEADER, jm.instance_id())
        .body(body);
    if let Some(ct) = content_type {
        out = out.header(header::CONTENT_TYPE, ct);
    }
    if let Some(a) = authorization {
        out = out.header(header::AUTHORIZATION, a);
    }
    if let Some(name) = certified {
        out = out.header(FORWARDED_IDENTITY_HEADER, name);
    }
    tracing::debug!(%method, %url, "forwarding a write to the leader");
    match out.send().await {
        Ok(r) => {
            let status = r.status();
            let headers = r.headers().clone();
            let bytes = r.bytes().await.unwrap_or_default();
            let mut res = Response::builder().status(status);
            for (k, v) in headers.iter() {
                if k == header::CONTENT_LENGTH
                    || k == header::TRANSFER_ENCODING
                    || k == header::CONNECTION
                {
                    continue;
                }
                res = res.header(k, v);
            }
            let mut res = res
                .body(Body::from(bytes))
                .unwrap_or_else(|_| StatusCode::BAD_GATEWAY.into_response());
            if let Ok(v) = HeaderValue::from_str(jm.instance_id()) {
                res.headers_mut()
                    .insert(HeaderName::from_static(FORWARDED_BY_HEADER), v);
            }
            res
        }
        Err(e) => ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "not_leader",
            format!(
                "this JobManager is a standby and could not reach the leader {} at {} to forward the write ({e}); retry shortly: a new leader is elected within the lease time",
                leader.holder, leader.payload
            ),
        )
        .into_response(),
    }
}
