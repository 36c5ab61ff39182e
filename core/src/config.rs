//! Configuration of the distributed processes (`ferry jobmanager`,
//! `ferry taskmanager`): a YAML file, every key of which can also be
//! set — or overridden — by an environment variable `FERRY_<PATH>` (path
//! segments upper-cased and joined by `_`, e.g. `ha.leaseTtl` →
//! `FERRY_HA_LEASE_TTL`), the way Kubernetes manifests pass settings.
//!
//! Reference: `docs/config.md`. [`ENV_KEYS`] is the one list of keys; the
//! docs test checks every key is documented.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::spec::DurationSpec;

/// Settings of a JobManager or TaskManager process.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ProcessConfig {
    /// Name of the region this process runs in (e.g. `eu-west`).
    pub region: String,
    /// This instance's id, unique in the region (default: `<hostname>-<pid>`).
    #[serde(default)]
    pub instance_id: Option<String>,
    /// The region's NATS cluster.
    pub nats: NatsConfig,
    /// Object store URL holding the job store and (by default) checkpoints:
    /// `file:///path`, `s3://bucket/prefix`, `gs://…`, `az://…`.
    pub storage: String,
    /// The REST API.
    #[serde(default)]
    pub api: ApiConfig,
    /// Membership and leader-lease timing.
    #[serde(default)]
    pub ha: HaTiming,
    /// Where a JobManager runs job tasks.
    #[serde(default)]
    pub scheduling: SchedulingConfig,
    /// A TaskManager's slots and addresses (`ferry taskmanager`).
    #[serde(default)]
    pub taskmanager: TaskManagerConfig,
    /// The other regions (cross-region replication).
    #[serde(default)]
    pub regions: RegionsConfig,
    /// TLS per link (none by default).
    #[serde(default)]
    pub tls: TlsConfig,
    /// What jobs may touch.
    #[serde(default)]
    pub security: SecurityConfig,
}

/// TLS per link. Certificate files are checked for changes every
/// `reloadInterval`; new connections use new material, with no restart.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TlsConfig {
    /// JobManager ↔ TaskManager gRPC, always mutual: a TaskManager serves
    /// only clients whose certificate the CA signed, and a JobManager
    /// dials TaskManagers with its certificate and verifies theirs. Set
    /// it on every JobManager and TaskManager of the region.
    #[serde(default)]
    pub grpc: Option<GrpcTls>,
    /// The REST API over HTTPS. A standby forwarding a write to the leader
    /// checks the leader's certificate against `caFile`.
    #[serde(default)]
    pub api: Option<ApiTls>,
    /// How often certificate files are read again (default `10s`).
    #[serde(default = "d_tls_reload")]
    pub reload_interval: DurationSpec,
}

fn d_tls_reload() -> DurationSpec {
    DurationSpec(Duration::from_secs(10))
}

impl Default for TlsConfig {
    fn default() -> Self {
        Self {
            grpc: None,
            api: None,
            reload_interval: d_tls_reload(),
        }
    }
}

/// The object-store settings `spec` (a `regions.storeCredentials` entry:
/// `env:PREFIX` or `file:PATH`) names, as object_store keys
/// (`aws_access_key_id`); `at` is its config key and `env` the process
/// environment. Messages name variables and files, never values.
pub fn store_settings(
    spec: &str,
    at: &str,
    env: &BTreeMap<String, String>,
) -> Result<Vec<(String, String)>, String> {
    const FAMILIES: [&str; 3] = ["AWS_", "GOOGLE_", "AZURE_"];
    let setting = |name: &str| {
        FAMILIES
            .iter()
            .any(|f| name.starts_with(f))
            .then(|| name.to_ascii_lowercase())
    };
    let settings: Vec<(String, String)> = if let Some(prefix) = spec.strip_prefix("env:") {
        if prefix.is_empty() {
            return Err(format!("{at}: env: needs a prefix, e.g. env:US_EAST_"));
        }
        env.iter()
            .filter_map(|(k, v)| {
                let name = k.strip_prefix(prefix)?;
                Some((setting(name)?, v.clone()))
            })
            .collect()
    } else if let Some(path) = spec.strip_prefix("file:") {
        let text =
            std::fs::read_to_string(path).map_err(|e| format!("{at}: cannot read {path}: {e}"))?;
        let mut out = Vec::new();
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let line = line.strip_prefix("export ").unwrap_or(line);
            let Some((k, v)) = line.split_once('=') else {
                return Err(format!("{at}: {path} line {}: expected NAME=VALUE", i + 1));
            };
            let k = k.trim();
            let Some(name) = setting(k) else {
                return Err(format!(
                    "{at}: {path} line {}: {k} is not an AWS_, GOOGLE_ or AZURE_ setting",
                    i + 1
                ));
            };
            let v = v.trim().trim_matches('"').trim_matches('\'');
            out.push((name, v.to_string()));
        }
        out
    } else {
        return Err(format!(
            "{at}: {spec:?} is neither env:PREFIX nor file:PATH"
        ));
    };
    if settings.is_empty() {
        return Err(match spec.strip_prefix("env:") {
            Some(p) => format!("{at}: no variable starts with {p}AWS_, {p}GOOGLE_ or {p}AZURE_"),
            None => format!("{at}: {} holds no setting", &spec[5..]),
        });
    }
    Ok(settings)
}

/// The process whose listeners [`ProcessConfig::unprotected_listeners`]
/// checks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProcessRole {
    JobManager,
    TaskManager,
}

/// Whether two paths name one file (the same path, or one file reached by
/// both); a path that cannot be resolved compares as written.
fn same_file(a: &str, b: &str) -> bool {
    let canon = |p: &str| std::fs::canonicalize(p).unwrap_or_else(|_| p.into());
    canon(a) == canon(b)
}

/// Whether a listen address (`host:port`) binds only loopback.
pub fn is_loopback_listen(addr: &str) -> bool {
    let host = match addr.rsplit_once(':') {
        Some((h, _)) => h,
        None => addr,
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

impl ProcessConfig {
    /// Why this process would take commands from anyone who reaches it:
    /// one message per listener bound beyond loopback without TLS and
    /// authentication (the REST API needs `tls.api` and `api.auth`; the
    /// TaskManager's gRPC port `tls.grpc`, whose client certificates
    /// authenticate). The TaskManager's probe and metrics port serves
    /// nothing that changes state, so it may listen anywhere.
    pub fn unprotected_listeners(&self, role: ProcessRole) -> Vec<String> {
        let mut out = Vec::new();
        match role {
            ProcessRole::JobManager if !is_loopback_listen(&self.api.listen) => {
                let mut missing = Vec::new();
                if self.tls.api.is_none() {
                    missing.push("no TLS (tls.api)");
                }
                if !self.api.auth.enabled() {
                    missing.push("no authentication (api.auth)");
                }
                if !missing.is_empty() {
                    out.push(format!(
                        "api.listen {} is not a loopback address, and the REST API has {}: anyone who reaches it could submit and cancel jobs and fail regions over",
                        self.api.listen,
                        missing.join(" and ")
                    ));
                }
            }
            ProcessRole::TaskManager
                if !is_loopback_listen(&self.taskmanager.listen) && self.tls.grpc.is_none() =>
            {
                out.push(format!(
                    "taskmanager.listen {} is not a loopback address, and the gRPC port has no mutual TLS (tls.grpc): anyone who reaches it could deploy and cancel tasks",
                    self.taskmanager.listen
                ));
                let exchange = self.exchange_listen();
                if !is_loopback_listen(&exchange) {
                    out.push(format!(
                        "taskmanager.exchangeListen {exchange} is not a loopback address, and the exchange port has no mutual TLS (tls.grpc): anyone who reaches it could send records into running jobs",
                    ));
                }
            }
            ProcessRole::TaskManager
                if !is_loopback_listen(&self.exchange_listen()) && self.tls.grpc.is_none() =>
            {
                out.push(format!(
                    "taskmanager.exchangeListen {} is not a loopback address, and the exchange port has no mutual TLS (tls.grpc): anyone who reaches it could send records into running jobs",
                    self.exchange_listen()
                ));
            }
            _ => {}
        }
        out
    }
}

/// What jobs may read and write: every file path, object-store URL and
/// NATS server a spec names (sources, sinks, `checkpointing.storage`)
/// must lie under a root allowed for the job's namespace. Without any
/// list, a region's jobs may use only the region's own store.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SecurityConfig {
    /// Roots for every namespace without a list of its own: path or
    /// storage URL prefixes (`file:///data/in`, `s3://lake/ferry`), NATS
    /// servers (`nats://host:4222`), or `*` for anything.
    #[serde(default)]
    pub allowed_urls: Option<Vec<String>>,
    /// Per-namespace roots, replacing `allowedUrls` for that namespace.
    #[serde(default)]
    pub namespaces: BTreeMap<String, NamespaceSecurity>,
}

/// One namespace's roots.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NamespaceSecurity {
    /// What this namespace's jobs may touch (as `security.allowedUrls`).
    pub allowed_urls: Vec<String>,
}

impl ProcessConfig {
    /// The roots jobs of this region may touch: the configured lists, or
    /// else the region's own store.
    pub fn access_policy(&self) -> Result<crate::access::AccessPolicy, String> {
        let namespaces = self
            .security
            .namespaces
            .iter()
            .map(|(ns, n)| (ns.clone(), n.allowed_urls.clone()))
            .collect();
        match &self.security.allowed_urls {
            Some(list) => {
                crate::access::AccessPolicy::new(list, &namespaces, "security.allowedUrls")
            }
            None => crate::access::AccessPolicy::new(
                std::slice::from_ref(&self.storage),
                &namespaces,
                "the default, the region's store (set security.allowedUrls)",
            ),
        }
    }
}

/// The gRPC link's certificate, key and CA (PEM files, e.g. a
/// cert-manager Secret's `tls.crt`, `tls.key` and `ca.crt`).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct GrpcTls {
    /// This process's certificate chain, leaf first.
    pub cert_file: String,
    /// Its private key.
    pub key_file: String,
    /// The region's CA: the other side's certificate must chain to it.
    pub ca_file: String,
    /// The name a JobManager expects in every TaskManager's certificate
    /// (default: the host of the TaskManager's advertised URL). One name
    /// in every TaskManager certificate spares a certificate per pod IP.
    #[serde(default)]
    pub server_name: Option<String>,
    /// On a TaskManager: the DNS name every JobManager's client
    /// certificate must carry (default: any certificate the CA signed).
    /// Set it when the CA also signs other certificates — the
    /// TaskManagers' own — so that those cannot send commands.
    #[serde(default)]
    pub client_name: Option<String>,
}

/// The REST API's certificate, key and CA (PEM files).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ApiTls {
    /// This JobManager's certificate chain, leaf first: it must name the
    /// host of `api.advertise` (what clients and standbys dial).
    pub cert_file: String,
    /// Its private key.
    pub key_file: String,
    /// The CA that signed the region's JobManager certificates: a standby
    /// forwarding a write checks the leader against it.
    pub ca_file: String,
}

