//! `ferry job ...` against a real `ferry local` process serving the REST
//! API on a free port: exit codes, table and JSON output, error messages,
//! and failover over a `--url` list.

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ferry_jobmanager::api::{CancelResponse, CheckpointList};
use ferry_jobmanager::{JobInfo, JobState};

/// Bound on `ferry local` printing its API address.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// Bound on one CLI invocation.
const CLI_TIMEOUT: Duration = Duration::from_secs(60);
/// Bound on a job reaching a state.
const JOB_TIMEOUT: Duration = Duration::from_secs(60);
const POLL_EVERY: Duration = Duration::from_millis(50);
const GENERATOR_TOTAL: u64 = 20_000;
const READY_LINE: &str = "REST API listening on ";

/// `ferry local` with no job, serving the API on a free port; killed on drop.
struct FerryLocal {
    child: Child,
    url: String,
    dir: tempfile::TempDir,
    stderr: Arc<Mutex<String>>,
}

impl FerryLocal {
    fn spawn() -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut child = Command::new(env!("CARGO_BIN_EXE_ferry"))
            .args(["local", "--listen", "127.0.0.1:0", "--no-progress"])
            .arg("--data-dir")
            .arg(dir.path().join("default-data"))
            .current_dir(dir.path())
            .env("FERRY_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn ferry local");
        let stderr = Arc::new(Mutex::new(String::new()));
        let (tx, rx) = mpsc::channel();
        let pipe = child.stderr.take().unwrap();
        let log = stderr.clone();
        // Reads stderr to the end, so the pipe never fills; reports the URL.
        std::thread::spawn(move || {
            for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                if let Some(url) = line.trim().strip_prefix(READY_LINE) {
                    let _ = tx.send(url.to_string());
                }
                let mut log = log.lock().unwrap();
                log.push_str(&line);
                log.push('\n');
            }
        });
        let url = match rx.recv_timeout(START_TIMEOUT) {
            Ok(url) => url,
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "ferry local printed no '{READY_LINE}...' within {START_TIMEOUT:?}; stderr:\n{}",
                    stderr.lock().unwrap()
                );
            }
        };
        Self {
            child,
            url,
            dir,
            stderr,
        }
    }

    /// Writes a job spec into the temp dir: checkpoints and output inside it.
    fn spec_file(&self, name: &str, generator: &str) -> PathBuf {
        let tmp = self.dir.path().display();
        let text = format!(
            r#"apiVersion: ferry.dev/v1
kind: Job
metadata: {{name: {name}}}
spec:
  parallelism: 1
  checkpointing: {{interval: 200ms, storage: "{tmp}/data"}}
  source:
    generator:
      {generator}
      eventTime: {{step: 10ms}}
      fields:
        user: {{type: key, cardinality: 10, prefix: "u"}}
  operators:
    - key_by: user
    - window: {{tumbling: 1m, aggregate: {{clicks: count}}}}
  sink:
    file: {{path: "{tmp}/out/{name}"}}
"#
        );
        let path = self.dir.path().join(format!("{name}.yaml"));
        std::fs::write(&path, text).unwrap();
        path
    }

    /// Runs `ferry job ARGS --url <this server>`.
    fn job(&self, args: &[&str]) -> CliRun {
        let mut all: Vec<&str> = args.to_vec();
        all.extend(["--url", &self.url]);
        ferry_job(&all, &[])
    }

    /// Runs `ferry job ARGS -o json` and parses stdout.
    fn job_json<T: serde::de::DeserializeOwned>(&self, args: &[&str]) -> T {
        let mut all: Vec<&str> = args.to_vec();
        all.extend(["-o", "json"]);
        let run = self.job(&all);
        run.assert_code(0);
        serde_json::from_str(&run.stdout)
            .unwrap_or_else(|e| panic!("stdout is not the expected JSON ({e}):\n{}", run.stdout))
    }

    /// Polls `ferry job get` until `pred` holds; fails after [`JOB_TIMEOUT`].
    fn wait_until(&self, id: &str, what: &str, pred: impl Fn(&JobInfo) -> bool) -> JobInfo {
        let deadline = Instant::now() + JOB_TIMEOUT;
        loop {
            let info: JobInfo = self.job_json(&["get", id]);
            if pred(&info) {
                return info;
            }
            assert_ne!(
                info.state,
                JobState::Failed,
                "job failed: {:?}",
                info.failure
            );
            assert!(
                Instant::now() < deadline,
                "job {id} not {what} after {JOB_TIMEOUT:?}: {info:?}\nserver stderr:\n{}",
                self.stderr.lock().unwrap()
            );
            std::thread::sleep(POLL_EVERY);
        }
    }
}

