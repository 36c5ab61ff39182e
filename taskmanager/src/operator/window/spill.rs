//! Window state beyond memory: each window's keys and accumulators in a
//! keyspace of the process's [`StateStore`], the recently used ones in a
//! cache that charges the store's budget.
//!
//! Entries: `k | key` → its slot (4 bytes, big-endian) and accumulators,
//! so that a key not cached costs one read, and
//! `s | slot (big-endian)` → `(key, [acc])` in postcard, which is the
//! element encoding of a full snapshot: a full snapshot is the `s` entries
//! in order, that is in slot order, as the in-memory window writes it.
//! Slots are numbered by arrival either way, so deltas name the same slots
//! and a checkpoint restores into either kind of window. Snapshots encode
//! from a consistent view of the store on a blocking thread, off the path
//! records take.

use std::sync::Arc;

use fjall::{Keyspace, Readable};
use rustc_hash::FxHashMap;

use super::{Acc, AggPlan, DELTA_MAGIC, set_bits};
use crate::operator::OpResult;
use crate::operator::key::Key;
use crate::state::{StateStore, StoreSnapshot as Snapshot};

/// What a bucket of the cache's table takes (its entry and control byte).
const BUCKET_BYTES: usize = std::mem::size_of::<(Key, u32)>() + 1;

/// The `s` entry of a slot.
pub(super) fn slot_key(slot: u32) -> [u8; 5] {
    let b = slot.to_be_bytes();
    [b's', b[0], b[1], b[2], b[3]]
}

/// Both entries of a key at `slot`, from its encoded key and encoded
/// accumulators: `s|slot` → key, accs and `k|key` → slot, accs.
pub(super) fn entries(slot: u32, key: &[u8], accs: &[u8]) -> [(Vec<u8>, Vec<u8>); 2] {
    let mut s_value = Vec::with_capacity(key.len() + accs.len());
    s_value.extend_from_slice(key);
    s_value.extend_from_slice(accs);
    let mut k = Vec::with_capacity(key.len() + 1);
    k.push(b'k');
    k.extend_from_slice(key);
    let mut k_value = Vec::with_capacity(4 + accs.len());
    k_value.extend_from_slice(&slot.to_be_bytes());
    k_value.extend_from_slice(accs);
    [(slot_key(slot).to_vec(), s_value), (k, k_value)]
}

/// One window of an operator whose state lives in the store.
pub(super) struct DiskWin {
    pub(super) fired: bool,
    /// Slots handed out.
    len: u32,
    /// Slots below this have their entries in the store.
    stored: u32,
    ks: Keyspace,
    store: Arc<StateStore>,
    /// The cache: key -> position; per position its slot, `n` accumulators
    /// and whether they changed since written back.
    index: FxHashMap<Key, u32>,
    slots: Vec<u32>,
    accs: Vec<Acc>,
    unsaved: Vec<bool>,
    /// One bit per slot updated since the last incremental snapshot.
    pub(super) dirty: Vec<u64>,
    /// What it last charged the store's budget ([`Self::recharge`]).
    charged: i64,
    /// Heap memory of the cached keys (strings).
    heap: usize,
    buf: Vec<u8>,
}

impl DiskWin {
    pub(super) fn new(store: &Arc<StateStore>) -> OpResult<Self> {
        Ok(Self {
            fired: false,
            len: 0,
            stored: 0,
            ks: store.keyspace()?,
            store: store.clone(),
            index: FxHashMap::default(),
            slots: Vec::new(),
            accs: Vec::new(),
            unsaved: Vec::new(),
            dirty: Vec::new(),
            charged: 0,
            heap: 0,
            buf: Vec::new(),
        })
    }

    /// Number of keys (slots).
    pub(super) fn len(&self) -> usize {
        self.len as usize
    }

    /// What its cache holds.
    pub(super) fn memory_bytes(&self) -> u64 {
        self.charged.max(0) as u64
    }

