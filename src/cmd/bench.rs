//! `ferry bench`: throughput benchmarks, run in-process on one core.
//!
//! `ferry bench throughput` runs a keyed tumbling count (generator →
//! key_by → 1-minute count → blackhole) with and without periodic
//! checkpoints, on a single-threaded runtime, and reports events per second
//! of CPU time (events per second per core) and the checkpoint overhead:
//! from the fastest of several interleaved runs of each variant, from the
//! median of back-to-back pairs, and measured directly as the time the tasks
//! spend on checkpoints (on a machine whose speed drifts between runs, the
//! last is the one to trust).

use std::path::Path;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::Context;
use ferry_core::spec::parse_and_validate;
use ferry_jobmanager::service::SubmitOptions;
use ferry_jobmanager::{JobManager, JobManagerConfig, JobState};
use ferry_testkit::nats::{NatsConfig, NatsProcess, NatsStarter};
use ferry_testkit::try_free_port;

#[derive(clap::Args, Debug)]
pub struct BenchArgs {
    #[command(subcommand)]
    pub what: BenchKind,
}

#[derive(clap::Subcommand, Debug)]
pub enum BenchKind {
    /// Keyed tumbling count over many keys, with and without checkpoints.
    Throughput(ThroughputArgs),
    /// Leader failover of `ferry jobmanager` processes: SIGKILL and
    /// graceful handoff times, idle CPU.
    Failover(super::bench_failover::FailoverArgs),
    /// Cross-region failover (SIGKILL of the primary region) and planned
    /// switchover times.
    Region(super::bench_region::RegionArgs),
    /// Cross-region replication lag while a job runs.
    Replication(super::bench_replication::ReplicationArgs),
}

#[derive(clap::Args, Debug)]
pub struct ThroughputArgs {
    /// Events per run.
    #[arg(long, default_value_t = 100_000_000)]
    pub events: u64,
    /// Distinct keys.
    #[arg(long, default_value_t = 10_000)]
    pub keys: u64,
    /// Checkpoint interval of the "with checkpoints" run.
    #[arg(long, default_value = "1s")]
    pub checkpoint_interval: String,
    /// Runs of each variant, interleaved; the fastest of each is reported
    /// (interference from other work only ever adds time).
    #[arg(long, default_value_t = 5)]
    pub repeat: u32,
    /// Where checkpoints go (a temp dir by default).
    #[arg(long)]
    pub data_dir: Option<String>,
    /// Print results as JSON.
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: BenchArgs) -> anyhow::Result<ExitCode> {
    match args.what {
        BenchKind::Throughput(a) => throughput(a),
        BenchKind::Failover(a) => super::bench_failover::run(a),
        BenchKind::Replication(a) => super::bench_replication::run(a),
        BenchKind::Region(a) => super::bench_region::run(a),
    }
}

fn cpu_time() -> Duration {
    // SAFETY: getrusage only writes into the struct we pass.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut u) };
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(u.ru_utime) + tv(u.ru_stime)
}

fn spec(events: u64, keys: u64, interval: &str) -> String {
    format!(
        r#"
apiVersion: ferry.dev/v1
kind: Job
metadata: {{name: bench-keyed-count}}
spec:
  parallelism: 1
  checkpointing: {{interval: {interval}, retained: 2}}
  restartStrategy: {{type: none}}
  source:
    generator:
      partitions: 1
      total: {events}
      eventTime: {{step: 1ms, maxOutOfOrderness: 100ms}}
      fields:
        key: {{type: key, cardinality: {keys}}}
  operators:
    - key_by: key
    - window: {{tumbling: 1m, aggregate: {{count: count}}}}
  sink:
    blackhole: {{}}
"#
    )
}

#[derive(serde::Serialize, Clone, Copy)]
struct RunResult {
    wall_s: f64,
    cpu_s: f64,
    events_per_s: f64,
    events_per_cpu_s: f64,
    checkpoints: u64,
    /// Time the tasks spent on checkpoints: snapshots on the record path
    /// plus the upload's own polls (serializing, hashing, issuing writes),
    /// which share the one core with the records.
    checkpoint_work_s: f64,
}

