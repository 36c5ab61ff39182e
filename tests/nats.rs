//! Jobs that read from and write to NATS JetStream, run by the real `ferry`
//! binary against a real `nats-server`: a bounded job's window counts equal
//! a count computed independently from the published input, and a NATS to
//! NATS job SIGKILLed again and again leaves every expected output message
//! in the sink stream exactly once.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use async_nats::jetstream;
use common::*;
use ferry_testkit::NatsServer;
use ferry_testkit::jetstream::{connect, create_stream, message_id, read_stream};
use rand::Rng;

/// Event time of input record 0 (2026-01-01T00:00:00Z).
const BASE_MS: i64 = 1_767_225_600_000;
/// Event-time step between input records.
const STEP_MS: i64 = 10;
const USERS: u64 = 40;
/// Subjects of the input stream, one partition each.
const PARTITIONS: u64 = 3;

/// Input record `i`: (subject, user, event time), a pure function of `i`.
fn record(i: u64) -> (String, String, i64) {
    let user = (i.wrapping_mul(7919) ^ (i / 13)) % USERS;
    (
        format!("in.{}", i % PARTITIONS),
        format!("u{user}"),
        BASE_MS + i as i64 * STEP_MS,
    )
}

/// Expected `(user as JSON, window start, count)` of a keyed tumbling
/// 1-minute count over records `0..n`, computed straight from [`record`].
fn expected(n: u64) -> Vec<(String, i64, i64)> {
    let mut m: BTreeMap<(String, i64), i64> = BTreeMap::new();
    for i in 0..n {
        let (_, user, ts) = record(i);
        *m.entry((
            serde_json::json!(user).to_string(),
            ts.div_euclid(60_000) * 60_000,
        ))
        .or_default() += 1;
    }
    m.into_iter().map(|((k, s), c)| (k, s, c)).collect()
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("tokio runtime")
}

/// A NATS server whose stream `IN` holds records `0..n`, and a runtime to
/// talk to it.
fn nats_with_input(n: u64) -> (NatsServer, tokio::runtime::Runtime) {
    let nats = NatsServer::start_unsynced();
    let rt = runtime();
    rt.block_on(async {
        let js = connect(&nats).await;
        create_stream(&js, "IN", "in.>", None).await;
        publish_input(&js, n).await;
    });
    (nats, rt)
}

/// Publishes records `0..n` as JSON to stream `IN`, awaiting every ack.
async fn publish_input(js: &jetstream::Context, n: u64) {
    let mut acks = std::collections::VecDeque::new();
    for i in 0..n {
        let (subject, user, ts) = record(i);
        let payload = serde_json::json!({"user": user, "ts": ts, "seq": i}).to_string();
        acks.push_back(js.publish(subject, payload.into()).await.expect("publish"));
        if acks.len() >= 1000 {
            acks.pop_front().unwrap().await.expect("publish ack");
        }
    }
    for a in acks {
        a.await.expect("publish ack");
    }
}

/// The source part of the specs: stream `IN`, three subject partitions.
fn source(url: &str) -> String {
    format!(
        r#"
  source:
    nats:
      url: {url}
      stream: IN
      subjects: [in.0, in.1, in.2]
      schema: {{user: string, ts: timestamp, seq: int}}
      eventTime: {{field: ts, maxOutOfOrderness: 1s}}
      stopAtEnd: true
  operators:
    - key_by: user
    - window: {{tumbling: 1m, aggregate: {{clicks: count}}}}"#
    )
}

