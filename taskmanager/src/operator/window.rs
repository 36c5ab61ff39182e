//! Event-time tumbling and sliding windows over a keyed stream, with allowed
//! lateness, a late-record counter and count/sum/min/max/avg aggregations.
//!
//! Semantics follow Apache Flink's event-time windows: a window
//! `[start, end)` fires once when the watermark reaches `end - 1`; a record
//! for a window whose `end - 1 + allowedLateness <= watermark` is dropped and
//! counted as late; a record that arrives after its window fired but within
//! the allowed lateness updates the window and fires it again at once (one
//! updated result per such record). State of a window is purged when the
//! watermark passes `end - 1 + allowedLateness`.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use bytes::Bytes;
use ferry_core::schema::{Schema, SchemaRef};
use ferry_core::spec::{AggregateFn, Aggregation, WindowSpec};
use ferry_core::value::{DataType, Value};
use rustc_hash::FxHashMap;
use serde::{Deserialize, Serialize};

use crate::batch::{Batch, Column, ColumnBuilder};
use crate::metrics::TaskMetrics;
use crate::operator::key::{Key, key_at};
use crate::operator::{OpResult, Operator, key_partition};

/// One running aggregate.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Acc {
    Count(i64),
    SumI(i64),
    SumF(f64),
    MinI(Option<i64>),
    MaxI(Option<i64>),
    MinF(Option<f64>),
    MaxF(Option<f64>),
    Avg { sum: f64, n: i64 },
}

/// How to compute one aggregation from a batch column.
#[derive(Clone, Debug)]
struct AggPlan {
    init: Acc,
    col: Option<usize>,
    out_type: DataType,
}

impl AggPlan {
    fn new(a: &Aggregation, input: &Schema) -> Self {
        let col = a.field.as_ref().and_then(|f| input.index_of(f));
        let in_type = col
            .map(|c| input.fields[c].data_type)
            .unwrap_or(DataType::Any);
        let int_like = matches!(in_type, DataType::Int | DataType::Timestamp);
        let init = match a.func {
            AggregateFn::Count => Acc::Count(0),
            AggregateFn::Sum if in_type == DataType::Int => Acc::SumI(0),
            AggregateFn::Sum => Acc::SumF(0.0),
            AggregateFn::Min if int_like => Acc::MinI(None),
            AggregateFn::Max if int_like => Acc::MaxI(None),
            AggregateFn::Min => Acc::MinF(None),
            AggregateFn::Max => Acc::MaxF(None),
            AggregateFn::Avg => Acc::Avg { sum: 0.0, n: 0 },
        };
        Self {
            init,
            col,
            out_type: a.output_type,
        }
    }
}

#[inline]
fn update(accs: &mut [Acc], plans: &[AggPlan], batch: &Batch, i: usize) {
    for (acc, p) in accs.iter_mut().zip(plans) {
        match acc {
            Acc::Count(n) => *n += 1,
            Acc::SumI(s) => {
                if let Some(Column::Int(v)) = p.col.map(|c| &batch.columns[c]) {
                    *s = s.wrapping_add(v[i]);
                } else if let Some(Value::Int(x)) = p.col.map(|c| batch.columns[c].get(i)) {
                    *s = s.wrapping_add(x);
                }
            }
            Acc::SumF(s) => {
                if let Some(x) = p.col.and_then(|c| batch.columns[c].f64_at(i)) {
                    *s += x;
                }
            }
            Acc::MinI(m) | Acc::MaxI(m) => {
                let x = match p.col.map(|c| &batch.columns[c]) {
                    Some(Column::Int(v)) | Some(Column::Ts(v)) => Some(v[i]),
                    Some(c) => match c.get(i) {
                        Value::Int(x) | Value::Ts(x) => Some(x),
                        _ => None,
                    },
                    None => None,
                };
                if let Some(x) = x {
                    let is_min = matches!(p.init, Acc::MinI(_));
                    *m = Some(match *m {
                        None => x,
                        Some(cur) if is_min => cur.min(x),
                        Some(cur) => cur.max(x),
                    });
                }
            }
            Acc::MinF(m) | Acc::MaxF(m) => {
                if let Some(x) = p.col.and_then(|c| batch.columns[c].f64_at(i)) {
                    let is_min = matches!(p.init, Acc::MinF(_));
                    *m = Some(match *m {
                        None => x,
                        Some(cur) if is_min => cur.min(x),
                        Some(cur) => cur.max(x),
                    });
                }
            }
            Acc::Avg { sum, n } => {
                if let Some(x) = p.col.and_then(|c| batch.columns[c].f64_at(i)) {
                    *sum += x;
                    *n += 1;
                }
            }
        }
    }
}

