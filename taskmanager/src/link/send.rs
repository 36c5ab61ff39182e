//! The sending end of the exchange's channels
//! ([`Exchange::connect`](super::Exchange::connect)): one HTTP/2 connection
//! per peer URL, and per channel a `Channel` call that sends what the
//! upstream task's channel yields, one frame per credit. Batches and
//! watermarks already queued behind the one a credit takes travel with it
//! as one `run` frame (up to `run_items` of them and about
//! [`RUN_BYTES`]): fewer frames for the same records, and nothing waits to
//! fill a run.
//!
//! Invariant: a sender takes a message from the upstream task's channel
//! only when it holds a credit for it, so a stalled channel holds nothing
//! beyond its upstream channel and its credits; and whenever it stops
//! short of the peer's OK it drops that channel, so the upstream task
//! fails.

use std::sync::atomic::Ordering;
use std::time::Instant;

use ferry_core::proto;
use ferry_core::proto::exchange_client::ExchangeClient;
use ferry_core::proto::exchange_frame::Frame;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tonic::Streaming;
use tonic::transport::{Channel, Endpoint};

use super::{
    CONNECT_TIMEOUT, CONNECTION_WINDOW, ChannelKey, Counters, Direction, FRAME_SLACK, Gauge, Inner,
    KEEPALIVE_INTERVAL, KEEPALIVE_TIMEOUT, OPEN_MARGIN, PEER_HEADER, STREAM_WINDOW, lock,
    status_text,
};
use crate::exchange::BatchEncoder;
use crate::protocol::Msg;
use crate::wire::kind_to_proto;

impl Inner {
    /// The connection to the peer at `url`, made on first use.
    fn channel(&self, url: &str) -> Result<Channel, String> {
        let mut peers = lock(&self.peers);
        if let Some(c) = peers.get(url) {
            return Ok(c.clone());
        }
        let https = url.starts_with("https://");
        if !https && !url.starts_with("http://") {
            return Err(format!(
                "the exchange address {url:?} is neither http:// nor https://"
            ));
        }
        let endpoint = Endpoint::from_shared(url.to_string())
            .map_err(|e| format!("the exchange address {url:?} is unusable: {e}"))?
            .connect_timeout(CONNECT_TIMEOUT)
            .tcp_nodelay(true)
            .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
            .keep_alive_timeout(KEEPALIVE_TIMEOUT)
            .initial_stream_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONNECTION_WINDOW);
        let channel = match (&self.tls, https) {
            (Some(tls), true) => endpoint.connect_with_connector_lazy(tls.clone()),
            (None, false) => endpoint.connect_lazy(),
            (Some(_), false) => {
                return Err(format!(
                    "the peer's exchange address {url} is plaintext but TLS is set here: not dialing it (set TLS on the peer too)"
                ));
            }
            (None, true) => {
                return Err(format!(
                    "the peer's exchange address {url} is https but TLS is not set here: not dialing it (set TLS on this TaskManager too)"
                ));
            }
        };
        peers.insert(url.to_string(), channel.clone());
        Ok(channel)
    }
}

/// Returns the frames a sender has in flight to the exchange's count when
/// its channel ends.
struct InFlight<'a> {
    inner: &'a Inner,
    n: u64,
}

impl InFlight<'_> {
    fn sent(&mut self) {
        self.n += 1;
        self.inner.inflight.fetch_add(1, Ordering::Relaxed);
    }

    fn credited(&mut self, grant: u32) {
        let back = self.n.min(u64::from(grant));
        self.n -= back;
        self.inner.inflight.fetch_sub(back, Ordering::Relaxed);
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.inner.inflight.fetch_sub(self.n, Ordering::Relaxed);
    }
}

/// Stop adding to a run once its batches hold this many bytes.
pub(super) const RUN_BYTES: usize = 256 * 1024;

/// What a sender sends next.
enum Next {
    /// A message of the upstream task (`None`: it finished).
    Msg(Option<Msg>),
    /// A frame already encoded: the batch that did not fit in the run
    /// before it.
    Frame(Frame),
}

