//! The region failover benchmark (`ferry bench region`): cross-region
//! failover and switchover times on loopback. Two regions (`east`,
//! `west`), each with a JobManager and a TaskManager and its own store,
//! share a regional `nats-server` (separate buckets) and a 3-node global
//! cluster (region heartbeats and lease, R3). A long-running job
//! (checkpoints every 200 ms) moves between them:
//! - unplanned: every process of the primary region is SIGKILLed; measured
//!   until the other region holds the lease (promotion) and until the job
//!   has completed a checkpoint there after restoring (recovery time);
//!   the killed processes are restarted and rejoin as a standby region;
//! - planned: `POST /v1/regions/{other}/failover` on the primary; measured
//!   until the job has completed a checkpoint in the target region;
//! - drills: `ferry drill run --scenario region-outage --revert` against the
//!   primary — the primary plays dead, the standby takes over, the jobs fail
//!   back — recording each drill's RTO, RPO (input and output records) and
//!   the fail-back's divergence, with `regions.replication` async or sync.
//!
//! With `--standby cold,hot` the failovers run once per standby mode in
//! the same run (fresh regions each), and `--state-keys` gives the job a
//! large window state: the hot standby (`regions.standby: hot`) against
//! the cold one on the same state. Before each kill the benchmark waits
//! until the standby's store holds the primary's newest checkpoint (and a
//! hot standby holds it loaded), and it measures until the job runs in the
//! standby (tasks started, state restored) as well as until it completed
//! a checkpoint there.
//!
//! With `--rtt`, the regions stand a WAN apart: each has its own regional
//! `nats-server` and its own S3-compatible store ([`crate::s3`]), the
//! global cluster's nodes route to each other through WAN-like links
//! ([`crate::procs::WanCluster`]), and a region reaches the other
//! region's store and global node only through a link with that
//! round-trip time (and `--bandwidth`).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::bail;
use ferry_client::Client;
use ferry_core::api::{DrillReport, DrillRevert, JobState, RegionsStatus};
use ferry_testkit::try_free_port;
use ferry_testkit::wan::{WanLink, WanSettings};
use serde::Serialize;

use crate::Stats;
use crate::procs::{
    Proc, WanCluster, find_nats_server, signal, spawn_ferry, start_cluster, start_nats,
};
use crate::s3::S3Server;

/// What to measure.
#[derive(Clone, Debug)]
pub struct RegionOptions {
    /// The `ferry` executable to start.
    pub ferry: PathBuf,
    /// Unplanned failovers (SIGKILL of the primary region) to measure.
    pub failovers: u32,
    /// Planned switchovers to measure.
    pub switchovers: u32,
    /// Region-outage drills (with fail-back) to run.
    pub drills: u32,
    /// `regions.replication`: `async` or `sync`.
    pub replication: String,
    /// Region timeout (`regions.timeout`).
    pub region_timeout: String,
    /// Round-trip time between the regions (WAN-like links); `None`: the
    /// regions share loopback as they are.
    pub rtt: Option<Duration>,
    /// Bandwidth of those links in bytes per second, each way.
    pub bandwidth: Option<u64>,
    /// Keep logs and stores here (a temp dir, removed at the end, by
    /// default).
    pub work_dir: Option<PathBuf>,
    /// `regions.standby` modes to measure, each in turn in this run.
    pub standby: Vec<String>,
    /// Distinct keys of the job's window (its state size).
    pub state_keys: u64,
    /// Records per second the job reads.
    pub rate: u64,
    /// The job's checkpoint interval.
    pub checkpoint_interval: String,
    /// `regions.healthCheckInterval` of both regions.
    pub health_check_interval: String,
}

impl RegionOptions {
    /// The defaults of `ferry bench region`.
    pub fn new(ferry: PathBuf) -> Self {
        Self {
            ferry,
            failovers: 10,
            switchovers: 10,
            drills: 0,
            replication: "async".into(),
            region_timeout: "5s".into(),
            rtt: None,
            bandwidth: None,
            work_dir: None,
            standby: vec!["cold".into()],
            state_keys: 100,
            rate: 2000,
            checkpoint_interval: "200ms".into(),
            health_check_interval: "1s".into(),
        }
    }
}

