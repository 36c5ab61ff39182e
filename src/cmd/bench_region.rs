//! `ferry bench region`: cross-region failover and switchover times on
//! loopback. Two regions (`east`, `west`), each with a JobManager and a
//! TaskManager and its own store, share a regional `nats-server` (separate
//! buckets) and a 3-node global cluster (region heartbeats and lease, R3). A long-running
//! job (checkpoints every 200 ms) moves between them:
//! - unplanned: every process of the primary region is SIGKILLed; measured
//!   until the other region holds the lease (promotion) and until the job
//!   has completed a checkpoint there after restoring (recovery time);
//!   the killed processes are restarted and rejoin as a standby region;
//! - planned: `POST /v1/regions/{other}/failover` on the primary; measured
//!   until the job has completed a checkpoint in the target region.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use ferry_testkit::try_free_port;
use serde_json::Value;

use super::bench::{percentile, start_nats};
use super::bench_failover::Proc;

#[derive(clap::Args, Debug)]
pub struct RegionArgs {
    /// Unplanned failovers (SIGKILL of the primary region) to measure.
    #[arg(long, default_value_t = 10)]
    pub failovers: u32,
    /// Planned switchovers to measure.
    #[arg(long, default_value_t = 10)]
    pub switchovers: u32,
    /// Region timeout (`regions.timeout`).
    #[arg(long, default_value = "5s")]
    pub region_timeout: String,
    /// Print results as JSON.
    #[arg(long)]
    pub json: bool,
    /// Keep logs and stores here (a temp dir, removed at the end, by default).
    #[arg(long)]
    pub work_dir: Option<std::path::PathBuf>,
}

const JOB: &str = r#"{"apiVersion":"ferry.dev/v1","kind":"Job","metadata":{"name":"region-bench"},
"spec":{"parallelism":2,"checkpointing":{"interval":"200ms","retained":3},
"source":{"generator":{"partitions":2,"rate":2000,"fields":{"k":{"type":"key","cardinality":100}}}},
"operators":[{"key_by":"k"},{"window":{"tumbling":"1m","aggregate":{"n":"count"}}}],"sink":{"blackhole":{}}}}"#;

/// Bound on one round.
const ROUND_LIMIT: Duration = Duration::from_secs(60);

struct RegionProcs {
    name: &'static str,
    jm: Option<Proc>,
    tm: Option<Proc>,
}

struct Bench {
    dir: std::path::PathBuf,
    nats: String,
    /// The global cluster's client URLs.
    global: Vec<String>,
    timeout: String,
    regions: [RegionProcs; 2],
    http: reqwest::Client,
}

impl Bench {
    /// The global cluster's URLs, the region's own node first (east: the
    /// first node, west: the second; the third is a witness).
    fn global_urls(&self, region: &str) -> String {
        let first = usize::from(region != "east");
        (0..self.global.len())
            .map(|i| self.global[(first + i) % self.global.len()].clone())
            .collect::<Vec<_>>()
            .join(",")
    }