/// The frame that carries `first` and, when it is a batch or a watermark,
/// the batches and watermarks queued behind it. A message taken that does
/// not join the run is left in `held`, to go next.
fn gather(
    first: Option<Msg>,
    rx: &mut mpsc::Receiver<Msg>,
    held: &mut Option<Next>,
    encoder: &mut BatchEncoder,
    counters: &Counters,
    max_message: usize,
    run_items: usize,
) -> Result<Frame, String> {
    let joins = |m: &Msg| matches!(m, Msg::Batch(_) | Msg::Watermark(_));
    if !first.as_ref().is_some_and(joins) {
        return frame(first, encoder, counters, max_message);
    }
    let first = frame(first, encoder, counters, max_message)?;
    let mut bytes = frame_bytes(&first);
    let mut items = vec![first];
    while items.len() < run_items && bytes < RUN_BYTES {
        let m = match rx.try_recv() {
            Ok(m) if joins(&m) => m,
            Ok(m) => {
                *held = Some(Next::Msg(Some(m)));
                break;
            }
            Err(mpsc::error::TryRecvError::Empty) => break,
            Err(mpsc::error::TryRecvError::Disconnected) => {
                *held = Some(Next::Msg(None));
                break;
            }
        };
        let f = frame(Some(m), encoder, counters, max_message)?;
        let size = frame_bytes(&f);
        if bytes + size > max_message {
            // Encoded already (the encoder's stream moved on): it goes
            // alone, next.
            *held = Some(Next::Frame(f));
            break;
        }
        bytes += size;
        items.push(f);
    }
    if items.len() == 1 {
        return Ok(items.pop().expect("one item"));
    }
    let items = items
        .into_iter()
        .map(|f| proto::RunItem {
            item: Some(match f {
                Frame::Batch(b) => proto::run_item::Item::Batch(b),
                Frame::Watermark(w) => proto::run_item::Item::Watermark(w),
                _ => unreachable!("only batches and watermarks join a run"),
            }),
        })
        .collect();
    Ok(Frame::Run(proto::Run { items }))
}

/// The IPC bytes a frame carries.
fn frame_bytes(f: &Frame) -> usize {
    match f {
        Frame::Batch(b) => b.ipc.len(),
        _ => 0,
    }
}

/// The frame that carries `msg` (`None`: the upstream task finished).
fn frame(
    msg: Option<Msg>,
    encoder: &mut BatchEncoder,
    counters: &Counters,
    max_message: usize,
) -> Result<Frame, String> {
    Ok(match msg {
        None => Frame::End(proto::ChannelEnd {}),
        Some(Msg::Batch(b)) => {
            let rows = b.len();
            let m = encoder.encode(b).map_err(|e| e.to_string())?;
            if m.bytes.len() > max_message {
                return Err(format!(
                    "a batch of {} rows is {} bytes as Arrow IPC, over the exchange's bound of {max_message}",
                    rows,
                    m.bytes.len(),
                ));
            }
            counters.batch(rows, m.bytes.len());
            Frame::Batch(proto::IpcBatch {
                new_stream: m.new_stream,
                ipc: m.bytes,
            })
        }
        Some(Msg::Watermark(w)) => Frame::Watermark(w),
        Some(Msg::Barrier(b)) => Frame::Barrier(proto::BarrierFrame {
            id: b.id.0,
            kind: kind_to_proto(b.kind) as i32,
            close_txn: b.close_txn,
            stop: b.stop,
            dir: b.dir.url().to_string(),
        }),
        Some(Msg::Fail(why)) => {
            return Err(format!(
                "a Fail message reached the sending end of a channel (only a receiving end makes them): {why}"
            ));
        }
    })
}

/// Why a call ended whose request stream tonic dropped: its response says.
async fn call_end(credits: &mut Streaming<proto::ExchangeCredit>) -> String {
    loop {
        match tokio::time::timeout(KEEPALIVE_TIMEOUT, credits.message()).await {
            Ok(Ok(Some(_))) => continue,
            Ok(Ok(None)) => return "the peer ended the call before the channel's end".into(),
            Ok(Err(s)) => return format!("the channel broke ({})", status_text(&s)),
            Err(_) => return "the call's request stream closed".into(),
        }
    }
}

