//! Task execution: a chain of operators fed by a source or by upstream
//! channels, ending in an exchange or a sink; checkpoint barriers aligned
//! across inputs; snapshots uploaded asynchronously.
//!
//! Invariant: a task snapshots its state exactly when it has seen barrier `n`
//! on every input, before processing anything that came after it, so a
//! checkpoint is a consistent cut of the whole job.

use std::collections::BTreeMap;
use std::future::poll_fn;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::Poll as TaskPoll;

use bytes::Bytes;
use ferry_core::CheckpointId;
use ferry_core::manifest::{FileEntry, SinkTransaction, SnapshotKind, shared_file, state_file};
use ferry_core::storage::sha256_hex;
use tokio::sync::mpsc;
use tokio_util::task::TaskTracker;

use crate::batch::Batch;
use crate::incremental::Chains;
use crate::metrics::TaskMetrics;
use crate::operator::key::key_at;
use crate::operator::{Operator, StateBytes, StatePart, key_partition};
use crate::protocol::{Barrier, Msg, TaskAck, TaskCommand, TaskError, TaskEvent, TaskId};
use crate::sink::{SINK_STATE, Sink};
use crate::source::{Poll, Source};

/// Where a chain's output goes.
pub enum Output {
    /// Hash-partitioned by key to the next stage's subtasks.
    Exchange {
        senders: Vec<mpsc::Sender<Msg>>,
        key_idx: Vec<usize>,
    },
    Sink(Sink),
}

/// Operators run back to back in one task, then the output.
pub struct Chain {
    pub ops: Vec<Box<dyn Operator>>,
    pub output: Output,
    pub metrics: Arc<TaskMetrics>,
}

/// Whether `op` found that the task must stop: for good (an expression
/// that fails on every record) or until a restart (its state store failed).
fn failed(op: &dyn Operator) -> Result<(), TaskError> {
    if let Some(why) = op.failure() {
        return Err(TaskError::Permanent(why));
    }
    if let Some(why) = op.transient_failure() {
        return Err(TaskError::Transient(why));
    }
    Ok(())
}

impl Chain {
    /// Runs `batch` through the operators from `from` on, then outputs.
    async fn push_from(&mut self, from: usize, batch: Batch) -> Result<(), TaskError> {
        let mut cur = vec![batch];
        for op in &mut self.ops[from..] {
            let mut next = Vec::new();
            for b in cur {
                op.process(b, &mut next, &self.metrics);
            }
            failed(op.as_ref())?;
            if next.is_empty() {
                return Ok(());
            }
            cur = next;
        }
        for b in cur {
            self.emit(b).await?;
        }
        Ok(())
    }

    async fn push(&mut self, batch: Batch) -> Result<(), TaskError> {
        self.push_from(0, batch).await
    }

    async fn emit(&mut self, batch: Batch) -> Result<(), String> {
        if batch.is_empty() {
            return Ok(());
        }
        match &mut self.output {
            Output::Sink(s) => {
                // A paced sink is slow on purpose: the bottleneck, busy
                // (not backpressured); the tasks before it wait on it.
                s.pace(batch.len()).await;
                s.write(&batch, &self.metrics);
                Ok(())
            }
            Output::Exchange { senders, key_idx } => {
                let n = senders.len() as u32;
                if n == 1 {
                    return send(&senders[0], Msg::Batch(batch), &self.metrics).await;
                }
                let mut idx: Vec<Vec<u32>> = vec![Vec::new(); n as usize];
                for i in 0..batch.len() {
                    let k = key_at(&batch, key_idx, i);
                    idx[key_partition(k.stable_hash(), n) as usize].push(i as u32);
                }
                for (t, rows) in idx.iter().enumerate() {
                    if rows.is_empty() {
                        continue;
                    }
                    let part = if rows.len() == batch.len() {
                        batch.clone()
                    } else {
                        batch.take(rows)
                    };
                    send(&senders[t], Msg::Batch(part), &self.metrics).await?;
                }
                Ok(())
            }
        }
    }

