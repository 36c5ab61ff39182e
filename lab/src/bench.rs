//! The throughput benchmark (`ferry bench throughput`), in-process on one
//! core: a keyed tumbling count (generator → key_by → 1-minute count →
//! blackhole) with and without periodic checkpoints, on a single-threaded
//! runtime, reporting events per second of CPU time and the checkpoint
//! overhead: from the fastest of several interleaved runs of each variant,
//! from the median of back-to-back pairs, and measured directly as the time
//! the tasks spend on checkpoints (on a machine whose speed drifts between
//! runs, the last is the one to trust).

use std::time::{Duration, Instant};

use anyhow::Context;
use ferry_core::spec::parse_and_validate;
use ferry_jobmanager::service::SubmitOptions;
use ferry_jobmanager::{JobManager, JobManagerConfig, JobState};
use serde::Serialize;

/// What to measure.
#[derive(Clone, Debug)]
pub struct ThroughputOptions {
    /// Events per run.
    pub events: u64,
    /// Distinct keys.
    pub keys: u64,
    /// Checkpoint interval of the "with checkpoints" run.
    pub checkpoint_interval: String,
    /// Runs of each variant, interleaved.
    pub repeat: u32,
    /// Where checkpoints go (a temp dir by default).
    pub data_dir: Option<String>,
    /// String keys `<prefix><n>` instead of integers.
    pub key_prefix: Option<String>,
    /// The tumbling window's size (e.g. `1m`, `24h`).
    pub window: String,
    /// Also run the checkpointed job with full checkpoints
    /// (`checkpointing.incremental: false`), interleaved with the others.
    pub compare_full: bool,
}

impl Default for ThroughputOptions {
    fn default() -> Self {
        Self {
            events: 100_000_000,
            keys: 10_000,
            checkpoint_interval: "1s".into(),
            repeat: 5,
            data_dir: None,
            key_prefix: None,
            window: "1m".into(),
            compare_full: false,
        }
    }
}

impl Variant {
    fn label(self) -> &'static str {
        match self {
            Variant::Without => "without checkpoints",
            Variant::Incremental => "incremental",
            Variant::Full => "full checkpoints",
        }
    }
}

/// The variants a run can be.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Variant {
    /// Checkpoints once an hour: none during the run.
    Without,
    /// Incremental checkpoints (the default) every interval.
    Incremental,
    /// Full checkpoints every interval.
    Full,
}

/// One run of one variant.
#[derive(Serialize, Clone, Debug)]
pub struct RunResult {
    pub wall_s: f64,
    pub cpu_s: f64,
    pub events_per_s: f64,
    pub events_per_cpu_s: f64,
    pub checkpoints: u64,
    /// Time the tasks spent on checkpoints: snapshots on the record path
    /// plus the upload's own polls (serializing, hashing, issuing writes),
    /// which share the one core with the records.
    pub checkpoint_work_s: f64,
    /// Bytes the checkpoints wrote, on average per checkpoint (deltas, and
    /// the full snapshots among them).
    pub written_bytes_per_checkpoint: f64,
    /// Size of the state the last checkpoint lists (what a restore reads).
    pub state_bytes: u64,
    /// What each checkpoint wrote, in order (sampled from the JobManager's
    /// counters; checkpoints completing between two samples share their
    /// sum evenly).
    pub written_per_checkpoint: Vec<u64>,
}

impl RunResult {
    /// Median bytes written per checkpoint over the second half of the run:
    /// the steady state, once every key has been seen.
    pub fn steady_written(&self) -> f64 {
        let w = &self.written_per_checkpoint;
        let mut late: Vec<u64> = w[w.len() / 2..].to_vec();
        late.sort_unstable();
        late.get(late.len() / 2).copied().unwrap_or(0) as f64
    }
}

