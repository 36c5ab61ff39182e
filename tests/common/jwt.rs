//! JWTs made inside tests: an EC P-256 signing key with its JWK, and
//! tokens it signs.

use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};

/// The audience every test token names (`api.auth.jwt.audience`).
pub const AUDIENCE: &str = "ferry";

/// An EC P-256 signing key and its JWK (`kid`).
pub struct SigningKey {
    pub der: Vec<u8>,
    pub jwk: Value,
}

pub fn signing_key(kid: &str) -> SigningKey {
    let kp = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let raw = kp.public_key_raw();
    assert_eq!(raw.len(), 65, "an uncompressed P-256 point");
    let b64 = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
    SigningKey {
        der: kp.serialize_der(),
        jwk: json!({"kty": "EC", "crv": "P-256", "alg": "ES256", "use": "sig", "kid": kid,
                    "x": b64(&raw[1..33]), "y": b64(&raw[33..])}),
    }
}

pub fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// A JWT signed by `key` with `kid`, for `sub` with `roles`, expiring at
/// `exp`, from `iss`, for [`AUDIENCE`].
pub fn jwt(key: &SigningKey, kid: &str, sub: &str, roles: &[&str], exp: u64, iss: &str) -> String {
    let mut h = Header::new(Algorithm::ES256);
    h.kid = Some(kid.to_string());
    let claims = json!({"sub": sub, "iss": iss, "aud": AUDIENCE, "exp": exp, "roles": roles});
    jsonwebtoken::encode(&h, &claims, &EncodingKey::from_ec_der(&key.der)).unwrap()
}
