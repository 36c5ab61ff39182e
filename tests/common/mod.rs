//! Fixtures shared by the integration tests: running the real `ferry`
//! binary in a temp directory, reading committed output, and computing
//! expected window results independently of the runtime. Submodules hold
//! the fixtures of some test files: [`ha`] (regions of JobManager and
//! TaskManager processes), [`s3`] (a moto S3 server), [`clicks`]
//! (generated file inputs), [`tools`] (external tools).
//!
//! Every test binary that says `mod common;` compiles all of it, using only
//! part: hence `allow(dead_code)` here, for every submodule.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ferry_core::spec::{JobSpec, SourceSpec, parse_and_validate};
use ferry_taskmanager::source::generator::GeneratorModel;

pub mod clicks;
pub mod ha;
pub mod jwt;
pub mod rest;
pub mod s3;
pub mod tools;

/// Path of the `ferry` binary under test.
pub fn ferry_bin() -> &'static str {
    env!("CARGO_BIN_EXE_ferry")
}

/// A working directory with a job spec, where `ferry local` runs.
pub struct Workdir {
    pub dir: tempfile::TempDir,
    pub spec_path: PathBuf,
    pub spec: JobSpec,
}

impl Workdir {
    pub fn new(yaml: &str) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let spec_path = dir.path().join("job.yaml");
        std::fs::write(&spec_path, yaml).expect("write spec");
        let spec = parse_and_validate(yaml).unwrap_or_else(|e| panic!("test spec invalid:\n{e}"));
        Self {
            dir,
            spec_path,
            spec,
        }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn data_dir(&self) -> PathBuf {
        self.path().join("ferry-data")
    }

    /// `ferry local job.yaml` with extra args, stderr appended to `log`.
    pub fn spawn_local(&self, extra: &[&str], log: &str) -> Child {
        self.spawn_local_env(extra, log, &[])
    }

    /// [`Self::spawn_local`] with extra environment variables.
    pub fn spawn_local_env(&self, extra: &[&str], log: &str, env: &[(&str, &str)]) -> Child {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.path().join(log))
            .expect("log file");
        Command::new(ferry_bin())
            .current_dir(self.path())
            .arg("local")
            .arg(&self.spec_path)
            .args(["--listen", "127.0.0.1:0", "--no-progress"])
            .args(extra)
            .env("FERRY_LOG", "info")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn ferry local")
    }

    /// Runs `ferry local` to completion (bounded wait) and returns its exit code.
    pub fn run_local(&self, extra: &[&str], log: &str, limit: Duration) -> i32 {
        let mut child = self.spawn_local(extra, log);
        wait_exit(&mut child, limit)
    }

    pub fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self.path().join(name)).unwrap_or_default()
    }

    /// Every committed output row under `out_rel`, as sorted JSON strings.
    pub fn output_rows(&self, out_rel: &str) -> Vec<serde_json::Value> {
        read_rows(&self.path().join(out_rel))
    }

    /// The manifest of the newest complete checkpoint, with its number.
    pub fn newest_manifest(&self) -> Option<(u64, serde_json::Value)> {
        let (n, dir) = self.complete_checkpoints().into_iter().next_back()?;
        let text = std::fs::read_to_string(dir.join("MANIFEST.json")).ok()?;
        Some((n, serde_json::from_str(&text).expect("manifest is JSON")))
    }

    /// Paths of every checkpoint directory that has a manifest, by number.
    pub fn complete_checkpoints(&self) -> BTreeMap<u64, PathBuf> {
        complete_checkpoints_under(&self.data_dir())
    }
}

/// Where a file a checkpoint's manifest lists (`entry`) lies on disk: in
/// the checkpoint's directory, or — a shared file of incremental
/// checkpoints — in its job's `shared/` folder, two levels up.
pub fn listed_file(checkpoint_dir: &Path, entry: &serde_json::Value) -> PathBuf {
    let path = entry["path"].as_str().expect("a file entry has a path");
    if entry["shared"] == true {
        checkpoint_dir.join("../..").join(path)
    } else {
        checkpoint_dir.join(path)
    }
}

/// The newest file of subtask 0 of `operator`'s state in the checkpoint at
/// `dir` — its only file, or the last delta of its chain — as (where it
/// lies, the path its manifest lists).
pub fn newest_state_file(dir: &Path, operator: &str) -> (PathBuf, String) {
    let text = std::fs::read_to_string(dir.join("MANIFEST.json")).expect("a manifest");
    let m: serde_json::Value = serde_json::from_str(&text).expect("manifest is JSON");
    let entry = m["files"]
        .as_array()
        .expect("files")
        .iter()
        .filter(|f| f["operator"] == operator && f["subtask"] == 0)
        .max_by_key(|f| f["chain"].as_u64().unwrap_or(0))
        .unwrap_or_else(|| panic!("no state of '{operator}' in {}", dir.display()));
    (
        listed_file(dir, entry),
        entry["path"].as_str().unwrap().to_string(),
    )
}

