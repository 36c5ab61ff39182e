//! The replication benchmark (`ferry bench replication`): cross-region
//! replication lag while a job runs. An embedded JobManager runs a keyed
//! windowed job (10,000 keys of window state) for a while; the same
//! replicator `ferry jobmanager` uses copies every completed checkpoint to
//! a second store. Measured per checkpoint: the time from its completion
//! to its manifest being in the standby store, and the lag in seconds
//! sampled every 100 ms (the `ferry_replication_lag_seconds` value).
//!
//! With `--compare-sync`, a second embedded JobManager runs the same job
//! in the same run under synchronous replication (`regions.replication:
//! sync`, the copy inside every checkpoint), and both jobs' checkpoint
//! durations — trigger to completion — are compared.
//!
//! With `--rtt`, the standby store is an S3-compatible server
//! ([`crate::s3`]) reached through a WAN-like link
//! ([`ferry_testkit::wan`]) with that round-trip time (and `--bandwidth`),
//! while the primary store stays local: a standby region that far away.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::bail;
use ferry_core::spec::parse_and_validate;
use ferry_core::storage::StorageLocation;
use ferry_jobmanager::service::SubmitOptions;
use ferry_jobmanager::{JobManager, JobManagerConfig};
use ferry_testkit::wan::{WanLink, WanSettings};
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::Stats;
use crate::s3::S3Server;

/// What to measure.
#[derive(Clone, Debug)]
pub struct ReplicationOptions {
    /// How long to measure (after `warmup`).
    pub seconds: u64,
    /// Checkpoint interval of the job.
    pub checkpoint_interval: String,
    /// Events per second the job reads.
    pub rate: u64,
    /// Primary store (a temp dir by default).
    pub from: Option<String>,
    /// Standby store (a temp dir by default).
    pub to: Option<String>,
    /// Round-trip time to the standby store (an S3-compatible server
    /// behind a WAN-like link); `None`: the store as it is.
    pub rtt: Option<Duration>,
    /// Bandwidth of that link in bytes per second, each way.
    pub bandwidth: Option<u64>,
    /// Also run the job under synchronous replication and compare.
    pub compare_sync: bool,
    /// Run this long before measuring (not part of `seconds`).
    pub warmup: Duration,
    /// Distinct keys of the job's window state.
    pub keys: u64,
    /// String keys `<prefix><n>` instead of integers.
    pub key_prefix: Option<String>,
    /// Size of the job's tumbling window.
    pub window: String,
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

/// The job under synchronous replication, beside the asynchronous one.
#[derive(Serialize, Clone, Debug)]
pub struct SyncComparison {
    /// Its checkpoints, trigger to completion (the copy included).
    pub checkpoint_ms: Sampled,
    /// The copy into the standby store alone.
    pub copy_ms: Sampled,
    /// Sync checkpoint p99 should stay within the async job's p99 + 3
    /// round trips (with `--rtt`).
    pub target_ms: Option<f64>,
}

/// The benchmark's result.
#[derive(Serialize, Clone, Debug)]
pub struct ReplicationReport {
    /// Round-trip time to the standby store, if a link set one.
    pub rtt_ms: Option<f64>,
    pub bandwidth_bytes_per_second: Option<u64>,
    /// Run before measuring, ms.
    pub warmup_ms: f64,
    pub checkpoint_interval_ms: f64,
    pub snapshots_replicated: u64,
    pub bytes_replicated: u64,
    pub retries: u64,
    pub completion_to_standby_ms: Sampled,
    pub lag_seconds_sampled_ms: Sampled,
    /// Lag p99 should stay within the checkpoint interval + 500 ms.
    pub target_ms: f64,
    /// The asynchronously replicated job's checkpoints, trigger to
    /// completion.
    pub checkpoint_ms: Sampled,
    pub sync: Option<SyncComparison>,
}

impl ReplicationReport {
    /// The results as a Markdown table and notes, as `ferry bench` prints
    /// them (and docs/benchmarks.md records them).
    pub fn markdown(&self) -> String {
        use std::fmt::Write as _;
        let r = self;
        let mut out = String::new();
        let (l, g) = (&r.completion_to_standby_ms, &r.lag_seconds_sampled_ms);
        match (r.rtt_ms, r.bandwidth_bytes_per_second) {
            (Some(rtt), Some(bw)) => {
                let _ = writeln!(
                    out,
                    "standby store {rtt:.0} ms round trip away, {:.1} MB/s each way\n",
                    bw as f64 / 1e6
                );
            }
            (Some(rtt), None) => {
                let _ = writeln!(out, "standby store {rtt:.0} ms round trip away\n");
            }
            _ => {}
        }
        if r.warmup_ms > 0.0 {
            let _ = writeln!(
                out,
                "measured after {:.0} s of warm-up\n",
                r.warmup_ms / 1e3
            );
        }
        let _ = writeln!(out, "| measure | n | p50 ms | p99 ms | max ms |");
        let _ = writeln!(out, "|---|---|---|---|---|");
        let row = |out: &mut String, what: &str, s: &Sampled| {
            let _ = writeln!(
                out,
                "| {what} | {} | {:.1} | {:.1} | {:.1} |",
                s.n, s.p50, s.p99, s.max
            );
        };
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
            "{} snapshots, {} bytes replicated ({:.0} per snapshot), {} retries; target: lag p99 ≤ checkpoint interval + 500 ms = {:.0} ms",
            r.snapshots_replicated,
            r.bytes_replicated,
            r.bytes_replicated as f64 / r.snapshots_replicated.max(1) as f64,
            r.retries,
            r.target_ms
        );
        if let Some(sync) = &r.sync {
            let _ = writeln!(
                out,
                "\n| the same job, checkpoint trigger → completed | n | p50 ms | p99 ms | max ms |"
            );
            let _ = writeln!(out, "|---|---|---|---|---|");
            row(&mut out, "regions.replication: async", &r.checkpoint_ms);
            row(&mut out, "regions.replication: sync", &sync.checkpoint_ms);
            row(
                &mut out,
                "(sync: the copy into the standby store)",
                &sync.copy_ms,
            );
            if let Some(t) = sync.target_ms {
                let _ = writeln!(
                    out,
                    "target: sync p99 ≤ async p99 + 3 round trips = {t:.0} ms ({})",
                    if sync.checkpoint_ms.p99 <= t {
                        "met"
                    } else {
                        "missed"
                    }
                );
            }
        }
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

fn spec(a: &ReplicationOptions) -> String {
    let (rate, interval, keys, window) = (a.rate, &a.checkpoint_interval, a.keys, &a.window);
    let prefix = a
        .key_prefix
        .as_ref()
        .map(|p| format!(", prefix: {p:?}"))
        .unwrap_or_default();
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
        key: {{type: key, cardinality: {keys}{prefix}}}
  operators:
    - key_by: key
    - window: {{tumbling: {window}, aggregate: {{count: count}}}}
  sink:
    blackhole: {{}}
"#
    )
}

/// One embedded JobManager running the benchmark's job.
struct Side {
    jm: JobManager,
    /// Checkpoint id → (trigger-to-completion ms, when first seen),
    /// sampled from the status.
    durations: Arc<std::sync::Mutex<std::collections::BTreeMap<u64, (f64, Instant)>>>,
}

impl Side {
    async fn start(
        data_url: &str,
        name: &str,
        text: &str,
    ) -> anyhow::Result<(JobManager, ferry_core::JobId)> {
        let jm = JobManager::new(JobManagerConfig {
            data_url: data_url.to_string(),
            instance_id: name.into(),
            access: ferry_core::access::AccessPolicy::unrestricted(),
        });
        let spec = parse_and_validate(text).map_err(|e| anyhow::anyhow!("{e}"))?;
        let info = jm.submit_spec(spec, SubmitOptions::default()).await?;
        Ok((jm, info.id))
    }

