//! The deterministic generator source.
//!
//! Record `i` (over all partitions; partition `p` holds `i = offset × P + p`)
//! is a pure function of the seed and `i`: its fields, its event time
//! `start + i × step`, minus a disorder of up to `maxOutOfOrderness`, minus
//! `late.by` for a `late.fraction` of records. So a replay from an offset
//! yields exactly the same records, and tests can compute the expected output
//! independently with [`record_at`].

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use ferry_core::schema::{Schema, SchemaRef};
use ferry_core::spec::{GeneratorField, GeneratorSpec};
use ferry_core::value::Value;
use serde::{Deserialize, Serialize};

use crate::batch::{Batch, Column};
use crate::operator::key::splitmix;
use crate::source::Poll;

/// Records per batch when not rate limited. The source's watermark advances
/// after each batch (like Flink's periodic watermarks), so lateness is
/// decided at batch granularity.
pub const MAX_BATCH: u64 = 4096;

const JITTER_SALT: u64 = 0x6a09_e667_f3bc_c908;
const LATE_SALT: u64 = 0xbb67_ae85_84ca_a73b;

/// The pure description of the generated stream.
#[derive(Clone, Debug)]
pub struct GeneratorModel {
    pub partitions: u32,
    pub total: Option<u64>,
    seed: u64,
    start: i64,
    step: i64,
    ooo: i64,
    late: Option<(f64, i64)>,
    fields: Vec<FieldModel>,
    pub schema: SchemaRef,
}

#[derive(Clone, Debug)]
enum FieldModel {
    KeyInt(u64),
    KeyStr(Vec<Arc<str>>),
    /// Keys too many to hold as a table: formatted per record.
    KeyFmt(Arc<str>, u64),
    /// `min` and `max - min` (the span less one, so the full `i64` range
    /// fits).
    Int(i64, u64),
    Float(f64, f64),
    Choice(Vec<Arc<str>>),
    Sequence,
}

/// Most string keys kept as a shared table; more are formatted per record
/// (a table of 100 M keys would take gigabytes).
const KEY_TABLE_MAX: u64 = 1 << 20;

/// `r` reduced to `0..=span_less_one`; the whole `u64` when that is its
/// range (`max - min` of an `i64` field spans at most `u64::MAX`).
#[inline]
fn within(r: u64, span_less_one: u64) -> u64 {
    match span_less_one.checked_add(1) {
        Some(span) => r % span,
        None => r,
    }
}

#[inline]
fn h(seed: u64, i: u64, salt: u64) -> u64 {
    splitmix(seed ^ splitmix(i ^ salt))
}

impl GeneratorModel {
    pub fn new(spec: &GeneratorSpec, parallelism: u32, schema: &Schema) -> Result<Self, String> {
        let fields = spec
            .fields
            .values()
            .map(|f| match f {
                GeneratorField::Key {
                    cardinality,
                    prefix: None,
                } => FieldModel::KeyInt(*cardinality),
                GeneratorField::Key {
                    cardinality,
                    prefix: Some(p),
                } if *cardinality <= KEY_TABLE_MAX => FieldModel::KeyStr(
                    (0..*cardinality)
                        .map(|n| Arc::from(format!("{p}{n}").as_str()))
                        .collect(),
                ),
                GeneratorField::Key {
                    cardinality,
                    prefix: Some(p),
                } => FieldModel::KeyFmt(Arc::from(p.as_str()), *cardinality),
                GeneratorField::Int { min, max } => {
                    FieldModel::Int(*min, max.wrapping_sub(*min) as u64)
                }
                GeneratorField::Float { min, max } => FieldModel::Float(*min, *max - *min),
                GeneratorField::Choice { values } => {
                    FieldModel::Choice(values.iter().map(|v| Arc::from(v.as_str())).collect())
                }
                GeneratorField::Sequence => FieldModel::Sequence,
            })
            .collect();
        let et = &spec.event_time;
        Ok(Self {
            partitions: spec.partitions.unwrap_or(parallelism).max(1),
            total: spec.total,
            seed: spec.seed,
            start: ferry_core::value::parse_ts(&et.start)
                .ok_or_else(|| format!("bad eventTime.start '{}'", et.start))?,
            step: et.step.as_millis(),
            ooo: et.max_out_of_orderness.as_millis(),
            late: et.late.as_ref().map(|l| (l.fraction, l.by.as_millis())),
            fields,
            schema: Arc::new(schema.clone()),
        })
    }

