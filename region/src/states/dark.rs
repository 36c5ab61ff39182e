//! `Dark`: the region plays dead for a failover drill — no heartbeat, no
//! lease renewal, no job — until the outage ends; then it reads the lease
//! anew like a restarted JobManager.

use tokio::time::Instant;

use crate::role::Role;

pub fn step(until: Instant) -> Role {
    if Instant::now() >= until {
        tracing::warn!("drill: the simulated outage ended; following the region lease again");
        Role::Starting
    } else {
        Role::Dark { until }
    }
}
