//! Ferry's cross-region coordination. This crate owns copying every
//! completed checkpoint and savepoint, and every job spec, from the primary
//! region's object store to each standby's ([`replicate`]), and proving in
//! the standby that those copies restore ([`verify`]), and the regions'
//! heartbeats in the global KV ([`health`]), the region lease ([`lease`]),
//! and what a region that failed over committed beyond the surviving
//! lineage ([`diverge`], fail-back's divergence report); promotion,
//! switchover, fail-back and drills build on it.

pub mod diverge;
pub mod health;
pub mod lease;
pub mod replicate;
pub mod replicator;
pub mod verifier;
pub mod verify;

pub use diverge::{Diverged, JobDivergence};
pub use replicate::{
    CheckpointCopy, JobCopy, ReplicationError, replicate_checkpoint, replicate_job,
};
pub use replicator::{CheckpointEvent, Replicator, Standby, StandbyStatus};
pub use verifier::{JobVerified, Verifier};
pub use verify::{CheckpointVerdict, RestoreCheck, Verification, verify_job};
