//! The JobManager ↔ TaskManager gRPC link over mutual TLS (`tls.grpc`),
//! with certificates made inside the test: a region of real `ferry
//! jobmanager` and `ferry taskmanager` processes against a real
//! `nats-server` runs a job, refuses a plaintext client, a client whose
//! certificate another CA signed, and a client with a valid certificate
//! pushing a made-up epoch (the real leader keeps working); then every
//! certificate is replaced mid-run, the TaskManager serves the new one to
//! new connections with no restart, and a SIGKILL of the leader hands the
//! job to the standby over the new certificates — adopted without a
//! restart, its output exactly once.

mod common;

use std::time::{Duration, Instant};

use common::ha::*;
use ferry_core::proto::{self, task_manager_client::TaskManagerClient};
use ferry_core::tls::{ClientTls, Connector, TlsFiles};
use ferry_testkit::NatsServer;
use ferry_testkit::pki::{Leaf, Pki};
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use tonic::codegen::Service;
use tonic::transport::{Channel, Endpoint};

/// The one name every TaskManager certificate carries
/// (`tls.grpc.serverName` of the JobManagers).
const TM_NAME: &str = "taskmanager.ferry.test";

fn files(leaf: &Leaf) -> TlsFiles {
    TlsFiles::new("grpc", &leaf.cert, &leaf.key, &leaf.ca)
}

fn tls_env(leaf: &Leaf) -> Vec<(&'static str, String)> {
    vec![
        ("FERRY_TLS_GRPC_CERT_FILE", leaf.cert.display().to_string()),
        ("FERRY_TLS_GRPC_KEY_FILE", leaf.key.display().to_string()),
        ("FERRY_TLS_GRPC_CA_FILE", leaf.ca.display().to_string()),
        ("FERRY_TLS_GRPC_SERVER_NAME", TM_NAME.to_string()),
        ("FERRY_TLS_RELOAD_INTERVAL", "200ms".to_string()),
    ]
}

fn connector(leaf: &Leaf) -> Connector {
    let tls = ClientTls::load(files(leaf), &[b"h2"], Duration::from_secs(3600)).unwrap();
    Connector::new(tls, Some(TM_NAME.to_string()))
}

/// A gRPC client of the TaskManager at `addr` presenting `leaf`.
async fn client(addr: &str, leaf: &Leaf) -> Result<TaskManagerClient<Channel>, String> {
    Endpoint::from_shared(addr.to_string())
        .unwrap()
        .connect_timeout(Duration::from_secs(5))
        .connect_with_connector(connector(leaf))
        .await
        .map(TaskManagerClient::new)
        .map_err(|e| format!("{e:?}"))
}

/// The certificate the TaskManager at `addr` presents to a new connection.
async fn served_certificate(addr: &str, leaf: &Leaf) -> Vec<u8> {
    let io = connector(leaf)
        .call(addr.parse().unwrap())
        .await
        .expect("a TLS connection with a valid certificate")
        .into_inner();
    io.get_ref().1.peer_certificates().unwrap()[0].to_vec()
}

