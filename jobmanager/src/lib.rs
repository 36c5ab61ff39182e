//! The JobManager: owns jobs (submission, lifecycle, restart strategy), the
//! checkpoint coordinator, savepoints, metrics, and the REST API.
//!
//! Modules, each using only modules listed before it (so no import cycle):
//! `state` (the lifecycle table), `model` (what the API takes and
//! returns), `error`, `leadership` (role and fences), `restart`
//! (strategies), `taskmanagers` and `deployment` (where tasks run), `metrics`, `job` (one
//! job and every change of its state), `store` (the job store),
//! `checkpoint` (snapshot coordination), `attempt` (one deployment),
//! `driver` (a job's lifetime), `service` (the [`JobManager`] handle and its
//! job operations), `scheduler` (drains and rebalancing: moving jobs),
//! `handover` (leadership changes), `hot` (a hot standby's held jobs), `regions` (the
//! cross-region side), `region_side` (the JobManager wired to
//! `ferry_region`), `ha` (the region's election), `auth` (who calls the API and
//! their grants), `audit` (the trail of mutating calls), `api` (REST).
//!
//! Invariant: a job's state changes only in the `job` module's one
//! transition function (along [`state::JobState::can_transition`] for the
//! jobs this instance drives), and only the checkpoint coordinator of a job,
//! under the leader's epoch, writes its manifests.

pub mod api;
mod attempt;
pub mod audit;
pub mod auth;
mod checkpoint;
mod deployment;
mod driver;
pub mod error;
pub mod ha;
mod handover;
mod hot;
mod job;
pub mod leadership;
pub mod metrics;
pub mod model;
mod region_side;
mod regions;
pub mod restart;
pub mod scheduler;
pub mod service;
pub mod state;
pub mod store;
pub mod taskmanagers;

pub use error::JmError;
pub use model::{CheckpointInfo, CompletedCheckpoint, JobInfo, JobManagerConfig, SavepointInfo};
pub use region_side::{RuntimeCheck, start_region_side};
pub use service::JobManager;
pub use state::JobState;
