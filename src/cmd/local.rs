//! `ferry local [JOB]`: a JobManager and TaskManager in this process, no
//! servers needed. Runs the given job (resuming it from its newest
//! checkpoint after a crash), shows progress, serves the REST API, and on
//! Ctrl-C takes a savepoint and exits.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::Context;
use ferry_core::spec::{JobSpec, parse_and_validate};
use ferry_core::storage::StorageLocation;
use ferry_jobmanager::service::SubmitOptions;
use ferry_jobmanager::store::PreviousRun;
use ferry_jobmanager::{JobInfo, JobManager, JobManagerConfig, JobState};
use ferry_taskmanager::sink::FileSink;
use tokio_util::sync::CancellationToken;

#[derive(clap::Args, Debug)]
pub struct LocalArgs {
    /// Job spec file (YAML or JSON). Without it, `ferry local` runs an empty
    /// local cluster that accepts jobs over the REST API until Ctrl-C.
    pub file: Option<PathBuf>,
    /// Storage root for checkpoints and job specs (path or object store URL).
    #[arg(long, env = "FERRY_DATA_DIR", default_value = "./ferry-data")]
    pub data_dir: String,
    /// Address of the REST API. If the port is taken, a free one is used.
    #[arg(long, env = "FERRY_LISTEN", default_value = "127.0.0.1:8081")]
    pub listen: String,
    /// Start from this savepoint (or checkpoint) directory.
    #[arg(long, value_name = "PATH")]
    pub from_savepoint: Option<String>,
    /// Start over instead of resuming the job's newest checkpoint.
    #[arg(long)]
    pub fresh: bool,
    /// Never draw the progress line (also off when stderr is not a terminal).
    #[arg(long)]
    pub no_progress: bool,
    /// Log format: text or json.
    #[arg(long, env = "FERRY_LOG_FORMAT", default_value = "text")]
    pub log_format: String,
    /// Also let jobs use this path, storage URL prefix or NATS server
    /// (repeatable; `*` for anything). Jobs may always use the working
    /// directory, the data directory and NATS servers on this machine.
    #[arg(long, value_name = "URL")]
    pub allow: Vec<String>,
    /// Memory for keyed window state, all jobs together (e.g. `512MiB`;
    /// at least 16MiB). Set, window state lives in an embedded store on
    /// local disk (--state-dir) and may be larger than memory; unset, it
    /// stays in memory, which is faster.
    #[arg(long, env = "FERRY_STATE_MEMORY", value_name = "SIZE")]
    pub state_memory: Option<bytesize::ByteSize>,
    /// Directory of the state store (default: `state` in the data
    /// directory, or `<temp dir>/ferry-state/local` when the data
    /// directory is an object store). Wiped at start: its content is
    /// rebuilt from checkpoints.
    #[arg(
        long,
        env = "FERRY_STATE_DIR",
        value_name = "DIR",
        requires = "state_memory"
    )]
    pub state_dir: Option<PathBuf>,
}

pub fn run(args: LocalArgs) -> anyhow::Result<ExitCode> {
    let spec = match &args.file {
        Some(f) => {
            let text = std::fs::read_to_string(f)
                .with_context(|| format!("cannot read job spec {}", f.display()))?;
            match parse_and_validate(&text) {
                Ok(s) => Some(s),
                Err(errs) => {
                    eprintln!("{}: invalid job spec\n{errs}", f.display());
                    eprintln!(
                        "(run `{} validate {}` for details)",
                        crate::cmd::self_command(),
                        crate::cmd::shell_quote(&f.display().to_string())
                    );
                    return Ok(ExitCode::from(2));
                }
            }
        }
        None => None,
    };
    let interactive = std::io::stderr().is_terminal() && !args.no_progress;
    crate::cmd::init_logging(&args.log_format, interactive, "ferry-local");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(run_async(args, spec, interactive))
}

