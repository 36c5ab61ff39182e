//! Prometheus metrics of the JobManager, named `ferry_<area>_<what>_<unit>`,
//! rendered in the text exposition format at `/metrics`.

use std::sync::Mutex;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// Label set naming one job.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct JobLabels {
    pub job: String,
}

/// Label set naming one job state.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StateLabels {
    pub state: String,
}

fn checkpoint_buckets() -> Histogram {
    Histogram::new([
        0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
    ])
}

/// Every metric the JobManager exports.
pub struct Metrics {
    registry: Mutex<Registry>,
    pub records_in: Family<JobLabels, Counter>,
    pub records_out: Family<JobLabels, Counter>,
    pub records_in_rate: Family<JobLabels, Gauge<f64, std::sync::atomic::AtomicU64>>,
    pub watermark: Family<JobLabels, Gauge>,
    pub checkpoints_completed: Family<JobLabels, Counter>,
    pub checkpoint_failures: Family<JobLabels, Counter>,
    pub checkpoint_duration: Family<JobLabels, Histogram, fn() -> Histogram>,
    pub checkpoint_size: Family<JobLabels, Gauge>,
    pub last_checkpoint_timestamp: Family<JobLabels, Gauge>,
    pub restarts: Family<JobLabels, Counter>,
    pub late_records: Family<JobLabels, Counter>,
    pub expression_errors: Family<JobLabels, Counter>,
    pub skipped_records: Family<JobLabels, Counter>,
    pub jobs: Family<StateLabels, Gauge>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("ferry");
        let m = Self {
            registry: Mutex::new(Registry::default()),
            records_in: Family::default(),
            records_out: Family::default(),
            records_in_rate: Family::default(),
            watermark: Family::default(),
            checkpoints_completed: Family::default(),
            checkpoint_failures: Family::default(),
            checkpoint_duration: Family::new_with_constructor(checkpoint_buckets),
            checkpoint_size: Family::default(),
            last_checkpoint_timestamp: Family::default(),
            restarts: Family::default(),
            late_records: Family::default(),
            expression_errors: Family::default(),
            skipped_records: Family::default(),
            jobs: Family::default(),
        };
        registry.register(
            "job_records_in",
            "Records read by the job's sources",
            m.records_in.clone(),
        );
        registry.register(
            "job_records_out",
            "Records written by the job's sinks",
            m.records_out.clone(),
        );
        registry.register(
            "job_records_in_per_second",
            "Source records per second over the last few seconds",
            m.records_in_rate.clone(),
        );
        registry.register(
            "job_watermark_milliseconds",
            "Lowest event-time watermark over the job's tasks (epoch ms)",
            m.watermark.clone(),
        );
        registry.register(
            "checkpoints_completed",
            "Checkpoints completed (manifest written)",
            m.checkpoints_completed.clone(),
        );
        registry.register(
            "checkpoint_failures",
            "Checkpoints that failed or timed out",
            m.checkpoint_failures.clone(),
        );
        registry.register(
            "checkpoint_duration_seconds",
            "Time from checkpoint trigger to manifest written",
            m.checkpoint_duration.clone(),
        );
        registry.register(
            "checkpoint_size_bytes",
            "State size of the last completed checkpoint",
            m.checkpoint_size.clone(),
        );
        registry.register(
            "checkpoint_last_completed_timestamp_seconds",
            "Unix time of the last completed checkpoint",
            m.last_checkpoint_timestamp.clone(),
        );
        registry.register(
            "job_restarts",
            "Job restarts from a checkpoint after a failure",
            m.restarts.clone(),
        );
        registry.register(
            "job_late_records",
            "Records dropped because they arrived after their window's allowed lateness",
            m.late_records.clone(),
        );
        registry.register(
            "job_expression_errors",
            "Records whose filter or map expression failed to evaluate",
            m.expression_errors.clone(),
        );
        registry.register(
            "job_skipped_records",
            "Malformed input records the sources skipped (file source onBadLine: skip)",
            m.skipped_records.clone(),
        );
        registry.register("jobs", "Jobs by state", m.jobs.clone());
        *m.registry.lock().unwrap() = registry;
        m
    }

    /// Renders every metric in the Prometheus text format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        let registry = self.registry.lock().unwrap_or_else(|p| p.into_inner());
        let _ = encode(&mut out, &registry);
        out
    }

    /// Label set for a job.
    pub fn job(job: &str) -> JobLabels {
        JobLabels {
            job: job.to_string(),
        }
    }
}