impl ApiTls {
    /// The files as the TLS layer takes them.
    pub fn files(&self) -> crate::tls::TlsFiles {
        crate::tls::TlsFiles {
            link: "api",
            cert: self.cert_file.clone().into(),
            key: self.key_file.clone().into(),
            ca: self.ca_file.clone().into(),
            callers_ca: None,
        }
    }
}

impl GrpcTls {
    /// The files as the TLS layer takes them.
    pub fn files(&self) -> crate::tls::TlsFiles {
        crate::tls::TlsFiles {
            link: "grpc",
            cert: self.cert_file.clone().into(),
            key: self.key_file.clone().into(),
            ca: self.ca_file.clone().into(),
            callers_ca: None,
        }
    }
}

/// The regions of a multi-region deployment.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RegionsConfig {
    /// Every region's object store URL, by region name (this region's own
    /// entry, if present, must equal `storage`). The leading JobManager
    /// copies every completed checkpoint, savepoint and job spec to every
    /// other region's store. Empty: no replication.
    #[serde(default)]
    pub stores: BTreeMap<String, String>,
    /// Credentials of other regions' stores, by region: `env:PREFIX`
    /// (the variables `PREFIX` + `AWS_*`/`GOOGLE_*`/`AZURE_*`) or
    /// `file:PATH` (`KEY=VALUE` lines of those variables). A store with an
    /// entry here is opened with those settings alone, not the process's.
    #[serde(default)]
    pub store_credentials: BTreeMap<String, String>,
    /// The region jobs run in; every other region is a standby that
    /// receives copies and runs nothing. Required when `stores` names other
    /// regions; default: this region.
    #[serde(default)]
    pub primary: Option<String>,
    /// The global NATS (one node per region) holding the regions'
    /// heartbeats (`regions.<name>`). Empty: no region health.
    #[serde(default)]
    pub global: GlobalConfig,
    /// Time between region heartbeats (default 1s).
    #[serde(default = "d_heartbeat")]
    pub health_check_interval: DurationSpec,
    /// A region not heard from this long counts as down (default 5s).
    #[serde(default = "d_region_timeout")]
    pub timeout: DurationSpec,
    /// A standby region's leader takes the region lease when the primary's
    /// heartbeat is older than `timeout` (default true).
    #[serde(default = "yes")]
    pub auto_failover: bool,
    /// How often a standby region's leader test-restores the checkpoints
    /// replicated into its store (default 5s; each is checked once).
    #[serde(default = "d_verify_interval")]
    pub verify_interval: DurationSpec,
    /// URL that receives a JSON `POST` when this region takes the region
    /// lease (failover or switchover) or loses it. Unset: none.
    #[serde(default)]
    pub webhook: Option<String>,
    /// CA certificate(s) (PEM) trusted for an `https://` webhook besides
    /// the system's roots (a private CA).
    #[serde(default)]
    pub webhook_ca_file: Option<String>,
    /// File whose first line is a bearer token sent to the webhook
    /// (`Authorization: Bearer`).
    #[serde(default)]
    pub webhook_token_file: Option<String>,
    /// `async` (default): a checkpoint completes in the primary and is
    /// copied to the standbys after; `sync`: it completes only once its
    /// manifest is in `syncStandbys` standby stores, hash-verified, so no
    /// sink commits output a standby could not restore.
    #[serde(default)]
    pub replication: ReplicationMode,
    /// With `replication: sync`, how many standby stores must hold a
    /// checkpoint before it completes (default 1).
    #[serde(default = "one")]
    pub sync_standbys: usize,
    /// With `replication: sync`, what happens when fewer than
    /// `syncStandbys` standbys take a checkpoint within `syncTimeout`:
    /// `block` (default) fails the checkpoint, so output stays uncommitted
    /// until standbys are back; `async` completes it anyway and runs
    /// asynchronously until the standbys have caught up.
    #[serde(default)]
    pub on_standby_loss: OnStandbyLoss,
    /// With `replication: sync`, how long a checkpoint waits for the
    /// standby stores (default 5s).
    #[serde(default = "d_sync_timeout")]
    pub sync_timeout: DurationSpec,
    /// What this region does while it is a standby: `cold` (default) runs
    /// nothing and restores every job when promoted; `hot` keeps every job
    /// loaded on its TaskManagers at the newest replicated checkpoint —
    /// state in memory, sources paused, sinks held — so a promotion only
    /// starts them.
    #[serde(default)]
    pub standby: StandbyMode,
}

/// What a standby region keeps ready (`regions.standby`).
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub enum StandbyMode {
    /// Nothing deployed: a promotion restores every job from the store.
    #[default]
    Cold,
    /// Every job deployed with its state loaded, sources paused, sinks
    /// held: a promotion starts them at the checkpoint they hold.
    Hot,
}

impl StandbyMode {
    pub fn as_str(self) -> &'static str {
        match self {
            StandbyMode::Cold => "cold",
            StandbyMode::Hot => "hot",
        }
    }
}

/// When a checkpoint counts as complete across regions
/// (`regions.replication`).
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub enum ReplicationMode {
    /// Completed in the primary; copied to the standbys after.
    #[default]
    Async,
    /// Completed only once `regions.syncStandbys` standbys hold it.
    Sync,
}

impl ReplicationMode {
    pub fn as_str(self) -> &'static str {
        match self {
            ReplicationMode::Async => "async",
            ReplicationMode::Sync => "sync",
        }
    }
}

/// What synchronous replication does without enough standbys
/// (`regions.onStandbyLoss`).
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub enum OnStandbyLoss {
    /// Checkpoints fail (output stays uncommitted) until standbys are back.
    #[default]
    Block,
    /// Checkpoints complete without them; back to `sync` once they caught up.
    Async,
}

fn d_sync_timeout() -> DurationSpec {
    DurationSpec(Duration::from_secs(5))
}

fn d_verify_interval() -> DurationSpec {
    DurationSpec(Duration::from_secs(5))
}

fn yes() -> bool {
    true
}

/// How to reach the global NATS cluster.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct GlobalConfig {
    /// URLs of the global cluster's nodes.
    #[serde(default)]
    pub urls: Vec<String>,
    /// KV bucket (default `ferry-global`).
    #[serde(default)]
    pub bucket: Option<String>,
    /// Replicas of the bucket (3 for one node per region).
    #[serde(default = "one")]
    pub replicas: usize,
    /// How to authenticate to the global cluster.
    #[serde(default)]
    pub auth: NatsAuth,
    /// TLS to the global cluster (required when set).
    #[serde(default)]
    pub tls: Option<NatsTls>,
}

fn d_region_timeout() -> DurationSpec {
    DurationSpec(Duration::from_secs(5))
}

impl Default for RegionsConfig {
    fn default() -> Self {
        Self {
            stores: BTreeMap::new(),
            store_credentials: BTreeMap::new(),
            primary: None,
            global: GlobalConfig::default(),
            health_check_interval: d_heartbeat(),
            timeout: d_region_timeout(),
            auto_failover: true,
            verify_interval: d_verify_interval(),
            webhook: None,
            webhook_ca_file: None,
            webhook_token_file: None,
            replication: ReplicationMode::Async,
            sync_standbys: 1,
            on_standby_loss: OnStandbyLoss::Block,
            sync_timeout: d_sync_timeout(),
            standby: StandbyMode::Cold,
        }
    }
}

/// Where a JobManager runs job tasks.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SchedulingConfig {
    /// `taskmanagers` (default): on the region's TaskManager processes,
    /// which keep them running through a JobManager failover;
    /// `inProcess`: inside the leading JobManager (no TaskManagers needed,
    /// but a leader change restarts the tasks from their checkpoint).
    #[serde(default)]
    pub placement: Placement,
    /// How jobs are placed on the region's TaskManagers: `spread` (the
    /// default) or `pack`.
    #[serde(default)]
    pub strategy: Strategy,
    /// `manual` (default): jobs move to even out the slot load only when
    /// asked (`ferry cluster rebalance`); `auto`: also by themselves when
    /// the load's spread passes `rebalanceThreshold` (a TaskManager
    /// joined, or jobs ended unevenly).
    #[serde(default)]
    pub rebalance: Rebalance,
    /// Spread of the slot load (standard deviation of used/total slots per
    /// TaskManager over its mean) above which `auto` rebalances (default
    /// 0.2).
    #[serde(default = "d_rebalance_threshold")]
    pub rebalance_threshold: f64,
    /// Least time between two automatic rebalances (default 30s).
    #[serde(default = "d_rebalance_interval")]
    pub rebalance_interval: DurationSpec,
    /// Jobs moving at once, by a drain or a rebalance (default 4).
    #[serde(default = "d_max_moves")]
    pub max_concurrent_moves: u32,
}

impl Default for SchedulingConfig {
    fn default() -> Self {
        Self {
            placement: Placement::default(),
            strategy: Strategy::default(),
            rebalance: Rebalance::default(),
            rebalance_threshold: d_rebalance_threshold(),
            rebalance_interval: d_rebalance_interval(),
            max_concurrent_moves: d_max_moves(),
        }
    }
}

fn d_rebalance_threshold() -> f64 {
    0.2
}
fn d_rebalance_interval() -> DurationSpec {
    DurationSpec::from_millis(30_000)
}
fn d_max_moves() -> u32 {
    4
}

/// See [`SchedulingConfig::rebalance`].
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub enum Rebalance {
    #[default]
    Manual,
    Auto,
}

/// See [`SchedulingConfig::strategy`]. Either way a job stays on one
/// TaskManager when one has enough free slots (its channels stay in
/// memory), and is split over several — the fewest that hold it, those
/// with the most free slots first — only when none has.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub enum Strategy {
    /// Each job goes to the TaskManager with the most free slots: jobs
    /// spread over the region, evening out load.
    #[default]
    Spread,
    /// Each job goes to the TaskManager with the fewest free slots that
    /// holds it: TaskManagers fill one by one, and idle ones can be
    /// scaled away.
    Pack,
}

/// See [`SchedulingConfig::placement`].
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub enum Placement {
    #[default]
    Taskmanagers,
    InProcess,
}

