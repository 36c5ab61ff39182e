//! The system under test of `ferry chaos`: two regions (`east`, `west`) on
//! loopback, each with 3 JobManagers, 3 TaskManagers and a 3-node NATS
//! cluster, a 3-node global cluster between them, east's store on moto S3
//! behind the store fault proxy, west's on a small tmpfs (it can be
//! filled), and a data `nats-server` for the workload's streams.
//!
//! Every link a fault can cut or slow is a [`FaultProxy`] of its own: each
//! process reaches each node of its region's cluster, each global node and
//! the S3 store through its own proxy, JobManagers dial each TaskManager
//! through one, and TaskManagers dial each other's exchange port through
//! one per TaskManager. Clusters run with `no_advertise`, so clients
//! never learn a route around the proxies.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, bail};
use ferry_client::Client;
use ferry_core::api::RegionsStatus;
use ferry_testkit::FaultProxy;
use ferry_testkit::nats::{NatsConfig, NatsProcess, NatsStarter};
use ferry_testkit::try_free_port;

use super::store_proxy::StoreProxy;
use crate::procs::{START_LIMIT, find_nats_server, signal};

/// The regions, the home (first) primary first.
pub const REGIONS: [&str; 2] = ["east", "west"];
/// JobManagers per region.
pub const JOBMANAGERS: usize = 3;
/// TaskManagers per region: the faults of the first catalog hit the first
/// two; the third gives a drain room to move every job, the one spread
/// over two TaskManagers too.
pub const TASKMANAGERS: usize = 3;
/// Task slots per TaskManager: fewer than the `chaos-windows` job's
/// parallelism, so that it spans two TaskManagers of the primary region
/// and its records cross the exchange.
pub const TM_SLOTS: u32 = 5;
/// Nodes of every NATS cluster.
pub const NODES: usize = 3;
/// The S3 bucket of east's store.
const BUCKET: &str = "ferry-chaos-east";
/// Size of west's tmpfs store.
const TMPFS_SIZE: &str = "192m";
/// moto accepts any keys; these never leave the machine.
const AWS_KEY: &str = "chaos";
/// Region timeout and heartbeat interval. Half the timeout is the region
/// fence, which must hold through an in-region leader change (lease TTL
/// 800 ms plus a heartbeat plus a region-lease read) with room for a
/// coordination stall: at 3 s the margin was 0.4 s, and one fsync stall
/// on the shared disk (both regions' leaders missed a renewal at once)
/// outlasted it.
pub const REGION_TIMEOUT: &str = "4s";
const REGION_HEARTBEAT: &str = "300ms";

/// A JobManager or a TaskManager.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    JobManager,
    TaskManager,
}

/// The links of one process, each a proxy of its own.
pub struct Links {
    /// To each node of its region's NATS cluster.
    pub nats: Vec<FaultProxy>,
    /// To each node of the global cluster (its region's node first).
    pub global: Vec<FaultProxy>,
    /// To the S3 store (east's; every process reaches it, west's to
    /// replicate there).
    pub store: FaultProxy,
    /// TaskManagers: the address JobManagers dial them at.
    pub inbound: Option<FaultProxy>,
    /// TaskManagers: the exchange address other TaskManagers dial them at.
    pub exchange: Option<FaultProxy>,
}

impl Links {
    /// Every proxy of this process.
    pub fn all(&self) -> impl Iterator<Item = &FaultProxy> {
        self.nats
            .iter()
            .chain(&self.global)
            .chain(std::iter::once(&self.store))
            .chain(&self.inbound)
            .chain(&self.exchange)
    }
}

/// One `ferry jobmanager` or `ferry taskmanager`.
pub struct Member {
    pub id: String,
    pub role: Role,
    pub region: usize,
    /// JobManager: REST port. TaskManager: HTTP (health, metrics) port.
    pub port: u16,
    /// TaskManager: its gRPC port (behind `links.inbound`).
    grpc_port: u16,
    /// TaskManager: its exchange port (behind `links.exchange`).
    exchange_port: u16,
    pub links: Links,
    child: Option<Child>,
    /// Stopped by SIGSTOP (and not yet continued).
    pub frozen: bool,
    log: PathBuf,
}

impl Member {
    /// Its process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Whether its process runs (or is frozen).
    pub fn running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// Sends `sig` to it (if it runs).
    pub fn signal(&mut self, sig: i32) {
        if let Some(pid) = self.pid() {
            signal(pid, sig);
        }
        if sig == libc::SIGSTOP {
            self.frozen = true;
        }
        if sig == libc::SIGCONT {
            self.frozen = false;
        }
    }

