//! The JobManager failover benchmark (`ferry bench failover`): leader
//! failover times of `ferry jobmanager` processes on loopback. Starts a
//! `nats-server -js`, three JobManagers and (by default) two TaskManagers
//! running a long job, then repeatedly SIGKILLs (or SIGTERMs, for graceful
//! handoffs) the leader and measures the time until a job submission — a
//! write only a leader accepts — succeeds again, and until the long job's
//! next checkpoint completes under the new leader (its tasks keep running:
//! the number of deployments started must stay 1). The stopped instance is
//! restarted before the next round. Ends with the idle CPU of every process
//! over a quiet period (the long job cancelled).

use std::path::PathBuf;
use std::process::Child;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use ferry_client::Client;
use ferry_core::api::RoleName;
use ferry_testkit::try_free_port;
use serde::Serialize;

use crate::Stats;
use crate::procs::{Proc, cpu_seconds, signal, spawn_ferry, start_nats_with, tm_metric};

/// What to measure.
#[derive(Clone, Debug)]
pub struct FailoverOptions {
    /// The `ferry` executable to start.
    pub ferry: PathBuf,
    /// Leader SIGKILLs to measure.
    pub kills: u32,
    /// Graceful handoffs (SIGTERM of the leader) to measure.
    pub handoffs: u32,
    /// Seconds of idle CPU measurement at the end (0 skips it).
    pub idle_seconds: u64,
    /// TaskManagers to start (0: none; then no long job runs).
    pub taskmanagers: usize,
    /// Leader lease ttl of the JobManagers.
    pub lease_ttl: String,
    /// Keep the logs and store here (a temp dir, removed at the end, by
    /// default).
    pub work_dir: Option<PathBuf>,
    /// Every link over TLS with authentication: NATS (TLS with a client
    /// certificate and a password), the REST API (HTTPS and a bearer
    /// token), JobManager ↔ TaskManager gRPC (mutual TLS), with
    /// certificates made for the run.
    pub secure: bool,
    /// REST requests to time on the settled leader.
    pub rest_requests: u32,
}

/// What happens, as it happens.
#[derive(Clone, Copy, Debug)]
pub enum Progress {
    /// Every process of the plaintext or the `secure` cluster is up.
    Started { secure: bool },
    /// One leader loss in the plaintext or the `secure` cluster:
    /// `handoff` (SIGTERM) or a SIGKILL, its number from 1, the time to an
    /// accepted write and to the long job's next checkpoint.
    Round {
        secure: bool,
        handoff: bool,
        n: u32,
        write: Duration,
        checkpoint: Option<Duration>,
    },
}

/// The times of one kind of leader loss, in ms.
#[derive(Serialize, Clone, Debug)]
pub struct Timings {
    pub p50: f64,
    pub p99: f64,
    pub max: f64,
    /// Ascending.
    pub all: Vec<f64>,
}

impl Timings {
    fn of(all: Vec<f64>) -> Self {
        let s = Stats::of(&all);
        Self {
            p50: s.p50,
            p99: s.p99,
            max: s.max,
            all,
        }
    }
}

/// The benchmark's result.
#[derive(Serialize, Clone, Debug)]
pub struct FailoverReport {
    pub lease_ttl: String,
    /// TLS and authentication on every link.
    pub secure: bool,
    /// `GET /v1/jobs/{id}` against the leader, one after another on one
    /// client (its connections kept alive), in a steady state.
    pub rest_ms: Timings,
    /// `GET /v1/jobs` against the leader, each on a new connection (and
    /// with its TLS handshake), as a CLI invocation makes them.
    pub rest_new_connection_ms: Timings,
    pub sigkill_ms: Timings,
    pub graceful_ms: Timings,
    pub next_checkpoint_after_sigkill_ms: Stats,
    pub next_checkpoint_after_graceful_ms: Stats,
    /// Measurements behind the two above.
    #[serde(skip)]
    pub checkpoints_after_sigkill: usize,
    #[serde(skip)]
    pub checkpoints_after_graceful: usize,
    /// The long job's attempt at the end (1: never restarted).
    pub long_job_attempt: Option<u64>,
    /// Deployments the TaskManagers started.
    pub deployments_started: Option<u64>,
    pub probe_jobs: u64,
    /// JobManagers first, then TaskManagers, as in `processes`.
    pub idle_cpu_percent_per_process: Vec<f64>,
    pub processes: Vec<String>,
}

