//! `Promoting`: the lease names this region under a new (or newly
//! confirmed) epoch; every job is started from its newest checkpoint or
//! savepoint. The lease is renewed meanwhile; a failed start is retried
//! next tick.

use ferry_core::JmEpoch;
use tokio::time::Instant;

use crate::coordinator::Coordinator;
use crate::lease::{Lease, LeaseError};
use crate::role::Role;

pub async fn step(c: &Coordinator, lease: Lease, until: Instant, leading: JmEpoch) -> Role {
    let (lease, until) = match c.renew(&lease).await {
        Ok(x) => x,
        Err(LeaseError::Changed) | Err(LeaseError::Exists) => match c.lost(&lease).await {
            Ok(x) => x,
            Err(next) => return next,
        },
        Err(LeaseError::Unavailable(e)) => {
            tracing::warn!("renewing the region lease while promoting failed (retrying): {e}");
            if Instant::now() < until {
                return Role::Promoting { lease, until };
            }
            return super::primary::isolate(c, lease, &e).await;
        }
    };
    match c.jobs.start(lease.epoch).await {
        Ok(n) => {
            tracing::info!(jobs = n, region_epoch = %lease.epoch, "primary region: started every job from its newest checkpoint");
            Role::Primary {
                lease,
                until,
                started_for: Some(leading),
            }
        }
        Err(e) => {
            tracing::warn!("starting the primary region's jobs failed (retrying): {e}");
            Role::Promoting { lease, until }
        }
    }
}
