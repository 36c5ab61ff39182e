//! "Never two primaries, nothing duplicated" under the faults that broke it:
//! a primary whose only JobManager is frozen (SIGSTOP) past the region
//! timeout, a primary that reaches only a minority of the global cluster,
//! a JobManager whose wall clock is off by 10 s, a switchover while the
//! global KV has no stream leader, a drill on three regions, and a finished
//! job through three failovers. Real processes throughout; every job test
//! checks the committed output against the generator model.

mod common;

use std::time::{Duration, Instant};

use common::ha::*;
use common::*;
use ferry_testkit::{NatsCluster, NatsServer};
use serde_json::Value;

/// `regions.timeout` of the fixture's regions.
const TIMEOUT: Duration = Duration::from_secs(2);

/// The region `r`'s first JobManager names as primary, if it answers.
async fn primary_of(r: &Region) -> Option<String> {
    r.get(&r.jms[0], "/v1/regions")
        .await
        .and_then(|v| v["primary"].as_str().map(str::to_string))
}

/// Checkpoint manifests of `job` in `r`'s store never go back in region
/// epoch as their numbers grow: no older lineage committed after a newer
/// one.
fn assert_region_epochs_monotonic(r: &Region, job: &str) {
    let mut last = 0;
    for m in manifests(&r.storage(), job) {
        let e = m["region_epoch"].as_u64().unwrap();
        assert!(
            e >= last,
            "checkpoint {} of region epoch {e} after one of epoch {last}",
            m["checkpoint_id"]
        );
        last = e;
    }
}

/// The primary's only JobManager freezes (SIGSTOP) for longer than the
/// region timeout while its job runs. Its TaskManager stops the job's tasks
/// on its own before a standby takes over; the woken JobManager commits
/// nothing and stands by. Later the lease comes back to that region by an
/// unplanned failover: it restores from its newest checkpoint instead of
/// adopting the stale tasks, and the output is exact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_primary_never_commits_again_and_its_tasks_stop_before_the_takeover() {
    let nats = NatsServer::start();
    let global = NatsCluster::start(3);
    let mut rs = regions(&nats.url(), &global, &["east", "west", "south"]);
    rs[0].rate = 25_000;
    start_regions(&mut rs).await;
    let [east, west, south] = &mut rs[..] else {
        unreachable!()
    };
    wait_lease(east).await;
    let job = east.running_job(0).await;
    wait_replicated(east, 0, &job).await;

    east.jms[0].signal(libc::SIGSTOP);
    let frozen = Instant::now();
    let mut tasks_stopped = None;
    let (winner, promoted) = 'promotion: loop {
        if tasks_stopped.is_none() && east.tm_metric(0, "tasks_running").await == Some(0) {
            tasks_stopped = Some(frozen.elapsed());
        }
        for r in [&*west, &*south] {
            if primary_of(r).await.as_deref() == Some(r.name.as_str()) {
                break 'promotion (r.name.clone(), frozen.elapsed());
            }
        }
        assert!(
            frozen.elapsed() < Duration::from_secs(30),
            "no standby took over"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    };
    // Still frozen: its TaskManager runs none of the job's tasks within
    // the region timeout of the promotion (in fact before it).
    let stopped = loop {
        if let Some(t) = tasks_stopped {
            break t;
        }
        if east.tm_metric(0, "tasks_running").await == Some(0) {
            break frozen.elapsed();
        }
        assert!(
            frozen.elapsed() < promoted + TIMEOUT,
            "east's TaskManager still runs tasks {:?} after {winner}'s promotion",
            frozen.elapsed() - promoted
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    };
    eprintln!(
        "east's tasks stopped {stopped:?} after the freeze; {winner} promoted after {promoted:?}"
    );
    assert!(stopped <= promoted + TIMEOUT);
    assert!(east.tm_metric(0, "fenced_stops").await >= Some(1));
    // The freeze goes on well past the timeout, then ends.
    let until = frozen + Duration::from_secs(8);
    tokio::time::sleep_until(until.into()).await;
    east.jms[0].signal(libc::SIGCONT);
    wait_primary(east, 0, &winner, Duration::from_secs(20)).await;

    // The lease comes back to east by an unplanned failover: the winner
    // dies, and the other standby's JobManager too, so only east is left.
    let (dead, other) = if winner == "west" {
        (&mut *west, &mut *south)
    } else {
        (&mut *south, &mut *west)
    };
    dead.jms[0].signal(libc::SIGKILL);
    dead.tms[0].signal(libc::SIGKILL);
    other.jms[0].signal(libc::SIGKILL);
    wait_primary(east, 0, "east", Duration::from_secs(30)).await;
    east.wait_finished(0, &job, dead, "jm-east").await;
    east.check_output();
    let log = east.log("jm-east");
    assert!(
        !log.contains("adopted the job's running tasks"),
        "east adopted tasks of an older region epoch:\n{log}"
    );
    assert_region_epochs_monotonic(east, &job);
}