    /// Advances the watermark through every operator, then downstream.
    async fn watermark(&mut self, wm: i64) -> Result<(), TaskError> {
        self.metrics.watermark.store(wm, Ordering::Relaxed);
        for i in 0..self.ops.len() {
            let mut out = Vec::new();
            self.ops[i].on_watermark(wm, &mut out);
            // Large firings come in pieces, each passed on (and waiting on
            // backpressure) before the next is read.
            loop {
                // A window that could not read its state fires nothing
                // more: the task stops rather than let the job finish short.
                failed(self.ops[i].as_ref())?;
                for b in std::mem::take(&mut out) {
                    self.push_from(i + 1, b).await?;
                }
                if !self.ops[i].more(&mut out) {
                    break;
                }
            }
        }
        if let Output::Exchange { senders, .. } = &self.output {
            for s in senders {
                send(s, Msg::Watermark(wm), &self.metrics).await?;
            }
        }
        Ok(())
    }
}

/// Sends `m` downstream; the time spent waiting for room (backpressure:
/// the downstream task, or the exchange to another TaskManager, is full)
/// is counted in `metrics`.
async fn send(s: &mpsc::Sender<Msg>, m: Msg, metrics: &TaskMetrics) -> Result<(), String> {
    let gone = || {
        "the channel to a downstream task closed (the task or its link to another TaskManager is gone)".to_string()
    };
    match s.try_send(m) {
        Ok(()) => Ok(()),
        Err(mpsc::error::TrySendError::Closed(_)) => Err(gone()),
        Err(mpsc::error::TrySendError::Full(m)) => {
            let waiting = std::time::Instant::now();
            let r = s.send(m).await.map_err(|_| gone());
            metrics
                .backpressure_ns
                .fetch_add(waiting.elapsed().as_nanos() as u64, Ordering::Relaxed);
            r
        }
    }
}

/// What every task needs besides its chain.
pub struct TaskContext {
    pub id: TaskId,
    pub commands: mpsc::UnboundedReceiver<TaskCommand>,
    pub events: mpsc::UnboundedSender<TaskEvent>,
    pub uploads: TaskTracker,
    /// Incremental checkpoints: the operators' state chains (`None`: every
    /// checkpoint is full).
    pub chains: Option<Arc<std::sync::Mutex<Chains>>>,
}

/// Where one state part of a snapshot goes.
enum Placement {
    /// The snapshot's own directory (sources, sinks, savepoints, full
    /// checkpoints without `incremental`).
    Own,
    /// The job's shared folder, as a chain's full snapshot (`None`) or a
    /// delta on the chain of a completed checkpoint.
    Shared(Option<CheckpointId>),
}

