//! The HA fixture of `tests/ha_region.rs` and `tests/ha_cross_region.rs`:
//! a [`Region`] of real `ferry jobmanager` and `ferry taskmanager`
//! processes ([`Jm`]) on a NATS server, the bounded test job ([`SPEC`]) and
//! the check of its committed output against the generator model, the
//! fencing-epoch check of its checkpoint manifests, and the cross-region
//! setup: any number of regions on one global NATS cluster
//! ([`configure_regions`], [`regions`], [`start_regions`]; [`two_regions`]
//! and [`start_two_regions`] for the usual east and west), waits for
//! the region lease, replication, a primary and a healthy region, and
//! webhook receivers (plain HTTP, and HTTPS with a test CA's certificate).

use std::borrow::BorrowMut;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ferry_client::Client;
use ferry_core::api::RoleName;
use ferry_testkit::{NatsCluster, free_port, wait_listening};
use serde_json::Value;

use super::OutputWithin;
use super::{count_rows, expected_counts, ferry_bin, generator, read_rows, stray_files};

/// A bounded job that runs ~8 s: long enough to lose its leader mid-run.
pub const SPEC: &str = r#"
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
pub const TOTAL: u64 = 800_000;

/// One `ferry jobmanager` child process, SIGKILLed on drop if still alive.
pub struct Jm {
    pub id: String,
    pub port: u16,
    pub child: Child,
    /// `https` for a JobManager with `tls.api`.
    pub scheme: &'static str,
}