/// What happens, as it happens.
#[derive(Clone, Copy, Debug)]
pub enum Progress<'a> {
    /// Both regions are up.
    Started,
    /// The job's state is built: its newest checkpoint's size.
    StateReady { standby: &'a str, bytes: u64 },
    /// Unplanned failover `n` (from 1) to `to`: promoted after, job
    /// running (tasks started) and checkpointing there after.
    Failover {
        n: u32,
        to: &'static str,
        standby: &'a str,
        promoted: Duration,
        running: Duration,
        recovered: Duration,
    },
    /// Planned switchover `n` to `to`: job checkpointing there after.
    Switchover {
        n: u32,
        to: &'static str,
        took: Duration,
    },
    /// Region-outage drill `n` (from 1), failed back afterwards.
    Drill { n: u32, drill: &'a DrillRow },
}

/// One measured event's times, in ms.
#[derive(Serialize, Clone, Debug)]
pub struct Row {
    pub what: &'static str,
    /// `regions.standby` of the run.
    pub standby: String,
    pub runs: usize,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    /// Ascending.
    pub all: Vec<f64>,
}

/// One region-outage drill's result.
#[derive(Serialize, Clone, Debug, Default)]
pub struct DrillRow {
    pub from: String,
    pub to: String,
    pub passed: bool,
    pub rto_ms: Option<u64>,
    /// Input and output records the primary had committed beyond what the
    /// standby restored.
    pub rpo_records: u64,
    pub rpo_records_out: u64,
    /// Output records the fail-back's divergence report lists (`None`:
    /// the fail-back failed).
    pub divergence_records_out: Option<u64>,
    /// Snapshots the divergence report lists.
    pub diverged_checkpoints: Option<usize>,
    pub failures: Vec<String>,
}

/// The benchmark's result.
#[derive(Serialize, Clone, Debug)]
pub struct RegionReport {
    pub region_timeout: String,
    /// Round-trip time between the regions, if links set one.
    pub rtt_ms: Option<f64>,
    pub bandwidth_bytes_per_second: Option<u64>,
    pub replication: String,
    /// Distinct keys of the job's window, and its newest checkpoint's size
    /// when the failovers began (per standby mode measured).
    pub state_keys: u64,
    pub state_bytes: Vec<(String, u64)>,
    pub results: Vec<Row>,
    pub drills: Vec<DrillRow>,
    /// With `sync` replication: what copying into the standby's store
    /// added to a checkpoint on the final primary, p50 and p99 ms (its
    /// `/v1/regions` `sync`).
    pub sync_latency_ms: Option<(f64, f64)>,
}

impl RegionReport {
    /// The results as a Markdown table and notes, as `ferry bench` prints
    /// them (and docs/benchmarks.md records them).
    pub fn markdown(&self) -> String {
        use std::fmt::Write as _;
        let r = self;
        let mut out = String::new();
        if let Some(rtt) = r.rtt_ms {
            let _ = writeln!(
                out,
                "regions {rtt:.0} ms round trip apart{}; regions.timeout {}, regions.replication {}\n",
                r.bandwidth_bytes_per_second
                    .map(|b| format!(", {:.1} MB/s each way", b as f64 / 1e6))
                    .unwrap_or_default(),
                r.region_timeout,
                r.replication
            );
        }
        for (mode, bytes) in &r.state_bytes {
            let _ = writeln!(
                out,
                "job state ({} keys) when the failovers began, standby {mode}: {:.1} MB checkpoint",
                r.state_keys,
                *bytes as f64 / 1e6
            );
        }
        if !r.state_bytes.is_empty() {
            out.push('\n');
        }
        let _ = writeln!(out, "| event | standby | runs | p50 ms | p99 ms | max ms |");
        let _ = writeln!(out, "|---|---|---|---|---|---|");
        for row in r.results.iter().filter(|r| r.runs > 0) {
            let _ = writeln!(
                out,
                "| {} | {} | {} | {:.0} | {:.0} | {:.0} |",
                row.what, row.standby, row.runs, row.p50_ms, row.p99_ms, row.max_ms
            );
        }
        if let Some((p50, p99)) = r.sync_latency_ms {
            let _ = writeln!(
                out,
                "\nsynchronous replication added p50 {p50:.1} ms, p99 {p99:.1} ms to each checkpoint (the copy into the standby's store)"
            );
        }
        if !r.drills.is_empty() {
            let n = r.drills.len();
            let rpo0 = r
                .drills
                .iter()
                .filter(|d| d.rpo_records == 0 && d.rpo_records_out == 0)
                .count();
            let empty = r
                .drills
                .iter()
                .filter(|d| d.diverged_checkpoints == Some(0))
                .count();
            let _ = writeln!(
                out,
                "\nregion-outage drills with regions.replication: {}: RPO 0 (input and output records) in {rpo0} of {n}; fail-back divergence empty in {empty} of {n}; {} passed",
                r.replication,
                r.drills.iter().filter(|d| d.passed).count()
            );
            let _ = writeln!(
                out,
                "\n| drill | from → to | RTO ms | RPO records in | RPO records out | diverged checkpoints | diverged records out |"
            );
            let _ = writeln!(out, "|---|---|---|---|---|---|---|");
            for (i, d) in r.drills.iter().enumerate() {
                let opt = |v: Option<u64>| v.map(|v| v.to_string()).unwrap_or_else(|| "-".into());
                let _ = writeln!(
                    out,
                    "| {} | {} → {} | {} | {} | {} | {} | {} |",
                    i + 1,
                    d.from,
                    d.to,
                    opt(d.rto_ms),
                    d.rpo_records,
                    d.rpo_records_out,
                    opt(d.diverged_checkpoints.map(|c| c as u64)),
                    opt(d.divergence_records_out)
                );
            }
        }
        out
    }
}

/// The benchmark's job: a keyed count over `keys` keys (a window far
/// longer than the run, so its state holds every key seen).
fn job_spec(keys: u64, rate: u64, interval: &str) -> String {
    format!(
        r#"{{"apiVersion":"ferry.dev/v1","kind":"Job","metadata":{{"name":"region-bench"}},
"spec":{{"parallelism":2,"checkpointing":{{"interval":"{interval}","retained":3}},
"source":{{"generator":{{"partitions":2,"rate":{rate},"fields":{{"k":{{"type":"key","cardinality":{keys}}}}}}}}},
"operators":[{{"key_by":"k"}},{{"window":{{"tumbling":"3650d","aggregate":{{"n":"count"}}}}}}],"sink":{{"blackhole":{{}}}}}}}}"#
    )
}

