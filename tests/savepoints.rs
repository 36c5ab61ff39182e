//! Ctrl-C in `ferry local` takes a savepoint and exits 0; `--from-savepoint`
//! resumes from it and the output stays exactly-once.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::*;
use ferry_core::value::Value;

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

    let model = generator(&w.spec);
    let mut want: BTreeMap<(String, i64), i64> = BTreeMap::new();
    for i in 0..100_000 {
        let r = model.record_at(i);
        let (Value::Str(u), Value::Ts(t)) = (&r[0], &r[1]) else {
            panic!()
        };
        *want
            .entry((format!("\"{u}\""), t.div_euclid(60_000) * 60_000))
            .or_default() += 1;
    }
    let want: Vec<_> = want.into_iter().map(|((u, s), c)| (u, s, c)).collect();
    assert_eq!(count_rows(&w.output_rows("out"), "user", "clicks"), want);
}
