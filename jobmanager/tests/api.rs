//! The REST API over real HTTP: the router is served on a `127.0.0.1:0`
//! listener and every test talks to it with reqwest, like a user would.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ferry_jobmanager::api::{self, CancelResponse, CheckpointList, ErrorBody, JobList};
use ferry_jobmanager::{JobInfo, JobManager, JobManagerConfig, JobState};
use reqwest::StatusCode;
use tokio_util::sync::CancellationToken;

const INSTANCE: &str = "api-test-jm";
/// Upper bound on waiting for a job to reach a state.
const JOB_TIMEOUT: Duration = Duration::from_secs(60);
const POLL_EVERY: Duration = Duration::from_millis(50);
const GENERATOR_TOTAL: u64 = 20_000;

/// A JobManager with its REST API on a free port; stops when dropped.
struct ApiServer {
    base: String,
    http: reqwest::Client,
    dir: tempfile::TempDir,
    shutdown: CancellationToken,
    task: Option<tokio::task::JoinHandle<std::io::Result<()>>>,
}

impl ApiServer {
    async fn start() -> Self {
        Self::start_with_roots(|_| ferry_core::access::AccessPolicy::unrestricted()).await
    }

    /// A server whose jobs may touch what `roots` (given the server's temp
    /// dir) allows.
    async fn start_with_roots(
        roots: impl FnOnce(&Path) -> ferry_core::access::AccessPolicy,
    ) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let jm = JobManager::new(JobManagerConfig {
            data_url: dir.path().join("default-data").display().to_string(),
            instance_id: INSTANCE.to_string(),
            access: roots(dir.path()),
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind 127.0.0.1:0");
        let base = format!("http://{}", listener.local_addr().unwrap());
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(api::serve(jm, listener, shutdown.clone()));
        let http = reqwest::Client::builder()
            .no_proxy()
            .timeout(Duration::from_secs(30))
            .build()
            .unwrap();
        Self {
            base,
            http,
            dir,
            shutdown,
            task: Some(task),
        }
    }

    /// `DELETE /v1/jobs/{id}?savepoint=true`: (status, body).
    async fn cancel_with_savepoint(&self, id: &str) -> (StatusCode, String) {
        let res = self
            .http
            .delete(self.url(&format!("/v1/jobs/{id}?savepoint=true")))
            .send()
            .await
            .unwrap();
        let status = res.status();
        (status, res.text().await.unwrap())
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// A job spec whose checkpoints and output live in this server's temp dir.
    fn spec(&self, name: &str, generator: &str) -> String {
        let tmp = self.dir.path().display();
        format!(
            r#"apiVersion: ferry.dev/v1
kind: Job
metadata: {{name: {name}}}
spec:
  parallelism: 1
  checkpointing: {{interval: 200ms, storage: "{tmp}/data"}}
  source:
    generator:
      {generator}
      eventTime: {{step: 10ms}}
      fields:
        user: {{type: key, cardinality: 10, prefix: "u"}}
  operators:
    - key_by: user
    - window: {{tumbling: 1m, aggregate: {{clicks: count}}}}
  sink:
    file: {{path: "{tmp}/out/{name}"}}
"#
        )
    }

    async fn submit(&self, spec: String) -> JobInfo {
        let res = self
            .http
            .post(self.url("/v1/jobs"))
            .header("content-type", "application/yaml")
            .body(spec)
            .send()
            .await
            .unwrap();
        let status = res.status();
        let location = res.headers().get("location").cloned();
        let text = res.text().await.unwrap();
        assert_eq!(status, StatusCode::CREATED, "{text}");
        let info: JobInfo = serde_json::from_str(&text).unwrap();
        assert_eq!(
            location.expect("Location header").to_str().unwrap(),
            format!("/v1/jobs/{}", info.id)
        );
        info
    }

    async fn get_job(&self, id: &str) -> JobInfo {
        let res = self
            .http
            .get(self.url(&format!("/v1/jobs/{id}")))
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), StatusCode::OK);
        res.json().await.unwrap()
    }