impl FailoverReport {
    /// The results as a Markdown table and notes (idle CPU measured over
    /// `idle_seconds`), as `ferry bench` prints them (and docs/benchmarks.md
    /// records them).
    pub fn markdown(&self, idle_seconds: u64) -> String {
        use std::fmt::Write as _;
        let r = self;
        let mut out = String::new();
        let (k, h) = (&r.sigkill_ms, &r.graceful_ms);
        let _ = writeln!(
            out,
            "links: {}",
            if r.secure {
                "TLS with authentication on every link (NATS, REST API, gRPC)"
            } else {
                "plaintext, no authentication"
            }
        );
        let _ = writeln!(out);
        let _ = writeln!(out, "| leader loss | runs | p50 ms | p99 ms | max ms |");
        let _ = writeln!(out, "|---|---|---|---|---|");
        let mut row = |what: &str, t: &Timings, digits: usize| {
            let _ = writeln!(
                out,
                "| {what} | {} | {:.digits$} | {:.digits$} | {:.digits$} |",
                t.all.len(),
                t.p50,
                t.p99,
                t.max
            );
        };
        row("SIGKILL", k, 0);
        row("graceful (SIGTERM)", h, 0);
        if !r.rest_ms.all.is_empty() {
            row(
                "REST request on a kept-alive connection (GET /v1/jobs/{id})",
                &r.rest_ms,
                3,
            );
        }
        if !r.rest_new_connection_ms.all.is_empty() {
            row(
                "REST request on a new connection (GET /v1/jobs)",
                &r.rest_new_connection_ms,
                3,
            );
        }
        if r.checkpoints_after_sigkill > 0 {
            let (kc, hc) = (
                &r.next_checkpoint_after_sigkill_ms,
                &r.next_checkpoint_after_graceful_ms,
            );
            let _ = writeln!(
                out,
                "| running job's next checkpoint after SIGKILL | {} | {:.0} | {:.0} | {:.0} |",
                r.checkpoints_after_sigkill, kc.p50, kc.p99, kc.max
            );
            let _ = writeln!(
                out,
                "| running job's next checkpoint after graceful | {} | {:.0} | {:.0} | {:.0} |",
                r.checkpoints_after_graceful, hc.p50, hc.p99, hc.max
            );
        }
        if let (Some(att), Some(st)) = (r.long_job_attempt, r.deployments_started) {
            let _ = writeln!(
                out,
                "running job: attempt {att} after {} leader changes (1 = never restarted); deployments started on the TaskManagers: {st} (the running job's one, plus one per probe job: one per round, and any a stopping leader still accepted)",
                r.probe_jobs
            );
        }
        let idle = &r.idle_cpu_percent_per_process;
        if !idle.is_empty() {
            let (jm, tm) = idle.split_at(3.min(idle.len()));
            let fmt = |v: &[f64]| {
                v.iter()
                    .map(|c| format!("{c:.2}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            let _ = writeln!(
                out,
                "idle CPU over {idle_seconds} s, % of a core: JobManagers {}; TaskManagers {}",
                fmt(jm),
                if tm.is_empty() { "-".into() } else { fmt(tm) }
            );
        }
        out
    }
}

/// The p99s of a plaintext and a secure run side by side, as a Markdown
/// table with the secure run's difference.
pub fn compare(plain: &FailoverReport, secure: &FailoverReport) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let _ = writeln!(out, "| p99 | plaintext ms | TLS + auth ms | difference |");
    let _ = writeln!(out, "|---|---|---|---|");
    // Sub-millisecond REST times need three decimals to compare.
    for (what, p, s) in [
        (
            "SIGKILL takeover",
            plain.sigkill_ms.p99,
            secure.sigkill_ms.p99,
        ),
        (
            "graceful handoff",
            plain.graceful_ms.p99,
            secure.graceful_ms.p99,
        ),
        (
            "REST request, kept-alive connection",
            plain.rest_ms.p99,
            secure.rest_ms.p99,
        ),
        (
            "REST request, new connection",
            plain.rest_new_connection_ms.p99,
            secure.rest_new_connection_ms.p99,
        ),
    ] {
        let diff = if p > 0.0 {
            format!("{:+.1} %", (s - p) / p * 100.0)
        } else {
            "-".to_string()
        };
        let digits = if p < 10.0 { 3 } else { 1 };
        let _ = writeln!(out, "| {what} | {p:.digits$} | {s:.digits$} | {diff} |");
    }
    out
}

/// A tiny bounded job: submitting it is the write being timed.
const PROBE_JOB: &str = r#"{"apiVersion":"ferry.dev/v1","kind":"Job","metadata":{"name":"failover-probe"},
"spec":{"parallelism":1,"checkpointing":{"interval":"10s"},"restartStrategy":{"type":"none"},
"source":{"generator":{"partitions":1,"total":1,"fields":{"k":{"type":"key","cardinality":1}}}},
"operators":[],"sink":{"blackhole":{}}}}"#;

