//! Who calls the REST API and what they may do. A caller proves who it is
//! with a bearer token: a static token from `api.auth.tokensFile` (kept
//! only as its SHA-256 in memory) or a JWT signed by a key of
//! `api.auth.jwt.jwksFile`. Either carries grants `namespace:role`
//! (`payments:operator`, `*:viewer`); roles are ordered viewer < operator
//! < admin, and a grant on `*` holds in every namespace.
//!
//! Invariant: with authentication configured, a request is served only for
//! a [`Caller`] built here from a credential that verified; nothing a
//! client can set besides that credential (a forwarded-by header, a
//! claimed identity) changes who the caller is. With none configured every
//! caller is [`Caller::open`], an admin everywhere.

use std::collections::HashMap;
use std::fmt;
use std::path::Path;

use ferry_core::config::{ApiAuthConfig, JwtConfig};
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

struct JwtCheck {
    keys: Vec<JwtKey>,
    issuer: Option<String>,
    audience: Option<String>,
    roles_claim: String,
}

/// Largest token accepted, in bytes: bounds the work of a hostile header.
const MAX_TOKEN_BYTES: usize = 16 * 1024;
/// Clock skew allowed on `exp` and `nbf`, in seconds.
const LEEWAY_SECS: u64 = 30;

/// The API's authentication: off, or static tokens and/or JWTs.
pub struct ApiAuth {
    /// SHA-256 of each static token → its caller.
    tokens: HashMap<[u8; 32], Caller>,
    jwt: Option<JwtCheck>,
    enabled: bool,
    /// Whether `/metrics` needs a caller.
    pub metrics_authenticated: bool,
}

impl fmt::Debug for ApiAuth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ApiAuth")
            .field("enabled", &self.enabled)
            .field("tokens", &self.tokens.len())
            .field("jwt_keys", &self.jwt.as_ref().map_or(0, |j| j.keys.len()))
            .finish()
    }
}

impl ApiAuth {
    /// No authentication: every caller is an admin.
    pub fn open() -> ApiAuth {
        ApiAuth {
            tokens: HashMap::new(),
            jwt: None,
            enabled: false,
            metrics_authenticated: false,
        }
    }

    /// Reads the files `cfg` names.
    pub fn from_config(cfg: &ApiAuthConfig) -> Result<ApiAuth, AuthSetupError> {
        if !cfg.enabled() {
            return Ok(ApiAuth::open());
        }
        let tokens = match &cfg.tokens_file {
            Some(f) => load_tokens(Path::new(f))?,
            None => HashMap::new(),
        };
        let jwt = cfg.jwt.as_ref().map(load_jwt).transpose()?;
        Ok(ApiAuth {
            tokens,
            jwt,
            enabled: true,
            metrics_authenticated: cfg.metrics_authenticated,
        })
    }

    /// Static tokens from YAML text (for tests and `from_config`).
    pub fn with_tokens_yaml(text: &str, source: &str) -> Result<ApiAuth, AuthSetupError> {
        Ok(ApiAuth {
            tokens: parse_tokens(text, source)?,
            jwt: None,
            enabled: true,
            metrics_authenticated: false,
        })
    }

    /// Whether callers must authenticate.
    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// The caller an `Authorization` header value proves.
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
        let digest: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        if let Some(c) = self.tokens.get(&digest) {
            return Ok(c.clone());
        }
        match &self.jwt {
            // Three base64url parts: a JWT; anything else is a static token.
            Some(j) if token.split('.').count() == 3 => j.check(token),
            _ => Err(Unauthenticated::UnknownToken(false)),
        }
    }
}

fn load_tokens(path: &Path) -> Result<HashMap<[u8; 32], Caller>, AuthSetupError> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        AuthSetupError(format!(
            "api.auth.tokensFile {}: cannot read it ({e})",
            path.display()
        ))
    })?;
    parse_tokens(&text, &format!("api.auth.tokensFile {}", path.display()))
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
    let at = format!("api.auth.jwt.jwksFile {}", cfg.jwks_file);
    let text = std::fs::read_to_string(&cfg.jwks_file)
        .map_err(|e| AuthSetupError(format!("{at}: cannot read it ({e})")))?;
    let keys = parse_jwks(&text).map_err(|m| AuthSetupError(format!("{at}: {m}")))?;
    Ok(JwtCheck {
        keys,
        issuer: cfg.issuer.clone(),
        audience: cfg.audience.clone(),
        roles_claim: cfg.roles_claim.clone(),
    })
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
    fn check(&self, token: &str) -> Result<Caller, Unauthenticated> {
        let bad = |m: String| Unauthenticated::Jwt(m);
        let header =
            jsonwebtoken::decode_header(token).map_err(|_| Unauthenticated::UnknownToken(true))?;
        let candidates: Vec<&JwtKey> = self
            .keys
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
            return Err(bad(format!(
                "no key of the JWKS has key id {:?} and algorithm {:?}: the token is forged, from another issuer, or the JWKS file is out of date",
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

    #[test]
    fn open_auth_makes_everyone_an_admin() {
        let auth = ApiAuth::open();
        assert!(!auth.enabled());
        assert_eq!(auth.authenticate(None).unwrap(), Caller::open());
    }
}