fn result(acc: &Acc, out_type: DataType) -> Value {
    match acc {
        Acc::Count(n) | Acc::SumI(n) => Value::Int(*n),
        Acc::SumF(s) => Value::Float(*s),
        Acc::MinI(m) | Acc::MaxI(m) => match (m, out_type) {
            (Some(x), DataType::Timestamp) => Value::Ts(*x),
            (Some(x), _) => Value::Int(*x),
            (None, _) => Value::Null,
        },
        Acc::MinF(m) | Acc::MaxF(m) => m.map_or(Value::Null, Value::Float),
        Acc::Avg { sum, n } if *n > 0 => Value::Float(sum / *n as f64),
        Acc::Avg { .. } => Value::Null,
    }
}

/// Per-window state.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
struct Win {
    fired: bool,
    keys: FxHashMap<Key, Vec<Acc>>,
}

/// What a window operator snapshots (restored as [`WindowState`]; postcard
/// encodes a map exactly like a sequence of pairs, so the two agree).
#[derive(Serialize)]
struct WindowStateRef<'a> {
    watermark: i64,
    windows: &'a BTreeMap<i64, Win>,
}

/// A window operator's snapshot, read back.
#[derive(Debug, Default, Deserialize)]
struct WindowState {
    watermark: i64,
    windows: Vec<(i64, Win)>,
}

/// The window operator.
pub struct Window {
    name: String,
    size: i64,
    slide: i64,
    lateness: i64,
    key_idx: Vec<usize>,
    plans: Vec<AggPlan>,
    out_schema: SchemaRef,
    watermark: i64,
    windows: BTreeMap<i64, Win>,
    /// Output rows waiting to be emitted as one batch.
    pending: OutRows,
}

#[derive(Default)]
struct OutRows {
    rows: Vec<(Key, i64, Vec<Value>)>,
}

impl Window {
    pub fn new(
        name: &str,
        spec: &WindowSpec,
        keys: &[String],
        input: &Schema,
        output: &Schema,
    ) -> Result<Self, String> {
        let (size, slide) = match (&spec.tumbling, &spec.sliding) {
            (Some(t), _) => (t.as_millis(), t.as_millis()),
            (None, Some(s)) => (s.size.as_millis(), s.slide.as_millis()),
            (None, None) => return Err("window without a size".into()),
        };
        let key_idx = keys
            .iter()
            .map(|k| input.index_of(k).ok_or(format!("unknown key field '{k}'")))
            .collect::<Result<Vec<_>, _>>()?;
        let plans = spec
            .aggregate
            .iter()
            .map(|(n, t)| Aggregation::parse(n, t, input).map(|a| AggPlan::new(&a, input)))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            name: name.to_string(),
            size,
            slide,
            lateness: spec.allowed_lateness.as_millis(),
            key_idx,
            plans,
            out_schema: Arc::new(output.clone()),
            watermark: i64::MIN,
            windows: BTreeMap::new(),
            pending: OutRows::default(),
        })
    }

    fn is_late(&self, start: i64) -> bool {
        self.watermark != i64::MIN
            && (start + self.size - 1).saturating_add(self.lateness) <= self.watermark
    }

    fn fire_key(&mut self, start: i64, key: &Key) {
        if let Some(win) = self.windows.get(&start)
            && let Some(accs) = win.keys.get(key)
        {
            let vals = accs
                .iter()
                .zip(&self.plans)
                .map(|(a, p)| result(a, p.out_type))
                .collect();
            self.pending.rows.push((key.clone(), start, vals));
        }
    }

    /// Adds row `i` to window `start`; returns false if it was late.
    #[inline]
    fn add(&mut self, start: i64, batch: &Batch, i: usize, key: Key) -> bool {
        if self.is_late(start) {
            return false;
        }
        let plans = &self.plans;
        let win = self.windows.entry(start).or_default();
        let accs = win
            .keys
            .entry(key.clone())
            .or_insert_with(|| plans.iter().map(|p| p.init.clone()).collect());
        update(accs, plans, batch, i);
        if start + self.size - 1 <= self.watermark {
            // Late but allowed: fire the updated result right away.
            win.fired = true;
            self.fire_key(start, &key);
        }
        true
    }

    fn flush(&mut self, out: &mut Vec<Batch>) {
        if self.pending.rows.is_empty() {
            return;
        }
        let rows = std::mem::take(&mut self.pending.rows);
        let nkeys = self.key_idx.len();
        let mut key_cols: Vec<ColumnBuilder> = (0..nkeys).map(|_| ColumnBuilder::new()).collect();
        let mut starts = Vec::with_capacity(rows.len());
        let mut ends = Vec::with_capacity(rows.len());
        let mut agg_cols: Vec<ColumnBuilder> = (0..self.plans.len())
            .map(|_| ColumnBuilder::new())
            .collect();
        let mut ts = Vec::with_capacity(rows.len());
        for (key, start, vals) in rows {
            for (b, v) in key_cols.iter_mut().zip(key.values()) {
                b.push(v);
            }
            starts.push(start);
            ends.push(start + self.size);
            ts.push(start + self.size - 1);
            for (b, v) in agg_cols.iter_mut().zip(vals) {
                b.push(v);
            }
        }
        let mut columns: Vec<Column> = key_cols.into_iter().map(|b| b.finish()).collect();
        columns.push(Column::Ts(starts));
        columns.push(Column::Ts(ends));
        columns.extend(agg_cols.into_iter().map(|b| b.finish()));
        out.push(Batch {
            schema: self.out_schema.clone(),
            columns,
            ts,
        });
    }
}

