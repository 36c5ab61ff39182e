//! `ferry drill run`: a failover drill against running regions. It fails the
//! primary region over to a target on purpose — by a simulated outage of the
//! primary (its leader stops every job without a savepoint and goes silent,
//! so the target's automatic failover must notice and take over) or by a
//! planned switchover — and measures each phase from the REST APIs:
//! detection (the target sees the primary unhealthy), promotion (the region
//! lease names the target), restore (every job runs there) and first output
//! (every job completed a checkpoint there, i.e. its sinks committed), the
//! RTO, and the RPO in records and in event time (what the primary had
//! committed beyond the checkpoint the target restored from). It prints
//! pass or fail against `--rto`/`--rpo`, exits 1 on fail, records the JSON
//! report in the target region (`/v1/drills`, metric
//! `ferry_drill_last_rto_seconds`) and with `--revert` fails back.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde_json::{Value, json};

use super::job::{Client, print_result};
use super::region::{RegionMap, client_for};
use ferry_core::api::{OutageReport, RegionsStatus, SwitchoverReport};

#[derive(clap::Subcommand, Debug)]
pub enum DrillCommand {
    /// Fail over on purpose and measure RTO and RPO against targets.
    Run(RunArgs),
}

/// What a drill does to the primary region.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scenario {
    /// The primary region plays dead: its jobs stop without a savepoint
    /// and its heartbeat stops; the target's automatic failover
    /// (`regions.autoFailover`) must take over after `regions.timeout`.
    RegionOutage,
    /// Planned switchover to the target (savepoints; RPO 0 expected).
    Switchover,
}

impl Scenario {
    fn name(self) -> &'static str {
        match self {
            Scenario::RegionOutage => "region-outage",
            Scenario::Switchover => "switchover",
        }
    }
}

#[derive(clap::Args, Debug)]
pub struct RunArgs {
    #[arg(long, value_enum)]
    scenario: Scenario,
    /// The standby region to fail over to.
    #[arg(long, value_name = "REGION")]
    target: String,
    /// RTO target: from the start of the drill until every job has
    /// committed output in the target.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "30s")]
    rto: Duration,
    /// RPO target in event time (`0` = nothing committed in the primary may
    /// be missing from what the target restored).
    #[arg(long, value_parser = parse_rpo, default_value = "0")]
    rpo: Duration,
    /// RPO target in input records (default: not checked).
    #[arg(long, value_name = "N")]
    rpo_records: Option<u64>,
    /// Fail back to the original primary afterwards (`ferry region
    /// failback`); its divergence report is part of the drill report.
    #[arg(long)]
    revert: bool,
    /// Give up on a phase after this long (the drill then fails).
    #[arg(long, value_parser = humantime::parse_duration, default_value = "120s")]
    timeout: Duration,
    #[command(flatten)]
    api: super::job::ApiArgs,
}

fn parse_rpo(s: &str) -> Result<Duration, String> {
    if s.trim() == "0" {
        return Ok(Duration::ZERO);
    }
    humantime::parse_duration(s).map_err(|e| format!("{e} (use e.g. 0, 500ms, 5s)"))
}

pub fn run(c: DrillCommand) -> anyhow::Result<ExitCode> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        match c {
            DrillCommand::Run(args) => drill(args).await,
        }
    })
}

/// `GET` as JSON, `None` on any failure (polling goes on).
async fn get(client: &Client, path: &str) -> Option<Value> {
    client
        .call::<Value>(reqwest::Method::GET, path, None)
        .await
        .ok()
        .map(|(v, _)| v)
}

async fn post<T: serde::de::DeserializeOwned>(
    client: &Client,
    path: &str,
    body: Option<Vec<u8>>,
) -> anyhow::Result<T> {
    match client
        .call::<T>(
            reqwest::Method::POST,
            path,
            body.map(|b| (Some("application/json"), b)),
        )
        .await
    {
        Ok((_, v)) => Ok(v),
        Err(f) => {
            let _ = f.report();
            bail!("POST {path} failed (see above)")
        }
    }
}

fn ms(d: Duration) -> u64 {
    d.as_millis() as u64
}

/// Epoch ms of an RFC 3339 watermark.
fn watermark_ms(v: &Value) -> Option<i64> {
    v.as_str()
        .and_then(|s| chrono::DateTime::parse_from_rfc3339(s).ok())
        .map(|t| t.timestamp_millis())
}

/// One job's way through the drill.
#[derive(Default)]
struct JobTrack {
    /// The primary's last committed checkpoint when it stopped.
    before: Value,
    restored: Option<(Duration, Value)>,
    first_output: Option<Duration>,
}

