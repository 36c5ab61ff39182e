//! The region role of one JobManager's coordinator as a typed state
//! machine: each state carries exactly what it needs (the lease it holds,
//! how long its fence is confirmed, whom it stands by for), and
//! [`allowed`] is the one place that says which state may follow which.
//!
//! ```text
//!   Follower ──leads its region──> Starting ──lease names another──> Standby
//!                                     │                                │ primary silent: claim
//!                                     │ names this region / creates it │ or the lease is moved here
//!                                     v                                v
//!   Dark <──drill── Primary <────── Promoting <───────────────────── Isolated
//!    │               │  │  ^ rolled back                                ^
//!    │               │  v  │                                            │ cannot renew for
//!    │               │ SwitchingOver ──lease moved──┐                   │ half the timeout
//!    v               │                              v                   │
//!   Starting         └──lease names another──> Demoting ──> Standby     │
//!                    └──────────────────────────────────────────────────┘
//! ```
//! Every state but `Follower` requires this JobManager to lead its region;
//! losing that leadership leads back to `Follower` from anywhere.

use std::fmt;

use ferry_core::api::RegionRole;
use ferry_core::{JmEpoch, RegionEpoch};
use tokio::time::Instant;

use crate::lease::Lease;

/// The coordinator's state.
#[derive(Clone, Debug)]
pub enum Role {
    /// This JobManager does not lead its region: no region action.
    Follower,
    /// Leading; the region lease not read yet: nothing runs.
    Starting,
    /// A standby of `primary` (`None`: the lease record is unreadable).
    Standby { primary: Option<String> },
    /// The lease names this region (claimed, moved here, or confirmed after
    /// a restart): every job is being started.
    Promoting { lease: Lease, until: Instant },
    /// Holds the lease, confirmed until `until`; the jobs were started
    /// under the in-region epoch `started_for` (`None`: to be started
    /// again, e.g. after a switchover was rolled back).
    Primary {
        lease: Lease,
        until: Instant,
        started_for: Option<JmEpoch>,
    },
    /// A planned switchover to `to` runs: the jobs stop with savepoints;
    /// the lease is still renewed until it moves.
    SwitchingOver {
        lease: Lease,
        until: Instant,
        to: String,
    },
    /// The lease names `to` (or nobody known): every job is being stopped
    /// and its tasks cancelled.
    Demoting { to: Option<String> },
    /// A primary that could not renew the lease for half the region
    /// timeout: its jobs are stopped until it renews again or learns who
    /// is primary.
    Isolated { lease: Lease, since: Instant },
    /// Playing dead for a failover drill until `until`.
    Dark { until: Instant },
}

impl Role {
    /// The API name of the state.
    pub fn name(&self) -> RegionRole {
        match self {
            Role::Follower => RegionRole::Follower,
            Role::Starting => RegionRole::Starting,
            Role::Standby { .. } => RegionRole::Standby,
            Role::Promoting { .. } => RegionRole::Promoting,
            Role::Primary { .. } => RegionRole::Primary,
            Role::SwitchingOver { .. } => RegionRole::SwitchingOver,
            Role::Demoting { .. } => RegionRole::Demoting,
            Role::Isolated { .. } => RegionRole::Isolated,
            Role::Dark { .. } => RegionRole::Dark,
        }
    }

    /// What this state means for the jobs of this region, for messages
    /// that must say where the jobs are.
    pub fn jobs_here(&self) -> &'static str {
        match self {
            Role::Follower => {
                "this JobManager does not lead its region: its region's leader decides where every job runs"
            }
            Role::Starting => "every job waits here until the region lease is read",
            Role::Standby { .. } => "every job runs in the primary region, none here",
            Role::Promoting { .. } => "every job is being started here",
            Role::Primary { .. } => "every job runs here",
            Role::SwitchingOver { .. } => {
                "every job is being stopped here with a savepoint for a switchover"
            }
            Role::Demoting { .. } => "every job is being stopped here",
            Role::Isolated { .. } => {
                "every job here is stopped until this region renews the region lease (it then resumes here) or another region takes over"
            }
            Role::Dark { .. } => "every job here is stopped for a failover drill",
        }
    }

    /// The lease this state holds, if it holds one.
    pub fn lease(&self) -> Option<&Lease> {
        match self {
            Role::Promoting { lease, .. }
            | Role::Primary { lease, .. }
            | Role::SwitchingOver { lease, .. }
            | Role::Isolated { lease, .. } => Some(lease),
            _ => None,
        }
    }

    /// The region epoch this state acts under, if it holds the lease.
    pub fn epoch(&self) -> Option<RegionEpoch> {
        self.lease().map(|l| l.epoch)
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.name())
    }
}

/// The one list of allowed transitions (staying in a state is always
/// allowed).
pub fn allowed(from: RegionRole, to: RegionRole) -> bool {
    use RegionRole::*;
    from == to
        || to == Follower
        || matches!(
            (from, to),
            (Follower, Starting)
                | (Starting, Standby)
                | (Starting, Promoting)
                | (Standby, Promoting)
                | (Promoting, Primary)
                | (Promoting, Demoting)
                | (Promoting, Isolated)
                | (Primary, Demoting)
                // The lease was moved to this region again (a new epoch).
                | (Primary, Promoting)
                | (SwitchingOver, Promoting)
                | (Primary, Isolated)
                | (Primary, SwitchingOver)
                | (Primary, Dark)
                | (SwitchingOver, Primary)
                | (SwitchingOver, Demoting)
                | (SwitchingOver, Isolated)
                | (Demoting, Standby)
                | (Isolated, Promoting)
                | (Isolated, Standby)
                | (Dark, Starting)
        )
}

#[cfg(test)]
mod tests {
    use super::*;
    use RegionRole::*;

    const ALL: [RegionRole; 9] = [
        Follower,
        Starting,
        Standby,
        Promoting,
        Primary,
        SwitchingOver,
        Demoting,
        Isolated,
        Dark,
    ];

    #[test]
    fn jobs_start_only_through_promoting_and_stop_before_standing_by() {
        // Only Promoting leads into Primary: every way to run jobs starts
        // them through the one state that does.
        for from in ALL {
            if from != Promoting && from != SwitchingOver && from != Primary {
                assert!(!allowed(from, Primary), "{from} -> primary");
            }
        }
        // A region holding the lease never becomes a standby without
        // stopping its jobs first (Demoting, or Isolated which stopped them).
        for from in [Promoting, Primary, SwitchingOver] {
            assert!(!allowed(from, Standby), "{from} -> standby");
        }
        // Losing the in-region leadership is possible from anywhere.
        for from in ALL {
            assert!(allowed(from, Follower));
        }
        // A drill's outage ends by reading the lease anew.
        assert!(allowed(Dark, Starting) && !allowed(Dark, Primary));
        assert!(!allowed(Standby, Dark), "only the primary plays dead");
    }
}
