//! The JobManager: owns jobs (submission, lifecycle, restart strategy), the
//! checkpoint coordinator, savepoints, metrics, and the REST API.
//!
//! Invariant: a job's state changes only through [`state::JobState::transition`],
//! and only the coordinator of a job writes its manifests.

pub mod api;
mod attempt;
mod checkpoint;
mod deployment;
mod driver;
pub mod error;
pub mod ha;
mod job;
pub mod jobs;
pub mod leadership;
pub mod metrics;
pub mod model;
pub mod restart;
pub mod service;
pub mod state;
pub mod store;
pub mod taskmanagers;

pub use error::JmError;
pub use model::{CheckpointInfo, CompletedCheckpoint, JobInfo, JobManagerConfig, SavepointInfo};
pub use service::JobManager;
pub use state::JobState;
