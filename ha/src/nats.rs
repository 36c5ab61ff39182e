//! The NATS JetStream KV coordination backend (one bucket per instance).
//!
//! Revisions are the stream sequence, so they keep growing across deletes
//! and expiry: an acquisition revision is a monotonic fencing epoch.
//!
//! A bucket can be lost (a server restarted with empty storage, a freshly
//! deployed cluster): every operation that finds it gone re-creates it.
//! A bucket is created with its sequence starting at a revision taken from
//! the wall clock (microseconds), so every incarnation starts above every
//! revision an earlier one reached, and epochs stay monotonic for everyone
//! who saw the old ones (TaskManagers refuse a lower epoch, as they must
//! refuse a forged one) — whichever process creates it first. A process
//! that finds the new bucket already written to moves it above the highest
//! revision it has seen itself. Run the
//! servers with `jetstream { sync_interval: always }`: JetStream acknowledges
//! writes before they reach the disk otherwise, and Jepsen (NATS 2.12.1)
//! lost acknowledged writes and saw split brain after crashes that way.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use async_nats::jetstream::kv::{self, Operation};
use async_trait::async_trait;
use bytes::Bytes;
use futures::StreamExt;
use futures::stream::BoxStream;

use ferry_core::config::{NatsAuth, NatsTls, redact_url};

use crate::backend::{Coordination, Entry, Event, HaError, check_key};

/// How long one KV request may take before it counts as unavailable.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);

/// Listings younger than this are served again instead of scanning the
/// bucket: every scan creates a JetStream consumer that lingers on the
/// server until its inactivity threshold, and health probes polling many
/// times a second once exhausted the server's consumer limit ("maximum
/// consumers limit reached"), which stopped the leader from seeing its
/// TaskManagers.
const LIST_REUSE: Duration = Duration::from_millis(250);

/// A JetStream KV bucket.
pub struct NatsKv {
    js: async_nats::jetstream::Context,
    /// How the bucket is created (again, if it is lost).
    config: kv::Config,
    store: std::sync::RwLock<kv::Store>,
    /// One re-creation at a time.
    recreating: tokio::sync::Mutex<()>,
    /// The highest revision seen in the bucket: a re-created bucket goes on
    /// above it.
    high: Arc<AtomicU64>,
    max_age: Duration,
    /// The last full listing (when, after how many own writes, what); one
    /// scan at a time.
    listing: tokio::sync::Mutex<Option<(std::time::Instant, u64, Vec<Entry>)>>,
    /// Own writes so far: a listing older than the last one is not reused.
    writes: std::sync::atomic::AtomicU64,
    /// When the bucket's stream was created (server clock, ns since the
    /// epoch), as last seen: the stream's identity. A stream with the same
    /// creation time was never lost, whatever a server that is starting
    /// or catching up answered meanwhile.
    created: std::sync::Mutex<Option<i128>>,
}

/// The lowest revision a bucket that nobody has written to yet starts at:
/// the wall clock in microseconds. Revisions grow by the writes, far slower
/// than a microsecond clock, so a bucket created (again) later starts above
/// every revision an earlier incarnation reached — whichever process
/// creates it, and whatever revisions the others have seen: a TaskManager
/// that followed a leader of the lost bucket accepts the next one.
fn fresh_floor(high: u64) -> u64 {
    let micros = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
        .unwrap_or(0);
    (high + 1).max(micros)
}

/// Creates the bucket's stream with its sequence starting at `first`, in
/// one request: no write can land below `first`. Purging a just-created
/// bucket up to the floor instead raced with a second process that opened
/// it meanwhile — one process's purge could delete the lease another had
/// just written. When another process created the stream first (its
/// configuration differs in `first`), that stream is opened instead.
///
/// The stream is configured as `create_key_value` configures a bucket's.
async fn create_at(
    js: &async_nats::jetstream::Context,
    config: &kv::Config,
    first: u64,
) -> Result<kv::Store, String> {
    use async_nats::jetstream::stream;
    let stream_config = stream::Config {
        name: format!("KV_{}", config.bucket),
        subjects: vec![format!("$KV.{}.>", config.bucket)],
        max_messages_per_subject: config.history.max(1),
        max_age: config.max_age,
        storage: config.storage,
        num_replicas: config.num_replicas.max(1),
        allow_rollup: true,
        deny_delete: true,
        deny_purge: false,
        allow_direct: true,
        discard: stream::DiscardPolicy::New,
        first_sequence: Some(first),
        ..Default::default()
    };
    if let Err(e) = js.create_stream(stream_config).await {
        // Created meanwhile by another process (with another `first`)?
        return js
            .get_key_value(config.bucket.as_str())
            .await
            .map_err(|_| e.to_string());
    }
    js.get_key_value(config.bucket.as_str())
        .await
        .map_err(|e| e.to_string())
}

