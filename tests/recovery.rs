//! Restore behaviour: a corrupted newest checkpoint is skipped with a warning
//! and the previous one is used; a checkpoint without a manifest does not
//! exist; a checkpoint copied to another root restores unchanged; after a
//! crash and resume the summary counts exactly the job's own part files.

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::*;

fn spec(total: u64) -> String {
    format!(
        r#"
apiVersion: ferry.dev/v1
kind: Job
metadata: {{name: recovery-test}}
spec:
  parallelism: 1
  checkpointing: {{interval: 100ms, retained: 10}}
  source:
    generator:
      partitions: 2
      total: {total}
      rate: 40000
      eventTime: {{step: 10ms, maxOutOfOrderness: 1s}}
      fields:
        user: {{type: key, cardinality: 20, prefix: "u"}}
  operators:
    - key_by: user
    - window: {{tumbling: 1m, aggregate: {{clicks: count}}}}
  sink:
    file: {{path: ./out}}
"#
    )
}

const TOTAL: u64 = 120_000;

fn expected(w: &Workdir) -> Vec<(String, i64, i64)> {
    expected_counts(&generator(&w.spec), TOTAL, 0, 60_000)
}

/// Every expected window is in the output, and nothing else. (Windows a
/// skipped checkpoint committed may repeat, so rows are compared as a set.)
fn assert_every_window_committed(w: &Workdir) {
    let got: BTreeSet<_> = count_rows(&w.output_rows("out"), "user", "clicks")
        .into_iter()
        .collect();
    let want: BTreeSet<_> = expected(w).into_iter().collect();
    assert_eq!(got, want);
}

/// Runs the job until at least `n` checkpoints are complete, then SIGKILLs it.
fn run_until_checkpoints(w: &Workdir, n: usize) {
    let mut child = w.spawn_local(&[], "first.log");
    wait_until(Duration::from_secs(60), "checkpoints", || {
        w.complete_checkpoints().len() >= n
    });
    child.kill().expect("SIGKILL");
    child.wait().expect("reap");
}

fn flip_bytes(path: &Path) {
    let mut data = std::fs::read(path).expect("read state");
    assert!(!data.is_empty());
    let mid = data.len() / 2;
    data[mid] ^= 0xff;
    data[0] ^= 0x55;
    std::fs::write(path, data).expect("write state");
}

#[test]
fn corrupted_newest_checkpoint_falls_back_to_the_previous_one() {
    let w = Workdir::new(&spec(TOTAL));
    run_until_checkpoints(&w, 3);
    let cps = w.complete_checkpoints();
    let (&newest, dir) = cps.iter().next_back().unwrap();
    let previous = *cps.keys().rev().nth(1).unwrap();
    flip_bytes(&newest_state_file(dir, "window").0);

    let code = w.run_local(&[], "second.log", Duration::from_secs(120));
    let log = w.log("second.log");
    assert_eq!(code, 0, "{log}");
    assert!(
        log.contains(&format!("skipping checkpoint {newest}")) && log.contains("SHA-256"),
        "no corruption warning for checkpoint {newest}:\n{log}"
    );
    assert!(
        log.contains(&format!("from checkpoint {previous}")),
        "did not restore from checkpoint {previous}:\n{log}"
    );
    // Nothing is lost. (Windows committed by the skipped checkpoint may repeat.)
    assert_every_window_committed(&w);
}

#[test]
fn checkpoint_without_manifest_is_ignored() {
    let w = Workdir::new(&spec(TOTAL));
    run_until_checkpoints(&w, 3);
    let cps = w.complete_checkpoints();
    let (&newest, dir) = cps.iter().next_back().unwrap();
    let previous = *cps.keys().rev().nth(1).unwrap();
    std::fs::remove_file(dir.join("MANIFEST.json")).unwrap();

    let code = w.run_local(&[], "second.log", Duration::from_secs(120));
    let log = w.log("second.log");
    assert_eq!(code, 0, "{log}");
    assert!(
        log.contains(&format!("skipping checkpoint {newest}: no MANIFEST.json")),
        "{log}"
    );
    assert!(
        log.contains(&format!("from checkpoint {previous}")),
        "{log}"
    );
    let got = count_rows(&w.output_rows("out"), "user", "clicks");
    let want = expected(&w);
    // The manifest-less checkpoint never completed, so nothing was committed
    // from it: the output is exact.
    assert_eq!(got, want);
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &to.join(e.file_name()));
        } else {
            std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    }
}

