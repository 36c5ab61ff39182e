//! Text views of the API's answers, as `ferry` shows them to people:
//! aligned tables, `key: value` blocks, a failed request with what to do
//! next, and compact ages, counts and sizes. Each view appends to a
//! `String`; nothing here prints, so callers choose where the text goes
//! (and tests compare it).

use std::fmt::Write as _;

use chrono::{DateTime, Utc};
use ferry_core::api::{
    AuditEntry, CancelResponse, CheckpointInfo, DivergenceReport, DrainReport, DrillReport,
    DrillRevert, HaHealth, JobInfo, RebalancePlan, RegionsStatus, SavepointInfo, SwitchoverReport,
    SyncState,
};

use crate::{DEFAULT_URL, Error};

/// A failed request for a person: `error: ...` and what to do next.
pub fn failure(e: &Error, err: &mut String) {
    match e {
        Error::Api {
            body: Some(body), ..
        } => {
            let e = &body.error;
            let _ = writeln!(err, "error: {}", e.message);
            for d in &e.details {
                let _ = writeln!(err, "  - {d}");
            }
            if e.code == "unauthenticated" {
                let _ = writeln!(
                    err,
                    "  give a token with FERRY_TOKEN, --token-file FILE or --token TOKEN"
                );
            }
        }
        Error::Api {
            url, status, text, ..
        } => {
            let text = text.trim();
            let snippet: String = text.chars().take(500).collect();
            let _ = writeln!(
                err,
                "error: {url} answered {status}, not a Ferry API response"
            );
            if !snippet.is_empty() {
                let _ = writeln!(err, "  {snippet}");
            }
            let _ = writeln!(err, "  check that --url points at a Ferry JobManager");
        }
        Error::Unreachable(tried) => {
            if let [(url, reason)] = tried.as_slice() {
                let _ = writeln!(
                    err,
                    "error: cannot reach the JobManager at {url} ({reason})"
                );
            } else {
                let _ = writeln!(err, "error: cannot reach any JobManager; tried:");
                for (url, reason) in tried {
                    let _ = writeln!(err, "  - {url}: {reason}");
                }
            }
            let _ = writeln!(
                err,
                "  start one with `ferry local` (it serves the API on {DEFAULT_URL}), \
                     or point at a running one with --url URL or FERRY_URL"
            );
        }
        Error::Transport { url, reason } => {
            let _ = writeln!(err, "error: request to {url} failed: {reason}");
            let _ = writeln!(
                err,
                "  the JobManager may still have acted on it; check with `ferry job list`"
            );
        }
    }
}

/// `ferry job submit`'s answer.
pub fn submitted(job: &JobInfo, out: &mut String) {
    let _ = writeln!(
        out,
        "submitted job '{}' as {} ({})",
        job.name, job.id, job.state
    );
    let _ = writeln!(out, "  follow it with `ferry job get {}`", job.id.short());
}

/// `ferry job list`: one row per job.
pub fn jobs(jobs: &[JobInfo], out: &mut String) {
    if jobs.is_empty() {
        let _ = writeln!(out, "no jobs; submit one with `ferry job submit FILE`");
        return;
    }
    let now = Utc::now();
    let mut t = Table::new(&[
        ("ID", Align::Left),
        ("NAME", Align::Left),
        ("STATE", Align::Left),
        ("PARALLELISM", Align::Right),
        ("RECORDS IN", Align::Right),
        ("RECORDS OUT", Align::Right),
        ("LAST CHECKPOINT", Align::Left),
        ("AGE", Align::Left),
    ]);
    for j in jobs {
        t.row(vec![
            j.id.short(),
            j.name.clone(),
            j.state.to_string(),
            j.parallelism.to_string(),
            j.records_in.to_string(),
            j.records_out.to_string(),
            j.last_checkpoint
                .as_ref()
                .map(|c| format!("#{} ({} ago)", c.id, age(c.completed_at, now)))
                .unwrap_or_else(|| "-".into()),
            age(j.submitted_at, now),
        ]);
    }
    out.push_str(&t.render());
}