async fn run_async(
    args: LocalArgs,
    spec: Option<JobSpec>,
    interactive: bool,
) -> anyhow::Result<ExitCode> {
    // Absolute and without `.` segments (the default `./ferry-data` would
    // print as `/home/me/./ferry-data/...`), so that every path printed can
    // be used from anywhere.
    let data_url = if args.data_dir.contains("://") {
        args.data_dir.clone()
    } else {
        StorageLocation::parse(&args.data_dir)?.path
    };
    let mut allowed = vec![
        std::env::current_dir()?.display().to_string(),
        data_url.clone(),
        "nats://127.0.0.1".to_string(),
        "nats://localhost".to_string(),
        "nats://[::1]".to_string(),
    ];
    allowed.extend(args.allow.iter().cloned());
    let access = ferry_core::access::AccessPolicy::new(
        &allowed,
        &Default::default(),
        "ferry local: the working directory, the data directory, NATS on this machine and --allow",
    )
    .map_err(|e| anyhow::anyhow!("--allow: {e}"))?;
    if let Some(m) = args.state_memory {
        ferry_core::config::check_state_memory("--state-memory", m).map_err(anyhow::Error::msg)?;
    }
    let state_dir = args.state_dir.clone().or_else(|| {
        (!args.data_dir.contains("://")).then(|| PathBuf::from(&data_url).join("state"))
    });
    ferry_taskmanager::state::configure_from(
        args.state_memory.map(|m| m.as_u64()),
        state_dir.as_deref(),
        "local",
    )
    .map_err(|e| anyhow::anyhow!("--state-memory: {e}"))?;
    let jm = JobManager::new(JobManagerConfig {
        data_url,
        instance_id: "local".to_string(),
        access,
    });
    let api_stop = CancellationToken::new();
    let listener = match tokio::net::TcpListener::bind(&args.listen).await {
        Ok(l) => l,
        Err(e) => {
            let l = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
            tracing::warn!(
                "cannot listen on {} ({e}); using {} instead",
                args.listen,
                l.local_addr()?
            );
            l
        }
    };
    let addr = listener.local_addr()?;
    eprintln!("REST API listening on http://{addr}");
    let api = tokio::spawn(ferry_jobmanager::api::serve(
        jm.clone(),
        listener,
        api_stop.clone(),
    ));

    let Some(spec) = spec else {
        eprintln!(
            "local cluster ready; submit jobs with `{} job submit FILE --url http://{addr}`; Ctrl-C stops",
            crate::cmd::self_command()
        );
        tokio::signal::ctrl_c().await?;
        eprintln!("stopping: taking savepoints of running jobs...");
        jm.shutdown(true).await;
        api_stop.cancel();
        let _ = api.await;
        return Ok(ExitCode::SUCCESS);
    };

    let mut opts = SubmitOptions {
        from_savepoint: args.from_savepoint.clone(),
        ..Default::default()
    };
    if opts.from_savepoint.is_none() && !args.fresh {
        let name = &spec.metadata.name;
        match jm.previous_run(&spec).await? {
            Some(PreviousRun::Resumable { id, checkpoint }) => {
                eprintln!(
                    "resuming job '{name}' ({id}) from checkpoint {checkpoint}; pass --fresh to start over"
                );
                opts.job_id = Some(id);
                opts.resume = true;
            }
            Some(PreviousRun::Finished { id, checkpoint }) => {
                eprintln!(
                    "job '{name}' already ran to the end ({id}, final checkpoint {checkpoint}); running it again would write a second full set of output. Pass --fresh to run it again from the beginning."
                );
                jm.shutdown(false).await;
                api_stop.cancel();
                let _ = api.await;
                return Ok(ExitCode::from(2));
            }
            Some(PreviousRun::Damaged { id, reasons }) => {
                eprintln!(
                    "job '{name}' ({id}) has checkpoints but none can be restored: {reasons}. Starting over would repeat output it already committed. Pass --fresh to start from the beginning anyway."
                );
                jm.shutdown(false).await;
                api_stop.cancel();
                let _ = api.await;
                return Ok(ExitCode::from(2));
            }
            None => {}
        }
    }
    let started = Instant::now();
    let info = jm.submit_spec(spec.clone(), opts).await?;
    let id = info.id;
    eprintln!(
        "job '{}' ({id}) started: parallelism {}, checkpoints every {} in {}",
        info.name, info.parallelism, spec.spec.checkpointing.interval, info.checkpoint_root
    );

    let progress = Progress::new(interactive);
    let mut tick =
        tokio::time::interval(Duration::from_millis(if interactive { 250 } else { 5000 }));
    let mut interrupted = false;
    let final_state = loop {
        tokio::select! {
            r = jm.wait(id) => break r?,
            _ = tick.tick() => {
                if let Ok(info) = jm.get(&id.to_string()) {
                    progress.update(&info, started.elapsed());
                }
            }
            _ = tokio::signal::ctrl_c(), if !interrupted => {
                interrupted = true;
                progress.clear();
                eprintln!("interrupted: taking a savepoint (Ctrl-C again to quit at once)...");
                let jm2 = jm.clone();
                let sid = id.to_string();
                let stop = tokio::spawn(async move { jm2.cancel(&sid, true).await });
                tokio::select! {
                    r = stop => match r? {
                        Ok((_, Some(sp))) => {
                            eprintln!("savepoint written to {}", sp.path);
                            eprintln!(
                                "resume with: {} local {} --from-savepoint {}",
                                crate::cmd::self_command(),
                                crate::cmd::shell_quote(
                                    &args.file.as_ref().map(|f| f.display().to_string()).unwrap_or_default()
                                ),
                                crate::cmd::shell_quote(&sp.path)
                            );
                        }
                        Ok((_, None)) => {}
                        Err(e) => eprintln!("savepoint failed: {e}"),
                    },
                    _ = tokio::signal::ctrl_c() => {
                        eprintln!("quitting without a savepoint");
                        return Ok(ExitCode::from(130));
                    }
                }
            }
        }
    };
    progress.clear();
    let info = jm.get(&id.to_string())?;
    print_summary(&info, started.elapsed()).await;
    jm.shutdown(false).await;
    api_stop.cancel();
    let _ = api.await;
    Ok(match final_state {
        JobState::Finished | JobState::Cancelled => ExitCode::SUCCESS,
        _ => ExitCode::from(1),
    })
}