impl TaskContext {
    /// Snapshots the source (if any), the operators and the sink, forwards the
    /// barrier, and uploads the state files in the background.
    async fn snapshot(
        &self,
        barrier: &Barrier,
        source: Option<&Source>,
        chain: &mut Chain,
    ) -> Result<(), String> {
        let started = std::time::Instant::now();
        let mut parts: Vec<(String, StateBytes, Placement)> = Vec::new();
        let mut offsets = BTreeMap::new();
        let mut txns: Vec<SinkTransaction> = Vec::new();
        if let Some(src) = source {
            let (bytes, offs) = src.snapshot()?;
            parts.push((
                "source".to_string(),
                StateBytes::Ready(bytes),
                Placement::Own,
            ));
            offsets = offs;
        }
        // Savepoints are always full and self-contained; checkpoints of an
        // incremental job build chains.
        let chains = self
            .chains
            .as_ref()
            .filter(|_| barrier.kind == SnapshotKind::Checkpoint);
        if let Some(c) = chains {
            c.lock().unwrap_or_else(|p| p.into_inner()).taken();
        }
        for op in &mut chain.ops {
            let Some(name) = op.state_name().map(str::to_string) else {
                continue;
            };
            match chains {
                None => {
                    if let Some(bytes) = op.snapshot_bytes()? {
                        parts.push((name, bytes, Placement::Own));
                    }
                }
                Some(c) => {
                    let base = c.lock().unwrap_or_else(|p| p.into_inner()).base_for(&name);
                    match op.snapshot_part(barrier.id, base)? {
                        Some(StatePart::Full(bytes)) => {
                            parts.push((name, bytes, Placement::Shared(None)))
                        }
                        Some(StatePart::Delta { base, bytes }) => {
                            parts.push((name, bytes, Placement::Shared(Some(base))))
                        }
                        None => {}
                    }
                }
            }
        }
        let records_out = chain.metrics.records_out.load(Ordering::Relaxed);
        // Forwarding the barrier may wait on backpressure: that wait is the
        // downstream's work, not this snapshot's, so it is not counted.
        let mut sync_duration = started.elapsed();
        match &mut chain.output {
            Output::Sink(sink) => {
                let t = std::time::Instant::now();
                let (bytes, tx) = sink.snapshot(barrier.id, barrier.close_txn, records_out)?;
                if let Some(b) = bytes {
                    parts.push((SINK_STATE.to_string(), StateBytes::Ready(b), Placement::Own));
                }
                txns = tx;
                sync_duration += t.elapsed();
            }
            Output::Exchange { senders, .. } => {
                for s in senders {
                    send(s, Msg::Barrier(barrier.clone()), &chain.metrics).await?;
                }
            }
        }
        let ack = TaskAck {
            checkpoint: barrier.id,
            task: self.id,
            files: Vec::new(),
            source_offsets: offsets,
            sink_transactions: txns,
            watermark: chain.metrics.watermark.load(Ordering::Relaxed),
            records_in: chain.metrics.records_in.load(Ordering::Relaxed),
            records_out,
            sync_duration,
            async_duration: std::time::Duration::ZERO,
        };
        // Encoding starts now, on blocking threads: a state part encoded
        // from a view of the store holds that view open until it is done,
        // and the record path may wait for it (StateStore::commit).
        let parts: Vec<_> = parts
            .into_iter()
            .map(|(op, data, placement)| (op, start_encode(data), placement))
            .collect();
        let dir = barrier.dir.clone();
        let events = self.events.clone();
        let subtask = self.id.subtask;
        let chains = chains.cloned();
        self.uploads.spawn(async move {
            let mut ack = ack;
            let task = ack.task;
            let checkpoint = ack.checkpoint;
            let mut files = Vec::new();
            // A checkpoint dir and a savepoint dir both lie two levels
            // below the job's directory.
            let job_dir = dir.parent().parent();
            let upload = async {
                for (op, data, placement) in parts {
                    let (sha256, data) = data.finish().await?;
                    let size = data.size();
                    let Placement::Shared(base) = placement else {
                        let rel = state_file(&op, subtask);
                        data.put(&dir, &rel).await?;
                        files.push(FileEntry {
                            path: rel,
                            size,
                            operator: op,
                            subtask,
                            sha256,
                            shared: false,
                            chain: 0,
                        });
                        continue;
                    };
                    if job_dir.url() == dir.url() {
                        // Opened so that nothing above it is reachable:
                        // shared files would land in the wrong place.
                        return Err(ferry_core::error::CoreError::Other(format!(
                            "the checkpoint directory {} was opened without its job directory; shared state files cannot be placed",
                            dir.url()
                        )));
                    }
                    let rel = shared_file(&op, subtask, &sha256);
                    // Named by content: a file already there is this one
                    // (written again all the same, in case retention is
                    // removing it as an orphan right now).
                    data.put(&job_dir, &rel).await?;
                    let entry = FileEntry {
                        path: rel,
                        size,
                        sha256,
                        operator: op.clone(),
                        subtask,
                        shared: true,
                        chain: 0,
                    };
                    let Some(c) = &chains else { continue };
                    let chain = c
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .record(checkpoint, &op, base, entry)
                        .map_err(ferry_core::error::CoreError::Other)?;
                    files.extend(chain);
                }
                Ok::<_, ferry_core::error::CoreError>(())
            };
            // Count only the time spent inside the upload's polls: the time it
            // takes from the core the records run on, not the time it waits
            // for the store while records keep flowing.
            let (result, busy) = poll_timed(upload).await;
            if let Err(e) = result {
                // The checkpoint fails, not the task: the JobManager decides
                // (checkpointing.tolerableFailures) whether the job must
                // restart.
                let _ = events.send(TaskEvent::Declined {
                    task,
                    checkpoint,
                    reason: format!("uploading its state failed: {}", e.describe()),
                });
                return;
            }
            ack.files = files;
            ack.async_duration = busy;
            let _ = events.send(TaskEvent::Ack(ack));
        });
        Ok(())
    }
}

/// An encoded state file: in memory, or (large, encoded later) in a
/// spool file deleted when this is dropped.
enum Encoded {
    Memory(Vec<u8>),
    File { path: tempfile::TempPath, size: u64 },
}

impl Encoded {
    fn size(&self) -> u64 {
        match self {
            Encoded::Memory(d) => d.len() as u64,
            Encoded::File { size, .. } => *size,
        }
    }

