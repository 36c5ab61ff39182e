//! The network transport of the exchange (ADR 0007): the channels of a
//! job's edges whose two ends run on different TaskManagers, carried over
//! gRPC (`ferry.v1.Exchange`, `core/proto/ferry/v1/exchange.proto`).
//!
//! A task never sees the network: on each side it keeps the bounded
//! in-memory channel of [`Msg`] it always had. On the upstream
//! TaskManager, [`Exchange::connect`] takes that channel's receiver and
//! sends what arrives to the peer; on the downstream TaskManager,
//! [`Exchange::accept`] registers the channel's sender, and the gRPC
//! service ([`Exchange::service`]) pushes what the peer sends into it.
//!
//! This module owns: the `Channel` calls (one per channel, all of them to
//! one peer on one HTTP/2 connection, cached per peer URL), the credits,
//! the encoding of batches as Arrow IPC ([`crate::exchange`]) and of
//! watermarks, barriers and the end of input as frames, the registry of
//! channels a deployment waits for, and the exchange's counters
//! ([`Exchange::stats`]).
//!
//! Invariants:
//! - a channel carries its messages in order, each once: there is no
//!   reconnection (a second `open` of a channel is refused), so a broken
//!   channel fails the job, which restarts from its checkpoint;
//! - a broken channel is never mistaken for an ended one: the downstream
//!   task sees its input close (`None`) only after the peer's `end`; on any
//!   other end it receives [`Msg::Fail`] first (while it still listens),
//!   and on the sending side the upstream task's receiver is dropped, so
//!   its next send fails;
//! - memory is bounded per channel: at most `credits` frames are between
//!   the upstream task's channel and the downstream task's channel (sent
//!   and not yet handed to the downstream task), each at most
//!   `max_message` bytes; the receiver reads frames off the connection as
//!   they come, so a stalled channel never holds up the HTTP/2 connection
//!   the other channels share;
//! - nothing a peer sends panics this process, and every wait ends: on the
//!   peer's answer within `open_timeout`, on a dead connection by HTTP/2
//!   keepalive, or on cancellation.

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use ferry_core::proto::exchange_server;
use ferry_core::schema::SchemaRef;
use tokio::sync::{Notify, mpsc};
use tokio_util::sync::CancellationToken;
use tonic::Status;
use tonic::transport::Channel;
use tonic::transport::server::TcpIncoming;

use crate::exchange::DEFAULT_MAX_MESSAGE;
use crate::protocol::Msg;

mod receive;
mod send;

pub use receive::GrantStream;

/// Dialing a peer gives up after this long (the job then fails and
/// restarts, rather than wait for a TaskManager that is gone).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// HTTP/2 pings on an exchange connection: a peer that answers none for
/// `KEEPALIVE_TIMEOUT` is dead, and every channel to it fails.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(5);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(5);
/// HTTP/2 flow-control windows of exchange connections (both ends). The
/// receiver reads every frame off the connection at once (credits bound
/// what it holds), so these only set throughput: a stream's window holds
/// the default 8 credits of batches up to 256 KiB, which a link with a
/// high bandwidth-delay product needs; the connection's several streams'.
/// On loopback they do not matter (256 KiB / 1 MiB measured the same:
/// about 10,000 batches of 1,024 rows a second, bound by decoding).
const STREAM_WINDOW: u32 = 2 * 1024 * 1024;
const CONNECTION_WINDOW: u32 = 8 * 1024 * 1024;
/// Batches and watermarks a sender puts in one `run` frame at most (the
/// default of [`LinkConfig::run_items`]).
pub const RUN_ITEMS: usize = 64;

/// Largest HTTP/2 frame a peer may send this TaskManager's exchange
/// server (the protocol's default is 16 KiB): a run of 256 KiB then goes
/// out as one DATA frame instead of sixteen, with that much less framing,
/// flow-control and write work per byte.
const MAX_FRAME: u32 = 1 << 20;
/// Items of a `run` a receiver takes at most: a run of tiny watermarks
/// must not decode into more messages than the frame's bytes suggest.
const MAX_RUN_ITEMS: usize = 1024;
/// Room for a frame's protobuf fields around its IPC bytes.
const FRAME_SLACK: usize = 64 * 1024;
/// A sender waits this much longer than `open_timeout` for the peer's
/// answer to its `open` (the peer itself answers within `open_timeout`).
const OPEN_MARGIN: Duration = Duration::from_secs(5);
/// The response header in which the receiver names itself.
const PEER_HEADER: &str = "ferry-taskmanager";
/// Longest deployment or TaskManager id an `open` may carry, in bytes.
const MAX_NAME: usize = 256;

