//! The short chaos campaign CI runs: `ferry chaos --rounds 3 --seed 1`
//! against a whole two-region Ferry (3 JobManagers, 2 TaskManagers and a
//! 3-node NATS cluster per region, a 3-node global cluster, moto S3 behind
//! the store fault proxy). Seed 1's first rounds stop a standby
//! JobManager, kill a global NATS node while the store answers 503, cut
//! the leader from NATS, kill a standby, wipe the primary region's NATS
//! cluster and take the whole primary region down — each round audited
//! against the workload's model. The audit's checks themselves are
//! unit-tested with damaged output in `lab/src/chaos/audit.rs`.

mod common;

use std::process::Command;
use std::time::Duration;

use common::{OutputWithin, ferry_bin};

/// Bound on the whole campaign (it takes about a minute here).
const LIMIT: Duration = Duration::from_secs(900);

#[test]
fn three_seeded_rounds_of_faults_lose_and_duplicate_nothing() {
    let moto = match common::s3::moto_binary() {
        Ok(m) => m,
        Err(why) if std::env::var_os("FERRY_SKIP_S3").is_some_and(|v| v == "1") => {
            let bar = "!".repeat(72);
            eprintln!("\n{bar}\nCHAOS TEST SKIPPED (no moto_server): {why}\n{bar}\n");
            return;
        }
        Err(why) => {
            panic!("the chaos campaign needs moto_server: {why}\n(set FERRY_SKIP_S3=1 to skip it)")
        }
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

    let out = Command::new(ferry_bin())
        .args(["chaos", "--rounds", "3", "--seed", "1", "--json"])
        .env("FERRY_MOTO_SERVER", &moto)
        .output_within(LIMIT)
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(out.status.success(), "ferry chaos failed:\n{stderr}");
    let report: serde_json::Value =
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("not JSON ({e}):\n{stderr}"));
    assert_eq!(report["passed"], true, "{report}");
    let rounds = report["rounds"].as_array().unwrap();
    assert_eq!(rounds.len(), 3, "{report}");
    for r in rounds {
        assert_eq!(r["violations"], serde_json::json!([]), "{r}");
        assert!(!r["faults"].as_array().unwrap().is_empty(), "{r}");
    }
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
    // A passing campaign leaves nothing behind.
    assert!(report["dir"].is_null(), "{report}");
}