/// The global cluster splits: the primary's processes reach only node 0,
/// which loses its routes to the other two; the standby reaches those two.
/// Node 0 still answers reads (stale), but no compare-and-set: the primary
/// stops committing and running tasks within half the region timeout of
/// the split, before the standby takes over, and the output is exact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_primary_on_the_minority_side_of_the_global_cluster_stops_before_the_takeover() {
    let nats = NatsServer::start();
    let (global, routes_to_node0) = NatsCluster::start_partitionable(3).await;
    let mut rs = regions(&nats.url(), &global, &["east", "west"]);
    rs[0].rate = 25_000;
    rs[0]
        .env
        .push(("FERRY_REGIONS_GLOBAL_URLS", global.nodes[0].url()));
    rs[1].env.push((
        "FERRY_REGIONS_GLOBAL_URLS",
        format!("{},{}", global.nodes[1].url(), global.nodes[2].url()),
    ));
    start_regions(&mut rs).await;
    let [east, west] = &mut rs[..] else {
        unreachable!()
    };
    let epoch = wait_lease(east).await;
    let job = east.running_job(0).await;
    wait_replicated(east, 0, &job).await;

    routes_to_node0.cut();
    let split = Instant::now();
    let mut stopped = None;
    let promoted = loop {
        if stopped.is_none() && east.tm_metric(0, "tasks_running").await == Some(0) {
            stopped = Some((split.elapsed(), chrono::Utc::now()));
        }
        if primary_of(west).await.as_deref() == Some("west") {
            break (split.elapsed(), chrono::Utc::now());
        }
        assert!(
            split.elapsed() < Duration::from_secs(60),
            "west did not take over"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    };
    let (stopped_after, _) = stopped.expect("east stopped its tasks before west took over");
    eprintln!(
        "east stopped {stopped_after:?} after the split; west promoted {:?} after it",
        promoted.0
    );
    // Half the timeout after its last renewal (one health-check interval
    // before the split at most), plus the fence check and this poll.
    assert!(
        stopped_after < TIMEOUT / 2 + Duration::from_millis(700),
        "{stopped_after:?}"
    );
    assert!(stopped_after < promoted.0);
    // No checkpoint of east's region epoch completed after the promotion.
    assert_no_checkpoint_of_epoch_after(&east.storage(), &job, epoch, promoted.1);
    assert!(
        east.log("jm-east")
            .contains("cannot renew the region lease")
    );
    // While cut off, east's own view says so (reads still answer).
    let v = east.get(&east.jms[0], "/v1/regions").await.unwrap();
    assert_eq!(v["global_reachable"], false, "{v}");
    west.wait_finished(0, &job, east, "jm-west").await;
    east.check_output();
    assert_region_epochs_monotonic(west, &job);
}

