//! `Isolated`: a primary that could not renew the lease for half the
//! region timeout has stopped its jobs. Once a renewal succeeds the lease
//! is still its own: promote again (restore from the newest checkpoints).
//! Once it learns another region holds the lease: stand by.

use tokio::time::Instant;

use crate::coordinator::Coordinator;
use crate::lease::{Lease, LeaseError};
use crate::role::Role;

pub async fn step(c: &Coordinator, lease: Lease, since: Instant) -> Role {
    match c.renew(&lease).await {
        Ok((lease, until)) => {
            tracing::warn!(
                after = ?since.elapsed(),
                region_epoch = %lease.epoch,
                "the region lease is confirmed again: restarting the jobs from their checkpoints"
            );
            Role::Promoting { lease, until }
        }
        Err(LeaseError::Changed) | Err(LeaseError::Exists) => match c.lost(&lease).await {
            Ok((lease, until)) => Role::Promoting { lease, until },
            // The jobs are stopped already; learn whom to stand by for.
            Err(Role::Demoting { to }) => {
                c.jobs.stand_by(to.as_deref()).await;
                Role::Standby { primary: to }
            }
            Err(other) => other,
        },
        Err(LeaseError::Unavailable(_)) => Role::Isolated { lease, since },
    }
}