#[test]
fn checkpoint_copied_to_another_root_restores_unchanged() {
    let w = Workdir::new(&spec(TOTAL));
    run_until_checkpoints(&w, 2);
    let cps = w.complete_checkpoints();
    let (_, dir) = cps.iter().next_back().unwrap();
    let elsewhere = tempfile::tempdir().unwrap();
    // A checkpoint and the shared state files (incremental checkpoints)
    // its paths lead to, relative to its job's directory: the job
    // directory is what moves.
    let copy = elsewhere.path().join("moved/job/checkpoints/latest");
    copy_dir(dir, &copy);
    let shared = dir.join("../../shared");
    assert!(shared.is_dir(), "incremental checkpoints are on by default");
    copy_dir(&shared, &elsewhere.path().join("moved/job/shared"));
    // The original storage root disappears entirely.
    std::fs::remove_dir_all(w.data_dir()).unwrap();

    let other_data = elsewhere.path().join("data");
    let code = w.run_local(
        &[
            "--from-savepoint",
            copy.to_str().unwrap(),
            "--data-dir",
            other_data.to_str().unwrap(),
        ],
        "second.log",
        Duration::from_secs(120),
    );
    let log = w.log("second.log");
    assert_eq!(code, 0, "{log}");
    assert!(log.contains("restored from checkpoint"), "{log}");
    let got = count_rows(&w.output_rows("out"), "user", "clicks");
    assert_eq!(got, expected(&w), "relocated restore is not exactly-once");
}

/// The job id in `ferry local`'s "job 'NAME' (ID) started" or "resuming job
/// 'NAME' (ID) from" line.
fn job_id_in(log: &str) -> Option<String> {
    log.lines()
        .filter(|l| l.starts_with("job '") || l.starts_with("resuming job '"))
        .find_map(|l| Some(l.split_once(" (")?.1.split_once(')')?.0.to_string()))
}

/// N of the summary's "(N part files of this run)".
fn part_files_in_summary(log: &str) -> usize {
    let line = log
        .lines()
        .find(|l| l.contains(" part files of this run)"))
        .unwrap_or_else(|| panic!("no part-file count in the summary:\n{log}"));
    let (_, n) = line.rsplit_once('(').expect("(N part files");
    n.split(' ').next().unwrap().parse().expect("a count")
}

/// The part files in `dir` whose names carry the job id `id`.
fn part_files_of(dir: &Path, id: &str) -> Vec<PathBuf> {
    let prefix = format!("part-{id}-");
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            let name = p.file_name().unwrap().to_string_lossy();
            name.starts_with(&prefix) && name.ends_with(".jsonl")
        })
        .collect()
}

/// Waits, if needed, until the current 65.536 s period of UUIDv7 job ids
/// has at least `need` left: jobs started within it share their first 8
/// hex digits (the short id).
fn wait_for_a_fresh_short_id_period(need: Duration) {
    const PERIOD_MS: u128 = 1 << 16;
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
    let left = PERIOD_MS - now.as_millis() % PERIOD_MS;
    if left < need.as_millis() {
        std::thread::sleep(Duration::from_millis(left as u64 + 50));
    }
}