/// A bounded NATS source → key_by → tumbling count → file sink job
/// produces exactly the independently computed counts.
#[test]
fn nats_source_window_counts_equal_an_independent_count() {
    const N: u64 = 30_000;
    let (nats, _rt) = nats_with_input(N);
    let spec = format!(
        r#"apiVersion: ferry.dev/v1
kind: Job
metadata: {{name: nats-counts}}
spec:
  parallelism: 2
  checkpointing: {{interval: 200ms}}{}
  sink:
    file: {{path: ./out}}
"#,
        source(&nats.url())
    );
    let w = Workdir::new(&spec);
    let code = w.run_local(&[], "run.log", Duration::from_secs(120));
    assert_eq!(code, 0, "job failed:\n{}", w.log("run.log"));
    assert!(
        w.log("run.log").contains("FINISHED"),
        "{}",
        w.log("run.log")
    );
    let got = count_rows(&w.output_rows("out"), "user", "clicks");
    let want = expected(N);
    assert_eq!(got.len(), want.len(), "window count differs");
    assert_eq!(got, want, "output differs from the expected counts");
}

/// NATS → key_by → tumbling count → NATS, SIGKILLed at random moments and
/// restarted from its newest checkpoint each time: the sink stream holds
/// every expected window count exactly once (a restore skips transactions
/// the stream already holds, and JetStream drops the repeated part of one
/// cut short).
#[test]
fn nats_to_nats_is_exactly_once_across_repeated_sigkills() {
    const N: u64 = 300_000;
    const KILLS: u32 = 6;
    let mut rng = kill_schedule_rng();

    let (nats, rt) = nats_with_input(N);
    rt.block_on(async { create_stream(&connect(&nats).await, "OUT", "out.>", None).await });
    let spec = format!(
        r#"apiVersion: ferry.dev/v1
kind: Job
metadata: {{name: nats-crash}}
spec:
  parallelism: 2
  checkpointing: {{interval: 100ms, retained: 2}}
  restartStrategy: {{type: fixed-attempts, attempts: 3, delay: 100ms}}{}
  sink:
    nats: {{url: "{}", subject: "out.{{user}}", stream: OUT}}
"#,
        source(&nats.url()),
        nats.url()
    );
    let w = Workdir::new(&spec);

    // Kill each run at a random moment within 50 ms after it completed a
    // checkpoint newer than any before (often while the sink publishes that
    // checkpoint's transaction): every run moves the job on by about one
    // checkpoint interval, far from finishing it.
    let mut kills = 0;
    while kills < KILLS {
        let seen = w.complete_checkpoints().keys().last().copied().unwrap_or(0);
        let mut child = w.spawn_local(&[], "run.log");
        let mut exited = false;
        wait_until(Duration::from_secs(60), "a new checkpoint", || {
            exited = child.try_wait().expect("try_wait").is_some();
            exited || w.complete_checkpoints().keys().any(|n| *n > seen)
        });
        std::thread::sleep(Duration::from_millis(rng.random_range(0..50)));
        if exited || child.try_wait().expect("try_wait").is_some() {
            panic!(
                "the job finished after {kills} kills, before {KILLS}; make the input larger:\n{}",
                w.log("run.log")
            );
        }
        child.kill().expect("SIGKILL");
        child.wait().expect("reap");
        kills += 1;
    }
    let code = w.run_local(&[], "run.log", Duration::from_secs(180));
    let log = w.log("run.log");
    assert_eq!(code, 0, "final run failed:\n{log}");
    assert!(log.contains("resuming job"), "runs never resumed:\n{log}");

    let out = rt.block_on(async { read_stream(&connect(&nats).await, "OUT").await });
    let rows: Vec<serde_json::Value> = out
        .iter()
        .map(|m| serde_json::from_slice(&m.payload).expect("output is JSON"))
        .collect();
    let got = count_rows(&rows, "user", "clicks");
    let want = expected(N);
    let mut ids: Vec<String> = out.iter().map(message_id).collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), out.len(), "message ids are unique");
    assert_eq!(
        out.len(),
        want.len(),
        "{} messages in the sink stream for {} windows (kills: {kills})",
        out.len(),
        want.len()
    );
    assert_eq!(got, want, "output differs from the expected counts");
    let skipped = log.matches("transaction already published").count();
    let replays = log.matches("a replayed transaction").count();
    eprintln!(
        "{kills} SIGKILLs, {} windows, each exactly once; on restore {skipped} transactions were found complete, {replays} partly published ones were deduplicated",
        want.len()
    );
}
