//! `ferry job submit|list|get|cancel|savepoint|checkpoints`: the JobManager
//! REST API (`docs/api.md`) through `ferry_client`, printing tables or the
//! server's JSON; and what every API command shares: `--url`/`--output`,
//! the client over them, and how an API failure is shown.

use std::fmt::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use chrono::{DateTime, Utc};
use ferry_client::{Answer, Client, DEFAULT_URL, Error};
use ferry_core::api::{CancelResponse, CheckpointInfo, JobInfo, SavepointInfo};

use super::local::human_bytes;

/// Exit code for an API error.
const EXIT_ERROR: u8 = 1;
/// Exit code for a spec the server rejected (as `ferry validate`).
const EXIT_INVALID_SPEC: u8 = 2;

/// Options every `ferry job` command takes.
#[derive(clap::Args, Debug, Clone)]
pub struct ApiArgs {
    /// JobManager REST URL. A comma-separated list (every JobManager of the
    /// region) is tried in order while a URL cannot be connected to or has
    /// no leader to forward a write to.
    #[arg(
        long,
        env = "FERRY_URL",
        default_value = DEFAULT_URL,
        value_delimiter = ',',
        value_name = "URL[,URL...]"
    )]
    pub url: Vec<String>,
    /// Output format.
    #[arg(long, short = 'o', value_enum, default_value_t = Output::Table)]
    pub output: Output,
}

/// How results are printed.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Output {
    /// Aligned columns and key: value blocks for people.
    Table,
    /// The server's JSON, pretty-printed, for scripts.
    Json,
}

