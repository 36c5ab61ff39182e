//! Region heartbeats in the global KV: the leading JobManager of every
//! region puts `regions.<name>` every health-check interval, carrying its
//! API URL, its replication progress and its restore-verified checkpoints;
//! every JobManager lists them to see which regions are alive.
//!
//! A region is healthy while its heartbeat's revision keeps changing, on
//! the reader's own clock ([`crate::clock::Unchanged`]), never by comparing
//! the writer's timestamp with the reader's wall clock. The global KV counts
//! as reachable only after a *write* succeeded recently: a minority node
//! answers reads (stale) long after it lost its quorum.

use std::time::Duration;

use bytes::Bytes;
use chrono::Utc;
use ferry_core::api::{RegionHeartbeat, RegionView};
use ferry_ha::{Coordination, Entry, HaError};
use tokio::time::Instant;

use crate::clock::Unchanged;

/// Key prefix of region heartbeats in the global KV.
pub const REGIONS_PREFIX: &str = "regions.";

/// Key prefix of reachability probes of JobManagers that do not lead their
/// region (they publish no heartbeat, but must know whether a quorum
/// answers them).
pub const PROBES_PREFIX: &str = "probes.";

/// The key of a JobManager's reachability probe: `probes.<region>-<id>`,
/// with every character a KV key does not allow replaced by `_`.
pub fn probe_key(region: &str, instance: &str) -> String {
    let clean: String = format!("{region}-{instance}")
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect();
    format!("{PROBES_PREFIX}{clean}")
}

/// Writes this region's heartbeat (a quorum write).
pub async fn publish(global: &dyn Coordination, mut hb: RegionHeartbeat) -> Result<(), HaError> {
    hb.at = Some(Utc::now());
    let key = format!("{REGIONS_PREFIX}{}", hb.region);
    // A struct of strings and numbers always serializes.
    let value = Bytes::from(serde_json::to_vec(&hb).unwrap_or_default());
    global.put(&key, value).await.map(drop)
}

/// Every known region's health, measured on this process's clock.
#[derive(Debug)]
pub struct Health {
    known: Vec<String>,
    timeout: Duration,
    ages: Unchanged,
    /// When the last write to the global KV succeeded.
    last_write: Option<Instant>,
    /// When the last write to the global KV failed.
    last_failure: Option<Instant>,
}

impl Health {
    /// `known`: the regions of `regions.stores` (and this one).
    pub fn new(known: Vec<String>, timeout: Duration) -> Self {
        Self {
            known,
            timeout,
            ages: Unchanged::new(),
            last_write: None,
            last_failure: None,
        }
    }

    /// A write to the global KV (heartbeat, probe, lease renewal)
    /// succeeded just now. True when it ends a time in which the global KV
    /// was unreachable from here: every region's silence then counts
    /// again from now (this process could not have heard them).
    pub fn wrote(&mut self) -> bool {
        let regained = !self.reachable();
        self.last_write = Some(Instant::now());
        if regained {
            self.ages.restart_all();
        }
        regained
    }

    /// A write to the global KV (heartbeat, lease renewal) failed just now.
    pub fn write_failed(&mut self) {
        self.last_failure = Some(Instant::now());
    }

    /// True when a write succeeded within the region timeout and the
    /// newest write did not fail: cut off, a process says so at its first
    /// failed write, not a whole timeout after its last good one.
    pub fn reachable(&self) -> bool {
        self.last_write
            .is_some_and(|t| t.elapsed() <= self.timeout && self.last_failure.is_none_or(|f| f < t))
    }

    /// A watch delivered `key` at `revision` just now: the silence of a
    /// region counts from the moment its heartbeat arrived, not from the
    /// next listing (up to one health-check interval later).
    pub fn heard(&mut self, key: &str, revision: u64) {
        self.ages.observe(key, revision);
    }

