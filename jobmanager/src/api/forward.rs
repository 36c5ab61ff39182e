//! Standbys forward writes: a `POST`/`PUT`/`DELETE` that reaches a standby
//! JobManager is sent on to the leader (whose URL it publishes with its
//! lease) and the leader's answer is returned, marked with
//! `x-ferry-forwarded-by`, with the caller's `Authorization` header (the
//! leader checks it again). Reads are answered locally from the job store.
//! Every response carries `x-ferry-role`.
//!
//! Invariant: a request is forwarded at most once (a request that already
//! carries `x-ferry-forwarded-by` is answered here, with 503 `not_leader`
//! if this instance does not lead), so two standbys with stale views of the
//! leader cannot bounce a request between them.

use std::sync::OnceLock;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderName, HeaderValue, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::error::ApiError;
use super::{FORWARDED_BY_HEADER, MAX_BODY_BYTES, ROLE_HEADER};
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

/// The client forwarding goes through: one that trusts the region's CA
/// when the API speaks HTTPS, else a plain one.
fn client(jm: &JobManager) -> &reqwest::Client {
    static PLAIN: OnceLock<reqwest::Client> = OnceLock::new();
    jm.inner
        .forward_client
        .get()
        .unwrap_or_else(|| PLAIN.get_or_init(|| builder().build().expect("reqwest client")))
}

impl JobManager {
    /// Forwarded writes go over HTTPS to leaders whose certificate the CA
    /// in `ca_pem` (PEM, one or more certificates) signed, and to no other.
    pub fn trust_leaders_signed_by(&self, ca_pem: &[u8]) -> Result<(), String> {
        let certs = reqwest::Certificate::from_pem_bundle(ca_pem)
            .map_err(|e| format!("tls.api.caFile is not PEM certificates: {e}"))?;
        if certs.is_empty() {
            return Err("tls.api.caFile holds no certificate".into());
        }
        let client = builder()
            .tls_certs_only(certs)
            .https_only(true)
            .build()
            .map_err(|e| format!("cannot set up the forwarding client: {e}"))?;
        self.inner
            .forward_client
            .set(client)
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
    let mut out = client(jm)
        .request(method.clone(), &url)
        .header(FORWARDED_BY_HEADER, jm.instance_id())
        .body(body);
    if let Some(ct) = content_type {
        out = out.header(header::CONTENT_TYPE, ct);
    }
    if let Some(a) = authorization {
        out = out.header(header::AUTHORIZATION, a);
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
