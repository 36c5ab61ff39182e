//! The API's gate: every request but the probes and the OpenAPI document
//! is authenticated ([`crate::auth::ApiAuth`]) before anything else runs
//! (forwarding to the leader included), and needs a role for its route.
//! Job routes check the job's namespace in their handlers with
//! [`require`]; this layer checks what holds for the route as a whole.
//!
//! Invariant: the [`Caller`] a handler sees comes from this gate, built
//! from the request's `Authorization` header or its connection's verified
//! client certificate (see [`crate::auth`] for the one forwarded identity
//! taken, from another JobManager's certificate only); 401 means no valid
//! credential, 403 a valid one without the role, both as JSON naming what
//! was missing.

use std::sync::Arc;

use axum::extract::{ConnectInfo, Request, State};
use axum::http::{HeaderValue, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::error::{ApiError, ErrorDetail};
use crate::auth::{ApiAuth, Caller, Role};
use crate::service::JobManager;

/// What a route needs before its handler runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Need {
    /// Nothing: probes and the OpenAPI document.
    Open,
    /// `role` in at least one namespace (the handler checks the job's).
    Somewhere(Role),
    /// `role` in every namespace (`*:role`): region and drill operations.
    Everywhere(Role),
}

/// The need of `method path`.
pub(super) fn need_for(method: &Method, path: &str, metrics_authenticated: bool) -> Need {
    let path = path.trim_end_matches('/');
    let read = matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS);
    match path {
        "/healthz" | "/readyz" | "/openapi.json" if read => Need::Open,
        // Who did what in every namespace.
        "/v1/audit" if read => Need::Everywhere(Role::Viewer),
        "/metrics" if read && !metrics_authenticated => Need::Open,
        _ if read => Need::Somewhere(Role::Viewer),
        "/v1/jobs" => Need::Somewhere(Role::Operator),
        _ if path.starts_with("/v1/jobs/") => Need::Somewhere(Role::Operator),
        _ => Need::Everywhere(Role::Admin),
    }
}

/// 401 with the reason and `WWW-Authenticate: Bearer`.
fn unauthenticated(why: String) -> Response {
    let mut res = ApiError::new(StatusCode::UNAUTHORIZED, "unauthenticated", why).into_response();
    res.headers_mut()
        .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    res
}

/// 403 naming the role the request needed and the caller's grants.
pub(crate) fn forbidden(caller: &Caller, what: &str, role: Role, namespace: &str) -> ApiError {
    let needed = format!("{namespace}:{}", role.as_str());
    let scope = if namespace == crate::auth::EVERY_NAMESPACE {
        "in every namespace".to_string()
    } else {
        format!("in namespace '{namespace}'")
    };
    ApiError::new(
        StatusCode::FORBIDDEN,
        "forbidden",
        format!(
            "{what} needs role {} {scope} (a grant {needed}); '{}' has {}. Ask an admin for the grant, or use a token that has it",
            role.as_str(),
            caller.name,
            caller.grants_text()
        ),
    )
    .with_details(vec![ErrorDetail::message(format!("missing: {needed}"))])
}

/// Fails with 403 unless `caller` holds `role` in `namespace`.
pub(crate) fn require(
    caller: &Caller,
    what: &str,
    role: Role,
    namespace: &str,
) -> Result<(), ApiError> {
    if caller.may(role, namespace) {
        Ok(())
    } else {
        Err(forbidden(caller, what, role, namespace))
    }
}

/// What the gate needs: the settings, and the JobManager to count and
/// record refusals.
#[derive(Clone)]
pub(super) struct Gate {
    pub auth: Arc<ApiAuth>,
    pub jm: JobManager,
}