fn run_once(data: &str, text: &str, events: u64) -> anyhow::Result<RunResult> {
    let spec = parse_and_validate(text).map_err(|e| anyhow::anyhow!("{e}"))?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let jm = JobManager::new(JobManagerConfig {
            data_url: data.to_string(),
            instance_id: "bench".into(),
        });
        let cpu0 = cpu_time();
        let t0 = Instant::now();
        let info = jm.submit_spec(spec, SubmitOptions::default()).await?;
        let state = jm.wait(info.id).await?;
        let wall = t0.elapsed().as_secs_f64();
        let cpu = (cpu_time() - cpu0).as_secs_f64();
        let info = jm.get(&info.id.to_string())?;
        anyhow::ensure!(
            state == JobState::Finished && info.records_in == events,
            "benchmark job ended {state} after {} of {events} events: {:?}",
            info.records_in,
            info.failure
        );
        let checkpoints = jm.checkpoints(&info.id.to_string()).await?.len() as u64;
        let labels = ferry_jobmanager::metrics::Metrics::job(&info.id.to_string());
        let m = jm.metrics();
        let sync_s = m.checkpoint_sync_seconds.get_or_create(&labels).get();
        let async_s = m.checkpoint_async_seconds.get_or_create(&labels).get();
        let checkpoint_work_s = sync_s + async_s;
        let completed = info.last_checkpoint.map(|c| c.id).unwrap_or(0);
        jm.shutdown(false).await;
        Ok(RunResult {
            wall_s: wall,
            cpu_s: cpu,
            events_per_s: events as f64 / wall,
            events_per_cpu_s: events as f64 / cpu,
            checkpoints: completed.max(checkpoints),
            checkpoint_work_s,
        })
    })
}

