//! One module per top-level command.

pub mod bench;
pub mod job;
pub mod local;
pub mod schema;
pub mod validate;