/// Asserts that `rows` hold field `field` = 0, 1, …, `n` − 1, each exactly
/// once (a generator's `sequence`): nothing lost, nothing repeated.
pub fn assert_sequence_exactly_once(rows: &[serde_json::Value], field: &str, n: i64) {
    let mut seen: Vec<i64> = rows
        .iter()
        .map(|r| {
            r[field]
                .as_i64()
                .unwrap_or_else(|| panic!("no {field} in {r}"))
        })
        .collect();
    seen.sort_unstable();
    assert_eq!(seen.len() as i64, n, "records lost or repeated");
    assert_eq!(seen, (0..n).collect::<Vec<i64>>());
}

/// Complete checkpoints (with a manifest) of every job under checkpoint
/// root `root`, by number.
pub fn complete_checkpoints_under(root: &Path) -> BTreeMap<u64, PathBuf> {
    let mut out = BTreeMap::new();
    for job in std::fs::read_dir(root.join("jobs"))
        .into_iter()
        .flatten()
        .flatten()
    {
        for cp in std::fs::read_dir(job.path().join("checkpoints"))
            .into_iter()
            .flatten()
            .flatten()
        {
            if let Ok(n) = cp.file_name().to_string_lossy().parse::<u64>()
                && cp.path().join("MANIFEST.json").exists()
            {
                out.insert(n, cp.path());
            }
        }
    }
    out
}