/// `ferry audit`: one row per entry, newest first.
pub fn audit(entries: &[AuditEntry], out: &mut String) {
    if entries.is_empty() {
        let _ = writeln!(out, "no audit entries yet: no call has changed anything");
        return;
    }
    let now = Utc::now();
    let mut t = Table::new(&[
        ("AT", Align::Left),
        ("AGE", Align::Left),
        ("ACTOR", Align::Left),
        ("ACTION", Align::Left),
        ("JOB/REGION", Align::Left),
        ("RESULT", Align::Left),
        ("BY", Align::Left),
    ]);
    for e in entries {
        t.row(vec![
            e.at.format("%Y-%m-%d %H:%M:%S").to_string(),
            age(e.at, now),
            format!("{} ({})", e.actor, e.auth),
            e.action.clone(),
            e.job
                .clone()
                .or_else(|| e.region.clone())
                .unwrap_or_else(|| "-".into()),
            format!("{} {}", e.status, e.result),
            match &e.forwarded_by {
                Some(f) => format!("{} via {f}", e.instance),
                None => e.instance.clone(),
            },
        ]);
    }
    out.push_str(&t.render());
}

/// `ferry job get`: one `key: value` line per field.
pub fn job(j: &JobInfo, out: &mut String) {
    let now = Utc::now();
    let mut rows: Vec<(&str, String)> = vec![
        ("ID", j.id.to_string()),
        ("Name", j.name.clone()),
        ("State", j.state.to_string()),
        ("Parallelism", j.parallelism.to_string()),
        (
            "Submitted",
            format!(
                "{} ({} ago)",
                j.submitted_at.to_rfc3339(),
                age(j.submitted_at, now)
            ),
        ),
    ];
    if let Some(end) = j.ended_at {
        rows.push((
            "Ended",
            format!("{} ({} ago)", end.to_rfc3339(), age(end, now)),
        ));
    }
    rows.extend([
        ("Restarts", j.restarts.to_string()),
        ("Records in", j.records_in.to_string()),
        ("Records out", j.records_out.to_string()),
        (
            "Watermark",
            j.watermark.clone().unwrap_or_else(|| "-".into()),
        ),
        (
            "Last checkpoint",
            j.last_checkpoint
                .as_ref()
                .map(|c| checkpoint_summary(c, now))
                .unwrap_or_else(|| "-".into()),
        ),
        ("Checkpoints", j.checkpoint_root.clone()),
    ]);
    if let Some(out) = &j.output {
        rows.push(("Output", out.clone()));
    }
    if let Some(f) = &j.failure {
        rows.push(("Failure", f.clone()));
    }
    let width = rows.iter().map(|(k, _)| k.len()).max().unwrap_or(0) + 1;
    for (k, v) in rows {
        let _ = writeln!(out, "{:<width$} {v}", format!("{k}:"));
    }
}

/// One checkpoint on one line.
fn checkpoint_summary(c: &CheckpointInfo, now: DateTime<Utc>) -> String {
    format!(
        "#{} {}, {} ago, {} ms, {}{}",
        c.id,
        c.kind,
        age(c.completed_at, now),
        c.duration_ms,
        bytes(c.size_bytes),
        if c.finished { ", final" } else { "" }
    )
}

/// `ferry job cancel`'s answer (and how to resume from its savepoint).
pub fn cancelled(res: &CancelResponse, out: &mut String) {
    let j = &res.job;
    let _ = writeln!(out, "job '{}' ({}) is {}", j.name, j.id.short(), j.state);
    if let Some(sp) = &res.savepoint {
        let _ = writeln!(out, "savepoint {} written to {}", sp.checkpoint_id, sp.path);
        let _ = writeln!(
            out,
            "  resume with `ferry local JOB.yaml --from-savepoint {}`",
            sp.path
        );
    }
}

/// `ferry job savepoint`'s answer.
pub fn savepoint(sp: &SavepointInfo, out: &mut String) {
    let _ = writeln!(
        out,
        "savepoint {} of job {} written to {}",
        sp.checkpoint_id,
        sp.job_id.short(),
        sp.path
    );
}