/// A run, then a second run of the same job that is killed (SIGKILL) and
/// resumed, all within a minute: the runs' ids share the 8-digit short id,
/// and the summary of the resumed run counts exactly its own part files —
/// the ones carrying its full id, committed before and after the crash —
/// not the first run's (counting by the short id printed twice the real
/// number, which looked like duplicated output).
#[test]
fn summary_counts_only_the_runs_own_part_files_after_a_crash() {
    for attempt in 1..=2 {
        wait_for_a_fresh_short_id_period(Duration::from_secs(40));
        let w = Workdir::new(&spec(TOTAL));
        let out = w.path().join("out");

        let code = w.run_local(&[], "first.log", Duration::from_secs(120));
        let first_log = w.log("first.log");
        assert_eq!(code, 0, "{first_log}");
        let first = job_id_in(&first_log).expect("first run's id");
        let first_files = part_files_of(&out, &first).len();
        assert!(first_files > 0, "the first run committed nothing");
        assert_eq!(part_files_in_summary(&first_log), first_files);

        // A finished run is not resumed: `--fresh` starts a new run (new
        // id). Kill it once it has committed output and completed a
        // checkpoint.
        let mut child = w.spawn_local(&["--fresh"], "second.log");
        let mut second = String::new();
        wait_until(Duration::from_secs(60), "the second run's output", || {
            if second.is_empty() {
                second = job_id_in(&w.log("second.log")).unwrap_or_default();
            }
            !second.is_empty()
                && !part_files_of(&out, &second).is_empty()
                && std::fs::read_dir(w.data_dir().join("jobs").join(&second).join("checkpoints"))
                    .into_iter()
                    .flatten()
                    .flatten()
                    .any(|cp| cp.path().join("MANIFEST.json").exists())
        });
        child.kill().expect("SIGKILL");
        child.wait().expect("reap");
        assert_ne!(first, second, "{}", w.log("second.log"));

        let code = w.run_local(&[], "third.log", Duration::from_secs(120));
        let log = w.log("third.log");
        assert_eq!(code, 0, "{log}");
        assert!(
            log.contains(&format!("resuming job 'recovery-test' ({second})")),
            "did not resume the killed run:\n{log}"
        );
        if first[..8] != second[..8] {
            // The runs straddled a short-id period: retry in the next one.
            eprintln!("attempt {attempt}: {first} and {second} differ in the short id; again");
            continue;
        }

        let own = part_files_of(&out, &second);
        assert_eq!(
            part_files_in_summary(&log),
            own.len(),
            "the summary's count is not the run's part files ({} of the other run beside them):\n{log}",
            first_files
        );
        assert_eq!(part_files_of(&out, &first).len(), first_files);
        // And the resumed run's own files hold its output exactly once.
        let only_own = tempfile::tempdir().unwrap();
        for f in &own {
            std::fs::copy(f, only_own.path().join(f.file_name().unwrap())).unwrap();
        }
        let got = count_rows(&read_rows(only_own.path()), "user", "clicks");
        assert_eq!(got, expected(&w), "the resumed run's output is not exact");
        return;
    }
    panic!("two attempts straddled a short-id period; the machine is too slow for this test");
}

/// Rewrites a checkpoint file and its manifest entry so that the hashes
/// verify but the bytes are not state the runtime can decode.
fn replace_verified(dir: &Path, file: &str, data: &[u8]) {
    let path = dir.join("MANIFEST.json");
    let mut m: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    for f in m["files"].as_array_mut().unwrap() {
        if f["path"] == file {
            std::fs::write(listed_file(dir, f), data).unwrap();
            f["size"] = data.len().into();
            f["sha256"] = ferry_core::storage::sha256_hex(data).into();
        }
    }
    std::fs::write(&path, serde_json::to_vec_pretty(&m).unwrap()).unwrap();
}

#[test]
fn undecodable_state_and_another_jobs_checkpoint_are_skipped() {
    let w = Workdir::new(&spec(TOTAL));
    run_until_checkpoints(&w, 4);
    let cps = w.complete_checkpoints();
    let ids: Vec<u64> = cps.keys().rev().take(3).copied().collect();
    // Newest: state that verifies but does not decode.
    let (_, newest_window) = newest_state_file(&cps[&ids[0]], "window");
    replace_verified(&cps[&ids[0]], &newest_window, b"\xff\xff\xff\xffnot state");
    // Next: a manifest of another job (as if copied into this directory).
    let path = cps[&ids[1]].join("MANIFEST.json");
    let text = std::fs::read_to_string(&path).unwrap();
    let mut m: serde_json::Value = serde_json::from_str(&text).unwrap();
    m["job_id"] = "0000000000000000000000000000abcd".into();
    m["job_name"] = "someone-else".into();
    std::fs::write(&path, serde_json::to_vec_pretty(&m).unwrap()).unwrap();

    let code = w.run_local(&[], "second.log", Duration::from_secs(120));
    let log = w.log("second.log");
    assert_eq!(code, 0, "{log}");
    assert!(
        log.contains(&format!(
            "skipping checkpoint {}: its state cannot be decoded",
            ids[0]
        )),
        "{log}"
    );
    assert!(
        log.contains(&format!(
            "skipping checkpoint {}: its manifest belongs to job 'someone-else'",
            ids[1]
        )),
        "{log}"
    );
    assert!(
        log.contains(&format!("from checkpoint {}", ids[2])),
        "{log}"
    );
    assert_eq!(log.matches("restored from checkpoint").count(), 1, "{log}");
    assert_every_window_committed(&w);
}

