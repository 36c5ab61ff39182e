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
    /// Records per second of the test job (the output does not depend on
    /// it; a lower rate runs the job longer).
    rate: u32,
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
            rate: 100_000,
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
    /// A TaskManager that does not answer within 10 s fails the test with
    /// its log.
    async fn deployments_started(&mut self, except: &[usize]) -> u64 {
        let mut n = 0;
        for i in (0..self.tms.len()).filter(|i| !except.contains(i)) {
            let deadline = Instant::now() + Duration::from_secs(10);
            let v = loop {
                if let Some(v) = self.tm_metric(i, "deployments_started").await {
                    break v;
                }
                if Instant::now() >= deadline {
                    let exit = self.tms[i].child.try_wait();
                    panic!(
                        "TaskManager {} does not serve /metrics (exit: {exit:?}):\n{}",
                        self.tms[i].id,
                        self.log(&self.tms[i].id)
                    );
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            };
            n += v;
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
        let spec = SPEC
            .replace("OUT", &self.out().display().to_string())
            .replace("rate: 100000", &format!("rate: {}", self.rate));
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

    /// Waits (bounded, 240 s: the job's whole input under load) until
    /// JobManager `jm` reports `job` FINISHED; fails with `jm_log` and
    /// `other`'s JobManager log.
    async fn wait_finished(&self, jm: usize, job: &str, other: &Region, jm_log: &str) -> Value {
        let start = Instant::now();
        loop {
            let v = self.get(&self.jms[jm], &format!("/v1/jobs/{job}")).await;
            if let Some(v) = v.clone().filter(|v| v["state"] == "FINISHED") {
                return v;
            }
            assert!(
                start.elapsed() < Duration::from_secs(240),
                "the job did not finish: {v:?}\nthis region:\n{}\nthe other:\n{}",
                self.log(jm_log),
                other.log(&other.jms[0].id)
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
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
/// exactly the expected result (nothing lost, nothing repeated).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_planned_switchover_moves_a_running_job_without_loss_or_duplicates() {
    let nats = NatsServer::start();
    let global = NatsCluster::start(3);
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
/// heartbeats, 2 s region timeout): a 3-node cluster, one node per
/// simulated region (the third a witness), buckets with 3 replicas; each
/// region lists its own node first.
fn two_regions(east: &mut Region, west: &mut Region, global: &NatsCluster) {
    let stores = format!(
        "east=file://{},west=file://{}",
        east.storage().display(),
        west.storage().display()
    );
    let urls = |first: usize| {
        (0..global.nodes.len())
            .map(|i| global.nodes[(first + i) % global.nodes.len()].url())
            .collect::<Vec<_>>()
            .join(",")
    };
    for (r, name, node) in [(east, "east", 0), (west, "west", 1)] {
        r.env.push(("FERRY_REGION", name.to_string()));
        r.env.push(("FERRY_REGIONS_STORES", stores.clone()));
        r.env.push(("FERRY_REGIONS_PRIMARY", "east".into()));
        r.env.push(("FERRY_REGIONS_GLOBAL_URLS", urls(node)));
        r.env.push(("FERRY_REGIONS_GLOBAL_REPLICAS", "3".into()));
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

/// Waits until `r`'s first JobManager reads a region lease; its epoch.
async fn wait_lease(r: &Region) -> u64 {
    let start = Instant::now();
    loop {
        let v = r.get(&r.jms[0], "/v1/regions").await;
        if let Some(e) = v
            .as_ref()
            .and_then(|v| v["epoch"].as_u64())
            .filter(|e| *e > 0)
        {
            return e;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "no region lease: {v:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits until the primary `r` (its JobManager `jm`) reports a checkpoint
/// of `job` replicated to its (first) standby; that checkpoint's number.
async fn wait_replicated(r: &Region, jm: usize, job: &str) -> u64 {
    let start = Instant::now();
    loop {
        let v = r.get(&r.jms[jm], "/v1/regions").await.unwrap_or_default();
        if let Some(n) = v["standbys"][0]["jobs"][job]["replicated_checkpoint"].as_u64() {
            return n;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "nothing replicated: {v}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until JobManager `jm` of `r` reports `region` as the primary;
/// its `/v1/regions` body then.
async fn wait_primary(r: &Region, jm: usize, region: &str, limit: Duration) -> Value {
    let start = Instant::now();
    loop {
        let v = r.get(&r.jms[jm], "/v1/regions").await.unwrap_or_default();
        if v["primary"] == region {
            return v;
        }
        assert!(
            start.elapsed() < limit,
            "{region} did not become the primary within {limit:?}: {v}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until JobManager `jm` of `r` sees `region` healthy.
async fn wait_healthy(r: &Region, jm: usize, region: &str, limit: Duration) {
    let start = Instant::now();
    loop {
        let v = r.get(&r.jms[jm], "/v1/regions").await.unwrap_or_default();
        if v["regions"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|x| x["region"] == region && x["healthy"] == true)
        {
            return;
        }
        assert!(start.elapsed() < limit, "{region} not healthy: {v}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Every complete checkpoint manifest of `job` in a file store.
fn manifests(store: &std::path::Path, job: &str) -> Vec<Value> {
    let mut out: Vec<Value> = std::fs::read_dir(store.join("jobs").join(job).join("checkpoints"))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| std::fs::read_to_string(e.path().join("MANIFEST.json")).ok())
        .map(|t| serde_json::from_str(&t).unwrap())
        .collect();
    out.sort_by_key(|m| m["checkpoint_id"].as_u64());
    out
}

/// Runs `ferry <args>`; (exit success, stdout as JSON, stderr).
fn ferry_json(args: &[&str]) -> (bool, Value, String) {
    let o = Command::new(ferry_bin()).args(args).output().unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr).to_string();
    let v = serde_json::from_slice(&o.stdout).unwrap_or_else(|e| {
        panic!(
            "ferry {args:?}: stdout is not JSON ({e}): {}\n{stderr}",
            String::from_utf8_lossy(&o.stdout)
        )
    });
    (o.status.success(), v, stderr)
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
    // RPO: east's last checkpoint at the outage against that one.
    let before = &r["jobs"][0]["primary_last_checkpoint"];
    let after = &r["jobs"][0]["restored_checkpoint"];
    assert_eq!(
        r["rpo_records"].as_u64().unwrap(),
        before["records_in"].as_u64().unwrap() - after["records_in"].as_u64().unwrap(),
        "{r}"
    );
    assert!(before["id"].as_u64() >= Some(restored), "{r}");
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
    let stores = format!(
        "east=file://{},west=s3://west/ferry",
        east.storage().display()
    );
    for (r, endpoint) in [(&mut east, link.http_url()), (&mut west, s3.endpoint())] {
        r.env.push(("FERRY_REGIONS_STORES", stores.clone()));
        for (k, v) in s3.env() {
            r.env.push((
                k,
                if k == "AWS_ENDPOINT" {
                    endpoint.clone()
                } else {
                    v
                },
            ));
        }
    }
    west.env.push(("FERRY_STORAGE", "s3://west/ferry".into()));
    start_two_regions(&mut east, &mut west).await;
    let epoch = wait_lease(&east).await;
    let job = east.running_job(0).await;
    let replicated = wait_replicated(&east, 0, &job).await;

    // East goes on alone: three more checkpoints west never receives.
    link.cut();
    let cut_at = east
        .get(&east.jms[0], &format!("/v1/jobs/{job}"))
        .await
        .unwrap()["last_checkpoint"]["id"]
        .as_u64()
        .unwrap();
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
    let last_old = manifests(&east.storage(), &job)
        .into_iter()
        .filter(|m| m["region_epoch"].as_u64() == Some(epoch))
        .filter_map(|m| m["created_at"].as_str().map(str::to_string))
        .max()
        .expect("east completed checkpoints");
    let last_old = chrono::DateTime::parse_from_rfc3339(&last_old).unwrap();
    assert!(
        last_old < promoted.1,
        "{last_old} vs promotion at {}",
        promoted.1
    );
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

/// A loopback HTTP endpoint that answers 200 to every POST and hands each
/// JSON body over; its URL.
async fn webhook_receiver() -> (String, tokio::sync::mpsc::UnboundedReceiver<Value>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((mut sock, _)) = listener.accept().await {
            let tx = tx.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                // Headers, then Content-Length bytes of body (bounded).
                while buf.len() < 1 << 20 {
                    let n =
                        match tokio::time::timeout(Duration::from_secs(5), sock.read(&mut chunk))
                            .await
                        {
                            Ok(Ok(n)) if n > 0 => n,
                            _ => return,
                        };
                    buf.extend_from_slice(&chunk[..n]);
                    let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
                        continue;
                    };
                    let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
                    let len = head
                        .lines()
                        .find_map(|l| l.strip_prefix("content-length:"))
                        .and_then(|v| v.trim().parse::<usize>().ok())
                        .unwrap_or(0);
                    if buf.len() >= end + 4 + len {
                        if let Ok(v) = serde_json::from_slice(&buf[end + 4..end + 4 + len]) {
                            let _ = tx.send(v);
                        }
                        let _ = sock
                            .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
                            .await;
                        return;
                    }
                }
            });
        }
    });
    (url, rx)
}