    /// SIGKILLs and reaps it.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        self.frozen = false;
    }

    /// Its REST client (JobManagers), each request bounded by `timeout`.
    pub fn api(&self, timeout: Duration) -> Option<Client> {
        (self.role == Role::JobManager)
            .then(|| Client::local(&format!("http://127.0.0.1:{}", self.port)).ok())
            .flatten()
            .map(|c| c.with_timeout(timeout))
    }
}

impl Drop for Member {
    fn drop(&mut self) {
        self.kill();
    }
}

/// One region.
pub struct Region {
    pub name: &'static str,
    pub nats: Vec<NatsProcess>,
    /// JobManagers first, then TaskManagers.
    pub members: Vec<Member>,
    pub store_url: String,
}

/// Everything `ferry chaos` started.
pub struct World {
    ferry: PathBuf,
    pub dir: PathBuf,
    pub global: Vec<NatsProcess>,
    pub regions: Vec<Region>,
    /// The workload's `nats-server` (never faulted).
    pub data: NatsProcess,
    _moto: KillOnDrop,
    moto_port: u16,
    pub store: StoreProxy,
    /// West's store directory, a tmpfs when one could be mounted.
    pub tmpfs: Option<PathBuf>,
    pub west_store: PathBuf,
    /// Where the workload's file sinks write (shared by both regions).
    pub out: PathBuf,
}

impl Drop for World {
    fn drop(&mut self) {
        for r in &mut self.regions {
            r.members.clear();
        }
        if let Some(t) = &self.tmpfs {
            let _ = Command::new("umount").arg("-l").arg(t).status();
        }
    }
}

/// A child process SIGKILLed (and reaped) when dropped, also when a later
/// step of starting fails.
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `moto_server` from `FERRY_MOTO_SERVER`, `./.venv/bin` or PATH.
fn find_moto() -> anyhow::Result<PathBuf> {
    if let Some(p) = std::env::var_os("FERRY_MOTO_SERVER") {
        return Ok(PathBuf::from(p));
    }
    let dirs = std::iter::once(PathBuf::from(".venv/bin")).chain(ferry_testkit::nats::path_dirs());
    for d in dirs {
        let p = d.join("moto_server");
        if p.is_file() {
            return Ok(p);
        }
    }
    bail!(
        "moto_server (an S3-compatible server) was not found: install it with \
         `python3 -m pip install 'moto[server]'` (scripts/test.sh puts it in .venv) \
         or set FERRY_MOTO_SERVER=/path/to/moto_server"
    )
}

