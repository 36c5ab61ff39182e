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
//!
//! Incremental snapshots: each window numbers its keys in arrival order
//! (slots) and marks the slots a record updates in a bitset. A full
//! snapshot lists keys in slot order, so whoever reads it back numbers
//! them the same; a delta against an earlier snapshot of this instance
//! lists, per live window, the accumulators of the slots changed since
//! (as gaps between slot numbers) and the keys added since with theirs.
//!
//! State beyond memory: given the process's [`StateStore`], the windows
//! live in it instead (see [`spill`]), in the same slot order, so their
//! snapshots have the same format and restore into either kind.

mod spill;
mod stream;

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
use crate::operator::{OpResult, Operator, StateBytes, StatePart, key_partition};
use crate::state::StateStore;
use ferry_core::CheckpointId;
use spill::DiskWin;

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
    /// One bit per slot updated since the last incremental snapshot.
    dirty: Vec<u64>,
}

impl Win {
    fn with_capacity(keys: usize, per_key: usize) -> Self {
        Self {
            fired: false,
            index: FxHashMap::with_capacity_and_hasher(keys, Default::default()),
            accs: Vec::with_capacity(keys * per_key),
            dirty: Vec::new(),
        }
    }

    /// Number of keys (slots).
    fn len(&self) -> usize {
        self.index.len()
    }

    /// Keys in slot order.
    fn keys_by_slot(&self) -> Vec<&Key> {
        let mut out: Vec<Option<&Key>> = vec![None; self.index.len()];
        for (k, i) in &self.index {
            out[*i as usize] = Some(k);
        }
        out.into_iter().flatten().collect()
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
        let w = i >> 6;
        if w >= self.dirty.len() {
            self.dirty.resize(w + 1, 0);
        }
        self.dirty[w] |= 1 << (i & 63);
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
        // Slot order: a reader numbers the keys as this instance does, so
        // deltas against this snapshot name slots by number.
        let keys: Vec<(&Key, &[Acc])> = win
            .keys_by_slot()
            .into_iter()
            .enumerate()
            .map(|(i, k)| (k, &win.accs[i * n..(i + 1) * n]))
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

/// First bytes of a delta (a full snapshot has none: it predates deltas).
const DELTA_MAGIC: u32 = 0xF0DE_17A1;

/// A delta as written: borrowed from the live windows.
#[derive(Serialize)]
struct DeltaRef<'a> {
    magic: u32,
    watermark: i64,
    windows: Vec<DeltaWinRef<'a>>,
}

/// One live window in a delta (see [`DeltaWin`]).
#[derive(Serialize)]
struct DeltaWinRef<'a> {
    start: i64,
    fired: bool,
    base_len: u32,
    new_keys: Vec<&'a Key>,
    new_accs: &'a [Acc],
    gaps: Vec<u32>,
    accs: Vec<&'a Acc>,
}

/// A delta read back (and written from the state store): every window
/// alive when it was written.
#[derive(Serialize, Deserialize)]
struct Delta {
    magic: u32,
    watermark: i64,
    windows: Vec<DeltaWin>,
}

/// One live window of a delta: its key count in the base (0: a window the
/// base did not have), the keys added since with their accumulators (all
/// of a key's in a row), and the slots below `base_len` that changed, as
/// gaps from the previous such slot (the first from slot 0), with theirs.
#[derive(Serialize, Deserialize)]
struct DeltaWin {
    start: i64,
    fired: bool,
    base_len: u32,
    new_keys: Vec<Key>,
    new_accs: Vec<Acc>,
    gaps: Vec<u32>,
    accs: Vec<Acc>,
}

/// What an incremental snapshot of this instance left to build deltas on.
#[derive(Debug)]
struct Taken {
    id: CheckpointId,
    /// Keys per window then.
    lens: BTreeMap<i64, u32>,
    /// Slots updated between the previous snapshot and this one.
    dirty: BTreeMap<i64, Vec<u64>>,
}

/// Snapshots kept while none completes: beyond this, deltas restart from a
/// full snapshot instead of growing without bound.
const MAX_TAKEN: usize = 8;

/// A window's state as read back in slot order: `(fired, [(key, [acc])])`.
type SlotWindow = (bool, Vec<(Key, Vec<Acc>)>);

/// Applies a delta to a state read back from its base chain.
fn apply_delta(st: &mut WindowState, raw: &[u8], n: usize, name: &str) -> OpResult<()> {
    let d = stream::decode_delta(raw, name)?;
    let mut old: BTreeMap<i64, SlotWindow> = std::mem::take(&mut st.windows).into_iter().collect();
    let mut windows = Vec::with_capacity(d.windows.len());
    for w in d.windows {
        stream::delta_fits(&w, old.get(&w.start).map(|o| o.1.len()), n, name)?;
        let (_, mut keys) = if w.base_len == 0 {
            (false, Vec::new())
        } else {
            old.remove(&w.start).unwrap_or_default()
        };
        let mut slot = 0usize;
        for (g, accs) in w.gaps.iter().zip(w.accs.chunks(n.max(1))) {
            slot += *g as usize;
            if let Some(entry) = keys.get_mut(slot) {
                // (Restore checks each key's aggregations.)
                entry.1.clear();
                entry.1.extend_from_slice(accs);
            }
        }
        keys.extend(
            w.new_keys
                .into_iter()
                .zip(w.new_accs.chunks(n.max(1)))
                .map(|(k, a)| (k, a.to_vec())),
        );
        windows.push((w.start, (w.fired, keys)));
    }
    st.watermark = d.watermark;
    st.windows = windows;
    Ok(())
}

