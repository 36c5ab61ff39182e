//! The region side of one JobManager, built from its process config: the
//! stores of every region (`regions.stores`), the replicator feeding each
//! other region's store with the checkpoints this JobManager completes and
//! the final status of the jobs that end, the restore verifier of its own
//! store, and — with a global KV (`regions.global`) — the region
//! coordinator over the two global buckets. Without `regions.global` the
//! region replicates only (no lease, no failover).
//!
//! Invariant: with a global KV, nothing here starts a job; the coordinator
//! does, through [`RegionJobs::start`], once the lease is confirmed.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use ferry_core::JobId;
use ferry_core::api::RegionsStatus;
use ferry_core::config::{ProcessConfig, ReplicationMode};
use ferry_core::storage::StorageLocation;
use futures::{Stream, StreamExt};
use tokio_util::sync::CancellationToken;

use crate::coordinator::{Coordinator, Settings};
use crate::error::RegionError;
use crate::jobs::{RegionEvent, RegionJobs};
use crate::replicator::{CheckpointEvent, Replicator, Standby};
use crate::sync::{SyncReplicator, SyncSettings};
use crate::verifier::Verifier;
use crate::verify::RestoreCheck;

/// The region side, started (with the handle that ends once everything it
/// started has stopped).
#[derive(Clone)]
pub struct RegionSide {
    /// The coordinator, with a global KV.
    pub coordinator: Option<Arc<Coordinator>>,
    /// Synchronous replication (`regions.replication: sync`): every
    /// checkpoint goes through it before it completes.
    pub sync: Option<Arc<SyncReplicator>>,
    replicator: Arc<Replicator>,
    region: String,
    instance: String,
}

/// What a JobManager announces to its region side.
pub struct Announcements<C, E> {
    /// Every checkpoint and savepoint it completes.
    pub completed: C,
    /// Every job whose final status reached the job store (job, store).
    pub ended: E,
}

