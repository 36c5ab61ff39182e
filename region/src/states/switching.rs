//! `SwitchingOver`: a planned switchover stops every job with a savepoint
//! and waits for the savepoints in the target's store
//! ([`crate::switchover`]); meanwhile this state keeps renewing the lease
//! (the region is still the primary) and starts no job. The switchover
//! itself moves the lease and leaves this state.

use tokio::time::Instant;

use crate::coordinator::Coordinator;
use crate::lease::{Lease, LeaseError};
use crate::role::Role;

pub async fn step(c: &Coordinator, lease: Lease, until: Instant, to: String) -> Role {
    match c.renew(&lease).await {
        Ok((lease, until)) => Role::SwitchingOver { lease, until, to },
        Err(LeaseError::Changed) | Err(LeaseError::Exists) => match c.lost(&lease).await {
            Ok((lease, until)) => Role::SwitchingOver { lease, until, to },
            Err(next) => next,
        },
        // The jobs are stopping anyway; the switchover decides what
        // happens when the lease cannot be moved either.
        Err(LeaseError::Unavailable(_)) => Role::SwitchingOver { lease, until, to },
    }
}
