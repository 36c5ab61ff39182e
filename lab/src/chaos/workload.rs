//! The workload of `ferry chaos` and its model, which the audit checks the
//! output against. Three jobs:
//! - `chaos-windows`: the NATS stream `CHAOS_IN` (written by the producer
//!   here, outside Ferry) → `key_by k` → 1 s tumbling count and sum →
//!   the NATS stream `CHAOS_MID`; parallelism [`WINDOWS_PARALLELISM`],
//!   more than a TaskManager's slots, so it spans both TaskManagers and
//!   its keyed records cross the exchange (the subtasks beyond the two
//!   input partitions read nothing, which must not hold the windows back);
//! - `chaos-relay`: `CHAOS_MID` → file sink `out/windows`;
//! - `chaos-generated`: generator (`seq` = the record's index) → file sink
//!   `out/generated`.
//!
//! Record `i` of the input is a pure function of `i` ([`record`]), so the
//! expected window results ([`expected_windows`]) follow from how many
//! records the producer has had acknowledged.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::Context;
use async_nats::jetstream::{self, stream};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

/// Event time of record 0 (epoch ms): 2026-01-01T00:00:00Z.
pub const BASE_MS: i64 = 1_767_225_600_000;
/// Event time between records, ms.
pub const STEP_MS: i64 = 10;
/// The window size, ms.
pub const WINDOW_MS: i64 = 1_000;
/// Distinct keys.
const KEYS: u64 = 10;
/// Input partitions (`chaos.in.<p>`, record `i` in `i % 2`).
pub const PARTITIONS: u64 = 2;
/// Parallelism of `chaos-windows`: one more than a TaskManager's slots.
pub const WINDOWS_PARALLELISM: u32 = super::world::TM_SLOTS + 1;

/// splitmix64: a fixed, well-mixed function of `x`.
fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// Input record `i`: (key, value, event time in epoch ms).
pub fn record(i: u64) -> (String, i64, i64) {
    let k = format!("k{}", mix(i) % KEYS);
    let v = (mix(i ^ 0x5555) % 1000) as i64;
    (k, v, BASE_MS + i as i64 * STEP_MS)
}

/// One window result: (key, window start ms) → (count, sum).
pub type Windows = BTreeMap<(String, i64), (i64, i64)>;

/// The results of every window that records `0..produced` complete:
/// windows ending at or before the event time of the last record (later
/// ones may still change).
pub fn expected_windows(produced: u64) -> Windows {
    let mut out = Windows::new();
    if produced == 0 {
        return out;
    }
    let last_ts = BASE_MS + (produced as i64 - 1) * STEP_MS;
    for i in 0..produced {
        let (k, v, ts) = record(i);
        let start = ts - (ts - BASE_MS).rem_euclid(WINDOW_MS);
        if start + WINDOW_MS > last_ts {
            break;
        }
        let e = out.entry((k, start)).or_insert((0, 0));
        e.0 += 1;
        e.1 += v;
    }
    out
}

/// Windows that must have fired by now: those ending at least `margin` of
/// event time before the last produced record (the watermark of every
/// partition has passed them).
pub fn must_have_fired(expected: &Windows, produced: u64, margin_ms: i64) -> Windows {
    let last_ts = BASE_MS + (produced as i64).saturating_sub(1) * STEP_MS;
    expected
        .iter()
        .filter(|((_, start), _)| start + WINDOW_MS + margin_ms <= last_ts)
        .map(|(k, v)| (k.clone(), *v))
        .collect()
}