#[derive(clap::Subcommand, Debug)]
pub enum JobCommand {
    /// Submit a job spec file (YAML or JSON; `-` reads stdin).
    Submit {
        /// The job spec to submit: a YAML or JSON file, or `-` for
        /// standard input.
        #[arg(value_name = "FILE")]
        file: PathBuf,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// List jobs, newest first.
    List {
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Show one job (by id, id prefix of 4+ characters, or name).
    Get {
        id: String,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Cancel a job, optionally taking a savepoint first.
    Cancel {
        id: String,
        /// Take a savepoint before stopping (resume it with
        /// `ferry local FILE --from-savepoint PATH`).
        #[arg(long)]
        savepoint: bool,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Take a savepoint of a running job; the job keeps running.
    Savepoint {
        id: String,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// List a job's completed checkpoints and savepoints, newest first.
    Checkpoints {
        id: String,
        #[command(flatten)]
        api: ApiArgs,
    },
}

pub fn run(c: JobCommand) -> anyhow::Result<ExitCode> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(run_async(c))
}

async fn run_async(c: JobCommand) -> anyhow::Result<ExitCode> {
    let result = match c {
        JobCommand::Submit { file, api } => {
            let (text, content_type) = read_spec(&file)?;
            let call = client(&api)?.submit(text, content_type).await;
            show(api.output, call, print_submitted)
        }
        JobCommand::List { api } => {
            let call = client(&api)?.jobs().await;
            show(api.output, call, |list, out| print_jobs(&list.jobs, out))
        }
        JobCommand::Get { id, api } => {
            let call = client(&api)?.job(&id).await;
            show(api.output, call, print_job)
        }
        JobCommand::Cancel { id, savepoint, api } => {
            let call = client(&api)?.cancel(&id, savepoint).await;
            show(api.output, call, print_cancelled)
        }
        JobCommand::Savepoint { id, api } => {
            let call = client(&api)?.savepoint(&id).await;
            show(api.output, call, print_savepoint)
        }
        JobCommand::Checkpoints { id, api } => {
            let call = client(&api)?.checkpoints(&id).await;
            show(api.output, call, |list, out| {
                print_checkpoints(&list.checkpoints, out)
            })
        }
    };
    Ok(result)
}

/// Prints an answer (the server's JSON, or `table`'s form of it) or the
/// failure; the exit code.
pub(crate) fn show<T>(
    output: Output,
    call: Result<Answer<T>, Error>,
    table: impl FnOnce(&T, &mut String),
) -> ExitCode {
    match call {
        Ok(a) => {
            print_result(output, &a.raw, |out| table(&a.value, out));
            ExitCode::SUCCESS
        }
        Err(e) => report_failure(&e),
    }
}

/// The spec text and the content type to send it with.
fn read_spec(file: &PathBuf) -> anyhow::Result<(Vec<u8>, Option<&'static str>)> {
    if file.as_os_str() == "-" {
        let mut buf = Vec::new();
        std::io::Read::read_to_end(&mut std::io::stdin(), &mut buf)
            .context("cannot read the job spec from stdin")?;
        return Ok((buf, None));
    }
    let text =
        std::fs::read(file).with_context(|| format!("cannot read job spec {}", file.display()))?;
    let json = file
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("json"));
    Ok((
        text,
        Some(if json {
            "application/json"
        } else {
            "application/yaml"
        }),
    ))
}

/// The client of `--url`, noting on stderr every URL it skips.
pub(crate) fn client(args: &ApiArgs) -> anyhow::Result<Client> {
    Ok(
        Client::new(&args.url)?.on_skip(Arc::new(|skipped, reason, base| {
            emit(
                &mut std::io::stderr(),
                &format!("note: {skipped} skipped ({reason}); answered by {base}\n"),
            )
        })),
    )
}

// ---- Showing a failure ----

/// Prints a failed request as `error: ...` plus detail lines; the exit
/// code.
pub(crate) fn report_failure(e: &Error) -> ExitCode {
    let mut err = String::new();
    let code = describe(e, &mut err);
    emit(&mut std::io::stderr(), &err);
    code
}

/// Writes the failure for a person; returns the exit code.
fn describe(e: &Error, err: &mut String) -> ExitCode {
    match e {
        Error::Api {
            url,
            status,
            body: Some(body),
            ..
        } => {
            let e = &body.error;
            let _ = writeln!(err, "error: {}", e.message);
            for d in &e.details {
                let _ = writeln!(err, "  - {d}");
            }
            tracing::debug!(%url, %status, code = %e.code, "API error");
            ExitCode::from(if e.code == "invalid_spec" {
                EXIT_INVALID_SPEC
            } else {
                EXIT_ERROR
            })
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
            ExitCode::from(EXIT_ERROR)
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
            ExitCode::from(EXIT_ERROR)
        }
        Error::Transport { url, reason } => {
            let _ = writeln!(err, "error: request to {url} failed: {reason}");
            let _ = writeln!(
                err,
                "  the JobManager may still have acted on it; check with `ferry job list`"
            );
            ExitCode::from(EXIT_ERROR)
        }
    }
}

// ---- Printing ----

/// Prints the server's JSON or the table form of a result to stdout.
pub(crate) fn print_result(
    output: Output,
    raw: &serde_json::Value,
    table: impl FnOnce(&mut String),
) {
    let mut out = String::new();
    match output {
        Output::Json => {
            let _ = writeln!(
                out,
                "{}",
                serde_json::to_string_pretty(raw).unwrap_or_else(|_| raw.to_string())
            );
        }
        Output::Table => table(&mut out),
    }
    emit(&mut std::io::stdout(), &out);
}

/// Writes text out, ignoring a closed pipe (`ferry job list | head`).
fn emit(w: &mut impl std::io::Write, text: &str) {
    let _ = w.write_all(text.as_bytes()).and_then(|()| w.flush());
}

fn print_submitted(job: &JobInfo, out: &mut String) {
    let _ = writeln!(
        out,
        "submitted job '{}' as {} ({})",
        job.name, job.id, job.state
    );
    let _ = writeln!(out, "  follow it with `ferry job get {}`", job.id.short());
}

fn print_jobs(jobs: &[JobInfo], out: &mut String) {
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

fn print_job(j: &JobInfo, out: &mut String) {
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

fn checkpoint_summary(c: &CheckpointInfo, now: DateTime<Utc>) -> String {
    format!(
        "#{} {}, {} ago, {} ms, {}{}",
        c.id,
        c.kind,
        age(c.completed_at, now),
        c.duration_ms,
        human_bytes(c.size_bytes),
        if c.finished { ", final" } else { "" }
    )
}

fn print_cancelled(res: &CancelResponse, out: &mut String) {
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

fn print_savepoint(sp: &SavepointInfo, out: &mut String) {
    let _ = writeln!(
        out,
        "savepoint {} of job {} written to {}",
        sp.checkpoint_id,
        sp.job_id.short(),
        sp.path
    );
}

fn print_checkpoints(cps: &[CheckpointInfo], out: &mut String) {
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
            human_bytes(c.size_bytes),
            c.records_in.to_string(),
            c.records_out.to_string(),
            c.path.clone(),
        ]);
    }
    out.push_str(&t.render());
}

/// Time since `t`, compact: `42s`, `5m12s`, `3h4m`, `2d5h`.
fn age(t: DateTime<Utc>, now: DateTime<Utc>) -> String {
    let s = (now - t).num_seconds().max(0);
    match s {
        s if s < 60 => format!("{s}s"),
        s if s < 600 => format!("{}m{}s", s / 60, s % 60),
        s if s < 3600 => format!("{}m", s / 60),
        s if s < 86_400 => format!("{}h{}m", s / 3600, s % 3600 / 60),
        s => format!("{}d{}h", s / 86_400, s % 86_400 / 3600),
    }
}

#[derive(Clone, Copy)]
pub(crate) enum Align {
    Left,
    Right,
}

/// Columns padded to their widest cell, two spaces apart.
pub(crate) struct Table {
    columns: Vec<(&'static str, Align)>,
    rows: Vec<Vec<String>>,
}

impl Table {
    pub(crate) fn new(columns: &[(&'static str, Align)]) -> Self {
        Self {
            columns: columns.to_vec(),
            rows: Vec::new(),
        }
    }

    pub(crate) fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    pub(crate) fn render(&self) -> String {
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
}
