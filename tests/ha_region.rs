//! In-region HA of `ferry jobmanager` and `ferry taskmanager` processes
//! against a real `nats-server`: SIGKILL of the leader (its job's tasks keep
//! running on their TaskManager and are adopted, not restarted), graceful
//! handover, a leader cut off from NATS by a fault proxy, SIGKILL of a
//! TaskManager (the job moves to the other one), NATS restarts and node
//! loss, a job waiting for free task slots, and a TaskManager refusing
//! commands of an older epoch and epochs the leader lease does not show. Each job test checks the committed output
//! against the expected counts computed from the generator model, and that
//! the checkpoint manifests' fencing epochs never go back (no two leaders
//! completed checkpoints of the job interleaved). The fixture is
//! `tests/common/ha.rs`.

mod common;

use std::time::{Duration, Instant};

use common::ha::*;
use common::*;
use ferry_testkit::{FaultProxy, NatsCluster, NatsServer};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_of_the_leader_hands_its_running_tasks_to_a_standby_without_a_restart() {
    let nats = NatsServer::start();
    let mut r = Region::new(nats.url(), "800ms", "500ms");
    for id in ["jm-a", "jm-b", "jm-c"] {
        r.start(id, None);
    }
    r.start_tm("tm-1");
    r.start_tm("tm-2");
    let (leader, epoch) = r.leader(&[], Duration::from_secs(20)).await;
    let standby = (leader + 1) % 3;
    // A write sent to a standby is forwarded to the leader.
    let (job, headers) = r.submit(&r.jms[standby]).await;
    assert_eq!(headers["x-ferry-forwarded-by"], r.jms[standby].id.as_str());
    assert_eq!(headers["x-ferry-instance"], r.jms[leader].id.as_str());
    // A standby serves reads from the job store.
    r.wait_job(
        &r.jms[standby],
        &job,
        Duration::from_secs(20),
        "a checkpoint seen by a standby",
        has_checkpoint,
    )
    .await;
    let before = r
        .wait_job(
            &r.jms[leader],
            &job,
            Duration::from_secs(20),
            "the job running on a TaskManager",
            |v| has_checkpoint(v) && v["deployment"].is_string(),
        )
        .await;
    assert_eq!(before["attempt"], 1, "{before}");
    assert_eq!(r.deployments_started(&[]).await, 1);

    r.jms[leader].signal(libc::SIGKILL);
    let killed = Instant::now();
    let (new_leader, new_epoch) = r.leader(&[leader], Duration::from_secs(10)).await;
    let took = killed.elapsed();
    eprintln!(
        "new leader {} (epoch {new_epoch}) {took:?} after SIGKILL of {}",
        r.jms[new_leader].id, r.jms[leader].id
    );
    assert!(new_epoch > epoch, "epoch must grow: {epoch} -> {new_epoch}");
    // Generous bound (lease ttl 800 ms): this is a correctness check, the
    // benchmark measures the time.
    assert!(took < Duration::from_secs(5), "takeover took {took:?}");

    let done = r.finished(new_leader, &job, Duration::from_secs(60)).await;
    assert_eq!(
        done["records_in"],
        TOTAL,
        "job as the new leader reports it: {done}\nnew leader's log:\n{}",
        r.log(&r.jms[new_leader].id)
    );
    let log = r.log(&r.jms[new_leader].id);
    assert!(
        log.contains("adopted the job's running tasks"),
        "the new leader adopted the running tasks:\n{log}"
    );
    // No task was restarted: the same deployment (attempt 1) ran the job to
    // its end, and no TaskManager started another one.
    assert_eq!(done["attempt"], 1, "{done}");
    assert_eq!(done["restarts"], 0, "{done}");
    assert_eq!(done["deployment"], before["deployment"], "{done}");
    assert_eq!(done["taskmanager"], before["taskmanager"], "{done}");
    assert_eq!(r.deployments_started(&[]).await, 1);
    r.check_output();
    let epochs = r.manifest_epochs(&job);
    assert_epochs_monotonic(&epochs);
    // The retained (newest) checkpoints were completed after the takeover,
    // by the new leader or (on a loaded machine the lease may move again) a
    // later one — never by the killed leader's epoch.
    assert!(
        !epochs.is_empty() && epochs.values().all(|e| *e >= new_epoch),
        "checkpoints after the takeover at epoch {new_epoch}: {epochs:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_stop_hands_over_without_waiting_for_the_lease_to_expire() {
    let nats = NatsServer::start();
    // A 30 s lease: a takeover in well under that must have come from the
    // leader releasing it.
    let mut r = Region::new(nats.url(), "30s", "20s");
    for id in ["jm-a", "jm-b", "jm-c"] {
        r.start(id, None);
    }
    r.start_tm("tm-1");
    r.start_tm("tm-2");
    let (leader, epoch) = r.leader(&[], Duration::from_secs(20)).await;
    let job = r.running_job(leader).await;

    r.jms[leader].signal(libc::SIGTERM);
    let stopped = Instant::now();
    let (new_leader, new_epoch) = r.leader(&[leader], Duration::from_secs(10)).await;
    let took = stopped.elapsed();
    eprintln!(
        "graceful handover to {} (epoch {new_epoch}) in {took:?}",
        r.jms[new_leader].id
    );
    assert!(new_epoch > epoch);
    assert!(
        took < Duration::from_secs(10),
        "handover took {took:?} (lease ttl 30 s)"
    );
    let code = wait_exit(&mut r.jms[leader].child, Duration::from_secs(15));
    assert_eq!(code, 0, "a SIGTERMed JobManager exits cleanly");

    r.finish_and_check(new_leader, &job, Duration::from_secs(60))
        .await;
    // The handover restarted nothing: the tasks deployed first ran to the end.
    let done = r
        .get(&r.jms[new_leader], &format!("/v1/jobs/{job}"))
        .await
        .unwrap();
    assert_eq!(
        done["attempt"],
        1,
        "{done}\nold leader:\n{}\nnew leader:\n{}",
        r.log(&r.jms[leader].id),
        r.log(&r.jms[new_leader].id)
    );
    assert_eq!(r.deployments_started(&[]).await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_cut_off_from_nats_stops_before_another_leads() {
    let nats = NatsServer::start();
    let proxy = FaultProxy::start(nats.port).await;
    let mut r = Region::new(nats.url(), "800ms", "500ms");
    // jm-a reaches NATS only through the proxy, and leads (it starts first).
    r.start("jm-a", Some(&proxy.url()));
    let (leader, epoch) = r.leader(&[], Duration::from_secs(20)).await;
    assert_eq!(leader, 0);
    r.start("jm-b", None);
    r.start("jm-c", None);
    r.start_tm("tm-1");
    r.start_tm("tm-2");
    r.leader(&[], Duration::from_secs(20)).await;
    let job = r.running_job(0).await;

    proxy.cut();
    let cut = Instant::now();
    // The cut-off leader stops leading (it can still answer HTTP).
    let mut stepped_down = None;
    let (new_leader, new_epoch) = loop {
        // Every response names the role; /healthz answers without NATS.
        if stepped_down.is_none()
            && let Ok(res) = r
                .http
                .get(format!("{}/healthz", r.jms[0].url()))
                .send()
                .await
            && res.headers()["x-ferry-role"] != "leader"
        {
            stepped_down = Some(cut.elapsed());
        }
        let mut found = None;
        for i in 1..3 {
            if let Some(h) = r.get(&r.jms[i], "/health/ha").await
                && h["role"] == "leader"
            {
                found = Some((i, h["epoch"].as_u64().unwrap(), cut.elapsed()));
            }
        }
        if let Some((i, e, at)) = found {
            let down =
                stepped_down.expect("a standby leads while the cut-off leader still says it leads");
            assert!(
                down < at,
                "old leader stopped at {down:?}, new leader at {at:?}"
            );
            eprintln!(
                "cut-off leader stepped down at {down:?}; {} leads at {at:?}",
                r.jms[i].id
            );
            break (i, e);
        }
        assert!(
            cut.elapsed() < Duration::from_secs(10),
            "no new leader after the cut"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    assert!(new_epoch > epoch);
    // The cut-off instance refuses writes: it does not lead and cannot
    // reach NATS to learn of the new leader (503 not_leader or forwarded).
    let res = r
        .http
        .post(format!("{}/v1/jobs/{job}/savepoints", r.jms[0].url()))
        .send()
        .await
        .unwrap();
    assert_ne!(res.headers()["x-ferry-role"], "leader");

    r.finished(new_leader, &job, Duration::from_secs(60)).await;
    r.check_output();
    let epochs = r.manifest_epochs(&job);
    assert_epochs_monotonic(&epochs);
    // (Leadership may move again later; it never goes back.)
    assert!(epochs.values().all(|e| *e >= epoch), "{epochs:?}");
    assert!(!r.log("jm-a").contains("panicked"));
    // Both TaskManagers follow the new epoch (or a later one): anything
    // the cut-off leader still sent at its old epoch would be refused.
    for tm in 0..2 {
        let seen = r.tm_metric(tm, "epoch").await.unwrap();
        assert!(
            seen >= new_epoch,
            "TaskManager {tm} follows epoch {seen} < {new_epoch}"
        );
    }
    // The tasks outlived their cut-off leader: adopted, never restarted.
    let done = r
        .get(&r.jms[new_leader], &format!("/v1/jobs/{job}"))
        .await
        .unwrap();
    assert_eq!(done["attempt"], 1, "{done}");
    assert_eq!(r.deployments_started(&[]).await, 1);
}

/// Three JobManagers and two TaskManagers on `nats`, a leader elected and
/// a job running: the region, the leader, its epoch and the job's id.
async fn region_running_a_job(nats: &NatsServer) -> (Region, usize, u64, String) {
    let mut r = Region::new(nats.url(), "800ms", "500ms");
    for id in ["jm-a", "jm-b", "jm-c"] {
        r.start(id, None);
    }
    r.start_tm("tm-1");
    r.start_tm("tm-2");
    let (leader, epoch) = r.leader(&[], Duration::from_secs(20)).await;
    let job = r.running_job(leader).await;
    (r, leader, epoch, job)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_region_recovers_by_itself_from_a_nats_restart() {
    let mut nats = NatsServer::start();
    let (r, leader, epoch, job) = region_running_a_job(&nats).await;

    nats.kill();
    // Without NATS no one may lead: the leader steps down by its deadline.
    let start = Instant::now();
    loop {
        let res = r
            .http
            .get(format!("{}/healthz", r.jms[leader].url()))
            .send()
            .await
            .unwrap();
        if res.headers()["x-ferry-role"] != "leader" {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "the leader kept leading without NATS"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    nats.restart();
    // Nobody intervenes: the JobManagers reconnect, elect, and resume.
    let (new_leader, new_epoch) = r.leader(&[], Duration::from_secs(30)).await;
    assert!(new_epoch > epoch, "epoch {epoch} -> {new_epoch}");
    r.finish_and_check(new_leader, &job, Duration::from_secs(90))
        .await;
}

/// The regional NATS server comes back with empty storage (a lost volume):
/// the processes re-create the bucket, elect a leader with a higher epoch
/// than any before (the TaskManagers accept it), and the job finishes
/// exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_region_recovers_from_nats_losing_its_data() {
    let mut nats = NatsServer::start();
    let (r, _, epoch, job) = region_running_a_job(&nats).await;

    nats.restart_empty();
    // The old leader may still report its epoch until its renewal fails.
    let deadline = Instant::now() + Duration::from_secs(30);
    let (new_leader, _) = loop {
        let (l, e) = r.leader(&[], Duration::from_secs(30)).await;
        if e > epoch {
            break (l, e);
        }
        assert!(
            Instant::now() < deadline,
            "no leader with an epoch above {epoch} after the data loss (still {e})"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    r.finish_and_check(new_leader, &job, Duration::from_secs(90))
        .await;
    // Whichever process first finds the bucket gone re-creates it and says
    // so — a TaskManager's heartbeat as often as a JobManager's lease
    // renewal; the others then find the new bucket in place.
    let logs: String = ["jm-a", "jm-b", "jm-c", "tm-1", "tm-2"]
        .iter()
        .map(|id| r.log(id))
        .collect();
    assert!(
        logs.contains("the KV bucket was lost"),
        "no process logged the re-creation"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_three_node_nats_cluster_loses_a_node_and_the_region_carries_on() {
    let mut cluster = NatsCluster::start(3);
    let mut r = Region::new(cluster.urls(), "800ms", "500ms");
    r.replicas = "3";
    for id in ["jm-a", "jm-b", "jm-c"] {
        r.start(id, None);
    }
    r.start_tm("tm-1");
    r.start_tm("tm-2");
    let (leader, epoch) = r.leader(&[], Duration::from_secs(30)).await;
    let job = r.running_job(leader).await;

    // Lose one node of three (whichever leads the KV stream or not): the
    // bucket keeps its quorum; at worst the stream elects a new leader.
    cluster.nodes[0].kill();
    let killed = Instant::now();
    let done = loop {
        // Some JobManager leads again (possibly the same one, same epoch).
        let (l, e) = r.leader(&[], Duration::from_secs(60)).await;
        let v = r
            .wait_job(
                &r.jms[l],
                &job,
                Duration::from_secs(90),
                "the job to finish",
                |v| v["state"] == "FINISHED" || v["state"] == "RUNNING",
            )
            .await;
        if v["state"] == "FINISHED" {
            break (l, e);
        }
        assert!(
            killed.elapsed() < Duration::from_secs(120),
            "the job did not finish after losing a NATS node"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    eprintln!(
        "after losing a node: {} leads at epoch {} (was {epoch})",
        r.jms[done.0].id, done.1
    );
    assert!(done.1 >= epoch);
    r.check_output();
    assert_epochs_monotonic(&r.manifest_epochs(&job));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_of_a_taskmanager_moves_its_job_to_the_other_one_exactly_once() {
    let nats = NatsServer::start();
    let mut r = Region::new(nats.url(), "800ms", "500ms");
    r.start("jm-a", None);
    r.start_tm("tm-1");
    r.start_tm("tm-2");
    let (leader, _) = r.leader(&[], Duration::from_secs(20)).await;
    let job = r.running_job(leader).await;
    let before = r
        .wait_job(
            &r.jms[leader],
            &job,
            Duration::from_secs(20),
            "the job running on a TaskManager",
            |v| has_checkpoint(v) && v["taskmanager"].is_string(),
        )
        .await;
    let victim = r
        .tms
        .iter()
        .position(|t| before["taskmanager"] == t.id.as_str())
        .expect("the job runs on one of the TaskManagers");
    let other = 1 - victim;

    r.tms[victim].signal(libc::SIGKILL);
    let killed = Instant::now();
    let moved = r
        .wait_job(
            &r.jms[leader],
            &job,
            Duration::from_secs(30),
            "the job running on the other TaskManager",
            |v| v["taskmanager"] == r.tms[other].id.as_str() && v["state"] == "RUNNING",
        )
        .await;
    eprintln!(
        "job moved to {} {:?} after SIGKILL of {}",
        r.tms[other].id,
        killed.elapsed(),
        r.tms[victim].id
    );
    assert_eq!(moved["attempt"], 2, "{moved}");
    // It names the checkpoint it restored from.
    let restored = moved["last_checkpoint"]["id"].as_u64().unwrap();
    assert!(
        moved["last_checkpoint"]["path"]
            .as_str()
            .unwrap()
            .ends_with(&format!("/checkpoints/{restored}")),
        "{moved}"
    );
    // One restart — unless, on a loaded machine, the lone JobManager's lease
    // lapsed meanwhile and it resumed the job as a new leader instead.
    assert!(
        moved["restarts"] == 1 || r.log("jm-a").matches("became leader").count() > 1,
        "{moved}"
    );
    assert!(
        moved["failure"]
            .as_str()
            .is_none_or(|f| !f.contains("waiting")),
        "{moved}"
    );
    assert!(
        r.log("jm-a").contains("TaskManager lost"),
        "the loss was detected through the membership"
    );
    r.finish_and_check(leader, &job, Duration::from_secs(60))
        .await;
    assert_eq!(r.deployments_started(&[victim]).await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_waits_for_free_slots_and_says_so() {
    let nats = NatsServer::start();
    let mut r = Region::new(nats.url(), "800ms", "500ms");
    r.start("jm-a", None);
    let (leader, _) = r.leader(&[], Duration::from_secs(20)).await;
    // No TaskManager yet: the job waits and its status says why.
    let (job, _) = r.submit(&r.jms[leader]).await;
    let waiting = r
        .wait_job(
            &r.jms[leader],
            &job,
            Duration::from_secs(10),
            "a waiting message",
            |v| {
                v["failure"]
                    .as_str()
                    .is_some_and(|f| f.contains("waiting for 2 free task slots"))
            },
        )
        .await;
    assert_eq!(waiting["state"], "CREATED", "{waiting}");
    assert_eq!(waiting["attempt"], 0, "{waiting}");
    r.start_tm("tm-1");
    r.finish_and_check(leader, &job, Duration::from_secs(60))
        .await;
    // The leader exports the registered capacity; the job's slots are free
    // again once it finished.
    let start = Instant::now();
    loop {
        let text = r.metrics(&r.jms[leader]).await;
        if text.lines().any(|l| l == "ferry_taskmanagers 1")
            && text
                .lines()
                .any(|l| l == r#"ferry_task_slots{state="free"} 4"#)
            && text
                .lines()
                .any(|l| l == r#"ferry_task_slots{state="used"} 0"#)
        {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "capacity metrics:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Speaks the TaskManager's gRPC protocol directly, as a JobManager would.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_taskmanager_rejects_commands_of_an_older_epoch() {
    use ferry_core::proto::{self, task_manager_client::TaskManagerClient};
    let nats = NatsServer::start();
    let mut r = Region::new(nats.url(), "800ms", "500ms");
    r.start_tm("tm-1");
    // Its gRPC address, as its membership record publishes it.
    let addr = r.tm_grpc_url("tm-1").await;
    // The region's leader lease at epoch 6, as a JobManager that won it
    // would have written it: the TaskManager believes epochs up to 6 only.
    let nc = async_nats::connect(nats.url()).await.unwrap();
    let kv = async_nats::jetstream::new(nc)
        .get_key_value("ferry-test")
        .await
        .expect("the TaskManager created the region's bucket");
    kv.put(
        "leader",
        r#"{"holder":"test-6","payload":"","epoch":6}"#.into(),
    )
    .await
    .unwrap();
    let mut c = TaskManagerClient::connect(addr.clone()).await.unwrap();
    // A made-up epoch above the lease's is refused, and locks no one out.
    let e = c
        .attach(proto::AttachRequest {
            epoch: 1_000_000_000,
            jobmanager: "intruder".into(),
        })
        .await
        .expect_err("an epoch the lease does not show");
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e}");
    assert!(
        e.message().contains("lease is at epoch 6"),
        "{}",
        e.message()
    );
    let mut newer = c
        .attach(proto::AttachRequest {
            epoch: 5,
            jobmanager: "test-5".into(),
        })
        .await
        .unwrap()
        .into_inner();
    match newer.message().await.unwrap().and_then(|e| e.event) {
        Some(proto::tm_event::Event::Registration(reg)) => {
            assert_eq!(reg.taskmanager, "tm-1");
            assert_eq!(reg.slots, 4);
            assert!(reg.deployments.is_empty());
        }
        other => panic!("expected a registration first, got {other:?}"),
    }
    let stale = |r: Result<tonic::Response<proto::Ack>, tonic::Status>| {
        let e = r.expect_err("an older epoch must be rejected");
        assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{e}");
        assert!(e.message().contains("stale epoch 4"), "{}", e.message());
    };
    stale(
        c.trigger(proto::TriggerRequest {
            epoch: 4,
            deployment: "d".into(),
            checkpoint: 9,
            dir: "file:///tmp/x".into(),
            ..Default::default()
        })
        .await,
    );
    stale(
        c.complete(proto::CompleteRequest {
            epoch: 4,
            deployment: "d".into(),
            checkpoint: 9,
            region_epoch: 0,
        })
        .await,
    );
    stale(
        c.cancel(proto::CancelRequest {
            epoch: 4,
            deployment: "d".into(),
        })
        .await,
    );
    let spec = SPEC.replace("OUT", &r.out().display().to_string());
    let e = c
        .deploy(proto::DeployRequest {
            epoch: 4,
            deployment: "d".into(),
            job_id: uuid_like(),
            attempt: 1,
            spec,
            restore_from: String::new(),
            region_epoch: 0,
            fence_ms: 0,
            ..Default::default()
        })
        .await
        .expect_err("deploy with an older epoch");
    assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{e}");
    let e = c
        .attach(proto::AttachRequest {
            epoch: 4,
            jobmanager: "test-4".into(),
        })
        .await
        .expect_err("attach with an older epoch");
    assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{e}");
    // The same epoch is still accepted (a bad checkpoint number is refused
    // for what it is, not for the epoch).
    let e = c
        .complete(proto::CompleteRequest {
            epoch: 5,
            deployment: "d".into(),
            checkpoint: 9,
            region_epoch: 7,
        })
        .await
        .expect_err("no such deployment");
    assert_eq!(e.code(), tonic::Code::NotFound, "{e}");
    // Sinks refuse a commit of an older region epoch than one seen.
    let e = c
        .complete(proto::CompleteRequest {
            epoch: 5,
            deployment: "d".into(),
            checkpoint: 9,
            region_epoch: 6,
        })
        .await
        .expect_err("an older region epoch");
    assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{e}");
    assert!(
        e.message()
            .contains("region epoch 6 is older than region epoch 7"),
        "{e}"
    );
    // A newer epoch ends the older attachment.
    let _newest = c
        .attach(proto::AttachRequest {
            epoch: 6,
            jobmanager: "test-6".into(),
        })
        .await
        .unwrap();
    let ended = tokio::time::timeout(Duration::from_secs(5), newer.message())
        .await
        .expect("the epoch-5 stream ends once epoch 6 attached");
    assert!(matches!(ended, Ok(None) | Err(_)), "{ended:?}");
    let stale_count = r.tm_metric(0, "stale_commands").await.unwrap();
    // Five commands of epoch 4, one commit of an older region epoch.
    assert_eq!(stale_count, 6);
    assert_eq!(r.tm_metric(0, "unconfirmed_epochs").await, Some(1));
    assert_eq!(r.tm_metric(0, "epoch").await, Some(6));
}

/// A syntactically valid job id for direct deploy requests.
fn uuid_like() -> String {
    "0193a5b0-0000-7000-8000-000000000001".to_string()
}
