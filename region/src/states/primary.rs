//! `Primary`: the region runs the jobs while it renews the lease every
//! tick. A renewal that loses the compare-and-set means another region
//! holds the lease: demote. Renewals that fail for half the region timeout
//! mean this region cannot prove it still holds it: isolate (stop every job
//! and cancel its tasks) before any standby may take over.

use ferry_core::JmEpoch;
use tokio::time::Instant;

use crate::coordinator::Coordinator;
use crate::lease::{Lease, LeaseError};
use crate::role::Role;

pub async fn step(
    c: &Coordinator,
    lease: Lease,
    until: Instant,
    started_for: Option<JmEpoch>,
    leading: JmEpoch,
) -> Role {
    match c.renew(&lease).await {
        Ok((lease, until)) => {
            // A new in-region leadership of this instance (lost and won
            // again between two ticks), or a rolled-back switchover: start
            // whatever does not run.
            if started_for != Some(leading) {
                match c.jobs.start(lease.epoch).await {
                    Ok(n) if n > 0 => tracing::info!(jobs = n, "primary region: started jobs"),
                    Ok(_) => {}
                    Err(e) => {
                        tracing::warn!("starting the primary region's jobs failed (retrying): {e}");
                        return Role::Primary {
                            lease,
                            until,
                            started_for,
                        };
                    }
                }
            }
            Role::Primary {
                lease,
                until,
                started_for: Some(leading),
            }
        }
        Err(LeaseError::Changed) | Err(LeaseError::Exists) => match c.lost(&lease).await {
            Ok((lease, until)) => Role::Primary {
                lease,
                until,
                started_for,
            },
            Err(next) => next,
        },
        Err(LeaseError::Unavailable(e)) if Instant::now() < until => {
            tracing::warn!(
                "renewing the region lease failed (retrying until half of regions.timeout has passed): {e}"
            );
            Role::Primary {
                lease,
                until,
                started_for,
            }
        }
        Err(LeaseError::Unavailable(e)) => isolate(c, lease, &e).await,
    }
}

/// The lease could not be renewed for half the timeout: stop every job
/// and cancel its tasks, before any standby may take over.
pub async fn isolate(c: &Coordinator, lease: Lease, why: &str) -> Role {
    tracing::error!(
        "cannot renew the region lease for half of regions.timeout ({}; global KV unreachable or without quorum): another region may take over; stopping every job here",
        why
    );
    c.jobs.stand_by(None).await;
    Role::Isolated {
        lease,
        since: Instant::now(),
    }
}
