//! Starting `nats-server` processes on loopback: finding the binary, the
//! server configuration (JetStream, optionally a cluster), one server and a
//! cluster of them.
//!
//! The one place that starts `nats-server`: the test fixtures
//! ([`crate::NatsServer`], [`crate::NatsCluster`]), `ferry sandbox` and
//! `ferry bench` all start theirs here.
//!
//! Invariant: a [`NatsProcess`] is SIGKILLed when dropped, unless its owner
//! took the child over ([`NatsProcess::into_child`]); a start that fails
//! leaves no process running.

use std::fs::OpenOptions;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::StartError;

/// Environment variable naming the `nats-server` binary to use.
pub const NATS_SERVER_ENV: &str = "FERRY_NATS_SERVER";

/// `nats-server`: `$FERRY_NATS_SERVER` if set, else the first of `dirs`
/// (searched in order) that holds a `nats-server` file. Callers pick the
/// order: e.g. [`path_dirs`] then a `.venv/bin`.
pub fn find_nats_server(dirs: impl IntoIterator<Item = PathBuf>) -> Option<PathBuf> {
    if let Some(p) = std::env::var_os(NATS_SERVER_ENV) {
        return Some(PathBuf::from(p));
    }
    dirs.into_iter()
        .map(|d| d.join("nats-server"))
        .find(|p| p.is_file())
}

/// The directories of `$PATH`, in order.
pub fn path_dirs() -> Vec<PathBuf> {
    std::env::var_os("PATH")
        .map(|path| std::env::split_paths(&path).collect())
        .unwrap_or_default()
}

/// The `cluster` block of a server's configuration.
#[derive(Debug, Clone)]
pub struct ClusterConfig {
    /// The cluster's name (every node the same).
    pub name: String,
    /// This node's route port.
    pub port: u16,
    /// Every node's route URL (`nats-route://127.0.0.1:<port>`).
    pub routes: Vec<String>,
    /// The route address other nodes learn for this one (`host:port`;
    /// `None`: its listen address).
    pub advertise: Option<String>,
    /// Do not tell clients the other nodes' client URLs: a client reaches
    /// only the servers it was given.
    pub no_advertise: bool,
}

/// One server's configuration: clients on `127.0.0.1:<port>`, JetStream
/// with its store in `store_dir`, optionally a name and a cluster block.
#[derive(Debug, Clone)]
pub struct NatsConfig {
    pub server_name: Option<String>,
    pub port: u16,
    pub store_dir: PathBuf,
    /// JetStream's `sync_interval`: `always` (every write on disk before it
    /// is acknowledged, as Ferry's coordination clusters run) or a duration.
    pub sync_interval: String,
    pub cluster: Option<ClusterConfig>,
    /// More configuration, appended as is (e.g. an `authorization` block).
    pub extra: String,
}

impl NatsConfig {
    /// A server on `port` with its JetStream store in `store_dir`, syncing
    /// every write (`sync_interval: always`), no name, no cluster.
    pub fn new(port: u16, store_dir: PathBuf) -> Self {
        Self {
            server_name: None,
            port,
            store_dir,
            sync_interval: "always".into(),
            cluster: None,
            extra: String::new(),
        }
    }

    /// The configuration file's text.
    pub fn render(&self) -> String {
        let mut c = String::new();
        if let Some(name) = &self.server_name {
            c.push_str(&format!("server_name: {name}\n"));
        }
        c.push_str(&format!(
            "listen: 127.0.0.1:{}\njetstream {{\n  store_dir: \"{}\"\n  sync_interval: {}\n}}\n",
            self.port,
            self.store_dir.display(),
            self.sync_interval
        ));
        if let Some(cl) = &self.cluster {
            let mut advertise = cl
                .advertise
                .as_ref()
                .map(|a| format!("  advertise: {a}\n"))
                .unwrap_or_default();
            if cl.no_advertise {
                advertise.push_str("  no_advertise: true\n");
            }
            c.push_str(&format!(
                "cluster {{\n  name: {}\n  listen: 127.0.0.1:{}\n{advertise}  routes: [{}]\n}}\n",
                cl.name,
                cl.port,
                cl.routes.join(", ")
            ));
        }
        c.push_str(&self.extra);
        c
    }
}

