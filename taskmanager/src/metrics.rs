//! Per-task counters, shared with the JobManager for progress and metrics.

use std::sync::atomic::{AtomicI64, AtomicU64};

/// Counters one task updates as it runs.
#[derive(Debug)]
pub struct TaskMetrics {
    /// Records read by this task's source (source tasks only).
    pub records_in: AtomicU64,
    /// Records handed to this task's sink (sink tasks only).
    pub records_out: AtomicU64,
    /// The task's current input watermark (epoch ms; `i64::MIN` before any).
    pub watermark: AtomicI64,
    pub late_records: AtomicU64,
    pub expr_errors: AtomicU64,
    /// Malformed input records the source skipped (file source with
    /// `onBadLine: skip`), including those skipped before a restore.
    pub skipped_records: AtomicU64,
    /// Time spent waiting to send downstream because the channel was full
    /// (ns): backpressure from the tasks after this one.
    pub backpressure_ns: AtomicU64,
    /// Share of the last second spent so, in thousandths (set once a
    /// second by the TaskManager).
    pub backpressure_permille: AtomicU64,
}

impl Default for TaskMetrics {
    fn default() -> Self {
        Self {
            records_in: AtomicU64::new(0),
            records_out: AtomicU64::new(0),
            watermark: AtomicI64::new(i64::MIN),
            late_records: AtomicU64::new(0),
            expr_errors: AtomicU64::new(0),
            skipped_records: AtomicU64::new(0),
            backpressure_ns: AtomicU64::new(0),
            backpressure_permille: AtomicU64::new(0),
        }
    }
}
