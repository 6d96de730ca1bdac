//! `[auth]`: token validation ([`AuthSettings`], [`IssuerSettings`],
//! [`KNOWN_ALGORITHMS`], [`MIN_SECRET_BYTES`]).
//!
//! The top-level keys describe one issuer (the single-issuer set-up every
//! deployment started with); `[[auth.issuers]]` adds more, each with its own
//! `iss`, audience, algorithms and key source. [`AuthSettings::trusted_issuers`]
//! is the one list the edge builds its verifiers from.

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
    /// HTTPS URL of a JWKS, fetched at start-up and refreshed (see
    /// `jwks_min_refresh_secs`, `jwks_max_refresh_secs`). Default: none.
    pub jwks_url: Option<String>,
    /// PEM file with the CA certificate(s) trusted for `jwks_url` and
    /// `oidc_issuer` instead of the system's roots (a private CA). Default:
    /// none (the system's roots).
    pub jwks_ca_file: Option<String>,
    /// OpenID Connect issuer (`https://…`): the JWKS is found through
    /// `<issuer>/.well-known/openid-configuration` (its `jwks_uri`), and
    /// tokens must carry exactly this `iss`. Default: none.
    pub oidc_issuer: Option<String>,
    /// How often a JWKS file is re-read, and how often a JWKS URL is fetched
    /// when its response carries no cache lifetime, seconds. Default 60.
    pub jwks_refresh_secs: u64,
    /// Shortest time between two fetches of a JWKS URL, seconds: the lower
    /// bound of a response's cache lifetime, and at most one fetch per this
    /// interval for tokens naming an unknown `kid` (a flood of forged `kid`s
    /// cannot make Herald hammer the provider). Default 30.
    pub jwks_min_refresh_secs: u64,
    /// Longest time a fetched JWKS is kept before it is fetched again,
    /// seconds: the upper bound of a response's cache lifetime. Default 3600.
    pub jwks_max_refresh_secs: u64,
    /// How long one JWKS or discovery request may take, seconds. Default 10.
    pub jwks_fetch_timeout_secs: u64,
    /// How long start-up waits for the first key set of every JWKS URL or
    /// OIDC issuer, seconds; after that the node serves, unready
    /// (`/readyz` says `signing_keys_unavailable`) until the keys arrive.
    /// Default 10.
    pub jwks_start_wait_secs: u64,
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
    /// More trusted issuers (`[[auth.issuers]]` in the TOML file), each with
    /// its own `iss`, audience and keys. A token is verified by the issuer its
    /// `iss` names. Default: none.
    pub issuers: Vec<IssuerSettings>,
}

impl Default for AuthSettings {
    fn default() -> Self {
        AuthSettings {
            hs256_secret: None,
            algorithms: vec!["HS256".into()],
            public_key_file: None,
            jwks_file: None,
            jwks_url: None,
            jwks_ca_file: None,
            oidc_issuer: None,
            jwks_refresh_secs: 60,
            jwks_min_refresh_secs: 30,
            jwks_max_refresh_secs: 3600,
            jwks_fetch_timeout_secs: 10,
            jwks_start_wait_secs: 10,
            leeway_secs: 30,
            expiry_warning_secs: 60,
            issuer: None,
            audience: None,
            revocation_ttl_secs: 86_400,
            issuers: Vec::new(),
        }
    }
}

/// One trusted token issuer: the `iss` it signs as, the audience its tokens
/// must name, the algorithms it may use and where its keys come from.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct IssuerSettings {
    /// The `iss` this issuer's tokens carry. Required unless `oidc_issuer`
    /// is set (it is then that value). On the top-level `[auth]` it may be
    /// unset: tokens with any `iss` are then verified with its keys.
    pub issuer: Option<String>,
    /// OpenID Connect issuer whose discovery document names the JWKS; it is
    /// also the required `iss`.
    pub oidc_issuer: Option<String>,
    /// When set, tokens must carry this `aud`.
    pub audience: Option<String>,
    /// Accepted algorithms for this issuer. Default `["RS256"]` in
    /// `[[auth.issuers]]`; `auth.algorithms` for the top-level issuer.
    pub algorithms: Vec<String>,
    /// HMAC secret (≥ 32 bytes) for HS algorithms.
    pub hs256_secret: Option<Secret>,
    /// PEM public key for tokens without a `kid`.
    pub public_key_file: Option<String>,
    /// JWKS file, re-read every `auth.jwks_refresh_secs`.
    pub jwks_file: Option<String>,
    /// HTTPS URL of the JWKS.
    pub jwks_url: Option<String>,
    /// Private CA (PEM) for `jwks_url` / `oidc_issuer`.
    pub jwks_ca_file: Option<String>,
}

