//! The NATS JetStream source and sink against a real `nats-server`: the
//! source resumes exactly at its snapshotted sequences and stops at the end
//! fixed when it first started; the sink's replay of a transaction is
//! dropped by JetStream as duplicates; misconfigured streams are refused.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream;
use bytes::Bytes;
use ferry_core::CheckpointId;
use ferry_core::JobId;
use ferry_core::schema::Schema;
use ferry_core::spec::{NatsEventTime, NatsSinkSpec, NatsSourceSpec, StartFrom};
use ferry_core::value::DataType;
use ferry_taskmanager::batch::{Batch, Column};
use ferry_taskmanager::metrics::TaskMetrics;
use ferry_taskmanager::sink::Sink;
use ferry_taskmanager::sink::nats::NatsSink;
use ferry_taskmanager::source::nats::NatsSource;
use ferry_taskmanager::source::{Poll, Source};
use ferry_testkit::NatsServer;
use ferry_testkit::jetstream::{connect, create_stream, message_id, read_stream};

/// Bound on every wait for the server or a source.
const LIMIT: Duration = Duration::from_secs(30);

/// Publishes `{"n": i, "ts": i}` for `i` in `range` to `in.a` (even) and
/// `in.b` (odd), awaiting every ack.
async fn publish(js: &jetstream::Context, range: std::ops::Range<i64>) {
    let mut acks = Vec::new();
    for i in range {
        let subject = if i % 2 == 0 { "in.a" } else { "in.b" };
        let payload = format!(r#"{{"n":{i},"ts":{i}}}"#);
        acks.push(js.publish(subject, payload.into()).await.unwrap());
    }
    for a in acks {
        a.await.unwrap();
    }
}

fn source_spec(url: &str) -> NatsSourceSpec {
    NatsSourceSpec {
        url: url.to_string(),
        stream: "IN".into(),
        subjects: vec!["in.a".into(), "in.b".into()],
        format: Default::default(),
        schema: [
            ("n".to_string(), DataType::Int),
            ("ts".to_string(), DataType::Timestamp),
        ]
        .into_iter()
        .collect(),
        event_time: Some(NatsEventTime {
            field: Some("ts".into()),
            max_out_of_orderness: Default::default(),
        }),
        start_from: StartFrom::Earliest,
        stop_at_end: true,
        on_bad_line: Default::default(),
        idle_timeout: None,
    }
}

fn schema() -> Schema {
    Schema::new([
        ("n".to_string(), DataType::Int),
        ("ts".to_string(), DataType::Timestamp),
    ])
}

/// Values of column 0 (ints) of a batch.
fn ints(b: &Batch) -> Vec<i64> {
    match &b.columns[0] {
        Column::Int(v) => v.clone(),
        other => panic!("expected ints, got {other:?}"),
    }
}

/// Polls until `stop` says so or the source ends; returns what was read.
async fn read(src: &mut Source, mut stop: impl FnMut(usize) -> bool) -> (Vec<Batch>, bool) {
    let mut out = Vec::new();
    let mut read = 0;
    let run = async {
        loop {
            if stop(read) {
                return false;
            }
            match src.poll().await.unwrap() {
                Poll::Batch(b) => {
                    read += b.len();
                    out.push(b);
                }
                Poll::Wait => src.ready().await,
                Poll::Idle(d) => tokio::time::sleep(d).await,
                Poll::End => return true,
            }
        }
    };
    let ended = tokio::time::timeout(LIMIT, run)
        .await
        .expect("source stalled");
    (out, ended)
}

/// A bounded source snapshotted mid-way and restored reads exactly the
/// messages after the snapshot, and neither run reads what was published
/// after the first start.
#[tokio::test]
async fn source_restores_exactly_at_its_snapshot_and_keeps_its_end() {
    let nats = NatsServer::start();
    let js = connect(&nats).await;
    create_stream(&js, "IN", "in.>", Some(Duration::from_secs(120))).await;
    publish(&js, 0..3000).await;

    let spec = source_spec(&nats.url());
    let mut first = Source::Nats(Box::new(
        NatsSource::open(&spec, &schema(), 0, 1).await.unwrap(),
    ));
    let (before, ended) = read(&mut first, |n| n >= 1000).await;
    assert!(!ended);
    // Published after the job started: beyond the bounded source's end.
    publish(&js, 3000..3100).await;
    let (state, offsets) = first.snapshot().unwrap();
    assert_eq!(offsets.len(), 2, "one offset per partition: {offsets:?}");
    let (after, ended) = read(&mut first, |_| false).await;
    assert!(ended);
    assert_eq!(
        first.watermark(),
        i64::MAX,
        "an ended source releases every window"
    );

    let mut seen: Vec<i64> = before.iter().chain(&after).flat_map(ints).collect();
    seen.sort();
    assert_eq!(
        seen,
        (0..3000).collect::<Vec<_>>(),
        "every message once, none after the end"
    );
    assert_eq!(first.records_read(), 3000);

    let mut second = Source::Nats(Box::new(
        NatsSource::open(&spec, &schema(), 0, 1).await.unwrap(),
    ));
    second.restore(&[Bytes::from(state)]).unwrap();
    let (replayed, ended) = read(&mut second, |_| false).await;
    assert!(ended);
    let mut replayed: Vec<i64> = replayed.iter().flat_map(ints).collect();
    let mut expected: Vec<i64> = after.iter().flat_map(ints).collect();
    replayed.sort();
    expected.sort();
    assert_eq!(
        replayed, expected,
        "the restore re-reads exactly what followed the snapshot"
    );
    assert_eq!(second.records_read(), 3000);
}

/// With two subtasks each reads its own partition; without an event-time
/// field records carry the time the server stored them.
#[tokio::test]
async fn partitions_split_by_subject_and_publish_time_is_event_time() {
    let nats = NatsServer::start();
    let js = connect(&nats).await;
    create_stream(&js, "IN", "in.>", Some(Duration::from_secs(120))).await;
    let t0 = chrono::Utc::now().timestamp_millis();
    publish(&js, 0..200).await;
    let t1 = chrono::Utc::now().timestamp_millis();

    let mut spec = source_spec(&nats.url());
    spec.event_time = None;
    for (subtask, parity) in [(0, 0), (1, 1)] {
        let mut src = Source::Nats(Box::new(
            NatsSource::open(&spec, &schema(), subtask, 2)
                .await
                .unwrap(),
        ));
        let (batches, ended) = read(&mut src, |_| false).await;
        assert!(ended);
        let n: Vec<i64> = batches.iter().flat_map(ints).collect();
        assert_eq!(n.len(), 100);
        assert!(
            n.iter().all(|i| i % 2 == parity),
            "subtask {subtask} read {n:?}"
        );
        for b in &batches {
            assert!(
                b.ts.iter().all(|t| (t0 - 1..=t1 + 1).contains(t)),
                "{:?} not in [{t0}, {t1}]",
                b.ts
            );
        }
    }
}

/// An unbounded source waits for new messages and picks them up.
#[tokio::test]
async fn unbounded_source_waits_for_new_messages() {
    let nats = NatsServer::start();
    let js = connect(&nats).await;
    create_stream(&js, "IN", "in.>", Some(Duration::from_secs(120))).await;
    publish(&js, 0..10).await;
    let mut spec = source_spec(&nats.url());
    spec.stop_at_end = false;
    let mut src = Source::Nats(Box::new(
        NatsSource::open(&spec, &schema(), 0, 1).await.unwrap(),
    ));
    let (b, ended) = read(&mut src, |n| n >= 10).await;
    assert!(!ended);
    assert_eq!(b.iter().map(Batch::len).sum::<usize>(), 10);
    let publisher = tokio::spawn(async move { publish(&js, 10..15).await });
    let (b, ended) = read(&mut src, |n| n >= 5).await;
    assert!(!ended);
    let mut n: Vec<i64> = b.iter().flat_map(ints).collect();
    n.sort();
    assert_eq!(n, (10..15).collect::<Vec<_>>());
    publisher.await.unwrap();
}

fn out_batch(keys: &[&str]) -> Batch {
    let schema = Arc::new(Schema::new([
        ("user".to_string(), DataType::String),
        ("n".to_string(), DataType::Int),
    ]));
    Batch {
        schema,
        columns: vec![
            Column::Str(keys.iter().map(|k| Arc::from(*k)).collect()),
            Column::Int((0..keys.len() as i64).collect()),
        ],
        ts: vec![0; keys.len()],
    }
}

fn sink_spec(url: &str, subject: &str) -> NatsSinkSpec {
    NatsSinkSpec {
        url: url.to_string(),
        subject: subject.to_string(),
        stream: "OUT".into(),
    }
}

/// Every message of a stream: (subject, payload, Nats-Msg-Id).
async fn messages(js: &jetstream::Context, name: &str) -> Vec<(String, String, String)> {
    read_stream(js, name)
        .await
        .iter()
        .map(|m| {
            let payload = String::from_utf8(m.payload.to_vec()).unwrap();
            (m.subject.to_string(), payload, message_id(m))
        })
        .collect()
}

/// A NATS sink subtask 0 of `job` publishing to `out.{user}` on `OUT`.
async fn open_sink(nats: &NatsServer, job: &JobId) -> Sink {
    let schema = out_batch(&[]).schema;
    let spec = sink_spec(&nats.url(), "out.{user}");
    Sink::Nats(Box::new(
        NatsSink::open(&spec, &schema, job, 0, Duration::ZERO)
            .await
            .unwrap(),
    ))
}

/// What the sink publishes for `out_batch(&["a", "b.c", "a"])` as
/// transaction `<job>-0000-00000007`: (subject, payload, message id).
fn expected_messages(job: &JobId) -> Vec<(String, String, String)> {
    let id = format!("{job}-0000-00000007");
    vec![
        (
            "out.a".into(),
            r#"{"user":"a","n":0}"#.into(),
            format!("{id}-0"),
        ),
        (
            "out.b_c".into(),
            r#"{"user":"b.c","n":1}"#.into(),
            format!("{id}-1"),
        ),
        (
            "out.a".into(),
            r#"{"user":"a","n":2}"#.into(),
            format!("{id}-2"),
        ),
    ]
}

/// Writes the three records and closes them as the transaction of
/// checkpoint 7, returning the sink's checkpoint state.
fn stage(sink: &mut Sink) -> Bytes {
    sink.write(&out_batch(&["a", "b.c", "a"]), &TaskMetrics::default());
    let (state, txns) = sink.snapshot(CheckpointId(7), true, 3).unwrap();
    assert_eq!(txns.len(), 1);
    Bytes::from(state.unwrap())
}

/// A transaction becomes visible when its checkpoint completes; restoring
/// a state that still lists it (a crash after the commit, before the next
/// checkpoint) does not publish it again.
#[tokio::test]
async fn sink_publishes_at_commit_and_a_restore_does_not_repeat_it() {
    let nats = NatsServer::start();
    let js = connect(&nats).await;
    create_stream(&js, "OUT", "out.>", None).await;
    let job = JobId::new();
    let mut sink = open_sink(&nats, &job).await;
    let state = stage(&mut sink);
    assert!(
        messages(&js, "OUT").await.is_empty(),
        "nothing is visible before commit"
    );
    sink.commit(CheckpointId(7)).await.unwrap();
    assert_eq!(messages(&js, "OUT").await, expected_messages(&job));
    let out = open_sink(&nats, &job)
        .await
        .restore(&[(0, state)], 0, 1, CheckpointId(7))
        .await
        .unwrap();
    assert_eq!(out, 3);
    assert_eq!(messages(&js, "OUT").await, expected_messages(&job));
}

/// A crash in the middle of publishing a transaction: the restore publishes
/// all of it again and JetStream drops the part it already had.
#[tokio::test]
async fn a_transaction_cut_short_by_a_crash_is_completed_without_duplicates() {
    let nats = NatsServer::start();
    let js = connect(&nats).await;
    create_stream(&js, "OUT", "out.>", None).await;
    let job = JobId::new();
    let state = stage(&mut open_sink(&nats, &job).await);
    // What the crashed commit got out: the first two messages.
    for (subject, payload, id) in &expected_messages(&job)[..2] {
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("Nats-Msg-Id", id.as_str());
        js.publish_with_headers(subject.clone(), headers, payload.clone().into())
            .await
            .unwrap()
            .await
            .unwrap();
    }
    open_sink(&nats, &job)
        .await
        .restore(&[(0, state)], 0, 1, CheckpointId(7))
        .await
        .unwrap();
    assert_eq!(messages(&js, "OUT").await, expected_messages(&job));
}

/// Resuming long after the commit (a savepoint, a restart after a long
/// outage), when the duplicate window no longer covers the transaction, does
/// not publish it twice either.
#[tokio::test]
async fn a_restore_after_the_duplicate_window_does_not_repeat_a_transaction() {
    let nats = NatsServer::start();
    let js = connect(&nats).await;
    create_stream(&js, "OUT", "out.>", Some(Duration::from_secs(1))).await;
    let job = JobId::new();
    let mut sink = open_sink(&nats, &job).await;
    let state = stage(&mut sink);
    sink.commit(CheckpointId(7)).await.unwrap();
    // Wait until JetStream forgets ids published after the commit: a probe
    // published now is accepted again (not a duplicate) only then.
    let probe = || async {
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("Nats-Msg-Id", "probe");
        let ack = js
            .publish_with_headers("out.probe", headers, "{}".into())
            .await
            .unwrap();
        ack.await.unwrap().duplicate
    };
    assert!(!probe().await);
    let forgotten = async {
        while probe().await {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    tokio::time::timeout(LIMIT, forgotten)
        .await
        .expect("the duplicate window never passed");

    open_sink(&nats, &job)
        .await
        .restore(&[(0, state)], 0, 1, CheckpointId(7))
        .await
        .unwrap();
    let out: Vec<_> = messages(&js, "OUT")
        .await
        .into_iter()
        .filter(|(subject, ..)| subject != "out.probe")
        .collect();
    assert_eq!(out, expected_messages(&job));
}

/// The sink refuses a stream whose duplicate window is too short for a
/// replay, a missing stream, and a subject another stream stores.
#[tokio::test]
async fn sink_refuses_streams_that_cannot_deduplicate_its_output() {
    let nats = NatsServer::start();
    let js = connect(&nats).await;
    create_stream(&js, "OUT", "out.>", Some(Duration::from_secs(5))).await;
    create_stream(&js, "OTHER", "other.>", Some(Duration::from_secs(120))).await;
    let job = JobId::new();
    let schema = out_batch(&[]).schema;
    let err = NatsSink::open(
        &sink_spec(&nats.url(), "out.x"),
        &schema,
        &job,
        0,
        Duration::from_secs(60),
    )
    .await
    .err()
    .unwrap();
    assert!(err.contains("duplicate window"), "{err}");
    let mut spec = sink_spec(&nats.url(), "out.x");
    spec.stream = "MISSING".into();
    let err = NatsSink::open(&spec, &schema, &job, 0, Duration::ZERO)
        .await
        .err()
        .unwrap();
    assert!(err.contains("does not exist"), "{err}");

    let mut spec = sink_spec(&nats.url(), "other.x");
    spec.stream = "OUT".into();
    let mut sink = Sink::Nats(Box::new(
        NatsSink::open(&spec, &schema, &job, 0, Duration::ZERO)
            .await
            .unwrap(),
    ));
    sink.write(&out_batch(&["a"]), &TaskMetrics::default());
    sink.snapshot(CheckpointId(1), true, 1).unwrap();
    let err = sink.commit(CheckpointId(1)).await.unwrap_err();
    assert!(err.contains("stored by stream 'OTHER'"), "{err}");
}

/// A message that cannot be a record fails the source permanently (a
/// restart would read it again from the same sequence), naming the stream
/// and sequence; the good messages before it are delivered first.
#[tokio::test]
async fn a_message_that_is_not_a_record_is_a_permanent_error() {
    let nats = NatsServer::start();
    let js = connect(&nats).await;
    create_stream(&js, "IN", "in.>", Some(Duration::from_secs(120))).await;
    publish(&js, 0..2).await;
    js.publish("in.a", "not json".into())
        .await
        .unwrap()
        .await
        .unwrap();
    let mut src = Source::Nats(Box::new(
        NatsSource::open(&source_spec(&nats.url()), &schema(), 0, 1)
            .await
            .unwrap(),
    ));
    let mut good = Vec::new();
    let err = tokio::time::timeout(LIMIT, async {
        loop {
            match src.poll().await {
                Ok(Poll::Batch(b)) => good.extend(ints(&b)),
                Ok(Poll::Wait) => src.ready().await,
                Ok(Poll::Idle(d)) => tokio::time::sleep(d).await,
                Ok(Poll::End) => panic!("the bad message was skipped"),
                Err(e) => return e,
            }
        }
    })
    .await
    .expect("source stalled");
    match err {
        ferry_taskmanager::protocol::TaskError::Permanent(m) => {
            assert!(
                m.contains("sequence 3") && m.contains("not a JSON object"),
                "{m}"
            )
        }
        other => panic!("expected a permanent error, got {other:?}"),
    }
    // Each subject is a partition of its own (0 went to in.a with the bad
    // message after it, 1 to in.b): only records published before the bad
    // one come out, each at most once. A batch holding the bad message is
    // dropped whole and the partitions interleave freely, so which of 0
    // and 1 come out, and in what order, depends on batching ([1] alone
    // when in.a's batch held 0 and the bad message).
    let mut once = good.clone();
    once.sort_unstable();
    once.dedup();
    assert_eq!(once.len(), good.len(), "a record came out twice: {good:?}");
    assert!(good.iter().all(|n| (0..2).contains(n)), "{good:?}");
}

async fn publish_raw(js: &jetstream::Context, subject: &str, payloads: &[&str]) {
    for p in payloads {
        js.publish(subject.to_string(), p.to_string().into())
            .await
            .unwrap()
            .await
            .unwrap();
    }
}

/// Field types are strict, as in the file source: a value of another type
/// is a bad message. `onBadLine: skip` skips and counts bad messages;
/// `fail` (the default) names the field, stream and sequence.
#[tokio::test]
async fn types_are_strict_and_bad_messages_can_be_skipped() {
    let nats = NatsServer::start();
    let js = connect(&nats).await;
    create_stream(&js, "IN", "in.>", Some(Duration::from_secs(120))).await;
    publish_raw(
        &js,
        "in.a",
        &[
            r#"{"n":0,"ts":0}"#,
            r#"{"n":"seven","ts":1}"#,
            r#"{"n":2,"ts":2}"#,
            "not json",
            r#"{"n":4}"#,
            r#"{"n":5.5,"ts":5}"#,
            r#"{"n":6,"ts":6}"#,
        ],
    )
    .await;
    let mut spec = source_spec(&nats.url());
    spec.subjects = vec!["in.a".into()];
    spec.on_bad_line = ferry_core::spec::BadLinePolicy::Skip;
    let mut src = Source::Nats(Box::new(
        NatsSource::open(&spec, &schema(), 0, 1).await.unwrap(),
    ));
    let (batches, ended) = read(&mut src, |_| false).await;
    assert!(ended);
    let got: Vec<i64> = batches.iter().flat_map(ints).collect();
    assert_eq!(got, vec![0, 2, 6]);
    assert_eq!(src.skipped_records(), 4);

    spec.on_bad_line = ferry_core::spec::BadLinePolicy::Fail;
    let mut src = NatsSource::open(&spec, &schema(), 0, 1).await.unwrap();
    let err = tokio::time::timeout(LIMIT, async {
        loop {
            match src.poll().await {
                Ok(Poll::Wait) => src.ready().await,
                Ok(_) => {}
                Err(e) => return e,
            }
        }
    })
    .await
    .expect("source stalled");
    let m = err.message().to_string();
    assert!(
        m.contains("sequence 2") && m.contains("field 'n' is \"seven\", not a int"),
        "{m}"
    );
}

/// With `idleTimeout`, a partition that gets no messages stops holding the
/// watermark back; without it, it holds it at its last event time.
#[tokio::test]
async fn an_idle_partition_stops_holding_the_watermark_back() {
    /// in.b gets one message at event time 0, in.a one at 1000; both go
    /// quiet; then in.a gets one at 5000. Returns the watermark after it.
    async fn watermark_after_silence(idle: Option<Duration>) -> i64 {
        let nats = NatsServer::start();
        let js = connect(&nats).await;
        create_stream(&js, "IN", "in.>", Some(Duration::from_secs(120))).await;
        publish_raw(&js, "in.b", &[r#"{"n":0,"ts":0}"#]).await;
        publish_raw(&js, "in.a", &[r#"{"n":1,"ts":1000}"#]).await;
        let mut spec = source_spec(&nats.url());
        spec.stop_at_end = false;
        spec.idle_timeout =
            idle.map(|d| ferry_core::spec::DurationSpec::from_millis(d.as_millis() as u64));
        let mut src = Source::Nats(Box::new(
            NatsSource::open(&spec, &schema(), 0, 1).await.unwrap(),
        ));
        let (batches, _) = read(&mut src, |n| n >= 2).await;
        assert_eq!(batches.iter().map(|b| b.len()).sum::<usize>(), 2);
        tokio::time::sleep(Duration::from_millis(400)).await;
        publish_raw(&js, "in.a", &[r#"{"n":2,"ts":5000}"#]).await;
        let (more, _) = read(&mut src, |n| n >= 1).await;
        assert_eq!(more.iter().map(|b| b.len()).sum::<usize>(), 1);
        src.watermark()
    }
    let held = watermark_after_silence(None).await;
    assert!(held < 1, "in.b (at 0) holds the watermark: {held}");
    let freed = watermark_after_silence(Some(Duration::from_millis(200))).await;
    assert!(
        freed >= 4000,
        "idle in.b still holds the watermark: {freed}"
    );
}

/// A failover restores an older checkpoint than the lost primary had
/// published: the lost lineage's transaction beyond it is in the stream.
/// The restored sink publishes none of those messages again when its
/// replay produces them, and its own new messages are not taken for
/// duplicates of the lost lineage's (whose ids they would reuse).
#[tokio::test]
async fn output_published_beyond_the_restored_checkpoint_is_not_repeated() {
    let nats = NatsServer::start();
    let js = connect(&nats).await;
    create_stream(&js, "OUT", "out.>", None).await;
    let job = JobId::new();
    let m = TaskMetrics::default();
    // The lost lineage: checkpoint 7 (restored later), then checkpoint 8
    // published, then lost.
    let mut lost = open_sink(&nats, &job).await;
    let state7 = stage(&mut lost);
    lost.commit(CheckpointId(7)).await.unwrap();
    lost.write(&out_batch(&["x", "y"]), &m);
    lost.snapshot(CheckpointId(8), true, 5).unwrap();
    lost.commit(CheckpointId(8)).await.unwrap();
    let before = messages(&js, "OUT").await;
    assert_eq!(before.len(), 5);

    // The new lineage restores checkpoint 7 and replays the same two
    // records, cut at other checkpoints than the lost lineage's (x in its
    // checkpoint 8, y with a new record z in 9): ids alone would not match
    // them up.
    let mut again = open_sink(&nats, &job).await;
    again
        .restore(&[(0, state7)], 0, 1, CheckpointId(7))
        .await
        .unwrap();
    again.write(&rows(&[("x", 0)]), &m);
    again.snapshot(CheckpointId(8), true, 4).unwrap();
    again.commit(CheckpointId(8)).await.unwrap();
    again.write(&rows(&[("y", 1), ("z", 2)]), &m);
    again.snapshot(CheckpointId(9), true, 6).unwrap();
    again.commit(CheckpointId(9)).await.unwrap();

    let after = messages(&js, "OUT").await;
    let payloads: Vec<&str> = after.iter().map(|(_, p, _)| p.as_str()).collect();
    assert_eq!(
        payloads,
        vec![
            r#"{"user":"a","n":0}"#,
            r#"{"user":"b.c","n":1}"#,
            r#"{"user":"a","n":2}"#,
            r#"{"user":"x","n":0}"#,
            r#"{"user":"y","n":1}"#,
            r#"{"user":"z","n":2}"#,
        ],
        "{after:?}"
    );
    // The new record's id is tagged: not one the lost lineage could have
    // used.
    let z = &after[5].2;
    assert!(
        z.starts_with(&format!("{job}-0000.")) && z.ends_with("-00000009-0"),
        "{z}"
    );
}

/// A batch of (user, n) rows with the schema of [`out_batch`].
fn rows(rs: &[(&str, i64)]) -> Batch {
    let mut b = out_batch(&[]);
    b.columns = vec![
        Column::Str(rs.iter().map(|(u, _)| Arc::from(*u)).collect()),
        Column::Int(rs.iter().map(|(_, n)| *n).collect()),
    ];
    b.ts = vec![0; rs.len()];
    b
}