/// Bound on one round (large state restores for a while).
const ROUND_LIMIT: Duration = Duration::from_secs(300);

struct RegionProcs {
    name: &'static str,
    jm: Option<Proc>,
    tm: Option<Proc>,
    api: Option<Client>,
}

/// How region `i` (east 0, west 1) reaches what it uses.
struct Site {
    /// Its regional NATS.
    nats: String,
    /// The global cluster's URLs, its own node first.
    global: String,
    /// Its own store.
    store: String,
    /// Store settings and credentials (environment) of its processes.
    env: Vec<(String, String)>,
}

struct Bench {
    ferry: PathBuf,
    dir: PathBuf,
    sites: [Site; 2],
    timeout: String,
    replication: String,
    standby: String,
    interval: String,
    regions: [RegionProcs; 2],
}

impl Bench {
    fn spawn(
        &self,
        i: usize,
        role: &str,
        env: &[(&str, String)],
    ) -> anyhow::Result<std::process::Child> {
        let region = self.regions[i].name;
        let site = &self.sites[i];
        let id = format!("{role}-{region}");
        let stores = ["east", "west"]
            .iter()
            .zip(&self.sites)
            .map(|(r, s)| format!("{r}={}", s.store))
            .collect::<Vec<_>>()
            .join(",");
        let mut all = vec![
            ("FERRY_REGION", region.to_string()),
            ("FERRY_INSTANCE_ID", id.clone()),
            ("FERRY_NATS_URLS", site.nats.clone()),
            ("FERRY_STORAGE", site.store.clone()),
            ("FERRY_REGIONS_STORES", stores),
            ("FERRY_REGIONS_PRIMARY", "east".to_string()),
            ("FERRY_REGIONS_GLOBAL_URLS", site.global.clone()),
            ("FERRY_REGIONS_GLOBAL_REPLICAS", "3".to_string()),
            ("FERRY_REGIONS_TIMEOUT", self.timeout.clone()),
            ("FERRY_REGIONS_REPLICATION", self.replication.clone()),
            ("FERRY_REGIONS_STANDBY", self.standby.clone()),
            ("FERRY_REGIONS_HEALTH_CHECK_INTERVAL", self.interval.clone()),
        ];
        all.extend(site.env.iter().map(|(k, v)| (k.as_str(), v.clone())));
        all.extend_from_slice(env);
        spawn_ferry(&self.ferry, role, &all, &self.dir.join(format!("{id}.log")))
    }

