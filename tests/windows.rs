//! Window results against a naive reference implementation of event-time
//! window semantics (watermarks per source batch, allowed lateness, late firings,
//! late-record drops), including out-of-order and late records.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::*;
use ferry_core::value::Value;
use ferry_taskmanager::source::generator::MAX_BATCH;

struct Params {
    size: i64,
    slide: i64,
    lateness: i64,
    ooo: i64,
    late_by: i64,
    late_fraction: f64,
    total: u64,
    filter_min_amount: Option<f64>,
}

fn spec(p: &Params) -> String {
    let window = if p.size == p.slide {
        format!("tumbling: {}ms", p.size)
    } else {
        format!("sliding: {{size: {}ms, slide: {}ms}}", p.size, p.slide)
    };
    let filter = p
        .filter_min_amount
        .map(|m| format!("    - filter: \"amount >= {m:.1}\"\n"))
        .unwrap_or_default();
    format!(
        r#"
apiVersion: ferry.dev/v1
kind: Job
metadata: {{name: window-ref}}
spec:
  parallelism: 1
  checkpointing: {{interval: 1s}}
  source:
    generator:
      partitions: 1
      total: {total}
      seed: 99
      eventTime:
        step: 10ms
        maxOutOfOrderness: {ooo}ms
        late: {{fraction: {frac}, by: {late}ms}}
      fields:
        user: {{type: key, cardinality: 7, prefix: "u"}}
        amount: {{type: float, min: 0, max: 100}}
  operators:
{filter}    - key_by: user
    - window:
        {window}
        allowedLateness: {lateness}ms
        aggregate:
          n: count
          total: sum(amount)
          low: min(amount)
          high: max(amount)
          mean: avg(amount)
  sink:
    file: {{path: ./out}}
"#,
        total = p.total,
        ooo = p.ooo,
        frac = p.late_fraction,
        late = p.late_by,
        lateness = p.lateness,
    )
}

#[derive(Clone, Default)]
struct Agg {
    n: i64,
    sum: f64,
    min: f64,
    max: f64,
}

/// (user, window start, n, total, low, high, mean) — one per firing.
type Row = (String, i64, i64, f64, f64, f64, f64);

fn row(user: &str, start: i64, a: &Agg) -> Row {
    (
        user.to_string(),
        start,
        a.n,
        a.sum,
        a.min,
        a.max,
        a.sum / a.n as f64,
    )
}

/// Naive reference: records one at a time, the watermark after each source
/// batch, Flink's firing, lateness and purge rules.
fn reference(w: &Workdir, p: &Params) -> (Vec<Row>, u64) {
    let model = generator(&w.spec);
    let mut wm = i64::MIN;
    let mut max_ts = i64::MIN;
    let mut windows: BTreeMap<i64, (bool, BTreeMap<String, Agg>)> = BTreeMap::new();
    let mut out = Vec::new();
    let mut late = 0u64;
    let fire_due = |wm: i64,
                    windows: &mut BTreeMap<i64, (bool, BTreeMap<String, Agg>)>,
                    out: &mut Vec<Row>| {
        for (start, (fired, keys)) in windows.iter_mut() {
            if !*fired && start + p.size - 1 <= wm {
                *fired = true;
                for (k, a) in keys.iter() {
                    out.push(row(k, *start, a));
                }
            }
        }
        windows.retain(|start, _| start + p.size - 1 + p.lateness > wm);
    };
    for i in 0..p.total {
        let r = model.record_at(i);
        let (Value::Str(user), Value::Float(amount), Value::Ts(ts)) = (&r[0], &r[1], &r[2]) else {
            panic!("unexpected record shape {r:?}")
        };
        max_ts = max_ts.max(*ts);
        if p.filter_min_amount.is_none_or(|m| *amount >= m) {
            let mut any = false;
            let last = ts.div_euclid(p.slide) * p.slide;
            let mut start = last;
            while start > ts - p.size {
                let end = start + p.size;
                if !(wm != i64::MIN && end - 1 + p.lateness <= wm) {
                    any = true;
                    let (fired, keys) = windows.entry(start).or_default();
                    let a = keys.entry(user.to_string()).or_insert(Agg {
                        n: 0,
                        sum: 0.0,
                        min: f64::INFINITY,
                        max: f64::NEG_INFINITY,
                    });
                    a.n += 1;
                    a.sum += amount;
                    a.min = a.min.min(*amount);
                    a.max = a.max.max(*amount);
                    if end - 1 <= wm {
                        *fired = true;
                        out.push(row(user, start, a));
                    }
                }
                start -= p.slide;
            }
            if !any {
                late += 1;
            }
        }
        // The source advances its watermark after each batch of records.
        let batch_end = (i + 1) % MAX_BATCH == 0 || i + 1 == p.total;
        let new_wm = max_ts - p.ooo - 1;
        if batch_end && new_wm > wm {
            wm = new_wm;
            fire_due(wm, &mut windows, &mut out);
        }
    }
    fire_due(i64::MAX, &mut windows, &mut out);
    out.sort_by(|a, b| a.partial_cmp(b).unwrap());
    (out, late)
}

