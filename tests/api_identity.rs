//! The REST API's other ways to know a caller, on a region of real
//! `ferry jobmanager` processes over HTTPS:
//!
//! - JWTs checked against a JWKS **URL** (an HTTPS endpoint served here,
//!   trusted through `api.auth.jwt.jwksCaFile`): a token signed by a key
//!   the issuer adds later works at once (the set is fetched again for an
//!   unknown key id), while a flood of made-up key ids costs the issuer at
//!   most one fetch;
//! - a tokens file replaced mid-run: the new token works and the removed
//!   one is refused, with no restart;
//! - **client certificates** of the callers' CA (`api.auth.clientCertificates`):
//!   a known identity submits a job in its namespace through a standby,
//!   which forwards it under its own JobManager certificate, and the audit
//!   trail names the certificate's identity; an unknown identity gets 403,
//!   a certificate of another CA no TLS connection, a JobManager's own
//!   certificate is no caller, and `x-ferry-forwarded-identity` from
//!   anyone but a JobManager gets 401.

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::ha::*;
use common::jwt::{AUDIENCE, jwt, now, signing_key};
use common::rest::{call, mutating_calls, refused};
use ferry_core::tls::{ClientAuth, ServerStream, ServerTls, TlsFiles};
use ferry_testkit::NatsServer;
use ferry_testkit::pki::{Leaf, Pki};
use reqwest::Method;
use serde_json::{Value, json};

const ADMIN: &str = "adm-5Tq8-token-000000000011";
const OLD_VIEWER: &str = "old-vwr-token-00000000012";
const NEW_VIEWER: &str = "new-vwr-token-00000000013";
const ISSUER: &str = "https://idp.ferry.test";

/// A JWKS endpoint over HTTPS whose document the test changes, counting
/// the fetches.
struct Idp {
    url: String,
    jwks: Arc<Mutex<Value>>,
    fetches: Arc<AtomicUsize>,
}

/// Connections accepted by [`ferry_core::tls::accept`], for axum.
struct Conns {
    rx: tokio::sync::mpsc::Receiver<(ServerStream, SocketAddr)>,
    local: SocketAddr,
}