/// The numbers of the bits set in `bits`, in order (changed slots).
fn set_bits(bits: &[u64]) -> impl Iterator<Item = u32> + '_ {
    bits.iter().enumerate().flat_map(|(i, word)| {
        let mut w = *word;
        std::iter::from_fn(move || {
            (w != 0).then(|| {
                let bit = w.trailing_zeros();
                w &= w - 1;
                (i * 64) as u32 + bit
            })
        })
    })
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
    /// Incremental snapshots taken and not yet superseded by a completed
    /// one, oldest first (the first may be the completed base).
    taken: std::collections::VecDeque<Taken>,
    /// State beyond memory: the windows live in the store and `windows`
    /// stays empty.
    disk: Option<Disk>,
    /// Why the job must fail (the state store failed).
    error: Option<String>,
    /// Stored windows being fired, in bounded pieces: each window's start
    /// and the slot to go on from.
    firing: std::collections::VecDeque<(i64, u32)>,
    /// Keys per piece of a stored firing ([`FIRE_BATCH`]; tests set less).
    fire_batch: usize,
}

/// The windows of an operator whose state lives in the store.
struct Disk {
    store: Arc<StateStore>,
    windows: BTreeMap<i64, DiskWin>,
}

/// Fired results emitted per batch when windows are read from the store.
const FIRE_BATCH: usize = 64 * 1024;

impl Window {
    pub fn new(
        name: &str,
        spec: &WindowSpec,
        keys: &[String],
        input: &Schema,
        output: &Schema,
        store: Option<Arc<StateStore>>,
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
            taken: Default::default(),
            disk: store.map(|store| Disk {
                store,
                windows: BTreeMap::new(),
            }),
            error: None,
            firing: Default::default(),
            fire_batch: FIRE_BATCH,
        })
    }

    /// Keys per live window.
    fn lens(&self) -> Vec<(i64, usize)> {
        match &self.disk {
            Some(d) => d.windows.iter().map(|(s, w)| (*s, w.len())).collect(),
            None => self.windows.iter().map(|(s, w)| (*s, w.len())).collect(),
        }
    }

    /// Records why the job must fail (the first reason only).
    fn fail(&mut self, why: String) {
        if self.error.is_none() {
            self.error = Some(format!("window '{}': {why}", self.name));
        }
    }

    /// Adds row `i` to the stored window `start`; returns false if late.
    fn add_disk(&mut self, start: i64, batch: &Batch, i: usize, key: Key) -> OpResult<bool> {
        if self.is_late(start) {
            return Ok(false);
        }
        let fire_now = start + self.size - 1 <= self.watermark;
        let Some(d) = &mut self.disk else {
            return Ok(false);
        };
        let win = match d.windows.entry(start) {
            std::collections::btree_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::btree_map::Entry::Vacant(e) => e.insert(DiskWin::new(&d.store)?),
        };
        update(win.slot(key.clone(), &self.plans)?, &self.plans, batch, i);
        if fire_now {
            win.fired = true;
            if let Some(accs) = win.get(&key, self.plans.len()) {
                self.pending.push(&key, start, accs, &self.plans);
            }
        }
        Ok(true)
    }

    /// Processes a batch into windows in the store.
    fn process_disk(&mut self, batch: &Batch) -> OpResult<u64> {
        let mut late = 0;
        let k = if self.size == self.slide {
            1
        } else {
            self.size / self.slide
        };
        for r in 0..batch.len() {
            let last = batch.ts[r].div_euclid(self.slide) * self.slide;
            let key = key_at(batch, &self.key_idx, r);
            let mut any = false;
            for w in 0..k {
                any |= self.add_disk(last - w * self.slide, batch, r, key.clone())?;
            }
            if !any {
                late += 1;
            }
        }
        self.spill_if_over()?;
        Ok(late)
    }

    /// Writes the caches back and empties them when the process's caches
    /// hold more than their bound.
    fn spill_if_over(&mut self) -> OpResult<()> {
        let n = self.plans.len();
        if let Some(d) = &mut self.disk {
            d.windows.values_mut().for_each(DiskWin::recharge);
        }
        if let Some(d) = &mut self.disk
            && d.store.over_budget()
            && d.windows.values().any(DiskWin::cached)
        {
            d.store.evicted();
            for w in d.windows.values_mut() {
                w.evict(n)?;
            }
        }
        Ok(())
    }

    /// Starts firing the stored windows due at the watermark, and fires
    /// the first piece; [`Operator::more`] fires the rest.
    fn on_watermark_disk(&mut self, out: &mut Vec<Batch>) -> OpResult<()> {
        let (size, wm) = (self.size, self.watermark);
        let Some(d) = &mut self.disk else {
            return Ok(());
        };
        for (start, win) in d.windows.range_mut(..) {
            if *start + size - 1 > wm {
                break;
            }
            if !win.fired {
                win.fired = true;
                self.firing.push_back((*start, 0));
            }
        }
        self.fire_some(out)
    }

    /// Fires up to `fire_batch` keys of the stored windows being fired;
    /// once all have fired, purges the windows past their lateness.
    fn fire_some(&mut self, out: &mut Vec<Batch>) -> OpResult<()> {
        let (size, lateness, wm, n) = (self.size, self.lateness, self.watermark, self.plans.len());
        let Some(d) = &mut self.disk else {
            return Ok(());
        };
        let mut left = self.fire_batch;
        while left > 0
            && let Some((start, from)) = self.firing.front_mut()
        {
            let Some(win) = d.windows.get_mut(start) else {
                self.firing.pop_front();
                continue;
            };
            let (pending, plans, start_ms) = (&mut self.pending, &self.plans, *start);
            let next = win.for_some(n, *from, left, |k, a| {
                pending.push(&k, start_ms, &a, plans);
                left -= 1;
            })?;
            match next {
                Some(slot) => *from = slot,
                None => {
                    self.firing.pop_front();
                }
            }
        }
        if self.firing.is_empty() {
            purge(&mut d.windows, size, lateness, wm);
        }
        self.flush(out);
        Ok(())
    }

    /// Fires what is left of a firing at once (when something other than
    /// [`Operator::more`] comes first).
    fn finish_firing(&mut self, out: &mut Vec<Batch>) {
        while !self.firing.is_empty() && self.error.is_none() {
            if let Err(e) = self.fire_some(out) {
                self.fail(e);
            }
        }
    }

    /// Writes every stored window back and views them as of now.
    fn disk_views(
        &mut self,
    ) -> OpResult<Option<(Vec<spill::WinView>, crate::state::StoreSnapshot)>> {
        let n = self.plans.len();
        let Some(d) = &mut self.disk else {
            return Ok(None);
        };
        for w in d.windows.values_mut() {
            w.write_back(n)?;
        }
        let views = d.windows.iter().map(|(s, w)| w.view(*s)).collect();
        Ok(Some((views, d.store.snapshot())))
    }

    /// A full snapshot of the stored windows, encoded later.
    fn disk_full(&mut self) -> OpResult<Option<StateBytes>> {
        let Some((views, snap)) = self.disk_views()? else {
            return Ok(None);
        };
        let Some(store) = self.disk.as_ref().map(|d| d.store.clone()) else {
            return Ok(None);
        };
        let wm = self.watermark;
        Ok(Some(StateBytes::Later {
            spool: store.spool(),
            encode: Box::new(move |out| {
                spill::encode_full(wm, &views, &snap, out, |what, e| store.failed(what, e))
            }),
        }))
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
        flush_pending(
            &mut self.pending,
            &self.key_idx,
            &self.plans,
            self.size,
            &self.out_schema,
            out,
        );
    }
}