/// A TaskManager's slots and addresses.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TaskManagerConfig {
    /// Task slots: a job of parallelism N takes N slots, on one
    /// TaskManager when one has them free, else over several (default 4).
    #[serde(default = "d_slots")]
    pub slots: u32,
    /// gRPC listen address for JobManager commands (default `0.0.0.0:6124`).
    #[serde(default = "d_tm_listen")]
    pub listen: String,
    /// URL JobManagers dial (default `http://<listen>`, `0.0.0.0` replaced
    /// by `127.0.0.1`).
    #[serde(default)]
    pub advertise: Option<String>,
    /// HTTP listen address for `/healthz`, `/readyz` and `/metrics`
    /// (default `0.0.0.0:9249`).
    #[serde(default = "d_tm_http")]
    pub http_listen: String,
    /// Listen address of the exchange port, where other TaskManagers send
    /// the records of jobs spread over TaskManagers (default: the host of
    /// `listen`, a free port — it is published in the membership record;
    /// mutual TLS with `tls.grpc`). See [`ProcessConfig::exchange_listen`].
    #[serde(default)]
    pub exchange_listen: Option<String>,
    /// URL other TaskManagers reach the exchange port at (default
    /// `http://<exchangeListen>`, `https://` with `tls.grpc`).
    #[serde(default)]
    pub exchange_advertise: Option<String>,
    /// Batches a channel from another TaskManager may have in flight
    /// (credits; default 8): memory per channel is about this many
    /// batches.
    #[serde(default = "d_tm_credits")]
    pub exchange_credits: u32,
    /// On SIGTERM, first drain: the leader moves this TaskManager's jobs
    /// elsewhere by savepoint (default false; the Kubernetes manifests set
    /// it), then stop. Without it SIGTERM stops the tasks and the jobs
    /// restart from their checkpoints elsewhere.
    #[serde(default)]
    pub drain_on_shutdown: bool,
    /// How long a drain on shutdown waits for the jobs to move before the
    /// TaskManager stops anyway (default 2m; keep it under the pod's
    /// termination grace period).
    #[serde(default = "d_drain_timeout")]
    pub drain_timeout: DurationSpec,
    /// Memory for keyed window state on this TaskManager, all jobs
    /// together (e.g. `512MiB`; at least 16MiB). Set, window state lives
    /// in an embedded store on local disk (`stateDir`) with this much
    /// memory for its caches, so a job's state may be larger than memory.
    /// Unset (the default), window state stays in memory, which is faster.
    #[serde(default, deserialize_with = "state_memory")]
    pub state_memory: Option<bytesize::ByteSize>,
    /// Local directory of the state store when `stateMemory` is set
    /// (default `<temp dir>/ferry-state/<instance id>`). Its content is
    /// rebuilt from checkpoints: it is wiped when the TaskManager starts.
    /// Give it a fast local disk (a Kubernetes `emptyDir`).
    #[serde(default)]
    pub state_dir: Option<String>,
}

/// Reads `taskmanager.stateMemory`: a size with its unit or a number of
/// bytes, with an error that names the key.
fn state_memory<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<Option<bytesize::ByteSize>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        Bytes(u64),
        Text(String),
    }
    let bad = |v: &dyn std::fmt::Display| {
        serde::de::Error::custom(format!(
            "taskmanager.stateMemory: '{v}' is not a size; use e.g. 512MiB, 2GiB or a number of bytes"
        ))
    };
    match Option::<Raw>::deserialize(d)? {
        None => Ok(None),
        Some(Raw::Bytes(b)) => Ok(Some(bytesize::ByteSize::b(b))),
        Some(Raw::Text(t)) => t.trim().parse().map(Some).map_err(|_| bad(&t)),
    }
}

/// The least `taskmanager.stateMemory` accepted.
pub const MIN_STATE_MEMORY: u64 = 16 << 20;

/// Refuses a state memory bound below [`MIN_STATE_MEMORY`]; `name` is how
/// the user set it (`taskmanager.stateMemory`, `--state-memory`).
pub fn check_state_memory(name: &str, m: bytesize::ByteSize) -> Result<(), String> {
    if m.as_u64() < MIN_STATE_MEMORY {
        return Err(format!(
            "{name} {m}: use at least 16MiB (or leave it unset to keep window state in memory)"
        ));
    }
    Ok(())
}

fn d_drain_timeout() -> DurationSpec {
    DurationSpec::from_millis(120_000)
}

fn d_slots() -> u32 {
    4
}
fn d_tm_listen() -> String {
    "0.0.0.0:6124".to_string()
}
fn d_tm_http() -> String {
    "0.0.0.0:9249".to_string()
}
fn d_tm_credits() -> u32 {
    8
}

impl Default for TaskManagerConfig {
    fn default() -> Self {
        Self {
            slots: d_slots(),
            listen: d_tm_listen(),
            advertise: None,
            http_listen: d_tm_http(),
            exchange_listen: None,
            exchange_advertise: None,
            exchange_credits: d_tm_credits(),
            drain_on_shutdown: false,
            drain_timeout: d_drain_timeout(),
            state_memory: None,
            state_dir: None,
        }
    }
}

/// How to reach the region's NATS.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NatsConfig {
    /// One or more server URLs of the same cluster, e.g. `nats://10.0.0.1:4222`.
    pub urls: Vec<String>,
    /// JetStream KV bucket for membership and the leader lease
    /// (default `ferry-<region>`).
    #[serde(default)]
    pub bucket: Option<String>,
    /// Replicas of the bucket (1 for a single server, 3 for a 3-node cluster).
    #[serde(default = "one")]
    pub replicas: usize,
    /// How to authenticate to the region's cluster.
    #[serde(default)]
    pub auth: NatsAuth,
    /// TLS to the region's cluster (required when set).
    #[serde(default)]
    pub tls: Option<NatsTls>,
}

/// TLS to a NATS cluster. When set, the process speaks only TLS to it
/// (a server that offers none is refused) and checks the server's
/// certificate against `caFile` (default: the system's roots). The
/// client certificate is for servers that verify clients (`verify: true`
/// in the server's `tls` block). The files are read again on every
/// (re)connection, so a rotated certificate is used from the next one.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NatsTls {
    /// CA certificates (PEM) the server's certificate must chain to.
    #[serde(default)]
    pub ca_file: Option<String>,
    /// This process's client certificate chain (PEM), leaf first.
    #[serde(default)]
    pub cert_file: Option<String>,
    /// Its private key (PEM).
    #[serde(default)]
    pub key_file: Option<String>,
}

impl NatsTls {
    /// Checks that the client certificate and key come together; `at` is
    /// the key (`nats.tls`).
    pub fn check(&self, at: &str) -> Result<(), String> {
        if self.cert_file.is_some() != self.key_file.is_some() {
            return Err(format!(
                "{at}: certFile and keyFile go together (a client certificate and its key); give both or neither"
            ));
        }
        Ok(())
    }
}

/// Credentials for a NATS cluster (the region's, or the global one). The
/// config names only files — mounted Kubernetes Secrets — read when the
/// process connects, so nothing secret is in the config or echoed with it.
/// Give at most one way: `user` with `passwordFile`, `tokenFile`,
/// `nkeySeedFile`, or `credsFile` (a JWT and NKey seed, as `nsc` writes
/// them). Credentials in a server URL (`nats://user:pass@host`) work too,
/// but end up wherever the URL is shown: prefer the files.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NatsAuth {
    /// User name; the password is in `passwordFile`.
    #[serde(default)]
    pub user: Option<String>,
    /// File holding the user's password.
    #[serde(default)]
    pub password_file: Option<String>,
    /// File holding an authentication token.
    #[serde(default)]
    pub token_file: Option<String>,
    /// File holding an NKey seed (`SU…`).
    #[serde(default)]
    pub nkey_seed_file: Option<String>,
    /// A `.creds` file (decentralized JWT authentication).
    #[serde(default)]
    pub creds_file: Option<String>,
}

impl NatsAuth {
    /// Whether no credentials are configured.
    pub fn is_empty(&self) -> bool {
        self == &Self::default()
    }

    /// Checks that the credentials are given one way, completely; `at` is
    /// the key (`nats.auth`), `urls` the cluster's URLs.
    pub fn check(&self, at: &str, urls: &[String]) -> Result<(), String> {
        if self.user.is_some() != self.password_file.is_some() {
            return Err(format!(
                "{at}: user and passwordFile go together; give both, or use tokenFile, nkeySeedFile or credsFile"
            ));
        }
        let ways = [
            self.user.is_some(),
            self.token_file.is_some(),
            self.nkey_seed_file.is_some(),
            self.creds_file.is_some(),
        ];
        if ways.iter().filter(|w| **w).count() > 1 {
            return Err(format!(
                "{at}: give one way to authenticate: user with passwordFile, tokenFile, nkeySeedFile or credsFile"
            ));
        }
        if !self.is_empty()
            && let Some(u) = urls.iter().find(|u| url_has_credentials(u))
        {
            return Err(format!(
                "{at}: the URL {} carries credentials too; give them once, in {at}",
                redact_url(u)
            ));
        }
        Ok(())
    }
}

/// The host and port of a server URL (`nats://user:pw@host:4222`,
/// `tls://host`, `host:port`, `[::1]:4222`), credentials dropped; the port
/// is `default_port` when the URL gives none.
pub fn url_host_port(url: &str, default_port: u16) -> Option<(String, u16)> {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let authority = rest.split(['/', '?', '#']).next()?;
    let hostport = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    let (host, port) = match hostport.strip_prefix('[') {
        Some(v6) => {
            let (h, p) = v6.split_once(']')?;
            (h, p.strip_prefix(':'))
        }
        None => match hostport.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (hostport, None),
        },
    };
    let port = match port {
        Some(p) => p.parse().ok()?,
        None => default_port,
    };
    (!host.is_empty()).then(|| (host.to_string(), port))
}

/// Whether a URL carries credentials (`scheme://user:pass@host`).
pub fn url_has_credentials(url: &str) -> bool {
    userinfo_span(url).is_some()
}

/// Where the credentials of a URL are: the byte range of its userinfo.
fn userinfo_span(url: &str) -> Option<(usize, usize)> {
    let start = url.find("://").map(|i| i + 3)?;
    let rest = &url[start..];
    let authority = rest.find(['/', '?', '#']).map_or(rest, |end| &rest[..end]);
    let at = authority.rfind('@')?;
    Some((start, start + at))
}

/// The credentials a URL carries, percent-decoded: `(user, Some(password))`
/// for `scheme://user:password@host`, `(token, None)` for
/// `scheme://token@host` (NATS reads a lone user as a token).
pub fn url_userinfo(url: &str) -> Option<(String, Option<String>)> {
    let (start, end) = userinfo_span(url)?;
    let decode = |s: &str| {
        percent_encoding::percent_decode_str(s)
            .decode_utf8_lossy()
            .into_owned()
    };
    Some(match url[start..end].split_once(':') {
        Some((user, password)) => (decode(user), Some(decode(password))),
        None => (decode(&url[start..end]), None),
    })
}

/// `url` with any password or token replaced by `***`
/// (`nats://app:***@host:4222`, `nats://***@host`): for logs, errors and
/// anything else a person or a log pipeline reads. Comma-separated lists
/// of URLs are redacted one by one.
pub fn redact_url(url: &str) -> String {
    if url.contains(',') {
        return url.split(',').map(redact_url).collect::<Vec<_>>().join(",");
    }
    match userinfo_span(url) {
        None => url.to_string(),
        Some((start, end)) => {
            let userinfo = &url[start..end];
            let shown = match userinfo.split_once(':') {
                Some((user, _)) => format!("{user}:***"),
                None => "***".to_string(),
            };
            format!("{}{shown}{}", &url[..start], &url[end..])
        }
    }
}

