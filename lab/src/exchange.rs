//! The exchange benchmark (`ferry bench exchange`): the keyed tumbling
//! count (generator → key_by → 1-minute count → blackhole) at parallelism
//! 2, run whole on one TaskManager and split over two — subtask 0 on one,
//! subtask 1 on the other, so half the records cross the exchange (Arrow
//! IPC over a real gRPC connection on loopback) — in the same process, on
//! the same worker threads, runs interleaved. The one TaskManager runs on
//! a runtime with every thread; each of the two on its own runtime with
//! half of them, as two processes would. It reports events per second and per
//! CPU second of each, their ratio, and what crossed the exchange per CPU
//! second.
//!
//! The tasks run without a JobManager: the benchmark starts them with the
//! runtime's own deploy calls, and once every source has ended sends the
//! final barrier itself and waits for every task's acknowledgement — the
//! point where every record has been counted.

use std::time::Instant;

use anyhow::Context;
use ferry_core::CheckpointId;
use ferry_core::JobId;
use ferry_core::manifest::SnapshotKind;
use ferry_core::spec::parse_and_validate;
use ferry_core::storage::StorageLocation;
use ferry_taskmanager::link::{Exchange, LinkConfig};
use ferry_taskmanager::protocol::{Barrier, TaskCommand, TaskEvent};
use ferry_taskmanager::runtime::{DeployedJob, JobPlan, Part, deploy_part};
use serde::Serialize;

use crate::bench::cpu_time;
use tokio::runtime::{Handle, Runtime};
use tokio::sync::mpsc;

/// What to measure.
#[derive(Clone, Debug)]
pub struct ExchangeOptions {
    /// Events per run.
    pub events: u64,
    /// Distinct keys.
    pub keys: u64,
    /// Runs of each variant, interleaved; the fastest of each is reported.
    pub repeat: u32,
    /// Worker threads in all: the one TaskManager's runtime has them all;
    /// split, each TaskManager runs on its own runtime with half of them
    /// (with one thread, both share it).
    pub threads: usize,
    /// String keys `<prefix><n>` instead of integers.
    pub key_prefix: Option<String>,
}

/// One run of one variant.
#[derive(Serialize, Clone, Copy, Debug)]
pub struct ExchangeRun {
    pub wall_s: f64,
    pub cpu_s: f64,
    pub events_per_s: f64,
    pub events_per_cpu_s: f64,
    /// Records and Arrow IPC bytes that crossed the exchange.
    pub exchanged_records: u64,
    pub exchanged_bytes: u64,
    /// Batches that crossed it, and the frames that carried them (with
    /// the watermarks, barriers and ends).
    pub exchanged_batches: u64,
    pub exchanged_frames: u64,
}

/// The benchmark's result.
#[derive(Serialize, Clone, Debug)]
pub struct ExchangeReport {
    pub events: u64,
    pub keys: u64,
    pub key_prefix: Option<String>,
    pub threads: usize,
    /// Worker threads of each TaskManager's own runtime in the split run;
    /// `None` when both share the one runtime (one thread in all).
    pub split_threads: Option<[usize; 2]>,
    /// The fastest run of each variant.
    pub one_taskmanager: ExchangeRun,
    pub two_taskmanagers: ExchangeRun,
    /// Two over one: events per second, and per CPU second.
    pub ratio: f64,
    pub ratio_per_cpu: f64,
    /// What crossed the exchange per CPU second of the split run (the
    /// whole process's CPU: tasks and exchange together).
    pub exchange_records_per_cpu_s: f64,
    pub exchange_mb_per_cpu_s: f64,
    pub runs_one: Vec<ExchangeRun>,
    pub runs_two: Vec<ExchangeRun>,
}

