//! Secure mode end to end: two regions in which every link runs over TLS
//! with authentication — the regional NATS (TLS with client certificates
//! and a password), the global NATS cluster (TLS with client certificates
//! and a token), the REST API (HTTPS with bearer tokens), JobManager ↔
//! TaskManager gRPC (mutual TLS). A job survives a leader failover in the
//! primary and then the loss of the whole primary region with its output
//! exactly once; every mutating call is in the audit trail with its actor;
//! the new primary announces its automatic promotion to an HTTPS webhook
//! (the region's CA, a bearer token); and no secret — passwords, tokens,
//! private keys, the webhook's token and path — shows up in any log line
//! or API answer.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::ha::*;
use ferry_testkit::pki::{Leaf, Pki};
use ferry_testkit::{NatsCluster, NatsServer};
use serde_json::Value;

const NATS_PASSWORD: &str = "nats-pw-Sec-4471";
const GLOBAL_TOKEN: &str = "global-tok-Sec-8812";
const ADMIN: &str = "admin-tok-Sec-1209";
const HOOK_TOKEN: &str = "hook-tok-Sec-5530";
/// The name every TaskManager certificate carries.
const TM_NAME: &str = "taskmanager.ferry.test";

/// A `nats-server` block: TLS with `server`'s certificate, clients must
/// present one signed by `ca`.
fn nats_tls(server: &Leaf, ca: &Path) -> String {
    format!(
        "tls {{\n  cert_file: \"{}\"\n  key_file: \"{}\"\n  ca_file: \"{}\"\n  verify: true\n  timeout: 2\n}}\n",
        server.cert.display(),
        server.key.display(),
        ca.display()
    )
}

fn write(path: &Path, text: &str) -> String {
    std::fs::write(path, text).unwrap();
    path.display().to_string()
}

