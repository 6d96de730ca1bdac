//! Tokens: who may open which stream and who may publish where.
//!
//! Herald reads JWTs from one or more trusted issuers ([`Authenticator`]):
//! the top-level `[auth]` keys and each `[[auth.issuers]]`. With several, the
//! token's `iss` (read unverified, only to choose) picks the issuer, and the
//! token is then fully verified with that issuer's keys, audience and
//! algorithms; a token whose `iss` names no trusted issuer is refused.
//!
//! Per issuer (`issuer.rs`), the accepted algorithms are an explicit allowlist:
//! a token whose header names any other algorithm, `none` included, is
//! refused before a signature is looked at. The key is chosen by the
//! algorithm's family, never by the token alone:
//! - HMAC (HS256/384/512): the shared secret `hs256_secret`;
//! - RSA, ECDSA, EdDSA: the key whose `kid` the token names in the issuer's
//!   key set (`key_set.rs`: a JWKS file, a JWKS URL or an OpenID Connect
//!   issuer's discovered JWKS, fetched over HTTPS by `provider.rs`), or, for
//!   a token without `kid`, the PEM key in `public_key_file`. An unknown `kid`
//!   makes the key set refresh (rate-limited) before the token is refused.
//!   Symmetric keys in a JWKS are ignored, so a public key can never be used
//!   as an HMAC secret (key confusion).
//!
//! `exp` is required; `exp` and `nbf` are checked with `auth.leeway_secs` of
//! tolerance; `iss` and `aud` are checked when configured.
//!
//! Two kinds of token, never interchangeable:
//! - a **subscriber** token: `sub` is the user id; an optional `topics` claim
//!   lists the topics it may follow ([`Grant`] patterns);
//! - a **publisher** credential: the `herald_publish` claim is `true` (any
//!   target) or a list of target patterns (`user:<id>`, `topic:<name>`).
//!   A token with `herald_publish` cannot open a stream, and a token without it
//!   cannot publish.

mod issuer;
mod key_set;
mod provider;
mod verified;

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use herald_config::AuthSettings;
use herald_protocol::{Target, TargetKind};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde::{Deserialize, Serialize};

use self::issuer::Issuer;
pub(crate) use self::key_set::KeySet;
use self::key_set::Trigger;
use self::verified::VerifiedPublishers;
use crate::metrics::Metrics;

/// The claims Herald reads and writes.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Claims {
    /// The user id (subscriber tokens).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sub: Option<String>,
    /// Expiry, seconds since the Unix epoch.
    pub exp: u64,
    /// Issued at, seconds since the Unix epoch: a revocation refuses the
    /// user's tokens issued at or before it (docs/security.md).
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "numeric_date"
    )]
    pub iat: Option<u64>,
    /// Not valid before, seconds since the Unix epoch; stands in for `iat`
    /// when a token has none.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "numeric_date"
    )]
    pub nbf: Option<u64>,
    /// Topics (or patterns) a subscriber may follow.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub topics: Vec<String>,
    /// Present only on publisher credentials.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub herald_publish: Option<PublishClaim>,
    /// Issuer, when the deployment checks it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iss: Option<String>,
    /// Audience, when the deployment checks it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aud: Option<String>,
}

/// An optional NumericDate claim read leniently: RFC 7519 allows fractions
/// (floored here), and a value that is not a number reads as absent, so a
/// token Herald accepted before it read `iat` is still accepted.
fn numeric_date<'de, D: serde::Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<u64>, D::Error> {
    let value = serde_json::Value::deserialize(deserializer)?;
    Ok(value
        .as_u64()
        .or_else(|| value.as_f64().filter(|f| *f >= 0.0).map(|f| f as u64)))
}

/// The `herald_publish` claim: everything, or a list of target patterns.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(untagged)]
pub enum PublishClaim {
    /// `true`: any target; `false`: nothing.
    All(bool),
    /// Target patterns such as `user:alice`, `topic:news-*`.
    Targets(Vec<String>),
}

/// A name pattern from a token: an exact name, `prefix*`, or `*` for any name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Grant(String);

impl Grant {
    /// Whether `name` is covered by this grant.
    pub(crate) fn allows(&self, name: &str) -> bool {
        match self.0.strip_suffix('*') {
            Some(prefix) => name.starts_with(prefix),
            None => self.0 == name,
        }
    }
}

/// An authenticated subscriber.
#[derive(Debug, Clone)]
pub(crate) struct Subscriber {
    /// The user whose stream this is.
    pub(crate) user: Target,
    /// Topic grants from the token.
    pub(crate) topics: Vec<Grant>,
    /// When the token expires.
    pub(crate) expires_at: SystemTime,
    /// When the token was issued (`iat`, else `nbf`), seconds since the Unix
    /// epoch; `None` when it carries neither, and then no revocation can be
    /// shown to come before it.
    pub(crate) issued_at: Option<u64>,
}

impl Subscriber {
    /// Whether the token lets this subscriber follow `topic`.
    pub(crate) fn may_follow(&self, topic: &str) -> bool {
        self.topics.iter().any(|grant| grant.allows(topic))
    }
}

/// Who a publisher credential speaks for: rate limits and `msg_id`
/// deduplication are kept per publisher id.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) enum PublisherId {
    /// The token's `sub`: every token issued for that name is one publisher.
    Subject(String),
    /// A token without `sub` is its own publisher, named by the hex SHA-256 of
    /// the token (never the token itself: the digest cannot be turned back
    /// into a credential).
    Token(String),
}