impl ExchangeReport {
    /// The results as a Markdown table, as `ferry bench` prints them.
    pub fn markdown(&self) -> String {
        let mut out = String::new();
        let keys = match &self.key_prefix {
            Some(p) => format!("string keys ({p}N)"),
            None => "integer keys".to_string(),
        };
        let split = match self.split_threads {
            Some([a, b]) => format!("split: {a} + {b}, one runtime per TaskManager"),
            None => "split: both TaskManagers on the one runtime".to_string(),
        };
        out.push_str(&format!(
            "keyed tumbling count, parallelism 2, {} events over {} {keys}, {} worker threads ({split}), best of {} runs each\n\n",
            self.events,
            self.keys,
            self.threads,
            self.runs_one.len()
        ));
        out.push_str("| variant | wall s | CPU s | events/s | events/CPU-s | exchanged records | exchanged MB |\n|---|---|---|---|---|---|---|\n");
        for (name, r) in [
            ("1 TaskManager", &self.one_taskmanager),
            ("2 TaskManagers", &self.two_taskmanagers),
        ] {
            out.push_str(&format!(
                "| {name} | {:.2} | {:.2} | {:.0} | {:.0} | {} | {:.1} |\n",
                r.wall_s,
                r.cpu_s,
                r.events_per_s,
                r.events_per_cpu_s,
                r.exchanged_records,
                r.exchanged_bytes as f64 / 1e6
            ));
        }
        out.push_str(&format!(
            "\nratio 2 TMs / 1 TM: {:.3} (events/s), {:.3} (events/CPU-s)\nexchange per CPU second: {:.0} records, {:.1} MB\n",
            self.ratio, self.ratio_per_cpu, self.exchange_records_per_cpu_s, self.exchange_mb_per_cpu_s
        ));
        out
    }
}

fn spec(events: u64, keys: u64, key_prefix: Option<&str>) -> String {
    let prefix = match key_prefix {
        Some(p) => format!(", prefix: {}", serde_json::to_string(p).unwrap_or_default()),
        None => String::new(),
    };
    format!(
        r#"
apiVersion: ferry.dev/v1
kind: Job
metadata: {{name: bench-exchange}}
spec:
  parallelism: 2
  checkpointing: {{interval: 1h, retained: 1}}
  restartStrategy: {{type: none}}
  source:
    generator:
      partitions: 2
      total: {events}
      eventTime: {{step: 1ms, maxOutOfOrderness: 100ms}}
      fields:
        key: {{type: key, cardinality: {keys}{prefix}}}
  operators:
    - key_by: key
    - window: {{tumbling: 1m, aggregate: {{count: count}}}}
  sink:
    blackhole: {{}}
"#
    )
}

/// Serves `exchange` on a free loopback port; its URL.
async fn serve(exchange: &Exchange) -> anyhow::Result<(String, tokio::task::JoinHandle<()>)> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}", listener.local_addr()?);
    let service = exchange.service();
    let task = tokio::spawn(async move {
        let _ = Exchange::server_builder()
            .add_service(service)
            .serve_with_incoming(Exchange::incoming(listener))
            .await;
    });
    Ok((url, task))
}

/// Runs the job to its end: waits for every source to end, sends the
/// final barrier, waits for every task's acknowledgement.
async fn drive(
    parts: &mut [DeployedJob],
    tasks: usize,
    dir: &StorageLocation,
) -> anyhow::Result<()> {
    let (tx, mut rx) = mpsc::unbounded_channel();
    for p in parts.iter_mut() {
        let mut events = std::mem::replace(&mut p.events, mpsc::unbounded_channel().1);
        let tx = tx.clone();
        tokio::spawn(async move {
            while let Some(e) = events.recv().await {
                if tx.send(e).is_err() {
                    return;
                }
            }
        });
    }
    drop(tx);
    let sources: usize = parts.iter().map(|p| p.sources.len()).sum();
    let (mut ended, mut acks) = (0, 0);
    while acks < tasks {
        match rx.recv().await.context("every task stopped early")? {
            TaskEvent::SourceEnded(_) => {
                ended += 1;
                if ended == sources {
                    let barrier = Barrier {
                        id: CheckpointId(1),
                        kind: SnapshotKind::Checkpoint,
                        close_txn: true,
                        stop: true,
                        dir: dir.clone(),
                    };
                    for p in parts.iter() {
                        for s in &p.sources {
                            let _ = s.send(TaskCommand::Trigger(barrier.clone()));
                        }
                    }
                }
            }
            TaskEvent::Ack(_) => acks += 1,
            TaskEvent::Failed { task, error } => anyhow::bail!("{task} failed: {error}"),
            TaskEvent::Declined { reason, .. } => anyhow::bail!("final barrier declined: {reason}"),
            TaskEvent::Stopped(_) => {}
        }
    }
    Ok(())
}

