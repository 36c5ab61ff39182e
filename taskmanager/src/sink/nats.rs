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
}

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
        let window = handle
            .info()
            .await
            .map_err(|e| format!("reading stream '{}' info: {e}", spec.stream))?
            .config
            .duplicate_window;
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
        })
    }

    /// The transaction id of this subtask for checkpoint `cp`.
    fn txn_id(&self, cp: CheckpointId) -> String {
        format!("{}-{:08}", self.txn_prefix, cp.0)
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
            self.pending.insert((cp.0, self.txn_id(cp)), msgs);
        }
        let st = NatsSinkState {
            pending: self
                .pending
                .iter()
                .map(|((cp, id), msgs)| (*cp, id.clone(), msgs.clone()))
                .collect(),
            open: self.open.clone(),
            records_out,
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
            self.publish(&key.1, &self.pending[&key]).await?;
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
                self.publish(&key.1, msgs).await?;
            }
            self.pending.remove(&key);
        }
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
    async fn publish(&self, txn: &str, msgs: &[Msg]) -> Result<(), String> {
        let mut in_flight: VecDeque<PublishAckFuture> = VecDeque::new();
        let mut duplicates = 0usize;
        for (i, m) in msgs.iter().enumerate() {
            if in_flight.len() >= MAX_IN_FLIGHT
                && let Some(ack) = in_flight.pop_front()
            {
                duplicates += self.check_ack(ack, txn).await?;
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
            duplicates += self.check_ack(ack, txn).await?;
        }
        if duplicates > 0 {
            tracing::info!(
                duplicates,
                "a replayed transaction: JetStream dropped {duplicates} messages it already had"
            );
        }
        Ok(())
    }

    /// 1 if the ack reports a dropped duplicate, 0 if newly stored.
    async fn check_ack(&self, ack: PublishAckFuture, txn: &str) -> Result<usize, String> {
        let ack = ack
            .await
            .map_err(|e| format!("publishing transaction {txn} failed: {e}"))?;
        if ack.stream != self.stream {
            return Err(format!(
                "the sink's subjects are stored by stream '{}', not '{}' as spec.sink.nats.stream says; fix the stream name or the subject",
                ack.stream, self.stream
            ));
        }
        Ok(usize::from(ack.duplicate))
    }

    /// Adds the pending and open transactions of an old subtask's state,
    /// returning its records-out count.
    /// Decodes one snapshot part without restoring it (restore checks).
    pub fn check_state(bytes: &[u8]) -> Result<(), String> {
        postcard::from_bytes::<NatsSinkState>(bytes)
            .map(drop)
            .map_err(|e| format!("NATS sink state is unreadable: {e}"))
    }

    pub fn adopt(&mut self, bytes: &[u8]) -> Result<u64, String> {
        let st: NatsSinkState = postcard::from_bytes(bytes)
            .map_err(|e| format!("NATS sink state is unreadable: {e}"))?;
        for (cp, id, msgs) in st.pending {
            self.pending.insert((cp, id), msgs);
        }
        self.open.extend(st.open);
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
    }
}
