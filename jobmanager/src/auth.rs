//! Who calls the REST API and what they may do. A caller proves who it is
//! with a bearer token — a static token from `api.auth.tokensFile` (kept
//! only as its SHA-256 in memory) or a JWT signed by a key of the JWKS
//! (`api.auth.jwt.jwksFile` or `jwksUrl`) — or with a TLS client
//! certificate of the callers' CA (`api.auth.clientCertificates`). Each
//! carries grants `namespace:role` (`payments:operator`, `*:viewer`); roles
//! are ordered viewer < operator < admin, and a grant on `*` holds in every
//! namespace. The tokens file and the JWKS are read again when they change
//! (a JWKS URL on its refresh interval, and when a token names a key id it
//! lacks), with no restart.
//!
//! Invariant: with authentication configured, a request is served only for
//! a [`Caller`] built here from a credential that verified. Nothing a
//! client can set besides that credential changes who the caller is: the
//! one claimed identity taken (`x-ferry-forwarded-identity`, a standby
//! forwarding a certificate caller's write) counts only on a connection
//! whose client certificate chains to the JobManagers' own CA, and its
//! grants come from this instance's settings. With none configured every
//! caller is [`Caller::open`], an admin everywhere.

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use ferry_core::config::{ApiAuthConfig, ClientCertAuth, JwtConfig};
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, JwkSet};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// What a grant lets a caller do, each role including the ones below it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Read jobs, checkpoints, the cluster and the regions.
    Viewer,
    /// Submit, cancel and savepoint jobs.
    Operator,
    /// Region failover and fail-back, drills, outage simulation.
    Admin,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Viewer => "viewer",
            Role::Operator => "operator",
            Role::Admin => "admin",
        }
    }
}

/// A role in one namespace, or in every namespace (`*`).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Grant {
    pub namespace: String,
    pub role: Role,
}

/// The namespace of a grant that holds in every namespace.
pub const EVERY_NAMESPACE: &str = "*";

impl Grant {
    /// Parses `namespace:role`.
    pub fn parse(s: &str) -> Result<Grant, String> {
        let (ns, role) = s.trim().rsplit_once(':').ok_or_else(|| {
            format!("grant {s:?} is not namespace:role (e.g. payments:operator or *:viewer)")
        })?;
        let role = match role {
            "viewer" => Role::Viewer,
            "operator" => Role::Operator,
            "admin" => Role::Admin,
            other => {
                return Err(format!(
                    "grant {s:?}: unknown role {other:?}; use viewer, operator or admin"
                ));
            }
        };
        let ok = ns == EVERY_NAMESPACE
            || (!ns.is_empty()
                && ns.len() <= 63
                && ns
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-'));
        if !ok {
            return Err(format!(
                "grant {s:?}: the namespace must be '*' or lowercase letters, digits and '-'"
            ));
        }
        Ok(Grant {
            namespace: ns.to_string(),
            role,
        })
    }

    fn covers(&self, role: Role, namespace: &str) -> bool {
        self.role >= role && (self.namespace == EVERY_NAMESPACE || self.namespace == namespace)
    }
}

impl fmt::Display for Grant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.namespace, self.role.as_str())
    }
}

/// How a caller proved who it is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Method {
    /// Authentication is off: everyone is an admin.
    None,
    /// A static token of the tokens file.
    Token,
    /// A JWT.
    Jwt,
    /// A TLS client certificate (directly, or forwarded by a standby
    /// JobManager that verified it).
    Certificate,
}

/// An authenticated caller.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Caller {
    /// The token's name, or the JWT's `sub`.
    pub name: String,
    pub method: Method,
    pub grants: Vec<Grant>,
}

impl Caller {
    /// The caller when authentication is off.
    pub fn open() -> Caller {
        Caller {
            name: "anonymous".into(),
            method: Method::None,
            grants: vec![Grant {
                namespace: EVERY_NAMESPACE.into(),
                role: Role::Admin,
            }],
        }
    }

    /// Whether the caller holds `role` in `namespace`.
    pub fn may(&self, role: Role, namespace: &str) -> bool {
        self.grants.iter().any(|g| g.covers(role, namespace))
    }

    /// Whether the caller holds `role` in at least one namespace.
    pub fn may_somewhere(&self, role: Role) -> bool {
        self.grants.iter().any(|g| g.role >= role)
    }

    /// Whether the caller holds `role` in every namespace (`*:role`).
    pub fn may_everywhere(&self, role: Role) -> bool {
        self.may(role, EVERY_NAMESPACE)
    }

    /// The grants as `a:viewer, *:operator` (or `none`).
    pub fn grants_text(&self) -> String {
        if self.grants.is_empty() {
            return "none".into();
        }
        self.grants
            .iter()
            .map(Grant::to_string)
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// Why a request was not authenticated; each message says what to do and
/// never repeats the credential.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Unauthenticated {
    #[error(
        "this API needs a bearer token: send 'Authorization: Bearer <token>' (ferry --token or FERRY_TOKEN)"
    )]
    Missing,
    #[error("the Authorization header is not 'Bearer <token>'")]
    Malformed,
    #[error(
        "the token is not known: it is not one of api.auth.tokensFile{}",
        if *.0 { " and not a JWT" } else { "" }
    )]
    UnknownToken(bool),
    #[error("the JWT was refused: {0}")]
    Jwt(String),
    /// ... because no key of the JWKS has its key id: it may be signed by
    /// a key the issuer added since (a JWKS URL is fetched again).
    #[error("the JWT was refused: {0}")]
    UnknownKeyId(String),
    #[error(
        "x-ferry-forwarded-identity is taken only from a JobManager of this region (a client certificate of tls.api.caFile); send your own credential instead"
    )]
    ForgedForward,
}

