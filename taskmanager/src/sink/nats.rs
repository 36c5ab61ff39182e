//! The NATS JetStream sink: each record becomes one JSON message on a
//! subject of one stream, exactly once within the stream's duplicate window.
//!
//! Records between two barriers form a transaction, as in the file sink:
//! at the barrier it is closed and its messages become part of the sink's
//! checkpoint state; when the checkpoint completes they are published, each
//! with the header `Nats-Msg-Id: <job id>-<subtask>-<checkpoint>-<index>`,
//! and every publish ack is awaited.
//!
//! A restore publishes the pending transactions of the restored state again
//! with the same ids, and JetStream drops the messages it already stored
//! (within its duplicate window). A transaction the stream provably holds in
//! full is not published again at all: the last message on the subject of
//! the transaction's last message is that message, or one of a later
//! transaction of the same subtask (transactions are published in order, one
//! after the other). So resuming a savepoint, or restarting long after a
//! crash, does not depend on the duplicate window; only a transaction cut
//! short by a crash and replayed after the window has passed can repeat its
//! already-published part.
//!
//! Why publish at commit rather than as records arrive: an id is only a
//! safe deduplication key if a replay produces the same record under the
//! same id. Records published as they arrive would be replayed after a crash
//! by re-running the job from the checkpoint, and with parallelism > 1 the
//! order in which a sink subtask receives records from its upstream subtasks
//! (and so each record's index) differs between runs: ids would match
//! different records, dropping some and repeating others. Publishing the
//! transaction stored in the checkpoint replays the very same messages, so
//! deduplication is exact for any job. The costs: output appears when its
//! checkpoint completes (like the file sink), and the checkpoint holds the
//! transaction's messages until then.
//!
//! Output published *beyond* the restored checkpoint — by a lineage that
//! was lost, e.g. the old primary's transactions after the newest
//! checkpoint a failover could restore — is held back as in the file sink
//! ([`NatsSink::reconcile`]): the restored sink reads this subtask's
//! messages of later transactions from the stream and leaves each out once
//! when it produces it again. Their ids may be taken by then, so such a
//! lineage tags its transaction ids (`<job>-<subtask>.<tag>-<checkpoint>`):
//! JetStream would otherwise drop its new messages as duplicates of the
//! lost lineage's.
//!
//! Invariant: a message id names the same message in every attempt of a
//! job, and a transaction leaves the pending set only when every one of its
//! messages is acknowledged by the configured stream. A failed or timed-out
//! publish fails the task, and the restart strategy takes over.

use std::collections::{BTreeMap, VecDeque};
use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::header::NATS_MESSAGE_ID;
use async_nats::jetstream;
use async_nats::jetstream::context::PublishAckFuture;
use async_nats::jetstream::stream::LastRawMessageErrorKind;
use bytes::Bytes;
use ferry_core::manifest::SinkTransaction;
use ferry_core::schema::Schema;
use ferry_core::spec::nats::{SubjectPart, SubjectTemplate, subject_token};
use ferry_core::spec::{JobSpec, NatsSinkSpec};
use ferry_core::{CheckpointId, JobId};
use serde::{Deserialize, Serialize};

use crate::batch::Batch;

/// Publishes awaiting their ack at once (pipelining).
const MAX_IN_FLIGHT: usize = 512;
/// Time a restart takes besides the restart strategy's delay (restore,
/// connect) when checking the duplicate window.
const RESTART_SLACK: Duration = Duration::from_secs(10);

/// The shortest duplicate window that deduplicates a replay of `spec`'s
/// sink: a transaction that a restore cannot prove complete (cut short by a
/// crash) is published again at most about one checkpoint interval (until
/// the next checkpoint drops it from the state) plus one restart after it
/// was first published.
pub fn min_duplicate_window(spec: &JobSpec) -> Duration {
    spec.spec.checkpointing.interval.get()
        + spec.spec.restart_strategy.longest_delay()
        + RESTART_SLACK
}

/// One message to publish.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct Msg {
    subject: String,
    payload: Vec<u8>,
}

/// What a checkpoint keeps of the sink.
#[derive(Debug, Default, Serialize, Deserialize)]
struct NatsSinkState {
    /// (checkpoint, transaction id, messages)
    pending: Vec<(u64, String, Vec<Msg>)>,
    /// Records of a transaction an intermediate savepoint left open.
    open: Vec<Msg>,
    records_out: u64,
    /// Added after the first version; states written before lack it.
    guard: NatsGuard,
}