/// How this process authenticates to a NATS cluster: the credentials read
/// from the files a [`NatsAuth`] names, and the TLS settings of
/// [`NatsTls`]. `Debug` shows which kind they are, never the secret.
#[derive(Clone, Default)]
pub struct NatsCredentials {
    secret: Secret,
    tls: Option<TlsFiles>,
}

#[derive(Clone, Default)]
enum Secret {
    #[default]
    Anonymous,
    UserPassword(String, String),
    Token(String),
    NKey(String),
    Creds(String),
}

/// The TLS files of a NATS link (read again by the client library on every
/// connection, so a rotated certificate is used from the next one).
#[derive(Clone, Debug)]
struct TlsFiles {
    /// The config key (`nats.tls`), for messages.
    at: String,
    ca: Option<PathBuf>,
    identity: Option<(PathBuf, PathBuf)>,
}

impl std::fmt::Debug for NatsCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match &self.secret {
            Secret::Anonymous => "anonymous",
            Secret::UserPassword(..) => "user and password",
            Secret::Token(_) => "token",
            Secret::NKey(_) => "NKey",
            Secret::Creds(_) => "creds file",
        })?;
        match &self.tls {
            Some(t) if t.identity.is_some() => f.write_str(", TLS with a client certificate"),
            Some(_) => f.write_str(", TLS"),
            None => Ok(()),
        }
    }
}

impl NatsCredentials {
    /// The credentials of the first of `urls` that carries any
    /// (`nats://user:password@host`, `nats://token@host`): the client
    /// library does not read them from the URL itself.
    pub fn from_urls(urls: &[String]) -> Self {
        Self {
            secret: match urls
                .iter()
                .find_map(|u| ferry_core::config::url_userinfo(u))
            {
                Some((user, Some(password))) => Secret::UserPassword(user, password),
                Some((token, None)) => Secret::Token(token),
                None => Secret::Anonymous,
            },
            tls: None,
        }
    }

    /// These credentials, or else those carried by `urls` (with these TLS
    /// settings either way).
    pub fn or_from_urls(&self, urls: &[String]) -> Self {
        match self.secret {
            Secret::Anonymous => Self {
                tls: self.tls.clone(),
                ..Self::from_urls(urls)
            },
            _ => self.clone(),
        }
    }

    /// Reads the secrets `auth` names (checked by [`NatsAuth::check`]);
    /// `at` is its config key, for the message when a file cannot be read.
    pub fn load(auth: &NatsAuth, at: &str) -> Result<Self, String> {
        let read = |key: &str, path: &str| -> Result<String, String> {
            let text = std::fs::read_to_string(path)
                .map_err(|e| format!("{at}.{key}: cannot read {path}: {e}"))?;
            let text = text.trim();
            if text.is_empty() {
                return Err(format!("{at}.{key}: {path} is empty"));
            }
            Ok(text.to_string())
        };
        Ok(Self {
            secret: match (
                &auth.user,
                &auth.password_file,
                &auth.token_file,
                &auth.nkey_seed_file,
                &auth.creds_file,
            ) {
                (Some(user), Some(p), ..) => {
                    Secret::UserPassword(user.clone(), read("passwordFile", p)?)
                }
                (_, _, Some(t), ..) => Secret::Token(read("tokenFile", t)?),
                (_, _, _, Some(n), _) => Secret::NKey(read("nkeySeedFile", n)?),
                (.., Some(c)) => Secret::Creds(read("credsFile", c)?),
                _ => Secret::Anonymous,
            },
            tls: None,
        })
    }

    /// These credentials speaking TLS as `tls` says (none: plaintext unless
    /// a URL is `tls://` or the server requires TLS). The files are checked
    /// now — readable, PEM, a key that fits the certificate — so a typo
    /// stops the process at start with the key to fix; `at` is the config
    /// key (`nats.tls`).
    pub fn with_tls(mut self, tls: Option<&NatsTls>, at: &str) -> Result<Self, String> {
        let Some(t) = tls else {
            self.tls = None;
            return Ok(self);
        };
        let files = TlsFiles {
            at: at.to_string(),
            ca: t.ca_file.as_ref().map(PathBuf::from),
            identity: t
                .cert_file
                .as_ref()
                .zip(t.key_file.as_ref())
                .map(|(c, k)| (PathBuf::from(c), PathBuf::from(k))),
        };
        if let Some(ca) = &files.ca {
            ferry_core::tls::client_config(
                at,
                ca,
                files
                    .identity
                    .as_ref()
                    .map(|(c, k)| (c.as_path(), k.as_path())),
            )
            .map_err(|e| e.to_string())?;
        } else if let Some((c, k)) = &files.identity {
            // No CA of our own: check the identity against itself.
            ferry_core::tls::client_config(at, c, Some((c, k))).map_err(|e| e.to_string())?;
        }
        self.tls = Some(files);
        Ok(self)
    }