impl Jm {
    pub fn url(&self) -> String {
        format!("{}://127.0.0.1:{}", self.scheme, self.port)
    }
    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }
    pub fn signal(&self, sig: i32) {
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

/// The processes of one region, on one NATS, with one store and one output
/// directory (of the test job) in a temp dir.
pub struct Region {
    /// The region's name (`FERRY_REGION`): `test`, or as
    /// [`configure_regions`] names it.
    pub name: String,
    pub dir: tempfile::TempDir,
    pub nats_url: String,
    pub jms: Vec<Jm>,
    /// TaskManagers (`port` is their HTTP port: health and metrics).
    pub tms: Vec<Jm>,
    pub http: reqwest::Client,
    pub ttl: &'static str,
    pub deadline: &'static str,
    pub replicas: &'static str,
    /// Extra environment of every process started from now on.
    pub env: Vec<(&'static str, String)>,
    /// Extra environment of JobManagers only, and of TaskManagers only.
    pub jm_env: Vec<(&'static str, String)>,
    pub tm_env: Vec<(&'static str, String)>,
    /// Records per second of the test job (the output does not depend on
    /// it; a lower rate runs the job longer).
    pub rate: u32,
    /// Window size of the test job in ms (default one minute; a smaller
    /// one makes nearly every checkpoint commit output).
    pub window_ms: i64,
    /// Bearer token of the fixture's own API calls (`api.auth` regions).
    pub token: Option<String>,
    /// Parallelism of the test job (default 2).
    pub parallelism: u32,
    /// Slots of TaskManagers started from now on (default 4).
    pub tm_slots: u32,
    /// The CA the fixture trusts for `https` JobManagers (`tls.api`).
    pub ca_cert: Option<Vec<u8>>,
}

impl Region {
    pub fn new(nats_url: String, ttl: &'static str, deadline: &'static str) -> Self {
        Self {
            name: "test".into(),
            dir: tempfile::tempdir().unwrap(),
            nats_url,
            jms: Vec::new(),
            tms: Vec::new(),
            http: reqwest::Client::builder()
                .no_proxy()
                .timeout(Duration::from_secs(120))
                .build()
                .unwrap(),
            ttl,
            deadline,
            replicas: "1",
            env: Vec::new(),
            jm_env: Vec::new(),
            tm_env: Vec::new(),
            rate: 100_000,
            window_ms: 60_000,
            token: None,
            ca_cert: None,
            parallelism: 2,
            tm_slots: 4,
        }
    }

    /// Trusts the CA in `pem` for `https` JobManagers from now on (the
    /// fixture's REST client and its plain HTTP client).
    pub fn trust(&mut self, pem: Vec<u8>) {
        let mut b = reqwest::Client::builder()
            .no_proxy()
            .timeout(Duration::from_secs(120));
        for c in reqwest::Certificate::from_pem_bundle(&pem).unwrap() {
            b = b.tls_certs_merge([c]);
        }
        self.http = b.build().unwrap();
        self.ca_cert = Some(pem);
    }

    /// The same region named `name` (`FERRY_REGION`).
    pub fn named(mut self, name: &str) -> Self {
        self.name = name.to_string();
        self
    }

    pub fn storage(&self) -> PathBuf {
        self.dir.path().join("store")
    }

    pub fn out(&self) -> PathBuf {
        self.dir.path().join("out")
    }

    /// Starts `ferry <role>` with the region's settings plus `env`, its
    /// stderr in `<id>.log`.
    pub fn spawn(
        &self,
        role: &str,
        id: &str,
        nats_url: Option<&str>,
        env: &[(&str, String)],
    ) -> Child {
        let log = std::fs::File::create(self.dir.path().join(format!("{id}.log"))).unwrap();
        let mut cmd = Command::new(ferry_bin());
        cmd.arg(role)
            .env("FERRY_REGION", &self.name)
            .env("FERRY_INSTANCE_ID", id)
            .env("FERRY_NATS_URLS", nats_url.unwrap_or(&self.nats_url))
            .env(
                "FERRY_STORAGE",
                format!("file://{}", self.storage().display()),
            )
            .env("FERRY_NATS_REPLICAS", self.replicas)
            // The region's jobs write into its directory.
            .env(
                "FERRY_SECURITY_ALLOWED_URLS",
                format!("file://{}", self.dir.path().display()),
            )
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log);
        for (k, v) in self.env.iter().chain(env) {
            cmd.env(k, v);
        }
        cmd.spawn()
            .unwrap_or_else(|e| panic!("start ferry {role}: {e}"))
    }

    /// Spawns `role` listening on a free port (`listen_env` names the
    /// variable that sets it) and waits until it listens there. A free
    /// port can be taken by another process before the child binds it
    /// (the child then exits saying so): it starts again on a new port.
    fn spawn_listening(
        &self,
        role: &str,
        id: &str,
        nats_url: Option<&str>,
        listen_env: &'static str,
        env: &[(&str, String)],
    ) -> Jm {
        let mut last = String::new();
        for _ in 0..3 {
            let port = free_port();
            let mut env = env.to_vec();
            env.push((listen_env, format!("127.0.0.1:{port}")));
            let mut child = self.spawn(role, id, nats_url, &env);
            let log = self.dir.path().join(format!("{id}.log"));
            match wait_listening(&mut child, id, port, Some(&log), Duration::from_secs(20)) {
                Ok(()) => {
                    let tls = role == "jobmanager"
                        && env.iter().any(|(k, _)| *k == "FERRY_TLS_API_CERT_FILE");
                    return Jm {
                        id: id.to_string(),
                        port,
                        child,
                        scheme: if tls { "https" } else { "http" },
                    };
                }
                Err(e) => last = e.to_string(),
            }
        }
        panic!("start {role} {id}: {last}")
    }

    /// Starts a JobManager; `nats_url` overrides the region's (a proxy).
    pub fn start(&mut self, id: &str, nats_url: Option<&str>) {
        let mut env = vec![
            ("FERRY_HA_LEASE_TTL", self.ttl.to_string()),
            ("FERRY_HA_RENEW_DEADLINE", self.deadline.to_string()),
            ("FERRY_HA_RENEW_INTERVAL", "150ms".to_string()),
        ];
        env.extend(self.jm_env.iter().cloned());
        let jm = self.spawn_listening("jobmanager", id, nats_url, "FERRY_API_LISTEN", &env);
        self.jms.push(jm);
    }

    /// Starts a TaskManager with `tm_slots` slots (`port`: its HTTP port).
    pub fn start_tm(&mut self, id: &str) {
        let mut env = vec![
            ("FERRY_TASKMANAGER_LISTEN", "127.0.0.1:0".to_string()),
            ("FERRY_TASKMANAGER_SLOTS", self.tm_slots.to_string()),
        ];
        env.extend(self.tm_env.iter().cloned());
        let tm = self.spawn_listening(
            "taskmanager",
            id,
            None,
            "FERRY_TASKMANAGER_HTTP_LISTEN",
            &env,
        );
        self.tms.push(tm);
    }

    /// TaskManager `id`'s gRPC URL, from its start line (what its
    /// membership record publishes); waits up to 20 s for it.
    pub async fn tm_grpc_url(&self, id: &str) -> String {
        let start = Instant::now();
        loop {
            if let Some(url) = self
                .log(id)
                .split("grpc=")
                .nth(1)
                .and_then(|s| s.split_whitespace().next())
            {
                return url.to_string();
            }
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "{id} did not start:\n{}",
                self.log(id)
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// A TaskManager's metric (`ferry_tm_<name>`), if it answers.
    pub async fn tm_metric(&self, tm: usize, name: &str) -> Option<u64> {
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
    pub async fn deployments_started(&mut self, except: &[usize]) -> u64 {
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
    pub async fn metrics(&self, jm: &Jm) -> String {
        self.http
            .get(format!("{}/metrics", jm.url()))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    pub fn log(&self, id: &str) -> String {
        std::fs::read_to_string(self.dir.path().join(format!("{id}.log"))).unwrap_or_default()
    }

    /// The REST client of JobManager `jm` (2 s per request).
    pub fn api(&self, jm: &Jm) -> Client {
        let mut c = Client::local(&jm.url())
            .expect("a loopback URL")
            .with_timeout(Duration::from_secs(2));
        if let Some(pem) = &self.ca_cert {
            c = c.with_ca_cert(pem).expect("the test CA");
        }
        match &self.token {
            Some(t) => c.with_token(t),
            None => c,
        }
    }

    /// `GET path` from `jm` as JSON, error answers included (their error
    /// body); `None` when it does not answer JSON.
    pub async fn get(&self, jm: &Jm, path: &str) -> Option<Value> {
        match self.api(jm).get_json(path).await {
            Ok(a) => Some(a.raw),
            Err(ferry_client::Error::Api { text, .. }) => serde_json::from_str(&text).ok(),
            Err(_) => None,
        }
    }

    /// Waits until exactly one of the live JobManagers says it leads and
    /// every live one agrees on it; returns its index and epoch.
    pub async fn leader(&self, except: &[usize], limit: Duration) -> (usize, u64) {
        let start = Instant::now();
        loop {
            let mut leaders = Vec::new();
            let mut views = Vec::new();
            let mut silent = Vec::new();
            for (i, jm) in self.jms.iter().enumerate() {
                if except.contains(&i) {
                    continue;
                }
                match self.api(jm).health().await.map(|a| a.value) {
                    Ok(h) => {
                        if h.role == RoleName::Leader {
                            leaders.push((i, h.epoch.unwrap()));
                        }
                        views.push(h.leader.map(|l| l.instance));
                    }
                    Err(e) => silent.push((jm.id.clone(), e.to_string())),
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
                    .all(|v| v.as_deref() == Some(self.jms[i].id.as_str()))
            {
                return (i, epoch);
            }
            if start.elapsed() >= limit {
                let logs: Vec<String> = self
                    .jms
                    .iter()
                    .map(|jm| format!("--- {} log ---\n{}", jm.id, tail(&self.log(&jm.id), 40)))
                    .collect();
                panic!(
                    "no single agreed leader within {limit:?} (leaders {leaders:?}, views {views:?}, not answering {silent:?})\n{}",
                    logs.join("\n")
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Submits the test job through `jm` and returns its id.
    pub async fn submit(&self, jm: &Jm) -> (String, reqwest::header::HeaderMap) {
        let spec = self
            .spec()
            .replace("rate: 100000", &format!("rate: {}", self.rate));
        let r = self
            .api(jm)
            .with_timeout(ferry_client::REQUEST_TIMEOUT)
            .submit(spec.into_bytes(), None)
            .await
            .unwrap_or_else(|e| panic!("submit: {e}"));
        assert_eq!(r.status, 201, "submit: {}", r.raw);
        (r.value.id.to_string(), r.headers)
    }

    /// Submits the test job through JobManager `via` and waits until that
    /// JobManager reports it running with a completed checkpoint.
    pub async fn running_job(&self, via: usize) -> String {
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
    pub async fn wait_job(
        &self,
        jm: &Jm,
        id: &str,
        limit: Duration,
        what: &str,
        cond: impl Fn(&Value) -> bool,
    ) -> Value {
        let start = Instant::now();
        loop {
            let last = self.get(jm, &format!("/v1/jobs/{id}")).await;
            if let Some(v) = &last
                && cond(v)
            {
                return v.clone();
            }
            if start.elapsed() >= limit {
                panic!(
                    "timed out after {limit:?} waiting for {what}; the job: {last:?}\n--- {} log ---\n{}",
                    jm.id,
                    tail(&self.log(&jm.id), 60)
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits (reading from JobManager `via`, bounded by `limit`) until
    /// `job` is FINISHED; its status.
    pub async fn finished(&self, via: usize, job: &str, limit: Duration) -> Value {
        self.wait_job(&self.jms[via], job, limit, "the job to finish", |v| {
            v["state"] == "FINISHED"
        })
        .await
    }

    /// Waits (reading from JobManager `via`) for the job to finish, then
    /// checks its output and that its checkpoints' epochs never go back.
    pub async fn finish_and_check(&self, via: usize, job: &str, limit: Duration) {
        self.finished(via, job, limit).await;
        self.check_output();
        assert_epochs_monotonic(&self.manifest_epochs(job));
        self.assert_checkpoints_verify(job).await;
    }

    /// Every complete checkpoint and savepoint the job kept reads back with
    /// every file its manifest lists (shared ones included) at the right
    /// size and hash.
    pub async fn assert_checkpoints_verify(&self, job: &str) {
        let root = self.storage().join("jobs").join(job);
        let root_loc =
            ferry_core::storage::StorageLocation::open(self.storage().to_str().unwrap()).unwrap();
        for sub in ["checkpoints", "savepoints"] {
            for e in std::fs::read_dir(root.join(sub))
                .into_iter()
                .flatten()
                .flatten()
            {
                if !e.path().join("MANIFEST.json").exists() {
                    continue;
                }
                let rel = format!("jobs/{job}/{sub}/{}", e.file_name().to_string_lossy());
                let read = ferry_core::manifest::read_verified(&root_loc.child(&rel)).await;
                assert!(
                    matches!(read, Ok(Some(_))),
                    "{rel} does not verify: {read:?}"
                );
            }
        }
    }

    /// Waits (bounded, 240 s: the job's whole input under load) until
    /// JobManager `jm` reports `job` FINISHED; fails with `jm_log` and
    /// `other`'s JobManager log.
    pub async fn wait_finished(&self, jm: usize, job: &str, other: &Region, jm_log: &str) -> Value {
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

    /// The test job's spec as this region submits it.
    pub fn spec(&self) -> String {
        SPEC.replace("OUT", &self.out().display().to_string())
            .replace("tumbling: 1m", &format!("tumbling: {}ms", self.window_ms))
            .replace(
                "parallelism: 2",
                &format!("parallelism: {}", self.parallelism),
            )
    }

    /// Checks the committed output against the generator model.
    pub fn check_output(&self) {
        let w = ferry_core::spec::parse_and_validate(&self.spec()).unwrap();
        let expected = expected_counts(&generator(&w), TOTAL, 0, self.window_ms);
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
    pub fn manifest_epochs(&self, job: &str) -> BTreeMap<u64, u64> {
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
pub fn assert_epochs_monotonic(epochs: &BTreeMap<u64, u64>) {
    let mut last = 0;
    for (id, e) in epochs {
        assert!(
            *e >= last,
            "checkpoint {id} has epoch {e} after epoch {last}: {epochs:?}"
        );
        last = *e;
    }
}

pub fn has_checkpoint(v: &Value) -> bool {
    v["last_checkpoint"].is_object() && v["state"] == "RUNNING"
}

/// Region heartbeat interval (`regions.healthCheckInterval`) of the regions
/// [`configure_regions`] sets up.
pub const REGION_HEALTH_CHECK_INTERVAL: &str = "300ms";
/// Region timeout (`regions.timeout`) of the regions [`configure_regions`]
/// sets up.
pub const REGION_TIMEOUT: &str = "2s";

/// Configures `regions`, each named by its [`Region::name`], as the regions
/// of one deployment, the first the primary: every region lists every
/// region's store (they replicate to each other), with region heartbeats
/// and lease in `global` ([`REGION_HEALTH_CHECK_INTERVAL`],
/// [`REGION_TIMEOUT`]), buckets with 3 replicas (fewer on a smaller
/// cluster). Region `i` lists global node `i % nodes` first, its own node
/// (on a 3-node cluster with two regions the third node is a witness).
/// Settings a test pushes onto a region's `env` afterwards override these.
pub fn configure_regions<R: BorrowMut<Region>>(regions: &mut [R], global: &NatsCluster) {
    let stores = regions
        .iter()
        .map(|r| {
            let r = r.borrow();
            format!("{}=file://{}", r.name, r.storage().display())
        })
        .collect::<Vec<_>>()
        .join(",");
    let primary = regions[0].borrow().name.clone();
    let nodes = global.nodes.len();
    let urls = |first: usize| {
        (0..nodes)
            .map(|i| global.nodes[(first + i) % nodes].url())
            .collect::<Vec<_>>()
            .join(",")
    };
    for (i, r) in regions.iter_mut().enumerate() {
        let r = r.borrow_mut();
        r.env.push(("FERRY_REGIONS_STORES", stores.clone()));
        r.env.push(("FERRY_REGIONS_PRIMARY", primary.clone()));
        r.env.push(("FERRY_REGIONS_GLOBAL_URLS", urls(i % nodes)));
        r.env
            .push(("FERRY_REGIONS_GLOBAL_REPLICAS", nodes.min(3).to_string()));
        r.env.push((
            "FERRY_REGIONS_HEALTH_CHECK_INTERVAL",
            REGION_HEALTH_CHECK_INTERVAL.into(),
        ));
        r.env.push(("FERRY_REGIONS_TIMEOUT", REGION_TIMEOUT.into()));
    }
}

/// Regions named `names` (the first the primary) on the regional NATS
/// `nats_url` (each region its own buckets), with the in-region timings of
/// the cross-region tests (lease ttl 800 ms, renew deadline 500 ms),
/// configured by [`configure_regions`] on `global`. Set a region's `rate`
/// or push onto its `env` before starting it.
pub fn regions(nats_url: &str, global: &NatsCluster, names: &[&str]) -> Vec<Region> {
    let mut regions: Vec<Region> = names
        .iter()
        .map(|name| Region::new(nats_url.to_string(), "800ms", "500ms").named(name))
        .collect();
    configure_regions(&mut regions, global);
    regions
}

/// Starts a JobManager `jm-<name>` and a TaskManager `tm-<name>` in each
/// region, in order, and waits for every region's leader.
pub async fn start_regions<R: BorrowMut<Region>>(regions: &mut [R]) {
    for r in regions.iter_mut() {
        let r = r.borrow_mut();
        let name = r.name.clone();
        r.start(&format!("jm-{name}"), None);
        r.start_tm(&format!("tm-{name}"));
    }
    for r in regions.iter() {
        r.borrow().leader(&[], Duration::from_secs(20)).await;
    }
}

/// Configures `east` (the primary) and `west` as two regions replicating to
/// each other, with region heartbeats and lease in `global` (300 ms
/// heartbeats, 2 s region timeout): a 3-node cluster, one node per
/// simulated region (the third a witness), buckets with 3 replicas; each
/// region lists its own node first. [`configure_regions`] for two.
pub fn two_regions(east: &mut Region, west: &mut Region, global: &NatsCluster) {
    east.name = "east".into();
    west.name = "west".into();
    configure_regions(&mut [east, west], global);
}

/// Starts a JobManager and a TaskManager in each region and waits for both
/// regions' leaders ([`start_regions`] for two).
pub async fn start_two_regions(east: &mut Region, west: &mut Region) {
    start_regions(&mut [east, west]).await;
}

/// Waits until `r`'s first JobManager reads a region lease; its epoch.
pub async fn wait_lease(r: &Region) -> u64 {
    let start = Instant::now();
    loop {
        let v = r.api(&r.jms[0]).regions().await.ok().map(|a| a.value);
        if let Some(e) = v.as_ref().map(|v| v.epoch.0).filter(|e| *e > 0) {
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
pub async fn wait_replicated(r: &Region, jm: usize, job: &str) -> u64 {
    let start = Instant::now();
    loop {
        let v = r.api(&r.jms[jm]).regions().await.ok();
        if let Some(n) = v.as_ref().and_then(|a| {
            a.value
                .standbys
                .first()?
                .jobs
                .get(job)?
                .replicated_checkpoint
        }) {
            return n;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "nothing replicated: {}",
            v.map(|a| a.raw).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until JobManager `jm` of `r` reports `region` as the primary;
/// its `/v1/regions` body then.
pub async fn wait_primary(r: &Region, jm: usize, region: &str, limit: Duration) -> Value {
    let start = Instant::now();
    loop {
        let v = r.api(&r.jms[jm]).regions().await.ok();
        if let Some(a) = v.as_ref()
            && a.value.primary.as_deref() == Some(region)
        {
            return a.raw.clone();
        }
        assert!(
            start.elapsed() < limit,
            "{region} did not become the primary within {limit:?}: {}",
            v.map(|a| a.raw).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until JobManager `jm` of `r` sees `region` healthy.
pub async fn wait_healthy(r: &Region, jm: usize, region: &str, limit: Duration) {
    let start = Instant::now();
    loop {
        let v = r.api(&r.jms[jm]).regions().await.ok();
        if v.as_ref().is_some_and(|a| a.value.healthy(region)) {
            return;
        }
        assert!(
            start.elapsed() < limit,
            "{region} not healthy: {}",
            v.map(|a| a.raw).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Every complete checkpoint manifest of `job` in a file store.
pub fn manifests(store: &std::path::Path, job: &str) -> Vec<Value> {
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

/// Every checkpoint `store` holds of `job` under region epoch `epoch` was
/// completed before `promoted` (the moment another region took over): no
/// commit of the old lineage landed after the takeover.
pub fn assert_no_checkpoint_of_epoch_after(
    store: &std::path::Path,
    job: &str,
    epoch: u64,
    promoted: chrono::DateTime<chrono::Utc>,
) {
    let last_old = manifests(store, job)
        .into_iter()
        .filter(|m| m["region_epoch"].as_u64() == Some(epoch))
        .filter_map(|m| m["created_at"].as_str().map(str::to_string))
        .max()
        .expect("checkpoints of the old region epoch");
    let last_old = chrono::DateTime::parse_from_rfc3339(&last_old).unwrap();
    assert!(
        last_old < promoted,
        "a checkpoint of region epoch {epoch} completed at {last_old}, after the promotion at {promoted}"
    );
}

/// Runs `ferry <args>`; (exit success, stdout as JSON, stderr).
pub fn ferry_json(args: &[&str]) -> (bool, Value, String) {
    let o = Command::new(ferry_bin())
        .args(args)
        .output_within(super::COMMAND_LIMIT)
        .unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr).to_string();
    let v = serde_json::from_slice(&o.stdout).unwrap_or_else(|e| {
        panic!(
            "ferry {args:?}: stdout is not JSON ({e}): {}\n{stderr}",
            String::from_utf8_lossy(&o.stdout)
        )
    });
    (o.status.success(), v, stderr)
}

/// One request a webhook receiver took: its JSON body and its
/// `Authorization` header.
#[derive(Clone, Debug)]
pub struct Hook {
    pub body: Value,
    pub authorization: Option<String>,
}

/// Reads one HTTP/1 request from `sock` (headers, then Content-Length
/// bytes of body; bounded), answers 200 and closes; the request as a
/// [`Hook`] when its body is JSON.
async fn take_hook<S>(mut sock: S) -> Option<Hook>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    while buf.len() < 1 << 20 {
        let n = match tokio::time::timeout(Duration::from_secs(5), sock.read(&mut chunk)).await {
            Ok(Ok(n)) if n > 0 => n,
            _ => return None,
        };
        buf.extend_from_slice(&chunk[..n]);
        let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
            continue;
        };
        let head = String::from_utf8_lossy(&buf[..end]).into_owned();
        let header = |name: &str| {
            head.lines().find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.trim()
                    .eq_ignore_ascii_case(name)
                    .then(|| v.trim().to_string())
            })
        };
        let len = header("content-length")
            .and_then(|v| v.parse::<usize>().ok())
            .unwrap_or(0);
        if buf.len() >= end + 4 + len {
            let _ = sock
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
                .await;
            let _ = sock.shutdown().await;
            let body = serde_json::from_slice(&buf[end + 4..end + 4 + len]).ok()?;
            return Some(Hook {
                body,
                authorization: header("authorization"),
            });
        }
    }
    None
}

/// A loopback HTTP endpoint that answers 200 to every POST and hands each
/// JSON body over; its URL.
pub async fn webhook_receiver() -> (String, tokio::sync::mpsc::UnboundedReceiver<Value>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((sock, _)) = listener.accept().await {
            let tx = tx.clone();
            tokio::spawn(async move {
                if let Some(h) = take_hook(sock).await {
                    let _ = tx.send(h.body);
                }
            });
        }
    });
    (url, rx)
}

/// A loopback HTTPS-only endpoint with `leaf`'s certificate (a client must
/// trust its CA) that answers 200 to every POST and hands each request
/// over; its URL, whose path stands for a webhook's secret.
pub async fn https_webhook_receiver(
    leaf: &ferry_testkit::pki::Leaf,
) -> (String, tokio::sync::mpsc::UnboundedReceiver<Hook>) {
    use ferry_core::tls::{ClientAuth, ServerTls, TlsFiles};
    let files = TlsFiles::new("webhook-receiver", &leaf.cert, &leaf.key, &leaf.ca);
    let tls = ServerTls::load(
        files,
        ClientAuth::None,
        &[b"http/1.1"],
        Duration::from_secs(3600),
    )
    .expect("the receiver's certificate");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!(
        "https://127.0.0.1:{}/hooks/hook-path-s3cret",
        listener.local_addr().unwrap().port()
    );
    // Only connections that completed a TLS handshake arrive here.
    let mut accepted = ferry_core::tls::accept(listener, tls, std::sync::Arc::new(|| {}), None);
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Some((sock, _)) = accepted.recv().await {
            let tx = tx.clone();
            tokio::spawn(async move {
                if let Some(h) = take_hook(sock).await {
                    let _ = tx.send(h);
                }
            });
        }
    });
    (url, rx)
}

/// The last `n` lines of `text`.
pub fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// West's store is the bucket `west` of the S3-compatible server `s3`
/// (west's own storage and east's replication target); east reaches it
/// only through `link`, so cutting `link` cuts east off from west's store.
/// East's store is its own directory.
pub fn west_store_on_s3(
    east: &mut Region,
    west: &mut Region,
    s3: &super::s3::S3Server,
    link: &ferry_testkit::FaultProxy,
) {
    let stores = format!(
        "east=file://{},west=s3://west/ferry",
        east.storage().display()
    );
    for (r, endpoint) in [(east, link.http_url()), (&mut *west, s3.endpoint())] {
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
}