/// [`redact_url`] over any text: every URL in it (`scheme://…` up to
/// whitespace or a quote) is redacted. For messages that quote a URL
/// inside other words — errors from a client library.
pub fn redact_urls_in(text: &str) -> String {
    if !text.contains('@') {
        return text.to_string();
    }
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(i) = rest.find("://") {
        // The scheme starts after the last non-scheme character.
        let scheme_start = rest[..i]
            .rfind(|c: char| !(c.is_ascii_alphanumeric() || c == '+' || c == '-' || c == '.'))
            .map_or(0, |j| j + 1);
        let end = rest[i..]
            .find(|c: char| c.is_whitespace() || c == '"' || c == '\'' || c == '`' || c == ',')
            .map_or(rest.len(), |e| i + e);
        out.push_str(&rest[..scheme_start]);
        out.push_str(&redact_url(&rest[scheme_start..end]));
        rest = &rest[end..];
    }
    out.push_str(rest);
    out
}

fn one() -> usize {
    1
}

/// Where the REST API listens and how others reach it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ApiConfig {
    /// Listen address (default `0.0.0.0:8081`).
    #[serde(default = "default_listen")]
    pub listen: String,
    /// URL other JobManagers and clients use to reach this one (default:
    /// `http://<listen>`, with `0.0.0.0` replaced by `127.0.0.1`). Standbys
    /// forward writes to the leader's advertised URL.
    #[serde(default)]
    pub advertise: Option<String>,
    /// Who may call the API (default: anyone; see docs/security.md).
    #[serde(default)]
    pub auth: ApiAuthConfig,
}

/// Authentication of REST callers: static tokens, JWTs, client
/// certificates, or any mix. With none configured the API is open (every
/// caller is an admin).
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ApiAuthConfig {
    /// YAML file of static tokens and their grants (`tokens: [{name,
    /// token | sha256, roles: [ns:role]}]`); kept hashed, read again when
    /// it changes.
    #[serde(default)]
    pub tokens_file: Option<String>,
    /// JWTs signed by a key of a JWKS file or URL.
    #[serde(default)]
    pub jwt: Option<JwtConfig>,
    /// Callers identified by a TLS client certificate (needs `tls.api`).
    #[serde(default)]
    pub client_certificates: Option<ClientCertAuth>,
    /// Whether `/metrics` needs a caller with any role (default false:
    /// Prometheus scrapes it openly).
    #[serde(default)]
    pub metrics_authenticated: bool,
}

impl ApiAuthConfig {
    /// Whether any way to authenticate is configured.
    pub fn enabled(&self) -> bool {
        self.tokens_file.is_some() || self.jwt.is_some() || self.client_certificates.is_some()
    }
}

/// How a JWT is checked.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct JwtConfig {
    /// JSON Web Key Set file with the issuer's public keys (RSA, EC, Ed25519)
    /// or shared secrets (`oct`); read again when it changes.
    #[serde(default)]
    pub jwks_file: Option<String>,
    /// ... or the issuer's JWKS endpoint (`https://`; `http://` only to a
    /// loopback host), fetched at start, every `jwksRefreshInterval`, and
    /// when a token names a key id the set lacks (at most every 30 s).
    #[serde(default)]
    pub jwks_url: Option<String>,
    /// CA certificates (PEM) that the JWKS endpoint's certificate chains to,
    /// instead of the system's roots.
    #[serde(default)]
    pub jwks_ca_file: Option<String>,
    /// How often the JWKS URL is fetched again (default 5m).
    #[serde(default = "d_jwks_refresh")]
    pub jwks_refresh_interval: DurationSpec,
    /// Required `iss` claim (recommended).
    #[serde(default)]
    pub issuer: Option<String>,
    /// Required `aud` claim (recommended).
    #[serde(default)]
    pub audience: Option<String>,
    /// Claim holding the caller's grants, a list (or space-separated
    /// string) of `namespace:role` (default `roles`).
    #[serde(default = "d_roles_claim")]
    pub roles_claim: String,
}

fn d_jwks_refresh() -> DurationSpec {
    DurationSpec(Duration::from_secs(300))
}

impl JwtConfig {
    fn check(&self) -> Result<(), String> {
        match (&self.jwks_file, &self.jwks_url) {
            (Some(_), None) => {}
            (None, Some(url)) => {
                let scheme = url.split_once("://").map_or("", |(s, _)| s);
                let loopback = url_host_port(url, 80).is_some_and(|(h, _)| is_loopback_listen(&h));
                match scheme {
                    "https" => {}
                    "http" if loopback => {}
                    "http" => {
                        return Err(format!(
                            "api.auth.jwt.jwksUrl {url}: use https:// (keys fetched over plain http could be swapped by anyone on the path); http:// is taken only for a loopback host"
                        ));
                    }
                    _ => {
                        return Err(format!(
                            "api.auth.jwt.jwksUrl {url:?} is not an https:// URL"
                        ));
                    }
                }
            }
            _ => {
                return Err("api.auth.jwt: give exactly one of jwksFile and jwksUrl".to_string());
            }
        }
        if self.jwks_ca_file.is_some() && self.jwks_url.is_none() {
            return Err(
                "api.auth.jwt.jwksCaFile is for jwksUrl; it has no use with jwksFile".into(),
            );
        }
        if self.jwks_refresh_interval.get() < Duration::from_secs(1) {
            return Err(format!(
                "api.auth.jwt.jwksRefreshInterval ({}) must be at least 1s",
                self.jwks_refresh_interval
            ));
        }
        Ok(())
    }
}

/// REST callers identified by a TLS client certificate: the certificate
/// must chain to `caFile` (a CA for callers, not the JobManagers' own), and
/// its subject common name, a DNS name or a URI (e.g. a SPIFFE id) it
/// carries names an entry of `identities`, which holds its grants.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ClientCertAuth {
    /// The CA (PEM) that signs callers' certificates. It must not be
    /// `tls.api.caFile`: a certificate of that CA is a JobManager's.
    pub ca_file: String,
    /// Certificate name → grants (`namespace:role`): a list, or one
    /// space-separated string (as the environment gives it).
    #[serde(default, deserialize_with = "grants_by_name")]
    pub identities: BTreeMap<String, Vec<String>>,
}

fn grants_by_name<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<BTreeMap<String, Vec<String>>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Grants {
        Spaced(String),
        List(Vec<String>),
    }
    let map = BTreeMap::<String, Grants>::deserialize(d)?;
    Ok(map
        .into_iter()
        .map(|(name, g)| {
            let list = match g {
                Grants::Spaced(s) => s.split_whitespace().map(str::to_string).collect(),
                Grants::List(l) => l,
            };
            (name, list)
        })
        .collect())
}

fn d_roles_claim() -> String {
    "roles".to_string()
}

fn default_listen() -> String {
    "0.0.0.0:8081".to_string()
}

impl Default for ApiConfig {
    fn default() -> Self {
        Self {
            listen: default_listen(),
            advertise: None,
            auth: ApiAuthConfig::default(),
        }
    }
}

/// Timing of membership heartbeats and of the leader lease.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HaTiming {
    /// Time between membership heartbeats (default 1s).
    #[serde(default = "d_heartbeat")]
    pub heartbeat_interval: DurationSpec,
    /// A member not heard from this long is gone (default 3s).
    #[serde(default = "d_expiry")]
    pub member_expiry: DurationSpec,
    /// A lease not renewed this long may be taken over (default 800ms).
    #[serde(default = "d_ttl")]
    pub lease_ttl: DurationSpec,
    /// Time between lease renewals (default 150ms).
    #[serde(default = "d_renew")]
    pub renew_interval: DurationSpec,
    /// A leader whose last successful renewal is older than this stops all
    /// leader work (default 500ms; must be below `leaseTtl`).
    #[serde(default = "d_deadline")]
    pub renew_deadline: DurationSpec,
    /// JobManagers that must be heard from before the first election
    /// (default 1).
    #[serde(default = "one_u32")]
    pub min_instances_for_election: u32,
}

fn one_u32() -> u32 {
    1
}
fn d_heartbeat() -> DurationSpec {
    DurationSpec(Duration::from_secs(1))
}
fn d_expiry() -> DurationSpec {
    DurationSpec(Duration::from_secs(3))
}
fn d_ttl() -> DurationSpec {
    DurationSpec(Duration::from_millis(800))
}
fn d_renew() -> DurationSpec {
    DurationSpec(Duration::from_millis(150))
}
fn d_deadline() -> DurationSpec {
    DurationSpec(Duration::from_millis(500))
}

impl Default for HaTiming {
    fn default() -> Self {
        Self {
            heartbeat_interval: d_heartbeat(),
            member_expiry: d_expiry(),
            lease_ttl: d_ttl(),
            renew_interval: d_renew(),
            renew_deadline: d_deadline(),
            min_instances_for_election: 1,
        }
    }
}

/// How an environment variable's text becomes a config value.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EnvKind {
    Text,
    /// Comma-separated list.
    List,
    /// Comma-separated `name=value` pairs.
    Map,
    /// `true` or `false`.
    Bool,
    Integer,
    /// A decimal number (e.g. `0.2`).
    Number,
}

