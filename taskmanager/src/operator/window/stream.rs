//! Large state without holding it: a full snapshot is walked in place, one
//! key at a time, instead of being decoded whole. A window operator whose
//! state lives in the store restores through this: a chain with deltas is
//! rebuilt in scratch keyspaces under its old slot numbers, then taken in
//! key by key. Checking that a checkpoint restores ([`Window::check`])
//! walks every file without building any state.

use std::collections::BTreeMap;
use std::sync::Arc;

use bytes::Bytes;
use fjall::Keyspace;

use super::spill::slot_key;
use super::{Acc, DELTA_MAGIC, Delta, DeltaWin, Window};
use crate::operator::OpResult;
use crate::operator::key::Key;
use crate::state::StateStore;

/// Keys of a scratch window read at once when a restore takes them in.
const RESTORE_PIECE: usize = 16 * 1024;

/// One key of a full snapshot: its encoded bytes (the key's first), and
/// the key and accumulators read from them.
pub(super) struct Entry<'a> {
    pub(super) raw: &'a [u8],
    pub(super) key_len: usize,
    pub(super) key: Key,
    pub(super) accs: Vec<Acc>,
}

/// A cursor over the bytes of a full window snapshot: its windows in
/// order, each followed by its keys in slot order.
pub(super) struct FullReader<'a> {
    rest: &'a [u8],
    windows_left: u64,
    keys_left: u64,
    name: &'a str,
}

impl<'a> FullReader<'a> {
    /// Reads the header; returns the snapshot's watermark and the cursor.
    pub(super) fn new(raw: &'a [u8], name: &'a str) -> OpResult<(i64, Self)> {
        let mut r = Self {
            rest: raw,
            windows_left: 0,
            keys_left: 0,
            name,
        };
        let watermark: i64 = r.take()?;
        r.windows_left = r.take()?;
        Ok((watermark, r))
    }

    fn take<T: serde::de::DeserializeOwned>(&mut self) -> OpResult<T> {
        let (v, rest) = postcard::take_from_bytes(self.rest)
            .map_err(|e| format!("window state of '{}' is unreadable: {e}", self.name))?;
        self.rest = rest;
        Ok(v)
    }

    /// The next window, `(start, fired, keys)`, once the keys of the one
    /// before were read; `None` after the last.
    pub(super) fn next_window(&mut self) -> OpResult<Option<(i64, bool, u32)>> {
        if self.keys_left > 0 {
            return Err(format!(
                "window state of '{}': a window's keys were not all read",
                self.name
            ));
        }
        if self.windows_left == 0 {
            return Ok(None);
        }
        self.windows_left -= 1;
        let (start, fired, len): (i64, bool, u64) = self.take()?;
        let len = u32::try_from(len).map_err(|_| {
            format!(
                "window state of '{}' is unreadable: window {start} claims {len} keys",
                self.name
            )
        })?;
        self.keys_left = len as u64;
        Ok(Some((start, fired, len)))
    }

    /// The next key of the current window with its accumulators and its
    /// encoded bytes; `None` after its last.
    pub(super) fn next_key(&mut self) -> OpResult<Option<Entry<'a>>> {
        if self.keys_left == 0 {
            return Ok(None);
        }
        self.keys_left -= 1;
        let before = self.rest;
        let key: Key = self.take()?;
        let key_len = before.len() - self.rest.len();
        let accs: Vec<Acc> = self.take()?;
        let raw = &before[..before.len() - self.rest.len()];
        Ok(Some(Entry {
            raw,
            key_len,
            key,
            accs,
        }))
    }

    /// Checks that nothing follows the last window.
    pub(super) fn finish(self) -> OpResult<()> {
        if self.windows_left > 0 || self.keys_left > 0 {
            return Err(format!(
                "window state of '{}' is unreadable: it ends early",
                self.name
            ));
        }
        if !self.rest.is_empty() {
            return Err(format!(
                "window state of '{}' is unreadable: {} bytes follow its last window",
                self.name,
                self.rest.len()
            ));
        }
        Ok(())
    }
}

/// Refuses bytes that do not start as a delta of window `name`.
fn check_magic(raw: &[u8], name: &str) -> OpResult<()> {
    if postcard::take_from_bytes::<u32>(raw).map(|(m, _)| m) != Ok(DELTA_MAGIC) {
        return Err(format!(
            "a delta of window '{name}' does not start as one (a full snapshot in a delta's place?)"
        ));
    }
    Ok(())
}

