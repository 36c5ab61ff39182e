//! Turning a validated job spec into running tasks: the stage plan (one
//! stage per `key_by` when parallelism > 1), operator construction, state
//! restore, and the channels between tasks and to the JobManager.
//!
//! A job runs whole in one process, or in parts over several TaskManagers
//! ([`Part`]): a slot runs subtask `j` of every stage, so a part is a set
//! of subtask indices. Channels between subtasks of one part stay in
//! memory; a channel to or from a subtask of another part is the same
//! bounded in-memory channel on each side, carried between them by the
//! exchange ([`crate::link`]), so tasks never know which kind they have.

use std::sync::Arc;

use bytes::Bytes;
use ferry_core::JobId;
use ferry_core::manifest::VerifiedCheckpoint;
use ferry_core::spec::{JobSpec, OperatorSpec, SchemaFlow, SinkSpec, SourceSpec};
use ferry_core::storage::StorageLocation;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::link::{ChannelKey, Exchange};
use crate::metrics::TaskMetrics;
use crate::operator::Operator;
use crate::operator::filter::Filter;
use crate::operator::map::Map;
use crate::operator::window::Window;
use crate::protocol::{Msg, TaskCommand, TaskError, TaskEvent, TaskId};
use crate::sink::nats::{NatsSink, min_duplicate_window};
use crate::sink::{FileSink, SINK_STATE, Sink};
use crate::source::Source;
use crate::source::generator::{GeneratorModel, GeneratorSource};
use crate::source::nats::NatsSource;
use crate::task::{Chain, Output, TaskContext, run_downstream_task, run_source_task};

/// Batches in flight per channel between two tasks (backpressure bound).
const CHANNEL_CAPACITY: usize = 8;

/// One stage: the operators (indices into the spec) its tasks run, and the
/// key fields its input is partitioned by (none for the first stage).
#[derive(Clone, Debug)]
pub struct Stage {
    pub ops: Vec<usize>,
    pub input_keys: Option<Vec<String>>,
}

/// A job ready to deploy.
#[derive(Clone, Debug)]
pub struct JobPlan {
    pub spec: JobSpec,
    pub flow: SchemaFlow,
    pub parallelism: u32,
    pub stages: Vec<Stage>,
    /// Stateful operator names, by operator index.
    pub state_names: Vec<Option<String>>,
}

impl JobPlan {
    /// Plans a validated spec.
    pub fn new(spec: &JobSpec) -> Result<Self, String> {
        let flow = ferry_core::spec::output_schemas(spec).map_err(|issues| {
            issues
                .iter()
                .map(|i| format!("{}: {}", i.path, i.message))
                .collect::<Vec<_>>()
                .join("; ")
        })?;
        let parallelism = spec.spec.parallelism.max(1);
        let mut stages = vec![Stage {
            ops: Vec::new(),
            input_keys: None,
        }];
        let mut state_names = Vec::new();
        let mut windows = 0;
        for (i, op) in spec.spec.operators.iter().enumerate() {
            state_names.push(match op {
                OperatorSpec::Window(w) => {
                    windows += 1;
                    Some(w.name.clone().unwrap_or_else(|| {
                        if windows == 1 {
                            "window".to_string()
                        } else {
                            format!("window-{windows}")
                        }
                    }))
                }
                _ => None,
            });
            match op {
                OperatorSpec::KeyBy(k) if parallelism > 1 => stages.push(Stage {
                    ops: Vec::new(),
                    input_keys: Some(k.fields()),
                }),
                OperatorSpec::KeyBy(_) => {}
                _ => stages.last_mut().expect("one stage").ops.push(i),
            }
        }
        Ok(Self {
            spec: spec.clone(),
            flow,
            parallelism,
            stages,
            state_names,
        })
    }

    /// Number of tasks the job runs.
    pub fn task_count(&self) -> usize {
        self.stages.len() * self.parallelism as usize
    }

    fn schema_before(&self, op: usize) -> &ferry_core::schema::Schema {
        if op == 0 {
            &self.flow.source
        } else {
            &self.flow.after[op - 1]
        }
    }