/// Every config key settable from the environment: (variable, dotted path,
/// kind).
pub const ENV_KEYS: &[(&str, &str, EnvKind)] = &[
    ("FERRY_REGION", "region", EnvKind::Text),
    ("FERRY_INSTANCE_ID", "instanceId", EnvKind::Text),
    ("FERRY_NATS_URLS", "nats.urls", EnvKind::List),
    ("FERRY_NATS_BUCKET", "nats.bucket", EnvKind::Text),
    ("FERRY_NATS_REPLICAS", "nats.replicas", EnvKind::Integer),
    ("FERRY_NATS_USER", "nats.auth.user", EnvKind::Text),
    (
        "FERRY_NATS_PASSWORD_FILE",
        "nats.auth.passwordFile",
        EnvKind::Text,
    ),
    (
        "FERRY_NATS_TOKEN_FILE",
        "nats.auth.tokenFile",
        EnvKind::Text,
    ),
    (
        "FERRY_NATS_NKEY_SEED_FILE",
        "nats.auth.nkeySeedFile",
        EnvKind::Text,
    ),
    (
        "FERRY_NATS_CREDS_FILE",
        "nats.auth.credsFile",
        EnvKind::Text,
    ),
    ("FERRY_NATS_TLS_CA_FILE", "nats.tls.caFile", EnvKind::Text),
    (
        "FERRY_NATS_TLS_CERT_FILE",
        "nats.tls.certFile",
        EnvKind::Text,
    ),
    ("FERRY_NATS_TLS_KEY_FILE", "nats.tls.keyFile", EnvKind::Text),
    ("FERRY_STORAGE", "storage", EnvKind::Text),
    ("FERRY_API_LISTEN", "api.listen", EnvKind::Text),
    ("FERRY_API_ADVERTISE", "api.advertise", EnvKind::Text),
    (
        "FERRY_API_AUTH_TOKENS_FILE",
        "api.auth.tokensFile",
        EnvKind::Text,
    ),
    (
        "FERRY_API_AUTH_JWT_JWKS_FILE",
        "api.auth.jwt.jwksFile",
        EnvKind::Text,
    ),
    (
        "FERRY_API_AUTH_JWT_JWKS_URL",
        "api.auth.jwt.jwksUrl",
        EnvKind::Text,
    ),
    (
        "FERRY_API_AUTH_JWT_JWKS_CA_FILE",
        "api.auth.jwt.jwksCaFile",
        EnvKind::Text,
    ),
    (
        "FERRY_API_AUTH_JWT_JWKS_REFRESH_INTERVAL",
        "api.auth.jwt.jwksRefreshInterval",
        EnvKind::Text,
    ),
    (
        "FERRY_API_AUTH_CLIENT_CERTIFICATES_CA_FILE",
        "api.auth.clientCertificates.caFile",
        EnvKind::Text,
    ),
    (
        "FERRY_API_AUTH_CLIENT_CERTIFICATES_IDENTITIES",
        "api.auth.clientCertificates.identities",
        EnvKind::Map,
    ),
    (
        "FERRY_API_AUTH_JWT_ISSUER",
        "api.auth.jwt.issuer",
        EnvKind::Text,
    ),
    (
        "FERRY_API_AUTH_JWT_AUDIENCE",
        "api.auth.jwt.audience",
        EnvKind::Text,
    ),
    (
        "FERRY_API_AUTH_JWT_ROLES_CLAIM",
        "api.auth.jwt.rolesClaim",
        EnvKind::Text,
    ),
    (
        "FERRY_API_AUTH_METRICS_AUTHENTICATED",
        "api.auth.metricsAuthenticated",
        EnvKind::Bool,
    ),
    (
        "FERRY_HA_HEARTBEAT_INTERVAL",
        "ha.heartbeatInterval",
        EnvKind::Text,
    ),
    ("FERRY_HA_MEMBER_EXPIRY", "ha.memberExpiry", EnvKind::Text),
    ("FERRY_HA_LEASE_TTL", "ha.leaseTtl", EnvKind::Text),
    ("FERRY_HA_RENEW_INTERVAL", "ha.renewInterval", EnvKind::Text),
    ("FERRY_HA_RENEW_DEADLINE", "ha.renewDeadline", EnvKind::Text),
    (
        "FERRY_HA_MIN_INSTANCES_FOR_ELECTION",
        "ha.minInstancesForElection",
        EnvKind::Integer,
    ),
    (
        "FERRY_SCHEDULING_PLACEMENT",
        "scheduling.placement",
        EnvKind::Text,
    ),
    (
        "FERRY_SCHEDULING_STRATEGY",
        "scheduling.strategy",
        EnvKind::Text,
    ),
    (
        "FERRY_SCHEDULING_REBALANCE",
        "scheduling.rebalance",
        EnvKind::Text,
    ),
    (
        "FERRY_SCHEDULING_REBALANCE_THRESHOLD",
        "scheduling.rebalanceThreshold",
        EnvKind::Number,
    ),
    (
        "FERRY_SCHEDULING_REBALANCE_INTERVAL",
        "scheduling.rebalanceInterval",
        EnvKind::Text,
    ),
    (
        "FERRY_SCHEDULING_MAX_CONCURRENT_MOVES",
        "scheduling.maxConcurrentMoves",
        EnvKind::Integer,
    ),
    (
        "FERRY_TASKMANAGER_SLOTS",
        "taskmanager.slots",
        EnvKind::Integer,
    ),
    (
        "FERRY_TASKMANAGER_LISTEN",
        "taskmanager.listen",
        EnvKind::Text,
    ),
    (
        "FERRY_TASKMANAGER_ADVERTISE",
        "taskmanager.advertise",
        EnvKind::Text,
    ),
    (
        "FERRY_TASKMANAGER_HTTP_LISTEN",
        "taskmanager.httpListen",
        EnvKind::Text,
    ),
    (
        "FERRY_TASKMANAGER_EXCHANGE_LISTEN",
        "taskmanager.exchangeListen",
        EnvKind::Text,
    ),
    (
        "FERRY_TASKMANAGER_EXCHANGE_ADVERTISE",
        "taskmanager.exchangeAdvertise",
        EnvKind::Text,
    ),
    (
        "FERRY_TASKMANAGER_EXCHANGE_CREDITS",
        "taskmanager.exchangeCredits",
        EnvKind::Integer,
    ),
    (
        "FERRY_TASKMANAGER_DRAIN_ON_SHUTDOWN",
        "taskmanager.drainOnShutdown",
        EnvKind::Bool,
    ),
    (
        "FERRY_TASKMANAGER_DRAIN_TIMEOUT",
        "taskmanager.drainTimeout",
        EnvKind::Text,
    ),
    (
        "FERRY_TASKMANAGER_STATE_MEMORY",
        "taskmanager.stateMemory",
        EnvKind::Text,
    ),
    (
        "FERRY_TASKMANAGER_STATE_DIR",
        "taskmanager.stateDir",
        EnvKind::Text,
    ),
    ("FERRY_REGIONS_STORES", "regions.stores", EnvKind::Map),
    (
        "FERRY_REGIONS_STORE_CREDENTIALS",
        "regions.storeCredentials",
        EnvKind::Map,
    ),
    ("FERRY_REGIONS_PRIMARY", "regions.primary", EnvKind::Text),
    (
        "FERRY_REGIONS_GLOBAL_URLS",
        "regions.global.urls",
        EnvKind::List,
    ),
    (
        "FERRY_REGIONS_GLOBAL_BUCKET",
        "regions.global.bucket",
        EnvKind::Text,
    ),
    (
        "FERRY_REGIONS_GLOBAL_REPLICAS",
        "regions.global.replicas",
        EnvKind::Integer,
    ),
    (
        "FERRY_REGIONS_GLOBAL_USER",
        "regions.global.auth.user",
        EnvKind::Text,
    ),
    (
        "FERRY_REGIONS_GLOBAL_PASSWORD_FILE",
        "regions.global.auth.passwordFile",
        EnvKind::Text,
    ),
    (
        "FERRY_REGIONS_GLOBAL_TOKEN_FILE",
        "regions.global.auth.tokenFile",
        EnvKind::Text,
    ),
    (
        "FERRY_REGIONS_GLOBAL_NKEY_SEED_FILE",
        "regions.global.auth.nkeySeedFile",
        EnvKind::Text,
    ),
    (
        "FERRY_REGIONS_GLOBAL_CREDS_FILE",
        "regions.global.auth.credsFile",
        EnvKind::Text,
    ),
    (
        "FERRY_REGIONS_GLOBAL_TLS_CA_FILE",
        "regions.global.tls.caFile",
        EnvKind::Text,
    ),
    (
        "FERRY_REGIONS_GLOBAL_TLS_CERT_FILE",
        "regions.global.tls.certFile",
        EnvKind::Text,
    ),
    (
        "FERRY_REGIONS_GLOBAL_TLS_KEY_FILE",
        "regions.global.tls.keyFile",
        EnvKind::Text,
    ),
    (
        "FERRY_REGIONS_HEALTH_CHECK_INTERVAL",
        "regions.healthCheckInterval",
        EnvKind::Text,
    ),
    ("FERRY_REGIONS_TIMEOUT", "regions.timeout", EnvKind::Text),
    (
        "FERRY_REGIONS_AUTO_FAILOVER",
        "regions.autoFailover",
        EnvKind::Bool,
    ),
    (
        "FERRY_REGIONS_VERIFY_INTERVAL",
        "regions.verifyInterval",
        EnvKind::Text,
    ),
    ("FERRY_REGIONS_WEBHOOK", "regions.webhook", EnvKind::Text),
    (
        "FERRY_REGIONS_WEBHOOK_CA_FILE",
        "regions.webhookCaFile",
        EnvKind::Text,
    ),
    (
        "FERRY_REGIONS_WEBHOOK_TOKEN_FILE",
        "regions.webhookTokenFile",
        EnvKind::Text,
    ),
    (
        "FERRY_REGIONS_REPLICATION",
        "regions.replication",
        EnvKind::Text,
    ),
    (
        "FERRY_REGIONS_SYNC_STANDBYS",
        "regions.syncStandbys",
        EnvKind::Integer,
    ),
    (
        "FERRY_REGIONS_ON_STANDBY_LOSS",
        "regions.onStandbyLoss",
        EnvKind::Text,
    ),
    (
        "FERRY_REGIONS_SYNC_TIMEOUT",
        "regions.syncTimeout",
        EnvKind::Text,
    ),
    ("FERRY_REGIONS_STANDBY", "regions.standby", EnvKind::Text),
    (
        "FERRY_TLS_GRPC_CERT_FILE",
        "tls.grpc.certFile",
        EnvKind::Text,
    ),
    ("FERRY_TLS_GRPC_KEY_FILE", "tls.grpc.keyFile", EnvKind::Text),
    ("FERRY_TLS_GRPC_CA_FILE", "tls.grpc.caFile", EnvKind::Text),
    (
        "FERRY_TLS_GRPC_SERVER_NAME",
        "tls.grpc.serverName",
        EnvKind::Text,
    ),
    (
        "FERRY_TLS_GRPC_CLIENT_NAME",
        "tls.grpc.clientName",
        EnvKind::Text,
    ),
    ("FERRY_TLS_API_CERT_FILE", "tls.api.certFile", EnvKind::Text),
    ("FERRY_TLS_API_KEY_FILE", "tls.api.keyFile", EnvKind::Text),
    ("FERRY_TLS_API_CA_FILE", "tls.api.caFile", EnvKind::Text),
    (
        "FERRY_SECURITY_ALLOWED_URLS",
        "security.allowedUrls",
        EnvKind::List,
    ),
    (
        "FERRY_TLS_RELOAD_INTERVAL",
        "tls.reloadInterval",
        EnvKind::Text,
    ),
];

/// A configuration problem, saying where and what to do.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(pub String);

