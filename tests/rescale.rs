//! Restoring at a different parallelism: window state is redistributed by
//! key hash, source offsets by partition, pending sink transactions by old
//! subtask; the output stays exactly-once.

mod common;

use std::time::Duration;

use common::*;

fn spec(parallelism: u32) -> String {
    format!(
        r#"
apiVersion: ferry.dev/v1
kind: Job
metadata: {{name: rescale-test}}
spec:
  parallelism: {parallelism}
  checkpointing: {{interval: 100ms}}
  source:
    generator:
      partitions: 6
      total: 150000
      rate: 50000
      eventTime: {{step: 10ms, maxOutOfOrderness: 1s}}
      fields:
        user: {{type: key, cardinality: 30, prefix: "u"}}
  operators:
    - key_by: user
    - window: {{tumbling: 1m, aggregate: {{clicks: count}}}}
  sink:
    file: {{path: ./out}}
"#
    )
}

#[test]
fn restores_exactly_once_at_other_parallelisms() {
    let w = Workdir::new(&spec(2));
    for (i, next) in [3u32, 1].into_iter().enumerate() {
        // Retention keeps only a few checkpoints: compare numbers, not counts.
        let newest = || {
            w.complete_checkpoints()
                .keys()
                .next_back()
                .copied()
                .unwrap_or(0)
        };
        let before = newest();
        let mut child = w.spawn_local(&[], "run.log");
        wait_until(Duration::from_secs(60), "two new checkpoints", || {
            newest() >= before + 2
        });
        child.kill().expect("SIGKILL");
        child.wait().expect("reap");
        // Every run after the first resumed the one before.
        assert_eq!(
            w.log("run.log")
                .matches("resuming job 'rescale-test'")
                .count(),
            i,
            "{}",
            w.log("run.log")
        );
        // The same job (same name) resumes with another parallelism.
        std::fs::write(&w.spec_path, spec(next)).unwrap();
    }
    let code = w.run_local(&[], "run.log", Duration::from_secs(120));
    let log = w.log("run.log");
    assert_eq!(code, 0, "{log}");
    assert_eq!(log.matches("resuming job").count(), 2, "{log}");

    let want = expected_counts(&generator(&w.spec), 150_000, 0, 60_000);
    assert_eq!(count_rows(&w.output_rows("out"), "user", "clicks"), want);
}
