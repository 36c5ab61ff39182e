//! `ferry region replicate|verify`: the cross-region tools that work on
//! object stores directly. `replicate` makes one replication pass of every
//! job (or the named ones) from one region's store to another's — the same
//! incremental, hash-verified, manifest-last copy the region coordinator
//! runs after each checkpoint; `verify` test-restores every complete
//! checkpoint in a store (hashes plus decoding all state with the streaming
//! runtime) and exits 1 if any would not restore.

use std::fmt::Write as _;
use std::process::ExitCode;

use ferry_client::Client;
use ferry_client::regions::RegionMap;
use ferry_core::JobId;
use ferry_core::api::{DivergenceReport, RegionsStatus, SwitchoverReport};
use ferry_core::manifest::VerifiedCheckpoint;
use ferry_core::storage::StorageLocation;
use ferry_region::{JobCopy, RestoreCheck, Verification, replicate_job, verify_job};
use ferry_taskmanager::runtime::{JobPlan, check_restore};
use serde_json::json;

use super::job::{Align, Output, Table, client, print_result, report_failure, show};

#[derive(clap::Subcommand, Debug)]
pub enum RegionCommand {
    /// Every region's health (from the global KV) and the replication lag
    /// to each standby, as a JobManager reports them (`GET /v1/regions`;
    /// ask the leader).
    Status {
        #[command(flatten)]
        api: super::job::ApiArgs,
    },
    /// Make another region the primary. Planned (default; sent to the
    /// primary region's leader, found through the region given in --url):
    /// every job stops with a savepoint, the savepoints reach the target's
    /// store, the region lease moves, and the target resumes every job from
    /// its savepoint — nothing lost, nothing repeated.
    Failover {
        /// The region to make primary.
        #[arg(long, value_name = "REGION")]
        to: String,
        /// Move the region lease now, without savepoints (the primary is
        /// unreachable; send it to any region's JobManagers). Work the old
        /// primary did after its last replicated checkpoint is lost.
        #[arg(long)]
        force: bool,
        /// Print the plan; change nothing.
        #[arg(long)]
        dry_run: bool,
        #[command(flatten)]
        api: super::job::ApiArgs,
    },
    /// Move the jobs home after a failover: the region they left (by
    /// default `regions.primary`, where they belong) is back as a standby
    /// and has caught up by replication; a planned switchover moves every
    /// job there (nothing lost, nothing repeated). Prints the divergence
    /// report: what that region committed after the last checkpoint it had
    /// replicated before the failover. Sent to the current primary's leader
    /// (found through the region given in --url).
    Failback {
        /// The region to move the jobs to (default: the home region,
        /// `regions.primary`).
        #[arg(long, value_name = "REGION")]
        to: Option<String>,
        /// Print the plan and the divergence report; change nothing.
        #[arg(long)]
        dry_run: bool,
        /// How long to wait for the region to become healthy (right after
        /// a failover it may still be starting).
        #[arg(long, value_parser = humantime::parse_duration, default_value = "60s")]
        wait: std::time::Duration,
        #[command(flatten)]
        api: super::job::ApiArgs,
    },
    /// Copy every complete checkpoint, savepoint and job spec the target
    /// lacks from one region's store to another's (hash-verified, manifest
    /// last), and apply the source's checkpoint retention.
    Replicate {
        /// Source store URL (the primary region's `storage`).
        #[arg(long, value_name = "URL")]
        from: String,
        /// Target store URL (a standby region's `storage`).
        #[arg(long, value_name = "URL")]
        to: String,
        /// Only these jobs (full ids); all jobs of the source by default.
        #[arg(long, value_delimiter = ',', value_name = "ID[,ID...]")]
        job: Vec<String>,
        #[arg(long, short = 'o', value_enum, default_value_t = Output::Table)]
        output: Output,
    },
    /// Test-restore every complete checkpoint in a store: verify every hash
    /// and decode all state as a restore would. Exit 1 if any fails.
    Verify {
        /// Store URL (e.g. a standby region's `storage`).
        #[arg(long, value_name = "URL")]
        store: String,
        /// Only these jobs (full ids); all jobs of the store by default.
        #[arg(long, value_delimiter = ',', value_name = "ID[,ID...]")]
        job: Vec<String>,
        #[arg(long, short = 'o', value_enum, default_value_t = Output::Table)]
        output: Output,
    },
}

/// Decodes checkpoints with the streaming runtime, as a restore would.
pub(crate) struct RuntimeCheck;