    /// Polls the job until `pred` holds, failing after [`JOB_TIMEOUT`] or
    /// if the job fails.
    async fn wait_until(&self, id: &str, what: &str, pred: impl Fn(&JobInfo) -> bool) -> JobInfo {
        let deadline = Instant::now() + JOB_TIMEOUT;
        loop {
            let info = self.get_job(id).await;
            if pred(&info) {
                return info;
            }
            assert_ne!(
                info.state,
                JobState::Failed,
                "job failed: {:?}",
                info.failure
            );
            assert!(
                Instant::now() < deadline,
                "job {id} not {what} after {JOB_TIMEOUT:?}: {info:?}"
            );
            tokio::time::sleep(POLL_EVERY).await;
        }
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        self.shutdown.cancel();
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

/// Checks the status, the instance header and the error shape of a
/// response, returning the parsed error.
async fn expect_error(res: reqwest::Response, status: StatusCode, code: &str) -> ErrorBody {
    assert_eq!(res.status(), status);
    assert_instance(&res);
    let ct = res.headers()["content-type"].to_str().unwrap().to_string();
    assert!(ct.starts_with("application/json"), "content type {ct}");
    let text = res.text().await.unwrap();
    let body: ErrorBody =
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("not an error body ({e}): {text}"));
    assert_eq!(body.error.code, code, "{text}");
    assert!(!body.error.message.is_empty());
    body
}

fn assert_instance(res: &reqwest::Response) {
    assert_eq!(
        res.headers()
            .get(api::INSTANCE_HEADER)
            .map(|v| v.to_str().unwrap()),
        Some(INSTANCE),
        "{} lacks {}",
        res.url(),
        api::INSTANCE_HEADER
    );
}

/// Local path of a `file://` URL (or a plain path).
fn local_path(url: &str) -> PathBuf {
    PathBuf::from(url.strip_prefix("file://").unwrap_or(url))
}

// ---- Routes that need no jobs ----

#[tokio::test]
async fn healthz_is_ok_json_with_instance_header() {
    let s = ApiServer::start().await;
    let res = s.http.get(s.url("/healthz")).send().await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert_instance(&res);
    let body: serde_json::Value = res.json().await.unwrap();
    assert_eq!(body, serde_json::json!({"status": "ok"}));
}

#[tokio::test]
async fn readyz_is_200_when_ready() {
    let s = ApiServer::start().await;
    let res = s.http.get(s.url("/readyz")).send().await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert_instance(&res);
}

#[tokio::test]
async fn metrics_are_prometheus_text_with_ferry_names() {
    let s = ApiServer::start().await;
    let res = s.http.get(s.url("/metrics")).send().await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert_instance(&res);
    assert_eq!(
        res.headers()["content-type"],
        "text/plain; version=0.0.4; charset=utf-8"
    );
    let text = res.text().await.unwrap();
    // Families without series are not rendered; whatever is must be ours.
    assert_ferry_metrics(&text);
}

/// Every sample in a Prometheus text page is named `ferry_...`.
fn assert_ferry_metrics(text: &str) {
    assert!(
        text.lines().any(|l| l.starts_with("ferry_")),
        "no Ferry metric on the page:\n{text}"
    );
    for line in text
        .lines()
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
    {
        assert!(line.starts_with("ferry_"), "foreign metric: {line}");
    }
}

#[tokio::test]
async fn unknown_route_is_404_json_listing_routes() {
    let s = ApiServer::start().await;
    let res = s.http.get(s.url("/v1/nope")).send().await.unwrap();
    let body = expect_error(res, StatusCode::NOT_FOUND, "not_found").await;
    assert!(body.error.message.contains("/v1/nope"), "{body:?}");
    assert_eq!(body.error.details.len(), api::routes().len());
    for r in api::routes() {
        let line = format!("{} {}", r.method, r.path);
        assert!(
            body.error
                .details
                .iter()
                .any(|d| d.message.starts_with(&line)),
            "{line} not listed"
        );
    }
}

#[tokio::test]
async fn wrong_method_is_405_json_with_allow() {
    let s = ApiServer::start().await;
    let res = s.http.put(s.url("/v1/jobs")).send().await.unwrap();
    let allow = res
        .headers()
        .get("allow")
        .map(|v| v.to_str().unwrap().to_string());
    let body = expect_error(res, StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed").await;
    let allow = allow.expect("Allow header");
    assert!(allow.contains("GET") && allow.contains("POST"), "{allow}");
    assert!(
        body.error.message.contains("GET") && body.error.message.contains("POST"),
        "{body:?}"
    );

    let res = s.http.post(s.url("/healthz")).send().await.unwrap();
    expect_error(res, StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed").await;
}

#[tokio::test]
async fn every_route_in_the_table_is_served() {
    // Probe with a method no route uses: a served path answers 405, an
    // unserved one 404, so this checks api::routes() against the router.
    let s = ApiServer::start().await;
    for r in api::routes() {
        let path = concrete(&r.path);
        let res = s.http.patch(s.url(&path)).send().await.unwrap();
        assert_eq!(res.status(), StatusCode::METHOD_NOT_ALLOWED, "{path}");
        let allow = res.headers()["allow"].to_str().unwrap().to_string();
        assert!(
            allow.contains(&r.method),
            "{} {path}: Allow {allow}",
            r.method
        );
    }
}

/// A route pattern with each `{param}` filled in.
fn concrete(pattern: &str) -> String {
    pattern
        .split('/')
        .map(|seg| {
            if seg.starts_with('{') {
                "some-name"
            } else {
                seg
            }
        })
        .collect::<Vec<_>>()
        .join("/")
}

/// The paths the axum router itself holds. axum has no public route list,
/// but its `Debug` output names every path of its path router (the part
/// before the fallback router).
fn router_paths(router: &axum::Router) -> BTreeSet<String> {
    let dbg = format!("{router:?}");
    let main = &dbg[..dbg
        .find("fallback_router")
        .expect("axum Router debug output")];
    main.split('"')
        .skip(1)
        .step_by(2)
        .filter(|p| p.starts_with('/'))
        .map(str::to_string)
        .collect()
}

#[tokio::test]
async fn openapi_json_lists_every_route_the_router_serves() {
    let s = ApiServer::start().await;
    let res = s.http.get(s.url("/openapi.json")).send().await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    let doc: serde_json::Value = res.json().await.unwrap();
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."), "{doc}");
    let mut documented = BTreeSet::new();
    for (path, item) in doc["paths"].as_object().expect("paths") {
        for (method, op) in item.as_object().unwrap() {
            if ["get", "post", "put", "patch", "delete"].contains(&method.as_str()) {
                assert!(op["summary"].is_string(), "{method} {path}: no summary");
                assert!(
                    op["responses"].as_object().is_some_and(|r| !r.is_empty()),
                    "{method} {path}: no responses"
                );
                documented.insert((method.to_uppercase(), path.clone()));
            }
        }
    }
    // What the real router serves: its paths, and per path the methods its
    // 405 answer allows (HEAD comes with GET and is not documented apart).
    let jm = JobManager::new(JobManagerConfig {
        data_url: s.dir.path().join("default-data").display().to_string(),
        instance_id: INSTANCE.to_string(),
        access: ferry_core::access::AccessPolicy::unrestricted(),
    });
    let paths = router_paths(&api::router(jm));
    assert!(paths.len() >= 10, "router paths not found in {paths:?}");
    let mut served = BTreeSet::new();
    for path in &paths {
        let res = s.http.patch(s.url(&concrete(path))).send().await.unwrap();
        assert_eq!(res.status(), StatusCode::METHOD_NOT_ALLOWED, "{path}");
        let allow = res.headers()["allow"].to_str().unwrap().to_string();
        for m in allow.split(',').map(str::trim).filter(|m| *m != "HEAD") {
            served.insert((m.to_string(), path.clone()));
        }
    }
    assert_eq!(
        served, documented,
        "the router and /openapi.json differ (left: served, right: documented)"
    );
    assert!(documented.contains(&("GET".to_string(), "/openapi.json".to_string())));
    // The response types are described, not left opaque.
    let schemas = doc["components"]["schemas"].as_object().expect("schemas");
    for t in ["JobInfo", "CheckpointInfo", "ErrorBody", "HaHealth"] {
        assert!(schemas.contains_key(t), "no schema {t}");
    }
}

#[test]
fn docs_api_md_shows_the_route_table_of_the_openapi_document() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/api.md");
    let doc = std::fs::read_to_string(&path).expect("docs/api.md");
    let start = doc
        .find("<!-- routes:")
        .expect("routes marker in docs/api.md");
    let body = &doc[start..];
    let body = &body[body.find('\n').unwrap() + 1..];
    let table = &body[..body.find("<!-- end of routes -->").expect("end marker")];
    assert_eq!(
        table,
        api::openapi_markdown(),
        "docs/api.md's route table is stale: replace it with the output of `ferry openapi --markdown`"
    );
}

#[tokio::test]
async fn yaml_syntax_error_is_400_with_line_and_column() {
    let s = ApiServer::start().await;
    let res = s
        .http
        .post(s.url("/v1/jobs"))
        .header("content-type", "text/yaml")
        .body("apiVersion: ferry.dev/v1\nkind: [Job\n  x: 1\n")
        .send()
        .await
        .unwrap();
    let body = expect_error(res, StatusCode::BAD_REQUEST, "invalid_spec").await;
    assert_eq!(body.error.details.len(), 1, "{body:?}");
    let d = &body.error.details[0];
    assert!(matches!(d.line, Some(2 | 3)), "{d:?}");
    assert!(d.column.is_some(), "{d:?}");
}

#[tokio::test]
async fn invalid_spec_is_400_with_every_problem_and_its_path() {
    let s = ApiServer::start().await;
    let spec = s
        .spec("bad", "total: 10")
        .replace("parallelism: 1", "parallelism: 0")
        .replace("key_by: user", "key_by: nosuch");
    let res = s
        .http
        .post(s.url("/v1/jobs"))
        .body(spec)
        .send()
        .await
        .unwrap();
    let body = expect_error(res, StatusCode::BAD_REQUEST, "invalid_spec").await;
    let paths: Vec<&str> = body
        .error
        .details
        .iter()
        .map(|d| d.path.as_deref().unwrap_or(""))
        .collect();
    assert!(paths.contains(&"spec.parallelism"), "{body:?}");
    assert!(paths.contains(&"spec.operators[0].key_by"), "{body:?}");
    assert!(body.error.message.contains("2 problems"), "{body:?}");
}

/// A spec naming a location outside its namespace's roots, or one inside
/// the job store or another job's output, is refused with 403
/// `location_not_allowed`, one detail per location, naming the field.
#[tokio::test]
async fn a_spec_outside_its_namespace_roots_is_403_naming_each_field() {
    let s = ApiServer::start_with_roots(|dir| {
        let d = dir.display();
        ferry_core::access::AccessPolicy::new(
            &[format!("{d}/data"), format!("{d}/out")],
            &[("payments".to_string(), vec![format!("{d}/payments")])]
                .into_iter()
                .collect(),
            "security.allowedUrls",
        )
        .unwrap()
    })
    .await;
    let post = |spec: String| {
        s.http
            .post(s.url("/v1/jobs"))
            .header("content-type", "application/yaml")
            .body(spec)
            .send()
    };
    let spec = s.spec("first", "total: 100");
    let first = s.submit(spec.clone()).await;

    let tmp = s.dir.path().display().to_string();
    // Outside every root: the sink under /etc, the source reading /etc.
    let bad = spec
        .replace(&format!("{tmp}/out/first"), "/etc/ferry-out")
        .replace(
            "    generator:\n      total: 100\n      eventTime: {step: 10ms}\n      fields:\n        user: {type: key, cardinality: 10, prefix: \"u\"}",
            "    file: {path: /etc/passwd, format: csv, header: false, schema: {user: string}}",
        );
    assert!(bad.contains("/etc/passwd"), "{bad}");
    let body = expect_error(
        post(bad).await.unwrap(),
        StatusCode::FORBIDDEN,
        "location_not_allowed",
    )
    .await;
    let fields: Vec<_> = body
        .error
        .details
        .iter()
        .map(|d| d.path.clone().unwrap())
        .collect();
    assert_eq!(
        fields,
        ["spec.source.file.path", "spec.sink.file.path"],
        "{body:?}"
    );
    assert!(
        body.error.details[0]
            .message
            .contains("file:///etc/passwd lies outside the roots namespace 'default' may use"),
        "{body:?}"
    );
    assert!(
        body.error.message.contains("security.allowedUrls"),
        "{body:?}"
    );

    // Into the first job's output.
    let into = s
        .spec("second", "total: 100")
        .replace("out/second", "out/first/x");
    let body = expect_error(
        post(into).await.unwrap(),
        StatusCode::FORBIDDEN,
        "location_not_allowed",
    )
    .await;
    assert!(
        body.error.details[0]
            .message
            .contains(&format!("of job {}", first.id)),
        "{body:?}"
    );

    // Namespace payments has roots of its own: the default's do not apply.
    let payments = s.spec("third", "total: 100").replace(
        "metadata: {name: third}",
        "metadata: {name: third, namespace: payments}",
    );
    let body = expect_error(
        post(payments.clone()).await.unwrap(),
        StatusCode::FORBIDDEN,
        "location_not_allowed",
    )
    .await;
    assert_eq!(body.error.details.len(), 2, "{body:?}");
    assert!(
        body.error.details[0]
            .message
            .contains("security.namespaces.payments.allowedUrls"),
        "{body:?}"
    );
    let inside = payments
        .replace(&format!("{tmp}/data"), &format!("{tmp}/payments/data"))
        .replace(&format!("{tmp}/out/third"), &format!("{tmp}/payments/out"));
    s.submit(inside).await;
    // Nothing of a refused job was written.
    assert!(!s.dir.path().join("out/first/x").exists());
}

#[tokio::test]
async fn invalid_json_spec_is_400() {
    let s = ApiServer::start().await;
    let res = s
        .http
        .post(s.url("/v1/jobs"))
        .header("content-type", "application/json")
        .body(r#"{"apiVersion": "ferry.dev/v1", "kind": "Job", "metadata": {"name": 5"#)
        .send()
        .await
        .unwrap();
    let body = expect_error(res, StatusCode::BAD_REQUEST, "invalid_spec").await;
    assert!(body.error.details[0].line.is_some(), "{body:?}");
}

#[tokio::test]
async fn empty_and_non_utf8_bodies_are_400() {
    let s = ApiServer::start().await;
    let res = s.http.post(s.url("/v1/jobs")).send().await.unwrap();
    let body = expect_error(res, StatusCode::BAD_REQUEST, "invalid_body").await;
    assert!(body.error.message.contains("empty"), "{body:?}");

    let res = s
        .http
        .post(s.url("/v1/jobs"))
        .body(b"kind: Job\nname: \xc3\x28\n".to_vec())
        .send()
        .await
        .unwrap();
    let body = expect_error(res, StatusCode::BAD_REQUEST, "invalid_body").await;
    assert!(body.error.message.contains("UTF-8"), "{body:?}");
    assert_eq!(body.error.details[0].line, Some(2));
}

#[tokio::test]
async fn oversize_body_is_413_json() {
    let s = ApiServer::start().await;
    let res = s
        .http
        .post(s.url("/v1/jobs"))
        .body(vec![b'#'; api::MAX_BODY_BYTES + 1])
        .send()
        .await
        .unwrap();
    let body = expect_error(res, StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large").await;
    assert!(body.error.message.contains("4 MiB"), "{body:?}");
}

#[tokio::test]
async fn bad_savepoint_flag_is_400() {
    let s = ApiServer::start().await;
    let res = s
        .http
        .delete(s.url("/v1/jobs/whatever?savepoint=maybe"))
        .send()
        .await
        .unwrap();
    let body = expect_error(res, StatusCode::BAD_REQUEST, "invalid_request").await;
    assert!(body.error.message.contains("savepoint=true"), "{body:?}");
}

#[tokio::test]
async fn server_stops_when_shutdown_is_cancelled() {
    let mut s = ApiServer::start().await;
    s.shutdown.cancel();
    let task = s.task.take().unwrap();
    let res = tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .expect("serve returns after shutdown")
        .unwrap();
    assert!(res.is_ok(), "{res:?}");
}

// ---- Routes that drive jobs (need the coordinator) ----

#[tokio::test]
async fn unknown_job_is_404_json_for_every_job_route() {
    let s = ApiServer::start().await;
    let id = "0123456789abcdef0123456789abcdef";
    let calls = [
        s.http.get(s.url(&format!("/v1/jobs/{id}"))),
        s.http
            .delete(s.url(&format!("/v1/jobs/{id}?savepoint=true"))),
        s.http.delete(s.url(&format!("/v1/jobs/{id}"))),
        s.http.post(s.url(&format!("/v1/jobs/{id}/savepoints"))),
        s.http.get(s.url(&format!("/v1/jobs/{id}/checkpoints"))),
    ];
    for call in calls {
        let res = call.send().await.unwrap();
        let body = expect_error(res, StatusCode::NOT_FOUND, "not_found").await;
        assert!(body.error.message.contains(id), "{body:?}");
    }
}

#[tokio::test]
async fn bounded_job_finishes_with_all_records_and_checkpoints() {
    let s = ApiServer::start().await;
    let submitted = s
        .submit(s.spec("api-test", &format!("total: {GENERATOR_TOTAL}")))
        .await;
    assert_eq!(submitted.name, "api-test");
    assert_eq!(submitted.parallelism, 1);
    let id = submitted.id.to_string();

    let done = s
        .wait_until(&id, "FINISHED", |j| j.state == JobState::Finished)
        .await;
    assert_eq!(done.records_in, GENERATOR_TOTAL);
    assert!(done.ended_at.is_some());

    // By name and by prefix as well as by id.
    assert_eq!(s.get_job("api-test").await.id, done.id);
    assert_eq!(s.get_job(&id[..8]).await.id, done.id);

    let res = s.http.get(s.url("/v1/jobs")).send().await.unwrap();
    assert_instance(&res);
    let list: JobList = res.json().await.unwrap();
    assert!(list.jobs.iter().any(|j| j.id == done.id), "{list:?}");

    let res = s
        .http
        .get(s.url(&format!("/v1/jobs/{id}/checkpoints")))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    let cps: CheckpointList = res.json().await.unwrap();
    let newest = cps
        .checkpoints
        .first()
        .expect("at least the final checkpoint");
    assert!(newest.finished, "{newest:?}");
    assert_eq!(newest.records_in, GENERATOR_TOTAL);
    assert!(local_path(&newest.path).join("MANIFEST.json").is_file());
    let ids: Vec<u64> = cps.checkpoints.iter().map(|c| c.id).collect();
    assert!(
        ids.windows(2).all(|w| w[0] > w[1]),
        "not newest first: {ids:?}"
    );

    // Its counters are exported.
    let text = s
        .http
        .get(s.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_ferry_metrics(&text);
    // Counters are sampled once more when the job ends: every record counts.
    let series = format!("ferry_job_records_in_total{{job=\"{id}\"}} ");
    let value = text
        .lines()
        .find_map(|l| l.strip_prefix(&series))
        .unwrap_or_else(|| panic!("no ferry_job_records_in_total for {id}:\n{text}"));
    assert_eq!(value.trim(), "20000", "{text}");

    // A finished job cannot be cancelled.
    let res = s
        .http
        .delete(s.url(&format!("/v1/jobs/{id}")))
        .send()
        .await
        .unwrap();
    expect_error(res, StatusCode::CONFLICT, "conflict").await;
}

#[tokio::test]
async fn json_spec_is_accepted() {
    let s = ApiServer::start().await;
    let yaml = s.spec("json-job", "total: 100");
    let value: serde_json::Value = serde_yaml_ng::from_str(&yaml).unwrap();
    let res = s
        .http
        .post(s.url("/v1/jobs"))
        .header("content-type", "application/json")
        .body(value.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::CREATED);
    let info: JobInfo = res.json().await.unwrap();
    s.wait_until(&info.id.to_string(), "FINISHED", |j| {
        j.state == JobState::Finished
    })
    .await;
}

#[tokio::test]
async fn cancel_with_savepoint_writes_a_manifest() {
    let s = ApiServer::start().await;
    let job = s.submit(s.spec("endless", "rate: 1000")).await;
    let id = job.id.to_string();
    s.wait_until(&id, "RUNNING with input", |j| {
        j.state == JobState::Running && j.records_in > 0
    })
    .await;

    let (status, text) = s.cancel_with_savepoint(&id).await;
    assert_eq!(status, StatusCode::OK, "{text}");
    let cancelled: CancelResponse = serde_json::from_str(&text).unwrap();
    assert_eq!(cancelled.job.state, JobState::Cancelled);
    let sp = cancelled.savepoint.expect("a savepoint was asked for");
    assert_eq!(sp.job_id, job.id);
    let dir = local_path(&sp.path);
    assert!(
        dir.join("MANIFEST.json").is_file(),
        "no MANIFEST.json in {}",
        dir.display()
    );
    assert!(
        is_inside(&dir, s.dir.path()),
        "{} outside the temp dir",
        dir.display()
    );

    // Cancelling again is a conflict, not a crash.
    let res = s
        .http
        .delete(s.url(&format!("/v1/jobs/{id}")))
        .send()
        .await
        .unwrap();
    expect_error(res, StatusCode::CONFLICT, "conflict").await;
}

/// A cancel with a savepoint whose savepoint cannot be written (here a
/// file stands where the savepoints go; in the chaos campaign, a full
/// store under a switchover) fails, and the job goes on: it restarts from
/// its newest checkpoint and runs, rather than staying CANCELLING forever
/// while its tasks run.
#[tokio::test]
async fn a_cancel_whose_savepoint_fails_leaves_the_job_running() {
    let s = ApiServer::start().await;
    let job = s.submit(s.spec("endless", "rate: 1000")).await;
    let id = job.id.to_string();
    s.wait_until(&id, "RUNNING with a checkpoint", |j| {
        j.state == JobState::Running && j.last_checkpoint.is_some()
    })
    .await;
    let cp = s
        .http
        .get(s.url(&format!("/v1/jobs/{id}")))
        .send()
        .await
        .unwrap()
        .json::<JobInfo>()
        .await
        .unwrap()
        .last_checkpoint
        .unwrap();
    // <root>/jobs/<id>/checkpoints/<n> → <root>/jobs/<id>/savepoints
    let job_dir = local_path(&cp.path)
        .parent()
        .and_then(|p| p.parent())
        .unwrap()
        .to_path_buf();
    std::fs::write(job_dir.join("savepoints"), b"in the way").unwrap();

    let (status, text) = s.cancel_with_savepoint(&id).await;
    assert!(!status.is_success(), "{status}: {text}");
    assert!(text.contains("savepoint"), "{text}");
    s.wait_until(&id, "RUNNING again after the failed stop", |j| {
        j.state == JobState::Running && j.restarts >= 1
    })
    .await;
}

#[tokio::test]
async fn savepoint_of_a_running_job_leaves_it_running() {
    let s = ApiServer::start().await;
    let job = s.submit(s.spec("sp-running", "rate: 1000")).await;
    let id = job.id.to_string();
    s.wait_until(&id, "RUNNING", |j| j.state == JobState::Running)
        .await;
    let res = s
        .http
        .post(s.url(&format!("/v1/jobs/{id}/savepoints")))
        .send()
        .await
        .unwrap();
    let status = res.status();
    let text = res.text().await.unwrap();
    assert_eq!(status, StatusCode::CREATED, "{text}");
    let sp: ferry_jobmanager::SavepointInfo = serde_json::from_str(&text).unwrap();
    assert!(local_path(&sp.path).join("MANIFEST.json").is_file());
    assert_eq!(s.get_job(&id).await.state, JobState::Running);

    let res = s
        .http
        .delete(s.url(&format!("/v1/jobs/{id}")))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    let cancelled: CancelResponse = res.json().await.unwrap();
    assert!(cancelled.savepoint.is_none());
}

fn is_inside(path: &Path, root: &Path) -> bool {
    let canon = |p: &Path| p.canonicalize().unwrap_or_else(|_| p.to_path_buf());
    canon(path).starts_with(canon(root))
}

#[tokio::test]
async fn cancel_without_savepoint_stops_a_running_job() {
    let s = ApiServer::start().await;
    let job = s.submit(s.spec("plain-cancel", "rate: 1000")).await;
    let id = job.id.to_string();
    s.wait_until(&id, "RUNNING", |j| j.state == JobState::Running)
        .await;
    let res = s
        .http
        .delete(s.url(&format!("/v1/jobs/{id}")))
        .send()
        .await
        .expect("cancel answers within the client timeout");
    assert_eq!(res.status(), StatusCode::OK);
    let cancelled: CancelResponse = res.json().await.unwrap();
    assert_eq!(cancelled.job.state, JobState::Cancelled);
    assert!(cancelled.savepoint.is_none());
}
