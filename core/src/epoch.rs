//! The two fencing epochs, as distinct types so they cannot be swapped.
//!
//! - [`JmEpoch`]: the in-region leader lease's fencing epoch (the KV
//!   revision at which a JobManager became leader). Every command to a
//!   TaskManager and every checkpoint commit carries it.
//! - [`RegionEpoch`]: the region lease's epoch (how many times the primary
//!   role changed hands). Every deployment, commit and manifest carries it;
//!   the newer region epoch always wins.
//!
//! Invariant: both only grow; a receiver refuses anything older than the
//! newest it has seen. They travel as plain `u64` only on the protobuf wire
//! and in JSON (`#[serde(transparent)]`), converted at that edge.

use std::fmt;

use serde::{Deserialize, Serialize};

/// Fencing epoch of a region's leading JobManager.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, Default,
)]
#[serde(transparent)]
pub struct JmEpoch(pub u64);

/// Epoch of the region lease: which holding of the primary role.
/// `RegionEpoch::NONE` (0) without cross-region coordination.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, Default,
)]
#[serde(transparent)]
pub struct RegionEpoch(pub u64);

impl RegionEpoch {
    /// No region lease (a single region, or `ferry local`).
    pub const NONE: RegionEpoch = RegionEpoch(0);

    /// The epoch of the next holder of the primary role.
    pub fn next(self) -> Self {
        Self(self.0 + 1)
    }
}

impl fmt::Display for JmEpoch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

impl fmt::Display for RegionEpoch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn epochs_serialize_as_plain_numbers_and_order_by_value() {
        assert_eq!(serde_json::to_string(&RegionEpoch(7)).unwrap(), "7");
        assert_eq!(serde_json::from_str::<JmEpoch>("42").unwrap(), JmEpoch(42));
        assert!(RegionEpoch(3) > RegionEpoch(2));
        assert_eq!(RegionEpoch::NONE.next(), RegionEpoch(1));
    }
}