impl RestoreCheck for RuntimeCheck {
    fn check(&self, spec_yaml: &str, cp: &VerifiedCheckpoint) -> Result<usize, String> {
        let spec = ferry_core::spec::parse_and_validate(spec_yaml)
            .map_err(|e| format!("the stored job spec is invalid:\n{e}"))?;
        let plan = JobPlan::new(&spec)?;
        check_restore(&plan, cp)
    }
}

pub fn run(c: RegionCommand) -> anyhow::Result<ExitCode> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        match c {
            RegionCommand::Replicate {
                from,
                to,
                job,
                output,
            } => replicate(&from, &to, &job, output).await,
            RegionCommand::Verify { store, job, output } => verify(&store, &job, output).await,
            RegionCommand::Failover {
                to,
                force,
                dry_run,
                api,
            } => failover(&to, force, dry_run, &api).await,
            RegionCommand::Failback {
                to,
                dry_run,
                wait,
                api,
            } => failback(to, dry_run, wait, &api).await,
            RegionCommand::Status { api } => {
                let call = client(&api)?.regions().await;
                Ok(show(api.output, call, print_status))
            }
        }
    })
}

/// The region map from `/v1/regions` through `client`; a failed request
/// is shown first.
pub(crate) async fn read_map(client: &Client) -> anyhow::Result<RegionMap> {
    match client.regions().await {
        Ok(a) => RegionMap::from_status(a.value),
        Err(e) => {
            let _ = report_failure(&e);
            anyhow::bail!("cannot read /v1/regions (see above)")
        }
    }
}

/// `ferry region failover`: planned switchovers go to the primary's
/// leader (found through the region given in --url); forced failovers to
/// any region's JobManager.
async fn failover(
    to: &str,
    force: bool,
    dry_run: bool,
    api: &super::job::ApiArgs,
) -> anyhow::Result<ExitCode> {
    let entry = client(api)?;
    let map = read_map(&entry).await?;
    map.known(to)?;
    if to == map.primary {
        anyhow::bail!(
            "{to} is already the primary region (region epoch {})",
            map.status.epoch
        );
    }
    let client = if force {
        entry
    } else {
        let url = map.url(&map.primary).map_err(|e| {
            anyhow::anyhow!(
                "{e}; if the primary region {} is down, force the failover: `ferry region failover --to {to} --force`",
                map.primary
            )
        })?;
        entry.for_url(&url)?
    };
    if !dry_run {
        eprintln!(
            "{} from {} to {to} ...",
            if force {
                "forcing the failover"
            } else {
                "switching over (savepoints, replication, lease)"
            },
            map.primary
        );
    }
    let call = client.failover(to, force, dry_run).await;
    Ok(show(api.output, call, |v, out| {
        print_move(out, v, "");
        for sp in &v.savepoints {
            let _ = writeln!(out, "  savepoint {}", sp.path);
        }
        if let Some(ms) = v.took_ms {
            let _ = writeln!(out, "took {ms} ms");
        }
    }))
}

async fn failback(
    to: Option<String>,
    dry_run: bool,
    wait: std::time::Duration,
    api: &super::job::ApiArgs,
) -> anyhow::Result<ExitCode> {
    let client = client(api)?;
    let map = read_map(&client).await?;
    let Some(target) = to.or(map.status.home.clone()) else {
        anyhow::bail!("no home region is configured (regions.primary): name the region with --to");
    };
    map.known(&target)?;
    if target == map.primary {
        anyhow::bail!(
            "{target} is already the primary region (region epoch {}): nothing to fail back",
            map.status.epoch
        );
    }
    let primary_url = map.url(&map.primary)?;
    if !dry_run {
        eprintln!(
            "failing back from {} to {target} (waiting up to {} for it to be healthy, then catch-up, savepoints, lease) ...",
            map.primary,
            humantime::format_duration(wait)
        );
    }
    let call = client
        .for_url(&primary_url)?
        .failback(&target, dry_run, Some(wait))
        .await;
    Ok(show(api.output, call, |v, out| {
        print_move(out, v, "fail-back ");
        if let Some(d) = &v.divergence {
            print_divergence(d, out);
        }
        if let Some(ms) = v.took_ms {
            let _ = writeln!(out, "took {ms} ms");
        }
    }))
}

/// `from -> to (region epoch)` and the plan's steps of a failover or
/// fail-back answer.
fn print_move(out: &mut String, v: &SwitchoverReport, what: &str) {
    let _ = writeln!(
        out,
        "{}{what}{} -> {} (region epoch {})",
        if v.dry_run { "plan: " } else { "" },
        v.from,
        v.to,
        v.epoch
    );
    for s in &v.steps {
        let _ = writeln!(out, "  - {s}");
    }
}

