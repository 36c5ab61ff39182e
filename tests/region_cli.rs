//! `ferry region replicate` and `ferry region verify` on the checkpoints of
//! a real `ferry local` run: the copy in the other store verifies and
//! decodes; a second pass copies nothing; a state file that keeps a valid
//! hash but does not decode, and a file whose bytes no longer match its
//! hash, are both reported and make `verify` exit 1.

mod common;

use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use common::*;
use serde_json::Value;

const SPEC: &str = r#"
apiVersion: ferry.dev/v1
kind: Job
metadata: {name: replicated-clicks}
spec:
  parallelism: 2
  checkpointing: {interval: 100ms, retained: 3}
  source:
    generator:
      partitions: 4
      total: 300000
      rate: 200000
      seed: 5
      eventTime: {step: 10ms, maxOutOfOrderness: 1s}
      fields:
        user: {type: key, cardinality: 40, prefix: "u"}
  operators:
    - key_by: user
    - window: {tumbling: 1m, aggregate: {clicks: count}}
  sink:
    file: {path: out}
"#;

fn region(args: &[&str]) -> Output {
    Command::new(ferry_bin())
        .arg("region")
        .args(args)
        .env("FERRY_LOG", "warn")
        .output_within(common::COMMAND_LIMIT)
        .expect("run ferry region")
}

fn url(p: &Path) -> String {
    format!("file://{}", p.display())
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[test]
fn replicated_checkpoints_verify_and_broken_copies_are_reported() {
    let w = Workdir::new(SPEC);
    assert_eq!(w.run_local(&[], "run.log", Duration::from_secs(60)), 0);
    let source = w.complete_checkpoints();
    assert!(source.len() >= 2, "need several checkpoints: {source:?}");
    let standby = w.path().join("standby");

    let o = region(&[
        "replicate",
        "--from",
        &url(&w.data_dir()),
        "--to",
        &url(&standby),
        "-o",
        "json",
    ]);
    assert!(o.status.success(), "{}", text(&o));
    let report: Value = serde_json::from_slice(&o.stdout).unwrap();
    let job = report[0]["job"].as_str().unwrap().to_string();
    let newest = *source.keys().next_back().unwrap();
    assert_eq!(report[0]["newest_checkpoint"], newest, "{report}");
    assert_eq!(
        report[0]["copied"].as_array().unwrap().len(),
        source.len(),
        "{report}"
    );
    assert_eq!(report[0]["spec_copied"], true);

    // Every copied file is byte-equal to its source.
    for (n, dir) in &source {
        let copy = standby
            .join("jobs")
            .join(&job)
            .join("checkpoints")
            .join(n.to_string());
        for f in std::fs::read_dir(dir).unwrap().flatten() {
            let a = std::fs::read(f.path()).unwrap();
            let b = std::fs::read(copy.join(f.file_name())).unwrap();
            assert_eq!(a, b, "{:?} differs in checkpoint {n}", f.file_name());
        }
    }

    // A second pass copies nothing.
    let o = region(&[
        "replicate",
        "--from",
        &url(&w.data_dir()),
        "--to",
        &url(&standby),
        "-o",
        "json",
    ]);
    assert!(o.status.success(), "{}", text(&o));
    let again: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(again[0]["copied"], serde_json::json!([]), "{again}");

    let o = region(&["verify", "--store", &url(&standby), "-o", "json"]);
    assert!(o.status.success(), "{}", text(&o));
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    let verdicts = v[0]["checkpoints"].as_array().unwrap();
    assert_eq!(verdicts.len(), source.len(), "{v}");
    assert!(
        verdicts
            .iter()
            .all(|c| c["ok"] == true && c["files"].as_u64().unwrap() > 0),
        "{v}"
    );

    // Newest copy: a window state replaced by bytes that are not window
    // state, with the manifest updated so every hash still matches — only
    // decoding finds it.
    let cps = standby.join("jobs").join(&job).join("checkpoints");
    let manifest_path = cps.join(newest.to_string()).join("MANIFEST.json");
    let mut m: Value =
        serde_json::from_str(&std::fs::read_to_string(&manifest_path).unwrap()).unwrap();
    let entry = m["files"]
        .as_array_mut()
        .unwrap()
        .iter_mut()
        .filter(|f| f["operator"] == "window")
        .max_by_key(|f| f["chain"].as_u64().unwrap_or(0))
        .expect("a window state file");
    let garbage = vec![0xFFu8; 64];
    std::fs::write(listed_file(&cps.join(newest.to_string()), entry), &garbage).unwrap();
    entry["size"] = garbage.len().into();
    entry["sha256"] = ferry_core::storage::sha256_hex(&garbage).into();
    std::fs::write(&manifest_path, serde_json::to_vec_pretty(&m).unwrap()).unwrap();
    // Oldest copy: one byte flipped, hash left alone.
    let oldest = *source.keys().next().unwrap();
    let victim = std::fs::read_dir(cps.join(oldest.to_string()))
        .unwrap()
        .flatten()
        .find(|f| f.file_name().to_string_lossy().ends_with(".state"))
        .unwrap()
        .path();
    let mut bytes = std::fs::read(&victim).unwrap();
    bytes[0] ^= 0x01;
    std::fs::write(&victim, bytes).unwrap();

    let o = region(&["verify", "--store", &url(&standby)]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    let out = text(&o);
    assert!(
        out.contains(&format!("checkpoint {newest}:")) && out.contains("does not restore"),
        "{out}"
    );
    assert!(
        out.contains(&format!("checkpoint {oldest}:")) && out.contains("SHA-256"),
        "{out}"
    );
}