/// The first version of [`NatsSinkState`] (no replay guard).
#[derive(Debug, Deserialize)]
struct NatsSinkStateV1 {
    pending: Vec<(u64, String, Vec<Msg>)>,
    open: Vec<Msg>,
    records_out: u64,
}

impl NatsSinkState {
    fn decode(bytes: &[u8]) -> Result<Self, String> {
        if let Ok(st) = postcard::from_bytes::<NatsSinkState>(bytes) {
            return Ok(st);
        }
        let v1: NatsSinkStateV1 = postcard::from_bytes(bytes)
            .map_err(|e| format!("NATS sink state is unreadable: {e}"))?;
        Ok(NatsSinkState {
            pending: v1.pending,
            open: v1.open,
            records_out: v1.records_out,
            guard: NatsGuard::default(),
        })
    }
}

/// What a restored sink holds back (see [`NatsSink::reconcile`]).
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
struct NatsGuard {
    /// (subject, payload) of messages a lost lineage published, and how
    /// many times each is still owed.
    owed: Vec<(String, Vec<u8>, u32)>,
    /// Transactions whose messages were taken into `owed` (never twice).
    counted: Vec<String>,
    /// This lineage's transaction-id tag, set when a restore found output
    /// beyond its checkpoint.
    tag: Option<String>,
    /// The stream sequence of the newest message this sink had published
    /// when the state was taken: a lost lineage's later messages follow it.
    published_through: u64,
}

/// Largest output of a lost lineage held back, in payload bytes; beyond
/// it the output is published again (at-least-once for that window), with
/// a warning, rather than held in every checkpoint.
const MAX_OWED_BYTES: usize = 64 << 20;
/// Bound on a reconcile's scan of the stream.
const RECONCILE_LIMIT: Duration = Duration::from_secs(60);

/// A subject template with field names resolved to column indices.
enum Subject {
    Fixed(String),
    Template(Vec<Part>),
}

enum Part {
    Literal(String),
    Column(usize),
}

/// A NATS sink subtask.
pub struct NatsSink {
    js: jetstream::Context,
    stream: String,
    handle: jetstream::stream::Stream,
    subject: Subject,
    /// `<job id>-<subtask>`: the start of this subtask's transaction ids.
    txn_prefix: String,
    subtask: u32,
    open: Vec<Msg>,
    /// Closed transactions by (checkpoint, transaction id): after a rescale
    /// one subtask can hold several old subtasks' transactions of one
    /// checkpoint. The id prefixes its messages' ids.
    pending: BTreeMap<(u64, String), Vec<Msg>>,
    /// Messages still owed to a lost lineage's output, with their count.
    owed: std::collections::HashMap<(String, Vec<u8>), u32>,
    owed_bytes: usize,
    counted: std::collections::BTreeSet<String>,
    tag: Option<String>,
    /// The newest stream sequence this sink published (at first, the
    /// stream's end when it opened).
    published_through: u64,
    /// Where the restored states had published through (the lowest of
    /// them; 0: a state of the first version): a lost lineage's messages
    /// follow it.
    restored_through: Option<u64>,
}

