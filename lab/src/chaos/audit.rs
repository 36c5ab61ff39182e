//! The audit of `ferry chaos`, independent of Ferry's own bookkeeping: it
//! reads the committed part files, the NATS stream between the jobs and
//! the checkpoint manifests in both stores, and checks them against the
//! workload's model ([`super::workload`]):
//! - the window results equal the model: none missing (of those that must
//!   have fired), none duplicated, none wrong — in the `CHAOS_MID` stream
//!   and in the relay job's files alike;
//! - the generated sequence is, per partition, a gapless prefix without
//!   duplicates, and it grew;
//! - per job and store, the (region epoch, JobManager epoch) of the
//!   manifests never goes back as checkpoint numbers grow, and the commit
//!   windows of different epochs never overlap in time.
//!
//! The checks are pure functions of what was read, so they are unit-tested
//! with damaged inputs here.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use chrono::{DateTime, Utc};
use serde_json::Value;

use super::workload::{PARTITIONS, Windows};

/// Committed JSON-lines rows of every part file in `dir` (file names
/// `part-*.jsonl`; the sink's staging files are named otherwise).
pub fn read_part_files(dir: &Path) -> anyhow::Result<Vec<Value>> {
    let mut rows = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Ok(rows); // nothing committed yet
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        if !(name.starts_with("part-") && name.ends_with(".jsonl")) {
            continue;
        }
        let text = std::fs::read_to_string(e.path())?;
        for (n, line) in text.lines().enumerate() {
            let v: Value = serde_json::from_str(line).map_err(|err| {
                anyhow::anyhow!(
                    "{} line {}: not JSON ({err}): {line}",
                    e.path().display(),
                    n + 1
                )
            })?;
            rows.push(v);
        }
    }
    Ok(rows)
}

/// Epoch ms of a JSON timestamp (RFC 3339 text or epoch ms).
fn millis(v: &Value) -> Option<i64> {
    match v {
        Value::String(s) => DateTime::parse_from_rfc3339(s)
            .ok()
            .map(|t| t.timestamp_millis()),
        Value::Number(n) => n.as_i64(),
        _ => None,
    }
}

/// What one look at the window results found.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct WindowCheck {
    /// Violations that waiting cannot cure: duplicates, wrong values,
    /// windows the model does not have, unreadable rows.
    pub wrong: Vec<String>,
    /// Windows that must have fired and are not there (yet).
    pub missing: usize,
    /// The first few missing, for the report.
    pub missing_examples: Vec<(String, i64)>,
    /// Rows read.
    pub rows: usize,
}

/// Checks window result rows (`where_` names their origin in messages)
/// against `expected` (every complete window) and `must` (those that must
/// have fired).
pub fn check_windows(
    where_: &str,
    rows: &[Value],
    expected: &Windows,
    must: &Windows,
) -> WindowCheck {
    let mut out = WindowCheck {
        rows: rows.len(),
        ..Default::default()
    };
    let mut seen: BTreeMap<(String, i64), u32> = BTreeMap::new();
    for r in rows {
        let (Some(k), Some(start), Some(n), Some(s)) = (
            r["k"].as_str(),
            millis(&r["window_start"]),
            r["n"].as_i64(),
            r["s"].as_i64(),
        ) else {
            out.wrong
                .push(format!("{where_}: a row the model cannot read: {r}"));
            continue;
        };
        let key = (k.to_string(), start);
        *seen.entry(key.clone()).or_default() += 1;
        match expected.get(&key) {
            None => out.wrong.push(format!(
                "{where_}: window ({k}, {start}) is not in the model (n={n}, s={s})"
            )),
            Some(&(en, es)) if (en, es) != (n, s) => out.wrong.push(format!(
                "{where_}: window ({k}, {start}) has n={n} s={s}, the model n={en} s={es}"
            )),
            Some(_) => {}
        }
    }
    for (key, times) in &seen {
        if *times > 1 {
            out.wrong.push(format!(
                "{where_}: window ({}, {}) is there {times} times",
                key.0, key.1
            ));
        }
    }
    for key in must.keys() {
        if !seen.contains_key(key) {
            out.missing += 1;
            if out.missing_examples.len() < 3 {
                out.missing_examples.push(key.clone());
            }
        }
    }
    out
}

/// Checks the generated job's `seq` values: per partition (`seq %`
/// [`PARTITIONS`]) a gapless prefix from the partition's first index, no
/// value twice. Returns the violations and how many records there are.
pub fn check_sequence(rows: &[Value]) -> (Vec<String>, u64) {
    let mut wrong = Vec::new();
    let mut by_partition: BTreeMap<u64, BTreeSet<u64>> = BTreeMap::new();
    for r in rows {
        let Some(seq) = r["seq"].as_u64() else {
            wrong.push(format!("generated: a row without a sequence number: {r}"));
            continue;
        };
        if !by_partition
            .entry(seq % PARTITIONS)
            .or_default()
            .insert(seq)
        {
            wrong.push(format!("generated: record {seq} is there twice"));
        }
    }
    let mut total = 0;
    for (p, seqs) in &by_partition {
        let n = seqs.len() as u64;
        total += n;
        // A gapless prefix p, p+P, ..., p+(n-1)P ends at exactly this.
        let last = p + (n - 1) * PARTITIONS;
        if seqs.iter().next_back() != Some(&last) {
            let gap = (0..n)
                .map(|j| p + j * PARTITIONS)
                .find(|s| !seqs.contains(s))
                .unwrap_or(last);
            wrong.push(format!(
                "generated: partition {p} has {n} records but not a gapless prefix (record {gap} is missing)"
            ));
        }
    }
    (wrong, total)
}