/// One channel of an edge: upstream subtask `from` to downstream subtask
/// `to` of stage `stage` (the downstream stage) of a deployment.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ChannelKey {
    pub deployment: String,
    pub stage: u32,
    pub from: u32,
    pub to: u32,
}

impl fmt::Display for ChannelKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "deployment {} stage {}: subtask {} -> {}",
            self.deployment, self.stage, self.from, self.to
        )
    }
}

/// Settings of the exchange. Both ends of a channel should use the same.
#[derive(Clone, Debug)]
pub struct LinkConfig {
    /// Frames a channel may have in flight (sent, not yet handed to the
    /// downstream task); at least 1.
    pub credits: u32,
    /// Largest batch message, in bytes (Arrow IPC), either way.
    pub max_message: usize,
    /// How long a receiver waits for its side of a deployment to register
    /// a channel a peer opens ([`Exchange::accept`]); and for the `open`
    /// frame itself, and for the close of a stream after its `end`.
    pub open_timeout: Duration,
    /// Batches and watermarks a sender puts in one frame at most (those
    /// already queued behind the first); 1 to [`RUN_ITEMS`].
    pub run_items: usize,
}

impl Default for LinkConfig {
    fn default() -> Self {
        Self {
            credits: 8,
            max_message: DEFAULT_MAX_MESSAGE,
            open_timeout: Duration::from_secs(30),
            run_items: RUN_ITEMS,
        }
    }
}

/// Which way a peer's counters count.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Direction {
    /// From this TaskManager to the peer.
    Out,
    /// From the peer to this TaskManager.
    In,
}

impl fmt::Display for Direction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Direction::Out => "out",
            Direction::In => "in",
        })
    }
}

/// The counters of the channels between this TaskManager and one peer, one
/// way. All but `channels` only grow.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerStats {
    /// The peer TaskManager's id (as it names itself; its URL when it
    /// named none).
    pub peer: String,
    pub direction: Direction,
    /// Channels open now.
    pub channels: u64,
    /// Frames after `open` (batches, watermarks, barriers, ends).
    pub frames: u64,
    pub batches: u64,
    /// Rows of the batches.
    pub records: u64,
    /// Arrow IPC bytes of the batches.
    pub bytes: u64,
    /// Time senders spent with every credit in use (`Out` only), in ns.
    pub credit_wait_ns: u64,
}

#[derive(Default)]
struct Counters {
    channels: AtomicU64,
    frames: AtomicU64,
    batches: AtomicU64,
    records: AtomicU64,
    bytes: AtomicU64,
    credit_wait_ns: AtomicU64,
}

impl Counters {
    fn batch(&self, rows: usize, bytes: usize) {
        self.batches.fetch_add(1, Ordering::Relaxed);
        self.records.fetch_add(rows as u64, Ordering::Relaxed);
        self.bytes.fetch_add(bytes as u64, Ordering::Relaxed);
    }
}

/// A registered receiving end.
struct Slot {
    registration: u64,
    schema: SchemaRef,
    /// Taken by the channel that opens it: a channel opens once.
    tx: Option<mpsc::Sender<Msg>>,
    /// Cancelled when the [`Inbound`] is dropped.
    closed: CancellationToken,
}

struct Inner {
    id: String,
    cfg: LinkConfig,
    tls: Option<ferry_core::tls::Connector>,
    /// One HTTP/2 connection per peer URL, shared by its channels.
    peers: Mutex<HashMap<String, Channel>>,
    inbound: Mutex<HashMap<ChannelKey, Slot>>,
    /// Woken whenever a channel is registered.
    registered: Notify,
    next_registration: AtomicU64,
    counters: Mutex<HashMap<(String, Direction), Arc<Counters>>>,
    /// Opens from peers waiting for their channel's registration.
    waiting_opens: AtomicU64,
    /// Frames sent and not yet credited back, over every channel.
    inflight: AtomicU64,
    credit_wait_ns: AtomicU64,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// One more on a gauge while it lives (an open channel, a waiting open).
struct Gauge<'a>(&'a AtomicU64);

