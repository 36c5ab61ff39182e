//! The leader lease.
//!
//! One key (`leader`) holds `{holder, payload, epoch}`. A candidate acquires
//! it with `create` (absent key) or, after seeing the same revision unchanged
//! for `ttl` on its own monotonic clock, with a compare-and-set `update` on
//! that revision. The revision at acquisition is the fencing [`Epoch`]. The
//! leader renews with compare-and-set every `renew_interval`; if no renew
//! succeeds within `renew_deadline` (< `ttl`) of being sent, it steps down at
//! once. Graceful release deletes the key (compare-and-set), so standbys
//! that watch it take over without waiting for `ttl`.
//!
//! Why no two leaders act at once: a standby takes over only after it has
//! seen the holder's last revision unchanged for `ttl`; that revision was
//! written after the holder sent its last successful renew, and the holder
//! stops `renew_deadline < ttl` after sending it. Only clock *rates* must
//! agree, not clock readings.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use tokio::sync::{Notify, watch};
use tokio_util::sync::CancellationToken;

use crate::backend::{Coordination, Event, HaError};

/// A fencing epoch: the KV revision at which a leader acquired the lease.
/// Strictly greater for every later leader. (The JobManager epoch type of
/// `ferry_core`, distinct from the region epoch.)
pub use ferry_core::JmEpoch as Epoch;

/// Timing and identity of a candidate.
#[derive(Clone, Debug)]
pub struct ElectorConfig {
    /// Key of the lease in its bucket.
    pub key: String,
    /// This instance's id.
    pub holder: String,
    /// A lease unchanged this long may be taken over.
    pub ttl: Duration,
    /// Time between renewals.
    pub renew_interval: Duration,
    /// A leader whose last successful renew was sent longer ago than this
    /// stops leading. Must be below `ttl`.
    pub renew_deadline: Duration,
}

impl ElectorConfig {
    /// Defaults tuned for sub-second takeover: ttl 800 ms, renew every
    /// 150 ms, deadline 500 ms.
    pub fn new(holder: &str) -> Self {
        Self {
            key: "leader".to_string(),
            holder: holder.to_string(),
            ttl: Duration::from_millis(800),
            renew_interval: Duration::from_millis(150),
            renew_deadline: Duration::from_millis(500),
        }
    }

    /// Checks the timing rules ([`ferry_core::config::lease_timing`]).
    pub fn validate(&self) -> Result<(), String> {
        ferry_core::config::lease_timing(self.ttl, self.renew_interval, self.renew_deadline)
    }
}

/// What the lease key holds.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct LeaseValue {
    holder: String,
    payload: String,
    /// Set from the first renewal on (a value cannot hold its own revision).
    epoch: Option<u64>,
}

/// The current leader as a standby sees it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaderInfo {
    pub holder: String,
    /// What the leader published with its lease (e.g. its API address).
    pub payload: String,
    pub epoch: Epoch,
}

/// The leader the lease in `backend` names now, if any (`key` as in
/// [`ElectorConfig::key`]). What a TaskManager checks a JobManager's claim
/// to a new epoch against: no one can lead under an epoch above the
/// lease's.
pub async fn read_leader(
    backend: &dyn Coordination,
    key: &str,
) -> Result<Option<LeaderInfo>, HaError> {
    Ok(backend
        .get(key)
        .await?
        .as_ref()
        .and_then(Runner::leader_info))
}

/// This instance's role.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Role {
    /// Not leading; the leader if one is known.
    Standby { leader: Option<LeaderInfo> },
    /// Leading with this epoch.
    Leader { epoch: Epoch },
}

/// Counters for metrics.
#[derive(Debug, Default)]
pub struct ElectorStats {
    /// Times this instance became leader.
    pub acquisitions: AtomicU64,
    /// Renewals that failed (backend unavailable or slow).
    pub renew_failures: AtomicU64,
    /// Duration of the last successful renewal, in microseconds.
    pub last_renew_micros: AtomicU64,
}

struct Validity {
    epoch: Option<Epoch>,
    until: Instant,
}

/// Handle to a running candidate.
#[derive(Clone)]
pub struct Elector {
    role: watch::Receiver<Role>,
    validity: Arc<Mutex<Validity>>,
    resign: Arc<Notify>,
    done: CancellationToken,
    task: Arc<tokio::task::AbortHandle>,
    pub stats: Arc<ElectorStats>,
}

