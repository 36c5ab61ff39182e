//! Ctrl-C in `ferry local` takes a savepoint and exits 0; `--from-savepoint`
//! resumes from it and the output stays exactly-once.

mod common;

use std::time::Duration;

use common::*;

const SPEC: &str = r#"
apiVersion: ferry.dev/v1
kind: Job
metadata: {name: savepoint-test}
spec:
  parallelism: 2
  checkpointing: {interval: 200ms}
  source:
    generator:
      total: 100000
      rate: 20000
      eventTime: {step: 10ms, maxOutOfOrderness: 500ms}
      fields:
        user: {type: key, cardinality: 10, prefix: "u"}
  operators:
    - key_by: user
    - window: {tumbling: 1m, aggregate: {clicks: count}}
  sink:
    file: {path: ./out}
"#;

#[test]
fn ctrl_c_takes_a_savepoint_and_resume_is_exact() {
    let w = Workdir::new(SPEC);
    let mut child = w.spawn_local(&[], "first.log");
    wait_until(Duration::from_secs(60), "a first checkpoint", || {
        !w.complete_checkpoints().is_empty()
    });
    // SAFETY: sending SIGINT to a child we started.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGINT) }, 0);
    let code = wait_exit(&mut child, Duration::from_secs(60));
    let log = w.log("first.log");
    assert_eq!(code, 0, "{log}");
    let path = log
        .lines()
        .find_map(|l| l.strip_prefix("savepoint written to "))
        .unwrap_or_else(|| panic!("no savepoint line:\n{log}"))
        .trim()
        .to_string();
    assert!(
        std::path::Path::new(&path).join("MANIFEST.json").exists(),
        "{path} has no manifest"
    );
    assert!(log.contains("--from-savepoint"), "no resume hint:\n{log}");

    let code = w.run_local(
        &["--from-savepoint", &path],
        "second.log",
        Duration::from_secs(120),
    );
    assert_eq!(code, 0, "{}", w.log("second.log"));

    let want = expected_counts(&generator(&w.spec), 100_000, 0, 60_000);
    assert_eq!(count_rows(&w.output_rows("out"), "user", "clicks"), want);
}
