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
}
