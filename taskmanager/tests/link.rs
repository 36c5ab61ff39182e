//! The exchange's network transport (`ferry_taskmanager::link`, ADR 0007)
//! over real tonic servers on loopback: order and content across the
//! wire, credits bounding a stalled channel without holding up another,
//! the open handshake (waiting for the registration, refusals), broken
//! links failing both ends, malformed frames from a raw client, and mutual
//! TLS with the TaskManagers' certificate name.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use ferry_core::CheckpointId;
use ferry_core::manifest::SnapshotKind;
use ferry_core::proto::exchange_client::ExchangeClient;
use ferry_core::proto::exchange_frame::Frame;
use ferry_core::proto::{self, ExchangeFrame};
use ferry_core::schema::{Schema, SchemaRef};
use ferry_core::storage::StorageLocation;
use ferry_core::tls::{ClientAuth, ClientTls, Connector, ServerTls, TlsFiles};
use ferry_core::value::{DataType, Value};
use ferry_taskmanager::batch::{Batch, Column};
use ferry_taskmanager::exchange::BatchEncoder;
use ferry_taskmanager::link::{ChannelKey, Direction, Exchange, LinkConfig, PeerStats};
use ferry_taskmanager::protocol::{Barrier, Msg, TaskError};
use ferry_testkit::FaultProxy;
use ferry_testkit::pki::{Leaf, Pki};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tonic::Code;

/// Bound on every wait of these tests.
const LIMIT: Duration = Duration::from_secs(30);

async fn within<T>(what: &str, f: impl Future<Output = T>) -> T {
    tokio::time::timeout(LIMIT, f)
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
}

/// Waits until `cond` holds (checked every few ms, bounded by [`LIMIT`]).
async fn until(what: &str, mut cond: impl FnMut() -> bool) {
    within(what, async {
        while !cond() {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    })
    .await
}

/// A TaskManager's exchange served on a loopback port.
struct Node {
    ex: Exchange,
    url: String,
    port: u16,
    server: JoinHandle<()>,
}

impl Drop for Node {
    fn drop(&mut self) {
        self.server.abort();
    }
}

async fn node(id: &str, cfg: LinkConfig) -> Node {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let ex = Exchange::new(id, cfg, None);
    let service = ex.service();
    let server = tokio::spawn(async move {
        let _ = Exchange::server_builder()
            .add_service(service)
            .serve_with_incoming(Exchange::incoming(listener))
            .await;
    });
    Node {
        ex,
        url: format!("http://127.0.0.1:{port}"),
        port,
        server,
    }
}

fn cfg(credits: u32) -> LinkConfig {
    LinkConfig {
        credits,
        ..LinkConfig::default()
    }
}

fn key(deployment: &str, from: u32, to: u32) -> ChannelKey {
    ChannelKey {
        deployment: deployment.to_string(),
        stage: 1,
        from,
        to,
    }
}

fn schema() -> SchemaRef {
    Arc::new(Schema::new([
        ("user".to_string(), DataType::String),
        ("n".to_string(), DataType::Int),
        ("x".to_string(), DataType::Any),
    ]))
}

/// Batch `i` of `rows` rows; its `x` column is floats, ints or mixed
/// values (`Any`) by `i`, so the layout changes along a sequence.
fn batch(i: usize, rows: usize) -> Batch {
    let x = match i % 3 {
        0 => Column::Float((0..rows).map(|r| r as f64 / 4.0).collect()),
        1 => Column::Any(
            (0..rows)
                .map(|r| match r % 6 {
                    0 => Value::Null,
                    1 => Value::Bool(r % 4 == 1),
                    2 => Value::Int(-(r as i64)),
                    3 => Value::Float(1.5 * r as f64),
                    4 => Value::Str(Arc::from(format!("é{i}-{r}"))),
                    _ => Value::Ts(1_700_000_000_000 + r as i64),
                })
                .collect(),
        ),
        _ => Column::Int((0..rows as i64).map(|r| r * 7).collect()),
    };
    Batch {
        schema: schema(),
        columns: vec![
            Column::Str(
                (0..rows)
                    .map(|r| Arc::from(format!("u{}", r % 5)))
                    .collect(),
            ),
            Column::Int(vec![i as i64; rows]),
            x,
        ],
        ts: (0..rows as i64).map(|r| 1_000 * i as i64 + r).collect(),
    }
}

fn barrier(id: u64, kind: SnapshotKind, close_txn: bool, stop: bool, dir: &str) -> Msg {
    Msg::Barrier(Barrier {
        id: CheckpointId(id),
        kind,
        close_txn,
        stop,
        dir: StorageLocation::open(dir).unwrap(),
    })
}

fn name(m: &Msg) -> String {
    match m {
        Msg::Batch(b) => format!("a batch of {} rows", b.len()),
        Msg::Watermark(w) => format!("watermark {w}"),
        Msg::Barrier(b) => format!("barrier {}", b.id),
        Msg::Fail(why) => format!("a failure: {why}"),
    }
}

/// Asserts `got` is `want`.
fn same(got: &Msg, want: &Msg, at: usize) {
    match (got, want) {
        (Msg::Batch(a), Msg::Batch(b)) => {
            assert_eq!(a.columns, b.columns, "columns of message {at}");
            assert_eq!(a.ts, b.ts, "event times of message {at}");
            assert_eq!(a.schema, b.schema, "schema of message {at}");
        }
        (Msg::Watermark(a), Msg::Watermark(b)) => assert_eq!(a, b, "message {at}"),
        (Msg::Barrier(a), Msg::Barrier(b)) => {
            assert_eq!(a.id, b.id, "barrier id, message {at}");
            assert_eq!(a.kind, b.kind, "barrier kind, message {at}");
            assert_eq!(a.close_txn, b.close_txn, "barrier close_txn, message {at}");
            assert_eq!(a.stop, b.stop, "barrier stop, message {at}");
            assert_eq!(a.dir.url(), b.dir.url(), "barrier dir, message {at}");
        }
        (g, w) => panic!("message {at}: got {}, want {}", name(g), name(w)),
    }
}

/// Receives every message until the input closes and checks them against
/// `want`, in order.
async fn receive_all(rx: &mut mpsc::Receiver<Msg>, want: &[Msg]) {
    let mut got = Vec::new();
    while let Some(m) = within("the next message", rx.recv()).await {
        got.push(m);
    }
    assert_eq!(got.len(), want.len(), "messages received");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        same(g, w, i);
    }
}