/// Drops the windows (by start) past their allowed lateness at `wm`.
fn purge<W>(windows: &mut BTreeMap<i64, W>, size: i64, lateness: i64, wm: i64) {
    while let Some(entry) = windows.first_entry() {
        if (*entry.key() + size - 1).saturating_add(lateness) <= wm {
            entry.remove();
        } else {
            break;
        }
    }
}

/// Emits the pending fired results as one batch.
fn flush_pending(
    pending: &mut Pending,
    key_idx: &[usize],
    plans: &[AggPlan],
    size: i64,
    schema: &SchemaRef,
    out: &mut Vec<Batch>,
) {
    if pending.starts.is_empty() {
        return;
    }
    let p = std::mem::replace(pending, Pending::new(key_idx.len(), plans.len()));
    let mut columns: Vec<Column> = p.keys.into_iter().map(|b| b.finish()).collect();
    columns.push(Column::Ts(p.starts.clone()));
    columns.push(Column::Ts(p.starts.iter().map(|s| s + size).collect()));
    columns.extend(p.aggs.into_iter().map(|b| b.finish()));
    out.push(Batch {
        schema: schema.clone(),
        columns,
        ts: p.starts.iter().map(|s| s + size - 1).collect(),
    });
}

impl Operator for Window {
    fn memory_bytes(&self) -> u64 {
        self.windows.values().map(Win::memory_bytes).sum::<u64>()
            + self.disk.as_ref().map_or(0, |d| {
                d.windows.values().map(DiskWin::memory_bytes).sum::<u64>()
            })
    }

    fn state_name(&self) -> Option<&str> {
        Some(&self.name)
    }

    fn transient_failure(&self) -> Option<String> {
        self.error.clone()
    }

