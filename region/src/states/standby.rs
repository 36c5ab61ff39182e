//! `Standby`: the region runs nothing. It follows the lease: when the
//! lease is moved here (switchover, fail-back, forced failover) it
//! confirms and promotes; when the primary stops renewing for the region
//! timeout it takes the lease over by compare-and-set if
//! [`crate::takeover::decide`] says this region goes first — counting
//! silence only while this region itself reaches the global KV.

use tracing::Instrument;

use crate::coordinator::Coordinator;
use crate::jobs::RegionEvent;
use crate::lease;
use crate::role::Role;
use crate::takeover::{self, Situation, Takeover};
use crate::webhook::AUTOMATIC;

pub async fn step(c: &Coordinator, primary: Option<String>) -> Role {
    let me = c.s.region.as_str();
    // A hot standby keeps its jobs loaded at the newest replicated
    // checkpoints (in the background; nothing when cold).
    c.jobs.keep_warm();
    // Before the lease is read: a first good write after a deaf spell
    // restarts the silence that reading measures.
    let hearing = c.reachable() && c.probe_lease().await;
    let (l, silent_for) = match c.read_lease().await {
        Ok((Some(l), silent)) => (l, silent),
        Ok((None, _)) | Err(_) => return Role::Standby { primary },
    };
    if l.names(me) {
        return match c.renew(&l).await {
            Ok((lease, until)) => {
                tracing::info!(region_epoch = %lease.epoch, reason = ?lease.record.as_ref().map(|r| &r.reason), "the region lease was moved here: this region is the primary");
                Role::Promoting { lease, until }
            }
            Err(_) => Role::Standby { primary },
        };
    }
    let named = l.primary().map(str::to_string);
    if named != primary {
        c.jobs.stand_by(named.as_deref()).await;
    }
    if !c.s.auto_failover {
        return Role::Standby { primary: named };
    }
    if !hearing {
        // Cut off from the global KV (or it, or the lease's stream, has no
        // quorum or leader): this region cannot tell a silent primary from
        // its own deafness. The silence counts again from its next good
        // write.
        return Role::Standby { primary: named };
    }
    let drill = c.drill_target().await;
    let seen = c.seen();
    let verified = c.verifier.newest();
    let decision = takeover::decide(&Situation {
        me,
        primary: named.as_deref(),
        lease_silent_for: silent_for,
        views: &seen.views,
        my_verified: &verified,
        timeout: c.s.timeout,
        drill_target: drill.as_ref().map(|h| h.target.as_str()),
    });
    let who = named.as_deref().unwrap_or("(unreadable lease)");
    let wait = humantime::format_duration(c.s.timeout);
    match decision {
        Takeover::Wait => Role::Standby { primary: named },
        Takeover::StandAside(t) => {
            c.say_once(format!(
                "primary {who} is silent; a failover drill names {t} to take over: standing aside"
            ));
            Role::Standby { primary: named }
        }
        Takeover::Defer(better) => {
            c.say_once(format!(
                "primary {who} is silent; {better} holds newer verified checkpoints and takes over first (this region steps in if it has not within {wait})"
            ));
            Role::Standby { primary: named }
        }
        Takeover::Claim => {
            // A drill's target takes over on behalf of whoever started it.
            let (reason, by) = match drill.filter(|h| h.target == me) {
                Some(h) => (
                    format!(
                        "failover drill: primary {who} silent (simulated outage) for more than {wait}"
                    ),
                    h.by.unwrap_or_else(|| AUTOMATIC.to_string()),
                ),
                None => (
                    format!("failover: primary {who} silent for more than {wait}"),
                    AUTOMATIC.to_string(),
                ),
            };
            let span =
                tracing::info_span!("failover", from = %who, to = %me, region_epoch = %l.epoch);
            let sent = tokio::time::Instant::now();
            let claimed = c
                .bounded(lease::claim(&c.lease_kv, &l, me, &reason, &by))
                .instrument(span)
                .await;
            match claimed {
                Ok(lease) => {
                    tracing::warn!(old_primary = %who, region_epoch = %lease.epoch, "{reason}: this region is the primary now");
                    c.jobs.report(RegionEvent::Failover);
                    let until = c.confirmed(&lease, sent);
                    Role::Promoting { lease, until }
                }
                Err(e) => {
                    tracing::info!("another change of the region lease came first: {e}");
                    Role::Standby { primary: named }
                }
            }
        }
    }
}
