//! The region lease: one key, `region-lease`, in the global KV names the
//! primary region — the one that runs the jobs. It changes only by
//! compare-and-set, so of several standbys trying to take over only one
//! wins, and a region cut off from the global KV's quorum cannot change it
//! at all. The key's revision when it was last set is the region epoch.

use std::sync::Arc;

use bytes::Bytes;
use chrono::{DateTime, Utc};
use ferry_ha::{Coordination, HaError};
use serde::{Deserialize, Serialize};

/// Key of the lease in the global KV.
pub const REGION_LEASE: &str = "region-lease";

/// Who is primary, since when and why.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct RegionLease {
    pub primary: String,
    pub since: DateTime<Utc>,
    /// Why it became primary (`initial`, `failover: …`).
    pub reason: String,
}

/// The lease and its revision (the region epoch), if set.
pub async fn read(global: &dyn Coordination) -> Result<Option<(RegionLease, u64)>, HaError> {
    Ok(global.get(REGION_LEASE).await?.and_then(|e| {
        serde_json::from_slice::<RegionLease>(&e.value)
            .ok()
            .map(|l| (l, e.revision))
    }))
}

/// Makes `region` primary: creates the lease (`expected` `None`) or
/// replaces the revision `expected`. Returns the new region epoch;
/// `HaError::Exists` / `WrongRevision` when another change came first.
#[tracing::instrument(name = "region_lease.claim", skip(global))]
pub async fn claim(
    global: &Arc<dyn Coordination>,
    region: &str,
    expected: Option<u64>,
    reason: &str,
) -> Result<u64, HaError> {
    let value = Bytes::from(
        serde_json::to_vec(&RegionLease {
            primary: region.to_string(),
            since: Utc::now(),
            reason: reason.to_string(),
        })
        .unwrap_or_default(),
    );
    match expected {
        None => global.create(REGION_LEASE, value).await,
        Some(rev) => global.update(REGION_LEASE, value, rev).await,
    }
}

/// What a standby region's leader does about the primary region.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Takeover {
    /// The primary is alive (or only just became primary).
    Wait,
    /// The primary is silent, but this healthy standby holds newer
    /// verified checkpoints and goes first.
    Defer(String),
    /// Take the region lease.
    Claim,
}

