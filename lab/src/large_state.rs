//! `ferry bench large-state`: a job whose keyed window state is larger than
//! the memory its TaskManager may give it. A real `ferry local` process
//! counts `passes` records for each of `keys` long string keys in one
//! 24-hour window with `--state-memory`; it is SIGKILLed after a checkpoint
//! taken once most records are in, started again, restores, and finishes.
//! Measured: the process's RSS over time (sampled every second) and its
//! peak, the state's size in the checkpoint, the restore time, and the
//! throughput of both runs. Checked: every key came out of the window
//! exactly once with exactly `passes` (what the input holds by
//! construction), through a second window that sums up the first's rows.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde::Serialize;

/// What to run.
#[derive(Clone, Debug)]
pub struct LargeStateOptions {
    /// The `ferry` binary to start.
    pub ferry: PathBuf,
    pub keys: u64,
    /// Length of each key in bytes (a fixed prefix, then the key's number).
    pub key_bytes: usize,
    /// Records per key.
    pub passes: u64,
    /// `--state-memory` of the process (e.g. `512MiB`).
    pub state_memory: String,
    pub checkpoint_interval: String,
    /// The first run is killed after a checkpoint with at least this
    /// fraction of the records.
    pub kill_at: f64,
    /// Where the checkpoints, the state store and the output go (a temp
    /// dir, removed at the end, by default).
    pub dir: Option<PathBuf>,
    /// Bound on each run.
    pub timeout: Duration,
    /// Records per second of the source (0: as fast as the job goes).
    pub rate: u64,
}

/// One sample of the process.
#[derive(Clone, Debug, Serialize)]
pub struct Sample {
    pub run: u32,
    pub secs: f64,
    pub rss_mib: u64,
    /// Of it, the process's own memory (heap, stacks) and pages of files
    /// it maps (state files being restored: the kernel's to take back).
    pub anon_mib: u64,
    pub file_mib: u64,
    /// Records in as of the newest checkpoint.
    pub records: u64,
}

/// One run of the process.
#[derive(Clone, Debug, Default, Serialize)]
pub struct RunStats {
    pub wall_s: f64,
    /// Records the run took in (up to the checkpoint it was killed after,
    /// for the first run).
    pub records: u64,
    pub records_per_s: f64,
    pub peak_rss_mib: u64,
    /// The largest sample of the process's own memory (RSS without mapped
    /// files).
    pub peak_anon_mib: u64,
    /// The median of the RSS samples after the first checkpoint.
    pub median_rss_mib: u64,
    /// Newest checkpoint id when the run ended.
    pub checkpoints: u64,
    /// Whether the run was killed (else it ended by itself).
    #[serde(skip)]
    pub killed: bool,
}

#[derive(Clone, Debug, Serialize)]
pub struct LargeStateReport {
    pub keys: u64,
    pub key_bytes: usize,
    pub events: u64,
    pub state_memory: String,
    pub checkpoint_interval: String,
    /// Bytes of the window's state files in the checkpoint restored (its
    /// full snapshot and deltas).
    pub state_bytes: u64,
    /// Bytes of the store on disk when the first run was killed.
    pub store_disk_bytes: u64,
    pub first: RunStats,
    pub restored_checkpoint: u64,
    pub restore_ms: u64,
    pub second: RunStats,
    pub keys_out: u64,
    pub samples: Vec<Sample>,
}

impl LargeStateReport {
    pub fn markdown(&self) -> String {
        let gb = |b: u64| b as f64 / 1e9;
        let mut s = String::new();
        s.push_str(&format!(
            "{} keys of {} bytes, {} records each ({} records), state memory {}, checkpoints every {}\n\n",
            self.keys, self.key_bytes, self.events / self.keys.max(1), self.events,
            self.state_memory, self.checkpoint_interval
        ));
        s.push_str("| measure | value |\n|---|---|\n");
        s.push_str(&format!(
            "| window state in the checkpoint | {:.2} GB |\n| state store on disk | {:.2} GB |\n",
            gb(self.state_bytes),
            gb(self.store_disk_bytes)
        ));
        for (name, r) in [
            ("first run (killed)", &self.first),
            ("second run (restored)", &self.second),
        ] {
            s.push_str(&format!(
                "| {name}: records, rate | {} in {:.0} s, {:.0} k/s |\n| {name}: RSS peak / median; peak without mapped files | {} / {} MiB; {} MiB |\n",
                r.records,
                r.wall_s,
                r.records_per_s / 1e3,
                r.peak_rss_mib,
                r.median_rss_mib,
                r.peak_anon_mib
            ));
        }
        s.push_str(&format!(
            "| restore of checkpoint {} | {:.1} s |\n| output | {} keys, each once with its count |\n",
            self.restored_checkpoint,
            self.restore_ms as f64 / 1e3,
            self.keys_out
        ));
        s
    }
}

