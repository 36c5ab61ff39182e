//! The REST API's request and response bodies, shared by the server (the
//! JobManager), the region coordinator that produces the cross-region ones,
//! and every client (the CLI, drills, the sandbox, benchmarks, tests).
//!
//! Invariant: a body is defined once, here; nobody builds or parses the
//! JSON of an endpoint by hand.

pub mod audit;
pub mod cluster;
pub mod drill;
pub mod error;
pub mod jobs;
pub mod region;

pub use audit::*;
pub use cluster::*;
pub use drill::*;
pub use error::*;
pub use jobs::*;
pub use region::*;