/// The next message, which must be a failure; its reason.
async fn fail_of(rx: &mut mpsc::Receiver<Msg>) -> String {
    loop {
        match within("a failure downstream", rx.recv()).await {
            Some(Msg::Fail(why)) => return why,
            Some(_) => continue,
            None => panic!("the downstream input closed without a failure"),
        }
    }
}

/// `ex`'s counters of `peer`, one way.
fn stats(ex: &Exchange, peer: &str, direction: Direction) -> PeerStats {
    ex.stats()
        .into_iter()
        .find(|s| s.peer == peer && s.direction == direction)
        .unwrap_or_else(|| panic!("no counters {direction} for {peer}: {:?}", ex.stats()))
}

#[tokio::test]
async fn messages_cross_in_order_and_unchanged_then_the_input_closes() {
    let b = node("tm-b", cfg(3)).await;
    let a = Exchange::new("tm-a", cfg(3), None);
    let dir = tempfile::tempdir().unwrap();
    let d1 = format!("file://{}/chk-1", dir.path().display());
    let d2 = format!("file://{}/sp-2", dir.path().display());
    // The sequence, built twice: once to send, once to compare with.
    let sequence = || {
        let mut s = Vec::new();
        for i in 0..40 {
            s.push(Msg::Batch(batch(i, 1 + (i * 37) % 300)));
            if i % 5 == 4 {
                s.push(Msg::Watermark(1_000 * i as i64));
            }
            if i == 13 {
                s.push(barrier(1, SnapshotKind::Checkpoint, true, false, &d1));
            }
            if i == 29 {
                s.push(barrier(2, SnapshotKind::Savepoint, false, true, &d2));
            }
        }
        s.push(Msg::Batch(batch(40, 0)));
        s.push(Msg::Watermark(i64::MAX));
        s
    };
    let want = sequence();
    let (rows, batches) = want.iter().fold((0u64, 0u64), |(r, n), m| match m {
        Msg::Batch(b) => (r + b.len() as u64, n + 1),
        _ => (r, n),
    });

    let (down_tx, mut down_rx) = mpsc::channel(8);
    let _inbound = b.ex.accept(key("d1", 0, 2), schema(), down_tx);
    let (up_tx, up_rx) = mpsc::channel(8);
    let sender = a.connect(&b.url, key("d1", 0, 2), up_rx, CancellationToken::new());
    let to_send = sequence();
    let producer = tokio::spawn(async move {
        for m in to_send {
            up_tx
                .send(m)
                .await
                .map_err(|_| "the channel closed")
                .unwrap();
        }
    });
    receive_all(&mut down_rx, &want).await;
    within("the producer", producer).await.unwrap();
    assert_eq!(within("the sender", sender).await.unwrap(), Ok(()));

    let out = stats(&a, "tm-b", Direction::Out);
    let inn = stats(&b.ex, "tm-a", Direction::In);
    assert_eq!((out.batches, out.records), (batches, rows));
    assert_eq!((inn.batches, inn.records), (batches, rows));
    assert_eq!(out.bytes, inn.bytes);
    assert!(out.bytes > 0);
    // Every message and the end, some of them sharing a run frame.
    assert!(out.frames <= want.len() as u64 + 1, "{} frames", out.frames);
    assert_eq!(inn.frames, out.frames);
    assert_eq!((out.channels, inn.channels), (0, 0));
    assert_eq!(a.inflight(), 0);
}