    /// Number of records partition `p` holds (`None`: unbounded).
    pub fn partition_len(&self, p: u32) -> Option<u64> {
        let parts = self.partitions as u64;
        self.total.map(|t| {
            if (p as u64) < t {
                (t - p as u64).div_ceil(parts)
            } else {
                0
            }
        })
    }

    /// Event time of global record `i`.
    #[inline]
    pub fn ts_at(&self, i: u64) -> i64 {
        // Saturating: a huge step or record index pins time at the end of
        // the representable range rather than wrapping into the past.
        let mut t = self
            .start
            .saturating_add((i.min(i64::MAX as u64) as i64).saturating_mul(self.step));
        if self.ooo > 0 {
            t = t.saturating_sub(within(h(self.seed, i, JITTER_SALT), self.ooo as u64) as i64);
        }
        if let Some((frac, by)) = self.late {
            let u = (h(self.seed, i, LATE_SALT) >> 11) as f64 / (1u64 << 53) as f64;
            if u < frac {
                t = t.saturating_sub(by);
            }
        }
        t
    }

    /// The watermark delay: a partition's watermark is `max_ts - ooo - 1`.
    pub fn out_of_orderness(&self) -> i64 {
        self.ooo
    }

    /// The values of global record `i`, in schema order (event time last).
    pub fn record_at(&self, i: u64) -> Vec<Value> {
        let mut v: Vec<Value> = self
            .fields
            .iter()
            .enumerate()
            .map(|(k, f)| self.value_at(f, k, i))
            .collect();
        v.push(Value::Ts(self.ts_at(i)));
        v
    }

    #[inline]
    fn value_at(&self, f: &FieldModel, k: usize, i: u64) -> Value {
        let r = h(self.seed, i, k as u64 + 1);
        match f {
            FieldModel::KeyInt(c) => Value::Int((r % c) as i64),
            FieldModel::KeyStr(keys) => Value::Str(keys[(r % keys.len() as u64) as usize].clone()),
            FieldModel::KeyFmt(prefix, c) => Value::Str(Arc::from(format!("{prefix}{}", r % c))),
            FieldModel::Int(min, span) => Value::Int(min.wrapping_add(within(r, *span) as i64)),
            FieldModel::Float(min, span) => {
                Value::Float(min + span * ((r >> 11) as f64 / (1u64 << 53) as f64))
            }
            FieldModel::Choice(vals) => Value::Str(vals[(r % vals.len() as u64) as usize].clone()),
            FieldModel::Sequence => Value::Int(i as i64),
        }
    }

