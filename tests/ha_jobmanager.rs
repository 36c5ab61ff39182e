//! In-region HA of `ferry jobmanager` and `ferry taskmanager` processes
//! against a real `nats-server`: SIGKILL of the leader (its job's tasks keep
//! running on their TaskManager and are adopted, not restarted), graceful
//! handover, a leader cut off from NATS by a fault proxy, SIGKILL of a
//! TaskManager (the job moves to the other one), NATS restarts and node
//! loss, and a TaskManager refusing commands of an older epoch. Each job
//! test checks the committed output against the expected counts computed
//! from the generator model, and that the checkpoint manifests' fencing
//! epochs never go back (no two leaders completed checkpoints of the job
//! interleaved).

mod common;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use ferry_testkit::{FaultProxy, NatsCluster, NatsServer, free_port};
use serde_json::Value;

/// A bounded job that runs ~8 s: long enough to lose its leader mid-run.
const SPEC: &str = r#"
apiVersion: ferry.dev/v1
kind: Job
metadata: {name: ha-clicks}
spec:
  parallelism: 2
  checkpointing: {interval: 300ms, retained: 3}
  restartStrategy: {type: fixed-attempts, attempts: 3, delay: 100ms}
  source:
    generator:
      partitions: 4
      total: 800000
      rate: 100000
      seed: 11
      eventTime: {step: 10ms, maxOutOfOrderness: 1s}
      fields:
        user: {type: key, cardinality: 50, prefix: "u"}
  operators:
    - key_by: user
    - window: {tumbling: 1m, aggregate: {clicks: count}}
  sink:
    file: {path: OUT}
"#;
const TOTAL: u64 = 800_000;

/// One `ferry jobmanager` child process, SIGKILLed on drop if still alive.
struct Jm {
    id: String,
    port: u16,
    child: Child,
}

impl Jm {
    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
    fn pid(&self) -> i32 {
        self.child.id() as i32
    }
    fn signal(&self, sig: i32) {
        // SAFETY: a plain kill(2) of our own child's PID.
        unsafe { libc::kill(self.pid(), sig) };
    }
}

impl Drop for Jm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

struct Region {
    dir: tempfile::TempDir,
    nats_url: String,
    jms: Vec<Jm>,
    /// TaskManagers (`port` is their HTTP port: health and metrics).
    tms: Vec<Jm>,
    http: reqwest::Client,
    ttl: &'static str,
    deadline: &'static str,
    replicas: &'static str,
    /// Extra environment of every process started from now on.
    env: Vec<(&'static str, String)>,
}

impl Region {
    fn new(nats_url: String, ttl: &'static str, deadline: &'static str) -> Self {
        Self {
            dir: tempfile::tempdir().unwrap(),
            nats_url,
            jms: Vec::new(),
            tms: Vec::new(),
            http: reqwest::Client::builder().no_proxy().build().unwrap(),
            ttl,
            deadline,
            replicas: "1",
            env: Vec::new(),
        }
    }

    fn storage(&self) -> PathBuf {
        self.dir.path().join("store")
    }

    fn out(&self) -> PathBuf {
        self.dir.path().join("out")
    }

    /// Starts `ferry <role>` with the region's settings plus `env`, its
    /// stderr in `<id>.log`.
    fn spawn(&self, role: &str, id: &str, nats_url: Option<&str>, env: &[(&str, String)]) -> Child {
        let log = std::fs::File::create(self.dir.path().join(format!("{id}.log"))).unwrap();
        let mut cmd = Command::new(ferry_bin());
        cmd.arg(role)
            .env("FERRY_REGION", "test")
            .env("FERRY_INSTANCE_ID", id)
            .env("FERRY_NATS_URLS", nats_url.unwrap_or(&self.nats_url))
            .env(
                "FERRY_STORAGE",
                format!("file://{}", self.storage().display()),
            )
            .env("FERRY_NATS_REPLICAS", self.replicas)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log);
        for (k, v) in self.env.iter().chain(env) {
            cmd.env(k, v);
        }
        cmd.spawn()
            .unwrap_or_else(|e| panic!("start ferry {role}: {e}"))
    }