    /// Charges the store's budget what the cache takes now: its tables
    /// and vectors at their capacity (which runs up to twice their
    /// length) and its keys' heap.
    pub(super) fn recharge(&mut self) {
        let now = (self.index.capacity() * 8 / 7 * BUCKET_BYTES
            + self.slots.capacity() * 4
            + self.accs.capacity() * std::mem::size_of::<Acc>()
            + self.unsaved.capacity()
            + self.heap) as i64;
        self.store.charge(now - self.charged);
        self.charged = now;
    }

    /// Whether its cache holds anything.
    pub(super) fn cached(&self) -> bool {
        !self.slots.is_empty()
    }

    /// The accumulators of `key`, read from the store or created from
    /// `plans` when it is not cached.
    #[inline]
    pub(super) fn slot(&mut self, key: Key, plans: &[AggPlan]) -> OpResult<&mut [Acc]> {
        let n = plans.len();
        let pos = match self.index.get(&key) {
            Some(p) => *p as usize,
            None => self.load(key, plans)?,
        };
        self.unsaved[pos] = true;
        let slot = self.slots[pos] as usize;
        let w = slot >> 6;
        if w >= self.dirty.len() {
            self.dirty.resize(w + 1, 0);
        }
        self.dirty[w] |= 1 << (slot & 63);
        Ok(&mut self.accs[pos * n..(pos + 1) * n])
    }

    /// The cached accumulators of `key`.
    pub(super) fn get(&self, key: &Key, n: usize) -> Option<&[Acc]> {
        self.index
            .get(key)
            .map(|p| &self.accs[*p as usize * n..(*p as usize + 1) * n])
    }

    /// Brings `key` into the cache; returns its position.
    fn load(&mut self, key: Key, plans: &[AggPlan]) -> OpResult<usize> {
        let n = plans.len();
        let found = if self.stored > 0 {
            self.lookup(&key)?
        } else {
            None
        };
        let pos = self.slots.len();
        match found {
            Some((slot, accs)) => {
                if accs.len() != n {
                    return Err(format!(
                        "a stored entry has {} aggregations, the window {n}",
                        accs.len()
                    ));
                }
                self.slots.push(slot);
                self.accs.extend(accs);
            }
            None => {
                self.slots.push(self.len);
                self.len += 1;
                self.accs.extend(plans.iter().map(|p| p.init.clone()));
            }
        }
        self.heap += key.heap_bytes();
        self.index.insert(key, pos as u32);
        self.unsaved.push(false);
        Ok(pos)
    }

    /// The slot and accumulators the store holds for `key`.
    fn lookup(&mut self, key: &Key) -> OpResult<Option<(u32, Vec<Acc>)>> {
        self.buf.clear();
        self.buf.push(b'k');
        self.buf = postcard::to_extend(key, std::mem::take(&mut self.buf))
            .map_err(|e| format!("encoding a key failed: {e}"))?;
        let Some(raw) = self
            .ks
            .get(&self.buf)
            .map_err(|e| self.store.failed("reading a key", e))?
        else {
            return Ok(None);
        };
        let corrupt = || "a stored key's entry is unreadable (the state directory is corrupt)";
        let (slot, accs) = raw.split_at_checked(4).ok_or_else(corrupt)?;
        let slot = u32::from_be_bytes(slot.try_into().map_err(|_| corrupt())?);
        let accs: Vec<Acc> = postcard::from_bytes(accs).map_err(|_| corrupt())?;
        Ok(Some((slot, accs)))
    }

