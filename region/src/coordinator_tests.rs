//! Every region transition, driven tick by tick on paused time: regions
//! share in-process global buckets, each through its own switchable
//! connection (to cut one off), and drive an in-memory JobManager that
//! records what it was told.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use ferry_core::api::{RegionRole, SavepointRef};
use ferry_core::manifest::{
    MANIFEST_FILE, MANIFEST_FORMAT, Manifest, SnapshotKind, snapshot_dir, write_manifest,
};
use ferry_core::storage::StorageLocation;
use ferry_core::{CheckpointId, JmEpoch, JobId, RegionEpoch};
use ferry_ha::in_process::InProcess;
use ferry_ha::{Coordination, Entry, Event, HaError};
use futures::stream::BoxStream;
use tokio::time::Instant;

use crate::coordinator::{Coordinator, Settings};
use crate::jobs::{RegionEvent, RegionJob, RegionJobs};
use crate::lease::{self, REGION_LEASE};
use crate::replicator::Replicator;
use crate::role::Role;
use crate::verifier::Verifier;
use crate::verify::RestoreCheck;
use crate::webhook::{AUTOMATIC, Announce, Announcement};

const INTERVAL: Duration = Duration::from_millis(100);
const TIMEOUT: Duration = Duration::from_secs(1);

/// One region's connection to a shared bucket; `down` makes every call
/// fail as a partition would.
struct Link {
    bucket: Arc<InProcess>,
    down: Arc<AtomicBool>,
    /// Also down when this is (the lease bucket alone, as when its stream
    /// has no leader while the heartbeat bucket's has).
    also: Option<Arc<AtomicBool>>,
    /// Every call hangs (a slow KV; callers bound their waits) while set.
    hang: Option<Arc<AtomicBool>>,
}

impl Link {
    async fn check(&self) -> Result<(), HaError> {
        if self.hang.as_ref().is_some_and(|h| h.load(Ordering::SeqCst)) {
            tokio::time::sleep(Duration::from_secs(3600)).await;
        }
        if self.down.load(Ordering::SeqCst)
            || self.also.as_ref().is_some_and(|a| a.load(Ordering::SeqCst))
        {
            Err(HaError::Unavailable("cut off (test)".into()))
        } else {
            Ok(())
        }
    }
}

#[async_trait]
impl Coordination for Link {
    async fn get(&self, key: &str) -> Result<Option<Entry>, HaError> {
        self.check().await?;
        self.bucket.get(key).await
    }
    async fn create(&self, key: &str, value: Bytes) -> Result<u64, HaError> {
        self.check().await?;
        self.bucket.create(key, value).await
    }
    async fn update(&self, key: &str, value: Bytes, revision: u64) -> Result<u64, HaError> {
        self.check().await?;
        self.bucket.update(key, value, revision).await
    }
    async fn put(&self, key: &str, value: Bytes) -> Result<u64, HaError> {
        self.check().await?;
        self.bucket.put(key, value).await
    }
    async fn delete(&self, key: &str, revision: Option<u64>) -> Result<(), HaError> {
        self.check().await?;
        self.bucket.delete(key, revision).await
    }
    async fn list(&self, prefix: &str) -> Result<Vec<Entry>, HaError> {
        self.check().await?;
        self.bucket.list(prefix).await
    }
    async fn watch(&self, key: &str) -> Result<BoxStream<'static, Event>, HaError> {
        self.check().await?;
        self.bucket.watch(key).await
    }
    fn max_age(&self) -> Duration {
        self.bucket.max_age()
    }
}

/// An in-memory JobManager with one job.
struct FakeJobs {
    job: JobId,
    leading: Mutex<Option<JmEpoch>>,
    running: AtomicBool,
    started: Mutex<Vec<(RegionEpoch, Instant)>>,
    stood_by: Mutex<Vec<(Option<String>, Instant)>>,
    /// The region fence: epoch and until when.
    fence: Mutex<Option<(RegionEpoch, Instant)>>,
    failovers: AtomicU64,
    /// Every region's store: a switchover's savepoint appears in the
    /// target's (as replication would put it there).
    stores: BTreeMap<String, StorageLocation>,
    /// Stopping with a savepoint fails (to test the roll-back).
    savepoint_fails: AtomicBool,
    /// Set once the savepoints are taken (to cut a link at that moment).
    after_savepoints: Mutex<Option<Arc<AtomicBool>>>,
    /// Starting the jobs fails (the promotion is retried).
    start_fails: AtomicBool,
    /// When the role became a primary one (Promoting, Primary,
    /// SwitchingOver) or a standby one, as the coordinator reported.
    roles: Mutex<Vec<(bool, Instant)>>,
}

impl FakeJobs {
    fn started(&self) -> Vec<RegionEpoch> {
        self.started.lock().unwrap().iter().map(|s| s.0).collect()
    }
    fn stood_by(&self) -> Vec<Option<String>> {
        self.stood_by
            .lock()
            .unwrap()
            .iter()
            .map(|s| s.0.clone())
            .collect()
    }
}