    /// Schema at the end of stage `s` (after its last operator).
    fn schema_at_stage_end(&self, s: usize) -> &ferry_core::schema::Schema {
        // The exchange after stage s sits at the key_by that starts stage s+1;
        // the schema there is the one before that key_by.
        let mut idx = 0;
        let mut stage = 0;
        for (i, op) in self.spec.spec.operators.iter().enumerate() {
            if matches!(op, OperatorSpec::KeyBy(_)) && self.parallelism > 1 {
                if stage == s {
                    return self.schema_before(i);
                }
                stage += 1;
            }
            idx = i + 1;
        }
        self.schema_before(idx)
    }

    fn build_ops(
        &self,
        stage: &Stage,
        cancel: &CancellationToken,
    ) -> Result<Vec<Box<dyn Operator>>, String> {
        let mut ops: Vec<Box<dyn Operator>> = Vec::new();
        for &i in &stage.ops {
            let before = self.schema_before(i);
            let after = &self.flow.after[i];
            match &self.spec.spec.operators[i] {
                OperatorSpec::Filter(e) => ops.push(Box::new(Filter::new(e, before, cancel)?)),
                OperatorSpec::Map(fields) => {
                    ops.push(Box::new(Map::new(fields, before, after, cancel)?))
                }
                OperatorSpec::Window(w) => {
                    let keys = self.flow.keys_after[i]
                        .clone()
                        .ok_or("window without key_by")?;
                    let name = self.state_names[i].clone().unwrap_or_default();
                    ops.push(Box::new(Window::new(
                        &name,
                        w,
                        &keys,
                        before,
                        after,
                        crate::state::process_store(),
                    )?));
                }
                OperatorSpec::KeyBy(_) => {}
            }
        }
        Ok(ops)
    }
}

/// Handles to a deployed job's tasks.
pub struct DeployedJob {
    /// Command channels of the source tasks (checkpoint triggers go here).
    pub sources: Vec<mpsc::UnboundedSender<TaskCommand>>,
    /// Command channels of every task (completion notices go here).
    pub all: Vec<mpsc::UnboundedSender<TaskCommand>>,
    pub events: mpsc::UnboundedReceiver<TaskEvent>,
    pub metrics: Vec<(TaskId, Arc<TaskMetrics>)>,
    pub cancel: CancellationToken,
    pub tasks: TaskTracker,
}

impl DeployedJob {
    /// Stops every task now and waits for them (and their uploads) to end.
    pub async fn shutdown(&self) {
        self.cancel.cancel();
        self.tasks.close();
        self.tasks.wait().await;
    }

    /// The job's counters summed over its tasks.
    pub fn counters(&self) -> Counters {
        Counters::of(&self.metrics)
    }
}

/// A deployment's task counters, summed over its tasks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    pub records_in: u64,
    pub records_out: u64,
    pub late_records: u64,
    pub expression_errors: u64,
    pub skipped_records: u64,
    /// Lowest watermark over the tasks of the last stage (`i64::MIN`
    /// before any record).
    pub watermark: i64,
}

impl Counters {
    /// The counters of a deployment from those of its parts: sums, and
    /// the lowest watermark.
    pub fn combine(parts: &[Counters]) -> Self {
        let mut out = parts.first().copied().unwrap_or(Counters {
            watermark: i64::MIN,
            ..Default::default()
        });
        for c in parts.iter().skip(1) {
            out.records_in += c.records_in;
            out.records_out += c.records_out;
            out.late_records += c.late_records;
            out.expression_errors += c.expression_errors;
            out.skipped_records += c.skipped_records;
            out.watermark = out.watermark.min(c.watermark);
        }
        out
    }