/// The sending end of one channel ([`Exchange::connect`]).
pub(super) async fn send_channel(
    inner: &Inner,
    url: &str,
    key: &ChannelKey,
    mut rx: mpsc::Receiver<Msg>,
    cancel: &CancellationToken,
) -> Result<(), String> {
    let cfg = &inner.cfg;
    let channel = inner.channel(url)?;
    let mut client = ExchangeClient::new(channel)
        .max_encoding_message_size(cfg.max_message.saturating_add(FRAME_SLACK))
        .max_decoding_message_size(FRAME_SLACK);
    // The request stream: one frame waits for tonic at most (credits bound
    // the frames in flight, not this queue).
    let (req_tx, req_rx) = mpsc::channel::<proto::ExchangeFrame>(1);
    let open = proto::ExchangeFrame {
        frame: Some(Frame::Open(proto::ChannelOpen {
            deployment: key.deployment.clone(),
            stage: key.stage,
            from: key.from,
            to: key.to,
            from_taskmanager: inner.id.clone(),
        })),
    };
    req_tx
        .try_send(open)
        .map_err(|_| "the request stream is full before open".to_string())?;
    let answer = cfg.open_timeout + OPEN_MARGIN;
    let call = client.channel(tokio_stream::wrappers::ReceiverStream::new(req_rx));
    let response = tokio::select! {
        _ = cancel.cancelled() => return Err("cancelled before the peer accepted the channel".into()),
        r = tokio::time::timeout(answer, call) => match r {
            Err(_) => return Err(format!("the peer did not answer the open within {answer:?}")),
            Ok(Err(s)) => return Err(format!("the channel did not open ({})", status_text(&s))),
            Ok(Ok(r)) => r,
        },
    };
    let peer = response
        .metadata()
        .get(PEER_HEADER)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
        .unwrap_or_else(|| url.to_string());
    let mut credit_stream = response.into_inner();
    let counters = inner.counters(&peer, Direction::Out);
    let _open = Gauge::up(&counters.channels);
    let mut inflight = InFlight { inner, n: 0 };
    let mut encoder = BatchEncoder::new();
    // `None` once `end` is sent (the request stream ends with it).
    let mut req_tx = Some(req_tx);
    let mut credits: u64 = 0;
    // Since when every credit is in use.
    let mut starved: Option<Instant> = None;
    // Taken from the upstream channel while gathering a run, not part of
    // it: it goes first once a credit allows.
    let mut held: Option<Next> = None;
    loop {
        let next = match held.take() {
            Some(n) if credits > 0 && req_tx.is_some() => Some(n),
            other => {
                held = other;
                None
            }
        };
        let next = match next {
            Some(n) => n,
            None => tokio::select! {
            biased;
            _ = cancel.cancelled() => return Err("cancelled".into()),
            credit = credit_stream.message() => match credit {
                Ok(Some(c)) => {
                    credits = credits.saturating_add(u64::from(c.grant));
                    inflight.credited(c.grant);
                    if c.grant > 0
                        && let Some(since) = starved.take()
                    {
                        let ns = u64::try_from(since.elapsed().as_nanos()).unwrap_or(u64::MAX);
                        counters.credit_wait_ns.fetch_add(ns, Ordering::Relaxed);
                        inner.credit_wait_ns.fetch_add(ns, Ordering::Relaxed);
                    }
                    continue;
                }
                Ok(None) if req_tx.is_none() => return Ok(()),
                Ok(None) => return Err("the peer finished the channel before its end".into()),
                Err(s) => return Err(format!("the channel broke ({})", status_text(&s))),
            },
            msg = rx.recv(), if req_tx.is_some() && credits > 0 && held.is_none() => Next::Msg(msg),
            },
        };
        // Only `Next::Msg(None)` ends the channel.
        let (f, end) = match next {
            Next::Frame(f) => (f, false),
            Next::Msg(msg) => {
                let end = msg.is_none();
                let f = gather(
                    msg,
                    &mut rx,
                    &mut held,
                    &mut encoder,
                    &counters,
                    cfg.max_message,
                    cfg.run_items,
                )?;
                (f, end)
            }
        };
        credits -= 1;
        inflight.sent();
        if credits == 0 {
            starved = Some(Instant::now());
        }
        counters.frames.fetch_add(1, Ordering::Relaxed);
        let f = proto::ExchangeFrame { frame: Some(f) };
        if let Some(tx) = &req_tx {
            tokio::select! {
                biased;
                _ = cancel.cancelled() => return Err("cancelled".into()),
                sent = tx.send(f) => if sent.is_err() {
                    return Err(call_end(&mut credit_stream).await);
                },
            }
        }
        if end {
            req_tx = None;
        }
    }
}
