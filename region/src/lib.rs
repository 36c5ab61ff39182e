//! Ferry's cross-region coordination.
//!
//! - [`coordinator`]: one JobManager's region coordinator — the region role
//!   as a typed state machine ([`role`], one module per state in
//!   [`states`]), the region lease ([`lease`]), heartbeats ([`health`]),
//!   who takes over a silent primary ([`takeover`]), switchover and
//!   fail-back ([`switchover`]), drill outages ([`outage`], [`hold`]). It
//!   drives the JobManager only through the [`jobs::RegionJobs`] trait.
//! - [`replicate`] / [`replicator`]: copying every completed checkpoint,
//!   savepoint and job spec from the primary's object store to each
//!   standby's, only while [`fence`] says this region holds the primary
//!   role; [`diverge`]: what a region committed that the surviving
//!   lineage does not contain.
//! - [`sync`]: synchronous replication — a checkpoint completes only once
//!   `regions.syncStandbys` standby stores hold it.
//! - [`verify`] / [`verifier`]: proving in a standby that those copies
//!   restore.
//! - [`webhook`]: announcing a change of the primary role, and who caused
//!   it, to `regions.webhook`.
//! - [`side`]: all of it for one JobManager, built from its config.

pub mod clock;
pub mod coordinator;
pub mod diverge;
pub mod error;
pub mod fence;
pub mod health;
pub mod hold;
pub mod jobs;
pub mod lease;
pub mod outage;
pub mod replicate;
pub mod replicator;
pub mod role;
pub mod side;
pub mod states;
pub mod switchover;
pub mod sync;
pub mod takeover;
pub mod verifier;
pub mod verify;
pub mod webhook;

#[cfg(test)]
mod coordinator_tests;

pub use coordinator::{Coordinator, Settings};
pub use error::RegionError;
pub use fence::WriteFence;
pub use jobs::{RegionEvent, RegionJob, RegionJobs};
pub use replicate::{
    CheckpointCopy, CopyMode, JobCopy, ReplicationError, copy_snapshot_with, replicate_checkpoint,
    replicate_job, replicate_new,
};
pub use replicator::{CheckpointEvent, Replicator, Standby};
pub use side::{Announcements, RegionSide};
pub use sync::{SyncOutcome, SyncReplicator, SyncSettings};
pub use verifier::Verifier;
pub use verify::{CheckpointVerdict, RestoreCheck, Verification, verify_job};