/// The divergence report of a fail-back, for people.
fn print_divergence(d: &DivergenceReport, out: &mut String) {
    if d.jobs.is_empty() {
        let _ = writeln!(
            out,
            "divergence: none ({} committed nothing beyond what the failover restored)",
            d.region
        );
        return;
    }
    let _ = writeln!(
        out,
        "divergence: {} committed {} output records ({} input records, {} ms of event time) after the checkpoints the failover restored from:",
        d.region, d.records_out, d.records_in, d.event_time_ms
    );
    let rows: Vec<Vec<String>> = d
        .jobs
        .iter()
        .map(|j| {
            vec![
                j.job.map(|id| id.to_string()).unwrap_or_else(|| "-".into()),
                j.base
                    .as_ref()
                    .map(|b| b.checkpoint.to_string())
                    .unwrap_or_else(|| "-".into()),
                j.checkpoints
                    .iter()
                    .map(u64::to_string)
                    .collect::<Vec<_>>()
                    .join(","),
                j.records_out.to_string(),
                j.event_time_ms.to_string(),
            ]
        })
        .collect();
    let mut t = Table::new(&[
        ("JOB", Align::Left),
        ("BASE", Align::Right),
        ("DIVERGED CHECKPOINTS", Align::Left),
        ("RECORDS OUT", Align::Right),
        ("EVENT MS", Align::Right),
    ]);
    for r in rows {
        t.row(r);
    }
    for line in t.render().lines() {
        let _ = writeln!(out, "  {line}");
    }
    let _ = writeln!(
        out,
        "  (their manifests are archived under jobs/<id>/diverged/ in {}'s store)",
        d.region
    );
}

/// The named jobs, or every job under `root`'s `jobs/`.
async fn jobs(root: &StorageLocation, named: &[String]) -> anyhow::Result<Vec<JobId>> {
    if !named.is_empty() {
        return named
            .iter()
            .map(|n| {
                n.parse::<JobId>()
                    .map_err(|e| anyhow::anyhow!("--job {n}: {e} (give the full 32-hex-digit id)"))
            })
            .collect();
    }
    Ok(ferry_jobmanager::store::job_ids(root).await?)
}

