//! The dashboard and the alert rules read only metrics Ferry exports: a
//! real region (nats-server, `ferry jobmanager`, `ferry taskmanager`) with a
//! standby region's store and the global KV configured runs a job until it
//! has checkpointed and replicated; then every metric name parsed out of
//! `deploy/prometheus/ferry-rules.yaml` and `deploy/grafana/ferry.json` must
//! be exported by the JobManager's `/metrics` (`ferry_tm_*` by the
//! TaskManager's). The names come from those files, not from a list here.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::ferry_bin;
use common::tools::{dashboard_exprs, metric_names, read, rule_exprs};
use ferry_testkit::{NatsServer, free_port};

/// Upper bound on the job reaching a checkpoint that is replicated.
const READY_WITHIN: Duration = Duration::from_secs(90);

const SPEC: &str = r#"
apiVersion: ferry.dev/v1
kind: Job
metadata: {name: metrics-check}
spec:
  parallelism: 1
  checkpointing: {interval: 200ms}
  source:
    generator:
      partitions: 1
      rate: 2000
      eventTime: {step: 10ms}
      fields:
        user: {type: key, cardinality: 5, prefix: "u"}
  operators:
    - key_by: user
    - window: {tumbling: 1s, aggregate: {clicks: count}}
  sink:
    blackhole: {}
"#;

/// A child process killed (by its PID) on drop.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Every family a Prometheus text page declares (`# TYPE name type`) and
/// every sample name it has.
struct Exposition {
    families: BTreeMap<String, String>,
    samples: BTreeSet<String>,
}

impl Exposition {
    fn parse(text: &str) -> Self {
        let mut families = BTreeMap::new();
        let mut samples = BTreeSet::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let mut it = rest.split_whitespace();
                if let (Some(n), Some(t)) = (it.next(), it.next()) {
                    families.insert(n.to_string(), t.to_string());
                }
            } else if !line.starts_with('#') && !line.trim().is_empty() {
                let end = line.find(['{', ' ']).unwrap_or(line.len());
                samples.insert(line[..end].to_string());
            }
        }
        Self { families, samples }
    }

    /// Whether `name` is a series of a family this page declares: the
    /// family itself (gauge), `<counter>_total`, or `<histogram>_bucket`,
    /// `_sum`, `_count`. Families with labels have no sample until there is
    /// something to count (a first checkpoint failure, say), so a declared
    /// family of the right type counts as exported.
    fn exports(&self, name: &str) -> bool {
        if self.samples.contains(name) {
            return true;
        }
        let typed = |family: &str, types: &[&str]| {
            self.families
                .get(family)
                .is_some_and(|t| types.contains(&t.as_str()))
        };
        typed(name, &["gauge", "untyped", "unknown"])
            || name
                .strip_suffix("_total")
                .is_some_and(|f| typed(f, &["counter"]))
            || ["_bucket", "_sum", "_count"].iter().any(|s| {
                name.strip_suffix(s)
                    .is_some_and(|f| typed(f, &["histogram"]))
            })
    }
}