    fn start(&mut self, i: usize) -> anyhow::Result<()> {
        let port = try_free_port()?;
        let jm = self.spawn(
            i,
            "jobmanager",
            &[("FERRY_API_LISTEN", format!("127.0.0.1:{port}"))],
        )?;
        let tm_port = try_free_port()?;
        let tm = self.spawn(
            i,
            "taskmanager",
            &[
                ("FERRY_TASKMANAGER_LISTEN", "127.0.0.1:0".to_string()),
                (
                    "FERRY_TASKMANAGER_HTTP_LISTEN",
                    format!("127.0.0.1:{tm_port}"),
                ),
            ],
        )?;
        let r = &mut self.regions[i];
        r.jm = Some(Proc { child: jm, port });
        r.tm = Some(Proc {
            child: tm,
            port: tm_port,
        });
        r.api = Some(Client::local(&format!("http://127.0.0.1:{port}"))?);
        Ok(())
    }

    fn kill(&mut self, i: usize) {
        let r = &mut self.regions[i];
        r.api = None;
        for p in [r.jm.take(), r.tm.take()].into_iter().flatten() {
            signal(p.child.id(), libc::SIGKILL);
            drop(p);
        }
    }

    /// The client of region `i`'s JobManager, if it runs, with a bound on
    /// each request.
    fn api(&self, i: usize, timeout: Duration) -> Option<Client> {
        Some(self.regions[i].api.clone()?.with_timeout(timeout))
    }

    async fn regions(&self, i: usize) -> Option<RegionsStatus> {
        let c = self.api(i, Duration::from_secs(2))?;
        c.regions().await.ok().map(|a| a.value)
    }

