//! The sandbox (`ferry sandbox`): a whole multi-region Ferry on loopback,
//! for demos and drills. Per region: a NATS server with JetStream (the
//! region's coordination), a file store, JobManagers and TaskManagers;
//! across regions: a 3-node global NATS cluster (one node per region, the
//! rest witnesses; buckets with 3 replicas) holding the region lease and
//! the region heartbeats. The first region is the primary. Everything lives
//! under one directory; [`Sandbox::stop`] stops every process it started
//! (SIGTERM first, so JobManagers hand over cleanly), and dropping it kills
//! what still runs.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use ferry_client::Client;
use ferry_testkit::nats::{NatsConfig, NatsProcess};
use ferry_testkit::try_free_port;
use serde::Serialize;

use crate::procs::{START_LIMIT, find_nats_server, nats_starter, signal, start_cluster};

/// Names of the simulated regions, in order.
pub const REGION_NAMES: &[&str] = &["eu-west", "us-east", "ap-south", "sa-east", "af-south"];
/// Nodes of the global NATS cluster.
const GLOBAL_NODES: usize = 3;
/// How long the whole sandbox may take to come up.
const READY_TIMEOUT: Duration = Duration::from_secs(90);
/// How long a process may take to stop after SIGTERM.
const STOP_TIMEOUT: Duration = Duration::from_secs(15);

/// What to start.
#[derive(Clone, Debug)]
pub struct SandboxOptions {
    /// The `ferry` executable to start.
    pub ferry: PathBuf,
    /// Number of regions (1 to 5).
    pub regions: usize,
    /// JobManagers per region.
    pub jobmanagers: usize,
    /// TaskManagers per region (4 slots each).
    pub taskmanagers: usize,
    /// Directory for everything; created, and must be empty if it exists.
    pub dir: PathBuf,
    /// `regions.timeout`.
    pub region_timeout: Duration,
    /// What jobs may use beyond the working directory, the sandbox's
    /// directory and NATS on this machine (`security.allowedUrls`).
    pub allow: Vec<String>,
}

/// What happens while the sandbox starts.
#[derive(Debug)]
pub enum Progress<'a> {
    /// The global NATS cluster listens at these URLs.
    GlobalUp(&'a [String]),
    /// A region runs, its JobManagers' API at these URLs.
    RegionStarted { region: &'a str, apis: &'a [String] },
}

/// A running sandbox as `--ready-file` describes it.
#[derive(Serialize, Clone, Debug)]
pub struct Description {
    pub dir: String,
    /// The global NATS cluster's URLs.
    pub global: Vec<String>,
    pub regions: Vec<RegionDescription>,
    /// Every process started, NATS first.
    pub pids: Vec<u32>,
}

/// One region of the sandbox.
#[derive(Serialize, Clone, Debug)]
pub struct RegionDescription {
    pub name: String,
    pub primary: bool,
    /// Its JobManagers' REST URLs.
    pub api: Vec<String>,
    /// Its TaskManagers' HTTP URLs (health, metrics).
    pub taskmanagers: Vec<String>,
    pub nats: String,
    pub store: String,
    /// Where its processes' logs are.
    pub logs: String,
}

