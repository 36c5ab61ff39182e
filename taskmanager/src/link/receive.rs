//! The receiving end of the exchange's channels: the `Channel` calls peers
//! make, each handing its frames' messages to the downstream task's
//! channel registered by [`Exchange::accept`](super::Exchange::accept),
//! and granting credits back as the downstream task makes room.
//!
//! Invariant: a receiver holds at most `credits` frames a channel's
//! downstream task has not taken (a peer that sends more breaks the
//! channel), and the downstream task's input closes without a
//! [`Msg::Fail`] only after the peer's `end` and the end of its stream.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};

use ferry_core::CheckpointId;
use ferry_core::manifest::SnapshotKind;
use ferry_core::proto::exchange_frame::Frame;
use ferry_core::proto::{self, exchange_server};
use ferry_core::schema::SchemaRef;
use futures::Stream;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};

use crate::task::sleep_until;

use super::{
    ChannelKey, Counters, Direction, Exchange, Gauge, Inner, MAX_NAME, MAX_RUN_ITEMS, PEER_HEADER,
    lock, status_text,
};
use crate::exchange::{BatchDecoder, Message};
use crate::protocol::{Barrier, Msg};

impl Inner {
    /// Takes the sender of `key`, waiting up to `open_timeout` for it to
    /// be registered.
    async fn open(
        &self,
        key: &ChannelKey,
        peer: &str,
    ) -> Result<(SchemaRef, mpsc::Sender<Msg>, CancellationToken), Status> {
        let deadline = tokio::time::Instant::now() + self.cfg.open_timeout;
        let _waiting = Gauge::up(&self.waiting_opens);
        loop {
            let registered = self.registered.notified();
            tokio::pin!(registered);
            // Listen before looking, so a registration in between wakes us.
            registered.as_mut().enable();
            if let Some(slot) = lock(&self.inbound).get_mut(key) {
                return match slot.tx.take() {
                    Some(tx) => Ok((slot.schema.clone(), tx, slot.closed.clone())),
                    None => Err(Status::already_exists(format!(
                        "channel {key} is already open on TaskManager {} (opened again by {peer}): a channel opens once; a broken one fails the job",
                        self.id
                    ))),
                };
            }
            if tokio::time::timeout_at(deadline, registered).await.is_err() {
                return Err(Status::not_found(format!(
                    "no channel {key} was registered on TaskManager {} within {:?} of {peer}'s open: that part of the deployment does not run here",
                    self.id, self.cfg.open_timeout
                )));
            }
        }
    }
}

/// The credits a receiver grants, and how its call ends, shared between
/// the task that runs the channel and the response stream tonic polls.
#[derive(Default)]
struct Grants {
    state: Mutex<GrantState>,
}

#[derive(Default)]
struct GrantState {
    /// Granted and not yet sent.
    pending: u32,
    end: CallEnd,
    waker: Option<Waker>,
}

/// How far a call is from its end.
#[derive(Default)]
enum CallEnd {
    #[default]
    Running,
    /// The channel ended so; the response stream has yet to say it.
    Due(Result<(), Status>),
    /// The response stream has ended.
    Told,
}

impl Grants {
    fn grant(&self, n: u32) {
        let mut s = lock(&self.state);
        s.pending = s.pending.saturating_add(n);
        if let Some(w) = s.waker.take() {
            w.wake();
        }
    }

    /// Ends the call (the first end counts).
    fn finish(&self, end: Result<(), Status>) {
        let mut s = lock(&self.state);
        if let CallEnd::Running = s.end {
            s.end = CallEnd::Due(end);
        }
        if let Some(w) = s.waker.take() {
            w.wake();
        }
    }
}

/// Ends the call with an error if the channel's task ends without saying
/// how (it cannot, short of a bug: a peer must not wait for nothing).
struct FinishOnDrop(Arc<Grants>);

impl Drop for FinishOnDrop {
    fn drop(&mut self) {
        self.0.finish(Err(Status::internal(
            "the exchange channel's receiver stopped",
        )));
    }
}

/// The response of a `Channel` call: credits, then how it ended.
pub struct GrantStream(Arc<Grants>);