async fn replicate(
    from: &str,
    to: &str,
    named: &[String],
    output: Output,
) -> anyhow::Result<ExitCode> {
    let source = StorageLocation::open(from)?;
    let target = StorageLocation::open(to)?;
    let ids = jobs(&source, named).await?;
    let mut copies: Vec<JobCopy> = Vec::new();
    let mut failed = false;
    for id in &ids {
        eprintln!("replicating job {id} ...");
        match replicate_job(&source, &target, id).await {
            Ok(c) => {
                failed |= !c.skipped.is_empty();
                copies.push(c);
            }
            Err(e) => {
                failed = true;
                eprintln!("error: job {id}: {e}");
            }
        }
    }
    let raw = json!(copies.iter().map(|c| json!({
        "job": c.job.map(|j| j.to_string()),
        "spec_copied": c.spec_copied,
        "newest_checkpoint": c.newest().map(|n| n.checkpoint),
        "copied": c.copied.iter().filter(|x| !x.already_complete).map(|x| json!({
            "dir": x.dir, "checkpoint": x.checkpoint, "files_copied": x.files_copied,
            "files_present": x.files_present, "bytes": x.bytes_copied, "retries": x.retries,
        })).collect::<Vec<_>>(),
        "skipped": c.skipped.iter().map(|(d, why)| json!({"dir": d, "reason": why})).collect::<Vec<_>>(),
        "removed": c.removed,
    })).collect::<Vec<_>>());
    print_result(output, &raw, |out| {
        let _ = writeln!(
            out,
            "{:<34} {:>8} {:>8} {:>8} {:>12} {:>8} {:>8}",
            "JOB", "NEWEST", "COPIED", "FILES", "BYTES", "RETRIES", "SKIPPED"
        );
        for c in &copies {
            let new: Vec<_> = c.copied.iter().filter(|x| !x.already_complete).collect();
            let _ = writeln!(
                out,
                "{:<34} {:>8} {:>8} {:>8} {:>12} {:>8} {:>8}",
                c.job.map(|j| j.to_string()).unwrap_or_default(),
                c.newest()
                    .map(|n| n.checkpoint.to_string())
                    .unwrap_or_else(|| "-".into()),
                new.len(),
                new.iter().map(|x| x.files_copied).sum::<usize>(),
                new.iter().map(|x| x.bytes_copied).sum::<u64>(),
                new.iter().map(|x| x.retries).sum::<u32>(),
                c.skipped.len()
            );
            for (dir, why) in &c.skipped {
                let _ = writeln!(out, "  skipped {dir}: {why}");
            }
        }
    });
    Ok(if failed {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}

async fn verify(store: &str, named: &[String], output: Output) -> anyhow::Result<ExitCode> {
    let root = StorageLocation::open(store)?;
    let ids = jobs(&root, named).await?;
    let mut results: Vec<Verification> = Vec::new();
    for id in &ids {
        results.push(verify_job(&root, id, &RuntimeCheck).await?);
    }
    let failed = results
        .iter()
        .any(|v| v.error.is_some() || v.checkpoints.iter().any(|c| !c.ok));
    let raw = serde_json::to_value(&results)?;
    print_result(output, &raw, |out| {
        let _ = writeln!(
            out,
            "{:<34} {:>12} {:>14} {:>7}",
            "JOB", "CHECKPOINTS", "LAST VERIFIED", "FAILED"
        );
        for v in &results {
            let bad: Vec<_> = v.checkpoints.iter().filter(|c| !c.ok).collect();
            let _ = writeln!(
                out,
                "{:<34} {:>12} {:>14} {:>7}",
                v.job,
                v.checkpoints.len(),
                v.last_verified()
                    .map(|n| n.to_string())
                    .unwrap_or_else(|| "-".into()),
                bad.len()
            );
            if let Some(e) = &v.error {
                let _ = writeln!(out, "  {e}");
            }
            for c in bad {
                let _ = writeln!(
                    out,
                    "  checkpoint {}: {}",
                    c.checkpoint,
                    c.error.as_deref().unwrap_or("")
                );
            }
        }
    });
    Ok(if failed {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}

fn print_status(v: &RegionsStatus, out: &mut String) {
    let _ = writeln!(
        out,
        "this region: {} (answered by {}{})",
        v.region.as_deref().unwrap_or("-"),
        v.instance,
        v.region_role
            .map(|r| format!(", region role {r}"))
            .unwrap_or_default()
    );
    if let Some(p) = &v.primary {
        let _ = writeln!(out, "primary:     {p} (region epoch {})", v.epoch);
    }
    let reachable = v.global_reachable != Some(false);
    if !reachable {
        let _ = writeln!(
            out,
            "global KV:   UNREACHABLE (no write succeeded within regions.timeout: no quorum, or cut off); the health below is the last seen and may be stale"
        );
    }
    if !v.regions.is_empty() {
        let rows: Vec<Vec<String>> = v
            .regions
            .iter()
            .map(|r| {
                vec![
                    r.region.clone(),
                    if v.primary.as_deref() == Some(r.region.as_str()) {
                        "primary".into()
                    } else {
                        "standby".into()
                    },
                    match (reachable, r.healthy) {
                        (false, _) => "unknown".into(),
                        (true, true) => "yes".into(),
                        (true, false) => "NO".into(),
                    },
                    r.heartbeat_age_ms
                        .map(|a| format!("{a} ms"))
                        .unwrap_or_else(|| "never".into()),
                    r.heartbeat
                        .as_ref()
                        .map(|h| h.leader.clone())
                        .unwrap_or_else(|| "-".into()),
                ]
            })
            .collect();
        let mut t = Table::new(&[
            ("REGION", Align::Left),
            ("ROLE", Align::Left),
            ("HEALTHY", Align::Left),
            ("HEARTBEAT AGE", Align::Right),
            ("LEADER", Align::Left),
        ]);
        for r in rows {
            t.row(r);
        }
        out.push('\n');
        out.push_str(&t.render());
    }
    if !v.standbys.is_empty() {
        let rows: Vec<Vec<String>> = v
            .standbys
            .iter()
            .map(|s| {
                vec![
                    s.region.clone(),
                    format!("{:.3}", s.lag_seconds),
                    s.lag_checkpoints.to_string(),
                    s.lag_records.to_string(),
                    s.last_error.clone().unwrap_or_else(|| "-".into()),
                ]
            })
            .collect();
        let mut t = Table::new(&[
            ("REPLICA", Align::Left),
            ("LAG S", Align::Right),
            ("LAG CKPTS", Align::Right),
            ("LAG RECORDS", Align::Right),
            ("LAST ERROR", Align::Left),
        ]);
        for r in rows {
            t.row(r);
        }
        out.push('\n');
        out.push_str(&t.render());
    }
    if let Some(note) = &v.note {
        let _ = writeln!(out, "{note}");
    }
}

/// What the replicator needs to know of a completed checkpoint.
pub fn replication_event(
    c: ferry_jobmanager::CompletedCheckpoint,
) -> ferry_region::CheckpointEvent {
    ferry_region::CheckpointEvent {
        job: c.job,
        root: c.root,
        dir: c.dir,
        checkpoint: c.checkpoint,
        completed_at: c.completed_at,
        records_in: c.records_in,
        watermark: c.watermark,
    }
}