    fn spawn(
        &self,
        region: &str,
        role: &str,
        env: &[(&str, String)],
    ) -> anyhow::Result<std::process::Child> {
        let id = format!("{role}-{region}");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join(format!("{id}.log")))?;
        let stores = ["east", "west"]
            .iter()
            .map(|r| {
                format!(
                    "{r}=file://{}",
                    self.dir.join(format!("store-{r}")).display()
                )
            })
            .collect::<Vec<_>>()
            .join(",");
        let mut cmd = Command::new(std::env::current_exe()?);
        cmd.arg(role)
            .env("FERRY_REGION", region)
            .env("FERRY_INSTANCE_ID", &id)
            .env("FERRY_NATS_URLS", &self.nats)
            .env(
                "FERRY_STORAGE",
                format!(
                    "file://{}",
                    self.dir.join(format!("store-{region}")).display()
                ),
            )
            .env("FERRY_REGIONS_STORES", stores)
            .env("FERRY_REGIONS_PRIMARY", "east")
            .env("FERRY_REGIONS_GLOBAL_URLS", self.global_urls(region))
            .env("FERRY_REGIONS_GLOBAL_REPLICAS", "3")
            .env("FERRY_REGIONS_TIMEOUT", &self.timeout)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log);
        for (k, v) in env {
            cmd.env(k, v);
        }
        cmd.spawn()
            .with_context(|| format!("starting ferry {role}"))
    }

    fn start(&mut self, i: usize) -> anyhow::Result<()> {
        let name = self.regions[i].name;
        let port = try_free_port()?;
        let jm = self.spawn(
            name,
            "jobmanager",
            &[("FERRY_API_LISTEN", format!("127.0.0.1:{port}"))],
        )?;
        let tm_port = try_free_port()?;
        let tm = self.spawn(
            name,
            "taskmanager",
            &[
                ("FERRY_TASKMANAGER_LISTEN", "127.0.0.1:0".to_string()),
                (
                    "FERRY_TASKMANAGER_HTTP_LISTEN",
                    format!("127.0.0.1:{tm_port}"),
                ),
            ],
        )?;
        self.regions[i].jm = Some(Proc { child: jm, port });
        self.regions[i].tm = Some(Proc {
            child: tm,
            port: tm_port,
        });
        Ok(())
    }

    fn kill(&mut self, i: usize) {
        for p in [self.regions[i].jm.take(), self.regions[i].tm.take()]
            .into_iter()
            .flatten()
        {
            // SAFETY: kill(2) of our own child's PID.
            unsafe { libc::kill(p.child.id() as i32, libc::SIGKILL) };
            drop(p);
        }
    }

    async fn get(&self, i: usize, path: &str) -> Option<Value> {
        let p = self.regions[i].jm.as_ref()?;
        self.http
            .get(format!("http://127.0.0.1:{}{path}", p.port))
            .timeout(Duration::from_secs(2))
            .send()
            .await
            .ok()?
            .json()
            .await
            .ok()
    }

    /// Index of the region the lease names, once both agree.
    async fn primary(&self) -> anyhow::Result<usize> {
        let start = Instant::now();
        loop {
            let a = self.get(0, "/v1/regions").await;
            let b = self.get(1, "/v1/regions").await;
            let healthy = |v: &Value| {
                v["regions"]
                    .as_array()
                    .is_some_and(|r| r.len() == 2 && r.iter().all(|x| x["healthy"] == true))
            };
            if let (Some(a), Some(b)) = (a, b)
                && a["primary"] == b["primary"]
                && a["epoch"].as_u64().unwrap_or(0) > 0
                && a["epoch"] == b["epoch"]
                && healthy(&a)
                && healthy(&b)
            {
                return Ok(if a["primary"] == "east" { 0 } else { 1 });
            }
            if start.elapsed() > ROUND_LIMIT {
                bail!("the regions did not agree on a primary within {ROUND_LIMIT:?}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits until region `i` runs `job` on its own TaskManager with a
    /// checkpoint completed after `after`.
    async fn running_in(
        &self,
        i: usize,
        job: &str,
        after: chrono::DateTime<chrono::Utc>,
    ) -> anyhow::Result<Instant> {
        let start = Instant::now();
        let tm = format!("taskmanager-{}", self.regions[i].name);
        loop {
            if let Some(v) = self.get(i, &format!("/v1/jobs/{job}")).await
                && v["state"] == "RUNNING"
                && v["taskmanager"] == tm.as_str()
                && v["last_checkpoint"]["completed_at"]
                    .as_str()
                    .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
                    .is_some_and(|t| t > after)
            {
                return Ok(Instant::now());
            }
            if start.elapsed() > ROUND_LIMIT {
                bail!(
                    "the job did not run in {} within {ROUND_LIMIT:?}",
                    self.regions[i].name
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

pub fn run(a: RegionArgs) -> anyhow::Result<std::process::ExitCode> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(run_async(a))
}

async fn run_async(a: RegionArgs) -> anyhow::Result<std::process::ExitCode> {
    let tmp = a.work_dir.clone().unwrap_or_else(|| {
        std::env::temp_dir().join(format!("ferry-bench-region-{}", std::process::id()))
    });
    std::fs::create_dir_all(&tmp)?;
    let nats = start_nats(&tmp.join("nats"))?;
    // The region lease and heartbeats on a 3-node global cluster (R3), as
    // in production: one node per region.
    let global = super::sandbox::start_cluster(
        &super::sandbox::find_nats_server()?,
        &tmp.join("global"),
        3,
    )?;
    let global_urls = global.iter().map(|n| n.url()).collect();
    let mut b = Bench {
        dir: tmp.clone(),
        nats: format!("nats://127.0.0.1:{}", nats.port),
        global: global_urls,
        timeout: a.region_timeout.clone(),
        regions: [
            RegionProcs {
                name: "east",
                jm: None,
                tm: None,
            },
            RegionProcs {
                name: "west",
                jm: None,
                tm: None,
            },
        ],
        http: reqwest::Client::builder().no_proxy().build()?,
    };
    b.start(0)?;
    b.start(1)?;
    eprintln!(
        "region benchmark: 2 regions (JM + TM each), region timeout {}; {} failovers, {} switchovers",
        a.region_timeout, a.failovers, a.switchovers
    );
    let p = b.primary().await?;
    let port = b.regions[p].jm.as_ref().expect("jm").port;
    let job = loop {
        let r = b
            .http
            .post(format!("http://127.0.0.1:{port}/v1/jobs"))
            .body(JOB)
            .send()
            .await?;
        if r.status() == reqwest::StatusCode::CREATED {
            let v: Value = r.json().await?;
            break v["id"]
                .as_str()
                .context("submit answer without id")?
                .to_string();
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    b.running_in(p, &job, chrono::Utc::now() - chrono::Duration::hours(1))
        .await?;
    let (mut promote, mut recover, mut planned) = (Vec::new(), Vec::new(), Vec::new());
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    for n in 0..a.failovers.max(a.switchovers) {
        if n < a.failovers {
            let p = b.primary().await?;
            let other = 1 - p;
            // Give replication a moment to hold a recent checkpoint.
            b.running_in(p, &job, chrono::Utc::now()).await?;
            b.kill(p);
            let (t0, wall0) = (Instant::now(), chrono::Utc::now());
            let start = Instant::now();
            loop {
                if b.get(other, "/v1/regions")
                    .await
                    .is_some_and(|v| v["primary"] == b.regions[other].name)
                {
                    break;
                }
                if start.elapsed() > ROUND_LIMIT {
                    bail!("no promotion within {ROUND_LIMIT:?}");
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            let promoted = t0.elapsed();
            let ran = b.running_in(other, &job, wall0).await? - t0;
            eprintln!(
                "  failover {:>2}: {} promoted after {:>7.1} ms; job checkpointing there after {:>7.1} ms",
                n + 1,
                b.regions[other].name,
                ms(promoted),
                ms(ran)
            );
            promote.push(ms(promoted));
            recover.push(ms(ran));
            b.start(p)?;
        }
        if n < a.switchovers {
            let p = b.primary().await?;
            let other = 1 - p;
            b.running_in(p, &job, chrono::Utc::now() - chrono::Duration::hours(1))
                .await?;
            let port = b.regions[p].jm.as_ref().expect("jm").port;
            let (t0, wall0) = (Instant::now(), chrono::Utc::now());
            let r = b
                .http
                .post(format!(
                    "http://127.0.0.1:{port}/v1/regions/{}/failover",
                    b.regions[other].name
                ))
                .timeout(ROUND_LIMIT)
                .send()
                .await?;
            if !r.status().is_success() {
                bail!("switchover failed: {}", r.text().await?);
            }
            let ran = b.running_in(other, &job, wall0).await? - t0;
            eprintln!(
                "  switchover {:>2}: job checkpointing in {} after {:>7.1} ms",
                n + 1,
                b.regions[other].name,
                ms(ran)
            );
            planned.push(ms(ran));
        }
    }
    drop(b);
    drop(nats);
    drop(global);
    if a.work_dir.is_none() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    for v in [&mut promote, &mut recover, &mut planned] {
        v.sort_by(f64::total_cmp);
    }
    let stats = |v: &[f64]| {
        (
            percentile(v, 50.0),
            percentile(v, 99.0),
            v.last().copied().unwrap_or(f64::NAN),
        )
    };
    let rows = [
        (
            "SIGKILL of the primary region → standby holds the lease",
            &promote,
        ),
        (
            "SIGKILL of the primary region → job checkpointing in the standby (RTO)",
            &recover,
        ),
        (
            "planned switchover → job checkpointing in the target",
            &planned,
        ),
    ];
    if a.json {
        let out: Vec<Value> = rows
            .iter()
            .map(|(what, v)| {
                let (p50, p99, max) = stats(v);
                serde_json::json!({"what": what, "runs": v.len(), "p50_ms": p50, "p99_ms": p99, "max_ms": max, "all": v})
            })
            .collect();
        println!(
            "{}",
            serde_json::json!({"region_timeout": a.region_timeout, "results": out})
        );
    } else {
        println!("| event | runs | p50 ms | p99 ms | max ms |");
        println!("|---|---|---|---|---|");
        for (what, v) in rows {
            let (p50, p99, max) = stats(v);
            println!("| {what} | {} | {p50:.0} | {p99:.0} | {max:.0} |", v.len());
        }
    }
    Ok(std::process::ExitCode::SUCCESS)
}
