//! The coordination layer against a real `nats-server` with JetStream:
//! compare-and-set semantics, leader handover on release and on crash, a
//! leader cut off from NATS stepping down before anyone else can lead, and
//! membership.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use ferry_ha::nats::NatsKv;
use ferry_ha::{
    Coordination, Elector, ElectorConfig, Epoch, HaError, Member, Membership, MembershipConfig,
    Role,
};
use ferry_testkit::{FaultProxy, NatsServer, free_port};
use tokio_util::sync::CancellationToken;

async fn kv(url: &str, bucket: &str, max_age: Duration) -> Arc<dyn Coordination> {
    Arc::new(
        NatsKv::connect(&[url.to_string()], bucket, max_age, 1, &Default::default())
            .await
            .expect("connect"),
    )
}

fn cfg(holder: &str, ttl_ms: u64) -> ElectorConfig {
    ElectorConfig {
        key: "leader".into(),
        holder: holder.into(),
        ttl: Duration::from_millis(ttl_ms),
        renew_interval: Duration::from_millis(ttl_ms / 6),
        renew_deadline: Duration::from_millis(ttl_ms * 5 / 8),
    }
}

async fn until_leader(e: &Elector, limit: Duration) -> Epoch {
    let mut rx = e.role();
    let r = tokio::time::timeout(limit, rx.wait_for(|r| matches!(r, Role::Leader { .. })))
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
async fn compare_and_set_on_a_real_server() {
    let nats = NatsServer::start();
    let kv = kv(&nats.url(), "cas", Duration::from_secs(10)).await;
    let r1 = kv.create("leader", Bytes::from("a")).await.unwrap();
    assert_eq!(
        kv.create("leader", Bytes::from("b")).await,
        Err(HaError::Exists("leader".into()))
    );
    let r2 = kv.update("leader", Bytes::from("c"), r1).await.unwrap();
    assert!(r2 > r1);
    assert!(matches!(
        kv.update("leader", Bytes::from("d"), r1).await,
        Err(HaError::WrongRevision(..))
    ));
    assert!(matches!(
        kv.delete("leader", Some(r1)).await,
        Err(HaError::WrongRevision(..))
    ));
    kv.delete("leader", Some(r2)).await.unwrap();
    assert_eq!(kv.get("leader").await.unwrap(), None);
    let r3 = kv.create("leader", Bytes::from("e")).await.unwrap();
    assert!(r3 > r2, "revisions keep growing across deletes");
    assert_eq!(
        kv.get("leader").await.unwrap().unwrap().value,
        Bytes::from("e")
    );
}

#[tokio::test]
async fn graceful_release_hands_over_without_waiting_for_the_ttl() {
    let nats = NatsServer::start();
    let store = kv(&nats.url(), "lease", Duration::from_secs(30)).await;
    let stop = CancellationToken::new();
    // A long ttl makes "did not wait for it" unambiguous.
    let a = Elector::spawn(store.clone(), cfg("a", 6000), "a".into(), stop.clone());
    let e1 = until_leader(&a, Duration::from_secs(10)).await;
    let b = Elector::spawn(store.clone(), cfg("b", 6000), "b".into(), stop.clone());
    tokio::time::timeout(
        Duration::from_secs(5),
        b.role()
            .wait_for(|r| matches!(r, Role::Standby { leader: Some(l) } if l.holder == "a")),
    )
    .await
    .unwrap()
    .unwrap();
    let t = Instant::now();
    a.resign().await;
    let e2 = until_leader(&b, Duration::from_secs(10)).await;
    assert!(e2 > e1);
    assert!(
        t.elapsed() < Duration::from_secs(3),
        "handover waited for the lease to expire ({:?})",
        t.elapsed()
    );
    stop.cancel();
}

#[tokio::test]
async fn a_crashed_leader_is_replaced_with_a_higher_epoch() {
    let nats = NatsServer::start();
    let store = kv(&nats.url(), "lease", Duration::from_secs(30)).await;
    let stop = CancellationToken::new();
    let a = Elector::spawn(store.clone(), cfg("a", 600), "a".into(), stop.clone());
    let e1 = until_leader(&a, Duration::from_secs(10)).await;
    let b = Elector::spawn(store.clone(), cfg("b", 600), "b".into(), stop.clone());
    a.abort();
    let e2 = until_leader(&b, Duration::from_secs(10)).await;
    assert!(e2 > e1);
    stop.cancel();
}

/// The leader loses NATS (its connection is black-holed). It must stop
/// acting (fence() = None) before the standby can lead, and at no sampled
/// moment may both hold a fence.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_cut_off_from_nats_steps_down_before_another_leads() {
    let nats = NatsServer::start();
    let proxy = FaultProxy::start(nats.port).await;
    let stop = CancellationToken::new();
    let via_proxy = kv(&proxy.url(), "lease", Duration::from_secs(30)).await;
    let direct = kv(&nats.url(), "lease", Duration::from_secs(30)).await;
    let a = Elector::spawn(via_proxy, cfg("a", 600), "a".into(), stop.clone());
    let e1 = until_leader(&a, Duration::from_secs(10)).await;
    let b = Elector::spawn(direct, cfg("b", 600), "b".into(), stop.clone());
    tokio::time::timeout(
        Duration::from_secs(5),
        b.role()
            .wait_for(|r| matches!(r, Role::Standby { leader: Some(_) })),
    )
    .await
    .unwrap()
    .unwrap();

    proxy.cut();
    let cut_at = Instant::now();
    let (mut a_stopped, mut b_started) = (None, None);
    while b_started.is_none() {
        assert!(
            cut_at.elapsed() < Duration::from_secs(10),
            "no takeover after the cut"
        );
        let (fa, fb) = (a.fence(), b.fence());
        assert!(!(fa.is_some() && fb.is_some()), "two leaders at once");
        if fa.is_none() && a_stopped.is_none() {
            a_stopped = Some(cut_at.elapsed());
        }
        if let Some(e) = fb {
            assert!(e > e1);
            b_started = Some(cut_at.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let (a_stopped, b_started) = (a_stopped.unwrap(), b_started.unwrap());
    assert!(
        a_stopped < b_started,
        "a stopped at {a_stopped:?}, b led at {b_started:?}"
    );
    eprintln!("cut: old leader stopped after {a_stopped:?}, new leader after {b_started:?}");

    // Healed, the old leader learns it lost: it stays a standby of b.
    proxy.heal();
    tokio::time::timeout(
        Duration::from_secs(15),
        a.role()
            .wait_for(|r| matches!(r, Role::Standby { leader: Some(l) } if l.holder == "b")),
    )
    .await
    .expect("old leader sees the new one after healing")
    .unwrap();
    assert!(a.fence().is_none());
    stop.cancel();
}

#[tokio::test]
async fn members_appear_and_leave() {
    let nats = NatsServer::start();
    let store = kv(&nats.url(), "members", Duration::from_secs(3)).await;
    let cfg = MembershipConfig {
        interval: Duration::from_millis(100),
        expiry: Duration::from_secs(3),
    };
    let member = |id: &str, role: &str| Member {
        id: id.into(),
        role: role.into(),
        region: "r1".into(),
        address: format!("127.0.0.1:{}", free_port()),
        slots: 2,
        started_at: chrono::Utc::now(),
        exchange: None,
    };
    let (s1, s2) = (CancellationToken::new(), CancellationToken::new());
    let (_, h1) = Membership::spawn(
        store.clone(),
        cfg.clone(),
        member("jm-1", "jobmanager"),
        s1.clone(),
    );
    let (_, h2) = Membership::spawn(
        store.clone(),
        cfg.clone(),
        member("tm-1", "taskmanager"),
        s2.clone(),
    );
    let start = Instant::now();
    loop {
        let m = Membership::list(store.as_ref(), cfg.expiry).await.unwrap();
        if m.len() == 2 {
            assert_eq!(m[0].member.id, "jm-1");
            assert!(m.iter().all(|v| v.heartbeat_age_ms < 3000));
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "members did not appear: {m:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    s2.cancel();
    h2.await.unwrap();
    let m = Membership::list(store.as_ref(), cfg.expiry).await.unwrap();
    assert_eq!(
        m.iter().map(|v| v.member.id.as_str()).collect::<Vec<_>>(),
        vec!["jm-1"]
    );
    s1.cancel();
    h1.await.unwrap();
}

/// Members heartbeat by rewriting their key (history 1: the old message is
/// deleted). A listing taken while keys are rewritten must still hold every
/// key: a missed key is a live TaskManager declared lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_listing_holds_every_key_while_keys_are_rewritten() {
    const KEYS: usize = 24;
    let nats = NatsServer::start();
    let writer = kv(&nats.url(), "members", Duration::from_secs(60)).await;
    let key = |i: usize| format!("members.k{i:02}");
    for i in 0..KEYS {
        writer
            .put(&key(i), Bytes::from_static(b"{}"))
            .await
            .unwrap();
    }
    let stop = CancellationToken::new();
    // Two writers rewrite every key as fast as they can (bounded in count).
    let writers: Vec<_> = (0..2)
        .map(|_| {
            let (w, s) = (writer.clone(), stop.clone());
            tokio::spawn(async move {
                let mut n = 0u64;
                while !s.is_cancelled() && n < 500_000 {
                    for i in 0..KEYS {
                        w.put(&key(i), Bytes::from_static(b"{}")).await.unwrap();
                        n += 1;
                    }
                }
                n
            })
        })
        .collect();
    // Three readers (own connections: a connection reuses its listing for
    // 250 ms) list for 6 s.
    let mut readers = Vec::new();
    for _ in 0..3 {
        let r = kv(&nats.url(), "members", Duration::from_secs(60)).await;
        readers.push(tokio::spawn(async move {
            let (mut lists, mut short) = (0u32, Vec::new());
            let start = Instant::now();
            while start.elapsed() < Duration::from_secs(6) {
                let l = r.list("members.").await.unwrap();
                lists += 1;
                if l.len() != KEYS {
                    short.push(l.len());
                }
                tokio::time::sleep(Duration::from_millis(260)).await;
            }
            (lists, short)
        }));
    }
    let (mut lists, mut short) = (0, Vec::new());
    for r in readers {
        let (l, s) = r.await.unwrap();
        lists += l;
        short.extend(s);
    }
    stop.cancel();
    let mut writes = 0;
    for w in writers {
        writes += w.await.unwrap();
    }
    assert!(writes > 1000, "the keys were rewritten ({writes} writes)");
    assert!(lists >= 30, "{lists} listings");
    assert!(
        short.is_empty(),
        "{} of {lists} listings missed keys (sizes {short:?}, {KEYS} keys, {writes} writes)",
        short.len()
    );
}
