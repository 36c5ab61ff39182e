//! `Starting`: this JobManager just began leading its region and runs
//! nothing until it knows the region's role. A lease that names this
//! region is confirmed by renewing it (a restarted primary); the home
//! region creates the first lease; otherwise the region stands by.

use crate::coordinator::Coordinator;
use crate::lease::{self, LeaseError};
use crate::role::Role;
use crate::webhook::AUTOMATIC;

pub async fn step(c: &Coordinator) -> Role {
    let me = c.s.region.as_str();
    let home = c.s.home.as_deref().unwrap_or(me);
    match c.read_lease().await {
        Err(e) => {
            tracing::debug!("reading the region lease failed: {e}");
            Role::Starting
        }
        Ok((None, _)) if home == me => {
            let sent = tokio::time::Instant::now();
            match c
                .bounded(lease::create(&c.lease_kv, me, "initial", AUTOMATIC))
                .await
            {
                Ok(l) => {
                    tracing::info!(region_epoch = %l.epoch, "took the region lease: this region is the primary");
                    let until = c.confirmed(&l, sent);
                    Role::Promoting { lease: l, until }
                }
                Err(LeaseError::Exists) => Role::Starting,
                Err(e) => {
                    tracing::debug!("creating the region lease failed: {e}");
                    Role::Starting
                }
            }
        }
        Ok((None, _)) => {
            c.jobs.stand_by(Some(home)).await;
            Role::Standby {
                primary: Some(home.to_string()),
            }
        }
        Ok((Some(l), _)) if l.names(me) => match c.renew(&l).await {
            Ok((lease, until)) => {
                tracing::info!(region_epoch = %lease.epoch, "the region lease names this region: starting its jobs");
                Role::Promoting { lease, until }
            }
            Err(e) => {
                tracing::debug!("confirming the region lease failed (retrying): {e}");
                Role::Starting
            }
        },
        Ok((Some(l), _)) => {
            let primary = l.primary().map(str::to_string);
            tracing::info!(primary = ?primary, region_epoch = %l.epoch, "standby region: running no job; replicated jobs wait for a promotion");
            c.jobs.stand_by(primary.as_deref()).await;
            Role::Standby { primary }
        }
    }
}
