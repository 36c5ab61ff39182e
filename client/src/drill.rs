//! The failover drill runner (`ferry drill run`). It fails the primary
//! region over to a target on purpose — by a simulated outage of the
//! primary (its leader stops every job without a savepoint and goes
//! silent, so the target's automatic failover must notice and take over)
//! or by a planned switchover — and measures each phase from the REST
//! APIs: detection (the target sees the primary unhealthy), promotion (the
//! region lease names the target), restore (every job runs there) and
//! first output (every job completed a checkpoint there, i.e. its sinks
//! committed), the RTO, and the RPO in records and in event time (what the
//! primary had committed beyond the checkpoint the target restored from).
//! It judges them against the targets, records the report in the region
//! the jobs went to (`/v1/drills`) and, if asked, fails back.
//!
//! Invariant: a drill that started an outage ends it, however the drill
//! went; the runner only talks to running regions over their REST APIs.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::bail;
use ferry_core::api::{
    DrillCheckpoint, DrillJob, DrillReport, DrillRevert, DrillTargets, JobState,
};

use crate::regions::RegionMap;
use crate::{Client, Error};

/// What a drill does to the primary region.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scenario {
    /// The primary region plays dead: its jobs stop without a savepoint
    /// and its heartbeat stops; the target's automatic failover
    /// (`regions.autoFailover`) must take over after `regions.timeout`.
    RegionOutage,
    /// Planned switchover to the target (savepoints; RPO 0 expected).
    Switchover,
}

impl Scenario {
    /// Its name in reports and on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Scenario::RegionOutage => "region-outage",
            Scenario::Switchover => "switchover",
        }
    }
}

/// A drill to run and the targets it is judged against.
#[derive(Clone, Debug)]
pub struct DrillPlan {
    pub scenario: Scenario,
    /// The standby region to fail over to.
    pub target: String,
    /// RTO target: from the start until every job committed output there.
    pub rto: Duration,
    /// RPO target in event time (zero: nothing may be missing).
    pub rpo: Duration,
    /// RPO target in input records (`None`: not checked).
    pub rpo_records: Option<u64>,
    /// Fail back to the original primary afterwards.
    pub revert: bool,
    /// Give up on a phase after this long (the drill then fails).
    pub timeout: Duration,
}