impl Stream for GrantStream {
    type Item = Result<proto::ExchangeCredit, Status>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let mut s = lock(&self.0.state);
        match std::mem::replace(&mut s.end, CallEnd::Told) {
            CallEnd::Told => return Poll::Ready(None),
            // Credits granted after the end are of no use to the sender.
            CallEnd::Due(end) => return Poll::Ready(end.err().map(Err)),
            CallEnd::Running => s.end = CallEnd::Running,
        }
        if s.pending > 0 {
            let grant = std::mem::take(&mut s.pending);
            return Poll::Ready(Some(Ok(proto::ExchangeCredit { grant })));
        }
        s.waker = Some(cx.waker().clone());
        Poll::Pending
    }
}

fn frame_name(f: &Option<Frame>) -> &'static str {
    match f {
        None => "an empty frame",
        Some(Frame::Open(_)) => "an open frame",
        Some(Frame::Batch(_)) => "a batch frame",
        Some(Frame::Watermark(_)) => "a watermark frame",
        Some(Frame::Barrier(_)) => "a barrier frame",
        Some(Frame::End(_)) => "an end frame",
        Some(Frame::Run(_)) => "a run frame",
    }
}

#[tonic::async_trait]
impl exchange_server::Exchange for Exchange {
    type ChannelStream = GrantStream;

    async fn channel(
        &self,
        req: Request<Streaming<proto::ExchangeFrame>>,
    ) -> Result<Response<GrantStream>, Status> {
        let inner = &self.inner;
        let mut frames = req.into_inner();
        let first = match tokio::time::timeout(inner.cfg.open_timeout, frames.message()).await {
            Err(_) => {
                return Err(Status::deadline_exceeded(format!(
                    "no open frame within {:?}",
                    inner.cfg.open_timeout
                )));
            }
            Ok(Err(s)) => return Err(s),
            Ok(Ok(None)) => {
                return Err(Status::invalid_argument(
                    "the channel's stream ended before its open frame",
                ));
            }
            Ok(Ok(Some(f))) => f.frame,
        };
        let open = match first {
            Some(Frame::Open(o)) => o,
            other => {
                // No channel is named yet: there is no downstream task to
                // fail; the sender learns from the status.
                return Err(Status::invalid_argument(format!(
                    "the first frame of an exchange channel must be open, not {}",
                    frame_name(&other)
                )));
            }
        };
        if open.deployment.len() > MAX_NAME || open.from_taskmanager.len() > MAX_NAME {
            return Err(Status::invalid_argument(format!(
                "an open frame naming a deployment or TaskManager of over {MAX_NAME} bytes"
            )));
        }
        let key = ChannelKey {
            deployment: open.deployment,
            stage: open.stage,
            from: open.from,
            to: open.to,
        };
        let peer = match open.from_taskmanager {
            p if p.is_empty() => "an unnamed TaskManager".to_string(),
            p => p,
        };
        let (schema, tx, closed) = inner.open(&key, &peer).await?;
        let grants = Arc::new(Grants::default());
        grants.grant(inner.cfg.credits);
        let receiver = Receiver {
            inner: inner.clone(),
            counters: inner.counters(&peer, Direction::In),
            key,
            peer,
            decoder: BatchDecoder::new(schema, inner.cfg.max_message),
            grants: grants.clone(),
        };
        tokio::spawn(receiver.run(frames, tx, closed));
        let mut response = Response::new(GrantStream(grants));
        if let Ok(v) = inner.id.parse() {
            response.metadata_mut().insert(PEER_HEADER, v);
        }
        Ok(response)
    }
}

/// Where a channel's stream is.
enum Phase {
    /// Frames come.
    Open,
    /// `end` came; the stream must end by then.
    Ended(tokio::time::Instant),
    /// The stream ended after `end`.
    Finished,
}

/// Why a channel's receiving end broke.
enum Broken {
    /// Its [`Inbound`] was dropped.
    Closed,
    /// The downstream task dropped its receiver.
    DownstreamGone,
    /// The peer broke the protocol.
    Peer(String),
    /// The call failed (the connection was lost, the peer reset it).
    Link(Status),
}

