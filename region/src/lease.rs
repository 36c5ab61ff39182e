//! The region lease: one key, `region-lease`, in the global KV names the
//! primary region — the one that runs the jobs — and the region epoch.
//!
//! - It changes hands only by compare-and-set ([`claim`]), so of several
//!   standbys trying to take over only one wins, and a region cut off from
//!   the global KV's quorum cannot change it at all. Each change of hands
//!   increments the region epoch carried in the record.
//! - The primary's leader renews it by compare-and-set every health-check
//!   interval ([`renew`]): same primary, same epoch, a new revision. A
//!   successful renewal needs a quorum and proves nobody took the lease
//!   since, so it — never a read, which a minority node answers with stale
//!   data — is what confirms the primary role: the primary may act until
//!   half the region timeout after it *sent* its last successful renewal.
//! - A standby judges the primary silent when the lease's revision has not
//!   changed for the whole region timeout on its own monotonic clock
//!   ([`crate::clock::Unchanged`]). Only clock rates must agree, never two
//!   hosts' wall clocks: the renewal that the standby last saw was sent
//!   before it was seen, so the primary stopped acting at least half a
//!   timeout before any standby may claim.

use std::sync::Arc;

use bytes::Bytes;
use chrono::{DateTime, Utc};
use ferry_core::RegionEpoch;
use ferry_ha::{Coordination, HaError};
use serde::{Deserialize, Serialize};

/// Key of the lease in the global lease bucket.
pub const REGION_LEASE: &str = "region-lease";

/// What the lease key holds.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct LeaseRecord {
    pub primary: String,
    /// Absent only in records written before epochs were kept in the
    /// record; then the revision stands in for it.
    #[serde(default)]
    pub epoch: Option<RegionEpoch>,
    /// When this region became primary (the writer's clock; display only).
    pub since: DateTime<Utc>,
    /// Why it became primary (`initial`, `failover: …`, `switchover …`).
    pub reason: String,
    /// The last renewal (the writer's clock; display only).
    #[serde(default)]
    pub renewed_at: Option<DateTime<Utc>>,
    /// Who moved the lease here: the REST caller of a switchover, forced
    /// failover, fail-back or drill, or [`crate::webhook::AUTOMATIC`].
    /// Absent in records written before it was kept.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub by: Option<String>,
}

/// The lease as read or as last written by this instance.
#[derive(Clone, Debug, PartialEq)]
pub struct Lease {
    /// `None` when the record is unreadable (then nobody is known to be
    /// primary: after the region timeout a standby claims it anew).
    pub record: Option<LeaseRecord>,
    pub epoch: RegionEpoch,
    /// KV revision of the record: the expected revision of the next
    /// compare-and-set.
    pub revision: u64,
}

impl Lease {
    /// The primary region it names, if readable.
    pub fn primary(&self) -> Option<&str> {
        self.record.as_ref().map(|r| r.primary.as_str())
    }

    /// True when it names `region`.
    pub fn names(&self, region: &str) -> bool {
        self.primary() == Some(region)
    }
}

/// Why a lease operation did not succeed.
#[derive(Clone, Debug, thiserror::Error, PartialEq)]
pub enum LeaseError {
    /// The global KV did not answer, or has no quorum.
    #[error("the global KV is unreachable or has no quorum: {0}")]
    Unavailable(String),
    /// The compare-and-set lost: the lease changed since it was read.
    #[error(
        "the region lease changed meanwhile (another region claimed it, or the read was stale)"
    )]
    Changed,
    /// `create` found a lease already there.
    #[error("the region lease exists already")]
    Exists,
}

impl From<HaError> for LeaseError {
    fn from(e: HaError) -> Self {
        match e {
            HaError::Exists(_) => LeaseError::Exists,
            HaError::WrongRevision(..) => LeaseError::Changed,
            HaError::Unavailable(m) => LeaseError::Unavailable(m),
        }
    }
}

fn encode(r: &LeaseRecord) -> Bytes {
    // A struct of strings and numbers always serializes.
    Bytes::from(serde_json::to_vec(r).unwrap_or_default())
}

/// Reads the lease (`None`: never created). May be stale on a minority
/// node: use it to learn who is primary, never to confirm the role.
pub async fn read(global: &dyn Coordination) -> Result<Option<Lease>, LeaseError> {
    let Some(e) = global.get(REGION_LEASE).await? else {
        return Ok(None);
    };
    Ok(Some(
        match serde_json::from_slice::<LeaseRecord>(&e.value) {
            Ok(r) => Lease {
                epoch: r.epoch.unwrap_or(RegionEpoch(e.revision)),
                record: Some(r),
                revision: e.revision,
            },
            Err(err) => {
                tracing::warn!(
                    revision = e.revision,
                    "the region lease record is unreadable ({err}): no region is known to be primary; a standby claims the lease after regions.timeout, or force one with `ferry region failover --to REGION --force`"
                );
                // Epochs only grow with revisions (each claim writes at least
                // once), so the revision bounds every epoch used so far.
                Lease {
                    record: None,
                    epoch: RegionEpoch(e.revision),
                    revision: e.revision,
                }
            }
        },
    ))
}

/// Creates the first lease naming `region`, region epoch 1, on behalf of
/// `by`.
pub async fn create(
    global: &Arc<dyn Coordination>,
    region: &str,
    reason: &str,
    by: &str,
) -> Result<Lease, LeaseError> {
    let record = LeaseRecord {
        primary: region.to_string(),
        epoch: Some(RegionEpoch(1)),
        since: Utc::now(),
        reason: reason.to_string(),
        renewed_at: None,
        by: Some(by.to_string()),
    };
    let revision = global.create(REGION_LEASE, encode(&record)).await?;
    Ok(Lease {
        epoch: RegionEpoch(1),
        record: Some(record),
        revision,
    })
}