impl<'a> Gauge<'a> {
    fn up(gauge: &'a AtomicU64) -> Self {
        gauge.fetch_add(1, Ordering::Relaxed);
        Self(gauge)
    }
}

impl Drop for Gauge<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

fn status_text(s: &Status) -> String {
    format!("{:?}: {}", s.code(), s.message())
}

impl Inner {
    fn counters(&self, peer: &str, direction: Direction) -> Arc<Counters> {
        lock(&self.counters)
            .entry((peer.to_string(), direction))
            .or_default()
            .clone()
    }
}

/// The exchange of one TaskManager: the sending ends of its channels to
/// peers ([`Exchange::connect`]) and the receiving ends of the channels
/// peers send to it ([`Exchange::accept`], served by
/// [`Exchange::service`]). Cheap to clone.
#[derive(Clone)]
pub struct Exchange {
    inner: Arc<Inner>,
}

impl Exchange {
    /// The exchange of TaskManager `taskmanager_id`. With `tls`, peers are
    /// dialed at `https://` URLs only, through it; without, at `http://`
    /// URLs only.
    pub fn new(
        taskmanager_id: impl Into<String>,
        cfg: LinkConfig,
        tls: Option<ferry_core::tls::Connector>,
    ) -> Self {
        let cfg = LinkConfig {
            credits: cfg.credits.max(1),
            run_items: cfg.run_items.clamp(1, RUN_ITEMS),
            ..cfg
        };
        Self {
            inner: Arc::new(Inner {
                id: taskmanager_id.into(),
                cfg,
                tls,
                peers: Mutex::new(HashMap::new()),
                inbound: Mutex::new(HashMap::new()),
                registered: Notify::new(),
                next_registration: AtomicU64::new(1),
                counters: Mutex::new(HashMap::new()),
                waiting_opens: AtomicU64::new(0),
                inflight: AtomicU64::new(0),
                credit_wait_ns: AtomicU64::new(0),
            }),
        }
    }

    /// This TaskManager's id.
    pub fn taskmanager(&self) -> &str {
        &self.inner.id
    }

    /// The settings in use (`credits` at least 1).
    pub fn config(&self) -> &LinkConfig {
        &self.inner.cfg
    }

    /// The gRPC service to mount on the exchange port's server (see
    /// [`Exchange::server_builder`]).
    pub fn service(&self) -> exchange_server::ExchangeServer<Exchange> {
        exchange_server::ExchangeServer::new(self.clone())
            .max_decoding_message_size(self.inner.cfg.max_message.saturating_add(FRAME_SLACK))
    }