/// Reads a delta of window `name`.
pub(super) fn decode_delta(raw: &[u8], name: &str) -> OpResult<Delta> {
    check_magic(raw, name)?;
    postcard::from_bytes(raw).map_err(|e| format!("a delta of window '{name}' is unreadable: {e}"))
}

/// Reads one `T` from the front of `bytes`: the value, its bytes, the rest.
fn take_raw<'a, T: serde::de::DeserializeOwned>(
    bytes: &'a [u8],
    what: &dyn Fn(postcard::Error) -> String,
) -> OpResult<(T, &'a [u8], &'a [u8])> {
    let (v, rest) = postcard::take_from_bytes::<T>(bytes).map_err(what)?;
    Ok((v, &bytes[..bytes.len() - rest.len()], rest))
}

/// A sequence of `T` at the front of `bytes` (its count, then its items):
/// the count, the bytes from its first item on, and what follows it.
fn seq<'a, T: serde::de::DeserializeOwned>(
    bytes: &'a [u8],
    what: &dyn Fn(postcard::Error) -> String,
) -> OpResult<(u64, &'a [u8], &'a [u8])> {
    let (count, _, items) = take_raw::<u64>(bytes, what)?;
    let mut rest = items;
    for _ in 0..count {
        rest = take_raw::<T>(rest, what)?.2;
    }
    Ok((count, items, rest))
}

/// A cursor over the bytes of a delta, window by window, never decoding
/// more than one key at a time.
struct DeltaReader<'a> {
    rest: &'a [u8],
    windows_left: u64,
    watermark: i64,
    n: usize,
    name: &'a str,
}

/// One window of a delta (see [`DeltaWin`]) as cursors into its bytes:
/// its new keys with their accumulators, and its changed slots with
/// theirs, both in slot order.
struct DeltaCursor<'a> {
    start: i64,
    fired: bool,
    base_len: u32,
    new: u32,
    keys: &'a [u8],
    new_accs: &'a [u8],
    gaps_left: u64,
    gaps: &'a [u8],
    accs: &'a [u8],
    /// The next changed slot, once read.
    next_changed: Option<u32>,
}

impl<'a> DeltaReader<'a> {
    fn new(raw: &'a [u8], n: usize, name: &'a str) -> OpResult<Self> {
        check_magic(raw, name)?;
        let bad = |e: postcard::Error| format!("a delta of window '{name}' is unreadable: {e}");
        let (_, _, rest) = take_raw::<u32>(raw, &bad)?;
        let (watermark, _, rest) = take_raw::<i64>(rest, &bad)?;
        let (windows_left, _, rest) = take_raw::<u64>(rest, &bad)?;
        Ok(Self {
            rest,
            windows_left,
            watermark,
            n,
            name,
        })
    }

    fn bad(&self) -> impl Fn(postcard::Error) -> String + 'a {
        let name = self.name;
        move |e| format!("a delta of window '{name}' is unreadable: {e}")
    }

    /// The next window (its sections located by reading over them once).
    fn next_window(&mut self) -> OpResult<Option<DeltaCursor<'a>>> {
        if self.windows_left == 0 {
            if !self.rest.is_empty() {
                return Err(format!(
                    "a delta of window '{}' is unreadable: {} bytes follow its last window",
                    self.name,
                    self.rest.len()
                ));
            }
            return Ok(None);
        }
        self.windows_left -= 1;
        let n = self.n as u64;
        let bad = self.bad();
        let ((start, fired, base_len), _, rest) = take_raw::<(i64, bool, u32)>(self.rest, &bad)?;
        let (new, keys, rest) = seq::<Key>(rest, &bad)?;
        let (new_accs_len, new_accs, rest) = seq::<Acc>(rest, &bad)?;
        let (gaps_left, gaps, rest) = seq::<u32>(rest, &bad)?;
        let (accs_len, accs, rest) = seq::<Acc>(rest, &bad)?;
        let name = self.name;
        let unfit = |what: String| {
            format!("a delta of window '{name}' does not fit its base: window {start}: {what}")
        };
        if new_accs_len != new * n || accs_len != gaps_left * n {
            return Err(unfit(format!("accumulators do not match {n} aggregations")));
        }
        let new = u32::try_from(new)
            .ok()
            .filter(|k| base_len.checked_add(*k).is_some())
            .ok_or_else(|| unfit("too many keys".into()))?;
        self.rest = rest;
        let mut c = DeltaCursor {
            start,
            fired,
            base_len,
            new,
            keys,
            new_accs,
            gaps_left,
            gaps,
            accs,
            next_changed: None,
        };
        c.advance_changed(0, &bad)?;
        Ok(Some(c))
    }
}