impl ProcessConfig {
    /// Reads `file` (if any) and applies `env` (`FERRY_*` variables) on top,
    /// then checks the result.
    pub fn load(
        file: Option<(&str, &str)>,
        env: &BTreeMap<String, String>,
    ) -> Result<Self, ConfigError> {
        let mut tree = match file {
            Some((name, text)) if !text.trim().is_empty() => {
                let v: Value = serde_yaml_ng::from_str(text)
                    .map_err(|e| ConfigError(format!("{name}: {e}")))?;
                if !v.is_object() {
                    return Err(ConfigError(format!(
                        "{name}: the config must be a mapping of keys (region, nats, storage, api, ha)"
                    )));
                }
                v
            }
            _ => Value::Object(Default::default()),
        };
        for (var, path, kind) in ENV_KEYS {
            let Some(raw) = env.get(*var) else { continue };
            let value = match kind {
                EnvKind::Text => Value::String(raw.clone()),
                EnvKind::List => Value::Array(
                    raw.split(',')
                        .map(str::trim)
                        .filter(|s| !s.is_empty())
                        .map(|s| Value::String(s.to_string()))
                        .collect(),
                ),
                EnvKind::Bool => match raw.trim() {
                    "true" | "1" | "yes" => Value::Bool(true),
                    "false" | "0" | "no" => Value::Bool(false),
                    other => {
                        return Err(ConfigError(format!("{var}={other:?} is not true or false")));
                    }
                },
                EnvKind::Map => {
                    let mut m = serde_json::Map::new();
                    for pair in raw.split(',').map(str::trim).filter(|s| !s.is_empty()) {
                        let Some((k, v)) = pair.split_once('=') else {
                            return Err(ConfigError(format!(
                                "{var}: '{pair}' is not name=value (e.g. us-east=s3://ferry-us-east/ferry)"
                            )));
                        };
                        m.insert(k.trim().to_string(), Value::String(v.trim().to_string()));
                    }
                    Value::Object(m)
                }
                EnvKind::Integer => Value::Number(
                    raw.trim()
                        .parse::<u64>()
                        .map_err(|_| ConfigError(format!("{var}={raw:?} is not a whole number")))?
                        .into(),
                ),
                EnvKind::Number => raw
                    .trim()
                    .parse::<f64>()
                    .ok()
                    .and_then(serde_json::Number::from_f64)
                    .map(Value::Number)
                    .ok_or_else(|| ConfigError(format!("{var}={raw:?} is not a number")))?,
            };
            set_path(&mut tree, path, value);
        }
        for var in env.keys().filter(|k| k.starts_with("FERRY_")) {
            if !ENV_KEYS.iter().any(|(v, _, _)| v == var) && !IGNORED_ENV.contains(&var.as_str()) {
                tracing::warn!("ignoring unknown environment variable {var} (see docs/config.md)");
            }
        }
        let source = file.map(|(n, _)| n).unwrap_or("the environment");
        let cfg: ProcessConfig = serde_json::from_value(tree).map_err(|e| {
            ConfigError(format!(
                "{source}: {e} (each key can also be set by its FERRY_* variable; see docs/config.md)"
            ))
        })?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Checks values that parse but cannot work.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let err = |m: String| Err(ConfigError(m));
        if self.region.trim().is_empty()
            || !self
                .region
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            return err(format!(
                "region {:?}: use letters, digits, '-' or '_' (e.g. eu-west)",
                self.region
            ));
        }
        if self.nats.urls.is_empty() {
            return err("nats.urls: give at least one NATS server URL (FERRY_NATS_URLS)".into());
        }
        self.nats
            .auth
            .check("nats.auth", &self.nats.urls)
            .map_err(ConfigError)?;
        self.regions
            .global
            .auth
            .check("regions.global.auth", &self.regions.global.urls)
            .map_err(ConfigError)?;
        self.access_policy().map_err(ConfigError)?;
        for (at, tls) in [
            ("nats.tls", &self.nats.tls),
            ("regions.global.tls", &self.regions.global.tls),
        ] {
            if let Some(t) = tls {
                t.check(at).map_err(ConfigError)?;
            }
        }
        if self.nats.replicas == 0 || self.nats.replicas > 5 {
            return err(format!(
                "nats.replicas: {} is out of range; JetStream allows 1 to 5",
                self.nats.replicas
            ));
        }
        let h = &self.ha;
        if let Err(e) = lease_timing(
            h.lease_ttl.get(),
            h.renew_interval.get(),
            h.renew_deadline.get(),
        ) {
            return err(e);
        }
        if h.heartbeat_interval.get() >= h.member_expiry.get() {
            return err(format!(
                "ha.heartbeatInterval ({}) must be below ha.memberExpiry ({})",
                h.heartbeat_interval, h.member_expiry
            ));
        }
        if h.heartbeat_interval.get().is_zero() || h.renew_interval.get().is_zero() {
            return err("ha.heartbeatInterval and ha.renewInterval must be above 0".into());
        }
        if h.min_instances_for_election == 0 {
            return err("ha.minInstancesForElection must be at least 1".into());
        }
        if let Some(own) = self.regions.stores.get(&self.region)
            && own != &self.storage
        {
            return err(format!(
                "regions.stores.{}: {own} differs from storage ({}); this region's entry must be its own storage",
                self.region, self.storage
            ));
        }
        let r = &self.regions;
        for (region, spec) in &r.store_credentials {
            let at = format!("regions.storeCredentials.{region}");
            if !r.stores.contains_key(region) || *region == self.region {
                return err(format!(
                    "{at}: credentials for a store that regions.stores does not list as another region's; this region's own store uses the process environment"
                ));
            }
            if !(spec.starts_with("env:") || spec.starts_with("file:")) {
                return err(format!(
                    "{at}: {spec:?} is neither env:PREFIX nor file:PATH"
                ));
            }
        }
        if r.primary.is_none() && r.stores.keys().any(|k| *k != self.region) {
            return err(
                "regions.primary: set the primary region (FERRY_REGIONS_PRIMARY) when regions.stores names other regions"
                    .into(),
            );
        }
        if r.health_check_interval.get().is_zero()
            || r.health_check_interval.get() * 2 >= r.timeout.get()
        {
            return err(format!(
                "regions.healthCheckInterval ({}) must be above 0 and below half of regions.timeout ({})",
                r.health_check_interval, r.timeout
            ));
        }
        if r.replication == ReplicationMode::Sync {
            let standbys = r.stores.keys().filter(|k| **k != self.region).count();
            if standbys == 0 {
                return err(
                    "regions.replication: sync needs standby stores: list the other regions in regions.stores (FERRY_REGIONS_STORES)"
                        .into(),
                );
            }
            if r.sync_standbys == 0 || r.sync_standbys > standbys {
                return err(format!(
                    "regions.syncStandbys ({}) must be between 1 and the number of standby stores in regions.stores ({standbys})",
                    r.sync_standbys
                ));
            }
            if r.sync_timeout.get().is_zero() {
                return err("regions.syncTimeout must be above 0".into());
            }
        }
        match r.webhook.as_deref().map(str::trim) {
            Some(url) if !(url.starts_with("https://") || url.starts_with("http://")) => {
                return err(format!(
                    "regions.webhook {}: use an http:// or https:// URL",
                    redact_url(url)
                ));
            }
            None | Some("") if r.webhook_ca_file.is_some() || r.webhook_token_file.is_some() => {
                return err(
                    "regions.webhookCaFile and regions.webhookTokenFile apply to regions.webhook, which is not set"
                        .into(),
                );
            }
            _ => {}
        }
        if self.taskmanager.slots == 0 {
            return err("taskmanager.slots must be at least 1".into());
        }
        advertise_matches_tls(
            "taskmanager.advertise",
            self.taskmanager.advertise.as_deref(),
            "tls.grpc",
            self.tls.grpc.is_some(),
        )?;
        advertise_matches_tls(
            "taskmanager.exchangeAdvertise",
            self.taskmanager.exchange_advertise.as_deref(),
            "tls.grpc",
            self.tls.grpc.is_some(),
        )?;
        let s = &self.scheduling;
        if !(s.rebalance_threshold.is_finite() && s.rebalance_threshold > 0.0) {
            return err(format!(
                "scheduling.rebalanceThreshold {}: use a number above 0 (e.g. 0.2)",
                s.rebalance_threshold
            ));
        }
        if s.max_concurrent_moves == 0 {
            return err("scheduling.maxConcurrentMoves must be at least 1".into());
        }
        if !(1..=1024).contains(&self.taskmanager.exchange_credits) {
            return err(format!(
                "taskmanager.exchangeCredits {}: use 1 to 1024 (batches in flight per channel)",
                self.taskmanager.exchange_credits
            ));
        }
        if let Some(m) = self.taskmanager.state_memory {
            check_state_memory("taskmanager.stateMemory", m).map_err(ConfigError)?;
        }
        advertise_matches_tls(
            "api.advertise",
            self.api.advertise.as_deref(),
            "tls.api",
            self.tls.api.is_some(),
        )?;
        if self.tls.reload_interval.get().is_zero() {
            return err("tls.reloadInterval must be above 0".into());
        }
        if let Some(j) = &self.api.auth.jwt {
            j.check().map_err(ConfigError)?;
        }
        if let Some(c) = &self.api.auth.client_certificates {
            let Some(api) = &self.tls.api else {
                return err("api.auth.clientCertificates needs tls.api: client certificates are asked for in the API's TLS handshake".into());
            };
            if same_file(&c.ca_file, &api.ca_file) {
                return err(format!(
                    "api.auth.clientCertificates.caFile {} is tls.api.caFile: that CA signs the JobManagers' own certificates, which must not pass for callers; give callers a CA of their own",
                    c.ca_file
                ));
            }
        }
        Ok(())
    }

    /// The KV bucket of the region.
    pub fn bucket(&self) -> String {
        self.nats
            .bucket
            .clone()
            .unwrap_or_else(|| format!("ferry-{}", self.region))
    }

    /// True when `regions.primary` names another region.
    pub fn is_standby_region(&self) -> bool {
        self.regions
            .primary
            .as_ref()
            .is_some_and(|p| *p != self.region)
    }

    /// The URL JobManagers dial this TaskManager at.
    pub fn taskmanager_url(&self, bound: &str) -> String {
        self.taskmanager
            .advertise
            .clone()
            .unwrap_or_else(|| default_url(self.tls.grpc.is_some(), bound))
    }

    /// Where the exchange port listens: `taskmanager.exchangeListen`, or
    /// the host of `taskmanager.listen` with a free port.
    pub fn exchange_listen(&self) -> String {
        match &self.taskmanager.exchange_listen {
            Some(l) => l.clone(),
            None => {
                let host = match self.taskmanager.listen.rsplit_once(':') {
                    Some((h, _)) => h,
                    None => self.taskmanager.listen.as_str(),
                };
                format!("{host}:0")
            }
        }
    }

    /// The URL other TaskManagers reach this one's exchange port at.
    pub fn exchange_url(&self, bound: &str) -> String {
        self.taskmanager
            .exchange_advertise
            .clone()
            .unwrap_or_else(|| default_url(self.tls.grpc.is_some(), bound))
    }

    /// The URL others reach this instance's API at.
    pub fn advertised_url(&self, bound: &str) -> String {
        self.api
            .advertise
            .clone()
            .unwrap_or_else(|| default_url(self.tls.api.is_some(), bound))
    }
}

/// The URL of a listener bound at `bound` when nothing is advertised:
/// `https` with TLS, and `0.0.0.0` as `127.0.0.1`.
fn default_url(tls: bool, bound: &str) -> String {
    let scheme = if tls { "https" } else { "http" };
    format!("{scheme}://{}", bound.replace("0.0.0.0", "127.0.0.1"))
}

/// An advertised URL (`key`) is `https://` exactly when its link's TLS
/// (`tls_key`) is set.
fn advertise_matches_tls(
    key: &str,
    url: Option<&str>,
    tls_key: &str,
    tls: bool,
) -> Result<(), ConfigError> {
    let Some(url) = url else { return Ok(()) };
    match (tls, url.starts_with("https://")) {
        (true, false) => Err(ConfigError(format!(
            "{key} {url}: use an https:// URL, {tls_key} is set"
        ))),
        (false, true) => Err(ConfigError(format!(
            "{key} {url}: an https:// URL needs {tls_key} (certFile, keyFile, caFile)"
        ))),
        _ => Ok(()),
    }
}