    /// Sums the counters of `tasks`.
    pub fn of(tasks: &[(TaskId, Arc<TaskMetrics>)]) -> Self {
        use std::sync::atomic::Ordering::Relaxed;
        let sum = |f: &dyn Fn(&TaskMetrics) -> u64| tasks.iter().map(|(_, m)| f(m)).sum::<u64>();
        let last = tasks.iter().map(|(t, _)| t.stage).max().unwrap_or(0);
        Self {
            records_in: sum(&|m| m.records_in.load(Relaxed)),
            records_out: sum(&|m| m.records_out.load(Relaxed)),
            late_records: sum(&|m| m.late_records.load(Relaxed)),
            expression_errors: sum(&|m| m.expr_errors.load(Relaxed)),
            skipped_records: sum(&|m| m.skipped_records.load(Relaxed)),
            watermark: tasks
                .iter()
                .filter(|(t, _)| t.stage == last)
                .map(|(_, m)| m.watermark.load(Relaxed))
                .min()
                .unwrap_or(i64::MIN),
        }
    }
}

/// Restores every part of `cp` into freshly built operators, and decodes
/// every source and sink part, without starting anything or committing
/// output: proves that a checkpoint (e.g. one replicated to a standby
/// region) would restore under this plan. Every file must belong to an
/// operator of the plan. Returns the number of state files checked.
pub fn check_restore(plan: &JobPlan, cp: &VerifiedCheckpoint) -> Result<usize, String> {
    let mut known: Vec<&str> = vec!["source", SINK_STATE];
    for (s, stage) in plan.stages.iter().enumerate() {
        for j in 0..plan.parallelism {
            let mut ops = plan.build_ops(stage, &CancellationToken::new())?;
            for (&i, op) in stage.ops.iter().zip(ops.iter_mut()) {
                let Some(name) = &plan.state_names[i] else {
                    continue;
                };
                if j == 0 {
                    known.push(name);
                }
                // Whether a state restores does not depend on the subtask
                // that keeps it: checked once.
                let chains = chains_of(cp, name)?;
                if j == 0 && !chains.is_empty() {
                    op.check_chains(&chains)
                        .map_err(|e| format!("stage {s}: '{name}' state does not restore: {e}"))?;
                }
            }
        }
    }
    for f in &cp.manifest.files {
        if !known.contains(&f.operator.as_str()) {
            return Err(format!(
                "{} belongs to operator '{}', which this job does not have",
                f.path, f.operator
            ));
        }
    }
    for (_, part) in parts_of(Some(cp), "source") {
        match &plan.spec.spec.source {
            SourceSpec::Generator(_) => GeneratorSource::check_state(&part)?,
            SourceSpec::File(_) => crate::source::file::FileSource::check_state(&part)?,
            SourceSpec::Nats(_) => NatsSource::check_state(&part)?,
        }
    }
    for (_, part) in parts_of(Some(cp), SINK_STATE) {
        Sink::check_state(&plan.spec.spec.sink, &part)?;
    }
    Ok(cp.manifest.files.len())
}

/// The state chain (full snapshot, then deltas) of each old subtask of one
/// operator in a checkpoint.
fn chains_of(cp: &VerifiedCheckpoint, operator: &str) -> Result<Vec<Vec<Bytes>>, String> {
    cp.manifest
        .chains(operator)
        .into_values()
        .map(|files| {
            files
                .into_iter()
                .map(|f| {
                    cp.files
                        .get(&f.path)
                        .cloned()
                        .ok_or_else(|| format!("{} was not read with its checkpoint", f.path))
                })
                .collect()
        })
        .collect()
}

/// State parts of one operator in a checkpoint, by old subtask.
fn parts_of(cp: Option<&VerifiedCheckpoint>, operator: &str) -> Vec<(u32, Bytes)> {
    let Some(cp) = cp else { return Vec::new() };
    cp.manifest
        .files
        .iter()
        .filter(|f| f.operator == operator)
        .filter_map(|f| cp.files.get(&f.path).map(|b| (f.subtask, b.clone())))
        .collect()
}

/// The subtasks of a job one TaskManager runs, when the job is spread over
/// several, and where the others run.
#[derive(Clone)]
pub struct Part {
    /// The id every part of the deployment shares: it names the exchange
    /// channels between the parts.
    pub group: String,
    /// Subtask indices run here.
    pub local: Vec<u32>,
    /// The exchange URL of the TaskManager running each subtask, by index.
    pub homes: Vec<String>,
    /// This TaskManager's exchange.
    pub exchange: Exchange,
}