/// Every run of both variants.
#[derive(Serialize, Clone, Debug)]
pub struct Runs {
    pub without_checkpoints: Vec<RunResult>,
    pub with_checkpoints: Vec<RunResult>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub with_full_checkpoints: Vec<RunResult>,
}

/// The benchmark's result.
#[derive(Serialize, Clone, Debug)]
pub struct ThroughputReport {
    pub events: u64,
    pub keys: u64,
    pub checkpoint_interval: String,
    pub window: String,
    /// The fastest run of each variant (`with_checkpoints`: incremental).
    pub without_checkpoints: RunResult,
    pub with_checkpoints: RunResult,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub with_full_checkpoints: Option<RunResult>,
    /// Incremental checkpoints' throughput as a share of the run without
    /// checkpoints (fastest vs fastest).
    pub incremental_throughput_ratio: f64,
    /// What an incremental checkpoint wrote in the steady state (median
    /// over the run's second half) as a share of the state's size (what a
    /// full checkpoint wrote in the steady state).
    pub written_percent_of_state: f64,
    /// Fastest vs fastest.
    pub checkpoint_overhead_percent: f64,
    /// The median of each repeat's back-to-back pair (robust against one
    /// slow run, which best-of is not for a ratio).
    pub checkpoint_overhead_percent_paired_median: f64,
    /// Ascending.
    pub checkpoint_overhead_percent_paired: Vec<f64>,
    /// The share of each checkpointed run's CPU time that went into its
    /// checkpoints (median over the runs): immune to the machine's speed
    /// changing between runs.
    pub checkpoint_work_percent_of_cpu: f64,
    pub runs: Runs,
}

impl ThroughputReport {
    /// The results as a Markdown table and notes, as `ferry bench` prints
    /// them (and docs/benchmarks.md records them).
    pub fn markdown(&self) -> String {
        use std::fmt::Write as _;
        let r = self;
        let mut out = String::new();
        let _ = writeln!(
            out,
            "| variant | M events/s per core | wall s | cpu s | checkpoints | MB written per checkpoint (mean) | steady state (median, 2nd half) |"
        );
        let _ = writeln!(out, "|---|---|---|---|---|---|---|");
        let mut rows = vec![
            ("without checkpoints".to_string(), &r.without_checkpoints),
            (
                format!("incremental checkpoints every {}", r.checkpoint_interval),
                &r.with_checkpoints,
            ),
        ];
        if let Some(full) = &r.with_full_checkpoints {
            rows.push((
                format!("full checkpoints every {}", r.checkpoint_interval),
                full,
            ));
        }
        for (name, v) in rows {
            let _ = writeln!(
                out,
                "| {name} | {:.2} | {:.2} | {:.2} | {} | {:.2} | {:.2} |",
                v.events_per_cpu_s / 1e6,
                v.wall_s,
                v.cpu_s,
                v.checkpoints,
                v.written_bytes_per_checkpoint / 1e6,
                v.steady_written() / 1e6,
            );
        }
        let _ = writeln!(
            out,
            "incremental checkpoints: {:.1} % of the throughput without checkpoints (fastest vs fastest); in the steady state (median of the run's second half) a checkpoint wrote {:.1} % of the state's size",
            r.incremental_throughput_ratio * 100.0,
            r.written_percent_of_state
        );
        let paired = &r.checkpoint_overhead_percent_paired;
        let _ = writeln!(
            out,
            "checkpoint overhead: {:.1} % (fastest vs fastest); median of the {} back-to-back pairs: {:.1} % (pairs: {})",
            r.checkpoint_overhead_percent,
            paired.len(),
            r.checkpoint_overhead_percent_paired_median,
            paired
                .iter()
                .map(|p| format!("{p:.1}"))
                .collect::<Vec<_>>()
                .join(", ")
        );
        let _ = writeln!(
            out,
            "checkpoint work measured in the tasks (snapshot + hash + upload): {:.2} % of the run's CPU time (median of the checkpointed runs)",
            r.checkpoint_work_percent_of_cpu
        );
        out
    }
}