/// `ferry job checkpoints`: one row per completed checkpoint.
pub fn checkpoints(cps: &[CheckpointInfo], out: &mut String) {
    if cps.is_empty() {
        let _ = writeln!(out, "no completed checkpoints yet");
        return;
    }
    let now = Utc::now();
    let mut t = Table::new(&[
        ("ID", Align::Right),
        ("KIND", Align::Left),
        ("COMPLETED", Align::Left),
        ("DURATION", Align::Right),
        ("SIZE", Align::Right),
        ("RECORDS IN", Align::Right),
        ("RECORDS OUT", Align::Right),
        ("PATH", Align::Left),
    ]);
    for c in cps {
        t.row(vec![
            c.id.to_string(),
            if c.finished {
                format!("{} (final)", c.kind)
            } else {
                c.kind.clone()
            },
            format!("{} ago", age(c.completed_at, now)),
            format!("{} ms", c.duration_ms),
            bytes(c.size_bytes),
            c.records_in.to_string(),
            c.records_out.to_string(),
            c.path.clone(),
        ]);
    }
    out.push_str(&t.render());
}

/// `ferry cluster status`: the leader, this instance, every member.
pub fn cluster(h: &HaHealth, out: &mut String) {
    let region = h.region.as_deref().unwrap_or("(embedded)");
    let _ = writeln!(out, "region:   {region}");
    match &h.leader {
        Some(l) if !l.url.is_empty() => {
            let _ = writeln!(
                out,
                "leader:   {} at {} (epoch {})",
                l.instance, l.url, l.epoch
            );
        }
        Some(l) => {
            let _ = writeln!(out, "leader:   {} (embedded, no election)", l.instance);
        }
        None => {
            let _ = writeln!(
                out,
                "leader:   none known (an election is under way or NATS is unreachable)"
            );
        }
    }
    let _ = writeln!(
        out,
        "answered: {} ({:?}); {} leader change(s) seen, {} heartbeat failure(s)",
        h.instance, h.role, h.leader_changes, h.heartbeat_failures
    )
    .map(|_| ());
    if !h.backend_reachable {
        let _ = writeln!(
            out,
            "warning:  this instance cannot read the coordination store (NATS)"
        );
    }
    let _ = writeln!(
        out,
        "members:  {} healthy of {} known",
        h.healthy_members, h.total_members
    );
    if !h.members.is_empty() {
        let _ = writeln!(
            out,
            "  {:<24} {:<12} {:<10} {:>10}  ADDRESS",
            "ID", "ROLE", "LEADER", "HEARTBEAT"
        );
        for m in &h.members {
            let leads = h.leader.as_ref().is_some_and(|l| l.instance == m.member.id);
            let _ = writeln!(
                out,
                "  {:<24} {:<12} {:<10} {:>8}ms  {}",
                m.member.id,
                m.member.role,
                if leads { "yes" } else { "" },
                m.heartbeat_age_ms,
                m.member.address
            );
        }
    }
    if !h.taskmanagers.is_empty() {
        let _ = writeln!(
            out,
            "taskmanagers: slot load spread {:.2}{}",
            h.slot_load_variance.unwrap_or(0.0),
            if h.taskmanagers.iter().any(|t| t.draining) {
                " (draining ones not counted)"
            } else {
                ""
            }
        );
        let _ = writeln!(
            out,
            "  {:<24} {:>5} {:>5} {:<9} JOBS",
            "ID", "USED", "SLOTS", "STATE"
        );
        for t in &h.taskmanagers {
            let jobs: Vec<String> = t
                .jobs
                .iter()
                .map(|j| format!("{}({})", &j.job[..8.min(j.job.len())], j.slots))
                .collect();
            let _ = writeln!(
                out,
                "  {:<24} {:>5} {:>5} {:<9} {}",
                t.id,
                t.used,
                t.slots,
                if t.draining { "draining" } else { "active" },
                jobs.join(" ")
            );
        }
    }
}