pub(super) async fn gate(State(g): State<Gate>, mut req: Request, next: Next) -> Response {
    let auth = &g.auth;
    if !auth.enabled() {
        req.extensions_mut().insert(Caller::open());
        return next.run(req).await;
    }
    let need = need_for(req.method(), req.uri().path(), auth.metrics_authenticated);
    if need == Need::Open {
        return next.run(req).await;
    }
    let header = req
        .headers()
        .get(header::AUTHORIZATION)
        .map(|v| v.to_str().unwrap_or(""));
    let forwarded = req
        .headers()
        .get(super::FORWARDED_IDENTITY_HEADER)
        .map(|v| v.to_str().unwrap_or(""));
    let peer = req
        .extensions()
        .get::<ConnectInfo<super::Peer>>()
        .and_then(|c| c.0.cert.as_deref());
    let write = !matches!(*req.method(), Method::GET | Method::HEAD | Method::OPTIONS);
    let caller = match auth.authenticate_request(header, peer, forwarded).await {
        Ok(c) => c,
        Err(e) => {
            // Counted and logged, not kept in the store: anyone can send
            // these, and each must not cost a write.
            g.jm.inner.metrics.api_unauthenticated.inc();
            if write {
                tracing::warn!(target: "audit", action = %format!("{} {}", req.method(), req.uri().path()), status = 401, "audit: refused a call without a valid credential: {e}");
            }
            return unauthenticated(e.to_string());
        }
    };
    let what = format!("{} {}", req.method(), req.uri().path());
    let allowed = match need {
        Need::Open => true,
        Need::Somewhere(role) => caller.may_somewhere(role),
        Need::Everywhere(role) => caller.may_everywhere(role),
    };
    if !allowed {
        let res = match need {
            Need::Everywhere(role) => {
                forbidden(&caller, &what, role, crate::auth::EVERY_NAMESPACE).into_response()
            }
            Need::Somewhere(_) | Need::Open => ApiError::new(
                StatusCode::FORBIDDEN,
                "forbidden",
                format!(
                    "{what} needs role {} in at least one namespace; '{}' has {}. Ask an admin for a grant such as <namespace>:{}",
                    role_of(need).as_str(),
                    caller.name,
                    caller.grants_text(),
                    role_of(need).as_str(),
                ),
            )
            .with_details(vec![ErrorDetail::message(format!(
                "missing: <namespace>:{}",
                role_of(need).as_str()
            ))])
            .into_response(),
        };
        if write {
            let mut e = super::audit::entry(
                &g.jm,
                &caller,
                req.method(),
                req.uri().path(),
                None,
                StatusCode::FORBIDDEN,
            );
            e.result = "forbidden".into();
            g.jm.audit(e).await;
        }
        return res;
    }
    req.extensions_mut().insert(caller);
    next.run(req).await
}

fn role_of(need: Need) -> Role {
    match need {
        Need::Somewhere(r) | Need::Everywhere(r) => r,
        Need::Open => Role::Viewer,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_need_what_their_operation_does() {
        let get = Method::GET;
        let post = Method::POST;
        let del = Method::DELETE;
        for p in ["/healthz", "/readyz", "/openapi.json", "/metrics"] {
            assert_eq!(need_for(&get, p, false), Need::Open, "{p}");
        }
        assert_eq!(
            need_for(&get, "/metrics", true),
            Need::Somewhere(Role::Viewer)
        );
        assert_eq!(
            need_for(&post, "/healthz", false),
            Need::Everywhere(Role::Admin)
        );
        assert_eq!(
            need_for(&get, "/v1/audit", false),
            Need::Everywhere(Role::Viewer)
        );
        for p in [
            "/v1/jobs",
            "/v1/jobs/x",
            "/v1/cluster",
            "/v1/regions",
            "/health/ha",
        ] {
            assert_eq!(
                need_for(&get, p, false),
                Need::Somewhere(Role::Viewer),
                "{p}"
            );
        }
        assert_eq!(
            need_for(&post, "/v1/jobs", false),
            Need::Somewhere(Role::Operator)
        );
        assert_eq!(
            need_for(&del, "/v1/jobs/x", false),
            Need::Somewhere(Role::Operator)
        );
        assert_eq!(
            need_for(&post, "/v1/jobs/x/savepoints", false),
            Need::Somewhere(Role::Operator)
        );
        for p in [
            "/v1/regions/west/failover",
            "/v1/regions/east/failback",
            "/v1/drills",
            "/v1/drills/outage",
            "/v1/anything-new",
        ] {
            assert_eq!(
                need_for(&post, p, false),
                Need::Everywhere(Role::Admin),
                "{p}"
            );
        }
        assert_eq!(
            need_for(&del, "/v1/drills/outage", false),
            Need::Everywhere(Role::Admin)
        );
    }
}