/// CPU time this process used so far (user + system).
pub(crate) fn cpu_time() -> Duration {
    // SAFETY: getrusage only writes into the struct we pass.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut u) };
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(u.ru_utime) + tv(u.ru_stime)
}

fn spec(a: &ThroughputOptions, variant: Variant) -> String {
    let (events, keys, window) = (a.events, a.keys, &a.window);
    let (interval, incremental) = match variant {
        Variant::Without => ("1h", true),
        Variant::Incremental => (a.checkpoint_interval.as_str(), true),
        Variant::Full => (a.checkpoint_interval.as_str(), false),
    };
    let prefix = a
        .key_prefix
        .as_ref()
        .map(|p| format!(", prefix: {p:?}"))
        .unwrap_or_default();
    format!(
        r#"
apiVersion: ferry.dev/v1
kind: Job
metadata: {{name: bench-keyed-count}}
spec:
  parallelism: 1
  checkpointing: {{interval: {interval}, retained: 2, incremental: {incremental}}}
  restartStrategy: {{type: none}}
  source:
    generator:
      partitions: 1
      total: {events}
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

fn run_once(data: &str, text: &str, events: u64) -> anyhow::Result<RunResult> {
    let spec = parse_and_validate(text).map_err(|e| anyhow::anyhow!("{e}"))?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let jm = JobManager::new(JobManagerConfig {
            data_url: data.to_string(),
            instance_id: "bench".into(),
            access: ferry_core::access::AccessPolicy::unrestricted(),
        });
        let cpu0 = cpu_time();
        let t0 = Instant::now();
        let info = jm.submit_spec(spec, SubmitOptions::default()).await?;
        // Each checkpoint's bytes written, from the counters every 20 ms
        // (a timer on the same thread: it costs next to nothing).
        let labels = ferry_jobmanager::metrics::Metrics::job(&info.id.to_string());
        let samples = std::cell::RefCell::new(Vec::<u64>::new());
        let sampler = sample_written(jm.metrics(), &labels, &samples);
        let state = tokio::select! {
            s = jm.wait(info.id) => s?,
            never = sampler => match never {},
        };
        let written_per_checkpoint = samples.take();
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
        let m = jm.metrics();
        let sync_s = m.checkpoint_sync_seconds.get_or_create(&labels).get();
        let async_s = m.checkpoint_async_seconds.get_or_create(&labels).get();
        let checkpoint_work_s = sync_s + async_s;
        let written = m.checkpoint_written.get_or_create(&labels).get();
        let state_bytes = m.checkpoint_size.get_or_create(&labels).get().max(0) as u64;
        let done = m.checkpoints_completed.get_or_create(&labels).get();
        let completed = info.last_checkpoint.map(|c| c.id).unwrap_or(0);
        jm.shutdown(false).await;
        Ok(RunResult {
            wall_s: wall,
            cpu_s: cpu,
            events_per_s: events as f64 / wall,
            events_per_cpu_s: events as f64 / cpu,
            checkpoints: completed.max(checkpoints),
            checkpoint_work_s,
            written_bytes_per_checkpoint: written as f64 / done.max(1) as f64,
            state_bytes,
            written_per_checkpoint,
        })
    })
}

/// Appends to `out` what each of the job's checkpoints wrote, from the
/// counters every 20 ms (a timer on the run's one thread: it costs next
/// to nothing); checkpoints completing between two samples share their sum.
async fn sample_written(
    m: &ferry_jobmanager::metrics::Metrics,
    labels: &ferry_jobmanager::metrics::JobLabels,
    out: &std::cell::RefCell<Vec<u64>>,
) -> std::convert::Infallible {
    let (mut done, mut written) = (0u64, 0u64);
    loop {
        tokio::time::sleep(Duration::from_millis(20)).await;
        let d = m.checkpoints_completed.get_or_create(labels).get();
        let w = m.checkpoint_written.get_or_create(labels).get();
        if d > done {
            let each = w.saturating_sub(written) / (d - done);
            out.borrow_mut()
                .extend(std::iter::repeat_n(each, (d - done) as usize));
            (done, written) = (d, w);
        }
    }
}