/// `ferry taskmanager drain`: what moves.
pub fn drain(r: &DrainReport, out: &mut String) {
    if !r.draining {
        let _ = writeln!(out, "TaskManager {} takes new jobs again", r.taskmanager);
        return;
    }
    let _ = writeln!(
        out,
        "draining TaskManager {}: {} job(s) move elsewhere by savepoint ({} slot(s) needed, {} free on the other TaskManagers)",
        r.taskmanager,
        r.jobs.len(),
        r.needed,
        r.free_elsewhere
    );
    for j in &r.jobs {
        let _ = writeln!(out, "  {j}");
    }
    if r.free_elsewhere < r.needed {
        let _ = writeln!(
            out,
            "warning: too few free slots elsewhere: some jobs wait for slots (start another TaskManager, or end the drain with --cancel)"
        );
    }
}

/// `ferry cluster rebalance`: the moves.
pub fn rebalance(p: &RebalancePlan, out: &mut String) {
    let verb = if p.dry_run { "would move" } else { "moving" };
    let _ = writeln!(
        out,
        "slot load spread {:.3} -> {:.3}: {verb} {} job(s)",
        p.variance_before,
        p.variance_after,
        p.moves.len()
    );
    for m in &p.moves {
        let _ = writeln!(
            out,
            "  {}  {} -> {}  ({} slot(s))",
            m.job, m.from, m.to, m.slots
        );
    }
}

/// A region's slots and held state, from its heartbeat.
fn res(r: &ferry_core::api::RegionView) -> Option<&ferry_core::api::RegionResources> {
    r.heartbeat.as_ref().and_then(|h| h.resources.as_ref())
}

/// `ferry region status`: the primary, every region's health, slots and
/// hot standby, every standby's replication lag.
pub fn regions(v: &RegionsStatus, out: &mut String) {
    let _ = writeln!(
        out,
        "this region: {} (answered by {}{})",
        v.region.as_deref().unwrap_or("-"),
        v.instance,
        v.region_role
            .map(|r| format!(", region role {r}"))
            .unwrap_or_default()
    );
    if let Some(p) = &v.primary {
        let _ = writeln!(out, "primary:     {p} (region epoch {})", v.epoch);
    }
    let reachable = v.global_reachable != Some(false);
    if !reachable {
        let _ = writeln!(
            out,
            "global KV:   UNREACHABLE (no write succeeded within regions.timeout: no quorum, or cut off); the health below is the last seen and may be stale"
        );
    }
    if !v.regions.is_empty() {
        let rows: Vec<Vec<String>> = v
            .regions
            .iter()
            .map(|r| {
                vec![
                    r.region.clone(),
                    if v.primary.as_deref() == Some(r.region.as_str()) {
                        "primary".into()
                    } else {
                        "standby".into()
                    },
                    match (reachable, r.healthy) {
                        (false, _) => "unknown".into(),
                        (true, true) => "yes".into(),
                        (true, false) => "NO".into(),
                    },
                    r.heartbeat_age_ms
                        .map(|a| format!("{a} ms"))
                        .unwrap_or_else(|| "never".into()),
                    r.heartbeat
                        .as_ref()
                        .map(|h| h.leader.clone())
                        .unwrap_or_else(|| "-".into()),
                    res(r)
                        .map(|x| x.standby.clone())
                        .unwrap_or_else(|| "-".into()),
                    res(r)
                        .map(|x| format!("{}/{}", x.slots_used, x.slots))
                        .unwrap_or_else(|| "-".into()),
                    res(r)
                        .filter(|x| x.standby == "hot")
                        .map(|x| {
                            format!(
                                "{} jobs, {} slots, ~{} in memory ({} checkpointed)",
                                x.held.len(),
                                x.held_slots,
                                bytes(x.held_memory_bytes),
                                bytes(x.held_state_bytes)
                            )
                        })
                        .unwrap_or_else(|| "-".into()),
                ]
            })
            .collect();
        let mut t = Table::new(&[
            ("REGION", Align::Left),
            ("ROLE", Align::Left),
            ("HEALTHY", Align::Left),
            ("HEARTBEAT AGE", Align::Right),
            ("LEADER", Align::Left),
            ("STANDBY", Align::Left),
            ("SLOTS USED", Align::Right),
            ("HELD (HOT)", Align::Left),
        ]);
        for r in rows {
            t.row(r);
        }
        out.push('\n');
        out.push_str(&t.render());
    }
    if !v.standbys.is_empty() {
        let rows: Vec<Vec<String>> = v
            .standbys
            .iter()
            .map(|s| {
                vec![
                    s.region.clone(),
                    format!("{:.3}", s.lag_seconds),
                    s.lag_checkpoints.to_string(),
                    s.lag_records.to_string(),
                    s.last_error.clone().unwrap_or_else(|| "-".into()),
                ]
            })
            .collect();
        let mut t = Table::new(&[
            ("REPLICA", Align::Left),
            ("LAG S", Align::Right),
            ("LAG CKPTS", Align::Right),
            ("LAG RECORDS", Align::Right),
            ("LAST ERROR", Align::Left),
        ]);
        for r in rows {
            t.row(r);
        }
        out.push('\n');
        out.push_str(&t.render());
    }
    if let Some(s) = &v.sync {
        let lat = match (s.latency_p50_ms, s.latency_p99_ms) {
            (Some(a), Some(b)) => format!("; copy into the standbys p50 {a:.0} ms, p99 {b:.0} ms"),
            _ => String::new(),
        };
        let _ = writeln!(
            out,
            "\nreplication: sync ({} standby store(s) per checkpoint, onStandbyLoss {}): {} since {}{lat}",
            s.sync_standbys,
            s.on_standby_loss,
            match s.state {
                SyncState::Sync => "in sync",
                SyncState::Blocked => "BLOCKED — checkpoints fail, output waits uncommitted",
                SyncState::Degraded =>
                    "DEGRADED to asynchronous — a failover may repeat committed output",
            },
            s.since.format("%Y-%m-%d %H:%M:%S UTC"),
        );
        if let Some(why) = &s.reason {
            let _ = writeln!(out, "  why: {why}");
        }
    }
    if let Some(note) = &v.note {
        let _ = writeln!(out, "{note}");
    }
}