fn actual(w: &Workdir) -> Vec<Row> {
    let mut v: Vec<Row> = w
        .output_rows("out")
        .iter()
        .map(|r| {
            (
                r["user"].as_str().unwrap().to_string(),
                ts(&r["window_start"]),
                r["n"].as_i64().unwrap(),
                r["total"].as_f64().unwrap(),
                r["low"].as_f64().unwrap(),
                r["high"].as_f64().unwrap(),
                r["mean"].as_f64().unwrap(),
            )
        })
        .collect();
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-9 * a.abs().max(b.abs()).max(1.0)
}

fn check(p: Params) -> (usize, u64) {
    let w = Workdir::new(&spec(&p));
    let code = w.run_local(&[], "run.log", Duration::from_secs(120));
    let log = w.log("run.log");
    assert_eq!(code, 0, "{log}");
    let (want, late) = reference(&w, &p);
    let got = actual(&w);
    assert_eq!(got.len(), want.len(), "number of window firings differs");
    for (g, e) in got.iter().zip(&want) {
        assert_eq!((&g.0, g.1, g.2), (&e.0, e.1, e.2), "{g:?} vs {e:?}");
        for (x, y) in [(g.3, e.3), (g.4, e.4), (g.5, e.5), (g.6, e.6)] {
            assert!(close(x, y), "{g:?} vs {e:?}");
        }
    }
    // The summary prints the line only when records were dropped.
    let reported = match log
        .lines()
        .find_map(|l| l.trim().strip_prefix("late records:"))
    {
        Some(s) => s.split_whitespace().next().unwrap().parse::<u64>().unwrap(),
        None if late == 0 => 0,
        None => panic!(
            "the reference drops {late} late records but the summary has no 'late records:' line:\n{log}"
        ),
    };
    assert_eq!(
        reported, late,
        "late-record counter differs from the reference"
    );
    (got.len(), late)
}

#[test]
fn tumbling_out_of_order_matches_reference() {
    let (rows, late) = check(Params {
        size: 60_000,
        slide: 60_000,
        lateness: 0,
        ooo: 3_000,
        late_by: 0,
        late_fraction: 0.0,
        total: 60_000,
        filter_min_amount: None,
    });
    assert!(rows > 50 && late == 0);
}

#[test]
fn late_records_within_allowed_lateness_fire_again() {
    let (rows, late) = check(Params {
        size: 60_000,
        slide: 60_000,
        lateness: 300_000,
        ooo: 2_000,
        late_by: 180_000,
        late_fraction: 0.01,
        total: 60_000,
        filter_min_amount: None,
    });
    // ~600 late records each cause one extra firing; none is dropped.
    assert!(rows > 600 && late == 0, "rows {rows}, late {late}");
}

#[test]
fn records_beyond_allowed_lateness_are_dropped_and_counted() {
    let (_, late) = check(Params {
        size: 60_000,
        slide: 60_000,
        lateness: 0,
        ooo: 2_000,
        late_by: 180_000,
        late_fraction: 0.01,
        total: 60_000,
        filter_min_amount: None,
    });
    assert!(late > 400, "expected hundreds of late records, got {late}");
}

#[test]
fn sliding_with_filter_matches_reference() {
    let (rows, _) = check(Params {
        size: 120_000,
        slide: 30_000,
        lateness: 0,
        ooo: 5_000,
        late_by: 0,
        late_fraction: 0.0,
        total: 40_000,
        filter_min_amount: Some(25.0),
    });
    assert!(rows > 100);
}