/// Runs the benchmark; `on_run(repeat, variant, result)` after each run.
pub fn throughput(
    a: &ThroughputOptions,
    mut on_run: impl FnMut(u32, &str, &RunResult),
) -> anyhow::Result<ThroughputReport> {
    let tmp = tempfile_dir()?;
    let data = a.data_dir.clone().unwrap_or_else(|| tmp.clone());
    let mut variants = vec![Variant::Without, Variant::Incremental];
    if a.compare_full {
        variants.push(Variant::Full);
    }
    let mut runs: Vec<Vec<RunResult>> = vec![Vec::new(); variants.len()];
    for r in 0..a.repeat {
        // Alternating order: a slow drift of the machine's speed hits every
        // variant alike, so each repeat's runs are comparable.
        let mut order: Vec<usize> = (0..variants.len()).collect();
        if r % 2 == 1 {
            order.reverse();
        }
        for i in order {
            let v = variants[i];
            let res = run_once(&data, &spec(a, v), a.events)
                .with_context(|| format!("run {} ({v:?} checkpoints)", r + 1))?;
            on_run(r + 1, v.label(), &res);
            runs[i].push(res);
        }
    }
    let _ = std::fs::remove_dir_all(&tmp);
    let best = |v: &[RunResult]| {
        v.iter()
            .max_by(|a, b| a.events_per_cpu_s.total_cmp(&b.events_per_cpu_s))
            .expect("at least one run")
            .clone()
    };
    let (off, on) = (best(&runs[0]), best(&runs[1]));
    let full = runs.get(2).map(|r| best(r));
    let overhead = (1.0 - on.events_per_cpu_s / off.events_per_cpu_s) * 100.0;
    let mut paired: Vec<f64> = runs[0]
        .iter()
        .zip(&runs[1])
        .map(|(off, on)| (1.0 - on.events_per_cpu_s / off.events_per_cpu_s) * 100.0)
        .collect();
    paired.sort_by(f64::total_cmp);
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
    // The state's size: what a full checkpoint writes in the steady state
    // (with `--compare-full`), else the largest a checkpoint wrote (a full
    // snapshot of the chain).
    let state_size = match &full {
        Some(f) if f.steady_written() > 0.0 => f.steady_written(),
        _ => on.written_per_checkpoint.iter().copied().max().unwrap_or(0) as f64,
    };
    let written_percent_of_state = if state_size > 0.0 {
        on.steady_written() / state_size * 100.0
    } else {
        0.0
    };
    let mut runs = runs.into_iter();
    let without = runs.next().unwrap_or_default();
    let with = runs.next().unwrap_or_default();
    let with_full = runs.next().unwrap_or_default();
    Ok(ThroughputReport {
        events: a.events,
        keys: a.keys,
        checkpoint_interval: a.checkpoint_interval.clone(),
        window: a.window.clone(),
        incremental_throughput_ratio: on.events_per_cpu_s / off.events_per_cpu_s,
        without_checkpoints: off,
        with_checkpoints: on,
        with_full_checkpoints: full,
        written_percent_of_state,
        checkpoint_overhead_percent: overhead,
        checkpoint_overhead_percent_paired_median: paired_median,
        checkpoint_overhead_percent_paired: paired,
        checkpoint_work_percent_of_cpu: direct_median,
        runs: Runs {
            without_checkpoints: without,
            with_checkpoints: with,
            with_full_checkpoints: with_full,
        },
    })
}

fn tempfile_dir() -> anyhow::Result<String> {
    let dir = std::env::temp_dir().join(format!("ferry-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    Ok(dir.to_string_lossy().to_string())
}
