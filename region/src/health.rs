//! Region heartbeats in the global KV: the leading JobManager of every
//! region puts `regions.<name>` every health-check interval, carrying its
//! API URL and its replication progress; any region reads them all to see
//! which regions are alive and how far their copies are. A region whose
//! heartbeat is older than the region timeout counts as down.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use chrono::{DateTime, Utc};
use ferry_ha::{Coordination, HaError};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

/// Key prefix of region heartbeats in the global KV.
pub const REGIONS_PREFIX: &str = "regions.";

/// What a region's leader publishes about it.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct RegionHeartbeat {
    pub region: String,
    /// The region's leading JobManager and its REST URL.
    pub leader: String,
    pub api_url: String,
    pub at: Option<DateTime<Utc>>,
    /// Its replication to every other region: (region, lag seconds, lag
    /// checkpoints).
    #[serde(default)]
    pub replication: Vec<(String, f64, u64)>,
    /// A standby's newest restore-verified checkpoint per job.
    #[serde(default)]
    pub verified: std::collections::BTreeMap<String, u64>,
}

/// A known region as seen from the global KV.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct RegionView {
    pub region: String,
    /// Heard from within the region timeout.
    pub healthy: bool,
    /// Age of its last heartbeat (`None`: never heard from).
    pub heartbeat_age_ms: Option<u64>,
    pub heartbeat: Option<RegionHeartbeat>,
}

/// Publishes this region's heartbeat while `leading()` says this instance
/// leads its region, until `stop`.
pub async fn publish(
    global: Arc<dyn Coordination>,
    interval: Duration,
    leading: impl Fn() -> bool,
    heartbeat: impl Fn() -> RegionHeartbeat,
    stop: CancellationToken,
) {
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut failing = false;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        if !leading() {
            continue;
        }
        let mut hb = heartbeat();
        hb.at = Some(Utc::now());
        let key = format!("{REGIONS_PREFIX}{}", hb.region);
        let value = Bytes::from(serde_json::to_vec(&hb).unwrap_or_default());
        match tokio::time::timeout(interval, global.put(&key, value)).await {
            Ok(Ok(_)) => failing = false,
            Ok(Err(e)) if !failing => {
                failing = true;
                tracing::warn!(
                    "region heartbeat failed (the global KV is unreachable or has no quorum): {e}"
                );
            }
            Err(_) if !failing => {
                failing = true;
                tracing::warn!(
                    "region heartbeat timed out (the global KV is unreachable or has no quorum)"
                );
            }
            _ => {}
        }
    }
}

/// Every known region (and any other that heartbeats), healthy if heard
/// from within `timeout`, sorted by name.
pub async fn list(
    global: &dyn Coordination,
    known: &[String],
    timeout: Duration,
) -> Result<Vec<RegionView>, HaError> {
    let now = SystemTime::now();
    let mut out: Vec<RegionView> = known
        .iter()
        .map(|r| RegionView {
            region: r.clone(),
            healthy: false,
            heartbeat_age_ms: None,
            heartbeat: None,
        })
        .collect();
    for e in global.list(REGIONS_PREFIX).await? {
        let Ok(hb) = serde_json::from_slice::<RegionHeartbeat>(&e.value) else {
            continue;
        };
        let age = now.duration_since(e.created).unwrap_or_default();
        let view = RegionView {
            region: hb.region.clone(),
            healthy: age < timeout,
            heartbeat_age_ms: Some(age.as_millis() as u64),
            heartbeat: Some(hb),
        };
        match out.iter_mut().find(|v| v.region == view.region) {
            Some(v) => *v = view,
            None => out.push(view),
        }
    }
    out.sort_by(|a, b| a.region.cmp(&b.region));
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_ha::in_process::InProcess;

    #[tokio::test]
    async fn regions_are_healthy_while_their_leader_heartbeats() {
        let kv: Arc<dyn Coordination> = Arc::new(InProcess::new(Duration::from_secs(60)));
        let stop = CancellationToken::new();
        let leading = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let l = leading.clone();
        let task = tokio::spawn(publish(
            kv.clone(),
            Duration::from_millis(20),
            move || l.load(std::sync::atomic::Ordering::SeqCst),
            || RegionHeartbeat {
                region: "eu-west".into(),
                leader: "jm-0".into(),
                api_url: "http://127.0.0.1:1".into(),
                at: None,
                replication: vec![("us-east".into(), 0.5, 1)],
                verified: Default::default(),
            },
            stop.clone(),
        ));
        let known = vec!["eu-west".to_string(), "us-east".to_string()];
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        loop {
            let v = list(kv.as_ref(), &known, Duration::from_millis(200))
                .await
                .unwrap();
            if v[0].healthy {
                assert_eq!(v[0].heartbeat.as_ref().unwrap().replication[0].2, 1);
                assert!(!v[1].healthy, "us-east never heartbeat");
                assert_eq!(v[1].heartbeat_age_ms, None);
                break;
            }
            assert!(tokio::time::Instant::now() < deadline);
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // A standby instance (not leading) publishes nothing: the region
        // goes unhealthy after the timeout.
        leading.store(false, std::sync::atomic::Ordering::SeqCst);
        loop {
            let v = list(kv.as_ref(), &known, Duration::from_millis(200))
                .await
                .unwrap();
            if !v[0].healthy {
                assert!(v[0].heartbeat_age_ms.unwrap() >= 200);
                break;
            }
            assert!(tokio::time::Instant::now() < deadline);
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        stop.cancel();
        task.await.unwrap();
    }
}
