//! A downstream task bounds how far one input runs ahead of the others in
//! event time: it stops reading an input more than `MAX_INPUT_DRIFT_MS`
//! past the slowest active input's watermark, reads it again once the
//! slowest catches up or turns idle (`IDLE_INPUT`), and never holds an
//! input while it aligns a barrier.
//!
//! The tests run on tokio's paused clock: time moves only when every task
//! waits, so "within 50 ms" and "after 100 ms of silence" are exact.

mod common;

use std::sync::Arc;
use std::time::Duration;

use ferry_core::CheckpointId;
use ferry_core::manifest::SnapshotKind;
use ferry_core::schema::Schema;
use ferry_core::storage::StorageLocation;
use ferry_core::value::DataType;
use ferry_taskmanager::batch::{Batch, Column};
use ferry_taskmanager::protocol::{Barrier, Msg, TaskError};
use ferry_taskmanager::task::{IDLE_INPUT, MAX_INPUT_DRIFT_MS};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::{Instant, timeout};

/// A one-row batch whose only value is `n`, at event time `ts`.
fn batch(n: i64, ts: i64) -> Msg {
    Msg::Batch(Batch {
        schema: Arc::new(Schema::new([("n".to_string(), DataType::Int)])),
        columns: vec![Column::Int(vec![n])],
        ts: vec![ts],
    })
}

/// A task without operators reading two inputs (slow, fast) and passing
/// everything to one output.
struct Task {
    slow: mpsc::Sender<Msg>,
    fast: mpsc::Sender<Msg>,
    out: mpsc::Receiver<Msg>,
    _handle: JoinHandle<Result<(), TaskError>>,
    _dir: tempfile::TempDir,
    dir: StorageLocation,
}

fn task() -> Task {
    let (slow, slow_rx) = mpsc::channel(8);
    let (fast, fast_rx) = mpsc::channel(8);
    let (out_tx, out) = mpsc::channel(64);
    let handle = common::downstream_task(vec![slow_rx, fast_rx], vec![out_tx]);
    let tmp = tempfile::tempdir().unwrap();
    let dir = StorageLocation::open(&format!("file://{}", tmp.path().display())).unwrap();
    Task {
        slow,
        fast,
        out,
        _handle: handle,
        _dir: tmp,
        dir,
    }
}

/// The value of a one-row batch, or what else came.
fn describe(m: &Msg) -> String {
    match m {
        Msg::Batch(b) => format!("batch {:?}", b.columns[0]),
        Msg::Watermark(w) => format!("watermark {w}"),
        Msg::Barrier(b) => format!("barrier {}", b.id.0),
        Msg::Fail(why) => format!("fail {why}"),
    }
}

/// The next batch or barrier the task passes on (watermarks skipped), if
/// one comes within `within`.
async fn next_item(out: &mut mpsc::Receiver<Msg>, within: Duration) -> Option<String> {
    let deadline = Instant::now() + within;
    loop {
        match timeout(deadline - Instant::now(), out.recv()).await {
            Err(_) => return None,
            Ok(None) => panic!("the task's output closed"),
            Ok(Some(Msg::Watermark(_))) => continue,
            Ok(Some(m)) => return Some(describe(&m)),
        }
    }
}

/// Both inputs at watermark 1000, seen by the task.
async fn start_together(t: &mut Task) {
    t.slow.send(Msg::Watermark(1_000)).await.unwrap();
    t.fast.send(Msg::Watermark(1_000)).await.unwrap();
    let got = timeout(Duration::from_secs(1), t.out.recv()).await;
    assert!(
        matches!(got, Ok(Some(Msg::Watermark(1_000)))),
        "the task passes on the common watermark first: {:?}",
        got.map(|m| m.as_ref().map(describe))
    );
}

const AHEAD: i64 = 1_000 + MAX_INPUT_DRIFT_MS + 1;

#[tokio::test(start_paused = true)]
async fn an_input_far_ahead_waits_for_an_active_slower_one() {
    let mut t = task();
    start_together(&mut t).await;
    t.fast.send(Msg::Watermark(AHEAD)).await.unwrap();
    t.fast.send(batch(2, AHEAD + 1)).await.unwrap();
    t.slow.send(batch(1, 1_001)).await.unwrap();

    assert_eq!(
        next_item(&mut t.out, Duration::from_millis(50)).await,
        Some("batch Int([1])".to_string())
    );
    // The slow input was heard from just now: the fast one's batch waits.
    assert_eq!(
        next_item(&mut t.out, Duration::from_millis(50)).await,
        None,
        "the input {MAX_INPUT_DRIFT_MS} ms ahead was read while the slower one was active"
    );
    // The slow input catches up to within the bound: the batch comes.
    t.slow.send(Msg::Watermark(2_000)).await.unwrap();
    assert_eq!(
        next_item(&mut t.out, Duration::from_millis(10)).await,
        Some("batch Int([2])".to_string())
    );
}

#[tokio::test(start_paused = true)]
async fn an_idle_slower_input_holds_the_others_only_briefly() {
    let mut t = task();
    start_together(&mut t).await;
    let silent_since = Instant::now();
    t.fast.send(Msg::Watermark(AHEAD)).await.unwrap();
    t.fast.send(batch(2, AHEAD + 1)).await.unwrap();

    assert_eq!(
        next_item(&mut t.out, IDLE_INPUT + Duration::from_secs(1)).await,
        Some("batch Int([2])".to_string()),
        "an idle slow input held the others for good"
    );
    let held = silent_since.elapsed();
    assert!(
        held >= IDLE_INPUT,
        "the batch came after {held:?}, before the slow input had been silent for {IDLE_INPUT:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn a_barrier_behind_a_held_input_still_aligns() {
    let mut t = task();
    start_together(&mut t).await;
    let barrier = Barrier {
        id: CheckpointId(1),
        kind: SnapshotKind::Checkpoint,
        close_txn: false,
        stop: false,
        dir: t.dir.clone(),
    };
    t.fast.send(Msg::Watermark(AHEAD)).await.unwrap();
    t.fast.send(batch(2, AHEAD + 1)).await.unwrap();
    t.fast.send(Msg::Barrier(barrier.clone())).await.unwrap();
    t.slow.send(Msg::Barrier(barrier)).await.unwrap();

    // Well within the idle bound: the barrier, not the slow input's
    // silence, is what lets the held input be read.
    let within = IDLE_INPUT / 2;
    assert_eq!(
        next_item(&mut t.out, within).await,
        Some("batch Int([2])".to_string())
    );
    assert_eq!(
        next_item(&mut t.out, within).await,
        Some("barrier 1".to_string())
    );
}