/// The next new key of `c`: the key, its bytes, and its accumulators'
/// bytes with their count in front.
fn take_new(
    c: &mut DeltaCursor,
    n: usize,
    bad: &dyn Fn(postcard::Error) -> String,
    with_count: &dyn Fn(&[u8]) -> Vec<u8>,
) -> OpResult<(Key, Vec<u8>, Vec<u8>)> {
    let (key, raw, rest) = take_raw::<Key>(c.keys, bad)?;
    c.keys = rest;
    let (accs, rest) = DeltaCursor::accs_raw(c.new_accs, n, bad)?;
    c.new_accs = rest;
    Ok((key, raw.to_vec(), with_count(accs)))
}

impl<'a> DeltaCursor<'a> {
    /// Reads the next changed slot (`prev` the one before, 0 at first).
    fn advance_changed(
        &mut self,
        prev: u32,
        bad: &dyn Fn(postcard::Error) -> String,
    ) -> OpResult<()> {
        if self.gaps_left == 0 {
            self.next_changed = None;
            return Ok(());
        }
        self.gaps_left -= 1;
        let (gap, _, rest) = take_raw::<u32>(self.gaps, bad)?;
        self.gaps = rest;
        self.next_changed = Some(prev.checked_add(gap).ok_or_else(|| {
            format!(
                "a delta of a window starting {} names a slot past 2^32",
                self.start
            )
        })?);
        Ok(())
    }

    /// The encoded accumulators (`n` of them, without their count) at the
    /// front of `bytes`, and the rest.
    fn accs_raw<'b>(
        bytes: &'b [u8],
        n: usize,
        bad: &dyn Fn(postcard::Error) -> String,
    ) -> OpResult<(&'b [u8], &'b [u8])> {
        let mut rest = bytes;
        for _ in 0..n {
            rest = take_raw::<Acc>(rest, bad)?.2;
        }
        Ok((&bytes[..bytes.len() - rest.len()], rest))
    }
}

/// Checks that delta window `w` fits its base, where that window had
/// `have` keys (`None`: the base lacks it), with `n` aggregations.
pub(super) fn delta_fits(w: &DeltaWin, have: Option<usize>, n: usize, name: &str) -> OpResult<()> {
    let unfit = |what: String| format!("a delta of window '{name}' does not fit its base: {what}");
    if w.base_len > 0 {
        let have = have.ok_or_else(|| unfit(format!("window {} is missing", w.start)))?;
        if have != w.base_len as usize {
            return Err(unfit(format!(
                "window {} has {have} keys, the delta expects {}",
                w.start, w.base_len
            )));
        }
    }
    if (w.base_len as usize).saturating_add(w.new_keys.len()) > u32::MAX as usize {
        return Err(unfit(format!("window {} has too many keys", w.start)));
    }
    if w.gaps.len() * n != w.accs.len() || w.new_keys.len() * n != w.new_accs.len() {
        return Err(unfit(format!(
            "window {}: accumulators do not match {n} aggregations",
            w.start
        )));
    }
    let mut slot = 0u64;
    for g in &w.gaps {
        slot += *g as u64;
        if slot >= w.base_len as u64 {
            return Err(unfit(format!(
                "slot {slot} of window {} is past its keys",
                w.start
            )));
        }
    }
    Ok(())
}

/// One window of a chain being rebuilt: its keys under their old slot
/// numbers in a keyspace of its own (dropped with it).
struct Scratch {
    ks: Keyspace,
    store: Arc<StateStore>,
    fired: bool,
    len: u32,
}

impl Drop for Scratch {
    fn drop(&mut self) {
        self.store.drop_keyspace(self.ks.clone());
    }
}