/// Where libfaketime's preload library is (scripts/test.sh puts it into
/// the test venv; `FERRY_LIBFAKETIME` overrides).
fn libfaketime() -> String {
    if let Ok(p) = std::env::var("FERRY_LIBFAKETIME") {
        return p;
    }
    let venv = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join(".venv/lib/faketime/libfaketimeMT.so.1");
    assert!(
        venv.exists(),
        "libfaketime not found: run scripts/test.sh (it extracts Debian's libfaketime into .venv/lib/faketime) or set FERRY_LIBFAKETIME"
    );
    venv.display().to_string()
}

/// A standby JobManager whose wall clock runs 10 s ahead (monotonic clock
/// untouched) does not take over a healthy primary; one whose clock runs
/// 10 s behind takes over a dead primary as fast as the region timeout
/// says, not 10 s later.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_jobmanager_with_a_skewed_clock_neither_fails_over_nor_delays_a_failover() {
    let lib = libfaketime();
    let nats = NatsServer::start();
    let global = NatsCluster::start(3);
    let mut rs = regions(&nats.url(), &global, &["east", "west"]);
    let skew = |offset: &str| {
        vec![
            ("LD_PRELOAD", lib.clone()),
            ("FAKETIME", offset.to_string()),
            ("FAKETIME_DONT_FAKE_MONOTONIC", "1".to_string()),
        ]
    };
    rs[1].env.extend(skew("+10s"));
    start_regions(&mut rs).await;
    let [east, west] = &mut rs[..] else {
        unreachable!()
    };
    let epoch = wait_lease(east).await;
    wait_primary(west, 0, "east", Duration::from_secs(20)).await;
    // The skew is real: west logs 10 s ahead.
    let line = west
        .log("jm-west")
        .lines()
        .find(|l| l.contains("jobmanager started"))
        .map(str::to_string)
        .unwrap_or_default();
    let at = line.split_whitespace().next().unwrap_or_default();
    let ahead = chrono::DateTime::parse_from_rfc3339(at)
        .map(|t| t.with_timezone(&chrono::Utc) - chrono::Utc::now())
        .unwrap_or_default();
    assert!(ahead > chrono::Duration::seconds(5), "{line}");
    // Three region timeouts with a healthy primary: nothing happens.
    tokio::time::sleep(TIMEOUT * 3).await;
    let v = west.get(&west.jms[0], "/v1/regions").await.unwrap();
    assert_eq!(v["primary"], "east", "{v}");
    assert_eq!(v["epoch"], epoch, "{v}");
    assert!(
        !west
            .log("jm-west")
            .contains("this region is the primary now")
    );

    // West's JobManager again, 10 s behind; east dies.
    west.jms[0].signal(libc::SIGKILL);
    west.jms.clear();
    west.env.retain(|(k, _)| *k != "FAKETIME");
    west.env.extend(skew("-10s"));
    west.start("jm-west", None);
    west.leader(&[], Duration::from_secs(20)).await;
    wait_primary(west, 0, "east", Duration::from_secs(20)).await;
    east.jms[0].signal(libc::SIGKILL);
    east.tms[0].signal(libc::SIGKILL);
    let killed = Instant::now();
    wait_primary(west, 0, "west", Duration::from_secs(30)).await;
    let took = killed.elapsed();
    eprintln!("west (10 s behind) took over {took:?} after east died");
    // The timeout plus a few health-check intervals; a clock-based
    // judgement would add the 10 s skew.
    assert!(took < TIMEOUT + Duration::from_secs(3), "{took:?}");
}