/// The client certificate a connection presented, as the API's TLS
/// handshake verified it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PeerCert {
    /// Its subject common names, DNS names and URIs.
    pub names: Vec<String>,
    /// Whether it chains to the JobManagers' own CA (`tls.api.caFile`):
    /// another JobManager of the region, not a caller.
    pub from_region_jobmanager: bool,
}

/// A problem with the authentication settings, found at start.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct AuthSetupError(pub String);

/// A static token as the tokens file lists it.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TokenEntry {
    name: String,
    #[serde(default)]
    token: Option<String>,
    /// Hex SHA-256 of the token (the file then never holds the token).
    #[serde(default)]
    sha256: Option<String>,
    #[serde(default)]
    roles: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TokensFile {
    tokens: Vec<TokenEntry>,
}

/// A key of the JWKS with the one algorithm it verifies.
struct JwtKey {
    kid: Option<String>,
    alg: Algorithm,
    key: DecodingKey,
}

/// Where the JWKS comes from.
enum JwksSource {
    File(PathBuf),
    Url {
        url: String,
        client: reqwest::Client,
        refresh: Duration,
    },
}

/// The keys in use, and why the newest fetch failed (a JWKS URL that
/// could not be fetched at start leaves no key).
#[derive(Default)]
struct JwksState {
    keys: Arc<Vec<JwtKey>>,
    fingerprint: [u8; 32],
    error: Option<String>,
    fetched: Option<Instant>,
    /// When a token with an unknown key id last caused a fetch.
    refetched: Option<Instant>,
}

struct JwtCheck {
    source: JwksSource,
    state: RwLock<JwksState>,
    /// Serializes fetches of a JWKS URL.
    fetching: tokio::sync::Mutex<()>,
    issuer: Option<String>,
    audience: Option<String>,
    roles_claim: String,
}

/// Largest token accepted, in bytes: bounds the work of a hostile header.
const MAX_TOKEN_BYTES: usize = 16 * 1024;
/// Clock skew allowed on `exp` and `nbf`, in seconds.
const LEEWAY_SECS: u64 = 30;
/// Largest JWKS document fetched, in bytes.
const MAX_JWKS_BYTES: usize = 1024 * 1024;
/// How long one JWKS fetch may take.
const JWKS_FETCH_TIMEOUT: Duration = Duration::from_secs(10);
/// Tokens naming key ids the JWKS lacks fetch it again at most this often
/// (a rotated key shows up at once, without waiting for the refresh; a
/// flood of made-up key ids costs the issuer one request per period).
const JWKS_REFETCH_MIN: Duration = Duration::from_secs(10);
/// A JWKS URL that failed is tried again this often.
const JWKS_RETRY: Duration = Duration::from_secs(5);

/// SHA-256 of a static token → its caller.
type Tokens = HashMap<[u8; 32], Caller>;

/// The API's authentication: off, or static tokens, JWTs and client
/// certificates in any mix.
pub struct ApiAuth {
    tokens: RwLock<(Arc<Tokens>, [u8; 32])>,
    tokens_file: Option<PathBuf>,
    jwt: Option<JwtCheck>,
    /// Certificate name → grants.
    certificates: Option<HashMap<String, Vec<Grant>>>,
    enabled: bool,
    /// Whether `/metrics` needs a caller.
    pub metrics_authenticated: bool,
}

impl fmt::Debug for ApiAuth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ApiAuth")
            .field("enabled", &self.enabled)
            .field("tokens", &self.tokens().len())
            .field("jwt_keys", &self.jwt.as_ref().map_or(0, |j| j.keys().len()))
            .field(
                "certificate_identities",
                &self.certificates.as_ref().map_or(0, HashMap::len),
            )
            .finish()
    }
}

fn digest(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

/// The text of a file that is read again when it changes (the tokens file,
/// the JWKS file) and its fingerprint; `None` when the fingerprint is
/// still `current`.
fn read_if_changed(path: &Path, current: [u8; 32]) -> Result<Option<(String, [u8; 32])>, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read {} ({e})", path.display()))?;
    let fp = digest(text.as_bytes());
    Ok((fp != current).then_some((text, fp)))
}

impl ApiAuth {
    /// No authentication: every caller is an admin.
    pub fn open() -> ApiAuth {
        ApiAuth {
            tokens: RwLock::new((Arc::new(HashMap::new()), [0; 32])),
            tokens_file: None,
            jwt: None,
            certificates: None,
            enabled: false,
            metrics_authenticated: false,
        }
    }

