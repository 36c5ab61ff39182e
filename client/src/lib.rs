//! The client of Ferry's REST API: one typed method per endpoint, with the
//! request and response bodies of `ferry_core::api` (the ones the server
//! uses), tried over every JobManager URL of a region; what is built on it
//! and only drives running regions over their APIs ([`regions`]: the
//! region map, [`drill`]: the failover drill runner). The CLI, the drills,
//! the sandbox, the benchmarks and the tests all talk to Ferry through it.
//!
//! Invariant: a request goes to the next URL only when the previous one
//! could not be connected to, or answered 503 `not_leader` (it did nothing:
//! a standby that knows no leader), so a request a server may have acted on
//! is never sent twice. Nothing here prints: what a caller shows of an
//! [`Error`], a skipped URL or a drill's progress is up to it.

pub mod drill;
pub mod regions;
pub mod text;

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use ferry_core::api::{
    AuditList, CancelResponse, CheckpointList, DrainReport, DrillList, DrillReport, ErrorBody,
    HaHealth, JobInfo, JobList, OutageReport, RebalancePlan, RegionsHealth, RegionsStatus,
    SavepointInfo, SwitchoverReport,
};
use reqwest::Method;
pub use reqwest::StatusCode;
pub use reqwest::header::HeaderMap;
use serde::de::DeserializeOwned;

/// Where `ferry local` and a default JobManager serve the API.
pub const DEFAULT_URL: &str = "http://127.0.0.1:8081";
/// How long to wait for a TCP connection to one URL before trying the next.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Bound on one request by default; stopping with a savepoint of large
/// state is slow.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(120);
/// Header naming the JobManager instance that answered.
pub const INSTANCE_HEADER: &str = "x-ferry-instance";

/// Why a request failed.
#[derive(Debug)]
pub enum Error {
    /// The server answered with an error status; `body` when it is the
    /// API's error shape, `text` as it came.
    Api {
        url: String,
        status: StatusCode,
        body: Option<ErrorBody>,
        text: String,
    },
    /// No URL could be connected to (or every one but the last had no
    /// leader): `(url, reason)` for each.
    Unreachable(Vec<(String, String)>),
    /// The request failed after connecting (timeout, reset, bad answer):
    /// the server may have acted on it.
    Transport { url: String, reason: String },
}

impl Error {
    /// The API's error code (`not_found`, `invalid_spec`, ...), if the
    /// server answered with one.
    pub fn code(&self) -> Option<&str> {
        match self {
            Error::Api { body: Some(b), .. } => Some(&b.error.code),
            _ => None,
        }
    }

    /// The HTTP status, if the server answered.
    pub fn status(&self) -> Option<StatusCode> {
        match self {
            Error::Api { status, .. } => Some(*status),
            _ => None,
        }
    }
}

impl fmt::Display for Error {
    /// One line; callers that show errors to people print more.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Api {
                url,
                status,
                body: Some(b),
                ..
            } => write!(f, "{url} answered {status}: {}", b.error.message),
            Error::Api {
                url, status, text, ..
            } => write!(f, "{url} answered {status}: {}", text.trim()),
            Error::Unreachable(tried) => {
                f.write_str("cannot reach")?;
                for (i, (url, reason)) in tried.iter().enumerate() {
                    write!(f, "{} {url} ({reason})", if i == 0 { "" } else { "," })?;
                }
                Ok(())
            }
            Error::Transport { url, reason } => write!(f, "request to {url} failed: {reason}"),
        }
    }
}

impl std::error::Error for Error {}

/// A successful answer: the typed body, the JSON as the server sent it
/// (for printing it unchanged), the status and the headers.
#[derive(Debug)]
pub struct Answer<T> {
    pub value: T,
    pub raw: serde_json::Value,
    pub status: StatusCode,
    pub headers: HeaderMap,
}

impl<T> Answer<T> {
    /// The JobManager instance that answered (`x-ferry-instance`).
    pub fn instance(&self) -> Option<&str> {
        self.headers
            .get(INSTANCE_HEADER)
            .and_then(|v| v.to_str().ok())
    }
}