impl Part {
    /// Checks the part against the plan's parallelism.
    pub fn check(&self, parallelism: u32) -> Result<(), String> {
        if self.homes.len() != parallelism as usize {
            return Err(format!(
                "{} exchange URLs for a job of parallelism {parallelism}: one per subtask expected",
                self.homes.len()
            ));
        }
        if self.local.is_empty() {
            return Err("a part without subtasks".into());
        }
        let mut seen = std::collections::BTreeSet::new();
        for &j in &self.local {
            if j >= parallelism {
                return Err(format!(
                    "subtask {j} is out of range for a job of parallelism {parallelism}"
                ));
            }
            if !seen.insert(j) {
                return Err(format!("subtask {j} is listed twice"));
            }
        }
        Ok(())
    }
}

/// A hot standby's held job: every task's operators built and their state
/// restored from one checkpoint, nothing started, no source or sink open.
/// [`deploy_prepared`] starts it.
pub struct Prepared {
    /// The checkpoint restored, without the operator state files (its
    /// source and sink parts restore when the job starts).
    pub checkpoint: VerifiedCheckpoint,
    /// Bytes of operator state restored (checkpoint files), and roughly
    /// the memory it takes now.
    pub state_bytes: u64,
    pub memory_bytes: u64,
    cancel: CancellationToken,
    ops: std::collections::HashMap<TaskId, Vec<Box<dyn Operator>>>,
}

impl std::fmt::Debug for Prepared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Prepared")
            .field("checkpoint", &self.checkpoint.manifest.checkpoint_id)
            .field("state_bytes", &self.state_bytes)
            .field("memory_bytes", &self.memory_bytes)
            .field("tasks", &self.ops.len())
            .finish()
    }
}

/// Builds every task's operators of the whole job `plan` and restores their
/// state from `cp` — the costly part of a restore — without starting
/// anything (CPU-bound: run it off the async workers).
pub fn prepare(plan: &JobPlan, cp: VerifiedCheckpoint) -> Result<Prepared, String> {
    let cancel = CancellationToken::new();
    let mut ops = std::collections::HashMap::new();
    for (s, stage) in plan.stages.iter().enumerate() {
        for j in 0..plan.parallelism {
            let mut built = plan.build_ops(stage, &cancel)?;
            restore_ops(plan, stage, &mut built, Some(&cp), j)?;
            ops.insert(
                TaskId {
                    stage: s as u32,
                    subtask: j,
                },
                built,
            );
        }
    }
    let keep = |op: &str| op == "source" || op == SINK_STATE;
    let state_bytes = cp
        .manifest
        .files
        .iter()
        .filter(|f| !keep(&f.operator))
        .map(|f| f.size)
        .sum();
    let memory_bytes = ops
        .values()
        .flat_map(|ops: &Vec<Box<dyn Operator>>| ops.iter().map(|o| o.memory_bytes()))
        .sum();
    let VerifiedCheckpoint { manifest, files } = cp;
    let small: std::collections::BTreeSet<&str> = manifest
        .files
        .iter()
        .filter(|f| keep(&f.operator))
        .map(|f| f.path.as_str())
        .collect();
    let files = files
        .into_iter()
        .filter(|(p, _)| small.contains(p.as_str()))
        .collect();
    Ok(Prepared {
        checkpoint: VerifiedCheckpoint { manifest, files },
        state_bytes,
        memory_bytes,
        cancel,
        ops,
    })
}

/// Restores the state of one stage's operators for subtask `j`.
fn restore_ops(
    plan: &JobPlan,
    stage: &Stage,
    ops: &mut [Box<dyn Operator>],
    restore: Option<&VerifiedCheckpoint>,
    j: u32,
) -> Result<(), String> {
    let Some(cp) = restore else { return Ok(()) };
    for (&i, op) in stage.ops.iter().zip(ops.iter_mut()) {
        if let Some(name) = &plan.state_names[i] {
            let chains = chains_of(cp, name)?;
            if !chains.is_empty() {
                op.restore_chains(&chains, j, plan.parallelism)
                    .map_err(|e| format!("restoring {name} failed: {e}"))?;
            }
        }
    }
    Ok(())
}