/// Writes into scratch keyspaces in batches of the store's batch size.
struct Writer {
    store: Arc<StateStore>,
    batch: fjall::OwnedWriteBatch,
    bytes: usize,
}

impl Writer {
    fn new(store: &Arc<StateStore>) -> Self {
        Self {
            store: store.clone(),
            batch: store.batch(),
            bytes: 0,
        }
    }

    fn put(&mut self, ks: &Keyspace, key: &[u8], value: &[u8]) -> OpResult<()> {
        self.batch.insert(ks, key, value);
        self.bytes += key.len() + value.len() + 16;
        if self.bytes >= self.store.batch_bytes() {
            self.commit(ks)?;
        }
        Ok(())
    }

    fn commit(&mut self, ks: &Keyspace) -> OpResult<()> {
        let full = std::mem::replace(&mut self.batch, self.store.batch());
        self.store.commit(full, self.bytes)?;
        self.store.wrote(ks)?;
        self.bytes = 0;
        Ok(())
    }
}

impl Window {
    /// Checks that the chains of this operator's old subtasks would
    /// restore: every file reads, every key has this window's aggregations
    /// and every delta fits what it builds on. Nothing is kept.
    pub(super) fn check(&self, chains: &[Vec<Bytes>]) -> OpResult<()> {
        let n = self.plans.len();
        for chain in chains {
            let Some((full, deltas)) = chain.split_first() else {
                continue;
            };
            let mut lens: BTreeMap<i64, usize> = BTreeMap::new();
            let (_, mut r) = FullReader::new(full, &self.name)?;
            while let Some((start, _, len)) = r.next_window()? {
                while let Some(e) = r.next_key()? {
                    if e.accs.len() != n {
                        return Err(self.aggregations_changed(e.accs.len()));
                    }
                }
                lens.insert(start, len as usize);
            }
            r.finish()?;
            // Deltas walked as cursors, never decoded whole.
            let unfit = |what: String| {
                format!(
                    "a delta of window '{}' does not fit its base: {what}",
                    self.name
                )
            };
            for raw in deltas {
                let mut d = DeltaReader::new(raw, n, &self.name)?;
                let mut next = BTreeMap::new();
                while let Some(mut c) = d.next_window()? {
                    let start = c.start;
                    if c.base_len > 0 {
                        match lens.get(&start) {
                            None => return Err(unfit(format!("window {start} is missing"))),
                            Some(&have) if have != c.base_len as usize => {
                                return Err(unfit(format!(
                                    "window {start} has {have} keys, the delta expects {}",
                                    c.base_len
                                )));
                            }
                            Some(_) => {}
                        }
                    }
                    let bad = d.bad();
                    while let Some(slot) = c.next_changed {
                        if slot >= c.base_len {
                            return Err(unfit(format!(
                                "slot {slot} of window {start} is past its keys"
                            )));
                        }
                        c.advance_changed(slot, &bad)?;
                    }
                    next.insert(start, c.base_len as usize + c.new as usize);
                }
                lens = next;
            }
        }
        Ok(())
    }

