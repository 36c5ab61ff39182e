//! The NATS JetStream source: JSON messages of one stream become records.
//!
//! A partition is one subject filter of the spec (or the whole stream);
//! subtask `j` reads the partitions whose index `% parallelism == j`, each
//! through its own ordered consumer (ephemeral, no acks, recreated by the
//! client on a gap). A partition's offset is the next stream sequence to
//! read: a message counts as read only once it is in a batch handed to the
//! operators, so a snapshot taken between polls is exact, and a restore
//! starts new consumers at the snapshotted sequences, re-reading exactly
//! what followed the checkpoint.
//!
//! Bounded mode (`stopAtEnd`) fixes the stream's last sequence when the job
//! first starts and keeps it in the checkpoints, so every attempt of the job
//! reads the same messages. Each partition has its own watermark (its
//! largest event time minus `maxOutOfOrderness`); the subtask's watermark is
//! the lowest over its unfinished partitions, so partitions read at
//! different speeds do not make each other's records late.

use std::collections::BTreeMap;
use std::future::poll_fn;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll as TaskPoll, Waker};
use std::time::Instant;

use async_nats::jetstream::consumer::DeliverPolicy;
use async_nats::jetstream::consumer::pull::{Ordered, OrderedConfig, OrderedError};
use async_nats::jetstream::{self, Message};
use bytes::Bytes;
use ferry_core::schema::{Schema, SchemaRef};
use ferry_core::spec::BadLinePolicy;
use ferry_core::spec::{NatsSourceSpec, StartFrom};
use ferry_core::value::Value;
use futures::StreamExt;
use serde::{Deserialize, Serialize};

use crate::batch::{Batch, ColumnBuilder};
use crate::protocol::TaskError;
use crate::source::Poll;
use crate::source::lines::convert_json;

/// Most messages in one batch.
const MAX_BATCH: usize = 1024;
/// Bad messages logged one by one; later ones are only counted.
const BAD_MESSAGES_LOGGED: u64 = 20;

/// One partition's checkpointed position.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct PartitionState {
    /// Subject filter; empty for the whole stream.
    filter: String,
    /// Next stream sequence to read; 0 before the start position is known.
    next_seq: u64,
    records: u64,
    max_ts: i64,
}

#[derive(Debug, Serialize, Deserialize)]
struct State {
    partitions: Vec<PartitionState>,
    /// Bounded mode: the last stream sequence the job reads.
    end: Option<u64>,
}

struct Partition {
    st: PartitionState,
    /// Bounded mode: everything up to `end` has been read.
    done: bool,
    /// When its last message arrived (or reading began): for `idleTimeout`.
    seen: Instant,
    /// The consumer's messages. The stream is `Send` but not `Sync`, and a
    /// source is shared (`&Source`) while a snapshot is taken; the mutex is
    /// never locked, only reached through `&mut` ([`Mutex::get_mut`]).
    messages: Mutex<Option<Ordered>>,
}

impl Partition {
    fn messages(&mut self) -> &mut Option<Ordered> {
        self.messages.get_mut().unwrap_or_else(|p| p.into_inner())
    }
}

/// A NATS source subtask.
pub struct NatsSource {
    js: jetstream::Context,
    spec: NatsSourceSpec,
    parts: Vec<Partition>,
    schema: SchemaRef,
    ts_idx: Option<usize>,
    ooo: i64,
    end: Option<u64>,
    /// Consumers exist (created on the first poll, after any restore).
    started: bool,
    /// A message taken from a consumer by [`NatsSource::ready`], not yet read.
    peeked: Option<(usize, Option<Result<Message, OrderedError>>)>,
    /// Partition polled first next time (fairness).
    rr: usize,
    /// Bad messages skipped (`onBadLine: skip`).
    skipped: u64,
}