async fn get_text(http: &reqwest::Client, url: &str) -> Option<String> {
    let r = http
        .get(url)
        .timeout(Duration::from_secs(2))
        .send()
        .await
        .ok()?;
    r.status().is_success().then_some(())?;
    r.text().await.ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_metric_of_the_dashboard_and_the_alert_rules_is_exported() {
    // The names, from the two files.
    let mut wanted: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (alert, expr) in rule_exprs(&read("deploy/prometheus/ferry-rules.yaml")) {
        for m in metric_names(&expr) {
            wanted.entry(m).or_default().push(format!("alert {alert}"));
        }
    }
    let dashboard: serde_json::Value =
        serde_json::from_str(&read("deploy/grafana/ferry.json")).expect("dashboard JSON");
    for (panel, expr) in dashboard_exprs(&dashboard) {
        for m in metric_names(&expr) {
            wanted
                .entry(m)
                .or_default()
                .push(format!("panel {panel:?}"));
        }
    }
    assert!(wanted.len() > 20, "too few metric names parsed: {wanted:?}");

    // A primary region with a standby region's store and the global KV.
    let nats = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let store = |r: &str| format!("file://{}", dir.path().join(r).display());
    let common_env = [
        ("FERRY_REGION", "eu-west".to_string()),
        ("FERRY_NATS_URLS", nats.url()),
        ("FERRY_STORAGE", store("eu-west")),
        ("FERRY_REGIONS_PRIMARY", "eu-west".to_string()),
        (
            "FERRY_REGIONS_STORES",
            format!("eu-west={},us-east={}", store("eu-west"), store("us-east")),
        ),
        ("FERRY_REGIONS_GLOBAL_URLS", nats.url()),
        ("FERRY_REGIONS_HEALTH_CHECK_INTERVAL", "200ms".to_string()),
        ("FERRY_REGIONS_TIMEOUT", "2s".to_string()),
        ("RUST_LOG", "info".to_string()),
    ];
    let spawn = |role: &str, id: &str, extra: &[(&str, String)]| {
        let log = std::fs::File::create(dir.path().join(format!("{id}.log"))).unwrap();
        let mut cmd = Command::new(ferry_bin());
        cmd.arg(role)
            .env("FERRY_INSTANCE_ID", id)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        for (k, v) in common_env.iter().chain(extra) {
            cmd.env(k, v);
        }
        Proc(cmd.spawn().expect("spawn ferry"))
    };
    let (jm_port, tm_port) = (free_port(), free_port());
    let _jm = spawn(
        "jobmanager",
        "jm-0",
        &[("FERRY_API_LISTEN", format!("127.0.0.1:{jm_port}"))],
    );
    let _tm = spawn(
        "taskmanager",
        "tm-0",
        &[
            ("FERRY_TASKMANAGER_LISTEN", "127.0.0.1:0".to_string()),
            (
                "FERRY_TASKMANAGER_HTTP_LISTEN",
                format!("127.0.0.1:{tm_port}"),
            ),
        ],
    );
    let jm = format!("http://127.0.0.1:{jm_port}");
    let tm = format!("http://127.0.0.1:{tm_port}");
    let http = reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(120))
        .build()
        .unwrap();

    // Submit once the JobManager leads and the region lease names it.
    let start = Instant::now();
    let log = || std::fs::read_to_string(dir.path().join("jm-0.log")).unwrap_or_default();
    loop {
        let r = http
            .post(format!("{jm}/v1/jobs"))
            .body(SPEC)
            .timeout(Duration::from_secs(5))
            .send()
            .await;
        if let Ok(r) = r
            && r.status() == reqwest::StatusCode::CREATED
        {
            break;
        }
        assert!(
            start.elapsed() < READY_WITHIN,
            "the JobManager did not accept the job within {READY_WITHIN:?}; its log:\n{}",
            log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Wait until the job has checkpointed, the checkpoint is replicated and
    // the region health was read: then every family has had its chance.
    let (jm_page, tm_page) = loop {
        let jm_text = get_text(&http, &format!("{jm}/metrics")).await;
        let tm_text = get_text(&http, &format!("{tm}/metrics")).await;
        if let (Some(j), Some(t)) = (jm_text, tm_text)
            && j.contains("ferry_checkpoints_completed_total{")
            && j.lines()
                .any(|l| l.starts_with("ferry_job_records_in_total{") && !l.ends_with(" 0"))
            && j.contains("ferry_replication_lag_seconds{region=\"us-east\"}")
            && j.contains("ferry_region_healthy{region=\"eu-west\"} 1")
            && t.contains("ferry_tm_tasks_running 1")
        {
            break (Exposition::parse(&j), Exposition::parse(&t));
        }
        assert!(
            start.elapsed() < READY_WITHIN,
            "no checkpoint, replication lag or region health in /metrics within {READY_WITHIN:?}; JobManager log:\n{}",
            log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };

    let missing: Vec<String> = wanted
        .iter()
        .filter(|(name, _)| {
            let page = if name.starts_with("ferry_tm_") {
                &tm_page
            } else {
                &jm_page
            };
            !page.exports(name)
        })
        .map(|(name, users)| format!("{name} (used by {})", users.join(", ")))
        .collect();
    assert!(
        missing.is_empty(),
        "metrics used by the dashboard or the alerts but not exported:\n  {}\nthe JobManager exports: {:?}",
        missing.join("\n  "),
        jm_page.families
    );
}
