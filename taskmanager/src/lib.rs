//! Ferry's streaming runtime: sources, operators (filter, map, windows),
//! sinks (files, NATS JetStream, ...), checkpoint barriers and state snapshots, and the tasks that run
//! them. The JobManager deploys jobs through [`runtime::deploy`] and talks to
//! tasks with the messages in [`protocol`]. A TaskManager process serves
//! the leader over gRPC ([`server`]) and its health and metrics over HTTP
//! ([`http`]); tasks on different TaskManagers exchange records over
//! [`link`].

pub mod batch;
pub mod exchange;
pub mod expr;
pub mod http;
pub mod incremental;
pub mod link;
pub mod metrics;
pub mod nats;
pub mod operator;
pub mod pace;
pub mod protocol;
pub mod runtime;
pub mod server;
pub mod sink;
pub mod source;
pub mod state;
pub mod task;
pub mod wire;
