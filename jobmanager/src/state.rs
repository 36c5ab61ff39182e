//! The job lifecycle as an explicit state machine: every allowed transition
//! is listed in [`JobState::can_transition`], nowhere else. The type is part
//! of the REST API's bodies and lives in `ferry_core::api`; this is its old
//! path.

pub use ferry_core::api::JobState;