/// Batches and watermarks queued behind the one a credit takes travel
/// with it in one frame, in order; a barrier never joins a run.
#[tokio::test]
async fn queued_batches_and_watermarks_share_frames_and_keep_their_order() {
    let b = node("tm-b", cfg(2)).await;
    let a = Exchange::new("tm-a", cfg(2), None);
    let dir = tempfile::tempdir().unwrap();
    let d1 = format!("file://{}/chk-1", dir.path().display());
    let sequence = || {
        let mut s = Vec::new();
        for i in 0..150 {
            s.push(Msg::Batch(batch(i, 1 + i % 50)));
            s.push(Msg::Watermark(10 * i as i64));
            if i == 99 {
                s.push(barrier(1, SnapshotKind::Checkpoint, true, false, &d1));
            }
        }
        s
    };
    let want = sequence();
    // Everything is queued before the channel opens.
    let (up_tx, up_rx) = mpsc::channel(want.len());
    for m in sequence() {
        up_tx.try_send(m).unwrap();
    }
    drop(up_tx);
    let (down_tx, mut down_rx) = mpsc::channel(want.len());
    let _inbound = b.ex.accept(key("runs", 0, 1), schema(), down_tx);
    let sender = a.connect(&b.url, key("runs", 0, 1), up_rx, CancellationToken::new());
    receive_all(&mut down_rx, &want).await;
    assert_eq!(within("the sender", sender).await.unwrap(), Ok(()));
    // 301 messages and the end: runs of up to RUN_ITEMS before the
    // barrier and after it, the barrier alone, the end alone.
    let out = stats(&a, "tm-b", Direction::Out);
    let per_run = ferry_taskmanager::link::RUN_ITEMS as u64;
    let fewest = 200u64.div_ceil(per_run) + 1 + 100u64.div_ceil(per_run) + 1;
    assert!(
        out.frames >= fewest && out.frames <= fewest + 4,
        "{} frames for 302 messages (runs of {per_run})",
        out.frames
    );
    assert_eq!(stats(&b.ex, "tm-a", Direction::In).frames, out.frames);
    assert_eq!(a.inflight(), 0);
}