    fn process(&mut self, batch: Batch, out: &mut Vec<Batch>, m: &TaskMetrics) {
        let n = batch.len();
        let mut late = 0u64;
        if self.disk.is_some() {
            self.finish_firing(out);
            if self.error.is_some() {
                return;
            }
            match self.process_disk(&batch) {
                Ok(l) => late = l,
                Err(e) => self.fail(e),
            }
        } else if self.size == self.slide {
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
        if self.disk.is_some() {
            self.finish_firing(out);
            self.watermark = wm;
            if self.error.is_none()
                && let Err(e) = self.on_watermark_disk(out)
            {
                self.fail(e);
            }
            self.flush(out);
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
        purge(&mut self.windows, size, self.lateness, wm);
        self.flush(out);
    }

    fn more(&mut self, out: &mut Vec<Batch>) -> bool {
        if self.firing.is_empty() || self.error.is_some() {
            return false;
        }
        if let Err(e) = self.fire_some(out) {
            self.fail(e);
        }
        true
    }

    fn snapshot_bytes(&mut self) -> OpResult<Option<StateBytes>> {
        match self.disk_full()? {
            Some(later) => Ok(Some(later)),
            None => Ok(self.snapshot()?.map(StateBytes::Ready)),
        }
    }

    fn snapshot(&mut self) -> OpResult<Option<Vec<u8>>> {
        if let Some(b) = self.disk_full()? {
            return b.now().map(Some);
        }
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
        if self.disk.is_some() {
            let chains: Vec<Vec<Bytes>> = parts.iter().map(|p| vec![p.clone()]).collect();
            return self.restore_chains_disk(&chains, subtask, parallelism);
        }
        let mut states = Vec::with_capacity(parts.len());
        for part in parts {
            states.push(self.decode(part)?);
        }
        self.absorb(states, subtask, parallelism)
    }

    fn restore_chains(
        &mut self,
        chains: &[Vec<Bytes>],
        subtask: u32,
        parallelism: u32,
    ) -> OpResult<()> {
        if self.disk.is_some() {
            return self.restore_chains_disk(chains, subtask, parallelism);
        }
        let n = self.plans.len();
        let mut states = Vec::with_capacity(chains.len());
        for chain in chains {
            let Some((full, deltas)) = chain.split_first() else {
                continue;
            };
            let mut st = self.decode(full)?;
            for d in deltas {
                apply_delta(&mut st, d, n, &self.name)?;
            }
            states.push(st);
        }
        self.absorb(states, subtask, parallelism)
    }

    fn check_chains(&mut self, chains: &[Vec<Bytes>]) -> OpResult<()> {
        self.check(chains)
    }

    fn snapshot_part(
        &mut self,
        id: CheckpointId,
        base: Option<CheckpointId>,
    ) -> OpResult<Option<StatePart>> {
        // What changed since the previous snapshot becomes that snapshot's.
        let mut taken = Taken {
            id,
            lens: BTreeMap::new(),
            dirty: BTreeMap::new(),
        };
        for (start, w) in &mut self.windows {
            taken.lens.insert(*start, w.len() as u32);
            taken.dirty.insert(*start, std::mem::take(&mut w.dirty));
        }
        if let Some(d) = &mut self.disk {
            for (start, w) in &mut d.windows {
                taken.lens.insert(*start, w.len() as u32);
                taken.dirty.insert(*start, std::mem::take(&mut w.dirty));
            }
        }
        let base_at = base
            .and_then(|b| self.taken.iter().position(|t| t.id == b))
            .filter(|at| self.delta_pays(*at, &taken));
        let part = match base_at {
            Some(at) if self.disk.is_some() => StatePart::Delta {
                base: self.taken[at].id,
                bytes: self.disk_delta(at, &taken)?,
            },
            Some(at) => StatePart::Delta {
                base: self.taken[at].id,
                bytes: StateBytes::Ready(self.delta(at, &taken)?),
            },
            None => StatePart::Full(
                self.snapshot_bytes()?
                    .ok_or_else(|| "a window always has state".to_string())?,
            ),
        };
        self.taken.push_back(taken);
        while self.taken.len() > MAX_TAKEN {
            self.taken.pop_front();
        }
        Ok(Some(part))
    }

    fn checkpoint_completed(&mut self, id: CheckpointId) {
        if let Some(at) = self.taken.iter().position(|t| t.id == id) {
            self.taken.drain(..at);
            // Changes before the base are in the base.
            self.taken[0].dirty.clear();
        }
    }
}

impl Window {
    /// Reads one full snapshot.
    fn decode(&self, part: &[u8]) -> OpResult<WindowState> {
        postcard::from_bytes(part)
            .map_err(|e| format!("window state of '{}' is unreadable: {e}", self.name))
    }

    /// Takes in the states of the old subtasks, keeping the keys `subtask`
    /// of `parallelism` owns; the watermark is the lowest of theirs.
    fn absorb(&mut self, states: Vec<WindowState>, subtask: u32, parallelism: u32) -> OpResult<()> {
        let mut watermark: Option<i64> = None;
        for st in states {
            watermark = Some(watermark.map_or(st.watermark, |w| w.min(st.watermark)));
            for (start, (fired, keys)) in st.windows {
                let plans = std::mem::take(&mut self.plans);
                let win = self.window(start);
                win.fired |= fired;
                for (k, accs) in keys {
                    if accs.len() != plans.len() {
                        self.plans = plans;
                        return Err(self.aggregations_changed(accs.len()));
                    }
                    if key_partition(k.stable_hash(), parallelism) == subtask {
                        win.slot(k, &plans).clone_from_slice(&accs);
                    }
                }
                self.plans = plans;
            }
        }
        self.restored(watermark);
        Ok(())
    }

    /// After a restore: the watermark is the lowest of the old subtasks'
    /// (`None`: nothing was restored), and restored slots are numbered
    /// anew, so the next snapshot is full.
    fn restored(&mut self, watermark: Option<i64>) {
        self.watermark = watermark.unwrap_or(i64::MIN);
        for w in self.windows.values_mut() {
            w.dirty.clear();
        }
        if let Some(d) = &mut self.disk {
            for w in d.windows.values_mut() {
                w.dirty.clear();
            }
        }
        self.taken.clear();
    }

    /// Takes in one restored key of stored window `start` if `subtask`
    /// owns it.
    fn absorb_key(
        &mut self,
        start: i64,
        key: Key,
        accs: Vec<Acc>,
        subtask: u32,
        parallelism: u32,
    ) -> OpResult<()> {
        if accs.len() != self.plans.len() {
            return Err(self.aggregations_changed(accs.len()));
        }
        if key_partition(key.stable_hash(), parallelism) != subtask {
            return Ok(());
        }
        let Some(d) = &mut self.disk else {
            return Err("no state store".into());
        };
        let win = match d.windows.entry(start) {
            std::collections::btree_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::btree_map::Entry::Vacant(e) => e.insert(DiskWin::new(&d.store)?),
        };
        win.slot(key, &self.plans)?.clone_from_slice(&accs);
        self.spill_if_over()
    }

    /// Marks stored window `start` fired if it was (when any key of it
    /// was restored here).
    fn mark_fired(&mut self, start: i64, fired: bool) {
        if let Some(w) = self.disk.as_mut().and_then(|d| d.windows.get_mut(&start)) {
            w.fired |= fired;
        }
    }

    fn aggregations_changed(&self, saved: usize) -> String {
        format!(
            "the saved state of window '{}' has {saved} aggregations but the spec has {}; \
             a window's aggregations cannot change across a restore (rename the window to start it empty)",
            self.name,
            self.plans.len()
        )
    }

    /// Whether a delta on `self.taken[at]` is worth writing: not when the
    /// state is empty (a full snapshot is a few bytes and ends the chain),
    /// nor when no key is new and most changed (a full snapshot is hardly
    /// larger — a changed key costs a delta a few bytes, a full snapshot
    /// its key too — and restores from one file). New keys cost a delta
    /// what they cost a full snapshot, so a growing state keeps writing
    /// deltas.
    fn delta_pays(&self, at: usize, now: &Taken) -> bool {
        let lens = self.lens();
        let total: usize = lens.iter().map(|(_, l)| l).sum();
        if total == 0 {
            return false;
        }
        let base = &self.taken[at];
        let (mut new, mut old, mut changed) = (0usize, 0usize, 0usize);
        for (start, len) in lens {
            let base_len = base.lens.get(&start).copied().unwrap_or(0) as usize;
            new += len.saturating_sub(base_len);
            old += base_len;
            changed += self
                .changed_since(at, now, start, base_len as u32)
                .iter()
                .map(|b| b.count_ones() as usize)
                .sum::<usize>();
        }
        new > 0 || changed * 2 < old
    }

    /// The slots below `base_len` of window `start` updated after the
    /// snapshot `self.taken[at]`: in every snapshot since, and in `now`
    /// (the changes since the newest one), as a bitset.
    fn changed_since(&self, at: usize, now: &Taken, start: i64, base_len: u32) -> Vec<u64> {
        let mut changed = vec![0u64; (base_len as usize).div_ceil(64)];
        let later = self.taken.iter().skip(at + 1).chain(std::iter::once(now));
        for t in later {
            if let Some(bits) = t.dirty.get(&start) {
                for (c, b) in changed.iter_mut().zip(bits) {
                    *c |= *b;
                }
            }
        }
        if let Some(last) = changed.last_mut()
            && !base_len.is_multiple_of(64)
        {
            *last &= (1u64 << (base_len % 64)) - 1;
        }
        changed
    }

    /// The delta of the stored windows from `self.taken[at]` to now,
    /// encoded later from a view of the store taken now.
    fn disk_delta(&mut self, at: usize, now: &Taken) -> OpResult<StateBytes> {
        let Some((views, snap)) = self.disk_views()? else {
            return Err("no stored windows".into());
        };
        let base = &self.taken[at];
        let wins: Vec<(spill::WinView, u32, Vec<u64>)> = views
            .into_iter()
            .map(|v| {
                let base_len = base.lens.get(&v.start).copied().unwrap_or(0);
                let changed = self.changed_since(at, now, v.start, base_len);
                (v, base_len, changed)
            })
            .collect();
        let Some(store) = self.disk.as_ref().map(|d| d.store.clone()) else {
            return Err("no stored windows".into());
        };
        let (wm, n) = (self.watermark, self.plans.len());
        Ok(StateBytes::Later {
            spool: store.spool(),
            encode: Box::new(move |out| {
                spill::encode_delta(wm, n, &wins, &snap, out, |what, e| store.failed(what, e))
            }),
        })
    }

    /// The delta from `self.taken[at]` (the base) to now; `now` holds the
    /// changes since the newest snapshot before it.
    fn delta(&self, at: usize, now: &Taken) -> OpResult<Vec<u8>> {
        let n = self.plans.len();
        let base = &self.taken[at];
        let mut windows = Vec::with_capacity(self.windows.len());
        for (start, w) in &self.windows {
            let base_len = base.lens.get(start).copied().unwrap_or(0);
            let len = w.len() as u32;
            let changed = self.changed_since(at, now, *start, base_len);
            let count: usize = changed.iter().map(|w| w.count_ones() as usize).sum();
            let mut gaps = Vec::with_capacity(count);
            let mut accs = Vec::with_capacity(count * n);
            let mut prev = 0u32;
            for slot in set_bits(&changed) {
                gaps.push(slot - prev);
                prev = slot;
                let s = slot as usize;
                accs.extend(&w.accs[s * n..(s + 1) * n]);
            }
            let new_keys: Vec<&Key> = if len > base_len {
                let mut keys: Vec<(u32, &Key)> = w
                    .index
                    .iter()
                    .filter(|(_, i)| **i >= base_len)
                    .map(|(k, i)| (*i, k))
                    .collect();
                keys.sort_unstable_by_key(|(i, _)| *i);
                keys.into_iter().map(|(_, k)| k).collect()
            } else {
                Vec::new()
            };
            windows.push(DeltaWinRef {
                start: *start,
                fired: w.fired,
                base_len,
                new_keys,
                new_accs: &w.accs[base_len as usize * n..len as usize * n],
                gaps,
                accs,
            });
        }
        postcard::to_stdvec(&DeltaRef {
            magic: DELTA_MAGIC,
            watermark: self.watermark,
            windows,
        })
        .map_err(|e| format!("window delta encoding failed: {e}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_core::spec::DurationSpec;

    fn setup(aggs: &[(&str, &str)]) -> (Window, Schema) {
        setup_in(aggs, None, 0, None)
    }

    /// A window over `k` of 1 s (sliding by `slide` ms when given) with
    /// `lateness` ms, in `store` when given.
    fn setup_in(
        aggs: &[(&str, &str)],
        slide: Option<u64>,
        lateness: u64,
        store: Option<Arc<StateStore>>,
    ) -> (Window, Schema) {
        let input = Schema::new([
            ("k".to_string(), DataType::Int),
            ("x".to_string(), DataType::Float),
        ]);
        let spec = WindowSpec {
            name: None,
            tumbling: slide.is_none().then(|| DurationSpec::from_millis(1000)),
            sliding: slide.map(|s| ferry_core::spec::SlidingSpec {
                size: DurationSpec::from_millis(1000),
                slide: DurationSpec::from_millis(s),
            }),
            allowed_lateness: DurationSpec::from_millis(lateness),
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
        let w = Window::new("window", &spec, &["k".into()], &input, &out, store).unwrap();
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

    /// Fired rows as (key, start, values): the watermark's, then every
    /// further piece (each at most `fire_batch` rows).
    fn fire(w: &mut Window, wm: i64) -> Vec<(i64, i64, Vec<Value>)> {
        let mut out = Vec::new();
        w.on_watermark(wm, &mut out);
        let mut all = Vec::new();
        loop {
            let rows: usize = out.iter().map(Batch::len).sum();
            assert!(
                w.disk.is_none() || rows <= w.fire_batch,
                "a piece of {rows} rows"
            );
            all.append(&mut out);
            if !w.more(&mut out) {
                break;
            }
        }
        assert!(out.is_empty());
        rows_of(all)
    }

    /// The rows of fired batches as (key, start, values), sorted.
    fn rows_of(out: Vec<Batch>) -> Vec<(i64, i64, Vec<Value>)> {
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

    fn full(p: Option<StatePart>) -> Bytes {
        match p {
            Some(StatePart::Full(b)) => Bytes::from(b.now().unwrap()),
            other => panic!("expected a full snapshot, got {other:?}"),
        }
    }

    fn delta(p: Option<StatePart>, want_base: u64) -> Bytes {
        match p {
            Some(StatePart::Delta { base, bytes }) => {
                assert_eq!(base, CheckpointId(want_base));
                Bytes::from(bytes.now().unwrap())
            }
            other => panic!("expected a delta, got {other:?}"),
        }
    }

    /// Restores `chain` at `parallelism` and fires everything.
    fn restored_rows(chain: &[Bytes], parallelism: u32) -> Vec<(i64, i64, Vec<Value>)> {
        let mut got = Vec::new();
        for sub in 0..parallelism {
            let (mut r, _) = setup(&[("n", "count"), ("s", "sum(x)")]);
            r.restore_chains(&[chain.to_vec()], sub, parallelism)
                .unwrap();
            got.extend(fire(&mut r, i64::MAX - 1));
        }
        got.sort_by_key(|r| (r.0, r.1));
        got
    }

    /// What [`drive`] saw of one window: the rows fired after each batch
    /// and watermark, each snapshot's bytes, the last completed chain.
    type Driven = (Vec<Vec<Row>>, Vec<Vec<u8>>, Vec<Bytes>);
    type Row = (i64, i64, Vec<Value>);

    /// Feeds `ws` the same stream: 40 batches of 200 records over 300
    /// keys, event time moving forward with records up to 1.5 s behind
    /// (some late, some within the lateness), a watermark 0.5 s behind the
    /// newest record after each batch and a checkpoint every 4 batches,
    /// completed every other time. Returns per window the fired rows and
    /// the snapshot bytes, and the chain of the last completed checkpoint.
    fn drive(ws: &mut [&mut Window], input: &Schema) -> Vec<Driven> {
        let mut seed = 0x2545_F491_4F6C_DD1Du64;
        let mut rnd = move |m: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % m
        };
        let mut out: Vec<(Vec<_>, Vec<Vec<u8>>)> =
            ws.iter().map(|_| (Vec::new(), Vec::new())).collect();
        let mut chains: Vec<Vec<Bytes>> = ws.iter().map(|_| Vec::new()).collect();
        let mut pending_chains: Vec<Vec<Bytes>> = ws.iter().map(|_| Vec::new()).collect();
        let (mut base, mut id) = (None::<CheckpointId>, 0u64);
        let mut newest = 0i64;
        let m = TaskMetrics::default();
        for b in 0..40 {
            let (mut keys, mut ts) = (Vec::new(), Vec::new());
            for _ in 0..200 {
                newest += rnd(20) as i64;
                keys.push(rnd(300) as i64);
                ts.push((newest - rnd(1500) as i64).max(0));
            }
            let batch = batch(input, keys, ts);
            for (i, w) in ws.iter_mut().enumerate() {
                let mut o = Vec::new();
                w.process(batch.clone(), &mut o, &m);
                assert!(
                    w.transient_failure().is_none(),
                    "{:?}",
                    w.transient_failure()
                );
                out[i].0.push(rows_of(o));
                out[i].0.push(fire(w, newest - 500));
            }
            if b % 4 == 3 {
                id += 1;
                let complete = id % 2 == 1;
                for (i, w) in ws.iter_mut().enumerate() {
                    let (bytes, full) = match w.snapshot_part(CheckpointId(id), base).unwrap() {
                        Some(StatePart::Full(b)) => (b.now().unwrap(), true),
                        Some(StatePart::Delta { base: got, bytes }) => {
                            assert_eq!(Some(got), base);
                            (bytes.now().unwrap(), false)
                        }
                        None => panic!("a window always has state"),
                    };
                    out[i].1.push(bytes.clone());
                    // The chain as of this checkpoint: a full snapshot
                    // starts one, a delta extends the base's.
                    let mut chain = if full { Vec::new() } else { chains[i].clone() };
                    chain.push(Bytes::from(bytes));
                    pending_chains[i] = chain;
                    if complete {
                        w.checkpoint_completed(CheckpointId(id));
                        chains[i] = pending_chains[i].clone();
                    }
                }
                if complete {
                    base = Some(CheckpointId(id));
                }
            }
        }
        out.into_iter()
            .zip(chains)
            .map(|((rows, snaps), chain)| (rows, snaps, chain))
            .collect()
    }

    #[test]
    fn stored_windows_emit_and_snapshot_exactly_as_in_memory() {
        for (slide, lateness) in [(None, 0), (None, 700), (Some(250), 300)] {
            let dir = tempfile::tempdir().unwrap();
            // A tiny bound: the caches are written back every few records.
            let store = StateStore::open(dir.path(), 4096).unwrap();
            let aggs = [
                ("n", "count"),
                ("s", "sum(x)"),
                ("lo", "min(x)"),
                ("a", "avg(x)"),
            ];
            let (mut mem, input) = setup_in(&aggs, slide, lateness, None);
            let (mut disk, _) = setup_in(&aggs, slide, lateness, Some(store.clone()));
            // Fired in pieces that end inside and at the end of windows.
            disk.fire_batch = 7;
            let got = drive(&mut [&mut mem, &mut disk], &input);
            let case = format!("slide {slide:?}, lateness {lateness}");
            assert!(
                got[0].0.iter().map(Vec::len).sum::<usize>() > 1000,
                "{case}: too few rows fired"
            );
            assert_eq!(got[0].0, got[1].0, "{case}: fired rows differ");
            assert_eq!(got[0].1.len(), 10, "{case}");
            assert_eq!(got[0].1, got[1].1, "{case}: snapshot bytes differ");
            assert!(
                store.usage().2 > 10,
                "{case}: the caches were never written back"
            );
            // The chain of the last completed checkpoint restores into
            // either kind, split over 2 subtasks, to the same state.
            let chain = &got[1].2;
            assert!(chain.len() > 1, "{case}: expected deltas in the chain");
            let mut rows = [Vec::new(), Vec::new()];
            for (i, kind) in [None, Some(store.clone())].into_iter().enumerate() {
                for sub in 0..2 {
                    let (mut r, _) = setup_in(&aggs, slide, lateness, kind.clone());
                    r.fire_batch = 50;
                    r.restore_chains(std::slice::from_ref(chain), sub, 2)
                        .unwrap();
                    rows[i].extend(fire(&mut r, i64::MAX - 1));
                }
                rows[i].sort_by_key(|r| (r.0, r.1));
            }
            assert!(!rows[0].is_empty(), "{case}");
            assert_eq!(rows[0], rows[1], "{case}: restored states differ");
            // The chain's full snapshot alone (read straight from its
            // bytes into the store) restores the same as in memory too.
            let mut rows = [Vec::new(), Vec::new()];
            for (i, kind) in [None, Some(store.clone())].into_iter().enumerate() {
                for sub in 0..2 {
                    let (mut r, _) = setup_in(&aggs, slide, lateness, kind.clone());
                    r.restore_chains(&[vec![chain[0].clone()]], sub, 2).unwrap();
                    rows[i].extend(fire(&mut r, i64::MAX - 1));
                }
                rows[i].sort_by_key(|r| (r.0, r.1));
            }
            assert!(!rows[0].is_empty(), "{case}");
            assert_eq!(rows[0], rows[1], "{case}: restored full snapshots differ");
            // At its own parallelism the chain goes straight into the
            // store's windows under its slot numbers, deltas in place.
            let (mut rows, mut snaps) = ([Vec::new(), Vec::new()], [Vec::new(), Vec::new()]);
            for (i, kind) in [None, Some(store.clone())].into_iter().enumerate() {
                let (mut r, _) = setup_in(&aggs, slide, lateness, kind.clone());
                r.restore_chains(std::slice::from_ref(chain), 0, 1).unwrap();
                assert!(!r.lens().is_empty(), "{case}: nothing restored");
                snaps[i] = r.snapshot().unwrap().unwrap();
                rows[i] = fire(&mut r, i64::MAX - 1);
                rows[i].sort_by_key(|r| (r.0, r.1));
            }
            assert!(!rows[0].is_empty(), "{case}");
            assert_eq!(
                rows[0], rows[1],
                "{case}: a chain restored in place differs"
            );
            assert_eq!(snaps[0], snaps[1], "{case}: its snapshot differs");
            // Chains that do not split as their parallelism says are refused.
            let (mut r, _) = setup_in(&aggs, slide, lateness, Some(store.clone()));
            let err = r
                .restore_chains(&[chain.clone(), chain.clone()], 1, 2)
                .unwrap_err();
            assert!(err.contains("a key of another subtask"), "{case}: {err}");
            // What restores passes the check that walks it in place.
            let (mut c, _) = setup_in(&aggs, slide, lateness, Some(store.clone()));
            c.check_chains(std::slice::from_ref(chain)).unwrap();
            assert!(c.lens().is_empty(), "{case}: a check keeps no state");
        }
    }

    #[test]
    fn a_check_refuses_every_chain_that_would_not_restore() {
        let aggs = [("n", "count"), ("s", "sum(x)")];
        let (mut w, input) = setup_in(&aggs, None, 0, None);
        let chain = drive(&mut [&mut w], &input).remove(0).2;
        assert!(chain.len() > 2, "expected deltas in the chain");
        let check = |c: Vec<Bytes>| {
            let (mut r, _) = setup_in(&aggs, None, 0, None);
            r.check_chains(&[c])
        };
        check(chain.clone()).unwrap();
        let cut = |b: &Bytes, n: usize| b.slice(..b.len() - n);
        let mut extended = chain[0].to_vec();
        extended.push(0);
        // A delta that expects one key more than its base has.
        let mut d: Delta = postcard::from_bytes(&chain[1]).unwrap();
        d.windows[0].base_len += 1;
        let misfit = Bytes::from(postcard::to_stdvec(&d).unwrap());
        let cases: Vec<(&str, Vec<Bytes>, &str)> = vec![
            (
                "a truncated full snapshot",
                vec![cut(&chain[0], 3)],
                "unreadable",
            ),
            (
                "bytes after a full snapshot",
                vec![Bytes::from(extended)],
                "follow its last window",
            ),
            (
                "a truncated delta",
                vec![chain[0].clone(), cut(&chain[1], 2)],
                "unreadable",
            ),
            (
                "a full snapshot in a delta's place",
                vec![chain[0].clone(), chain[0].clone()],
                "does not start as one",
            ),
            (
                "a delta on the wrong base",
                vec![chain[0].clone(), misfit],
                "does not fit its base",
            ),
        ];
        let dir = tempfile::tempdir().unwrap();
        let store = StateStore::open(dir.path(), 1 << 20).unwrap();
        for (what, c, want) in cases {
            let err = check(c.clone()).expect_err(what);
            assert!(err.contains(want), "{what}: {err}");
            // A stored window restoring it in one pass refuses it too.
            let (mut r, _) = setup_in(&aggs, None, 0, Some(store.clone()));
            let err = r.restore_chains(&[c], 0, 1).expect_err(what);
            assert!(err.contains(want), "{what}, restored: {err}");
        }
        let (mut other, _) = setup_in(&[("n", "count")], None, 0, None);
        let err = other.check_chains(&[chain]).unwrap_err();
        assert!(err.contains("2 aggregations but the spec has 1"), "{err}");
    }

    #[test]
    fn a_stored_window_gives_its_memory_back_when_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let store = StateStore::open(dir.path(), 1 << 30).unwrap();
        let (mut w, input) = setup_in(&[("n", "count")], None, 0, Some(store.clone()));
        let m = TaskMetrics::default();
        let mut o = Vec::new();
        w.process(
            batch(&input, (0..1000).collect(), vec![5; 1000]),
            &mut o,
            &m,
        );
        assert!(w.memory_bytes() > 1000 * 8);
        assert_eq!(store.usage().0, w.memory_bytes());
        // Firing and purging the window drops its keyspace and its cache.
        let rows = fire(&mut w, 2000);
        assert_eq!(rows.len(), 1000);
        assert!(rows.iter().all(|r| r.2 == vec![Value::Int(1)]));
        assert_eq!(store.usage().0, 0);
        assert_eq!(w.memory_bytes(), 0);
    }

    #[test]
    fn deltas_on_a_full_snapshot_restore_the_same_state() {
        let (mut w, input) = setup(&[("n", "count"), ("s", "sum(x)")]);
        let m = TaskMetrics::default();
        let mut out = Vec::new();
        // 1000 keys in window [0, 1000), some also in [1000, 2000).
        w.process(
            batch(&input, (0..1000).collect(), vec![10; 1000]),
            &mut out,
            &m,
        );
        w.process(
            batch(&input, (0..50).collect(), vec![1500; 50]),
            &mut out,
            &m,
        );
        let base = full(w.snapshot_part(CheckpointId(1), None).unwrap());
        w.checkpoint_completed(CheckpointId(1));

        // Checkpoint 2: a few updates and new keys; it never completes.
        w.process(
            batch(&input, vec![5, 7, 5000], vec![20, 20, 20]),
            &mut out,
            &m,
        );
        let _lost = delta(
            w.snapshot_part(CheckpointId(2), Some(CheckpointId(1)))
                .unwrap(),
            1,
        );
        // Checkpoint 3 builds on 1 again and must carry 2's changes too;
        // the first window fires and a third one opens.
        w.process(batch(&input, vec![900, 6001], vec![30, 2500]), &mut out, &m);
        assert!(!fire(&mut w, 999).is_empty());
        let d3 = delta(
            w.snapshot_part(CheckpointId(3), Some(CheckpointId(1)))
                .unwrap(),
            1,
        );
        assert!(
            d3.len() * 10 < base.len(),
            "a delta of a few keys is small: {} against {}",
            d3.len(),
            base.len()
        );
        w.checkpoint_completed(CheckpointId(3));
        // Checkpoint 4 on 3: window [0, 1000) is purged by the watermark.
        w.process(batch(&input, vec![1, 2], vec![1600, 2600]), &mut out, &m);
        assert!(fire(&mut w, 1200).is_empty());
        assert!(!w.windows.contains_key(&0), "purged");
        let d4 = delta(
            w.snapshot_part(CheckpointId(4), Some(CheckpointId(3)))
                .unwrap(),
            3,
        );

        let want = fire(&mut w, i64::MAX - 1);
        let chain = [base.clone(), d3.clone(), d4];
        assert_eq!(restored_rows(&chain, 1), want);
        assert_eq!(restored_rows(&chain, 3), want, "split across subtasks");
        // Independently: window 1000 holds keys 0..50 once, plus 1; window
        // 2000 holds 6001 and 2.
        let w1000: Vec<i64> = want.iter().filter(|r| r.1 == 1000).map(|r| r.0).collect();
        assert_eq!(w1000, (0..50).collect::<Vec<_>>());
        let k1 = want.iter().find(|r| r.0 == 1 && r.1 == 1000).unwrap();
        assert_eq!(k1.2[0], Value::Int(2));
        let w2000: Vec<i64> = want.iter().filter(|r| r.1 == 2000).map(|r| r.0).collect();
        assert_eq!(w2000, vec![2, 6001]);

        // A delta applied to the wrong base is refused, not misapplied.
        let (mut r, _) = setup(&[("n", "count"), ("s", "sum(x)")]);
        let err = r
            .restore_chains(&[vec![base.clone(), chain[2].clone()]], 0, 1)
            .unwrap_err();
        assert!(err.contains("does not fit its base"), "{err}");
        // A full snapshot in a delta's place too.
        let err = r
            .restore_chains(&[vec![base.clone(), base]], 0, 1)
            .unwrap_err();
        assert!(err.contains("delta"), "{err}");
    }

    #[test]
    fn a_restored_window_snapshots_in_full_first() {
        let (mut w, input) = setup(&[("n", "count"), ("s", "sum(x)")]);
        let m = TaskMetrics::default();
        let mut out = Vec::new();
        w.process(batch(&input, (0..10).collect(), vec![10; 10]), &mut out, &m);
        let base = full(w.snapshot_part(CheckpointId(1), None).unwrap());
        let (mut r, _) = setup(&[("n", "count"), ("s", "sum(x)")]);
        r.restore_chains(&[vec![base]], 0, 1).unwrap();
        // It never took snapshot 1 itself: no delta on it.
        full(
            r.snapshot_part(CheckpointId(2), Some(CheckpointId(1)))
                .unwrap(),
        );
    }

    #[test]
    fn a_mostly_changed_or_empty_state_snapshots_in_full_a_growing_one_in_deltas() {
        let (mut w, input) = setup(&[("n", "count"), ("s", "sum(x)")]);
        let m = TaskMetrics::default();
        let mut out = Vec::new();
        w.process(batch(&input, (0..10).collect(), vec![10; 10]), &mut out, &m);
        full(w.snapshot_part(CheckpointId(1), None).unwrap());
        w.checkpoint_completed(CheckpointId(1));
        // Every key changed: a delta would be as large as the state.
        w.process(batch(&input, (0..10).collect(), vec![20; 10]), &mut out, &m);
        full(
            w.snapshot_part(CheckpointId(2), Some(CheckpointId(1)))
                .unwrap(),
        );
        w.checkpoint_completed(CheckpointId(2));
        // One of ten: a delta.
        w.process(batch(&input, vec![3], vec![30]), &mut out, &m);
        delta(
            w.snapshot_part(CheckpointId(3), Some(CheckpointId(2)))
                .unwrap(),
            2,
        );
        w.checkpoint_completed(CheckpointId(3));
        // Every key changed, and as many new: still a delta (the new keys
        // would cost a full snapshot as much).
        w.process(batch(&input, (0..20).collect(), vec![40; 20]), &mut out, &m);
        delta(
            w.snapshot_part(CheckpointId(4), Some(CheckpointId(3)))
                .unwrap(),
            3,
        );
        w.checkpoint_completed(CheckpointId(4));
        // Fired and purged: nothing left, a full snapshot of nothing.
        fire(&mut w, 5_000);
        full(
            w.snapshot_part(CheckpointId(5), Some(CheckpointId(4)))
                .unwrap(),
        );
    }
}