impl PublisherId {
    /// The id of a token with the given `sub` claim.
    fn of(sub: Option<String>, token: &str) -> Self {
        match sub {
            Some(sub) => PublisherId::Subject(sub),
            None => PublisherId::Token(sha256_hex(token.as_bytes())),
        }
    }
}

impl std::fmt::Display for PublisherId {
    /// `sub:<sub>` or `token:<first 16 hex digits of the digest>`: the two
    /// kinds never render alike.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PublisherId::Subject(sub) => write!(f, "sub:{sub}"),
            PublisherId::Token(digest) => write!(f, "token:{}", digest.get(..16).unwrap_or(digest)),
        }
    }
}

/// Lower-case hex of the SHA-256 of `bytes` (64 characters).
pub(crate) fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    lower_hex(&Sha256::digest(bytes))
}

/// Lower-case hex of `bytes`, two digits a byte. A table instead of
/// `write!("{:02x}")`: that went through the formatter once a byte, and a
/// publish with a `msg_id` hashes one key (64 digits) per request.
pub(crate) fn lower_hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut hex = String::with_capacity(bytes.len() * 2);
    for &byte in bytes {
        hex.push(char::from(DIGITS[usize::from(byte >> 4)]));
        hex.push(char::from(DIGITS[usize::from(byte & 0x0f)]));
    }
    hex
}

/// An authenticated publisher.
#[derive(Debug, Clone)]
pub(crate) struct Publisher {
    /// Who publishes (see [`PublisherId`]).
    pub(crate) id: PublisherId,
    grants: Option<Vec<(TargetKind, Grant)>>,
    /// `id` as text, the key of its rate limit (made once per credential).
    rate_key: String,
}

impl Publisher {
    /// The key its publish rate is kept under: its id as text.
    pub(crate) fn rate_key(&self) -> &str {
        &self.rate_key
    }

    /// Whether this credential may publish to `target`.
    pub(crate) fn may_publish(&self, target: &Target) -> bool {
        match &self.grants {
            None => true,
            Some(grants) => grants
                .iter()
                .any(|(kind, grant)| *kind == target.kind() && grant.allows(target.name())),
        }
    }
}

/// Why a token was refused. Nothing is changed by a refusal. Messages never
/// contain the token or the secret.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum AuthError {
    /// No token in the header, query or cookie.
    #[error(
        "no token: send Authorization: Bearer <jwt>, ?access_token=<jwt> or the herald_token cookie"
    )]
    Missing,
    /// The token expired (beyond the leeway).
    #[error("token expired")]
    Expired,
    /// The token is not valid (signature, algorithm, format, nbf, iss, aud...).
    #[error("invalid token: {0}")]
    Invalid(&'static str),
    /// A publisher credential (any `herald_publish` claim, even `false`) was
    /// used to open a stream.
    #[error("a token with a herald_publish claim cannot open a stream")]
    PublisherOnStream,
    /// A token without `herald_publish` was used to publish.
    #[error("this token has no herald_publish claim and cannot publish")]
    NotAPublisher,
    /// The subscriber token's `sub` is missing or not a valid user id.
    #[error("token subject is missing or not a valid user id")]
    BadSubject,
    /// The token names a `kid` its issuer does not have (even after a
    /// refresh, or a refresh was made too recently to make another).
    #[error("invalid token: unknown key id")]
    UnknownKey,
    /// The issuer's signing keys have not been loaded yet (its provider was
    /// unreachable since start-up): the token cannot be checked now.
    #[error("the signing keys of this token's issuer are not loaded yet; retry shortly")]
    KeysUnavailable,
}

impl AuthError {
    /// Whether this is "who are you" (401) rather than "not allowed" (403).
    pub(crate) fn is_unauthenticated(&self) -> bool {
        matches!(
            self,
            AuthError::Missing
                | AuthError::Expired
                | AuthError::Invalid(_)
                | AuthError::BadSubject
                | AuthError::UnknownKey
        )
    }
}

/// Why the configured keys could not be loaded. Nothing was changed.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// A key file could not be read.
    #[error("{key}: cannot read {path:?}: {source}")]
    Read {
        /// The setting naming the file.
        key: String,
        /// The file.
        path: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// A key file's content (or a URL) is not usable.
    #[error("{key}: {path:?} is not a valid {what}")]
    Invalid {
        /// The setting naming the file or URL.
        key: String,
        /// The file or URL.
        path: String,
        /// What was expected.
        what: &'static str,
    },
    /// A CA file is not PEM.
    #[error("{key}: {path:?} is not a readable PEM file: {source}")]
    Pem {
        /// The setting naming the file.
        key: String,
        /// The file.
        path: String,
        /// The PEM error.
        #[source]
        source: rustls_pki_types::pem::Error,
    },
    /// TLS for fetching keys could not be set up.
    #[error("{key}: TLS set-up failed: {source}")]
    Tls {
        /// The setting naming the provider.
        key: String,
        /// rustls' error.
        #[source]
        source: rustls::Error,
    },
    /// No key can verify tokens.
    #[error(
        "no key configured: set auth.hs256_secret, auth.public_key_file, auth.jwks_file, \
         auth.jwks_url or auth.oidc_issuer"
    )]
    NoKey,
}

/// Why an issuer's signing keys are not there yet, for `/readyz`.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct MissingKeys {
    /// The issuer (or `default` for a top-level issuer without `iss`).
    pub(crate) issuer: String,
    /// Why the last load failed (the error and its causes), if one was tried.
    pub(crate) error: Option<String>,
}