    /// Restores the chains into the stored windows, keeping the keys
    /// `subtask` of `parallelism` owns, a key at a time: a full snapshot
    /// straight from its bytes, a chain with deltas through scratch
    /// keyspaces that keep its old slot numbers.
    pub(super) fn restore_chains_disk(
        &mut self,
        chains: &[Vec<Bytes>],
        subtask: u32,
        parallelism: u32,
    ) -> OpResult<()> {
        let Some(store) = self.disk.as_ref().map(|d| d.store.clone()) else {
            return Err("no state store".into());
        };
        // At the parallelism it was written with, an old subtask's state
        // is all this subtask's (chains come in subtask order): its windows
        // are written straight in, under their slot numbers.
        if chains.len() == parallelism as usize
            && let Some(chain) = chains.get(subtask as usize)
        {
            let watermark = self.restore_chain_direct(&store, chain, subtask, parallelism)?;
            self.restored(watermark);
            return Ok(());
        }
        let n = self.plans.len();
        let mut watermark: Option<i64> = None;
        for chain in chains {
            let Some((full, deltas)) = chain.split_first() else {
                continue;
            };
            let name = self.name.clone();
            let (mut wm, mut r) = FullReader::new(full, &name)?;
            if deltas.is_empty() {
                while let Some((start, fired, _)) = r.next_window()? {
                    while let Some(e) = r.next_key()? {
                        self.absorb_key(start, e.key, e.accs, subtask, parallelism)?;
                    }
                    self.mark_fired(start, fired);
                }
                r.finish()?;
            } else {
                let mut wins: BTreeMap<i64, Scratch> = BTreeMap::new();
                let mut w = Writer::new(&store);
                while let Some((start, fired, len)) = r.next_window()? {
                    let sc = Scratch {
                        ks: store.keyspace()?,
                        store: store.clone(),
                        fired,
                        len,
                    };
                    let mut slot = 0u32;
                    while let Some(e) = r.next_key()? {
                        if e.accs.len() != n {
                            return Err(self.aggregations_changed(e.accs.len()));
                        }
                        w.put(&sc.ks, &slot_key(slot), e.raw)?;
                        slot += 1;
                    }
                    w.commit(&sc.ks)?;
                    wins.insert(start, sc);
                }
                r.finish()?;
                for raw in deltas {
                    wm = self.apply_delta_scratch(&store, &mut wins, raw)?;
                }
                for (start, sc) in wins {
                    // Read in pieces, each under a short-lived iterator: an
                    // open one would keep every memtable the absorbing
                    // writes fill in memory until it closes.
                    let mut count = 0u32;
                    loop {
                        let mut piece = Vec::with_capacity(RESTORE_PIECE);
                        for kv in sc
                            .ks
                            .range(slot_key(count)..slot_key(u32::MAX))
                            .take(RESTORE_PIECE)
                        {
                            let v = kv
                                .value()
                                .map_err(|e| store.failed("reading a restored window", e))?;
                            let entry: (Key, Vec<Acc>) = postcard::from_bytes(&v)
                                .map_err(|e| format!("a restored entry is unreadable: {e}"))?;
                            piece.push(entry);
                        }
                        if piece.is_empty() {
                            break;
                        }
                        count += piece.len() as u32;
                        for (key, accs) in piece {
                            self.absorb_key(start, key, accs, subtask, parallelism)?;
                        }
                    }
                    if count != sc.len {
                        return Err(format!(
                            "restoring window {start} of '{}' gave {count} keys, its chain says {}",
                            self.name, sc.len
                        ));
                    }
                    self.mark_fired(start, sc.fired);
                }
            }
            watermark = Some(watermark.map_or(wm, |w| w.min(wm)));
        }
        self.restored(watermark);
        Ok(())
    }