impl NatsSource {
    /// Connects and keeps this subtask's share of the partitions. Consumers
    /// are created on the first poll, after any restore.
    pub async fn open(
        spec: &NatsSourceSpec,
        schema: &Schema,
        subtask: u32,
        parallelism: u32,
    ) -> Result<Self, String> {
        let js = crate::nats::connect(&spec.url, &format!("ferry-source-{subtask}")).await?;
        // Fail early (and clearly) when the stream is missing.
        crate::nats::stream(&js, &spec.stream, &spec.url).await?;
        let filters: Vec<String> = if spec.subjects.is_empty() {
            vec![String::new()]
        } else {
            spec.subjects.clone()
        };
        let parts = filters
            .into_iter()
            .enumerate()
            .filter(|(i, _)| *i as u32 % parallelism == subtask)
            .map(|(_, filter)| Partition {
                st: PartitionState {
                    filter,
                    next_seq: 0,
                    records: 0,
                    max_ts: i64::MIN,
                },
                done: false,
                seen: Instant::now(),
                messages: Mutex::new(None),
            })
            .collect();
        let et = spec.event_time.clone().unwrap_or_default();
        Ok(Self {
            js,
            spec: spec.clone(),
            parts,
            schema: Arc::new(schema.clone()),
            ts_idx: et.field.as_ref().and_then(|f| schema.index_of(f)),
            ooo: et.max_out_of_orderness.as_millis(),
            end: None,
            started: false,
            peeked: None,
            rr: 0,
            skipped: 0,
        })
    }

    /// Resolves start positions and the bounded end, and creates consumers.
    async fn start(&mut self) -> Result<(), String> {
        let mut stream = crate::nats::stream(&self.js, &self.spec.stream, &self.spec.url).await?;
        let last = stream
            .info()
            .await
            .map_err(|e| format!("reading stream '{}' info: {e}", self.spec.stream))?
            .state
            .last_sequence;
        if self.spec.stop_at_end && self.end.is_none() {
            self.end = Some(last);
        }
        for p in &mut self.parts {
            if p.st.next_seq == 0 {
                p.st.next_seq = match self.spec.start_from {
                    StartFrom::Earliest => 1,
                    StartFrom::Latest => last + 1,
                    StartFrom::Sequence(n) => n.max(1),
                };
            }
            if self.end.is_some_and(|end| p.st.next_seq > end) {
                p.done = true;
                continue;
            }
            let consumer = stream
                .create_consumer(OrderedConfig {
                    filter_subject: p.st.filter.clone(),
                    deliver_policy: DeliverPolicy::ByStartSequence {
                        start_sequence: p.st.next_seq,
                    },
                    ..Default::default()
                })
                .await
                .map_err(|e| {
                    format!(
                        "creating a consumer on stream '{}' ({}) failed: {e}",
                        self.spec.stream,
                        describe(&p.st.filter)
                    )
                })?;
            if self.end.is_some() && consumer.cached_info().num_pending == 0 {
                p.done = true;
                continue;
            }
            let messages = consumer.messages().await.map_err(|e| {
                format!(
                    "reading stream '{}' ({}) failed: {e}",
                    self.spec.stream,
                    describe(&p.st.filter)
                )
            })?;
            *p.messages() = Some(messages);
        }
        self.started = true;
        Ok(())
    }

    /// Polls the unfinished partitions' consumers once, round robin.
    fn poll_any(
        &mut self,
        cx: &mut Context<'_>,
    ) -> TaskPoll<(usize, Option<Result<Message, OrderedError>>)> {
        let n = self.parts.len();
        for k in 0..n {
            let i = (self.rr + k) % n;
            if let Some(m) = self.parts[i].messages().as_mut()
                && let TaskPoll::Ready(item) = m.poll_next_unpin(cx)
            {
                self.rr = (i + 1) % n;
                return TaskPoll::Ready((i, item));
            }
        }
        TaskPoll::Pending
    }