    /// The regions' health from a listing of `regions.*` entries: every
    /// known region (and any other that heartbeats), sorted by name,
    /// healthy if its heartbeat changed within the timeout on this clock.
    pub fn observe(&mut self, entries: Vec<Entry>) -> Vec<RegionView> {
        let mut out: Vec<RegionView> = self
            .known
            .iter()
            .map(|r| RegionView {
                region: r.clone(),
                healthy: false,
                heartbeat_age_ms: None,
                heartbeat: None,
            })
            .collect();
        let mut present = Vec::new();
        for e in entries {
            let Ok(hb) = serde_json::from_slice::<RegionHeartbeat>(&e.value) else {
                continue;
            };
            let age = self.ages.observe(&e.key, e.revision);
            present.push(e.key.clone());
            let view = RegionView {
                region: hb.region.clone(),
                healthy: age <= self.timeout,
                heartbeat_age_ms: Some(age.as_millis() as u64),
                heartbeat: Some(hb),
            };
            match out.iter_mut().find(|v| v.region == view.region) {
                Some(v) => *v = view,
                None => out.push(view),
            }
        }
        // Keys that expired: never heard from again.
        for r in &self.known {
            let key = format!("{REGIONS_PREFIX}{r}");
            if !present.contains(&key) {
                self.ages.forget(&key);
            }
        }
        out.sort_by(|a, b| a.region.cmp(&b.region));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_ha::in_process::InProcess;
    use std::sync::Arc;

    fn hb(region: &str) -> RegionHeartbeat {
        RegionHeartbeat {
            region: region.into(),
            leader: "jm-0".into(),
            api_url: "http://127.0.0.1:1".into(),
            ..Default::default()
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_region_is_healthy_while_its_heartbeat_changes_on_the_readers_clock() {
        let kv: Arc<dyn Coordination> = Arc::new(InProcess::new(Duration::from_secs(3600)));
        let t = Duration::from_secs(2);
        let mut h = Health::new(vec!["east".into(), "west".into()], t);
        publish(kv.as_ref(), hb("east")).await.unwrap();
        let v = h.observe(kv.list(REGIONS_PREFIX).await.unwrap());
        assert!(v[0].healthy && !v[1].healthy, "{v:?}");
        assert_eq!(v[1].heartbeat_age_ms, None, "west never heartbeat");
        // East keeps beating: healthy however long it runs.
        for _ in 0..5 {
            tokio::time::advance(Duration::from_secs(1)).await;
            publish(kv.as_ref(), hb("east")).await.unwrap();
            assert!(h.observe(kv.list(REGIONS_PREFIX).await.unwrap())[0].healthy);
        }
        // East stops: unhealthy once its revision is older than the
        // timeout here — whatever its own `at` says.
        let mut stale = hb("east");
        stale.at = Some(Utc::now() + chrono::Duration::hours(1));
        kv.put(
            "regions.east",
            Bytes::from(serde_json::to_vec(&stale).unwrap()),
        )
        .await
        .unwrap();
        assert!(h.observe(kv.list(REGIONS_PREFIX).await.unwrap())[0].healthy);
        tokio::time::advance(Duration::from_millis(2100)).await;
        let v = h.observe(kv.list(REGIONS_PREFIX).await.unwrap());
        assert!(!v[0].healthy, "{v:?}");
        assert_eq!(v[0].heartbeat_age_ms, Some(2100));
    }

    #[tokio::test(start_paused = true)]
    async fn silence_counts_from_when_a_watch_delivered_the_heartbeat() {
        let kv: Arc<dyn Coordination> = Arc::new(InProcess::new(Duration::from_secs(3600)));
        let mut h = Health::new(vec!["east".into()], Duration::from_secs(2));
        publish(kv.as_ref(), hb("east")).await.unwrap();
        let e = kv.get("regions.east").await.unwrap().unwrap();
        h.heard(&e.key, e.revision);
        tokio::time::advance(Duration::from_millis(900)).await;
        // The listing an interval later sees the same revision: its age
        // runs from the watch, not from this first listing.
        let v = h.observe(kv.list(REGIONS_PREFIX).await.unwrap());
        assert_eq!(v[0].heartbeat_age_ms, Some(900));
    }

    #[tokio::test(start_paused = true)]
    async fn the_global_kv_is_reachable_only_after_a_recent_write() {
        let mut h = Health::new(vec![], Duration::from_secs(2));
        assert!(!h.reachable(), "nothing written yet");
        assert!(h.wrote(), "the first write makes it reachable");
        assert!(h.reachable());
        assert!(!h.wrote(), "already reachable");
        tokio::time::advance(Duration::from_millis(2500)).await;
        assert!(!h.reachable(), "reads alone never count");
        h.wrote();
        tokio::time::advance(Duration::from_millis(100)).await;
        h.write_failed();
        assert!(!h.reachable(), "the newest write failed");
        tokio::time::advance(Duration::from_millis(100)).await;
        h.wrote();
        assert!(h.reachable());
    }

    #[test]
    fn probe_keys_are_valid_kv_keys() {
        assert_eq!(
            probe_key("eu-west", "host.example-12"),
            "probes.eu-west-host_example-12"
        );
        ferry_ha::backend::check_key(&probe_key("a b", "ü.x")).unwrap();
    }
}