/// The body line of a PEM private key: a secret that must never be shown.
fn key_body(leaf: &Leaf) -> String {
    std::fs::read_to_string(&leaf.key)
        .unwrap()
        .lines()
        .find(|l| !l.starts_with("-----") && l.len() > 40)
        .expect("a PEM body line")
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_regions_in_secure_mode_fail_over_exactly_once_and_leak_nothing() {
    let pki_dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(pki_dir.path(), "ferry");
    let nats_server = pki.issue("nats", &["127.0.0.1", "localhost"]);
    let nats_client = pki.issue("nats-client", &["ferry"]);
    let api = pki.issue("api", &["127.0.0.1", "localhost"]);
    let grpc_jm = pki.issue("grpc-jobmanager", &["jobmanager.ferry.test"]);
    let grpc_tm = pki.issue("grpc-taskmanager", &[TM_NAME]);
    let ca = pki.ca_file();

    let nats = NatsServer::start_configured(&format!(
        "{}authorization {{\n  users = [ {{ user: ferry, password: \"{NATS_PASSWORD}\" }} ]\n}}\n",
        nats_tls(&nats_server, &ca)
    ));
    let global = NatsCluster::start_configured(
        3,
        &format!(
            "{}authorization {{\n  token: \"{GLOBAL_TOKEN}\"\n}}\n",
            nats_tls(&nats_server, &ca)
        ),
    );
    let mut east = Region::new(nats.url(), "800ms", "500ms");
    let mut west = Region::new(nats.url(), "800ms", "500ms");
    two_regions(&mut east, &mut west, &global);
    east.rate = 40_000; // ~20 s: still running through both failovers
    let secrets_dir = pki_dir.path().join("secrets");
    std::fs::create_dir_all(&secrets_dir).unwrap();
    let password = write(&secrets_dir.join("nats-password"), NATS_PASSWORD);
    let token = write(&secrets_dir.join("global-token"), GLOBAL_TOKEN);
    let tokens = write(
        &secrets_dir.join("tokens.yaml"),
        &format!("tokens:\n  - {{name: sre-admin, token: {ADMIN}, roles: ['*:admin']}}\n"),
    );
    let path = |p: &Path| p.display().to_string();
    for r in [&mut east, &mut west] {
        r.env.extend([
            ("FERRY_NATS_USER", "ferry".to_string()),
            ("FERRY_NATS_PASSWORD_FILE", password.clone()),
            ("FERRY_NATS_TLS_CA_FILE", path(&ca)),
            ("FERRY_NATS_TLS_CERT_FILE", path(&nats_client.cert)),
            ("FERRY_NATS_TLS_KEY_FILE", path(&nats_client.key)),
            ("FERRY_REGIONS_GLOBAL_TOKEN_FILE", token.clone()),
            ("FERRY_REGIONS_GLOBAL_TLS_CA_FILE", path(&ca)),
            (
                "FERRY_REGIONS_GLOBAL_TLS_CERT_FILE",
                path(&nats_client.cert),
            ),
            ("FERRY_REGIONS_GLOBAL_TLS_KEY_FILE", path(&nats_client.key)),
        ]);
        r.jm_env = vec![
            ("FERRY_TLS_API_CERT_FILE", path(&api.cert)),
            ("FERRY_TLS_API_KEY_FILE", path(&api.key)),
            ("FERRY_TLS_API_CA_FILE", path(&ca)),
            ("FERRY_API_AUTH_TOKENS_FILE", tokens.clone()),
            ("FERRY_TLS_GRPC_CERT_FILE", path(&grpc_jm.cert)),
            ("FERRY_TLS_GRPC_KEY_FILE", path(&grpc_jm.key)),
            ("FERRY_TLS_GRPC_CA_FILE", path(&ca)),
            ("FERRY_TLS_GRPC_SERVER_NAME", TM_NAME.to_string()),
        ];
        r.tm_env = vec![
            ("FERRY_TLS_GRPC_CERT_FILE", path(&grpc_tm.cert)),
            ("FERRY_TLS_GRPC_KEY_FILE", path(&grpc_tm.key)),
            ("FERRY_TLS_GRPC_CA_FILE", path(&ca)),
            (
                "FERRY_TLS_GRPC_CLIENT_NAME",
                "jobmanager.ferry.test".to_string(),
            ),
        ];
        r.token = Some(ADMIN.to_string());
        r.trust(std::fs::read(&ca).unwrap());
    }
    // West announces its promotion to an HTTPS webhook that trusts only
    // the region's CA, with a bearer token.
    let receiver = pki.issue("webhook", &["127.0.0.1"]);
    let (hook_url, mut hook) = https_webhook_receiver(&receiver).await;
    let hook_token = write(&secrets_dir.join("webhook-token"), HOOK_TOKEN);
    west.jm_env.extend([
        ("FERRY_REGIONS_WEBHOOK", hook_url),
        ("FERRY_REGIONS_WEBHOOK_CA_FILE", path(&ca)),
        ("FERRY_REGIONS_WEBHOOK_TOKEN_FILE", hook_token),
    ]);
    start_two_regions(&mut east, &mut west).await;
    east.start("jm-east-b", None);
    for r in [&east, &west] {
        assert!(r.jms[0].url().starts_with("https://"));
        assert!(r.tm_grpc_url(&r.tms[0].id).await.starts_with("https://"));
    }
    let epoch = wait_lease(&east).await;
    let (leader, jm_epoch) = east.leader(&[], Duration::from_secs(20)).await;
    let job = east.running_job(leader).await;
    let mut answers = vec![east.get(&east.jms[leader], "/v1/regions").await.unwrap()];

    // The submit is in the audit trail, with its actor and result.
    let trail = east
        .get(&east.jms[leader], "/v1/audit?limit=100")
        .await
        .expect("the audit trail");
    let submits: Vec<&Value> = trail["entries"]
        .as_array()
        .expect("entries")
        .iter()
        .filter(|e| e["action"] == "POST /v1/jobs")
        .collect();
    assert_eq!(submits.len(), 1, "{trail}");
    assert_eq!(submits[0]["actor"], "sre-admin", "{trail}");
    assert_eq!(submits[0]["auth"], "token", "{trail}");
    assert_eq!(submits[0]["status"], 201, "{trail}");
    assert_eq!(submits[0]["job"], job.as_str(), "{trail}");
    answers.push(trail);

    // Leader failover in the primary: the standby adopts the job.
    east.jms[leader].signal(libc::SIGKILL);
    let (next, next_epoch) = east.leader(&[leader], Duration::from_secs(20)).await;
    assert!(next_epoch > jm_epoch);
    let start = Instant::now();
    while !east
        .manifest_epochs(&job)
        .values()
        .any(|e| *e == next_epoch)
    {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "no checkpoint under the new leader's epoch {next_epoch}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // West holds a replicated checkpoint.
    let start = Instant::now();
    loop {
        let v = east.get(&east.jms[next], "/v1/regions").await.unwrap();
        if v["standbys"][0]["jobs"][&job]["replicated_checkpoint"].is_u64() {
            answers.push(v);
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(20), "{v}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // The whole primary region dies; west takes over and finishes the job.
    east.jms[next].signal(libc::SIGKILL);
    east.tms[0].signal(libc::SIGKILL);
    let v = wait_primary(&west, 0, "west", Duration::from_secs(20)).await;
    assert!(v["epoch"].as_u64().unwrap() > epoch, "{v}");
    // Nobody asked for this failover: the webhook hears it was automatic.
    let announced = tokio::time::timeout(Duration::from_secs(10), hook.recv())
        .await
        .expect("west's announcement")
        .unwrap();
    assert_eq!(announced.body["event"], "promoted", "{:?}", announced.body);
    assert_eq!(announced.body["actor"], "automatic", "{:?}", announced.body);
    assert_eq!(announced.body["epoch"], v["epoch"], "{:?}", announced.body);
    assert_eq!(
        announced.authorization.as_deref(),
        Some(format!("Bearer {HOOK_TOKEN}").as_str())
    );
    answers.push(v);
    let done = west
        .wait_job(
            &west.jms[0],
            &job,
            Duration::from_secs(120),
            "the job to finish in west",
            |v| v["state"] == "FINISHED",
        )
        .await;
    assert_eq!(done["taskmanager"], "tm-west", "{done}");
    east.check_output();
    answers.push(done);
    for path in ["/v1/jobs", "/v1/cluster", "/v1/audit", "/health/regions"] {
        answers.push(west.get(&west.jms[0], path).await.expect(path));
    }

    // No secret anywhere: not in a log line of any process, not in any
    // answer, not in a job's failure field.
    let secrets = [
        NATS_PASSWORD.to_string(),
        GLOBAL_TOKEN.to_string(),
        ADMIN.to_string(),
        HOOK_TOKEN.to_string(),
        "hook-path-s3cret".to_string(),
        key_body(&nats_client),
        key_body(&api),
        key_body(&grpc_jm),
        key_body(&grpc_tm),
    ];
    let logs = [
        (&east, "jm-east"),
        (&east, "jm-east-b"),
        (&east, "tm-east"),
        (&west, "jm-west"),
        (&west, "tm-west"),
    ];
    for (r, id) in logs {
        let log = r.log(id);
        assert!(log.lines().count() >= 3, "{id} logged too little:\n{log}");
        for s in &secrets {
            assert!(!log.contains(s.as_str()), "{id}'s log shows a secret");
        }
    }
    for a in &answers {
        let text = a.to_string();
        for s in &secrets {
            assert!(
                !text.contains(s.as_str()),
                "an API answer shows a secret: {text}"
            );
        }
    }
}

/// `ferry jobmanager` and `ferry taskmanager` refuse to listen beyond
/// loopback without TLS and authentication, naming each unprotected
/// listener; `--insecure` starts them anyway, with a warning.
#[test]
fn a_process_listening_beyond_loopback_without_protection_refuses_to_start() {
    use std::process::{Command, Stdio};
    let dir = tempfile::tempdir().unwrap();
    let base = |role: &str| {
        let mut cmd = Command::new(common::ferry_bin());
        cmd.arg(role)
            .env("FERRY_REGION", "test")
            .env("FERRY_NATS_URLS", "nats://127.0.0.1:1")
            .env("FERRY_STORAGE", format!("file://{}", dir.path().display()))
            .env("FERRY_API_LISTEN", "0.0.0.0:0")
            .env("FERRY_TASKMANAGER_LISTEN", "0.0.0.0:0")
            .env("FERRY_TASKMANAGER_HTTP_LISTEN", "127.0.0.1:0")
            .stdin(Stdio::null());
        cmd
    };
    for (role, says) in [
        (
            "jobmanager",
            "api.listen 0.0.0.0:0 is not a loopback address, and the REST API has no TLS (tls.api) and no authentication (api.auth)",
        ),
        (
            "taskmanager",
            "taskmanager.listen 0.0.0.0:0 is not a loopback address, and the gRPC port has no mutual TLS (tls.grpc)",
        ),
    ] {
        let out = base(role).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{role}: {err}");
        assert!(err.contains(says), "{role}: {err}");
        assert!(err.contains("pass --insecure"), "{role}: {err}");
    }
    // With --insecure it starts (and keeps trying to reach NATS), warning.
    let log_path = dir.path().join("insecure.log");
    let mut child = base("jobmanager")
        .arg("--insecure")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log_path).unwrap())
        .spawn()
        .unwrap();
    let start = Instant::now();
    let log = loop {
        let log = std::fs::read_to_string(&log_path).unwrap_or_default();
        if log.contains("connecting to NATS") {
            break log;
        }
        assert!(
            child.try_wait().unwrap().is_none(),
            "it exited despite --insecure:\n{log}"
        );
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "it did not start:\n{log}"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let _ = child.kill();
    let _ = child.wait();
    assert!(
        log.contains("--insecure: api.listen 0.0.0.0:0 is not a loopback address"),
        "{log}"
    );
}
