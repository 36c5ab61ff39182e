//! Restore behaviour: a corrupted newest checkpoint is skipped with a warning
//! and the previous one is used; a checkpoint without a manifest does not
//! exist; a checkpoint copied to another root restores unchanged.

mod common;

use std::collections::BTreeSet;
use std::path::Path;
use std::time::Duration;

use common::*;

fn spec(total: u64) -> String {
    format!(
        r#"
apiVersion: ferry.dev/v1
kind: Job
metadata: {{name: recovery-test}}
spec:
  parallelism: 1
  checkpointing: {{interval: 100ms, retained: 10}}
  source:
    generator:
      partitions: 2
      total: {total}
      rate: 40000
      eventTime: {{step: 10ms, maxOutOfOrderness: 1s}}
      fields:
        user: {{type: key, cardinality: 20, prefix: "u"}}
  operators:
    - key_by: user
    - window: {{tumbling: 1m, aggregate: {{clicks: count}}}}
  sink:
    file: {{path: ./out}}
"#
    )
}

const TOTAL: u64 = 120_000;

fn expected(w: &Workdir) -> Vec<(String, i64, i64)> {
    expected_counts(&generator(&w.spec), TOTAL, 0, 60_000)
}

/// Runs the job until at least `n` checkpoints are complete, then SIGKILLs it.
fn run_until_checkpoints(w: &Workdir, n: usize) {
    let mut child = w.spawn_local(&[], "first.log");
    wait_until(Duration::from_secs(60), "checkpoints", || {
        w.complete_checkpoints().len() >= n
    });
    child.kill().expect("SIGKILL");
    child.wait().expect("reap");
}

fn flip_bytes(path: &Path) {
    let mut data = std::fs::read(path).expect("read state");
    assert!(!data.is_empty());
    let mid = data.len() / 2;
    data[mid] ^= 0xff;
    data[0] ^= 0x55;
    std::fs::write(path, data).expect("write state");
}

#[test]
fn corrupted_newest_checkpoint_falls_back_to_the_previous_one() {
    let w = Workdir::new(&spec(TOTAL));
    run_until_checkpoints(&w, 3);
    let cps = w.complete_checkpoints();
    let (&newest, dir) = cps.iter().next_back().unwrap();
    let previous = *cps.keys().rev().nth(1).unwrap();
    flip_bytes(&dir.join("window-0.state"));

    let code = w.run_local(&[], "second.log", Duration::from_secs(120));
    let log = w.log("second.log");
    assert_eq!(code, 0, "{log}");
    assert!(
        log.contains(&format!("skipping checkpoint {newest}")) && log.contains("SHA-256"),
        "no corruption warning for checkpoint {newest}:\n{log}"
    );
    assert!(
        log.contains(&format!("from checkpoint {previous}")),
        "did not restore from checkpoint {previous}:\n{log}"
    );
    // Nothing is lost. (Windows committed by the skipped checkpoint may repeat.)
    let got: BTreeSet<_> = count_rows(&w.output_rows("out"), "user", "clicks")
        .into_iter()
        .collect();
    let want: BTreeSet<_> = expected(&w).into_iter().collect();
    assert_eq!(got, want);
}

#[test]
fn checkpoint_without_manifest_is_ignored() {
    let w = Workdir::new(&spec(TOTAL));
    run_until_checkpoints(&w, 3);
    let cps = w.complete_checkpoints();
    let (&newest, dir) = cps.iter().next_back().unwrap();
    let previous = *cps.keys().rev().nth(1).unwrap();
    std::fs::remove_file(dir.join("MANIFEST.json")).unwrap();

    let code = w.run_local(&[], "second.log", Duration::from_secs(120));
    let log = w.log("second.log");
    assert_eq!(code, 0, "{log}");
    assert!(
        log.contains(&format!("skipping checkpoint {newest}: no MANIFEST.json")),
        "{log}"
    );
    assert!(
        log.contains(&format!("from checkpoint {previous}")),
        "{log}"
    );
    let got = count_rows(&w.output_rows("out"), "user", "clicks");
    let want = expected(&w);
    // The manifest-less checkpoint never completed, so nothing was committed
    // from it: the output is exact.
    assert_eq!(got, want);
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

#[test]
fn checkpoint_copied_to_another_root_restores_unchanged() {
    let w = Workdir::new(&spec(TOTAL));
    run_until_checkpoints(&w, 2);
    let cps = w.complete_checkpoints();
    let (_, dir) = cps.iter().next_back().unwrap();
    let elsewhere = tempfile::tempdir().unwrap();
    let copy = elsewhere.path().join("moved/checkpoint");
    copy_dir(dir, &copy);
    // The original storage root disappears entirely.
    std::fs::remove_dir_all(w.data_dir()).unwrap();

    let other_data = elsewhere.path().join("data");
    let code = w.run_local(
        &[
            "--from-savepoint",
            copy.to_str().unwrap(),
            "--data-dir",
            other_data.to_str().unwrap(),
        ],
        "second.log",
        Duration::from_secs(120),
    );
    let log = w.log("second.log");
    assert_eq!(code, 0, "{log}");
    assert!(log.contains("restored from checkpoint"), "{log}");
    let got = count_rows(&w.output_rows("out"), "user", "clicks");
    assert_eq!(got, expected(&w), "relocated restore is not exactly-once");
}
