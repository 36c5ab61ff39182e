//! Draining and rebalancing TaskManagers with real `ferry jobmanager` and
//! `ferry taskmanager` processes on a real NATS server: a drain moves a
//! running job elsewhere by savepoint — the job goes on, its output stays
//! exact, and no output gap is longer than a checkpoint interval plus the
//! move — by the CLI, by the pod's preStop hook (`drain --local`) and by
//! SIGTERM with `taskmanager.drainOnShutdown`; a TaskManager joining a
//! loaded region gets its share of 60 jobs by automatic rebalancing, and
//! no job loses output.

mod common;

use std::path::Path;
use std::time::{Duration, Instant, SystemTime};

use common::ha::*;
use ferry_testkit::NatsServer;
use serde_json::Value;

/// A region whose test job runs ~16 s with 1 s windows: nearly every
/// checkpoint commits output, so a pause in the output shows.
fn region(nats: &NatsServer) -> Region {
    let mut r = Region::new(nats.url(), "800ms", "500ms");
    r.rate = 50_000;
    r.window_ms = 1_000;
    r
}

/// The TaskManagers a job's parts run on.
fn on(job: &Value) -> Vec<String> {
    job["parts"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|p| p["taskmanager"].as_str().map(String::from))
        .collect()
}

/// Modification times of the committed output files, sorted.
fn commit_times(dir: &Path) -> Vec<SystemTime> {
    let mut t: Vec<SystemTime> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| {
            let n = e.file_name().to_string_lossy().to_string();
            n.starts_with("part-") && n.ends_with(".jsonl")
        })
        .filter_map(|e| e.metadata().ok()?.modified().ok())
        .collect();
    t.sort();
    t
}

/// The longest pause between two output commits.
fn longest_gap(dir: &Path) -> Duration {
    commit_times(dir)
        .windows(2)
        .map(|w| w[1].duration_since(w[0]).unwrap_or_default())
        .max()
        .unwrap_or_default()
}

/// Waits until the job runs again, on none of `away_from`; returns it.
async fn running_away_from(r: &Region, jm: usize, job: &str, away_from: &str) -> Value {
    r.wait_job(
        &r.jms[jm],
        job,
        Duration::from_secs(60),
        "the job running on another TaskManager",
        |v| v["state"] == "RUNNING" && !on(v).is_empty() && !on(v).iter().any(|t| t == away_from),
    )
    .await
}

/// Starts a JobManager and two TaskManagers, runs the test job until its
/// first checkpoint: (the leader, the job, the TaskManager it runs on).
async fn job_on_a_taskmanager(r: &mut Region) -> (usize, String, String) {
    r.start("jm-a", None);
    r.start_tm("tm-1");
    r.start_tm("tm-2");
    let (leader, _) = r.leader(&[], Duration::from_secs(20)).await;
    let job = r.running_job(leader).await;
    let placed = r
        .wait_job(
            &r.jms[leader],
            &job,
            Duration::from_secs(20),
            "placed",
            |v| on(v).len() == 1,
        )
        .await;
    let from = on(&placed)[0].clone();
    (leader, job, from)
}