/// The random source of a crash test's kill schedule, seeded from
/// `FERRY_TEST_SEED` when set (the seed is printed, so a failure replays).
pub fn kill_schedule_rng() -> rand::rngs::StdRng {
    use rand::{Rng, SeedableRng};
    let seed: u64 = std::env::var("FERRY_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| rand::rng().random());
    eprintln!("kill schedule seed: {seed} (set FERRY_TEST_SEED to replay)");
    rand::rngs::StdRng::seed_from_u64(seed)
}

/// Waits for a child to exit within `limit`, killing it (and failing) if not.
pub fn wait_exit(child: &mut Child, limit: Duration) -> i32 {
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            return status.code().unwrap_or(-1);
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            panic!("ferry did not exit within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Polls `cond` every 20 ms until it holds or `limit` passes.
pub fn wait_until(limit: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(
            start.elapsed() < limit,
            "timed out after {limit:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Files in `dir` that a crash left half-written (staging files of the
/// local object store).
pub fn stray_files(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().to_string())
        .filter(|n| n.contains('#'))
        .collect()
}

/// All JSON lines of every file in `dir`, sorted by their text.
pub fn read_rows(dir: &Path) -> Vec<serde_json::Value> {
    let mut lines = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        // What a consumer reads: the committed part files.
        if !name.starts_with("part-") || !name.ends_with(".jsonl") {
            continue;
        }
        let text = std::fs::read_to_string(e.path()).expect("read part file");
        for l in text.lines().filter(|l| !l.trim().is_empty()) {
            lines.push(l.to_string());
        }
    }
    lines.sort();
    lines
        .iter()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("bad output line {l}: {e}")))
        .collect()
}

/// The generator model of a spec, for computing expected results.
pub fn generator(spec: &JobSpec) -> GeneratorModel {
    let flow = ferry_core::spec::output_schemas(spec).expect("valid");
    let SourceSpec::Generator(g) = &spec.spec.source else {
        panic!("not a generator spec")
    };
    GeneratorModel::new(g, spec.spec.parallelism, &flow.source).expect("model")
}

/// Parses an RFC 3339 output timestamp.
pub fn ts(v: &serde_json::Value) -> i64 {
    ferry_core::value::parse_ts(v.as_str().expect("timestamp string")).expect("timestamp")
}

/// Normalizes output rows of a count window into (key, window start,
/// count), sorted; repeated rows stay (comparing with the expected rows
/// finds them). Every row must hold exactly the key, `window_start`,
/// `window_end` and the count, with the same window length throughout:
/// a row with a damaged or extra column fails here rather than passing as
/// its key and count.
pub fn count_rows(rows: &[serde_json::Value], key: &str, count: &str) -> Vec<(String, i64, i64)> {
    let mut length = None;
    let mut v: Vec<(String, i64, i64)> = rows
        .iter()
        .map(|r| {
            let fields: std::collections::BTreeSet<&str> = r
                .as_object()
                .unwrap_or_else(|| panic!("not an object: {r}"))
                .keys()
                .map(String::as_str)
                .collect();
            let want: std::collections::BTreeSet<&str> =
                [key, "window_start", "window_end", count].into();
            assert_eq!(fields, want, "columns of {r}");
            let (start, end) = (ts(&r["window_start"]), ts(&r["window_end"]));
            assert!(end > start, "window_end not after window_start: {r}");
            assert_eq!(
                *length.get_or_insert(end - start),
                end - start,
                "windows of different lengths: {r}"
            );
            (r[key].to_string(), start, r[count].as_i64().expect("count"))
        })
        .collect();
    v.sort();
    v
}

/// Expected output of a keyed tumbling count over generator records
/// `0..total`: one `(key as JSON, window start, count)` per window and key,
/// sorted — computed straight from the generator model, not the runtime.
pub fn expected_counts(
    model: &GeneratorModel,
    total: u64,
    key_field: usize,
    window_ms: i64,
) -> Vec<(String, i64, i64)> {
    use ferry_core::value::Value;
    let mut m: BTreeMap<(String, i64), i64> = BTreeMap::new();
    for i in 0..total {
        let r = model.record_at(i);
        let Some(Value::Ts(t)) = r.last() else {
            panic!("generator records end with their event time: {r:?}")
        };
        let key = r[key_field].to_json().to_string();
        *m.entry((key, t.div_euclid(window_ms) * window_ms))
            .or_default() += 1;
    }
    m.into_iter().map(|((k, s), c)| (k, s, c)).collect()
}

/// Asserts two sorted `(key, window start, count)` lists are equal; on a
/// difference it says how many windows are missing, extra or miscounted and
/// shows the first few, instead of printing both lists whole.
pub fn assert_counts_eq(got: &[(String, i64, i64)], want: &[(String, i64, i64)], context: &str) {
    if got == want {
        return;
    }
    let g: BTreeMap<(&str, i64), i64> =
        got.iter().map(|(k, s, c)| ((k.as_str(), *s), *c)).collect();
    let w: BTreeMap<(&str, i64), i64> = want
        .iter()
        .map(|(k, s, c)| ((k.as_str(), *s), *c))
        .collect();
    let missing: Vec<_> = w.iter().filter(|(k, _)| !g.contains_key(*k)).collect();
    let extra: Vec<_> = g.iter().filter(|(k, _)| !w.contains_key(*k)).collect();
    let differ: Vec<_> = w
        .iter()
        .filter_map(|(k, c)| g.get(k).filter(|gc| *gc != c).map(|gc| (k, *c, *gc)))
        .collect();
    panic!(
        "{context}: output differs from the expected counts ({} rows, {} expected): \
         {} windows missing (first: {:?}), {} unexpected (first: {:?}), {} with other counts (first, want/got: {:?}); duplicate rows: {}",
        got.len(),
        want.len(),
        missing.len(),
        missing.iter().take(3).collect::<Vec<_>>(),
        extra.len(),
        extra.iter().take(3).collect::<Vec<_>>(),
        differ.len(),
        differ.iter().take(3).collect::<Vec<_>>(),
        got.len() - g.len(),
    );
}

/// Longest a CLI command a test runs may take.
pub const COMMAND_LIMIT: Duration = Duration::from_secs(300);

/// [`Command::output`] with a bound: a command still running after
/// `limit` is killed and the test fails, instead of hanging the suite.
pub trait OutputWithin {
    fn output_within(&mut self, limit: Duration) -> std::io::Result<std::process::Output>;
}

impl OutputWithin for Command {
    fn output_within(&mut self, limit: Duration) -> std::io::Result<std::process::Output> {
        use std::io::Read;
        let mut child = self
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?;
        let mut out = child.stdout.take().expect("piped stdout");
        let mut err = child.stderr.take().expect("piped stderr");
        let out = std::thread::spawn(move || {
            let mut b = Vec::new();
            let _ = out.read_to_end(&mut b);
            b
        });
        let err = std::thread::spawn(move || {
            let mut b = Vec::new();
            let _ = err.read_to_end(&mut b);
            b
        });
        let start = Instant::now();
        let status = loop {
            if let Some(s) = child.try_wait()? {
                break s;
            }
            if start.elapsed() > limit {
                let _ = child.kill();
                let _ = child.wait();
                panic!("{self:?} did not finish within {limit:?}");
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        Ok(std::process::Output {
            status,
            stdout: out.join().unwrap_or_default(),
            stderr: err.join().unwrap_or_default(),
        })
    }
}