/// Validates tokens with the configured issuers' keys and rules.
#[derive(Debug)]
pub(crate) struct Authenticator {
    issuers: Vec<Issuer>,
    leeway: u64,
    /// Publisher credentials of fixed-key issuers already verified.
    verified_publishers: VerifiedPublishers,
}

impl Authenticator {
    /// An authenticator for `settings`, reading any key files now; keys from
    /// providers load with [`Authenticator::wait_for_keys`] and stay fresh
    /// with [`KeySet::keep_fresh`] on each of [`Authenticator::key_sets`].
    pub(crate) fn new(settings: &AuthSettings, metrics: &Arc<Metrics>) -> Result<Self, KeyError> {
        let top_level = settings.top_level_issuer_count();
        let issuers = settings
            .trusted_issuers()
            .iter()
            .enumerate()
            .map(|(index, issuer)| {
                let key = match index.checked_sub(top_level) {
                    None => "auth".to_owned(),
                    Some(n) => format!("auth.issuers[{n}]"),
                };
                Issuer::new(issuer, &key, settings, metrics)
            })
            .collect::<Result<Vec<_>, _>>()?;
        if !issuers.iter().any(Issuer::has_keys) {
            return Err(KeyError::NoKey);
        }
        Ok(Authenticator {
            issuers,
            leeway: settings.leeway_secs,
            verified_publishers: VerifiedPublishers::default(),
        })
    }

    /// Every key set, to keep fresh.
    pub(crate) fn key_sets(&self) -> impl Iterator<Item = &Arc<KeySet>> {
        self.issuers.iter().filter_map(Issuer::key_set)
    }

    /// Waits up to `within` for every provider's first key set (start-up);
    /// those still missing keep being fetched by their refresh task.
    pub(crate) async fn wait_for_keys(&self, within: Duration) {
        let waits = self
            .key_sets()
            .filter(|keys| keys.is_remote())
            .map(|keys| keys.wait_loaded(within));
        futures_util::future::join_all(waits).await;
    }

    /// Whether every key set has loaded (the node may be ready).
    pub(crate) fn has_all_keys(&self) -> bool {
        self.key_sets().all(|keys| keys.is_loaded())
    }

    /// The issuers whose keys have never loaded (the node is not ready).
    pub(crate) fn missing_keys(&self) -> Vec<MissingKeys> {
        self.key_sets()
            .filter(|keys| !keys.is_loaded())
            .map(|keys| MissingKeys {
                issuer: keys.issuer().to_owned(),
                error: keys
                    .last_error()
                    .map(|err| key_set::ErrorChain(&*err).to_string()),
            })
            .collect()
    }

    /// The issuer that verifies `token`: the one whose `iss` the token claims
    /// (read unverified, only to choose), else the one that accepts any
    /// `iss`, if configured.
    ///
    /// A token that names no trusted issuer and whose algorithm the any-`iss`
    /// issuer does not accept is refused as from the wrong issuer: that is
    /// what is wrong with it.
    fn issuer_for(&self, token: &str, algorithm: Algorithm) -> Result<&Issuer, AuthError> {
        if let [only] = self.issuers.as_slice() {
            // Named before the signature is checked: a token of another
            // issuer (even one reusing a kid) is refused for what it is. An
            // issuer accepting any `iss` needs no peek at the payload.
            return match only.iss() {
                Some(iss) if unverified_issuer(token).as_deref() != Some(iss) => {
                    Err(AuthError::Invalid("wrong issuer"))
                }
                _ => Ok(only),
            };
        }
        let claimed = unverified_issuer(token);
        if let Some(named) = self
            .issuers
            .iter()
            .find(|issuer| issuer.iss().is_some() && issuer.iss() == claimed.as_deref())
        {
            return Ok(named);
        }
        self.issuers
            .iter()
            .find(|issuer| issuer.iss().is_none() && issuer.accepts(algorithm))
            .ok_or(AuthError::Invalid("wrong issuer"))
    }

    async fn claims(&self, token: &str) -> Result<Claims, AuthError> {
        self.verified_claims(token).await.map(|(claims, _)| claims)
    }

    /// The claims of `token`, fully verified, and the issuer that verified it.
    async fn verified_claims(&self, token: &str) -> Result<(Claims, &Issuer), AuthError> {
        let header = jsonwebtoken::decode_header(token)
            .map_err(|_| AuthError::Invalid("malformed token"))?;
        let issuer = self.issuer_for(token, header.alg)?;
        let verified = match issuer.verify(token, &header, self.leeway) {
            Err(AuthError::UnknownKey) => {
                let Some(keys) = issuer.key_set() else {
                    return Err(AuthError::UnknownKey);
                };
                // The issuer may have rotated its keys: fetch them (at most
                // once per auth.jwks_min_refresh_secs) and look again.
                let _ = keys.refresh(Trigger::UnknownKid).await;
                issuer.verify(token, &header, self.leeway)
            }
            verified => verified,
        };
        verified.map(|claims| (claims, issuer))
    }

    /// Validates a subscriber token.
    pub(crate) async fn subscriber(&self, token: &str) -> Result<Subscriber, AuthError> {
        let claims = self.claims(token).await?;
        // Any `herald_publish` claim, even `false`, marks a publisher
        // credential (docs/api.md): a stream needs a token without the claim,
        // so a credential minted for a service never doubles as a user's.
        if claims.herald_publish.is_some() {
            return Err(AuthError::PublisherOnStream);
        }
        let user = claims
            .sub
            .and_then(|sub| Target::user(sub).ok())
            .ok_or(AuthError::BadSubject)?;
        Ok(Subscriber {
            user,
            topics: claims.topics.into_iter().map(Grant).collect(),
            expires_at: UNIX_EPOCH + Duration::from_secs(claims.exp),
            issued_at: claims.iat.or(claims.nbf),
        })
    }

