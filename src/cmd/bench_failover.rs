//! `ferry bench failover`: leader failover times of `ferry jobmanager`
//! processes on loopback. Starts a `nats-server -js` (from PATH, `.venv`, or
//! `FERRY_NATS_SERVER`), three JobManagers and (by default) two
//! TaskManagers running a long job, then repeatedly SIGKILLs (or SIGTERMs,
//! for graceful handoffs) the leader and measures the time until a job
//! submission — a write only a leader accepts — succeeds again, and until
//! the long job's next checkpoint completes under the new leader (its tasks
//! keep running: the number of deployments started must stay 1). The
//! stopped instance is restarted before the next round. Ends with the idle
//! CPU of every process over a quiet period (the long job cancelled).

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use ferry_testkit::try_free_port;

use super::bench::{percentile, start_nats};

#[derive(clap::Args, Debug)]
pub struct FailoverArgs {
    /// Leader SIGKILLs to measure.
    #[arg(long, default_value_t = 20)]
    pub kills: u32,
    /// Graceful handoffs (SIGTERM of the leader) to measure.
    #[arg(long, default_value_t = 20)]
    pub handoffs: u32,
    /// Seconds of idle CPU measurement at the end (0 skips it).
    #[arg(long, default_value_t = 20)]
    pub idle_seconds: u64,
    /// TaskManagers to start (0: none; then no long job runs).
    #[arg(long, default_value_t = 2)]
    pub taskmanagers: usize,
    /// Leader lease ttl of the JobManagers.
    #[arg(long, default_value = "800ms")]
    pub lease_ttl: String,
    /// Print results as JSON.
    #[arg(long)]
    pub json: bool,
    /// Keep the JobManagers' logs and store in this directory (a temp dir,
    /// removed at the end, by default).
    #[arg(long)]
    pub work_dir: Option<PathBuf>,
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

/// Bound on one round (election + write).
const ROUND_LIMIT: Duration = Duration::from_secs(30);

pub(super) struct Proc {
    pub(super) child: Child,
    pub(super) port: u16,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = stat.rsplit_once(')')?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Some(ticks / hz)
}

struct Bench {
    dir: PathBuf,
    nats_url: String,
    ttl: String,
    jms: Vec<Option<Proc>>,
    /// TaskManagers (`port`: their HTTP port).
    tms: Vec<Proc>,
    http: reqwest::Client,
    /// The long job's id.
    long_job: Option<String>,
}

impl Bench {
    /// Starts `ferry <role>` as `<id>` on the bench's NATS and store plus
    /// `env`, appending its stderr to `<id>.log`.
    fn spawn(&self, role: &str, id: &str, env: &[(&str, String)]) -> anyhow::Result<Child> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join(format!("{id}.log")))?;
        let mut cmd = Command::new(std::env::current_exe()?);
        cmd.arg(role)
            .env("FERRY_REGION", "bench")
            .env("FERRY_INSTANCE_ID", id)
            .env("FERRY_NATS_URLS", &self.nats_url)
            .env(
                "FERRY_STORAGE",
                format!("file://{}", self.dir.join("store").display()),
            )
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log);
        for (k, v) in env {
            cmd.env(k, v);
        }
        cmd.spawn()
            .with_context(|| format!("starting ferry {role}"))
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
        self.jms[i] = Some(Proc { child, port });
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

    /// Deployments the TaskManagers started so far.
    async fn deployments_started(&self) -> anyhow::Result<u64> {
        let mut n = 0;
        for t in &self.tms {
            let text = self
                .http
                .get(format!("http://127.0.0.1:{}/metrics", t.port))
                .timeout(Duration::from_secs(2))
                .send()
                .await?
                .text()
                .await?;
            n += text
                .lines()
                .find_map(|l| l.strip_prefix("ferry_tm_deployments_started "))
                .and_then(|v| v.trim().parse::<u64>().ok())
                .context("TaskManager metrics without ferry_tm_deployments_started")?;
        }
        Ok(n)
    }

    /// The long job's newest completed checkpoint as the live JobManager
    /// `i` reports it.
    async fn long_checkpoint(&self, i: usize) -> Option<(u64, u64)> {
        let p = self.jms[i].as_ref()?;
        let id = self.long_job.as_ref()?;
        let v: serde_json::Value = self
            .http
            .get(format!("http://127.0.0.1:{}/v1/jobs/{id}", p.port))
            .timeout(Duration::from_secs(1))
            .send()
            .await
            .ok()?
            .json()
            .await
            .ok()?;
        Some((v["last_checkpoint"]["id"].as_u64()?, v["attempt"].as_u64()?))
    }

    /// Waits until a leader other than `except` reports a checkpoint of the
    /// long job newer than `after`.
    async fn next_checkpoint(&self, except: usize, after: u64) -> anyhow::Result<Instant> {
        let start = Instant::now();
        loop {
            for i in (0..self.jms.len()).filter(|i| *i != except) {
                if self.health(i).await.is_some_and(|h| h["role"] == "leader")
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

    async fn health(&self, i: usize) -> Option<serde_json::Value> {
        let p = self.jms[i].as_ref()?;
        let r = self
            .http
            .get(format!("http://127.0.0.1:{}/health/ha", p.port))
            .timeout(Duration::from_secs(1))
            .send()
            .await
            .ok()?;
        r.json().await.ok()
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
                        if h["role"] == "leader" {
                            leaders.push(i);
                        }
                        members_ok &=
                            h["healthy_members"].as_u64() == Some(3 + self.tms.len() as u64);
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
            for (i, p) in self.jms.iter().enumerate() {
                let Some(p) = p.as_ref().filter(|_| i != except) else {
                    continue;
                };
                let r = self
                    .http
                    .post(format!("http://127.0.0.1:{}/v1/jobs", p.port))
                    .body(PROBE_JOB)
                    .timeout(Duration::from_secs(2))
                    .send()
                    .await;
                if let Ok(r) = r
                    && r.status() == reqwest::StatusCode::CREATED
                    && r.headers()
                        .get("x-ferry-instance")
                        .is_some_and(|v| v.as_bytes() != old.as_bytes())
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
        let pid = self.jms[leader].as_ref().expect("leader runs").child.id();
        // SAFETY: kill(2) of our own child's PID.
        unsafe { libc::kill(pid as i32, sig) };
        let t0 = Instant::now();
        let accepted = self.first_accepted_write(leader).await?;
        let took = accepted - t0;
        let checkpoint = match before {
            Some(b) => Some(self.next_checkpoint(leader, b).await? - t0),
            None => None,
        };
        if let Some(mut p) = self.jms[leader].take() {
            let deadline = Instant::now() + Duration::from_secs(15);
            while p.child.try_wait()?.is_none() && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
        self.start_jm(leader)?;
        Ok((took, checkpoint))
    }
}

impl Bench {
    async fn submit_long(&self, leader: usize) -> anyhow::Result<String> {
        let p = self.jms[leader].as_ref().expect("leader runs");
        let r = self
            .http
            .post(format!("http://127.0.0.1:{}/v1/jobs", p.port))
            .body(LONG_JOB)
            .timeout(Duration::from_secs(5))
            .send()
            .await?;
        if r.status() != reqwest::StatusCode::CREATED {
            bail!("submitting the long job failed: {}", r.text().await?);
        }
        let v: serde_json::Value = r.json().await?;
        v["id"]
            .as_str()
            .map(str::to_string)
            .context("submit answer without an id")
    }

    async fn cancel(&self, leader: usize, id: &str) -> anyhow::Result<()> {
        let p = self.jms[leader].as_ref().expect("leader runs");
        let r = self
            .http
            .delete(format!("http://127.0.0.1:{}/v1/jobs/{id}", p.port))
            .timeout(Duration::from_secs(10))
            .send()
            .await?;
        if !r.status().is_success() {
            bail!("cancelling the long job failed: {}", r.text().await?);
        }
        Ok(())
    }
}

pub fn run(a: FailoverArgs) -> anyhow::Result<std::process::ExitCode> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(run_async(a))
}

async fn run_async(a: FailoverArgs) -> anyhow::Result<std::process::ExitCode> {
    let tmp = a.work_dir.clone().unwrap_or_else(|| {
        std::env::temp_dir().join(format!("ferry-bench-failover-{}", std::process::id()))
    });
    std::fs::create_dir_all(&tmp)?;
    let nats = start_nats(&tmp.join("nats"))?;
    let nats_port = nats.port;
    let mut b = Bench {
        dir: tmp.clone(),
        nats_url: format!("nats://127.0.0.1:{nats_port}"),
        ttl: a.lease_ttl.clone(),
        jms: vec![None, None, None],
        tms: Vec::new(),
        http: reqwest::Client::builder().no_proxy().build()?,
        long_job: None,
    };
    for i in 0..3 {
        b.start_jm(i)?;
    }
    for i in 0..a.taskmanagers {
        b.start_tm(i)?;
    }
    eprintln!(
        "failover benchmark: 3 JobManagers, {} TaskManagers, nats-server on loopback, lease ttl {}; {} SIGKILLs, {} graceful handoffs",
        a.taskmanagers, a.lease_ttl, a.kills, a.handoffs
    );
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
    let mut kills = Vec::new();
    let mut handoffs = Vec::new();
    let mut kill_cps = Vec::new();
    let mut handoff_cps = Vec::new();
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let line = |what: &str, n: u32, t: Duration, cp: Option<Duration>| {
        eprintln!(
            "  {what} {:>2}: new leader accepted a write after {:>6.1} ms{}",
            n + 1,
            ms(t),
            cp.map(|c| format!(
                "; the running job's next checkpoint after {:>6.1} ms",
                ms(c)
            ))
            .unwrap_or_default()
        );
    };
    // Interleaved, so a slow phase of the machine hits both kinds alike.
    for n in 0..a.kills.max(a.handoffs) {
        if n < a.kills {
            let (t, cp) = b.round(libc::SIGKILL).await?;
            line("kill", n, t, cp);
            kills.push(ms(t));
            kill_cps.extend(cp.map(ms));
        }
        if n < a.handoffs {
            let (t, cp) = b.round(libc::SIGTERM).await?;
            line("handoff", n, t, cp);
            handoffs.push(ms(t));
            handoff_cps.extend(cp.map(ms));
        }
    }
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
    let mut idle = Vec::new();
    if a.idle_seconds > 0 {
        // Settle (the jobs have ended), then measure.
        tokio::time::sleep(Duration::from_secs(2)).await;
        let pids: Vec<u32> = b
            .jms
            .iter()
            .flatten()
            .chain(b.tms.iter())
            .map(|p| p.child.id())
            .collect();
        let c0: Vec<f64> = pids
            .iter()
            .map(|p| cpu_seconds(*p).unwrap_or(0.0))
            .collect();
        let t0 = Instant::now();
        tokio::time::sleep(Duration::from_secs(a.idle_seconds)).await;
        let wall = t0.elapsed().as_secs_f64();
        for (p, c) in pids.iter().zip(c0) {
            idle.push((cpu_seconds(*p).unwrap_or(c) - c) / wall * 100.0);
        }
    }
    drop(b);
    drop(nats);
    if a.work_dir.is_none() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    kills.sort_by(f64::total_cmp);
    handoffs.sort_by(f64::total_cmp);
    let stats = |v: &[f64]| {
        (
            percentile(v, 50.0),
            percentile(v, 99.0),
            v.last().copied().unwrap_or(f64::NAN),
        )
    };
    let (k50, k99, kmax) = stats(&kills);
    let (h50, h99, hmax) = stats(&handoffs);
    kill_cps.sort_by(f64::total_cmp);
    handoff_cps.sort_by(f64::total_cmp);
    let (kc50, kc99, kcmax) = stats(&kill_cps);
    let (hc50, hc99, hcmax) = stats(&handoff_cps);
    let rounds = u64::from(a.kills + a.handoffs);
    let processes: Vec<String> = (0..3)
        .map(|i| format!("jm-{i}"))
        .chain((0..a.taskmanagers).map(|i| format!("tm-{i}")))
        .collect();
    if a.json {
        println!(
            "{}",
            serde_json::json!({
                "lease_ttl": a.lease_ttl,
                "sigkill_ms": {"p50": k50, "p99": k99, "max": kmax, "all": kills},
                "graceful_ms": {"p50": h50, "p99": h99, "max": hmax, "all": handoffs},
                "next_checkpoint_after_sigkill_ms": {"p50": kc50, "p99": kc99, "max": kcmax},
                "next_checkpoint_after_graceful_ms": {"p50": hc50, "p99": hc99, "max": hcmax},
                "long_job_attempt": long_attempt,
                "deployments_started": started,
                "probe_jobs": rounds,
                "idle_cpu_percent_per_process": idle,
                "processes": processes,
            })
        );
    } else {
        println!("| leader loss | runs | p50 ms | p99 ms | max ms |");
        println!("|---|---|---|---|---|");
        println!(
            "| SIGKILL | {} | {k50:.0} | {k99:.0} | {kmax:.0} |",
            kills.len()
        );
        println!(
            "| graceful (SIGTERM) | {} | {h50:.0} | {h99:.0} | {hmax:.0} |",
            handoffs.len()
        );
        if !kill_cps.is_empty() {
            println!(
                "| running job's next checkpoint after SIGKILL | {} | {kc50:.0} | {kc99:.0} | {kcmax:.0} |",
                kill_cps.len()
            );
            println!(
                "| running job's next checkpoint after graceful | {} | {hc50:.0} | {hc99:.0} | {hcmax:.0} |",
                handoff_cps.len()
            );
        }
        if let (Some(att), Some(st)) = (long_attempt, started) {
            println!(
                "running job: attempt {att} after {rounds} leader changes (1 = never restarted); deployments started on the TaskManagers: {st} (the running job's one, plus one per probe job: one per round, and any a stopping leader still accepted)"
            );
        }
        if !idle.is_empty() {
            let (jm, tm) = idle.split_at(3.min(idle.len()));
            let fmt = |v: &[f64]| {
                v.iter()
                    .map(|c| format!("{c:.2}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            println!(
                "idle CPU over {} s, % of a core: JobManagers {}; TaskManagers {}",
                a.idle_seconds,
                fmt(jm),
                if tm.is_empty() { "-".into() } else { fmt(tm) }
            );
        }
    }
    Ok(std::process::ExitCode::SUCCESS)
}