    /// Reads the files `cfg` names. A JWKS URL is fetched by [`Self::start`].
    pub fn from_config(cfg: &ApiAuthConfig) -> Result<ApiAuth, AuthSetupError> {
        if !cfg.enabled() {
            return Ok(ApiAuth::open());
        }
        let (tokens, fingerprint) = match &cfg.tokens_file {
            Some(f) => load_tokens(Path::new(f))?,
            None => (HashMap::new(), [0; 32]),
        };
        let jwt = cfg.jwt.as_ref().map(load_jwt).transpose()?;
        let certificates = cfg
            .client_certificates
            .as_ref()
            .map(certificate_grants)
            .transpose()?;
        Ok(ApiAuth {
            tokens: RwLock::new((Arc::new(tokens), fingerprint)),
            tokens_file: cfg.tokens_file.as_ref().map(PathBuf::from),
            jwt,
            certificates,
            enabled: true,
            metrics_authenticated: cfg.metrics_authenticated,
        })
    }

    /// Static tokens from YAML text (for tests and `from_config`).
    pub fn with_tokens_yaml(text: &str, source: &str) -> Result<ApiAuth, AuthSetupError> {
        let mut auth = ApiAuth::open();
        auth.tokens = RwLock::new((
            Arc::new(parse_tokens(text, source)?),
            digest(text.as_bytes()),
        ));
        auth.enabled = true;
        Ok(auth)
    }

    /// Fetches a JWKS URL for the first time (bounded: a failure is
    /// logged, and JWTs are refused saying why until a retry succeeds),
    /// then keeps every source fresh: the tokens file and the JWKS file
    /// are read again every `reload` and taken when they changed and
    /// parse; a JWKS URL is fetched every `jwksRefreshInterval`. Runs
    /// while anyone holds `self`.
    pub async fn start(self: &Arc<Self>, reload: Duration) {
        if let Some(j) = &self.jwt
            && matches!(j.source, JwksSource::Url { .. })
        {
            j.fetch().await;
        }
        if self.tokens_file.is_none() && self.jwt.is_none() {
            return;
        }
        let weak = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut warned: HashMap<&'static str, String> = HashMap::new();
            loop {
                tokio::time::sleep(reload).await;
                let Some(me) = weak.upgrade() else { return };
                let mut report = |what: &'static str, r: Result<bool, String>| match r {
                    Ok(changed) => {
                        if changed {
                            tracing::info!("{what} changed: new requests use it");
                        }
                        warned.remove(what);
                    }
                    Err(e) => {
                        if warned.get(what) != Some(&e) {
                            tracing::warn!("keeping the {what} in use: {e}");
                            warned.insert(what, e);
                        }
                    }
                };
                if let Some(path) = &me.tokens_file {
                    report("api.auth.tokensFile", me.reload_tokens(path));
                }
                if let Some(j) = &me.jwt {
                    match &j.source {
                        JwksSource::File(path) => {
                            report("api.auth.jwt.jwksFile", j.reload_file(path))
                        }
                        JwksSource::Url { refresh, .. } => {
                            if j.due(*refresh) {
                                j.fetch().await;
                            }
                        }
                    }
                }
            }
        });
    }

    fn tokens(&self) -> Arc<Tokens> {
        self.tokens
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .0
            .clone()
    }

    /// Reads the tokens file again; `Ok(true)` when new tokens are in use.
    fn reload_tokens(&self, path: &Path) -> Result<bool, String> {
        let current = self.tokens.read().unwrap_or_else(|p| p.into_inner()).1;
        let Some((text, fp)) = read_if_changed(path, current)? else {
            return Ok(false);
        };
        let tokens = parse_tokens(&text, &format!("api.auth.tokensFile {}", path.display()))
            .map_err(|e| e.0)?;
        *self.tokens.write().unwrap_or_else(|p| p.into_inner()) = (Arc::new(tokens), fp);
        Ok(true)
    }

    /// Whether callers must authenticate.
    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// The caller an `Authorization` header value proves (bearer tokens
    /// only).
    pub fn authenticate(&self, authorization: Option<&str>) -> Result<Caller, Unauthenticated> {
        if !self.enabled {
            return Ok(Caller::open());
        }
        let value = authorization.ok_or(Unauthenticated::Missing)?;
        let token = value
            .strip_prefix("Bearer ")
            .or_else(|| value.strip_prefix("bearer "))
            .map(str::trim)
            .filter(|t| !t.is_empty() && t.len() <= MAX_TOKEN_BYTES)
            .ok_or(Unauthenticated::Malformed)?;
        if let Some(c) = self.tokens().get(&digest(token.as_bytes())) {
            return Ok(c.clone());
        }
        match &self.jwt {
            // Three base64url parts: a JWT; anything else is a static token.
            Some(j) if token.split('.').count() == 3 => j.check(token),
            _ => Err(Unauthenticated::UnknownToken(false)),
        }
    }

    /// The caller of a request: its bearer token when it sends one, else
    /// the client certificate its connection presented (`peer`), else —
    /// only on a connection from another JobManager of the region — the
    /// identity that JobManager verified and forwards (`forwarded`). A
    /// JWT naming a key id the JWKS URL lacks fetches the set again first
    /// (rate-limited), so a rotated key works at once.
    pub async fn authenticate_request(
        &self,
        authorization: Option<&str>,
        peer: Option<&PeerCert>,
        forwarded: Option<&str>,
    ) -> Result<Caller, Unauthenticated> {
        if !self.enabled {
            return Ok(Caller::open());
        }
        if let Some(name) = forwarded {
            let from_jm = peer.is_some_and(|p| p.from_region_jobmanager);
            return match &self.certificates {
                Some(ids) if from_jm && authorization.is_none() => Ok(certificate_caller(
                    ids,
                    std::slice::from_ref(&name.to_string()),
                )),
                _ => Err(Unauthenticated::ForgedForward),
            };
        }
        if authorization.is_none()
            && let (Some(ids), Some(p)) = (&self.certificates, peer)
            && !p.from_region_jobmanager
            && !p.names.is_empty()
        {
            return Ok(certificate_caller(ids, &p.names));
        }
        match (self.authenticate(authorization), &self.jwt) {
            (Err(Unauthenticated::UnknownKeyId(_)), Some(j))
                if j.refetch_for_unknown_key().await =>
            {
                self.authenticate(authorization)
            }
            (r, _) => r,
        }
    }
}

