//! Generated click records for file inputs, written as JSON lines or CSV,
//! and their expected keyed tumbling counts, computed directly from the
//! records (not by the runtime).

use std::collections::BTreeMap;

use rand::{Rng, SeedableRng};

/// 2026-01-01T00:00:00Z in epoch milliseconds.
pub const START_MS: i64 = 1_767_225_600_000;
pub const WINDOW_MS: i64 = 60_000;
/// Jitter of generated event times; the specs allow this much disorder.
pub const JITTER_MS: i64 = 900;

/// One generated input record.
#[derive(Clone, Debug)]
pub struct Rec {
    pub user: String,
    pub ts: i64,
    pub amount: f64,
}

/// `files` inputs of `per_file` records each. Event time grows across files
/// in name order (each subtask reads its files in that order) and jitters
/// backwards by less than the allowed out-of-orderness, so no record is late.
pub fn generate(
    seed: u64,
    files: usize,
    per_file: usize,
    users: u32,
    step_ms: i64,
) -> Vec<Vec<Rec>> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    (0..files)
        .map(|f| {
            (0..per_file)
                .map(|i| {
                    let k = (f * per_file + i) as i64;
                    Rec {
                        user: format!("u{:03}", rng.random_range(0..users)),
                        ts: START_MS + k * step_ms - rng.random_range(0..JITTER_MS),
                        amount: (rng.random_range(100..100_000) as f64) / 100.0,
                    }
                })
                .collect()
        })
        .collect()
}

pub fn rfc3339(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .expect("valid time")
        .to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

/// JSON lines; event time alternates between RFC 3339 and epoch ms.
pub fn jsonl(recs: &[Rec]) -> String {
    let mut s = String::new();
    for (i, r) in recs.iter().enumerate() {
        let ts = if i % 2 == 0 {
            serde_json::Value::from(rfc3339(r.ts))
        } else {
            serde_json::Value::from(r.ts)
        };
        let line = serde_json::json!({"user": r.user, "ts": ts, "amount": r.amount});
        s.push_str(&line.to_string());
        s.push('\n');
    }
    s
}

/// CSV with a header whose columns are in another order than the schema,
/// plus a column the schema does not name.
pub fn csv(recs: &[Rec]) -> String {
    let mut s = String::from("amount,user,note,ts\n");
    for (i, r) in recs.iter().enumerate() {
        let ts = if i % 2 == 0 {
            rfc3339(r.ts)
        } else {
            r.ts.to_string()
        };
        s.push_str(&format!("{},{},\"n, {i}\",{ts}\n", r.amount, r.user));
    }
    s
}

/// Expected `(user as JSON, window start, count)` rows, sorted.
pub fn expected<'a>(recs: impl IntoIterator<Item = &'a Rec>) -> Vec<(String, i64, i64)> {
    let mut m: BTreeMap<(String, i64), i64> = BTreeMap::new();
    for r in recs {
        *m.entry((
            format!("\"{}\"", r.user),
            r.ts.div_euclid(WINDOW_MS) * WINDOW_MS,
        ))
        .or_default() += 1;
    }
    m.into_iter().map(|((k, s), c)| (k, s, c)).collect()
}