fn leaf_der(leaf: &Leaf) -> Vec<u8> {
    CertificateDer::from_pem_file(&leaf.cert).unwrap().to_vec()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_region_over_mutual_tls_refuses_outsiders_rotates_and_fails_over_exactly_once() {
    let nats = NatsServer::start();
    let mut r = Region::new(nats.url(), "800ms", "500ms");
    r.rate = 40_000; // ~20 s: still running through the failover
    let pki = Pki::new(&r.dir.path().join("pki"), "region");
    let jm_leaf = pki.issue("jobmanager", &["jobmanager.ferry.test"]);
    let tm_leaf = pki.issue("taskmanager", &[TM_NAME]);
    r.jm_env = tls_env(&jm_leaf);
    r.tm_env = tls_env(&tm_leaf);
    // Of the CA's certificates, only JobManagers' may send commands.
    r.tm_env.push((
        "FERRY_TLS_GRPC_CLIENT_NAME",
        "jobmanager.ferry.test".to_string(),
    ));
    r.start("jm-a", None);
    r.start("jm-b", None);
    r.start_tm("tm-1");
    let addr = r.tm_grpc_url("tm-1").await;
    assert!(addr.starts_with("https://"), "advertised {addr}");

    let (leader, epoch) = r.leader(&[], Duration::from_secs(20)).await;
    let job = r.running_job(leader).await;
    let before = r
        .wait_job(
            &r.jms[leader],
            &job,
            Duration::from_secs(20),
            "the job on the TaskManager",
            |v| has_checkpoint(v) && v["deployment"].is_string(),
        )
        .await;
    let deployment = before["deployment"].as_str().unwrap().to_string();
    // Far above any epoch the lease will reach in this test.
    let made_up = epoch.saturating_mul(2);

    // A plaintext client: refused in the handshake.
    let plain = addr.replace("https://", "http://");
    let cancel = |c: Result<TaskManagerClient<Channel>, String>| {
        let deployment = deployment.clone();
        async move {
            c?.cancel(proto::CancelRequest {
                epoch: made_up,
                deployment,
            })
            .await
            .map(|_| ())
            .map_err(|e| e.to_string())
        }
    };
    let plain_result = cancel(
        TaskManagerClient::connect(plain)
            .await
            .map_err(|e| e.to_string()),
    )
    .await;
    assert!(plain_result.is_err(), "a plaintext client got through");

    // A certificate another CA signed (the client trusts the region's CA).
    let rogue_pki = Pki::new(&r.dir.path().join("pki"), "rogue");
    let rogue = rogue_pki.issue("jobmanager", &["jobmanager.ferry.test"]);
    std::fs::copy(pki.ca_file(), &rogue.ca).unwrap();
    let rogue_result = cancel(client(&addr, &rogue).await).await;
    assert!(
        rogue_result.is_err(),
        "a certificate of another CA got through"
    );

    // A certificate of the region's CA that is not a JobManager's (the
    // TaskManager's own): refused, it does not carry the client name.
    let peer_result = cancel(client(&addr, &tm_leaf).await).await;
    assert!(
        peer_result.is_err(),
        "a TaskManager's certificate sent a command"
    );

    // A valid certificate (stolen from a JobManager) with a made-up epoch:
    // refused against the leader lease.
    let mut stolen = client(&addr, &jm_leaf).await.expect("a valid certificate");
    let e = stolen
        .cancel(proto::CancelRequest {
            epoch: made_up,
            deployment: deployment.clone(),
        })
        .await
        .expect_err("a made-up epoch must be refused");
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e}");
    assert!(
        e.message().contains(&format!("lease is at epoch {epoch}")),
        "{}",
        e.message()
    );
    assert!(r.tm_metric(0, "tls_handshake_failures").await >= Some(3));
    assert_eq!(r.tm_metric(0, "unconfirmed_epochs").await, Some(1));
    assert_eq!(r.tm_metric(0, "epoch").await, Some(epoch));
    // The real leader keeps working: the job checkpoints on.
    let last = before["last_checkpoint"]["id"].as_u64().unwrap();
    r.wait_job(
        &r.jms[leader],
        &job,
        Duration::from_secs(20),
        "a newer checkpoint after the intruders",
        |v| v["last_checkpoint"]["id"].as_u64() > Some(last) && v["state"] == "RUNNING",
    )
    .await;

    // Every certificate is replaced in place (cert-manager's renewal): new
    // connections get the new one, with no restart.
    let old = leaf_der(&tm_leaf);
    pki.write(&tm_leaf, "taskmanager", &[TM_NAME]);
    pki.write(&jm_leaf, "jobmanager", &["jobmanager.ferry.test"]);
    let new = leaf_der(&tm_leaf);
    assert_ne!(old, new);
    let start = Instant::now();
    loop {
        let served = served_certificate(&addr, &jm_leaf).await;
        if served == new {
            break;
        }
        assert_eq!(served, old, "the TaskManager served a third certificate");
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "the TaskManager still serves the old certificate:\n{}",
            r.log("tm-1")
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        r.log("tm-1")
            .contains("TLS material changed on disk: new connections use it"),
        "{}",
        r.log("tm-1")
    );

    // The standby takes over over new connections and adopts the job.
    r.jms[leader].signal(libc::SIGKILL);
    let (new_leader, new_epoch) = r.leader(&[leader], Duration::from_secs(10)).await;
    assert!(new_epoch > epoch, "{epoch} -> {new_epoch}");
    let done = r.finished(new_leader, &job, Duration::from_secs(120)).await;
    let log = r.log(&r.jms[new_leader].id);
    assert!(
        log.contains("adopted the job's running tasks"),
        "the new leader adopted the running tasks:\n{log}"
    );
    assert_eq!(done["attempt"], 1, "{done}");
    assert_eq!(done["restarts"], 0, "{done}");
    assert_eq!(done["deployment"], before["deployment"], "{done}");
    assert_eq!(r.deployments_started(&[]).await, 1);
    assert_eq!(r.tm_metric(0, "epoch").await, Some(new_epoch));
    r.check_output();
    assert_epochs_monotonic(&r.manifest_epochs(&job));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_jobmanager_and_a_taskmanager_that_disagree_on_tls_say_so() {
    let nats = NatsServer::start();
    let mut r = Region::new(nats.url(), "800ms", "500ms");
    let pki = Pki::new(&r.dir.path().join("pki"), "region");
    let tm_leaf = pki.issue("taskmanager", &[TM_NAME]);
    // The TaskManager speaks TLS, the JobManager does not.
    r.tm_env = tls_env(&tm_leaf);
    r.start("jm-a", None);
    r.start_tm("tm-1");
    r.leader(&[], Duration::from_secs(20)).await;
    let start = Instant::now();
    let want = "TaskManager advertises an https address but tls.grpc is not set here";
    while !r.log("jm-a").contains(want) {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "no warning in the JobManager's log:\n{}",
            r.log("jm-a")
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // A certificate file that is not there stops the process at start,
    // naming the file.
    let out = std::process::Command::new(common::ferry_bin())
        .arg("taskmanager")
        .env("FERRY_REGION", "test")
        .env("FERRY_NATS_URLS", nats.url())
        .env("FERRY_STORAGE", format!("file://{}", r.storage().display()))
        .env("FERRY_TASKMANAGER_LISTEN", "127.0.0.1:0")
        .env("FERRY_TASKMANAGER_HTTP_LISTEN", "127.0.0.1:0")
        .env("FERRY_TLS_GRPC_CERT_FILE", "/nonexistent/tls.crt")
        .env("FERRY_TLS_GRPC_KEY_FILE", &tm_leaf.key)
        .env("FERRY_TLS_GRPC_CA_FILE", &tm_leaf.ca)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("tls.grpc: cannot read the certificate file /nonexistent/tls.crt"),
        "{stderr}"
    );
}