/// Told about a URL that was skipped: `(url, why, the URL that answered)`.
pub type SkipHook = Arc<dyn Fn(&str, &str, &str) + Send + Sync>;

/// A client of one region's JobManagers (one or several REST URLs).
/// Cheap to clone.
#[derive(Clone)]
pub struct Client {
    http: reqwest::Client,
    bases: Vec<String>,
    /// Bearer token sent with every request (never shown by `Debug`).
    token: Option<Arc<str>>,
    timeout: Duration,
    no_proxy: bool,
    /// CA certificates trusted besides the public ones (`--ca-cert`).
    roots: Arc<Vec<reqwest::Certificate>>,
    on_skip: Option<SkipHook>,
}

impl fmt::Debug for Client {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Client")
            .field("urls", &self.bases)
            .field("token", &self.token.as_ref().map(|_| "(set)"))
            .field("timeout", &self.timeout)
            .finish()
    }
}

impl Client {
    /// A client of the JobManagers at `urls`, tried in order (`host:port`
    /// means `http://host:port`). Proxies come from the environment.
    pub fn new<S: AsRef<str>>(urls: &[S]) -> anyhow::Result<Self> {
        let bases = urls
            .iter()
            .map(|u| u.as_ref().trim())
            .filter(|u| !u.is_empty())
            .map(normalize_url)
            .collect::<anyhow::Result<Vec<_>>>()?;
        if bases.is_empty() {
            bail!("--url is empty; give the JobManager's URL, e.g. {DEFAULT_URL}");
        }
        Ok(Self {
            http: build_http(false, &[])?,
            bases,
            token: None,
            timeout: REQUEST_TIMEOUT,
            no_proxy: false,
            roots: Arc::new(Vec::new()),
            on_skip: None,
        })
    }

    /// A client of the one JobManager at `url` that ignores proxy settings
    /// (loopback deployments: the sandbox, benchmarks, tests).
    pub fn local(url: &str) -> anyhow::Result<Self> {
        Self::new(&[url])?.no_proxy()
    }

    /// The same client without proxies.
    pub fn no_proxy(mut self) -> anyhow::Result<Self> {
        self.http = build_http(true, &self.roots)?;
        self.no_proxy = true;
        Ok(self)
    }

    /// The same client, also trusting the CA certificates in `pem` for
    /// `https://` JobManagers (a region whose `tls.api` certificates a
    /// private CA signed).
    pub fn with_ca_cert(mut self, pem: &[u8]) -> anyhow::Result<Self> {
        let certs = reqwest::Certificate::from_pem_bundle(pem)
            .context("not PEM certificates (expected -----BEGIN CERTIFICATE-----)")?;
        if certs.is_empty() {
            bail!("holds no certificate (expected -----BEGIN CERTIFICATE-----)");
        }
        self.roots = Arc::new(certs);
        self.http = build_http(self.no_proxy, &self.roots)?;
        Ok(self)
    }

    /// The same client, sending `token` as `Authorization: Bearer` with
    /// every request (a JobManager with `api.auth` needs one).
    pub fn with_token(mut self, token: &str) -> Self {
        let t = token.trim();
        self.token = (!t.is_empty()).then(|| Arc::from(t));
        self
    }

    /// The same client with another bound on each request.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// The same client, telling `hook` about every URL it skips.
    pub fn on_skip(mut self, hook: SkipHook) -> Self {
        self.on_skip = Some(hook);
        self
    }

    /// A client of the one JobManager at `url` with this one's settings.
    pub fn for_url(&self, url: &str) -> anyhow::Result<Self> {
        let mut c = Self::new(&[url])?;
        c.http = self.http.clone();
        c.token = self.token.clone();
        c.timeout = self.timeout;
        c.no_proxy = self.no_proxy;
        c.on_skip = self.on_skip.clone();
        Ok(c)
    }

    /// The URLs tried, in order.
    pub fn urls(&self) -> &[String] {
        &self.bases
    }

    // ---- Jobs ----

    /// `GET /v1/jobs`: every job, newest first.
    pub async fn jobs(&self) -> Result<Answer<JobList>, Error> {
        self.call(Method::GET, "/v1/jobs", None).await
    }