    /// Starts a JobManager; `nats_url` overrides the region's (a proxy).
    fn start(&mut self, id: &str, nats_url: Option<&str>) {
        let port = free_port();
        let child = self.spawn(
            "jobmanager",
            id,
            nats_url,
            &[
                ("FERRY_API_LISTEN", format!("127.0.0.1:{port}")),
                ("FERRY_HA_LEASE_TTL", self.ttl.to_string()),
                ("FERRY_HA_RENEW_DEADLINE", self.deadline.to_string()),
                ("FERRY_HA_RENEW_INTERVAL", "150ms".to_string()),
            ],
        );
        self.jms.push(Jm {
            id: id.to_string(),
            port,
            child,
        });
    }

    /// Starts a TaskManager with 4 slots (`port`: its HTTP port).
    fn start_tm(&mut self, id: &str) {
        let port = free_port();
        let child = self.spawn(
            "taskmanager",
            id,
            None,
            &[
                ("FERRY_TASKMANAGER_LISTEN", "127.0.0.1:0".to_string()),
                ("FERRY_TASKMANAGER_HTTP_LISTEN", format!("127.0.0.1:{port}")),
                ("FERRY_TASKMANAGER_SLOTS", "4".to_string()),
            ],
        );
        self.tms.push(Jm {
            id: id.to_string(),
            port,
            child,
        });
    }

    /// A TaskManager's metric (`ferry_tm_<name>`), if it answers.
    async fn tm_metric(&self, tm: usize, name: &str) -> Option<u64> {
        let text = self
            .http
            .get(format!("{}/metrics", self.tms[tm].url()))
            .timeout(Duration::from_secs(2))
            .send()
            .await
            .ok()?
            .text()
            .await
            .ok()?;
        let key = format!("ferry_tm_{name} ");
        text.lines()
            .find_map(|l| l.strip_prefix(&key))
            .and_then(|v| v.trim().parse().ok())
    }

    /// Deployments started on the live TaskManagers (`except` excluded).
    async fn deployments_started(&self, except: &[usize]) -> u64 {
        let mut n = 0;
        for i in (0..self.tms.len()).filter(|i| !except.contains(i)) {
            n += self
                .tm_metric(i, "deployments_started")
                .await
                .expect("TaskManager metrics");
        }
        n
    }

