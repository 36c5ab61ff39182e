//! The REST API over HTTPS (`tls.api`) with authentication, with
//! certificates made inside the test: a region of real `ferry jobmanager`
//! and `ferry taskmanager` processes against a real `nats-server` takes a
//! job through a standby (forwarded to the leader over HTTPS) and runs it
//! exactly once; a plaintext request is answered `400 https_required`; the
//! CLI works with `--ca-cert` and says what to do without it; a replaced
//! certificate is served to new connections with no restart.

mod common;

use std::time::{Duration, Instant};

use common::ha::*;
use ferry_core::tls::{ClientTls, Connector, TlsFiles};
use ferry_testkit::NatsServer;
use ferry_testkit::pki::{Leaf, Pki};
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use tonic::codegen::Service;

const ADMIN: &str = "admin-token-3f9c2a7e51d04b68";

/// The certificate the JobManager on `port` presents to a new connection.
async fn served_certificate(port: u16, leaf: &Leaf) -> Vec<u8> {
    let files = TlsFiles {
        link: "api",
        cert: leaf.cert.clone(),
        key: leaf.key.clone(),
        ca: leaf.ca.clone(),
        callers_ca: None,
    };
    let tls = ClientTls::load(files, &[b"http/1.1"], Duration::from_secs(3600)).unwrap();
    let io = Connector::new(tls, None)
        .call(format!("https://127.0.0.1:{port}").parse().unwrap())
        .await
        .expect("a TLS connection to the API")
        .into_inner();
    io.get_ref().1.peer_certificates().unwrap()[0].to_vec()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_region_serves_its_api_over_https_and_refuses_plaintext() {
    let nats = NatsServer::start();
    let mut r = Region::new(nats.url(), "800ms", "500ms");
    r.rate = 40_000;
    let pki = Pki::new(&r.dir.path().join("pki"), "region");
    let leaf = pki.issue("jobmanager", &["127.0.0.1", "localhost"]);
    let tokens = r.dir.path().join("tokens.yaml");
    std::fs::write(
        &tokens,
        format!("tokens:\n  - {{name: admin, token: {ADMIN}, roles: ['*:admin']}}\n"),
    )
    .unwrap();
    r.jm_env = vec![
        ("FERRY_TLS_API_CERT_FILE", leaf.cert.display().to_string()),
        ("FERRY_TLS_API_KEY_FILE", leaf.key.display().to_string()),
        ("FERRY_TLS_API_CA_FILE", leaf.ca.display().to_string()),
        ("FERRY_TLS_RELOAD_INTERVAL", "200ms".to_string()),
        ("FERRY_API_AUTH_TOKENS_FILE", tokens.display().to_string()),
    ];
    r.token = Some(ADMIN.to_string());
    r.trust(std::fs::read(pki.ca_file()).unwrap());
    r.start("jm-a", None);
    r.start("jm-b", None);
    r.start_tm("tm-1");
    assert!(r.jms[0].url().starts_with("https://"));
    let (leader, _) = r.leader(&[], Duration::from_secs(20)).await;
    let standby = 1 - leader;

    // A write through the standby reaches the leader over HTTPS.
    let (job, headers) = r.submit(&r.jms[standby]).await;
    assert_eq!(headers["x-ferry-forwarded-by"], r.jms[standby].id.as_str());
    assert_eq!(headers["x-ferry-instance"], r.jms[leader].id.as_str());

    // Plaintext on the HTTPS port: a JSON answer saying what to do.
    let port = r.jms[leader].port;
    let plain = reqwest::Client::builder().no_proxy().build().unwrap();
    let res = plain
        .get(format!("http://127.0.0.1:{port}/v1/jobs"))
        .send()
        .await
        .expect("an answer, not a hang-up");
    assert_eq!(res.status(), 400);
    let body: serde_json::Value = res.json().await.unwrap();
    assert_eq!(body["error"]["code"], "https_required", "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("use https://"),
        "{body}"
    );
    let metrics = r.metrics(&r.jms[leader]).await;
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("ferry_api_tls_refused_total ") && !l.ends_with(" 0")),
        "{metrics}"
    );

    // The CLI: without the CA it says how to give it; with it, it works.
    let url = r.jms[leader].url();
    let cli = |args: &[&str]| {
        std::process::Command::new(common::ferry_bin())
            .args(["job", "list", "--url", &url])
            .args(args)
            .env("FERRY_TOKEN", ADMIN)
            .env_remove("FERRY_CA_CERT")
            .output()
            .unwrap()
    };
    let out = cli(&[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("--ca-cert"), "{err}");
    let ca = pki.ca_file().display().to_string();
    let out = cli(&["--ca-cert", &ca]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("ha-clicks"));

    // The certificate is replaced in place: new connections get the new
    // one, with no restart; the job runs on undisturbed.
    let old = CertificateDer::from_pem_file(&leaf.cert).unwrap().to_vec();
    pki.write(&leaf, "jobmanager", &["127.0.0.1", "localhost"]);
    let new = CertificateDer::from_pem_file(&leaf.cert).unwrap().to_vec();
    let start = Instant::now();
    loop {
        let served = served_certificate(port, &leaf).await;
        if served == new {
            break;
        }
        assert_eq!(served, old, "a third certificate");
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "the old certificate is still served"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let done = r.finished(leader, &job, Duration::from_secs(120)).await;
    assert_eq!(done["restarts"], 0, "{done}");
    r.check_output();
    assert_epochs_monotonic(&r.manifest_epochs(&job));
}
