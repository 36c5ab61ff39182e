//! Operators of a task's chain: they take batches and watermarks and emit
//! batches. Stateful operators snapshot into bytes and restore from the
//! snapshots of every old subtask (so a job can restore at a new parallelism).

pub mod filter;
pub mod key;
pub mod map;
pub mod window;

use bytes::Bytes;
use ferry_core::CheckpointId;

use crate::batch::Batch;
use crate::metrics::TaskMetrics;

/// Errors of operators.
pub type OpResult<T> = Result<T, String>;

/// Writes a state part's bytes, as they are encoded, into a writer.
pub type Encode = Box<dyn FnOnce(&mut dyn std::io::Write) -> OpResult<()> + Send>;

/// The bytes of a state part: ready, or encoded later, on a blocking
/// thread, from a consistent view of the state taken at the barrier (while
/// records flow on).
pub enum StateBytes {
    Ready(Vec<u8>),
    /// Encoded later into a file in `spool` (the state dir), then uploaded
    /// from there: a large state never sits in memory whole.
    Later {
        spool: std::path::PathBuf,
        encode: Encode,
    },
}

impl StateBytes {
    /// The bytes, encoding them here if they are not ready.
    pub fn now(self) -> OpResult<Vec<u8>> {
        match self {
            StateBytes::Ready(b) => Ok(b),
            StateBytes::Later { encode, .. } => {
                let mut out = Vec::new();
                encode(&mut out)?;
                Ok(out)
            }
        }
    }
}

impl std::fmt::Debug for StateBytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StateBytes::Ready(b) => write!(f, "Ready({} bytes)", b.len()),
            StateBytes::Later { spool, .. } => write!(f, "Later(via {})", spool.display()),
        }
    }
}

/// An operator's snapshot for an incremental checkpoint.
#[derive(Debug)]
pub enum StatePart {
    /// The whole state (what [`Operator::snapshot`] writes).
    Full(StateBytes),
    /// What changed since this operator's snapshot for checkpoint `base`.
    Delta {
        base: CheckpointId,
        bytes: StateBytes,
    },
}

/// One step of a chain.
pub trait Operator: Send {
    /// Name of the operator's state in checkpoints (stateful operators only).
    fn state_name(&self) -> Option<&str> {
        None
    }

    /// Processes one batch, pushing output batches to `out`.
    fn process(&mut self, batch: Batch, out: &mut Vec<Batch>, m: &TaskMetrics);

    /// Why the job must fail, when processing showed it can never succeed
    /// (an expression that fails on every record).
    fn failure(&self) -> Option<String> {
        None
    }

    /// Why the task must stop and the job restart from its checkpoint,
    /// when a local resource failed (the state store's disk): the restart
    /// strategy applies, as for a lost connection.
    fn transient_failure(&self) -> Option<String> {
        None
    }

    /// The input watermark advanced to `wm`; emit whatever it completes,
    /// or its first piece when that is large.
    fn on_watermark(&mut self, _wm: i64, _out: &mut Vec<Batch>) {}

    /// Emits the next piece of what the last watermark completed (a window
    /// whose state lives in the store fires in bounded pieces, so that its
    /// output never sits in memory whole); false when nothing is left.
    /// The task calls it until it returns false, passing each piece on,
    /// before anything else reaches the operator.
    fn more(&mut self, _out: &mut Vec<Batch>) -> bool {
        false
    }

    /// Serializes the operator's state (stateful operators only).
    fn snapshot(&mut self) -> OpResult<Option<Vec<u8>>> {
        Ok(None)
    }

    /// The whole state as [`Self::snapshot`] writes it, possibly encoded
    /// later (off the record path, and streamed to a file when large).
    fn snapshot_bytes(&mut self) -> OpResult<Option<StateBytes>> {
        Ok(self.snapshot()?.map(StateBytes::Ready))
    }

    /// Restores from the snapshots of all old subtasks; keeps what belongs to
    /// `subtask` of `parallelism`.
    fn restore(&mut self, _parts: &[Bytes], _subtask: u32, _parallelism: u32) -> OpResult<()> {
        Ok(())
    }

    /// The snapshot of an incremental checkpoint `id`: a delta against this
    /// operator's own snapshot for the completed checkpoint `base` when it
    /// still knows what changed since, the whole state otherwise. Unlike
    /// [`Self::snapshot`] (savepoints), it starts tracking changes anew.
    fn snapshot_part(
        &mut self,
        _id: CheckpointId,
        _base: Option<CheckpointId>,
    ) -> OpResult<Option<StatePart>> {
        Ok(self.snapshot_bytes()?.map(StatePart::Full))
    }

    /// Checkpoint `id` completed: snapshots before it are no base any more.
    fn checkpoint_completed(&mut self, _id: CheckpointId) {}

    /// Restores from each old subtask's chain: its full snapshot, then the
    /// deltas written after it, in order.
    fn restore_chains(
        &mut self,
        chains: &[Vec<Bytes>],
        subtask: u32,
        parallelism: u32,
    ) -> OpResult<()> {
        if chains.iter().any(|c| c.len() != 1) {
            return Err(
                "the checkpoint holds deltas of this operator's state, which it cannot read".into(),
            );
        }
        let parts: Vec<Bytes> = chains.iter().map(|c| c[0].clone()).collect();
        self.restore(&parts, subtask, parallelism)
    }

    /// Checks that `chains` (as [`Self::restore_chains`] takes them) would
    /// restore into this operator, keeping as little as it can: a window
    /// walks the files without building their state.
    fn check_chains(&mut self, chains: &[Vec<Bytes>]) -> OpResult<()> {
        self.restore_chains(chains, 0, 1)
    }

    /// Roughly how much memory its state takes (tables and arenas at their
    /// capacity; heap data of string keys not counted). 0 when stateless.
    fn memory_bytes(&self) -> u64 {
        0
    }
}

/// Stable hash of a key, shared by the exchange and by restore so that state
/// and records of a key always meet in the same subtask.
pub fn key_partition(hash: u64, parallelism: u32) -> u32 {
    // Multiply-shift keeps the distribution even for small parallelism.
    ((hash as u128 * parallelism as u128) >> 64) as u32
}