/// Keys' numbers are squared modulo this in the check sum (the sum fits
/// an i64 for up to 900 M keys).
const SQ_MOD: u64 = 100_003;

/// The job: `key` is `<prefix><n mod keys>` for record `n`, so each key
/// gets exactly `passes` records, all in one 24-hour window (a record per
/// millisecond from midnight: under 24 h for fewer than 86.4 M records).
fn spec(o: &LargeStateOptions, prefix: &str, out: &Path) -> String {
    let events = o.keys * o.passes;
    format!(
        r#"
apiVersion: ferry.dev/v1
kind: Job
metadata: {{name: large-state}}
spec:
  parallelism: 1
  checkpointing: {{interval: {interval}, retained: 2}}
  restartStrategy: {{type: none}}
  source:
    generator:
      partitions: 1
      total: {events}
      rate: {rate}
      eventTime: {{start: "2026-01-01T00:00:00Z", step: 1ms}}
      fields:
        n: {{type: sequence}}
  operators:
    - map:
        key: "'{prefix}' + string(n % {keys})"
        id: "n % {keys}"
    - key_by: key
    - window: {{name: per-key, tumbling: 24h, aggregate: {{count: count, id: max(id)}}}}
    # One row sums up every key's row: the output stays small (the file
    # sink holds a checkpoint's output in memory) and still says whether
    # every key came out once with its count.
    - map:
        all: "'all'"
        count: count
        id: id
        sq: "(id % {SQ_MOD}) * (id % {SQ_MOD})"
    - key_by: all
    - window:
        name: totals
        tumbling: 24h
        aggregate: {{keys: count, total: sum(count), lo: min(count), hi: max(count), ids: sum(id), squares: sum(sq)}}
  sink:
    file: {{path: "{out}"}}
"#,
        interval = o.checkpoint_interval,
        rate = o.rate,
        keys = o.keys,
        out = out.display(),
    )
}

/// The newest complete checkpoint under `data`: (id, records in, bytes of
/// the window's state files).
fn newest_checkpoint(data: &Path) -> Option<(u64, u64, u64)> {
    let jobs = std::fs::read_dir(data.join("jobs")).ok()?;
    let mut best: Option<(u64, u64, u64)> = None;
    for job in jobs.flatten() {
        let Ok(cps) = std::fs::read_dir(job.path().join("checkpoints")) else {
            continue;
        };
        for cp in cps.flatten() {
            let Ok(id) = cp.file_name().to_string_lossy().parse::<u64>() else {
                continue;
            };
            if best.is_some_and(|b| b.0 >= id) {
                continue;
            }
            let Ok(text) = std::fs::read_to_string(cp.path().join("MANIFEST.json")) else {
                continue;
            };
            let Ok(m) = serde_json::from_str::<ferry_core::manifest::Manifest>(&text) else {
                continue;
            };
            let bytes = m
                .files
                .iter()
                .filter(|f| f.operator == "per-key")
                .map(|f| f.size)
                .sum();
            best = Some((id, m.records_in, bytes));
        }
    }
    best
}

/// A field of `/proc/<pid>/status` in MiB (`VmRSS`, `VmHWM`).
fn proc_mib(pid: u32, field: &str) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map(|kib| kib / 1024)
}

/// Bytes of the files under `dir`.
fn disk_bytes(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| match e.file_type() {
            Ok(t) if t.is_dir() => disk_bytes(&e.path()),
            _ => e.metadata().map(|m| m.len()).unwrap_or(0),
        })
        .sum()
}