fn throughput(a: ThroughputArgs) -> anyhow::Result<ExitCode> {
    let tmp = tempfile_dir()?;
    let data = a.data_dir.clone().unwrap_or_else(|| tmp.clone());
    eprintln!(
        "keyed tumbling count: {} events, {} keys, parallelism 1, one core; best of {}",
        a.events, a.keys, a.repeat
    );
    let mut runs: [Vec<RunResult>; 2] = [Vec::new(), Vec::new()];
    let intervals = ["1h", a.checkpoint_interval.as_str()];
    for r in 0..a.repeat {
        // ABBA order: a slow drift of the machine's speed hits both variants
        // alike, so each repeat's pair is comparable.
        let order: [usize; 2] = if r % 2 == 0 { [0, 1] } else { [1, 0] };
        for i in order {
            let interval = intervals[i];
            let res = run_once(&data, &spec(a.events, a.keys, interval), a.events)
                .with_context(|| format!("run {} ({interval} checkpoints)", r + 1))?;
            eprintln!(
                "  run {} {:<22} {:>7.2} M ev/s per core  ({:.2} s wall, {:.2} s cpu, {} checkpoints, {:.1} ms checkpoint work)",
                r + 1,
                if i == 0 {
                    "without checkpoints"
                } else {
                    "with checkpoints"
                },
                res.events_per_cpu_s / 1e6,
                res.wall_s,
                res.cpu_s,
                res.checkpoints,
                res.checkpoint_work_s * 1e3
            );
            runs[i].push(res);
        }
    }
    let _ = std::fs::remove_dir_all(&tmp);
    let best = |v: &[RunResult]| {
        *v.iter()
            .max_by(|a, b| a.events_per_cpu_s.total_cmp(&b.events_per_cpu_s))
            .expect("at least one run")
    };
    let (off, on) = (best(&runs[0]), best(&runs[1]));
    let overhead = (1.0 - on.events_per_cpu_s / off.events_per_cpu_s) * 100.0;
    // The same overhead from each repeat's back-to-back pair; the median of
    // those is robust against one slow run, which best-of is not for a ratio.
    let mut paired: Vec<f64> = runs[0]
        .iter()
        .zip(&runs[1])
        .map(|(off, on)| (1.0 - on.events_per_cpu_s / off.events_per_cpu_s) * 100.0)
        .collect();
    paired.sort_by(f64::total_cmp);
    // The direct measure, immune to the machine's speed changing between
    // runs: the share of each checkpointed run's CPU time that went into its
    // checkpoints (median over the runs).
    let mut direct: Vec<f64> = runs[1]
        .iter()
        .map(|r| r.checkpoint_work_s / r.cpu_s * 100.0)
        .collect();
    direct.sort_by(f64::total_cmp);
    let direct_median = direct[direct.len() / 2];
    let paired_median = if paired.len() % 2 == 1 {
        paired[paired.len() / 2]
    } else {
        (paired[paired.len() / 2 - 1] + paired[paired.len() / 2]) / 2.0
    };
    if a.json {
        println!(
            "{}",
            serde_json::json!({
                "events": a.events, "keys": a.keys,
                "checkpoint_interval": a.checkpoint_interval,
                "without_checkpoints": off, "with_checkpoints": on,
                "checkpoint_overhead_percent": overhead,
                "checkpoint_overhead_percent_paired_median": paired_median,
                "checkpoint_overhead_percent_paired": paired,
                "checkpoint_work_percent_of_cpu": direct_median,
                "runs": {"without_checkpoints": runs[0], "with_checkpoints": runs[1]},
            })
        );
    } else {
        println!("| variant | M events/s per core | wall s | cpu s | checkpoints |");
        println!("|---|---|---|---|---|");
        for (name, r) in [
            ("without checkpoints", off),
            (&*format!("checkpoints every {}", a.checkpoint_interval), on),
        ] {
            println!(
                "| {name} | {:.2} | {:.2} | {:.2} | {} |",
                r.events_per_cpu_s / 1e6,
                r.wall_s,
                r.cpu_s,
                r.checkpoints
            );
        }
        println!(
            "checkpoint overhead: {overhead:.1} % (fastest vs fastest); median of the {} back-to-back pairs: {paired_median:.1} % (pairs: {})",
            paired.len(),
            paired
                .iter()
                .map(|p| format!("{p:.1}"))
                .collect::<Vec<_>>()
                .join(", ")
        );
        println!(
            "checkpoint work measured in the tasks (snapshot + hash + upload): {direct_median:.2} % of the run's CPU time (median of the checkpointed runs)"
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// The `p`th percentile (0 < `p` ≤ 100) of the ascending `sorted` by the
/// nearest-rank method; NaN if it is empty. The one percentile of every
/// benchmark's p50/p99.
pub(super) fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = (p / 100.0 * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// Starts the benchmarks' `nats-server -js` (`sync_interval: always`) on a
/// free loopback port with its config and store under `dir`, output
/// discarded, and waits (up to 10 s) until it accepts clients.
pub(super) fn start_nats(dir: &Path) -> anyhow::Result<NatsProcess> {
    let config = NatsConfig::new(try_free_port()?, dir.join("js"));
    Ok(NatsStarter::new(super::sandbox::find_nats_server()?)
        .with_listen_limit(Duration::from_secs(10))
        .start("nats-server", &dir.join("nats.conf"), &config)?)
}

fn tempfile_dir() -> anyhow::Result<String> {
    let dir = std::env::temp_dir().join(format!("ferry-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    Ok(dir.to_string_lossy().to_string())
}

#[cfg(test)]
mod tests {
    use super::percentile;

    #[test]
    fn percentile_is_the_nearest_rank() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 50.0), 50.0);
        assert_eq!(percentile(&v, 99.0), 99.0);
        assert_eq!(percentile(&v, 100.0), 100.0);
        assert_eq!(percentile(&[1.0, 2.0, 3.0], 50.0), 2.0);
        assert_eq!(percentile(&[1.0, 2.0, 3.0], 99.0), 3.0);
        assert_eq!(percentile(&[7.0], 1.0), 7.0);
        assert!(percentile(&[], 50.0).is_nan());
    }
}