    /// Validates a publisher credential: fully the first time, then from
    /// what that check found while the token is unexpired, when its issuer's
    /// keys cannot change (see `verified.rs`).
    pub(crate) async fn publisher(&self, token: &str) -> Result<Arc<Publisher>, AuthError> {
        let now = now_secs();
        if let Some(publisher) = self.verified_publishers.get(token, now, self.leeway) {
            return Ok(publisher);
        }
        let (claims, issuer) = self.verified_claims(token).await?;
        let exp = claims.exp;
        let publisher = Arc::new(publisher_of(claims, token)?);
        if issuer.key_set().is_none() {
            self.verified_publishers
                .insert(token, exp, &publisher, now, self.leeway);
        }
        Ok(publisher)
    }
}

/// The publisher a verified credential's `claims` describe.
fn publisher_of(claims: Claims, token: &str) -> Result<Publisher, AuthError> {
    let grants = match claims.herald_publish {
        None | Some(PublishClaim::All(false)) => return Err(AuthError::NotAPublisher),
        Some(PublishClaim::All(true)) => None,
        Some(PublishClaim::Targets(patterns)) => Some(
            patterns
                .into_iter()
                .filter_map(|pattern| {
                    let (kind, name) = pattern.split_once(':')?;
                    let kind = match kind {
                        "user" => TargetKind::User,
                        "topic" => TargetKind::Topic,
                        _ => return None,
                    };
                    Some((kind, Grant(name.to_owned())))
                })
                .collect(),
        ),
    };
    let id = PublisherId::of(claims.sub, token);
    Ok(Publisher {
        rate_key: id.to_string(),
        id,
        grants,
    })
}

/// The `iss` a token claims, read without verifying anything: used only to
/// choose which issuer verifies it.
fn unverified_issuer(token: &str) -> Option<String> {
    use base64::Engine;
    #[derive(Deserialize)]
    struct Peek {
        iss: Option<String>,
    }
    let payload = token.split('.').nth(1)?;
    let json = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload)
        .ok()?;
    serde_json::from_slice::<Peek>(&json).ok()?.iss
}

/// Reads the key files `settings` names, as a starting node does, and lets
/// them go (`herald-edge check-config`): validation only checks that the
/// files exist, this checks that they hold keys. Nothing is fetched from an
/// identity provider.
pub fn check_keys(settings: &AuthSettings) -> Result<(), KeyError> {
    Authenticator::new(settings, &Arc::new(Metrics::default())).map(drop)
}

/// Signs `claims` with an HS256 `secret` (the `token` subcommand and tests).
pub fn mint(secret: &str, claims: &Claims) -> Result<String, jsonwebtoken::errors::Error> {
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )
}

/// Seconds since the Unix epoch now (the `iat` of a token minted now).
pub fn now_secs() -> u64 {
    expiry_in(Duration::ZERO)
}