    /// `options` authenticating with these credentials.
    pub fn apply(
        &self,
        options: async_nats::ConnectOptions,
    ) -> Result<async_nats::ConnectOptions, String> {
        let mut options = match &self.secret {
            Secret::Anonymous => options,
            Secret::UserPassword(u, p) => options.user_and_password(u.clone(), p.clone()),
            Secret::Token(t) => options.token(t.clone()),
            Secret::NKey(n) => options.nkey(n.clone()),
            Secret::Creds(c) => options
                .credentials(c)
                .map_err(|e| format!("the NATS creds file is not valid: {e}"))?,
        };
        if let Some(t) = &self.tls {
            options = options.require_tls(true);
            if let Some(ca) = &t.ca {
                options = options.add_root_certificates(ca.clone());
            }
            if let Some((cert, key)) = &t.identity {
                options = options.add_client_certificate(cert.clone(), key.clone());
            }
        }
        Ok(options)
    }

    /// Why a connection to the server at `url` fails at the TLS layer, if
    /// it does: the client library reports only "IO error", so this does
    /// the server's greeting and the handshake itself and names the cause
    /// and the key to fix. `None` when TLS is not the problem (or the
    /// server cannot be reached at all).
    pub async fn diagnose_tls(&self, url: &str) -> Option<String> {
        diagnose_tls(url, self.tls.as_ref()).await
    }
}

/// See [`NatsCredentials::diagnose_tls`].
async fn diagnose_tls(url: &str, tls: Option<&TlsFiles>) -> Option<String> {
    use tokio::io::{AsyncBufReadExt, AsyncReadExt};
    const STEP: Duration = Duration::from_secs(2);
    let (host, port) = host_port(url)?;
    let at = tls.map_or("nats.tls", |t| t.at.as_str());
    let tcp = tokio::time::timeout(STEP, tokio::net::TcpStream::connect((host.as_str(), port)))
        .await
        .ok()?
        .ok()?;
    // The server speaks first: `INFO {json}\r\n`, saying whether it
    // requires or offers TLS. Bounded: a line of at most 16 KiB.
    let mut reader = tokio::io::BufReader::new(tcp);
    let mut line = Vec::new();
    let mut limited = (&mut reader).take(16 * 1024);
    tokio::time::timeout(STEP, limited.read_until(b'\n', &mut line))
        .await
        .ok()?
        .ok()?;
    let info: serde_json::Value = std::str::from_utf8(&line)
        .ok()
        .and_then(|l| l.trim().strip_prefix("INFO "))
        .and_then(|j| serde_json::from_str(j).ok())?;
    let flag = |k: &str| info.get(k).and_then(|v| v.as_bool()).unwrap_or(false);
    let (required, available) = (flag("tls_required"), flag("tls_available"));
    let Some(tls) = tls else {
        return required.then(|| {
            format!(
                "the NATS server at {host}:{port} requires TLS; set {at}.caFile to the CA that signed its certificate"
            )
        });
    };
    if !required && !available {
        return Some(format!(
            "the NATS server at {host}:{port} does not offer TLS, but {at} is set: enable TLS in the server's config (a tls block) or remove {at}"
        ));
    }
    let Some(ca) = &tls.ca else {
        return Some(format!(
            "the TLS connection to {host}:{port} fails, checked against the system's roots: set {at}.caFile to the CA that signed the server's certificate"
        ));
    };
    let identity = tls
        .identity
        .as_ref()
        .map(|(c, k)| (c.as_path(), k.as_path()));
    let config = match ferry_core::tls::client_config(at, ca, identity) {
        Ok(c) => c,
        Err(e) => return Some(e.to_string()),
    };
    let name = rustls::pki_types::ServerName::try_from(host.clone()).ok()?;
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let mut stream = match tokio::time::timeout(STEP, connector.connect(name, reader.into_inner()))
        .await
    {
        Err(_) => return None,
        Ok(Err(e)) => {
            return Some(format!(
                "the TLS handshake with the NATS server at {host}:{port} failed: {e}; check that {at}.caFile holds the CA that signed the server's certificate and that the certificate names {host}"
            ));
        }
        Ok(Ok(s)) => s,
    };
    // A server that verifies clients refuses a missing or unknown client
    // certificate with an alert right after the handshake (TLS 1.3).
    let mut byte = [0u8; 1];
    match tokio::time::timeout(Duration::from_secs(1), stream.read(&mut byte)).await {
        Ok(Err(e)) => Some(format!(
            "the NATS server at {host}:{port} refused this process's TLS client certificate: {e}; {}",
            if tls.identity.is_some() {
                format!("check that the server trusts the CA that signed {at}.certFile")
            } else {
                format!("the server verifies clients: set {at}.certFile and {at}.keyFile")
            }
        )),
        _ => None,
    }
}

/// The host and port of a NATS URL; the port defaults to 4222.
fn host_port(url: &str) -> Option<(String, u16)> {
    ferry_core::config::url_host_port(url, 4222)
}