/// The caller of a certificate with `names`: the first that
/// `identities` lists, with its grants; else the first name, with none.
fn certificate_caller(identities: &HashMap<String, Vec<Grant>>, names: &[String]) -> Caller {
    let found = names.iter().find_map(|n| identities.get(n).map(|g| (n, g)));
    let (name, grants) = match found {
        Some((n, g)) => (n.clone(), g.clone()),
        None => (
            names
                .first()
                .cloned()
                .unwrap_or_else(|| "(unnamed certificate)".into()),
            Vec::new(),
        ),
    };
    Caller {
        name,
        method: Method::Certificate,
        grants,
    }
}

fn certificate_grants(cfg: &ClientCertAuth) -> Result<HashMap<String, Vec<Grant>>, AuthSetupError> {
    let mut out = HashMap::new();
    for (name, roles) in &cfg.identities {
        let grants = roles
            .iter()
            .map(|g| {
                Grant::parse(g).map_err(|m| {
                    AuthSetupError(format!(
                        "api.auth.clientCertificates.identities.{name}: {m}"
                    ))
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        out.insert(name.clone(), grants);
    }
    Ok(out)
}

fn load_tokens(path: &Path) -> Result<(Tokens, [u8; 32]), AuthSetupError> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        AuthSetupError(format!(
            "api.auth.tokensFile {}: cannot read it ({e})",
            path.display()
        ))
    })?;
    let tokens = parse_tokens(&text, &format!("api.auth.tokensFile {}", path.display()))?;
    Ok((tokens, digest(text.as_bytes())))
}

fn parse_tokens(text: &str, source: &str) -> Result<HashMap<[u8; 32], Caller>, AuthSetupError> {
    let err = |m: String| AuthSetupError(format!("{source}: {m}"));
    let file: TokensFile = serde_yaml_ng::from_str(text).map_err(|e| {
        err(format!(
            "{e} (expected 'tokens:' with entries of name, token or sha256, and roles)"
        ))
    })?;
    let mut out = HashMap::new();
    for (i, t) in file.tokens.into_iter().enumerate() {
        let at = format!("tokens[{i}] ({})", t.name);
        let digest: [u8; 32] = match (&t.token, &t.sha256) {
            (Some(tok), None) if tok.len() >= 16 => Sha256::digest(tok.trim().as_bytes()).into(),
            (Some(_), None) => {
                return Err(err(format!(
                    "{at}: the token is shorter than 16 characters; use a long random one (e.g. openssl rand -hex 32)"
                )));
            }
            (None, Some(hex)) => parse_sha256(hex).ok_or_else(|| {
                err(format!(
                    "{at}: sha256 must be 64 hex digits (sha256sum of the token)"
                ))
            })?,
            _ => return Err(err(format!("{at}: give exactly one of token and sha256"))),
        };
        let grants = t
            .roles
            .iter()
            .map(|g| Grant::parse(g).map_err(|m| err(format!("{at}: {m}"))))
            .collect::<Result<Vec<_>, _>>()?;
        if t.name.trim().is_empty() {
            return Err(err(format!("tokens[{i}]: name is empty")));
        }
        let caller = Caller {
            name: t.name,
            method: Method::Token,
            grants,
        };
        if out.insert(digest, caller).is_some() {
            return Err(err(format!("{at}: the same token is listed twice")));
        }
    }
    Ok(out)
}

fn parse_sha256(hex: &str) -> Option<[u8; 32]> {
    let hex = hex.trim();
    if hex.len() != 64 || !hex.is_ascii() {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, b) in out.iter_mut().enumerate() {
        *b = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(out)
}

fn load_jwt(cfg: &JwtConfig) -> Result<JwtCheck, AuthSetupError> {
    let (source, state) = match (&cfg.jwks_file, &cfg.jwks_url) {
        (Some(file), _) => {
            let at = format!("api.auth.jwt.jwksFile {file}");
            let text = std::fs::read_to_string(file)
                .map_err(|e| AuthSetupError(format!("{at}: cannot read it ({e})")))?;
            let keys = parse_jwks(&text).map_err(|m| AuthSetupError(format!("{at}: {m}")))?;
            let state = JwksState {
                keys: Arc::new(keys),
                fingerprint: digest(text.as_bytes()),
                fetched: Some(Instant::now()),
                ..JwksState::default()
            };
            (JwksSource::File(file.into()), state)
        }
        (None, Some(url)) => {
            let mut b = reqwest::Client::builder()
                .no_proxy()
                .connect_timeout(Duration::from_secs(5))
                .timeout(JWKS_FETCH_TIMEOUT)
                .redirect(reqwest::redirect::Policy::none());
            if let Some(ca) = &cfg.jwks_ca_file {
                let at = format!("api.auth.jwt.jwksCaFile {ca}");
                let pem = std::fs::read(ca)
                    .map_err(|e| AuthSetupError(format!("{at}: cannot read it ({e})")))?;
                let certs = reqwest::Certificate::from_pem_bundle(&pem)
                    .map_err(|e| AuthSetupError(format!("{at}: not PEM certificates ({e})")))?;
                if certs.is_empty() {
                    return Err(AuthSetupError(format!("{at}: holds no certificate")));
                }
                b = b.tls_certs_only(certs);
            }
            let client = b.build().map_err(|e| {
                AuthSetupError(format!(
                    "api.auth.jwt.jwksUrl: cannot set up the HTTP client ({e})"
                ))
            })?;
            let source = JwksSource::Url {
                url: url.clone(),
                client,
                refresh: cfg.jwks_refresh_interval.get(),
            };
            let state = JwksState {
                error: Some(format!("the JWKS at {url} has not been fetched yet")),
                ..JwksState::default()
            };
            (source, state)
        }
        (None, None) => {
            return Err(AuthSetupError(
                "api.auth.jwt: give jwksFile or jwksUrl".into(),
            ));
        }
    };
    Ok(JwtCheck {
        source,
        state: RwLock::new(state),
        fetching: tokio::sync::Mutex::new(()),
        issuer: cfg.issuer.clone(),
        audience: cfg.audience.clone(),
        roles_claim: cfg.roles_claim.clone(),
    })
}

/// GETs a JWKS, reading at most [`MAX_JWKS_BYTES`]; its keys and the
/// document's fingerprint.
async fn fetch_jwks(
    client: &reqwest::Client,
    url: &str,
) -> Result<(Vec<JwtKey>, [u8; 32]), String> {
    let mut res = client
        .get(url)
        .header(reqwest::header::ACCEPT, "application/json")
        .send()
        .await
        .map_err(|e| describe_fetch_error(&e))?;
    if !res.status().is_success() {
        return Err(format!("the endpoint answered HTTP {}", res.status()));
    }
    let mut body = Vec::new();
    while let Some(chunk) = res
        .chunk()
        .await
        .map_err(|e| format!("reading the answer failed ({e})"))?
    {
        if body.len() + chunk.len() > MAX_JWKS_BYTES {
            return Err(format!(
                "the answer is larger than {MAX_JWKS_BYTES} bytes; that is no JWKS"
            ));
        }
        body.extend_from_slice(&chunk);
    }
    let text =
        std::str::from_utf8(&body).map_err(|_| "the answer is not UTF-8 text".to_string())?;
    let keys = parse_jwks(text)?;
    Ok((keys, digest(&body)))
}

/// A failed fetch's cause, TLS trust named as such.
fn describe_fetch_error(e: &reqwest::Error) -> String {
    let mut chain = e.to_string();
    let mut src = std::error::Error::source(e);
    while let Some(s) = src {
        chain.push_str(": ");
        chain.push_str(&s.to_string());
        src = s.source();
    }
    if e.is_timeout() {
        format!("no answer within {JWKS_FETCH_TIMEOUT:?} ({chain})")
    } else if chain.contains("certificate") || chain.contains("UnknownIssuer") {
        format!(
            "the endpoint's TLS certificate is not trusted ({chain}); set api.auth.jwt.jwksCaFile to the CA that signed it"
        )
    } else {
        chain
    }
}

/// Each key of a JWKS with the one algorithm it may verify: the key's
/// `alg`, or the usual one for its type. A token's header never chooses
/// the algorithm (no RSA key is ever used as an HMAC secret).
fn parse_jwks(text: &str) -> Result<Vec<JwtKey>, String> {
    let set: JwkSet = serde_json::from_str(text).map_err(|e| format!("not a JWKS ({e})"))?;
    let mut keys = Vec::new();
    for (i, jwk) in set.keys.iter().enumerate() {
        let alg = match jwk.common.key_algorithm {
            Some(a) => Algorithm::try_from(a)
                .map_err(|e| format!("keys[{i}]: its alg is not one to verify with ({e})"))?,
            None => match &jwk.algorithm {
                AlgorithmParameters::RSA(_) => Algorithm::RS256,
                AlgorithmParameters::EllipticCurve(p) => match p.curve {
                    EllipticCurve::P256 => Algorithm::ES256,
                    EllipticCurve::P384 => Algorithm::ES384,
                    _ => return Err(format!("keys[{i}]: unsupported curve")),
                },
                AlgorithmParameters::OctetKeyPair(_) => Algorithm::EdDSA,
                AlgorithmParameters::OctetKey(_) => Algorithm::HS256,
                _ => return Err(format!("keys[{i}]: unsupported key type")),
            },
        };
        let key = DecodingKey::from_jwk(jwk).map_err(|e| format!("keys[{i}]: {e}"))?;
        keys.push(JwtKey {
            kid: jwk.common.key_id.clone(),
            alg,
            key,
        });
    }
    if keys.is_empty() {
        return Err("the key set is empty".into());
    }
    Ok(keys)
}

impl JwtCheck {
    fn keys(&self) -> Arc<Vec<JwtKey>> {
        self.state
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .keys
            .clone()
    }

    /// Whether the keys are older than `refresh` (or failed: retried
    /// every [`JWKS_RETRY`]).
    fn due(&self, refresh: Duration) -> bool {
        let st = self.state.read().unwrap_or_else(|p| p.into_inner());
        let every = if st.error.is_some() {
            JWKS_RETRY.min(refresh)
        } else {
            refresh
        };
        st.fetched.is_none_or(|t| t.elapsed() >= every)
    }

    /// Reads the JWKS file again; `Ok(true)` when new keys are in use.
    fn reload_file(&self, path: &Path) -> Result<bool, String> {
        let current = self
            .state
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .fingerprint;
        let Some((text, fp)) = read_if_changed(path, current)? else {
            return Ok(false);
        };
        let keys = parse_jwks(&text).map_err(|m| format!("{}: {m}", path.display()))?;
        let mut st = self.state.write().unwrap_or_else(|p| p.into_inner());
        st.keys = Arc::new(keys);
        st.fingerprint = fp;
        Ok(true)
    }

    /// Fetches the JWKS URL once. Keys that parse replace the ones in use;
    /// a failure keeps them (and is what a refused JWT then names).
    async fn fetch(&self) {
        let JwksSource::Url { url, client, .. } = &self.source else {
            return;
        };
        let _one = self.fetching.lock().await;
        let got = fetch_jwks(client, url).await;
        let mut st = self.state.write().unwrap_or_else(|p| p.into_inner());
        st.fetched = Some(Instant::now());
        match got {
            Ok((keys, fp)) => {
                if st.fingerprint != fp {
                    tracing::info!(%url, keys = keys.len(), "JWKS fetched: new requests use its keys");
                }
                st.keys = Arc::new(keys);
                st.fingerprint = fp;
                st.error = None;
            }
            Err(e) => {
                if st.error.as_deref() != Some(e.as_str()) {
                    tracing::warn!(%url, "cannot fetch the JWKS (keeping {} key(s) in use; retrying every {JWKS_RETRY:?}): {e}", st.keys.len());
                }
                st.error = Some(e);
            }
        }
    }

    /// Fetches a JWKS URL again for a token whose key id it lacks, unless
    /// it was fetched within [`JWKS_REFETCH_MIN`]; true when it fetched.
    async fn refetch_for_unknown_key(&self) -> bool {
        if !matches!(self.source, JwksSource::Url { .. }) {
            return false;
        }
        {
            let mut st = self.state.write().unwrap_or_else(|p| p.into_inner());
            if st.refetched.is_some_and(|t| t.elapsed() < JWKS_REFETCH_MIN) {
                return false;
            }
            st.refetched = Some(Instant::now());
        }
        self.fetch().await;
        true
    }

    fn check(&self, token: &str) -> Result<Caller, Unauthenticated> {
        let bad = |m: String| Unauthenticated::Jwt(m);
        let header =
            jsonwebtoken::decode_header(token).map_err(|_| Unauthenticated::UnknownToken(true))?;
        let keys = self.keys();
        if keys.is_empty() {
            let why = self
                .state
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .error
                .clone()
                .unwrap_or_else(|| "the JWKS holds no key".into());
            return Err(bad(format!(
                "no key to verify it with: {why}; retry shortly, and check api.auth.jwt.jwksUrl"
            )));
        }
        let candidates: Vec<&JwtKey> = keys
            .iter()
            .filter(|k| {
                k.alg == header.alg
                    && match (&header.kid, &k.kid) {
                        (Some(want), Some(have)) => want == have,
                        (Some(_), None) => false,
                        (None, _) => true,
                    }
            })
            .collect();
        if candidates.is_empty() {
            return Err(Unauthenticated::UnknownKeyId(format!(
                "no key of the JWKS has key id {:?} and algorithm {:?}: the token is forged, from another issuer, or signed by a key newer than the JWKS in use",
                header.kid.as_deref().unwrap_or("(none)"),
                header.alg
            )));
        }
        for k in candidates {
            let mut v = Validation::new(k.alg);
            v.leeway = LEEWAY_SECS;
            v.validate_nbf = true;
            v.set_required_spec_claims(&["exp", "sub"]);
            match &self.issuer {
                Some(iss) => v.set_issuer(&[iss]),
                None => v.iss = None,
            }
            match &self.audience {
                Some(aud) => v.set_audience(&[aud]),
                None => v.validate_aud = false,
            }
            let data = match jsonwebtoken::decode::<serde_json::Map<String, serde_json::Value>>(
                token, &k.key, &v,
            ) {
                Ok(d) => d,
                // Another key with the same id and algorithm may sign it.
                Err(e) if matches!(e.kind(), ErrorKind::InvalidSignature) => continue,
                Err(e) => return Err(bad(self.explain(e.kind()))),
            };
            let claims = data.claims;
            let name = claims
                .get("sub")
                .and_then(|s| s.as_str())
                .unwrap_or_default()
                .to_string();
            let grants = match claims.get(&self.roles_claim) {
                None => Vec::new(),
                Some(serde_json::Value::String(s)) => s
                    .split_whitespace()
                    .filter_map(|g| Grant::parse(g).ok())
                    .collect(),
                Some(serde_json::Value::Array(a)) => a
                    .iter()
                    .filter_map(|g| g.as_str())
                    .filter_map(|g| Grant::parse(g).ok())
                    .collect(),
                Some(_) => {
                    return Err(bad(format!(
                        "the '{}' claim must be a list of namespace:role",
                        self.roles_claim
                    )));
                }
            };
            return Ok(Caller {
                name,
                method: Method::Jwt,
                grants,
            });
        }
        Err(bad(
            "its signature does not verify with any key of the JWKS: the token is forged or signed by another issuer's key".into(),
        ))
    }

    fn explain(&self, kind: &ErrorKind) -> String {
        match kind {
            ErrorKind::ExpiredSignature => "it has expired; get a new token".into(),
            ErrorKind::ImmatureSignature => "it is not valid yet (nbf is in the future)".into(),
            ErrorKind::InvalidIssuer => format!(
                "its issuer (iss) is not {:?} (api.auth.jwt.issuer)",
                self.issuer.as_deref().unwrap_or_default()
            ),
            ErrorKind::InvalidAudience => format!(
                "its audience (aud) is not {:?} (api.auth.jwt.audience)",
                self.audience.as_deref().unwrap_or_default()
            ),
            ErrorKind::MissingRequiredClaim(c) => format!("it has no '{c}' claim"),
            other => format!("it is not a valid JWT ({other:?})"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grants_parse_and_cover_their_namespace_and_lower_roles() {
        let g = Grant::parse("payments:operator").unwrap();
        assert!(g.covers(Role::Viewer, "payments"));
        assert!(g.covers(Role::Operator, "payments"));
        assert!(!g.covers(Role::Admin, "payments"));
        assert!(!g.covers(Role::Viewer, "billing"));
        let all = Grant::parse("*:viewer").unwrap();
        assert!(all.covers(Role::Viewer, "anything"));
        assert!(!all.covers(Role::Operator, "anything"));
        for bad in [
            "payments",
            "payments:root",
            "Pay:viewer",
            ":viewer",
            "a b:viewer",
        ] {
            assert!(Grant::parse(bad).is_err(), "{bad}");
        }
        assert_eq!(g.to_string(), "payments:operator");
    }

    #[test]
    fn a_caller_is_an_admin_everywhere_only_with_a_star_grant() {
        let c = Caller {
            name: "x".into(),
            method: Method::Token,
            grants: vec![Grant::parse("a:admin").unwrap()],
        };
        assert!(c.may(Role::Admin, "a"));
        assert!(c.may_somewhere(Role::Admin));
        assert!(!c.may_everywhere(Role::Admin));
        assert!(Caller::open().may_everywhere(Role::Admin));
    }

    const TOKENS: &str = r#"
tokens:
  - name: ci
    token: "0123456789abcdef-ci"
    roles: ["payments:operator", "*:viewer"]
  - name: ops
    sha256: "3b0d8a4bd9b2cb7d1c1b84c85b2c1b8e53a7a6bd1f8c6f35b7d52c2f7d9ba4e1"
    roles: ["*:admin"]
"#;

    #[test]
    fn static_tokens_authenticate_by_their_hash() {
        let auth = ApiAuth::with_tokens_yaml(TOKENS, "test").unwrap();
        let ci = auth
            .authenticate(Some("Bearer 0123456789abcdef-ci"))
            .unwrap();
        assert_eq!(ci.name, "ci");
        assert!(ci.may(Role::Operator, "payments"));
        assert!(!ci.may(Role::Operator, "billing"));
        assert_eq!(
            auth.authenticate(None),
            Err(Unauthenticated::Missing),
            "no header"
        );
        assert_eq!(
            auth.authenticate(Some("Basic abc")),
            Err(Unauthenticated::Malformed)
        );
        assert_eq!(
            auth.authenticate(Some("Bearer 0123456789abcdef-cj")),
            Err(Unauthenticated::UnknownToken(false))
        );
        // The error never repeats the token.
        let msg = auth
            .authenticate(Some("Bearer secret-value-1234567"))
            .unwrap_err()
            .to_string();
        assert!(!msg.contains("secret-value"), "{msg}");
    }

    #[test]
    fn a_tokens_file_with_mistakes_is_refused_at_start_with_the_entry_named() {
        for (text, says) in [
            (
                "tokens: [{name: a, token: short, roles: []}]",
                "shorter than 16",
            ),
            (
                "tokens: [{name: a, token: 0123456789abcdefg, sha256: ab, roles: []}]",
                "exactly one of token and sha256",
            ),
            ("tokens: [{name: a, sha256: xyz}]", "64 hex digits"),
            (
                "tokens: [{name: a, token: 0123456789abcdefg, roles: [payments]}]",
                "tokens[0] (a): grant",
            ),
            (
                "tokens: [{name: a, token: 0123456789abcdefg}, {name: b, token: 0123456789abcdefg}]",
                "listed twice",
            ),
            ("tokenz: []", "expected 'tokens:'"),
        ] {
            let e = ApiAuth::with_tokens_yaml(text, "f.yaml").unwrap_err().0;
            assert!(e.contains(says) && e.starts_with("f.yaml: "), "{text}: {e}");
            assert!(!e.contains("0123456789abcdefg"), "{e}");
        }
    }

    #[tokio::test]
    async fn client_certificates_name_callers_and_only_a_jobmanager_forwards_one() {
        let cfg = ApiAuthConfig {
            tokens_file: None,
            jwt: None,
            client_certificates: Some(ClientCertAuth {
                ca_file: "/callers.pem".into(),
                identities: [("ci-bot".to_string(), vec!["payments:operator".to_string()])].into(),
            }),
            metrics_authenticated: false,
        };
        let auth = ApiAuth::from_config(&cfg).unwrap();
        let caller_cert = |names: &[&str]| PeerCert {
            names: names.iter().map(|n| n.to_string()).collect(),
            from_region_jobmanager: false,
        };
        // The first of the certificate's names that has grants.
        let ci = auth
            .authenticate_request(None, Some(&caller_cert(&["CI Bot", "ci-bot"])), None)
            .await
            .unwrap();
        assert_eq!(
            (ci.name.as_str(), ci.method),
            ("ci-bot", Method::Certificate)
        );
        assert!(ci.may(Role::Operator, "payments") && !ci.may(Role::Viewer, "billing"));
        // A name with no grants: known, allowed nothing.
        let nobody = auth
            .authenticate_request(None, Some(&caller_cert(&["stranger"])), None)
            .await
            .unwrap();
        assert_eq!(nobody.name, "stranger");
        assert!(nobody.grants.is_empty());
        // A JobManager's own certificate is no caller.
        let jm = PeerCert {
            names: vec!["ci-bot".into()],
            from_region_jobmanager: true,
        };
        assert_eq!(
            auth.authenticate_request(None, Some(&jm), None).await,
            Err(Unauthenticated::Missing)
        );
        // It alone may forward an identity, whose grants are this side's.
        let fwd = auth
            .authenticate_request(None, Some(&jm), Some("ci-bot"))
            .await
            .unwrap();
        assert_eq!(fwd.grants, ci.grants);
        for peer in [None, Some(&caller_cert(&["ci-bot"]))] {
            assert_eq!(
                auth.authenticate_request(None, peer, Some("ci-bot")).await,
                Err(Unauthenticated::ForgedForward)
            );
        }
        // A token beside a forwarded identity: the identity is refused.
        assert_eq!(
            auth.authenticate_request(Some("Bearer x"), Some(&jm), Some("ci-bot"))
                .await,
            Err(Unauthenticated::ForgedForward)
        );
    }

    #[tokio::test]
    async fn a_forwarded_identity_means_nothing_without_client_certificates() {
        let auth = ApiAuth::with_tokens_yaml(TOKENS, "test").unwrap();
        let jm = PeerCert {
            names: vec!["jm".into()],
            from_region_jobmanager: true,
        };
        assert_eq!(
            auth.authenticate_request(None, Some(&jm), Some("ops"))
                .await,
            Err(Unauthenticated::ForgedForward)
        );
        let ci = auth
            .authenticate_request(Some("Bearer 0123456789abcdef-ci"), None, None)
            .await
            .unwrap();
        assert_eq!(ci.name, "ci");
    }

    #[test]
    fn a_changed_tokens_file_replaces_the_tokens_and_a_broken_one_is_not_taken() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens.yaml");
        std::fs::write(&path, TOKENS).unwrap();
        let cfg = ApiAuthConfig {
            tokens_file: Some(path.display().to_string()),
            ..ApiAuthConfig::default()
        };
        let auth = ApiAuth::from_config(&cfg).unwrap();
        assert_eq!(auth.reload_tokens(&path), Ok(false), "unchanged");
        std::fs::write(
            &path,
            "tokens: [{name: new, token: 0123456789abcdef-new, roles: ['*:viewer']}]",
        )
        .unwrap();
        assert_eq!(auth.reload_tokens(&path), Ok(true));
        assert!(
            auth.authenticate(Some("Bearer 0123456789abcdef-ci"))
                .is_err()
        );
        assert_eq!(
            auth.authenticate(Some("Bearer 0123456789abcdef-new"))
                .unwrap()
                .name,
            "new"
        );
        std::fs::write(&path, "tokens: [{name: x, token: short}]").unwrap();
        let e = auth.reload_tokens(&path).unwrap_err();
        assert!(e.contains("shorter than 16"), "{e}");
        assert!(
            auth.authenticate(Some("Bearer 0123456789abcdef-new"))
                .is_ok(),
            "the tokens in use stay"
        );
    }

    #[test]
    fn open_auth_makes_everyone_an_admin() {
        let auth = ApiAuth::open();
        assert!(!auth.enabled());
        assert_eq!(auth.authenticate(None).unwrap(), Caller::open());
    }
}
