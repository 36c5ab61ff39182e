//! Membership: every JobManager and TaskManager puts `members.<id>` into its
//! region's bucket every `interval`; an instance whose key is older than
//! `expiry` (or gone — the bucket's `max_age` is the expiry) is gone.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
pub use ferry_core::api::{Member, MemberView};
use tokio_util::sync::CancellationToken;

use crate::backend::{Coordination, HaError};

/// Key prefix of member heartbeats.
pub const MEMBERS_PREFIX: &str = "members.";

/// Heartbeat timing.
#[derive(Clone, Debug)]
pub struct MembershipConfig {
    /// Time between heartbeats (default 1 s).
    pub interval: Duration,
    /// A member not heard from this long is gone (default 3 s).
    pub expiry: Duration,
}

impl Default for MembershipConfig {
    fn default() -> Self {
        Self {
            interval: Duration::from_secs(1),
            expiry: Duration::from_secs(3),
        }
    }
}

/// A running heartbeat.
pub struct Membership {
    pub failures: Arc<AtomicU64>,
}

impl Membership {
    /// Starts heartbeating `member` until `shutdown`, then deletes its key.
    pub fn spawn(
        backend: Arc<dyn Coordination>,
        cfg: MembershipConfig,
        member: Member,
        shutdown: CancellationToken,
    ) -> (Self, tokio::task::JoinHandle<()>) {
        let failures = Arc::new(AtomicU64::new(0));
        let f = failures.clone();
        let key = format!("{MEMBERS_PREFIX}{}", member.id);
        let value = Bytes::from(serde_json::to_vec(&member).unwrap_or_default());
        let handle = tokio::spawn(async move {
            let mut tick = tokio::time::interval(cfg.interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => {
                        let _ = tokio::time::timeout(cfg.interval, backend.delete(&key, None)).await;
                        return;
                    }
                    _ = tick.tick() => {
                        match tokio::time::timeout(cfg.interval, backend.put(&key, value.clone())).await {
                            Ok(Ok(_)) => {}
                            Ok(Err(e)) => {
                                f.fetch_add(1, Ordering::Relaxed);
                                tracing::warn!("heartbeat failed: {e}");
                            }
                            Err(_) => {
                                f.fetch_add(1, Ordering::Relaxed);
                                tracing::warn!("heartbeat timed out");
                            }
                        }
                    }
                }
            }
        });
        (Self { failures }, handle)
    }

    /// Members heard from within `expiry`, by id.
    pub async fn list(
        backend: &dyn Coordination,
        expiry: Duration,
    ) -> Result<Vec<MemberView>, HaError> {
        let now = SystemTime::now();
        let mut out: Vec<MemberView> = backend
            .list(MEMBERS_PREFIX)
            .await?
            .into_iter()
            .filter_map(|e| {
                let member: Member = serde_json::from_slice(&e.value).ok()?;
                let age = now.duration_since(e.created).unwrap_or_default();
                (age < expiry).then_some(MemberView {
                    member,
                    heartbeat_age_ms: age.as_millis() as u64,
                })
            })
            .collect();
        out.sort_by(|a, b| a.member.id.cmp(&b.member.id));
        Ok(out)
    }
}
