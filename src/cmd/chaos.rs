//! `ferry chaos`: the seeded fault campaign of `ferry_lab::chaos` — its
//! flags, its progress on stderr and its report (Markdown, or JSON with
//! `--json`). Exits 1 when any round found a violation, naming the seed
//! that replays the campaign.

use std::path::PathBuf;
use std::process::ExitCode;

use ferry_lab::chaos::{ChaosOptions, Progress};

#[derive(clap::Args, Debug)]
pub struct ChaosArgs {
    /// Rounds to run (each injects 1–3 faults, heals, settles and audits).
    #[arg(long, default_value_t = 20)]
    pub rounds: u32,
    /// Seed of the schedule (default: from the clock; printed either way).
    /// The same seed with the same ferry build replays the same faults.
    #[arg(long)]
    pub seed: Option<u64>,
    /// Directory for the processes' logs, stores and output (must be empty
    /// or absent; a temp dir by default).
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// Keep the directory after a passing campaign (a failing one is
    /// always kept).
    #[arg(long)]
    pub keep: bool,
    /// Input records per second into the NATS stream the workload reads.
    #[arg(long, default_value_t = 100)]
    pub rate: u64,
    /// Only these fault kinds, comma-separated (e.g.
    /// `leader-jm-sigkill,store-503`); every kind of the catalog by
    /// default (docs/reliability.md lists them).
    #[arg(long, value_delimiter = ',')]
    pub faults: Option<Vec<String>>,
    /// Print the schedule of faults the seed gives, and start nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Print the report as JSON instead of Markdown.
    #[arg(long)]
    pub json: bool,
}

pub fn run(a: ChaosArgs) -> anyhow::Result<ExitCode> {
    let seed = a.seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(1)
    });
    let bad = if a.rounds == 0 {
        Some("--rounds must be at least 1".to_string())
    } else if !(1..=5_000).contains(&a.rate) {
        Some("--rate must be between 1 and 5000 records per second".to_string())
    } else {
        ferry_lab::chaos::check_only(a.faults.as_deref())
            .err()
            .map(|e| format!("{e:#}"))
    };
    if let Some(why) = bad {
        eprintln!("error: {why}");
        return Ok(ExitCode::from(2));
    }
    if a.dry_run {
        for (n, plan) in ferry_lab::chaos::plans(seed, a.faults.clone(), a.rounds)
            .iter()
            .enumerate()
        {
            println!("round {}: {}", n + 1, describe(plan));
        }
        return Ok(ExitCode::SUCCESS);
    }
    let opts = ChaosOptions {
        ferry: std::env::current_exe()?,
        rounds: a.rounds,
        seed,
        dir: a.dir.clone(),
        keep: a.keep,
        rate: a.rate,
        only: a.faults.clone(),
    };
    eprintln!(
        "chaos: seed {seed}, {} rounds; two regions × (3 JobManagers, 3 TaskManagers, 3 NATS nodes), a 3-node global cluster, moto S3 behind a fault proxy",
        a.rounds
    );
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()?;
    let report = rt.block_on(ferry_lab::chaos::run(&opts, |p| match p {
        Progress::Started { dir } => {
            eprintln!(
                "chaos: the world is up and the jobs run (logs in {})",
                dir.display()
            )
        }
        Progress::Planned { round, plan } => eprintln!(
            "round {round} ({} UTC): {}",
            chrono::Utc::now().format("%H:%M:%S"),
            describe(plan)
        ),
        Progress::Round(r) => {
            for f in &r.faults {
                eprintln!("    {f}");
            }
            eprintln!(
                "    detected {} · recovered in {:.1} s · {} redeployments · primary {} · {}",
                r.detection_ms
                    .map(|d| format!("after {:.1} s", d as f64 / 1e3))
                    .unwrap_or_else(|| "—".into()),
                r.recovery_ms as f64 / 1e3,
                r.deployments,
                if r.primary.is_empty() {
                    "?"
                } else {
                    &r.primary
                },
                if r.violations.is_empty() {
                    "PASS"
                } else {
                    "FAIL"
                }
            );
            for v in &r.violations {
                eprintln!("    VIOLATION: {v}");
            }
        }
    }))?;
    if a.json {
        println!("{}", serde_json::to_value(&report)?);
    } else {
        print!("{}", report.markdown());
    }
    if report.passed {
        Ok(ExitCode::SUCCESS)
    } else {
        eprintln!(
            "chaos: FAILED. Replay with: ferry chaos --seed {seed} --rounds {}{}",
            a.rounds,
            report
                .dir
                .as_deref()
                .map(|d| format!("\n(logs, stores and output are in {d})"))
                .unwrap_or_default()
        );
        Ok(ExitCode::from(1))
    }
}

/// A round's plan on one line.
fn describe(plan: &ferry_lab::chaos::faults::Plan) -> String {
    let faults: Vec<String> = plan
        .faults
        .iter()
        .map(|(at, f)| format!("+{:.1}s {f}", at.as_secs_f64()))
        .collect();
    format!(
        "{} (held {:.1} s)",
        faults.join("; "),
        plan.hold.as_secs_f64()
    )
}