    /// `GET /v1/jobs/{id}`: one job by id, id prefix or name.
    pub async fn job(&self, id: &str) -> Result<Answer<JobInfo>, Error> {
        let path = format!("/v1/jobs/{}", escape_segment(id));
        self.call(Method::GET, &path, None).await
    }

    /// `POST /v1/jobs`: submits a job spec (YAML or JSON; without a
    /// content type the server tells them apart).
    pub async fn submit(
        &self,
        spec: Vec<u8>,
        content_type: Option<&'static str>,
    ) -> Result<Answer<JobInfo>, Error> {
        self.call(Method::POST, "/v1/jobs", Some((content_type, spec)))
            .await
    }

    /// `DELETE /v1/jobs/{id}`: cancels a job, with a savepoint first if
    /// asked.
    pub async fn cancel(&self, id: &str, savepoint: bool) -> Result<Answer<CancelResponse>, Error> {
        let path = format!(
            "/v1/jobs/{}{}",
            escape_segment(id),
            if savepoint { "?savepoint=true" } else { "" }
        );
        self.call(Method::DELETE, &path, None).await
    }

    /// `POST /v1/jobs/{id}/savepoints`: a savepoint of a running job.
    pub async fn savepoint(&self, id: &str) -> Result<Answer<SavepointInfo>, Error> {
        let path = format!("/v1/jobs/{}/savepoints", escape_segment(id));
        self.call(Method::POST, &path, None).await
    }

    /// `GET /v1/jobs/{id}/checkpoints`: completed checkpoints and
    /// savepoints, newest first.
    pub async fn checkpoints(&self, id: &str) -> Result<Answer<CheckpointList>, Error> {
        let path = format!("/v1/jobs/{}/checkpoints", escape_segment(id));
        self.call(Method::GET, &path, None).await
    }

    // ---- The region's HA ----

    /// `GET /v1/cluster`: the region's JobManagers, the leader, its epoch.
    pub async fn cluster(&self) -> Result<Answer<HaHealth>, Error> {
        self.call(Method::GET, "/v1/cluster", None).await
    }

    /// `POST /v1/taskmanagers/{id}/drain` (`on`) or `DELETE` (end it).
    pub async fn drain(&self, taskmanager: &str, on: bool) -> Result<Answer<DrainReport>, Error> {
        let path = format!("/v1/taskmanagers/{}/drain", escape_segment(taskmanager));
        let method = if on { Method::POST } else { Method::DELETE };
        self.call(method, &path, None).await
    }

    /// `POST /v1/cluster/rebalance?dry_run=...`: even out the slot load.
    pub async fn rebalance(&self, dry_run: bool) -> Result<Answer<RebalancePlan>, Error> {
        self.call(
            Method::POST,
            &format!("/v1/cluster/rebalance?dry_run={dry_run}"),
            None,
        )
        .await
    }

    /// `GET /v1/audit?limit=N`: the newest entries of the audit trail.
    pub async fn audit(&self, limit: usize) -> Result<Answer<AuditList>, Error> {
        self.call(Method::GET, &format!("/v1/audit?limit={limit}"), None)
            .await
    }

    /// `GET /health/ha`: the same view as [`Self::cluster`].
    pub async fn health(&self) -> Result<Answer<HaHealth>, Error> {
        self.call(Method::GET, "/health/ha", None).await
    }

    // ---- Cross-region ----

    /// `GET /v1/regions`: every region's health and the replication.
    pub async fn regions(&self) -> Result<Answer<RegionsStatus>, Error> {
        self.call(Method::GET, "/v1/regions", None).await
    }

    /// `GET /health/regions` (503 with the same body while the global KV
    /// takes no writes).
    pub async fn regions_health(&self) -> Result<Answer<RegionsHealth>, Error> {
        self.call(Method::GET, "/health/regions", None).await
    }

    /// `POST /v1/regions/{to}/failover`: make `to` the primary region.
    pub async fn failover(
        &self,
        to: &str,
        force: bool,
        dry_run: bool,
    ) -> Result<Answer<SwitchoverReport>, Error> {
        let path = format!(
            "/v1/regions/{}/failover?force={force}&dry_run={dry_run}",
            escape_segment(to)
        );
        self.call(Method::POST, &path, None).await
    }