    /// Writes the cached entries that changed to the store.
    pub(super) fn write_back(&mut self, n: usize) -> OpResult<()> {
        if !self.unsaved.iter().any(|u| *u) {
            self.stored = self.len;
            return Ok(());
        }
        let mut batch = self.store.batch();
        let mut bytes = 0usize;
        let limit = self.store.batch_bytes();
        let (mut k, mut a) = (Vec::new(), Vec::new());
        for (key, pos) in &self.index {
            let pos = *pos as usize;
            if !self.unsaved[pos] {
                continue;
            }
            let slot = self.slots[pos];
            let accs = &self.accs[pos * n..(pos + 1) * n];
            k.clear();
            k.push(b'k');
            k = postcard::to_extend(key, std::mem::take(&mut k))
                .map_err(|e| format!("encoding a key failed: {e}"))?;
            a.clear();
            a = postcard::to_extend(accs, std::mem::take(&mut a))
                .map_err(|e| format!("encoding window state failed: {e}"))?;
            for (key, value) in entries(slot, &k[1..], &a) {
                bytes += key.len() + value.len();
                batch.insert(&self.ks, key, value);
            }
            if bytes >= limit {
                let full = std::mem::replace(&mut batch, self.store.batch());
                self.store.commit(full, bytes)?;
                self.store.wrote(&self.ks)?;
                bytes = 0;
            }
        }
        self.store.commit(batch, bytes)?;
        self.store.wrote(&self.ks)?;
        self.unsaved.iter_mut().for_each(|u| *u = false);
        self.stored = self.len;
        Ok(())
    }

    /// Writes the cache back and empties it, giving its memory back.
    pub(super) fn evict(&mut self, n: usize) -> OpResult<()> {
        self.write_back(n)?;
        self.index = FxHashMap::default();
        self.slots = Vec::new();
        self.accs = Vec::new();
        self.unsaved = Vec::new();
        self.heap = 0;
        self.store.charge(-self.charged);
        self.charged = 0;
        Ok(())
    }

    /// Up to `max` keys with their accumulators, in slot order from slot
    /// `from` (written back first when `from` is 0); returns the slot to
    /// go on from, or `None` after the last key. Nothing may change the
    /// window between the calls of one pass.
    pub(super) fn for_some(
        &mut self,
        n: usize,
        from: u32,
        max: usize,
        mut f: impl FnMut(Key, Vec<Acc>),
    ) -> OpResult<Option<u32>> {
        if from == 0 {
            self.write_back(n)?;
        }
        let mut slot = from;
        for kv in self.ks.range(slot_key(from)..slot_key(u32::MAX)).take(max) {
            let (k, v) = kv
                .into_inner()
                .map_err(|e| self.store.failed("reading a window", e))?;
            let corrupt = |e: &dyn std::fmt::Display| {
                format!("a stored entry is unreadable (the state directory is corrupt): {e}")
            };
            let at = k
                .get(1..5)
                .and_then(|b| b.try_into().ok())
                .map(u32::from_be_bytes)
                .ok_or_else(|| corrupt(&"bad slot key"))?;
            if at != slot || at >= self.len {
                return Err(format!(
                    "the state store lacks slot {slot} of a window that has {} keys (the state directory is corrupt)",
                    self.len
                ));
            }
            let (k, accs): (Key, Vec<Acc>) = postcard::from_bytes(&v).map_err(|e| corrupt(&e))?;
            f(k, accs);
            slot += 1;
        }
        if slot < self.len && slot - from < max as u32 {
            return Err(format!(
                "the state store holds {slot} keys of a window that has {}",
                self.len
            ));
        }
        Ok((slot < self.len).then_some(slot))
    }

    /// Its keyspace, for a restore that writes entries straight in.
    pub(super) fn keyspace(&self) -> &Keyspace {
        &self.ks
    }

    /// After a restore wrote slots `0..len` straight into its keyspace.
    pub(super) fn set_restored(&mut self, len: u32) {
        self.len = len;
        self.stored = len;
    }

    /// What a snapshot taken after [`Self::write_back`] needs of it.
    pub(super) fn view(&self, start: i64) -> WinView {
        WinView {
            start,
            fired: self.fired,
            len: self.len,
            ks: self.ks.clone(),
        }
    }
}