/// The runtimes the TaskManagers run on. The one TaskManager runs on
/// `whole`, with every worker thread. Split, each TaskManager runs on its
/// own runtime with half of them: two TaskManagers are two processes, each
/// with its own scheduler, never stealing each other's tasks — and together
/// they get the same threads as the one. With a single thread in all, both
/// share `whole`.
struct TaskManagerRuntimes {
    whole: Runtime,
    halves: Option<[Runtime; 2]>,
}

impl TaskManagerRuntimes {
    fn new(threads: usize) -> std::io::Result<Self> {
        let runtime = |threads: usize, name: &str| {
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(threads)
                .thread_name(name)
                .enable_all()
                .build()
        };
        let threads = threads.max(1);
        let halves = if threads >= 2 {
            Some([
                runtime(threads.div_ceil(2), "tm-a")?,
                runtime(threads / 2, "tm-b")?,
            ])
        } else {
            None
        };
        Ok(Self {
            whole: runtime(threads, "tm")?,
            halves,
        })
    }

    /// The runtimes of the split run's two TaskManagers.
    fn split(&self) -> [Handle; 2] {
        match &self.halves {
            Some([a, b]) => [a.handle().clone(), b.handle().clone()],
            None => [self.whole.handle().clone(), self.whole.handle().clone()],
        }
    }

    fn split_threads(&self) -> Option<[usize; 2]> {
        self.halves
            .as_ref()
            .map(|[a, b]| [a.metrics().num_workers(), b.metrics().num_workers()])
    }
}

/// Deploys `part` of `plan` (the whole job when `None`) on the runtime `rt`
/// (a TaskManager's), so that every task it spawns — the job's tasks and
/// their exchange channels — runs there.
async fn deploy_on(
    rt: &Handle,
    plan: &JobPlan,
    job: JobId,
    part: Option<Part>,
) -> anyhow::Result<DeployedJob> {
    let plan = plan.clone();
    rt.spawn(async move { deploy_part(&plan, None, &job, part.as_ref()).await })
        .await
        .context("a TaskManager's deploy task failed")?
        .map_err(|e| anyhow::anyhow!(e))
}