/// The receiving end of one open channel.
struct Receiver {
    inner: Arc<Inner>,
    counters: Arc<Counters>,
    key: ChannelKey,
    peer: String,
    decoder: BatchDecoder,
    grants: Arc<Grants>,
}

impl Receiver {
    async fn run(
        mut self,
        frames: Streaming<proto::ExchangeFrame>,
        tx: mpsc::Sender<Msg>,
        closed: CancellationToken,
    ) {
        let _finish = FinishOnDrop(self.grants.clone());
        let counters = self.counters.clone();
        let _open = Gauge::up(&counters.channels);
        match self.pump(frames, &tx, &closed).await {
            Ok(()) => {
                // The downstream task sees its input close, then the peer
                // its call end.
                drop(tx);
                self.grants.finish(Ok(()));
            }
            Err(broken) => {
                let (status, cause) = match broken {
                    Broken::Closed => (
                        Status::aborted(format!(
                            "the receiving end of exchange channel {} on TaskManager {} was closed",
                            self.key, self.inner.id
                        )),
                        "its receiving end was closed".to_string(),
                    ),
                    Broken::DownstreamGone => (
                        Status::aborted(format!(
                            "the downstream task of exchange channel {} on TaskManager {} is gone",
                            self.key, self.inner.id
                        )),
                        "the downstream task is gone".to_string(),
                    ),
                    Broken::Peer(why) => (Status::invalid_argument(why.clone()), why),
                    Broken::Link(s) => (
                        Status::unavailable(s.message().to_string()),
                        format!("the call failed ({})", status_text(&s)),
                    ),
                };
                self.grants.finish(Err(status));
                let reason = format!(
                    "exchange channel {} from TaskManager {} broke: {cause}",
                    self.key, self.peer
                );
                tracing::warn!(channel = %self.key, peer = %self.peer, "exchange channel broke: {cause}; its downstream task fails");
                // In order after everything handed over before; waits for
                // room while the downstream task lives (its receiver
                // dropped ends the wait), as any upstream task's send does.
                let _ = tx.send(Msg::Fail(reason)).await;
            }
        }
    }

    /// Reads frames as they come (at most `credits` ahead of the
    /// downstream task) and hands their messages to `tx` in order, granting
    /// a credit back for each. `Ok` after `end` and the end of the stream,
    /// with everything handed over.
    async fn pump(
        &mut self,
        mut frames: Streaming<proto::ExchangeFrame>,
        tx: &mpsc::Sender<Msg>,
        closed: &CancellationToken,
    ) -> Result<(), Broken> {
        let credits = self.inner.cfg.credits;
        // Messages not yet handed over, each marked when it is its frame's
        // last (a run frame carries several).
        let mut queue: VecDeque<(Msg, bool)> = VecDeque::new();
        // Credits the sender has left: `usable` plus the frames with
        // messages in `queue` is `credits` until `end`.
        let mut usable = credits;
        let mut phase = Phase::Open;
        loop {
            if matches!(phase, Phase::Finished) && queue.is_empty() {
                return Ok(());
            }
            let end_by = match phase {
                Phase::Ended(by) => Some(by),
                _ => None,
            };
            tokio::select! {
                biased;
                _ = closed.cancelled() => return Err(Broken::Closed),
                permit = tx.reserve(), if !queue.is_empty() => {
                    let Ok(permit) = permit else {
                        return Err(Broken::DownstreamGone);
                    };
                    let Some((m, last)) = queue.pop_front() else {
                        continue;
                    };
                    permit.send(m);
                    if last && let Phase::Open = phase {
                        usable += 1;
                        self.grants.grant(1);
                    }
                }
                frame = frames.message(), if !matches!(phase, Phase::Finished) => match frame {
                    Err(s) => return Err(Broken::Link(s)),
                    Ok(None) if matches!(phase, Phase::Ended(_)) => phase = Phase::Finished,
                    Ok(None) => {
                        return Err(Broken::Peer(
                            "the sender's stream ended without an end frame".into(),
                        ));
                    }
                    Ok(Some(f)) => {
                        if matches!(phase, Phase::Ended(_)) {
                            return Err(Broken::Peer(format!(
                                "{} after the end frame",
                                frame_name(&f.frame)
                            )));
                        }
                        if usable == 0 {
                            return Err(Broken::Peer(format!(
                                "{} beyond the {credits} credits granted",
                                frame_name(&f.frame)
                            )));
                        }
                        usable -= 1;
                        self.counters.frames.fetch_add(1, Ordering::Relaxed);
                        if !self.messages(f.frame, &mut queue)? {
                            phase = Phase::Ended(
                                tokio::time::Instant::now() + self.inner.cfg.open_timeout,
                            );
                        }
                    }
                },
                _ = sleep_until(end_by) => {
                    return Err(Broken::Peer(format!(
                        "the sender's stream did not end within {:?} of its end frame",
                        self.inner.cfg.open_timeout
                    )));
                }
            }
        }
    }