    /// Uploads it to `rel` in `dir` (a spool file in parts).
    async fn put(
        self,
        dir: &ferry_core::storage::StorageLocation,
        rel: &str,
    ) -> Result<(), ferry_core::error::CoreError> {
        match self {
            Encoded::Memory(d) => dir.put(rel, Bytes::from(d)).await,
            Encoded::File { path, .. } => dir.put_file(rel, &path).await,
        }
    }
}

/// Counts and hashes what it writes on to `inner`.
struct HashingWriter<W> {
    inner: W,
    hash: sha2::Sha256,
    size: u64,
}

impl<W: std::io::Write> std::io::Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        use sha2::Digest as _;
        let n = self.inner.write(buf)?;
        self.hash.update(&buf[..n]);
        self.size += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// A state part being encoded and hashed: a small ready one at once, a
/// large or not yet encoded one on a blocking thread (into a spool file,
/// hashed as it is written), off the async workers the tasks run on.
enum Encoding {
    Done(String, Encoded),
    Running(tokio::task::JoinHandle<Result<(String, Encoded), String>>),
}

impl Encoding {
    /// Its SHA-256 and bytes.
    async fn finish(self) -> Result<(String, Encoded), ferry_core::error::CoreError> {
        use ferry_core::error::CoreError;
        match self {
            Encoding::Done(sha, e) => Ok((sha, e)),
            Encoding::Running(h) => h
                .await
                .map_err(|e| {
                    CoreError::Other(format!("encoding or hashing a state file failed: {e}"))
                })?
                .map_err(|e| CoreError::Other(format!("encoding a state file failed: {e}"))),
        }
    }
}

/// Starts encoding and hashing `data` (see [`Encoding`]).
fn start_encode(data: StateBytes) -> Encoding {
    let data = match data {
        StateBytes::Ready(d) if d.len() < 1 << 20 => {
            return Encoding::Done(sha256_hex(&d), Encoded::Memory(d));
        }
        other => other,
    };
    Encoding::Running(tokio::task::spawn_blocking(move || match data {
        StateBytes::Ready(d) => Ok((sha256_hex(&d), Encoded::Memory(d))),
        StateBytes::Later { spool, encode } => {
            use sha2::Digest as _;
            use std::io::Write as _;
            let spooled = |e: std::io::Error| {
                format!(
                    "writing a state file to {} (taskmanager.stateDir) failed: {e}",
                    spool.display()
                )
            };
            let file = tempfile::NamedTempFile::new_in(&spool).map_err(spooled)?;
            let (file, path) = file.into_parts();
            let mut w = HashingWriter {
                inner: std::io::BufWriter::with_capacity(1 << 20, file),
                hash: sha2::Sha256::new(),
                size: 0,
            };
            encode(&mut w)?;
            w.flush().map_err(spooled)?;
            let sha = hex::encode(w.hash.finalize());
            Ok((sha, Encoded::File { path, size: w.size }))
        }
    }))
}

/// Runs `fut` to completion and returns its output with the time spent
/// inside its `poll` calls (its own work, not its waiting).
async fn poll_timed<F: Future>(fut: F) -> (F::Output, std::time::Duration) {
    let mut fut = std::pin::pin!(fut);
    let mut busy = std::time::Duration::ZERO;
    let out = std::future::poll_fn(|cx| {
        let t = std::time::Instant::now();
        let r = fut.as_mut().poll(cx);
        busy += t.elapsed();
        r
    })
    .await;
    (out, busy)
}

/// What a command asks the task loop to do next.
enum Next {
    Continue,
    Stop,
}

/// Handles a command common to all tasks.
async fn on_command(
    ctx: &TaskContext,
    cmd: TaskCommand,
    source: Option<&Source>,
    chain: &mut Chain,
    stop_at: &mut Option<CheckpointId>,
) -> Result<Next, String> {
    match cmd {
        TaskCommand::Trigger(b) => {
            if b.stop {
                *stop_at = Some(b.id);
            }
            ctx.snapshot(&b, source, chain).await?;
            Ok(Next::Continue)
        }
        TaskCommand::Complete(id) => {
            if let Output::Sink(s) = &mut chain.output {
                s.commit(id).await?;
            }
            if let Some(c) = &ctx.chains {
                c.lock().unwrap_or_else(|p| p.into_inner()).completed(id);
                for op in &mut chain.ops {
                    op.checkpoint_completed(id);
                }
            }
            if stop_at.is_some_and(|s| s <= id) {
                Ok(Next::Stop)
            } else {
                Ok(Next::Continue)
            }
        }
    }
}

