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

/// Label set naming one (standby) region.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RegionLabels {
    pub region: String,
}

/// Label set naming an outcome (`pass`, `fail`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    pub result: String,
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
    pub checkpoint_written: Family<JobLabels, Counter>,
    pub checkpoint_sync_seconds: Family<JobLabels, Counter<f64, std::sync::atomic::AtomicU64>>,
    pub checkpoint_async_seconds: Family<JobLabels, Counter<f64, std::sync::atomic::AtomicU64>>,
    pub last_checkpoint_timestamp: Family<JobLabels, Gauge>,
    pub restarts: Family<JobLabels, Counter>,
    /// Moves of a job by savepoint (drains, rebalancing).
    pub moves: Family<JobLabels, Counter>,
    pub late_records: Family<JobLabels, Counter>,
    pub expression_errors: Family<JobLabels, Counter>,
    pub skipped_records: Family<JobLabels, Counter>,
    pub jobs: Family<StateLabels, Gauge>,
    pub ha_is_leader: Gauge,
    pub ha_epoch: Gauge,
    pub ha_leader_changes: Counter,
    pub ha_heartbeat_failures: Counter,
    pub ha_lease_renew_seconds: Gauge<f64, std::sync::atomic::AtomicU64>,
    pub ha_members: Family<StateLabels, Gauge>,
    /// Replication to each standby region: age of the oldest snapshot not
    /// yet there, and how many.
    pub replication_lag_seconds: Family<RegionLabels, Gauge<f64, std::sync::atomic::AtomicU64>>,
    pub replication_lag_checkpoints: Family<RegionLabels, Gauge>,
    pub replication_lag_records: Family<RegionLabels, Gauge>,
    /// Synchronous replication: 1 while checkpoints fail for lack of
    /// standbys (`onStandbyLoss: block`) / complete without them (`async`).
    pub replication_sync_blocked: Gauge,
    pub replication_sync_degraded: Gauge,
    /// Time from a snapshot's manifest to its being in enough standby
    /// stores: what synchronous replication adds to a checkpoint.
    pub replication_sync_seconds: Family<JobLabels, Histogram, fn() -> Histogram>,
    /// 1 while this region is the primary (runs the jobs).
    pub region_is_primary: Gauge,
    /// A hot standby's held jobs, the slots they take and the bytes of
    /// state they keep loaded.
    pub standby_held_jobs: Gauge,
    pub standby_held_slots: Gauge,
    pub standby_held_state_bytes: Gauge,
    pub standby_held_memory_bytes: Gauge,
    /// Jobs a promotion started from their held state (hot standby) and
    /// ones it had to restore from the store instead.
    pub standby_released: Counter,
    pub standby_restored_cold: Counter,
    /// The region epoch (revision of the region lease) as last read.
    pub region_epoch: Gauge,
    /// Times this instance took the region lease for its region after the
    /// primary went silent.
    pub failovers: Counter,
    /// API calls refused for want of a valid credential (401), and audit
    /// entries the store did not take.
    pub api_unauthenticated: Counter,
    pub audit_write_failures: Counter,
    /// REST connections refused in the TLS handshake (`tls.api`).
    pub api_tls_refused: Counter,
    /// Every region's health as read from the global KV: 1 while its
    /// heartbeat is younger than `regions.timeout`.
    pub region_healthy: Family<RegionLabels, Gauge>,
    /// Age of each region's last heartbeat in the global KV.
    pub region_heartbeat_age_seconds:
        Family<RegionLabels, Gauge<f64, std::sync::atomic::AtomicU64>>,
    /// The last failover drill recorded here: its RTO and whether it met
    /// its targets (1) or not (0); drills by result.
    pub drill_last_rto_seconds: Gauge<f64, std::sync::atomic::AtomicU64>,
    pub drill_last_passed: Gauge,
    pub drills: Family<ResultLabels, Counter>,
    /// TaskManagers registered with this leader.
    pub taskmanagers: Gauge,
    /// Task slots of the registered TaskManagers, by state (free, used).
    pub task_slots: Family<StateLabels, Gauge>,
    /// TaskManagers draining.
    pub taskmanagers_draining: Gauge,
    /// Coefficient of variation of the slot load over the TaskManagers.
    pub slot_load_variance: Gauge<f64, std::sync::atomic::AtomicU64>,
    /// Moves the rebalancer started.
    pub rebalance_moves: Counter,
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
            checkpoint_written: Family::default(),
            checkpoint_sync_seconds: Family::default(),
            checkpoint_async_seconds: Family::default(),
            last_checkpoint_timestamp: Family::default(),
            restarts: Family::default(),
            moves: Family::default(),
            late_records: Family::default(),
            expression_errors: Family::default(),
            skipped_records: Family::default(),
            jobs: Family::default(),
            ha_is_leader: Gauge::default(),
            ha_epoch: Gauge::default(),
            ha_leader_changes: Counter::default(),
            ha_heartbeat_failures: Counter::default(),
            ha_lease_renew_seconds: Gauge::default(),
            ha_members: Family::default(),
            replication_lag_seconds: Family::default(),
            replication_lag_checkpoints: Family::default(),
            replication_lag_records: Family::default(),
            replication_sync_blocked: Gauge::default(),
            replication_sync_degraded: Gauge::default(),
            replication_sync_seconds: Family::new_with_constructor(checkpoint_buckets),
            region_is_primary: Gauge::default(),
            standby_held_jobs: Gauge::default(),
            standby_held_slots: Gauge::default(),
            standby_held_state_bytes: Gauge::default(),
            standby_held_memory_bytes: Gauge::default(),
            standby_released: Counter::default(),
            standby_restored_cold: Counter::default(),
            region_epoch: Gauge::default(),
            failovers: Counter::default(),
            api_unauthenticated: Counter::default(),
            audit_write_failures: Counter::default(),
            api_tls_refused: Counter::default(),
            region_healthy: Family::default(),
            region_heartbeat_age_seconds: Family::default(),
            drill_last_rto_seconds: Gauge::default(),
            drill_last_passed: Gauge::default(),
            drills: Family::default(),
            taskmanagers: Gauge::default(),
            task_slots: Family::default(),
            taskmanagers_draining: Gauge::default(),
            slot_load_variance: Gauge::default(),
            rebalance_moves: Counter::default(),
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
            "checkpoint_written_bytes",
            "Bytes completed snapshots wrote (with incremental checkpoints, only their new files: the deltas, and the full snapshots of compactions)",
            m.checkpoint_written.clone(),
        );
        registry.register(
            "checkpoint_sync_seconds",
            "Time tasks spent snapshotting on the record path, summed over tasks and completed checkpoints",
            m.checkpoint_sync_seconds.clone(),
        );
        registry.register(
            "checkpoint_async_seconds",
            "Time tasks spent hashing and uploading state off the record path, summed over tasks and completed checkpoints",
            m.checkpoint_async_seconds.clone(),
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
            "job_moves",
            "Jobs moved to other TaskManagers by stop-with-savepoint and restore (drains, rebalancing); not counted as restarts",
            m.moves.clone(),
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
        registry.register(
            "ha_is_leader",
            "1 while this JobManager holds the leader lease (1 in embedded mode)",
            m.ha_is_leader.clone(),
        );
        registry.register(
            "ha_epoch",
            "Fencing epoch of the lease this JobManager holds (0 when not leading)",
            m.ha_epoch.clone(),
        );
        registry.register(
            "ha_leader_changes",
            "Leader changes this JobManager has seen",
            m.ha_leader_changes.clone(),
        );
        registry.register(
            "ha_heartbeat_failures",
            "Membership heartbeats of this JobManager that failed or timed out",
            m.ha_heartbeat_failures.clone(),
        );
        registry.register(
            "ha_lease_renew_seconds",
            "Duration of the last successful leader lease renewal",
            m.ha_lease_renew_seconds.clone(),
        );
        registry.register(
            "ha_members",
            "Region members by state (healthy: heard from within the member expiry)",
            m.ha_members.clone(),
        );
        registry.register(
            "taskmanagers",
            "TaskManagers registered with this JobManager (0 unless it leads)",
            m.taskmanagers.clone(),
        );
        registry.register(
            "task_slots",
            "Task slots of the registered TaskManagers by state (free, used; a draining TaskManager's free slots count as neither)",
            m.task_slots.clone(),
        );
        registry.register(
            "taskmanagers_draining",
            "TaskManagers draining: their jobs move elsewhere, nothing new is placed on them",
            m.taskmanagers_draining.clone(),
        );
        registry.register(
            "slot_load_variance_ratio",
            "Spread of the slot load over the TaskManagers that are not draining: standard deviation of used/total slots divided by its mean (0: even; scheduling.rebalanceThreshold triggers a rebalance above it)",
            m.slot_load_variance.clone(),
        );
        registry.register(
            "rebalance_moves",
            "Job moves the rebalancer started (automatic or ferry cluster rebalance)",
            m.rebalance_moves.clone(),
        );
        registry.register(
            "region_is_primary",
            "1 while this JobManager's region is the primary region (the one that runs jobs)",
            m.region_is_primary.clone(),
        );
        registry.register(
            "standby_held_jobs",
            "Hot standby (regions.standby: hot): jobs held on this region's TaskManagers with their state loaded, ready for a promotion",
            m.standby_held_jobs.clone(),
        );
        registry.register(
            "standby_held_slots",
            "Hot standby: task slots the held jobs take",
            m.standby_held_slots.clone(),
        );
        registry.register(
            "standby_held_state_bytes",
            "Hot standby: bytes of the held jobs' state as checkpointed",
            m.standby_held_state_bytes.clone(),
        );
        registry.register(
            "standby_held_memory_bytes",
            "Hot standby: roughly the memory the held jobs' state takes loaded on the TaskManagers",
            m.standby_held_memory_bytes.clone(),
        );
        registry.register(
            "standby_released",
            "Hot standby: jobs a promotion started from their held state, without a restore",
            m.standby_released.clone(),
        );
        registry.register(
            "standby_restored_cold",
            "Hot standby: jobs a promotion restored from the store instead (no held state at the newest checkpoint)",
            m.standby_restored_cold.clone(),
        );
        registry.register(
            "region_epoch",
            "Region epoch: revision of the region lease naming the primary region",
            m.region_epoch.clone(),
        );
        registry.register(
            "failovers",
            "Unplanned failovers this JobManager performed (took the region lease from a silent primary)",
            m.failovers.clone(),
        );
        registry.register(
            "api_tls_refused",
            "REST connections refused in the TLS handshake: plaintext requests (answered 400 https_required) and failed handshakes",
            m.api_tls_refused.clone(),
        );
        registry.register(
            "api_unauthenticated",
            "REST calls refused with 401 (no token, an unknown one, or a JWT that did not verify)",
            m.api_unauthenticated.clone(),
        );
        registry.register(
            "audit_write_failures",
            "Audit entries the job store did not take (they are in the JobManager log only)",
            m.audit_write_failures.clone(),
        );
        registry.register(
            "region_healthy",
            "1 while the region's heartbeat in the global KV is younger than regions.timeout, by region",
            m.region_healthy.clone(),
        );
        registry.register(
            "region_heartbeat_age_seconds",
            "Age of the region's last heartbeat in the global KV, by region",
            m.region_heartbeat_age_seconds.clone(),
        );
        registry.register(
            "drill_last_rto_seconds",
            "RTO measured by the last failover drill recorded in this region (ferry drill run)",
            m.drill_last_rto_seconds.clone(),
        );
        registry.register(
            "drill_last_passed",
            "1 if the last failover drill recorded in this region met its RTO and RPO targets, else 0",
            m.drill_last_passed.clone(),
        );
        registry.register(
            "drills",
            "Failover drills recorded in this region, by result (pass, fail)",
            m.drills.clone(),
        );
        registry.register(
            "replication_lag_seconds",
            "Age of the oldest completed snapshot not yet replicated to the region (0 when caught up)",
            m.replication_lag_seconds.clone(),
        );
        registry.register(
            "replication_lag_checkpoints",
            "Completed snapshots not yet replicated to the region",
            m.replication_lag_checkpoints.clone(),
        );
        registry.register(
            "replication_lag_records",
            "Records read by the newest checkpoints beyond what the region holds",
            m.replication_lag_records.clone(),
        );
        registry.register(
            "replication_sync_blocked",
            "1 while synchronous replication blocks checkpoints: too few standby stores take them (regions.onStandbyLoss: block)",
            m.replication_sync_blocked.clone(),
        );
        registry.register(
            "replication_sync_degraded",
            "1 while synchronous replication runs asynchronously: too few standby stores took a checkpoint in time (regions.onStandbyLoss: async)",
            m.replication_sync_degraded.clone(),
        );
        registry.register(
            "replication_sync_seconds",
            "Time to copy a completed snapshot into enough standby stores (regions.replication: sync): what it adds to the checkpoint",
            m.replication_sync_seconds.clone(),
        );
        for result in ["pass", "fail"] {
            let _ = m.drills.get_or_create(&ResultLabels {
                result: result.into(),
            });
        }
        *m.registry.lock().unwrap() = registry;
        m
    }

    /// Renders every metric in the Prometheus text format.
    /// One audit entry the store did not take.
    pub fn audit_write_failed(&self) {
        self.audit_write_failures.inc();
    }

    pub fn encode(&self) -> String {
        let mut out = String::new();
        let registry = self.registry.lock().unwrap_or_else(|p| p.into_inner());
        let _ = encode(&mut out, &registry);
        out
    }

    /// Updates the HA gauges and counters from the leadership state.
    pub fn set_ha(
        &self,
        leading: bool,
        leadership: &crate::leadership::Leadership,
        elector: &ferry_ha::Elector,
    ) {
        use std::sync::atomic::Ordering::Relaxed;
        self.ha_is_leader.set(leading as i64);
        self.ha_epoch
            .set(leadership.fence().filter(|_| leading).map_or(0, |e| e.0) as i64);
        let changes = leadership.leader_changes.load(Relaxed);
        self.ha_leader_changes
            .inc_by(changes.saturating_sub(self.ha_leader_changes.get()));
        if let Some(ctx) = leadership.ha_context() {
            let f = ctx.heartbeat_failures.load(Relaxed);
            self.ha_heartbeat_failures
                .inc_by(f.saturating_sub(self.ha_heartbeat_failures.get()));
        }
        self.ha_lease_renew_seconds
            .set(elector.stats.last_renew_micros.load(Relaxed) as f64 / 1e6);
    }

    /// Sets the count of healthy region members.
    pub fn set_members(&self, healthy: usize) {
        self.ha_members
            .get_or_create(&StateLabels {
                state: "healthy".into(),
            })
            .set(healthy as i64);
    }

    /// Records the registered TaskManagers' capacity.
    pub fn set_capacity(&self, c: crate::taskmanagers::Capacity) {
        self.taskmanagers.set(c.taskmanagers as i64);
        self.taskmanagers_draining.set(c.draining as i64);
        self.slot_load_variance.set(c.variance);
        for (state, n) in [("free", c.free), ("used", c.used)] {
            self.task_slots
                .get_or_create(&StateLabels {
                    state: state.into(),
                })
                .set(i64::from(n));
        }
    }

    /// Records synchronous replication's state.
    pub fn set_sync_state(&self, state: ferry_core::api::SyncState) {
        use ferry_core::api::SyncState;
        self.replication_sync_blocked
            .set(i64::from(state == SyncState::Blocked));
        self.replication_sync_degraded
            .set(i64::from(state == SyncState::Degraded));
    }

    /// Records one standby region's replication lag.
    pub fn set_replication_lag(&self, region: &str, seconds: f64, checkpoints: u64, records: u64) {
        let l = RegionLabels {
            region: region.to_string(),
        };
        self.replication_lag_seconds.get_or_create(&l).set(seconds);
        self.replication_lag_checkpoints
            .get_or_create(&l)
            .set(checkpoints as i64);
        self.replication_lag_records
            .get_or_create(&l)
            .set(records as i64);
    }

    /// Records one region's health as read from the global KV.
    pub fn set_region_health(&self, region: &str, healthy: bool, heartbeat_age: Option<f64>) {
        let l = RegionLabels {
            region: region.to_string(),
        };
        self.region_healthy.get_or_create(&l).set(healthy as i64);
        if let Some(age) = heartbeat_age {
            self.region_heartbeat_age_seconds.get_or_create(&l).set(age);
        }
    }

    /// Creates a job's event counters at 0 when it starts, so its failure
    /// and restart series exist (and `increase()` sees the first one).
    pub fn start_job(&self, labels: &JobLabels) {
        let _ = self.checkpoint_failures.get_or_create(labels);
        let _ = self.restarts.get_or_create(labels);
        let _ = self.checkpoints_completed.get_or_create(labels);
    }

    /// Label set for a job.
    pub fn job(job: &str) -> JobLabels {
        JobLabels {
            job: job.to_string(),
        }
    }
}
