//! The replication benchmark (`ferry bench replication`): cross-region
//! replication lag while a job runs. An embedded JobManager runs a keyed
//! windowed job (10,000 keys of window state) for a while; the same
//! replicator `ferry jobmanager` uses copies every completed checkpoint to
//! a second store. Measured per checkpoint: the time from its completion
//! to its manifest being in the standby store, and the lag in seconds
//! sampled every 100 ms (the `ferry_replication_lag_seconds` value).

use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry_core::spec::parse_and_validate;
use ferry_core::storage::StorageLocation;
use ferry_jobmanager::service::SubmitOptions;
use ferry_jobmanager::{JobManager, JobManagerConfig};
use serde::Serialize;

use crate::Stats;

/// What to measure.
#[derive(Clone, Debug)]
pub struct ReplicationOptions {
    /// How long the job runs.
    pub seconds: u64,
    /// Checkpoint interval of the job.
    pub checkpoint_interval: String,
    /// Events per second the job reads.
    pub rate: u64,
    /// Primary store (a temp dir by default).
    pub from: Option<String>,
    /// Standby store (a temp dir by default).
    pub to: Option<String>,
}

/// Times in ms with how many there are.
#[derive(Serialize, Clone, Copy, Debug)]
pub struct Sampled {
    pub p50: f64,
    pub p99: f64,
    pub max: f64,
    pub n: usize,
}

impl Sampled {
    fn of(sorted: &[f64]) -> Self {
        let s = Stats::of(sorted);
        Self {
            p50: s.p50,
            p99: s.p99,
            max: s.max,
            n: sorted.len(),
        }
    }
}

/// The benchmark's result.
#[derive(Serialize, Clone, Debug)]
pub struct ReplicationReport {
    pub checkpoint_interval_ms: f64,
    pub snapshots_replicated: u64,
    pub bytes_replicated: u64,
    pub retries: u64,
    pub completion_to_standby_ms: Sampled,
    pub lag_seconds_sampled_ms: Sampled,
    /// Lag p99 should stay within the checkpoint interval + 500 ms.
    pub target_ms: f64,
}

impl ReplicationReport {
    /// The results as a Markdown table and notes, as `ferry bench` prints
    /// them (and docs/benchmarks.md records them).
    pub fn markdown(&self) -> String {
        use std::fmt::Write as _;
        let r = self;
        let mut out = String::new();
        let (l, g) = (&r.completion_to_standby_ms, &r.lag_seconds_sampled_ms);
        let _ = writeln!(out, "| measure | n | p50 ms | p99 ms | max ms |");
        let _ = writeln!(out, "|---|---|---|---|---|");
        let _ = writeln!(
            out,
            "| checkpoint completed → manifest in standby | {} | {:.1} | {:.1} | {:.1} |",
            l.n, l.p50, l.p99, l.max
        );
        let _ = writeln!(
            out,
            "| replication lag (sampled every 100 ms) | {} | {:.1} | {:.1} | {:.1} |",
            g.n, g.p50, g.p99, g.max
        );
        let _ = writeln!(
            out,
            "{} snapshots, {} bytes replicated, {} retries; target: lag p99 ≤ checkpoint interval + 500 ms = {:.0} ms",
            r.snapshots_replicated, r.bytes_replicated, r.retries, r.target_ms
        );
        out
    }
}

/// What the benchmark reports when the job started.
#[derive(Clone, Debug)]
pub struct Started {
    pub job: ferry_core::JobId,
    pub from: String,
    pub to: String,
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

/// Runs the benchmark (on a multi-threaded runtime), telling `started`
/// when the job runs.
pub async fn run(
    a: &ReplicationOptions,
    started: impl FnOnce(Started),
) -> anyhow::Result<ReplicationReport> {
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
        access: ferry_core::access::AccessPolicy::unrestricted(),
    });
    let replicator = Arc::new(ferry_region::Replicator::new(
        vec![ferry_region::Standby {
            region: "standby".into(),
            store: standby,
        }],
        ferry_region::WriteFence::unfenced(),
    ));
    let mut completed = jm.subscribe_completed();
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok(c) = completed.recv().await {
            let _ = tx.send(ferry_region::CheckpointEvent::from(c));
        }
    });
    let stop = tokio_util::sync::CancellationToken::new();
    let r = replicator.clone();
    let s = stop.clone();
    let replicating = tokio::spawn(async move { r.run(rx, s.cancelled_owned()).await });
    let text = spec(a.rate, &a.checkpoint_interval);
    let spec = parse_and_validate(&text).map_err(|e| anyhow::anyhow!("{e}"))?;
    let info = jm.submit_spec(spec, SubmitOptions::default()).await?;
    started(Started {
        job: info.id,
        from: from.clone(),
        to: to.clone(),
    });
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
    Ok(ReplicationReport {
        checkpoint_interval_ms: interval_ms,
        snapshots_replicated: status.snapshots_replicated,
        bytes_replicated: status.bytes_replicated,
        retries: status.retries,
        completion_to_standby_ms: Sampled::of(&lat),
        lag_seconds_sampled_ms: Sampled::of(&lag_samples),
        target_ms: interval_ms + 500.0,
    })
}