impl NatsSink {
    /// Connects and checks that the stream exists and that its duplicate
    /// window is at least `min_window` (see [`min_duplicate_window`]).
    pub async fn open(
        spec: &NatsSinkSpec,
        schema: &Schema,
        job: &JobId,
        subtask: u32,
        min_window: Duration,
    ) -> Result<Self, String> {
        let js = crate::nats::connect(&spec.url, &format!("ferry-sink-{subtask}")).await?;
        let mut handle = crate::nats::stream(&js, &spec.stream, &spec.url).await?;
        let info = handle
            .info()
            .await
            .map_err(|e| format!("reading stream '{}' info: {e}", spec.stream))?;
        let window = info.config.duplicate_window;
        // Nothing this sink publishes can come before the stream's end now.
        let opened_at = info.state.last_sequence.max(1);
        if window < min_window {
            return Err(format!(
                "stream '{}' deduplicates for {} but a replay after a restart can come up to {} later, so it could be published twice; raise the stream's duplicate window (`nats stream edit {} --dupe-window {}s`) or shorten the checkpoint interval or restart delays",
                spec.stream,
                humantime::format_duration(window),
                humantime::format_duration(min_window),
                spec.stream,
                min_window.as_secs() + 1,
            ));
        }
        let template = SubjectTemplate::parse(&spec.subject)
            .map_err(|e| format!("spec.sink.nats.subject: {e}"))?;
        let subject = if template.fields().next().is_none() {
            Subject::Fixed(spec.subject.clone())
        } else {
            Subject::Template(
                template
                    .parts
                    .iter()
                    .map(|p| match p {
                        SubjectPart::Literal(s) => Ok(Part::Literal(s.clone())),
                        SubjectPart::Field(f) => schema
                            .index_of(f)
                            .map(Part::Column)
                            .ok_or_else(|| format!("spec.sink.nats.subject: unknown field '{f}'")),
                    })
                    .collect::<Result<_, String>>()?,
            )
        };
        Ok(Self {
            js,
            stream: spec.stream.clone(),
            handle,
            subject,
            txn_prefix: format!("{job}-{subtask:04}"),
            subtask,
            open: Vec::new(),
            pending: BTreeMap::new(),
            owed: Default::default(),
            owed_bytes: 0,
            counted: Default::default(),
            tag: None,
            published_through: opened_at,
            restored_through: None,
        })
    }

    /// The transaction id of this subtask for checkpoint `cp` (tagged in
    /// a lineage that restored behind published output).
    fn txn_id(&self, cp: CheckpointId) -> String {
        match &self.tag {
            None => format!("{}-{:08}", self.txn_prefix, cp.0),
            Some(t) => format!("{}.{t}-{:08}", self.txn_prefix, cp.0),
        }
    }

    /// Whether transaction prefix `prefix` (`<job>-<subtask>` or tagged)
    /// is this subtask's.
    fn is_own(&self, prefix: &str) -> bool {
        prefix == self.txn_prefix
            || prefix
                .strip_prefix(self.txn_prefix.as_str())
                .is_some_and(|t| t.starts_with('.'))
    }

    /// Leaves every owed message out of `msgs`, once each.
    fn hold_back(&mut self, msgs: Vec<Msg>) -> Vec<Msg> {
        if self.owed.is_empty() {
            return msgs;
        }
        let mut out = Vec::with_capacity(msgs.len());
        for m in msgs {
            let key = (m.subject, m.payload);
            if let Some(n) = self.owed.get_mut(&key) {
                *n -= 1;
                if *n == 0 {
                    self.owed.remove(&key);
                }
                self.owed_bytes = self.owed_bytes.saturating_sub(key.1.len());
                continue;
            }
            out.push(Msg {
                subject: key.0,
                payload: key.1,
            });
        }
        out
    }

    /// Adds a batch to the open transaction.
    pub fn write(&mut self, batch: &Batch) {
        let mut row = String::new();
        for i in 0..batch.len() {
            row.clear();
            batch.write_json_row(i, &mut row);
            row.pop(); // the newline
            let subject = match &self.subject {
                Subject::Fixed(s) => s.clone(),
                Subject::Template(parts) => {
                    let mut s = String::new();
                    for p in parts {
                        match p {
                            Part::Literal(l) => s.push_str(l),
                            Part::Column(c) => {
                                let v = batch.columns[*c].get(i).to_json();
                                let text = match &v {
                                    serde_json::Value::String(t) => t.clone(),
                                    other => other.to_string(),
                                };
                                s.push_str(&subject_token(&text));
                            }
                        }
                    }
                    s
                }
            };
            self.open.push(Msg {
                subject,
                payload: row.as_bytes().to_vec(),
            });
        }
    }