impl axum::serve::Listener for Conns {
    type Io = ServerStream;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (ServerStream, SocketAddr) {
        match self.rx.recv().await {
            Some(c) => c,
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<SocketAddr> {
        Ok(self.local)
    }
}

async fn idp(leaf: &Leaf, jwks: Value) -> Idp {
    let files = TlsFiles::new("idp", &leaf.cert, &leaf.key, &leaf.ca);
    let tls = ServerTls::load(
        files,
        ClientAuth::None,
        &[b"http/1.1"],
        Duration::from_secs(3600),
    )
    .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let local = listener.local_addr().unwrap();
    let rx = ferry_core::tls::accept(listener, tls, Arc::new(|| {}), None);
    let jwks = Arc::new(Mutex::new(jwks));
    let fetches = Arc::new(AtomicUsize::new(0));
    let (doc, count) = (jwks.clone(), fetches.clone());
    let app = axum::Router::new().route(
        "/.well-known/jwks.json",
        axum::routing::get(move || {
            let (doc, count) = (doc.clone(), count.clone());
            async move {
                count.fetch_add(1, Ordering::SeqCst);
                axum::Json(doc.lock().unwrap().clone())
            }
        }),
    );
    tokio::spawn(async move { axum::serve(Conns { rx, local }, app).await });
    Idp {
        url: format!("https://127.0.0.1:{}/.well-known/jwks.json", local.port()),
        jwks,
        fetches,
    }
}

/// An HTTPS client trusting `ca` (PEM file), presenting `identity` when
/// given.
fn client(ca: &std::path::Path, identity: Option<&Leaf>) -> reqwest::Client {
    let ca = reqwest::Certificate::from_pem_bundle(&std::fs::read(ca).unwrap()).unwrap();
    let mut b = reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(60))
        .tls_certs_only(ca);
    if let Some(leaf) = identity {
        let mut pem = std::fs::read(&leaf.cert).unwrap();
        pem.extend(std::fs::read(&leaf.key).unwrap());
        b = b.identity(reqwest::Identity::from_pem(&pem).unwrap());
    }
    b.build().unwrap()
}

/// `GET url` with `token`, as [`call`] answers it.
async fn get(
    http: &reqwest::Client,
    url: &str,
    token: Option<&str>,
) -> (u16, reqwest::header::HeaderMap, Value) {
    call(http, Method::GET, url, token, &[], None).await
}

fn tokens_yaml(viewer: &str) -> String {
    format!(
        "tokens:\n  - {{name: admin, token: {ADMIN}, roles: ['*:admin']}}\n  - {{name: viewer, token: {viewer}, roles: ['*:viewer']}}\n"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn callers_are_known_by_a_jwks_url_a_reloaded_tokens_file_and_client_certificates() {
    let nats = NatsServer::start();
    let mut r = Region::new(nats.url(), "800ms", "500ms");
    r.rate = 20_000; // ~40 s: still running while the test looks
    let dir = r.dir.path().join("pki");
    let region = Pki::new(&dir, "region");
    let jm_leaf = region.issue("jobmanager", &["127.0.0.1", "localhost"]);
    let callers = Pki::new(&dir, "callers");
    let ci = callers.issue("ci-bot", &["ci-bot.ferry.test"]);
    let stranger = callers.issue("stranger", &["stranger.ferry.test"]);
    // Same name, another CA: not a caller of this region.
    let rogue = Pki::new(&dir, "rogue").issue("ci-bot", &["ci-bot.ferry.test"]);
    let idp_pki = Pki::new(&dir, "idp");
    let idp_leaf = idp_pki.issue("idp", &["127.0.0.1"]);
    let (k1, k2) = (signing_key("k1"), signing_key("k2"));
    let idp = idp(&idp_leaf, json!({"keys": [k1.jwk]})).await;

    let tokens = r.dir.path().join("tokens.yaml");
    std::fs::write(&tokens, tokens_yaml(OLD_VIEWER)).unwrap();
    r.jm_env = vec![
        (
            "FERRY_TLS_API_CERT_FILE",
            jm_leaf.cert.display().to_string(),
        ),
        ("FERRY_TLS_API_KEY_FILE", jm_leaf.key.display().to_string()),
        ("FERRY_TLS_API_CA_FILE", jm_leaf.ca.display().to_string()),
        ("FERRY_TLS_RELOAD_INTERVAL", "200ms".to_string()),
        ("FERRY_API_AUTH_TOKENS_FILE", tokens.display().to_string()),
        ("FERRY_API_AUTH_JWT_JWKS_URL", idp.url.clone()),
        (
            "FERRY_API_AUTH_JWT_JWKS_CA_FILE",
            idp_pki.ca_file().display().to_string(),
        ),
        ("FERRY_API_AUTH_JWT_ISSUER", ISSUER.to_string()),
        ("FERRY_API_AUTH_JWT_AUDIENCE", AUDIENCE.to_string()),
        (
            "FERRY_API_AUTH_CLIENT_CERTIFICATES_CA_FILE",
            callers.ca_file().display().to_string(),
        ),
        (
            "FERRY_API_AUTH_CLIENT_CERTIFICATES_IDENTITIES",
            "ci-bot=payments:operator *:viewer".to_string(),
        ),
    ];
    r.token = Some(ADMIN.to_string());
    r.trust(std::fs::read(region.ca_file()).unwrap());
    r.start("jm-a", None);
    r.start("jm-b", None);
    r.start_tm("tm-1");
    let (leader, _) = r.leader(&[], Duration::from_secs(20)).await;
    let standby = 1 - leader;
    let (lead_url, standby_url) = (r.jms[leader].url(), r.jms[standby].url());
    let ca = region.ca_file();
    let plain = client(&ca, None);
    let hour = 3600;

    // JWTs: the JWKS URL was fetched at start.
    let reader = jwt(&k1, "k1", "reader", &["*:viewer"], now() + hour, ISSUER);
    let got = get(&plain, &format!("{lead_url}/v1/jobs"), Some(&reader)).await;
    assert_eq!(got.0, 200, "{}", got.2);
    // The issuer adds k2; a token it signs works at once.
    idp.jwks.lock().unwrap()["keys"] = json!([k1.jwk, k2.jwk]);
    let fresh = jwt(&k2, "k2", "fresh", &["*:viewer"], now() + hour, ISSUER);
    let got = get(&plain, &format!("{lead_url}/v1/jobs"), Some(&fresh)).await;
    assert_eq!(got.0, 200, "a token of the new key: {}", got.2);
    // Made-up key ids: refused, and the issuer is not flooded.
    let before = idp.fetches.load(Ordering::SeqCst);
    for i in 0..5 {
        let kid = format!("k-made-up-{i}");
        let t = jwt(&k2, &kid, "eve", &["*:admin"], now() + hour, ISSUER);
        let got = get(&plain, &format!("{lead_url}/v1/jobs"), Some(&t)).await;
        refused(
            &got,
            401,
            "unauthenticated",
            &["no key of the JWKS has key id"],
        );
    }
    let extra = idp.fetches.load(Ordering::SeqCst) - before;
    assert!(extra <= 1, "{extra} fetches for 5 unknown key ids");

    // The tokens file is replaced: the new viewer works, the old is gone.
    let got = get(&plain, &format!("{lead_url}/v1/jobs"), Some(OLD_VIEWER)).await;
    assert_eq!(got.0, 200, "{}", got.2);
    let tmp = tokens.with_extension("tmp");
    std::fs::write(&tmp, tokens_yaml(NEW_VIEWER)).unwrap();
    std::fs::rename(&tmp, &tokens).unwrap();
    let start = Instant::now();
    loop {
        let new = get(&plain, &format!("{lead_url}/v1/jobs"), Some(NEW_VIEWER)).await;
        if new.0 == 200 {
            break;
        }
        refused(&new, 401, "unauthenticated", &["not known"]);
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "the new tokens file was not taken"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let old = get(&plain, &format!("{lead_url}/v1/jobs"), Some(OLD_VIEWER)).await;
    refused(&old, 401, "unauthenticated", &["not known"]);

    // Client certificates: ci-bot submits in its namespace through the
    // standby; the leader runs the job and records ci-bot.
    let ci_http = client(&ca, Some(&ci));
    let spec = r
        .spec()
        .replace("rate: 100000", &format!("rate: {}", r.rate))
        .replace(
            "metadata: {name: ha-clicks}",
            "metadata: {name: ha-clicks, namespace: payments}",
        );
    let submitted = call(
        &ci_http,
        Method::POST,
        &format!("{standby_url}/v1/jobs"),
        None,
        &[("content-type", "application/yaml")],
        Some(spec.clone()),
    )
    .await;
    assert_eq!(submitted.0, 201, "{}", submitted.2);
    assert_eq!(
        submitted.1["x-ferry-forwarded-by"],
        r.jms[standby].id.as_str()
    );
    let job = submitted.2["id"].as_str().unwrap().to_string();
    // ci-bot may not fail a region over, and is told which grant it lacks.
    let got = call(
        &ci_http,
        Method::POST,
        &format!("{lead_url}/v1/regions/other/failover"),
        None,
        &[],
        None,
    )
    .await;
    refused(&got, 403, "forbidden", &["*:admin", "ci-bot"]);
    // A certificate the callers' CA signed for a name with no grants.
    let got = get(
        &client(&ca, Some(&stranger)),
        &format!("{lead_url}/v1/jobs"),
        None,
    )
    .await;
    refused(&got, 403, "forbidden", &["stranger"]);
    // Another CA's certificate does not get a connection at all.
    let rogue_try = client(&ca, Some(&rogue))
        .get(format!("{lead_url}/v1/jobs"))
        .send()
        .await;
    assert!(
        rogue_try.is_err(),
        "a certificate of another CA was served: {rogue_try:?}"
    );
    // A JobManager's own certificate is no caller ...
    let jm_http = client(&ca, Some(&jm_leaf));
    let got = get(&jm_http, &format!("{lead_url}/v1/jobs"), None).await;
    refused(&got, 401, "unauthenticated", &["bearer token"]);
    // ... and a forwarded identity from anyone else counts for nothing.
    for (http, token) in [(&ci_http, None), (&plain, Some(ADMIN))] {
        let got = call(
            http,
            Method::DELETE,
            &format!("{lead_url}/v1/jobs/{job}"),
            token,
            &[("x-ferry-forwarded-identity", "admin")],
            None,
        )
        .await;
        refused(
            &got,
            401,
            "unauthenticated",
            &["x-ferry-forwarded-identity", "JobManager"],
        );
    }

    // The audit trail names ci-bot as the submitter, forwarded by the
    // standby, and the refused failover.
    let trail = get(
        &plain,
        &format!("{lead_url}/v1/audit?limit=1000"),
        Some(ADMIN),
    )
    .await;
    assert_eq!(trail.0, 200, "{}", trail.2);
    let entries = trail.2["entries"].as_array().unwrap();
    let submit = entries
        .iter()
        .find(|e| e["action"] == "POST /v1/jobs" && e["job"] == job.as_str())
        .unwrap_or_else(|| panic!("no audit entry of the submit: {}", trail.2));
    assert_eq!(submit["actor"], "ci-bot", "{submit}");
    assert_eq!(submit["auth"], "certificate", "{submit}");
    assert_eq!(submit["status"], 201, "{submit}");
    assert_eq!(
        submit["forwarded_by"],
        r.jms[standby].id.as_str(),
        "{submit}"
    );
    // Every mutating call past authentication, once (the two forged
    // forwards were refused as unauthenticated: counted, not stored).
    assert_eq!(entries.len(), mutating_calls(), "{}", trail.2);
    assert!(
        entries
            .iter()
            .any(|e| e["action"] == "POST /v1/regions/other/failover"
                && e["actor"] == "ci-bot"
                && e["status"] == 403),
        "{}",
        trail.2
    );

    // The job ran undisturbed, exactly once.
    let done = r.finished(leader, &job, Duration::from_secs(120)).await;
    assert_eq!(done["restarts"], 0, "{done}");
    r.check_output();
    // No token or key showed up in a log.
    for jm in &r.jms {
        let log = r.log(&jm.id);
        for secret in [
            ADMIN,
            OLD_VIEWER,
            NEW_VIEWER,
            reader.as_str(),
            fresh.as_str(),
        ] {
            assert!(!log.contains(secret), "{} logged a credential", jm.id);
        }
    }
}