/// A child killed when dropped.
struct Guard(Child);

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Runs the benchmark; `progress` gets a line every 10 s.
pub fn run(o: &LargeStateOptions, progress: impl Fn(&str)) -> anyhow::Result<LargeStateReport> {
    if o.keys == 0 || o.passes < 2 {
        bail!(
            "--keys must be positive and --passes at least 2 (the second pass runs on restored state)"
        );
    }
    let events = o.keys * o.passes;
    if events >= 86_400_000 {
        bail!(
            "at most 86,399,999 records (keys × passes): they must fit one 24-hour window at one per millisecond"
        );
    }
    let digits = o.keys.to_string().len();
    if o.key_bytes < digits + 2 {
        bail!(
            "--key-bytes must be at least {} for {} keys",
            digits + 2,
            o.keys
        );
    }
    let prefix = format!("{}-", "k".repeat(o.key_bytes - digits - 1));
    let tmp;
    let dir = match &o.dir {
        Some(d) => {
            std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
            d.clone()
        }
        None => {
            tmp = tempfile::Builder::new()
                .prefix("ferry-large-state-")
                .tempdir()?;
            tmp.path().to_path_buf()
        }
    };
    let (data, out) = (dir.join("data"), dir.join("out"));
    let spec_path = dir.join("large-state.yaml");
    std::fs::write(&spec_path, spec(o, &prefix, &out))?;
    let start = |log: &str| -> anyhow::Result<Guard> {
        let file = std::fs::File::create(dir.join(log))?;
        let mut cmd = Command::new(&o.ferry);
        // SAFETY: prctl(2) in the child before exec, async-signal-safe: the
        // process dies with the benchmark (even one killed by a signal)
        // instead of running on against the same directory.
        unsafe {
            use std::os::unix::process::CommandExt as _;
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let child = cmd
            .arg("local")
            .arg(&spec_path)
            .args(["--data-dir"])
            .arg(&data)
            .args(["--state-memory", &o.state_memory, "--no-progress"])
            .args(["--listen", "127.0.0.1:0"])
            .current_dir(&dir)
            .stdout(Stdio::null())
            .stderr(file)
            .spawn()
            .with_context(|| format!("starting {} local", o.ferry.display()))?;
        Ok(Guard(child))
    };
    let mut samples = Vec::new();
    let mut stats = |run: u32,
                     child: &mut Guard,
                     until: &mut dyn FnMut(u64) -> anyhow::Result<bool>|
     -> anyhow::Result<RunStats> {
        let t0 = Instant::now();
        let pid = child.0.id();
        let (mut peak, mut peak_anon, mut records, mut newest) = (0u64, 0u64, 0u64, 0u64);
        let mut rss = Vec::new();
        let mut next_print = Duration::from_secs(10);
        let mut killed = false;
        loop {
            if t0.elapsed() > o.timeout {
                bail!(
                    "run {run} took longer than {:?}; its log is in {}",
                    o.timeout,
                    dir.display()
                );
            }
            if let Some(status) = child.0.try_wait()? {
                if !status.success() {
                    bail!(
                        "run {run} exited with {status}; its log is in {}",
                        dir.display()
                    );
                }
                break;
            }
            let now = proc_mib(pid, "VmRSS:").unwrap_or(0);
            let anon = proc_mib(pid, "RssAnon:").unwrap_or(0);
            let file = proc_mib(pid, "RssFile:").unwrap_or(0);
            peak = peak.max(proc_mib(pid, "VmHWM:").unwrap_or(0)).max(now);
            peak_anon = peak_anon.max(anon);
            if let Some((id, r, _)) = newest_checkpoint(&data) {
                records = records.max(r);
                newest = newest.max(id);
            }
            let secs = t0.elapsed().as_secs_f64();
            if newest > 0 {
                rss.push(now);
            }
            samples.push(Sample {
                run,
                secs,
                rss_mib: now,
                anon_mib: anon,
                file_mib: file,
                records,
            });
            if t0.elapsed() >= next_print {
                next_print += Duration::from_secs(10);
                progress(&format!(
                    "  run {run} {secs:>5.0} s  RSS {now:>5} MiB (own {anon}, mapped files {file}; peak {peak})  {records} records checkpointed  checkpoint {newest}"
                ));
            }
            if until(records)? {
                // The peak before the kill.
                peak = peak.max(proc_mib(pid, "VmHWM:").unwrap_or(0));
                child.0.kill()?;
                child.0.wait()?;
                killed = true;
                break;
            }
            std::thread::sleep(Duration::from_secs(1));
        }
        rss.sort_unstable();
        let wall_s = t0.elapsed().as_secs_f64();
        Ok(RunStats {
            wall_s,
            records,
            records_per_s: records as f64 / wall_s.max(1e-3),
            peak_rss_mib: peak,
            peak_anon_mib: peak_anon,
            median_rss_mib: rss.get(rss.len() / 2).copied().unwrap_or(0),
            checkpoints: newest,
            killed,
        })
    };

    progress(&format!(
        "first run: {events} records over {} keys of {} bytes, state memory {}",
        o.keys, o.key_bytes, o.state_memory
    ));
    let kill_at = (events as f64 * o.kill_at) as u64;
    let mut first = start("first.log")?;
    let mut store_disk = 0u64;
    let state_dir = data.join("state");
    let first_stats = stats(1, &mut first, &mut |records| {
        store_disk = store_disk.max(disk_bytes(&state_dir));
        Ok(records >= kill_at)
    })?;
    drop(first);
    if !first_stats.killed {
        bail!(
            "the first run finished before a checkpoint with {kill_at} records was seen: use more keys or a lower --rate (see {})",
            dir.join("first.log").display()
        );
    }
    if first_stats.records < kill_at {
        bail!(
            "the first run ended after {} records, before a checkpoint with {kill_at}: see {}",
            first_stats.records,
            dir.join("first.log").display()
        );
    }
    let (restored_checkpoint, _, state_bytes) =
        newest_checkpoint(&data).context("no checkpoint")?;
    progress(&format!(
        "killed (SIGKILL) after checkpoint {restored_checkpoint}: {:.2} GB of window state; second run",
        state_bytes as f64 / 1e9
    ));
    let mut second = start("second.log")?;
    let mut second_stats = stats(2, &mut second, &mut |_| Ok(false))?;
    drop(second);
    let log = std::fs::read_to_string(dir.join("second.log"))?;
    let restore_ms = log
        .lines()
        .find_map(|l| {
            let rest = l.split("restored from checkpoint ").nth(1)?;
            let ms = rest.rsplit_once(" in ")?.1.split(" ms").next()?;
            ms.trim().parse::<u64>().ok()
        })
        .with_context(|| {
            format!(
                "the second run did not restore: see {}",
                dir.join("second.log").display()
            )
        })?;
    second_stats.records = events.saturating_sub(first_stats.records);
    second_stats.records_per_s = second_stats.records as f64 / second_stats.wall_s.max(1e-3);

    // Every key once, with exactly `passes`: the one row of the totals
    // window against the sums of the keys' numbers, computed here.
    let mut rows = Vec::new();
    for f in std::fs::read_dir(&out).with_context(|| format!("reading {}", out.display()))? {
        let f = f?;
        let name = f.file_name().to_string_lossy().to_string();
        if name.starts_with("part-") && name.ends_with(".jsonl") {
            for line in std::fs::read_to_string(f.path())?.lines() {
                rows.push(serde_json::from_str::<serde_json::Value>(line)?);
            }
        }
    }
    let [row] = rows.as_slice() else {
        bail!("{} output rows, one expected: {rows:?}", rows.len());
    };
    let k = o.keys as i128;
    let squares: i128 = (0..o.keys)
        .map(|i| ((i % SQ_MOD) * (i % SQ_MOD)) as i128)
        .sum();
    let expect = [
        ("keys", k),
        ("total", k * o.passes as i128),
        ("lo", o.passes as i128),
        ("hi", o.passes as i128),
        ("ids", k * (k - 1) / 2),
        ("squares", squares),
    ];
    for (field, want) in expect {
        let got = row[field].as_i64().map(i128::from);
        if got != Some(want) {
            bail!("output {field} is {} instead of {want}: {row}", row[field]);
        }
    }
    let rows = o.keys;
    Ok(LargeStateReport {
        keys: o.keys,
        key_bytes: o.key_bytes,
        events,
        state_memory: o.state_memory.clone(),
        checkpoint_interval: o.checkpoint_interval.clone(),
        state_bytes,
        store_disk_bytes: store_disk,
        first: first_stats,
        restored_checkpoint,
        restore_ms,
        second: second_stats,
        keys_out: rows,
        samples,
    })
}