/// The primary as a region's `/v1/regions` names it, with its region epoch.
async fn primary_seen(client: &Client) -> Option<(String, u64, RegionsStatus)> {
    let (_, v) = client
        .call::<RegionsStatus>(reqwest::Method::GET, "/v1/regions", None)
        .await
        .ok()?;
    Some((v.primary.clone()?, v.epoch.0, v))
}

async fn drill(a: RunArgs) -> anyhow::Result<ExitCode> {
    let output = a.api.output;
    let entry = Client::new(&a.api)?;
    let map = RegionMap::read(&entry).await.with_context(|| {
        format!(
            "cannot read /v1/regions from {}: is a JobManager running there?",
            a.api.url.join(",")
        )
    })?;
    map.known(&a.target)?;
    let from = map.primary.clone();
    if a.target == from {
        bail!(
            "{} is the primary region already; drill a failover to a standby",
            a.target
        );
    }
    if !map.status.healthy(&a.target) {
        bail!(
            "region {} is not healthy (no region heartbeat within regions.timeout): a failover to it would fail; `ferry region status` shows every region",
            a.target
        );
    }
    let primary = client_for(&map.url(&from)?, output)?;
    let target = client_for(&map.url(&a.target)?, output)?;
    let jobs: Vec<String> = get(&primary, "/v1/jobs")
        .await
        .context("cannot list the primary's jobs")?["jobs"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|j| j["state"] == "RUNNING")
        .filter_map(|j| j["id"].as_str().map(str::to_string))
        .collect();
    eprintln!(
        "drill {}: {from} -> {} with {} running job(s); RTO target {}, RPO target {}",
        a.scenario.name(),
        a.target,
        jobs.len(),
        humantime::format_duration(a.rto),
        humantime::format_duration(a.rpo)
    );
    let id = uuid::Uuid::new_v4().to_string();
    let started_at = chrono::Utc::now();
    let t0 = Instant::now();
    let mut track: BTreeMap<String, JobTrack> = jobs
        .iter()
        .map(|j| (j.clone(), JobTrack::default()))
        .collect();
    let mut failure: Option<String> = None;
    let mut detection = None;
    match a.scenario {
        Scenario::RegionOutage => {
            let path = format!(
                "/v1/drills/outage?duration={}s&target={}",
                a.timeout.as_secs().max(1),
                a.target
            );
            let r: OutageReport = post(&primary, &path, None).await?;
            for j in r.jobs {
                if let Some(t) = track.get_mut(&j.id.to_string()) {
                    t.before = serde_json::to_value(&j.last_checkpoint).unwrap_or_default();
                }
            }
            eprintln!(
                "  {from} is down (simulated): jobs stopped without a savepoint, lease renewals and heartbeat stopped; the other standbys stand aside for {}",
                a.target
            );
        }
        Scenario::Switchover => {
            let _: SwitchoverReport = post(
                &primary,
                &format!("/v1/regions/{}/failover", a.target),
                None,
            )
            .await?;
            detection = Some(Duration::ZERO);
            for (j, t) in track.iter_mut() {
                if let Some(v) = get(&primary, &format!("/v1/jobs/{j}")).await {
                    t.before = v["last_checkpoint"].clone();
                }
            }
            eprintln!("  switchover requested: jobs stopped with savepoints in {from}");
        }
    }
    let deadline = t0 + a.timeout;
    let mut promotion = None;
    let mut epoch = map.status.epoch.0;
    // The region that took over (the target, unless another won) and a
    // client of its leader.
    let mut winner: Option<(String, Client)> = None;
    loop {
        if let Some((p, e, v)) = primary_seen(&target).await {
            if detection.is_none() && v.view(&from).is_some_and(|r| !r.healthy) {
                detection = Some(t0.elapsed());
                eprintln!(
                    "  {:>6} ms  {} sees {from} down",
                    ms(t0.elapsed()),
                    a.target
                );
            }
            if promotion.is_none() && p != from {
                let url = v.api_url(&p).map(str::to_string);
                if let Some(Ok(c)) = url.map(|u| client_for(&u, output)) {
                    promotion = Some(t0.elapsed());
                    epoch = e;
                    // A promotion implies the outage was detected.
                    detection.get_or_insert(t0.elapsed());
                    if p == a.target {
                        eprintln!(
                            "  {:>6} ms  {p} is the primary (region epoch {epoch})",
                            ms(t0.elapsed())
                        );
                    } else {
                        eprintln!(
                            "  {:>6} ms  {p} took over instead of {} (region epoch {epoch}); measuring there",
                            ms(t0.elapsed()),
                            a.target
                        );
                    }
                    winner = Some((p, c));
                }
            }
        }
        if let Some((w, c)) = &winner {
            for (j, t) in track.iter_mut().filter(|(_, t)| t.first_output.is_none()) {
                let Some(v) = get(c, &format!("/v1/jobs/{j}")).await else {
                    continue;
                };
                let running = v["state"] == "RUNNING" || v["state"] == "FINISHED";
                if t.restored.is_none() && running {
                    t.restored = Some((t0.elapsed(), v["last_checkpoint"].clone()));
                    eprintln!("  {:>6} ms  job {j} runs in {w}", ms(t0.elapsed()));
                }
                if let Some((_, r)) = &t.restored
                    && (v["state"] == "FINISHED"
                        || v["last_checkpoint"]["id"].as_u64() > r["id"].as_u64())
                {
                    t.first_output = Some(t0.elapsed());
                    eprintln!(
                        "  {:>6} ms  job {j} committed output in {w}",
                        ms(t0.elapsed())
                    );
                }
            }
            if track.values().all(|t| t.first_output.is_some()) {
                break;
            }
        }
        if Instant::now() > deadline {
            failure = Some(match &winner {
                None => format!(
                    "no region took over from {from} within {}",
                    humantime::format_duration(a.timeout)
                ),
                Some((w, _)) => format!(
                    "not every job committed output in {w} within {}",
                    humantime::format_duration(a.timeout)
                ),
            });
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    if let Some((w, _)) = &winner
        && *w != a.target
        && failure.is_none()
    {
        failure = Some(format!(
            "{w} took over instead of the drill's target {}",
            a.target
        ));
    }
    if a.scenario == Scenario::RegionOutage {
        // The old primary comes back (as a standby when another region
        // took over; as the primary again when nothing did).
        let _ = primary
            .call::<Value>(reqwest::Method::DELETE, "/v1/drills/outage", None)
            .await;
    }
    // RPO: what the primary had committed beyond what the target restored.
    let mut rpo_records = 0u64;
    let mut rpo_records_out = 0u64;
    let mut rpo_event_ms = 0i64;
    let mut job_reports = Vec::new();
    for (j, t) in &track {
        let restored = t
            .restored
            .as_ref()
            .map(|(_, r)| r.clone())
            .unwrap_or(Value::Null);
        let d_in = t.before["records_in"]
            .as_u64()
            .unwrap_or(0)
            .saturating_sub(restored["records_in"].as_u64().unwrap_or(0));
        let d_out = t.before["records_out"]
            .as_u64()
            .unwrap_or(0)
            .saturating_sub(restored["records_out"].as_u64().unwrap_or(0));
        let d_et = match (
            watermark_ms(&t.before["watermark"]),
            watermark_ms(&restored["watermark"]),
        ) {
            (Some(b), Some(r)) => (b - r).max(0),
            (Some(_), None) if !restored.is_null() => 0,
            _ => 0,
        };
        rpo_records += d_in;
        rpo_records_out += d_out;
        rpo_event_ms = rpo_event_ms.max(d_et);
        job_reports.push(json!({
            "job": j,
            "primary_last_checkpoint": t.before,
            "restored_checkpoint": restored,
            "restore_ms": t.restored.as_ref().map(|(d, _)| ms(*d)),
            "first_output_ms": t.first_output.map(ms),
            "rpo_records": d_in,
            "rpo_records_out": d_out,
            "rpo_event_time_ms": d_et,
        }));
    }
    let restore = track
        .values()
        .filter_map(|t| t.restored.as_ref().map(|(d, _)| *d))
        .max();
    let first_output = track.values().filter_map(|t| t.first_output).max();
    let rto = if failure.is_some() {
        None
    } else {
        first_output.or(promotion)
    };
    let mut checks = Vec::new();
    if let Some(f) = &failure {
        checks.push(f.clone());
    }
    if let Some(r) = rto
        && r > a.rto
    {
        checks.push(format!(
            "RTO {} ms is over the target {}",
            ms(r),
            humantime::format_duration(a.rto)
        ));
    }
    if rpo_event_ms as u128 > a.rpo.as_millis() {
        checks.push(format!(
            "RPO {rpo_event_ms} ms of event time is over the target {}",
            humantime::format_duration(a.rpo)
        ));
    }
    if a.rpo.is_zero() && rpo_records > 0 {
        checks.push(format!("RPO {rpo_records} records is over the target 0"));
    }
    if let Some(max) = a.rpo_records
        && rpo_records > max
    {
        checks.push(format!(
            "RPO {rpo_records} records is over the target {max}"
        ));
    }
    let passed = checks.is_empty();
    let took_over = winner.as_ref().map(|(w, _)| w.clone());
    let mut report = json!({
        "id": id,
        "scenario": a.scenario.name(),
        "from": from,
        "to": took_over.clone().unwrap_or_else(|| a.target.clone()),
        "target": a.target,
        "region_epoch": epoch,
        "started_at": started_at,
        "jobs": job_reports,
        "detection_ms": detection.map(ms),
        "promotion_ms": promotion.map(ms),
        "restore_ms": restore.map(ms),
        "first_output_ms": first_output.map(ms),
        "rto_ms": rto.map(ms),
        "rpo_records": rpo_records,
        "rpo_records_out": rpo_records_out,
        "rpo_event_time_ms": rpo_event_ms,
        "targets": {"rto_ms": ms(a.rto), "rpo_event_time_ms": ms(a.rpo), "rpo_records": a.rpo_records},
        "passed": passed,
        "failures": checks,
    });
    if a.revert
        && let Some((_, c)) = &winner
    {
        eprintln!("  reverting: failing back to {from} once it is healthy again ...");
        report["revert"] = revert(c, &from, deadline.max(Instant::now() + a.timeout)).await;
    }
    // Recorded where the jobs ran after the failover (or, when none
    // happened, where they still run).
    let recorder = winner.as_ref().map(|(_, c)| c).unwrap_or(&primary);
    let body = serde_json::to_vec(&report).unwrap_or_default();
    if let Err(e) = post::<Value>(recorder, "/v1/drills", Some(body)).await {
        eprintln!("warning: the drill report was not recorded: {e}");
    }
    print_result(output, &report, |out| print_report(&report, out));
    Ok(if passed {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

/// Waits (until `deadline`) for `home` to heartbeat again, then fails
/// back to it through the current primary; the fail-back's answer (with
/// its divergence report) or the error.
async fn revert(primary: &Client, home: &str, deadline: Instant) -> Value {
    loop {
        let healthy = get(primary, "/v1/regions").await.is_some_and(|v| {
            v["regions"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|r| r["region"] == home && r["healthy"] == true)
        });
        if healthy {
            break;
        }
        if Instant::now() > deadline {
            return json!({"error": format!("{home} did not become healthy again")});
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let started = Instant::now();
    loop {
        match primary
            .call::<Value>(
                reqwest::Method::POST,
                &format!("/v1/regions/{home}/failback"),
                None,
            )
            .await
        {
            Ok((v, _)) => {
                eprintln!("  failed back to {home} in {} ms", ms(started.elapsed()));
                return v;
            }
            // Right after the failover the new primary may still be
            // starting its jobs; retry until the deadline.
            Err(f) if Instant::now() < deadline => {
                let _ = f;
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(f) => {
                let _ = f.report();
                return json!({"error": format!("fail-back to {home} failed (see the log above)")});
            }
        }
    }
}

fn print_report(r: &Value, out: &mut String) {
    let verdict = if r["passed"] == true { "PASS" } else { "FAIL" };
    let _ = writeln!(
        out,
        "drill {} {}: {} -> {}  {verdict}",
        r["scenario"].as_str().unwrap_or("-"),
        r["id"].as_str().unwrap_or("-"),
        r["from"].as_str().unwrap_or("-"),
        r["to"].as_str().unwrap_or("-"),
    );
    let phase = |v: &Value| {
        v.as_u64()
            .map(|m| format!("{m} ms"))
            .unwrap_or_else(|| "-".into())
    };
    for (name, key) in [
        ("detection", "detection_ms"),
        ("promotion", "promotion_ms"),
        ("restore", "restore_ms"),
        ("first output", "first_output_ms"),
    ] {
        let _ = writeln!(out, "  {name:<13} {:>10}", phase(&r[key]));
    }
    let _ = writeln!(
        out,
        "  {:<13} {:>10}   target {} ms",
        "RTO",
        phase(&r["rto_ms"]),
        r["targets"]["rto_ms"]
    );
    let _ = writeln!(
        out,
        "  {:<13} {:>7} ms   event time, {} input records ({} output records); target {} ms",
        "RPO",
        r["rpo_event_time_ms"],
        r["rpo_records"],
        r["rpo_records_out"],
        r["targets"]["rpo_event_time_ms"]
    );
    for f in r["failures"].as_array().into_iter().flatten() {
        let _ = writeln!(out, "  FAILED: {}", f.as_str().unwrap_or_default());
    }
    if let Some(rev) = r.get("revert") {
        match rev["error"].as_str() {
            Some(e) => {
                let _ = writeln!(out, "  revert: FAILED: {e}");
            }
            None => {
                let d = &rev["divergence"];
                let _ = writeln!(
                    out,
                    "  revert: back in {} (region epoch {}); divergence: {} output records, {} ms of event time",
                    rev["to"].as_str().unwrap_or("-"),
                    rev["epoch"],
                    d["records_out"],
                    d["event_time_ms"]
                );
            }
        }
    }
    let _ = writeln!(
        out,
        "  report: GET /v1/drills/{} in {}",
        r["id"].as_str().unwrap_or("-"),
        if r["promotion_ms"].is_null() {
            r["from"].as_str().unwrap_or("-")
        } else {
            r["to"].as_str().unwrap_or("-")
        }
    );
}