/// What a failed NATS connection means, and what to do about it.
fn connection_hint(why: &str) -> String {
    if why.contains("authorization violation") || why.contains("Authorization Violation") {
        format!(
            "{why}: the server refused this process's credentials; check nats.auth (or regions.global.auth for the global cluster) against the server's users"
        )
    } else if why.contains("TLS") || why.contains("tls") {
        format!(
            "{why}: the TLS handshake failed; check the server's certificate and the CA this process trusts"
        )
    } else if why.contains("signing nonce") {
        format!(
            "{why}: the NKey or creds file could not sign the server's challenge; check nats.auth"
        )
    } else {
        why.to_string()
    }
}

fn unavailable(e: impl std::fmt::Display) -> HaError {
    HaError::Unavailable(e.to_string())
}

/// Whether an error may mean that the bucket's stream does not exist
/// ("no responders": nothing answers a direct get of a missing stream). A
/// server that is down or catching up says the same for a while:
/// [`NatsKv::recreate`] tells the two apart.
fn is_lost(e: &impl std::fmt::Display) -> bool {
    let text = e.to_string();
    text.contains("no stream found")
        || text.contains("stream not found")
        || text.contains("no responders")
}

/// Runs `$op` with `$s` bound to the bucket; if the bucket is gone,
/// re-creates it and runs `$op` once more.
macro_rules! on_bucket {
    ($self:ident, $s:ident => $op:expr) => {{
        let $s = $self.store();
        match $op {
            Err(e) if is_lost(&e) => {
                $self.recreate().await?;
                let $s = $self.store();
                $op
            }
            r => r,
        }
    }};
}

impl NatsKv {
    /// Every live key with its value. The keys come from the stream's
    /// subject state (one server-side snapshot), not from `Store::keys`:
    /// that walks an ordered consumer over the last message per key, and a
    /// key rewritten while it walks (history 1 deletes the old message) can
    /// be missing from the walk — a heartbeating member would look gone.
    async fn scan(&self) -> Result<Vec<Entry>, HaError> {
        let store = self.store();
        let prefix = store.prefix.clone();
        let mut subjects = on_bucket!(self, s => s
            .stream
            .info_with_subjects(format!("{}>", s.prefix))
            .await)
        .map_err(unavailable)?;
        let mut keys = Vec::new();
        while let Some(s) = subjects.next().await {
            let (subject, _) = s.map_err(unavailable)?;
            if let Some(k) = subject.strip_prefix(prefix.as_str()) {
                keys.push(k.to_string());
            }
        }
        keys.sort_unstable();
        let mut out = Vec::with_capacity(keys.len());
        for k in keys {
            if let Some(e) = self.get(&k).await? {
                out.push(e);
            }
        }
        Ok(out)
    }

    /// Connects to any of `urls` (a NATS cluster) and opens — creating it if
    /// needed — `bucket` with values that live `max_age` unless refreshed.
    /// `credentials` authenticate the process (none: anonymous).
    pub async fn connect(
        urls: &[String],
        bucket: &str,
        max_age: Duration,
        replicas: usize,
        credentials: &NatsCredentials,
    ) -> Result<Self, HaError> {
        let addrs: Vec<async_nats::ServerAddr> = urls
            .iter()
            .map(|u| {
                u.parse()
                    .map_err(|e| unavailable(format!("bad NATS URL '{}': {e}", redact_url(u))))
            })
            .collect::<Result<_, _>>()?;
        // The connection is retried in the background, so why it fails
        // (credentials refused, TLS) reaches us only as an event: kept to
        // say so when the first request times out.
        let refused: Arc<std::sync::Mutex<Option<String>>> = Default::default();
        let seen = refused.clone();
        // The URLs are tried in the order given (nearest node first), not
        // shuffled.
        let options = async_nats::ConnectOptions::new()
            .retain_servers_order()
            .connection_timeout(REQUEST_TIMEOUT)
            .request_timeout(Some(REQUEST_TIMEOUT))
            .retry_on_initial_connect()
            .max_reconnects(None)
            .event_callback(move |event| {
                let seen = seen.clone();
                async move {
                    let mut seen = seen.lock().unwrap_or_else(|p| p.into_inner());
                    match event {
                        async_nats::Event::ClientError(e) => *seen = Some(e.to_string()),
                        async_nats::Event::ServerError(e) => *seen = Some(e.to_string()),
                        async_nats::Event::Connected => *seen = None,
                        _ => {}
                    }
                }
            });
        let client = credentials
            .or_from_urls(urls)
            .apply(options)
            .map_err(unavailable)?
            .connect(addrs)
            .await
            .map_err(|e| {
                unavailable(format!(
                    "connecting to NATS {}: {e}",
                    redact_url(&urls.join(","))
                ))
            })?;
        let e = match Self::open(client, bucket, max_age, replicas).await {
            Ok(kv) => return Ok(kv),
            Err(e) => e,
        };
        let why = refused.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let Some(why) = why else { return Err(e) };
        // A failed TLS handshake reaches us as a bare "IO error": find out
        // whether TLS is the cause, and which part of it.
        let mut diagnosis = None;
        if why.contains("IO error") || why.to_lowercase().contains("tls") {
            for url in urls {
                diagnosis = credentials.diagnose_tls(url).await;
                if diagnosis.is_some() {
                    break;
                }
            }
        }
        Err(unavailable(format!(
            "{e}; the connection to NATS fails: {}",
            diagnosis.unwrap_or_else(|| connection_hint(&why))
        )))
    }

