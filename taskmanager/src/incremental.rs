//! Incremental checkpoints on a task's side: which files make up each
//! operator's state chain (a full snapshot and the deltas after it), what
//! the next snapshot builds on, and when it is time for a full one again.
//!
//! A chain becomes a base only once its checkpoint completed (the
//! JobManager said so): a delta always builds on state some manifest
//! lists. The files themselves live in the job's `shared/` folder, named
//! by content ([`ferry_core::manifest::shared_file`]).

use std::collections::BTreeMap;

use ferry_core::CheckpointId;
use ferry_core::manifest::FileEntry;

/// Longest chain (full snapshot plus deltas) before a full snapshot is
/// written again, however small the deltas (an idle job's are tiny).
pub const MAX_CHAIN: usize = 64;

/// Snapshots taken without a completion (this one included) before the
/// chain is distrusted and the snapshot is full: after two failed
/// checkpoints in a row the task may have missed a completion, and its
/// base may be gone.
const MAX_UNCONFIRMED: u32 = 3;

/// The state chains of one task's operators.
#[derive(Debug)]
pub struct Chains {
    /// A full snapshot is due once the deltas of a chain add up to this
    /// multiple of its full snapshot's size.
    compact_ratio: f64,
    /// The newest completed checkpoint and its chains, by operator.
    base: Option<(CheckpointId, BTreeMap<String, Vec<FileEntry>>)>,
    /// Chains of snapshots taken and not yet completed.
    pending: BTreeMap<CheckpointId, BTreeMap<String, Vec<FileEntry>>>,
    /// Snapshots taken since the last completion.
    unconfirmed: u32,
}

impl Chains {
    pub fn new(compact_ratio: f64) -> Self {
        Self {
            compact_ratio,
            base: None,
            pending: BTreeMap::new(),
            unconfirmed: 0,
        }
    }

    /// What `operator`'s next snapshot may build on: the newest completed
    /// checkpoint, unless its chain is due for a full snapshot.
    pub fn base_for(&self, operator: &str) -> Option<CheckpointId> {
        if self.unconfirmed >= MAX_UNCONFIRMED {
            return None;
        }
        let (id, chains) = self.base.as_ref()?;
        let chain = chains.get(operator)?;
        let (full, deltas) = chain.split_first()?;
        let delta_bytes: u64 = deltas.iter().map(|f| f.size).sum();
        let due = chain.len() >= MAX_CHAIN
            || delta_bytes as f64 >= self.compact_ratio * full.size.max(1) as f64;
        (!due).then_some(*id)
    }

    /// A snapshot was taken for checkpoint `id`.
    pub fn taken(&mut self) {
        self.unconfirmed += 1;
    }

    /// The chain of `operator` at checkpoint `id`: `base`'s chain and then
    /// `file` (a delta), or `file` alone (a full snapshot, `base` `None`).
    /// Returns the whole chain, `file` last with its position set.
    pub fn record(
        &mut self,
        id: CheckpointId,
        operator: &str,
        base: Option<CheckpointId>,
        mut file: FileEntry,
    ) -> Result<Vec<FileEntry>, String> {
        let mut chain = match base {
            None => Vec::new(),
            Some(b) => match &self.base {
                Some((bid, chains)) if *bid == b => {
                    chains.get(operator).cloned().ok_or_else(|| {
                        format!("no chain of '{operator}' at checkpoint {b} to add a delta to")
                    })?
                }
                _ => {
                    return Err(format!(
                        "checkpoint {b} is not the base of '{operator}' any more"
                    ));
                }
            },
        };
        file.chain = chain.len() as u32;
        chain.push(file);
        self.pending
            .entry(id)
            .or_default()
            .insert(operator.to_string(), chain.clone());
        Ok(chain)
    }

    /// Checkpoint `id` completed: its chains are the base from now on.
    pub fn completed(&mut self, id: CheckpointId) {
        self.unconfirmed = 0;
        if let Some(chains) = self.pending.remove(&id) {
            self.base = Some((id, chains));
        }
        self.pending.retain(|p, _| *p > id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(size: u64, name: &str) -> FileEntry {
        FileEntry {
            path: format!("shared/{name}"),
            size,
            sha256: String::new(),
            operator: "w".into(),
            subtask: 0,
            shared: true,
            chain: 0,
        }
    }

    #[test]
    fn deltas_build_on_completed_chains_until_compaction_is_due() {
        let mut c = Chains::new(1.0);
        assert_eq!(c.base_for("w"), None, "nothing completed yet: full");
        c.taken();
        let full = c
            .record(CheckpointId(1), "w", None, file(100, "a"))
            .unwrap();
        assert_eq!(full.len(), 1);
        assert_eq!(c.base_for("w"), None, "checkpoint 1 has not completed");
        c.completed(CheckpointId(1));
        assert_eq!(c.base_for("w"), Some(CheckpointId(1)));

        c.taken();
        let chain = c
            .record(CheckpointId(2), "w", Some(CheckpointId(1)), file(60, "b"))
            .unwrap();
        assert_eq!(
            chain
                .iter()
                .map(|f| (f.path.as_str(), f.chain))
                .collect::<Vec<_>>(),
            [("shared/a", 0), ("shared/b", 1)]
        );
        // Checkpoint 2 failed: the next delta still builds on 1.
        c.taken();
        assert_eq!(c.base_for("w"), Some(CheckpointId(1)));
        let chain = c
            .record(CheckpointId(3), "w", Some(CheckpointId(1)), file(70, "c"))
            .unwrap();
        assert_eq!(chain.len(), 2);
        c.completed(CheckpointId(3));
        c.taken();
        let chain = c
            .record(CheckpointId(4), "w", Some(CheckpointId(3)), file(40, "d"))
            .unwrap();
        assert_eq!(
            chain.iter().map(|f| f.path.as_str()).collect::<Vec<_>>(),
            ["shared/a", "shared/c", "shared/d"]
        );
        c.completed(CheckpointId(4));
        // Deltas 70 + 40 passed 1.0 x the full 100: a full one is due.
        assert_eq!(c.base_for("w"), None);
        // A base that is no longer the newest completed is refused.
        assert!(
            c.record(CheckpointId(5), "w", Some(CheckpointId(3)), file(1, "e"))
                .is_err()
        );
    }

    #[test]
    fn missed_completions_make_the_next_snapshot_full() {
        let mut c = Chains::new(10.0);
        c.taken();
        c.record(CheckpointId(1), "w", None, file(100, "a"))
            .unwrap();
        c.completed(CheckpointId(1));
        c.taken();
        assert_eq!(c.base_for("w"), Some(CheckpointId(1)));
        c.taken();
        assert_eq!(c.base_for("w"), Some(CheckpointId(1)), "one failed");
        c.taken();
        assert_eq!(c.base_for("w"), None, "two failed in a row");
    }

    #[test]
    fn long_chains_of_small_deltas_are_compacted() {
        let mut c = Chains::new(100.0);
        c.taken();
        c.record(CheckpointId(1), "w", None, file(1000, "full"))
            .unwrap();
        c.completed(CheckpointId(1));
        for n in 2..=MAX_CHAIN as u64 {
            let base = c.base_for("w").expect("not due yet");
            c.taken();
            c.record(CheckpointId(n), "w", Some(base), file(1, &format!("d{n}")))
                .unwrap();
            c.completed(CheckpointId(n));
        }
        assert_eq!(c.base_for("w"), None);
    }
}