/// One checkpoint or savepoint manifest as the audit keeps it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Commit {
    pub region_epoch: u64,
    pub jm_epoch: u64,
    pub created_at: DateTime<Utc>,
}

impl Commit {
    /// From a manifest's JSON.
    pub fn from_manifest(v: &Value) -> Option<(u64, Commit)> {
        Some((
            v["checkpoint_id"].as_u64()?,
            Commit {
                region_epoch: v["region_epoch"].as_u64()?,
                jm_epoch: v["jm_epoch"].as_u64()?,
                created_at: v["created_at"].as_str()?.parse().ok()?,
            },
        ))
    }
}

/// The checkpoint number and region epoch an archived diverged snapshot's
/// file names (`checkpoint-N-epoch-E.json` under `jobs/<id>/diverged/`).
pub fn diverged_name(name: &str) -> Option<(u64, u64)> {
    let rest = name.strip_prefix("checkpoint-")?.strip_suffix(".json")?;
    let (n, e) = rest.split_once("-epoch-")?;
    Some((n.parse().ok()?, e.parse().ok()?))
}

/// Drops from `commits` (one job's checkpoints, by number) those a
/// failover superseded: archived as diverged (`diverged`: number, region
/// epoch) *and* outnumbered by a newer region epoch — one that committed a
/// checkpoint at or below that number (`lowest`: region epoch → its lowest
/// checkpoint number, over every store). After an asynchronous failover
/// the new primary numbers on from the checkpoint it restored, so the old
/// primary's later numbers come again under the newer epoch; an archive
/// alone is not enough (a region must not hide its own commits by
/// archiving them). Returns how many were dropped.
pub fn drop_superseded(
    commits: &mut BTreeMap<u64, Commit>,
    diverged: &BTreeSet<(u64, u64)>,
    lowest: &BTreeMap<u64, u64>,
) -> usize {
    let before = commits.len();
    commits.retain(|n, c| {
        let superseded = diverged.contains(&(*n, c.region_epoch))
            && lowest.range(c.region_epoch + 1..).any(|(_, low)| low <= n);
        !superseded
    });
    before - commits.len()
}