    /// `POST /v1/regions/{to}/failback`: move the jobs home to `to`,
    /// waiting up to `wait` (the server's default without) for it to be
    /// healthy.
    pub async fn failback(
        &self,
        to: &str,
        dry_run: bool,
        wait: Option<Duration>,
    ) -> Result<Answer<SwitchoverReport>, Error> {
        let mut path = format!(
            "/v1/regions/{}/failback?dry_run={dry_run}",
            escape_segment(to)
        );
        if let Some(w) = wait {
            path.push_str(&format!("&wait={}ms", w.as_millis()));
        }
        self.call(Method::POST, &path, None).await
    }

    // ---- Drills ----

    /// `POST /v1/drills/outage`: this region plays dead for `duration`
    /// (whole seconds), `target` to take over.
    pub async fn start_outage(
        &self,
        duration: Duration,
        target: Option<&str>,
    ) -> Result<Answer<OutageReport>, Error> {
        let mut path = format!("/v1/drills/outage?duration={}s", duration.as_secs());
        if let Some(t) = target {
            path.push_str(&format!("&target={}", escape_segment(t)));
        }
        self.call(Method::POST, &path, None).await
    }

    /// `DELETE /v1/drills/outage`: the simulated outage ends.
    pub async fn end_outage(&self) -> Result<Answer<OutageReport>, Error> {
        self.call(Method::DELETE, "/v1/drills/outage", None).await
    }

    /// `POST /v1/drills`: records a drill report.
    pub async fn record_drill(&self, report: &DrillReport) -> Result<Answer<DrillReport>, Error> {
        let body = serde_json::to_vec(report).unwrap_or_default();
        self.call(
            Method::POST,
            "/v1/drills",
            Some((Some("application/json"), body)),
        )
        .await
    }

    /// `GET /v1/drills`: the drill reports recorded in this region.
    pub async fn drills(&self) -> Result<Answer<DrillList>, Error> {
        self.call(Method::GET, "/v1/drills", None).await
    }

    /// `GET /v1/drills/{id}`: one drill report.
    pub async fn drill(&self, id: &str) -> Result<Answer<DrillReport>, Error> {
        let path = format!("/v1/drills/{}", escape_segment(id));
        self.call(Method::GET, &path, None).await
    }

    /// `GET path` as JSON, for endpoints whose raw fields a caller reads
    /// itself (tests asserting on the wire format).
    pub async fn get_json(&self, path: &str) -> Result<Answer<serde_json::Value>, Error> {
        self.call(Method::GET, path, None).await
    }

    /// Sends one request, trying the URLs in order while they cannot be
    /// connected to (or have no leader); the typed answer.
    async fn call<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<(Option<&'static str>, Vec<u8>)>,
    ) -> Result<Answer<T>, Error> {
        let mut unreachable = Vec::new();
        for base in &self.bases {
            let url = format!("{base}{path}");
            let mut req = self
                .http
                .request(method.clone(), &url)
                .timeout(self.timeout);
            if let Some(t) = &self.token {
                req = req.bearer_auth(t);
            }
            if let Some((content_type, bytes)) = &body {
                if let Some(ct) = content_type {
                    req = req.header(reqwest::header::CONTENT_TYPE, *ct);
                }
                req = req.body(bytes.clone());
            }
            let res = match req.send().await {
                Ok(res) => res,
                Err(e) if e.is_connect() => {
                    unreachable.push((base.clone(), root_cause(&e)));
                    continue;
                }
                Err(e) => {
                    return Err(Error::Transport {
                        url,
                        reason: root_cause(&e),
                    });
                }
            };
            let answer = read_response(url, res).await;
            if let Err(Error::Api {
                status: StatusCode::SERVICE_UNAVAILABLE,
                body: Some(b),
                ..
            }) = &answer
                && b.error.code == "not_leader"
                && base != self.bases.last().expect("at least one URL")
            {
                unreachable.push((base.clone(), b.error.message.clone()));
                continue;
            }
            if let Some(hook) = &self.on_skip {
                for (skipped, reason) in &unreachable {
                    hook(skipped, reason, base);
                }
            }
            return answer;
        }
        Err(Error::Unreachable(unreachable))
    }
}