/// A long job whose checkpoints show when the new leader drives it.
const LONG_JOB: &str = r#"{"apiVersion":"ferry.dev/v1","kind":"Job","metadata":{"name":"failover-long"},
"spec":{"parallelism":2,"checkpointing":{"interval":"200ms","retained":2},
"source":{"generator":{"partitions":2,"rate":1000,"fields":{"k":{"type":"key","cardinality":10}}}},
"operators":[],"sink":{"blackhole":{}}}}"#;

/// Untimed REST requests before the timed ones (connection setup).
const REST_WARMUP: u32 = 10;

/// Times REST requests against one cluster's leader.
struct RestProbe {
    /// The bench's client: its connection stays open between requests.
    kept: Client,
    /// A client without a connection pool: a TCP connect, and in a secure
    /// run a TLS handshake, per request — what a CLI invocation pays.
    fresh: reqwest::Client,
    list_url: String,
    token: Option<String>,
    /// `GET /v1/jobs/{job}` on the kept connection (`GET /v1/jobs`
    /// without one).
    job: Option<String>,
}

impl RestProbe {
    /// One request on the kept-alive connection, in ms.
    async fn kept_alive(&self) -> anyhow::Result<f64> {
        let t0 = Instant::now();
        let status = match &self.job {
            Some(id) => self.kept.job(id).await.map(|a| a.status),
            None => self.kept.jobs().await.map(|a| a.status),
        };
        match status {
            Ok(ferry_client::StatusCode::OK) => Ok(t0.elapsed().as_secs_f64() * 1e3),
            Ok(s) => bail!("a timed REST request answered {s}"),
            Err(e) => bail!("a timed REST request failed: {e}"),
        }
    }

    /// One `GET /v1/jobs` on a new connection, in ms.
    async fn new_connection(&self) -> anyhow::Result<f64> {
        let t0 = Instant::now();
        let mut req = self.fresh.get(&self.list_url);
        if let Some(t) = &self.token {
            req = req.bearer_auth(t);
        }
        let res = req
            .send()
            .await
            .map_err(|e| anyhow::anyhow!("a timed REST request failed: {e}"))?;
        if !res.status().is_success() {
            bail!("a timed REST request answered {}", res.status());
        }
        res.bytes().await?;
        Ok(t0.elapsed().as_secs_f64() * 1e3)
    }
}

/// `n` kept-alive requests (after [`REST_WARMUP`] untimed ones) and
/// `n / 5` on new connections against each probe's leader, the probes
/// taking turns request by request, so that a slow moment of the machine
/// falls on all alike; per probe, the two lists of times in ms, ascending.
async fn time_rest(probes: &[RestProbe], n: u32) -> anyhow::Result<Vec<(Vec<f64>, Vec<f64>)>> {
    let mut out = vec![(Vec::new(), Vec::new()); probes.len()];
    if n == 0 {
        return Ok(out);
    }
    for i in 0..n + REST_WARMUP {
        for (p, o) in probes.iter().zip(&mut out) {
            let t = p.kept_alive().await?;
            if i >= REST_WARMUP {
                o.0.push(t);
            }
        }
    }
    for _ in 0..n.div_ceil(5) {
        for (p, o) in probes.iter().zip(&mut out) {
            o.1.push(p.new_connection().await?);
        }
    }
    for o in &mut out {
        o.0.sort_by(f64::total_cmp);
        o.1.sort_by(f64::total_cmp);
    }
    Ok(out)
}

/// Bound on one round (election + write).
const ROUND_LIMIT: Duration = Duration::from_secs(30);

/// A JobManager process and the client of its API.
struct Jm {
    proc: Proc,
    api: Client,
}

struct Bench {
    ferry: PathBuf,
    dir: PathBuf,
    nats_url: String,
    ttl: String,
    jms: Vec<Option<Jm>>,
    /// TaskManagers (`port`: their HTTP port).
    tms: Vec<Proc>,
    http: reqwest::Client,
    /// The long job's id.
    long_job: Option<String>,
    /// TLS and credentials of a `--secure` run.
    secure: Option<Secure>,
}