/// `ferry region failover`'s answer: the move, its steps, the savepoints.
pub fn switchover(v: &SwitchoverReport, out: &mut String) {
    region_move(out, v, "");
    for sp in &v.savepoints {
        let _ = writeln!(out, "  savepoint {}", sp.path);
    }
    if let Some(ms) = v.took_ms {
        let _ = writeln!(out, "took {ms} ms");
    }
}

/// `ferry region failback`'s answer: the move, its steps, the divergence.
pub fn failback(v: &SwitchoverReport, out: &mut String) {
    region_move(out, v, "fail-back ");
    if let Some(d) = &v.divergence {
        divergence(d, out);
    }
    if let Some(ms) = v.took_ms {
        let _ = writeln!(out, "took {ms} ms");
    }
}

/// `from -> to (region epoch)` and the plan's steps of a failover or
/// fail-back answer.
fn region_move(out: &mut String, v: &SwitchoverReport, what: &str) {
    let _ = writeln!(
        out,
        "{}{what}{} -> {} (region epoch {})",
        if v.dry_run { "plan: " } else { "" },
        v.from,
        v.to,
        v.epoch
    );
    for s in &v.steps {
        let _ = writeln!(out, "  - {s}");
    }
}

/// The divergence report of a fail-back, for people.
pub fn divergence(d: &DivergenceReport, out: &mut String) {
    if d.jobs.is_empty() {
        let _ = writeln!(
            out,
            "divergence: none ({} committed nothing beyond what the failover restored)",
            d.region
        );
        return;
    }
    let _ = writeln!(
        out,
        "divergence: {} committed {} output records ({} input records, {} ms of event time) after the checkpoints the failover restored from:",
        d.region, d.records_out, d.records_in, d.event_time_ms
    );
    let rows: Vec<Vec<String>> = d
        .jobs
        .iter()
        .map(|j| {
            vec![
                j.job.map(|id| id.to_string()).unwrap_or_else(|| "-".into()),
                j.base
                    .as_ref()
                    .map(|b| b.checkpoint.to_string())
                    .unwrap_or_else(|| "-".into()),
                j.checkpoints
                    .iter()
                    .map(u64::to_string)
                    .collect::<Vec<_>>()
                    .join(","),
                j.records_out.to_string(),
                j.event_time_ms.to_string(),
            ]
        })
        .collect();
    let mut t = Table::new(&[
        ("JOB", Align::Left),
        ("BASE", Align::Right),
        ("DIVERGED CHECKPOINTS", Align::Left),
        ("RECORDS OUT", Align::Right),
        ("EVENT MS", Align::Right),
    ]);
    for r in rows {
        t.row(r);
    }
    for line in t.render().lines() {
        let _ = writeln!(out, "  {line}");
    }
    let _ = writeln!(
        out,
        "  (their manifests are archived under jobs/<id>/diverged/ in {}'s store)",
        d.region
    );
}

