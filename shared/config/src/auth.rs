//! `[auth]`: token validation ([`AuthSettings`], [`KNOWN_ALGORITHMS`],
//! [`MIN_SECRET_BYTES`]).

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::Secret;

/// Token validation.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthSettings {
    /// Shared HMAC secret, for the HS256/HS384/HS512 algorithms in
    /// `algorithms`; at least 32 bytes. Required unless a public key or a JWKS
    /// is configured.
    pub hs256_secret: Option<Secret>,
    /// Accepted token algorithms (the allowlist; anything else, `none`
    /// included, is refused): any of HS256, HS384, HS512, RS256, RS384, RS512,
    /// PS256, PS384, PS512, ES256, ES384, EdDSA. Comma-separated in the
    /// environment. Default `["HS256"]`.
    pub algorithms: Vec<String>,
    /// PEM file with the public key (RSA, EC P-256/P-384 or Ed25519) that
    /// verifies tokens without a `kid`. Default: none.
    pub public_key_file: Option<String>,
    /// JWKS file (`{"keys": [...]}`) with public keys selected by the token's
    /// `kid`; re-read every `jwks_refresh_secs` so keys can rotate. Default: none.
    pub jwks_file: Option<String>,
    /// How often the JWKS file is re-read, seconds. Default 60.
    pub jwks_refresh_secs: u64,
    /// Clock skew tolerated on `exp` and `nbf`, seconds. Default 30.
    pub leeway_secs: u64,
    /// How long before a stream's token expires the stream receives a
    /// `herald.token-expiring` event, seconds; at expiry the stream ends.
    /// Default 60.
    pub expiry_warning_secs: u64,
    /// When set, tokens must carry this `iss`.
    pub issuer: Option<String>,
    /// When set, tokens must carry this `aud`.
    pub audience: Option<String>,
    /// How long a revocation (`POST /v1/disconnect` with `"revoke": true`)
    /// lasts, seconds: the user's tokens issued before it are refused for
    /// this long, then the entry expires. Set it to at least the longest
    /// lifetime of the subscriber tokens you issue plus `leeway_secs`, or an
    /// old token outliving the entry would be accepted again. Default 86400.
    pub revocation_ttl_secs: u64,
}

impl Default for AuthSettings {
    fn default() -> Self {
        AuthSettings {
            hs256_secret: None,
            algorithms: vec!["HS256".into()],
            public_key_file: None,
            jwks_file: None,
            jwks_refresh_secs: 60,
            leeway_secs: 30,
            expiry_warning_secs: 60,
            issuer: None,
            audience: None,
            revocation_ttl_secs: 86_400,
        }
    }
}

/// The token algorithms Herald can verify.
pub const KNOWN_ALGORITHMS: [&str; 12] = [
    "HS256", "HS384", "HS512", "RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256",
    "ES384", "EdDSA",
];

impl AuthSettings {
    /// The algorithm allowlist against the configured keys, the secret length
    /// and the key files.
    pub(crate) fn validate(&self, problems: &mut Vec<String>) {
        let has_asymmetric_keys = self.public_key_file.is_some() || self.jwks_file.is_some();
        if self.algorithms.is_empty() {
            problems.push("auth.algorithms must list at least one algorithm".into());
        }
        for algorithm in &self.algorithms {
            if !KNOWN_ALGORITHMS.contains(&algorithm.as_str()) {
                problems.push(format!(
                    "auth.algorithms: unknown algorithm {algorithm:?} (known: {})",
                    KNOWN_ALGORITHMS.join(", ")
                ));
            } else if algorithm.starts_with("HS") && self.hs256_secret.is_none() {
                problems.push(format!(
                    "auth.hs256_secret is required for {algorithm} (set HERALD__AUTH__HS256_SECRET)"
                ));
            } else if !algorithm.starts_with("HS") && !has_asymmetric_keys {
                problems.push(format!(
                    "auth.algorithms lists {algorithm}, which needs auth.public_key_file or auth.jwks_file"
                ));
            }
        }
        if let Some(secret) = &self.hs256_secret {
            if secret.expose().len() < MIN_SECRET_BYTES {
                problems.push(format!(
                    "auth.hs256_secret must be at least {MIN_SECRET_BYTES} bytes long"
                ));
            }
        }
        for (key, path) in [
            ("auth.public_key_file", &self.public_key_file),
            ("auth.jwks_file", &self.jwks_file),
        ] {
            if let Some(path) = path {
                if !Path::new(path).is_file() {
                    problems.push(format!("{key}: {path:?} is not a readable file"));
                }
            }
        }
        if self.jwks_refresh_secs == 0 {
            problems.push("auth.jwks_refresh_secs must be greater than 0".into());
        }
        if self.revocation_ttl_secs == 0 {
            problems.push(
                "auth.revocation_ttl_secs must be greater than 0 (a revocation must outlive the tokens it refuses)"
                    .into(),
            );
        }
    }
}

/// Shortest accepted HS256 secret, bytes (the HMAC-SHA256 output size).
pub const MIN_SECRET_BYTES: usize = 32;