    /// Opens `bucket` on an existing client.
    pub async fn open(
        client: async_nats::Client,
        bucket: &str,
        max_age: Duration,
        replicas: usize,
    ) -> Result<Self, HaError> {
        let js = async_nats::jetstream::new(client);
        let config = kv::Config {
            bucket: bucket.to_string(),
            history: 1,
            max_age,
            storage: async_nats::jetstream::stream::StorageType::File,
            num_replicas: replicas.max(1),
            ..Default::default()
        };
        let store = match js.get_key_value(bucket).await {
            Ok(s) => s,
            Err(_) => create_at(&js, &config, fresh_floor(0))
                .await
                .map_err(|e| unavailable(format!("creating KV bucket '{bucket}': {e}")))?,
        };
        let mut stream = store.stream.clone();
        let info = stream.info().await.ok().map(|i| {
            (
                i.state.last_sequence,
                i.state.first_sequence,
                i.created.unix_timestamp_nanos(),
            )
        });
        if let Some((0, 0 | 1, _)) = info {
            // A bucket created elsewhere (e.g. `nats kv add`) that nobody
            // has written to: start at the clock, above any revision a
            // lost earlier incarnation of the bucket reached. (Ferry
            // creates its buckets there in the first place: see
            // `create_at`.)
            let floor = fresh_floor(0);
            stream.purge().sequence(floor).await.map_err(|e| {
                unavailable(format!(
                    "moving KV bucket '{bucket}' to revision {floor}: {e}"
                ))
            })?;
        }
        let created = info.map(|(_, _, created)| created);
        Ok(Self {
            js,
            config,
            store: std::sync::RwLock::new(store),
            recreating: tokio::sync::Mutex::new(()),
            high: Arc::new(AtomicU64::new(0)),
            max_age,
            listing: tokio::sync::Mutex::new(None),
            writes: Default::default(),
            created: std::sync::Mutex::new(created),
        })
    }

    fn store(&self) -> kv::Store {
        self.store.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Notes a revision seen in the bucket.
    fn saw(&self, revision: u64) -> u64 {
        self.high.fetch_max(revision, Ordering::SeqCst);
        revision
    }

    /// The bucket is gone: creates it again (unless another process already
    /// did) and moves its sequence above every revision seen here, so that
    /// no later revision — no later fencing epoch — repeats an earlier one.
    ///
    /// Only a stream created since this process last saw the bucket counts
    /// as lost: a server that restarted with its data, and has not caught
    /// up yet, answers "no stream found" for a while. Purging the healthy
    /// stream then would wipe the leader lease under its holder and let a
    /// second leader in (seen in the chaos campaign); instead such an
    /// answer is a transient error.
    async fn recreate(&self) -> Result<(), HaError> {
        let _one = self.recreating.lock().await;
        let bucket = &self.config.bucket;
        let high = self.high.load(Ordering::SeqCst);
        let store = match self.js.get_key_value(bucket).await {
            Ok(s) => s,
            Err(_) => create_at(&self.js, &self.config, fresh_floor(high))
                .await
                .map_err(|e| unavailable(format!("re-creating KV bucket '{bucket}': {e}")))?,
        };
        let mut stream = store.stream.clone();
        let (last, created) = stream
            .info()
            .await
            .map(|i| (i.state.last_sequence, i.created.unix_timestamp_nanos()))
            .map_err(unavailable)?;
        let known = *self.created.lock().unwrap_or_else(|p| p.into_inner());
        if known == Some(created) {
            return Err(unavailable(format!(
                "KV bucket '{bucket}' did not answer (a NATS server is starting or catching up); its stream was not lost"
            )));
        }
        // Nobody wrote to the new stream yet: start at the clock (see
        // `fresh_floor`). Someone did: at least above what this process
        // saw, for the processes that saw more than its writer.
        let floor = if last == 0 {
            fresh_floor(high)
        } else {
            high + 1
        };
        if last < floor {
            stream.purge().sequence(floor).await.map_err(|e| {
                unavailable(format!(
                    "moving KV bucket '{bucket}' to revision {floor}: {e}"
                ))
            })?;
        }
        tracing::warn!(
            %bucket,
            floor,
            "the KV bucket was lost (a NATS server restarted with empty storage, or a new cluster): re-created it; revisions go on above {}",
            floor - 1
        );
        *self.created.lock().unwrap_or_else(|p| p.into_inner()) = Some(created);
        *self.store.write().unwrap_or_else(|p| p.into_inner()) = store;
        Ok(())
    }

    fn entry(e: kv::Entry) -> Entry {
        Entry {
            key: e.key,
            value: e.value,
            revision: e.revision,
            created: SystemTime::from(e.created),
        }
    }
}

#[async_trait]
impl Coordination for NatsKv {
    async fn get(&self, key: &str) -> Result<Option<Entry>, HaError> {
        check_key(key)?;
        match on_bucket!(self, s => s.entry(key).await).map_err(unavailable)? {
            Some(e) if e.operation == Operation::Put => {
                self.saw(e.revision);
                Ok(Some(Self::entry(e)))
            }
            Some(e) => {
                self.saw(e.revision);
                Ok(None)
            }
            None => Ok(None),
        }
    }