/// Starts the held job `prepared` (whole, in this process): its sinks and
/// sources restore from the checkpoint it holds and its tasks start.
pub async fn deploy_prepared(
    plan: &JobPlan,
    prepared: Prepared,
    job: &JobId,
) -> Result<DeployedJob, String> {
    let Prepared {
        checkpoint,
        cancel,
        ops,
        ..
    } = prepared;
    deploy_inner(plan, Some(&checkpoint), job, None, Some((cancel, ops))).await
}

/// Starts every task of `plan`, restoring from `restore` if given. `job`
/// makes sink output names (file parts, NATS message ids) unique to the job.
pub async fn deploy(
    plan: &JobPlan,
    restore: Option<&VerifiedCheckpoint>,
    job: &JobId,
) -> Result<DeployedJob, String> {
    deploy_part(plan, restore, job, None).await
}

/// Starts the tasks of `part` (every task when `None`), as [`deploy`].
pub async fn deploy_part(
    plan: &JobPlan,
    restore: Option<&VerifiedCheckpoint>,
    job: &JobId,
    part: Option<&Part>,
) -> Result<DeployedJob, String> {
    deploy_inner(plan, restore, job, part, None).await
}

type Built = (
    CancellationToken,
    std::collections::HashMap<TaskId, Vec<Box<dyn Operator>>>,
);