/// A process the sandbox started; SIGKILLed on drop if still running.
struct Proc {
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
    /// SIGTERM, then SIGKILL after [`STOP_TIMEOUT`] (telling `killed`).
    fn stop(&mut self, killed: &mut dyn FnMut(&str, Duration)) {
        if let Ok(Some(_)) = self.child.try_wait() {
            return;
        }
        signal(self.child.id(), libc::SIGTERM);
        let start = Instant::now();
        while start.elapsed() < STOP_TIMEOUT {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        killed(&self.name, STOP_TIMEOUT);
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
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

/// A running sandbox.
pub struct Sandbox {
    procs: Vec<Proc>,
    dir: PathBuf,
    regions: Vec<&'static str>,
    exited: std::collections::BTreeSet<String>,
    pub description: Description,
}

impl Sandbox {
    /// Starts every process (each listening before the next starts).
    pub fn start(
        args: &SandboxOptions,
        mut progress: impl FnMut(Progress<'_>),
    ) -> anyhow::Result<Self> {
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
        let ferry = &args.ferry;
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
        let regions: Vec<&'static str> = REGION_NAMES[..args.regions].to_vec();
        let mut procs: Vec<Proc> = Vec::new();

        // The global cluster.
        let global = start_cluster(&nats_bin, &dir.join("global"), GLOBAL_NODES)?;
        let global_urls: Vec<String> = global.iter().map(NatsProcess::url).collect();
        procs.extend(global.into_iter().map(Proc::from));
        progress(Progress::GlobalUp(&global_urls));

        let cwd = std::env::current_dir()?;
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
            // This region's global node first (a region beyond the third
            // uses the cluster as it comes).
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
                // As `ferry local`: the working directory, the sandbox's
                // directory and NATS on this machine.
                (
                    "FERRY_SECURITY_ALLOWED_URLS",
                    [cwd.display().to_string(), dir.display().to_string()]
                        .into_iter()
                        .chain(["nats://127.0.0.1".to_string()])
                        .chain(args.allow.iter().cloned())
                        .collect::<Vec<_>>()
                        .join(","),
                ),
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
                let mut cmd = Command::new(ferry);
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
                let mut cmd = Command::new(ferry);
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
            progress(Progress::RegionStarted {
                region,
                apis: &apis,
            });
            described.push(RegionDescription {
                name: region.to_string(),
                primary: ri == 0,
                api: apis,
                taskmanagers: tms,
                nats: nats_url,
                store: format!("file://{}", rdir.join("store").display()),
                logs: rdir.display().to_string(),
            });
        }
        let description = Description {
            dir: dir.display().to_string(),
            global: global_urls,
            regions: described,
            pids: procs.iter().map(|p| p.child.id()).collect(),
        };
        Ok(Self {
            procs,
            dir,
            regions,
            exited: Default::default(),
            description,
        })
    }

    /// The sandbox's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The regions' names, the primary first.
    pub fn regions(&self) -> &[&'static str] {
        &self.regions
    }

    /// Waits until the first region's JobManager reads the region lease and
    /// sees every region healthy; otherwise stops everything (telling
    /// `killed` about processes that had to be killed).
    pub async fn wait_ready(
        &mut self,
        killed: &mut dyn FnMut(&str, Duration),
    ) -> anyhow::Result<()> {
        let api0 = self.description.regions[0].api[0].clone();
        if let Err(e) = wait_ready(&api0, &self.regions).await {
            self.stop(killed);
            return Err(e.context(format!(
                "the sandbox did not come up; logs are in {}",
                self.dir.display()
            )));
        }
        Ok(())
    }

    /// Processes that exited since the last call: `(name, status)`.
    pub fn exited(&mut self) -> Vec<(String, ExitStatus)> {
        let mut out = Vec::new();
        for p in self.procs.iter_mut() {
            if let Ok(Some(status)) = p.child.try_wait()
                && self.exited.insert(p.name.clone())
            {
                out.push((p.name.clone(), status));
            }
        }
        out
    }

    /// Stops every process: JobManagers and TaskManagers first (they hand
    /// over and let go of their leases), NATS last; `killed` hears of each
    /// that did not stop in time.
    pub fn stop(&mut self, killed: &mut dyn FnMut(&str, Duration)) {
        for p in self.procs.iter_mut().rev() {
            p.stop(killed);
        }
    }
}

/// Waits until the JobManager at `api` reads the region lease naming the
/// first of `regions` and sees every region healthy.
async fn wait_ready(api: &str, regions: &[&str]) -> anyhow::Result<()> {
    let client = Client::local(api)?.with_timeout(Duration::from_secs(2));
    let start = Instant::now();
    let mut last = serde_json::Value::Null;
    while start.elapsed() < READY_TIMEOUT {
        if let Ok(a) = client.regions().await {
            let v = &a.value;
            let healthy = v.regions.iter().filter(|r| r.healthy).count();
            if v.epoch.0 > 0 && v.primary.as_deref() == Some(regions[0]) && healthy == regions.len()
            {
                return Ok(());
            }
            last = a.raw;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    bail!("not every region became healthy within {READY_TIMEOUT:?}: {last}")
}