    async fn create(&self, key: &str, value: Bytes) -> Result<u64, HaError> {
        check_key(key)?;
        self.writes
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        on_bucket!(self, s => s.create(key, value.clone()).await)
            .map(|r| self.saw(r))
            .map_err(|e| match e.kind() {
                kv::CreateErrorKind::AlreadyExists => HaError::Exists(key.to_string()),
                _ => unavailable(e),
            })
    }

    async fn update(&self, key: &str, value: Bytes, revision: u64) -> Result<u64, HaError> {
        check_key(key)?;
        self.writes
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        on_bucket!(self, s => s.update(key, value.clone(), revision).await)
            .map(|r| self.saw(r))
            .map_err(|e| match e.kind() {
                kv::UpdateErrorKind::WrongLastRevision => {
                    HaError::WrongRevision(key.to_string(), revision)
                }
                _ => unavailable(e),
            })
    }

    async fn put(&self, key: &str, value: Bytes) -> Result<u64, HaError> {
        check_key(key)?;
        self.writes
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        on_bucket!(self, s => s.put(key, value.clone()).await)
            .map(|r| self.saw(r))
            .map_err(unavailable)
    }

    async fn delete(&self, key: &str, revision: Option<u64>) -> Result<(), HaError> {
        check_key(key)?;
        self.writes
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        on_bucket!(self, s => s.delete_expect_revision(key, revision).await).map_err(|e| {
            let text = e.to_string();
            if text.contains("wrong last sequence") || text.contains("10071") {
                HaError::WrongRevision(key.to_string(), revision.unwrap_or(0))
            } else {
                unavailable(text)
            }
        })
    }

    async fn list(&self, prefix: &str) -> Result<Vec<Entry>, HaError> {
        let mut listing = self.listing.lock().await;
        let writes = self.writes.load(std::sync::atomic::Ordering::SeqCst);
        let all = match &*listing {
            Some((at, w, all)) if at.elapsed() < LIST_REUSE && *w == writes => all,
            _ => {
                let all = self.scan().await?;
                &listing.insert((std::time::Instant::now(), writes, all)).2
            }
        };
        Ok(all
            .iter()
            .filter(|e| e.key.starts_with(prefix))
            .cloned()
            .collect())
    }

    async fn watch(&self, key: &str) -> Result<BoxStream<'static, Event>, HaError> {
        let subject = if let Some(p) = key.strip_suffix('.') {
            check_key(p)?;
            format!("{p}.>")
        } else {
            check_key(key)?;
            key.to_string()
        };
        let w = on_bucket!(self, s => s.watch(subject.clone()).await).map_err(unavailable)?;
        let high = self.high.clone();
        Ok(w.filter_map(move |r| {
            let high = high.clone();
            async move {
                match r {
                    Ok(e) if e.operation == Operation::Put => {
                        high.fetch_max(e.revision, Ordering::SeqCst);
                        Some(Event::Put(Self::entry(e)))
                    }
                    Ok(e) => {
                        high.fetch_max(e.revision, Ordering::SeqCst);
                        Some(Event::Gone {
                            key: e.key,
                            revision: e.revision,
                        })
                    }
                    Err(err) => {
                        tracing::warn!("KV watch error: {err}");
                        None
                    }
                }
            }
        })
        .boxed())
    }

    fn max_age(&self) -> Duration {
        self.max_age
    }
}

