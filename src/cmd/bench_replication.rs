//! `ferry bench replication`: cross-region replication lag while a job
//! runs. An embedded JobManager runs a keyed windowed job (10,000 keys of
//! window state, checkpoints every `--checkpoint-interval`) for
//! `--seconds`; the same replicator `ferry jobmanager` uses copies every
//! completed checkpoint to a second store (`--to`, a temp dir by default).
//! Reports, per checkpoint, the time from its completion to its manifest
//! being in the standby store, and the lag in seconds sampled every 100 ms
//! (the `ferry_replication_lag_seconds` value), p50/p99/max.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry_core::spec::parse_and_validate;
use ferry_core::storage::StorageLocation;
use ferry_jobmanager::service::SubmitOptions;
use ferry_jobmanager::{JobManager, JobManagerConfig};

use super::bench::percentile;

#[derive(clap::Args, Debug)]
pub struct ReplicationArgs {
    /// How long the job runs.
    #[arg(long, default_value_t = 60)]
    pub seconds: u64,
    /// Checkpoint interval of the job.
    #[arg(long, default_value = "1s")]
    pub checkpoint_interval: String,
    /// Events per second the job reads.
    #[arg(long, default_value_t = 200_000)]
    pub rate: u64,
    /// Primary store (a temp dir by default).
    #[arg(long, value_name = "URL")]
    pub from: Option<String>,
    /// Standby store (a temp dir by default).
    #[arg(long, value_name = "URL")]
    pub to: Option<String>,
    /// Print results as JSON.
    #[arg(long)]
    pub json: bool,
}

fn spec(rate: u64, interval: &str) -> String {
    format!(
        r#"
apiVersion: ferry.dev/v1
kind: Job
metadata: {{name: bench-replication}}
spec:
  parallelism: 2
  checkpointing: {{interval: {interval}, retained: 3}}
  restartStrategy: {{type: none}}
  source:
    generator:
      partitions: 2
      rate: {rate}
      eventTime: {{step: 1ms, maxOutOfOrderness: 100ms}}
      fields:
        key: {{type: key, cardinality: 10000}}
  operators:
    - key_by: key
    - window: {{tumbling: 1m, aggregate: {{count: count}}}}
  sink:
    blackhole: {{}}
"#
    )
}

pub fn run(a: ReplicationArgs) -> anyhow::Result<ExitCode> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(run_async(a))
}

async fn run_async(a: ReplicationArgs) -> anyhow::Result<ExitCode> {
    let tmp = tempfile::tempdir()?;
    let from = a
        .from
        .clone()
        .unwrap_or_else(|| format!("file://{}/primary", tmp.path().display()));
    let to =
        a.to.clone()
            .unwrap_or_else(|| format!("file://{}/standby", tmp.path().display()));
    let standby = StorageLocation::open(&to)?;
    let jm = JobManager::new(JobManagerConfig {
        data_url: from.clone(),
        instance_id: "bench".into(),
    });
    let replicator = Arc::new(ferry_region::Replicator::new(vec![ferry_region::Standby {
        region: "standby".into(),
        store: standby,
    }]));
    let mut completed = jm.subscribe_completed();
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok(c) = completed.recv().await {
            let _ = tx.send(super::region::replication_event(c));
        }
    });
    let stop = tokio_util::sync::CancellationToken::new();
    let r = replicator.clone();
    let s = stop.clone();
    let replicating = tokio::spawn(async move { r.run(rx, s.cancelled_owned()).await });
    let text = spec(a.rate, &a.checkpoint_interval);
    let spec = parse_and_validate(&text).map_err(|e| anyhow::anyhow!("{e}"))?;
    let info = jm.submit_spec(spec, SubmitOptions::default()).await?;
    eprintln!(
        "replication benchmark: job {} checkpoints every {} to {from}, replicated to {to}; {} s",
        info.id, a.checkpoint_interval, a.seconds
    );
    let mut lag_samples = Vec::new();
    let t0 = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    while t0.elapsed() < Duration::from_secs(a.seconds) {
        tick.tick().await;
        if let Some(s) = replicator.status().first() {
            lag_samples.push(s.lag_seconds * 1000.0);
        }
    }
    jm.shutdown(false).await;
    // Let the last announced snapshots arrive, bounded.
    let drain = Instant::now();
    while replicator
        .status()
        .first()
        .is_some_and(|s| s.lag_checkpoints > 0)
        && drain.elapsed() < Duration::from_secs(10)
    {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop.cancel();
    let _ = replicating.await;
    let status = replicator.status().into_iter().next().unwrap_or_default();
    let mut lat = replicator.latencies();
    lat.sort_by(f64::total_cmp);
    lag_samples.sort_by(f64::total_cmp);
    let interval_ms = humantime::parse_duration(&a.checkpoint_interval)?.as_secs_f64() * 1e3;
    let (l50, l99, lmax) = (
        percentile(&lat, 50.0),
        percentile(&lat, 99.0),
        lat.last().copied().unwrap_or(f64::NAN),
    );
    let (g50, g99, gmax) = (
        percentile(&lag_samples, 50.0),
        percentile(&lag_samples, 99.0),
        lag_samples.last().copied().unwrap_or(f64::NAN),
    );
    if a.json {
        println!(
            "{}",
            serde_json::json!({
                "checkpoint_interval_ms": interval_ms,
                "snapshots_replicated": status.snapshots_replicated,
                "bytes_replicated": status.bytes_replicated,
                "retries": status.retries,
                "completion_to_standby_ms": {"p50": l50, "p99": l99, "max": lmax, "n": lat.len()},
                "lag_seconds_sampled_ms": {"p50": g50, "p99": g99, "max": gmax, "n": lag_samples.len()},
                "target_ms": interval_ms + 500.0,
            })
        );
    } else {
        println!("| measure | n | p50 ms | p99 ms | max ms |");
        println!("|---|---|---|---|---|");
        println!(
            "| checkpoint completed → manifest in standby | {} | {l50:.1} | {l99:.1} | {lmax:.1} |",
            lat.len()
        );
        println!(
            "| replication lag (sampled every 100 ms) | {} | {g50:.1} | {g99:.1} | {gmax:.1} |",
            lag_samples.len()
        );
        println!(
            "{} snapshots, {} bytes replicated, {} retries; target: lag p99 ≤ checkpoint interval + 500 ms = {:.0} ms",
            status.snapshots_replicated,
            status.bytes_replicated,
            status.retries,
            interval_ms + 500.0
        );
    }
    Ok(ExitCode::SUCCESS)
}