async fn deploy_inner(
    plan: &JobPlan,
    restore: Option<&VerifiedCheckpoint>,
    job: &JobId,
    part: Option<&Part>,
    built: Option<Built>,
) -> Result<DeployedJob, String> {
    if let Some(part) = part {
        part.check(plan.parallelism)?;
    }
    let here = |j: u32| part.is_none_or(|p| p.local.contains(&j));
    let part_prefix = FileSink::job_prefix(job);
    let p = plan.parallelism;
    let (ev_tx, ev_rx) = mpsc::unbounded_channel();
    let (cancel, mut built) = match built {
        Some((cancel, ops)) => (cancel, Some(ops)),
        None => (CancellationToken::new(), None),
    };
    let tasks = TaskTracker::new();
    // A deployment that fails half-way (a sink or source cannot open) stops
    // the tasks it already started instead of leaving them running.
    let started = cancel.clone().drop_guard();
    let uploads = tasks.clone();
    let mut sources = Vec::new();
    let mut all = Vec::new();
    let mut metrics = Vec::new();

    let gen_model = match &plan.spec.spec.source {
        SourceSpec::Generator(g) => Some(Arc::new(GeneratorModel::new(g, p, &plan.flow.source)?)),
        SourceSpec::File(_) | SourceSpec::Nats(_) => None,
    };
    let sink_loc = match &plan.spec.spec.sink {
        SinkSpec::File(f) => Some(StorageLocation::open(&f.path).map_err(|e| e.to_string())?),
        _ => None,
    };

    // Channels between stages: inputs[s][j] are the receivers of stage s, subtask j.
    let nstages = plan.stages.len();
    let mut senders: Vec<Vec<mpsc::Sender<Msg>>> = vec![Vec::new(); nstages];
    let mut receivers: Vec<Vec<Vec<mpsc::Receiver<Msg>>>> = (0..nstages)
        .map(|_| (0..p).map(|_| Vec::new()).collect())
        .collect();
    // Each upstream subtask gets its own channel to each downstream subtask
    // (senders indexed by the downstream subtask: the key partition).
    // A channel with one end in another part is carried by the exchange:
    // its sending end here feeds `connect`, its receiving end `accept`.
    let mut upstream_senders: Vec<Vec<Vec<mpsc::Sender<Msg>>>> = (0..nstages)
        .map(|_| (0..p).map(|_| Vec::new()).collect())
        .collect();
    let mut inbound = Vec::new();
    for s in 1..nstages {
        for up in 0..p {
            for down in 0..p {
                let key = || ChannelKey {
                    deployment: part.map(|p| p.group.clone()).unwrap_or_default(),
                    stage: s as u32,
                    from: up,
                    to: down,
                };
                match (here(up), here(down), part) {
                    (true, true, _) | (_, _, None) => {
                        let (tx, rx) = mpsc::channel(CHANNEL_CAPACITY);
                        upstream_senders[s - 1][up as usize].push(tx);
                        receivers[s][down as usize].push(rx);
                    }
                    (true, false, Some(part)) => {
                        let (tx, rx) = mpsc::channel(CHANNEL_CAPACITY);
                        upstream_senders[s - 1][up as usize].push(tx);
                        let link = part.exchange.connect(
                            &part.homes[down as usize],
                            key(),
                            rx,
                            cancel.clone(),
                        );
                        tasks.spawn(async move {
                            let _ = link.await;
                        });
                    }
                    (false, true, Some(part)) => {
                        let (tx, rx) = mpsc::channel(CHANNEL_CAPACITY);
                        receivers[s][down as usize].push(rx);
                        let schema = Arc::new(plan.schema_at_stage_end(s - 1).clone());
                        inbound.push(part.exchange.accept(key(), schema, tx));
                    }
                    (false, false, Some(_)) => {}
                }
            }
        }
    }
    drop(senders.drain(..));
    if !inbound.is_empty() {
        // The receiving ends stay registered until the deployment stops.
        let token = cancel.clone();
        tasks.spawn(async move {
            token.cancelled().await;
            drop(inbound);
        });
    }

    for (s, stage) in plan.stages.iter().enumerate() {
        for j in (0..p).filter(|&j| here(j)) {
            let id = TaskId {
                stage: s as u32,
                subtask: j,
            };
            let ops = match built.as_mut().and_then(|b| b.remove(&id)) {
                Some(ops) => ops,
                None => {
                    let mut ops = plan.build_ops(stage, &cancel)?;
                    restore_ops(plan, stage, &mut ops, restore, j)?;
                    ops
                }
            };
            let m = Arc::new(TaskMetrics::default());
            let output = if s + 1 < nstages {
                let keys = plan.stages[s + 1].input_keys.clone().unwrap_or_default();
                let schema = plan.schema_at_stage_end(s);
                let key_idx = keys
                    .iter()
                    .map(|k| schema.index_of(k).ok_or(format!("unknown key field '{k}'")))
                    .collect::<Result<Vec<_>, _>>()?;
                Output::Exchange {
                    senders: std::mem::take(&mut upstream_senders[s][j as usize]),
                    key_idx,
                }
            } else {
                let mut sink = match (&plan.spec.spec.sink, &sink_loc) {
                    (SinkSpec::File(_), Some(loc)) => {
                        Sink::File(FileSink::new(loc.clone(), &part_prefix, j))
                    }
                    (SinkSpec::Nats(n), _) => Sink::Nats(Box::new(
                        NatsSink::open(
                            n,
                            plan.flow.sink_schema(),
                            job,
                            j,
                            min_duplicate_window(&plan.spec),
                        )
                        .await?,
                    )),
                    (SinkSpec::Stdout(_), _) => Sink::Stdout,
                    (SinkSpec::Blackhole(b), _) => {
                        Sink::Blackhole(b.records_per_second.map(crate::pace::Pace::new))
                    }
                    _ => Sink::Blackhole(None),
                };
                let parts = parts_of(restore, SINK_STATE);
                let restored = restore
                    .map(|cp| cp.manifest.checkpoint_id)
                    .unwrap_or_default();
                let out = sink
                    .restore(&parts, j, p, restored)
                    .await
                    .map_err(|e| format!("restoring the sink failed: {e}"))?;
                m.records_out
                    .store(out, std::sync::atomic::Ordering::Relaxed);
                Output::Sink(sink)
            };
            if let Some(cp) = restore {
                m.watermark
                    .store(cp.manifest.watermark, std::sync::atomic::Ordering::Relaxed);
            }
            let chain = Chain {
                ops,
                output,
                metrics: m.clone(),
            };
            let (cmd_tx, cmd_rx) = mpsc::unbounded_channel();
            let ctx = TaskContext {
                id,
                commands: cmd_rx,
                events: ev_tx.clone(),
                uploads: uploads.clone(),
                chains: plan.spec.spec.checkpointing.incremental.then(|| {
                    Arc::new(std::sync::Mutex::new(crate::incremental::Chains::new(
                        plan.spec.spec.checkpointing.compact_ratio,
                    )))
                }),
            };
            let events = ev_tx.clone();
            let token = cancel.clone();
            if s == 0 {
                let mut source = match &plan.spec.spec.source {
                    SourceSpec::Generator(g) => Source::Generator(GeneratorSource::new(
                        gen_model.clone().expect("generator model"),
                        g.rate,
                        j,
                        p,
                    )),
                    SourceSpec::File(f) => Source::File(Box::new(
                        crate::source::file::FileSource::open(f, &plan.flow.source, j, p).await?,
                    )),
                    SourceSpec::Nats(n) => Source::Nats(Box::new(
                        NatsSource::open(n, &plan.flow.source, j, p).await?,
                    )),
                };
                let parts: Vec<Bytes> = parts_of(restore, "source")
                    .into_iter()
                    .map(|(_, b)| b)
                    .collect();
                if !parts.is_empty() {
                    source.restore(&parts)?;
                }
                sources.push(cmd_tx.clone());
                tasks.spawn(async move {
                    let r = tokio::select! {
                        r = guarded(run_source_task(ctx, source, chain)) => r,
                        _ = token.cancelled() => return,
                    };
                    report(&events, id, r);
                });
            } else {
                let inputs = std::mem::take(&mut receivers[s][j as usize]);
                tasks.spawn(async move {
                    let r = tokio::select! {
                        r = guarded(run_downstream_task(ctx, inputs, chain)) => r,
                        _ = token.cancelled() => return,
                    };
                    report(&events, id, r);
                });
            }
            all.push(cmd_tx);
            metrics.push((id, m));
        }
    }
    started.disarm();
    Ok(DeployedJob {
        sources,
        all,
        events: ev_rx,
        metrics,
        cancel,
        tasks,
    })
}

