//! A checkpoint store that fills up (a 4 MB tmpfs, filled with a ballast
//! file while the job runs): the job's checkpoints fail, the job says "the
//! store is full" plainly — in its log and its failure — instead of looping
//! silently, no failed attempt leaves partial files behind, and once space
//! is freed the job restores and finishes with every record exactly once.
//!
//! Mounting a tmpfs needs root; elsewhere the test says loudly that it was
//! skipped.

mod common;

use std::io::Write as _;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::*;

/// A tmpfs of `size` at `dir`, unmounted on drop.
struct Tmpfs(std::path::PathBuf);

impl Tmpfs {
    fn mount(dir: &Path, size: &str) -> Option<Self> {
        std::fs::create_dir_all(dir).unwrap();
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .output()
            .is_ok_and(|o| o.status.success());
        ok.then(|| Tmpfs(dir.to_path_buf()))
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).output();
    }
}

/// Writes zeros into `path` until the file system is full; bytes written.
fn fill(path: &Path) -> u64 {
    let mut f = std::fs::File::create(path).unwrap();
    let chunk = vec![0u8; 64 * 1024];
    let mut n = 0;
    // Bounded by the tmpfs size (4 MB); ENOSPC ends it.
    for _ in 0..1024 {
        match f.write(&chunk) {
            Ok(0) | Err(_) => break,
            Ok(k) => n += k as u64,
        }
    }
    let _ = f.sync_all();
    n
}

#[test]
fn a_full_store_is_named_cleaned_up_after_and_survived() {
    let tmp = tempfile::tempdir().unwrap();
    let store = tmp.path().join("store");
    let Some(_tmpfs) = Tmpfs::mount(&store, "4m") else {
        let bar = "!".repeat(72);
        eprintln!("\n{bar}\nSTORE-FULL TEST SKIPPED: cannot mount a tmpfs (needs root)\n{bar}\n");
        return;
    };
    let spec = format!(
        r#"
apiVersion: ferry.dev/v1
kind: Job
metadata: {{name: full-store}}
spec:
  parallelism: 1
  checkpointing:
    interval: 200ms
    retained: 2
    storage: "file://{}"
    tolerableFailures: 2
  restartStrategy: {{type: fixed-attempts, attempts: 100, delay: 200ms}}
  source:
    generator:
      total: 40000
      rate: 2000
      fields: {{n: {{type: sequence}}}}
  sink:
    file: {{path: ./out}}
"#,
        store.display()
    );
    let w = Workdir::new(&spec);
    let allow = store.display().to_string();
    let mut child = w.spawn_local(&["--allow", &allow], "run.log");
    wait_until(Duration::from_secs(60), "two checkpoints", || {
        assert!(child.try_wait().unwrap().is_none(), "{}", w.log("run.log"));
        complete_checkpoints_under(&store).len() >= 2
    });
    let ballast = store.join("ballast");
    let filled = fill(&ballast);
    assert!(filled > 0, "nothing written to the tmpfs");
    wait_until(
        Duration::from_secs(60),
        "the job to say the store is full",
        || w.log("run.log").contains("the store is full"),
    );
    assert!(child.try_wait().unwrap().is_none(), "{}", w.log("run.log"));
    std::fs::remove_file(&ballast).unwrap();
    let code = wait_exit(&mut child, Duration::from_secs(120));
    let log = w.log("run.log");
    assert_eq!(code, 0, "{log}");

    // Every record exactly once: 0..40000, computed here.
    assert_sequence_exactly_once(&w.output_rows("out"), "n", 40_000);

    // Checkpoint directories hold a manifest or an abort marker only.
    let mut dirs = 0;
    for job in std::fs::read_dir(store.join("jobs")).unwrap().flatten() {
        for cp in std::fs::read_dir(job.path().join("checkpoints"))
            .into_iter()
            .flatten()
            .flatten()
        {
            dirs += 1;
            let files: Vec<String> = std::fs::read_dir(cp.path())
                .unwrap()
                .flatten()
                .map(|e| e.file_name().to_string_lossy().to_string())
                .collect();
            let complete = files.iter().any(|f| f == "MANIFEST.json");
            let aborted = files == vec![ferry_core::manifest::ABORTED_FILE.to_string()];
            assert!(
                complete || aborted,
                "{} holds a failed attempt's files: {files:?}\n{log}",
                cp.path().display()
            );
        }
    }
    assert!(dirs > 0, "no checkpoint directories");
}