    /// The `/metrics` text of a JobManager.
    async fn metrics(&self, jm: &Jm) -> String {
        self.http
            .get(format!("{}/metrics", jm.url()))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    fn log(&self, id: &str) -> String {
        std::fs::read_to_string(self.dir.path().join(format!("{id}.log"))).unwrap_or_default()
    }

    async fn get(&self, jm: &Jm, path: &str) -> Option<Value> {
        let r = self
            .http
            .get(format!("{}{path}", jm.url()))
            .timeout(Duration::from_secs(2))
            .send()
            .await
            .ok()?;
        r.json().await.ok()
    }

    /// Waits until exactly one of the live JobManagers says it leads and
    /// every live one agrees on it; returns its index and epoch.
    async fn leader(&self, except: &[usize], limit: Duration) -> (usize, u64) {
        let start = Instant::now();
        loop {
            let mut leaders = Vec::new();
            let mut views = Vec::new();
            for (i, jm) in self.jms.iter().enumerate() {
                if except.contains(&i) {
                    continue;
                }
                if let Some(h) = self.get(jm, "/health/ha").await {
                    if h["role"] == "leader" {
                        leaders.push((i, h["epoch"].as_u64().unwrap()));
                    }
                    views.push(h["leader"]["instance"].clone());
                }
            }
            assert!(
                leaders.len() <= 1,
                "two JobManagers lead at once: {leaders:?}"
            );
            if let [(i, epoch)] = leaders[..]
                && views.len() == self.jms.len() - except.len()
                && views
                    .iter()
                    .all(|v| v.as_str() == Some(self.jms[i].id.as_str()))
            {
                return (i, epoch);
            }
            assert!(
                start.elapsed() < limit,
                "no single agreed leader within {limit:?} (leaders {leaders:?}, views {views:?})"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Submits the test job through `jm` and returns its id.
    async fn submit(&self, jm: &Jm) -> (String, reqwest::header::HeaderMap) {
        let spec = SPEC.replace("OUT", &self.out().display().to_string());
        let r = self
            .http
            .post(format!("{}/v1/jobs", jm.url()))
            .body(spec)
            .send()
            .await
            .unwrap();
        let headers = r.headers().clone();
        assert_eq!(r.status(), 201, "submit: {:?}", r.text().await);
        let v: Value = r.json().await.unwrap();
        (v["id"].as_str().unwrap().to_string(), headers)
    }

    /// Submits the test job through JobManager `via` and waits until that
    /// JobManager reports it running with a completed checkpoint.
    async fn running_job(&self, via: usize) -> String {
        let (job, _) = self.submit(&self.jms[via]).await;
        self.wait_job(
            &self.jms[via],
            &job,
            Duration::from_secs(20),
            "a checkpoint",
            has_checkpoint,
        )
        .await;
        job
    }

    /// Waits until the job (read from `jm`) satisfies `cond`.
    async fn wait_job(
        &self,
        jm: &Jm,
        id: &str,
        limit: Duration,
        what: &str,
        cond: impl Fn(&Value) -> bool,
    ) -> Value {
        let start = Instant::now();
        loop {
            if let Some(v) = self.get(jm, &format!("/v1/jobs/{id}")).await
                && cond(&v)
            {
                return v;
            }
            assert!(
                start.elapsed() < limit,
                "timed out after {limit:?} waiting for {what}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits (reading from JobManager `via`) for the job to finish, then
    /// checks its output and that its checkpoints' epochs never go back.
    async fn finish_and_check(&self, via: usize, job: &str, limit: Duration) {
        self.wait_job(&self.jms[via], job, limit, "the job to finish", |v| {
            v["state"] == "FINISHED"
        })
        .await;
        self.check_output();
        assert_epochs_monotonic(&self.manifest_epochs(job));
    }

    /// Checks the committed output against the generator model.
    fn check_output(&self) {
        let spec_text = SPEC.replace("OUT", &self.out().display().to_string());
        let w = ferry_core::spec::parse_and_validate(&spec_text).unwrap();
        let expected = expected_counts(&generator(&w), TOTAL, 0, 60_000);
        let got = count_rows(&read_rows(&self.out()), "user", "clicks");
        assert_eq!(stray_files(&self.out()), Vec::<String>::new());
        assert_eq!(
            got.len(),
            expected.len(),
            "window results: got {} expected {}",
            got.len(),
            expected.len()
        );
        assert_eq!(got, expected, "output differs from the expected counts");
    }

    /// (checkpoint id, jm_epoch) of every complete checkpoint and savepoint
    /// the job has, by id.
    fn manifest_epochs(&self, job: &str) -> BTreeMap<u64, u64> {
        let mut out = BTreeMap::new();
        let root = self.storage().join("jobs").join(job);
        for sub in ["checkpoints", "savepoints"] {
            for e in std::fs::read_dir(root.join(sub))
                .into_iter()
                .flatten()
                .flatten()
            {
                let m = e.path().join("MANIFEST.json");
                if let Ok(text) = std::fs::read_to_string(&m) {
                    let v: Value = serde_json::from_str(&text).unwrap();
                    out.insert(
                        v["checkpoint_id"].as_u64().unwrap(),
                        v["jm_epoch"].as_u64().unwrap(),
                    );
                }
            }
        }
        out
    }
}

/// Epochs of later checkpoints are never lower: no leader completed a
/// checkpoint after a newer leader had started completing them.
fn assert_epochs_monotonic(epochs: &BTreeMap<u64, u64>) {
    let mut last = 0;
    for (id, e) in epochs {
        assert!(
            *e >= last,
            "checkpoint {id} has epoch {e} after epoch {last}: {epochs:?}"
        );
        last = *e;
    }
}

fn has_checkpoint(v: &Value) -> bool {
    v["last_checkpoint"].is_object() && v["state"] == "RUNNING"
}

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

    let done = r
        .wait_job(
            &r.jms[new_leader],
            &job,
            Duration::from_secs(60),
            "the job to finish",
            |v| v["state"] == "FINISHED",
        )
        .await;
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
    assert_eq!(done["attempt"], 1, "{done}");
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

    r.wait_job(
        &r.jms[new_leader],
        &job,
        Duration::from_secs(60),
        "the job to finish",
        |v| v["state"] == "FINISHED",
    )
    .await;
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_region_recovers_by_itself_from_a_nats_restart() {
    let mut nats = NatsServer::start();
    let mut r = Region::new(nats.url(), "800ms", "500ms");
    for id in ["jm-a", "jm-b", "jm-c"] {
        r.start(id, None);
    }
    r.start_tm("tm-1");
    r.start_tm("tm-2");
    let (leader, epoch) = r.leader(&[], Duration::from_secs(20)).await;
    let job = r.running_job(leader).await;

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
    let log_says = |r: &Region| {
        let log = r.log("tm-1");
        log.split("grpc=")
            .nth(1)
            .map(|s| s.split_whitespace().next().unwrap_or("").to_string())
    };
    let start = Instant::now();
    let addr = loop {
        if let Some(a) = log_says(&r) {
            break a;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "TaskManager did not start"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let mut c = TaskManagerClient::connect(addr.clone()).await.unwrap();
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
        })
        .await
        .expect_err("no such deployment");
    assert_eq!(e.code(), tonic::Code::NotFound, "{e}");
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
    assert_eq!(stale_count, 5);
}

/// A syntactically valid job id for direct deploy requests.
fn uuid_like() -> String {
    "0193a5b0-0000-7000-8000-000000000001".to_string()
}

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
        .output()
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
    let mut global = NatsServer::start();
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
    let v = west.get(&west.jms[0], "/v1/regions").await.unwrap();
    assert_eq!(v["primary"], "east", "{v}");
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
        .output()
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

    global.kill();
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
    let global = NatsServer::start();
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
/// exactly the expected result (nothing lost, nothing repeated).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_planned_switchover_moves_a_running_job_without_loss_or_duplicates() {
    let nats = NatsServer::start();
    let global = NatsServer::start();
    let mut east = Region::new(nats.url(), "800ms", "500ms");
    let mut west = Region::new(nats.url(), "800ms", "500ms");
    two_regions(&mut east, &mut west, &global);
    start_two_regions(&mut east, &mut west).await;
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
            .output()
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
        .body(SPEC.replace("OUT", &east.out().display().to_string()))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 409);
}

/// Configures `east` (the primary) and `west` as two regions replicating to
/// each other, with region heartbeats and lease in `global` (300 ms
/// heartbeats, 2 s region timeout).
fn two_regions(east: &mut Region, west: &mut Region, global: &NatsServer) {
    let stores = format!(
        "east=file://{},west=file://{}",
        east.storage().display(),
        west.storage().display()
    );
    for (r, name) in [(east, "east"), (west, "west")] {
        r.env.push(("FERRY_REGION", name.to_string()));
        r.env.push(("FERRY_REGIONS_STORES", stores.clone()));
        r.env.push(("FERRY_REGIONS_PRIMARY", "east".into()));
        r.env.push(("FERRY_REGIONS_GLOBAL_URLS", global.url()));
        r.env
            .push(("FERRY_REGIONS_HEALTH_CHECK_INTERVAL", "300ms".into()));
        r.env.push(("FERRY_REGIONS_TIMEOUT", "2s".into()));
    }
}

/// Starts a JobManager and a TaskManager in each region and waits for both
/// regions' leaders.
async fn start_two_regions(east: &mut Region, west: &mut Region) {
    east.start("jm-east", None);
    east.start_tm("tm-east");
    west.start("jm-west", None);
    west.start_tm("tm-west");
    east.leader(&[], Duration::from_secs(20)).await;
    west.leader(&[], Duration::from_secs(20)).await;
}