/// `FERRY_*` variables that are not config keys (read elsewhere).
const IGNORED_ENV: &[&str] = &[
    "FERRY_TEST_VENV",
    "FERRY_TEST_THREADS",
    "FERRY_TEST_SEED",
    "FERRY_NATS_SERVER",
    "FERRY_LOG",
    "FERRY_LOG_FORMAT",
    "FERRY_URL",
    "FERRY_DATA_DIR",
    "FERRY_LISTEN",
];

/// The leader lease's timing rule, the one place it is written (the
/// config and the elector both check it): a leader that cannot renew
/// stops `renew_deadline` after sending its last successful renewal, which
/// must come before the lease can expire for the others (`ttl`), and it
/// must try to renew (`renew_interval`) before its deadline.
pub fn lease_timing(
    ttl: Duration,
    renew_interval: Duration,
    renew_deadline: Duration,
) -> Result<(), String> {
    let f = humantime::format_duration;
    if renew_deadline >= ttl {
        return Err(format!(
            "ha.renewDeadline ({}) must be below ha.leaseTtl ({}): a leader must stop before another can take over",
            f(renew_deadline),
            f(ttl)
        ));
    }
    if renew_interval >= renew_deadline {
        return Err(format!(
            "ha.renewInterval ({}) must be below ha.renewDeadline ({})",
            f(renew_interval),
            f(renew_deadline)
        ));
    }
    Ok(())
}

