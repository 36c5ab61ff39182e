//! A region on a NATS server that requires credentials: JobManagers and
//! TaskManagers authenticate with a user and password, a token or an NKey
//! read from files (`nats.auth.*`); one without credentials, or with wrong
//! ones, says that the server refused them (not that JetStream is off);
//! and no secret — in a file or embedded in a NATS URL — shows up in any
//! log line or API answer.

mod common;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::ha::*;
use ferry_testkit::NatsServer;

const PASSWORD: &str = "pw-Xq7-s3cret-91";
const TOKEN: &str = "tok-Zr4-s3cret-55";

/// Writes `text` to `name` in the region's directory; its path.
fn secret_file(r: &Region, name: &str, text: &str) -> String {
    let path: PathBuf = r.dir.path().join(name);
    std::fs::write(&path, format!("{text}\n")).unwrap();
    path.display().to_string()
}

/// Waits until `id`'s log contains `what`; fails with the log after `limit`.
async fn log_says(r: &Region, id: &str, what: &str, limit: Duration) -> String {
    let start = Instant::now();
    loop {
        let log = r.log(id);
        if log.contains(what) {
            return log;
        }
        assert!(
            start.elapsed() < limit,
            "{id} did not log {what:?} within {limit:?}; its log:\n{log}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Every log of the region's processes and `answers`: none may contain a
/// secret.
fn assert_no_secret(r: &Region, ids: &[&str], answers: &[String], secrets: &[&str]) {
    for id in ids {
        let log = r.log(id);
        assert!(!log.is_empty(), "{id} logged nothing");
        for s in secrets {
            assert!(!log.contains(s), "{id}'s log shows a secret:\n{log}");
        }
    }
    for a in answers {
        for s in secrets {
            assert!(!a.contains(s), "an API answer shows a secret: {a}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_region_runs_on_a_nats_that_requires_a_password_and_never_shows_it() {
    let nats = NatsServer::start_configured(&format!(
        "authorization {{\n  users = [ {{ user: ferry, password: \"{PASSWORD}\" }} ]\n}}\n"
    ));
    let mut r = Region::new(nats.url(), "800ms", "500ms");
    let password = secret_file(&r, "nats-password", PASSWORD);
    r.env = vec![
        ("FERRY_NATS_USER", "ferry".to_string()),
        ("FERRY_NATS_PASSWORD_FILE", password),
    ];
    r.start("jm-a", None);
    r.start_tm("tm-1");
    // The password in the URL instead of a file works too.
    r.env.clear();
    let in_url = nats
        .url()
        .replace("nats://", &format!("nats://ferry:{PASSWORD}@"));
    r.start("jm-b", Some(&in_url));
    // No credentials, and a wrong password: refused, and said so.
    r.start("jm-c", None);
    let wrong = secret_file(&r, "wrong-password", "not-the-password");
    r.env = vec![
        ("FERRY_NATS_USER", "ferry".to_string()),
        ("FERRY_NATS_PASSWORD_FILE", wrong),
    ];
    r.start("jm-d", None);

    let (leader, _) = r.leader(&[2, 3], Duration::from_secs(30)).await;
    assert!(leader < 2, "jm-a or jm-b leads");
    for id in ["jm-c", "jm-d"] {
        // Ferry's own warning, after the client library's error lines.
        let log = log_says(&r, id, "check nats.auth", Duration::from_secs(30)).await;
        assert!(
            log.contains("the server refused this process's credentials"),
            "{id} does not say the credentials were refused:\n{log}"
        );
        assert!(
            !log.contains("is nats-server running with JetStream"),
            "{id} blames JetStream for refused credentials:\n{log}"
        );
    }
    // Neither ever answers: it has no coordination.
    for jm in &r.jms[2..] {
        assert!(r.api(jm).health().await.is_err());
    }

    let job = r.running_job(leader).await;
    let done = r.finished(leader, &job, Duration::from_secs(60)).await;
    r.check_output();
    let mut answers = vec![done.to_string()];
    for path in ["/v1/jobs", "/v1/cluster", "/healthz"] {
        for jm in &r.jms[..2] {
            if let Some(v) = r.get(jm, path).await {
                answers.push(v.to_string());
            }
        }
    }
    // The URL given with the password is shown redacted.
    let b = r.log("jm-b");
    assert!(
        b.contains("nats://ferry:***@127.0.0.1"),
        "jm-b does not show its URL redacted:\n{b}"
    );
    assert_no_secret(
        &r,
        &["jm-a", "jm-b", "jm-c", "jm-d", "tm-1"],
        &answers,
        &[PASSWORD],
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_and_an_nkey_from_files_authenticate() {
    let token_nats =
        NatsServer::start_configured(&format!("authorization {{\n  token: \"{TOKEN}\"\n}}\n"));
    let mut r = Region::new(token_nats.url(), "800ms", "500ms");
    let token = secret_file(&r, "nats-token", TOKEN);
    r.env = vec![("FERRY_NATS_TOKEN_FILE", token)];
    r.start("jm-a", None);
    let (leader, _) = r.leader(&[], Duration::from_secs(30)).await;
    assert_eq!(leader, 0);

    let user = nkeys::KeyPair::new_user();
    let seed = user.seed().unwrap();
    let nkey_nats = NatsServer::start_configured(&format!(
        "authorization {{\n  users = [ {{ nkey: {} }} ]\n}}\n",
        user.public_key()
    ));
    let mut n = Region::new(nkey_nats.url(), "800ms", "500ms");
    let seed_file = secret_file(&n, "nats-seed", &seed);
    n.env = vec![("FERRY_NATS_NKEY_SEED_FILE", seed_file)];
    n.start("jm-a", None);
    // Another user's seed is refused.
    let other = nkeys::KeyPair::new_user().seed().unwrap();
    let other_file = secret_file(&n, "other-seed", &other);
    n.env = vec![("FERRY_NATS_NKEY_SEED_FILE", other_file)];
    n.start("jm-b", None);
    let (leader, _) = n.leader(&[1], Duration::from_secs(30)).await;
    assert_eq!(leader, 0);
    log_says(
        &n,
        "jm-b",
        "authorization violation",
        Duration::from_secs(30),
    )
    .await;

    assert_no_secret(&r, &["jm-a"], &[], &[TOKEN]);
    assert_no_secret(&n, &["jm-a", "jm-b"], &[], &[&seed, &other]);
}

#[test]
fn credentials_given_wrong_stop_the_process_with_what_to_fix() {
    let dir = tempfile::tempdir().unwrap();
    let run = |env: &[(&str, String)]| {
        let mut cmd = std::process::Command::new(common::ferry_bin());
        cmd.arg("jobmanager")
            .env("FERRY_REGION", "test")
            .env("FERRY_NATS_URLS", "nats://127.0.0.1:1")
            .env("FERRY_STORAGE", format!("file://{}", dir.path().display()))
            .env("FERRY_API_LISTEN", "127.0.0.1:0");
        for (k, v) in env {
            cmd.env(k, v);
        }
        let out = cmd.output().unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    };
    let (code, err) = run(&[("FERRY_NATS_USER", "ferry".into())]);
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("nats.auth: user and passwordFile go together"),
        "{err}"
    );

    let (code, err) = run(&[
        ("FERRY_NATS_TOKEN_FILE", "/nonexistent/token".into()),
        ("FERRY_NATS_NKEY_SEED_FILE", "/nonexistent/seed".into()),
    ]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("give one way to authenticate"), "{err}");

    let (code, err) = run(&[
        (
            "FERRY_NATS_URLS",
            format!("nats://ferry:{PASSWORD}@127.0.0.1:1"),
        ),
        ("FERRY_NATS_TOKEN_FILE", "/nonexistent/token".into()),
    ]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("carries credentials too"), "{err}");
    assert!(
        !err.contains(PASSWORD),
        "the error shows the password: {err}"
    );

    let (code, err) = run(&[("FERRY_NATS_TOKEN_FILE", "/nonexistent/token".into())]);
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("nats.auth.tokenFile: cannot read /nonexistent/token"),
        "{err}"
    );
}

/// A job whose NATS source URL carries a password reads a server that
/// requires it; with a wrong password the job fails saying the server
/// refused it, and neither password shows in its log.
#[test]
fn a_job_reads_a_nats_whose_password_is_in_its_url_and_never_shows_it() {
    const N: i64 = 500;
    let nats = NatsServer::start_configured(&format!(
        "authorization {{\n  users = [ {{ user: ferry, password: \"{PASSWORD}\" }} ]\n}}\n"
    ));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let client =
            async_nats::ConnectOptions::with_user_and_password("ferry".into(), PASSWORD.into())
                .connect(nats.url())
                .await
                .expect("connect with the password");
        let js = async_nats::jetstream::new(client);
        ferry_testkit::jetstream::create_stream(&js, "IN", "in.>", None).await;
        for i in 0..N {
            js.publish("in.0", serde_json::json!({ "seq": i }).to_string().into())
                .await
                .unwrap()
                .await
                .unwrap();
        }
    });
    let spec = |password: &str| {
        format!(
            r#"apiVersion: ferry.dev/v1
kind: Job
metadata: {{name: nats-auth}}
spec:
  checkpointing: {{interval: 200ms}}
  restartStrategy: {{type: none}}
  source:
    nats:
      url: "{}"
      stream: IN
      subjects: [in.0]
      schema: {{seq: int}}
      stopAtEnd: true
  sink:
    file: {{path: ./out}}
"#,
            nats.url()
                .replace("nats://", &format!("nats://ferry:{password}@"))
        )
    };
    let w = common::Workdir::new(&spec(PASSWORD));
    let code = w.run_local(&[], "run.log", Duration::from_secs(60));
    let log = w.log("run.log");
    assert_eq!(code, 0, "{log}");
    common::assert_sequence_exactly_once(&w.output_rows("out"), "seq", N);
    assert!(
        !log.contains(PASSWORD),
        "the log shows the password:\n{log}"
    );

    const WRONG: &str = "wrong-pw-77";
    let w = common::Workdir::new(&spec(WRONG));
    let code = w.run_local(&[], "run.log", Duration::from_secs(60));
    let log = w.log("run.log");
    assert_ne!(code, 0, "{log}");
    assert!(log.contains("authorization violation"), "{log}");
    assert!(log.contains("nats://ferry:***@127.0.0.1"), "{log}");
    assert!(!log.contains(WRONG), "the log shows the password:\n{log}");
}

/// A region on a NATS that requires TLS with client certificates and a
/// password: JobManagers and TaskManagers connect with `nats.tls.*`, the
/// job runs exactly once; a process that trusts another CA, one without a
/// client certificate and one without TLS each say what is wrong with
/// TLS (the client library only says "IO error"); and when the server is
/// restarted trusting a new client CA, the processes reconnect with the
/// client certificates rewritten on disk meanwhile (a rotation), with no
/// restart of theirs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_region_runs_over_tls_to_nats_and_reconnects_with_rotated_client_certificates() {
    use ferry_testkit::pki::Pki;
    let pki_dir = tempfile::tempdir().unwrap();
    let server_ca = Pki::new(pki_dir.path(), "nats-server");
    let client_ca = Pki::new(pki_dir.path(), "nats-clients");
    let next_client_ca = Pki::new(pki_dir.path(), "nats-clients-next");
    let server = server_ca.issue("nats", &["127.0.0.1", "localhost"]);
    // The CA file the server trusts for clients: rewritten at rotation.
    let trusted_clients = pki_dir.path().join("trusted-clients.crt");
    std::fs::copy(client_ca.ca_file(), &trusted_clients).unwrap();
    let mut nats = NatsServer::start_configured(&format!(
        "tls {{\n  cert_file: \"{}\"\n  key_file: \"{}\"\n  ca_file: \"{}\"\n  verify: true\n  timeout: 2\n}}\nauthorization {{\n  users = [ {{ user: ferry, password: \"{PASSWORD}\" }} ]\n}}\n",
        server.cert.display(),
        server.key.display(),
        trusted_clients.display()
    ));
    let mut r = Region::new(nats.url(), "800ms", "500ms");
    let password = secret_file(&r, "nats-password", PASSWORD);
    let client = client_ca.issue("ferry", &["ferry"]);
    let secure = |ca: &std::path::Path, identity: Option<&ferry_testkit::pki::Leaf>| {
        let mut env = vec![
            ("FERRY_NATS_USER", "ferry".to_string()),
            ("FERRY_NATS_PASSWORD_FILE", password.clone()),
            ("FERRY_NATS_TLS_CA_FILE", ca.display().to_string()),
        ];
        if let Some(l) = identity {
            env.push(("FERRY_NATS_TLS_CERT_FILE", l.cert.display().to_string()));
            env.push(("FERRY_NATS_TLS_KEY_FILE", l.key.display().to_string()));
        }
        env
    };
    // Slow enough that the job still runs when the server restarts.
    r.rate = 40_000;
    r.env = secure(&server_ca.ca_file(), Some(&client));
    r.start("jm-a", None);
    r.start("jm-b", None);
    r.start_tm("tm-1");
    // Trusts the clients' CA, not the server's.
    r.env = secure(&client_ca.ca_file(), Some(&client));
    r.start("jm-wrong-ca", None);
    // No client certificate.
    r.env = secure(&server_ca.ca_file(), None);
    r.start("jm-no-cert", None);
    // No TLS at all.
    r.env = vec![
        ("FERRY_NATS_USER", "ferry".to_string()),
        ("FERRY_NATS_PASSWORD_FILE", password.clone()),
    ];
    r.start("jm-plain", None);

    let (leader, _) = r.leader(&[2, 3, 4], Duration::from_secs(30)).await;
    assert!(leader < 2, "jm-a or jm-b leads");
    let port = nats.port;
    for (id, says) in [
        (
            "jm-wrong-ca",
            format!("the TLS handshake with the NATS server at 127.0.0.1:{port} failed"),
        ),
        (
            "jm-no-cert",
            "the server verifies clients: set nats.tls.certFile and nats.tls.keyFile".to_string(),
        ),
        (
            "jm-plain",
            format!("the NATS server at 127.0.0.1:{port} requires TLS; set nats.tls.caFile"),
        ),
    ] {
        let log = log_says(&r, id, &says, Duration::from_secs(30)).await;
        assert!(
            !log.contains("is nats-server running with JetStream"),
            "{id} blames JetStream for a TLS problem:\n{log}"
        );
    }
    let wrong = r.log("jm-wrong-ca");
    assert!(
        wrong.contains("check that nats.tls.caFile holds the CA"),
        "jm-wrong-ca does not name the key to fix:\n{wrong}"
    );
    for jm in &r.jms[2..] {
        assert!(r.api(jm).health().await.is_err());
    }

    // Rotation: the clients' certificates move to a new CA, which the
    // server alone trusts once restarted. Only processes that read their
    // files again on reconnecting get back in.
    let (_, epoch) = r.leader(&[2, 3, 4], Duration::from_secs(30)).await;
    let job = r.running_job(leader).await;
    next_client_ca.write(&client, "ferry", &["ferry"]);
    std::fs::copy(next_client_ca.ca_file(), &trusted_clients).unwrap();
    nats.kill();
    // Down for longer than the lease lives: whoever leads afterwards won
    // a new election through the restarted server.
    tokio::time::sleep(Duration::from_secs(2)).await;
    nats.restart();
    let (_, after) = r.leader(&[2, 3, 4], Duration::from_secs(30)).await;
    assert!(after > epoch, "no new election after the restart");
    let done = r.finished(leader, &job, Duration::from_secs(120)).await;
    r.check_output();
    for p in r.jms[..2].iter_mut().chain(r.tms.iter_mut()) {
        assert!(p.child.try_wait().unwrap().is_none(), "{} exited", p.id);
    }
    assert_no_secret(
        &r,
        &[
            "jm-a",
            "jm-b",
            "tm-1",
            "jm-wrong-ca",
            "jm-no-cert",
            "jm-plain",
        ],
        &[done.to_string()],
        &[PASSWORD],
    );
}