    /// Applies one delta to the scratch windows of a chain; returns its
    /// watermark.
    fn apply_delta_scratch(
        &self,
        store: &Arc<StateStore>,
        wins: &mut BTreeMap<i64, Scratch>,
        raw: &[u8],
    ) -> OpResult<i64> {
        let n = self.plans.len();
        let d = decode_delta(raw, &self.name)?;
        let mut old = std::mem::take(wins);
        let enc = |e: postcard::Error| format!("window state encoding failed: {e}");
        let mut w = Writer::new(store);
        for dw in d.windows {
            let have = old.get(&dw.start).map(|s| s.len as usize);
            delta_fits(&dw, have, n, &self.name)?;
            let mut sc = match old.remove(&dw.start) {
                Some(sc) if dw.base_len > 0 => sc,
                _ => Scratch {
                    ks: store.keyspace()?,
                    store: store.clone(),
                    fired: false,
                    len: 0,
                },
            };
            let mut slot = 0u32;
            for (g, accs) in dw.gaps.iter().zip(dw.accs.chunks(n.max(1))) {
                slot += *g;
                let v = sc
                    .ks
                    .get(slot_key(slot))
                    .map_err(|e| store.failed("reading a restored window", e))?
                    .ok_or_else(|| {
                        format!(
                            "slot {slot} of window {} is missing while restoring '{}'",
                            dw.start, self.name
                        )
                    })?;
                let (key, _): (Key, Vec<Acc>) = postcard::from_bytes(&v)
                    .map_err(|e| format!("a restored entry is unreadable: {e}"))?;
                let value = postcard::to_stdvec(&(key, accs)).map_err(enc)?;
                w.put(&sc.ks, &slot_key(slot), &value)?;
            }
            for (i, (key, accs)) in dw
                .new_keys
                .iter()
                .zip(dw.new_accs.chunks(n.max(1)))
                .enumerate()
            {
                let value = postcard::to_stdvec(&(key, accs)).map_err(enc)?;
                w.put(&sc.ks, &slot_key(dw.base_len + i as u32), &value)?;
            }
            w.commit(&sc.ks)?;
            sc.len = dw.base_len + dw.new_keys.len() as u32;
            sc.fired = dw.fired;
            wins.insert(dw.start, sc);
        }
        Ok(d.watermark)
    }
    /// Restores one chain, every key of which `subtask` owns, straight
    /// into stored windows, in one pass: each window of the final state is
    /// merged slot by slot from the file that started it (the full
    /// snapshot, or a delta that builds on nothing) and the deltas after
    /// it, all read in slot order from their bytes (the newest change of a
    /// slot wins), and written once, both entries of every key. Returns
    /// the chain's watermark (`None`: an empty chain).
    fn restore_chain_direct(
        &mut self,
        store: &Arc<StateStore>,
        chain: &[Bytes],
        subtask: u32,
        parallelism: u32,
    ) -> OpResult<Option<i64>> {
        use super::spill::DiskWin;
        let Some((full, deltas)) = chain.split_first() else {
            return Ok(None);
        };
        if self.disk.as_ref().is_some_and(|d| !d.windows.is_empty()) {
            return Err("restoring into windows that are not empty".into());
        }
        let n = self.plans.len();
        let name = self.name.clone();
        let owned =
            |key: &Key| crate::operator::key_partition(key.stable_hash(), parallelism) == subtask;
        let foreign = || {
            format!(
                "the saved state of subtask {subtask} of '{name}' holds a key of another subtask; the checkpoint does not match its parallelism ({parallelism})"
            )
        };
        let unfit = |start: i64, what: &str| {
            format!("a delta of window '{name}' does not fit its base: window {start} {what}")
        };
        let bad = |e: postcard::Error| format!("a delta of window '{name}' is unreadable: {e}");
        // The count in front of every key's accumulators.
        let count = postcard::to_stdvec(&n).map_err(|e| e.to_string())?;
        let with_count = |raw: &[u8]| [count.as_slice(), raw].concat();
        let (full_wm, mut fr) = FullReader::new(full, &name)?;
        let mut readers = deltas
            .iter()
            .map(|d| DeltaReader::new(d, n, &name))
            .collect::<OpResult<Vec<_>>>()?;
        let watermark = readers.last().map_or(full_wm, |r| r.watermark);
        let d = readers.len();
        let mut full_cur = fr.next_window()?;
        let mut cur = readers
            .iter_mut()
            .map(DeltaReader::next_window)
            .collect::<OpResult<Vec<_>>>()?;
        let mut w = Writer::new(store);
        let mut restored = Vec::new();
        loop {
            // The next window of the final state: the newest file's next.
            let target = match d {
                0 => full_cur.map(|f| f.0),
                _ => cur[d - 1].as_ref().map(|c| c.start),
            };
            let Some(start) = target else { break };
            // Every file to this window: those before it were purged.
            while let Some((s0, _, _)) = full_cur
                && s0 < start
            {
                while fr.next_key()?.is_some() {}
                full_cur = fr.next_window()?;
            }
            for j in 0..d {
                while cur[j].as_ref().is_some_and(|c| c.start < start) {
                    cur[j] = readers[j].next_window()?;
                }
            }
            let has = |cur: &[Option<DeltaCursor>], j: usize| {
                cur[j].as_ref().is_some_and(|c| c.start == start)
            };
            // Its lineage: the newest delta that builds on nothing, else
            // the full snapshot; every delta after it builds on the one
            // before.
            let mut origin = None;
            for j in (0..d).rev() {
                if !has(&cur, j) {
                    return Err(unfit(start, "is missing"));
                }
                if cur[j].as_ref().is_some_and(|c| c.base_len == 0) {
                    origin = Some(j);
                    break;
                }
            }
            let (mut len, fired_full) = match origin {
                Some(o) => (cur[o].as_ref().map_or(0, |c| c.new), false),
                None => match full_cur {
                    Some((s0, fired, len)) if s0 == start => (len, fired),
                    _ => return Err(unfit(start, "is missing from the full snapshot")),
                },
            };
            let origin_len = len;
            if let Some(o) = origin
                && cur[o].as_ref().is_some_and(|c| c.next_changed.is_some())
            {
                return Err(unfit(start, "changes a slot of a window it starts"));
            }
            let first = origin.map_or(0, |o| o + 1);
            for c in cur[first..d].iter().flatten() {
                if c.base_len != len {
                    return Err(unfit(
                        start,
                        &format!("has {len} keys, the delta expects {}", c.base_len),
                    ));
                }
                len = c.base_len + c.new;
            }
            let fired = match d {
                0 => fired_full,
                _ => cur[d - 1].as_ref().is_some_and(|c| c.fired),
            };
            let mut win = DiskWin::new(store)?;
            win.fired = fired;
            // The delta whose new keys the slot is among (after the origin).
            let mut intro = first;
            for slot in 0..len {
                // The key, and its accumulators as the file that added it has them.
                let (key, key_raw, mut accs): (Key, Vec<u8>, Vec<u8>) = if slot < origin_len {
                    match origin {
                        None => {
                            let e = fr.next_key()?.ok_or_else(|| {
                                format!("window state of '{name}' is unreadable: window {start} ends early")
                            })?;
                            if e.accs.len() != n {
                                return Err(self.aggregations_changed(e.accs.len()));
                            }
                            (
                                e.key,
                                e.raw[..e.key_len].to_vec(),
                                e.raw[e.key_len..].to_vec(),
                            )
                        }
                        Some(o) => {
                            let Some(c) = cur[o].as_mut() else {
                                return Err(unfit(start, "is missing"));
                            };
                            take_new(c, n, &bad, &with_count)?
                        }
                    }
                } else {
                    while intro < d
                        && cur[intro]
                            .as_ref()
                            .is_some_and(|c| slot >= c.base_len + c.new)
                    {
                        intro += 1;
                    }
                    let Some(c) = cur.get_mut(intro).and_then(Option::as_mut) else {
                        return Err(unfit(start, "is missing"));
                    };
                    take_new(c, n, &bad, &with_count)?
                };
                if !owned(&key) {
                    return Err(foreign());
                }
                // The newest change of the slot wins; every delta's
                // change of it is read.
                let mut changed = false;
                for c in cur[first..d].iter_mut().rev().flatten() {
                    if c.next_changed != Some(slot) {
                        continue;
                    }
                    if slot >= c.base_len {
                        return Err(unfit(start, &format!("changes slot {slot}, past its keys")));
                    }
                    let (raw, rest) = DeltaCursor::accs_raw(c.accs, n, &bad)?;
                    c.accs = rest;
                    c.advance_changed(slot, &bad)?;
                    if !changed {
                        accs = with_count(raw);
                        changed = true;
                    }
                }
                for (k, v) in super::spill::entries(slot, &key_raw, &accs) {
                    w.put(win.keyspace(), &k, &v)?;
                }
            }
            if cur[first..d]
                .iter()
                .flatten()
                .any(|c| c.next_changed.is_some())
            {
                return Err(unfit(start, "changes a slot past its keys"));
            }
            w.commit(win.keyspace())?;
            restored.push((start, win, len));
            // On to the next window in every file that has this one.
            if full_cur.is_some_and(|f| f.0 == start) {
                while fr.next_key()?.is_some() {}
                full_cur = fr.next_window()?;
            }
            for j in 0..d {
                if has(&cur, j) {
                    cur[j] = readers[j].next_window()?;
                }
            }
        }
        // The rest of each file (windows purged along the chain) is read
        // too: a damaged tail is found here, not never.
        while full_cur.is_some() {
            while fr.next_key()?.is_some() {}
            full_cur = fr.next_window()?;
        }
        fr.finish()?;
        for j in 0..d {
            while cur[j].is_some() {
                cur[j] = readers[j].next_window()?;
            }
        }
        let Some(disk) = self.disk.as_mut() else {
            return Err("no state store".into());
        };
        for (start, mut win, len) in restored {
            win.set_restored(len);
            disk.windows.insert(start, win);
        }
        Ok(Some(watermark))
    }
}