/// Runs a task, turning a panic into its failure: a panic is a bug that
/// the same input would hit again after a restart, so it fails the job
/// (permanently) with the panic's message instead of vanishing.
async fn guarded(
    task: impl std::future::Future<Output = Result<(), TaskError>>,
) -> Result<(), TaskError> {
    use futures::FutureExt;
    match std::panic::AssertUnwindSafe(task).catch_unwind().await {
        Ok(r) => r,
        Err(panic) => {
            let msg = ferry_core::error::panic_message(panic.as_ref());
            Err(TaskError::Permanent(format!(
                "the task panicked: {msg} (a bug in Ferry: please report it with the job spec)"
            )))
        }
    }
}

fn report(events: &mpsc::UnboundedSender<TaskEvent>, task: TaskId, r: Result<(), TaskError>) {
    let _ = events.send(match r {
        Ok(()) => TaskEvent::Stopped(task),
        Err(error) => TaskEvent::Failed { task, error },
    });
}

#[cfg(test)]
mod panic_tests {
    use super::*;

    #[tokio::test]
    async fn a_panicking_task_fails_permanently_with_its_message() {
        let r = guarded(async {
            let divisor = std::hint::black_box(0u64);
            let _ = 7u64 % divisor;
            Ok(())
        })
        .await;
        match r {
            Err(TaskError::Permanent(m)) => {
                assert!(m.contains("remainder with a divisor of zero"), "{m}")
            }
            other => panic!("expected a permanent failure, got {other:?}"),
        }
        assert!(matches!(guarded(async { Ok(()) }).await, Ok(())));
    }
}