#[tokio::test]
async fn credits_bound_a_stalled_channel_and_the_other_channel_flows() {
    const CREDITS: usize = 5;
    const UP: usize = 3;
    const DOWN: usize = 2;
    let b = node("tm-b", cfg(CREDITS as u32)).await;
    // One message per frame, so that frames count messages.
    let a = Exchange::new(
        "tm-a",
        LinkConfig {
            run_items: 1,
            ..cfg(CREDITS as u32)
        },
        None,
    );

    // Channel 1: its downstream task reads nothing for now.
    let (down1_tx, mut down1) = mpsc::channel(DOWN);
    let _in1 = b.ex.accept(key("d", 0, 0), schema(), down1_tx);
    let (up1, up1_rx) = mpsc::channel(UP);
    let sender1 = a.connect(&b.url, key("d", 0, 0), up1_rx, CancellationToken::new());
    // Channel 2, on the same connection.
    let (down2_tx, mut down2) = mpsc::channel(8);
    let _in2 = b.ex.accept(key("d", 1, 0), schema(), down2_tx);
    let (up2, up2_rx) = mpsc::channel(8);
    let sender2 = a.connect(&b.url, key("d", 1, 0), up2_rx, CancellationToken::new());

    // Fill channel 1 until it takes no more: its upstream channel full,
    // every credit in use and credited back for what the downstream
    // channel holds (no credit in transit), the downstream channel full.
    let mut accepted = 0usize;
    let settled = |down1: &mpsc::Receiver<Msg>| {
        let frames = a
            .stats()
            .iter()
            .find(|s| s.direction == Direction::Out)
            .map(|s| s.frames)
            .unwrap_or(0);
        down1.len() == DOWN
            && a.inflight() == CREDITS as u64
            && frames - a.inflight() == down1.len() as u64
    };
    within("channel 1 to stall", async {
        loop {
            while up1.try_send(Msg::Batch(batch(accepted, 4))).is_ok() {
                accepted += 1;
            }
            if settled(&down1) && up1.capacity() == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    })
    .await;
    assert_eq!(
        accepted,
        UP + CREDITS + DOWN,
        "a stalled channel holds its upstream channel, its credits and its downstream channel"
    );
    // The frames in flight reach the receiver, which holds them.
    until("the receiver to hold the frames in flight", || {
        stats(&b.ex, "tm-a", Direction::In).frames == (CREDITS + DOWN) as u64
    })
    .await;

    // Channel 2 carries 10,000 batches meanwhile.
    let stalled = std::time::Instant::now();
    const N: usize = 10_000;
    let producer = tokio::spawn(async move {
        for i in 0..N {
            up2.send(Msg::Batch(batch(i, 1 + i % 16))).await.unwrap();
        }
    });
    within("channel 2's batches", async {
        for i in 0..N {
            match down2.recv().await {
                Some(Msg::Batch(got)) => {
                    assert_eq!(got.columns, batch(i, 1 + i % 16).columns, "batch {i}");
                }
                Some(other) => panic!("message {i} on channel 2: {}", name(&other)),
                None => panic!("channel 2 closed after {i} batches"),
            }
        }
        assert!(down2.recv().await.is_none());
    })
    .await;
    within("producer 2", producer).await.unwrap();
    assert_eq!(within("sender 2", sender2).await.unwrap(), Ok(()));

    // Channel 1 has not moved.
    assert!(matches!(
        up1.try_send(Msg::Watermark(0)),
        Err(mpsc::error::TrySendError::Full(_))
    ));
    assert_eq!(down1.len(), DOWN);
    assert_eq!(a.inflight(), CREDITS as u64);

    // Reading channel 1 drains everything, in order.
    let stalled_for = stalled.elapsed();
    drop(up1);
    for i in 0..accepted {
        match within("channel 1's batch", down1.recv()).await {
            Some(Msg::Batch(got)) => assert_eq!(got.columns, batch(i, 4).columns, "batch {i}"),
            Some(other) => panic!("message {i} on channel 1: {}", name(&other)),
            None => panic!("channel 1 closed after {i} batches"),
        }
    }
    assert!(within("channel 1's end", down1.recv()).await.is_none());
    assert_eq!(within("sender 1", sender1).await.unwrap(), Ok(()));
    assert_eq!(a.inflight(), 0);
    // Channel 1 waited for credit at least while channel 2 ran.
    let wait = Duration::from_nanos(stats(&a, "tm-b", Direction::Out).credit_wait_ns);
    assert!(wait >= stalled_for, "{wait:?} < {stalled_for:?}");
    assert_eq!(a.credit_wait(), wait);
}

#[tokio::test]
async fn an_open_waits_for_the_registration_and_is_refused_without_one_or_twice() {
    let b = node("tm-b", cfg(4)).await;
    let a = Exchange::new("tm-a", cfg(4), None);

    // The open comes first; the registration within the timeout.
    let (up_tx, up_rx) = mpsc::channel(8);
    let sender = a.connect(&b.url, key("d", 0, 1), up_rx, CancellationToken::new());
    until("the open to wait", || b.ex.pending_opens() == 1).await;
    let (down_tx, mut down_rx) = mpsc::channel(8);
    let _inbound = b.ex.accept(key("d", 0, 1), schema(), down_tx);
    up_tx.send(Msg::Watermark(7)).await.unwrap();
    assert!(matches!(
        within("the watermark", down_rx.recv()).await,
        Some(Msg::Watermark(7))
    ));
    assert_eq!(b.ex.pending_opens(), 0);

    // A second open of the same channel is refused; the first carries on.
    let mut raw = ExchangeClient::connect(b.url.clone()).await.unwrap();
    let open = open_frame(&key("d", 0, 1));
    let refused = within(
        "the second open",
        raw.channel(futures::stream::iter([open])),
    )
    .await
    .unwrap_err();
    assert_eq!(refused.code(), Code::AlreadyExists, "{refused:?}");
    assert!(
        refused
            .message()
            .contains("deployment d stage 1: subtask 0 -> 1"),
        "{refused:?}"
    );
    up_tx.send(Msg::Watermark(8)).await.unwrap();
    assert!(matches!(
        within("the next watermark", down_rx.recv()).await,
        Some(Msg::Watermark(8))
    ));
    drop(up_tx);
    assert!(within("the end", down_rx.recv()).await.is_none());
    assert_eq!(within("the sender", sender).await.unwrap(), Ok(()));

    // A channel never registered: NOT_FOUND after the timeout, and the
    // upstream task's channel is closed.
    let short = node(
        "tm-c",
        LinkConfig {
            open_timeout: Duration::from_millis(200),
            ..LinkConfig::default()
        },
    )
    .await;
    let (up_tx, up_rx) = mpsc::channel(8);
    let started = std::time::Instant::now();
    let sender = a.connect(
        &short.url,
        key("nowhere", 3, 4),
        up_rx,
        CancellationToken::new(),
    );
    let err = within("the refusal", sender).await.unwrap().unwrap_err();
    assert!(
        err.contains("NotFound") && err.contains("deployment nowhere stage 1: subtask 3 -> 4"),
        "{err}"
    );
    assert!(started.elapsed() >= Duration::from_millis(200));
    within("the upstream channel to close", up_tx.closed()).await;
    assert!(up_tx.send(Msg::Watermark(1)).await.is_err());
}

fn open_frame(k: &ChannelKey) -> ExchangeFrame {
    ExchangeFrame {
        frame: Some(Frame::Open(proto::ChannelOpen {
            deployment: k.deployment.clone(),
            stage: k.stage,
            from: k.from,
            to: k.to,
            from_taskmanager: "tm-raw".into(),
        })),
    }
}

fn frame(f: Frame) -> ExchangeFrame {
    ExchangeFrame { frame: Some(f) }
}

/// Sends `frames` on a raw call to `url` and returns how the call ended.
async fn raw_call(url: &str, frames: Vec<ExchangeFrame>) -> tonic::Status {
    let mut client = ExchangeClient::connect(url.to_string()).await.unwrap();
    match within("the call", client.channel(futures::stream::iter(frames))).await {
        Err(s) => s,
        Ok(r) => {
            let mut credits = r.into_inner();
            loop {
                match within("the call's end", credits.message()).await {
                    Ok(Some(_)) => continue,
                    Ok(None) => panic!("the call ended with OK"),
                    Err(s) => return s,
                }
            }
        }
    }
}

#[tokio::test]
async fn malformed_frames_fail_the_downstream_task_with_a_reason() {
    let b = node("tm-b", cfg(2)).await;
    let wm = |w| frame(Frame::Watermark(w));
    let end = || frame(Frame::End(proto::ChannelEnd {}));

    // Garbage where the IPC bytes go.
    let k = key("bad", 0, 0);
    let (tx, mut rx) = mpsc::channel(8);
    let _i = b.ex.accept(k.clone(), schema(), tx);
    let garbage = frame(Frame::Batch(proto::IpcBatch {
        new_stream: true,
        ipc: bytes::Bytes::from_static(b"\xff\xff\xff\xffnot arrow at all"),
    }));
    let status = raw_call(&b.url, vec![open_frame(&k), wm(1), garbage]).await;
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(matches!(
        within("the watermark", rx.recv()).await,
        Some(Msg::Watermark(1))
    ));
    let why = fail_of(&mut rx).await;
    assert!(
        why.contains("deployment bad stage 1: subtask 0 -> 0")
            && why.contains("tm-raw")
            && why.contains("a batch that does not decode"),
        "{why}"
    );
    assert!(within("the close", rx.recv()).await.is_none());

    // A frame before open: no channel is named, the call is refused, and
    // the channel it did not name opens normally afterwards.
    let k = key("early", 0, 0);
    let (tx, mut rx) = mpsc::channel(8);
    let _i = b.ex.accept(k.clone(), schema(), tx);
    let status = raw_call(&b.url, vec![wm(1), open_frame(&k)]).await;
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(
        status
            .message()
            .contains("must be open, not a watermark frame"),
        "{status:?}"
    );
    // An open naming a deployment too long to be one.
    let status = raw_call(&b.url, vec![open_frame(&key(&"d".repeat(300), 0, 0))]).await;
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(status.message().contains("over 256 bytes"), "{status:?}");
    // A frame after end.
    let status = raw_call(&b.url, vec![open_frame(&k), end(), wm(2)]).await;
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    let why = fail_of(&mut rx).await;
    assert!(
        why.contains("deployment early") && why.contains("a watermark frame after the end frame"),
        "{why}"
    );
    assert!(within("the close", rx.recv()).await.is_none());

    // More frames than credits (2), the downstream channel (1) not read.
    let k = key("greedy", 0, 0);
    let (tx, mut rx) = mpsc::channel(1);
    let _i = b.ex.accept(k.clone(), schema(), tx);
    let status = raw_call(&b.url, vec![open_frame(&k), wm(1), wm(2), wm(3), wm(4)]).await;
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(
        status.message().contains("beyond the 2 credits"),
        "{status:?}"
    );
    assert!(matches!(rx.recv().await, Some(Msg::Watermark(1))));
    let why = fail_of(&mut rx).await;
    assert!(why.contains("beyond the 2 credits"), "{why}");

    // A stream that ends without end; a barrier of an unknown kind; a
    // batch of another plan's fields; a second open.
    let other_plan = {
        let mut b = batch(0, 3);
        b.schema = Arc::new(Schema::new([
            ("user".to_string(), DataType::String),
            ("m".to_string(), DataType::Int),
            ("x".to_string(), DataType::Any),
        ]));
        let m = BatchEncoder::new().encode(b.clone()).unwrap();
        frame(Frame::Batch(proto::IpcBatch {
            new_stream: m.new_stream,
            ipc: m.bytes,
        }))
    };
    let cases: Vec<(&str, Vec<ExchangeFrame>, &str)> = vec![
        ("cut", vec![wm(5)], "ended without an end frame"),
        (
            "kind",
            vec![frame(Frame::Barrier(proto::BarrierFrame {
                id: 3,
                kind: 17,
                close_txn: false,
                stop: false,
                dir: "file:///tmp".into(),
            }))],
            "unknown snapshot kind 17",
        ),
        ("plan", vec![other_plan], "different plans"),
        (
            "reopen",
            vec![open_frame(&key("x", 0, 0))],
            "a second open frame",
        ),
        (
            "empty",
            vec![ExchangeFrame { frame: None }],
            "an empty frame",
        ),
        (
            "no-items",
            vec![frame(Frame::Run(proto::Run { items: vec![] }))],
            "a run of 0 items",
        ),
        (
            "many-items",
            vec![frame(Frame::Run(proto::Run {
                items: (0..1025)
                    .map(|w| proto::RunItem {
                        item: Some(proto::run_item::Item::Watermark(w)),
                    })
                    .collect(),
            }))],
            "a run of 1025 items",
        ),
        (
            "empty-item",
            vec![frame(Frame::Run(proto::Run {
                items: vec![proto::RunItem { item: None }],
            }))],
            "an empty item in a run",
        ),
    ];
    for (d, frames, reason) in cases {
        let k = key(d, 0, 0);
        let (tx, mut rx) = mpsc::channel(8);
        let _i = b.ex.accept(k.clone(), schema(), tx);
        let mut all = vec![open_frame(&k)];
        all.extend(frames);
        let status = raw_call(&b.url, all).await;
        assert!(
            matches!(status.code(), Code::InvalidArgument),
            "{d}: {status:?}"
        );
        let why = fail_of(&mut rx).await;
        assert!(
            why.contains(reason) && why.contains(&k.to_string()),
            "{d}: {why}"
        );
    }
}

#[tokio::test]
async fn a_closed_receiving_end_fails_both_tasks() {
    let b = node("tm-b", cfg(4)).await;
    let a = Exchange::new("tm-a", cfg(4), None);
    let k = key("d", 2, 3);
    let (down_tx, down_rx) = mpsc::channel(8);
    let inbound = b.ex.accept(k.clone(), schema(), down_tx);
    let task = common::downstream_task(vec![down_rx], Vec::new());
    let (up_tx, up_rx) = mpsc::channel(8);
    let sender = a.connect(&b.url, k.clone(), up_rx, CancellationToken::new());
    up_tx.send(Msg::Watermark(5)).await.unwrap();
    until("the channel to open", || {
        b.ex.stats()
            .iter()
            .any(|s| s.channels == 1 && s.frames == 1)
    })
    .await;

    drop(inbound);
    let ended = within("the downstream task", task).await.unwrap();
    match ended {
        Err(TaskError::Transient(why)) => assert!(
            why.contains(&k.to_string()) && why.contains("tm-a") && why.contains("closed"),
            "{why}"
        ),
        other => panic!("the downstream task ended with {other:?}"),
    }
    let err = within("the sender", sender).await.unwrap().unwrap_err();
    assert!(err.contains("Aborted"), "{err}");
    within("the upstream channel to close", up_tx.closed()).await;
    assert!(up_tx.send(Msg::Watermark(6)).await.is_err());
}

#[tokio::test]
async fn a_cut_connection_fails_both_ends() {
    let b = node("tm-b", cfg(4)).await;
    let a = Exchange::new("tm-a", cfg(4), None);
    let proxy = FaultProxy::start(b.port).await;
    let k = key("d", 0, 0);
    let (down_tx, mut down_rx) = mpsc::channel(8);
    let _inbound = b.ex.accept(k.clone(), schema(), down_tx);
    let (up_tx, up_rx) = mpsc::channel(8);
    let url = format!("http://127.0.0.1:{}", proxy.port);
    let sender = a.connect(&url, k.clone(), up_rx, CancellationToken::new());
    up_tx.send(Msg::Batch(batch(1, 10))).await.unwrap();
    assert!(matches!(
        within("the batch", down_rx.recv()).await,
        Some(Msg::Batch(_))
    ));

    // The receiving TaskManager's connections are reset.
    proxy.refuse();
    let why = fail_of(&mut down_rx).await;
    assert!(
        why.contains(&k.to_string()) && why.contains("tm-a") && why.contains("call failed"),
        "{why}"
    );
    assert!(within("the close", down_rx.recv()).await.is_none());
    let err = within("the sender", sender).await.unwrap().unwrap_err();
    assert!(err.contains("broke"), "{err}");
    within("the upstream channel to close", up_tx.closed()).await;
}

#[tokio::test]
async fn a_silent_peer_is_found_dead_by_keepalive() {
    let b = node("tm-b", cfg(4)).await;
    let a = Exchange::new("tm-a", cfg(4), None);
    let proxy = FaultProxy::start(b.port).await;
    let k = key("d", 0, 0);
    let (down_tx, mut down_rx) = mpsc::channel(8);
    let _inbound = b.ex.accept(k.clone(), schema(), down_tx);
    let (up_tx, up_rx) = mpsc::channel(8);
    let url = format!("http://127.0.0.1:{}", proxy.port);
    let sender = a.connect(&url, k.clone(), up_rx, CancellationToken::new());
    up_tx.send(Msg::Watermark(1)).await.unwrap();
    assert!(matches!(
        within("the watermark", down_rx.recv()).await,
        Some(Msg::Watermark(1))
    ));

    // Packets vanish; both ends stay open.
    proxy.cut();
    let why = fail_of(&mut down_rx).await;
    assert!(why.contains(&k.to_string()), "{why}");
    let err = within("the sender", sender).await.unwrap().unwrap_err();
    assert!(err.contains("broke"), "{err}");
    within("the upstream channel to close", up_tx.closed()).await;
}

#[tokio::test]
async fn cancel_and_unusable_addresses_drop_the_upstream_channel() {
    let b = node("tm-b", cfg(4)).await;
    let a = Exchange::new("tm-a", cfg(4), None);
    // Cancelled mid-channel: the receiver fails too.
    let k = key("d", 0, 0);
    let (down_tx, mut down_rx) = mpsc::channel(8);
    let _inbound = b.ex.accept(k.clone(), schema(), down_tx);
    let (up_tx, up_rx) = mpsc::channel(8);
    let cancel = CancellationToken::new();
    let sender = a.connect(&b.url, k.clone(), up_rx, cancel.clone());
    up_tx.send(Msg::Watermark(1)).await.unwrap();
    assert!(matches!(
        within("the watermark", down_rx.recv()).await,
        Some(Msg::Watermark(1))
    ));
    cancel.cancel();
    let err = within("the sender", sender).await.unwrap().unwrap_err();
    assert!(err.contains("cancelled"), "{err}");
    within("the upstream channel to close", up_tx.closed()).await;
    let why = fail_of(&mut down_rx).await;
    assert!(why.contains(&k.to_string()), "{why}");

    // Nothing listens there: refused at once.
    let closed = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let dead = format!("http://{}", closed.local_addr().unwrap());
    drop(closed);
    for url in [dead.as_str(), "https://127.0.0.1:1", "ftp://127.0.0.1:1"] {
        let (up_tx, up_rx) = mpsc::channel(8);
        let err = within(
            "the refusal",
            a.connect(url, key("d", 9, 9), up_rx, CancellationToken::new()),
        )
        .await
        .unwrap()
        .unwrap_err();
        assert!(!err.is_empty());
        within("the upstream channel to close", up_tx.closed()).await;
    }

    // A Fail on the sending side is a bug: the channel ends.
    let k = key("d", 5, 5);
    let (down_tx, mut down_rx) = mpsc::channel(8);
    let _inbound = b.ex.accept(k.clone(), schema(), down_tx);
    let (up_tx, up_rx) = mpsc::channel(8);
    let sender = a.connect(&b.url, k.clone(), up_rx, CancellationToken::new());
    up_tx.send(Msg::Fail("oops".into())).await.unwrap();
    let err = within("the sender", sender).await.unwrap().unwrap_err();
    assert!(err.contains("Fail message"), "{err}");
    let why = fail_of(&mut down_rx).await;
    assert!(why.contains(&k.to_string()), "{why}");
}

/// TLS files of a leaf.
fn files(leaf: &Leaf) -> TlsFiles {
    TlsFiles::new("exchange", &leaf.cert, &leaf.key, &leaf.ca)
}

const HOUR: Duration = Duration::from_secs(3600);
/// The name in every TaskManager's certificate.
const TM_NAME: &str = "taskmanager.ferry";

fn tls_client(id: &str, leaf: &Leaf) -> Exchange {
    let tls = ClientTls::load(files(leaf), &[b"h2"], HOUR).unwrap();
    Exchange::new(
        id,
        cfg(4),
        Some(Connector::new(tls, Some(TM_NAME.to_string()))),
    )
}

#[tokio::test]
async fn channels_run_over_mutual_tls_for_taskmanager_certificates_only() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path(), "region");
    let server_leaf = pki.issue("tm-b", &[TM_NAME]);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let tls = ServerTls::load(
        files(&server_leaf),
        ClientAuth::RequiredNamed(TM_NAME.to_string()),
        &[b"h2"],
        HOUR,
    )
    .unwrap();
    let refused = Arc::new(AtomicU64::new(0));
    let counted = refused.clone();
    let incoming = ferry_core::tls::incoming(
        listener,
        tls,
        Arc::new(move || {
            counted.fetch_add(1, Ordering::Relaxed);
        }),
    );
    let b = Exchange::new("tm-b", cfg(4), None);
    let service = b.service();
    let server = tokio::spawn(async move {
        let _ = Exchange::server_builder()
            .add_service(service)
            .serve_with_incoming(incoming)
            .await;
    });
    let url = format!("https://127.0.0.1:{port}");

    // A TaskManager's certificate: the channel works.
    let a = tls_client("tm-a", &pki.issue("tm-a", &[TM_NAME]));
    let k = key("d", 0, 0);
    let (down_tx, mut down_rx) = mpsc::channel(8);
    let _inbound = b.accept(k.clone(), schema(), down_tx);
    let (up_tx, up_rx) = mpsc::channel(8);
    let sender = a.connect(&url, k.clone(), up_rx, CancellationToken::new());
    up_tx.send(Msg::Batch(batch(1, 50))).await.unwrap();
    up_tx.send(Msg::Watermark(9)).await.unwrap();
    drop(up_tx);
    match within("the batch", down_rx.recv()).await {
        Some(Msg::Batch(got)) => assert_eq!(got.columns, batch(1, 50).columns),
        other => panic!("{:?}", other.map(|m| name(&m))),
    }
    assert!(matches!(
        within("the watermark", down_rx.recv()).await,
        Some(Msg::Watermark(9))
    ));
    assert!(within("the end", down_rx.recv()).await.is_none());
    assert_eq!(within("the sender", sender).await.unwrap(), Ok(()));

    // A certificate of the same CA without the TaskManagers' name (a
    // JobManager's): refused.
    let jm = tls_client("jm", &pki.issue("jm", &["jobmanager.ferry"]));
    let k = key("d", 1, 0);
    let (down_tx, mut down_rx) = mpsc::channel(8);
    let _inbound = b.accept(k.clone(), schema(), down_tx);
    let (up_tx, up_rx) = mpsc::channel(8);
    let err = within(
        "the refusal",
        jm.connect(&url, k.clone(), up_rx, CancellationToken::new()),
    )
    .await
    .unwrap()
    .unwrap_err();
    assert!(err.contains("did not open"), "{err}");
    within("the upstream channel to close", up_tx.closed()).await;
    until("the refusal to be counted", || {
        refused.load(Ordering::Relaxed) >= 1
    })
    .await;
    assert!(down_rx.try_recv().is_err());

    // With TLS set, a plaintext address is not dialed.
    let (_up_tx, up_rx) = mpsc::channel(8);
    let err = within(
        "the refusal",
        a.connect(
            &format!("http://127.0.0.1:{port}"),
            k,
            up_rx,
            CancellationToken::new(),
        ),
    )
    .await
    .unwrap()
    .unwrap_err();
    assert!(err.contains("plaintext"), "{err}");
    server.abort();
}

