//! `ferry chaos`: a seeded campaign of random faults against a whole
//! two-region Ferry on loopback ([`world`]), each round audited end to end
//! against an independent model ([`audit`], [`workload`]).
//!
//! A round draws 1–3 faults from the catalog ([`faults`]), injects them
//! within its first seconds, holds them, heals everything (restarts what
//! was killed, continues what was stopped, heals links and the store),
//! waits for the system to settle — both regions agree on a primary, every
//! job runs there and has completed a checkpoint since the heal — and then
//! audits. Detection is the time from the first fault until anything
//! visible changed (a leader, the primary, a job's state or deployment);
//! recovery the time from the heal until settled.

pub mod audit;
pub mod faults;
pub mod store_proxy;
pub mod workload;
pub mod world;

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use chrono::{DateTime, Utc};
use ferry_core::api::JobState;
use ferry_core::storage::StorageLocation;
use futures::StreamExt;
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::Stats;
use audit::{Commit, check_commits, check_sequence, check_windows, read_part_files};
use faults::{Fault, Hit, JmPick, LinkKind, Plan, Schedule, Side, StoreFault};
use store_proxy::StoreMode;
use workload::{expected_windows, must_have_fired};
use world::{REGIONS, World};

/// How long the system may take to settle after a heal.
const SETTLE_LIMIT: Duration = Duration::from_secs(180);
/// How long the output may take to catch up with the model after settling.
const CATCH_UP_LIMIT: Duration = Duration::from_secs(90);
/// How long the sandbox may take to come up and run the jobs.
const START_LIMIT: Duration = Duration::from_secs(120);
/// Bound on a switchover's or fail-back's answer.
const REQUEST_LIMIT: Duration = Duration::from_secs(90);
/// Event time by which a window must be older than the newest record to
/// count as "must have fired" (the records in flight through two jobs).
const FIRED_MARGIN_MS: i64 = 2_000;

/// What to run.
#[derive(Clone, Debug)]
pub struct ChaosOptions {
    /// The `ferry` executable to start.
    pub ferry: PathBuf,
    pub rounds: u32,
    pub seed: u64,
    /// Where everything lives (a fresh temp dir by default).
    pub dir: Option<PathBuf>,
    /// Keep the directory (logs, stores, output) after a passing campaign.
    pub keep: bool,
    /// Input records per second.
    pub rate: u64,
    /// Only these fault kinds ([`faults::Fault::slug`]); all by default.
    pub only: Option<Vec<String>>,
}

/// One round as reported.
#[derive(Serialize, Clone, Debug)]
pub struct RoundReport {
    pub round: u32,
    /// When the round began (to find it in the processes' logs).
    pub started_at: DateTime<Utc>,
    /// The faults, as injected ("…: <what happened>").
    pub faults: Vec<String>,
    pub kinds: Vec<&'static str>,
    /// First fault until something visible changed (`None`: nothing did).
    pub detection_ms: Option<u64>,
    /// Heal until settled.
    pub recovery_ms: u64,
    /// Deployments added over all jobs in this round.
    pub deployments: u32,
    /// The primary region after the round.
    pub primary: String,
    pub violations: Vec<String>,
}

/// Recovery per fault kind.
#[derive(Serialize, Clone, Debug)]
pub struct KindRow {
    pub kind: &'static str,
    pub injected: usize,
    pub detection_p50_ms: Option<f64>,
    pub recovery_p50_ms: f64,
    pub recovery_p99_ms: f64,
    pub recovery_max_ms: f64,
}

/// The campaign's result.
#[derive(Serialize, Clone, Debug)]
pub struct ChaosReport {
    pub seed: u64,
    pub rounds_planned: u32,
    pub rounds: Vec<RoundReport>,
    pub duration_s: f64,
    pub by_kind: Vec<KindRow>,
    /// Input records produced; window results and generated records seen
    /// in the final audit.
    pub produced: u64,
    pub windows_checked: usize,
    pub generated_checked: u64,
    pub passed: bool,
    /// Where the logs are (kept when it failed or with `--keep`).
    pub dir: Option<String>,
}

impl ChaosReport {
    /// The summary as Markdown (as docs/reliability.md records it).
    pub fn markdown(&self) -> String {
        use std::fmt::Write as _;
        let mut out = String::new();
        let _ = writeln!(
            out,
            "seed {} · {} of {} rounds · {:.0} s · {} input records, {} window results and {} generated records audited · {}",
            self.seed,
            self.rounds.len(),
            self.rounds_planned,
            self.duration_s,
            self.produced,
            self.windows_checked,
            self.generated_checked,
            if self.passed { "PASSED" } else { "FAILED" }
        );
        let _ = writeln!(out);
        let _ = writeln!(
            out,
            "| fault kind | injected | detection p50 s | recovery p50 s | recovery p99 s | max s |"
        );
        let _ = writeln!(out, "|---|---|---|---|---|---|");
        for k in &self.by_kind {
            let _ = writeln!(
                out,
                "| {} | {} | {} | {:.1} | {:.1} | {:.1} |",
                k.kind,
                k.injected,
                k.detection_p50_ms
                    .map(|d| format!("{:.1}", d / 1e3))
                    .unwrap_or_else(|| "—".into()),
                k.recovery_p50_ms / 1e3,
                k.recovery_p99_ms / 1e3,
                k.recovery_max_ms / 1e3
            );
        }
        out
    }
}