/// The node leading the global KV's lease stream dies just as a planned
/// switchover starts: the lease cannot move for the ~7 s a new stream
/// leader takes. The switchover retries (or rolls back) and the job ends
/// up running in exactly one region, never two, and its output is exact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_switchover_without_a_global_stream_leader_leaves_the_job_in_exactly_one_region() {
    let nats = NatsServer::start();
    let mut global = NatsCluster::start(3);
    let mut rs = regions(&nats.url(), &global, &["east", "west"]);
    rs[0].rate = 20_000;
    start_regions(&mut rs).await;
    let [east, west] = &mut rs[..] else {
        unreachable!()
    };
    wait_lease(east).await;
    let job = east.running_job(0).await;
    wait_replicated(east, 0, &job).await;
    // Kill the lease stream's leader.
    let addrs: Vec<async_nats::ServerAddr> = global
        .nodes
        .iter()
        .map(|n| n.url().parse().unwrap())
        .collect();
    let client = async_nats::connect(addrs).await.unwrap();
    let js = async_nats::jetstream::new(client);
    let mut stream = js.get_stream("KV_ferry-global-lease").await.unwrap();
    let leader = stream
        .info()
        .await
        .unwrap()
        .cluster
        .as_ref()
        .and_then(|c| c.leader.clone())
        .expect("the lease stream has a leader");
    let node: usize = leader.trim_start_matches('n').parse().unwrap();
    global.nodes[node].kill();
    let started = Instant::now();
    let cli = {
        let url = east.jms[0].url();
        tokio::task::spawn_blocking(move || {
            std::process::Command::new(ferry_bin())
                .args(["region", "failover", "--to", "west", "--url", &url])
                .output_within(common::COMMAND_LIMIT)
                .unwrap()
        })
    };
    // Until the job finishes, its tasks never run in both regions at once
    // (each region's TaskManager says what runs there; a standby's job
    // list only mirrors the primary's status).
    let mut cli = Some(cli);
    let mut answer = None;
    let finished_in = loop {
        let (e, w) = (
            east.tm_metric(0, "tasks_running").await.unwrap_or(0),
            west.tm_metric(0, "tasks_running").await.unwrap_or(0),
        );
        assert!(
            e == 0 || w == 0,
            "the job's tasks run in both regions: {e} in east, {w} in west"
        );
        let path = format!("/v1/jobs/{job}");
        let mut finished = None;
        for r in [&*east, &*west] {
            if r.get(&r.jms[0], &path).await.is_some_and(|v| {
                v["state"] == "FINISHED" && v["taskmanager"] == format!("tm-{}", r.name)
            }) {
                finished = Some(r.name.clone());
            }
        }
        if let Some(f) = finished {
            break f;
        }
        if cli.as_ref().is_some_and(|c| c.is_finished()) {
            answer = Some((cli.take().unwrap().await.unwrap(), started.elapsed()));
        }
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "the job did not finish (tasks running: {e} in east, {w} in west)"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let (answer, answered) = match answer {
        Some(a) => a,
        None => (cli.unwrap().await.unwrap(), started.elapsed()),
    };
    let stderr = String::from_utf8_lossy(&answer.stderr);
    eprintln!(
        "switchover answered after {answered:?}: {}{stderr}; the job finished in {finished_in}",
        String::from_utf8_lossy(&answer.stdout)
    );
    if !answer.status.success() {
        // A failed switchover says where the jobs are.
        assert!(
            stderr.contains("every job"),
            "the error must say what state the jobs are in: {stderr}"
        );
    }
    east.check_output();
}