/// How servers are started: which binary, whether each writes its output to
/// a log next to its configuration file, and how long one may take to
/// accept clients.
#[derive(Debug, Clone)]
pub struct NatsStarter {
    pub bin: PathBuf,
    /// Append each server's stdout and stderr to `<config file>.log` (the
    /// configuration file's name with `.log` for `.conf`); otherwise they
    /// are discarded.
    pub logs: bool,
    /// How long a server may take to accept clients once started.
    pub listen_limit: Duration,
    /// Clusters' nodes don't tell clients the other nodes' URLs, so a
    /// client reaches only the servers (or proxies) it was given.
    pub no_advertise: bool,
    /// Configuration appended to every cluster node's (e.g. `tls` and
    /// `authorization` blocks).
    pub extra: String,
}

impl NatsStarter {
    /// Starts `bin`, output discarded, 30 s to listen.
    pub fn new(bin: PathBuf) -> Self {
        Self {
            bin,
            logs: false,
            listen_limit: Duration::from_secs(30),
            no_advertise: false,
            extra: String::new(),
        }
    }

    /// Appends `extra` to every cluster node's configuration.
    pub fn with_extra(mut self, extra: &str) -> Self {
        self.extra = extra.to_string();
        self
    }

    /// Cluster nodes don't advertise each other to clients (`no_advertise`):
    /// for clients that reach the nodes through proxies.
    pub fn without_client_advertise(mut self) -> Self {
        self.no_advertise = true;
        self
    }

    /// Writes each server's output to a log next to its configuration.
    pub fn with_logs(mut self) -> Self {
        self.logs = true;
        self
    }

    /// How long a server may take to accept clients.
    pub fn with_listen_limit(mut self, limit: Duration) -> Self {
        self.listen_limit = limit;
        self
    }

    /// Writes `config` to `conf` (creating its directory) and starts a
    /// server named `name` (in messages) with it; returns once the server
    /// accepts clients. Fails if it exits first — e.g. because a port
    /// picked by [`crate::free_port`] was taken by another process in the
    /// meantime — or does not listen within the limit.
    pub fn start(
        &self,
        name: &str,
        conf: &Path,
        config: &NatsConfig,
    ) -> Result<NatsProcess, StartError> {
        let mut p = self.spawn(name, conf, config)?;
        p.wait_listening(self.listen_limit)?;
        Ok(p)
    }

    /// Starts a `nodes`-node JetStream cluster (`sync_interval: always`)
    /// named `cluster` on fresh loopback ports, routes between all nodes.
    /// Node `i` is `<prefix><i>`, with its configuration in
    /// `<dir>/<prefix><i>.conf` and its store in `<dir>/<prefix><i>`.
    /// Returns once every node accepts clients.
    pub fn start_cluster(
        &self,
        dir: &Path,
        nodes: usize,
        cluster: &str,
        prefix: &str,
    ) -> Result<Vec<NatsProcess>, StartError> {
        let ports: Vec<(u16, u16)> = (0..nodes)
            .map(|_| Ok((port()?, port()?)))
            .collect::<Result<_, StartError>>()?;
        let routes: Vec<String> = ports
            .iter()
            .map(|(_, c)| format!("nats-route://127.0.0.1:{c}"))
            .collect();
        // On failure the nodes started so far end with `procs` (Drop).
        let mut procs = Vec::new();
        for (i, (port, cport)) in ports.iter().enumerate() {
            let name = format!("{prefix}{i}");
            let config = NatsConfig {
                server_name: Some(name.clone()),
                cluster: Some(ClusterConfig {
                    name: cluster.to_string(),
                    port: *cport,
                    routes: routes.clone(),
                    advertise: None,
                    no_advertise: self.no_advertise,
                }),
                extra: self.extra.clone(),
                ..NatsConfig::new(*port, dir.join(&name))
            };
            procs.push(self.spawn(&name, &dir.join(format!("{name}.conf")), &config)?);
        }
        for p in &mut procs {
            p.wait_listening(self.listen_limit)?;
        }
        Ok(procs)
    }