impl Drop for DiskWin {
    fn drop(&mut self) {
        self.store.charge(-self.charged);
        self.store.drop_keyspace(self.ks.clone());
    }
}

/// One window as a snapshot sees it.
pub(super) struct WinView {
    pub(super) start: i64,
    pub(super) fired: bool,
    pub(super) len: u32,
    pub(super) ks: Keyspace,
}

/// Encodes a full snapshot (the in-memory window's format) from `snap`
/// into `out`, a piece at a time.
pub(super) fn encode_full(
    watermark: i64,
    wins: &[WinView],
    snap: &Snapshot,
    out: &mut dyn std::io::Write,
    failed: impl Fn(&str, &dyn std::fmt::Display) -> String,
) -> OpResult<()> {
    const PIECE: usize = 1 << 20;
    let enc = |e: postcard::Error| format!("window state encoding failed: {e}");
    let write = |out: &mut dyn std::io::Write, buf: &mut Vec<u8>| {
        out.write_all(buf)
            .map_err(|e| format!("writing a window snapshot failed: {e}"))?;
        buf.clear();
        Ok::<_, String>(())
    };
    let mut buf = postcard::to_stdvec(&watermark).map_err(enc)?;
    buf = postcard::to_extend(&wins.len(), buf).map_err(enc)?;
    for w in wins {
        buf = postcard::to_extend(&(w.start, w.fired, w.len as usize), buf).map_err(enc)?;
        let mut count = 0u32;
        for kv in snap.prefix(&w.ks, b"s") {
            let v = kv
                .value()
                .map_err(|e| failed("reading a window for a snapshot", &e))?;
            buf.extend_from_slice(&v);
            count += 1;
            if buf.len() >= PIECE {
                write(out, &mut buf)?;
            }
        }
        if count != w.len {
            return Err(format!(
                "the state store holds {count} keys of window {} that has {}",
                w.start, w.len
            ));
        }
    }
    write(out, &mut buf)
}