/// Checks a moved job: one move, no restart, exact output, a short gap.
async fn check_moved(r: &Region, leader: usize, job: &str, moved_in: Duration) {
    let done = r.finished(leader, job, Duration::from_secs(90)).await;
    assert_eq!(done["restarts"], 0, "a move is not a restart: {done}");
    assert_eq!(done["attempt"], 2, "{done}");
    r.check_output();
    assert_epochs_monotonic(&r.manifest_epochs(job));
    let metrics = r.metrics(&r.jms[leader]).await;
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("ferry_job_moves_total{")
                && l.contains(job)
                && l.ends_with(" 1")),
        "one move counted:\n{metrics}"
    );
    // The output paused at most a checkpoint interval (300 ms) plus the
    // move itself (savepoint, restore, first checkpoint), with a second
    // of slack for the file times.
    let gap = longest_gap(&r.out());
    eprintln!("longest output gap {gap:?}; the move took {moved_in:?}");
    assert!(
        gap <= moved_in + Duration::from_millis(300) + Duration::from_secs(1),
        "output paused {gap:?}, the move took {moved_in:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drained_taskmanagers_job_moves_by_savepoint_with_exact_output() {
    let nats = NatsServer::start();
    let mut r = region(&nats);
    let (leader, job, from) = job_on_a_taskmanager(&mut r).await;
    let url = r.jms[leader].url();

    // The CLI: drain and wait until it runs nothing.
    let asked = Instant::now();
    let (ok, report, stderr) = ferry_json(&[
        "taskmanager",
        "drain",
        &from,
        "--wait",
        "--timeout",
        "60s",
        "--url",
        &url,
        "-o",
        "json",
    ]);
    assert!(ok, "drain: {report}\n{stderr}");
    assert_eq!(report["taskmanager"], from.as_str(), "{report}");
    assert_eq!(report["draining"], true, "{report}");
    assert_eq!(report["jobs"], serde_json::json!([job]), "{report}");
    assert_eq!(report["needed"], 2, "{report}");
    let moved = running_away_from(&r, leader, &job, &from).await;
    let moved_in = asked.elapsed();
    assert_eq!(moved["restarts"], 0, "{moved}");
    // The leader lists it draining and empty; new work does not go there.
    let cluster = r.get(&r.jms[leader], "/v1/cluster").await.unwrap();
    let tm = cluster["taskmanagers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["id"] == from.as_str())
        .cloned()
        .unwrap_or_else(|| panic!("{from} listed: {cluster}"));
    assert_eq!(tm["draining"], true, "{tm}");
    assert_eq!(tm["jobs"], serde_json::json!([]), "{tm}");
    assert!(
        r.log(&r.jms[leader].id)
            .contains("stopped with a savepoint to move"),
        "moved by savepoint"
    );
    check_moved(&r, leader, &job, moved_in).await;

    // Ending the drain: it takes jobs again.
    let (ok, report, stderr) = ferry_json(&[
        "taskmanager",
        "drain",
        &from,
        "--cancel",
        "--url",
        &url,
        "-o",
        "json",
    ]);
    assert!(ok, "{report}\n{stderr}");
    assert_eq!(report["draining"], false, "{report}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_prestop_hook_and_sigterm_drain_a_taskmanager_before_it_stops() {
    let nats = NatsServer::start();
    let mut r = region(&nats);
    r.tm_env
        .push(("FERRY_TASKMANAGER_DRAIN_ON_SHUTDOWN", "true".to_string()));
    let (leader, job, from) = job_on_a_taskmanager(&mut r).await;
    let victim = r.tms.iter().position(|t| t.id == from).unwrap();

    // What the pod's preStop hook runs, on the TaskManager's own host.
    let asked = Instant::now();
    let http = format!("http://127.0.0.1:{}", r.tms[victim].port);
    let out = std::process::Command::new(common::ferry_bin())
        .args([
            "taskmanager",
            "drain",
            "--local",
            "--http",
            &http,
            "--wait",
            "--timeout",
            "60s",
        ])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "drain --local: {stderr}");
    assert!(stderr.contains("drained: no deployment left"), "{stderr}");
    let moved_in = asked.elapsed();
    running_away_from(&r, leader, &job, &from).await;

    // Then the kubelet's SIGTERM: nothing left to drain, it stops at once.
    r.tms[victim].signal(libc::SIGTERM);
    let stopped = Instant::now();
    let status = loop {
        if let Some(s) = r.tms[victim].child.try_wait().unwrap() {
            break s;
        }
        assert!(
            stopped.elapsed() < Duration::from_secs(20),
            "the drained TaskManager did not stop:\n{}",
            r.log(&from)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(status.success(), "{status:?}\n{}", r.log(&from));
    check_moved(&r, leader, &job, moved_in).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_with_drain_on_shutdown_moves_the_job_first() {
    let nats = NatsServer::start();
    let mut r = region(&nats);
    r.tm_env
        .push(("FERRY_TASKMANAGER_DRAIN_ON_SHUTDOWN", "true".to_string()));
    let (leader, job, from) = job_on_a_taskmanager(&mut r).await;
    let victim = r.tms.iter().position(|t| t.id == from).unwrap();

    let asked = Instant::now();
    r.tms[victim].signal(libc::SIGTERM);
    running_away_from(&r, leader, &job, &from).await;
    let moved_in = asked.elapsed();
    let status = loop {
        if let Some(s) = r.tms[victim].child.try_wait().unwrap() {
            break s;
        }
        assert!(
            asked.elapsed() < Duration::from_secs(60),
            "the TaskManager did not stop after its drain:\n{}",
            r.log(&from)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(status.success(), "{status:?}");
    assert!(
        r.log(&from).contains("drained: no deployment left"),
        "{}",
        r.log(&from)
    );
    check_moved(&r, leader, &job, moved_in).await;
}

/// The leader's `/v1/cluster`.
async fn cluster(r: &Region, leader: usize) -> Value {
    r.get(&r.jms[leader], "/v1/cluster")
        .await
        .unwrap_or_default()
}

/// One of the 60 small jobs: parallelism 1, ~40 s at 1,000 records/s.
fn small_spec(out: &Path, i: usize) -> String {
    SPEC.replace("name: ha-clicks", &format!("name: small-{i}"))
        .replace("parallelism: 2", "parallelism: 1")
        .replace("interval: 300ms", "interval: 1s")
        .replace("total: 800000", "total: 40000")
        .replace("rate: 100000", "rate: 1000")
        .replace("tumbling: 1m", "tumbling: 5s")
        .replace("OUT", &out.display().to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_joining_taskmanager_gets_its_share_of_60_jobs_and_no_output_is_lost() {
    const JOBS: usize = 60;
    let nats = NatsServer::start();
    let mut r = Region::new(nats.url(), "800ms", "500ms");
    r.tm_slots = 20;
    for (k, v) in [
        ("FERRY_SCHEDULING_REBALANCE", "auto"),
        ("FERRY_SCHEDULING_REBALANCE_INTERVAL", "1s"),
    ] {
        r.jm_env.push((k, v.to_string()));
    }
    r.start("jm-a", None);
    for id in ["tm-1", "tm-2", "tm-3"] {
        r.start_tm(id);
    }
    let (leader, _) = r.leader(&[], Duration::from_secs(20)).await;
    let api = r
        .api(&r.jms[leader])
        .with_timeout(ferry_client::REQUEST_TIMEOUT);
    let mut jobs = Vec::new();
    for i in 0..JOBS {
        let out = r.dir.path().join(format!("out-{i}"));
        let a = api
            .submit(small_spec(&out, i).into_bytes(), None)
            .await
            .unwrap_or_else(|e| panic!("submit {i}: {e}"));
        jobs.push((a.value.id.to_string(), out));
    }
    // Spread evenly over the three: 20 slots used on each.
    let used = |c: &Value| -> Vec<u64> {
        c["taskmanagers"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|t| t["used"].as_u64().unwrap_or(0))
            .collect()
    };
    let start = Instant::now();
    loop {
        let c = cluster(&r, leader).await;
        if used(&c) == [20, 20, 20] {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "60 jobs never ran 20 per TaskManager: {c}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // A fourth TaskManager joins: the spread passes the threshold (0.58)
    // and the leader moves jobs to it by itself.
    r.start_tm("tm-4");
    let joined = Instant::now();
    let balanced = loop {
        let c = cluster(&r, leader).await;
        let v = c["slot_load_variance"].as_f64().unwrap_or(1.0);
        if used(&c).len() == 4 && v < 0.2 {
            break c;
        }
        assert!(
            joined.elapsed() < Duration::from_secs(60),
            "the slot load's spread did not drop below 0.2 within a minute: {c}\n{}",
            tail(&r.log("jm-a"), 40)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    eprintln!(
        "balanced {:?} after tm-4 joined: used {:?}, spread {}",
        joined.elapsed(),
        used(&balanced),
        balanced["slot_load_variance"]
    );
    let metrics = r.metrics(&r.jms[leader]).await;
    let moves: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("ferry_rebalance_moves_total "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    assert!(moves >= 10, "moves counted: {moves}\n{metrics}");

    // Every job finishes with exactly its output: nothing lost, nothing
    // repeated by the moves.
    let spec = ferry_core::spec::parse_and_validate(&small_spec(Path::new("/x"), 0)).unwrap();
    let expected = common::expected_counts(&common::generator(&spec), 40_000, 0, 5_000);
    for (id, out) in &jobs {
        let done = r
            .wait_job(
                &r.jms[leader],
                id,
                Duration::from_secs(120),
                "every job to finish",
                |v| v["state"] == "FINISHED",
            )
            .await;
        assert_eq!(done["restarts"], 0, "{done}");
        let got = common::count_rows(&common::read_rows(out), "user", "clicks");
        assert_eq!(got, expected, "job {id}'s output");
    }
}