/// What happens during a drill, as it happens (times since its start).
#[derive(Debug)]
pub enum Event<'a> {
    /// The drill starts with `jobs` running jobs.
    Started { from: &'a str, jobs: usize },
    /// The primary plays dead (simulated outage).
    OutageStarted { from: &'a str },
    /// A planned switchover was requested.
    SwitchoverRequested { from: &'a str },
    /// The target sees the primary down.
    Detected { at: Duration, from: &'a str },
    /// `region` holds the region lease now (the target, or another
    /// region that took over instead).
    Promoted {
        at: Duration,
        region: &'a str,
        epoch: u64,
    },
    /// A job runs in the region that took over.
    JobRuns {
        at: Duration,
        job: &'a str,
        region: &'a str,
    },
    /// A job committed output there.
    JobCommitted {
        at: Duration,
        job: &'a str,
        region: &'a str,
    },
    /// Failing back to `home` once it is healthy again.
    Reverting { home: &'a str },
    /// Failed back to `home`.
    FailedBack { home: &'a str, took: Duration },
    /// A request the drill needed failed.
    RequestFailed(&'a Error),
    /// The report could not be recorded.
    NotRecorded(&'a anyhow::Error),
}

fn ms(d: Duration) -> u64 {
    d.as_millis() as u64
}

/// Epoch ms of an RFC 3339 watermark.
fn watermark_ms(w: Option<&str>) -> Option<i64> {
    w.and_then(|s| chrono::DateTime::parse_from_rfc3339(s).ok())
        .map(|t| t.timestamp_millis())
}

/// One job's way through the drill.
#[derive(Default)]
struct JobTrack {
    /// The primary's last committed checkpoint when it stopped.
    before: Option<DrillCheckpoint>,
    restored: Option<(Duration, Option<DrillCheckpoint>)>,
    first_output: Option<Duration>,
}

/// The primary as a region's `/v1/regions` names it, with its region epoch.
async fn primary_seen(client: &Client) -> Option<(String, u64, ferry_core::api::RegionsStatus)> {
    let v = client.regions().await.ok()?.value;
    Some((v.primary.clone()?, v.epoch.0, v))
}

/// Runs `plan` against the regions `map` describes (read through `entry`,
/// whose settings every other client of the drill shares), telling `on`
/// what happens; the report (recorded where the jobs ran afterwards).
pub async fn run(
    entry: &Client,
    map: &RegionMap,
    plan: &DrillPlan,
    on: &mut (dyn FnMut(Event<'_>) + Send),
) -> anyhow::Result<DrillReport> {
    map.known(&plan.target)?;
    let from = map.primary.clone();
    if plan.target == from {
        bail!(
            "{} is the primary region already; drill a failover to a standby",
            plan.target
        );
    }
    if !map.status.healthy(&plan.target) {
        bail!(
            "region {} is not healthy (no region heartbeat within regions.timeout): a failover to it would fail; `ferry region status` shows every region",
            plan.target
        );
    }
    let primary = entry.for_url(&map.url(&from)?)?;
    let target = entry.for_url(&map.url(&plan.target)?)?;
    let replication = primary.regions().await.ok().map(|a| match a.value.sync {
        None => "async".to_string(),
        Some(s) if s.state == ferry_core::api::SyncState::Sync => "sync".to_string(),
        Some(s) => format!("sync ({})", s.state.as_str()),
    });
    // The target's standby mode, from its own heartbeat.
    let standby = target.regions().await.ok().and_then(|a| {
        let hb = a
            .value
            .regions
            .into_iter()
            .find(|v| v.region == plan.target)?
            .heartbeat?;
        let r = hb.resources?;
        Some(if r.standby == "hot" {
            format!("hot ({} jobs held)", r.held.len())
        } else {
            r.standby
        })
    });
    let jobs: Vec<String> = match primary.jobs().await {
        Ok(a) => a
            .value
            .jobs
            .into_iter()
            .filter(|j| j.state == JobState::Running)
            .map(|j| j.id.to_string())
            .collect(),
        Err(_) => bail!("cannot list the primary's jobs"),
    };
    on(Event::Started {
        from: &from,
        jobs: jobs.len(),
    });
    let id = uuid::Uuid::new_v4().to_string();
    let started_at = chrono::Utc::now();
    let t0 = Instant::now();
    let mut track: BTreeMap<String, JobTrack> = jobs
        .iter()
        .map(|j| (j.clone(), JobTrack::default()))
        .collect();
    let mut failure: Option<String> = None;
    let mut detection = None;
    match plan.scenario {
        Scenario::RegionOutage => {
            let secs = plan.timeout.as_secs().max(1);
            let r = match primary
                .start_outage(Duration::from_secs(secs), Some(&plan.target))
                .await
            {
                Ok(r) => r.value,
                Err(e) => {
                    on(Event::RequestFailed(&e));
                    bail!(
                        "POST /v1/drills/outage?duration={secs}s&target={} failed (see above)",
                        plan.target
                    )
                }
            };
            for j in r.jobs {
                if let Some(t) = track.get_mut(&j.id.to_string()) {
                    t.before = j.last_checkpoint.map(DrillCheckpoint::Mark);
                }
            }
            on(Event::OutageStarted { from: &from });
        }
        Scenario::Switchover => {
            if let Err(e) = primary.failover(&plan.target, false, false).await {
                on(Event::RequestFailed(&e));
                bail!(
                    "POST /v1/regions/{}/failover failed (see above)",
                    plan.target
                )
            }
            detection = Some(Duration::ZERO);
            for (j, t) in track.iter_mut() {
                if let Ok(a) = primary.job(j).await {
                    t.before = a.value.last_checkpoint.map(DrillCheckpoint::Info);
                }
            }
            on(Event::SwitchoverRequested { from: &from });
        }
    }
    let deadline = t0 + plan.timeout;
    let mut promotion = None;
    let mut epoch = map.status.epoch.0;
    // The region that took over (the target, unless another won) and a
    // client of its leader.
    let mut winner: Option<(String, Client)> = None;
    loop {
        if let Some((p, e, v)) = primary_seen(&target).await {
            if detection.is_none() && v.view(&from).is_some_and(|r| !r.healthy) {
                detection = Some(t0.elapsed());
                on(Event::Detected {
                    at: t0.elapsed(),
                    from: &from,
                });
            }
            if promotion.is_none() && p != from {
                let url = v.api_url(&p).map(str::to_string);
                if let Some(Ok(c)) = url.map(|u| entry.for_url(&u)) {
                    promotion = Some(t0.elapsed());
                    epoch = e;
                    // A promotion implies the outage was detected.
                    detection.get_or_insert(t0.elapsed());
                    on(Event::Promoted {
                        at: t0.elapsed(),
                        region: &p,
                        epoch,
                    });
                    winner = Some((p, c));
                }
            }
        }
        if let Some((w, c)) = &winner {
            for (j, t) in track.iter_mut().filter(|(_, t)| t.first_output.is_none()) {
                let Ok(a) = c.job(j).await else {
                    continue;
                };
                let v = a.value;
                let running = v.state == JobState::Running || v.state == JobState::Finished;
                if t.restored.is_none() && running {
                    t.restored = Some((
                        t0.elapsed(),
                        v.last_checkpoint.clone().map(DrillCheckpoint::Info),
                    ));
                    on(Event::JobRuns {
                        at: t0.elapsed(),
                        job: j,
                        region: w,
                    });
                }
                if let Some((_, r)) = &t.restored
                    && (v.state == JobState::Finished
                        || v.last_checkpoint.as_ref().map(|c| c.id)
                            > r.as_ref().map(DrillCheckpoint::id))
                {
                    t.first_output = Some(t0.elapsed());
                    on(Event::JobCommitted {
                        at: t0.elapsed(),
                        job: j,
                        region: w,
                    });
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
                    humantime::format_duration(plan.timeout)
                ),
                Some((w, _)) => format!(
                    "not every job committed output in {w} within {}",
                    humantime::format_duration(plan.timeout)
                ),
            });
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    if let Some((w, _)) = &winner
        && *w != plan.target
        && failure.is_none()
    {
        failure = Some(format!(
            "{w} took over instead of the drill's target {}",
            plan.target
        ));
    }
    if plan.scenario == Scenario::RegionOutage {
        // The old primary comes back (as a standby when another region
        // took over; as the primary again when nothing did).
        let _ = primary.end_outage().await;
    }
    // RPO: what the primary had committed beyond what the target restored.
    let mut rpo_records = 0u64;
    let mut rpo_records_out = 0u64;
    let mut rpo_event_ms = 0i64;
    let mut job_reports = Vec::new();
    for (j, t) in &track {
        let restored = t.restored.as_ref().and_then(|(_, r)| r.clone());
        let before = t.before.as_ref();
        let d_in = before
            .map_or(0, DrillCheckpoint::records_in)
            .saturating_sub(restored.as_ref().map_or(0, DrillCheckpoint::records_in));
        let d_out = before
            .map_or(0, DrillCheckpoint::records_out)
            .saturating_sub(restored.as_ref().map_or(0, DrillCheckpoint::records_out));
        let d_et = match (
            watermark_ms(before.and_then(DrillCheckpoint::watermark)),
            watermark_ms(restored.as_ref().and_then(DrillCheckpoint::watermark)),
        ) {
            (Some(b), Some(r)) => (b - r).max(0),
            _ => 0,
        };
        rpo_records += d_in;
        rpo_records_out += d_out;
        rpo_event_ms = rpo_event_ms.max(d_et);
        job_reports.push(DrillJob {
            job: j.clone(),
            primary_last_checkpoint: t.before.clone(),
            restored_checkpoint: restored,
            restore_ms: t.restored.as_ref().map(|(d, _)| ms(*d)),
            first_output_ms: t.first_output.map(ms),
            rpo_records: d_in,
            rpo_records_out: d_out,
            rpo_event_time_ms: d_et,
        });
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
        && r > plan.rto
    {
        checks.push(format!(
            "RTO {} ms is over the target {}",
            ms(r),
            humantime::format_duration(plan.rto)
        ));
    }
    if rpo_event_ms as u128 > plan.rpo.as_millis() {
        checks.push(format!(
            "RPO {rpo_event_ms} ms of event time is over the target {}",
            humantime::format_duration(plan.rpo)
        ));
    }
    if plan.rpo.is_zero() && rpo_records > 0 {
        checks.push(format!("RPO {rpo_records} records is over the target 0"));
    }
    if let Some(max) = plan.rpo_records
        && rpo_records > max
    {
        checks.push(format!(
            "RPO {rpo_records} records is over the target {max}"
        ));
    }
    let passed = checks.is_empty();
    let took_over = winner.as_ref().map(|(w, _)| w.clone());
    let mut report = DrillReport {
        id,
        scenario: plan.scenario.name().to_string(),
        from: from.clone(),
        to: took_over.unwrap_or_else(|| plan.target.clone()),
        target: plan.target.clone(),
        region_epoch: epoch,
        started_at: Some(started_at),
        jobs: job_reports,
        detection_ms: detection.map(ms),
        promotion_ms: promotion.map(ms),
        restore_ms: restore.map(ms),
        first_output_ms: first_output.map(ms),
        rto_ms: rto.map(ms),
        rpo_records,
        rpo_records_out,
        rpo_event_time_ms: rpo_event_ms,
        targets: DrillTargets {
            rto_ms: ms(plan.rto),
            rpo_event_time_ms: ms(plan.rpo),
            rpo_records: plan.rpo_records,
        },
        replication,
        standby,
        passed,
        failures: checks,
        revert: None,
        actor: None,
        extra: BTreeMap::new(),
    };
    if plan.revert
        && let Some((_, c)) = &winner
    {
        on(Event::Reverting { home: &from });
        let until = deadline.max(Instant::now() + plan.timeout);
        report.revert = Some(revert(c, &from, until, on).await);
    }
    // Recorded where the jobs ran after the failover (or, when none
    // happened, where they still run).
    let recorder = winner.as_ref().map(|(_, c)| c).unwrap_or(&primary);
    if let Err(e) = recorder.record_drill(&report).await {
        on(Event::RequestFailed(&e));
        let e = anyhow::anyhow!("POST /v1/drills failed (see above)");
        on(Event::NotRecorded(&e));
    }
    Ok(report)
}

/// Waits (until `deadline`) for `home` to heartbeat again, then fails
/// back to it through the current primary; the fail-back's answer (with
/// its divergence report) or why there is none.
async fn revert(
    primary: &Client,
    home: &str,
    deadline: Instant,
    on: &mut (dyn FnMut(Event<'_>) + Send),
) -> DrillRevert {
    loop {
        let healthy = primary.regions().await.is_ok_and(|a| a.value.healthy(home));
        if healthy {
            break;
        }
        if Instant::now() > deadline {
            return DrillRevert::Failed {
                error: format!("{home} did not become healthy again"),
            };
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let started = Instant::now();
    loop {
        match primary.failback(home, false, None).await {
            Ok(a) => {
                on(Event::FailedBack {
                    home,
                    took: started.elapsed(),
                });
                return DrillRevert::Done(Box::new(a.value));
            }
            // Right after the failover the new primary may still be
            // starting its jobs; retry until the deadline.
            Err(_) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(e) => {
                on(Event::RequestFailed(&e));
                return DrillRevert::Failed {
                    error: format!("fail-back to {home} failed (see the log above)"),
                };
            }
        }
    }
}
