//! Cross-region behaviour of `ferry jobmanager` and `ferry taskmanager`
//! processes: regions share a regional `nats-server` (separate buckets) and
//! keep their heartbeats and the region lease in a 3-node global NATS
//! cluster. The leader replicates each checkpoint to the standby region's
//! store; the regions see each other (and a region's loss) through the
//! global KV; the standby region takes over when the whole primary region
//! dies; a planned switchover moves a running job without loss or
//! duplicates; a region-outage drill measures the failover and the job
//! fails back; fail-back reports what the old primary committed beyond the
//! failover; a primary cut off from the global KV stops before a
//! standby takes over; and with synchronous replication a primary cut off
//! from its standby's store commits nothing the standby lacks (`block`) or
//! degrades to asynchronous and returns by itself (`async`); a hot
//! standby holds the job loaded and a failover starts it without a
//! restore. Every job test checks the committed output, over
//! both regions' work, against the expected counts computed from the
//! generator model. The fixture is `tests/common/ha.rs`.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::ha::*;
use common::*;
use ferry_testkit::{FaultProxy, NatsCluster, NatsServer};
use serde_json::Value;

/// The leader replicates every checkpoint of a running job to the other
/// region's store as it completes; `/v1/regions` and the metrics report the
/// standby caught up, and the copy test-restores.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_leader_replicates_each_checkpoint_to_the_standby_region() {
    let nats = NatsServer::start();
    let mut r = Region::new(nats.url(), "800ms", "500ms");
    let standby = r.dir.path().join("standby-store");
    r.env.push((
        "FERRY_REGIONS_STORES",
        format!("standby=file://{}", standby.display()),
    ));
    r.env.push(("FERRY_REGIONS_PRIMARY", "test".into()));
    r.start("jm-a", None);
    r.start_tm("tm-1");
    let (leader, _) = r.leader(&[], Duration::from_secs(20)).await;
    let job = r.running_job(leader).await;
    // While it runs, the standby receives complete checkpoints.
    let start = Instant::now();
    loop {
        let v = r.get(&r.jms[leader], "/v1/regions").await.unwrap();
        let s = &v["standbys"][0];
        assert_eq!(s["region"], "standby", "{v}");
        if s["jobs"][&job]["replicated_checkpoint"].as_u64().is_some() {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "nothing replicated: {v}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    r.finish_and_check(leader, &job, Duration::from_secs(60))
        .await;
    // Caught up: the final checkpoint's manifest is in the standby, byte
    // for byte, and nothing is pending.
    let primary = r.storage().join("jobs").join(&job).join("checkpoints");
    let newest = std::fs::read_dir(&primary)
        .unwrap()
        .flatten()
        .filter(|e| e.path().join("MANIFEST.json").exists())
        .filter_map(|e| e.file_name().to_string_lossy().parse::<u64>().ok())
        .max()
        .unwrap();
    let start = Instant::now();
    let v = loop {
        let v = r.get(&r.jms[leader], "/v1/regions").await.unwrap();
        let s = &v["standbys"][0];
        if s["jobs"][&job]["replicated_checkpoint"] == newest && s["lag_checkpoints"] == 0 {
            break v;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "not caught up: {v}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(v["standbys"][0]["lag_seconds"], 0.0, "{v}");
    let rel = format!("jobs/{job}/checkpoints/{newest}/MANIFEST.json");
    assert_eq!(
        std::fs::read(standby.join(&rel)).unwrap(),
        std::fs::read(r.storage().join(&rel)).unwrap()
    );
    assert!(standby.join(format!("jobs/{job}/spec.yaml")).exists());
    // The metrics follow within their 1 s refresh.
    let start = Instant::now();
    loop {
        let metrics = r.metrics(&r.jms[leader]).await;
        if metrics.contains(r#"ferry_replication_lag_checkpoints{region="standby"} 0"#) {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(5), "{metrics}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let o = Command::new(ferry_bin())
        .args(["region", "verify", "--store"])
        .arg(format!("file://{}", standby.display()))
        .output_within(common::COMMAND_LIMIT)
        .unwrap();
    assert!(
        o.status.success(),
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
}

/// Two regions heartbeat into a global NATS: each sees the other healthy;
/// when one region's JobManager dies the other sees it down within the
/// region timeout; without the global KV, `/health/regions` answers 503.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn regions_see_each_other_through_the_global_kv() {
    let nats = NatsServer::start();
    let mut global = NatsCluster::start(3);
    let mut east = Region::new(nats.url(), "800ms", "500ms");
    let mut west = Region::new(nats.url(), "800ms", "500ms");
    two_regions(&mut east, &mut west, &global);
    // A job replicated into the standby's store before it starts.
    let replicated = "0193a5b0000070008000000000000abc";
    let spec_path = west.storage().join(format!("jobs/{replicated}/spec.yaml"));
    std::fs::create_dir_all(spec_path.parent().unwrap()).unwrap();
    std::fs::write(&spec_path, SPEC.replace("OUT", "/nonexistent")).unwrap();
    east.start("jm-east", None);
    west.start("jm-west", None);
    east.leader(&[], Duration::from_secs(20)).await;
    west.leader(&[], Duration::from_secs(20)).await;

    let healthy = |v: &Value, region: &str| {
        v["regions"]
            .as_array()
            .and_then(|a| a.iter().find(|r| r["region"] == region))
            .is_some_and(|r| r["healthy"] == true)
    };
    let start = Instant::now();
    loop {
        let v = east.get(&east.jms[0], "/v1/regions").await.unwrap();
        if healthy(&v, "east") && healthy(&v, "west") {
            assert_eq!(v["global_reachable"], true, "{v}");
            let w = v["regions"]
                .as_array()
                .unwrap()
                .iter()
                .find(|r| r["region"] == "west")
                .unwrap()
                .clone();
            assert_eq!(w["heartbeat"]["leader"], "jm-west", "{v}");
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(20), "{v}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The standby region's leader lists the replicated job but does not
    // start it (it would wait for task slots and say so if it did).
    let j = west
        .get(&west.jms[0], &format!("/v1/jobs/{replicated}"))
        .await
        .unwrap();
    assert_eq!(j["state"], "CREATED", "{j}");
    assert_eq!(j["failure"], Value::Null, "{j}");
    assert_eq!(j["attempt"], 0, "{j}");
    assert!(
        west.log("jm-west")
            .contains("standby region: running no job")
    );
    // West learns the primary from the region lease (not from its config).
    wait_primary(&west, 0, "east", Duration::from_secs(20)).await;
    let m = west.metrics(&west.jms[0]).await;
    assert!(m.lines().any(|l| l == "ferry_region_is_primary 0"), "{m}");
    // The standby region takes no job: jobs run in the primary.
    let res = west
        .http
        .post(format!("{}/v1/jobs", west.jms[0].url()))
        .body(SPEC.replace("OUT", &west.out().display().to_string()))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 409);
    let body: Value = res.json().await.unwrap();
    assert_eq!(body["error"]["code"], "not_primary_region", "{body}");
    let o = Command::new(ferry_bin())
        .args(["region", "status", "--url", &east.jms[0].url()])
        .output_within(common::COMMAND_LIMIT)
        .unwrap();
    let table = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{table}");
    assert!(
        table
            .lines()
            .any(|l| l.starts_with("west") && l.contains("yes") && l.contains("jm-west")),
        "{table}"
    );

    west.jms[0].signal(libc::SIGKILL);
    let killed = Instant::now();
    loop {
        let v = east.get(&east.jms[0], "/v1/regions").await.unwrap();
        if !healthy(&v, "west") {
            assert!(healthy(&v, "east"), "{v}");
            eprintln!(
                "west seen down {:?} after its JobManager died",
                killed.elapsed()
            );
            break;
        }
        assert!(killed.elapsed() < Duration::from_secs(10), "{v}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Two of the three global nodes go: no quorum.
    global.nodes[1].kill();
    global.nodes[2].kill();
    let start = Instant::now();
    loop {
        let r = east
            .http
            .get(format!("{}/health/regions", east.jms[0].url()))
            .send()
            .await
            .unwrap();
        if r.status() == 503 {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(15),
            "still {}",
            r.status()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Unplanned cross-region failover: every process of the primary region is
/// SIGKILLed mid-job; the standby region sees the primary silent for the
/// region timeout, takes the region lease (epoch grows), starts the job
/// from its newest replicated checkpoint on its own TaskManager, and the
/// job's output across both regions is exactly the expected result.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_standby_region_takes_over_when_the_primary_region_dies() {
    let nats = NatsServer::start();
    let global = NatsCluster::start(3);
    let mut east = Region::new(nats.url(), "800ms", "500ms");
    let mut west = Region::new(nats.url(), "800ms", "500ms");
    two_regions(&mut east, &mut west, &global);
    start_two_regions(&mut east, &mut west).await;
    // The lease exists and names east before the job starts.
    let start = Instant::now();
    let epoch = loop {
        let v = east.get(&east.jms[0], "/v1/regions").await.unwrap();
        if v["primary"] == "east" && v["epoch"].as_u64().unwrap_or(0) > 0 {
            break v["epoch"].as_u64().unwrap();
        }
        assert!(start.elapsed() < Duration::from_secs(20), "{v}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let job = east.running_job(0).await;
    // Wait until west holds a replicated checkpoint.
    let start = Instant::now();
    loop {
        let v = east.get(&east.jms[0], "/v1/regions").await.unwrap();
        if v["standbys"][0]["jobs"][&job]["replicated_checkpoint"].is_u64() {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(20), "{v}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // The whole primary region dies.
    east.jms[0].signal(libc::SIGKILL);
    east.tms[0].signal(libc::SIGKILL);
    let killed = Instant::now();
    let v = loop {
        let v = west.get(&west.jms[0], "/v1/regions").await.unwrap();
        if v["primary"] == "west" {
            break v;
        }
        assert!(
            killed.elapsed() < Duration::from_secs(20),
            "no promotion: {v}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    eprintln!(
        "west promoted {:?} after the primary region died",
        killed.elapsed()
    );
    assert!(
        v["epoch"].as_u64().unwrap() > epoch,
        "region epoch must grow: {v}"
    );
    let done = west
        .wait_job(
            &west.jms[0],
            &job,
            Duration::from_secs(90),
            "the job to finish in the new primary",
            |v| v["state"] == "FINISHED",
        )
        .await;
    eprintln!(
        "job finished in west {:?} after the primary region died",
        killed.elapsed()
    );
    assert_eq!(done["taskmanager"], "tm-west", "{done}");
    assert!(
        west.log("jm-west")
            .contains("failover: primary east silent")
    );
    // Exactly the expected output, over both regions' work.
    east.check_output();
    // West's own checkpoints record the new region epoch; the ones it
    // restored from carry east's.
    let new_epoch = v["epoch"].as_u64().unwrap();
    let mut epochs = Vec::new();
    for e in std::fs::read_dir(west.storage().join("jobs").join(&job).join("checkpoints"))
        .unwrap()
        .flatten()
    {
        if let Ok(t) = std::fs::read_to_string(e.path().join("MANIFEST.json")) {
            let m: Value = serde_json::from_str(&t).unwrap();
            epochs.push((
                m["checkpoint_id"].as_u64().unwrap(),
                m["region_epoch"].as_u64().unwrap(),
            ));
        }
    }
    epochs.sort();
    let (_, last) = *epochs.last().expect("west completed checkpoints");
    assert_eq!(last, new_epoch, "{epochs:?}");
    assert!(
        epochs.iter().all(|(_, e)| *e == epoch || *e == new_epoch),
        "{epochs:?}"
    );
    let m = west.metrics(&west.jms[0]).await;
    assert!(m.lines().any(|l| l == "ferry_failovers_total 1"), "{m}");
    assert!(
        m.lines().any(|l| l == "ferry_region_is_primary 1"),
        "{m}\n{}",
        west.log("jm-west")
    );
}

/// Planned switchover with `ferry region failover --to`: the primary stops
/// the job with a savepoint, the savepoint reaches the standby's store, the
/// lease moves, and the standby resumes from the savepoint — the output is
/// exactly the expected result (nothing lost, nothing repeated). The REST
/// API needs a token; both regions announce the move to an HTTPS webhook
/// whose certificate a private CA signed (`regions.webhookCaFile`), with
/// a bearer token, naming the token's owner as the actor.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_planned_switchover_moves_a_running_job_without_loss_or_duplicates() {
    const SRE: &str = "sre-token-5d1e-0000000000001";
    const HOOK_TOKEN: &str = "hook-token-77c2-000000000001";
    let nats = NatsServer::start();
    let global = NatsCluster::start(3);
    let mut east = Region::new(nats.url(), "800ms", "500ms");
    let mut west = Region::new(nats.url(), "800ms", "500ms");
    two_regions(&mut east, &mut west, &global);
    let pki = ferry_testkit::pki::Pki::new(&east.dir.path().join("pki"), "hooks");
    let receiver = pki.issue("receiver", &["127.0.0.1"]);
    let (hook_url, mut hook) = https_webhook_receiver(&receiver).await;
    let tokens = east.dir.path().join("tokens.yaml");
    std::fs::write(
        &tokens,
        format!("tokens:\n  - {{name: sre-alice, token: {SRE}, roles: ['*:admin']}}\n"),
    )
    .unwrap();
    let hook_token = east.dir.path().join("hook.token");
    std::fs::write(&hook_token, format!("{HOOK_TOKEN}\n")).unwrap();
    for r in [&mut east, &mut west] {
        r.jm_env.extend([
            ("FERRY_API_AUTH_TOKENS_FILE", tokens.display().to_string()),
            ("FERRY_REGIONS_WEBHOOK", hook_url.clone()),
            (
                "FERRY_REGIONS_WEBHOOK_CA_FILE",
                pki.ca_file().display().to_string(),
            ),
            (
                "FERRY_REGIONS_WEBHOOK_TOKEN_FILE",
                hook_token.display().to_string(),
            ),
        ]);
        r.token = Some(SRE.to_string());
    }
    start_two_regions(&mut east, &mut west).await;
    // East took the first lease by itself, and said so over HTTPS.
    let first = tokio::time::timeout(Duration::from_secs(20), hook.recv())
        .await
        .expect("east's first announcement")
        .unwrap();
    assert_eq!(first.body["event"], "promoted", "{:?}", first.body);
    assert_eq!(first.body["region"], "east");
    assert_eq!(first.body["actor"], "automatic");
    assert_eq!(
        first.authorization.as_deref(),
        Some(format!("Bearer {HOOK_TOKEN}").as_str())
    );
    let start = Instant::now();
    while east.get(&east.jms[0], "/v1/regions").await.unwrap()["epoch"]
        .as_u64()
        .unwrap_or(0)
        == 0
    {
        assert!(start.elapsed() < Duration::from_secs(20), "no region lease");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let job = east.running_job(0).await;
    // A switchover refuses an unhealthy target: wait until east has seen
    // west's heartbeat (it may not have by the time the job runs).
    wait_healthy(&east, 0, "west", Duration::from_secs(20)).await;

    let run = |args: &[&str]| {
        Command::new(ferry_bin())
            .args([
                "region",
                "failover",
                "--to",
                "west",
                "--url",
                &east.jms[0].url(),
            ])
            .args(args)
            .env("FERRY_TOKEN", SRE)
            .output_within(common::COMMAND_LIMIT)
            .unwrap()
    };
    let plan = run(&["--dry-run", "-o", "json"]);
    assert!(
        plan.status.success(),
        "{}",
        String::from_utf8_lossy(&plan.stderr)
    );
    let plan: Value = serde_json::from_slice(&plan.stdout).unwrap();
    assert_eq!(plan["jobs"], serde_json::json!([job]), "{plan}");
    let still = east
        .get(&east.jms[0], &format!("/v1/jobs/{job}"))
        .await
        .unwrap();
    assert_eq!(
        still["state"], "RUNNING",
        "a dry run changes nothing: {still}"
    );

    let o = run(&["-o", "json"]);
    assert!(
        o.status.success(),
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    let report: Value = serde_json::from_slice(&o.stdout).unwrap();
    eprintln!("switchover took {} ms", report["took_ms"]);
    assert_eq!(report["to"], "west");
    assert_eq!(
        report["savepoints"].as_array().unwrap().len(),
        1,
        "{report}"
    );
    let start = Instant::now();
    let done = loop {
        let v = west.get(&west.jms[0], &format!("/v1/jobs/{job}")).await;
        if let Some(v) = v.filter(|v| v["state"] == "FINISHED") {
            break v;
        }
        assert!(
            start.elapsed() < Duration::from_secs(90),
            "the job did not finish in the new primary: {:?}\nwest:\n{}\neast:\n{}",
            west.get(&west.jms[0], &format!("/v1/jobs/{job}")).await,
            west.log("jm-west"),
            east.log("jm-east")
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(done["taskmanager"], "tm-west", "{done}");
    let west_log = west.log("jm-west");
    // Resumed from the savepoint itself (not an older checkpoint).
    let sp = report["savepoints"][0]["checkpoint_id"].as_u64().unwrap();
    assert!(
        west_log
            .lines()
            .any(|l| l.contains("restored from checkpoint")
                && l.contains(&format!("checkpoint={sp}"))),
        "{west_log}"
    );
    // Nothing lost, nothing repeated, over both regions' work.
    east.check_output();
    // East runs nothing now and refuses new jobs.
    let res = east
        .http
        .post(format!("{}/v1/jobs", east.jms[0].url()))
        .bearer_auth(SRE)
        .body(SPEC.replace("OUT", &east.out().display().to_string()))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 409);
    // Both regions announced the move over HTTPS as sre-alice's, with the
    // new region epoch; nobody logged the webhook's token or its path.
    let mut moved = Vec::new();
    while moved.len() < 2 {
        let h = tokio::time::timeout(Duration::from_secs(10), hook.recv())
            .await
            .expect("the switchover's announcements")
            .unwrap();
        assert_eq!(
            h.authorization.as_deref(),
            Some(format!("Bearer {HOOK_TOKEN}").as_str())
        );
        moved.push(h.body);
    }
    moved.sort_by_key(|b| b["event"].as_str().map(str::to_string));
    for (b, event, region) in [
        (&moved[0], "demoted", "east"),
        (&moved[1], "promoted", "west"),
    ] {
        assert_eq!(
            (b["event"].as_str(), b["region"].as_str()),
            (Some(event), Some(region)),
            "{b}"
        );
        assert_eq!(b["actor"], "sre-alice", "{b}");
        assert_eq!(b["primary"], "west", "{b}");
        assert_eq!(b["epoch"], report["epoch"], "{b} vs {report}");
        assert_eq!(b["reason"], "switchover from east", "{b}");
    }
    for (r, id) in [(&east, "jm-east"), (&west, "jm-west")] {
        let log = r.log(id);
        assert!(
            log.contains("region event sent to the webhook"),
            "{id}: {log}"
        );
        assert!(
            !log.contains(HOOK_TOKEN) && !log.contains("hook-path-s3cret"),
            "{id}'s log shows the webhook's secret"
        );
    }
}

/// `ferry drill run --scenario region-outage`: east plays dead, west's
/// automatic failover takes over, and the drill measures each phase and
/// the RPO and passes; the report is kept in west (`/v1/drills`, metrics).
/// `ferry region failback` then brings the job home, where it finishes
/// with exactly the expected output.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_region_outage_drill_measures_the_failover_and_the_job_fails_back() {
    let nats = NatsServer::start();
    let global = NatsCluster::start(3);
    let mut east = Region::new(nats.url(), "800ms", "500ms");
    let mut west = Region::new(nats.url(), "800ms", "500ms");
    // ~40 s of input: the job is still running after both moves.
    east.rate = 20_000;
    two_regions(&mut east, &mut west, &global);
    let (hook_url, mut hook) = webhook_receiver().await;
    west.env.push(("FERRY_REGIONS_WEBHOOK", hook_url));
    west.env
        .push(("FERRY_REGIONS_VERIFY_INTERVAL", "200ms".into()));
    start_two_regions(&mut east, &mut west).await;
    let epoch = wait_lease(&east).await;
    let job = east.running_job(0).await;
    let replicated = wait_replicated(&east, 0, &job).await;
    // West test-restores what it receives, and says so in its heartbeat.
    let start = Instant::now();
    loop {
        let v = east
            .get(&east.jms[0], "/v1/regions")
            .await
            .unwrap_or_default();
        let west_view = v["regions"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|r| r["region"] == "west")
            .cloned()
            .unwrap_or_default();
        if west_view["heartbeat"]["verified"][&job].as_u64() >= Some(replicated) {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "west verified nothing: {v}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let wv = west.get(&west.jms[0], "/v1/regions").await.unwrap();
    assert!(
        wv["verified"][&job]["checkpoint"].as_u64() >= Some(replicated),
        "{wv}"
    );
    assert!(wv["verified"][&job]["last_failure"].is_null(), "{wv}");

    let url = east.jms[0].url();
    let (ok, r, stderr) = ferry_json(&[
        "drill",
        "run",
        "--scenario",
        "region-outage",
        "--target",
        "west",
        "--rto",
        "30s",
        "--rpo",
        "10s",
        "--timeout",
        "60s",
        "-o",
        "json",
        "--url",
        &url,
    ]);
    eprintln!("{stderr}");
    assert!(ok, "the drill failed: {r}\n{stderr}");
    assert_eq!(r["passed"], true, "{r}");
    // The modes the drill ran under.
    assert_eq!(r["replication"], "async", "{r}");
    assert_eq!(r["standby"], "cold", "{r}");
    let phases: Vec<u64> = [
        "detection_ms",
        "promotion_ms",
        "restore_ms",
        "first_output_ms",
    ]
    .iter()
    .map(|k| r[k].as_u64().unwrap_or_else(|| panic!("{k} missing: {r}")))
    .collect();
    assert!(phases.windows(2).all(|w| w[0] <= w[1]), "{r}");
    // West can only notice after the region timeout (2 s) less one
    // heartbeat interval (300 ms).
    assert!(phases[0] >= 1_500, "detected too early: {r}");
    assert_eq!(r["rto_ms"].as_u64(), Some(phases[3]));
    assert!(r["region_epoch"].as_u64().unwrap() > epoch, "{r}");
    // West's run restored from the checkpoint the drill reports.
    let restored = r["jobs"][0]["restored_checkpoint"]["id"].as_u64().unwrap();
    let west_runs: Vec<Value> = manifests(&west.storage(), &job)
        .into_iter()
        .filter(|m| m["region_epoch"].as_u64() > Some(epoch))
        .collect();
    assert!(!west_runs.is_empty(), "west completed no checkpoint");
    assert!(
        west_runs
            .iter()
            .all(|m| m["restored_from"].as_u64() == Some(restored)),
        "{west_runs:?} vs {r}"
    );
    // RPO, from the stores rather than the report: what east's newest
    // checkpoint of its lineage (in east's store, or archived there as
    // diverged once west replicated over it) had read, less what the
    // checkpoint west restored had read.
    let mut east_lineage: Vec<(u64, u64)> = manifests(&east.storage(), &job)
        .into_iter()
        .filter(|m| m["region_epoch"].as_u64() == Some(epoch))
        .map(|m| {
            (
                m["checkpoint_id"].as_u64().unwrap(),
                m["records_in"].as_u64().unwrap(),
            )
        })
        .collect();
    let diverged = east.storage().join("jobs").join(&job).join("diverged");
    for e in std::fs::read_dir(&diverged).into_iter().flatten().flatten() {
        let d: Value = serde_json::from_slice(&std::fs::read(e.path()).unwrap()).unwrap();
        if d["region_epoch"].as_u64() == Some(epoch) {
            east_lineage.push((
                d["checkpoint"].as_u64().unwrap(),
                d["records_in"].as_u64().unwrap(),
            ));
        }
    }
    let (east_last, east_in) = east_lineage.into_iter().max().expect("east's checkpoints");
    let restored_in = manifests(&west.storage(), &job)
        .into_iter()
        .find(|m| m["checkpoint_id"].as_u64() == Some(restored))
        .map(|m| m["records_in"].as_u64().unwrap())
        .expect("the restored checkpoint in west's store");
    assert!(east_last >= restored, "{r}");
    assert_eq!(
        r["rpo_records"].as_u64(),
        Some(east_in - restored_in),
        "{r}"
    );
    assert_eq!(
        r["jobs"][0]["primary_last_checkpoint"]["id"].as_u64(),
        Some(east_last),
        "{r}"
    );
    // Kept in west, and in west's metrics.
    let drills = west.get(&west.jms[0], "/v1/drills").await.unwrap();
    assert_eq!(drills["drills"][0]["id"], r["id"], "{drills}");
    let one = west
        .get(
            &west.jms[0],
            &format!("/v1/drills/{}", r["id"].as_str().unwrap()),
        )
        .await
        .unwrap();
    assert_eq!(one["rto_ms"], r["rto_ms"]);
    let m = west.metrics(&west.jms[0]).await;
    assert!(m.lines().any(|l| l == "ferry_drill_last_passed 1"), "{m}");
    assert!(
        m.lines()
            .any(|l| l == "ferry_drills_total{result=\"pass\"} 1"),
        "{m}"
    );
    let rto_metric: f64 = m
        .lines()
        .find_map(|l| l.strip_prefix("ferry_drill_last_rto_seconds "))
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        (rto_metric * 1000.0 - phases[3] as f64).abs() < 1.0,
        "{rto_metric}"
    );
    // West announced its promotion to the webhook.
    let event = tokio::time::timeout(Duration::from_secs(10), hook.recv())
        .await
        .expect("a webhook call")
        .unwrap();
    assert_eq!(event["event"], "promoted", "{event}");
    assert_eq!(event["region"], "west");
    assert_eq!(event["epoch"], r["region_epoch"], "{event} vs {r}");
    // The takeover is the drill's: whoever started it (no api.auth here).
    assert_eq!(event["actor"], "anonymous", "{event}");
    assert!(
        event["reason"]
            .as_str()
            .is_some_and(|r| r.starts_with("failover drill:")),
        "{event}"
    );

    // Home again: east is healthy (a standby), fail-back moves the job.
    wait_healthy(&west, 0, "east", Duration::from_secs(20)).await;
    let (ok, fb, stderr) = ferry_json(&["region", "failback", "-o", "json", "--url", &url]);
    assert!(ok, "fail-back failed: {fb}\n{stderr}");
    assert_eq!(
        (fb["from"].as_str(), fb["to"].as_str()),
        (Some("west"), Some("east")),
        "{fb}"
    );
    assert_eq!(fb["failback"], true);
    assert!(fb["divergence"]["jobs"].is_array(), "{fb}");
    // West announced that the fail-back demoted it.
    let event = tokio::time::timeout(Duration::from_secs(10), hook.recv())
        .await
        .expect("a webhook call")
        .unwrap();
    assert_eq!(
        (event["event"].as_str(), event["primary"].as_str()),
        (Some("demoted"), Some("east")),
        "{event}"
    );
    assert_eq!(event["actor"], "anonymous", "{event}");
    assert_eq!(event["epoch"], fb["epoch"], "{event} vs {fb}");
    let done = east.wait_finished(0, &job, &west, "jm-east").await;
    assert_eq!(done["taskmanager"], "tm-east", "{done}");
    east.check_output();
    // A drill that cannot meet its target fails, and says so.
    let (ok, r2, _) = ferry_json(&[
        "drill",
        "run",
        "--scenario",
        "switchover",
        "--target",
        "west",
        "--rto",
        "1ms",
        "--timeout",
        "30s",
        "-o",
        "json",
        "--url",
        &url,
    ]);
    assert!(!ok, "an RTO of 1 ms cannot be met: {r2}");
    assert_eq!(r2["passed"], false);
    assert!(r2["failures"][0].as_str().unwrap().contains("RTO"), "{r2}");
    assert_eq!(r2["rpo_records"], 0, "a switchover loses nothing: {r2}");
    let m = west.metrics(&west.jms[0]).await;
    assert!(m.lines().any(|l| l == "ferry_drill_last_passed 0"), "{m}");
}

/// Fail-back after an unplanned failover that lost east's tail: west's
/// store is a real S3-compatible server (moto) that east reaches through a
/// proxy. The link is cut, so east completes checkpoints west never gets;
/// then the whole of east is SIGKILLed. West takes over from the last
/// checkpoint it had; east comes back as a standby, west's replication into
/// east's store archives east's unreplicated checkpoints, and `ferry region
/// failback` reports exactly those (what east committed after the
/// checkpoint west restored from) and moves the job home, where it finishes
/// with the expected output.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fail_back_reports_what_the_old_primary_committed_beyond_the_failover() {
    let Some(s3) = common::s3::S3Server::start() else {
        return;
    };
    s3.create_bucket("west").await;
    let link = FaultProxy::start(s3.port).await;
    let nats = NatsServer::start();
    let global = NatsCluster::start(3);
    let mut east = Region::new(nats.url(), "800ms", "500ms");
    let mut west = Region::new(nats.url(), "800ms", "500ms");
    east.rate = 20_000;
    two_regions(&mut east, &mut west, &global);
    west_store_on_s3(&mut east, &mut west, &s3, &link);
    start_two_regions(&mut east, &mut west).await;
    let epoch = wait_lease(&east).await;
    let job = east.running_job(0).await;
    let replicated = wait_replicated(&east, 0, &job).await;

    // East goes on alone: three more checkpoints west never receives.
    link.cut();
    let cut_at = last_checkpoint(&east, 0, &job).await;
    let tail = east
        .wait_job(
            &east.jms[0],
            &job,
            Duration::from_secs(30),
            "3 unreplicated checkpoints",
            |v| v["last_checkpoint"]["id"].as_u64() >= Some(cut_at + 3),
        )
        .await;
    east.jms[0].signal(libc::SIGKILL);
    east.tms[0].signal(libc::SIGKILL);
    let _ = east.jms[0].child.wait();
    let _ = east.tms[0].child.wait();
    let east_own: Vec<Value> = manifests(&east.storage(), &job);
    let last_east = east_own.last().unwrap()["checkpoint_id"].as_u64().unwrap();
    assert!(last_east >= tail["last_checkpoint"]["id"].as_u64().unwrap());

    let v = wait_primary(&west, 0, "west", Duration::from_secs(30)).await;
    let new_epoch = v["epoch"].as_u64().unwrap();
    assert!(new_epoch > epoch);
    let in_west = west
        .wait_job(
            &west.jms[0],
            &job,
            Duration::from_secs(30),
            "a checkpoint in west",
            |v| v["state"] == "RUNNING" && v["last_checkpoint"]["id"].as_u64() > Some(last_east),
        )
        .await;
    eprintln!("west runs the job: {}", in_west["last_checkpoint"]);

    // East comes back (its link healed) as a standby.
    link.heal();
    east.start("jm-east-2", None);
    east.start_tm("tm-east-2");
    wait_healthy(&west, 0, "east", Duration::from_secs(30)).await;
    let url = east.jms[1].url();
    let (ok, plan, stderr) = ferry_json(&[
        "region",
        "failback",
        "--dry-run",
        "-o",
        "json",
        "--url",
        &url,
    ]);
    assert!(ok, "{plan}\n{stderr}");
    let (ok, fb, stderr) = ferry_json(&["region", "failback", "-o", "json", "--url", &url]);
    assert!(ok, "fail-back failed: {fb}\n{stderr}");
    assert_eq!(fb["to"], "east", "{fb}");
    // The divergence is exactly east's checkpoints after west's restore
    // point, as east's own store had them before it was replicated into.
    let d = &fb["divergence"]["jobs"][0];
    let base = d["base"]["checkpoint"].as_u64().expect("a base checkpoint");
    assert!(base >= replicated && base <= cut_at, "base {base}: {fb}");
    let expected: Vec<u64> = east_own
        .iter()
        .filter(|m| m["region_epoch"].as_u64() == Some(epoch))
        .filter_map(|m| m["checkpoint_id"].as_u64())
        .filter(|n| *n > base)
        .collect();
    let got: Vec<u64> = d["checkpoints"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c.as_u64().unwrap())
        .collect();
    assert_eq!(got, expected, "{fb}");
    assert_eq!(
        plan["divergence"]["jobs"][0]["checkpoints"],
        d["checkpoints"]
    );
    let last = east_own
        .iter()
        .find(|m| m["checkpoint_id"].as_u64() == Some(last_east))
        .unwrap();
    let base_m = &d["base"];
    assert_eq!(
        d["records_in"].as_u64().unwrap(),
        last["records_in"].as_u64().unwrap() - base_m["records_in"].as_u64().unwrap(),
        "{fb}"
    );
    assert!(d["event_time_ms"].as_i64().unwrap() > 0, "{fb}");
    // The archived manifests are the evidence, in east's store.
    let archived = std::fs::read_dir(east.storage().join("jobs").join(&job).join("diverged"))
        .unwrap()
        .count();
    assert_eq!(archived, expected.len());

    let done = east.wait_finished(1, &job, &west, "jm-east-2").await;
    assert_eq!(done["taskmanager"], "tm-east-2", "{done}");
    east.check_output();
}

/// East loses the global KV (a proxy cuts its link to the global NATS):
/// it cannot confirm the region lease, stops committing and stops its job
/// before west may take over; west takes the lease after the region
/// timeout and finishes the job. No checkpoint of east's region epoch is
/// completed after west's promotion, and the output is exact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_primary_cut_off_from_the_global_kv_stops_before_a_standby_takes_over() {
    let nats = NatsServer::start();
    let global = NatsCluster::start(3);
    let global_link = FaultProxy::start(global.nodes[0].port).await;
    let mut east = Region::new(nats.url(), "800ms", "500ms");
    let mut west = Region::new(nats.url(), "800ms", "500ms");
    east.rate = 50_000;
    two_regions(&mut east, &mut west, &global);
    east.env
        .push(("FERRY_REGIONS_GLOBAL_URLS", global_link.url()));
    start_two_regions(&mut east, &mut west).await;
    let epoch = wait_lease(&east).await;
    let job = east.running_job(0).await;
    wait_replicated(&east, 0, &job).await;

    global_link.cut();
    let cut = Instant::now();
    // East's TaskManager runs no task any more.
    let mut stopped = None;
    let promoted = loop {
        if stopped.is_none() && east.tm_metric(0, "tasks_running").await == Some(0) {
            stopped = Some((cut.elapsed(), chrono::Utc::now()));
        }
        let v = west
            .get(&west.jms[0], "/v1/regions")
            .await
            .unwrap_or_default();
        if v["primary"] == "west" {
            break (cut.elapsed(), chrono::Utc::now());
        }
        assert!(cut.elapsed() < Duration::from_secs(30), "no promotion: {v}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let (stopped_after, _) = stopped.expect("east stopped its job before west took over");
    eprintln!(
        "east stopped {stopped_after:?} after the cut; west promoted {:?} after it",
        promoted.0
    );
    assert!(stopped_after < promoted.0);
    // Every checkpoint of east's epoch was completed before west's
    // promotion (none lands later).
    assert_no_checkpoint_of_epoch_after(&east.storage(), &job, epoch, promoted.1);
    assert!(
        east.log("jm-east")
            .contains("cannot renew the region lease")
    );
    west.wait_finished(0, &job, &east, "jm-west").await;
    east.check_output();
    // West's checkpoints after the takeover carry the new epoch only.
    let epochs: Vec<u64> = manifests(&west.storage(), &job)
        .iter()
        .filter_map(|m| m["region_epoch"].as_u64())
        .collect();
    assert!(epochs.iter().all(|e| *e > epoch), "{epochs:?}");
}

/// East's sync-replication state as its `/v1/regions` reports it.
async fn sync_state(r: &Region, jm: usize) -> Value {
    r.get(&r.jms[jm], "/v1/regions").await.unwrap_or_default()["sync"].clone()
}

/// Waits (bounded by `limit`) until JobManager `jm` of `r` reports
/// synchronous replication in `state`; its `sync` object then.
async fn wait_sync_state(r: &Region, jm: usize, state: &str, limit: Duration) -> Value {
    let start = Instant::now();
    loop {
        let s = sync_state(r, jm).await;
        if s["state"] == state {
            return s;
        }
        assert!(
            start.elapsed() < limit,
            "synchronous replication not {state} within {limit:?}: {s}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The newest completed checkpoint of `job` as JobManager `jm` reports it.
async fn last_checkpoint(r: &Region, jm: usize, job: &str) -> u64 {
    r.get(&r.jms[jm], &format!("/v1/jobs/{job}")).await.unwrap()["last_checkpoint"]["id"]
        .as_u64()
        .unwrap()
}

/// Waits until JobManager 0 of `r` reports synchronous replication in
/// `state` because of west; checks that metric `metric` is 1; its `sync`
/// object then.
async fn wait_sync_alarm(r: &Region, state: &str, metric: &str) -> Value {
    let s = wait_sync_state(r, 0, state, Duration::from_secs(30)).await;
    assert!(
        s["reason"].as_str().is_some_and(|r| r.contains("west")),
        "{s}"
    );
    let m = r.metrics(&r.jms[0]).await;
    assert!(m.lines().any(|l| l == format!("{metric} 1")), "{m}");
    s
}

/// Output rows committed so far.
fn committed_rows(r: &Region) -> usize {
    read_rows(&r.out()).len()
}

/// The scenario of the fail-back test above — east's link to west's store
/// (a real S3-compatible server behind a proxy) cut, then the whole of east
/// SIGKILLed — with `regions.replication: sync` and `onStandbyLoss: block`.
/// While the link is cut east's checkpoints do not complete, its sinks
/// commit nothing and the job keeps running (blocked checkpoints are not
/// job failures); the alert's metric is 1. West takes over from east's
/// newest checkpoint — east committed nothing west lacks — so fail-back
/// reports no divergence, and the job finishes at home with exact output.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_replication_blocks_commits_without_the_standby_and_a_failover_diverges_nowhere() {
    let Some(s3) = common::s3::S3Server::start() else {
        return;
    };
    s3.create_bucket("west").await;
    let link = FaultProxy::start(s3.port).await;
    let nats = NatsServer::start();
    let global = NatsCluster::start(3);
    let mut east = Region::new(nats.url(), "800ms", "500ms");
    let mut west = Region::new(nats.url(), "800ms", "500ms");
    east.rate = 20_000;
    two_regions(&mut east, &mut west, &global);
    west_store_on_s3(&mut east, &mut west, &s3, &link);
    for r in [&mut east, &mut west] {
        r.env.push(("FERRY_REGIONS_REPLICATION", "sync".into()));
        r.env.push(("FERRY_REGIONS_SYNC_TIMEOUT", "1s".into()));
    }
    start_two_regions(&mut east, &mut west).await;
    let epoch = wait_lease(&east).await;
    let job = east.running_job(0).await;
    wait_replicated(&east, 0, &job).await;
    let s = wait_sync_state(&east, 0, "sync", Duration::from_secs(10)).await;
    assert_eq!(s["on_standby_loss"], "block", "{s}");
    assert!(s["latency_p99_ms"].as_f64().is_some(), "{s}");

    // The link to west's store is cut: checkpoints block.
    link.cut();
    let blocked = wait_sync_alarm(&east, "blocked", "ferry_replication_sync_blocked").await;
    let held_at = last_checkpoint(&east, 0, &job).await;
    let rows = committed_rows(&east);
    // Three more checkpoints fail; none completes, nothing is committed,
    // and the job runs on.
    let start = Instant::now();
    while sync_state(&east, 0).await["blocked_checkpoints"].as_u64()
        < Some(blocked["blocked_checkpoints"].as_u64().unwrap() + 3)
    {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "no more blocked checkpoints: {}",
            sync_state(&east, 0).await
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let v = east
        .get(&east.jms[0], &format!("/v1/jobs/{job}"))
        .await
        .unwrap();
    assert_eq!(v["state"], "RUNNING", "{v}");
    assert_eq!(v["last_checkpoint"]["id"].as_u64(), Some(held_at), "{v}");
    assert_eq!(
        committed_rows(&east),
        rows,
        "output committed while blocked"
    );
    let east_newest = manifests(&east.storage(), &job)
        .iter()
        .filter_map(|m| m["checkpoint_id"].as_u64())
        .max()
        .unwrap();
    assert_eq!(
        east_newest, held_at,
        "a manifest beyond the last completed checkpoint"
    );

    // The whole of east dies; west takes over from east's newest checkpoint.
    east.jms[0].signal(libc::SIGKILL);
    east.tms[0].signal(libc::SIGKILL);
    let _ = east.jms[0].child.wait();
    let _ = east.tms[0].child.wait();
    let v = wait_primary(&west, 0, "west", Duration::from_secs(30)).await;
    assert!(v["epoch"].as_u64().unwrap() > epoch);
    west.wait_job(
        &west.jms[0],
        &job,
        Duration::from_secs(30),
        "a checkpoint in west",
        |v| v["state"] == "RUNNING" && v["last_checkpoint"]["id"].as_u64() > Some(held_at),
    )
    .await;

    // East comes back as a standby: nothing of it diverged.
    link.heal();
    east.start("jm-east-2", None);
    east.start_tm("tm-east-2");
    wait_healthy(&west, 0, "east", Duration::from_secs(30)).await;
    let url = east.jms[1].url();
    let (ok, fb, stderr) = ferry_json(&["region", "failback", "-o", "json", "--url", &url]);
    assert!(ok, "fail-back failed: {fb}\n{stderr}");
    assert_eq!(fb["to"], "east", "{fb}");
    let diverged: Vec<&Value> = fb["divergence"]["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|j| !j["checkpoints"].as_array().is_none_or(|c| c.is_empty()))
        .collect();
    assert!(diverged.is_empty(), "sync mode diverged: {fb}");
    assert!(
        !east
            .storage()
            .join("jobs")
            .join(&job)
            .join("diverged")
            .exists(),
        "archived divergence in east's store"
    );
    let done = east.wait_finished(1, &job, &west, "jm-east-2").await;
    assert_eq!(done["taskmanager"], "tm-east-2", "{done}");
    east.check_output();
}

/// `regions.onStandbyLoss: async`: with its only standby store cut off, a
/// primary (replication only, no global KV) completes checkpoints without
/// it and reports `degraded` (metric 1); once the link heals it returns to
/// `sync` by itself, and the job's output is exact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_replication_degrades_to_async_without_the_standby_and_returns_by_itself() {
    let Some(s3) = common::s3::S3Server::start() else {
        return;
    };
    s3.create_bucket("west").await;
    let link = FaultProxy::start(s3.port).await;
    let nats = NatsServer::start();
    let mut east = Region::new(nats.url(), "800ms", "500ms").named("east");
    east.rate = 20_000;
    east.env.push((
        "FERRY_REGIONS_STORES",
        format!(
            "east=file://{},west=s3://west/ferry",
            east.storage().display()
        ),
    ));
    east.env.push(("FERRY_REGIONS_PRIMARY", "east".into()));
    east.env.push(("FERRY_REGIONS_REPLICATION", "sync".into()));
    east.env
        .push(("FERRY_REGIONS_ON_STANDBY_LOSS", "async".into()));
    east.env.push(("FERRY_REGIONS_SYNC_TIMEOUT", "1s".into()));
    for (k, v) in s3.env() {
        east.env.push((
            k,
            if k == "AWS_ENDPOINT" {
                link.http_url()
            } else {
                v
            },
        ));
    }
    east.start("jm-east", None);
    east.start_tm("tm-east");
    east.leader(&[], Duration::from_secs(20)).await;
    let job = east.running_job(0).await;
    wait_sync_state(&east, 0, "sync", Duration::from_secs(10)).await;

    link.cut();
    let degraded = wait_sync_alarm(&east, "degraded", "ferry_replication_sync_degraded").await;
    assert_eq!(degraded["degradations"], 1, "{degraded}");
    // Checkpoints go on completing without the standby.
    let at = last_checkpoint(&east, 0, &job).await;
    east.wait_job(
        &east.jms[0],
        &job,
        Duration::from_secs(30),
        "two checkpoints while degraded",
        |v| v["last_checkpoint"]["id"].as_u64() >= Some(at + 2),
    )
    .await;
    assert_eq!(sync_state(&east, 0).await["state"], "degraded");

    // The standby is back: sync again by itself.
    link.heal();
    let back = wait_sync_state(&east, 0, "sync", Duration::from_secs(30)).await;
    assert_eq!(back["degradations"], 1, "{back}");
    let start = Instant::now();
    loop {
        let m = east.metrics(&east.jms[0]).await;
        if m.lines().any(|l| l == "ferry_replication_sync_degraded 0") {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(10), "{m}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    east.finished(0, &job, Duration::from_secs(240)).await;
    east.check_output();
}

/// The region `r` as its own heartbeat reports it (read from `jm`).
async fn own_resources(r: &Region, jm: usize) -> Option<Value> {
    let v = r.get(&r.jms[jm], "/v1/regions").await?;
    v["regions"]
        .as_array()?
        .iter()
        .find(|x| x["region"] == r.name.as_str())
        .map(|x| x["heartbeat"]["resources"].clone())
}

/// A metric's value in a JobManager's `/metrics` text.
fn metric(text: &str, name: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .and_then(|v| v.trim().parse().ok())
}

/// Hot standby (`regions.standby: hot`): the standby region keeps the job
/// held on its TaskManager at the newest replicated checkpoint — its slots
/// and state visible in its heartbeat, nothing running, nothing written —
/// and when the primary region dies, the promotion starts the held job at
/// that checkpoint (no restore: the driver adopts the released tasks).
/// The output over both regions is exactly the expected one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hot_standby_holds_the_job_loaded_and_a_failover_starts_it_without_a_restore() {
    let nats = NatsServer::start();
    let global = NatsCluster::start(3);
    let mut east = Region::new(nats.url(), "800ms", "500ms");
    let mut west = Region::new(nats.url(), "800ms", "500ms");
    two_regions(&mut east, &mut west, &global);
    for r in [&mut east, &mut west] {
        r.env.push(("FERRY_REGIONS_STANDBY", "hot".into()));
        // Long enough that the kill below lands mid-run.
        r.rate = 40_000;
    }
    start_two_regions(&mut east, &mut west).await;
    wait_lease(&east).await;
    let job = east.running_job(0).await;
    let replicated = wait_replicated(&east, 0, &job).await;

    // West holds the job at a replicated checkpoint, in the job's slots,
    // and says so in its heartbeat (as east and the metrics see it).
    let start = Instant::now();
    let held = loop {
        let r = own_resources(&west, 0).await.unwrap_or(Value::Null);
        if r["held"][&job].as_u64().is_some_and(|n| n >= replicated) {
            break r;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "west does not hold the job: {r}\n{}",
            tail(&west.log("jm-west"), 40)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(held["standby"], "hot", "{held}");
    assert_eq!(held["held_slots"], 2, "parallelism 2: {held}");
    assert_eq!(held["slots_used"], 2, "only the held job: {held}");
    assert!(held["held_state_bytes"].as_u64().unwrap() > 0, "{held}");
    // Its windows' tables in memory are bigger than their checkpoint.
    assert!(
        held["held_memory_bytes"].as_u64().unwrap() > held["held_state_bytes"].as_u64().unwrap(),
        "{held}"
    );
    let m = west.metrics(&west.jms[0]).await;
    assert_eq!(metric(&m, "ferry_standby_held_jobs"), Some(1), "{m}");
    assert_eq!(metric(&m, "ferry_standby_held_slots"), Some(2), "{m}");
    // Held, not running: west's TaskManager started no deployment.
    assert_eq!(west.tm_metric(0, "deployments_started").await, Some(0));
    // And it keeps loading newer checkpoints as they arrive.
    let first = held["held"][&job].as_u64().unwrap();
    let start = Instant::now();
    loop {
        let r = own_resources(&west, 0).await.unwrap_or(Value::Null);
        if r["held"][&job].as_u64().is_some_and(|n| n > first) {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "west still holds checkpoint {first}: {r}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // The whole primary region dies mid-run.
    east.jms[0].signal(libc::SIGKILL);
    east.tms[0].signal(libc::SIGKILL);
    wait_primary(&west, 0, "west", Duration::from_secs(20)).await;
    west.wait_job(
        &west.jms[0],
        &job,
        Duration::from_secs(90),
        "the job to finish in the new primary",
        |v| v["state"] == "FINISHED",
    )
    .await;
    let m = west.metrics(&west.jms[0]).await;
    let log = west.log("jm-west");
    assert_eq!(
        metric(&m, "ferry_standby_released_total"),
        Some(1),
        "the promotion did not start the held job:\n{}",
        tail(&log, 60)
    );
    assert_eq!(metric(&m, "ferry_standby_restored_cold_total"), Some(0));
    assert!(
        log.contains("adopted the job's running tasks: no restart"),
        "{}",
        tail(&log, 60)
    );
    assert!(
        !log.contains("restored from checkpoint"),
        "{}",
        tail(&log, 60)
    );
    assert!(west.log("tm-west").contains("held deployment released"));
    // Exactly the expected output, over both regions' work.
    east.check_output();
    // Primary now: nothing held any more.
    let r = own_resources(&west, 0).await.unwrap_or(Value::Null);
    assert_eq!(r["held_slots"], 0, "{r}");
}
