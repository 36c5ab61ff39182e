//! `ferry region replicate|verify`: the cross-region tools that work on
//! object stores directly. `replicate` makes one replication pass of every
//! job (or the named ones) from one region's store to another's — the same
//! incremental, hash-verified, manifest-last copy the region coordinator
//! runs after each checkpoint; `verify` test-restores every complete
//! checkpoint in a store (hashes plus decoding all state with the streaming
//! runtime) and exits 1 if any would not restore.

use std::fmt::Write as _;
use std::process::ExitCode;

use ferry_core::JobId;
use ferry_core::manifest::VerifiedCheckpoint;
use ferry_core::storage::StorageLocation;
use ferry_region::{JobCopy, RestoreCheck, Verification, replicate_job, verify_job};
use ferry_taskmanager::runtime::{JobPlan, check_restore};
use serde_json::json;

use super::job::{Output, print_result};

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
    /// primary region's JobManagers): every job stops with a savepoint, the
    /// savepoints reach the target's store, the region lease moves, and
    /// the target resumes every job from its savepoint — nothing lost,
    /// nothing repeated.
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
            } => {
                let client = super::job::Client::new(&api)?;
                let path = format!("/v1/regions/{to}/failover?force={force}&dry_run={dry_run}");
                if !dry_run {
                    eprintln!(
                        "{} to {to} ...",
                        if force {
                            "forcing the failover"
                        } else {
                            "switching over (savepoints, replication, lease)"
                        }
                    );
                }
                match client
                    .call::<serde_json::Value>(reqwest::Method::POST, &path, None)
                    .await
                {
                    Ok((raw, v)) => {
                        print_result(api.output, &raw, |out| {
                            print_move(out, &v, dry_run, "");
                            for sp in v["savepoints"].as_array().into_iter().flatten() {
                                let _ = writeln!(
                                    out,
                                    "  savepoint {}",
                                    sp["path"].as_str().unwrap_or("")
                                );
                            }
                            if let Some(ms) = v["took_ms"].as_u64() {
                                let _ = writeln!(out, "took {ms} ms");
                            }
                        });
                        Ok(ExitCode::SUCCESS)
                    }
                    Err(f) => Ok(f.report()),
                }
            }
            RegionCommand::Failback { to, dry_run, api } => failback(to, dry_run, &api).await,
            RegionCommand::Status { api } => {
                let client = super::job::Client::new(&api)?;
                match client
                    .call::<serde_json::Value>(reqwest::Method::GET, "/v1/regions", None)
                    .await
                {
                    Ok((raw, v)) => {
                        print_result(api.output, &raw, |out| print_status(&v, out));
                        Ok(ExitCode::SUCCESS)
                    }
                    Err(f) => Ok(f.report()),
                }
            }
        }
    })
}

/// What `GET /v1/regions` says about the regions: the primary and every
/// region's leader URL from its heartbeat.
pub(crate) struct RegionMap {
    pub primary: String,
    pub home: Option<String>,
    pub epoch: u64,
    pub urls: std::collections::BTreeMap<String, String>,
    pub healthy: std::collections::BTreeMap<String, bool>,
}

impl RegionMap {
    pub(crate) fn from_view(v: &serde_json::Value) -> anyhow::Result<Self> {
        let Some(primary) = v["primary"].as_str() else {
            anyhow::bail!(
                "this JobManager reports no primary region: cross-region coordination is not configured (regions.global, see docs/config.md)"
            );
        };
        let mut urls = std::collections::BTreeMap::new();
        let mut healthy = std::collections::BTreeMap::new();
        for r in v["regions"].as_array().into_iter().flatten() {
            let name = r["region"].as_str().unwrap_or_default().to_string();
            if let Some(u) = r["heartbeat"]["api_url"].as_str().filter(|u| !u.is_empty()) {
                urls.insert(name.clone(), u.to_string());
            }
            healthy.insert(name, r["healthy"] == true);
        }
        Ok(Self {
            primary: primary.to_string(),
            home: v["home"].as_str().map(str::to_string),
            epoch: v["epoch"].as_u64().unwrap_or(0),
            urls,
            healthy,
        })
    }

    /// The REST URL of `region`'s leader, or why there is none.
    pub(crate) fn url(&self, region: &str) -> anyhow::Result<String> {
        self.urls.get(region).cloned().ok_or_else(|| {
            anyhow::anyhow!(
                "no JobManager URL is known for region {region} (it has not heartbeat into the global KV); is it running?"
            )
        })
    }
}

/// A client of one JobManager URL.
pub(crate) fn client_for(url: &str, output: Output) -> anyhow::Result<super::job::Client> {
    super::job::Client::new(&super::job::ApiArgs {
        url: vec![url.to_string()],
        output,
    })
}