#[async_trait]
impl RegionJobs for FakeJobs {
    fn leading(&self) -> Option<JmEpoch> {
        *self.leading.lock().unwrap()
    }
    fn jobs(&self) -> Vec<RegionJob> {
        vec![RegionJob {
            id: self.job,
            name: "clicks".into(),
            active: true,
            running: self.running.load(Ordering::SeqCst),
            last_checkpoint: None,
        }]
    }
    fn confirm(&self, epoch: RegionEpoch, valid_for: Duration) {
        *self.fence.lock().unwrap() = Some((epoch, Instant::now() + valid_for));
    }
    async fn start(&self, epoch: RegionEpoch) -> Result<usize, String> {
        if self.start_fails.load(Ordering::SeqCst) {
            return Err("no free task slots (test)".into());
        }
        self.started.lock().unwrap().push((epoch, Instant::now()));
        self.running.store(true, Ordering::SeqCst);
        Ok(1)
    }
    async fn stand_by(&self, primary: Option<&str>) {
        self.stood_by
            .lock()
            .unwrap()
            .push((primary.map(str::to_string), Instant::now()));
        self.running.store(false, Ordering::SeqCst);
        *self.fence.lock().unwrap() = None;
    }
    async fn stop_with_savepoints(
        &self,
        target: &str,
    ) -> Vec<(JobId, Result<SavepointRef, String>)> {
        if self.savepoint_fails.load(Ordering::SeqCst) {
            return vec![(self.job, Err("the savepoint timed out".into()))];
        }
        self.running.store(false, Ordering::SeqCst);
        let n = 42;
        let dir = self.stores[target].child(&snapshot_dir(
            &self.job,
            SnapshotKind::Savepoint,
            CheckpointId(n),
        ));
        let m = manifest(self.job, n, SnapshotKind::Savepoint, 1);
        write_manifest(&dir, &m).await.unwrap();
        if let Some(flag) = self.after_savepoints.lock().unwrap().as_ref() {
            flag.store(true, Ordering::SeqCst);
        }
        vec![(
            self.job,
            Ok(SavepointRef {
                job_id: self.job,
                checkpoint_id: n,
                path: dir.url().to_string(),
            }),
        )]
    }
    fn report(&self, event: RegionEvent<'_>) {
        match event {
            RegionEvent::Failover => {
                self.failovers.fetch_add(1, Ordering::SeqCst);
            }
            RegionEvent::Role { primary, .. } => {
                self.roles.lock().unwrap().push((primary, Instant::now()));
            }
            _ => {}
        }
    }
}

fn manifest(job: JobId, n: u64, kind: SnapshotKind, epoch: u64) -> Manifest {
    Manifest {
        format: MANIFEST_FORMAT,
        job_id: job,
        job_name: "clicks".into(),
        checkpoint_id: CheckpointId(n),
        kind,
        created_at: chrono::Utc::now(),
        jm_epoch: JmEpoch(1),
        region_epoch: RegionEpoch(epoch),
        parallelism: 1,
        watermark: 0,
        records_in: n,
        records_out: n,
        finished: false,
        duration_ms: 1,
        files: Vec::new(),
        source_offsets: Default::default(),
        sink_transactions: Vec::new(),
        restored_from: None,
    }
}

struct AcceptAll;

impl RestoreCheck for AcceptAll {
    fn check(
        &self,
        _spec: &str,
        cp: &ferry_core::manifest::VerifiedCheckpoint,
    ) -> Result<usize, String> {
        Ok(cp.manifest.files.len())
    }
}

/// One region: its coordinator, its JobManager, its link.
/// What a region announced to its webhook, in order.
#[derive(Debug, Default)]
struct Heard(Mutex<Vec<Announcement>>);

impl Announce for Heard {
    fn announce(&self, a: Announcement) {
        self.0.lock().unwrap().push(a);
    }
}

impl Heard {
    /// (event, primary, epoch, actor) of every announcement.
    fn events(&self) -> Vec<(&'static str, String, RegionEpoch, String)> {
        self.0
            .lock()
            .unwrap()
            .iter()
            .map(|a| (a.event, a.primary.clone(), a.epoch, a.actor.clone()))
            .collect()
    }
}

struct Region {
    name: &'static str,
    c: Arc<Coordinator>,
    jobs: Arc<FakeJobs>,
    heard: Arc<Heard>,
    down: Arc<AtomicBool>,
    store: StorageLocation,
    lease_down: Arc<AtomicBool>,
    /// The heartbeat bucket hangs for this region.
    health_hang: Arc<AtomicBool>,
}

impl Region {
    fn role(&self) -> Role {
        self.c.role.try_lock().expect("no tick runs").clone()
    }
    fn is(&self, r: RegionRole) -> bool {
        self.role().name() == r
    }
    fn cut(&self, down: bool) {
        self.down.store(down, Ordering::SeqCst);
    }
    /// Only the lease bucket stops answering this region.
    fn cut_lease(&self, down: bool) {
        self.lease_down.store(down, Ordering::SeqCst);
    }
}

/// Regions sharing one pair of global buckets, the first being the home
/// region; every JobManager leads its region.
struct World {
    _tmp: tempfile::TempDir,
    regions: Vec<Region>,
    lease: Arc<InProcess>,
    job: JobId,
}