    fn spawn(
        &self,
        name: &str,
        conf: &Path,
        config: &NatsConfig,
    ) -> Result<NatsProcess, StartError> {
        if let Some(d) = conf.parent() {
            std::fs::create_dir_all(d)
                .map_err(|e| StartError(format!("creating {}: {e}", d.display())))?;
        }
        std::fs::write(conf, config.render())
            .map_err(|e| StartError(format!("writing {}: {e}", conf.display())))?;
        let mut p = NatsProcess {
            child: None,
            name: name.to_string(),
            port: config.port,
            conf: conf.to_path_buf(),
            log: self.logs.then(|| conf.with_extension("log")),
            bin: self.bin.clone(),
        };
        p.respawn()?;
        Ok(p)
    }
}

fn port() -> Result<u16, StartError> {
    crate::try_free_port().map_err(|e| StartError(format!("no free loopback port: {e}")))
}

/// A `nats-server` process a [`NatsStarter`] started; SIGKILLed on drop.
#[derive(Debug)]
pub struct NatsProcess {
    /// `None` once taken over ([`Self::into_child`]).
    child: Option<Child>,
    /// Its name in messages.
    pub name: String,
    /// Its client port.
    pub port: u16,
    /// Its configuration file.
    pub conf: PathBuf,
    /// Its log, if it writes one.
    pub log: Option<PathBuf>,
    bin: PathBuf,
}

impl NatsProcess {
    /// The client URL of the server.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// SIGKILLs the server (a crash) and reaps it.
    pub fn kill(&mut self) {
        if let Some(c) = self.child.as_mut() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Kills the server and starts it again with the same configuration
    /// (same port, same store); returns once it accepts clients.
    pub fn restart(&mut self, limit: Duration) -> Result<(), StartError> {
        self.kill();
        self.respawn()?;
        self.wait_listening(limit)
    }

    /// The process, to be ended by its new owner (no longer killed on drop).
    pub fn into_child(mut self) -> Child {
        self.child.take().expect("a started nats-server")
    }

    fn respawn(&mut self) -> Result<(), StartError> {
        let (out, err) = match &self.log {
            Some(log) => {
                let f = OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(log)
                    .map_err(|e| StartError(format!("creating {}: {e}", log.display())))?;
                let f2 = f
                    .try_clone()
                    .map_err(|e| StartError(format!("{}: {e}", log.display())))?;
                (Stdio::from(f), Stdio::from(f2))
            }
            None => (Stdio::null(), Stdio::null()),
        };
        let child = Command::new(&self.bin)
            .arg("-c")
            .arg(&self.conf)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .map_err(|e| {
                StartError(format!(
                    "starting {} ({}): {e}",
                    self.name,
                    self.bin.display()
                ))
            })?;
        self.child = Some(child);
        Ok(())
    }

    fn wait_listening(&mut self, limit: Duration) -> Result<(), StartError> {
        let child = self.child.as_mut().expect("a started nats-server");
        crate::wait_listening(child, &self.name, self.port, self.log.as_deref(), limit)
    }
}

impl Drop for NatsProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_server_config_is_jetstream_on_loopback_syncing_every_write() {
        let c = NatsConfig::new(4222, PathBuf::from("/d/js"));
        assert_eq!(
            c.render(),
            "listen: 127.0.0.1:4222\njetstream {\n  store_dir: \"/d/js\"\n  sync_interval: always\n}\n"
        );
    }

    #[test]
    fn a_cluster_node_config_is_named_and_routes_to_every_node() {
        let c = NatsConfig {
            server_name: Some("global-0".into()),
            cluster: Some(ClusterConfig {
                name: "ferry-global".into(),
                port: 6222,
                routes: vec![
                    "nats-route://127.0.0.1:6222".into(),
                    "nats-route://127.0.0.1:6223".into(),
                ],
                advertise: None,
                no_advertise: false,
            }),
            ..NatsConfig::new(4222, PathBuf::from("/d/global-0"))
        };
        assert_eq!(
            c.render(),
            "server_name: global-0\nlisten: 127.0.0.1:4222\njetstream {\n  store_dir: \"/d/global-0\"\n  sync_interval: always\n}\n\
             cluster {\n  name: ferry-global\n  listen: 127.0.0.1:6222\n  routes: [nats-route://127.0.0.1:6222, nats-route://127.0.0.1:6223]\n}\n"
        );
    }
}