impl RegionSide {
    /// Starts the region side of JobManager `instance` (REST URL
    /// `api_url`), driving it through `jobs` and test-restoring copies with
    /// `check`; KV buckets are opened from `rt`, retried until `stop`.
    /// `Ok(None)`: neither `regions.stores` nor `regions.global` is
    /// configured, or `stop` came while the global KV was unreachable.
    #[allow(clippy::too_many_arguments)]
    pub async fn start<C, E>(
        cfg: &ProcessConfig,
        instance: &str,
        api_url: &str,
        jobs: Arc<dyn RegionJobs>,
        check: Arc<dyn RestoreCheck>,
        announcements: Announcements<C, E>,
        rt: &tokio::runtime::Handle,
        stop: CancellationToken,
    ) -> Result<Option<(RegionSide, tokio::task::JoinHandle<()>)>, RegionError>
    where
        C: Stream<Item = CheckpointEvent> + Send + Unpin + 'static,
        E: Stream<Item = (JobId, StorageLocation)> + Send + Unpin + 'static,
    {
        let env: BTreeMap<String, String> = std::env::vars().collect();
        // A store with credentials of its own (another account's bucket)
        // is opened with them alone; the others with the environment's.
        let open = |key: String, url: &str, credentials: Option<(&String, &String)>| {
            let settings = credentials
                .map(|(region, spec)| {
                    let at = format!("regions.storeCredentials.{region}");
                    ferry_core::config::store_settings(spec, &at, &env)
                })
                .transpose()
                .map_err(RegionError::Config)?;
            StorageLocation::open_with(url, settings.as_deref())
                .map_err(|e| RegionError::Config(format!("{key}: {url}: {e}")))
        };
        let mut stores = BTreeMap::new();
        for (region, url) in &cfg.regions.stores {
            stores.insert(
                region.clone(),
                open(
                    format!("regions.stores.{region}"),
                    url,
                    cfg.regions.store_credentials.get_key_value(region),
                )?,
            );
        }
        let own = open("storage".into(), &cfg.storage, None)?;
        stores
            .entry(cfg.region.clone())
            .or_insert_with(|| own.clone());
        let g = &cfg.regions.global;
        if stores.len() < 2 && g.urls.is_empty() {
            return Ok(None);
        }
        let standbys: Vec<Standby> = stores
            .iter()
            .filter(|(r, _)| **r != cfg.region)
            .map(|(r, s)| Standby {
                region: r.clone(),
                store: s.clone(),
            })
            .collect();
        // With a global KV the coordinator opens the fence while this
        // region holds the lease; without one there is no lease to hold.
        let fence = if g.urls.is_empty() {
            crate::WriteFence::unfenced()
        } else {
            crate::WriteFence::closed()
        };
        let sync = (cfg.regions.replication == ReplicationMode::Sync).then(|| {
            Arc::new(SyncReplicator::new(
                standbys.clone(),
                SyncSettings {
                    required: cfg.regions.sync_standbys,
                    on_loss: cfg.regions.on_standby_loss,
                    timeout: cfg.regions.sync_timeout.get(),
                },
                fence.clone(),
            ))
        });
        let replicator = Arc::new(Replicator::new(standbys, fence));
        let tracker = tokio_util::task::TaskTracker::new();
        // Completed snapshots go to the replicator, and so do ended jobs'
        // final status (no standby restarts them).
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let Announcements {
            mut completed,
            mut ended,
        } = announcements;
        let (s, r) = (stop.clone(), replicator.clone());
        tracker.spawn(async move {
            loop {
                tokio::select! {
                    _ = s.cancelled() => return,
                    c = completed.next() => match c {
                        Some(c) => drop(tx.send(c)),
                        None => return,
                    },
                    e = ended.next() => match e {
                        Some((job, store)) => r.job_ended(job, store),
                        None => return,
                    },
                }
            }
        });
        let mut side = RegionSide {
            coordinator: None,
            sync,
            replicator: replicator.clone(),
            region: cfg.region.clone(),
            instance: instance.to_string(),
        };
        if g.urls.is_empty() {
            // Replication only: its lag in the metrics, every second.
            let (r, s) = (replicator.clone(), stop.clone());
            tracker.spawn(async move {
                let mut tick = tokio::time::interval(Duration::from_secs(1));
                loop {
                    tokio::select! {
                        _ = s.cancelled() => return,
                        _ = tick.tick() => {}
                    }
                    jobs.report(RegionEvent::Replication(&r.status()));
                }
            });
            let s = stop.clone();
            tracker.spawn(async move { replicator.run(rx, s.cancelled_owned()).await });
            tracker.close();
            let handle = tokio::spawn(async move { tracker.wait().await });
            return Ok(Some((side, handle)));
        }
        let timeout = cfg.regions.timeout.get();
        let interval = cfg.regions.health_check_interval.get();
        if timeout / 2 <= cfg.ha.lease_ttl.get() + interval {
            tracing::warn!(
                "half of regions.timeout ({}) is not above ha.leaseTtl ({}) plus regions.healthCheckInterval ({}): an in-region JobManager failover in the primary takes longer than its TaskManagers' region fence lasts, so their tasks restart from checkpoints instead of being adopted; raise regions.timeout",
                cfg.regions.timeout,
                cfg.ha.lease_ttl,
                cfg.regions.health_check_interval
            );
        }
        // Read before the global KV is waited for: a bad file shows at start.
        let webhook = match cfg.regions.webhook.as_deref().map(str::trim) {
            Some(url) if !url.is_empty() => {
                let hook = crate::webhook::Webhook::new(
                    url,
                    cfg.regions.webhook_ca_file.as_deref().map(Path::new),
                    cfg.regions.webhook_token_file.as_deref().map(Path::new),
                )
                .map_err(RegionError::Config)?;
                Some(Arc::new(hook) as Arc<dyn crate::webhook::Announce>)
            }
            _ => None,
        };
        let bucket = g.bucket.clone().unwrap_or_else(|| "ferry-global".into());
        // Heartbeats and probes expire; the lease and the drill hold live in
        // a bucket of their own whose keys never expire.
        let credentials = ferry_ha::nats::NatsCredentials::load(&g.auth, "regions.global.auth")
            .and_then(|c| c.with_tls(g.tls.as_ref(), "regions.global.tls"))
            .map_err(RegionError::Config)?;
        let kv = |name: String, max_age: Duration| {
            let (urls, stop, credentials) = (g.urls.clone(), stop.clone(), credentials.clone());
            async move {
                ferry_ha::nats::open_retrying(
                    &urls,
                    &name,
                    max_age,
                    g.replicas,
                    &credentials,
                    rt,
                    &stop,
                )
                .await
            }
        };
        let Some(health_kv) = kv(bucket.clone(), timeout * 4).await else {
            return Ok(None);
        };
        let Some(lease_kv) = kv(format!("{bucket}-lease"), Duration::ZERO).await else {
            return Ok(None);
        };
        let coordinator = Coordinator::new(
            Settings {
                region: cfg.region.clone(),
                instance: instance.to_string(),
                api_url: api_url.to_string(),
                home: cfg.regions.primary.clone(),
                stores,
                interval,
                timeout,
                auto_failover: cfg.regions.auto_failover,
                webhook,
            },
            jobs,
            lease_kv,
            health_kv,
            replicator,
            Arc::new(Verifier::new(own, check)),
        );
        let running = coordinator.spawn(rx, cfg.regions.verify_interval.get(), stop);
        tracker.close();
        let handle = tokio::spawn(async move {
            let _ = running.await;
            tracker.wait().await;
        });
        side.coordinator = Some(coordinator);
        Ok(Some((side, handle)))
    }

    /// `GET /v1/regions`.
    pub fn status(&self) -> RegionsStatus {
        let mut status = self.replication_status();
        status.sync = self.sync.as_ref().map(|s| s.status());
        status
    }

    fn replication_status(&self) -> RegionsStatus {
        match &self.coordinator {
            Some(c) => c.status(),
            None => RegionsStatus {
                region: Some(self.region.clone()),
                instance: self.instance.clone(),
                region_role: None,
                primary: Some(self.region.clone()),
                epoch: ferry_core::RegionEpoch::NONE,
                home: None,
                global_reachable: None,
                regions: Vec::new(),
                standbys: self.replicator.status(),
                verified: Default::default(),
                note: Some("no global KV (regions.global): replication only, no failover".into()),
                sync: None,
            },
        }
    }
}