/// What happens, as it happens.
pub enum Progress<'a> {
    /// The world is up; the jobs run.
    Started { dir: &'a std::path::Path },
    /// A round begins with this plan.
    Planned { round: u32, plan: &'a Plan },
    /// A round ended.
    Round(&'a RoundReport),
}

/// What the audit remembers between rounds.
#[derive(Default)]
struct Ledger {
    /// (store, job) → checkpoint or savepoint number → commit.
    commits: BTreeMap<(String, String), BTreeMap<(u8, u64), Commit>>,
    generated: u64,
    windows: usize,
}

/// What is visible from outside, compared to notice a fault's effect.
#[derive(PartialEq, Eq, Debug, Clone)]
struct Visible {
    primary: Option<String>,
    leaders: Vec<Option<usize>>,
    jobs: Vec<Option<(JobState, u32, Option<String>)>>,
}

struct Campaign {
    world: World,
    jobs: Vec<(&'static str, String)>,
    produced: Arc<AtomicU64>,
    js: async_nats::jetstream::Context,
    ledger: Ledger,
    /// Regional NATS nodes killed (region, node) and whether to wipe them.
    dead_nats: Vec<(usize, usize, bool)>,
    dead_global: Vec<usize>,
    ballast: Option<PathBuf>,
    /// TaskManagers drained this round: (region, id), cancelled at heal.
    drains: Vec<(usize, String)>,
    /// This round's JobManagers hit: (region, id, whether it led then).
    /// Faults harmless one by one can together use up the region fence.
    hits: Vec<(usize, String, bool)>,
    /// The answer of a switchover or fail-back just requested: it runs
    /// beside the round (it takes as long as the faults let it), so the
    /// round's other faults and its heal keep their schedule.
    requested: Option<tokio::task::JoinHandle<String>>,
    s3: StorageLocation,
    west: StorageLocation,
}

/// Runs the campaign, telling `progress` what happens.
pub async fn run(
    o: &ChaosOptions,
    mut progress: impl FnMut(Progress<'_>),
) -> anyhow::Result<ChaosReport> {
    if o.rounds == 0 {
        bail!("--rounds must be at least 1");
    }
    check_only(o.only.as_deref())?;
    if !(1..=5_000).contains(&o.rate) {
        bail!("--rate must be between 1 and 5000 records per second");
    }
    let started = Instant::now();
    let dir = o.dir.clone().unwrap_or_else(|| {
        std::env::temp_dir().join(format!("ferry-chaos-{}-{}", o.seed, std::process::id()))
    });
    let world = World::start(&o.ferry, &dir).await?;
    let dir = world.dir.clone();
    let client = async_nats::connect(world.data.url())
        .await
        .context("connecting to the data nats-server")?;
    let js = async_nats::jetstream::new(client);
    workload::create_streams(&js).await?;
    let produced = Arc::new(AtomicU64::new(0));
    let stop = CancellationToken::new();
    let producer = tokio::spawn(workload::produce(
        js.clone(),
        o.rate,
        produced.clone(),
        stop.clone(),
    ));

    let s3_store = object_store::aws::AmazonS3Builder::new()
        .with_endpoint(world.moto_url())
        .with_allow_http(true)
        .with_bucket_name(World::bucket())
        .with_access_key_id("chaos")
        .with_secret_access_key("chaos")
        .with_region("us-east-1")
        .build()?;
    let s3 = StorageLocation::with_store(&world.regions[0].store_url, Arc::new(s3_store))?;
    let west = StorageLocation::open(&world.regions[1].store_url)?;
    let mut c = Campaign {
        world,
        jobs: Vec::new(),
        produced: produced.clone(),
        js,
        ledger: Ledger::default(),
        dead_nats: Vec::new(),
        dead_global: Vec::new(),
        ballast: None,
        drains: Vec::new(),
        requested: None,
        hits: Vec::new(),
        s3,
        west,
    };
    let result = c.campaign(o, &mut progress).await;
    stop.cancel();
    let _ = producer.await;
    let (rounds, final_audit) = result?;
    let passed =
        rounds.iter().all(|r| r.violations.is_empty()) && rounds.len() == o.rounds as usize;
    let by_kind = by_kind(&rounds);
    let keep = !passed || o.keep;
    let report = ChaosReport {
        seed: o.seed,
        rounds_planned: o.rounds,
        rounds,
        duration_s: started.elapsed().as_secs_f64(),
        by_kind,
        produced: produced.load(Ordering::SeqCst),
        windows_checked: final_audit.0,
        generated_checked: final_audit.1,
        passed,
        dir: keep.then(|| dir.display().to_string()),
    };
    drop(c);
    if !keep {
        let _ = std::fs::remove_dir_all(&dir);
    }
    Ok(report)
}

/// Checks `--faults`: every kind must be of the catalog.
pub fn check_only(only: Option<&[String]>) -> anyhow::Result<()> {
    if let Some(only) = only {
        let known = faults::all_slugs();
        let unknown: Vec<&String> = only.iter().filter(|k| !known.contains(k)).collect();
        if !unknown.is_empty() || only.is_empty() {
            bail!(
                "unknown fault kinds {unknown:?} in --faults; the catalog: {}",
                known.join(", ")
            );
        }
    }
    Ok(())
}

/// The plans of the first `rounds` rounds of a seed (what `--dry-run`
/// prints).
pub fn plans(seed: u64, only: Option<Vec<String>>, rounds: u32) -> Vec<Plan> {
    let mut s = Schedule::new(seed, only);
    (0..rounds).map(|_| s.next_round()).collect()
}

/// Recovery (and detection) percentiles per fault kind.
fn by_kind(rounds: &[RoundReport]) -> Vec<KindRow> {
    let mut kinds: BTreeMap<&'static str, (Vec<f64>, Vec<f64>, usize)> = BTreeMap::new();
    for r in rounds {
        for k in &r.kinds {
            let e = kinds.entry(k).or_default();
            e.2 += 1;
            e.0.push(r.recovery_ms as f64);
            if let Some(d) = r.detection_ms {
                e.1.push(d as f64);
            }
        }
    }
    kinds
        .into_iter()
        .map(|(kind, (mut rec, mut det, injected))| {
            rec.sort_by(f64::total_cmp);
            det.sort_by(f64::total_cmp);
            let s = Stats::of(&rec);
            KindRow {
                kind,
                injected,
                detection_p50_ms: (!det.is_empty()).then(|| Stats::of(&det).p50),
                recovery_p50_ms: s.p50,
                recovery_p99_ms: s.p99,
                recovery_max_ms: s.max,
            }
        })
        .collect()
}

impl Campaign {
    async fn campaign(
        &mut self,
        o: &ChaosOptions,
        progress: &mut impl FnMut(Progress<'_>),
    ) -> anyhow::Result<(Vec<RoundReport>, (usize, u64))> {
        self.submit().await?;
        progress(Progress::Started {
            dir: &self.world.dir,
        });
        let mut schedule = Schedule::new(o.seed, o.only.clone());
        let mut rounds = Vec::new();
        for n in 1..=o.rounds {
            let plan = schedule.next_round();
            progress(Progress::Planned {
                round: n,
                plan: &plan,
            });
            let report = self.round(n, &plan).await;
            let failed = !report.violations.is_empty();
            progress(Progress::Round(&report));
            rounds.push(report);
            if failed {
                break; // later rounds would only repeat the damage
            }
        }
        Ok((rounds, (self.ledger.windows, self.ledger.generated)))
    }

    /// Submits the workload's jobs to the home region and waits until each
    /// runs with a checkpoint.
    async fn submit(&mut self) -> anyhow::Result<()> {
        let start = Instant::now();
        // Every TaskManager first: jobs placed while one is still starting
        // land on the others, and a campaign's drains and exchange faults
        // would then find a different world on a slower machine.
        loop {
            if let Some(c) = self.world.api(0).await
                && let Ok(a) = c.cluster().await
                && a.value.taskmanagers.len() >= world::TASKMANAGERS
            {
                break;
            }
            if start.elapsed() > START_LIMIT {
                bail!(
                    "east's leader did not see its {} TaskManagers within {START_LIMIT:?}; logs are in {}",
                    world::TASKMANAGERS,
                    self.world.dir.display()
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let nats = self.world.data.url();
        for (name, spec) in workload::specs(&nats, &self.world.out) {
            let id = loop {
                if let Some(c) = self.world.api(0).await
                    && let Ok(a) = c.submit(spec.clone().into_bytes(), None).await
                    && a.status == ferry_client::StatusCode::CREATED
                {
                    break a.value.id.to_string();
                }
                if start.elapsed() > START_LIMIT {
                    bail!(
                        "east's JobManagers did not accept {name} within {START_LIMIT:?}; logs are in {}",
                        self.world.dir.display()
                    );
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            };
            self.jobs.push((name, id));
        }
        let since = Utc::now() - chrono::Duration::hours(1);
        self.settle(since, START_LIMIT).await.map(|_| ())
    }

    /// The primary region as the first region whose JobManagers answer
    /// names it (the other region is asked only if needed).
    async fn named_primary(&self) -> Option<String> {
        for r in 0..REGIONS.len() {
            if let Some(v) = self.world.regions_view(r).await
                && v.primary.is_some()
            {
                return v.primary;
            }
        }
        None
    }

    /// What is visible now.
    async fn visible(&self) -> Visible {
        let primary = self.named_primary().await;
        let mut leaders = Vec::new();
        for r in 0..REGIONS.len() {
            leaders.push(self.world.leader(r).await);
        }
        let p = primary
            .as_deref()
            .and_then(|p| REGIONS.iter().position(|r| *r == p))
            .unwrap_or(0);
        let mut jobs = Vec::new();
        let api = self.world.api(p).await;
        for (_, id) in &self.jobs {
            let j = match &api {
                Some(c) => c
                    .job(id)
                    .await
                    .ok()
                    .map(|a| (a.value.state, a.value.attempt, a.value.taskmanager.clone())),
                None => None,
            };
            jobs.push(j);
        }
        Visible {
            primary,
            leaders,
            jobs,
        }
    }

    /// Index of the primary region, if the regions agree on one.
    async fn primary(&self) -> Option<usize> {
        let a = self.world.regions_view(0).await?;
        let b = self.world.regions_view(1).await?;
        let healthy = |v: &ferry_core::api::RegionsStatus| {
            v.regions.len() == REGIONS.len() && v.regions.iter().all(|x| x.healthy)
        };
        if a.primary.is_some()
            && a.primary == b.primary
            && a.epoch == b.epoch
            && healthy(&a)
            && healthy(&b)
        {
            REGIONS
                .iter()
                .position(|r| Some(*r) == a.primary.as_deref())
        } else {
            None
        }
    }

    /// Waits until the regions agree on a primary and every job runs
    /// there with a checkpoint completed after `since`; returns the
    /// primary's index and each job's deployment count.
    async fn settle(
        &self,
        since: DateTime<Utc>,
        limit: Duration,
    ) -> anyhow::Result<(usize, Vec<u32>)> {
        let start = Instant::now();
        let mut last = String::from("no JobManager answered");
        while start.elapsed() < limit {
            if let Some(p) = self.primary().await
                && let Some(c) = self.world.api(p).await
            {
                let mut attempts = Vec::new();
                let mut all = true;
                for (name, id) in &self.jobs {
                    match c.job(id).await {
                        Ok(a) => {
                            let j = a.value;
                            let here = j
                                .taskmanager
                                .as_deref()
                                .is_some_and(|t| t.starts_with(&format!("tm-{}-", REGIONS[p])));
                            let fresh = j
                                .last_checkpoint
                                .as_ref()
                                .is_some_and(|cp| cp.completed_at > since);
                            let finished = j.state == JobState::Finished;
                            if !(finished || (j.state == JobState::Running && here && fresh)) {
                                all = false;
                                last = format!(
                                    "{name} in {}: {:?} on {:?}, newest checkpoint {:?}, failure {:?}",
                                    REGIONS[p],
                                    j.state,
                                    j.taskmanager,
                                    j.last_checkpoint.as_ref().map(|c| c.completed_at),
                                    j.failure
                                );
                                break;
                            }
                            attempts.push(j.attempt);
                        }
                        Err(e) => {
                            all = false;
                            last = format!("{name}: {e}");
                            break;
                        }
                    }
                }
                if all {
                    return Ok((p, attempts));
                }
            } else {
                last = "the regions do not agree on a healthy primary".into();
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        bail!("not settled within {limit:?}: {last}")
    }

    async fn round(&mut self, n: u32, plan: &Plan) -> RoundReport {
        let mut report = RoundReport {
            round: n,
            started_at: Utc::now(),
            faults: Vec::new(),
            kinds: plan.faults.iter().map(|(_, f)| f.kind()).collect(),
            detection_ms: None,
            recovery_ms: 0,
            deployments: 0,
            primary: String::new(),
            violations: Vec::new(),
        };
        // Before: settled (the previous round made sure), with a baseline.
        let before = match self
            .settle(Utc::now() - chrono::Duration::hours(1), SETTLE_LIMIT)
            .await
        {
            Ok((_, attempts)) => attempts,
            Err(e) => {
                report.violations.push(format!("before the round: {e:#}"));
                return report;
            }
        };
        let baseline = self.visible().await;
        let t0 = Instant::now();
        let round_start = Utc::now();
        let mut pending = plan.faults.iter().peekable();
        let mut detected: Option<Duration> = None;
        let mut may_redeploy = false;
        let mut answers = Vec::new();
        self.hits.clear();
        while t0.elapsed() < plan.hold || pending.peek().is_some() {
            while let Some((at, f)) = pending.peek() {
                if t0.elapsed() < *at {
                    break;
                }
                let (what, hits_primary) = self.inject(f).await;
                may_redeploy |= f.may_redeploy(hits_primary);
                report.faults.push(format!("{f}: {what}"));
                if let Some(answer) = self.requested.take() {
                    answers.push((report.faults.len() - 1, f.to_string(), answer));
                }
                pending.next();
            }
            if detected.is_none() && self.visible().await != baseline {
                detected = Some(t0.elapsed());
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        report.detection_ms = detected.map(|d| d.as_millis() as u64);
        // A JobManager picked as a standby may have won the lease between
        // the pick and the signal (or just before): its log says so.
        for (r, id, led) in &mut self.hits {
            if !*led
                && let Some(m) = self.world.regions[*r]
                    .members
                    .iter()
                    .position(|m| &m.id == id)
                && let Ok(log) = std::fs::read_to_string(self.world.log_of(*r, m))
            {
                *led = became_leader_since(&log, id, round_start);
            }
        }
        // Together: every JobManager of a region, or two of its leaders
        // one after the other, may stop its tasks: the region fence lasts
        // half of regions.timeout from the last confirmation, which one
        // in-region failover fits in but two in a row need not.
        for r in 0..REGIONS.len() {
            let distinct = |leaders: bool| {
                let mut ids: Vec<&String> = self
                    .hits
                    .iter()
                    .filter(|(h, _, led)| *h == r && (!leaders || *led))
                    .map(|(_, id, _)| id)
                    .collect();
                ids.sort();
                ids.dedup();
                ids.len()
            };
            if distinct(false) >= world::JOBMANAGERS || distinct(true) >= 2 {
                may_redeploy = true;
            }
        }
        let healed_at = Utc::now();
        let heal_start = Instant::now();
        let healed = self.heal().await;
        // Requests still under way finish against a healed world.
        for (i, f, answer) in answers {
            let said = match tokio::time::timeout(REQUEST_LIMIT, answer).await {
                Ok(Ok(said)) => said,
                Ok(Err(e)) => format!("the request failed: {e}"),
                Err(_) => format!("no answer within {REQUEST_LIMIT:?}"),
            };
            report.faults[i] = format!("{f}: {said}");
        }
        if let Err(e) = healed {
            report.violations.push(format!("healing failed: {e:#}"));
            return report;
        }
        let (p, after) = match self.settle(healed_at, SETTLE_LIMIT).await {
            Ok(x) => x,
            Err(e) => {
                report.violations.push(format!("after the heal: {e:#}"));
                return report;
            }
        };
        report.recovery_ms = heal_start.elapsed().as_millis() as u64;
        report.primary = REGIONS[p].to_string();
        report.deployments = after
            .iter()
            .zip(&before)
            .map(|(a, b)| a.saturating_sub(*b))
            .sum();
        if !may_redeploy && report.deployments > 0 {
            report.violations.push(format!(
                "tasks were redeployed {} times in a round of faults that must not restart anything (JobManager failovers adopt running tasks; the standby region's faults do not reach the primary's tasks)",
                report.deployments
            ));
        }
        report.violations.extend(self.audit().await);
        report
    }

    /// Injects `f`; says what it did, and whether it hit the primary
    /// region (for a store: the region whose store it is).
    async fn inject(&mut self, f: &Fault) -> (String, bool) {
        let p = self.current_primary().await;
        let hits = match f {
            Fault::JobManager(s, ..)
            | Fault::TaskManager(s, ..)
            | Fault::RegionNats(s, _)
            | Fault::CoordinationLoss(s)
            | Fault::Link(_, s, _)
            | Fault::Drain(s, _) => *s == Side::Primary,
            Fault::Store(_) => p == 0,
            Fault::StoreFull => p == 1,
            Fault::GlobalNats(_) | Fault::RegionOutage | Fault::Switchover | Fault::Failback => {
                true
            }
        };
        (self.inject_at(f, p).await, hits)
    }

    /// The primary region as a JobManager that answers names it (east
    /// when none does).
    async fn current_primary(&self) -> usize {
        self.named_primary()
            .await
            .and_then(|n| REGIONS.iter().position(|r| *r == n))
            .unwrap_or(0)
    }

    async fn inject_at(&mut self, f: &Fault, p: usize) -> String {
        let side = |s: &Side, p: usize| match s {
            Side::Primary => p,
            Side::Standby => 1 - p,
        };
        match f {
            Fault::JobManager(s, pick, hit) => {
                let r = side(s, p);
                let leader = self.world.leader(r).await;
                let target = match pick {
                    JmPick::Leader => leader,
                    JmPick::Standby => (0..world::JOBMANAGERS)
                        .find(|i| Some(*i) != leader && !self.world.regions[r].members[*i].frozen),
                };
                let Some(m) = target else {
                    return format!("no such JobManager in {} (skipped)", REGIONS[r]);
                };
                let id = self.hit(r, m, *hit);
                self.hits.push((r, id.clone(), *pick == JmPick::Leader));
                id
            }
            Fault::TaskManager(s, i, hit) => {
                let r = side(s, p);
                self.hit(r, world::JOBMANAGERS + i, *hit)
            }
            Fault::RegionNats(s, node) => {
                let r = side(s, p);
                self.world.regions[r].nats[*node].kill();
                self.dead_nats.push((r, *node, false));
                format!("killed {}", self.world.regions[r].nats[*node].name)
            }
            Fault::GlobalNats(node) => {
                self.world.global[*node].kill();
                self.dead_global.push(*node);
                format!("killed {}", self.world.global[*node].name)
            }
            Fault::CoordinationLoss(s) => {
                let r = side(s, p);
                for node in 0..world::NODES {
                    self.world.regions[r].nats[node].kill();
                    self.dead_nats.push((r, node, true));
                }
                format!("killed {}'s cluster; it comes back empty", REGIONS[r])
            }
            Fault::Link(kind, s, slow) => {
                let r = side(s, p);
                let act = |l: &ferry_testkit::FaultProxy| {
                    if *slow {
                        l.slow(Duration::from_millis(300));
                    } else {
                        l.cut();
                    }
                };
                let leader = self.world.leader(r).await;
                match kind {
                    LinkKind::JmNats | LinkKind::JmStore => {
                        let Some(m) = leader else {
                            return format!("no leader in {} (skipped)", REGIONS[r]);
                        };
                        let member = &self.world.regions[r].members[m];
                        let id = member.id.clone();
                        if *kind == LinkKind::JmNats {
                            member.links.nats.iter().for_each(act);
                            self.hits.push((r, id.clone(), true));
                        } else {
                            act(&member.links.store);
                        }
                        id
                    }
                    LinkKind::JmTm => {
                        let member = &self.world.regions[r].members[world::JOBMANAGERS];
                        member.links.inbound.iter().for_each(act);
                        member.id.clone()
                    }
                    LinkKind::TmTm => {
                        let tms = &self.world.regions[r].members[world::JOBMANAGERS..];
                        tms.iter()
                            .for_each(|m| m.links.exchange.iter().for_each(act));
                        tms.iter()
                            .map(|m| m.id.as_str())
                            .collect::<Vec<_>>()
                            .join(" ↔ ")
                    }
                    LinkKind::RegionGlobal => {
                        for m in &self.world.regions[r].members {
                            m.links.global.iter().for_each(act);
                        }
                        REGIONS[r].to_string()
                    }
                }
            }
            Fault::Store(s) => {
                match s {
                    StoreFault::Unavailable => self.world.store.set(StoreMode::Unavailable),
                    StoreFault::Slow => self
                        .world
                        .store
                        .set(StoreMode::Slow(Duration::from_secs(2))),
                    StoreFault::RefusesWrites => self.world.store.set(StoreMode::RefuseWrites),
                    StoreFault::Timeouts | StoreFault::Resets => {
                        for r in 0..REGIONS.len() {
                            for m in &self.world.regions[r].members {
                                if *s == StoreFault::Timeouts {
                                    m.links.store.cut();
                                } else {
                                    m.links.store.refuse();
                                }
                            }
                        }
                    }
                }
                "east's store".into()
            }
            Fault::StoreFull if self.world.tmpfs.is_none() => {
                "skipped: west's store is not a tmpfs (mounting one needs root)".into()
            }
            Fault::StoreFull => match self.fill_west_store() {
                Ok(bytes) => format!("{} MiB of ballast", bytes >> 20),
                Err(e) => format!("could not fill it: {e}"),
            },
            Fault::Drain(s, i) => {
                let r = side(s, p);
                let id = self.world.regions[r].members[world::JOBMANAGERS + i]
                    .id
                    .clone();
                let Some(c) = self.world.api(r).await else {
                    return format!("no leader in {} to ask (skipped)", REGIONS[r]);
                };
                // Ended at heal whatever the answer: a drain whose answer
                // was lost (a timeout) may have begun all the same.
                self.drains.push((r, id.clone()));
                match c.drain(&id, true).await {
                    Ok(a) if a.status.is_success() => {
                        let jobs = a.raw["jobs"].as_array().map_or(0, Vec::len);
                        format!(
                            "{id}: {jobs} jobs to move, {} slots free elsewhere",
                            a.raw["free_elsewhere"]
                        )
                    }
                    Ok(a) => format!("{id}: refused ({}): {}", a.status, a.raw),
                    Err(e) => format!("{id}: no answer ({e}); it may have begun, and ends at heal"),
                }
            }
            Fault::RegionOutage => {
                for m in 0..self.world.regions[p].members.len() {
                    self.world.regions[p].members[m].kill();
                }
                for node in 0..world::NODES {
                    self.world.regions[p].nats[node].kill();
                    self.dead_nats.push((p, node, false));
                }
                format!("{} is down", REGIONS[p])
            }
            Fault::Switchover | Fault::Failback => {
                let home_away = p != 0;
                let Some(c) = self.world.api(p).await else {
                    return format!("no leader in {} to ask (skipped)", REGIONS[p]);
                };
                let c = c.with_timeout(REQUEST_LIMIT);
                let failback = *f == Fault::Failback && home_away;
                let instead = if *f == Fault::Failback && !failback {
                    "already home, so a switchover instead: "
                } else {
                    ""
                };
                self.requested = Some(tokio::spawn(async move {
                    let answer = if failback {
                        c.failback(REGIONS[0], false, Some(Duration::from_secs(30)))
                            .await
                    } else {
                        c.failover(REGIONS[1 - p], false, false).await
                    };
                    match answer {
                        Ok(a) if a.status.is_success() => {
                            format!("{instead}moved to {}", REGIONS[1 - p])
                        }
                        Ok(a) => format!("{instead}refused ({}): {}", a.status, a.raw),
                        Err(e) => format!("{instead}refused: {e}"),
                    }
                }));
                "requested".into()
            }
        }
    }

    /// Hits member `m` of region `r`.
    fn hit(&mut self, r: usize, m: usize, hit: Hit) -> String {
        let member = &mut self.world.regions[r].members[m];
        match hit {
            Hit::Kill => member.kill(),
            Hit::Term => member.signal(libc::SIGTERM),
            Hit::Freeze => member.signal(libc::SIGSTOP),
        }
        member.id.clone()
    }

    /// Fills west's tmpfs store with a ballast file; its size.
    fn fill_west_store(&mut self) -> std::io::Result<u64> {
        use std::io::Write as _;
        let path = self.world.west_store.join(".chaos-ballast");
        let mut f = std::fs::File::create(&path)?;
        self.ballast = Some(path);
        let chunk = vec![0u8; 1 << 20];
        let mut written = 0u64;
        // Bounded by the tmpfs size; ENOSPC ends it.
        for _ in 0..4096 {
            match f.write(&chunk) {
                Ok(0) | Err(_) => break,
                Ok(n) => written += n as u64,
            }
        }
        let _ = f.sync_all();
        Ok(written)
    }

    /// Heals every fault: NATS first, then the store and links, then the
    /// processes.
    async fn heal(&mut self) -> anyhow::Result<()> {
        for (r, node, wipe) in std::mem::take(&mut self.dead_nats) {
            let n = &mut self.world.regions[r].nats[node];
            n.kill();
            if wipe {
                let store = n.conf.with_extension("");
                let _ = std::fs::remove_dir_all(&store);
            }
        }
        let limit = Duration::from_secs(30);
        for r in 0..REGIONS.len() {
            for node in 0..world::NODES {
                let n = &mut self.world.regions[r].nats[node];
                if std::net::TcpStream::connect(("127.0.0.1", n.port)).is_err() {
                    tokio::task::block_in_place(|| n.restart(limit))
                        .with_context(|| format!("restarting {}", n.name))?;
                }
            }
        }
        for node in std::mem::take(&mut self.dead_global) {
            let n = &mut self.world.global[node];
            tokio::task::block_in_place(|| n.restart(limit))
                .with_context(|| format!("restarting {}", n.name))?;
        }
        self.world.store.set(StoreMode::Pass);
        if let Some(b) = self.ballast.take() {
            let _ = std::fs::remove_file(b);
        }
        for r in 0..REGIONS.len() {
            for l in self.world.links(r) {
                l.slow(Duration::ZERO);
                l.heal();
            }
        }
        for r in 0..REGIONS.len() {
            for m in 0..self.world.regions[r].members.len() {
                let member = &mut self.world.regions[r].members[m];
                if member.frozen {
                    member.signal(libc::SIGCONT);
                }
                if !member.running() {
                    member.kill(); // reap
                    tokio::task::block_in_place(|| self.world.start_member(r, m))?;
                }
            }
        }
        // Drains end last: the leader that ends one may be new.
        for (r, id) in std::mem::take(&mut self.drains) {
            self.end_drain(r, &id).await?;
        }
        Ok(())
    }

    /// Ends the drain of TaskManager `id` in region `r`, asking its leader
    /// until one answers (a leader may be changing right after the heal).
    async fn end_drain(&self, r: usize, id: &str) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut last = String::from("no leader answered");
        while Instant::now() < deadline {
            if let Some(c) = self.world.api(r).await {
                match c.drain(id, false).await {
                    Ok(a) if a.status.is_success() => return Ok(()),
                    Ok(a) => last = format!("{}: {}", a.status, a.raw),
                    Err(e) => last = e.to_string(),
                }
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        bail!("ending the drain of {id} failed for 60 s: {last}")
    }

    /// Reads every message of the stream `name`.
    async fn read_stream(&self, name: &str) -> anyhow::Result<Vec<serde_json::Value>> {
        use async_nats::jetstream::consumer;
        let mut stream = self.js.get_stream(name).await?;
        let last = stream.info().await?.state.last_sequence;
        let mut out = Vec::new();
        if last == 0 {
            return Ok(out);
        }
        let consumer = stream
            .create_consumer(consumer::pull::OrderedConfig::default())
            .await?;
        let mut messages = consumer.messages().await?;
        let deadline = Instant::now() + Duration::from_secs(60);
        while let Ok(Some(m)) = tokio::time::timeout_at(deadline.into(), messages.next()).await {
            let m = m?;
            let seq = m.info().map(|i| i.stream_sequence).unwrap_or(last);
            out.push(serde_json::from_slice(&m.payload).unwrap_or(serde_json::Value::Null));
            if seq >= last {
                break;
            }
        }
        Ok(out)
    }

    /// The audit after a settled round: violations.
    async fn audit(&mut self) -> Vec<String> {
        let mut wrong = Vec::new();
        let p0 = self.produced.load(Ordering::SeqCst);
        let must = must_have_fired(&expected_windows(p0), p0, FIRED_MARGIN_MS);
        let start = Instant::now();
        loop {
            let files = read_part_files(&self.world.out.join("windows"));
            let mid = self.read_stream("CHAOS_MID").await;
            let generated = read_part_files(&self.world.out.join("generated"));
            // Rows first, then the model: every fired window is complete
            // in the model computed from a later count.
            let expected = expected_windows(self.produced.load(Ordering::SeqCst));
            let (files, mid, generated) = match (files, mid, generated) {
                (Ok(f), Ok(m), Ok(g)) => (f, m, g),
                (f, m, g) => {
                    for e in [f.err(), m.err(), g.err()].into_iter().flatten() {
                        wrong.push(format!("reading the output: {e:#}"));
                    }
                    return wrong;
                }
            };
            let a = check_windows("out/windows", &files, &expected, &must);
            let b = check_windows("CHAOS_MID", &mid, &expected, &must);
            let (seq_wrong, total) = check_sequence(&generated);
            let cured = a.missing == 0 && b.missing == 0 && total > self.ledger.generated;
            let hopeless = !a.wrong.is_empty() || !b.wrong.is_empty() || !seq_wrong.is_empty();
            if cured || hopeless || start.elapsed() > CATCH_UP_LIMIT {
                wrong.extend(a.wrong.into_iter().take(10));
                wrong.extend(b.wrong.into_iter().take(10));
                wrong.extend(seq_wrong.into_iter().take(10));
                if !hopeless && !cured {
                    if a.missing > 0 || b.missing > 0 {
                        wrong.push(format!(
                            "{} window results missing from out/windows and {} from CHAOS_MID {CATCH_UP_LIMIT:?} after settling (e.g. {:?})",
                            a.missing,
                            b.missing,
                            a.missing_examples.iter().chain(&b.missing_examples).next()
                        ));
                    }
                    if total <= self.ledger.generated {
                        wrong.push(format!(
                            "the generated job committed nothing new ({total} records, as after the previous round)"
                        ));
                    }
                }
                self.ledger.generated = total;
                self.ledger.windows = a.rows;
                break;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        wrong.extend(self.audit_commits().await);
        wrong
    }

    /// Reads every manifest of every job in both stores into the ledger
    /// and checks the whole history.
    async fn audit_commits(&mut self) -> Vec<String> {
        let mut wrong = Vec::new();
        for (store_name, store) in [("east", &self.s3), ("west", &self.west)] {
            for (name, id) in &self.jobs {
                let key = (store_name.to_string(), name.to_string());
                for (kind, sub) in [(0u8, "checkpoints"), (1u8, "savepoints")] {
                    let base = format!("jobs/{id}/{sub}");
                    let dirs = match store.list_dirs(&base).await {
                        Ok(d) => d,
                        Err(e) => {
                            wrong.push(format!("listing {store_name}'s {base}: {e}"));
                            continue;
                        }
                    };
                    for d in dirs {
                        let Ok(Some(bytes)) =
                            store.get_opt(&format!("{base}/{d}/MANIFEST.json")).await
                        else {
                            continue; // deleted by retention meanwhile, or incomplete
                        };
                        let Ok(v) = serde_json::from_slice::<serde_json::Value>(&bytes) else {
                            wrong.push(format!(
                                "{store_name}: {base}/{d}/MANIFEST.json is not JSON"
                            ));
                            continue;
                        };
                        if let Some((cp, commit)) = Commit::from_manifest(&v) {
                            self.ledger
                                .commits
                                .entry(key.clone())
                                .or_default()
                                .insert((kind, cp), commit);
                        }
                    }
                }
            }
        }
        // Snapshots archived as diverged, per job (from both stores).
        let mut diverged: BTreeMap<String, BTreeSet<(u64, u64)>> = BTreeMap::new();
        for store in [&self.s3, &self.west] {
            for (name, id) in &self.jobs {
                if let Ok(files) = store.list_files(&format!("jobs/{id}/diverged")).await {
                    let d = diverged.entry(name.to_string()).or_default();
                    d.extend(files.iter().filter_map(|(f, _)| audit::diverged_name(f)));
                }
            }
        }
        // Per job: each region epoch's lowest checkpoint number.
        let mut lowest: BTreeMap<String, BTreeMap<u64, u64>> = BTreeMap::new();
        for ((_, job), commits) in &self.ledger.commits {
            let l = lowest.entry(job.clone()).or_default();
            for ((kind, n), c) in commits {
                if *kind == 0 {
                    let e = l.entry(c.region_epoch).or_insert(*n);
                    *e = (*e).min(*n);
                }
            }
        }
        let (none, no_lowest) = (BTreeSet::new(), BTreeMap::new());
        for ((store, job), commits) in &mut self.ledger.commits {
            let mut checkpoints: BTreeMap<u64, Commit> = commits
                .iter()
                .filter(|((k, _), _)| *k == 0)
                .map(|((_, id), c)| (*id, c.clone()))
                .collect();
            let dropped = audit::drop_superseded(
                &mut checkpoints,
                diverged.get(job).unwrap_or(&none),
                lowest.get(job).unwrap_or(&no_lowest),
            );
            if dropped > 0 {
                // Forgotten for good: a newer region's lineage replaced them.
                commits.retain(|(k, n), _| *k != 0 || checkpoints.contains_key(n));
            }
            wrong.extend(check_commits(
                &format!("{job} in {store}'s store"),
                &checkpoints,
            ));
        }
        wrong
    }
}

/// Whether `log` (a JobManager's log) says `id` became its region's leader
/// at or after `since`.
fn became_leader_since(log: &str, id: &str, since: DateTime<Utc>) -> bool {
    let holder = format!("holder={id}");
    log.lines().any(|line| {
        line.contains("became leader")
            && line.split_whitespace().any(|w| w == holder)
            && line
                .split_whitespace()
                .next()
                .and_then(|t| DateTime::parse_from_rfc3339(t).ok())
                .is_some_and(|t| t.with_timezone(&Utc) >= since)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const LOG: &str = "\
2026-12-06T00:41:10.000000Z  INFO ferry_ha::elector: became leader holder=jm-east-1 epoch=1
2026-12-06T00:41:28.500000Z  WARN ferry_ha::elector: no lease renewal within the deadline; stepping down holder=jm-east-10 epoch=2
2026-12-06T00:41:29.897328Z  INFO ferry_ha::elector: became leader holder=jm-east-10 epoch=3
not a log line: became leader holder=jm-east-1
";

    fn at(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    #[test]
    fn a_standby_that_won_the_lease_during_the_round_counts_as_a_leader() {
        // jm-east-10 won at 29.897: in a round from 29.0, not one from 30.0.
        assert!(became_leader_since(
            LOG,
            "jm-east-10",
            at("2026-12-06T00:41:29Z")
        ));
        assert!(!became_leader_since(
            LOG,
            "jm-east-10",
            at("2026-12-06T00:41:30Z")
        ));
        // jm-east-1 led only before the round; the id must match whole
        // (not as a prefix of jm-east-10), and a line without a timestamp
        // proves nothing.
        assert!(!became_leader_since(
            LOG,
            "jm-east-1",
            at("2026-12-06T00:41:29Z")
        ));
        assert!(became_leader_since(
            LOG,
            "jm-east-1",
            at("2026-12-06T00:41:00Z")
        ));
    }
}