impl Default for IssuerSettings {
    fn default() -> Self {
        IssuerSettings {
            issuer: None,
            oidc_issuer: None,
            audience: None,
            algorithms: vec!["RS256".into()],
            hs256_secret: None,
            public_key_file: None,
            jwks_file: None,
            jwks_url: None,
            jwks_ca_file: None,
        }
    }
}

impl IssuerSettings {
    /// The `iss` tokens must carry: `issuer`, else `oidc_issuer`, else none
    /// (any `iss`).
    pub fn expected_iss(&self) -> Option<&str> {
        self.issuer.as_deref().or(self.oidc_issuer.as_deref())
    }

    /// Whether any key is configured.
    fn has_key_source(&self) -> bool {
        self.hs256_secret.is_some()
            || self.public_key_file.is_some()
            || self.jwks_file.is_some()
            || self.jwks_url.is_some()
            || self.oidc_issuer.is_some()
    }

    /// This issuer's rules; `key` names it in messages (`auth` or
    /// `auth.issuers[N]`).
    fn validate(&self, key: &str, problems: &mut Vec<String>) {
        let has_asymmetric_keys = self.public_key_file.is_some()
            || self.jwks_file.is_some()
            || self.jwks_url.is_some()
            || self.oidc_issuer.is_some();
        if self.algorithms.is_empty() {
            problems.push(format!("{key}.algorithms must list at least one algorithm"));
        }
        for algorithm in &self.algorithms {
            if !KNOWN_ALGORITHMS.contains(&algorithm.as_str()) {
                problems.push(format!(
                    "{key}.algorithms: unknown algorithm {algorithm:?} (known: {})",
                    KNOWN_ALGORITHMS.join(", ")
                ));
            } else if algorithm.starts_with("HS") && self.hs256_secret.is_none() {
                let hint = if key == "auth" {
                    " (set HERALD__AUTH__HS256_SECRET)"
                } else {
                    ""
                };
                problems.push(format!(
                    "{key}.hs256_secret is required for {algorithm}{hint}"
                ));
            } else if !algorithm.starts_with("HS") && !has_asymmetric_keys {
                problems.push(format!(
                    "{key}.algorithms lists {algorithm}, which needs {key}.public_key_file, \
                     {key}.jwks_file, {key}.jwks_url or {key}.oidc_issuer"
                ));
            }
        }
        if let Some(secret) = &self.hs256_secret {
            if secret.expose().len() < MIN_SECRET_BYTES {
                problems.push(format!(
                    "{key}.hs256_secret must be at least {MIN_SECRET_BYTES} bytes long"
                ));
            }
        }
        for (name, path) in [
            ("public_key_file", &self.public_key_file),
            ("jwks_file", &self.jwks_file),
            ("jwks_ca_file", &self.jwks_ca_file),
        ] {
            if let Some(path) = path {
                if !Path::new(path).is_file() {
                    problems.push(format!("{key}.{name}: {path:?} is not a readable file"));
                }
            }
        }
        for (name, url) in [
            ("jwks_url", &self.jwks_url),
            ("oidc_issuer", &self.oidc_issuer),
        ] {
            if let Some(url) = url {
                if !is_https_url(url) {
                    problems.push(format!(
                        "{key}.{name}: {url:?} is not an https:// URL (keys are only fetched over HTTPS)"
                    ));
                }
            }
        }
        let jwks_sources = [&self.jwks_file, &self.jwks_url, &self.oidc_issuer]
            .iter()
            .filter(|source| source.is_some())
            .count();
        if jwks_sources > 1 {
            problems.push(format!(
                "{key}: set at most one of jwks_file, jwks_url and oidc_issuer"
            ));
        }
        if (self.jwks_url.is_some() || self.oidc_issuer.is_some())
            && self
                .algorithms
                .iter()
                .all(|algorithm| algorithm.starts_with("HS"))
        {
            problems.push(format!(
                "{key}.algorithms lists no algorithm for keys from {key}.jwks_url or {key}.oidc_issuer (add e.g. RS256)"
            ));
        }
        if self.jwks_ca_file.is_some() && self.jwks_url.is_none() && self.oidc_issuer.is_none() {
            problems.push(format!(
                "{key}.jwks_ca_file is only used with {key}.jwks_url or {key}.oidc_issuer"
            ));
        }
        if let (Some(issuer), Some(oidc)) = (&self.issuer, &self.oidc_issuer) {
            if issuer != oidc {
                problems.push(format!(
                    "{key}.issuer {issuer:?} differs from {key}.oidc_issuer {oidc:?}, which tokens must carry as iss"
                ));
            }
        }
    }
}

