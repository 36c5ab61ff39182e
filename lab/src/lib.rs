//! Whole Ferry deployments on loopback: the sandbox (`ferry sandbox`: every
//! region with its NATS, store, JobManagers and TaskManagers, plus a global
//! NATS cluster) and the benchmarks (`ferry bench`: throughput in-process,
//! JobManager failover, region failover and replication lag with real
//! processes). They start processes, drive them over the REST API
//! (`ferry_client`) and measure; the binary parses the flags and prints.
//!
//! Invariant: everything runs on this machine's loopback interface, and
//! every process started here is stopped (or killed) when what started it
//! is dropped — a benchmark or a sandbox leaves no process behind.

pub mod bench;
pub mod chaos;
pub mod exchange;
pub mod failover;
pub mod large_state;
pub mod procs;
pub mod region;
pub mod replication;
pub mod s3;
pub mod sandbox;

/// The `p`th percentile (0 < `p` ≤ 100) of the ascending `sorted` by the
/// nearest-rank method; NaN if it is empty. The one percentile of every
/// benchmark's p50/p99.
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = (p / 100.0 * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// p50, p99 and the largest value of the ascending `sorted` (NaN when
/// empty), in one serializable record.
#[derive(Clone, Copy, Debug, serde::Serialize)]
pub struct Stats {
    pub p50: f64,
    pub p99: f64,
    pub max: f64,
}

impl Stats {
    pub fn of(sorted: &[f64]) -> Self {
        Self {
            p50: percentile(sorted, 50.0),
            p99: percentile(sorted, 99.0),
            max: sorted.last().copied().unwrap_or(f64::NAN),
        }
    }
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
