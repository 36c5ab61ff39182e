//! The `nats-server` starters against the real binary: a server restarts in
//! place with its JetStream store, every node of a cluster listens, and a
//! server that cannot bind its port because a connection holds it is
//! reported as exited at start (what the fixtures retry on fresh ports),
//! with its log.

use ferry_testkit::nats::NatsConfig;
use ferry_testkit::{NatsCluster, NatsServer, jetstream, nats_starter};

#[tokio::test]
async fn a_restarted_server_keeps_its_port_and_store() {
    let mut nats = NatsServer::start();
    let js = jetstream::connect(&nats).await;
    jetstream::create_stream(&js, "KEPT", "kept.>", None).await;
    js.publish("kept.a", "1".into())
        .await
        .unwrap()
        .await
        .unwrap();
    nats.kill();
    nats.restart();
    let js = jetstream::connect(&nats).await;
    assert_eq!(jetstream::read_stream(&js, "KEPT").await.len(), 1);
}

#[test]
fn every_node_of_a_cluster_listens() {
    let cluster = NatsCluster::start(3);
    assert_eq!(cluster.nodes.len(), 3);
    for n in &cluster.nodes {
        std::net::TcpStream::connect(("127.0.0.1", n.port)).expect("the node listens");
    }
    assert_eq!(cluster.urls().split(',').count(), 3);
}

#[test]
fn a_server_whose_port_is_taken_exits_at_start_and_says_so() {
    // Taken the way a picked free port usually is: as the local port of
    // another process's connection (bound, not listening).
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let conn = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
    let _accepted = listener.accept().unwrap();
    let port = conn.local_addr().unwrap().port();
    let dir = tempfile::tempdir().unwrap();
    let err = nats_starter()
        .with_logs()
        .start(
            "nats-taken",
            &dir.path().join("nats.conf"),
            &NatsConfig::new(port, dir.path().join("js")),
        )
        .expect_err("the port is taken");
    let msg = err.to_string();
    assert!(msg.starts_with("nats-taken exited ("), "{msg}");
    assert!(msg.contains("nats.log"), "{msg}");
    assert!(dir.path().join("nats.log").exists());
}