/// Throughput of one channel on loopback, 1024-row batches; run with
/// `cargo test --release -p ferry-taskmanager --test link -- --ignored
/// --nocapture throughput` (`FERRY_LINK_CREDITS` sets the credits, 8 by
/// default).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement, not a check"]
async fn throughput() {
    let credits: u32 = std::env::var("FERRY_LINK_CREDITS")
        .ok()
        .and_then(|c| c.parse().ok())
        .unwrap_or(8);
    let b = node("tm-b", cfg(credits)).await;
    let a = Exchange::new("tm-a", cfg(credits), None);
    let k = key("d", 0, 0);
    let (down_tx, mut down_rx) = mpsc::channel(8);
    let _inbound = b.ex.accept(k.clone(), schema(), down_tx);
    let (up_tx, up_rx) = mpsc::channel(8);
    let sender = a.connect(&b.url, k, up_rx, CancellationToken::new());
    let one = {
        let mut b = batch(0, 1024);
        b.columns[2] = Column::Float((0..1024).map(|r| r as f64).collect());
        b
    };
    const N: usize = 20_000;
    let started = std::time::Instant::now();
    let producer = tokio::spawn(async move {
        for _ in 0..N {
            up_tx.send(Msg::Batch(one.clone())).await.unwrap();
        }
    });
    let mut n = 0;
    while let Some(m) = down_rx.recv().await {
        if let Msg::Batch(_) = m {
            n += 1;
        }
    }
    let took = started.elapsed();
    producer.await.unwrap();
    sender.await.unwrap().unwrap();
    assert_eq!(n, N);
    let bytes = stats(&a, "tm-b", Direction::Out).bytes as f64;
    println!(
        "{N} batches of 1024 rows in {took:?}: {:.0} batches/s, {:.1} MB/s of Arrow IPC, credit wait {:?}",
        N as f64 / took.as_secs_f64(),
        bytes / took.as_secs_f64() / 1e6,
        a.credit_wait()
    );
}