/// Runs a task that reads from a source.
pub async fn run_source_task(
    mut ctx: TaskContext,
    mut source: Source,
    mut chain: Chain,
) -> Result<(), TaskError> {
    let m = chain.metrics.clone();
    m.records_in.store(source.records_read(), Ordering::Relaxed);
    m.skipped_records
        .store(source.skipped_records(), Ordering::Relaxed);
    let mut ended = false;
    let mut last_wm = i64::MIN;
    let mut stop_at = None;
    loop {
        // Commands first: a trigger must not wait behind a long input.
        loop {
            match ctx.commands.try_recv() {
                Ok(cmd) => {
                    if let Next::Stop =
                        on_command(&ctx, cmd, Some(&source), &mut chain, &mut stop_at).await?
                    {
                        return Ok(());
                    }
                }
                Err(mpsc::error::TryRecvError::Empty) => break,
                Err(mpsc::error::TryRecvError::Disconnected) => return Ok(()),
            }
        }
        if ended || stop_at.is_some() {
            // Nothing more to read (or stopping): wait for commands.
            match ctx.commands.recv().await {
                Some(cmd) => {
                    if let Next::Stop =
                        on_command(&ctx, cmd, Some(&source), &mut chain, &mut stop_at).await?
                    {
                        return Ok(());
                    }
                }
                None => return Ok(()),
            }
            continue;
        }
        let polled = source.poll().await;
        m.skipped_records
            .store(source.skipped_records(), Ordering::Relaxed);
        match polled? {
            Poll::Batch(b) => {
                m.records_in.fetch_add(b.len() as u64, Ordering::Relaxed);
                chain.push(b).await?;
                let wm = source.watermark();
                if wm > last_wm {
                    last_wm = wm;
                    chain.watermark(wm).await?;
                }
                tokio::task::consume_budget().await;
            }
            Poll::Idle(d) => {
                tokio::select! {
                    _ = tokio::time::sleep(d) => {}
                    cmd = ctx.commands.recv() => match cmd {
                        Some(cmd) => {
                            if let Next::Stop = on_command(&ctx, cmd, Some(&source), &mut chain, &mut stop_at).await? {
                                return Ok(());
                            }
                        }
                        None => return Ok(()),
                    }
                }
            }
            Poll::Wait => {
                let cmd = tokio::select! {
                    _ = source.ready() => None,
                    cmd = ctx.commands.recv() => Some(cmd),
                };
                match cmd {
                    None => {}
                    Some(Some(cmd)) => {
                        if let Next::Stop =
                            on_command(&ctx, cmd, Some(&source), &mut chain, &mut stop_at).await?
                        {
                            return Ok(());
                        }
                    }
                    Some(None) => return Ok(()),
                }
            }
            Poll::End => {
                ended = true;
                chain.watermark(i64::MAX).await?;
                let _ = ctx.events.send(TaskEvent::SourceEnded(ctx.id));
            }
        }
    }
}

/// How far (event time, ms) an input may run ahead of the slowest active
/// input of its task before the task stops reading it until the slowest
/// catches up. Without a bound, an upstream task that gets more CPU or a
/// faster path (in memory rather than across the exchange) runs ahead by
/// as much as the job can read: every window between the slowest input's
/// watermark and the fastest input's records stays open, and the state
/// (and its cache misses) grows with the drift — minutes of event time
/// when a job catches up on a backlog. The fast upstream task waits on its
/// full channel instead (backpressure), as a Flink source does under
/// watermark alignment.
pub const MAX_INPUT_DRIFT_MS: i64 = 10_000;

/// An input that delivered nothing for this long is idle: the others no
/// longer wait for it (an idle source's watermark does not advance).
pub const IDLE_INPUT: std::time::Duration = std::time::Duration::from_millis(100);

/// The event time past which a downstream task does not read an input,
/// and until when (`None`: it reads them all): [`MAX_INPUT_DRIFT_MS`] past
/// the watermark of `slowest` (its slowest open input), while that input
/// has a watermark and is active (it delivered something within
/// [`IDLE_INPUT`]). The caller never asks while aligning a barrier: the
/// barriers behind held messages must come in.
fn read_limit(
    slowest: usize,
    input_wm: &[i64],
    heard: &[tokio::time::Instant],
    now: tokio::time::Instant,
) -> Option<(i64, tokio::time::Instant)> {
    let until = heard[slowest] + IDLE_INPUT;
    (input_wm[slowest] != i64::MIN && now < until)
        .then(|| (input_wm[slowest].saturating_add(MAX_INPUT_DRIFT_MS), until))
}