    /// Reads what the consumers have ready now, up to [`MAX_BATCH`] messages.
    /// The next batch. Errors reaching the stream are transient (the restart
    /// strategy applies); a message that cannot be a record is permanent: it
    /// would be read again from the same sequence on every restart.
    pub async fn poll(&mut self) -> Result<Poll, TaskError> {
        if !self.started {
            self.start().await.map_err(TaskError::Transient)?;
        }
        let schema = self.schema.clone();
        let fields = &schema.fields;
        let mut builders: Vec<ColumnBuilder> =
            fields.iter().map(|_| ColumnBuilder::new()).collect();
        let mut ts = Vec::new();
        let mut noop = Context::from_waker(Waker::noop());
        while ts.len() < MAX_BATCH {
            let next = match self.peeked.take() {
                Some(x) => x,
                None => match self.poll_any(&mut noop) {
                    TaskPoll::Ready(x) => x,
                    TaskPoll::Pending => break,
                },
            };
            let (i, msg) = match next {
                (i, Some(Ok(msg))) => (i, msg),
                (i, Some(Err(e))) => {
                    return Err(TaskError::Transient(format!(
                        "reading stream '{}' ({}) failed: {e}",
                        self.spec.stream,
                        describe(&self.parts[i].st.filter)
                    )));
                }
                (i, None) => {
                    return Err(TaskError::Transient(format!(
                        "the consumer of stream '{}' ({}) ended unexpectedly",
                        self.spec.stream,
                        describe(&self.parts[i].st.filter)
                    )));
                }
            };
            let info = msg.info().map_err(|e| {
                TaskError::Transient(format!(
                    "stream '{}': bad message metadata: {e}",
                    self.spec.stream
                ))
            })?;
            let (seq, pending) = (info.stream_sequence, info.pending);
            let published = (info.published.unix_timestamp_nanos() / 1_000_000) as i64;
            if self.end.is_some_and(|end| seq > end) {
                self.finish(i);
                continue;
            }
            self.parts[i].seen = Instant::now();
            let parsed = self.parse(&msg.payload, seq).and_then(|values| {
                let t = match self.ts_idx {
                    Some(k) => match &values[k] {
                        Value::Ts(t) | Value::Int(t) => *t,
                        _ => {
                            return Err(format!(
                                "stream '{}' sequence {seq}: event-time field '{}' is missing or not a timestamp",
                                self.spec.stream, fields[k].name
                            ));
                        }
                    },
                    None => published,
                };
                Ok((values, t))
            });
            let (values, t) = match parsed {
                Ok(x) => x,
                Err(why) if self.spec.on_bad_line == BadLinePolicy::Skip => {
                    self.skipped += 1;
                    if self.skipped <= BAD_MESSAGES_LOGGED {
                        tracing::warn!("skipping a bad message (onBadLine: skip): {why}");
                    }
                    let p = &mut self.parts[i].st;
                    p.next_seq = seq + 1;
                    if self.end.is_some_and(|end| seq >= end || pending == 0) {
                        self.finish(i);
                    }
                    continue;
                }
                Err(why) => return Err(TaskError::Permanent(why)),
            };
            for (b, v) in builders.iter_mut().zip(values) {
                b.push(v);
            }
            ts.push(t);
            let p = &mut self.parts[i].st;
            p.next_seq = seq + 1;
            p.records += 1;
            p.max_ts = p.max_ts.max(t);
            if self.end.is_some_and(|end| seq >= end || pending == 0) {
                self.finish(i);
            }
        }
        if !ts.is_empty() {
            return Ok(Poll::Batch(Batch {
                schema,
                columns: builders.into_iter().map(|b| b.finish()).collect(),
                ts,
            }));
        }
        if self.parts.iter().all(|p| p.done) {
            return Ok(Poll::End);
        }
        Ok(Poll::Wait)
    }

    /// Waits until a consumer has a message (cancel-safe: the message is
    /// kept for the next poll). Returns at once if nothing is being read.
    pub async fn ready(&mut self) {
        if self.peeked.is_some() || self.parts.iter_mut().all(|p| p.messages().is_none()) {
            return;
        }
        let item = poll_fn(|cx| self.poll_any(cx)).await;
        self.peeked = Some(item);
    }

    /// Bounded mode: partition `i` has read everything up to the end.
    fn finish(&mut self, i: usize) {
        self.parts[i].done = true;
        *self.parts[i].messages() = None;
        if matches!(self.peeked, Some((j, _)) if j == i) {
            self.peeked = None;
        }
    }