/// Decides whether `me`, a standby, takes over from `primary`. The primary
/// is silent when its heartbeat is older than `timeout` and it has held
/// the lease at least that long (a region that just became primary has had
/// no time to beat). Of several standbys, the healthy one with the newest
/// verified checkpoints (the sum over jobs of the newest verified number;
/// ties: the smaller region name) goes first; the others step in only
/// when the primary has been silent for twice the timeout.
pub fn takeover(
    me: &str,
    primary: &str,
    views: &[crate::health::RegionView],
    my_verified: &std::collections::BTreeMap<String, u64>,
    timeout: std::time::Duration,
    lease_age: std::time::Duration,
) -> Takeover {
    use crate::verifier::score;
    use std::cmp::Reverse;
    let silent_for = views
        .iter()
        .find(|v| v.region == primary && !v.healthy)
        .map(|v| {
            v.heartbeat_age_ms
                .map(std::time::Duration::from_millis)
                .unwrap_or(std::time::Duration::MAX)
        })
        .filter(|age| *age > timeout);
    let Some(silent_for) = silent_for.filter(|_| lease_age > timeout) else {
        return Takeover::Wait;
    };
    let mine = (score(my_verified), Reverse(me));
    let better = views.iter().find(|v| {
        v.region != me
            && v.region != primary
            && v.healthy
            && v.heartbeat
                .as_ref()
                .is_some_and(|h| (score(&h.verified), Reverse(v.region.as_str())) > mine)
    });
    match better {
        Some(b) if silent_for < timeout * 2 => Takeover::Defer(b.region.clone()),
        _ => Takeover::Claim,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_ha::in_process::InProcess;
    use std::time::Duration;

    #[tokio::test]
    async fn only_one_of_two_racing_standbys_takes_the_lease() {
        let kv: Arc<dyn Coordination> = Arc::new(InProcess::new(Duration::from_secs(60)));
        let first = claim(&kv, "east", None, "initial").await.unwrap();
        assert!(claim(&kv, "west", None, "initial").await.is_err());
        let (l, rev) = read(kv.as_ref()).await.unwrap().unwrap();
        assert_eq!((l.primary.as_str(), rev), ("east", first));
        // Both standbys saw revision `first`; only one CAS succeeds.
        let a = claim(&kv, "west", Some(first), "failover").await;
        let b = claim(&kv, "south", Some(first), "failover").await;
        assert!(a.is_ok() != b.is_ok(), "{a:?} {b:?}");
        let (l, epoch) = read(kv.as_ref()).await.unwrap().unwrap();
        assert_eq!(l.primary, "west");
        assert!(epoch > first, "the region epoch grows");
    }

    fn view(
        region: &str,
        age_ms: Option<u64>,
        verified: &[(&str, u64)],
    ) -> crate::health::RegionView {
        crate::health::RegionView {
            region: region.into(),
            healthy: age_ms.is_some_and(|a| a < 5_000),
            heartbeat_age_ms: age_ms,
            heartbeat: age_ms.map(|_| crate::health::RegionHeartbeat {
                region: region.into(),
                verified: verified.iter().map(|(j, n)| (j.to_string(), *n)).collect(),
                ..Default::default()
            }),
        }
    }

    #[test]
    fn the_standby_with_the_newest_verified_checkpoints_takes_over_first() {
        let t = Duration::from_secs(5);
        let long = Duration::from_secs(60);
        let mine: std::collections::BTreeMap<String, u64> = [("job".to_string(), 7)].into();
        // The primary beats: wait.
        let alive = [
            view("east", Some(100), &[]),
            view("west", Some(100), &[("job", 9)]),
        ];
        assert_eq!(
            takeover("south", "east", &alive, &mine, t, long),
            Takeover::Wait
        );
        // Silent, no other standby: claim.
        let alone = [view("east", Some(6_000), &[])];
        assert_eq!(
            takeover("south", "east", &alone, &mine, t, long),
            Takeover::Claim
        );
        // ... but not while the lease itself is younger than the timeout.
        assert_eq!(
            takeover("south", "east", &alone, &mine, t, Duration::from_secs(1)),
            Takeover::Wait
        );
        // Never heard from at all counts as silent.
        let never = [view("east", None, &[])];
        assert_eq!(
            takeover("south", "east", &never, &mine, t, long),
            Takeover::Claim
        );
        // West verified checkpoint 9, this region only 7: west goes first,
        let ahead = [
            view("east", Some(6_000), &[]),
            view("west", Some(100), &[("job", 9)]),
        ];
        assert_eq!(
            takeover("south", "east", &ahead, &mine, t, long),
            Takeover::Defer("west".into())
        );
        // and west itself claims.
        let west_view = [
            view("east", Some(6_000), &[]),
            view("south", Some(100), &[("job", 7)]),
        ];
        let west_has: std::collections::BTreeMap<String, u64> = [("job".to_string(), 9)].into();
        assert_eq!(
            takeover("west", "east", &west_view, &west_has, t, long),
            Takeover::Claim
        );
        // When west does not within another timeout, this region steps in.
        let late = [
            view("east", Some(10_500), &[]),
            view("west", Some(100), &[("job", 9)]),
        ];
        assert_eq!(
            takeover("south", "east", &late, &mine, t, long),
            Takeover::Claim
        );
        // An unhealthy better standby does not count.
        let down = [
            view("east", Some(6_000), &[]),
            view("west", Some(7_000), &[("job", 9)]),
        ];
        assert_eq!(
            takeover("south", "east", &down, &mine, t, long),
            Takeover::Claim
        );
        // Ties go to the smaller name.
        let tie = [
            view("east", Some(6_000), &[]),
            view("north", Some(100), &[("job", 7)]),
        ];
        assert_eq!(
            takeover("south", "east", &tie, &mine, t, long),
            Takeover::Defer("north".into())
        );
        let tie2 = [
            view("east", Some(6_000), &[]),
            view("south", Some(100), &[("job", 7)]),
        ];
        assert_eq!(
            takeover("north", "east", &tie2, &mine, t, long),
            Takeover::Claim
        );
    }
}
