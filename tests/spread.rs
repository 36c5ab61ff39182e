//! Jobs bigger than one TaskManager: a job of parallelism 4 over
//! TaskManagers of 2 slots runs in parts, its records crossing the
//! exchange between them — real `ferry jobmanager` and `ferry taskmanager`
//! processes on a real NATS server. Its output must equal the reference
//! computed from the generator model; losing a TaskManager restarts it
//! from its checkpoint exactly once; losing the leader does not restart
//! it at all.

mod common;

use std::time::{Duration, Instant};

use common::ha::*;
use ferry_testkit::NatsServer;
use ferry_testkit::pki::{Leaf, Pki};
use serde_json::Value;

/// A region whose TaskManagers have 2 slots, running the test job at
/// parallelism 4.
fn region(nats: &NatsServer) -> Region {
    let mut r = Region::new(nats.url(), "800ms", "500ms");
    r.parallelism = 4;
    r.tm_slots = 2;
    r
}

/// The TaskManagers of each part, and the subtasks each runs.
fn parts(job: &Value) -> Vec<(String, Vec<u64>)> {
    job["parts"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|p| {
                    (
                        p["taskmanager"].as_str().unwrap_or_default().to_string(),
                        p["subtasks"]
                            .as_array()
                            .map(|s| s.iter().filter_map(Value::as_u64).collect())
                            .unwrap_or_default(),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Asserts the parts run every subtask once, on distinct TaskManagers.
fn assert_spread(job: &Value, taskmanagers: usize) {
    let p = parts(job);
    assert_eq!(p.len(), taskmanagers, "{job}");
    let mut subtasks: Vec<u64> = p.iter().flat_map(|(_, s)| s.clone()).collect();
    subtasks.sort_unstable();
    assert_eq!(subtasks, vec![0, 1, 2, 3], "{job}");
    let mut tms: Vec<&String> = p.iter().map(|(t, _)| t).collect();
    tms.dedup();
    assert_eq!(tms.len(), taskmanagers, "{job}");
}

/// A TaskManager's exchange counter (`ferry_tm_exchange_<name>_total`)
/// summed over its peers, one direction.
async fn exchanged(r: &Region, tm: usize, name: &str, direction: &str) -> u64 {
    let text = r
        .http
        .get(format!("{}/metrics", r.tms[tm].url()))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let prefix = format!("ferry_tm_exchange_{name}_total{{");
    text.lines()
        .filter(|l| l.starts_with(&prefix) && l.contains(&format!("direction=\"{direction}\"")))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

/// Both TaskManagers sent and received records over the exchange.
async fn assert_exchanged(r: &Region) {
    for tm in 0..2 {
        for direction in ["out", "in"] {
            let n = exchanged(r, tm, "records", direction).await;
            assert!(n > 0, "{} exchanged no records {direction}", r.tms[tm].id);
        }
        assert!(exchanged(r, tm, "bytes", "out").await > 0);
    }
}

async fn spread_job(r: &Region, via: usize) -> (String, Value) {
    let job = r.running_job(via).await;
    let v = r
        .wait_job(
            &r.jms[via],
            &job,
            Duration::from_secs(20),
            "the job running in parts",
            |v| has_checkpoint(v) && parts(v).len() > 1,
        )
        .await;
    (job, v)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_bigger_than_any_taskmanager_runs_over_two_with_exact_output() {
    let nats = NatsServer::start();
    let mut r = region(&nats);
    r.start("jm-a", None);
    r.start_tm("tm-1");
    r.start_tm("tm-2");
    let (leader, _) = r.leader(&[], Duration::from_secs(20)).await;
    let (job, running) = spread_job(&r, leader).await;
    assert_spread(&running, 2);
    let done = r.finished(leader, &job, Duration::from_secs(60)).await;
    r.check_output();
    assert_exchanged(&r).await;
    assert_eq!(done["records_in"], TOTAL, "{done}");
    assert_eq!(done["attempt"], 1, "{done}");
    assert_eq!(done["restarts"], 0, "{done}");
    assert_epochs_monotonic(&r.manifest_epochs(&job));
    // One deployment, in two parts: one started on each TaskManager.
    assert_eq!(r.deployments_started(&[]).await, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_of_a_taskmanager_running_part_of_a_job_restarts_it_exactly_once() {
    let nats = NatsServer::start();
    let mut r = region(&nats);
    r.start("jm-a", None);
    for id in ["tm-1", "tm-2", "tm-3"] {
        r.start_tm(id);
    }
    let (leader, _) = r.leader(&[], Duration::from_secs(20)).await;
    let (job, running) = spread_job(&r, leader).await;
    assert_spread(&running, 2);
    let on: Vec<String> = parts(&running).into_iter().map(|(t, _)| t).collect();
    let victim = r
        .tms
        .iter()
        .position(|t| on.contains(&t.id))
        .expect("a part runs on a started TaskManager");
    let victim_id = r.tms[victim].id.clone();

    r.tms[victim].signal(libc::SIGKILL);
    let killed = Instant::now();
    let moved = r
        .wait_job(
            &r.jms[leader],
            &job,
            Duration::from_secs(30),
            "the job running again without the killed TaskManager",
            |v| {
                v["state"] == "RUNNING"
                    && v["attempt"].as_u64() >= Some(2)
                    && !parts(v).is_empty()
                    && parts(v).iter().all(|(t, _)| *t != victim_id)
            },
        )
        .await;
    eprintln!(
        "job redeployed {:?} after SIGKILL of {victim_id}: {:?}",
        killed.elapsed(),
        parts(&moved)
    );
    // The 4 slots left are on two TaskManagers: it is spread again.
    assert_spread(&moved, 2);
    assert_eq!(moved["attempt"], 2, "{moved}");
    // One restart: the surviving part fails at once (its exchange channel
    // to the killed TaskManager broke), before the membership expires.
    assert_eq!(moved["restarts"], 1, "{moved}");
    r.finish_and_check(leader, &job, Duration::from_secs(60))
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_of_the_leader_leaves_a_spread_job_running_without_a_restart() {
    let nats = NatsServer::start();
    let mut r = region(&nats);
    for id in ["jm-a", "jm-b"] {
        r.start(id, None);
    }
    r.start_tm("tm-1");
    r.start_tm("tm-2");
    let (leader, epoch) = r.leader(&[], Duration::from_secs(20)).await;
    let (job, before) = spread_job(&r, leader).await;
    assert_spread(&before, 2);
    assert_eq!(before["attempt"], 1, "{before}");

    r.jms[leader].signal(libc::SIGKILL);
    let (new_leader, new_epoch) = r.leader(&[leader], Duration::from_secs(10)).await;
    assert!(new_epoch > epoch, "epoch must grow: {epoch} -> {new_epoch}");
    let done = r.finished(new_leader, &job, Duration::from_secs(60)).await;
    let log = r.log(&r.jms[new_leader].id);
    assert!(
        log.contains("adopted the job's running tasks"),
        "the new leader adopted both parts:\n{log}"
    );
    // The same deployment, both parts, ran the job to its end.
    assert_eq!(done["attempt"], 1, "{done}");
    assert_eq!(done["restarts"], 0, "{done}");
    assert_eq!(done["deployment"], before["deployment"], "{done}");
    assert_eq!(parts(&done), parts(&before), "{done}");
    assert_eq!(done["records_in"], TOTAL, "{done}");
    assert_eq!(r.deployments_started(&[]).await, 2);
    r.check_output();
    assert_epochs_monotonic(&r.manifest_epochs(&job));
}

/// The one name every TaskManager certificate carries: the JobManagers
/// check it, and the exchange port takes only clients that show it.
const TM_NAME: &str = "taskmanager.ferry.test";

fn tls_env(leaf: &Leaf) -> Vec<(&'static str, String)> {
    vec![
        ("FERRY_TLS_GRPC_CERT_FILE", leaf.cert.display().to_string()),
        ("FERRY_TLS_GRPC_KEY_FILE", leaf.key.display().to_string()),
        ("FERRY_TLS_GRPC_CA_FILE", leaf.ca.display().to_string()),
        ("FERRY_TLS_GRPC_SERVER_NAME", TM_NAME.to_string()),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spread_job_runs_over_a_mutual_tls_exchange_with_exact_output() {
    let nats = NatsServer::start();
    let mut r = region(&nats);
    let pki = Pki::new(&r.dir.path().join("pki"), "region");
    let jm_leaf = pki.issue("jobmanager", &["jobmanager.ferry.test"]);
    let tm_leaf = pki.issue("taskmanager", &[TM_NAME]);
    r.jm_env = tls_env(&jm_leaf);
    r.tm_env = tls_env(&tm_leaf);
    r.tm_env.push((
        "FERRY_TLS_GRPC_CLIENT_NAME",
        "jobmanager.ferry.test".to_string(),
    ));
    r.start("jm-a", None);
    r.start_tm("tm-1");
    r.start_tm("tm-2");
    let (leader, _) = r.leader(&[], Duration::from_secs(20)).await;
    // The start line (logged before the TaskManager joins the region)
    // names the exchange URL it publishes.
    r.tm_grpc_url("tm-1").await;
    let log = r.log("tm-1");
    let exchange = log
        .split("exchange=")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .unwrap_or_default();
    assert!(
        exchange.starts_with("https://"),
        "advertised {exchange:?}\n{log}"
    );
    let (job, running) = spread_job(&r, leader).await;
    assert_spread(&running, 2);
    let done = r.finished(leader, &job, Duration::from_secs(60)).await;
    assert_eq!(done["restarts"], 0, "{done}");
    r.check_output();
    assert_exchanged(&r).await;
    // No handshake on either port failed: the TaskManagers' certificates
    // carry the name the exchange asks of its clients.
    for tm in 0..2 {
        assert_eq!(r.tm_metric(tm, "tls_handshake_failures").await, Some(0));
    }
}

/// Every record crosses to a slow sink: an endless generator → key_by →
/// a blackhole taking 20,000 records per second per subtask.
const SLOW_SPEC: &str = r#"
apiVersion: ferry.dev/v1
kind: Job
metadata: {name: slow-sink}
spec:
  parallelism: 2
  checkpointing: {interval: 1s, retained: 2}
  restartStrategy: {type: none}
  source:
    generator:
      partitions: 2
      total: 10000000000
      seed: 3
      eventTime: {step: 1ms, maxOutOfOrderness: 100ms}
      fields:
        user: {type: key, cardinality: 1000, prefix: "u"}
  operators:
    - key_by: user
  sink:
    blackhole: {recordsPerSecond: 20000}
"#;

/// Resident memory of a process, from /proc.
fn rss_mib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map(|kb| kb / 1024)
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_sink_backpressures_across_taskmanagers_in_bounded_memory_and_checkpoints_go_on() {
    const RUN: Duration = Duration::from_secs(120);
    let nats = NatsServer::start();
    let mut r = region(&nats);
    r.tm_slots = 1;
    r.start("jm-a", None);
    r.start_tm("tm-1");
    r.start_tm("tm-2");
    let (leader, _) = r.leader(&[], Duration::from_secs(20)).await;
    let api = r.api(&r.jms[leader]);
    let job = api
        .submit(SLOW_SPEC.as_bytes().to_vec(), None)
        .await
        .unwrap()
        .value
        .id
        .to_string();
    r.wait_job(
        &r.jms[leader],
        &job,
        Duration::from_secs(30),
        "spread and checkpointing",
        |v| has_checkpoint(v) && parts(v).len() == 2,
    )
    .await;
    let start = Instant::now();
    let (mut peak, mut backpressured) = ([0u64; 2], 0.0f64);
    let mut completed: Vec<(Duration, u64)> = Vec::new();
    while start.elapsed() < RUN {
        for (i, tm) in r.tms.iter().enumerate() {
            let rss = rss_mib(tm.child.id());
            peak[i] = peak[i].max(rss);
            assert!(
                rss < 512,
                "{} uses {rss} MiB after {:?}",
                tm.id,
                start.elapsed()
            );
        }
        let v = r
            .get(&r.jms[leader], &format!("/v1/jobs/{job}"))
            .await
            .unwrap_or_default();
        assert_eq!(v["state"], "RUNNING", "{v}");
        if let Some(id) = v["last_checkpoint"]["id"].as_u64()
            && completed.last().is_none_or(|(_, last)| *last < id)
        {
            completed.push((start.elapsed(), id));
        }
        // The sources wait on the slow sink, through the exchange.
        for tm in 0..2 {
            let text = r
                .http
                .get(format!("{}/metrics", r.tms[tm].url()))
                .send()
                .await
                .unwrap()
                .text()
                .await
                .unwrap();
            for l in text.lines().filter(|l| {
                l.starts_with("ferry_tm_task_backpressure_ratio{") && l.contains("stage=\"0\"")
            }) {
                let ratio: f64 = l.rsplit(' ').next().unwrap().parse().unwrap();
                backpressured = backpressured.max(ratio);
            }
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    eprintln!(
        "peak RSS {peak:?} MiB; sources' backpressure up to {backpressured}; {} checkpoints completed, the last {:?} in",
        completed.len(),
        completed.last()
    );
    assert!(
        backpressured > 0.5,
        "the sources never waited on the sink: {backpressured}"
    );
    // Checkpoints completed all along: in every 30 s of the run.
    for window in 0..4 {
        let (from, to) = (
            Duration::from_secs(30 * window),
            Duration::from_secs(30 * (window + 1)),
        );
        assert!(
            completed.iter().any(|(t, _)| *t >= from && *t < to),
            "no checkpoint completed between {from:?} and {to:?}: {completed:?}"
        );
    }
    // The sink took what it could, no more: 2 × 20,000 a second at most.
    let v = r
        .get(&r.jms[leader], &format!("/v1/jobs/{job}"))
        .await
        .unwrap();
    let out = v["records_out"].as_u64().unwrap();
    let limit = 2 * 20_000 * (start.elapsed().as_secs() + 40);
    assert!(out > 0 && out <= limit, "records_out {out}, limit {limit}");
    api.cancel(&job, false).await.unwrap();
}