    /// Index of the region the lease names, once both agree.
    async fn primary(&self) -> anyhow::Result<usize> {
        let start = Instant::now();
        loop {
            let a = self.regions(0).await;
            let b = self.regions(1).await;
            let healthy =
                |v: &RegionsStatus| v.regions.len() == 2 && v.regions.iter().all(|x| x.healthy);
            if let (Some(a), Some(b)) = (a, b)
                && a.primary.is_some()
                && a.primary == b.primary
                && a.epoch.0 > 0
                && a.epoch == b.epoch
                && healthy(&a)
                && healthy(&b)
            {
                return Ok(if a.primary.as_deref() == Some("east") {
                    0
                } else {
                    1
                });
            }
            if start.elapsed() > ROUND_LIMIT {
                bail!("the regions did not agree on a primary within {ROUND_LIMIT:?}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Runs `ferry drill run --scenario region-outage --revert` from
    /// primary `p` to `other`: its report as a row.
    async fn drill(&self, p: usize, other: usize) -> anyhow::Result<DrillRow> {
        let url = format!(
            "http://127.0.0.1:{}",
            self.regions[p].jm.as_ref().expect("jm").port
        );
        let mut cmd = tokio::process::Command::new(&self.ferry);
        cmd.args([
            "drill",
            "run",
            "--scenario",
            "region-outage",
            "--target",
            self.regions[other].name,
            "--revert",
            // Recorded, not judged: the benchmark reports what happened.
            "--rto",
            "1h",
            "--rpo",
            "1h",
            "--timeout",
            "90s",
            "-o",
            "json",
            "--url",
            &url,
        ])
        .kill_on_drop(true);
        let out = tokio::time::timeout(Duration::from_secs(300), cmd.output())
            .await
            .map_err(|_| anyhow::anyhow!("the drill took over 300 s"))??;
        let report: DrillReport = serde_json::from_slice(&out.stdout).map_err(|e| {
            anyhow::anyhow!(
                "the drill printed no report ({e}): {}",
                String::from_utf8_lossy(&out.stderr)
            )
        })?;
        let divergence = match &report.revert {
            Some(DrillRevert::Done(r)) => r.divergence.as_ref(),
            _ => None,
        };
        Ok(DrillRow {
            from: report.from.clone(),
            to: report.to.clone(),
            passed: report.passed,
            rto_ms: report.rto_ms,
            rpo_records: report.rpo_records,
            rpo_records_out: report.rpo_records_out,
            divergence_records_out: divergence.map(|d| d.records_out),
            diverged_checkpoints: divergence
                .map(|d| d.jobs.iter().map(|j| j.checkpoints.len()).sum()),
            failures: report.failures.clone(),
        })
    }

    /// Waits until a checkpoint of `job` in region `p` covers `records`
    /// input records (bounded by the rate it reads them at).
    async fn state_built(&self, p: usize, job: &str, records: u64) -> anyhow::Result<()> {
        let start = Instant::now();
        loop {
            let done = match self.api(p, Duration::from_secs(5)) {
                Some(c) => c
                    .job(job)
                    .await
                    .ok()
                    .and_then(|a| a.value.last_checkpoint)
                    .is_some_and(|c| c.records_in >= records),
                None => false,
            };
            if done {
                return Ok(());
            }
            if start.elapsed() > ROUND_LIMIT * 4 {
                bail!(
                    "the job did not read {records} records within {:?}",
                    ROUND_LIMIT * 4
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Waits until the standby `other` has the job's checkpoint that was
    /// newest when the wait began (or a newer one) in its store (and, hot,
    /// holds it loaded): its size. (A checkpoint newer still may be on its
    /// way: with checkpoints faster than a copy over a WAN, the standby
    /// never holds the very newest.)
    async fn standby_ready(&self, p: usize, other: usize, job: &str) -> anyhow::Result<u64> {
        let start = Instant::now();
        let mut first: Option<u64> = None;
        loop {
            let newest = match self.api(p, Duration::from_secs(5)) {
                Some(c) => c.job(job).await.ok().and_then(|a| a.value.last_checkpoint),
                None => None,
            };
            let want = *first.get_or_insert_with(|| newest.as_ref().map_or(u64::MAX, |c| c.id));
            let replicated = self
                .regions(p)
                .await
                .and_then(|v| v.standbys.first()?.jobs.get(job)?.replicated_checkpoint);
            let held = self.regions(other).await.and_then(|v| {
                let me = self.regions[other].name;
                let r = v
                    .regions
                    .into_iter()
                    .find(|x| x.region == me)?
                    .heartbeat?
                    .resources?;
                r.held.get(job).copied()
            });
            if first == Some(u64::MAX) {
                // No checkpoint seen yet: wait for one.
                first = None;
            } else if let Some(c) = &newest
                && replicated.is_some_and(|r| r >= want)
                && (self.standby != "hot" || held.is_some_and(|h| h >= want))
            {
                return Ok(c.size_bytes);
            }
            if start.elapsed() > ROUND_LIMIT {
                bail!(
                    "the standby did not get checkpoint {want} within {ROUND_LIMIT:?} (primary at {:?}, replicated {replicated:?}, held {held:?})",
                    newest.map(|c| c.id)
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits until region `i` runs `job` on its own TaskManager (tasks
    /// started, state restored) — with a checkpoint completed after
    /// `after`, if given.
    async fn running_in(
        &self,
        i: usize,
        job: &str,
        after: Option<chrono::DateTime<chrono::Utc>>,
    ) -> anyhow::Result<Instant> {
        let start = Instant::now();
        let tm = format!("taskmanager-{}", self.regions[i].name);
        loop {
            if let Some(c) = self.api(i, Duration::from_secs(2))
                && let Ok(a) = c.job(job).await
                && a.value.state == JobState::Running
                && a.value.taskmanager.as_deref() == Some(tm.as_str())
                && after.is_none_or(|after| {
                    a.value
                        .last_checkpoint
                        .is_some_and(|c| c.completed_at > after)
                })
            {
                return Ok(Instant::now());
            }
            if start.elapsed() > ROUND_LIMIT {
                bail!(
                    "the job did not run in {} within {ROUND_LIMIT:?}",
                    self.regions[i].name
                );
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

/// Runs the benchmark, telling `progress` what happens.
pub async fn run(
    a: &RegionOptions,
    mut progress: impl FnMut(Progress),
) -> anyhow::Result<RegionReport> {
    // The JobManagers refuse a region timeout of two heartbeats or less:
    // say so before starting them.
    let timeout = humantime::parse_duration(&a.region_timeout)
        .map_err(|e| anyhow::anyhow!("--region-timeout {}: {e}", a.region_timeout))?;
    let interval = humantime::parse_duration(&a.health_check_interval)
        .map_err(|e| anyhow::anyhow!("--health-check-interval {}: {e}", a.health_check_interval))?;
    if timeout <= interval * 2 {
        bail!(
            "--region-timeout {} must be above twice the regions' heartbeat interval ({})",
            a.region_timeout,
            a.health_check_interval
        );
    }
    if a.standby.is_empty() {
        bail!("no standby mode to measure");
    }
    let tmp = a.work_dir.clone().unwrap_or_else(|| {
        std::env::temp_dir().join(format!("ferry-bench-region-{}", std::process::id()))
    });
    let mut report = RegionReport {
        region_timeout: a.region_timeout.clone(),
        rtt_ms: a.rtt.map(|r| r.as_secs_f64() * 1e3),
        bandwidth_bytes_per_second: a.rtt.and(a.bandwidth),
        replication: a.replication.clone(),
        state_keys: a.state_keys,
        state_bytes: Vec::new(),
        results: Vec::new(),
        drills: Vec::new(),
        sync_latency_ms: None,
    };
    for mode in &a.standby {
        let dir = tmp.join(format!("standby-{mode}"));
        std::fs::create_dir_all(&dir)?;
        let r = run_mode(a, mode, &dir, &mut progress).await;
        if a.work_dir.is_none() {
            let _ = std::fs::remove_dir_all(&dir);
        }
        let r = r?;
        report.results.extend(r.results);
        report.drills.extend(r.drills);
        report.state_bytes.extend(r.state_bytes);
        report.sync_latency_ms = report.sync_latency_ms.or(r.sync_latency_ms);
    }
    if a.work_dir.is_none() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    Ok(report)
}

/// One standby mode's part of the benchmark, in fresh regions under `tmp`.
async fn run_mode(
    a: &RegionOptions,
    standby: &str,
    tmp: &std::path::Path,
    progress: &mut impl FnMut(Progress),
) -> anyhow::Result<RegionReport> {
    // What each region reaches, and everything that must live as long as
    // the benchmark (servers, links).
    let mut keep: Vec<Box<dyn std::any::Any>> = Vec::new();
    let sites = match a.rtt {
        None => {
            // One regional NATS (separate buckets) and file stores.
            let nats = start_nats(&tmp.join("nats"))?;
            let nats_url = format!("nats://127.0.0.1:{}", nats.port);
            // The region lease and heartbeats on a 3-node global cluster
            // (R3), as in production: one node per region (east: the
            // first, west: the second; the third is a witness).
            let global = start_cluster(&find_nats_server()?, &tmp.join("global"), 3)?;
            let urls: Vec<String> = global.iter().map(|n| n.url()).collect();
            let from = |first: usize| {
                (0..urls.len())
                    .map(|k| urls[(first + k) % urls.len()].clone())
                    .collect::<Vec<_>>()
                    .join(",")
            };
            let site = |i: usize, r: &str| Site {
                nats: nats_url.clone(),
                global: from(i),
                store: format!("file://{}", tmp.join(format!("store-{r}")).display()),
                env: Vec::new(),
            };
            let sites = [site(0, "east"), site(1, "west")];
            keep.push(Box::new(nats));
            keep.push(Box::new(global));
            sites
        }
        Some(rtt) => {
            let link = WanSettings {
                rtt,
                bandwidth: a.bandwidth,
            };
            let global =
                WanCluster::start(&find_nats_server()?, &tmp.join("global"), 3, link).await?;
            let mut s3 = Vec::new();
            for r in ["east", "west"] {
                let server = S3Server::start(&tmp.join(format!("s3-{r}")))?;
                server.create_bucket(r).await?;
                let far = WanLink::start(
                    std::net::SocketAddr::from(([127, 0, 0, 1], server.port)),
                    link,
                )
                .await?;
                s3.push((server, far));
            }
            let mut sites = Vec::new();
            for (i, r) in ["east", "west"].into_iter().enumerate() {
                let nats = start_nats(&tmp.join(format!("nats-{r}")))?;
                let (other, prefix) = if i == 0 {
                    ("west", "WEST_")
                } else {
                    ("east", "EAST_")
                };
                // Its own store directly; the other's through the link,
                // with the other's credentials (regions.storeCredentials).
                let mut env = S3Server::env("", &s3[i].0.endpoint());
                env.extend(S3Server::env(prefix, &s3[1 - i].1.http_url()));
                env.push((
                    "FERRY_REGIONS_STORE_CREDENTIALS".into(),
                    format!("{other}=env:{prefix}"),
                ));
                sites.push(Site {
                    nats: format!("nats://127.0.0.1:{}", nats.port),
                    global: global.urls_from(i),
                    store: format!("s3://{r}/ferry"),
                    env,
                });
                keep.push(Box::new(nats));
            }
            keep.push(Box::new(global));
            keep.push(Box::new(s3));
            let [east, west]: [Site; 2] =
                sites.try_into().map_err(|_| anyhow::anyhow!("two sites"))?;
            [east, west]
        }
    };
    let region = |name| RegionProcs {
        name,
        jm: None,
        tm: None,
        api: None,
    };
    let mut b = Bench {
        ferry: a.ferry.clone(),
        dir: tmp.to_path_buf(),
        sites,
        timeout: a.region_timeout.clone(),
        replication: a.replication.clone(),
        standby: standby.to_string(),
        interval: a.health_check_interval.clone(),
        regions: [region("east"), region("west")],
    };
    b.start(0)?;
    b.start(1)?;
    progress(Progress::Started);
    let p = b.primary().await?;
    let job = loop {
        let c = b.regions[p].api.clone().expect("jm");
        let spec = job_spec(a.state_keys, a.rate, &a.checkpoint_interval);
        if let Ok(a) = c.submit(spec.into_bytes(), None).await
            && a.status == ferry_client::StatusCode::CREATED
        {
            break a.value.id.to_string();
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    b.running_in(
        p,
        &job,
        Some(chrono::Utc::now() - chrono::Duration::hours(1)),
    )
    .await?;
    if a.failovers > 0 {
        // Large state: let the window see nearly every key first (keys are
        // drawn at random: three draws per key reach 95 %).
        b.state_built(p, &job, a.state_keys.saturating_mul(3))
            .await?;
    }
    let (mut promote, mut recover, mut planned) = (Vec::new(), Vec::new(), Vec::new());
    let (mut started, mut state_bytes) = (Vec::new(), Vec::new());
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    for n in 0..a.failovers.max(a.switchovers) {
        if n < a.failovers {
            let p = b.primary().await?;
            let other = 1 - p;
            // The standby holds the newest checkpoint (loaded, if hot).
            b.running_in(p, &job, Some(chrono::Utc::now())).await?;
            let bytes = b.standby_ready(p, other, &job).await?;
            if n == 0 {
                progress(Progress::StateReady { standby, bytes });
                state_bytes.push((standby.to_string(), bytes));
            }
            b.kill(p);
            let (t0, wall0) = (Instant::now(), chrono::Utc::now());
            let start = Instant::now();
            loop {
                if b.regions(other)
                    .await
                    .is_some_and(|v| v.primary.as_deref() == Some(b.regions[other].name))
                {
                    break;
                }
                if start.elapsed() > ROUND_LIMIT {
                    bail!("no promotion within {ROUND_LIMIT:?}");
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            let promoted = t0.elapsed();
            let running = b.running_in(other, &job, None).await? - t0;
            let ran = b.running_in(other, &job, Some(wall0)).await? - t0;
            progress(Progress::Failover {
                n: n + 1,
                to: b.regions[other].name,
                standby,
                promoted,
                running,
                recovered: ran,
            });
            promote.push(ms(promoted));
            started.push(ms(running));
            recover.push(ms(ran));
            b.start(p)?;
        }
        if n < a.switchovers {
            let p = b.primary().await?;
            let other = 1 - p;
            b.running_in(
                p,
                &job,
                Some(chrono::Utc::now() - chrono::Duration::hours(1)),
            )
            .await?;
            let c = b.api(p, ROUND_LIMIT).expect("jm");
            let (t0, wall0) = (Instant::now(), chrono::Utc::now());
            if let Err(e) = c.failover(b.regions[other].name, false, false).await {
                bail!("switchover failed: {e}");
            }
            let ran = b.running_in(other, &job, Some(wall0)).await? - t0;
            progress(Progress::Switchover {
                n: n + 1,
                to: b.regions[other].name,
                took: ran,
            });
            planned.push(ms(ran));
        }
    }
    let mut drills = Vec::new();
    let mut drill_rto = Vec::new();
    for n in 0..a.drills {
        let p = b.primary().await?;
        let other = 1 - p;
        b.running_in(p, &job, Some(chrono::Utc::now())).await?;
        let d = b.drill(p, other).await?;
        progress(Progress::Drill {
            n: n + 1,
            drill: &d,
        });
        if let Some(ms) = d.rto_ms {
            drill_rto.push(ms as f64);
        }
        drills.push(d);
        // Fail-back made `p` the primary again; its job must run there.
        b.running_in(p, &job, Some(chrono::Utc::now())).await?;
    }
    let sync_latency_ms = match b.primary().await {
        Ok(p) => b
            .regions(p)
            .await
            .and_then(|v| v.sync)
            .and_then(|s| Some((s.latency_p50_ms?, s.latency_p99_ms?))),
        Err(_) => None,
    };
    drop(b);
    drop(keep);
    let row = |what, mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        let s = Stats::of(&v);
        Row {
            what,
            standby: standby.to_string(),
            runs: v.len(),
            p50_ms: s.p50,
            p99_ms: s.p99,
            max_ms: s.max,
            all: v,
        }
    };
    Ok(RegionReport {
        region_timeout: a.region_timeout.clone(),
        rtt_ms: a.rtt.map(|r| r.as_secs_f64() * 1e3),
        bandwidth_bytes_per_second: a.rtt.and(a.bandwidth),
        replication: a.replication.clone(),
        state_keys: a.state_keys,
        state_bytes,
        drills,
        sync_latency_ms,
        results: vec![
            row(
                "SIGKILL of the primary region → standby holds the lease",
                promote,
            ),
            row(
                "SIGKILL of the primary region → job running in the standby (tasks started, state restored: RTO)",
                started,
            ),
            row(
                "SIGKILL of the primary region → job checkpointing in the standby",
                recover,
            ),
            row(
                "planned switchover → job checkpointing in the target",
                planned,
            ),
            row(
                "region-outage drill → job committing output in the standby (drill RTO)",
                drill_rto,
            ),
        ],
    })
}