    fn parse(&self, payload: &Bytes, seq: u64) -> Result<Vec<Value>, String> {
        decode_payload(&self.spec.stream, &self.schema, payload, seq)
    }

    /// Messages skipped as bad (`onBadLine: skip`) since the task started.
    pub fn skipped_records(&self) -> u64 {
        self.skipped
    }

    /// The lowest watermark over the partitions still read, leaving out
    /// those idle past `idleTimeout`; while every one is idle, the highest
    /// (the watermark never goes back: the task only forwards increases).
    pub fn watermark(&self) -> i64 {
        let live = self.parts.iter().filter(|p| !p.done);
        let idle = |p: &&Partition| {
            self.spec
                .idle_timeout
                .is_some_and(|t| p.seen.elapsed() >= t.get())
        };
        let wm = |p: &Partition| super::bounded_watermark(p.st.max_ts, self.ooo);
        match live.clone().filter(|p| !idle(p)).map(wm).min() {
            Some(w) => w,
            None => live.map(wm).max().unwrap_or(i64::MAX),
        }
    }

    pub fn snapshot(&self) -> Result<(Vec<u8>, BTreeMap<String, serde_json::Value>), String> {
        let offsets = self
            .parts
            .iter()
            .map(|p| {
                (
                    format!("nats:{}:{}", self.spec.stream, describe(&p.st.filter)),
                    serde_json::json!({"nextSequence": p.st.next_seq, "records": p.st.records}),
                )
            })
            .collect();
        let st = State {
            partitions: self.parts.iter().map(|p| p.st.clone()).collect(),
            end: self.end,
        };
        Ok((
            postcard::to_stdvec(&st).map_err(|e| e.to_string())?,
            offsets,
        ))
    }

    /// Takes the offsets of this subtask's partitions from every old
    /// subtask's state; consumers start there on the next poll.
    /// Decodes one snapshot part without restoring it (restore checks).
    pub fn check_state(part: &[u8]) -> Result<(), String> {
        postcard::from_bytes::<State>(part)
            .map(drop)
            .map_err(|e| format!("NATS source state is unreadable: {e}"))
    }

    pub fn restore(&mut self, parts: &[Bytes]) -> Result<(), String> {
        let mut by_filter = BTreeMap::new();
        for part in parts {
            let st: State = postcard::from_bytes(part)
                .map_err(|e| format!("NATS source state is unreadable: {e}"))?;
            self.end = self.end.or(st.end);
            for p in st.partitions {
                by_filter.insert(p.filter.clone(), p);
            }
        }
        for p in &mut self.parts {
            if let Some(s) = by_filter.remove(&p.st.filter) {
                p.st = s;
            }
            p.done = false;
            *p.messages() = None;
        }
        self.peeked = None;
        self.started = false;
        Ok(())
    }

    pub fn records_read(&self) -> u64 {
        self.parts.iter().map(|p| p.st.records).sum()
    }
}

/// A partition's filter as people read it.
fn describe(filter: &str) -> String {
    if filter.is_empty() {
        "all subjects".to_string()
    } else {
        format!("subjects '{filter}'")
    }
}

/// Decodes one message payload of stream `stream` (at sequence `seq`) into
/// the values of `schema`, strictly: a payload that is not a JSON object or
/// a field of another type than the schema's is an error naming both.
pub fn decode_payload(
    stream: &str,
    schema: &Schema,
    payload: &[u8],
    seq: u64,
) -> Result<Vec<Value>, String> {
    let obj: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(payload)
        .map_err(|e| {
            format!(
                "stream '{stream}' sequence {seq}: the payload is not a JSON object ({e}); fix or delete that message (`nats stream rmm {stream} {seq}`)"
            )
        })?;
    // Strict, as the file source: a value of another type than the
    // schema's is a bad message, never a silent null.
    schema
        .fields
        .iter()
        .map(|f| {
            convert_json(obj.get(&f.name), f.data_type).map_err(|raw| {
                format!(
                    "stream '{stream}' sequence {seq}: field '{}' is {raw}, not a {} (set onBadLine: skip to skip such messages)",
                    f.name, f.data_type
                )
            })
        })
        .collect()
}
