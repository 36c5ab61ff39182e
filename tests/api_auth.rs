//! A region whose REST API needs a bearer token (`api.auth`): static tokens
//! from a file and JWTs checked against a JWKS whose key is made here.
//! Every refusal comes with the right status and a message naming what
//! was missing: no token, an unknown one, an expired, forged,
//! wrong-issuer or `alg: none` JWT (401); a viewer cancelling, an
//! operator of another namespace, an operator failing a region over (403).
//! A standby forwards the caller's own credential and the leader checks
//! it again; a forged forwarding header grants nothing. The CLI takes the
//! token from FERRY_TOKEN or a file, and no token shows up in any log.

mod common;

use std::time::Duration;

use base64::Engine as _;
use common::ha::*;
use common::jwt::{AUDIENCE, jwt, now, signing_key};
use common::rest::{call, mutating_calls, refused};
use ferry_testkit::NatsServer;
use serde_json::{Value, json};

const ADMIN: &str = "adm-7Hq2-token-000000000001";
const PAY_OPERATOR: &str = "pay-3Kd9-token-00000000002";
const VIEWER: &str = "vwr-8Lm1-token-00000000003";
const ISSUER: &str = "https://idp.test";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_takes_only_verified_callers_with_the_role_in_the_jobs_namespace() {
    let nats = NatsServer::start();
    let mut r = Region::new(nats.url(), "800ms", "500ms");
    r.rate = 10_000; // ~80 s: still running when cancelled
    let key = signing_key("k1");
    let other = signing_key("k1"); // same kid, another key: a forgery
    let dir = r.dir.path().to_path_buf();
    let tokens = dir.join("tokens.yaml");
    std::fs::write(
        &tokens,
        format!(
            "tokens:\n  - {{name: admin, token: {ADMIN}, roles: ['*:admin']}}\n  - {{name: pay-op, token: {PAY_OPERATOR}, roles: ['payments:operator']}}\n  - {{name: viewer, token: {VIEWER}, roles: ['*:viewer']}}\n"
        ),
    )
    .unwrap();
    let jwks = dir.join("jwks.json");
    std::fs::write(&jwks, json!({"keys": [key.jwk]}).to_string()).unwrap();
    r.env = vec![
        ("FERRY_API_AUTH_TOKENS_FILE", tokens.display().to_string()),
        ("FERRY_API_AUTH_JWT_JWKS_FILE", jwks.display().to_string()),
        ("FERRY_API_AUTH_JWT_ISSUER", ISSUER.to_string()),
        ("FERRY_API_AUTH_JWT_AUDIENCE", AUDIENCE.to_string()),
    ];
    r.token = Some(ADMIN.to_string());
    r.start("jm-a", None);
    r.start("jm-b", None);
    r.start_tm("tm-1");
    let (leader, _) = r.leader(&[], Duration::from_secs(20)).await;
    let standby = 1 - leader;
    let (lead_url, standby_url) = (r.jms[leader].url(), r.jms[standby].url());
    let http = reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(60))
        .build()
        .unwrap();
    use reqwest::Method;
    let get = |path: &str, token: Option<&str>| {
        let url = format!("{lead_url}{path}");
        let http = http.clone();
        let token = token.map(str::to_string);
        async move { call(&http, Method::GET, &url, token.as_deref(), &[], None).await }
    };

    // Probes and the OpenAPI document stay open; /metrics too by default.
    for p in ["/healthz", "/readyz", "/openapi.json", "/metrics"] {
        assert_eq!(get(p, None).await.0, 200, "{p}");
    }
    // 401: no token, an unknown one, and JWTs that do not verify.
    let no_token = get("/v1/jobs", None).await;
    refused(&no_token, 401, "unauthenticated", &["bearer token"]);
    assert_eq!(no_token.1["www-authenticate"], "Bearer");
    refused(
        &get("/v1/jobs", Some("not-a-known-token-at-all")).await,
        401,
        "unauthenticated",
        &["not known"],
    );
    let hour = 3600;
    let expired = jwt(&key, "k1", "eve", &["*:admin"], now() - hour, ISSUER);
    refused(
        &get("/v1/jobs", Some(&expired)).await,
        401,
        "unauthenticated",
        &["expired"],
    );
    let forged = jwt(&other, "k1", "eve", &["*:admin"], now() + hour, ISSUER);
    refused(
        &get("/v1/jobs", Some(&forged)).await,
        401,
        "unauthenticated",
        &["signature", "forged"],
    );
    let foreign = jwt(
        &key,
        "k1",
        "eve",
        &["*:admin"],
        now() + hour,
        "https://evil.test",
    );
    refused(
        &get("/v1/jobs", Some(&foreign)).await,
        401,
        "unauthenticated",
        &["issuer"],
    );
    let unsigned = {
        let b64 = |v: Value| {
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string().as_bytes())
        };
        let claims = json!({"sub": "eve", "iss": ISSUER, "aud": AUDIENCE, "exp": now() + hour, "roles": ["*:admin"]});
        format!(
            "{}.{}.",
            b64(json!({"alg": "none", "typ": "JWT"})),
            b64(claims)
        )
    };
    refused(
        &get("/v1/jobs", Some(&unsigned)).await,
        401,
        "unauthenticated",
        &[],
    );

    // An operator of `payments` submits a job of that namespace through
    // the standby: the standby forwards its token and the leader takes it.
    let spec = r
        .spec()
        .replace("rate: 100000", &format!("rate: {}", r.rate))
        .replace(
            "metadata: {name: ha-clicks}",
            "metadata: {name: ha-clicks, namespace: payments}",
        );
    let submitted = call(
        &http,
        Method::POST,
        &format!("{standby_url}/v1/jobs"),
        Some(PAY_OPERATOR),
        &[],
        Some(spec.clone()),
    )
    .await;
    assert_eq!(submitted.0, 201, "{}", submitted.2);
    assert_eq!(
        submitted.1["x-ferry-forwarded-by"],
        r.jms[standby].id.as_str()
    );
    assert_eq!(submitted.2["namespace"], "payments");
    let job = submitted.2["id"].as_str().unwrap().to_string();

    // An operator of namespace `b` (a JWT) passes the standby's gate (it is
    // an operator somewhere), and the leader refuses it for `payments`.
    let b_operator = jwt(&key, "k1", "bob", &["b:operator"], now() + hour, ISSUER);
    let via_standby = call(
        &http,
        Method::DELETE,
        &format!("{standby_url}/v1/jobs/{job}"),
        Some(&b_operator),
        &[],
        None,
    )
    .await;
    refused(
        &via_standby,
        403,
        "forbidden",
        &["payments", "operator", "bob"],
    );
    assert_eq!(
        via_standby.1["x-ferry-forwarded-by"],
        r.jms[standby].id.as_str()
    );
    // ... and so does it asked directly; nor may bob read the job.
    refused(
        &call(
            &http,
            Method::DELETE,
            &format!("{lead_url}/v1/jobs/{job}"),
            Some(&b_operator),
            &[],
            None,
        )
        .await,
        403,
        "forbidden",
        &["namespace 'payments'"],
    );
    refused(
        &get(&format!("/v1/jobs/{job}"), Some(&b_operator)).await,
        403,
        "forbidden",
        &["viewer"],
    );
    let bobs_list = get("/v1/jobs", Some(&b_operator)).await;
    assert_eq!(bobs_list.0, 200);
    assert_eq!(
        bobs_list.2["jobs"],
        json!([]),
        "bob sees no job of payments"
    );
    // A viewer reads everything and cancels nothing.
    let list = get("/v1/jobs", Some(VIEWER)).await;
    assert_eq!(list.2["jobs"][0]["id"], job.as_str(), "{}", list.2);
    refused(
        &call(
            &http,
            Method::DELETE,
            &format!("{lead_url}/v1/jobs/{job}"),
            Some(VIEWER),
            &[],
            None,
        )
        .await,
        403,
        "forbidden",
        &["operator"],
    );
    // Submitting into another namespace is refused, with the namespace.
    let elsewhere = spec.replace("namespace: payments", "namespace: billing");
    refused(
        &call(
            &http,
            Method::POST,
            &format!("{lead_url}/v1/jobs"),
            Some(PAY_OPERATOR),
            &[],
            Some(elsewhere),
        )
        .await,
        403,
        "forbidden",
        &["namespace 'billing'"],
    );
    // Region and drill operations need an admin of every namespace.
    for (m, p) in [
        (Method::POST, "/v1/regions/other/failover?force=true"),
        (Method::POST, "/v1/drills/outage"),
        (Method::POST, "/v1/drills"),
    ] {
        let got = call(
            &http,
            m,
            &format!("{lead_url}{p}"),
            Some(PAY_OPERATOR),
            &[],
            Some("{}".into()),
        )
        .await;
        refused(&got, 403, "forbidden", &["admin", "every namespace"]);
    }
    // An admin records a drill report through the standby: the stored
    // report names the admin, whatever actor its body claims.
    let recorded = call(
        &http,
        Method::POST,
        &format!("{}/v1/drills", r.jms[standby].url()),
        Some(ADMIN),
        &[],
        Some(r#"{"id": "drill-actor-1", "passed": true, "actor": "someone-else"}"#.into()),
    )
    .await;
    assert_eq!(recorded.0, 201, "{}", recorded.2);
    assert_eq!(recorded.2["actor"], "admin", "{}", recorded.2);
    // A forged forwarding header with a claimed identity grants nothing.
    let forged_forward = call(
        &http,
        Method::POST,
        &format!("{lead_url}/v1/jobs"),
        None,
        &[
            ("x-ferry-forwarded-by", r.jms[standby].id.as_str()),
            ("x-ferry-user", "admin"),
        ],
        Some(spec.clone()),
    )
    .await;
    refused(&forged_forward, 401, "unauthenticated", &[]);

    // The CLI: without a token it says how to give one; with FERRY_TOKEN
    // or --token-file it works.
    let cli = |envs: &[(&str, String)], args: &[&str]| {
        let mut c = std::process::Command::new(common::ferry_bin());
        c.args(["job", "list", "--url", &lead_url]).args(args);
        c.env_remove("FERRY_TOKEN").env_remove("FERRY_TOKEN_FILE");
        for (k, v) in envs {
            c.env(k, v);
        }
        c.output().unwrap()
    };
    let out = cli(&[], &[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("FERRY_TOKEN"), "{err}");
    let out = cli(&[("FERRY_TOKEN", VIEWER.to_string())], &[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("ha-clicks"));
    let token_file = dir.join("cli-token");
    std::fs::write(&token_file, format!("{VIEWER}\n")).unwrap();
    let out = cli(&[], &["--token-file", &token_file.display().to_string()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // An admin (a JWT) cancels the job with a savepoint.
    let admin = jwt(&key, "k1", "alice", &["*:admin"], now() + hour, ISSUER);
    let cancelled = call(
        &http,
        Method::DELETE,
        &format!("{standby_url}/v1/jobs/{job}?savepoint=true"),
        Some(&admin),
        &[],
        None,
    )
    .await;
    assert_eq!(cancelled.0, 200, "{}", cancelled.2);
    assert_eq!(cancelled.2["job"]["state"], "CANCELLED");

    // The audit trail has every mutating call that got past
    // authentication, with its actor and result, recorded once by the
    // leader (naming the standby for forwarded calls); `*:viewer` reads
    // it, bob may not.
    refused(
        &get("/v1/audit", Some(&b_operator)).await,
        403,
        "forbidden",
        &["every namespace"],
    );
    let trail = get("/v1/audit?limit=1000", Some(VIEWER)).await;
    assert_eq!(trail.0, 200, "{}", trail.2);
    let entries = trail.2["entries"].as_array().unwrap().clone();
    let lead_id = r.jms[leader].id.clone();
    let standby_id = r.jms[standby].id.clone();
    let find = |actor: &str, action: &str, status: u64| -> Vec<Value> {
        entries
            .iter()
            .filter(|e| e["actor"] == actor && e["action"] == action && e["status"] == status)
            .cloned()
            .collect()
    };
    let sub = find("pay-op", "POST /v1/jobs", 201);
    assert_eq!(sub.len(), 1, "{entries:#?}");
    assert_eq!(sub[0]["job"], job.as_str());
    assert_eq!(sub[0]["result"], "ok");
    assert_eq!(sub[0]["auth"], "token");
    assert_eq!(sub[0]["instance"], lead_id.as_str());
    assert_eq!(sub[0]["forwarded_by"], standby_id.as_str());
    let bob = find("bob", &format!("DELETE /v1/jobs/{job}"), 403);
    assert_eq!(bob.len(), 2, "via the standby and directly: {entries:#?}");
    assert!(
        bob.iter()
            .all(|e| e["result"] == "forbidden" && e["auth"] == "jwt")
    );
    assert_eq!(
        find("viewer", &format!("DELETE /v1/jobs/{job}"), 403).len(),
        1
    );
    assert_eq!(
        find("pay-op", "POST /v1/jobs", 403).len(),
        1,
        "the billing job"
    );
    for p in [
        "/v1/regions/other/failover",
        "/v1/drills/outage",
        "/v1/drills",
    ] {
        assert_eq!(find("pay-op", &format!("POST {p}"), 403).len(), 1, "{p}");
    }
    let cancel = find("alice", &format!("DELETE /v1/jobs/{job}"), 200);
    assert_eq!(cancel.len(), 1, "{entries:#?}");
    assert_eq!(cancel[0]["forwarded_by"], standby_id.as_str());
    assert_eq!(
        find("admin", "POST /v1/drills", 201).len(),
        1,
        "{entries:#?}"
    );
    // Every mutating call this test made past authentication, and no
    // other, is in the trail once, with an actor and a result.
    assert_eq!(entries.len(), mutating_calls(), "{entries:#?}");
    assert!(
        entries
            .iter()
            .all(|e| e["actor"].as_str().is_some_and(|a| !a.is_empty())
                && e["result"].as_str().is_some_and(|r| !r.is_empty())),
        "{entries:#?}"
    );
    // Refusals for want of a credential are counted, not stored.
    assert!(entries.iter().all(|e| e["status"] != 401), "{entries:#?}");
    let metrics = get("/metrics", None).await.2;
    let unauthenticated: u64 = metrics
        .as_str()
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("ferry_api_unauthenticated_total "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    assert!(
        unauthenticated >= 6,
        "ferry_api_unauthenticated_total {unauthenticated}"
    );
    // `ferry audit` shows the same trail.
    let out = std::process::Command::new(common::ferry_bin())
        .args(["audit", "--url", &lead_url, "--limit", "100"])
        .env("FERRY_TOKEN", VIEWER)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("alice (jwt)") && text.contains("403 forbidden"),
        "{text}"
    );

    // No credential shows up in any log.
    for id in ["jm-a", "jm-b", "tm-1"] {
        let log = r.log(id);
        assert!(!log.is_empty(), "{id} logged nothing");
        for secret in [
            ADMIN,
            PAY_OPERATOR,
            VIEWER,
            admin.as_str(),
            b_operator.as_str(),
        ] {
            assert!(
                !log.contains(secret),
                "{id}'s log shows a credential:\n{log}"
            );
        }
    }
}
