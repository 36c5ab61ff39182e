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

/// Per-window state: key -> slot, and one arena of accumulators
/// (`plans.len()` per slot), so a new key costs no allocation of its own.
#[derive(Clone, Debug, Default)]
struct Win {
    fired: bool,
    index: FxHashMap<Key, u32>,
    accs: Vec<Acc>,
}

impl Win {
    fn with_capacity(keys: usize, per_key: usize) -> Self {
        Self {
            fired: false,
            index: FxHashMap::with_capacity_and_hasher(keys, Default::default()),
            accs: Vec::with_capacity(keys * per_key),
        }
    }

    /// The accumulators of `key`, created from `plans` if new.
    #[inline]
    fn slot(&mut self, key: Key, plans: &[AggPlan]) -> &mut [Acc] {
        let n = plans.len();
        let accs = &mut self.accs;
        let i = *self.index.entry(key).or_insert_with(|| {
            let i = (accs.len() / n) as u32;
            accs.extend(plans.iter().map(|p| p.init.clone()));
            i
        }) as usize;
        &mut self.accs[i * n..(i + 1) * n]
    }

    /// Roughly the memory of its table and arena.
    fn memory_bytes(&self) -> u64 {
        let entry = std::mem::size_of::<(Key, u32)>() + 1;
        (self.index.capacity() * entry + self.accs.capacity() * std::mem::size_of::<Acc>()) as u64
    }

    fn get(&self, key: &Key, n: usize) -> Option<&[Acc]> {
        self.index
            .get(key)
            .map(|i| &self.accs[*i as usize * n..(*i as usize + 1) * n])
    }
}

/// Serializes a window as `(fired, [(key, [acc])])`.
struct WinRef<'a>(&'a Win, usize);

impl Serialize for WinRef<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeTuple;
        let (win, n) = (self.0, self.1);
        let mut t = s.serialize_tuple(2)?;
        t.serialize_element(&win.fired)?;
        let keys: Vec<(&Key, &[Acc])> = win
            .index
            .iter()
            .map(|(k, i)| (k, &win.accs[*i as usize * n..(*i as usize + 1) * n]))
            .collect();
        t.serialize_element(&keys)?;
        t.end()
    }
}

/// What a window operator snapshots (read back as [`WindowState`]).
#[derive(Serialize)]
struct WindowStateRef<'a> {
    watermark: i64,
    windows: Vec<(i64, WinRef<'a>)>,
}

/// One window as read back from a snapshot: `(start, (fired, [(key, [acc])]))`.
type SavedWindow = (i64, (bool, Vec<(Key, Vec<Acc>)>));

/// A window operator's snapshot, read back.
#[derive(Debug, Default, Deserialize)]
struct WindowState {
    watermark: i64,
    windows: Vec<SavedWindow>,
}

/// Fired results waiting to be emitted as one batch, column by column.
struct Pending {
    keys: Vec<ColumnBuilder>,
    starts: Vec<i64>,
    aggs: Vec<ColumnBuilder>,
}

impl Pending {
    fn new(nkeys: usize, naggs: usize) -> Self {
        Self {
            keys: (0..nkeys).map(|_| ColumnBuilder::new()).collect(),
            starts: Vec::new(),
            aggs: (0..naggs).map(|_| ColumnBuilder::new()).collect(),
        }
    }

