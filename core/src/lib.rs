//! Ferry's shared vocabulary: ids, values and schemas, the job spec and its
//! validation, the checkpoint manifest and layout, and object-store access.
//!
//! Every other crate depends on this one and on nothing else of Ferry's, so
//! the types that cross a process or crate boundary live here.

pub mod access;
pub mod api;
pub mod codec;
pub mod config;
pub mod epoch;
pub mod error;
pub mod ids;
pub mod manifest;
pub mod schema;
pub mod spec;
pub mod storage;
pub mod tls;
pub mod value;

pub use epoch::{JmEpoch, RegionEpoch};
pub use error::{CoreError, Result};
pub use ids::{CheckpointId, JobId};

/// The gRPC protocols: JobManager <-> TaskManager
/// (`proto/ferry/v1/taskmanager.proto`) and the exchange between
/// TaskManagers (`proto/ferry/v1/exchange.proto`), both package `ferry.v1`.
pub mod proto {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("ferry.v1");
}