impl Operator for Window {
    fn state_name(&self) -> Option<&str> {
        Some(&self.name)
    }

    fn process(&mut self, batch: Batch, out: &mut Vec<Batch>, m: &TaskMetrics) {
        let n = batch.len();
        let mut late = 0u64;
        if self.size == self.slide {
            // Tumbling: process runs of rows that fall into the same window.
            let size = self.size;
            let mut i = 0;
            while i < n {
                let start = batch.ts[i].div_euclid(size) * size;
                let mut j = i + 1;
                while j < n && batch.ts[j].div_euclid(size) * size == start {
                    j += 1;
                }
                let on_time = !self.is_late(start) && start + size - 1 > self.watermark;
                if on_time {
                    let plans = &self.plans;
                    let win = self.windows.entry(start).or_default();
                    for r in i..j {
                        let key = key_at(&batch, &self.key_idx, r);
                        let accs = win
                            .keys
                            .entry(key)
                            .or_insert_with(|| plans.iter().map(|p| p.init.clone()).collect());
                        update(accs, plans, &batch, r);
                    }
                } else {
                    for r in i..j {
                        let key = key_at(&batch, &self.key_idx, r);
                        if !self.add(start, &batch, r, key) {
                            late += 1;
                        }
                    }
                }
                i = j;
            }
        } else {
            let k = self.size / self.slide;
            for r in 0..n {
                let t = batch.ts[r];
                let last = t.div_euclid(self.slide) * self.slide;
                let key = key_at(&batch, &self.key_idx, r);
                let mut any = false;
                for w in 0..k {
                    let start = last - w * self.slide;
                    any |= self.add(start, &batch, r, key.clone());
                }
                if !any {
                    late += 1;
                }
            }
        }
        if late > 0 {
            m.late_records.fetch_add(late, Ordering::Relaxed);
        }
        self.flush(out);
    }

    fn on_watermark(&mut self, wm: i64, out: &mut Vec<Batch>) {
        if wm <= self.watermark {
            return;
        }
        self.watermark = wm;
        // Fire every window that is complete and has not fired.
        let size = self.size;
        let due: Vec<i64> = self
            .windows
            .iter()
            .take_while(|(s, _)| *s + size - 1 <= wm)
            .filter(|(_, w)| !w.fired)
            .map(|(s, _)| *s)
            .collect();
        for start in due {
            if let Some(win) = self.windows.get_mut(&start) {
                win.fired = true;
                let vals: Vec<(Key, Vec<Value>)> = win
                    .keys
                    .iter()
                    .map(|(k, accs)| {
                        (
                            k.clone(),
                            accs.iter()
                                .zip(&self.plans)
                                .map(|(a, p)| result(a, p.out_type))
                                .collect(),
                        )
                    })
                    .collect();
                for (k, v) in vals {
                    self.pending.rows.push((k, start, v));
                }
            }
        }
        // Purge windows past their allowed lateness.
        let lateness = self.lateness;
        while let Some(entry) = self.windows.first_entry() {
            if (*entry.key() + size - 1).saturating_add(lateness) <= wm {
                entry.remove();
            } else {
                break;
            }
        }
        self.flush(out);
    }

    fn snapshot(&self) -> OpResult<Option<Vec<u8>>> {
        let st = WindowStateRef {
            watermark: self.watermark,
            windows: &self.windows,
        };
        postcard::to_stdvec(&st)
            .map(Some)
            .map_err(|e| format!("window state encoding failed: {e}"))
    }

    fn restore(&mut self, parts: &[Bytes], subtask: u32, parallelism: u32) -> OpResult<()> {
        let mut wm = i64::MAX;
        for part in parts {
            let st: WindowState = postcard::from_bytes(part)
                .map_err(|e| format!("window state of '{}' is unreadable: {e}", self.name))?;
            wm = wm.min(st.watermark);
            for (start, old) in st.windows {
                let win = self.windows.entry(start).or_default();
                win.fired |= old.fired;
                for (k, accs) in old.keys {
                    if key_partition(k.stable_hash(), parallelism) == subtask {
                        win.keys.insert(k, accs);
                    }
                }
            }
        }
        self.watermark = if parts.is_empty() { i64::MIN } else { wm };
        Ok(())
    }
}