/// Encodes a delta on a base that had `base_len` keys per window, with the
/// slots below it that changed since (`changed`, one bitset per window),
/// into `out` as it reads the store: the new keys stream through, only
/// their accumulators (a few bytes each) wait for the end of their window.
/// The bytes are those of a [`Delta`] the in-memory window writes.
pub(super) fn encode_delta(
    watermark: i64,
    n: usize,
    wins: &[(WinView, u32, Vec<u64>)],
    snap: &Snapshot,
    out: &mut dyn std::io::Write,
    failed: impl Fn(&str, &dyn std::fmt::Display) -> String,
) -> OpResult<()> {
    const PIECE: usize = 1 << 20;
    let enc = |e: postcard::Error| format!("window delta encoding failed: {e}");
    let unreadable = |e: &dyn std::fmt::Display| {
        format!("a stored entry is unreadable (the state directory is corrupt): {e}")
    };
    let write = |out: &mut dyn std::io::Write, buf: &mut Vec<u8>| {
        out.write_all(buf)
            .map_err(|e| format!("writing a window delta failed: {e}"))?;
        buf.clear();
        Ok::<_, String>(())
    };
    // An entry's key bytes, and its accumulators' bytes without their count.
    let split = |v: &[u8]| -> OpResult<(usize, usize)> {
        let (_, rest) = postcard::take_from_bytes::<Key>(v).map_err(|e| unreadable(&e))?;
        let key_len = v.len() - rest.len();
        let (count, elems) =
            postcard::take_from_bytes::<usize>(rest).map_err(|e| unreadable(&e))?;
        if count != n {
            return Err(format!(
                "a stored entry has {count} aggregations, the window {n}"
            ));
        }
        Ok((key_len, v.len() - elems.len()))
    };
    let mut buf = postcard::to_stdvec(&DELTA_MAGIC).map_err(enc)?;
    buf = postcard::to_extend(&watermark, buf).map_err(enc)?;
    buf = postcard::to_extend(&wins.len(), buf).map_err(enc)?;
    for (w, base_len, changed) in wins {
        buf = postcard::to_extend(&(w.start, w.fired, *base_len), buf).map_err(enc)?;
        // Slots only grow; an empty range when there is nothing new.
        let from = (*base_len).min(w.len);
        let new = (w.len - from) as usize;
        buf = postcard::to_extend(&new, buf).map_err(enc)?;
        let mut new_accs = Vec::new();
        let mut count = 0usize;
        for kv in snap.range(&w.ks, slot_key(from)..slot_key(w.len)) {
            let v = kv
                .value()
                .map_err(|e| failed("reading a window for a snapshot", &e))?;
            let (key_len, accs_at) = split(&v)?;
            buf.extend_from_slice(&v[..key_len]);
            new_accs.extend_from_slice(&v[accs_at..]);
            count += 1;
            if buf.len() >= PIECE {
                write(out, &mut buf)?;
            }
        }
        if count != new {
            return Err(format!(
                "the state store holds {count} new keys of window {}, it has {new}",
                w.start
            ));
        }
        buf = postcard::to_extend(&(new * n), buf).map_err(enc)?;
        buf.extend_from_slice(&new_accs);
        drop(new_accs);
        let (mut gaps, mut accs) = (Vec::new(), Vec::new());
        let mut prev = 0u32;
        for slot in set_bits(changed) {
            let v = snap
                .get(&w.ks, slot_key(slot))
                .map_err(|e| failed("reading a window for a snapshot", &e))?
                .ok_or_else(|| {
                    format!(
                        "slot {slot} of window {} is missing from the state store",
                        w.start
                    )
                })?;
            let (_, accs_at) = split(&v)?;
            accs.extend_from_slice(&v[accs_at..]);
            gaps.push(slot - prev);
            prev = slot;
        }
        buf = postcard::to_extend(&gaps, buf).map_err(enc)?;
        buf = postcard::to_extend(&(gaps.len() * n), buf).map_err(enc)?;
        buf.extend_from_slice(&accs);
        if buf.len() >= PIECE {
            write(out, &mut buf)?;
        }
    }
    write(out, &mut buf)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_core::value::DataType;

    fn count() -> Vec<AggPlan> {
        vec![AggPlan {
            init: Acc::Count(0),
            col: None,
            out_type: DataType::Int,
        }]
    }

    #[test]
    fn keys_written_back_are_read_again_and_a_corrupt_entry_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let store = StateStore::open(dir.path(), 1 << 30).unwrap();
        let plans = count();
        let mut w = DiskWin::new(&store).unwrap();
        for round in 1..=3i64 {
            for k in 0..100 {
                match w.slot(Key::Int(k), &plans).unwrap() {
                    [Acc::Count(n)] => *n += 1,
                    other => panic!("{other:?}"),
                }
            }
            // Every round starts from the store, not the cache.
            w.evict(1).unwrap();
            assert!(!w.cached());
            assert_eq!(w.memory_bytes(), 0);
            assert_eq!(w.len(), 100, "round {round}");
        }
        let mut seen = Vec::new();
        let mut from = Some(0);
        while let Some(f) = from {
            from = w.for_some(1, f, 30, |k, a| seen.push((k, a))).unwrap();
        }
        assert_eq!(seen.len(), 100);
        // Slot order is arrival order; every key counted three times.
        for (i, (k, a)) in seen.iter().enumerate() {
            assert_eq!(*k, Key::Int(i as i64));
            assert_eq!(*a, vec![Acc::Count(3)]);
        }
        // A damaged entry is an error naming the state directory's
        // corruption, not a panic or a silently fresh count.
        let k = postcard::to_extend(&Key::Int(7), vec![b'k']).unwrap();
        w.ks.insert(k, [1u8, 2]).unwrap();
        let err = w.slot(Key::Int(7), &plans).unwrap_err();
        assert!(err.contains("corrupt"), "{err}");
    }
}