    /// Snapshot at a barrier; see [`crate::sink::Sink::snapshot`].
    pub fn snapshot(
        &mut self,
        cp: CheckpointId,
        close_txn: bool,
        records_out: u64,
    ) -> Result<(Vec<u8>, Vec<SinkTransaction>), String> {
        if close_txn && !self.open.is_empty() {
            let msgs = std::mem::take(&mut self.open);
            let msgs = self.hold_back(msgs);
            if !msgs.is_empty() {
                self.pending.insert((cp.0, self.txn_id(cp)), msgs);
            }
        }
        let st = NatsSinkState {
            pending: self
                .pending
                .iter()
                .map(|((cp, id), msgs)| (*cp, id.clone(), msgs.clone()))
                .collect(),
            open: self.open.clone(),
            records_out,
            guard: NatsGuard {
                owed: self
                    .owed
                    .iter()
                    .map(|((s, p), n)| (s.clone(), p.clone(), *n))
                    .collect(),
                counted: self.counted.iter().cloned().collect(),
                tag: self.tag.clone(),
                published_through: self.published_through,
            },
        };
        let txns = self
            .pending
            .iter()
            .map(|((_, id), msgs)| SinkTransaction {
                subtask: self.subtask,
                txn: id.clone(),
                records: msgs.len() as u64,
            })
            .collect();
        Ok((postcard::to_stdvec(&st).map_err(|e| e.to_string())?, txns))
    }

    /// Publishes every pending transaction up to `cp`, in order.
    pub async fn commit(&mut self, cp: CheckpointId) -> Result<(), String> {
        let due: Vec<(u64, String)> = self
            .pending
            .keys()
            .take_while(|(c, _)| *c <= cp.0)
            .cloned()
            .collect();
        for key in due {
            let seq = self.publish(&key.1, &self.pending[&key]).await?;
            self.published_through = self.published_through.max(seq);
            self.pending.remove(&key);
        }
        Ok(())
    }

    /// After a restore: publishes the restored pending transactions, except
    /// those the stream already holds in full.
    pub async fn recommit(&mut self) -> Result<(), String> {
        let keys: Vec<(u64, String)> = self.pending.keys().cloned().collect();
        for key in keys {
            let msgs = &self.pending[&key];
            if self.already_published(&key.1, msgs).await? {
                tracing::info!(txn = %key.1, "transaction already published; not publishing it again");
            } else {
                let seq = self.publish(&key.1, msgs).await?;
                self.published_through = self.published_through.max(seq);
            }
            self.pending.remove(&key);
        }
        Ok(())
    }

    /// After a restore from checkpoint `restored`: every message of this
    /// subtask's transactions numbered above it — published by a lineage
    /// that was lost — is read from the stream once (from where the
    /// restored state had published through), and held back until this
    /// run produces it again. From then on this lineage tags its
    /// transaction ids, as the lost lineage's ids are taken.
    pub async fn reconcile(&mut self, restored: CheckpointId) -> Result<(), String> {
        use async_nats::jetstream::consumer::{DeliverPolicy, pull::OrderedConfig};
        use futures::StreamExt;
        let last = self
            .handle
            .info()
            .await
            .map_err(|e| format!("reading stream '{}' info: {e}", self.stream))?
            .state
            .last_sequence;
        let through = match self.restored_through {
            Some(t) if t > 0 => t,
            // Nothing restored, or a state of the first version: where its
            // output ends is unknown (the stream may be long); nothing is
            // held back.
            _ => return Ok(()),
        };
        let start = through + 1;
        if last < start {
            return Ok(());
        }
        let consumer = self
            .handle
            .create_consumer(OrderedConfig {
                deliver_policy: DeliverPolicy::ByStartSequence {
                    start_sequence: start,
                },
                ..Default::default()
            })
            .await
            .map_err(|e| format!("reading stream '{}' failed: {e}", self.stream))?;
        let mut messages = consumer
            .messages()
            .await
            .map_err(|e| format!("reading stream '{}' failed: {e}", self.stream))?;
        let deadline = tokio::time::Instant::now() + RECONCILE_LIMIT;
        let mut found = 0u64;
        let mut txns = std::collections::BTreeSet::new();
        loop {
            let next = match tokio::time::timeout_at(deadline, messages.next()).await {
                Ok(Some(m)) => {
                    m.map_err(|e| format!("reading stream '{}' failed: {e}", self.stream))?
                }
                Ok(None) => break,
                Err(_) => {
                    tracing::warn!(
                        stream = %self.stream,
                        "reading the stream from sequence {start} to {last} for output of a lost run took over {}s: holding back only what was read (the rest may be published again)",
                        RECONCILE_LIMIT.as_secs()
                    );
                    break;
                }
            };
            let seq = next.info().map(|i| i.stream_sequence).unwrap_or(last);
            let id = next
                .headers
                .as_ref()
                .and_then(|h| h.get(NATS_MESSAGE_ID))
                .map(|v| v.as_str().to_string());
            if let Some((prefix, cp, _)) = id.as_deref().and_then(parse_msg_id)
                && cp > restored.0
                && self.is_own(prefix)
            {
                let txn = format!("{prefix}-{cp:08}");
                if !self.counted.contains(&txn) {
                    txns.insert(txn);
                    self.owed_bytes += next.payload.len();
                    *self
                        .owed
                        .entry((next.subject.to_string(), next.payload.to_vec()))
                        .or_default() += 1;
                    found += 1;
                }
            }
            if seq >= last {
                break;
            }
        }
        if found == 0 {
            return Ok(());
        }
        self.counted.extend(txns.iter().cloned());
        if self.owed_bytes > MAX_OWED_BYTES {
            tracing::warn!(
                subtask = self.subtask,
                messages = found,
                mib = self.owed_bytes >> 20,
                "output published beyond checkpoint {restored} is too large to hold back (over {} MiB): it is published again (at-least-once for that window)",
                MAX_OWED_BYTES >> 20
            );
            self.owed.clear();
            self.owed_bytes = 0;
        } else {
            tracing::warn!(
                subtask = self.subtask,
                transactions = txns.len(),
                messages = found,
                "output was published beyond checkpoint {restored} (by a run that was lost, e.g. before a failover): its messages are held back until this run produces them again"
            );
        }
        // Distinct from every earlier lineage's (the time of this restore).
        self.tag = Some(format!(
            "{:x}",
            chrono::Utc::now().timestamp_micros() & 0xff_ffff_ffff
        ));
        Ok(())
    }