/// A drill's verdict and phases.
pub fn drill_report(r: &DrillReport, out: &mut String) {
    let verdict = if r.passed { "PASS" } else { "FAIL" };
    let _ = writeln!(
        out,
        "drill {} {}: {} -> {}  {verdict}",
        r.scenario, r.id, r.from, r.to,
    );
    let phase = |v: Option<u64>| v.map(|m| format!("{m} ms")).unwrap_or_else(|| "-".into());
    for (name, v) in [
        ("detection", r.detection_ms),
        ("promotion", r.promotion_ms),
        ("restore", r.restore_ms),
        ("first output", r.first_output_ms),
    ] {
        let _ = writeln!(out, "  {name:<13} {:>10}", phase(v));
    }
    let _ = writeln!(
        out,
        "  {:<13} {:>10}   target {} ms",
        "RTO",
        phase(r.rto_ms),
        r.targets.rto_ms
    );
    let _ = writeln!(
        out,
        "  {:<13} {:>7} ms   event time, {} input records ({} output records); target {} ms",
        "RPO", r.rpo_event_time_ms, r.rpo_records, r.rpo_records_out, r.targets.rpo_event_time_ms
    );
    if let Some(mode) = &r.replication {
        let _ = writeln!(out, "  {:<13} {mode}", "replication");
    }
    if let Some(mode) = &r.standby {
        let _ = writeln!(out, "  {:<13} {mode}", "standby");
    }
    for f in &r.failures {
        let _ = writeln!(out, "  FAILED: {f}");
    }
    match &r.revert {
        None => {}
        Some(DrillRevert::Failed { error }) => {
            let _ = writeln!(out, "  revert: FAILED: {error}");
        }
        Some(DrillRevert::Done(rev)) => {
            let (records_out, event_ms) = match &rev.divergence {
                Some(d) => (d.records_out.to_string(), d.event_time_ms.to_string()),
                None => ("null".into(), "null".into()),
            };
            let _ = writeln!(
                out,
                "  revert: back in {} (region epoch {}); divergence: {records_out} output records, {event_ms} ms of event time",
                rev.to, rev.epoch,
            );
        }
    }
    let _ = writeln!(
        out,
        "  report: GET /v1/drills/{} in {}",
        r.id,
        if r.promotion_ms.is_none() {
            &r.from
        } else {
            &r.to
        }
    );
}

/// Time since `t`, compact: `42s`, `5m12s`, `3h4m`, `2d5h`.
pub fn age(t: DateTime<Utc>, now: DateTime<Utc>) -> String {
    let s = (now - t).num_seconds().max(0);
    match s {
        s if s < 60 => format!("{s}s"),
        s if s < 600 => format!("{}m{}s", s / 60, s % 60),
        s if s < 3600 => format!("{}m", s / 60),
        s if s < 86_400 => format!("{}h{}m", s / 3600, s % 3600 / 60),
        s => format!("{}d{}h", s / 86_400, s % 86_400 / 3600),
    }
}

/// A count for people: `950`, `33.5k`, `1.20M`, `3.00G`.
pub fn count(n: u64) -> String {
    match n {
        n if n >= 1_000_000_000 => format!("{:.2}G", n as f64 / 1e9),
        n if n >= 1_000_000 => format!("{:.2}M", n as f64 / 1e6),
        n if n >= 10_000 => format!("{:.1}k", n as f64 / 1e3),
        n => n.to_string(),
    }
}