/// Whether `url` is `https://` followed by a host.
fn is_https_url(url: &str) -> bool {
    url.strip_prefix("https://").is_some_and(|rest| {
        !rest.is_empty()
            && !rest.starts_with('/')
            && !rest.chars().any(|c| c.is_whitespace() || c.is_control())
    })
}

/// The token algorithms Herald can verify.
pub const KNOWN_ALGORITHMS: [&str; 12] = [
    "HS256", "HS384", "HS512", "RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256",
    "ES384", "EdDSA",
];

impl AuthSettings {
    /// The top-level keys as an issuer (its algorithms are `auth.algorithms`,
    /// its `iss` `auth.issuer` or `auth.oidc_issuer`).
    fn top_level_issuer(&self) -> IssuerSettings {
        IssuerSettings {
            issuer: self.issuer.clone(),
            oidc_issuer: self.oidc_issuer.clone(),
            audience: self.audience.clone(),
            algorithms: self.algorithms.clone(),
            hs256_secret: self.hs256_secret.clone(),
            public_key_file: self.public_key_file.clone(),
            jwks_file: self.jwks_file.clone(),
            jwks_url: self.jwks_url.clone(),
            jwks_ca_file: self.jwks_ca_file.clone(),
        }
    }

    /// Every issuer whose tokens this node accepts: the top-level one (when
    /// it has a key, or when there is no other) first, then
    /// `[[auth.issuers]]` in order.
    ///
    /// A top-level `oidc_issuer` next to an `hs256_secret` is two issuers:
    /// the identity provider (its `iss` required, the asymmetric algorithms)
    /// and the backend's shared secret (the HS algorithms, any `iss`), so
    /// "HS256 for your backend, RS256 from your IdP" keeps working, and an
    /// HS token claiming the provider's `iss` is refused.
    pub fn trusted_issuers(&self) -> Vec<IssuerSettings> {
        let top = self.top_level_issuer();
        let mut trusted = Vec::new();
        if top.oidc_issuer.is_some() && top.hs256_secret.is_some() {
            let (hmac, asymmetric): (Vec<String>, Vec<String>) = top
                .algorithms
                .iter()
                .cloned()
                .partition(|algorithm| algorithm.starts_with("HS"));
            trusted.push(IssuerSettings {
                hs256_secret: None,
                algorithms: asymmetric,
                ..top.clone()
            });
            if hmac.is_empty() {
                // The secret signs nothing this node accepts.
                trusted.extend(self.issuers.iter().cloned());
                return trusted;
            }
            trusted.push(IssuerSettings {
                issuer: None,
                oidc_issuer: None,
                audience: top.audience.clone(),
                algorithms: hmac,
                hs256_secret: top.hs256_secret.clone(),
                public_key_file: None,
                jwks_file: None,
                jwks_url: None,
                jwks_ca_file: None,
            });
        } else if top.has_key_source() || self.issuers.is_empty() {
            trusted.push(top);
        }
        trusted.extend(self.issuers.iter().cloned());
        trusted
    }

    /// How many of [`AuthSettings::trusted_issuers`] come from the top-level
    /// keys (0, 1 or 2); the rest are `[[auth.issuers]]`.
    pub fn top_level_issuer_count(&self) -> usize {
        self.trusted_issuers().len() - self.issuers.len()
    }