/// Sleeps until `deadline`; forever without one.
pub(crate) async fn sleep_until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

/// Runs a task fed by upstream tasks, aligning barriers across its inputs
/// and bounding how far one input runs ahead of the others in event time
/// ([`MAX_INPUT_DRIFT_MS`]).
pub async fn run_downstream_task(
    mut ctx: TaskContext,
    mut inputs: Vec<mpsc::Receiver<Msg>>,
    mut chain: Chain,
) -> Result<(), TaskError> {
    let n = inputs.len();
    let mut blocked = vec![false; n];
    let mut closed = vec![false; n];
    let mut input_wm = vec![i64::MIN; n];
    let mut heard = vec![tokio::time::Instant::now(); n];
    let mut cur_wm = i64::MIN;
    let mut aligning: Option<(Barrier, usize)> = None;
    let mut stop_at = None;
    let mut rr = 0usize;
    loop {
        let open = |i: usize| !blocked[i] && !closed[i];
        // The slowest open input (ties in turn) is read first when it has
        // a message, then the others in turn; it is always within the limit.
        let slowest = (0..n)
            .map(|k| (rr + k) % n)
            .filter(|&i| open(i))
            .reduce(|a, b| if input_wm[b] < input_wm[a] { b } else { a });
        let limit = slowest
            .filter(|_| n > 1 && aligning.is_none())
            .and_then(|s| read_limit(s, &input_wm, &heard, tokio::time::Instant::now()));
        let readable = |i: usize| open(i) && limit.is_none_or(|(max, _)| input_wm[i] <= max);
        // Wake when the slowest input turns idle, if an input waits on it.
        let held_until = limit
            .filter(|_| (0..n).any(|i| open(i) && !readable(i)))
            .map(|(_, until)| until);
        let next = poll_fn(|cx| {
            for i in slowest
                .into_iter()
                .chain((0..n).map(|k| (rr + k) % n).filter(|&i| Some(i) != slowest))
            {
                if !readable(i) {
                    continue;
                }
                if let TaskPoll::Ready(m) = inputs[i].poll_recv(cx) {
                    rr = (i + 1) % n;
                    heard[i] = tokio::time::Instant::now();
                    return TaskPoll::Ready((i, m));
                }
            }
            TaskPoll::Pending
        });
        tokio::select! {
            biased;
            cmd = ctx.commands.recv() => {
                match cmd {
                    Some(cmd) => {
                        if let Next::Stop = on_command(&ctx, cmd, None, &mut chain, &mut stop_at).await? {
                            return Ok(());
                        }
                    }
                    None => return Ok(()),
                }
            }
            (i, msg) = next => match msg {
                None => {
                    closed[i] = true;
                    if closed.iter().all(|c| *c) && stop_at.is_none() {
                        return Err(TaskError::Transient("all upstream tasks are gone".into()));
                    }
                }
                Some(Msg::Batch(b)) => chain.push(b).await?,
                Some(Msg::Fail(reason)) => return Err(TaskError::Transient(reason)),
                Some(Msg::Watermark(w)) => {
                    input_wm[i] = input_wm[i].max(w);
                    let min = input_wm.iter().copied().min().unwrap_or(i64::MIN);
                    if min > cur_wm {
                        cur_wm = min;
                        chain.watermark(min).await?;
                    }
                }
                Some(Msg::Barrier(b)) => {
                    match &aligning {
                        Some((cur, _)) if b.id < cur.id => continue,
                        Some((cur, _)) if b.id > cur.id => {
                            // A newer checkpoint overtook an abandoned one.
                            blocked.iter_mut().for_each(|x| *x = false);
                            aligning = None;
                        }
                        _ => {}
                    }
                    let (bar, count) = aligning.get_or_insert_with(|| (b.clone(), 0));
                    blocked[i] = true;
                    *count += 1;
                    if *count + closed.iter().filter(|c| **c).count() >= n {
                        let bar = bar.clone();
                        aligning = None;
                        blocked.iter_mut().for_each(|x| *x = false);
                        if bar.stop {
                            stop_at = Some(bar.id);
                        }
                        ctx.snapshot(&bar, None, &mut chain).await?;
                    }
                }
            },
            // The slowest input turned idle: read the others again.
            _ = sleep_until(held_until) => {}
        }
    }
}