fn set_path(tree: &mut Value, path: &str, value: Value) {
    let mut node = tree;
    let parts: Vec<&str> = path.split('.').collect();
    for (i, part) in parts.iter().enumerate() {
        if !node.is_object() {
            *node = Value::Object(Default::default());
        }
        let map = node.as_object_mut().expect("object");
        if i == parts.len() - 1 {
            map.insert(part.to_string(), value);
            return;
        }
        node = map
            .entry(part.to_string())
            .or_insert_with(|| Value::Object(Default::default()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    const FILE: &str =
        "region: eu-west\nnats: {urls: [nats://127.0.0.1:4222]}\nstorage: file:///tmp/f\n";

    #[test]
    fn webhook_trust_and_token_come_with_a_webhook_url() {
        let load = |vars: &[(&str, &str)]| ProcessConfig::load(Some(("f.yaml", FILE)), &env(vars));
        let c = load(&[
            ("FERRY_REGIONS_WEBHOOK", "https://ops.example/hooks/ferry"),
            ("FERRY_REGIONS_WEBHOOK_CA_FILE", "/etc/ferry/ops-ca.crt"),
            ("FERRY_REGIONS_WEBHOOK_TOKEN_FILE", "/etc/ferry/hook.token"),
        ])
        .unwrap();
        assert_eq!(
            c.regions.webhook_ca_file.as_deref(),
            Some("/etc/ferry/ops-ca.crt")
        );
        assert_eq!(
            c.regions.webhook_token_file.as_deref(),
            Some("/etc/ferry/hook.token")
        );
        let e = load(&[("FERRY_REGIONS_WEBHOOK_CA_FILE", "/ca.crt")])
            .unwrap_err()
            .to_string();
        assert!(e.contains("regions.webhook, which is not set"), "{e}");
        let e = load(&[("FERRY_REGIONS_WEBHOOK", "ops.example/hook")])
            .unwrap_err()
            .to_string();
        assert!(e.contains("use an http:// or https:// URL"), "{e}");
    }

    #[test]
    fn an_advertised_url_is_https_exactly_when_its_link_has_tls() {
        let load = |vars: &[(&str, &str)]| ProcessConfig::load(Some(("f.yaml", FILE)), &env(vars));
        let grpc = [
            ("FERRY_TLS_GRPC_CERT_FILE", "/c"),
            ("FERRY_TLS_GRPC_KEY_FILE", "/k"),
            ("FERRY_TLS_GRPC_CA_FILE", "/a"),
        ];
        let c = load(&grpc).unwrap();
        assert_eq!(c.taskmanager_url("0.0.0.0:6124"), "https://127.0.0.1:6124");
        assert_eq!(c.advertised_url("0.0.0.0:8081"), "http://127.0.0.1:8081");
        let mut v = grpc.to_vec();
        v.push(("FERRY_TASKMANAGER_ADVERTISE", "http://tm:6124"));
        let e = load(&v).unwrap_err().to_string();
        assert!(
            e.contains(
                "taskmanager.advertise http://tm:6124: use an https:// URL, tls.grpc is set"
            ),
            "{e}"
        );
        let e = load(&[("FERRY_API_ADVERTISE", "https://jm:8081")])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("api.advertise https://jm:8081: an https:// URL needs tls.api"),
            "{e}"
        );
    }

    #[test]
    fn api_authentication_settings_are_checked_at_start() {
        let load = |vars: &[(&str, &str)]| {
            ProcessConfig::load(Some(("f.yaml", FILE)), &env(vars)).map_err(|e| e.to_string())
        };
        let url = |u: &str| load(&[("FERRY_API_AUTH_JWT_JWKS_URL", u)]);
        assert!(url("https://idp.example.com/jwks.json").is_ok());
        assert!(url("http://127.0.0.1:8080/jwks.json").is_ok());
        let e = url("http://idp.example.com/jwks.json").unwrap_err();
        assert!(e.contains("use https://") && e.contains("loopback"), "{e}");
        let e = url("ftp://idp/jwks").unwrap_err();
        assert!(e.contains("is not an https:// URL"), "{e}");
        let e = load(&[
            ("FERRY_API_AUTH_JWT_JWKS_URL", "https://idp/jwks"),
            ("FERRY_API_AUTH_JWT_JWKS_FILE", "/etc/jwks.json"),
        ])
        .unwrap_err();
        assert!(e.contains("exactly one of jwksFile and jwksUrl"), "{e}");
        let e = load(&[
            ("FERRY_API_AUTH_JWT_JWKS_FILE", "/etc/jwks.json"),
            ("FERRY_API_AUTH_JWT_JWKS_CA_FILE", "/etc/ca.pem"),
        ])
        .unwrap_err();
        assert!(e.contains("jwksCaFile is for jwksUrl"), "{e}");
        let e = load(&[
            ("FERRY_API_AUTH_JWT_JWKS_URL", "https://idp/jwks"),
            ("FERRY_API_AUTH_JWT_JWKS_REFRESH_INTERVAL", "10ms"),
        ])
        .unwrap_err();
        assert!(e.contains("at least 1s"), "{e}");

        // Client certificates: they need the API's TLS, and a CA of their
        // own; grants come as a list or a spaced string.
        let certs = [
            (
                "FERRY_API_AUTH_CLIENT_CERTIFICATES_CA_FILE",
                "/pki/callers.pem",
            ),
            (
                "FERRY_API_AUTH_CLIENT_CERTIFICATES_IDENTITIES",
                "ci=payments:operator *:viewer,ops=*:admin",
            ),
        ];
        let e = load(&certs).unwrap_err();
        assert!(e.contains("needs tls.api"), "{e}");
        let tls = [
            ("FERRY_TLS_API_CERT_FILE", "/pki/jm.crt"),
            ("FERRY_TLS_API_KEY_FILE", "/pki/jm.key"),
        ];
        let mut v = certs.to_vec();
        v.extend(tls);
        v.push(("FERRY_TLS_API_CA_FILE", "/pki/region.pem"));
        let c = load(&v).unwrap();
        let ids = &c.api.auth.client_certificates.as_ref().unwrap().identities;
        assert_eq!(ids["ci"], vec!["payments:operator", "*:viewer"]);
        assert_eq!(ids["ops"], vec!["*:admin"]);
        assert!(c.api.auth.enabled());
        let mut v = certs.to_vec();
        v.extend(tls);
        v.push(("FERRY_TLS_API_CA_FILE", "/pki/callers.pem"));
        let e = load(&v).unwrap_err();
        assert!(e.contains("is tls.api.caFile"), "{e}");
        let yaml = "region: r\nnats: {urls: [nats://127.0.0.1:4222]}\nstorage: file:///tmp/f\ntls: {api: {certFile: /c, keyFile: /k, caFile: /a}}\napi: {auth: {clientCertificates: {caFile: /b, identities: {ci: [a:viewer, b:operator]}}}}\n";
        let c = ProcessConfig::load(Some(("f.yaml", yaml)), &env(&[])).unwrap();
        assert_eq!(
            c.api.auth.client_certificates.unwrap().identities["ci"],
            vec!["a:viewer", "b:operator"]
        );
    }

    #[test]
    fn file_gives_values_and_defaults() {
        let c = ProcessConfig::load(Some(("f.yaml", FILE)), &env(&[])).unwrap();
        assert_eq!(c.region, "eu-west");
        assert_eq!(c.bucket(), "ferry-eu-west");
        assert_eq!(c.ha.lease_ttl.get(), Duration::from_millis(800));
        assert_eq!(c.api.listen, "0.0.0.0:8081");
        assert_eq!(
            c.advertised_url("0.0.0.0:9000"),
            "http://127.0.0.1:9000".to_string()
        );
    }

    #[test]
    fn env_overrides_file_and_can_stand_alone() {
        let e = env(&[
            ("FERRY_NATS_URLS", "nats://a:1, nats://b:2"),
            ("FERRY_HA_LEASE_TTL", "2s"),
            ("FERRY_HA_RENEW_DEADLINE", "1s"),
            ("FERRY_NATS_REPLICAS", "3"),
        ]);
        let c = ProcessConfig::load(Some(("f.yaml", FILE)), &e).unwrap();
        assert_eq!(c.nats.urls, vec!["nats://a:1", "nats://b:2"]);
        assert_eq!(c.nats.replicas, 3);
        assert_eq!(c.ha.lease_ttl.get(), Duration::from_secs(2));
        let e = env(&[
            ("FERRY_REGION", "us-east"),
            ("FERRY_NATS_URLS", "nats://127.0.0.1:1"),
            ("FERRY_STORAGE", "file:///x"),
        ]);
        let c = ProcessConfig::load(None, &e).unwrap();
        assert_eq!(c.region, "us-east");
        assert_eq!(c.taskmanager.state_memory, None);
        let e = env(&[
            ("FERRY_TASKMANAGER_STATE_MEMORY", "512MiB"),
            ("FERRY_TASKMANAGER_STATE_DIR", "/var/lib/ferry/state"),
        ]);
        let c = ProcessConfig::load(Some(("f.yaml", FILE)), &e).unwrap();
        assert_eq!(
            c.taskmanager.state_memory.map(|m| m.as_u64()),
            Some(512 << 20)
        );
        assert_eq!(
            c.taskmanager.state_dir.as_deref(),
            Some("/var/lib/ferry/state")
        );
    }

    #[test]
    fn bad_configs_say_what_to_fix() {
        type Case<'a> = (&'a str, &'a [(&'a str, &'a str)], &'a str);
        let cases: &[Case] = &[
            (
                FILE,
                &[("FERRY_HA_RENEW_DEADLINE", "900ms")],
                "below ha.leaseTtl",
            ),
            (
                FILE,
                &[("FERRY_NATS_REPLICAS", "three")],
                "FERRY_NATS_REPLICAS",
            ),
            (FILE, &[("FERRY_HA_LEASE_TTL", "soon")], "not a duration"),
            (
                FILE,
                &[("FERRY_TASKMANAGER_STATE_MEMORY", "8MiB")],
                "taskmanager.stateMemory 8.0 MiB: use at least 16MiB",
            ),
            (
                FILE,
                &[("FERRY_TASKMANAGER_STATE_MEMORY", "lots")],
                "taskmanager.stateMemory: 'lots' is not a size",
            ),
            ("region: eu\n", &[], "missing field"),
            (
                "region: eu\nnats: {urls: [x]}\nstorage: s\nextra: 1\n",
                &[],
                "unknown field",
            ),
            ("- a\n- b\n", &[], "must be a mapping"),
            (FILE, &[("FERRY_REGION", "eu west")], "region"),
        ];
        for (file, vars, want) in cases {
            let e = ProcessConfig::load(Some(("f.yaml", file)), &env(vars)).unwrap_err();
            assert!(e.0.contains(want), "{file:?} {vars:?}: {e}");
        }
    }

    #[test]
    fn credentials_in_urls_are_redacted_wherever_they_stand() {
        assert_eq!(
            redact_url("nats://app:hunter2@10.0.0.1:4222"),
            "nats://app:***@10.0.0.1:4222"
        );
        assert_eq!(redact_url("nats://tok3n@h:4222"), "nats://***@h:4222");
        assert_eq!(redact_url("nats://h:4222"), "nats://h:4222");
        assert_eq!(redact_url("h:4222"), "h:4222");
        // An `@` after the authority is not a credential.
        assert_eq!(redact_url("https://h/a@b?x=c@d"), "https://h/a@b?x=c@d");
        assert_eq!(
            redact_url("nats://a:p1@h1:1,nats://b:p2@h2:2"),
            "nats://a:***@h1:1,nats://b:***@h2:2"
        );
        assert_eq!(
            redact_urls_in("connecting to 'nats://a:p1@h:1' failed (see nats://t@h:2)"),
            "connecting to 'nats://a:***@h:1' failed (see nats://***@h:2)"
        );
        assert_eq!(
            url_userinfo("nats://app:p%40ss@h:1"),
            Some(("app".into(), Some("p@ss".into())))
        );
        assert_eq!(url_userinfo("nats://tok@h"), Some(("tok".into(), None)));
        assert_eq!(url_userinfo("nats://h"), None);
        assert!(url_has_credentials("nats://a:b@h"));
        assert!(!url_has_credentials("nats://h"));
    }

    #[test]
    fn nats_credentials_are_given_one_way_completely_and_once() {
        let ok = |vars: &[(&str, &str)]| {
            let mut all = vec![("FERRY_NATS_URLS", "nats://h:1")];
            all.extend_from_slice(vars);
            ProcessConfig::load(Some(("f", "region: r\nstorage: file:///s\n")), &env(&all))
        };
        let c = ok(&[("FERRY_NATS_USER", "u"), ("FERRY_NATS_PASSWORD_FILE", "/p")]).unwrap();
        assert_eq!(c.nats.auth.user.as_deref(), Some("u"));
        assert_eq!(c.nats.auth.password_file.as_deref(), Some("/p"));
        let c = ok(&[("FERRY_REGIONS_GLOBAL_CREDS_FILE", "/c")]).unwrap();
        assert_eq!(c.regions.global.auth.creds_file.as_deref(), Some("/c"));
        assert!(c.nats.auth.is_empty());
        for (vars, want) in [
            (
                vec![("FERRY_NATS_PASSWORD_FILE", "/p")],
                "nats.auth: user and passwordFile go together",
            ),
            (
                vec![
                    ("FERRY_NATS_TOKEN_FILE", "/t"),
                    ("FERRY_NATS_CREDS_FILE", "/c"),
                ],
                "nats.auth: give one way",
            ),
            (
                vec![
                    ("FERRY_REGIONS_GLOBAL_URLS", "nats://u:secret@g:1"),
                    ("FERRY_REGIONS_GLOBAL_TOKEN_FILE", "/t"),
                ],
                "regions.global.auth: the URL nats://u:***@g:1 carries credentials too",
            ),
            (
                vec![("FERRY_NATS_TLS_CERT_FILE", "/c")],
                "nats.tls: certFile and keyFile go together",
            ),
            (
                vec![("FERRY_REGIONS_GLOBAL_TLS_KEY_FILE", "/k")],
                "regions.global.tls: certFile and keyFile go together",
            ),
        ] {
            let e = ok(&vars).unwrap_err().0;
            assert!(e.contains(want), "{vars:?}: {e}");
            assert!(!e.contains("secret"), "{e}");
        }
    }

    #[test]
    fn listeners_beyond_loopback_need_tls_and_authentication() {
        for (addr, loopback) in [
            ("127.0.0.1:8081", true),
            ("127.9.9.9:1", true),
            ("localhost:8081", true),
            ("[::1]:8081", true),
            ("0.0.0.0:8081", false),
            ("[::]:8081", false),
            ("10.0.0.5:6124", false),
            ("jm.example:8081", false),
        ] {
            assert_eq!(is_loopback_listen(addr), loopback, "{addr}");
        }
        let base = [
            ("FERRY_REGION", "r"),
            ("FERRY_NATS_URLS", "nats://n:4222"),
            ("FERRY_STORAGE", "file:///s"),
        ];
        let cfg = |extra: &[(&str, &str)]| {
            let env: BTreeMap<String, String> = base
                .iter()
                .chain(extra)
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
            ProcessConfig::load(None, &env).unwrap()
        };
        // The defaults listen on every interface.
        let open = cfg(&[]);
        let jm = open.unprotected_listeners(ProcessRole::JobManager);
        assert_eq!(jm.len(), 1);
        assert!(
            jm[0].starts_with("api.listen 0.0.0.0:8081 is not a loopback address, and the REST API has no TLS (tls.api) and no authentication (api.auth)"),
            "{jm:?}"
        );
        let tm = open.unprotected_listeners(ProcessRole::TaskManager);
        assert!(tm[0].contains("no mutual TLS (tls.grpc)"), "{tm:?}");
        assert!(
            tm[1].starts_with("taskmanager.exchangeListen 0.0.0.0:0 is not a loopback address"),
            "{tm:?}"
        );
        assert_eq!(tm.len(), 2);
        // An exchange port beyond loopback is unprotected on its own.
        let exchange_open = cfg(&[
            ("FERRY_TASKMANAGER_LISTEN", "127.0.0.1:0"),
            ("FERRY_TASKMANAGER_EXCHANGE_LISTEN", "0.0.0.0:6125"),
        ]);
        let tm = exchange_open.unprotected_listeners(ProcessRole::TaskManager);
        assert_eq!(tm.len(), 1, "{tm:?}");
        assert!(
            tm[0].contains("could send records into running jobs"),
            "{tm:?}"
        );
        assert_eq!(
            exchange_open.exchange_url("0.0.0.0:6125"),
            "http://127.0.0.1:6125"
        );
        // Authentication alone is not enough: a token would cross in clear.
        let auth_only = cfg(&[("FERRY_API_AUTH_TOKENS_FILE", "/t")]);
        let jm = auth_only.unprotected_listeners(ProcessRole::JobManager);
        assert!(jm[0].contains("has no TLS (tls.api):"), "{jm:?}");
        let secure = cfg(&[
            ("FERRY_API_AUTH_TOKENS_FILE", "/t"),
            ("FERRY_TLS_API_CERT_FILE", "/c"),
            ("FERRY_TLS_API_KEY_FILE", "/k"),
            ("FERRY_TLS_API_CA_FILE", "/a"),
            ("FERRY_API_ADVERTISE", "https://jm:8081"),
            ("FERRY_TLS_GRPC_CERT_FILE", "/c"),
            ("FERRY_TLS_GRPC_KEY_FILE", "/k"),
            ("FERRY_TLS_GRPC_CA_FILE", "/a"),
            ("FERRY_TASKMANAGER_ADVERTISE", "https://tm:6124"),
        ]);
        assert!(
            secure
                .unprotected_listeners(ProcessRole::JobManager)
                .is_empty()
        );
        assert!(
            secure
                .unprotected_listeners(ProcessRole::TaskManager)
                .is_empty()
        );
        let local = cfg(&[
            ("FERRY_API_LISTEN", "127.0.0.1:0"),
            ("FERRY_TASKMANAGER_LISTEN", "[::1]:0"),
        ]);
        assert!(
            local
                .unprotected_listeners(ProcessRole::JobManager)
                .is_empty()
        );
        assert!(
            local
                .unprotected_listeners(ProcessRole::TaskManager)
                .is_empty()
        );
    }

    #[test]
    fn store_credentials_come_from_prefixed_variables_or_a_file() {
        let env: BTreeMap<String, String> = [
            ("US_EAST_AWS_ACCESS_KEY_ID", "AKIAEAST"),
            ("US_EAST_AWS_SECRET_ACCESS_KEY", "east-secret-1"),
            ("US_EAST_OTHER", "ignored"),
            ("AWS_ACCESS_KEY_ID", "AKIAPROCESS"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        let got = store_settings("env:US_EAST_", "at", &env).unwrap();
        assert_eq!(
            got,
            [
                ("aws_access_key_id".to_string(), "AKIAEAST".to_string()),
                ("aws_secret_access_key".into(), "east-secret-1".into())
            ]
        );
        let e = store_settings("env:AP_", "regions.storeCredentials.ap", &env).unwrap_err();
        assert_eq!(
            e,
            "regions.storeCredentials.ap: no variable starts with AP_AWS_, AP_GOOGLE_ or AP_AZURE_"
        );
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("west.env");
        std::fs::write(
            &file,
            "# west's account\nAWS_ACCESS_KEY_ID=AKIAWEST\nexport AWS_SECRET_ACCESS_KEY=\"west-secret-2\"\n\nAWS_ENDPOINT=http://127.0.0.1:9\n",
        )
        .unwrap();
        let got = store_settings(&format!("file:{}", file.display()), "at", &env).unwrap();
        assert_eq!(got.len(), 3);
        assert_eq!(
            got[1],
            ("aws_secret_access_key".into(), "west-secret-2".into())
        );
        std::fs::write(
            &file,
            "AWS_ACCESS_KEY_ID=AKIAWEST\nPASSWORD=hunter2-secret\n",
        )
        .unwrap();
        let e = store_settings(&format!("file:{}", file.display()), "at", &env).unwrap_err();
        assert!(
            e.ends_with("line 2: PASSWORD is not an AWS_, GOOGLE_ or AZURE_ setting"),
            "{e}"
        );
        assert!(!e.contains("hunter2"), "{e}");
        let e = store_settings("s3:x", "at", &env).unwrap_err();
        assert!(e.contains("neither env:PREFIX nor file:PATH"), "{e}");
    }

    #[test]
    fn every_env_key_is_documented() {
        let docs = include_str!("../../docs/config.md");
        for (var, path, _) in ENV_KEYS {
            assert!(docs.contains(var), "{var} missing from docs/config.md");
            assert!(docs.contains(path), "{path} missing from docs/config.md");
        }
    }
}