/// A region-outage drill names its target among three regions: the other
/// standby stands aside (it would win the ranking: ties go to the smaller
/// name), the target takes over, and the drill reports it, with an RPO
/// that matches the checkpoints involved; the report is kept there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drill_among_three_regions_promotes_its_target_and_measures_the_rpo_there() {
    let nats = NatsServer::start();
    let global = NatsCluster::start(3);
    let mut rs = regions(&nats.url(), &global, &["eu", "ap", "us"]);
    rs[0].rate = 20_000;
    start_regions(&mut rs).await;
    let [eu, ap, us] = &mut rs[..] else {
        unreachable!()
    };
    wait_lease(eu).await;
    let job = eu.running_job(0).await;
    wait_replicated(eu, 0, &job).await;
    wait_healthy(eu, 0, "us", Duration::from_secs(20)).await;
    let (ok, report, stderr) = ferry_json(&[
        "drill",
        "run",
        "--scenario",
        "region-outage",
        "--target",
        "us",
        "--rto",
        "60s",
        "--rpo",
        "60s",
        "--timeout",
        "60s",
        "-o",
        "json",
        "--url",
        &eu.jms[0].url(),
    ]);
    assert!(ok, "{report}\n{stderr}");
    assert_eq!(report["to"], "us", "{report}");
    assert_eq!(report["passed"], true, "{report}");
    assert_eq!(primary_of(us).await.as_deref(), Some("us"));
    assert_eq!(primary_of(ap).await.as_deref(), Some("us"));
    // Ap (first by name: it wins ties) never claimed the lease.
    assert!(
        !ap.log("jm-ap").contains("this region is the primary now"),
        "{}",
        ap.log("jm-ap")
    );
    // The RPO is what eu committed beyond the checkpoint us restored, as
    // both checkpoints' manifests say.
    let j = &report["jobs"][0];
    let before = j["primary_last_checkpoint"]["id"].as_u64().unwrap();
    let restored = j["restored_checkpoint"]["id"].as_u64().unwrap();
    let records = |r: &Region, n: u64| {
        manifests(&r.storage(), &job)
            .into_iter()
            .find(|m| m["checkpoint_id"] == n)
            .map(|m| m["records_in"].as_u64().unwrap())
            .unwrap_or_else(|| panic!("checkpoint {n} in {}", r.name))
    };
    assert_eq!(
        report["rpo_records"].as_u64().unwrap(),
        records(eu, before) - records(us, restored),
        "{report}"
    );
    // Kept where the jobs went.
    let drills = us.get(&us.jms[0], "/v1/drills").await.unwrap();
    assert!(
        drills["drills"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|d| d["id"] == report["id"]),
        "{drills}"
    );
    us.wait_finished(0, &job, eu, "jm-us").await;
    eu.check_output();
}

/// A bounded job finishes in the primary; through three unplanned
/// failovers it stays FINISHED everywhere with its attempt unchanged, and
/// no promotion deploys it again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_finished_job_stays_finished_through_three_failovers() {
    let nats = NatsServer::start();
    let global = NatsCluster::start(3);
    let mut rs = regions(&nats.url(), &global, &["east", "west"]);
    start_regions(&mut rs).await;
    let [east, west] = &mut rs[..] else {
        unreachable!()
    };
    wait_lease(east).await;
    let job = east.running_job(0).await;
    let done = east.finished(0, &job, Duration::from_secs(60)).await;
    let attempt = done["attempt"].clone();
    // The standby lists it finished too (its status was replicated).
    west.wait_job(
        &west.jms[0],
        &job,
        Duration::from_secs(20),
        "the standby to list the job FINISHED",
        |v| v["state"] == "FINISHED",
    )
    .await;
    let mut from = (&mut *east, "east");
    let mut to = (&mut *west, "west");
    for round in 1..=3 {
        // The primary region dies; the other takes over.
        let old = &mut from.0;
        old.jms.last().unwrap().signal(libc::SIGKILL);
        old.tms.last().unwrap().signal(libc::SIGKILL);
        let new = &mut to.0;
        let jm = new.jms.len() - 1;
        wait_primary(new, jm, to.1, Duration::from_secs(30)).await;
        // It lists the job FINISHED with the same attempt, and never
        // deploys it: its TaskManager started nothing.
        let start = Instant::now();
        while start.elapsed() < TIMEOUT * 2 {
            let v = new
                .get(&new.jms[jm], &format!("/v1/jobs/{job}"))
                .await
                .unwrap();
            assert_eq!(v["state"], "FINISHED", "round {round}: {v}");
            assert_eq!(v["attempt"], attempt, "round {round}: {v}");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let tm = new.tms.len() - 1;
        assert_eq!(
            new.tm_metric(tm, "deployments_started").await,
            Some(0),
            "round {round}"
        );
        // The dead region comes back as a standby.
        let old = &mut from.0;
        let n = old.jms.len();
        old.start(&format!("jm-{}-{n}", from.1), None);
        old.start_tm(&format!("tm-{}-{n}", from.1));
        old.leader(&(0..n).collect::<Vec<_>>(), Duration::from_secs(20))
            .await;
        wait_primary(old, n, to.1, Duration::from_secs(20)).await;
        std::mem::swap(&mut from, &mut to);
    }
    east.check_output();
}