    /// Whether the stream provably holds every message of transaction
    /// `txn`: the newest message on its last message's subject is that
    /// message or one of a later transaction of the same subtask (a
    /// transaction is published only after the one before it was
    /// acknowledged in full). Anything else, e.g. another publisher's newer
    /// message on that subject, counts as "not known" and the transaction is
    /// published again (deduplicated within the duplicate window).
    async fn already_published(&self, txn: &str, msgs: &[Msg]) -> Result<bool, String> {
        let (Some(last), Some((prefix, cp))) = (msgs.last(), parse_txn_id(txn)) else {
            return Ok(false);
        };
        let stored = match self
            .handle
            .get_last_raw_message_by_subject(&last.subject)
            .await
        {
            Ok(m) => m,
            Err(e) if e.kind() == LastRawMessageErrorKind::NoMessageFound => return Ok(false),
            Err(e) => {
                return Err(format!(
                    "reading the last message on '{}' of stream '{}' failed: {e}",
                    last.subject, self.stream
                ));
            }
        };
        let newest = stored
            .headers
            .get(NATS_MESSAGE_ID)
            .and_then(|v| parse_msg_id(v.as_str()));
        Ok(newest.is_some_and(|(p, c, i)| p == prefix && (c, i) >= (cp, msgs.len() as u64 - 1)))
    }

    #[tracing::instrument(skip(self, msgs), fields(messages = msgs.len()))]
    async fn publish(&self, txn: &str, msgs: &[Msg]) -> Result<u64, String> {
        let mut in_flight: VecDeque<PublishAckFuture> = VecDeque::new();
        let mut duplicates = 0usize;
        let mut newest = 0u64;
        for (i, m) in msgs.iter().enumerate() {
            if in_flight.len() >= MAX_IN_FLIGHT
                && let Some(ack) = in_flight.pop_front()
            {
                let (dup, seq) = self.check_ack(ack, txn).await?;
                duplicates += dup;
                newest = newest.max(seq);
            }
            let mut headers = HeaderMap::new();
            headers.insert(NATS_MESSAGE_ID, format!("{txn}-{i}").as_str());
            let ack = self
                .js
                .publish_with_headers(m.subject.clone(), headers, Bytes::from(m.payload.clone()))
                .await
                .map_err(|e| format!("publishing to '{}' failed: {e}", m.subject))?;
            in_flight.push_back(ack);
        }
        while let Some(ack) = in_flight.pop_front() {
            let (dup, seq) = self.check_ack(ack, txn).await?;
            duplicates += dup;
            newest = newest.max(seq);
        }
        if duplicates > 0 {
            tracing::info!(
                duplicates,
                "a replayed transaction: JetStream dropped {duplicates} messages it already had"
            );
        }
        Ok(newest)
    }