/// Mounts a tmpfs of [`TMPFS_SIZE`] at `dir`; false if this machine does
/// not let us (not root, no mount).
fn mount_tmpfs(dir: &Path) -> bool {
    Command::new("mount")
        .args(["-t", "tmpfs", "-o", &format!("size={TMPFS_SIZE}"), "tmpfs"])
        .arg(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

async fn start_proxy(port: u16) -> FaultProxy {
    FaultProxy::start(port).await
}

impl World {
    /// Starts everything under `dir` (created; must be empty), each
    /// process listening before the next starts.
    pub async fn start(ferry: &Path, dir: &Path) -> anyhow::Result<Self> {
        if dir.exists() && std::fs::read_dir(dir)?.next().is_some() {
            bail!(
                "{} exists and is not empty: remove it or pass another --dir",
                dir.display()
            );
        }
        std::fs::create_dir_all(dir)?;
        let dir = dir.canonicalize()?;
        let nats_bin = find_nats_server()?;
        let starter = NatsStarter::new(nats_bin.clone())
            .with_logs()
            .with_listen_limit(START_LIMIT)
            .without_client_advertise();
        let global =
            starter.start_cluster(&dir.join("global"), NODES, "ferry-global", "global-")?;
        let data = starter.start(
            "nats-data",
            &dir.join("data/nats.conf"),
            &NatsConfig::new(try_free_port()?, dir.join("data/js")),
        )?;

        // moto, and the store fault proxy in front of it.
        let moto_bin = find_moto()?;
        let moto_port = try_free_port()?;
        std::fs::create_dir_all(dir.join("moto"))?;
        let log = std::fs::File::create(dir.join("moto/moto.log"))?;
        let mut moto = KillOnDrop(
            Command::new(&moto_bin)
                .args(["-H", "127.0.0.1", "-p", &moto_port.to_string()])
                .current_dir(dir.join("moto"))
                .stdin(Stdio::null())
                .stdout(log.try_clone()?)
                .stderr(log)
                .spawn()
                .with_context(|| format!("starting {}", moto_bin.display()))?,
        );
        ferry_testkit::wait_listening(
            &mut moto.0,
            "moto_server",
            moto_port,
            Some(&dir.join("moto/moto.log")),
            Duration::from_secs(60),
        )?;
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(30))
            .build()?;
        let created = http
            .put(format!("http://127.0.0.1:{moto_port}/{BUCKET}"))
            .send()
            .await?;
        if !created.status().is_success() {
            bail!(
                "creating bucket {BUCKET} in moto failed: {}",
                created.status()
            );
        }
        let store = StoreProxy::start(moto_port).await?;

        let west_store = dir.join("west-store");
        std::fs::create_dir_all(&west_store)?;
        let tmpfs = mount_tmpfs(&west_store).then(|| west_store.clone());
        let out = dir.join("out");
        std::fs::create_dir_all(&out)?;

        let mut world = World {
            ferry: ferry.to_path_buf(),
            dir: dir.clone(),
            global,
            regions: Vec::new(),
            data,
            _moto: moto,
            moto_port,
            store,
            tmpfs,
            west_store: west_store.clone(),
            out,
        };
        for (ri, name) in REGIONS.iter().enumerate() {
            let nats = starter.start_cluster(
                &dir.join(name).join("nats"),
                NODES,
                &format!("ferry-{name}"),
                &format!("{name}-"),
            )?;
            let store_url = if ri == 0 {
                format!("s3://{BUCKET}/ferry")
            } else {
                format!("file://{}", west_store.display())
            };
            world.regions.push(Region {
                name,
                nats,
                members: Vec::new(),
                store_url,
            });
            for i in 0..JOBMANAGERS {
                let m = world.member(ri, Role::JobManager, i).await?;
                world.regions[ri].members.push(m);
            }
            for i in 0..TASKMANAGERS {
                let m = world.member(ri, Role::TaskManager, i).await?;
                world.regions[ri].members.push(m);
            }
            for m in 0..world.regions[ri].members.len() {
                tokio::task::block_in_place(|| world.start_member(ri, m))?;
            }
        }
        Ok(world)
    }

    /// The moto endpoint, direct (the audit reads the store behind every
    /// fault).
    pub fn moto_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.moto_port)
    }

    /// The S3 bucket and prefix of east's store.
    pub fn bucket() -> &'static str {
        BUCKET
    }

    async fn member(&self, region: usize, role: Role, i: usize) -> anyhow::Result<Member> {
        let name = REGIONS[region];
        let id = match role {
            Role::JobManager => format!("jm-{name}-{i}"),
            Role::TaskManager => format!("tm-{name}-{i}"),
        };
        let mut nats = Vec::new();
        for n in &self.regions[region].nats {
            nats.push(start_proxy(n.port).await);
        }
        let mut global = Vec::new();
        for k in 0..NODES {
            global.push(start_proxy(self.global[(region + k) % NODES].port).await);
        }
        let store = start_proxy(self.store.port).await;
        let grpc_port = try_free_port()?;
        let exchange_port = try_free_port()?;
        let (inbound, exchange) = match role {
            Role::TaskManager => (
                Some(start_proxy(grpc_port).await),
                Some(start_proxy(exchange_port).await),
            ),
            Role::JobManager => (None, None),
        };
        Ok(Member {
            log: self.dir.join(name).join(format!("{id}.log")),
            id,
            role,
            region,
            port: try_free_port()?,
            grpc_port,
            exchange_port,
            links: Links {
                nats,
                global,
                store,
                inbound,
                exchange,
            },
            child: None,
            frozen: false,
        })
    }

    /// Starts (or restarts) member `m` of region `r` and waits until it
    /// listens. A port picked free can be taken before the process binds
    /// it (an outgoing connection's ephemeral port, while the member was
    /// down): then it moves to fresh ports, at most three times.
    pub fn start_member(&mut self, r: usize, m: usize) -> anyhow::Result<()> {
        let mut tries = 0;
        loop {
            match self.try_start_member(r, m) {
                Err(e) if tries < 3 && e.to_string().contains("Address already in use") => {
                    tries += 1;
                    let member = &mut self.regions[r].members[m];
                    eprintln!(
                        "    {}: a port was taken before it bound; moving to fresh ports",
                        member.id
                    );
                    member.port = try_free_port()?;
                    member.grpc_port = try_free_port()?;
                    member.exchange_port = try_free_port()?;
                    if let Some(p) = &member.links.inbound {
                        p.retarget(member.grpc_port);
                    }
                    if let Some(p) = &member.links.exchange {
                        p.retarget(member.exchange_port);
                    }
                }
                other => return other,
            }
        }
    }

    fn try_start_member(&mut self, r: usize, m: usize) -> anyhow::Result<()> {
        let region = &self.regions[r];
        let member = &region.members[m];
        let stores = format!(
            "east={},west={}",
            self.regions
                .first()
                .map(|r| r.store_url.clone())
                .unwrap_or_default(),
            format_args!("file://{}", self.west_store.display())
        );
        let urls = |ps: &[FaultProxy]| ps.iter().map(FaultProxy::url).collect::<Vec<_>>().join(",");
        let mut cmd = Command::new(&self.ferry);
        cmd.arg(match member.role {
            Role::JobManager => "jobmanager",
            Role::TaskManager => "taskmanager",
        })
        .env("RUST_LOG", "info")
        .env("FERRY_REGION", region.name)
        .env("FERRY_INSTANCE_ID", &member.id)
        .env("FERRY_NATS_URLS", urls(&member.links.nats))
        .env("FERRY_NATS_REPLICAS", NODES.to_string())
        .env("FERRY_STORAGE", &region.store_url)
        .env("FERRY_REGIONS_STORES", stores)
        .env("FERRY_REGIONS_PRIMARY", REGIONS[0])
        .env("FERRY_REGIONS_GLOBAL_URLS", urls(&member.links.global))
        .env("FERRY_REGIONS_GLOBAL_REPLICAS", NODES.to_string())
        .env("FERRY_REGIONS_TIMEOUT", REGION_TIMEOUT)
        .env("FERRY_REGIONS_HEALTH_CHECK_INTERVAL", REGION_HEARTBEAT)
        // The workload's jobs write under `out` and use NATS on loopback
        // (through the fault proxies).
        .env(
            "FERRY_SECURITY_ALLOWED_URLS",
            format!("file://{},nats://127.0.0.1", self.out.display()),
        )
        .env("AWS_ENDPOINT", member.links.store.http_url())
        .env("AWS_ALLOW_HTTP", "true")
        .env("AWS_ACCESS_KEY_ID", AWS_KEY)
        .env("AWS_SECRET_ACCESS_KEY", AWS_KEY)
        .env("AWS_REGION", "us-east-1");
        match member.role {
            Role::JobManager => {
                cmd.env("FERRY_API_LISTEN", format!("127.0.0.1:{}", member.port));
            }
            Role::TaskManager => {
                let advertised = |l: &Option<FaultProxy>| {
                    l.as_ref().map(FaultProxy::http_url).unwrap_or_default()
                };
                let loopback = |port: u16| format!("127.0.0.1:{port}");
                for (key, value) in [
                    ("FERRY_TASKMANAGER_LISTEN", loopback(member.grpc_port)),
                    (
                        "FERRY_TASKMANAGER_ADVERTISE",
                        advertised(&member.links.inbound),
                    ),
                    (
                        "FERRY_TASKMANAGER_EXCHANGE_LISTEN",
                        loopback(member.exchange_port),
                    ),
                    (
                        "FERRY_TASKMANAGER_EXCHANGE_ADVERTISE",
                        advertised(&member.links.exchange),
                    ),
                    ("FERRY_TASKMANAGER_HTTP_LISTEN", loopback(member.port)),
                    ("FERRY_TASKMANAGER_SLOTS", TM_SLOTS.to_string()),
                ] {
                    cmd.env(key, value);
                }
            }
        }
        if let Some(d) = member.log.parent() {
            std::fs::create_dir_all(d)?;
        }
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&member.log)?;
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", member.id))?;
        let (id, port, log) = (member.id.clone(), member.port, member.log.clone());
        ferry_testkit::wait_listening(&mut child, &id, port, Some(&log), START_LIMIT)?;
        let member = &mut self.regions[r].members[m];
        member.child = Some(child);
        member.frozen = false;
        Ok(())
    }

    /// Region `r`'s view of the regions, asked of its JobManagers in turn.
    pub async fn regions_view(&self, r: usize) -> Option<RegionsStatus> {
        for m in &self.regions[r].members {
            if m.frozen {
                continue;
            }
            if let Some(c) = m.api(Duration::from_secs(2))
                && let Ok(a) = c.regions().await
            {
                return Some(a.value);
            }
        }
        None
    }

    /// Index of region `r`'s leading JobManager, as the JobManagers that
    /// answer say of themselves.
    pub async fn leader(&self, r: usize) -> Option<usize> {
        for (i, m) in self.regions[r].members.iter().enumerate() {
            if m.frozen || m.role != Role::JobManager {
                continue;
            }
            if let Some(c) = m.api(Duration::from_secs(2))
                && let Ok(a) = c.health().await
                && a.raw["role"] == "leader"
            {
                return Some(i);
            }
        }
        None
    }

    /// A client of region `r`'s leader (or any of its JobManagers).
    pub async fn api(&self, r: usize) -> Option<Client> {
        let i = self.leader(r).await?;
        self.regions[r].members[i].api(Duration::from_secs(5))
    }

    /// Every link of every process of region `r`.
    pub fn links(&self, r: usize) -> impl Iterator<Item = &FaultProxy> {
        self.regions[r].members.iter().flat_map(|m| m.links.all())
    }

    /// Log file of a process.
    pub fn log_of(&self, r: usize, m: usize) -> &Path {
        &self.regions[r].members[m].log
    }
}