/// The three jobs' specs (JSON), reading and writing the data server at
/// `nats` and the directory `out`.
pub fn specs(nats: &str, out: &std::path::Path) -> Vec<(&'static str, String)> {
    let common = json!({
        "checkpointing": {"interval": "1s", "retained": 5, "timeout": "20s"},
        "restartStrategy": {"type": "exponential-delay", "initialDelay": "500ms",
                            "maxDelay": "4s", "resetAfter": "30s"},
    });
    let job = |name: &str, parallelism: u32, source: Value, operators: Value, sink: Value| {
        let mut spec = common.clone();
        spec["parallelism"] = json!(parallelism);
        spec["source"] = source;
        spec["operators"] = operators;
        spec["sink"] = sink;
        json!({"apiVersion": "ferry.dev/v1", "kind": "Job",
               "metadata": {"name": name}, "spec": spec})
        .to_string()
    };
    let windows = job(
        "chaos-windows",
        WINDOWS_PARALLELISM,
        json!({"nats": {"url": nats, "stream": "CHAOS_IN",
               "subjects": ["chaos.in.0", "chaos.in.1"],
               "schema": {"k": "string", "v": "int", "ts": "timestamp"},
               "eventTime": {"field": "ts"}}}),
        json!([{"key_by": "k"},
               {"window": {"tumbling": "1s", "aggregate": {"n": "count", "s": "sum(v)"}}}]),
        json!({"nats": {"url": nats, "subject": "chaos.mid.{k}", "stream": "CHAOS_MID"}}),
    );
    let relay = job(
        "chaos-relay",
        1,
        json!({"nats": {"url": nats, "stream": "CHAOS_MID",
               "schema": {"k": "string", "window_start": "timestamp",
                          "window_end": "timestamp", "n": "int", "s": "int"},
               "eventTime": {"field": "window_end"}}}),
        json!([]),
        json!({"file": {"path": out.join("windows").display().to_string()}}),
    );
    let generated = job(
        "chaos-generated",
        2,
        json!({"generator": {"partitions": 2, "rate": 50,
               "fields": {"seq": {"type": "sequence"}}}}),
        json!([]),
        json!({"file": {"path": out.join("generated").display().to_string()}}),
    );
    vec![
        ("chaos-windows", windows),
        ("chaos-relay", relay),
        ("chaos-generated", generated),
    ]
}

/// Creates the workload's streams on the data server (10 min duplicate
/// windows: the NATS sink needs more than its restart delays).
pub async fn create_streams(js: &jetstream::Context) -> anyhow::Result<()> {
    for (name, subjects) in [("CHAOS_IN", "chaos.in.*"), ("CHAOS_MID", "chaos.mid.>")] {
        js.get_or_create_stream(stream::Config {
            name: name.to_string(),
            subjects: vec![subjects.to_string()],
            duplicate_window: Duration::from_secs(600),
            ..Default::default()
        })
        .await
        .with_context(|| format!("creating stream {name}"))?;
    }
    Ok(())
}

/// Publishes input records from `produced` on, `rate` per second, each
/// with message id `in-<i>`, until `stop`; `produced` counts the
/// acknowledged ones (records `0..produced` are in the stream).
pub async fn produce(
    js: jetstream::Context,
    rate: u64,
    produced: Arc<AtomicU64>,
    stop: CancellationToken,
) {
    let per_tick = (rate / 10).max(1);
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        for _ in 0..per_tick {
            let i = produced.load(Ordering::SeqCst);
            let (k, v, ts) = record(i);
            let mut headers = async_nats::HeaderMap::new();
            headers.insert("Nats-Msg-Id", format!("in-{i}").as_str());
            let payload = json!({"k": k, "v": v, "ts": ts}).to_string();
            let acked = match js
                .publish_with_headers(
                    format!("chaos.in.{}", i % PARTITIONS),
                    headers,
                    payload.into(),
                )
                .await
            {
                Ok(ack) => tokio::time::timeout(Duration::from_secs(5), ack)
                    .await
                    .is_ok_and(|a| a.is_ok()),
                Err(_) => false,
            };
            if !acked {
                break; // the same record again on the next tick
            }
            produced.fetch_add(1, Ordering::SeqCst);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expected_windows_hold_every_record_of_complete_windows_once() {
        // 350 records: 3 complete windows of 100 records, the 4th open.
        let w = expected_windows(350);
        let total: i64 = w.values().map(|(n, _)| n).sum();
        assert_eq!(total, 300);
        let starts: std::collections::BTreeSet<i64> = w.keys().map(|(_, s)| *s).collect();
        assert_eq!(starts.len(), 3);
        // Sums checked record by record.
        let mut sum = 0;
        for i in 0..300 {
            sum += record(i).1;
        }
        assert_eq!(w.values().map(|(_, s)| s).sum::<i64>(), sum);
        assert!(must_have_fired(&w, 350, 600).len() < w.len());
    }
}