impl World {
    fn new(names: &[&'static str]) -> Self {
        let tmp = tempfile::tempdir().unwrap();
        let lease = Arc::new(InProcess::new(Duration::from_secs(3600)));
        let health = Arc::new(InProcess::new(Duration::from_secs(3600)));
        let stores: BTreeMap<String, StorageLocation> = names
            .iter()
            .map(|n| {
                let dir = tmp.path().join(n);
                std::fs::create_dir_all(&dir).unwrap();
                (
                    n.to_string(),
                    StorageLocation::open(&format!("file://{}", dir.display())).unwrap(),
                )
            })
            .collect();
        let job = JobId::new();
        let regions = names
            .iter()
            .map(|name| {
                let down = Arc::new(AtomicBool::new(false));
                let lease_down = Arc::new(AtomicBool::new(false));
                let health_hang = Arc::new(AtomicBool::new(false));
                let link = |b: &Arc<InProcess>,
                            also: Option<&Arc<AtomicBool>>,
                            hang: Option<&Arc<AtomicBool>>|
                 -> Arc<dyn Coordination> {
                    Arc::new(Link {
                        bucket: b.clone(),
                        down: down.clone(),
                        also: also.cloned(),
                        hang: hang.cloned(),
                    })
                };
                let jobs = Arc::new(FakeJobs {
                    job,
                    leading: Mutex::new(Some(JmEpoch(1))),
                    running: AtomicBool::new(false),
                    started: Mutex::new(Vec::new()),
                    stood_by: Mutex::new(Vec::new()),
                    fence: Mutex::new(None),
                    failovers: AtomicU64::new(0),
                    stores: stores.clone(),
                    savepoint_fails: AtomicBool::new(false),
                    after_savepoints: Mutex::new(None),
                    start_fails: AtomicBool::new(false),
                    roles: Mutex::new(Vec::new()),
                });
                let store = stores[*name].clone();
                let heard = Arc::new(Heard::default());
                let c = Coordinator::new(
                    Settings {
                        region: name.to_string(),
                        instance: format!("jm-{name}"),
                        api_url: format!("http://{name}.invalid"),
                        home: Some(names[0].to_string()),
                        stores: stores.clone(),
                        interval: INTERVAL,
                        timeout: TIMEOUT,
                        auto_failover: true,
                        webhook: Some(heard.clone()),
                    },
                    jobs.clone(),
                    link(&lease, Some(&lease_down), None),
                    link(&health, None, Some(&health_hang)),
                    Arc::new(Replicator::new(Vec::new(), crate::WriteFence::closed())),
                    Arc::new(Verifier::new(store.clone(), Arc::new(AcceptAll))),
                );
                Region {
                    name,
                    c,
                    jobs,
                    heard,
                    down,
                    lease_down,
                    health_hang,
                    store,
                }
            })
            .collect();
        Self {
            _tmp: tmp,
            regions,
            lease,
            job,
        }
    }

    fn r(&self, name: &str) -> &Region {
        self.regions.iter().find(|r| r.name == name).unwrap()
    }

    /// One interval: every region in `alive` ticks, then time advances.
    async fn step(&self, alive: &[&str]) {
        for name in alive {
            self.r(name).c.tick().await;
        }
        tokio::time::advance(INTERVAL).await;
    }

    /// Steps `alive` until `done` holds (at most `limit` steps); returns
    /// how many steps it took.
    async fn until(&self, alive: &[&str], limit: usize, done: impl Fn(&Self) -> bool) -> usize {
        for n in 0..limit {
            if done(self) {
                return n;
            }
            self.step(alive).await;
        }
        panic!(
            "not reached within {limit} steps: {:?}",
            self.regions
                .iter()
                .map(|r| (r.name, r.role().name()))
                .collect::<Vec<_>>()
        );
    }

    /// Ticks every region every interval until the handle is aborted (an
    /// operation runs meanwhile, as the loop goes on in a JobManager).
    fn tick_in_background(&self) -> tokio::task::JoinHandle<()> {
        let regions: Vec<Arc<Coordinator>> = self.regions.iter().map(|r| r.c.clone()).collect();
        tokio::spawn(async move {
            loop {
                for c in &regions {
                    c.tick().await;
                }
                tokio::time::sleep(INTERVAL).await;
            }
        })
    }

    async fn lease(&self) -> lease::Lease {
        lease::read(self.lease.as_ref()).await.unwrap().unwrap()
    }
}

/// Starts `w` until the home region is primary and every other a standby.
async fn settled(w: &World) {
    let all: Vec<&str> = w.regions.iter().map(|r| r.name).collect();
    let home = w.regions[0].name;
    w.until(&all, 20, |w| {
        w.r(home).is(RegionRole::Primary)
            && w.regions[1..].iter().all(|r| r.is(RegionRole::Standby))
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn the_home_region_creates_the_lease_and_starts_its_jobs_while_the_others_stand_by() {
    let w = World::new(&["east", "west"]);
    settled(&w).await;
    let l = w.lease().await;
    assert_eq!((l.primary(), l.epoch), (Some("east"), RegionEpoch(1)));
    assert_eq!(w.r("east").jobs.started(), vec![RegionEpoch(1)]);
    assert!(w.r("east").jobs.running.load(Ordering::SeqCst));
    assert_eq!(w.r("west").jobs.stood_by(), vec![Some("east".to_string())]);
    assert!(w.r("west").jobs.started().is_empty());
    // The primary's fence is renewed every tick: it never runs out while
    // the lease is renewed.
    for _ in 0..30 {
        w.step(&["east", "west"]).await;
        let (e, until) = w.r("east").jobs.fence.lock().unwrap().unwrap();
        assert_eq!(e, RegionEpoch(1));
        assert!(until > Instant::now());
    }
    let s = w.r("west").c.status();
    assert_eq!(s.primary.as_deref(), Some("east"));
    assert_eq!(s.global_reachable, Some(true));
    assert!(s.healthy("east") && s.healthy("west"), "{s:?}");
}

/// Through the coordinator's own loop: the promoted standby starts its
/// jobs in the same instant it claimed the lease, not one interval later.
#[tokio::test(start_paused = true)]
async fn a_promoted_standby_starts_its_jobs_at_once() {
    let w = World::new(&["east", "west"]);
    settled(&w).await;
    let stop = tokio_util::sync::CancellationToken::new();
    let (_tx, rx) = tokio::sync::mpsc::unbounded_channel();
    // East is gone; west runs on its own loop.
    let running = w
        .r("west")
        .c
        .spawn(rx, Duration::from_secs(3600), stop.clone());
    let limit = Instant::now() + TIMEOUT * 10;
    while w.r("west").jobs.started().is_empty() {
        assert!(Instant::now() < limit, "west never started its jobs");
        tokio::time::sleep(INTERVAL / 10).await;
    }
    stop.cancel();
    running.await.unwrap();
    // West stood by (not primary); Promoting was its first primary role.
    let roles = w.r("west").jobs.roles.lock().unwrap().clone();
    assert!(!roles[0].0, "{roles:?}");
    let promoted = roles.iter().find(|r| r.0).expect("promoted").1;
    let started = w.r("west").jobs.started.lock().unwrap()[0].1;
    assert!(
        started - promoted < INTERVAL / 2,
        "west started its jobs {:?} after it claimed the lease",
        started - promoted
    );
    assert_eq!(w.r("west").jobs.started(), vec![RegionEpoch(2)]);
}

#[tokio::test(start_paused = true)]
async fn a_silent_primary_is_replaced_only_after_the_whole_timeout() {
    let w = World::new(&["east", "west"]);
    settled(&w).await;
    // East dies: it neither renews nor answers.
    w.step(&["east", "west"]).await;
    let last_renewal = Instant::now() - INTERVAL;
    w.until(&["west"], 30, |w| w.r("west").is(RegionRole::Promoting))
        .await;
    let claimed = Instant::now();
    assert!(
        claimed - last_renewal > TIMEOUT,
        "west claimed {:?} after east's last renewal",
        claimed - last_renewal
    );
    w.until(&["west"], 5, |w| w.r("west").is(RegionRole::Primary))
        .await;
    assert_eq!(w.r("west").jobs.started(), vec![RegionEpoch(2)]);
    assert_eq!(w.r("west").jobs.failovers.load(Ordering::SeqCst), 1);
    assert_eq!(w.lease().await.epoch, RegionEpoch(2));
    // East comes back (its JobManager was frozen, say): its first renewal
    // loses, it stops its jobs and stands by for west.
    w.until(&["east", "west"], 5, |w| {
        w.r("east").is(RegionRole::Standby)
    })
    .await;
    assert_eq!(
        w.r("east").jobs.stood_by().last(),
        Some(&Some("west".into()))
    );
    assert!(!w.r("east").jobs.running.load(Ordering::SeqCst));
    assert_eq!(
        w.r("east").jobs.started(),
        vec![RegionEpoch(1)],
        "never restarted"
    );
    // Nobody asked: both announcements name the move automatic.
    assert_eq!(
        w.r("west").heard.events(),
        vec![("promoted", "west".into(), RegionEpoch(2), AUTOMATIC.into())]
    );
    assert_eq!(
        w.r("east").heard.events(),
        vec![
            ("promoted", "east".into(), RegionEpoch(1), AUTOMATIC.into()),
            ("demoted", "west".into(), RegionEpoch(2), AUTOMATIC.into()),
        ]
    );
    let reason = w.r("west").heard.0.lock().unwrap()[0].reason.clone();
    assert!(
        reason
            .as_deref()
            .unwrap_or("")
            .starts_with("failover: primary east silent"),
        "{reason:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn a_primary_cut_off_from_the_global_kv_stops_before_any_standby_takes_over() {
    let w = World::new(&["east", "west"]);
    settled(&w).await;
    w.step(&["east", "west"]).await;
    w.r("east").cut(true);
    let cut = Instant::now();
    w.until(&["east", "west"], 30, |w| {
        w.r("west").is(RegionRole::Promoting)
    })
    .await;
    let (stopped_by, stopped_at) = w.r("east").jobs.stood_by.lock().unwrap()[0].clone();
    assert_eq!(stopped_by, None, "east does not know who is primary");
    assert!(w.r("east").is(RegionRole::Isolated));
    assert!(
        stopped_at - cut <= TIMEOUT / 2 + INTERVAL,
        "east stopped {:?} after it was cut off",
        stopped_at - cut
    );
    let claimed = w.r("west").jobs.fence.lock().unwrap().unwrap().1 - TIMEOUT / 2;
    assert!(stopped_at < claimed, "east stopped before west claimed");
    // Reads alone do not make it reachable: east reports the global KV
    // unreachable while cut off.
    assert_eq!(w.r("east").c.status().global_reachable, Some(false));
    // Back on the network: east learns west holds the lease.
    w.r("east").cut(false);
    w.until(&["east", "west"], 5, |w| {
        w.r("east").is(RegionRole::Standby)
    })
    .await;
    assert_eq!(w.r("east").jobs.started(), vec![RegionEpoch(1)]);
    assert!(w.r("west").is(RegionRole::Primary));
}

/// Both regions lose the global KV (through `deafen`) for twice the
/// timeout, then get it back with west ticking first: west must not take
/// what it could not hear for the primary's silence, and east keeps the
/// lease.
async fn no_lease_moves_after_a_deaf_spell(deafen: impl Fn(&Region, bool)) {
    let w = World::new(&["east", "west"]);
    settled(&w).await;
    w.step(&["east", "west"]).await;
    deafen(w.r("east"), true);
    deafen(w.r("west"), true);
    for _ in 0..(2 * TIMEOUT.as_millis() / INTERVAL.as_millis()) {
        w.step(&["east", "west"]).await;
    }
    assert!(w.r("west").is(RegionRole::Standby));
    deafen(w.r("west"), false);
    deafen(w.r("east"), false);
    w.until(&["west", "east"], 10, |w| {
        w.r("east").is(RegionRole::Primary)
    })
    .await;
    for _ in 0..(2 * TIMEOUT.as_millis() / INTERVAL.as_millis()) {
        w.step(&["west", "east"]).await;
        assert!(
            w.r("west").is(RegionRole::Standby),
            "west took the lease: {:?}",
            w.r("west").role().name()
        );
    }
    assert_eq!(w.lease().await.epoch, RegionEpoch(1));
    assert_eq!(w.r("west").jobs.started(), Vec::<RegionEpoch>::new());
    assert_eq!(w.r("west").jobs.failovers.load(Ordering::SeqCst), 0);
}

/// The global KV answers nobody for longer than the region timeout (its
/// stream leader died and the next one is being elected).
#[tokio::test(start_paused = true)]
async fn a_global_kv_that_answers_nobody_for_a_while_moves_no_lease() {
    no_lease_moves_after_a_deaf_spell(|r, down| r.cut(down)).await;
}

/// Only the lease's stream has no leader for longer than the timeout (the
/// heartbeat bucket's stream, elsewhere, takes writes all along): the
/// standby cannot write to the lease bucket either, so what it reads of the
/// lease meanwhile proves nothing about the primary.
#[tokio::test(start_paused = true)]
async fn a_lease_bucket_that_takes_no_writes_for_a_while_moves_no_lease() {
    no_lease_moves_after_a_deaf_spell(|r, down| r.cut_lease(down)).await;
}

/// The error of a switchover from east to west that must fail.
async fn refused_switchover(w: &World) -> String {
    w.r("east")
        .c
        .switchover("west", false, false, "alice")
        .await
        .expect_err("the switchover must be refused")
        .to_string()
}

#[tokio::test(start_paused = true)]
async fn an_isolated_primary_that_renews_again_restarts_its_jobs() {
    let w = World::new(&["east", "west"]);
    settled(&w).await;
    // Cut off long enough to isolate, but the standby is not running
    // (nobody takes over).
    w.r("east").cut(true);
    w.until(&["east"], 20, |w| w.r("east").is(RegionRole::Isolated))
        .await;
    // A switchover asked of it meanwhile is refused, saying where the
    // jobs are, and moves nothing.
    let e = refused_switchover(&w).await;
    assert!(
        e.contains("every job here is stopped until this region renews the region lease"),
        "{e}"
    );
    assert!(w.r("east").is(RegionRole::Isolated));
    w.r("east").cut(false);
    w.until(&["east"], 5, |w| w.r("east").is(RegionRole::Primary))
        .await;
    assert_eq!(
        w.r("east").jobs.started(),
        vec![RegionEpoch(1), RegionEpoch(1)],
        "restarted under the same epoch"
    );
}

#[tokio::test(start_paused = true)]
async fn the_standby_with_the_newest_verified_checkpoints_takes_over_first() {
    let w = World::new(&["east", "west", "south"]);
    // West verified checkpoint 5 of the job, south only 3.
    for (r, n) in [("west", 5), ("south", 3)] {
        let store = &w.r(r).store;
        store
            .put(
                &format!("jobs/{}/spec.yaml", w.job),
                Bytes::from_static(b"spec"),
            )
            .await
            .unwrap();
        crate::replicate::tests::lineage_checkpoint(store, &w.job, n, &[("s", b"x")], 1, None)
            .await;
        w.r(r).c.verifier.pass().await.unwrap();
    }
    settled(&w).await;
    // South looks first each tick: it must defer to west, not claim.
    w.until(&["south", "west"], 40, |w| {
        w.r("west").is(RegionRole::Primary)
    })
    .await;
    assert!(w.r("south").is(RegionRole::Standby));
    assert!(w.r("south").jobs.started().is_empty());
    assert!(
        w.r("south")
            .c
            .said
            .lock()
            .unwrap()
            .as_deref()
            .is_some_and(|s| s.contains("west holds newer verified checkpoints")),
        "{:?}",
        w.r("south").c.said.lock().unwrap()
    );
}

#[tokio::test(start_paused = true)]
async fn a_drill_target_takes_over_while_the_other_standbys_stand_aside() {
    let w = World::new(&["east", "west", "south"]);
    // West would win the ranking.
    let store = &w.r("west").store;
    store
        .put(
            &format!("jobs/{}/spec.yaml", w.job),
            Bytes::from_static(b"s"),
        )
        .await
        .unwrap();
    crate::replicate::tests::lineage_checkpoint(store, &w.job, 9, &[("s", b"x")], 1, None).await;
    w.r("west").c.verifier.pass().await.unwrap();
    settled(&w).await;
    // A target that is not healthy or not known is refused up front.
    let err = w
        .r("east")
        .c
        .outage(
            Some((Duration::from_secs(30), Some("nowhere".into()))),
            "drill-bot",
        )
        .await
        .unwrap_err();
    assert_eq!(err.kind().status(), 404, "{err}");
    let report = w
        .r("east")
        .c
        .outage(
            Some((Duration::from_secs(30), Some("south".into()))),
            "drill-bot",
        )
        .await
        .unwrap();
    assert_eq!(report.target.as_deref(), Some("south"));
    assert_eq!(report.jobs.len(), 1, "the running job is reported");
    assert!(w.r("east").is(RegionRole::Dark));
    assert!(!w.r("east").jobs.running.load(Ordering::SeqCst));
    let all = ["east", "west", "south"];
    w.until(&all, 60, |w| w.r("south").is(RegionRole::Primary))
        .await;
    assert!(w.r("west").is(RegionRole::Standby));
    assert!(w.r("west").jobs.started().is_empty());
    // South took over for the drill: on behalf of whoever started it.
    assert_eq!(
        w.r("south").heard.events(),
        vec![(
            "promoted",
            "south".into(),
            RegionEpoch(2),
            "drill-bot".into()
        )]
    );
    assert!(w.r("west").heard.events().is_empty());
    // The drill ends: east reads the lease anew and stands by for south.
    let end = w.r("east").c.outage(None, "drill-bot").await.unwrap();
    assert!(end.was_dark);
    w.until(&all, 10, |w| w.r("east").is(RegionRole::Standby))
        .await;
    assert_eq!(w.lease().await.primary(), Some("south"));
}

#[tokio::test(start_paused = true)]
async fn a_switchover_moves_the_lease_after_the_savepoints_reached_the_target() {
    let w = World::new(&["east", "west"]);
    settled(&w).await;
    let east = w.r("east").c.clone();
    // Only the primary's leader runs it; an unknown region is a 404.
    let e = w
        .r("west")
        .c
        .switchover("east", false, false, "alice")
        .await
        .unwrap_err();
    assert_eq!(e.kind().status(), 409, "{e}");
    let e = east
        .switchover("mars", false, false, "alice")
        .await
        .unwrap_err();
    assert_eq!(e.kind().status(), 404, "{e}");
    let plan = east.switchover("west", false, true, "alice").await.unwrap();
    assert!(plan.dry_run && plan.jobs == vec![w.job], "{plan:?}");
    assert!(
        w.r("east").jobs.running.load(Ordering::SeqCst),
        "a plan changes nothing"
    );
    // The loop keeps renewing while the switchover runs.
    let ticking = w.tick_in_background();
    let report = east
        .switchover("west", false, false, "alice")
        .await
        .unwrap();
    assert_eq!(report.epoch, RegionEpoch(2));
    assert_eq!(report.savepoints.len(), 1);
    let deadline = Instant::now() + Duration::from_secs(5);
    while !(w.r("west").is(RegionRole::Primary) && w.r("east").is(RegionRole::Standby)) {
        assert!(Instant::now() < deadline);
        tokio::time::sleep(INTERVAL).await;
    }
    ticking.abort();
    assert_eq!(w.r("west").jobs.started(), vec![RegionEpoch(2)]);
    assert_eq!(w.r("east").jobs.failovers.load(Ordering::SeqCst), 0);
    // Both regions name alice, who asked for it, and the new epoch.
    let by_alice = |event, primary: &str| {
        (
            event,
            primary.to_string(),
            RegionEpoch(2),
            "alice".to_string(),
        )
    };
    assert_eq!(
        w.r("west").heard.events(),
        vec![by_alice("promoted", "west")]
    );
    assert_eq!(
        w.r("east").heard.events().last(),
        Some(&by_alice("demoted", "west"))
    );
    assert_eq!(w.lease().await.record.unwrap().by.as_deref(), Some("alice"));
    assert_eq!(
        w.r("west").jobs.failovers.load(Ordering::SeqCst),
        0,
        "not a failover"
    );
}

#[tokio::test(start_paused = true)]
async fn a_switchover_that_cannot_take_a_savepoint_resumes_the_jobs_here() {
    let w = World::new(&["east", "west"]);
    settled(&w).await;
    w.r("east")
        .jobs
        .savepoint_fails
        .store(true, Ordering::SeqCst);
    let e = refused_switchover(&w).await;
    assert!(e.contains("every job resumes here in east"), "{e}");
    assert!(w.r("east").is(RegionRole::Primary));
    w.step(&["east", "west"]).await;
    assert_eq!(
        w.r("east").jobs.started(),
        vec![RegionEpoch(1), RegionEpoch(1)],
        "started again"
    );
    assert_eq!(w.lease().await.primary(), Some("east"));
}

#[tokio::test(start_paused = true)]
async fn a_switchover_whose_lease_move_fails_leaves_every_job_in_exactly_one_region() {
    let w = World::new(&["east", "west"]);
    settled(&w).await;
    let east = w.r("east").c.clone();
    // The global KV takes no writes from east once the savepoints are
    // taken (as when its stream leader died).
    *w.r("east").jobs.after_savepoints.lock().unwrap() = Some(w.r("east").down.clone());
    let report = east.switchover("west", false, false, "alice").await;
    let down = w.r("east").down.clone();
    let e = report.unwrap_err();
    assert_eq!(e.kind().status(), 503, "{e}");
    assert!(
        e.to_string()
            .contains("every job is stopped with a savepoint in east"),
        "{e}"
    );
    assert!(w.r("east").is(RegionRole::Isolated));
    // The lease still names east, unchanged: once the KV answers, east
    // confirms it and resumes; west never ran the job.
    down.store(false, Ordering::SeqCst);
    w.until(&["east", "west"], 10, |w| {
        w.r("east").is(RegionRole::Primary)
    })
    .await;
    assert_eq!(w.lease().await.primary(), Some("east"));
    assert!(w.r("east").jobs.running.load(Ordering::SeqCst));
    assert!(w.r("west").jobs.started().is_empty());
}

#[tokio::test(start_paused = true)]
async fn a_lost_in_region_leadership_hands_the_region_to_the_next_leader() {
    let w = World::new(&["east", "west"]);
    settled(&w).await;
    *w.r("east").jobs.leading.lock().unwrap() = None;
    w.step(&["east", "west"]).await;
    assert!(w.r("east").is(RegionRole::Follower));
    // Followers do nothing to the jobs: the next leader adopts them.
    assert!(w.r("east").jobs.stood_by().is_empty());
    *w.r("east").jobs.leading.lock().unwrap() = Some(JmEpoch(7));
    w.until(&["east", "west"], 5, |w| {
        w.r("east").is(RegionRole::Primary)
    })
    .await;
    assert_eq!(
        w.r("east").jobs.started(),
        vec![RegionEpoch(1), RegionEpoch(1)]
    );
    assert!(
        w.r("west").is(RegionRole::Standby),
        "the lease kept being renewed"
    );
}

/// A new in-region leader confirms the region lease — and with it the
/// TaskManagers' region fence — in its very first tick, before it spends
/// any time on heartbeats: with a slow heartbeat bucket, beating first
/// used up the fence that the old leader's last renewal left, and the
/// tasks stopped although the region never stopped being primary.
#[tokio::test(start_paused = true)]
async fn a_new_leader_confirms_the_fence_before_it_beats() {
    let w = World::new(&["east", "west"]);
    settled(&w).await;
    *w.r("east").jobs.leading.lock().unwrap() = None;
    w.step(&["east", "west"]).await;
    assert!(w.r("east").is(RegionRole::Follower));
    w.r("east").health_hang.store(true, Ordering::SeqCst);
    *w.r("east").jobs.leading.lock().unwrap() = Some(JmEpoch(8));
    let start = Instant::now();
    w.r("east").c.tick().await;
    let (_, until) = w.r("east").jobs.fence.lock().unwrap().unwrap();
    let sent = until - TIMEOUT / 2;
    assert!(
        sent >= start && sent - start < INTERVAL,
        "the fence was confirmed {:?} into the first tick",
        sent.saturating_duration_since(start)
    );
    assert!(w.r("east").is(RegionRole::Promoting) || w.r("east").is(RegionRole::Primary));
}

#[tokio::test(start_paused = true)]
async fn an_unreadable_lease_is_replaced_with_a_newer_epoch() {
    let w = World::new(&["east", "west"]);
    settled(&w).await;
    w.lease
        .put(REGION_LEASE, Bytes::from_static(b"\x00garbage"))
        .await
        .unwrap();
    // The primary's renewal loses and it cannot tell who holds the lease:
    // it stops. After the timeout a standby claims it anew.
    w.until(&["east", "west"], 30, |w| {
        w.r("west").is(RegionRole::Primary) || w.r("east").is(RegionRole::Primary)
    })
    .await;
    // Not necessarily `west` — whoever claims first — but one, above every
    // epoch used so far, and the other stands by.
    let l = w.lease().await;
    assert!(l.epoch > RegionEpoch(1), "{l:?}");
    let primaries = w
        .regions
        .iter()
        .filter(|r| r.is(RegionRole::Primary))
        .count();
    assert_eq!(primaries, 1);
}

#[tokio::test(start_paused = true)]
async fn lease_read_errors_change_nothing() {
    let w = World::new(&["east", "west"]);
    w.r("west").cut(true);
    for _ in 0..30 {
        w.step(&["east", "west"]).await;
    }
    assert!(
        w.r("west").is(RegionRole::Starting),
        "runs nothing, decides nothing"
    );
    assert!(w.r("west").jobs.started().is_empty() && w.r("west").jobs.stood_by().is_empty());
    assert!(w.r("east").is(RegionRole::Primary));
    w.r("west").cut(false);
    w.until(&["east", "west"], 5, |w| {
        w.r("west").is(RegionRole::Standby)
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn fail_back_reports_only_what_the_latest_failover_diverged() {
    use crate::replicate::tests::lineage_checkpoint;
    let w = World::new(&["east", "west"]);
    settled(&w).await;
    let (east, west) = (&w.r("east").store, &w.r("west").store);
    let job = w.job;
    for s in [east, west] {
        s.put(&format!("jobs/{job}/spec.yaml"), Bytes::from_static(b"s"))
            .await
            .unwrap();
    }
    // An earlier failover's archive (replaced by epoch 1's lineage).
    let stale = format!("jobs/{job}/diverged/checkpoint-2-epoch-0.json");
    let old = ferry_core::api::Diverged {
        job,
        dir: "checkpoints/2".into(),
        checkpoint: 2,
        region_epoch: RegionEpoch(0),
        created_at: chrono::Utc::now(),
        records_in: 1,
        records_out: 1,
        watermark: 0,
        sink_transactions: 0,
        replaced_by_epoch: RegionEpoch(1),
        base: None,
        archived_at: chrono::Utc::now(),
    };
    west.put(
        &stale,
        Bytes::from(serde_json::to_vec(&serde_json::json!({"diverged": old})).unwrap()),
    )
    .await
    .unwrap();
    // East (epoch 1) replicated 1-3 to west, then completed 4 and 5 alone.
    for n in 1..=3 {
        lineage_checkpoint(east, &job, n, &[("s", b"a")], 1, None).await;
    }
    crate::replicate::tests::copy(east, west, &job)
        .await
        .unwrap();
    for n in [4, 5] {
        lineage_checkpoint(east, &job, n, &[("s", b"a")], 1, None).await;
    }
    // East dies; west takes over (epoch 2), restores 3, completes 6.
    w.until(&["west"], 30, |w| w.r("west").is(RegionRole::Primary))
        .await;
    lineage_checkpoint(west, &job, 6, &[("s", b"b")], 2, Some(3)).await;
    // East returns as a standby; fail-back (dry run) catches it up.
    w.until(&["east", "west"], 5, |w| {
        w.r("east").is(RegionRole::Standby)
    })
    .await;
    let ticking = w.tick_in_background();
    let plan = w
        .r("west")
        .c
        .failback(None, true, Duration::from_secs(5), "alice")
        .await
        .unwrap();
    ticking.abort();
    assert!(
        plan.failback && plan.dry_run && plan.to == "east",
        "{plan:?}"
    );
    let d = plan.divergence.unwrap();
    assert_eq!(d.jobs.len(), 1, "{d:?}");
    assert_eq!(
        d.jobs[0].checkpoints,
        vec![4, 5],
        "only the latest failover's"
    );
    assert_eq!(d.jobs[0].base.as_ref().map(|b| b.checkpoint), Some(3));
    // West's lineage is now in east's store: 4 and 5 were archived.
    assert!(
        east.child(&format!("jobs/{job}/checkpoints/5"))
            .size(MANIFEST_FILE)
            .await
            .unwrap()
            .is_none()
    );
}

#[tokio::test(start_paused = true)]
async fn a_stale_region_never_replicates_over_a_newer_lineage() {
    use crate::replicate::tests::lineage_checkpoint;
    let w = World::new(&["east", "west"]);
    let (east, west) = (&w.r("east").store, &w.r("west").store);
    let job = w.job;
    for n in 1..=6 {
        lineage_checkpoint(east, &job, n, &[("s", b"a")], 1, None).await;
    }
    lineage_checkpoint(west, &job, 4, &[("s", b"b")], 2, Some(3)).await;
    let e = crate::replicate::tests::copy(east, west, &job)
        .await
        .unwrap_err();
    assert!(
        matches!(e, crate::ReplicationError::StaleSource { .. }),
        "{e}"
    );
    // Nothing of west's newer lineage was touched.
    let left = ferry_core::manifest::list_checkpoint_ids(west, &job)
        .await
        .unwrap();
    assert_eq!(left, vec![CheckpointId(4)]);
}

/// A primary cut off while its replication still runs (as through a
/// store outage) writes nothing into another region's store from before
/// a standby takes over: its copies would land in the new primary's store
/// as manifests of the old epoch above the new primary's checkpoints.
#[tokio::test(start_paused = true)]
async fn a_region_that_lost_the_primary_role_writes_nothing_into_other_stores() {
    use crate::replicate::tests::lineage_checkpoint;
    let w = World::new(&["east", "west"]);
    settled(&w).await;
    let (east, west) = (&w.r("east").store, &w.r("west").store);
    let (job, fence) = (w.job, w.r("east").c.replicator.fence().clone());
    assert!(fence.is_open(), "the primary replicates");
    assert!(
        !w.r("west").c.replicator.fence().is_open(),
        "a standby does not"
    );
    lineage_checkpoint(east, &job, 1, &[("s", b"a")], 1, None).await;
    w.r("east").cut(true);
    w.until(&["east", "west"], 30, |w| {
        let claimed = w.r("west").is(RegionRole::Promoting) || w.r("west").is(RegionRole::Primary);
        assert!(
            !(claimed && w.r("east").c.replicator.fence().is_open()),
            "east's fence outlived west's claim"
        );
        claimed
    })
    .await;
    let e = crate::replicate_job(east, west, &job, &fence)
        .await
        .unwrap_err();
    assert!(matches!(e, crate::ReplicationError::Fenced { .. }), "{e}");
    assert!(
        ferry_core::manifest::list_checkpoint_ids(west, &job)
            .await
            .unwrap()
            .is_empty(),
        "east wrote into west's store after losing the role"
    );
    // Back on the network east stands by, its fence still closed; west's
    // is open.
    w.r("east").cut(false);
    w.until(&["east", "west"], 5, |w| {
        w.r("east").is(RegionRole::Standby)
    })
    .await;
    assert!(!fence.is_open());
    assert!(w.r("west").c.replicator.fence().is_open());
}

#[tokio::test(start_paused = true)]
async fn a_renewal_whose_answer_was_lost_does_not_demote_the_primary() {
    let w = World::new(&["east", "west"]);
    settled(&w).await;
    // Someone (this region's own renewal, whose answer never arrived)
    // renewed the lease: east's copy is stale but the lease is still its.
    let current = w.lease().await;
    let kv: Arc<dyn Coordination> = w.lease.clone();
    lease::renew(&kv, &current).await.unwrap();
    for _ in 0..5 {
        w.step(&["east", "west"]).await;
    }
    assert!(w.r("east").is(RegionRole::Primary));
    assert!(w.r("east").jobs.stood_by().is_empty(), "nothing stopped");
    assert_eq!(w.r("east").jobs.started(), vec![RegionEpoch(1)]);
    // A forced move back to east under a new epoch starts its jobs anew.
    let current = w.lease().await;
    lease::claim(&kv, &current, "east", "forced", "carol")
        .await
        .unwrap();
    w.until(&["east", "west"], 5, |w| {
        w.r("east").jobs.started().len() == 2
    })
    .await;
    assert_eq!(
        w.r("east").jobs.started(),
        vec![RegionEpoch(1), RegionEpoch(2)]
    );
    assert!(w.r("west").is(RegionRole::Standby));
}

#[tokio::test(start_paused = true)]
async fn a_promotion_that_cannot_start_its_jobs_retries_and_stops_on_losing_the_lease() {
    let w = World::new(&["east", "west"]);
    settled(&w).await;
    // East dies; west's jobs cannot start yet: it stays Promoting,
    // retrying, and keeps the lease renewed.
    w.r("west").jobs.start_fails.store(true, Ordering::SeqCst);
    w.until(&["west"], 30, |w| w.r("west").is(RegionRole::Promoting))
        .await;
    for _ in 0..20 {
        w.step(&["west"]).await;
        assert!(w.r("west").is(RegionRole::Promoting));
    }
    // Another region takes the lease meanwhile (forced): west stops.
    let current = w.lease().await;
    let kv: Arc<dyn Coordination> = w.lease.clone();
    lease::claim(&kv, &current, "east", "forced", "carol")
        .await
        .unwrap();
    w.until(&["west"], 5, |w| w.r("west").is(RegionRole::Standby))
        .await;
    assert_eq!(
        w.r("west").jobs.stood_by().last(),
        Some(&Some("east".into()))
    );
    assert!(w.r("west").jobs.started().is_empty());
}

#[tokio::test(start_paused = true)]
async fn a_promotion_cut_off_from_the_global_kv_isolates_within_half_the_timeout() {
    let w = World::new(&["east", "west"]);
    settled(&w).await;
    w.r("west").jobs.start_fails.store(true, Ordering::SeqCst);
    w.until(&["west"], 30, |w| w.r("west").is(RegionRole::Promoting))
        .await;
    w.r("west").cut(true);
    let cut = Instant::now();
    w.until(&["west"], 20, |w| w.r("west").is(RegionRole::Isolated))
        .await;
    assert!(
        cut.elapsed() <= TIMEOUT / 2 + INTERVAL,
        "{:?}",
        cut.elapsed()
    );
    assert_eq!(w.r("west").jobs.stood_by().last(), Some(&None));
    // Back, and able to start: it promotes again under the same epoch.
    w.r("west").cut(false);
    w.r("west").jobs.start_fails.store(false, Ordering::SeqCst);
    w.until(&["west"], 10, |w| w.r("west").is(RegionRole::Primary))
        .await;
    assert_eq!(w.r("west").jobs.started(), vec![RegionEpoch(2)]);
}