    /// Generates records `offset..offset+n` of partition `p` as a batch.
    pub fn batch(&self, p: u32, offset: u64, n: u64) -> (Batch, i64) {
        let parts = self.partitions as u64;
        let idx = |o: u64| o.wrapping_mul(parts).wrapping_add(p as u64);
        let len = n as usize;
        let mut columns = Vec::with_capacity(self.fields.len() + 1);
        for (k, f) in self.fields.iter().enumerate() {
            let salt = k as u64 + 1;
            let col = match f {
                FieldModel::KeyInt(c) => Column::Int(
                    (offset..offset + n)
                        .map(|o| (h(self.seed, idx(o), salt) % c) as i64)
                        .collect(),
                ),
                FieldModel::KeyStr(keys) | FieldModel::Choice(keys) => Column::Str(
                    (offset..offset + n)
                        .map(|o| {
                            keys[(h(self.seed, idx(o), salt) % keys.len() as u64) as usize].clone()
                        })
                        .collect(),
                ),
                FieldModel::KeyFmt(prefix, c) => Column::Str(
                    (offset..offset + n)
                        .map(|o| {
                            let k = h(self.seed, idx(o), salt) % c;
                            Arc::from(format!("{prefix}{k}"))
                        })
                        .collect(),
                ),
                FieldModel::Int(min, span) => Column::Int(
                    (offset..offset + n)
                        .map(|o| min.wrapping_add(within(h(self.seed, idx(o), salt), *span) as i64))
                        .collect(),
                ),
                FieldModel::Float(min, span) => Column::Float(
                    (offset..offset + n)
                        .map(|o| {
                            let r = h(self.seed, idx(o), salt);
                            min + span * ((r >> 11) as f64 / (1u64 << 53) as f64)
                        })
                        .collect(),
                ),
                FieldModel::Sequence => {
                    Column::Int((offset..offset + n).map(|o| idx(o) as i64).collect())
                }
            };
            columns.push(col);
        }
        let mut ts = Vec::with_capacity(len);
        let mut max_ts = i64::MIN;
        for o in offset..offset + n {
            let t = self.ts_at(idx(o));
            max_ts = max_ts.max(t);
            ts.push(t);
        }
        columns.push(Column::Ts(ts.clone()));
        (
            Batch {
                schema: self.schema.clone(),
                columns,
                ts,
            },
            max_ts,
        )
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
struct PartState {
    partition: u32,
    offset: u64,
    max_ts: i64,
}

/// A generator subtask: owns partitions `p` with `p % parallelism == subtask`.
pub struct GeneratorSource {
    model: Arc<GeneratorModel>,
    parts: Vec<PartState>,
    next: usize,
    /// Records per second for this subtask (0 = unlimited).
    rate: f64,
    started: Instant,
    emitted_since_start: u64,
}

impl GeneratorSource {
    pub fn new(
        model: Arc<GeneratorModel>,
        rate_total: u64,
        subtask: u32,
        parallelism: u32,
    ) -> Self {
        let parts: Vec<PartState> = (0..model.partitions)
            .filter(|p| p % parallelism == subtask)
            .map(|p| PartState {
                partition: p,
                offset: 0,
                max_ts: i64::MIN,
            })
            .collect();
        let rate = if rate_total == 0 {
            0.0
        } else {
            rate_total as f64 * parts.len() as f64 / model.partitions as f64
        };
        Self {
            model,
            parts,
            next: 0,
            rate,
            started: Instant::now(),
            emitted_since_start: 0,
        }
    }

    fn remaining(&self, p: &PartState) -> u64 {
        match self.model.partition_len(p.partition) {
            Some(len) => len.saturating_sub(p.offset),
            None => u64::MAX,
        }
    }

    pub fn poll(&mut self) -> Poll {
        let mut budget = MAX_BATCH;
        if self.rate > 0.0 {
            let allowed = (self.started.elapsed().as_secs_f64() * self.rate) as u64;
            let avail = allowed.saturating_sub(self.emitted_since_start);
            // Emit in chunks of about 10 ms of input.
            let chunk = ((self.rate / 100.0) as u64).clamp(1, MAX_BATCH);
            if avail < chunk {
                let wait = (chunk - avail) as f64 / self.rate;
                return Poll::Idle(Duration::from_secs_f64(wait.max(0.001)));
            }
            budget = avail.min(MAX_BATCH);
        }
        for _ in 0..self.parts.len() {
            let i = self.next % self.parts.len();
            self.next = (self.next + 1) % self.parts.len();
            let rem = self.remaining(&self.parts[i]);
            if rem == 0 {
                continue;
            }
            let n = rem.min(budget);
            let p = &mut self.parts[i];
            let (batch, max_ts) = self.model.batch(p.partition, p.offset, n);
            p.offset += n;
            p.max_ts = p.max_ts.max(max_ts);
            self.emitted_since_start += n;
            return Poll::Batch(batch);
        }
        Poll::End
    }

    pub fn watermark(&self) -> i64 {
        let ooo = self.model.out_of_orderness();
        self.parts
            .iter()
            .filter(|p| self.remaining(p) > 0)
            .map(|p| super::bounded_watermark(p.max_ts, ooo))
            .min()
            .unwrap_or(i64::MAX)
    }

    pub fn snapshot(&self) -> Result<(Vec<u8>, BTreeMap<String, serde_json::Value>), String> {
        let offsets = self
            .parts
            .iter()
            .map(|p| (format!("partition-{}", p.partition), p.offset.into()))
            .collect();
        let bytes = postcard::to_stdvec(&self.parts).map_err(|e| e.to_string())?;
        Ok((bytes, offsets))
    }

    /// Decodes one snapshot part without restoring it (restore checks).
    pub fn check_state(part: &[u8]) -> Result<(), String> {
        postcard::from_bytes::<Vec<PartState>>(part)
            .map(drop)
            .map_err(|e| format!("generator source state is unreadable: {e}"))
    }

    pub fn restore(&mut self, parts: &[Bytes]) -> Result<(), String> {
        let mut by_partition = BTreeMap::new();
        for part in parts {
            let states: Vec<PartState> = postcard::from_bytes(part)
                .map_err(|e| format!("generator source state is unreadable: {e}"))?;
            for s in states {
                by_partition.insert(s.partition, s);
            }
        }
        for p in &mut self.parts {
            if let Some(s) = by_partition.get(&p.partition) {
                p.offset = s.offset;
                p.max_ts = s.max_ts;
            }
        }
        self.started = Instant::now();
        self.emitted_since_start = 0;
        Ok(())
    }

    pub fn records_read(&self) -> u64 {
        self.parts.iter().map(|p| p.offset).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_core::spec::parse_spec;

    fn model(yaml_fields: &str, total: u64, partitions: u32) -> GeneratorModel {
        let text = format!(
            "apiVersion: ferry.dev/v1\nkind: Job\nmetadata: {{name: g}}\nspec:\n  source:\n    generator:\n      total: {total}\n      partitions: {partitions}\n      eventTime: {{step: 10ms, maxOutOfOrderness: 50ms}}\n      fields: {yaml_fields}\n  sink: {{blackhole: {{}}}}\n"
        );
        let spec = parse_spec(&text).unwrap();
        let flow = ferry_core::spec::output_schemas(&spec).unwrap();
        let ferry_core::spec::SourceSpec::Generator(g) = &spec.spec.source else {
            unreachable!()
        };
        GeneratorModel::new(g, 1, &flow.source).unwrap()
    }

    #[test]
    fn batches_equal_record_at_and_replay_is_identical() {
        let m = model(
            "{user: {type: key, cardinality: 7, prefix: u}, n: {type: int, min: -3, max: 3}, x: {type: float, min: 0, max: 1}, s: {type: sequence}}",
            1000,
            3,
        );
        assert_eq!(
            (0..3).map(|p| m.partition_len(p).unwrap()).sum::<u64>(),
            1000
        );
        let (b, _) = m.batch(1, 10, 5);
        for row in 0..5 {
            let i = (10 + row as u64) * 3 + 1;
            let expect = m.record_at(i);
            let got: Vec<Value> = b.columns.iter().map(|c| c.get(row)).collect();
            assert_eq!(got, expect);
            assert_eq!(b.ts[row], m.ts_at(i));
            // Disorder is bounded by maxOutOfOrderness.
            let base = m.start + i as i64 * m.step;
            assert!(b.ts[row] <= base && b.ts[row] >= base - 50);
        }
        let (again, _) = m.batch(1, 10, 5);
        assert_eq!(again.columns, b.columns);
    }

    #[test]
    fn source_reads_every_record_once_and_restores_offsets() {
        let m = Arc::new(model("{k: {type: key, cardinality: 5}}", 10_000, 4));
        let mut seen = 0u64;
        let mut a = GeneratorSource::new(m.clone(), 0, 0, 2);
        let mut snap = None;
        while let Poll::Batch(b) = a.poll() {
            seen += b.len() as u64;
            if snap.is_none() {
                snap = Some(a.snapshot().unwrap().0);
            }
        }
        assert_eq!(
            seen,
            m.partition_len(0).unwrap() + m.partition_len(2).unwrap()
        );
        let mut b = GeneratorSource::new(m.clone(), 0, 0, 2);
        b.restore(&[Bytes::from(snap.unwrap())]).unwrap();
        let mut rest = 0u64;
        while let Poll::Batch(x) = b.poll() {
            rest += x.len() as u64;
        }
        assert_eq!(rest + MAX_BATCH.min(m.partition_len(0).unwrap()), seen);
    }

    #[test]
    fn extreme_bounds_and_many_keys_generate_without_overflow() {
        // The full i64 range (its span does not fit a u64 plus one), a
        // single-value range, and more string keys than the table holds.
        let m = model(
            "{a: {type: int, min: -9223372036854775808, max: 9223372036854775807}, b: {type: int, min: 7, max: 7}, k: {type: key, cardinality: 100000000, prefix: c-}}",
            100,
            1,
        );
        let (b, _) = m.batch(0, 0, 100);
        let a: Vec<Value> = (0..100).map(|r| b.columns[0].get(r)).collect();
        let distinct: std::collections::BTreeSet<String> =
            a.iter().map(|v| format!("{v:?}")).collect();
        assert!(
            distinct.len() > 90,
            "full-range ints should rarely repeat: {distinct:?}"
        );
        assert!(a.iter().any(|v| matches!(v, Value::Int(x) if *x < 0)));
        assert!(a.iter().any(|v| matches!(v, Value::Int(x) if *x > 0)));
        for r in 0..100 {
            assert_eq!(b.columns[1].get(r), Value::Int(7));
            let Value::Str(k) = b.columns[2].get(r) else {
                panic!("key is a string")
            };
            let n: u64 = k.strip_prefix("c-").unwrap().parse().unwrap();
            assert!(n < 100_000_000);
            assert_eq!(b.columns[2].get(r), m.record_at(r as u64)[2]);
        }
        // Time saturates instead of wrapping for an index far past the end.
        assert!(m.ts_at(u64::MAX) >= m.ts_at(1));
    }
}