#[test]
fn a_job_whose_every_checkpoint_is_damaged_does_not_silently_start_over() {
    let w = Workdir::new(&spec(TOTAL));
    run_until_checkpoints(&w, 2);
    let cps = w.complete_checkpoints();
    // Each checkpoint's newest window state (once each: checkpoints of a
    // chain share its older files).
    let newest: BTreeSet<PathBuf> = cps
        .values()
        .map(|dir| newest_state_file(dir, "window").0.canonicalize().unwrap())
        .collect();
    assert_eq!(newest.len(), cps.len());
    for file in newest {
        flip_bytes(&file);
    }
    let code = w.run_local(&[], "second.log", Duration::from_secs(120));
    let log = w.log("second.log");
    assert_eq!(code, 2, "{log}");
    assert!(
        log.contains("none can be restored") && log.contains("--fresh"),
        "{log}"
    );
    assert!(!log.contains("started:"), "a job was started:\n{log}");

    let code = w.run_local(&["--fresh"], "third.log", Duration::from_secs(120));
    assert_eq!(code, 0, "{}", w.log("third.log"));
}

#[test]
fn a_finished_job_is_not_run_a_second_time_without_fresh() {
    let w = Workdir::new(&spec(20_000));
    let code = w.run_local(&[], "first.log", Duration::from_secs(120));
    assert_eq!(code, 0, "{}", w.log("first.log"));
    let rows = w.output_rows("out").len();
    assert!(rows > 0);

    let code = w.run_local(&[], "second.log", Duration::from_secs(120));
    let log = w.log("second.log");
    assert_eq!(code, 2, "{log}");
    assert!(
        log.contains("already ran to the end") && log.contains("--fresh"),
        "{log}"
    );
    assert_eq!(w.output_rows("out").len(), rows, "output was written again");

    let code = w.run_local(&["--fresh"], "third.log", Duration::from_secs(120));
    assert_eq!(code, 0, "{}", w.log("third.log"));
    assert_eq!(
        w.output_rows("out").len(),
        2 * rows,
        "--fresh runs it again"
    );
}