/// The standby holds the primary's newest checkpoints only partly — their
/// files but not their manifests, as when the primary dies mid-copy — so
/// the failover restores an older checkpoint than the primary had
/// committed, and the primary's part files beyond it are in the shared
/// output directory. The promoted standby commits none of their rows
/// again: the output is exact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failover_behind_committed_output_does_not_repeat_it() {
    let nats = NatsServer::start();
    let global = NatsCluster::start(3);
    let mut rs = regions(&nats.url(), &global, &["east", "west"]);
    rs[0].rate = 20_000;
    // 5 s windows: nearly every checkpoint commits output.
    rs[0].window_ms = 5_000;
    start_regions(&mut rs).await;
    let [east, west] = &mut rs[..] else {
        unreachable!()
    };
    wait_lease(east).await;
    let job = east.running_job(0).await;
    let start = Instant::now();
    while manifests(&west.storage(), &job).len() < 3 {
        assert!(start.elapsed() < Duration::from_secs(30), "not replicated");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    east.jms[0].signal(libc::SIGKILL);
    east.tms[0].signal(libc::SIGKILL);
    // West got the files of its two newest checkpoints but not their
    // manifests.
    let copies = manifests(&west.storage(), &job);
    let (older, lost) = copies.split_at(copies.len() - 2);
    for m in lost {
        let n = m["checkpoint_id"].as_u64().unwrap();
        let dir = west.storage().join(format!("jobs/{job}/checkpoints/{n}"));
        std::fs::remove_file(dir.join("MANIFEST.json")).unwrap();
    }
    let restore_point = older.last().unwrap()["checkpoint_id"].as_u64().unwrap();
    // East had committed output beyond that point.
    let beyond: Vec<String> = std::fs::read_dir(east.out())
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().to_string())
        .filter(|n| {
            n.strip_suffix(".jsonl")
                .and_then(|n| n.rsplit('-').next())
                .and_then(|cp| cp.parse::<u64>().ok())
                .is_some_and(|cp| cp > restore_point)
        })
        .collect();
    assert!(
        !beyond.is_empty(),
        "east committed nothing beyond checkpoint {restore_point}: the scenario did not happen"
    );
    wait_primary(west, 0, "west", Duration::from_secs(30)).await;
    west.wait_finished(0, &job, east, "jm-west").await;
    east.check_output();
    let log = west.log("jm-west") + &west.log("tm-west");
    assert!(
        log.contains("no MANIFEST.json"),
        "west restored an older checkpoint:\n{log}"
    );
    assert!(log.contains("are held back"), "{log}");
}