    fn push(&mut self, key: &Key, start: i64, accs: &[Acc], plans: &[AggPlan]) {
        key.push_values(&mut self.keys);
        self.starts.push(start);
        for ((b, a), p) in self.aggs.iter_mut().zip(accs).zip(plans) {
            b.push(result(a, p.out_type));
        }
    }
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
    /// Largest number of keys seen in a window: new windows start that big.
    keys_hint: usize,
    pending: Pending,
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
        let pending = Pending::new(key_idx.len(), plans.len());
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
            keys_hint: 16,
            pending,
        })
    }

    fn is_late(&self, start: i64) -> bool {
        self.watermark != i64::MIN
            && (start + self.size - 1).saturating_add(self.lateness) <= self.watermark
    }

    fn window(&mut self, start: i64) -> &mut Win {
        let (hint, n) = (self.keys_hint, self.plans.len());
        self.windows
            .entry(start)
            .or_insert_with(|| Win::with_capacity(hint, n))
    }

    /// Adds row `i` to window `start`; returns false if it was late.
    #[inline]
    fn add(&mut self, start: i64, batch: &Batch, i: usize, key: Key) -> bool {
        if self.is_late(start) {
            return false;
        }
        let fire_now = start + self.size - 1 <= self.watermark;
        let plans = std::mem::take(&mut self.plans);
        let win = self.window(start);
        update(win.slot(key.clone(), &plans), &plans, batch, i);
        if fire_now {
            // Late but allowed: fire the updated result right away.
            win.fired = true;
            let accs = win.get(&key, plans.len()).expect("just updated").to_vec();
            self.pending.push(&key, start, &accs, &plans);
        }
        self.plans = plans;
        true
    }

    fn flush(&mut self, out: &mut Vec<Batch>) {
        if self.pending.starts.is_empty() {
            return;
        }
        let p = std::mem::replace(
            &mut self.pending,
            Pending::new(self.key_idx.len(), self.plans.len()),
        );
        let size = self.size;
        let mut columns: Vec<Column> = p.keys.into_iter().map(|b| b.finish()).collect();
        columns.push(Column::Ts(p.starts.clone()));
        columns.push(Column::Ts(p.starts.iter().map(|s| s + size).collect()));
        columns.extend(p.aggs.into_iter().map(|b| b.finish()));
        out.push(Batch {
            schema: self.out_schema.clone(),
            columns,
            ts: p.starts.iter().map(|s| s + size - 1).collect(),
        });
    }
}