async fn failback(
    to: Option<String>,
    dry_run: bool,
    api: &super::job::ApiArgs,
) -> anyhow::Result<ExitCode> {
    let client = super::job::Client::new(api)?;
    let view = match client
        .call::<serde_json::Value>(reqwest::Method::GET, "/v1/regions", None)
        .await
    {
        Ok((_, v)) => v,
        Err(f) => return Ok(f.report()),
    };
    let map = RegionMap::from_view(&view)?;
    let Some(target) = to.or(map.home.clone()) else {
        anyhow::bail!("no home region is configured (regions.primary): name the region with --to");
    };
    if target == map.primary {
        anyhow::bail!(
            "{target} is already the primary region (epoch {}): nothing to fail back",
            map.epoch
        );
    }
    let primary_url = map.url(&map.primary)?;
    if !dry_run {
        eprintln!(
            "failing back from {} to {target} (catch-up, savepoints, lease) ...",
            map.primary
        );
    }
    let path = format!("/v1/regions/{target}/failback?dry_run={dry_run}");
    match client_for(&primary_url, api.output)?
        .call::<serde_json::Value>(reqwest::Method::POST, &path, None)
        .await
    {
        Ok((raw, v)) => {
            print_result(api.output, &raw, |out| {
                print_move(out, &v, dry_run, "fail-back ");
                print_divergence(&v["divergence"], out);
                if let Some(ms) = v["took_ms"].as_u64() {
                    let _ = writeln!(out, "took {ms} ms");
                }
            });
            Ok(ExitCode::SUCCESS)
        }
        Err(f) => Ok(f.report()),
    }
}

/// `from -> to (region epoch)` and the plan's steps of a failover or
/// fail-back answer.
fn print_move(out: &mut String, v: &serde_json::Value, dry_run: bool, what: &str) {
    let _ = writeln!(
        out,
        "{}{what}{} -> {} (region epoch {})",
        if dry_run { "plan: " } else { "" },
        v["from"].as_str().unwrap_or("-"),
        v["to"].as_str().unwrap_or("-"),
        v["epoch"]
    );
    for s in v["steps"].as_array().into_iter().flatten() {
        let _ = writeln!(out, "  - {}", s.as_str().unwrap_or(""));
    }
}

/// The divergence report of a fail-back, for people.
fn print_divergence(d: &serde_json::Value, out: &mut String) {
    let jobs = d["jobs"].as_array().cloned().unwrap_or_default();
    let region = d["region"].as_str().unwrap_or("-");
    if jobs.is_empty() {
        let _ = writeln!(
            out,
            "divergence: none ({region} committed nothing beyond what the failover restored)"
        );
        return;
    }
    let _ = writeln!(
        out,
        "divergence: {region} committed {} output records ({} input records, {} ms of event time) after the checkpoints the failover restored from:",
        d["records_out"], d["records_in"], d["event_time_ms"]
    );
    let _ = writeln!(
        out,
        "  {:<34} {:>6} {:<20} {:>12} {:>12}",
        "JOB", "BASE", "DIVERGED CHECKPOINTS", "RECORDS OUT", "EVENT MS"
    );
    for j in jobs {
        let cps: Vec<String> = j["checkpoints"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|c| c.to_string())
            .collect();
        let _ = writeln!(
            out,
            "  {:<34} {:>6} {:<20} {:>12} {:>12}",
            j["job"].as_str().unwrap_or("-"),
            j["base"]["checkpoint"]
                .as_u64()
                .map(|b| b.to_string())
                .unwrap_or_else(|| "-".into()),
            cps.join(","),
            j["records_out"],
            j["event_time_ms"]
        );
    }
    let _ = writeln!(
        out,
        "  (their manifests are archived under jobs/<id>/diverged/ in {region}'s store)"
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

fn print_status(v: &serde_json::Value, out: &mut String) {
    let _ = writeln!(
        out,
        "this region: {} (answered by {}, {})",
        v["region"].as_str().unwrap_or("-"),
        v["instance"].as_str().unwrap_or("-"),
        v["role"].as_str().unwrap_or("-")
    );
    if v["global_reachable"] == false {
        let _ = writeln!(out, "global KV:   UNREACHABLE (region health unknown)");
    }
    if let Some(regions) = v["regions"].as_array().filter(|r| !r.is_empty()) {
        let _ = writeln!(
            out,
            "\n{:<16} {:<8} {:>14}  LEADER",
            "REGION", "HEALTHY", "HEARTBEAT AGE"
        );
        for r in regions {
            let age = r["heartbeat_age_ms"]
                .as_u64()
                .map(|a| format!("{a} ms"))
                .unwrap_or_else(|| "never".into());
            let _ = writeln!(
                out,
                "{:<16} {:<8} {:>14}  {}",
                r["region"].as_str().unwrap_or("-"),
                if r["healthy"] == true { "yes" } else { "NO" },
                age,
                r["heartbeat"]["leader"].as_str().unwrap_or("-")
            );
        }
    }
    if let Some(standbys) = v["standbys"].as_array().filter(|s| !s.is_empty()) {
        let _ = writeln!(
            out,
            "\n{:<16} {:>10} {:>12} {:>12}  LAST ERROR",
            "REPLICA", "LAG S", "LAG CKPTS", "LAG RECORDS"
        );
        for s in standbys {
            let _ = writeln!(
                out,
                "{:<16} {:>10.3} {:>12} {:>12}  {}",
                s["region"].as_str().unwrap_or("-"),
                s["lag_seconds"].as_f64().unwrap_or(0.0),
                s["lag_checkpoints"],
                s["lag_records"],
                s["last_error"].as_str().unwrap_or("-")
            );
        }
    }
    if let Some(note) = v["note"].as_str() {
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