/// A `--secure` run's certificates and secrets, as each process and the
/// bench's own client take them.
struct Secure {
    /// Every process: NATS TLS with a client certificate, and a password.
    all: Vec<(&'static str, String)>,
    /// JobManagers: HTTPS with tokens; gRPC client certificate.
    jm: Vec<(&'static str, String)>,
    /// TaskManagers: gRPC server certificate.
    tm: Vec<(&'static str, String)>,
    ca_pem: Vec<u8>,
    token: String,
}

/// The name every TaskManager certificate of a secure run carries.
const TM_NAME: &str = "taskmanager.bench.ferry";

impl Secure {
    /// Makes a CA and a certificate per link in `dir`, the NATS password
    /// and the API token; the `nats-server` configuration that requires
    /// them is the second value.
    fn create(dir: &std::path::Path) -> anyhow::Result<(Self, String)> {
        use ferry_testkit::pki::Pki;
        let pki = Pki::new(dir, "bench");
        let nats = pki.issue("nats", &["127.0.0.1", "localhost"]);
        let client = pki.issue("nats-client", &["ferry"]);
        let api = pki.issue("api", &["127.0.0.1", "localhost"]);
        let jm = pki.issue("grpc-jobmanager", &["jobmanager.bench.ferry"]);
        let tm = pki.issue("grpc-taskmanager", &[TM_NAME]);
        let secret = |name: &str| -> String {
            format!(
                "{name}-{}-{}",
                std::process::id(),
                uuid::Uuid::new_v4().simple()
            )
        };
        let password = secret("nats");
        let token = secret("token");
        let password_file = dir.join("nats-password");
        std::fs::write(&password_file, &password)?;
        let tokens = dir.join("tokens.yaml");
        std::fs::write(
            &tokens,
            format!("tokens:\n  - {{name: bench, token: {token}, roles: ['*:admin']}}\n"),
        )?;
        let p = |p: &std::path::Path| p.display().to_string();
        let ca = pki.ca_file();
        let nats_conf = format!(
            "tls {{\n  cert_file: \"{}\"\n  key_file: \"{}\"\n  ca_file: \"{}\"\n  verify: true\n}}\nauthorization {{\n  users = [ {{ user: ferry, password: \"{password}\" }} ]\n}}\n",
            p(&nats.cert),
            p(&nats.key),
            p(&ca)
        );
        let grpc = |leaf: &ferry_testkit::pki::Leaf| {
            vec![
                ("FERRY_TLS_GRPC_CERT_FILE", p(&leaf.cert)),
                ("FERRY_TLS_GRPC_KEY_FILE", p(&leaf.key)),
                ("FERRY_TLS_GRPC_CA_FILE", p(&ca)),
                ("FERRY_TLS_GRPC_SERVER_NAME", TM_NAME.to_string()),
            ]
        };
        let mut jm_env = vec![
            ("FERRY_TLS_API_CERT_FILE", p(&api.cert)),
            ("FERRY_TLS_API_KEY_FILE", p(&api.key)),
            ("FERRY_TLS_API_CA_FILE", p(&ca)),
            ("FERRY_API_AUTH_TOKENS_FILE", p(&tokens)),
        ];
        jm_env.extend(grpc(&jm));
        Ok((
            Self {
                all: vec![
                    ("FERRY_NATS_USER", "ferry".to_string()),
                    ("FERRY_NATS_PASSWORD_FILE", p(&password_file)),
                    ("FERRY_NATS_TLS_CA_FILE", p(&ca)),
                    ("FERRY_NATS_TLS_CERT_FILE", p(&client.cert)),
                    ("FERRY_NATS_TLS_KEY_FILE", p(&client.key)),
                ],
                jm: jm_env,
                tm: grpc(&tm),
                ca_pem: std::fs::read(&ca)?,
                token,
            },
            nats_conf,
        ))
    }
}

impl Bench {
    /// Starts `ferry <role>` as `<id>` on the bench's NATS and store plus
    /// `env`, appending its stderr to `<id>.log`.
    fn spawn(&self, role: &str, id: &str, env: &[(&str, String)]) -> anyhow::Result<Child> {
        let mut all = vec![
            ("FERRY_REGION", "bench".to_string()),
            ("FERRY_INSTANCE_ID", id.to_string()),
            ("FERRY_NATS_URLS", self.nats_url.clone()),
            (
                "FERRY_STORAGE",
                format!("file://{}", self.dir.join("store").display()),
            ),
        ];
        if let Some(s) = &self.secure {
            all.extend(s.all.iter().cloned());
            all.extend(match role {
                "jobmanager" => s.jm.iter().cloned(),
                _ => s.tm.iter().cloned(),
            });
        }
        all.extend_from_slice(env);
        spawn_ferry(&self.ferry, role, &all, &self.dir.join(format!("{id}.log")))
    }

    fn start_jm(&mut self, i: usize) -> anyhow::Result<()> {
        let port = try_free_port()?;
        let deadline = format!(
            "{}ms",
            (humantime::parse_duration(&self.ttl)?.as_millis() * 5 / 8).max(200)
        );
        let child = self.spawn(
            "jobmanager",
            &format!("jm-{i}"),
            &[
                ("FERRY_API_LISTEN", format!("127.0.0.1:{port}")),
                ("FERRY_HA_LEASE_TTL", self.ttl.clone()),
                ("FERRY_HA_RENEW_DEADLINE", deadline),
            ],
        )?;
        let api = match &self.secure {
            None => Client::local(&format!("http://127.0.0.1:{port}"))?,
            Some(s) => Client::local(&format!("https://127.0.0.1:{port}"))?
                .with_ca_cert(&s.ca_pem)?
                .with_token(&s.token),
        };
        self.jms[i] = Some(Jm {
            proc: Proc { child, port },
            api,
        });
        Ok(())
    }

    fn start_tm(&mut self, i: usize) -> anyhow::Result<()> {
        let port = try_free_port()?;
        let child = self.spawn(
            "taskmanager",
            &format!("tm-{i}"),
            &[
                ("FERRY_TASKMANAGER_LISTEN", "127.0.0.1:0".to_string()),
                ("FERRY_TASKMANAGER_HTTP_LISTEN", format!("127.0.0.1:{port}")),
            ],
        )?;
        self.tms.push(Proc { child, port });
        Ok(())
    }

    /// The client of live JobManager `i` with a bound on each request.
    fn api(&self, i: usize, timeout: Duration) -> Option<Client> {
        Some(self.jms[i].as_ref()?.api.clone().with_timeout(timeout))
    }

    /// Deployments the TaskManagers started so far.
    async fn deployments_started(&self) -> anyhow::Result<u64> {
        let mut n = 0;
        for t in &self.tms {
            n += tm_metric(&self.http, t.port, "deployments_started")
                .await?
                .context("TaskManager metrics without ferry_tm_deployments_started")?;
        }
        Ok(n)
    }

    /// The long job's newest completed checkpoint and its attempt as the
    /// live JobManager `i` reports them.
    async fn long_checkpoint(&self, i: usize) -> Option<(u64, u64)> {
        let id = self.long_job.as_ref()?;
        let job = self
            .api(i, Duration::from_secs(1))?
            .job(id)
            .await
            .ok()?
            .value;
        Some((job.last_checkpoint?.id, u64::from(job.attempt)))
    }

    /// Waits until a leader other than `except` reports a checkpoint of the
    /// long job newer than `after`.
    async fn next_checkpoint(&self, except: usize, after: u64) -> anyhow::Result<Instant> {
        let start = Instant::now();
        loop {
            for i in (0..self.jms.len()).filter(|i| *i != except) {
                if self.is_leader(i).await
                    && let Some((id, _)) = self.long_checkpoint(i).await
                    && id > after
                {
                    return Ok(Instant::now());
                }
            }
            if start.elapsed() > ROUND_LIMIT {
                bail!(
                    "the long job completed no checkpoint within {ROUND_LIMIT:?} of the leader's loss"
                );
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    async fn health(&self, i: usize) -> Option<ferry_core::api::HaHealth> {
        let c = self.api(i, Duration::from_secs(1))?;
        c.health().await.ok().map(|a| a.value)
    }

    async fn is_leader(&self, i: usize) -> bool {
        self.health(i)
            .await
            .is_some_and(|h| h.role == RoleName::Leader)
    }

    /// Waits until every live JobManager agrees on one leader and all three
    /// are members; returns the leader's index.
    async fn settled(&self) -> anyhow::Result<usize> {
        let start = Instant::now();
        loop {
            let mut leaders = Vec::new();
            let mut members_ok = true;
            for i in 0..self.jms.len() {
                match self.health(i).await {
                    Some(h) => {
                        if h.role == RoleName::Leader {
                            leaders.push(i);
                        }
                        members_ok &= h.healthy_members == 3 + self.tms.len();
                    }
                    None => members_ok = false,
                }
            }
            if leaders.len() == 1 && members_ok {
                return Ok(leaders[0]);
            }
            if start.elapsed() > ROUND_LIMIT {
                bail!("the JobManagers did not settle on one leader within {ROUND_LIMIT:?}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Submits the probe job to the live JobManagers in turn until a leader
    /// other than the stopped one accepts it (a SIGTERMed leader may still
    /// accept writes while it steps down: those do not count); returns when
    /// one did.
    async fn first_accepted_write(&self, except: usize) -> anyhow::Result<Instant> {
        let old = format!("jm-{except}");
        let start = Instant::now();
        loop {
            for i in (0..self.jms.len()).filter(|i| *i != except) {
                let Some(c) = self.api(i, Duration::from_secs(2)) else {
                    continue;
                };
                if let Ok(a) = c.submit(PROBE_JOB.as_bytes().to_vec(), None).await
                    && a.status == ferry_client::StatusCode::CREATED
                    && a.instance().is_some_and(|v| v != old)
                {
                    return Ok(Instant::now());
                }
            }
            if start.elapsed() > ROUND_LIMIT {
                bail!("no JobManager accepted a write within {ROUND_LIMIT:?} of the leader's loss");
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// One leader loss: (time to an accepted write, time to the long job's
    /// next checkpoint).
    async fn round(&mut self, sig: i32) -> anyhow::Result<(Duration, Option<Duration>)> {
        let leader = self.settled().await?;
        let before = match self.long_job {
            Some(_) => Some(
                self.long_checkpoint(leader)
                    .await
                    .map(|c| c.0)
                    .context("the leader does not report the long job's checkpoints")?,
            ),
            None => None,
        };
        let pid = self.jms[leader]
            .as_ref()
            .expect("leader runs")
            .proc
            .child
            .id();
        signal(pid, sig);
        let t0 = Instant::now();
        let accepted = self.first_accepted_write(leader).await?;
        let took = accepted - t0;
        let checkpoint = match before {
            Some(b) => Some(self.next_checkpoint(leader, b).await? - t0),
            None => None,
        };
        if let Some(mut jm) = self.jms[leader].take() {
            let deadline = Instant::now() + Duration::from_secs(15);
            while jm.proc.child.try_wait()?.is_none() && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
        self.start_jm(leader)?;
        Ok((took, checkpoint))
    }

    /// The REST timers of the settled leader.
    async fn rest_probe(&self) -> anyhow::Result<RestProbe> {
        let leader = self.settled().await?;
        let jm = self.jms[leader].as_ref().expect("leader runs");
        let mut b = reqwest::Client::builder()
            .no_proxy()
            .pool_max_idle_per_host(0)
            .timeout(Duration::from_secs(5));
        let scheme = match &self.secure {
            Some(s) => {
                for c in reqwest::Certificate::from_pem_bundle(&s.ca_pem)? {
                    b = b.tls_certs_merge([c]);
                }
                "https"
            }
            None => "http",
        };
        Ok(RestProbe {
            kept: jm.api.clone().with_timeout(Duration::from_secs(5)),
            fresh: b.build()?,
            list_url: format!("{scheme}://127.0.0.1:{}/v1/jobs", jm.proc.port),
            token: self.secure.as_ref().map(|s| s.token.clone()),
            job: self.long_job.clone(),
        })
    }

    async fn submit_long(&self, leader: usize) -> anyhow::Result<String> {
        let c = self
            .api(leader, Duration::from_secs(5))
            .expect("leader runs");
        match c.submit(LONG_JOB.as_bytes().to_vec(), None).await {
            Ok(a) if a.status == ferry_client::StatusCode::CREATED => Ok(a.value.id.to_string()),
            Ok(a) => bail!("submitting the long job failed: {}", a.raw),
            Err(e) => bail!("submitting the long job failed: {e}"),
        }
    }

    async fn cancel(&self, leader: usize, id: &str) -> anyhow::Result<()> {
        let c = self
            .api(leader, Duration::from_secs(10))
            .expect("leader runs");
        if let Err(e) = c.cancel(id, false).await {
            bail!("cancelling the long job failed: {e}");
        }
        Ok(())
    }
}

/// One benchmark cluster: its NATS server, JobManagers, TaskManagers and
/// the long job, and what its leader losses measured.
struct Cluster {
    b: Bench,
    nats: ferry_testkit::nats::NatsProcess,
    tmp: PathBuf,
    secure: bool,
    kills: Vec<f64>,
    handoffs: Vec<f64>,
    kill_cps: Vec<f64>,
    handoff_cps: Vec<f64>,
}

/// What a cluster reports when the long job has been cancelled.
struct Ended {
    long_attempt: Option<u64>,
    started: Option<u64>,
    pids: Vec<u32>,
}

impl Cluster {
    /// Starts every process (in `<work dir>/<sub>` or a temp dir) and the
    /// long job, and waits for its first checkpoint.
    async fn start(
        a: &FailoverOptions,
        secure: bool,
        sub: Option<&str>,
        progress: &mut impl FnMut(Progress),
    ) -> anyhow::Result<Cluster> {
        let base = base_dir(a);
        let tmp = match sub {
            Some(s) => base.join(s),
            None => base,
        };
        std::fs::create_dir_all(&tmp)?;
        let (secure_setup, nats_conf) = match secure {
            true => {
                let (s, conf) = Secure::create(&tmp.join("pki"))?;
                (Some(s), conf)
            }
            false => (None, String::new()),
        };
        let nats = start_nats_with(&tmp.join("nats"), &nats_conf)?;
        let mut b = Bench {
            ferry: a.ferry.clone(),
            dir: tmp.clone(),
            nats_url: format!("nats://127.0.0.1:{}", nats.port),
            ttl: a.lease_ttl.clone(),
            jms: vec![None, None, None],
            tms: Vec::new(),
            http: reqwest::Client::builder().no_proxy().build()?,
            long_job: None,
            secure: secure_setup,
        };
        for i in 0..3 {
            b.start_jm(i)?;
        }
        for i in 0..a.taskmanagers {
            b.start_tm(i)?;
        }
        progress(Progress::Started { secure });
        if a.taskmanagers > 0 {
            let leader = b.settled().await?;
            b.long_job = Some(b.submit_long(leader).await?);
            let start = Instant::now();
            while b.long_checkpoint(leader).await.is_none() {
                if start.elapsed() > ROUND_LIMIT {
                    bail!("the long job completed no checkpoint within {ROUND_LIMIT:?}");
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        Ok(Cluster {
            b,
            nats,
            tmp,
            secure,
            kills: Vec::new(),
            handoffs: Vec::new(),
            kill_cps: Vec::new(),
            handoff_cps: Vec::new(),
        })
    }

    /// Round `n` (from 0): a leader SIGKILL while `n < a.kills`, then a
    /// graceful handoff while `n < a.handoffs` — interleaved, so a slow
    /// phase of the machine hits both kinds alike.
    async fn rounds(
        &mut self,
        n: u32,
        a: &FailoverOptions,
        progress: &mut impl FnMut(Progress),
    ) -> anyhow::Result<()> {
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        for (sig, limit) in [(libc::SIGKILL, a.kills), (libc::SIGTERM, a.handoffs)] {
            if n >= limit {
                continue;
            }
            let handoff = sig == libc::SIGTERM;
            let (t, cp) = self.b.round(sig).await?;
            progress(Progress::Round {
                secure: self.secure,
                handoff,
                n: n + 1,
                write: t,
                checkpoint: cp,
            });
            let (times, cps) = match handoff {
                false => (&mut self.kills, &mut self.kill_cps),
                true => (&mut self.handoffs, &mut self.handoff_cps),
            };
            times.push(ms(t));
            cps.extend(cp.map(ms));
        }
        Ok(())
    }

    /// Reads the long job's attempt and the deployments, and cancels it.
    async fn end_jobs(&mut self) -> anyhow::Result<Ended> {
        let b = &self.b;
        let leader = b.settled().await?;
        // Every leader change adopted the long job's tasks: none was restarted.
        let long_attempt = match &b.long_job {
            Some(_) => Some(b.long_checkpoint(leader).await.map(|c| c.1).unwrap_or(0)),
            None => None,
        };
        // The probe jobs ran on the TaskManagers too (one deployment each).
        let started = if b.tms.is_empty() {
            None
        } else {
            Some(b.deployments_started().await?)
        };
        if let Some(id) = b.long_job.clone() {
            b.cancel(leader, &id).await?;
        }
        let pids = b
            .jms
            .iter()
            .flatten()
            .map(|j| &j.proc)
            .chain(b.tms.iter())
            .map(|p| p.child.id())
            .collect();
        Ok(Ended {
            long_attempt,
            started,
            pids,
        })
    }

    /// Stops every process and builds the report.
    fn report(
        mut self,
        a: &FailoverOptions,
        rest: (Vec<f64>, Vec<f64>),
        ended: Ended,
        idle: Vec<f64>,
    ) -> FailoverReport {
        drop(self.b);
        drop(self.nats);
        if a.work_dir.is_none() {
            let _ = std::fs::remove_dir_all(&self.tmp);
        }
        for v in [
            &mut self.kills,
            &mut self.handoffs,
            &mut self.kill_cps,
            &mut self.handoff_cps,
        ] {
            v.sort_by(f64::total_cmp);
        }
        FailoverReport {
            lease_ttl: a.lease_ttl.clone(),
            secure: self.secure,
            rest_ms: Timings::of(rest.0),
            rest_new_connection_ms: Timings::of(rest.1),
            sigkill_ms: Timings::of(self.kills),
            graceful_ms: Timings::of(self.handoffs),
            next_checkpoint_after_sigkill_ms: Stats::of(&self.kill_cps),
            next_checkpoint_after_graceful_ms: Stats::of(&self.handoff_cps),
            checkpoints_after_sigkill: self.kill_cps.len(),
            checkpoints_after_graceful: self.handoff_cps.len(),
            long_job_attempt: ended.long_attempt,
            deployments_started: ended.started,
            probe_jobs: u64::from(a.kills + a.handoffs),
            idle_cpu_percent_per_process: idle,
            processes: (0..3)
                .map(|i| format!("jm-{i}"))
                .chain((0..a.taskmanagers).map(|i| format!("tm-{i}")))
                .collect(),
        }
    }
}

/// Where a run keeps its files: the work dir, or a temp dir.
fn base_dir(a: &FailoverOptions) -> PathBuf {
    a.work_dir.clone().unwrap_or_else(|| {
        std::env::temp_dir().join(format!("ferry-bench-failover-{}", std::process::id()))
    })
}

/// The CPU each of `pids` used over `seconds` (after 2 s to settle), in %
/// of one core; empty for 0 seconds.
async fn idle_cpu(pids: &[u32], seconds: u64) -> Vec<f64> {
    if seconds == 0 {
        return Vec::new();
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let c0: Vec<f64> = pids
        .iter()
        .map(|p| cpu_seconds(*p).unwrap_or(0.0))
        .collect();
    let t0 = Instant::now();
    tokio::time::sleep(Duration::from_secs(seconds)).await;
    let wall = t0.elapsed().as_secs_f64();
    pids.iter()
        .zip(c0)
        .map(|(p, c)| (cpu_seconds(*p).unwrap_or(c) - c) / wall * 100.0)
        .collect()
}

/// Runs the benchmark on one cluster (`a.secure` or plaintext), telling
/// `progress` what happens.
pub async fn run(
    a: &FailoverOptions,
    mut progress: impl FnMut(Progress),
) -> anyhow::Result<FailoverReport> {
    let mut c = Cluster::start(a, a.secure, None, &mut progress).await?;
    let rest = time_rest(&[c.b.rest_probe().await?], a.rest_requests)
        .await?
        .remove(0);
    for n in 0..a.kills.max(a.handoffs) {
        c.rounds(n, a, &mut progress).await?;
    }
    let ended = c.end_jobs().await?;
    let idle = idle_cpu(&ended.pids, a.idle_seconds).await;
    Ok(c.report(a, rest, ended, idle))
}

/// Runs the benchmark on a plaintext and a secure cluster side by side,
/// both running throughout: their REST requests take turns request by
/// request, and so do their leader losses round by round, so that what
/// the machine does meanwhile falls on both alike. Idle CPU is measured
/// for both at once, after both long jobs ended. Returns (plaintext,
/// secure).
pub async fn run_compared(
    a: &FailoverOptions,
    mut progress: impl FnMut(Progress),
) -> anyhow::Result<(FailoverReport, FailoverReport)> {
    let mut plain = Cluster::start(a, false, Some("plaintext"), &mut progress).await?;
    let mut secure = Cluster::start(a, true, Some("secure"), &mut progress).await?;
    let probes = [plain.b.rest_probe().await?, secure.b.rest_probe().await?];
    let mut rest = time_rest(&probes, a.rest_requests).await?;
    drop(probes);
    for n in 0..a.kills.max(a.handoffs) {
        plain.rounds(n, a, &mut progress).await?;
        secure.rounds(n, a, &mut progress).await?;
    }
    let (ep, es) = (plain.end_jobs().await?, secure.end_jobs().await?);
    let pids: Vec<u32> = ep.pids.iter().chain(&es.pids).copied().collect();
    let mut idle = idle_cpu(&pids, a.idle_seconds).await;
    let idle_secure = idle.split_off(idle.len().min(ep.pids.len()));
    let rest_secure = rest.pop().expect("two probes");
    let rest_plain = rest.pop().expect("two probes");
    let reports = (
        plain.report(a, rest_plain, ep, idle),
        secure.report(a, rest_secure, es, idle_secure),
    );
    if a.work_dir.is_none() {
        let _ = std::fs::remove_dir_all(base_dir(a));
    }
    Ok(reports)
}