impl Drop for FerryLocal {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One finished CLI invocation.
struct CliRun {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

impl CliRun {
    fn assert_code(&self, code: i32) {
        assert_eq!(
            self.code,
            Some(code),
            "exit code\nstdout:\n{}\nstderr:\n{}",
            self.stdout,
            self.stderr
        );
    }
}

/// Runs `ferry job ARGS` with extra env vars, bounded by [`CLI_TIMEOUT`].
fn ferry_job(args: &[&str], env: &[(&str, &str)]) -> CliRun {
    let mut child = Command::new(env!("CARGO_BIN_EXE_ferry"))
        .arg("job")
        .args(args)
        .env_remove("FERRY_URL")
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn ferry job");
    let drain = |mut r: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut s = String::new();
            let _ = r.read_to_string(&mut s);
            s
        })
    };
    let out = drain(Box::new(child.stdout.take().unwrap()));
    let err = drain(Box::new(child.stderr.take().unwrap()));
    let deadline = Instant::now() + CLI_TIMEOUT;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "`ferry job {}` did not finish within {CLI_TIMEOUT:?}",
                args.join(" ")
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    CliRun {
        code: status.code(),
        stdout: out.join().unwrap(),
        stderr: err.join().unwrap(),
    }
}

/// A loopback URL nothing listens on (a port no other test of this binary
/// is given).
fn dead_url() -> String {
    format!("http://127.0.0.1:{}", ferry_testkit::free_port())
}

fn local_path(url: &str) -> &Path {
    Path::new(url.strip_prefix("file://").unwrap_or(url))
}

#[test]
fn bounded_job_through_submit_list_get_and_checkpoints() {
    let s = FerryLocal::spawn();
    let file = s.spec_file("cli-test", &format!("total: {GENERATOR_TOTAL}"));
    let file = file.to_str().unwrap();

    let run = s.job(&["submit", file]);
    run.assert_code(0);
    assert!(
        run.stdout.contains("submitted job 'cli-test'"),
        "{}",
        run.stdout
    );

    let listed: ferry_jobmanager::api::JobList = s.job_json(&["list"]);
    let id = listed.jobs[0].id.to_string();
    let done = s.wait_until(&id, "FINISHED", |j| j.state == JobState::Finished);
    assert_eq!(done.records_in, GENERATOR_TOTAL);

    // The table: a header with every column, and the job's row under it.
    let run = s.job(&["list"]);
    run.assert_code(0);
    let mut lines = run.stdout.lines();
    let header = lines.next().unwrap();
    let columns = [
        "ID",
        "NAME",
        "STATE",
        "PARALLELISM",
        "RECORDS IN",
        "RECORDS OUT",
        "LAST CHECKPOINT",
        "AGE",
    ];
    let mut at = 0;
    for c in columns {
        let pos = header[at..]
            .find(c)
            .unwrap_or_else(|| panic!("{c} not in {header}"));
        at += pos + c.len();
    }
    let row = lines.next().unwrap();
    assert!(row.starts_with(&id[..8]), "{row}");
    assert!(!row.contains(&id), "full id in the table: {row}");
    for cell in ["cli-test", "FINISHED", &GENERATOR_TOTAL.to_string()] {
        assert!(row.contains(cell), "{cell} not in {row}");
    }
    // Aligned: the STATE column starts at the same offset in header and row.
    let state_col = header.find("STATE").unwrap();
    assert_eq!(&row[state_col..state_col + "FINISHED".len()], "FINISHED");

    // `get` by name prints a key: value block.
    let run = s.job(&["get", "cli-test"]);
    run.assert_code(0);
    for line in ["ID:", "State:", "Records in:", "Last checkpoint:"] {
        let l = run
            .stdout
            .lines()
            .find(|l| l.starts_with(line))
            .unwrap_or_else(|| panic!("no {line} in\n{}", run.stdout));
        if line == "ID:" {
            assert!(l.ends_with(&id), "{l}");
        }
        if line == "State:" {
            assert!(l.ends_with("FINISHED"), "{l}");
        }
    }

    let cps: CheckpointList = s.job_json(&["checkpoints", &id[..8]]);
    let newest = cps.checkpoints.first().expect("the final checkpoint");
    assert!(newest.finished);
    assert!(local_path(&newest.path).join("MANIFEST.json").is_file());
    let run = s.job(&["checkpoints", &id]);
    run.assert_code(0);
    assert!(run.stdout.starts_with("ID"), "{}", run.stdout);
    assert!(run.stdout.contains("(final)"), "{}", run.stdout);
}