    /// Queues the messages a frame carries, the last one marked; `false`
    /// for `end` (which carries none).
    fn messages(
        &mut self,
        frame: Option<Frame>,
        queue: &mut VecDeque<(Msg, bool)>,
    ) -> Result<bool, Broken> {
        let items = match frame {
            Some(Frame::End(_)) => return Ok(false),
            Some(Frame::Run(run)) => run.items,
            other => {
                let m = self.message(other)?;
                queue.push_back((m, true));
                return Ok(true);
            }
        };
        if items.is_empty() || items.len() > MAX_RUN_ITEMS {
            return Err(Broken::Peer(format!(
                "a run of {} items (1 to {MAX_RUN_ITEMS} are allowed)",
                items.len()
            )));
        }
        let n = items.len();
        for (i, item) in items.into_iter().enumerate() {
            let m = match item.item {
                Some(proto::run_item::Item::Batch(b)) => self.batch(b)?,
                Some(proto::run_item::Item::Watermark(w)) => Msg::Watermark(w),
                None => return Err(Broken::Peer("an empty item in a run".into())),
            };
            queue.push_back((m, i + 1 == n));
        }
        Ok(true)
    }

    fn batch(&mut self, b: proto::IpcBatch) -> Result<Msg, Broken> {
        let bytes = b.ipc.len();
        let batch = self
            .decoder
            .decode(&Message {
                new_stream: b.new_stream,
                bytes: b.ipc,
            })
            .map_err(|e| Broken::Peer(format!("a batch that does not decode: {e}")))?;
        self.counters.batch(batch.len(), bytes);
        Ok(Msg::Batch(batch))
    }

    /// The message a frame other than `end` and `run` carries.
    fn message(&mut self, frame: Option<Frame>) -> Result<Msg, Broken> {
        Ok(match frame {
            None => return Err(Broken::Peer("an empty frame".into())),
            Some(Frame::Open(_)) => return Err(Broken::Peer("a second open frame".into())),
            Some(Frame::End(_)) | Some(Frame::Run(_)) => {
                return Err(Broken::Peer("an end or run frame out of place".into()));
            }
            Some(Frame::Watermark(w)) => Msg::Watermark(w),
            Some(Frame::Batch(b)) => self.batch(b)?,
            Some(Frame::Barrier(b)) => {
                let kind = match proto::SnapshotKind::try_from(b.kind) {
                    Ok(proto::SnapshotKind::Checkpoint) => SnapshotKind::Checkpoint,
                    Ok(proto::SnapshotKind::Savepoint) => SnapshotKind::Savepoint,
                    Err(_) => {
                        return Err(Broken::Peer(format!(
                            "barrier {} of an unknown snapshot kind {}",
                            b.id, b.kind
                        )));
                    }
                };
                let dir = ferry_core::manifest::open_snapshot_dir(&b.dir).map_err(|e| {
                    Broken::Peer(format!("barrier {} names an unusable directory: {e}", b.id))
                })?;
                Msg::Barrier(Barrier {
                    id: CheckpointId(b.id),
                    kind,
                    close_txn: b.close_txn,
                    stop: b.stop,
                    dir,
                })
            }
        })
    }
}