impl Elector {
    /// Starts competing for the lease in `backend`. `payload` is published
    /// with the lease while leading. Stops (releasing the lease) when
    /// `shutdown` is cancelled or [`Elector::resign`] is called.
    pub fn spawn(
        backend: Arc<dyn Coordination>,
        cfg: ElectorConfig,
        payload: String,
        shutdown: CancellationToken,
    ) -> Self {
        let (tx, rx) = watch::channel(Role::Standby { leader: None });
        let validity = Arc::new(Mutex::new(Validity {
            epoch: None,
            until: Instant::now(),
        }));
        let resign = Arc::new(Notify::new());
        let done = CancellationToken::new();
        let stats = Arc::new(ElectorStats::default());
        let run = Runner {
            backend,
            cfg,
            payload,
            role: tx,
            validity: validity.clone(),
            stats: stats.clone(),
            shutdown,
            resign: resign.clone(),
        };
        let finished = done.clone();
        let task = tokio::spawn(async move {
            run.run().await;
            finished.cancel();
        })
        .abort_handle();
        Self {
            role: rx,
            validity,
            resign,
            done,
            task: Arc::new(task),
            stats,
        }
    }

    /// Role changes, as they happen.
    pub fn role(&self) -> watch::Receiver<Role> {
        self.role.clone()
    }

    /// The epoch to act under, if this instance leads *now*: checked against
    /// the renew deadline at call time, so a leader cut off from the backend
    /// stops acting even before its role watchers are told.
    pub fn fence(&self) -> Option<Epoch> {
        let v = self.validity.lock().unwrap_or_else(|p| p.into_inner());
        v.epoch.filter(|_| Instant::now() < v.until)
    }

    /// Releases the lease (if held) and stops competing; returns when done.
    pub async fn resign(&self) {
        self.resign.notify_one();
        self.done.cancelled().await;
    }

    /// Stops at once without releasing the lease, as a crash would (for
    /// tests and drills). `fence()` turns `None` immediately.
    pub fn abort(&self) {
        self.task.abort();
        let mut v = self.validity.lock().unwrap_or_else(|p| p.into_inner());
        v.epoch = None;
        self.done.cancel();
    }

    /// Resolves once the candidate has stopped.
    pub async fn stopped(&self) {
        self.done.cancelled().await;
    }
}

struct Runner {
    backend: Arc<dyn Coordination>,
    cfg: ElectorConfig,
    payload: String,
    role: watch::Sender<Role>,
    validity: Arc<Mutex<Validity>>,
    stats: Arc<ElectorStats>,
    shutdown: CancellationToken,
    resign: Arc<Notify>,
}

enum Standby {
    Acquired { epoch: u64, sent: Instant },
    Stop,
}

/// Bounded pause between attempts while the backend is unavailable.
const RETRY_PAUSE: Duration = Duration::from_millis(100);

impl Runner {
    fn value(&self, epoch: Option<u64>) -> Bytes {
        Bytes::from(
            serde_json::to_vec(&LeaseValue {
                holder: self.cfg.holder.clone(),
                payload: self.payload.clone(),
                epoch,
            })
            .unwrap_or_default(),
        )
    }

    fn set_valid(&self, epoch: Option<Epoch>, until: Instant) {
        let mut v = self.validity.lock().unwrap_or_else(|p| p.into_inner());
        v.epoch = epoch;
        v.until = until;
    }

    async fn run(self) {
        loop {
            match self.standby().await {
                Standby::Stop => return,
                Standby::Acquired { epoch, sent } => {
                    let epoch_t = Epoch(epoch);
                    self.set_valid(Some(epoch_t), sent + self.cfg.renew_deadline);
                    self.stats.acquisitions.fetch_add(1, Ordering::Relaxed);
                    tracing::info!(holder = %self.cfg.holder, epoch, "became leader");
                    self.role.send_replace(Role::Leader { epoch: epoch_t });
                    let stop = self.lead(epoch, sent).await;
                    self.set_valid(None, Instant::now());
                    self.role.send_replace(Role::Standby { leader: None });
                    if stop {
                        return;
                    }
                }
            }
        }
    }

    fn leader_info(e: &crate::backend::Entry) -> Option<LeaderInfo> {
        let v: LeaseValue = serde_json::from_slice(&e.value).ok()?;
        Some(LeaderInfo {
            holder: v.holder,
            payload: v.payload,
            epoch: Epoch(v.epoch.unwrap_or(e.revision)),
        })
    }