    /// A server builder with the exchange's transport settings (HTTP/2
    /// windows, keepalive): mount [`Exchange::service`] on it, and serve
    /// [`Exchange::incoming`] (plaintext) or `ferry_core::tls::incoming`
    /// (TLS) with it.
    pub fn server_builder() -> tonic::transport::Server {
        tonic::transport::Server::builder()
            .initial_stream_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONNECTION_WINDOW)
            .max_frame_size(Some(MAX_FRAME))
            .http2_keepalive_interval(Some(KEEPALIVE_INTERVAL))
            .http2_keepalive_timeout(Some(KEEPALIVE_TIMEOUT))
    }

    /// The plaintext connections accepted on `listener`, without Nagle's
    /// delay (the builder's `tcp_nodelay` does not reach connections served
    /// with `serve_with_incoming`; with it, every credit waits for the
    /// peer's delayed ACK). `ferry_core::tls::incoming` does the same for
    /// TLS.
    pub fn incoming(listener: tokio::net::TcpListener) -> TcpIncoming {
        TcpIncoming::from(listener).with_nodelay(Some(true))
    }

    /// Registers the receiving end of channel `key`: what a peer sends on
    /// it goes to `tx`, as batches of `schema`. The channel stays
    /// registered while the returned [`Inbound`] lives. Registering a key
    /// again replaces the older registration, whose channel is closed.
    pub fn accept(&self, key: ChannelKey, schema: SchemaRef, tx: mpsc::Sender<Msg>) -> Inbound {
        let registration = self.inner.next_registration.fetch_add(1, Ordering::Relaxed);
        let old = lock(&self.inner.inbound).insert(
            key.clone(),
            Slot {
                registration,
                schema,
                tx: Some(tx),
                closed: CancellationToken::new(),
            },
        );
        if let Some(old) = old {
            tracing::warn!(channel = %key, "exchange channel registered again: the older registration is closed");
            close(&key, old);
        }
        self.inner.registered.notify_waiters();
        Inbound {
            inner: self.inner.clone(),
            key,
            registration,
        }
    }

    /// Sends what `rx` yields to the peer at `peer_url` (`http://` or
    /// `https://`, as [`Exchange::new`] says) on channel `key`, on a task
    /// of its own: `open`, then every message as a frame as credits allow,
    /// and `end` once `rx` is closed and empty. The task ends `Ok` when the
    /// peer has handed everything to the downstream task. It ends with an
    /// error when the link fails (connect refused, the peer refuses the
    /// open, the call breaks) or `cancel` fires: it then drops `rx`, so the
    /// upstream task's next send fails, and logs a warning naming the
    /// channel, the peer and the cause.
    pub fn connect(
        &self,
        peer_url: &str,
        key: ChannelKey,
        rx: mpsc::Receiver<Msg>,
        cancel: CancellationToken,
    ) -> tokio::task::JoinHandle<Result<(), String>> {
        let inner = self.inner.clone();
        let url = peer_url.to_string();
        tokio::spawn(async move {
            let result = send::send_channel(&inner, &url, &key, rx, &cancel).await;
            if let Err(e) = &result {
                tracing::warn!(channel = %key, peer = %url, "exchange channel failed: {e}; its upstream task fails");
            }
            result
        })
    }

    /// Counters per peer and direction, sorted.
    pub fn stats(&self) -> Vec<PeerStats> {
        let mut out: Vec<PeerStats> = lock(&self.inner.counters)
            .iter()
            .map(|((peer, direction), c)| PeerStats {
                peer: peer.clone(),
                direction: *direction,
                channels: c.channels.load(Ordering::Relaxed),
                frames: c.frames.load(Ordering::Relaxed),
                batches: c.batches.load(Ordering::Relaxed),
                records: c.records.load(Ordering::Relaxed),
                bytes: c.bytes.load(Ordering::Relaxed),
                credit_wait_ns: c.credit_wait_ns.load(Ordering::Relaxed),
            })
            .collect();
        out.sort_by(|a, b| (&a.peer, a.direction).cmp(&(&b.peer, b.direction)));
        out
    }

    /// Frames this TaskManager has sent and not had credited back yet, over
    /// every channel (credits in use).
    pub fn inflight(&self) -> u64 {
        self.inner.inflight.load(Ordering::Relaxed)
    }

    /// Channels peers have opened that wait for this TaskManager to
    /// register them ([`Exchange::accept`]).
    pub fn pending_opens(&self) -> u64 {
        self.inner.waiting_opens.load(Ordering::Relaxed)
    }

    /// Time senders spent with every credit in use, over every channel.
    pub fn credit_wait(&self) -> Duration {
        Duration::from_nanos(self.inner.credit_wait_ns.load(Ordering::Relaxed))
    }
}

/// Closes a registration that was dropped or replaced: its open channel
/// ends (the call with an error, the downstream task with [`Msg::Fail`]);
/// a channel that never opened gets the [`Msg::Fail`] here.
fn close(key: &ChannelKey, slot: Slot) {
    slot.closed.cancel();
    if let Some(tx) = slot.tx {
        let _ = tx.try_send(Msg::Fail(format!(
            "exchange channel {key} was closed before its upstream TaskManager opened it"
        )));
    }
}

/// The registration of a channel's receiving end ([`Exchange::accept`]).
/// Dropping it unregisters the channel and ends it if open: the peer's call
/// ends with an error, so its sending task fails.
#[must_use = "dropping it closes the channel"]
pub struct Inbound {
    inner: Arc<Inner>,
    key: ChannelKey,
    registration: u64,
}

impl Inbound {
    pub fn key(&self) -> &ChannelKey {
        &self.key
    }
}

impl Drop for Inbound {
    fn drop(&mut self) {
        let slot = {
            let mut map = lock(&self.inner.inbound);
            match map.get(&self.key) {
                Some(s) if s.registration == self.registration => map.remove(&self.key),
                _ => None,
            }
        };
        if let Some(slot) = slot {
            close(&self.key, slot);
        }
    }
}