/// The progress line on a terminal, or periodic log lines otherwise.
struct Progress {
    bar: Option<indicatif::ProgressBar>,
    last: std::sync::Mutex<(Instant, u64)>,
}

impl Progress {
    fn new(interactive: bool) -> Self {
        let bar = interactive.then(|| {
            let b = indicatif::ProgressBar::new_spinner();
            b.enable_steady_tick(Duration::from_millis(120));
            b
        });
        Self {
            bar,
            last: std::sync::Mutex::new((Instant::now(), 0)),
        }
    }

    fn update(&self, info: &JobInfo, elapsed: Duration) {
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        let dt = last.0.elapsed().as_secs_f64().max(1e-3);
        let rate = info.records_in.saturating_sub(last.1) as f64 / dt;
        *last = (Instant::now(), info.records_in);
        let cp = info
            .last_checkpoint
            .as_ref()
            .map(|c| {
                format!(
                    "#{} ({} ms, {})",
                    c.id,
                    c.duration_ms,
                    ferry_client::text::bytes(c.size_bytes)
                )
            })
            .unwrap_or_else(|| "none yet".into());
        let msg = format!(
            "{} {:.0}s | in {} ({}/s) | out {} | watermark {} | checkpoint {}",
            info.state,
            elapsed.as_secs_f64(),
            ferry_client::text::count(info.records_in),
            ferry_client::text::count(rate as u64),
            ferry_client::text::count(info.records_out),
            info.watermark.as_deref().unwrap_or("-"),
            cp
        );
        match &self.bar {
            Some(b) => b.set_message(msg),
            None => tracing::info!(
                job = %info.id,
                state = %info.state,
                records_in = info.records_in,
                records_out = info.records_out,
                rate = rate as u64,
                watermark = info.watermark.as_deref().unwrap_or("-"),
                checkpoint = info.last_checkpoint.as_ref().map(|c| c.id).unwrap_or(0),
                "progress"
            ),
        }
    }

    fn clear(&self) {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
    }
}

async fn print_summary(info: &JobInfo, elapsed: Duration) {
    eprintln!(
        "job '{}' ({}) {} after {:.1}s",
        info.name,
        info.id,
        info.state,
        elapsed.as_secs_f64()
    );
    eprintln!("  records in:        {}", info.records_in);
    eprintln!("  records out:       {}", info.records_out);
    if info.late_records > 0 {
        eprintln!("  late records:      {} (dropped)", info.late_records);
    }
    if info.expression_errors > 0 {
        eprintln!("  expression errors: {}", info.expression_errors);
    }
    if info.skipped_records > 0 {
        eprintln!(
            "  skipped records:   {} (malformed input lines, logged above)",
            info.skipped_records
        );
    }
    if info.restarts > 0 {
        eprintln!("  restarts:          {}", info.restarts);
    }
    if let Some(cp) = &info.last_checkpoint {
        eprintln!("  last checkpoint:   #{} at {}", cp.id, cp.path);
    }
    if let Some(out) = &info.output {
        // Part files are counted for local output only (no listing of a
        // bucket). By the job's whole part-file prefix: runs started within
        // a minute share the short id, and counting by it also counted the
        // other runs' files.
        let prefix = FileSink::job_prefix(&info.id);
        match std::fs::read_dir(out) {
            Ok(dir) => {
                let files = dir
                    .filter_map(|e| e.ok())
                    .filter(|e| FileSink::is_part_of(&prefix, &e.file_name().to_string_lossy()))
                    .count();
                eprintln!("  output:            {out} ({files} part files of this run)");
            }
            Err(_) => eprintln!("  output:            {out}"),
        }
    }
    if let Some(f) = &info.failure {
        eprintln!("  failure:           {f}");
    }
}