async fn run_once(
    plan: &JobPlan,
    split: bool,
    events: u64,
    dir: &StorageLocation,
    taskmanagers: &TaskManagerRuntimes,
) -> anyhow::Result<ExchangeRun> {
    let job = JobId::new();
    let mut servers = Vec::new();
    let mut exchanges = Vec::new();
    let cpu0 = cpu_time();
    let t0 = Instant::now();
    let mut parts = if split {
        let [ha, hb] = taskmanagers.split();
        let a = Exchange::new("tm-a", LinkConfig::default(), None);
        let b = Exchange::new("tm-b", LinkConfig::default(), None);
        // Each exchange server on its TaskManager's runtime, with its
        // connections.
        let (ua, sa) = ha
            .spawn({
                let a = a.clone();
                async move { serve(&a).await }
            })
            .await??;
        let (ub, sb) = hb
            .spawn({
                let b = b.clone();
                async move { serve(&b).await }
            })
            .await??;
        servers.extend([sa, sb]);
        let homes = vec![ua, ub];
        let part = |local: u32, exchange: &Exchange| Part {
            group: job.to_string(),
            local: vec![local],
            homes: homes.clone(),
            exchange: exchange.clone(),
        };
        let pa = deploy_on(&ha, plan, job, Some(part(0, &a))).await?;
        let pb = deploy_on(&hb, plan, job, Some(part(1, &b))).await?;
        exchanges.extend([a, b]);
        vec![pa, pb]
    } else {
        vec![deploy_on(taskmanagers.whole.handle(), plan, job, None).await?]
    };
    drive(&mut parts, plan.task_count(), &dir.child(&job.to_string())).await?;
    let wall = t0.elapsed().as_secs_f64();
    let cpu = (cpu_time() - cpu0).as_secs_f64();
    let read: u64 = parts.iter().map(|p| p.counters().records_in).sum();
    anyhow::ensure!(read == events, "read {read} of {events} events");
    let (mut records, mut bytes, mut batches, mut frames) = (0, 0, 0, 0);
    for e in &exchanges {
        for s in e.stats() {
            if s.direction == ferry_taskmanager::link::Direction::Out {
                records += s.records;
                bytes += s.bytes;
                batches += s.batches;
                frames += s.frames;
            }
        }
    }
    for p in &parts {
        p.shutdown().await;
    }
    for s in servers {
        s.abort();
    }
    Ok(ExchangeRun {
        wall_s: wall,
        cpu_s: cpu,
        events_per_s: events as f64 / wall,
        events_per_cpu_s: events as f64 / cpu,
        exchanged_records: records,
        exchanged_bytes: bytes,
        exchanged_batches: batches,
        exchanged_frames: frames,
    })
}

/// Runs the benchmark; `on_run(repeat, split, result)` after each run.
pub fn exchange(
    a: &ExchangeOptions,
    mut on_run: impl FnMut(u32, bool, &ExchangeRun),
) -> anyhow::Result<ExchangeReport> {
    let spec = parse_and_validate(&spec(a.events, a.keys, a.key_prefix.as_deref()))
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let plan = JobPlan::new(&spec).map_err(|e| anyhow::anyhow!(e))?;
    let tmp = tempfile::tempdir()?;
    let dir = StorageLocation::open(&format!("file://{}", tmp.path().display()))?;
    let taskmanagers = TaskManagerRuntimes::new(a.threads)?;
    // The benchmark's own driver (deploy, end, count) on this thread.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let mut runs: [Vec<ExchangeRun>; 2] = [Vec::new(), Vec::new()];
    for r in 0..a.repeat.max(1) {
        // ABBA, as the throughput benchmark.
        let order = if r % 2 == 0 {
            [false, true]
        } else {
            [true, false]
        };
        for split in order {
            let res = rt
                .block_on(run_once(&plan, split, a.events, &dir, &taskmanagers))
                .with_context(|| {
                    format!("run {} ({} TaskManagers)", r + 1, if split { 2 } else { 1 })
                })?;
            on_run(r + 1, split, &res);
            runs[usize::from(split)].push(res);
        }
    }
    let best = |v: &[ExchangeRun]| {
        *v.iter()
            .max_by(|a, b| a.events_per_s.total_cmp(&b.events_per_s))
            .expect("at least one run")
    };
    let (one, two) = (best(&runs[0]), best(&runs[1]));
    let [runs_one, runs_two] = runs;
    Ok(ExchangeReport {
        events: a.events,
        keys: a.keys,
        key_prefix: a.key_prefix.clone(),
        threads: a.threads,
        split_threads: taskmanagers.split_threads(),
        one_taskmanager: one,
        two_taskmanagers: two,
        ratio: two.events_per_s / one.events_per_s,
        ratio_per_cpu: two.events_per_cpu_s / one.events_per_cpu_s,
        exchange_records_per_cpu_s: two.exchanged_records as f64 / two.cpu_s,
        exchange_mb_per_cpu_s: two.exchanged_bytes as f64 / 1e6 / two.cpu_s,
        runs_one,
        runs_two,
    })
}