/// Opens (creating if needed) `bucket` on the NATS at `urls`, connecting
/// from `rt` (so the client's I/O tasks live there), and keeps trying —
/// NATS may come up after the process (a rolling start, a cluster still
/// electing its JetStream leader) — saying why each time; `None` once
/// `stop` is cancelled first.
pub async fn open_retrying(
    urls: &[String],
    bucket: &str,
    max_age: Duration,
    replicas: usize,
    credentials: &NatsCredentials,
    rt: &tokio::runtime::Handle,
    stop: &tokio_util::sync::CancellationToken,
) -> Option<std::sync::Arc<dyn Coordination>> {
    let shown = redact_url(&urls.join(","));
    tracing::info!(urls = %shown, %bucket, ?credentials, "connecting to NATS");
    let mut attempt = 0u32;
    loop {
        attempt += 1;
        let (u, b, c) = (urls.to_vec(), bucket.to_string(), credentials.clone());
        let open = async {
            rt.spawn(async move { NatsKv::connect(&u, &b, max_age, replicas, &c).await })
                .await
                .map_err(|e| HaError::Unavailable(format!("connect task: {e}")))?
        };
        tokio::select! {
            r = open => match r {
                Ok(kv) => return Some(std::sync::Arc::new(kv)),
                Err(e) => {
                    let wait = Duration::from_millis(500 * u64::from(attempt.min(10)));
                    // Without a connection error, the server answered
                    // nothing: most often JetStream is off.
                    let hint = if e.to_string().contains("the connection to NATS fails") {
                        ""
                    } else {
                        " — is nats-server running with JetStream (-js)?"
                    };
                    tracing::warn!(
                        attempt,
                        "cannot open the KV bucket {bucket} on NATS {shown} ({}){hint}; retrying in {wait:?}",
                        ferry_core::config::redact_urls_in(&e.to_string())
                    );
                    tokio::select! {
                        _ = tokio::time::sleep(wait) => {}
                        _ = stop.cancelled() => return None,
                    }
                }
            },
            _ = stop.cancelled() => return None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_testkit::NatsServer;

    async fn open(server: &NatsServer) -> NatsKv {
        NatsKv::connect(
            &[server.url()],
            "t",
            Duration::from_secs(60),
            1,
            &NatsCredentials::default(),
        )
        .await
        .unwrap()
    }

    /// The bucket is lost and a process that never saw it (one started
    /// after the loss) creates it first: its revisions still start above
    /// every revision of the lost bucket, so TaskManagers that followed a
    /// leader of the old bucket accept the next one (found by the chaos
    /// campaign: a TaskManager refused every new leader for good).
    #[tokio::test]
    async fn a_bucket_created_again_by_a_newcomer_starts_above_the_old_revisions() {
        let mut server = NatsServer::start();
        let old = open(&server).await;
        let mut last = 0;
        for i in 0..5u8 {
            last = old.put("k", Bytes::from(vec![i])).await.unwrap();
        }
        server.restart_empty();
        let newcomer = open(&server).await;
        let rev = newcomer
            .create("leader", Bytes::from_static(b"n"))
            .await
            .unwrap();
        assert!(rev > last, "revision {rev} after {last}");
    }

    #[tokio::test]
    async fn a_false_alarm_never_purges_a_healthy_bucket() {
        let server = NatsServer::start();
        let kv = open(&server).await;
        let rev = kv.create("leader", Bytes::from_static(b"a")).await.unwrap();
        // A server catching up said "no stream found": the stream is the
        // one this process opened, so nothing is re-created or purged.
        let e = kv.recreate().await.unwrap_err();
        assert!(e.to_string().contains("was not lost"), "{e}");
        let held = kv.get("leader").await.unwrap().unwrap();
        assert_eq!(held.revision, rev);
        assert_eq!(&held.value[..], b"a");
    }

    #[tokio::test]
    async fn a_lost_bucket_comes_back_above_every_revision_seen() {
        let mut server = NatsServer::start();
        let kv = open(&server).await;
        let mut last = 0;
        for i in 0..5u8 {
            last = kv.put("k", Bytes::from(vec![i])).await.unwrap();
        }
        server.restart_empty();
        let start = std::time::Instant::now();
        let rev = loop {
            match kv.create("leader", Bytes::from_static(b"b")).await {
                Ok(r) => break r,
                Err(e) => assert!(
                    start.elapsed() < Duration::from_secs(20),
                    "not re-created: {e}"
                ),
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        assert!(rev > last, "revision {rev} after {last}");
        // The re-created stream is now the known one: a later false alarm
        // leaves it alone.
        assert!(kv.recreate().await.is_err());
        assert_eq!(kv.get("leader").await.unwrap().unwrap().revision, rev);
    }

    #[test]
    fn credentials_come_from_their_files_and_never_show() {
        let dir = tempfile::tempdir().unwrap();
        let file = |name: &str, text: &str| {
            let p = dir.path().join(name);
            std::fs::write(&p, text).unwrap();
            p.display().to_string()
        };
        let auth = NatsAuth {
            user: Some("u".into()),
            password_file: Some(file("pw", "  s3cret\n")),
            ..Default::default()
        };
        let c = NatsCredentials::load(&auth, "nats.auth").unwrap();
        assert!(matches!(&c.secret, Secret::UserPassword(u, p) if u == "u" && p == "s3cret"));
        assert_eq!(format!("{c:?}"), "user and password");
        let empty = NatsAuth {
            token_file: Some(file("empty", "\n")),
            ..Default::default()
        };
        let e = NatsCredentials::load(&empty, "regions.global.auth").unwrap_err();
        assert!(
            e.starts_with("regions.global.auth.tokenFile: ") && e.ends_with("is empty"),
            "{e}"
        );
        let missing = NatsAuth {
            nkey_seed_file: Some("/nonexistent/seed".into()),
            ..Default::default()
        };
        let e = NatsCredentials::load(&missing, "nats.auth").unwrap_err();
        assert!(
            e.contains("nats.auth.nkeySeedFile: cannot read /nonexistent/seed"),
            "{e}"
        );
        let creds = NatsAuth {
            creds_file: Some(file("bad.creds", "not a creds file")),
            ..Default::default()
        };
        let c = NatsCredentials::load(&creds, "nats.auth").unwrap();
        let Err(e) = c.apply(async_nats::ConnectOptions::new()) else {
            panic!("a creds file without a JWT is refused");
        };
        assert!(e.contains("creds file is not valid"), "{e}");
        assert!(NatsCredentials::load(&NatsAuth::default(), "nats.auth").is_ok());
    }

    #[test]
    fn tls_files_are_checked_at_start_and_shown_only_as_a_kind() {
        let dir = tempfile::tempdir().unwrap();
        let pki = ferry_testkit::pki::Pki::new(dir.path(), "nats-ca");
        let leaf = pki.issue("ferry", &["localhost"]);
        let path = |p: &std::path::Path| Some(p.display().to_string());
        let good = NatsTls {
            ca_file: path(&pki.ca_file()),
            cert_file: path(&leaf.cert),
            key_file: path(&leaf.key),
        };
        let c = NatsCredentials::default()
            .with_tls(Some(&good), "nats.tls")
            .unwrap();
        assert_eq!(format!("{c:?}"), "anonymous, TLS with a client certificate");
        let ca_only = NatsTls {
            ca_file: path(&pki.ca_file()),
            ..Default::default()
        };
        let c = NatsCredentials::default()
            .with_tls(Some(&ca_only), "regions.global.tls")
            .unwrap();
        assert_eq!(format!("{c:?}"), "anonymous, TLS");
        // A missing CA, a CA file holding a key, a key of another
        // certificate: each names the key to fix.
        let other = pki.issue("other", &["localhost"]);
        for (tls, want) in [
            (
                NatsTls {
                    ca_file: Some("/nonexistent/ca.pem".into()),
                    ..Default::default()
                },
                "nats.tls: cannot read the CA file /nonexistent/ca.pem",
            ),
            (
                NatsTls {
                    ca_file: path(&leaf.key),
                    ..Default::default()
                },
                "nats.tls: the CA file",
            ),
            (
                NatsTls {
                    key_file: path(&other.key),
                    ..good.clone()
                },
                "nats.tls: the certificate",
            ),
        ] {
            let e = NatsCredentials::default()
                .with_tls(Some(&tls), "nats.tls")
                .unwrap_err();
            assert!(e.starts_with(want), "{e}");
        }
    }

    #[test]
    fn host_port_of_nats_urls() {
        for (url, want) in [
            ("nats://127.0.0.1:4222", Some(("127.0.0.1", 4222))),
            (
                "tls://u:p@nats.example:7422/x",
                Some(("nats.example", 7422)),
            ),
            ("nats://tok@[::1]:1234", Some(("::1", 1234))),
            ("nats.example", Some(("nats.example", 4222))),
            ("nats://:4222", None),
            ("nats://h:99999", None),
        ] {
            let got = host_port(url);
            assert_eq!(got.as_ref().map(|(h, p)| (h.as_str(), *p)), want, "{url}");
        }
    }

    /// Several processes open a bucket nobody has created yet, at once,
    /// and each writes right away: every write survives, and every
    /// revision is on the clock floor. Purging the new bucket up to the
    /// floor after creating it (the way before) let one opener's purge
    /// delete another's first write — a just-won leader lease.
    #[tokio::test]
    async fn processes_opening_a_new_bucket_at_once_keep_each_others_writes() {
        let server = NatsServer::start();
        let before = fresh_floor(0);
        for round in 0..8 {
            let bucket = format!("race{round}");
            let writers = (0..6).map(|i| {
                let (url, bucket) = (server.url(), bucket.clone());
                tokio::spawn(async move {
                    let kv = NatsKv::connect(
                        &[url],
                        &bucket,
                        Duration::from_secs(60),
                        1,
                        &NatsCredentials::default(),
                    )
                    .await
                    .unwrap();
                    let rev = kv.create(&format!("k{i}"), Bytes::from("v")).await.unwrap();
                    (kv, rev)
                })
            });
            let mut opened = Vec::new();
            for w in writers {
                opened.push(w.await.unwrap());
            }
            // The stream was created at the floor, not moved there later.
            let info = opened[0].0.store().stream.info().await.unwrap().clone();
            assert!(
                info.config.first_sequence.is_some_and(|f| f >= before),
                "round {round}: the stream was created at {:?}, not on the floor {before}",
                info.config.first_sequence
            );
            for (i, (kv, rev)) in opened.iter().enumerate() {
                assert!(
                    *rev >= before,
                    "round {round}: revision {rev} below the clock floor {before}"
                );
                let e = kv.get(&format!("k{i}")).await.unwrap();
                assert_eq!(
                    e.map(|e| e.revision),
                    Some(*rev),
                    "round {round}: writer {i}'s first write was lost"
                );
            }
        }
    }
}