    /// Competes until this instance acquires the lease or is told to stop.
    async fn standby(&self) -> Standby {
        'outer: loop {
            if self.shutdown.is_cancelled() {
                return Standby::Stop;
            }
            let mut watch = match self.backend.watch(&self.cfg.key).await {
                Ok(w) => w,
                Err(e) => {
                    tracing::debug!("lease watch failed: {e}");
                    if self.pause().await {
                        return Standby::Stop;
                    }
                    continue;
                }
            };
            loop {
                let sent = Instant::now();
                match self.backend.create(&self.cfg.key, self.value(None)).await {
                    Ok(epoch) => return Standby::Acquired { epoch, sent },
                    Err(HaError::Exists(_)) | Err(HaError::WrongRevision(..)) => {}
                    Err(e) => {
                        tracing::debug!("lease create failed: {e}");
                        self.role.send_replace(Role::Standby { leader: None });
                        if self.pause().await {
                            return Standby::Stop;
                        }
                        continue 'outer;
                    }
                }
                let current = match self.backend.get(&self.cfg.key).await {
                    Ok(Some(e)) => e,
                    Ok(None) => continue,
                    Err(_) => {
                        if self.pause().await {
                            return Standby::Stop;
                        }
                        continue 'outer;
                    }
                };
                let mut rev = current.revision;
                let mut seen = Instant::now();
                self.role.send_replace(Role::Standby {
                    leader: Self::leader_info(&current),
                });
                loop {
                    tokio::select! {
                        _ = self.shutdown.cancelled() => return Standby::Stop,
                        _ = self.resign.notified() => return Standby::Stop,
                        ev = watch.next() => match ev {
                            Some(Event::Put(e)) if e.revision > rev => {
                                rev = e.revision;
                                seen = Instant::now();
                                let info = Self::leader_info(&e);
                                self.role.send_if_modified(|r| {
                                    let new = Role::Standby { leader: info.clone() };
                                    let changed = *r != new;
                                    *r = new;
                                    changed
                                });
                            }
                            Some(Event::Put(_)) => {}
                            // Released or expired: try to take it now.
                            Some(Event::Gone { .. }) => break,
                            None => continue 'outer,
                        },
                        _ = tokio::time::sleep_until((seen + self.cfg.ttl).into()) => {
                            // Unchanged for a whole ttl: the holder is gone.
                            let sent = Instant::now();
                            match self.backend.update(&self.cfg.key, self.value(None), rev).await {
                                Ok(epoch) => return Standby::Acquired { epoch, sent },
                                Err(HaError::WrongRevision(..)) => break,
                                Err(_) => seen = Instant::now(),
                            }
                        }
                    }
                }
            }
        }
    }

    /// Waits `RETRY_PAUSE`; true if told to stop meanwhile.
    async fn pause(&self) -> bool {
        tokio::select! {
            _ = self.shutdown.cancelled() => true,
            _ = self.resign.notified() => true,
            _ = tokio::time::sleep(RETRY_PAUSE) => false,
        }
    }

    /// Leads until the lease is lost (false) or released on request (true).
    async fn lead(&self, epoch: u64, sent: Instant) -> bool {
        let mut last_rev = epoch;
        let mut last_ok = sent;
        let mut tick = tokio::time::interval(self.cfg.renew_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        loop {
            let deadline = last_ok + self.cfg.renew_deadline;
            tokio::select! {
                _ = self.shutdown.cancelled() => {
                    self.release(last_rev).await;
                    return true;
                }
                _ = self.resign.notified() => {
                    self.release(last_rev).await;
                    return true;
                }
                _ = tokio::time::sleep_until(deadline.into()) => {
                    tracing::warn!(holder = %self.cfg.holder, epoch, "no lease renewal within the deadline; stepping down");
                    return false;
                }
                _ = tick.tick() => {
                    let sent = Instant::now();
                    let budget = deadline.saturating_duration_since(sent);
                    let renew = self.backend.update(&self.cfg.key, self.value(Some(epoch)), last_rev);
                    match tokio::time::timeout(budget, renew).await {
                        Ok(Ok(rev)) => {
                            last_rev = rev;
                            last_ok = sent;
                            self.set_valid(Some(Epoch(epoch)), sent + self.cfg.renew_deadline);
                            self.stats
                                .last_renew_micros
                                .store(sent.elapsed().as_micros() as u64, Ordering::Relaxed);
                        }
                        Ok(Err(HaError::WrongRevision(..))) => {
                            tracing::warn!(holder = %self.cfg.holder, epoch, "lease taken over; stepping down");
                            return false;
                        }
                        Ok(Err(e)) => {
                            self.stats.renew_failures.fetch_add(1, Ordering::Relaxed);
                            tracing::debug!("lease renewal failed: {e}");
                        }
                        Err(_) => {
                            self.stats.renew_failures.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            }
        }
    }

    async fn release(&self, rev: u64) {
        self.set_valid(None, Instant::now());
        self.role.send_replace(Role::Standby { leader: None });
        let del = self.backend.delete(&self.cfg.key, Some(rev));
        match tokio::time::timeout(self.cfg.ttl, del).await {
            Ok(Ok(())) => tracing::info!(holder = %self.cfg.holder, "released the lease"),
            Ok(Err(e)) => tracing::warn!("releasing the lease failed: {e}"),
            Err(_) => tracing::warn!("releasing the lease timed out"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::in_process::InProcess;

    fn cfg(holder: &str) -> ElectorConfig {
        ElectorConfig {
            key: "leader".into(),
            holder: holder.into(),
            ttl: Duration::from_millis(300),
            renew_interval: Duration::from_millis(50),
            renew_deadline: Duration::from_millis(200),
        }
    }

    async fn until_leader(e: &Elector) -> Epoch {
        let mut rx = e.role();
        let r = tokio::time::timeout(
            Duration::from_secs(5),
            rx.wait_for(|r| matches!(r, Role::Leader { .. })),
        )
        .await
        .expect("became leader in time")
        .expect("elector alive")
        .clone();
        match r {
            Role::Leader { epoch } => epoch,
            _ => unreachable!(),
        }
    }

    #[tokio::test]
    async fn one_leader_then_handover_on_resign_and_on_crash() {
        let kv: Arc<dyn Coordination> = Arc::new(InProcess::new(Duration::from_secs(5)));
        let stop = CancellationToken::new();
        let a = Elector::spawn(kv.clone(), cfg("a"), "addr-a".into(), stop.clone());
        let e1 = until_leader(&a).await;
        let b = Elector::spawn(kv.clone(), cfg("b"), "addr-b".into(), stop.clone());
        let c = Elector::spawn(kv.clone(), cfg("c"), "addr-c".into(), stop.clone());
        // The others see a as leader, with its payload and epoch.
        let mut rb = b.role();
        let seen = tokio::time::timeout(
            Duration::from_secs(5),
            rb.wait_for(|r| matches!(r, Role::Standby { leader: Some(_) })),
        )
        .await
        .unwrap()
        .unwrap()
        .clone();
        let Role::Standby { leader: Some(info) } = seen else {
            unreachable!()
        };
        assert_eq!(
            (info.holder.as_str(), info.payload.as_str()),
            ("a", "addr-a")
        );
        assert_eq!(info.epoch, e1);
        assert!(b.fence().is_none() && c.fence().is_none());

        // Graceful: a resigns, someone else leads with a higher epoch.
        a.resign().await;
        assert!(a.fence().is_none());
        let (next, e2) = tokio::select! {
            e = until_leader(&b) => (b.clone(), e),
            e = until_leader(&c) => (c.clone(), e),
        };
        assert!(e2 > e1);

        // Crash: the new leader stops renewing; the last one takes over.
        next.abort();
        let last = if Arc::ptr_eq(&next.task, &b.task) {
            &c
        } else {
            &b
        };
        let e3 = until_leader(last).await;
        assert!(e3 > e2);
        stop.cancel();
    }

    /// At no moment do two candidates both hold a valid fence, across
    /// repeated crashes and resignations.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn never_two_leaders_at_once() {
        let kv: Arc<dyn Coordination> = Arc::new(InProcess::new(Duration::from_secs(5)));
        let stop = CancellationToken::new();
        let mut all: Vec<Elector> = (0..3)
            .map(|i| {
                Elector::spawn(
                    kv.clone(),
                    cfg(&format!("n{i}")),
                    String::new(),
                    stop.clone(),
                )
            })
            .collect();
        let mut epochs = Vec::new();
        for round in 0..6 {
            // Wait for a leader among the live ones, checking exclusivity.
            let deadline = Instant::now() + Duration::from_secs(5);
            let leader = loop {
                let fenced: Vec<usize> = (0..all.len())
                    .filter(|i| all[*i].fence().is_some())
                    .collect();
                assert!(fenced.len() <= 1, "two leaders at once in round {round}");
                if let Some(i) = fenced.first() {
                    break *i;
                }
                assert!(Instant::now() < deadline, "no leader in round {round}");
                tokio::time::sleep(Duration::from_millis(2)).await;
            };
            epochs.push(all[leader].fence().unwrap());
            if round % 2 == 0 {
                all[leader].abort();
            } else {
                all[leader].resign().await;
            }
            all.remove(leader);
            all.push(Elector::spawn(
                kv.clone(),
                cfg(&format!("r{round}")),
                String::new(),
                stop.clone(),
            ));
        }
        assert!(
            epochs.windows(2).all(|w| w[0] < w[1]),
            "epochs grow: {epochs:?}"
        );
        stop.cancel();
    }

    #[test]
    fn timing_rules_are_checked() {
        let mut c = ElectorConfig::new("x");
        assert!(c.validate().is_ok());
        c.renew_deadline = c.ttl;
        assert!(c.validate().is_err());
    }
}
