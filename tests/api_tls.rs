//! The REST API over HTTPS (`tls.api`) with authentication, with
//! certificates made inside the test: a region of real `ferry jobmanager`
//! and `ferry taskmanager` processes against a real `nats-server` takes a
//! job through a standby (forwarded to the leader over HTTPS) and runs it
//! exactly once; a plaintext request is answered `400 https_required`; the
//! CLI works with `--ca-cert` and says what to do without it; a replaced
//! certificate is served to new connections with no restart. The CLI
//! reaches such a JobManager through a context of its contexts file, and
//! a flag or variable given overrides the context's value.

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
    let files = TlsFiles::new("api", &leaf.cert, &leaf.key, &leaf.ca);
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

/// `ferry <args>` with the contexts file `contexts` and none of the
/// target variables of the test's own environment.
fn ferry_cli(
    contexts: &std::path::Path,
    args: &[&str],
    env: &[(&str, &str)],
) -> (bool, String, String) {
    use common::OutputWithin;
    let mut cmd = std::process::Command::new(common::ferry_bin());
    cmd.args(args).env("FERRY_CONTEXTS_FILE", contexts);
    for v in [
        "FERRY_URL",
        "FERRY_TOKEN",
        "FERRY_TOKEN_FILE",
        "FERRY_CA_CERT",
        "FERRY_CONTEXT",
    ] {
        cmd.env_remove(v);
    }
    cmd.envs(env.iter().copied());
    let out = cmd.output_within(common::COMMAND_LIMIT).unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_reaches_an_https_jobmanager_through_a_context_and_flags_override_it() {
    use std::os::unix::fs::PermissionsExt;
    let nats = NatsServer::start();
    let mut r = Region::new(nats.url(), "800ms", "500ms");
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
        ("FERRY_API_AUTH_TOKENS_FILE", tokens.display().to_string()),
    ];
    r.token = Some(ADMIN.to_string());
    r.trust(std::fs::read(pki.ca_file()).unwrap());
    r.start("jm-a", None);
    r.leader(&[], Duration::from_secs(20)).await;
    let url = r.jms[0].url();
    assert!(url.starts_with("https://"), "{url}");
    let ca = pki.ca_file().display().to_string();
    let token_file = r.dir.path().join("admin.token");
    std::fs::write(&token_file, format!("{ADMIN}\n")).unwrap();
    let token_file = token_file.display().to_string();
    let contexts = r.dir.path().join("config").join("contexts.yaml");
    let ferry = |args: &[&str], env: &[(&str, &str)]| ferry_cli(&contexts, args, env);

    // A context with the URL, the CA and the token file; the first one
    // made is the current one. The file is private and holds no token.
    let (ok, out, err) = ferry(
        &[
            "context",
            "set",
            "prod",
            "--url",
            &url,
            "--ca-cert",
            &ca,
            "--token-file",
            &token_file,
        ],
        &[],
    );
    assert!(ok, "{err}");
    assert!(
        out.contains("created context 'prod'") && out.contains("(current)"),
        "{out}"
    );
    let mode = std::fs::metadata(&contexts).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    assert!(!std::fs::read_to_string(&contexts).unwrap().contains(ADMIN));

    // With no flag at all the commands reach the authenticated HTTPS
    // JobManager through it.
    let (ok, out, err) = ferry(&["cluster", "status", "-o", "json"], &[]);
    assert!(ok, "{err}");
    let cluster: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(cluster["instance"], "jm-a", "{cluster}");
    let (ok, out, err) = ferry(&["audit", "-o", "json"], &[]);
    assert!(ok, "{err}");
    assert!(out.contains("\"entries\""), "{out}");

    // A flag or its variable wins over the context's value, each alone.
    for env in [&[][..], &[("FERRY_TOKEN", "not-a-token")][..]] {
        let args: &[&str] = if env.is_empty() {
            &["job", "list", "--token", "not-a-token"]
        } else {
            &["job", "list"]
        };
        let (ok, _, err) = ferry(args, env);
        assert!(
            !ok,
            "a wrong token from the flag or FERRY_TOKEN was not used"
        );
        assert!(err.contains("the token is not known"), "{err}");
        assert!(
            err.contains("context 'prod'"),
            "the note names the context: {err}"
        );
    }
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let elsewhere = format!("https://127.0.0.1:{closed}");
    let (ok, _, err) = ferry(&["job", "list", "--url", &elsewhere], &[]);
    assert!(!ok);
    assert!(err.contains(&elsewhere) && !err.contains(&url), "{err}");

    // A second context without the CA: it fails on the certificate, and
    // --ca-cert supplies what the context lacks.
    let (ok, _, err) = ferry(
        &[
            "context",
            "set",
            "bare",
            "--url",
            &url,
            "--token-file",
            &token_file,
        ],
        &[],
    );
    assert!(ok, "{err}");
    let (ok, _, err) = ferry(&["job", "list", "--context", "bare"], &[]);
    assert!(!ok);
    assert!(err.contains("--ca-cert"), "{err}");
    let (ok, _, err) = ferry(&["job", "list", "--context", "bare", "--ca-cert", &ca], &[]);
    assert!(ok, "{err}");
    let (ok, _, err) = ferry(&["job", "list"], &[("FERRY_CONTEXT", "bare")]);
    assert!(!ok && err.contains("context 'bare'"), "{err}");
    let (ok, _, err) = ferry(&["job", "list", "--context", "nosuch"], &[]);
    assert!(!ok);
    assert!(
        err.contains("no context 'nosuch'") && err.contains("bare, prod"),
        "{err}"
    );

    // Listing marks the current context and shows no token.
    let (ok, out, err) = ferry(&["context", "list"], &[]);
    assert!(ok, "{err}");
    let prod = out.lines().find(|l| l.contains("prod")).unwrap_or_default();
    assert!(prod.starts_with('*'), "{out}");
    assert!(!out.contains(ADMIN), "{out}");

    // An inline token works only in a file nobody else may read.
    std::fs::write(
        &contexts,
        format!("current: inline\ncontexts:\n  inline:\n    url: {url}\n    caCert: {ca}\n    token: {ADMIN}\n"),
    )
    .unwrap();
    std::fs::set_permissions(&contexts, std::fs::Permissions::from_mode(0o644)).unwrap();
    let (ok, _, err) = ferry(&["job", "list"], &[]);
    assert!(!ok);
    assert!(err.contains("chmod 600") && !err.contains(ADMIN), "{err}");
    std::fs::set_permissions(&contexts, std::fs::Permissions::from_mode(0o600)).unwrap();
    let (ok, _, err) = ferry(&["job", "list"], &[]);
    assert!(ok, "{err}");
    let (ok, out, err) = ferry(&["context", "show"], &[]);
    assert!(ok, "{err}");
    assert!(
        out.contains("token: <redacted>") && !out.contains(ADMIN),
        "{out}"
    );
}