/// Makes `region` primary in place of `current` (compare-and-set on its
/// revision), with the next region epoch, on behalf of `by`.
#[tracing::instrument(name = "region_lease.claim", skip(global, current), fields(from = ?current.primary(), epoch = %current.epoch))]
pub async fn claim(
    global: &Arc<dyn Coordination>,
    current: &Lease,
    region: &str,
    reason: &str,
    by: &str,
) -> Result<Lease, LeaseError> {
    let epoch = current.epoch.next();
    let record = LeaseRecord {
        primary: region.to_string(),
        epoch: Some(epoch),
        since: Utc::now(),
        reason: reason.to_string(),
        renewed_at: None,
        by: Some(by.to_string()),
    };
    let revision = global
        .update(REGION_LEASE, encode(&record), current.revision)
        .await?;
    Ok(Lease {
        record: Some(record),
        epoch,
        revision,
    })
}

/// Renews `current` unchanged but for its renewal time (compare-and-set):
/// success proves a quorum holds it as written.
pub async fn renew(global: &Arc<dyn Coordination>, current: &Lease) -> Result<Lease, LeaseError> {
    let Some(mut record) = current.record.clone() else {
        return Err(LeaseError::Changed);
    };
    record.epoch = Some(current.epoch);
    record.renewed_at = Some(Utc::now());
    let revision = global
        .update(REGION_LEASE, encode(&record), current.revision)
        .await?;
    Ok(Lease {
        record: Some(record),
        epoch: current.epoch,
        revision,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_ha::in_process::InProcess;
    use std::time::Duration;

    fn kv() -> Arc<dyn Coordination> {
        Arc::new(InProcess::new(Duration::from_secs(3600)))
    }

    #[tokio::test]
    async fn only_one_of_two_racing_standbys_takes_the_lease() {
        let kv = kv();
        let first = create(&kv, "east", "initial", "automatic").await.unwrap();
        assert_eq!(first.epoch, RegionEpoch(1));
        assert_eq!(
            create(&kv, "west", "initial", "automatic").await,
            Err(LeaseError::Exists)
        );
        let seen = read(kv.as_ref()).await.unwrap().unwrap();
        assert_eq!(seen, first);
        // Both standbys saw the same revision; only one CAS succeeds.
        let a = claim(&kv, &seen, "west", "failover", "automatic").await;
        let b = claim(&kv, &seen, "south", "failover", "automatic").await;
        assert!(a.is_ok() != b.is_ok(), "{a:?} {b:?}");
        let now = read(kv.as_ref()).await.unwrap().unwrap();
        assert_eq!(now.primary(), Some("west"));
        assert_eq!(now.epoch, RegionEpoch(2), "the region epoch grows by one");
    }

    #[tokio::test]
    async fn a_renewal_keeps_the_epoch_and_fails_once_another_region_claimed() {
        let kv = kv();
        let mine = create(&kv, "east", "initial", "automatic").await.unwrap();
        let renewed = renew(&kv, &mine).await.unwrap();
        assert_eq!(renewed.epoch, mine.epoch);
        assert!(renewed.revision > mine.revision);
        // A renewal on a stale revision loses.
        assert_eq!(renew(&kv, &mine).await, Err(LeaseError::Changed));
        let taken = claim(&kv, &renewed, "west", "failover", "automatic")
            .await
            .unwrap();
        assert_eq!(renew(&kv, &renewed).await, Err(LeaseError::Changed));
        assert_eq!(read(kv.as_ref()).await.unwrap().unwrap(), taken);
    }

    #[tokio::test]
    async fn who_moved_the_lease_survives_renewals_and_old_records_still_read() {
        let kv = kv();
        let first = create(&kv, "east", "initial", "automatic").await.unwrap();
        let moved = claim(&kv, &first, "west", "switchover from east", "alice")
            .await
            .unwrap();
        renew(&kv, &moved).await.unwrap();
        let read_back = read(kv.as_ref()).await.unwrap().unwrap();
        assert_eq!(read_back.record.unwrap().by.as_deref(), Some("alice"));
        // A record written before `by` was kept.
        kv.put(
            REGION_LEASE,
            Bytes::from_static(
                br#"{"primary":"east","epoch":3,"since":"2026-01-01T00:00:00Z","reason":"initial"}"#,
            ),
        )
        .await
        .unwrap();
        let old = read(kv.as_ref()).await.unwrap().unwrap();
        assert_eq!(old.primary(), Some("east"));
        assert_eq!(old.record.unwrap().by, None);
    }

    #[tokio::test]
    async fn an_unreadable_record_names_nobody_and_can_be_claimed_above_every_epoch() {
        let kv = kv();
        let first = create(&kv, "east", "initial", "automatic").await.unwrap();
        let second = claim(&kv, &first, "west", "failover", "automatic")
            .await
            .unwrap();
        kv.put(REGION_LEASE, Bytes::from_static(b"{not json"))
            .await
            .unwrap();
        let corrupt = read(kv.as_ref()).await.unwrap().unwrap();
        assert_eq!(corrupt.primary(), None);
        assert!(corrupt.epoch > second.epoch, "{corrupt:?}");
        // Nobody can renew it; a claim replaces it with a newer epoch.
        assert_eq!(renew(&kv, &corrupt).await, Err(LeaseError::Changed));
        let fixed = claim(&kv, &corrupt, "east", "forced", "automatic")
            .await
            .unwrap();
        assert!(fixed.epoch > corrupt.epoch);
        assert_eq!(read(kv.as_ref()).await.unwrap().unwrap(), fixed);
    }
}