/// A size for people: `512 B`, `3.5 KiB`, `1.2 MiB`, `2.0 GiB`.
pub fn bytes(n: u64) -> String {
    match n {
        n if n >= 1 << 30 => format!("{:.1} GiB", n as f64 / (1u64 << 30) as f64),
        n if n >= 1 << 20 => format!("{:.1} MiB", n as f64 / (1u64 << 20) as f64),
        n if n >= 1 << 10 => format!("{:.1} KiB", n as f64 / 1024.0),
        n => format!("{n} B"),
    }
}

/// How a column's cells line up.
#[derive(Clone, Copy)]
pub enum Align {
    Left,
    Right,
}

/// Columns padded to their widest cell, two spaces apart.
pub struct Table {
    columns: Vec<(&'static str, Align)>,
    rows: Vec<Vec<String>>,
}

impl Table {
    pub fn new(columns: &[(&'static str, Align)]) -> Self {
        Self {
            columns: columns.to_vec(),
            rows: Vec::new(),
        }
    }

    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    pub fn render(&self) -> String {
        let widths: Vec<usize> = self
            .columns
            .iter()
            .enumerate()
            .map(|(i, (h, _))| {
                self.rows
                    .iter()
                    .map(|r| r.get(i).map_or(0, |c| c.chars().count()))
                    .chain([h.len()])
                    .max()
                    .unwrap_or(0)
            })
            .collect();
        let mut out = String::new();
        let header: Vec<String> = self.columns.iter().map(|(h, _)| h.to_string()).collect();
        for cells in std::iter::once(&header).chain(&self.rows) {
            let mut line = String::new();
            for (i, ((_, align), w)) in self.columns.iter().zip(&widths).enumerate() {
                let cell = cells.get(i).map_or("", String::as_str);
                if i > 0 {
                    line.push_str("  ");
                }
                match align {
                    Align::Left => line.push_str(&format!("{cell:<w$}")),
                    Align::Right => line.push_str(&format!("{cell:>w$}")),
                }
            }
            out.push_str(line.trim_end());
            out.push('\n');
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_align_columns() {
        let mut t = Table::new(&[("ID", Align::Left), ("N", Align::Right), ("X", Align::Left)]);
        t.row(vec!["abc".into(), "5".into(), "".into()]);
        t.row(vec!["a".into(), "1234".into(), "z".into()]);
        assert_eq!(t.render(), "ID      N  X\nabc     5\na    1234  z\n");
    }

    #[test]
    fn ages_are_compact() {
        let now = Utc::now();
        let ago = |s| age(now - chrono::Duration::seconds(s), now);
        assert_eq!(ago(5), "5s");
        assert_eq!(ago(312), "5m12s");
        assert_eq!(ago(1800), "30m");
        assert_eq!(ago(3 * 3600 + 240), "3h4m");
        assert_eq!(ago(2 * 86_400 + 5 * 3600), "2d5h");
        assert_eq!(ago(-5), "0s");
    }

    #[test]
    fn counts_and_sizes_are_compact() {
        assert_eq!(count(950), "950");
        assert_eq!(count(33_485), "33.5k");
        assert_eq!(count(1_200_000), "1.20M");
        assert_eq!(bytes(512), "512 B");
        assert_eq!(bytes(3 * 1024 + 512), "3.5 KiB");
        assert_eq!(bytes(5 << 30), "5.0 GiB");
    }

    #[test]
    fn unreachable_urls_are_each_named_with_a_way_out() {
        let mut out = String::new();
        failure(
            &Error::Unreachable(vec![
                ("http://127.0.0.1:1".into(), "connection refused".into()),
                ("http://127.0.0.1:2".into(), "timed out".into()),
            ]),
            &mut out,
        );
        assert!(
            out.starts_with("error: cannot reach any JobManager; tried:\n"),
            "{out}"
        );
        assert!(
            out.contains("  - http://127.0.0.1:1: connection refused\n"),
            "{out}"
        );
        assert!(out.contains("  - http://127.0.0.1:2: timed out\n"), "{out}");
        assert!(out.contains("--url URL or FERRY_URL"), "{out}");
    }
}
