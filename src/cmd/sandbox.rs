//! `ferry sandbox --regions N`: a whole multi-region Ferry on loopback, for
//! demos and drills (`ferry_lab::sandbox`). It runs until Ctrl-C or
//! SIGTERM and then stops every process it started.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use ferry_lab::sandbox::{Description, Progress, Sandbox, SandboxOptions};

#[derive(clap::Args, Debug)]
pub struct SandboxArgs {
    /// Number of regions (1 to 5).
    #[arg(long, default_value_t = 3)]
    regions: usize,
    /// JobManagers per region (one leads, the others stand by).
    #[arg(long, default_value_t = 1)]
    jobmanagers: usize,
    /// TaskManagers per region (4 slots each).
    #[arg(long, default_value_t = 1)]
    taskmanagers: usize,
    /// Directory for the stores, NATS data, configs and logs; created, and
    /// must be empty if it exists.
    #[arg(long, default_value = "ferry-sandbox")]
    dir: PathBuf,
    /// A region silent this long is down (`regions.timeout`).
    #[arg(long, value_parser = humantime::parse_duration, default_value = "5s")]
    region_timeout: Duration,
    /// Once everything is up, write the sandbox's description (regions,
    /// URLs, PIDs) as JSON to this file.
    #[arg(long, value_name = "FILE")]
    ready_file: Option<PathBuf>,
    /// Also let jobs use this path, storage URL prefix or NATS server
    /// (repeatable; `*` for anything). Jobs may always use the working
    /// directory, the sandbox's directory and NATS servers on this machine.
    #[arg(long, value_name = "URL")]
    allow: Vec<String>,
}

fn killed(name: &str, after: Duration) {
    eprintln!("{name} did not stop within {after:?}: killing it");
}

pub fn run(args: SandboxArgs) -> anyhow::Result<ExitCode> {
    let opts = SandboxOptions {
        ferry: std::env::current_exe().context("locating the ferry binary")?,
        regions: args.regions,
        jobmanagers: args.jobmanagers,
        taskmanagers: args.taskmanagers,
        dir: args.dir,
        region_timeout: args.region_timeout,
        allow: args.allow.clone(),
    };
    let mut sandbox = Sandbox::start(&opts, |p| match p {
        Progress::GlobalUp(urls) => eprintln!("global NATS cluster up: {}", urls.join(",")),
        Progress::RegionStarted { region, apis } => {
            eprintln!("region {region} started: API {}", apis.join(","))
        }
    })?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(sandbox.wait_ready(&mut killed))?;
    if let Some(f) = &args.ready_file {
        let description = serde_json::to_value(&sandbox.description)?;
        std::fs::write(f, serde_json::to_vec_pretty(&description)?)
            .with_context(|| format!("writing {}", f.display()))?;
    }
    print_summary(&sandbox.description, sandbox.regions());

    // Run until asked to stop; report processes that die meanwhile.
    let dir = sandbox.dir().to_path_buf();
    rt.block_on(async {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        let stop = super::process::shutdown_signal();
        tokio::pin!(stop);
        loop {
            tokio::select! {
                _ = &mut stop => break,
                _ = tick.tick() => {}
            }
            for (name, status) in sandbox.exited() {
                eprintln!("{name} exited ({status}); its log is in {}", dir.display());
            }
        }
    });
    eprintln!("stopping the sandbox ...");
    sandbox.stop(&mut killed);
    eprintln!("sandbox stopped; its data stays in {}", dir.display());
    Ok(ExitCode::SUCCESS)
}

fn print_summary(d: &Description, regions: &[&str]) {
    println!(
        "Ferry sandbox: {} region(s) on loopback, data in {}",
        regions.len(),
        d.dir
    );
    println!(
        "\n{:<10} {:<8} {:<24} {:<24} STORE",
        "REGION", "ROLE", "API", "NATS"
    );
    for r in &d.regions {
        println!(
            "{:<10} {:<8} {:<24} {:<24} {}",
            r.name,
            if r.primary { "primary" } else { "standby" },
            r.api.first().map_or("-", String::as_str),
            r.nats,
            r.store
        );
    }
    let api0 = d.regions[0].api.first().map_or("-", String::as_str);
    let target = regions.get(1).copied().unwrap_or("REGION");
    println!("\nglobal NATS: {}", d.global.join(","));
    println!("\nTry:");
    println!("  ferry job submit JOB.yaml --url {api0}");
    println!("  ferry region status --url {api0}");
    if regions.len() > 1 {
        println!(
            "  ferry drill run --scenario region-outage --target {target} --rto 30s --url {api0}"
        );
        println!("  ferry region failback --url {api0}");
    }
    println!("Logs are next to each region's store. Ctrl-C stops everything.");
}