/// One round of "east goes on alone, dies, west takes over, east comes
/// back and the jobs fail back": east commits three checkpoints west never
/// receives (its replication link cut), then dies; west takes over; east
/// returns as a standby and the jobs fail back. Returns the fail-back's
/// answer and the checkpoints east completed beyond the point west
/// restored from (the divergence it must report), under east's epoch.
async fn diverge_and_fail_back(
    east: &mut Region,
    west: &Region,
    link: &ferry_testkit::FaultProxy,
    job: &str,
    round: usize,
) -> (Value, Vec<u64>) {
    let jm = east.jms.len() - 1;
    let epoch = wait_primary(east, jm, "east", Duration::from_secs(30)).await["epoch"]
        .as_u64()
        .unwrap();
    east.wait_job(
        &east.jms[jm],
        job,
        Duration::from_secs(30),
        "the job running in east",
        has_checkpoint,
    )
    .await;
    link.cut();
    let cut_at = east
        .get(&east.jms[jm], &format!("/v1/jobs/{job}"))
        .await
        .unwrap()["last_checkpoint"]["id"]
        .as_u64()
        .unwrap();
    east.wait_job(
        &east.jms[jm],
        job,
        Duration::from_secs(30),
        "3 unreplicated checkpoints",
        |v| v["last_checkpoint"]["id"].as_u64() >= Some(cut_at + 3),
    )
    .await;
    east.jms[jm].signal(libc::SIGKILL);
    east.tms[jm].signal(libc::SIGKILL);
    let _ = east.jms[jm].child.wait();
    let _ = east.tms[jm].child.wait();
    let east_own = manifests(&east.storage(), job);
    wait_primary(west, 0, "west", Duration::from_secs(30)).await;
    west.wait_job(
        &west.jms[0],
        job,
        Duration::from_secs(30),
        "the job running in west",
        has_checkpoint,
    )
    .await;
    link.heal();
    east.start(&format!("jm-east-{round}"), None);
    east.start_tm(&format!("tm-east-{round}"));
    wait_healthy(west, 0, "east", Duration::from_secs(30)).await;
    let url = east.jms[jm + 1].url();
    let (ok, fb, stderr) = ferry_json(&["region", "failback", "-o", "json", "--url", &url]);
    assert!(ok, "round {round}: fail-back failed: {fb}\n{stderr}");
    let base = fb["divergence"]["jobs"][0]["base"]["checkpoint"]
        .as_u64()
        .unwrap_or_else(|| panic!("round {round}: no base: {fb}"));
    let expected = east_own
        .iter()
        .filter(|m| m["region_epoch"].as_u64() == Some(epoch))
        .filter_map(|m| m["checkpoint_id"].as_u64())
        .filter(|n| *n > base)
        .collect();
    (fb, expected)
}

/// Two failovers away from east, each followed by a fail-back: the second
/// fail-back reports what east committed beyond the second failover only,
/// not again what the first failover's archive holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_fail_back_reports_only_the_latest_failovers_divergence() {
    let Some(s3) = common::s3::S3Server::start() else {
        return;
    };
    s3.create_bucket("west").await;
    let link = ferry_testkit::FaultProxy::start(s3.port).await;
    let nats = NatsServer::start();
    let global = NatsCluster::start(3);
    let mut rs = regions(&nats.url(), &global, &["east", "west"]);
    rs[0].rate = 10_000;
    let [east, west] = &mut rs[..] else {
        unreachable!()
    };
    west_store_on_s3(east, west, &s3, &link);
    start_regions(&mut rs).await;
    let [east, west] = &mut rs[..] else {
        unreachable!()
    };
    wait_lease(east).await;
    let job = east.running_job(0).await;
    wait_replicated(east, 0, &job).await;
    let mut reported = Vec::new();
    for round in 1..=2 {
        let (fb, expected) = diverge_and_fail_back(east, west, &link, &job, round).await;
        let got: Vec<u64> = fb["divergence"]["jobs"][0]["checkpoints"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c.as_u64().unwrap())
            .collect();
        assert_eq!(got, expected, "round {round}: {fb}");
        assert!(
            got.iter().all(|n| !reported.contains(n)),
            "round {round} reports checkpoints of an earlier failover again: {got:?} (before: {reported:?})"
        );
        reported.extend(got);
    }
    // Both rounds' snapshots stay archived as evidence.
    let archived = std::fs::read_dir(east.storage().join("jobs").join(&job).join("diverged"))
        .unwrap()
        .count();
    assert_eq!(archived, reported.len());
    let jm = east.jms.len() - 1;
    let id = east.jms[jm].id.clone();
    east.wait_finished(jm, &job, west, &id).await;
    east.check_output();
}