    /// Every issuer's rules, and the timing knobs.
    pub(crate) fn validate(&self, problems: &mut Vec<String>) {
        let top = self.top_level_issuer();
        if top.has_key_source() || self.issuers.is_empty() {
            top.validate("auth", problems);
        }
        if self.issuer.is_some()
            && self.oidc_issuer.is_some()
            && self.hs256_secret.is_some()
            && self
                .algorithms
                .iter()
                .any(|algorithm| algorithm.starts_with("HS"))
        {
            problems.push(
                "auth.issuer: leave it unset beside auth.oidc_issuer and auth.hs256_secret: the \
                 provider's iss is auth.oidc_issuer, and the secret verifies tokens of any other \
                 iss (an HS token claiming the provider's iss is refused)"
                    .into(),
            );
        }
        let mut seen = Vec::new();
        if top.has_key_source() {
            seen.push(top.expected_iss().map(str::to_owned));
        }
        for (index, issuer) in self.issuers.iter().enumerate() {
            let key = format!("auth.issuers[{index}]");
            issuer.validate(&key, problems);
            match issuer.expected_iss() {
                None => problems.push(format!(
                    "{key}: set issuer (the iss its tokens carry) or oidc_issuer"
                )),
                Some(iss) if seen.contains(&Some(iss.to_owned())) => problems.push(format!(
                    "{key}: issuer {iss:?} is configured twice; a token's iss must name one issuer"
                )),
                Some(_) => {}
            }
            if !issuer.has_key_source() {
                problems.push(format!(
                    "{key}: set a key source (jwks_url, oidc_issuer, jwks_file, public_key_file or hs256_secret)"
                ));
            }
            seen.push(issuer.expected_iss().map(str::to_owned));
        }
        for (key, value) in [
            ("auth.jwks_refresh_secs", self.jwks_refresh_secs),
            ("auth.jwks_min_refresh_secs", self.jwks_min_refresh_secs),
            ("auth.jwks_fetch_timeout_secs", self.jwks_fetch_timeout_secs),
        ] {
            if value == 0 {
                problems.push(format!("{key} must be greater than 0"));
            }
        }
        if self.jwks_max_refresh_secs < self.jwks_min_refresh_secs {
            problems.push(
                "auth.jwks_max_refresh_secs must be at least auth.jwks_min_refresh_secs".into(),
            );
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

#[cfg(test)]
mod tests {
    use crate::Settings;
    use crate::load::testing::{SECRET, load};

    #[test]
    fn a_jwks_url_or_an_oidc_issuer_must_be_https() {
        let err = load(&[
            ("HERALD__AUTH__ALGORITHMS", "RS256"),
            ("HERALD__AUTH__JWKS_URL", "http://idp.example.com/jwks"),
        ])
        .expect_err("invalid");
        assert!(err.to_string().contains("auth.jwks_url"), "{err}");
        assert!(err.to_string().contains("https://"), "{err}");
        let settings = load(&[
            ("HERALD__AUTH__ALGORITHMS", "RS256"),
            (
                "HERALD__AUTH__OIDC_ISSUER",
                "https://idp.example.com/realms/herald",
            ),
        ])
        .expect("valid");
        let issuers = settings.auth.trusted_issuers();
        assert_eq!(issuers.len(), 1);
        assert_eq!(
            issuers[0].expected_iss(),
            Some("https://idp.example.com/realms/herald"),
            "discovery also requires the iss"
        );
    }

    #[test]
    fn a_top_level_oidc_issuer_beside_a_secret_is_the_provider_plus_the_backend_secret() {
        let settings = load(&[
            ("HERALD__AUTH__HS256_SECRET", SECRET),
            ("HERALD__AUTH__ALGORITHMS", "HS256,RS256"),
            (
                "HERALD__AUTH__OIDC_ISSUER",
                "https://sso.example.com/realms/herald",
            ),
            ("HERALD__AUTH__AUDIENCE", "herald"),
        ])
        .expect("valid");
        let issuers = settings.auth.trusted_issuers();
        assert_eq!(issuers.len(), 2);
        assert_eq!(settings.auth.top_level_issuer_count(), 2);
        assert_eq!(
            issuers[0].expected_iss(),
            Some("https://sso.example.com/realms/herald")
        );
        assert_eq!(issuers[0].algorithms, ["RS256"]);
        assert!(issuers[0].hs256_secret.is_none());
        assert_eq!(issuers[1].expected_iss(), None, "backend tokens: any iss");
        assert_eq!(issuers[1].algorithms, ["HS256"]);
        assert_eq!(issuers[1].audience.as_deref(), Some("herald"));

        let err = load(&[
            ("HERALD__AUTH__HS256_SECRET", SECRET),
            (
                "HERALD__AUTH__OIDC_ISSUER",
                "https://sso.example.com/realms/herald",
            ),
        ])
        .expect_err("HS256 alone cannot use the provider's keys");
        assert!(err.to_string().contains("add e.g. RS256"), "{err}");
        let err = load(&[
            ("HERALD__AUTH__HS256_SECRET", SECRET),
            ("HERALD__AUTH__ALGORITHMS", "HS256,RS256"),
            (
                "HERALD__AUTH__OIDC_ISSUER",
                "https://sso.example.com/realms/herald",
            ),
            (
                "HERALD__AUTH__ISSUER",
                "https://sso.example.com/realms/herald",
            ),
        ])
        .expect_err("backend tokens could not carry the required iss");
        assert!(
            err.to_string().contains("auth.issuer: leave it unset"),
            "{err}"
        );
    }

    #[test]
    fn an_oidc_issuer_that_differs_from_the_issuer_and_two_jwks_sources_are_refused() {
        let err = load(&[
            ("HERALD__AUTH__ALGORITHMS", "RS256"),
            ("HERALD__AUTH__OIDC_ISSUER", "https://a.example.com/"),
            ("HERALD__AUTH__ISSUER", "https://b.example.com/"),
            ("HERALD__AUTH__JWKS_URL", "https://a.example.com/jwks"),
            ("HERALD__AUTH__JWKS_MAX_REFRESH_SECS", "5"),
        ])
        .expect_err("invalid");
        let message = err.to_string();
        for needle in [
            "differs from auth.oidc_issuer",
            "at most one of jwks_file, jwks_url and oidc_issuer",
            "auth.jwks_max_refresh_secs must be at least",
        ] {
            assert!(message.contains(needle), "{needle} not in: {message}");
        }
    }

    #[test]
    fn several_issuers_come_from_the_file_each_checked_under_its_own_name() {
        let dir = std::env::temp_dir().join(format!("herald-issuers-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let path = dir.join("herald.toml");
        std::fs::write(
            &path,
            format!(
                "[auth]\nhs256_secret = \"{SECRET}\"\n\
                 [[auth.issuers]]\noidc_issuer = \"https://tenant-a.example.com/\"\naudience = \"herald\"\n\
                 [[auth.issuers]]\nissuer = \"https://tenant-b.example.com\"\njwks_url = \"https://tenant-b.example.com/keys\"\nalgorithms = [\"ES256\"]\n"
            ),
        )
        .expect("write");
        let settings = Settings::load_from(Some(&path), None).expect("valid");
        let issuers = settings.auth.trusted_issuers();
        assert_eq!(issuers.len(), 3, "the top-level secret is an issuer too");
        assert_eq!(issuers[0].expected_iss(), None);
        assert_eq!(
            issuers[1].expected_iss(),
            Some("https://tenant-a.example.com/")
        );
        assert_eq!(issuers[1].algorithms, ["RS256"], "the default for an entry");
        assert_eq!(issuers[2].algorithms, ["ES256"]);

        std::fs::write(
            &path,
            "[[auth.issuers]]\njwks_url = \"https://tenant-b.example.com/keys\"\n\
             [[auth.issuers]]\noidc_issuer = \"https://a.example.com/\"\n\
             [[auth.issuers]]\nissuer = \"https://a.example.com/\"\nalgorithms = [\"HS256\"]\n",
        )
        .expect("write");
        let err = Settings::load_from(Some(&path), None).expect_err("invalid");
        let message = err.to_string();
        for needle in [
            "auth.issuers[0]: set issuer",
            "auth.issuers[2]: issuer \"https://a.example.com/\" is configured twice",
            "auth.issuers[2].hs256_secret is required for HS256",
            "auth.issuers[2]: set a key source",
        ] {
            assert!(message.contains(needle), "{needle} not in: {message}");
        }
        assert!(
            !message.contains("auth.hs256_secret is required"),
            "without top-level keys, only the issuers are checked: {message}"
        );
        let _ = std::fs::remove_dir_all(dir);
    }
}
