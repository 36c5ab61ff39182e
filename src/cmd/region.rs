//! `ferry region replicate|verify`: the cross-region tools that work on
//! object stores directly. `replicate` makes one replication pass of every
//! job (or the named ones) from one region's store to another's — the same
//! incremental, hash-verified, manifest-last copy the region coordinator
//! runs after each checkpoint; `verify` test-restores every complete
//! checkpoint in a store (hashes plus decoding all state with the streaming
//! runtime) and exits 1 if any would not restore.

use std::fmt::Write as _;
use std::process::ExitCode;

use ferry_client::regions::RegionMap;
use ferry_client::{Client, text};
use ferry_core::JobId;
use ferry_core::storage::StorageLocation;
use ferry_region::{JobCopy, Verification, WriteFence, replicate_job, verify_job};
use serde_json::json;

use super::job::{Output, client, print_result, report_failure, show};

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
                Ok(show(api.output, call, text::regions))
            }
        }
    })
}

/// The region map from `/v1/regions` through `client`; a failed request
/// is shown first.
pub(crate) async fn read_map(client: &Client) -> anyhow::Result<RegionMap> {
    read_map_within(client, std::time::Duration::ZERO).await
}

/// [`read_map`], waiting up to `limit` for a JobManager that has not read
/// the region lease yet (one that just started) to learn the primary.
pub(crate) async fn read_map_within(
    client: &Client,
    limit: std::time::Duration,
) -> anyhow::Result<RegionMap> {
    let deadline = std::time::Instant::now() + limit;
    loop {
        let status = match client.regions().await {
            Ok(a) => a.value,
            Err(e) => {
                let _ = report_failure(&e);
                anyhow::bail!("cannot read /v1/regions (see above)")
            }
        };
        // Coordinating regions but not yet knowing the primary.
        if status.primary.is_none()
            && status.region_role.is_some()
            && std::time::Instant::now() < deadline
        {
            tokio::time::sleep(std::time::Duration::from_millis(250)).await;
            continue;
        }
        return RegionMap::from_status(status);
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
    let map = read_map_within(&entry, std::time::Duration::from_secs(10)).await?;
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
    Ok(show(api.output, call, text::switchover))
}

async fn failback(
    to: Option<String>,
    dry_run: bool,
    wait: std::time::Duration,
    api: &super::job::ApiArgs,
) -> anyhow::Result<ExitCode> {
    let client = client(api)?;
    // A JobManager that just started may not have read the lease yet.
    let map = read_map_within(&client, wait.min(std::time::Duration::from_secs(30))).await?;
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
    // Right after a failover the jobs here may still be starting: the
    // server refuses with a conflict that says to retry. Retry those, once
    // a second, within the same wait.
    let deadline = std::time::Instant::now() + wait;
    let primary = client.for_url(&primary_url)?;
    let call = loop {
        let call = primary.failback(&target, dry_run, Some(wait)).await;
        match &call {
            Err(e @ ferry_client::Error::Api { body: Some(b), .. })
                if e.code() == Some("conflict")
                    && b.error.message.contains("retry")
                    && std::time::Instant::now() + std::time::Duration::from_secs(1) < deadline =>
            {
                eprintln!("not yet: {}; retrying in 1 s", b.error.message);
                tokio::time::sleep(std::time::Duration::from_secs(1)).await;
            }
            _ => break call,
        }
    };
    Ok(show(api.output, call, text::failback))
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
        match replicate_job(&source, &target, id, &WriteFence::unfenced()).await {
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
        results.push(verify_job(&root, id, &ferry_jobmanager::RuntimeCheck).await?);
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
