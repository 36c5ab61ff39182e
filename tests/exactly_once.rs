//! Exactly-once under crashes: a bounded job is SIGKILLed at random moments
//! and restarted each time; the committed output must equal the expected
//! result computed independently from the generator, with no window missing
//! and none duplicated.

mod common;

use std::time::Duration;

use common::*;
use rand::Rng;

const SPEC: &str = r#"
apiVersion: ferry.dev/v1
kind: Job
metadata: {name: crash-test}
spec:
  parallelism: 2
  checkpointing: {interval: 150ms, retained: 2}
  restartStrategy: {type: fixed-attempts, attempts: 3, delay: 100ms}
  source:
    generator:
      partitions: 4
      total: 240000
      rate: 60000
      seed: 3
      eventTime: {step: 10ms, maxOutOfOrderness: 1s}
      fields:
        user: {type: key, cardinality: 40, prefix: "u"}
  operators:
    - key_by: user
    - window: {tumbling: 1m, aggregate: {clicks: count}}
  sink:
    file: {path: ./out}
"#;

#[test]
fn output_is_exactly_once_across_repeated_sigkills() {
    let w = Workdir::new(SPEC);
    let mut rng = kill_schedule_rng();

    let mut kills = 0;
    let mut finished_early = false;
    while kills < 12 {
        let mut child = w.spawn_local(&[], "run.log");
        let delay = Duration::from_millis(rng.random_range(80..700));
        std::thread::sleep(delay);
        if child.try_wait().expect("try_wait").is_some() {
            // The job finished before this kill; that's fine, it still counts
            // towards the final check below.
            finished_early = true;
            break;
        }
        child.kill().expect("SIGKILL");
        child.wait().expect("reap");
        kills += 1;
        // Killed after its final checkpoint but before it exited: the job is
        // done (running it again would be a new run, with its own output).
        if w.newest_manifest()
            .is_some_and(|(_, m)| m["finished"] == true)
        {
            finished_early = true;
            break;
        }
    }
    if !finished_early {
        let code = w.run_local(&[], "run.log", Duration::from_secs(120));
        assert_eq!(code, 0, "final run failed:\n{}", w.log("run.log"));
    }
    assert!(
        kills >= 10 || finished_early,
        "only {kills} kills happened before the job finished"
    );
    let log = w.log("run.log");
    assert!(log.contains("resuming job"), "runs never resumed:\n{log}");

    // Expected: count per (user, minute) over every generated record.
    let expected = expected_counts(&generator(&w.spec), 240_000, 0, 60_000);
    let got = count_rows(&w.output_rows("out"), "user", "clicks");
    assert_eq!(stray_files(&w.path().join("out")), Vec::<String>::new());
    assert_eq!(
        got.len(),
        expected.len(),
        "window count differs (kills: {kills})"
    );
    assert_eq!(got, expected, "output differs from the expected result");
    eprintln!("{kills} SIGKILLs, {} windows, output exact", got.len());
}