    /// (1 if the ack reports a dropped duplicate, 0 if newly stored; the
    /// message's stream sequence).
    async fn check_ack(&self, ack: PublishAckFuture, txn: &str) -> Result<(usize, u64), String> {
        let ack = ack
            .await
            .map_err(|e| format!("publishing transaction {txn} failed: {e}"))?;
        if ack.stream != self.stream {
            return Err(format!(
                "the sink's subjects are stored by stream '{}', not '{}' as spec.sink.nats.stream says; fix the stream name or the subject",
                ack.stream, self.stream
            ));
        }
        Ok((usize::from(ack.duplicate), ack.sequence))
    }

    /// Adds the pending and open transactions of an old subtask's state,
    /// returning its records-out count.
    /// Decodes one snapshot part without restoring it (restore checks).
    pub fn check_state(bytes: &[u8]) -> Result<(), String> {
        NatsSinkState::decode(bytes).map(drop)
    }

    pub fn adopt(&mut self, bytes: &[u8]) -> Result<u64, String> {
        let st = NatsSinkState::decode(bytes)?;
        for (cp, id, msgs) in st.pending {
            self.pending.insert((cp, id), msgs);
        }
        self.open.extend(st.open);
        for (subject, payload, n) in st.guard.owed {
            self.owed_bytes += payload.len() * n as usize;
            *self.owed.entry((subject, payload)).or_default() += n;
        }
        self.counted.extend(st.guard.counted);
        if st.guard.tag.is_some() {
            self.tag = st.guard.tag;
        }
        let through = st.guard.published_through;
        self.restored_through = Some(self.restored_through.map_or(through, |r| r.min(through)));
        Ok(st.records_out)
    }
}

/// `<job>-<subtask>-<checkpoint>` → (`<job>-<subtask>`, checkpoint).
fn parse_txn_id(txn: &str) -> Option<(&str, u64)> {
    let (prefix, cp) = txn.rsplit_once('-')?;
    Some((prefix, cp.parse().ok()?))
}

/// `<job>-<subtask>-<checkpoint>-<index>` → (`<job>-<subtask>`, checkpoint, index).
fn parse_msg_id(id: &str) -> Option<(&str, u64, u64)> {
    let (txn, index) = id.rsplit_once('-')?;
    let (prefix, cp) = parse_txn_id(txn)?;
    Some((prefix, cp, index.parse().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_parse_back() {
        let job = "0123456789abcdef0123456789abcdef";
        assert_eq!(
            parse_msg_id(&format!("{job}-0003-00000012-7")),
            Some((format!("{job}-0003").as_str(), 12, 7))
        );
        assert_eq!(
            parse_txn_id(&format!("{job}-0003-123456789")),
            Some((format!("{job}-0003").as_str(), 123_456_789))
        );
        assert_eq!(parse_msg_id("not-an-id"), None);
        assert_eq!(parse_msg_id("x"), None);
        // A tagged lineage's ids keep the tag in the prefix.
        assert_eq!(
            parse_msg_id(&format!("{job}-0003.1f2e-00000012-7")),
            Some((format!("{job}-0003.1f2e").as_str(), 12, 7))
        );
    }

    /// States written before the replay guard existed still restore.
    #[test]
    fn a_state_of_the_first_version_decodes() {
        #[derive(Serialize)]
        struct V1 {
            pending: Vec<(u64, String, Vec<Msg>)>,
            open: Vec<Msg>,
            records_out: u64,
        }
        let bytes = postcard::to_stdvec(&V1 {
            pending: vec![(
                3,
                "j-0000-00000003".into(),
                vec![Msg {
                    subject: "s".into(),
                    payload: b"{}".to_vec(),
                }],
            )],
            open: Vec::new(),
            records_out: 9,
        })
        .unwrap();
        let st = NatsSinkState::decode(&bytes).unwrap();
        assert_eq!(st.records_out, 9);
        assert_eq!(st.pending.len(), 1);
        assert_eq!(
            st.guard.published_through, 0,
            "unknown: nothing is held back"
        );
        assert!(NatsSinkState::decode(b"\xff\xff").is_err());
    }
}