#[test]
fn savepoint_and_cancel_with_savepoint_print_paths_on_disk() {
    let s = FerryLocal::spawn();
    let file = s.spec_file("cli-endless", "rate: 1000");
    let job: JobInfo = s.job_json(&["submit", file.to_str().unwrap()]);
    let id = job.id.to_string();
    s.wait_until(&id, "RUNNING", |j| {
        j.state == JobState::Running && j.records_in > 0
    });

    let sp: ferry_jobmanager::SavepointInfo = s.job_json(&["savepoint", &id]);
    assert!(local_path(&sp.path).join("MANIFEST.json").is_file());

    let run = s.job(&["cancel", &id, "--savepoint"]);
    run.assert_code(0);
    let path = run
        .stdout
        .lines()
        .find_map(|l| {
            l.split_once(" written to ")
                .map(|(_, p)| p.trim().to_string())
        })
        .unwrap_or_else(|| panic!("no savepoint path in\n{}", run.stdout));
    assert!(local_path(&path).join("MANIFEST.json").is_file(), "{path}");
    assert!(run.stdout.contains("--from-savepoint"), "{}", run.stdout);
    assert!(run.stdout.contains("CANCELLED"), "{}", run.stdout);

    // A second cancel is refused: API error, exit 1.
    let run = s.job(&["cancel", &id]);
    run.assert_code(1);
    assert!(run.stderr.starts_with("error: "), "{}", run.stderr);
}

#[test]
fn cancel_json_output_is_the_server_answer() {
    let s = FerryLocal::spawn();
    let file = s.spec_file("cli-json", "rate: 1000");
    let job: JobInfo = s.job_json(&["submit", file.to_str().unwrap()]);
    let id = job.id.to_string();
    s.wait_until(&id, "RUNNING", |j| j.state == JobState::Running);
    let res: CancelResponse = s.job_json(&["cancel", &id]);
    assert_eq!(res.job.state, JobState::Cancelled);
    assert!(res.savepoint.is_none());
}

#[test]
fn invalid_spec_exits_2_listing_every_problem() {
    let s = FerryLocal::spawn();
    let file = s.spec_file("cli-bad", "total: 10");
    let text = std::fs::read_to_string(&file)
        .unwrap()
        .replace("parallelism: 1", "parallelism: 0")
        .replace("key_by: user", "key_by: nosuch");
    std::fs::write(&file, text).unwrap();
    let run = s.job(&["submit", file.to_str().unwrap()]);
    run.assert_code(2);
    let mut lines = run.stderr.lines();
    assert!(
        lines.next().unwrap().starts_with("error: "),
        "{}",
        run.stderr
    );
    let details: Vec<&str> = lines.filter(|l| l.starts_with("  - ")).collect();
    assert!(
        details.iter().any(|l| l.contains("spec.parallelism")),
        "{}",
        run.stderr
    );
    assert!(
        details
            .iter()
            .any(|l| l.contains("spec.operators[0].key_by")),
        "{}",
        run.stderr
    );
}

#[test]
fn unknown_job_exits_1_with_not_found() {
    let s = FerryLocal::spawn();
    for cmd in ["get", "cancel", "savepoint", "checkpoints"] {
        let run = s.job(&[cmd, "no-such-job"]);
        run.assert_code(1);
        assert!(
            run.stderr.starts_with("error: job 'no-such-job' not found"),
            "{cmd}: {}",
            run.stderr
        );
    }
}

#[test]
fn connection_refused_names_the_url_and_suggests_ferry_local() {
    let url = dead_url();
    let run = ferry_job(&["list", "--url", &url], &[]);
    run.assert_code(1);
    assert!(run.stderr.starts_with("error: "), "{}", run.stderr);
    assert!(run.stderr.contains(&url), "{}", run.stderr);
    assert!(run.stderr.contains("ferry local"), "{}", run.stderr);
    assert!(run.stderr.contains("--url"), "{}", run.stderr);
}

#[test]
fn url_list_falls_over_to_the_next_reachable_url() {
    let s = FerryLocal::spawn();
    let dead = dead_url();
    let list = format!("{dead},{}", s.url);

    let run = ferry_job(&["list", "--url", &list], &[]);
    run.assert_code(0);
    assert!(run.stderr.contains(&dead), "{}", run.stderr);

    // The same list from FERRY_URL.
    let run = ferry_job(&["list", "-o", "json"], &[("FERRY_URL", &list)]);
    run.assert_code(0);
    let _: ferry_jobmanager::api::JobList = serde_json::from_str(&run.stdout).unwrap();

    // Every URL dead: each is named.
    let other = dead_url();
    let run = ferry_job(&["list", "--url", &format!("{dead},{other}")], &[]);
    run.assert_code(1);
    assert!(
        run.stderr.contains(&dead) && run.stderr.contains(&other),
        "{}",
        run.stderr
    );
}