/// Incremental checkpoints, the default: after the first, a checkpoint
/// writes a small delta instead of the whole state and lists the chain it
/// builds on; a run killed mid-way resumes from such a chain and commits
/// exactly the expected output; afterwards the job's `shared/` folder
/// holds exactly the files its retained checkpoints list.
#[test]
fn incremental_checkpoints_write_deltas_and_a_chain_restores_exactly() {
    // 10 s of input: the kill comes long before the end.
    const TOTAL: u64 = 600_000;
    let spec = spec(TOTAL)
        .replace("cardinality: 20", "cardinality: 50000")
        .replace("rate: 40000", "rate: 60000")
        .replace("tumbling: 1m", "tumbling: 1h")
        .replace("retained: 10", "retained: 3");
    let w = Workdir::new(&spec);
    let mut child = w.spawn_local(&[], "first.log");
    // Killed once a checkpoint lists a chain of a full snapshot and
    // deltas, and wrote only a small part of the state itself (once every
    // key has been seen, a delta holds only the keys that changed).
    let mut chained = None;
    wait_until(
        Duration::from_secs(60),
        "a checkpoint with small deltas",
        || {
            chained = w.complete_checkpoints().into_iter().find_map(|(n, dir)| {
                let text = std::fs::read_to_string(dir.join("MANIFEST.json")).ok()?;
                let m: ferry_core::manifest::Manifest = serde_json::from_str(&text).ok()?;
                let chain = m.chains("window").values().any(|c| c.len() >= 3);
                (chain && m.written_size() * 4 < m.total_size()).then_some((n, m))
            });
            chained.is_some()
        },
    );
    child.kill().expect("SIGKILL");
    child.wait().expect("reap");
    let (n, m) = chained.unwrap();
    assert_eq!(
        m.format,
        ferry_core::manifest::MANIFEST_FORMAT_SHARED,
        "{n}"
    );
    assert!(
        m.files
            .iter()
            .filter(|f| f.operator == "window")
            .all(|f| f.shared)
    );

    let code = w.run_local(&[], "second.log", Duration::from_secs(120));
    let log = w.log("second.log");
    assert_eq!(code, 0, "{log}");
    assert!(log.contains("restored from checkpoint"), "{log}");
    let want = expected_counts(&generator(&w.spec), TOTAL, 0, 3_600_000);
    let got = count_rows(&w.output_rows("out"), "user", "clicks");
    assert_counts_eq(&got, &want, "resumed from a chain");

    // Retention kept the shared folder to what the kept checkpoints list.
    let cps = w.complete_checkpoints();
    let job_dir = cps.values().next().unwrap().join("../..");
    let mut listed = BTreeSet::new();
    for dir in cps.values() {
        let text = std::fs::read_to_string(dir.join("MANIFEST.json")).unwrap();
        let m: ferry_core::manifest::Manifest = serde_json::from_str(&text).unwrap();
        listed.extend(m.files.into_iter().filter(|f| f.shared).map(|f| f.path));
    }
    let on_disk: BTreeSet<String> = std::fs::read_dir(job_dir.join("shared"))
        .unwrap()
        .flatten()
        .map(|e| format!("shared/{}", e.file_name().to_string_lossy()))
        .collect();
    assert!(!listed.is_empty());
    assert_eq!(on_disk, listed, "shared files besides the listed ones");
}

/// With `--state-memory`, window state lives in the local state store
/// beyond a bounded cache: a job whose keys do not fit in the cache writes
/// them back and reads them from the store, checkpoints in chains of a full
/// snapshot and deltas, and after a SIGKILL resumes with exactly the
/// expected output (the store is wiped and rebuilt from the checkpoint).
#[test]
fn window_state_beyond_memory_checkpoints_and_restores_exactly() {
    const TOTAL: u64 = 600_000;
    // 200,000 keys of ~120 bytes of cache each: about 24 MB, three times
    // what the caches may hold under a 16 MiB bound.
    let spec = spec(TOTAL)
        .replace("cardinality: 20", "cardinality: 200000")
        .replace("rate: 40000", "rate: 60000")
        .replace("tumbling: 1m", "tumbling: 1h")
        .replace("interval: 100ms", "interval: 500ms")
        .replace("retained: 10", "retained: 3");
    let w = Workdir::new(&spec);
    let args = ["--state-memory", "16MiB"];
    let mut child = w.spawn_local(&args, "first.log");
    let mut chained = None;
    wait_until(
        Duration::from_secs(60),
        "a checkpoint with deltas after the caches filled",
        || {
            if !w
                .log("first.log")
                .contains("window caches reached their bound")
            {
                return false;
            }
            chained = w.complete_checkpoints().into_iter().find_map(|(n, dir)| {
                let text = std::fs::read_to_string(dir.join("MANIFEST.json")).ok()?;
                let m: ferry_core::manifest::Manifest = serde_json::from_str(&text).ok()?;
                m.chains("window")
                    .values()
                    .any(|c| c.len() >= 2)
                    .then_some(n)
            });
            chained.is_some()
        },
    );
    child.kill().expect("SIGKILL");
    child.wait().expect("reap");
    let store = w.path().join("ferry-data/state");
    assert!(
        store.join("db/keyspaces").is_dir(),
        "no state store in {}",
        store.display()
    );

    let code = w.run_local(&args, "second.log", Duration::from_secs(120));
    let log = w.log("second.log");
    assert_eq!(code, 0, "{log}");
    assert!(log.contains("restored from checkpoint"), "{log}");
    assert!(log.contains("window caches reached their bound"), "{log}");
    let want = expected_counts(&generator(&w.spec), TOTAL, 0, 3_600_000);
    let got = count_rows(&w.output_rows("out"), "user", "clicks");
    assert!(want.len() > 150_000, "{}", want.len());
    assert_counts_eq(&got, &want, "resumed with window state in the store");
}
