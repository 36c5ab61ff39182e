//! Every example in examples/ runs to completion; the documented ones
//! produce exactly the results computed independently from their input.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;
use ferry_core::spec::SinkSpec;
use ferry_core::value::Value;

fn examples() -> Vec<PathBuf> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("examples");
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml" || e == "json"))
        .collect();
    v.sort();
    v
}

/// Copies every file under `from` to `to`, keeping relative paths.
fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let target = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_tree(&e.path(), &target);
        } else {
            std::fs::copy(e.path(), target).unwrap();
        }
    }
}

/// Runs an example in a fresh directory, returning it and its output rows.
fn run_example(path: &PathBuf) -> (Workdir, Vec<serde_json::Value>) {
    let text = std::fs::read_to_string(path).unwrap();
    let w = Workdir::new(&text);
    // Examples read data files relative to the repository root, where they
    // are run from: give the working directory the same examples/data.
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    copy_tree(&repo.join("examples/data"), &w.path().join("examples/data"));
    let code = w.run_local(
        &["--data-dir", w.data_dir().to_str().unwrap()],
        "run.log",
        Duration::from_secs(300),
    );
    assert_eq!(code, 0, "{} failed:\n{}", path.display(), w.log("run.log"));
    let rows = match &w.spec.spec.sink {
        SinkSpec::File(f) => w.output_rows(&f.path),
        _ => Vec::new(),
    };
    assert!(
        w.log("run.log").contains("FINISHED"),
        "{} did not finish",
        path.display()
    );
    (w, rows)
}

#[test]
fn every_example_runs_to_completion() {
    let all = examples();
    assert!(all.len() >= 3);
    for p in all {
        let (w, rows) = run_example(&p);
        if matches!(w.spec.spec.sink, SinkSpec::File(_)) {
            assert!(!rows.is_empty(), "{} wrote no output", p.display());
        }
        assert!(
            !w.complete_checkpoints().is_empty(),
            "{} left no checkpoint",
            p.display()
        );
    }
}

#[test]
fn clicks_per_minute_counts_every_click_once() {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("examples/clicks-per-minute.yaml");
    let (w, rows) = run_example(&path);
    let model = generator(&w.spec);
    let total = model.total.unwrap();
    let mut want: BTreeMap<(String, i64), i64> = BTreeMap::new();
    for i in 0..total {
        let r = model.record_at(i);
        let (Value::Str(user), Value::Ts(t)) = (&r[0], &r[2]) else {
            panic!("{r:?}")
        };
        *want
            .entry((format!("\"{user}\""), t.div_euclid(60_000) * 60_000))
            .or_default() += 1;
    }
    let want: Vec<_> = want.into_iter().map(|((u, s), c)| (u, s, c)).collect();
    assert_eq!(count_rows(&rows, "user", "clicks"), want);
}

#[test]
fn big_spenders_sliding_matches_reference() {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("examples/big-spenders-sliding.yaml");
    let (w, rows) = run_example(&path);
    let model = generator(&w.spec);
    let (size, slide) = (600_000i64, 60_000i64);
    // (start) -> (count, sum, max) over German purchases above 20.
    let mut want: BTreeMap<i64, (i64, f64, f64)> = BTreeMap::new();
    for i in 0..model.total.unwrap() {
        let r = model.record_at(i);
        let (Value::Str(country), Value::Float(amount), Value::Ts(t)) = (&r[1], &r[2], &r[3])
        else {
            panic!("{r:?}")
        };
        if &**country != "DE" || *amount <= 20.0 {
            continue;
        }
        let mut start = t.div_euclid(slide) * slide;
        while start > t - size {
            let e = want.entry(start).or_insert((0, 0.0, f64::MIN));
            e.0 += 1;
            e.1 += amount;
            e.2 = e.2.max(*amount);
            start -= slide;
        }
    }
    assert_eq!(rows.len(), want.len(), "one row per window");
    for r in &rows {
        assert_eq!(r["country"], "DE");
        let start = ts(&r["window_start"]);
        assert_eq!(ts(&r["window_end"]) - start, size);
        let (n, sum, max) = want[&start];
        assert_eq!(r["purchases"].as_i64().unwrap(), n);
        let close = |a: f64, b: f64| (a - b).abs() <= 1e-6 * b.abs().max(1.0);
        assert!(close(r["total"].as_f64().unwrap(), sum), "{r}");
        assert!(close(r["average"].as_f64().unwrap(), sum / n as f64), "{r}");
        assert_eq!(r["largest"].as_f64().unwrap(), max, "{r}");
    }
}

#[test]
fn file_orders_per_minute_matches_its_input_and_skips_the_bad_line() {
    let path =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("examples/file-orders-per-minute.yaml");
    let (w, rows) = run_example(&path);
    // Reference: parse the example's input here, independently of the source.
    let data = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("examples/data");
    let mut want: BTreeMap<(String, i64), (i64, f64, f64)> = BTreeMap::new();
    let mut bad = Vec::new();
    for name in ["orders-1.jsonl", "orders-2.jsonl"] {
        let text = std::fs::read_to_string(data.join(name)).unwrap();
        for (i, line) in text.lines().enumerate() {
            let r: serde_json::Value = serde_json::from_str(line).unwrap();
            let Some(amount) = r["amount"].as_f64() else {
                bad.push(format!("{name} line {}", i + 1));
                continue;
            };
            let start = ts(&r["ts"]).div_euclid(60_000) * 60_000;
            let e = want
                .entry((r["country"].as_str().unwrap().to_string(), start))
                .or_insert((0, 0.0, f64::MIN));
            e.0 += 1;
            e.1 += amount;
            e.2 = e.2.max(amount);
        }
    }
    assert_eq!(
        bad,
        vec!["orders-2.jsonl line 38"],
        "the example's one bad line"
    );
    let log = w.log("run.log");
    assert!(
        log.contains("orders-2.jsonl line 38: field 'amount'"),
        "{log}"
    );
    assert!(log.contains("skipped records:   1"), "{log}");
    assert_eq!(rows.len(), want.len(), "one row per (country, minute)");
    for r in &rows {
        let key = (
            r["country"].as_str().unwrap().to_string(),
            ts(&r["window_start"]),
        );
        let (n, sum, max) = want[&key];
        assert_eq!(r["orders"].as_i64().unwrap(), n, "{r}");
        assert!((r["revenue"].as_f64().unwrap() - sum).abs() < 1e-6, "{r}");
        assert_eq!(r["largest"].as_f64().unwrap(), max, "{r}");
    }
}