/// Checks the commits of one job in one store (`what` names them), by
/// checkpoint number: (region epoch, JobManager epoch) never goes back,
/// and the time spans in which each region epoch — and, within one, each
/// JobManager epoch — committed do not overlap.
pub fn check_commits(what: &str, commits: &BTreeMap<u64, Commit>) -> Vec<String> {
    let mut wrong = Vec::new();
    let mut last: Option<(u64, &Commit)> = None;
    for (id, c) in commits {
        if let Some((lid, l)) = last
            && (c.region_epoch, c.jm_epoch) < (l.region_epoch, l.jm_epoch)
        {
            wrong.push(format!(
                "{what}: checkpoint {id} has epochs (region {}, jm {}) after checkpoint {lid}'s (region {}, jm {})",
                c.region_epoch, c.jm_epoch, l.region_epoch, l.jm_epoch
            ));
        }
        last = Some((*id, c));
    }
    // Commit windows per epoch.
    let mut spans: BTreeMap<(u64, u64), (DateTime<Utc>, DateTime<Utc>)> = BTreeMap::new();
    for c in commits.values() {
        let e = spans
            .entry((c.region_epoch, c.jm_epoch))
            .or_insert((c.created_at, c.created_at));
        e.0 = e.0.min(c.created_at);
        e.1 = e.1.max(c.created_at);
    }
    let spans: Vec<_> = spans.into_iter().collect();
    for pair in spans.windows(2) {
        let ((ea, (_, a_end)), (eb, (b_start, _))) = (&pair[0], &pair[1]);
        if a_end >= b_start {
            wrong.push(format!(
                "{what}: epochs (region {}, jm {}) committed until {a_end} but (region {}, jm {}) from {b_start}: overlapping fences",
                ea.0, ea.1, eb.0, eb.1
            ));
        }
    }
    wrong
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_diverged_snapshots_a_newer_epoch_renumbered_are_forgotten() {
        assert_eq!(diverged_name("checkpoint-237-epoch-8.json"), Some((237, 8)));
        assert_eq!(diverged_name("savepoint-3-epoch-8.json"), None);
        assert_eq!(diverged_name("checkpoint-x-epoch-8.json"), None);
        let at = |s: i64| DateTime::<Utc>::from_timestamp(1_800_000_000 + s, 0).unwrap();
        let c = |region_epoch, s| Commit {
            region_epoch,
            jm_epoch: 1,
            created_at: at(s),
        };
        // Region 8 committed 230..=237; region 9 restored 231 and committed
        // 236 (replicated here); 232..=237 of region 8 were archived.
        let mut commits: BTreeMap<u64, Commit> = (230..=237).map(|n| (n, c(8, n as i64))).collect();
        commits.insert(236, c(9, 300));
        assert_eq!(
            check_commits("job", &commits).len(),
            1,
            "the violation the audit saw"
        );
        let diverged: BTreeSet<(u64, u64)> = (232..=237).map(|n| (n, 8)).collect();
        let lowest = BTreeMap::from([(8, 230), (9, 236)]);
        let mut kept = commits.clone();
        assert_eq!(drop_superseded(&mut kept, &diverged, &lowest), 1);
        assert!(!kept.contains_key(&237));
        assert_eq!(check_commits("job", &kept), Vec::<String>::new());
        // Without an archive, or without a newer epoch at or below the
        // number, nothing is forgotten and the violation stands.
        let mut kept = commits.clone();
        assert_eq!(drop_superseded(&mut kept, &BTreeSet::new(), &lowest), 0);
        let mut kept = commits.clone();
        let only_later = BTreeMap::from([(8, 230), (9, 240)]);
        assert_eq!(drop_superseded(&mut kept, &diverged, &only_later), 0);
        assert_eq!(check_commits("job", &kept).len(), 1);
    }
    use crate::chaos::workload::{expected_windows, must_have_fired};
    use serde_json::json;

    fn rows_of(w: &Windows) -> Vec<Value> {
        w.iter()
            .map(|((k, start), (n, s))| {
                let t = DateTime::<Utc>::from_timestamp_millis(*start).unwrap();
                json!({"k": k, "window_start": t.to_rfc3339(), "n": n, "s": s})
            })
            .collect()
    }

    #[test]
    fn exact_window_output_passes_and_every_damage_is_found() {
        let expected = expected_windows(1_000);
        let must = must_have_fired(&expected, 1_000, 500);
        let good = rows_of(&expected);
        let ok = check_windows("t", &good, &expected, &must);
        assert_eq!((ok.wrong.len(), ok.missing), (0, 0), "{ok:?}");

        let mut dup = good.clone();
        dup.push(good[3].clone());
        let c = check_windows("t", &dup, &expected, &must);
        assert_eq!(c.wrong.len(), 1, "{c:?}");
        assert!(c.wrong[0].contains("2 times"));

        let mut missing = good.clone();
        missing.remove(0);
        assert_eq!(check_windows("t", &missing, &expected, &must).missing, 1);

        let mut off = good.clone();
        off[5]["s"] = json!(off[5]["s"].as_i64().unwrap() + 1);
        let c = check_windows("t", &off, &expected, &must);
        assert!(c.wrong[0].contains("the model"), "{c:?}");

        let mut stranger = good;
        stranger.push(json!({"k": "k1", "window_start": "2030-01-01T00:00:00Z", "n": 1, "s": 1}));
        assert_eq!(
            check_windows("t", &stranger, &expected, &must).wrong.len(),
            1
        );
    }

    #[test]
    fn a_sequence_must_be_a_gapless_prefix_per_partition_without_repeats() {
        let rows = |v: &[u64]| v.iter().map(|s| json!({"seq": s})).collect::<Vec<_>>();
        assert_eq!(check_sequence(&rows(&[0, 1, 2, 3, 4])), (vec![], 5));
        // Partition 1 may lag partition 0.
        assert_eq!(check_sequence(&rows(&[0, 2, 4, 1])), (vec![], 4));
        let (w, _) = check_sequence(&rows(&[0, 2, 2, 1]));
        assert_eq!(w.len(), 1, "{w:?}");
        let (w, _) = check_sequence(&rows(&[0, 4, 1]));
        assert!(w[0].contains("record 2 is missing"), "{w:?}");
    }

    #[test]
    fn epochs_that_go_back_or_overlap_are_violations() {
        let t = |s: i64| DateTime::<Utc>::from_timestamp(1_800_000_000 + s, 0).unwrap();
        let c = |r, j, s| Commit {
            region_epoch: r,
            jm_epoch: j,
            created_at: t(s),
        };
        let good: BTreeMap<u64, Commit> = [
            (1, c(1, 5, 0)),
            (2, c(1, 5, 1)),
            (3, c(1, 9, 3)),
            (4, c(2, 3, 5)),
        ]
        .into();
        assert!(check_commits("j", &good).is_empty());

        let mut back = good.clone();
        back.insert(5, c(1, 9, 7));
        let w = check_commits("j", &back);
        assert!(w.iter().any(|w| w.contains("checkpoint 5")), "{w:?}");

        // The old leader (jm 5) committed after the new one (jm 9) began.
        let mut overlap = good;
        overlap.insert(2, c(1, 5, 4));
        let w = check_commits("j", &overlap);
        assert!(w.iter().any(|w| w.contains("overlapping")), "{w:?}");
    }
}