    /// Samples the job's last checkpoint every 50 ms (checkpoints come
    /// every interval or longer) until `stop`.
    fn watch(jm: JobManager, job: ferry_core::JobId, stop: CancellationToken) -> Self {
        let durations = Arc::new(std::sync::Mutex::new(std::collections::BTreeMap::new()));
        let (d, j, id) = (durations.clone(), jm.clone(), job.to_string());
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(50));
            while !stop.is_cancelled() {
                tick.tick().await;
                if let Ok(info) = j.get(&id)
                    && let Some(c) = info.last_checkpoint
                    && c.kind == "checkpoint"
                {
                    d.lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .entry(c.id)
                        .or_insert((c.duration_ms as f64, Instant::now()));
                }
            }
        });
        Self { jm, durations }
    }

    /// The checkpoints that completed after `after`.
    fn checkpoint_ms(&self, after: Instant) -> Sampled {
        let mut v: Vec<f64> = self
            .durations
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .filter(|(_, at)| *at > after)
            .map(|(ms, _)| *ms)
            .collect();
        v.sort_by(f64::total_cmp);
        Sampled::of(&v)
    }
}

/// Starts an S3-compatible server with its log under `dir` and a link to
/// it like `link`: the store `s3://standby` through the link.
async fn distant_store(
    dir: &std::path::Path,
    link: WanSettings,
) -> anyhow::Result<(S3Server, WanLink, StorageLocation)> {
    let s3 = S3Server::start(dir)?;
    s3.create_bucket("standby").await?;
    let wan = WanLink::start(std::net::SocketAddr::from(([127, 0, 0, 1], s3.port)), link).await?;
    let store = StorageLocation::open_with(
        "s3://standby/ferry",
        Some(&S3Server::settings(&wan.http_url())),
    )?;
    Ok((s3, wan, store))
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
    // A distant standby: an S3-compatible server behind a WAN-like link;
    // one each for the asynchronous and the synchronous job, so that
    // neither waits behind the other's requests in the (single-threaded)
    // S3 stand-in.
    let mut _distant = Vec::new();
    let (standby, sync_standby, to) = match a.rtt {
        Some(rtt) => {
            if a.to.is_some() {
                bail!(
                    "--rtt puts the standby store on a local S3-compatible server behind a WAN-like link; leave out --to"
                );
            }
            let link = WanSettings {
                rtt,
                bandwidth: a.bandwidth,
            };
            let (s3, wan, standby) = distant_store(&tmp.path().join("s3-async"), link).await?;
            _distant.push((s3, wan));
            let sync = if a.compare_sync {
                let (s3, wan, store) = distant_store(&tmp.path().join("s3-sync"), link).await?;
                _distant.push((s3, wan));
                store
            } else {
                standby.clone()
            };
            let to = format!("s3://standby (via a {} ms link)", rtt.as_millis());
            (standby, sync, to)
        }
        None => {
            let to =
                a.to.clone()
                    .unwrap_or_else(|| format!("file://{}/standby", tmp.path().display()));
            let standby = StorageLocation::open(&to)?;
            let sync = standby.child("sync-standby");
            (standby, sync, to)
        }
    };
    let replicator = Arc::new(ferry_region::Replicator::new(
        vec![ferry_region::Standby {
            region: "standby".into(),
            store: standby,
        }],
        ferry_region::WriteFence::unfenced(),
    ));
    let text = spec(a);
    let (jm, job) = Side::start(&from, "bench", &text).await?;
    let mut completed = jm.subscribe_completed();
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok(c) = completed.recv().await {
            let _ = tx.send(ferry_region::CheckpointEvent::from(c));
        }
    });
    let stop = CancellationToken::new();
    let r = replicator.clone();
    let s = stop.clone();
    let replicating = tokio::spawn(async move { r.run(rx, s.cancelled_owned()).await });
    // The same job under synchronous replication, beside it.
    let sync = match a.compare_sync {
        false => None,
        true => {
            let from_sync = format!("{}/sync-primary", from.trim_end_matches('/'));
            let (jm, job) = Side::start(&from_sync, "bench-sync", &text).await?;
            let replicator = Arc::new(ferry_region::SyncReplicator::new(
                vec![ferry_region::Standby {
                    region: "standby".into(),
                    store: sync_standby,
                }],
                ferry_region::SyncSettings {
                    required: 1,
                    on_loss: ferry_core::config::OnStandbyLoss::Block,
                    timeout: Duration::from_secs(30),
                },
                ferry_region::WriteFence::unfenced(),
            ));
            jm.set_sync_replication(replicator.clone());
            Some((Side::watch(jm, job, stop.clone()), replicator))
        }
    };
    let side = Side::watch(jm.clone(), job, stop.clone());
    started(Started {
        job,
        from: from.clone(),
        to: to.clone(),
    });
    // Warm-up: the first pass reconciles in full, the first synchronous
    // copy brings the job's spec, connections are opened; none of it is
    // measured.
    tokio::time::sleep(a.warmup).await;
    let measured_from = Instant::now();
    let skip_lat = replicator.latencies().len();
    let skip_copies = sync.as_ref().map_or(0, |(_, r)| r.latencies().len());
    let mut lag_samples = Vec::new();
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    while measured_from.elapsed() < Duration::from_secs(a.seconds) {
        tick.tick().await;
        if let Some(s) = replicator.status().first() {
            lag_samples.push(s.lag_seconds * 1000.0);
        }
    }
    let checkpoint_ms = side.checkpoint_ms(measured_from);
    let sync = sync.map(|(side, replicator)| {
        // (The replicator keeps its newest 1024: more than a run has.)
        let mut copies: Vec<f64> = replicator
            .latencies()
            .into_iter()
            .skip(skip_copies)
            .collect();
        copies.sort_by(f64::total_cmp);
        (side, copies)
    });
    jm.shutdown(false).await;
    if let Some((side, _)) = &sync {
        side.jm.shutdown(false).await;
    }
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
    let mut lat: Vec<f64> = replicator.latencies().into_iter().skip(skip_lat).collect();
    lat.sort_by(f64::total_cmp);
    lag_samples.sort_by(f64::total_cmp);
    let interval_ms = humantime::parse_duration(&a.checkpoint_interval)?.as_secs_f64() * 1e3;
    let rtt_ms = a.rtt.map(|r| r.as_secs_f64() * 1e3);
    Ok(ReplicationReport {
        rtt_ms,
        bandwidth_bytes_per_second: a.rtt.and(a.bandwidth),
        warmup_ms: a.warmup.as_secs_f64() * 1e3,
        checkpoint_interval_ms: interval_ms,
        snapshots_replicated: status.snapshots_replicated,
        bytes_replicated: status.bytes_replicated,
        retries: status.retries,
        completion_to_standby_ms: Sampled::of(&lat),
        lag_seconds_sampled_ms: Sampled::of(&lag_samples),
        target_ms: interval_ms + 500.0,
        sync: sync.map(|(side, copies)| SyncComparison {
            checkpoint_ms: side.checkpoint_ms(measured_from),
            copy_ms: Sampled::of(&copies),
            target_ms: rtt_ms.map(|rtt| checkpoint_ms.p99 + 3.0 * rtt),
        }),
        checkpoint_ms,
    })
}
