//! The short chaos campaign CI runs: `ferry chaos --rounds 3 --seed 1`
//! against a whole two-region Ferry (3 JobManagers, 3 TaskManagers and a
//! 3-node NATS cluster per region, a 3-node global cluster, moto S3 behind
//! the store fault proxy). Seed 1's first rounds stop a standby
//! JobManager, kill a global NATS node while the store answers 503, cut
//! the leader from NATS, kill a standby, wipe the primary region's NATS
//! cluster and take the whole primary region down — each round audited
//! against the workload's model. A second, shorter campaign draws only
//! the faults of jobs spread over TaskManagers: a TaskManager drained under
//! load, then the exchange between the TaskManagers cut. The audit's checks
//! themselves are unit-tested with damaged output in
//! `lab/src/chaos/audit.rs`.

mod common;

use std::process::Command;
use std::sync::Mutex;
use std::time::Duration;

use common::{OutputWithin, ferry_bin};

/// Bound on the whole campaign (it takes about a minute here).
const LIMIT: Duration = Duration::from_secs(900);

/// One campaign at a time: each starts two whole regions.
static ONE_WORLD: Mutex<()> = Mutex::new(());

/// `moto_server`, or `None` when the test is to be skipped.
fn moto() -> Option<std::path::PathBuf> {
    match common::s3::moto_binary() {
        Ok(m) => Some(m),
        Err(why) if std::env::var_os("FERRY_SKIP_S3").is_some_and(|v| v == "1") => {
            let bar = "!".repeat(72);
            eprintln!("\n{bar}\nCHAOS TEST SKIPPED (no moto_server): {why}\n{bar}\n");
            None
        }
        Err(why) => {
            panic!("the chaos campaign needs moto_server: {why}\n(set FERRY_SKIP_S3=1 to skip it)")
        }
    }
}

/// Runs `ferry chaos ARGS --json` and returns its report, asserting that
/// it passed with no violation in any of its `rounds` rounds.
fn campaign(args: &[&str], rounds: usize, moto: &std::path::Path) -> serde_json::Value {
    let out = Command::new(ferry_bin())
        .arg("chaos")
        .args(args)
        .arg("--json")
        .env("FERRY_MOTO_SERVER", moto)
        .output_within(LIMIT)
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(out.status.success(), "ferry chaos failed:\n{stderr}");
    let report: serde_json::Value =
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("not JSON ({e}):\n{stderr}"));
    assert_eq!(report["passed"], true, "{report}");
    let got = report["rounds"].as_array().unwrap();
    assert_eq!(got.len(), rounds, "{report}");
    for r in got {
        assert_eq!(r["violations"], serde_json::json!([]), "{r}");
        assert!(!r["faults"].as_array().unwrap().is_empty(), "{r}");
    }
    // A passing campaign leaves nothing behind.
    assert!(report["dir"].is_null(), "{report}");
    report
}

#[test]
fn a_drain_and_a_cut_exchange_under_load_lose_and_duplicate_nothing() {
    let _one = ONE_WORLD.lock().unwrap_or_else(|p| p.into_inner());
    let Some(moto) = moto() else { return };
    let faults = "tm-tm-exchange-cut,tm-drain";
    let args = ["--rounds", "2", "--seed", "37", "--faults", faults];
    let dry = Command::new(ferry_bin())
        .args(["chaos", "--dry-run"])
        .args(args)
        .output_within(Duration::from_secs(60))
        .unwrap();
    let schedule = String::from_utf8_lossy(&dry.stdout).to_string();
    assert!(dry.status.success(), "{schedule}");
    let lines: Vec<&str> = schedule.lines().collect();
    assert!(
        lines.len() == 2
            && lines[0].contains("drain TaskManager 1 of the primary region")
            && lines[1].contains("cut TaskManager ↔ TaskManager exchange of the primary region"),
        "seed 37's schedule drifted:\n{schedule}"
    );
    let report = campaign(&args, 2, &moto);
    let rounds = report["rounds"].as_array().unwrap();
    // The drain moved the jobs of TaskManager 1 (one of them the job spread
    // over both), and the cut broke the spread job's channels: each round
    // deployed tasks anew, and the audit found the output exact.
    let drained = rounds[0]["faults"][0].as_str().unwrap();
    // "drain TaskManager 1 of the primary region: tm-east-1: N jobs to move, …"
    let moving: u32 = drained
        .split(": ")
        .nth(2)
        .filter(|rest| rest.contains(" jobs to move"))
        .and_then(|rest| rest.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no job count in {drained:?}"));
    assert!(
        moving >= 1,
        "the drained TaskManager ran nothing: {drained}"
    );
    for r in rounds {
        assert!(r["deployments"].as_u64().unwrap() > 0, "{r}");
    }
    assert!(report["windows_checked"].as_u64().unwrap() > 50, "{report}");
}

#[test]
fn three_seeded_rounds_of_faults_lose_and_duplicate_nothing() {
    let _one = ONE_WORLD.lock().unwrap_or_else(|p| p.into_inner());
    let moto = match moto() {
        Some(m) => m,
        None => return,
    };
    let dry = Command::new(ferry_bin())
        .args(["chaos", "--dry-run", "--rounds", "3", "--seed", "1"])
        .output_within(Duration::from_secs(60))
        .unwrap();
    let schedule = String::from_utf8_lossy(&dry.stdout).to_string();
    assert!(dry.status.success(), "{schedule}");
    // The faults this test is about (the seed's schedule must not drift).
    for fault in [
        "kill global NATS node 2",
        "S3 store: 503",
        "cut leader JM ↔ NATS of the primary region",
        "restart the primary region's NATS cluster with empty storage",
        "kill every JobManager and TaskManager of the primary region",
    ] {
        assert!(
            schedule.contains(fault),
            "{fault} missing from:\n{schedule}"
        );
    }

    let report = campaign(&["--rounds", "3", "--seed", "1"], 3, &moto);
    let rounds = report["rounds"].as_array().unwrap();
    // The audit looked at real output, not at nothing.
    assert!(report["produced"].as_u64().unwrap() > 1_000, "{report}");
    assert!(
        report["windows_checked"].as_u64().unwrap() > 100,
        "{report}"
    );
    assert!(
        report["generated_checked"].as_u64().unwrap() > 100,
        "{report}"
    );
    // Round 3 took the primary region down: the jobs run in a region
    // that is up (which one depends on timing, e.g. whether an earlier
    // round's faults already moved them).
    assert!(
        ["east", "west"].contains(&rounds[2]["primary"].as_str().unwrap()),
        "{report}"
    );
    assert!(rounds[2]["deployments"].as_u64().unwrap() > 0, "{report}");
    // Every fault kind injected appears in the summary.
    let kinds: Vec<&str> = report["by_kind"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["kind"].as_str().unwrap())
        .collect();
    assert!(kinds.contains(&"region outage"), "{kinds:?}");
    assert!(kinds.contains(&"coordination data loss"), "{kinds:?}");
}