/// Seconds since the Unix epoch, `ttl` from now.
pub fn expiry_in(ttl: Duration) -> u64 {
    (SystemTime::now() + ttl)
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;
    use herald_config::{IssuerSettings, Secret};
    use jsonwebtoken::jwk::JwkSet;

    const SECRET: &str = "0123456789abcdef0123456789abcdef";

    #[test]
    fn sha256_hex_is_the_lower_case_hex_of_the_digest() {
        // FIPS 180-2's test vector for "abc".
        assert_eq!(
            sha256_hex(b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(lower_hex(&[0x00, 0x0f, 0xa0, 0xff]), "000fa0ff");
        assert_eq!(lower_hex(&[]), "");
    }

    fn authenticator() -> Authenticator {
        Authenticator::new(
            &AuthSettings {
                hs256_secret: Some(Secret::new(SECRET)),
                ..Default::default()
            },
            &Arc::new(Metrics::default()),
        )
        .expect("a secret is a valid key")
    }

    fn subscriber_claims(user: &str) -> Claims {
        Claims {
            sub: Some(user.into()),
            exp: expiry_in(Duration::from_secs(60)),
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn a_valid_subscriber_token_names_its_user_and_topics() {
        let mut claims = subscriber_claims("alice");
        claims.topics = vec!["news".into(), "prices-*".into()];
        let token = mint(SECRET, &claims).expect("signed");
        let subscriber = authenticator().subscriber(&token).await.expect("valid");
        assert_eq!(subscriber.user.name(), "alice");
        assert!(subscriber.may_follow("news"));
        assert!(subscriber.may_follow("prices-eur"));
        assert!(!subscriber.may_follow("newsletter"));
        assert!(!subscriber.may_follow("admin"));
    }

    #[tokio::test]
    async fn tokens_signed_with_another_secret_expired_or_unsigned_are_refused() {
        let auth = authenticator();
        let other = mint(
            "another-secret-another-secret-xx",
            &subscriber_claims("alice"),
        )
        .expect("signed");
        assert_eq!(
            auth.subscriber(&other).await.err(),
            Some(AuthError::Invalid("bad signature"))
        );

        let mut expired = subscriber_claims("alice");
        expired.exp = expiry_in(Duration::ZERO) - 3600;
        let expired = mint(SECRET, &expired).expect("signed");
        assert_eq!(
            auth.subscriber(&expired).await.err(),
            Some(AuthError::Expired)
        );

        // {"alg":"none"} with the same claims and no signature.
        let valid = mint(SECRET, &subscriber_claims("alice")).expect("signed");
        let payload = valid.split('.').nth(1).expect("three parts");
        let unsigned = format!("eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.{payload}.");
        assert!(auth.subscriber(&unsigned).await.is_err());
        assert!(auth.subscriber("not-a-jwt").await.is_err());
    }

    #[tokio::test]
    async fn publisher_and_subscriber_tokens_are_not_interchangeable() {
        let auth = authenticator();
        let mut publisher = subscriber_claims("svc");
        publisher.herald_publish = Some(PublishClaim::All(true));
        let publisher = mint(SECRET, &publisher).expect("signed");
        assert_eq!(
            auth.subscriber(&publisher).await.err(),
            Some(AuthError::PublisherOnStream)
        );
        let subscriber = mint(SECRET, &subscriber_claims("alice")).expect("signed");
        assert_eq!(
            auth.publisher(&subscriber).await.err(),
            Some(AuthError::NotAPublisher)
        );
    }

    fn keys_dir() -> std::path::PathBuf {
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/keys")
    }

    fn signed(
        algorithm: Algorithm,
        private_pem: &str,
        kid: Option<&str>,
        claims: &Claims,
    ) -> String {
        let pem = std::fs::read(keys_dir().join(private_pem)).expect("test key");
        let key = match algorithm {
            Algorithm::RS256 => EncodingKey::from_rsa_pem(&pem),
            Algorithm::ES256 => EncodingKey::from_ec_pem(&pem),
            _ => EncodingKey::from_ed_pem(&pem),
        }
        .expect("valid test key");
        let mut header = Header::new(algorithm);
        header.kid = kid.map(str::to_owned);
        jsonwebtoken::encode(&header, claims, &key).expect("signed")
    }

    fn with_keys(configure: impl FnOnce(&mut AuthSettings)) -> Authenticator {
        let mut settings = AuthSettings::default();
        configure(&mut settings);
        Authenticator::new(&settings, &Arc::new(Metrics::default())).expect("keys load")
    }

    #[tokio::test]
    async fn rsa_ecdsa_and_eddsa_tokens_verify_with_their_pem_public_keys() {
        for (algorithm, name, private, public) in [
            (
                Algorithm::RS256,
                "RS256",
                "rsa-private.pem",
                "rsa-public.pem",
            ),
            (Algorithm::ES256, "ES256", "ec-private.pem", "ec-public.pem"),
            (Algorithm::EdDSA, "EdDSA", "ed-private.pem", "ed-public.pem"),
        ] {
            let auth = with_keys(|s| {
                s.algorithms = vec![name.into()];
                s.public_key_file = Some(keys_dir().join(public).display().to_string());
            });
            let token = signed(algorithm, private, None, &subscriber_claims("alice"));
            assert_eq!(
                auth.subscriber(&token).await.expect(name).user.name(),
                "alice"
            );

            // Tampered payload: same header and signature, other subject.
            let mut parts: Vec<&str> = token.split('.').collect();
            let other = mint(SECRET, &subscriber_claims("mallory")).expect("signed");
            let forged_payload = other.split('.').nth(1).expect("payload");
            parts[1] = forged_payload;
            assert_eq!(
                auth.subscriber(&parts.join(".")).await.err(),
                Some(AuthError::Invalid("bad signature"))
            );
        }
    }

    #[tokio::test]
    async fn an_hmac_token_signed_with_the_public_key_is_refused() {
        // Key confusion: the attacker signs HS256 with the (public) RSA key.
        let public_pem = std::fs::read_to_string(keys_dir().join("rsa-public.pem")).expect("key");
        let forged = mint(&public_pem, &subscriber_claims("alice")).expect("signed");
        let rsa_only = with_keys(|s| {
            s.algorithms = vec!["RS256".into()];
            s.public_key_file = Some(keys_dir().join("rsa-public.pem").display().to_string());
        });
        assert_eq!(
            rsa_only.subscriber(&forged).await.err(),
            Some(AuthError::Invalid("algorithm not allowed"))
        );
        let both = with_keys(|s| {
            s.algorithms = vec!["HS256".into(), "RS256".into()];
            s.hs256_secret = Some(Secret::new(SECRET));
            s.public_key_file = Some(keys_dir().join("rsa-public.pem").display().to_string());
        });
        assert_eq!(
            both.subscriber(&forged).await.err(),
            Some(AuthError::Invalid("bad signature"))
        );
    }

    /// The public JWK of a test key (RS256 or ES256), named `kid`.
    fn jwk(private: &str, algorithm: Algorithm, kid: &str) -> jsonwebtoken::jwk::Jwk {
        let pem = std::fs::read(keys_dir().join(private)).expect("test key");
        let key = match algorithm {
            Algorithm::RS256 => EncodingKey::from_rsa_pem(&pem),
            _ => EncodingKey::from_ec_pem(&pem),
        }
        .expect("valid key");
        let mut jwk = jsonwebtoken::jwk::Jwk::from_encoding_key(&key, algorithm).expect("jwk");
        jwk.common.key_id = Some(kid.into());
        jwk
    }

    fn write_jwks(path: &std::path::Path, keys: Vec<jsonwebtoken::jwk::Jwk>) {
        std::fs::write(path, serde_json::to_string(&JwkSet { keys }).expect("json"))
            .expect("write");
    }

    #[tokio::test]
    async fn jwks_keys_are_chosen_by_kid_and_rotate_when_the_file_changes() {
        let dir = std::env::temp_dir().join(format!("herald-jwks-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let jwks_path = dir.join("jwks.json");
        let write = |keys: Vec<jsonwebtoken::jwk::Jwk>| write_jwks(&jwks_path, keys);
        write(vec![jwk("rsa-private.pem", Algorithm::RS256, "2026-a")]);
        let auth = with_keys(|s| {
            s.algorithms = vec!["RS256".into(), "ES256".into()];
            s.jwks_file = Some(jwks_path.display().to_string());
        });
        let claims = subscriber_claims("alice");
        let old = signed(Algorithm::RS256, "rsa-private.pem", Some("2026-a"), &claims);
        let new = signed(Algorithm::ES256, "ec-private.pem", Some("2026-b"), &claims);
        assert!(auth.subscriber(&old).await.is_ok());
        assert_eq!(
            auth.subscriber(&new).await.err(),
            Some(AuthError::UnknownKey)
        );

        write(vec![jwk("ec-private.pem", Algorithm::ES256, "2026-b")]);
        let keys = auth.key_sets().next().expect("a JWKS key set");
        keys.refresh(Trigger::Schedule).await.expect("reloaded");
        assert!(auth.subscriber(&new).await.is_ok());
        assert_eq!(
            auth.subscriber(&old).await.err(),
            Some(AuthError::UnknownKey)
        );
        let _ = std::fs::remove_dir_all(dir);
    }

    #[tokio::test]
    async fn issuer_audience_and_not_before_are_checked_when_configured() {
        let auth = with_keys(|s| {
            s.hs256_secret = Some(Secret::new(SECRET));
            s.issuer = Some("https://idp.example.com/".into());
            s.audience = Some("herald".into());
            s.leeway_secs = 0;
        });
        let good = Claims {
            iss: Some("https://idp.example.com/".into()),
            aud: Some("herald".into()),
            ..subscriber_claims("alice")
        };
        assert!(
            auth.subscriber(&mint(SECRET, &good).expect("signed"))
                .await
                .is_ok()
        );
        let wrong_issuer = Claims {
            iss: Some("https://evil.example.com/".into()),
            ..good.clone()
        };
        assert_eq!(
            auth.subscriber(&mint(SECRET, &wrong_issuer).expect("signed"))
                .await
                .err(),
            Some(AuthError::Invalid("wrong issuer"))
        );
        let wrong_audience = Claims {
            aud: Some("other".into()),
            ..good.clone()
        };
        assert_eq!(
            auth.subscriber(&mint(SECRET, &wrong_audience).expect("signed"))
                .await
                .err(),
            Some(AuthError::Invalid("wrong audience"))
        );

        #[derive(Serialize)]
        struct NotBefore<'a> {
            sub: &'a str,
            exp: u64,
            nbf: u64,
            iss: &'a str,
            aud: &'a str,
        }
        let early = jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &NotBefore {
                sub: "alice",
                exp: expiry_in(Duration::from_secs(600)),
                nbf: expiry_in(Duration::from_secs(300)),
                iss: "https://idp.example.com/",
                aud: "herald",
            },
            &EncodingKey::from_secret(SECRET.as_bytes()),
        )
        .expect("signed");
        assert_eq!(
            auth.subscriber(&early).await.err(),
            Some(AuthError::Invalid("not valid yet (nbf)"))
        );
    }

    #[tokio::test]
    async fn the_issue_time_is_iat_else_nbf_read_leniently() {
        let auth = authenticator();
        let exp = expiry_in(Duration::from_secs(600));
        let signed = |claims: serde_json::Value| {
            jsonwebtoken::encode(
                &Header::new(Algorithm::HS256),
                &claims,
                &EncodingKey::from_secret(SECRET.as_bytes()),
            )
            .expect("signed")
        };
        let past = expiry_in(Duration::ZERO) - 100;
        let sub = "alice";
        let cases = [
            (
                serde_json::json!({"sub": sub, "exp": exp, "iat": past}),
                Some(past),
                "iat",
            ),
            (
                serde_json::json!({"sub": sub, "exp": exp, "iat": past as f64 + 0.75}),
                Some(past),
                "a fractional NumericDate is floored",
            ),
            (
                serde_json::json!({"sub": sub, "exp": exp, "nbf": past}),
                Some(past),
                "nbf stands in for a missing iat",
            ),
            (
                serde_json::json!({"sub": sub, "exp": exp, "iat": "yesterday"}),
                None,
                "a token with an iat that is not a number is still accepted, without an issue time",
            ),
            (serde_json::json!({"sub": sub, "exp": exp}), None, "neither"),
        ];
        for (claims, expected, case) in cases {
            let subscriber = auth.subscriber(&signed(claims)).await.expect("accepted");
            assert_eq!(subscriber.issued_at, expected, "{case}");
        }
    }

    #[tokio::test]
    async fn a_token_whose_publish_claim_is_false_neither_streams_nor_publishes() {
        let claims = Claims {
            herald_publish: Some(PublishClaim::All(false)),
            ..subscriber_claims("alice")
        };
        let token = mint(SECRET, &claims).expect("signed");
        let auth = authenticator();
        assert_eq!(
            auth.subscriber(&token).await.err(),
            Some(AuthError::PublisherOnStream)
        );
        assert_eq!(
            auth.publisher(&token).await.err(),
            Some(AuthError::NotAPublisher)
        );
    }

    #[tokio::test]
    async fn a_publisher_is_named_by_its_sub_or_else_by_a_digest_of_its_token() {
        let auth = authenticator();
        let named = Claims {
            herald_publish: Some(PublishClaim::All(true)),
            ..subscriber_claims("billing")
        };
        let named = mint(SECRET, &named).expect("signed");
        assert_eq!(
            auth.publisher(&named).await.expect("valid").id,
            PublisherId::Subject("billing".into())
        );
        let anonymous = Claims {
            herald_publish: Some(PublishClaim::All(true)),
            exp: expiry_in(Duration::from_secs(60)),
            ..Default::default()
        };
        let anonymous = mint(SECRET, &anonymous).expect("signed");
        let id = auth.publisher(&anonymous).await.expect("valid").id.clone();
        assert_eq!(id, PublisherId::Token(sha256_hex(anonymous.as_bytes())));
        assert!(!id.to_string().contains(&anonymous));
        assert!(id.to_string().starts_with("token:"));
    }

    #[tokio::test]
    async fn a_publisher_list_allows_only_its_targets() {
        let auth = authenticator();
        let mut claims = subscriber_claims("svc");
        claims.herald_publish = Some(PublishClaim::Targets(vec![
            "user:alice".into(),
            "topic:news-*".into(),
        ]));
        let publisher = auth
            .publisher(&mint(SECRET, &claims).expect("signed"))
            .await
            .expect("valid");
        assert!(publisher.may_publish(&Target::user("alice").expect("valid")));
        assert!(!publisher.may_publish(&Target::user("bob").expect("valid")));
        assert!(publisher.may_publish(&Target::topic("news-eu").expect("valid")));
        assert!(!publisher.may_publish(&Target::topic("alice").expect("valid")));
    }

    #[tokio::test]
    async fn with_several_issuers_the_claimed_iss_picks_the_keys_that_must_verify_it() {
        const OTHER: &str = "fedcba9876543210fedcba9876543210";
        let issuer = |iss: &str, secret: &str, audience: &str| IssuerSettings {
            issuer: Some(iss.into()),
            audience: Some(audience.into()),
            algorithms: vec!["HS256".into()],
            hs256_secret: Some(Secret::new(secret)),
            ..Default::default()
        };
        let auth = with_keys(|s| {
            s.issuers = vec![
                issuer("https://a.example.com/", SECRET, "herald-a"),
                issuer("https://b.example.com/", OTHER, "herald-b"),
            ];
        });
        let claims = |iss: &str, aud: &str| Claims {
            iss: Some(iss.into()),
            aud: Some(aud.into()),
            ..subscriber_claims("alice")
        };
        let from_a = mint(SECRET, &claims("https://a.example.com/", "herald-a")).expect("signed");
        let from_b = mint(OTHER, &claims("https://b.example.com/", "herald-b")).expect("signed");
        assert!(auth.subscriber(&from_a).await.is_ok());
        assert!(auth.subscriber(&from_b).await.is_ok());
        // A's key cannot sign for B, and B's audience is not A's.
        let forged = mint(SECRET, &claims("https://b.example.com/", "herald-b")).expect("signed");
        assert_eq!(
            auth.subscriber(&forged).await.err(),
            Some(AuthError::Invalid("bad signature"))
        );
        let crossed = mint(OTHER, &claims("https://b.example.com/", "herald-a")).expect("signed");
        assert_eq!(
            auth.subscriber(&crossed).await.err(),
            Some(AuthError::Invalid("wrong audience"))
        );
        let stranger =
            mint(SECRET, &claims("https://evil.example.com/", "herald-a")).expect("signed");
        assert_eq!(
            auth.subscriber(&stranger).await.err(),
            Some(AuthError::Invalid("wrong issuer"))
        );
        let mut no_iss = subscriber_claims("alice");
        no_iss.aud = Some("herald-a".into());
        assert_eq!(
            auth.subscriber(&mint(SECRET, &no_iss).expect("signed"))
                .await
                .err(),
            Some(AuthError::Invalid("wrong issuer"))
        );
    }

    #[tokio::test]
    async fn an_oidc_issuer_beside_a_secret_keeps_backend_tokens_and_refuses_hs_tokens_in_its_name()
    {
        const IDP: &str = "https://sso.example.com/realms/herald";
        let auth = with_keys(|s| {
            s.hs256_secret = Some(Secret::new(SECRET));
            s.algorithms = vec!["HS256".into(), "RS256".into()];
            s.oidc_issuer = Some(IDP.into());
        });
        let backend = mint(SECRET, &subscriber_claims("alice")).expect("signed");
        assert!(auth.subscriber(&backend).await.is_ok(), "any iss, HS256");
        let in_its_name = Claims {
            iss: Some(IDP.into()),
            ..subscriber_claims("alice")
        };
        assert_eq!(
            auth.subscriber(&mint(SECRET, &in_its_name).expect("signed"))
                .await
                .err(),
            Some(AuthError::Invalid("algorithm not allowed")),
            "the provider's iss is checked with the provider's keys only"
        );
        let provider_token = signed(
            Algorithm::RS256,
            "rsa-private.pem",
            Some("k1"),
            &in_its_name,
        );
        assert_eq!(
            auth.subscriber(&provider_token).await.err(),
            Some(AuthError::KeysUnavailable),
            "nothing fetched yet: not the user's fault"
        );
        let stranger = Claims {
            iss: Some("https://evil.example.com/".into()),
            ..subscriber_claims("alice")
        };
        let stranger = signed(Algorithm::RS256, "rsa-private.pem", Some("k1"), &stranger);
        assert_eq!(
            auth.subscriber(&stranger).await.err(),
            Some(AuthError::Invalid("wrong issuer"))
        );
        assert_eq!(auth.missing_keys().len(), 1);
        assert_eq!(auth.missing_keys()[0].issuer, IDP);
    }

    fn publisher_claims(sub: &str, ttl: Duration) -> Claims {
        Claims {
            sub: Some(sub.into()),
            exp: expiry_in(ttl),
            herald_publish: Some(PublishClaim::All(true)),
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn a_verified_publisher_credential_is_served_again_only_until_it_expires() {
        let auth = with_keys(|s| {
            s.hs256_secret = Some(Secret::new(SECRET));
            s.leeway_secs = 0;
        });
        let token =
            mint(SECRET, &publisher_claims("billing", Duration::from_secs(2))).expect("signed");
        for _ in 0..3 {
            let publisher = auth.publisher(&token).await.expect("valid");
            assert_eq!(publisher.id.to_string(), "sub:billing");
        }
        assert_eq!(auth.verified_publishers.len(), 1);
        // Refused once exp passes, as the full check refuses it (polled: the
        // second boundary comes within a few seconds).
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            match auth.publisher(&token).await {
                Ok(_) => {
                    assert!(std::time::Instant::now() < deadline, "never expired");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(err) => {
                    assert_eq!(err, AuthError::Expired);
                    break;
                }
            }
        }
        assert_eq!(auth.verified_publishers.len(), 0);
    }

    #[tokio::test]
    async fn a_credential_differing_from_a_verified_one_in_any_byte_is_checked_on_its_own() {
        let auth = authenticator();
        let token = mint(
            SECRET,
            &publisher_claims("billing", Duration::from_secs(60)),
        )
        .expect("signed");
        assert!(auth.publisher(&token).await.is_ok());
        // Same header and payload, another signature; then another payload
        // under the verified signature.
        // The next-to-last character: all six of its bits belong to the
        // signature (the last one's low bits must stay zero, or the token is
        // merely malformed, which made this test fail 1 time in 64).
        let mut forged = token.clone().into_bytes();
        let at = forged.len() - 2;
        forged[at] = if forged[at] == b'A' { b'B' } else { b'A' };
        let forged = String::from_utf8(forged).expect("ASCII");
        assert_eq!(
            auth.publisher(&forged).await.err(),
            Some(AuthError::Invalid("bad signature"))
        );
        let other = mint(
            SECRET,
            &publisher_claims("mallory", Duration::from_secs(60)),
        )
        .expect("signed");
        let mut parts: Vec<&str> = token.split('.').collect();
        parts[1] = other.split('.').nth(1).expect("payload");
        assert_eq!(
            auth.publisher(&parts.join(".")).await.err(),
            Some(AuthError::Invalid("bad signature"))
        );
        assert_eq!(auth.verified_publishers.len(), 1);
    }

    #[tokio::test]
    async fn refusals_are_never_kept_and_kept_credentials_stay_bounded() {
        let auth = authenticator();
        let subscriber = mint(SECRET, &subscriber_claims("alice")).expect("signed");
        assert_eq!(
            auth.publisher(&subscriber).await.err(),
            Some(AuthError::NotAPublisher)
        );
        assert_eq!(
            auth.publisher("not-a-jwt").await.err(),
            Some(AuthError::Invalid("malformed token"))
        );
        assert_eq!(auth.verified_publishers.len(), 0);
        for n in 0..verified::MAX_VERIFIED_PUBLISHERS + 10 {
            let token = mint(
                SECRET,
                &publisher_claims(&format!("svc-{n}"), Duration::from_secs(60)),
            )
            .expect("signed");
            assert!(auth.publisher(&token).await.is_ok());
            assert!(auth.verified_publishers.len() <= verified::MAX_VERIFIED_PUBLISHERS);
        }
    }

    #[tokio::test]
    async fn a_publisher_credential_of_a_rotating_key_set_is_checked_every_time() {
        let dir = std::env::temp_dir().join(format!("herald-jwks-pub-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let jwks_path = dir.join("jwks.json");
        write_jwks(
            &jwks_path,
            vec![jwk("rsa-private.pem", Algorithm::RS256, "2026-a")],
        );
        let auth = with_keys(|s| {
            s.algorithms = vec!["RS256".into(), "ES256".into()];
            s.jwks_file = Some(jwks_path.display().to_string());
        });
        let claims = publisher_claims("billing", Duration::from_secs(60));
        let token = signed(Algorithm::RS256, "rsa-private.pem", Some("2026-a"), &claims);
        assert!(auth.publisher(&token).await.is_ok());
        assert!(auth.publisher(&token).await.is_ok());
        assert_eq!(auth.verified_publishers.len(), 0);

        // The issuer rotates its key out: the credential it accepted a
        // moment ago is refused now.
        write_jwks(
            &jwks_path,
            vec![jwk("ec-private.pem", Algorithm::ES256, "2026-b")],
        );
        let keys = auth.key_sets().next().expect("a JWKS key set");
        keys.refresh(Trigger::Schedule).await.expect("reloaded");
        assert_eq!(
            auth.publisher(&token).await.err(),
            Some(AuthError::UnknownKey)
        );
        let _ = std::fs::remove_dir_all(dir);
    }
}
