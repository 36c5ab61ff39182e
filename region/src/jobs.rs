//! The narrow interface through which the region coordinator drives the
//! region's JobManager: which jobs there are, start them as the primary,
//! stop them as a standby, stop them with savepoints for a switchover, and
//! the region fence. The binary implements it over the JobManager in a
//! short adapter; unit tests implement it in memory.
//!
//! Invariant: the coordinator starts jobs only through [`RegionJobs::start`]
//! after it confirmed the region lease by compare-and-set, and stops them
//! (cancelling their tasks) through [`RegionJobs::stand_by`] whenever it
//! cannot confirm it.

use std::time::Duration;

use async_trait::async_trait;
use ferry_core::api::{CheckpointMark, RegionResources, RegionView, SavepointRef, StandbyStatus};
use ferry_core::{JmEpoch, JobId, RegionEpoch};

/// A job of the region's job store, as the coordinator needs it.
#[derive(Clone, Debug, PartialEq)]
pub struct RegionJob {
    pub id: JobId,
    pub name: String,
    /// Not ended (or ended only because a switchover moved it away).
    pub active: bool,
    /// Running here now.
    pub running: bool,
    pub last_checkpoint: Option<CheckpointMark>,
}

/// What the coordinator reports for metrics.
#[derive(Clone, Debug)]
pub enum RegionEvent<'a> {
    /// The role changed: is this region primary now, under which epoch.
    Role { primary: bool, epoch: RegionEpoch },
    /// This region took the lease from a silent primary.
    Failover,
    /// Every region's health as just listed.
    Health(&'a [RegionView]),
    /// Replication progress to every standby.
    Replication(&'a [StandbyStatus]),
}

/// The JobManager as the region coordinator drives it.
#[async_trait]
pub trait RegionJobs: Send + Sync + 'static {
    /// The in-region fencing epoch while this JobManager leads its region.
    fn leading(&self) -> Option<JmEpoch>;

    /// Every job of the region's job store this JobManager knows.
    fn jobs(&self) -> Vec<RegionJob>;

    /// The region lease was just confirmed under `epoch`: commits,
    /// deployments and the TaskManagers' tasks may go on for `valid_for`.
    fn confirm(&self, epoch: RegionEpoch, valid_for: Duration);

    /// Starts every job that runs in the primary region (not ended, or
    /// moved here by a switchover) from its newest checkpoint or savepoint,
    /// adopting running tasks of this region epoch. Returns how many.
    async fn start(&self, epoch: RegionEpoch) -> Result<usize, String>;

    /// The region is not (or may no longer be) the primary (`primary`:
    /// who is, if known): every job stops here and its tasks are
    /// cancelled, nothing more is committed, no job is accepted.
    async fn stand_by(&self, primary: Option<&str>);

    /// Stops every running job with a savepoint for a planned move to
    /// `target` (their status records the move).
    async fn stop_with_savepoints(
        &self,
        target: &str,
    ) -> Vec<(JobId, Result<SavepointRef, String>)>;

    /// For metrics; nothing by default.
    fn report(&self, _event: RegionEvent<'_>) {}

    /// Every tick of a standby region: a hot standby
    /// (`regions.standby: hot`) loads each job's newest replicated
    /// checkpoint onto its TaskManagers, in the background. Nothing by
    /// default.
    fn keep_warm(&self) {}

    /// The region's slots and what a hot standby holds (for the
    /// heartbeat); `None` by default.
    fn resources(&self) -> Option<RegionResources> {
        None
    }
}