impl Operator for Window {
    fn memory_bytes(&self) -> u64 {
        self.windows.values().map(Win::memory_bytes).sum()
    }

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
                    let plans = std::mem::take(&mut self.plans);
                    let key_idx = std::mem::take(&mut self.key_idx);
                    let win = self.window(start);
                    for r in i..j {
                        let key = key_at(&batch, &key_idx, r);
                        update(win.slot(key, &plans), &plans, &batch, r);
                    }
                    self.plans = plans;
                    self.key_idx = key_idx;
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
        let n = self.plans.len();
        for start in due {
            if let Some(win) = self.windows.get_mut(&start) {
                win.fired = true;
                self.keys_hint = self.keys_hint.max(win.index.len());
                for (k, i) in &win.index {
                    let accs = &win.accs[*i as usize * n..(*i as usize + 1) * n];
                    self.pending.push(k, start, accs, &self.plans);
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
        let n = self.plans.len();
        let st = WindowStateRef {
            watermark: self.watermark,
            windows: self
                .windows
                .iter()
                .map(|(s, w)| (*s, WinRef(w, n)))
                .collect(),
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
            for (start, (fired, keys)) in st.windows {
                let plans = std::mem::take(&mut self.plans);
                let win = self.window(start);
                win.fired |= fired;
                for (k, accs) in keys {
                    if accs.len() != plans.len() {
                        self.plans = plans;
                        return Err(format!(
                            "the saved state of window '{}' has {} aggregations but the spec has {}; \
                             a window's aggregations cannot change across a restore (rename the window to start it empty)",
                            self.name,
                            accs.len(),
                            self.plans.len()
                        ));
                    }
                    if key_partition(k.stable_hash(), parallelism) == subtask {
                        win.slot(k, &plans).clone_from_slice(&accs);
                    }
                }
                self.plans = plans;
            }
        }
        self.watermark = if parts.is_empty() { i64::MIN } else { wm };
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_core::spec::DurationSpec;

    fn setup(aggs: &[(&str, &str)]) -> (Window, Schema) {
        let input = Schema::new([
            ("k".to_string(), DataType::Int),
            ("x".to_string(), DataType::Float),
        ]);
        let spec = WindowSpec {
            name: None,
            tumbling: Some(DurationSpec::from_millis(1000)),
            sliding: None,
            allowed_lateness: DurationSpec::from_millis(0),
            aggregate: aggs
                .iter()
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .collect(),
        };
        let mut out = Schema::new([
            ("k".to_string(), DataType::Int),
            ("window_start".to_string(), DataType::Timestamp),
            ("window_end".to_string(), DataType::Timestamp),
        ]);
        for (n, _) in aggs {
            out.fields.push(ferry_core::schema::Field {
                name: n.to_string(),
                data_type: DataType::Any,
            });
        }
        let w = Window::new("window", &spec, &["k".into()], &input, &out).unwrap();
        (w, input)
    }

    fn batch(input: &Schema, keys: Vec<i64>, ts: Vec<i64>) -> Batch {
        let xs = keys.iter().map(|k| *k as f64 * 1.5).collect();
        Batch {
            schema: Arc::new(input.clone()),
            columns: vec![Column::Int(keys), Column::Float(xs)],
            ts,
        }
    }

    /// Fired rows as (key, start, values).
    fn fire(w: &mut Window, wm: i64) -> Vec<(i64, i64, Vec<Value>)> {
        let mut out = Vec::new();
        w.on_watermark(wm, &mut out);
        let mut rows = Vec::new();
        for b in out {
            for i in 0..b.len() {
                let Value::Int(k) = b.columns[0].get(i) else {
                    panic!()
                };
                let Value::Ts(s) = b.columns[1].get(i) else {
                    panic!()
                };
                rows.push((
                    k,
                    s,
                    (3..b.columns.len()).map(|c| b.columns[c].get(i)).collect(),
                ));
            }
        }
        rows.sort_by_key(|r| (r.0, r.1));
        rows
    }

    #[test]
    fn snapshot_restores_and_splits_keys_across_subtasks() {
        let (mut w, input) = setup(&[("n", "count"), ("s", "sum(x)")]);
        let m = TaskMetrics::default();
        let mut out = Vec::new();
        w.process(
            batch(&input, (0..40).collect(), vec![100; 40]),
            &mut out,
            &m,
        );
        w.process(batch(&input, vec![3, 3], vec![200, 1200]), &mut out, &m);
        let snap = Bytes::from(w.snapshot().unwrap().unwrap());
        let want = fire(&mut w, 5000);
        assert_eq!(want.len(), 41);

        // Restored at parallelism 2, the two halves together give the same.
        let mut got = Vec::new();
        for sub in 0..2 {
            let (mut r, _) = setup(&[("n", "count"), ("s", "sum(x)")]);
            r.restore(std::slice::from_ref(&snap), sub, 2).unwrap();
            let part = fire(&mut r, 5000);
            assert!(
                !part.is_empty() && part.len() < 41,
                "keys split across subtasks"
            );
            got.extend(part);
        }
        got.sort_by_key(|r| (r.0, r.1));
        assert_eq!(got, want);
        // Every row, computed here from the input: one record per key at
        // 100 ms (x = 1.5 k), key 3 again at 200 ms and at 1200 ms.
        let mut independent: Vec<(i64, i64, Vec<Value>)> = (0..40)
            .map(|k| {
                let (n, s) = if k == 3 {
                    (2, 9.0)
                } else {
                    (1, k as f64 * 1.5)
                };
                (k, 0, vec![Value::Int(n), Value::Float(s)])
            })
            .collect();
        independent.push((3, 1000, vec![Value::Int(1), Value::Float(4.5)]));
        independent.sort_by_key(|r| (r.0, r.1));
        assert_eq!(want, independent);
    }

    #[test]
    fn restoring_into_different_aggregations_is_an_error() {
        let (mut w, input) = setup(&[("n", "count")]);
        let mut out = Vec::new();
        w.process(
            batch(&input, vec![1], vec![1]),
            &mut out,
            &TaskMetrics::default(),
        );
        let snap = Bytes::from(w.snapshot().unwrap().unwrap());
        let (mut other, _) = setup(&[("n", "count"), ("s", "sum(x)")]);
        let err = other.restore(&[snap], 0, 1).unwrap_err();
        assert!(err.contains("1 aggregations but the spec has 2"), "{err}");
    }
}