fn build_http(no_proxy: bool, roots: &[reqwest::Certificate]) -> anyhow::Result<reqwest::Client> {
    let mut b = reqwest::Client::builder()
        .tls_certs_merge(roots.iter().cloned())
        .connect_timeout(CONNECT_TIMEOUT)
        .timeout(REQUEST_TIMEOUT)
        .user_agent(concat!("ferry-cli/", env!("CARGO_PKG_VERSION")));
    if no_proxy {
        b = b.no_proxy();
    }
    b.build().context("cannot set up the HTTP client")
}

/// Accepts `host:port` as `http://host:port`; drops a trailing `/`.
pub fn normalize_url(u: &str) -> anyhow::Result<String> {
    let full = if u.contains("://") {
        u.to_string()
    } else {
        format!("http://{u}")
    };
    let parsed = reqwest::Url::parse(&full)
        .with_context(|| format!("invalid --url '{u}'; expected e.g. {DEFAULT_URL}"))?;
    if !matches!(parsed.scheme(), "http" | "https") {
        bail!("invalid --url '{u}': use an http:// or https:// URL");
    }
    Ok(full.trim_end_matches('/').to_string())
}

/// Percent-encodes a job id or name (or a region name) for use as one path
/// segment.
pub fn escape_segment(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The innermost cause of an error, e.g. `Connection refused (os error 111)`.
fn root_cause(e: &(dyn std::error::Error + 'static)) -> String {
    let mut cur = e;
    while let Some(next) = cur.source() {
        cur = next;
    }
    let why = cur.to_string();
    if why.contains("invalid peer certificate") {
        format!(
            "{why}; the JobManager's certificate is not signed by a CA this client trusts: pass the region's CA with --ca-cert or FERRY_CA_CERT"
        )
    } else {
        why
    }
}

async fn read_response<T: DeserializeOwned>(
    url: String,
    res: reqwest::Response,
) -> Result<Answer<T>, Error> {
    let status = res.status();
    let headers = res.headers().clone();
    let bytes = res.bytes().await.map_err(|e| Error::Transport {
        url: url.clone(),
        reason: format!("reading the answer: {}", root_cause(&e)),
    })?;
    if !status.is_success() {
        return Err(Error::Api {
            body: serde_json::from_slice(&bytes).ok(),
            text: String::from_utf8_lossy(&bytes).into_owned(),
            url,
            status,
        });
    }
    let raw: serde_json::Value = serde_json::from_slice(&bytes).map_err(|e| Error::Transport {
        url: url.clone(),
        reason: format!("the answer is not JSON ({e}); is --url a Ferry JobManager?"),
    })?;
    let value = T::deserialize(&raw).map_err(|e| Error::Transport {
        url: url.clone(),
        reason: format!("unexpected answer ({e}); is this CLI as new as the JobManager?"),
    })?;
    Ok(Answer {
        value,
        raw,
        status,
        headers,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_normalized() {
        assert_eq!(normalize_url("127.0.0.1:9").unwrap(), "http://127.0.0.1:9");
        assert_eq!(
            normalize_url("https://jm.example/").unwrap(),
            "https://jm.example"
        );
        assert!(normalize_url("ftp://x").is_err());
        assert!(normalize_url("http://[::1").is_err());
    }

    #[test]
    fn ids_are_escaped_as_one_segment() {
        assert_eq!(escape_segment("my job/1"), "my%20job%2F1");
        assert_eq!(escape_segment("01a2-x_y.z~"), "01a2-x_y.z~");
    }

    #[tokio::test]
    async fn a_closed_port_is_unreachable_and_the_next_url_answers() {
        let closed = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let closed_url = format!("http://{}", closed.local_addr().unwrap());
        drop(closed);
        let c = Client::new(&[closed_url.as_str()])
            .unwrap()
            .no_proxy()
            .unwrap();
        match c.jobs().await {
            Err(Error::Unreachable(tried)) => assert_eq!(tried[0].0, closed_url),
            other => panic!("{other:?}"),
        }
    }
}
