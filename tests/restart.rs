//! The restart strategy: a task failure mid-run restarts the job from its
//! last checkpoint after the configured delay; when the fault goes away the
//! job completes with exactly-once output. Exhausted attempts fail the job.

mod common;

use std::time::Duration;

use common::*;

fn spec(attempts: u32) -> String {
    format!(
        r#"
apiVersion: ferry.dev/v1
kind: Job
metadata: {{name: restart-test}}
spec:
  parallelism: 2
  checkpointing: {{interval: 100ms}}
  restartStrategy: {{type: fixed-attempts, attempts: {attempts}, delay: 200ms}}
  source:
    generator:
      total: 100000
      rate: 40000
      eventTime: {{step: 10ms}}
      fields:
        user: {{type: key, cardinality: 10, prefix: "u"}}
  operators:
    - key_by: user
    - window: {{tumbling: 1m, aggregate: {{clicks: count}}}}
  sink:
    file: {{path: ./out}}
"#
    )
}

#[test]
fn a_failed_task_restarts_from_the_last_checkpoint() {
    let w = Workdir::new(&spec(20));
    let out = w.path().join("out");
    let parked = w.path().join("out.parked");
    let mut child = w.spawn_local(&[], "run.log");
    wait_until(Duration::from_secs(60), "committed output", || {
        read_rows(&out).len() > 5
    });
    // Fault: the output directory turns into a file, so commits fail.
    std::fs::rename(&out, &parked).unwrap();
    std::fs::write(&out, b"not a directory").unwrap();
    wait_until(Duration::from_secs(60), "a restart", || {
        w.log("run.log").contains("to=RESTARTING")
    });
    // The fault goes away.
    std::fs::remove_file(&out).unwrap();
    std::fs::rename(&parked, &out).unwrap();
    let code = wait_exit(&mut child, Duration::from_secs(120));
    let log = w.log("run.log");
    assert_eq!(code, 0, "{log}");
    assert!(log.contains("restored from checkpoint"), "{log}");
    let restarts: u32 = log
        .lines()
        .find_map(|l| l.trim().strip_prefix("restarts:"))
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0);
    assert!(restarts >= 1, "{log}");

    let want = expected_counts(&generator(&w.spec), 100_000, 0, 60_000);
    assert_eq!(count_rows(&w.output_rows("out"), "user", "clicks"), want);
}

#[test]
fn exhausted_attempts_fail_the_job_with_the_cause() {
    let w = Workdir::new(&spec(2));
    std::fs::write(w.path().join("out"), b"not a directory").unwrap();
    let code = w.run_local(&[], "run.log", Duration::from_secs(60));
    let log = w.log("run.log");
    assert_eq!(code, 1, "{log}");
    assert!(log.contains("FAILED"), "{log}");
    assert!(
        log.contains("gave up after 2 restart attempts"),
        "failure does not say why:\n{log}"
    );
    assert!(
        log.contains("out"),
        "failure does not name the path:\n{log}"
    );
}
