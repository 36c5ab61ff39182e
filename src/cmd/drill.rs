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

use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use ferry_client::drill::{self, DrillPlan, Event, Scenario as PlanScenario};
use ferry_client::text;

use super::job::print_result;

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

impl From<Scenario> for PlanScenario {
    fn from(s: Scenario) -> Self {
        match s {
            Scenario::RegionOutage => PlanScenario::RegionOutage,
            Scenario::Switchover => PlanScenario::Switchover,
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

async fn drill(a: RunArgs) -> anyhow::Result<ExitCode> {
    let output = a.api.output;
    let entry = super::job::client(&a.api)?;
    let map = super::region::read_map(&entry).await.with_context(|| {
        format!(
            "cannot read /v1/regions from {}: is a JobManager running there?",
            entry.urls().join(",")
        )
    })?;
    let plan = DrillPlan {
        scenario: a.scenario.into(),
        target: a.target.clone(),
        rto: a.rto,
        rpo: a.rpo,
        rpo_records: a.rpo_records,
        revert: a.revert,
        timeout: a.timeout,
    };
    let report = drill::run(&entry, &map, &plan, &mut |e| print_event(&plan, e)).await?;
    let raw = serde_json::to_value(&report)?;
    print_result(output, &raw, |out| text::drill_report(&report, out));
    Ok(if report.passed {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

/// A drill's progress on stderr.
fn print_event(plan: &DrillPlan, e: Event<'_>) {
    let ms = |d: Duration| d.as_millis() as u64;
    let target = &plan.target;
    match e {
        Event::Started { from, jobs } => eprintln!(
            "drill {}: {from} -> {target} with {jobs} running job(s); RTO target {}, RPO target {}",
            plan.scenario.name(),
            humantime::format_duration(plan.rto),
            humantime::format_duration(plan.rpo)
        ),
        Event::OutageStarted { from } => eprintln!(
            "  {from} is down (simulated): jobs stopped without a savepoint, lease renewals and heartbeat stopped; the other standbys stand aside for {target}"
        ),
        Event::SwitchoverRequested { from } => {
            eprintln!("  switchover requested: jobs stopped with savepoints in {from}")
        }
        Event::Detected { at, from } => {
            eprintln!("  {:>6} ms  {target} sees {from} down", ms(at))
        }
        Event::Promoted { at, region, epoch } if region == target => eprintln!(
            "  {:>6} ms  {region} is the primary (region epoch {epoch})",
            ms(at)
        ),
        Event::Promoted { at, region, epoch } => eprintln!(
            "  {:>6} ms  {region} took over instead of {target} (region epoch {epoch}); measuring there",
            ms(at)
        ),
        Event::JobRuns { at, job, region } => {
            eprintln!("  {:>6} ms  job {job} runs in {region}", ms(at))
        }
        Event::JobCommitted { at, job, region } => {
            eprintln!("  {:>6} ms  job {job} committed output in {region}", ms(at))
        }
        Event::Reverting { home } => {
            eprintln!("  reverting: failing back to {home} once it is healthy again ...")
        }
        Event::FailedBack { home, took } => {
            eprintln!("  failed back to {home} in {} ms", ms(took))
        }
        Event::RequestFailed(f) => {
            super::job::report_failure(f);
        }
        Event::NotRecorded(e) => eprintln!("warning: the drill report was not recorded: {e}"),
    }
}
