//! Tokens: who may open which stream and who may publish where.
//!
//! Herald reads JWTs signed with HS256 (`auth.hs256_secret`). Only HS256 is
//! accepted: the algorithm allowlist is explicit, so `alg: none` or any other
//! algorithm is refused before a signature is looked at. `exp` is required;
//! `exp` and `nbf` are checked with `auth.leeway_secs` of tolerance; `iss` and
//! `aud` are checked when configured.
//!
//! Two kinds of token, never interchangeable:
//! - a **subscriber** token: `sub` is the user id; an optional `topics` claim
//!   lists the topics it may follow ([`Grant`] patterns);
//! - a **publisher** credential: the `herald_publish` claim is `true` (any
//!   target) or a list of target patterns (`user:<id>`, `topic:<name>`).
//!   A token with `herald_publish` cannot open a stream, and a token without it
//!   cannot publish.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use herald_config::AuthSettings;
use herald_protocol::{Target, TargetKind};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

/// The claims Herald reads and writes.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Claims {
    /// The user id (subscriber tokens).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sub: Option<String>,
    /// Expiry, seconds since the Unix epoch.
    pub exp: u64,
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
pub struct Grant(String);

impl Grant {
    /// Whether `name` is covered by this grant.
    pub fn allows(&self, name: &str) -> bool {
        match self.0.strip_suffix('*') {
            Some(prefix) => name.starts_with(prefix),
            None => self.0 == name,
        }
    }
}

/// An authenticated subscriber.
#[derive(Debug, Clone)]
pub struct Subscriber {
    /// The user whose stream this is.
    pub user: Target,
    /// Topic grants from the token.
    pub topics: Vec<Grant>,
    /// When the token expires.
    pub expires_at: SystemTime,
}

impl Subscriber {
    /// Whether the token lets this subscriber follow `topic`.
    pub fn may_follow(&self, topic: &str) -> bool {
        self.topics.iter().any(|grant| grant.allows(topic))
    }
}

/// An authenticated publisher.
#[derive(Debug, Clone)]
pub struct Publisher {
    grants: Option<Vec<(TargetKind, Grant)>>,
}

impl Publisher {
    /// Whether this credential may publish to `target`.
    pub fn may_publish(&self, target: &Target) -> bool {
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
pub enum AuthError {
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
    /// A publisher credential was used to open a stream.
    #[error("a publisher credential cannot open a stream")]
    PublisherOnStream,
    /// A token without `herald_publish` was used to publish.
    #[error("this token has no herald_publish claim and cannot publish")]
    NotAPublisher,
    /// The subscriber token's `sub` is missing or not a valid user id.
    #[error("token subject is missing or not a valid user id")]
    BadSubject,
}

impl AuthError {
    /// Whether this is "who are you" (401) rather than "not allowed" (403).
    pub fn is_unauthenticated(&self) -> bool {
        matches!(
            self,
            AuthError::Missing | AuthError::Expired | AuthError::Invalid(_) | AuthError::BadSubject
        )
    }
}

/// Validates tokens with the configured key and rules.
pub struct Authenticator {
    key: DecodingKey,
    validation: Validation,
}

impl std::fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authenticator")
            .field("algorithms", &self.validation.algorithms)
            .finish_non_exhaustive()
    }
}

impl Authenticator {
    /// An authenticator for `settings`; `None` when no secret is configured
    /// (settings validation refuses that before a node starts).
    pub fn new(settings: &AuthSettings) -> Option<Self> {
        let secret = settings.hs256_secret.as_ref()?;
        let mut validation = Validation::new(Algorithm::HS256);
        validation.algorithms = vec![Algorithm::HS256];
        validation.leeway = settings.leeway_secs;
        validation.validate_nbf = true;
        validation.set_required_spec_claims(&["exp"]);
        match &settings.audience {
            Some(audience) => validation.set_audience(&[audience]),
            None => validation.validate_aud = false,
        }
        if let Some(issuer) = &settings.issuer {
            validation.set_issuer(&[issuer]);
        }
        Some(Authenticator {
            key: DecodingKey::from_secret(secret.expose().as_bytes()),
            validation,
        })
    }

    fn claims(&self, token: &str) -> Result<Claims, AuthError> {
        use jsonwebtoken::errors::ErrorKind;
        jsonwebtoken::decode::<Claims>(token, &self.key, &self.validation)
            .map(|data| data.claims)
            .map_err(|err| match err.kind() {
                ErrorKind::ExpiredSignature => AuthError::Expired,
                ErrorKind::ImmatureSignature => AuthError::Invalid("not valid yet (nbf)"),
                ErrorKind::InvalidSignature => AuthError::Invalid("bad signature"),
                ErrorKind::InvalidAlgorithm | ErrorKind::InvalidAlgorithmName => {
                    AuthError::Invalid("algorithm not allowed")
                }
                ErrorKind::InvalidIssuer => AuthError::Invalid("wrong issuer"),
                ErrorKind::InvalidAudience => AuthError::Invalid("wrong audience"),
                ErrorKind::MissingRequiredClaim(_) => AuthError::Invalid("missing exp claim"),
                _ => AuthError::Invalid("malformed token"),
            })
    }

    /// Validates a subscriber token.
    pub fn subscriber(&self, token: &str) -> Result<Subscriber, AuthError> {
        let claims = self.claims(token)?;
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
        })
    }

    /// Validates a publisher credential.
    pub fn publisher(&self, token: &str) -> Result<Publisher, AuthError> {
        let claims = self.claims(token)?;
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
        Ok(Publisher { grants })
    }
}

/// Signs `claims` with an HS256 `secret` (the `token` subcommand and tests).
pub fn mint(secret: &str, claims: &Claims) -> Result<String, jsonwebtoken::errors::Error> {
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )
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
    use herald_config::Secret;

    const SECRET: &str = "0123456789abcdef0123456789abcdef";

    fn authenticator() -> Authenticator {
        Authenticator::new(&AuthSettings {
            hs256_secret: Some(Secret::new(SECRET)),
            ..Default::default()
        })
        .expect("secret configured")
    }

    fn subscriber_claims(user: &str) -> Claims {
        Claims {
            sub: Some(user.into()),
            exp: expiry_in(Duration::from_secs(60)),
            ..Default::default()
        }
    }

    #[test]
    fn a_valid_subscriber_token_names_its_user_and_topics() {
        let mut claims = subscriber_claims("alice");
        claims.topics = vec!["news".into(), "prices-*".into()];
        let token = mint(SECRET, &claims).expect("signed");
        let subscriber = authenticator().subscriber(&token).expect("valid");
        assert_eq!(subscriber.user.name(), "alice");
        assert!(subscriber.may_follow("news"));
        assert!(subscriber.may_follow("prices-eur"));
        assert!(!subscriber.may_follow("newsletter"));
        assert!(!subscriber.may_follow("admin"));
    }

    #[test]
    fn tokens_signed_with_another_secret_expired_or_unsigned_are_refused() {
        let auth = authenticator();
        let other = mint(
            "another-secret-another-secret-xx",
            &subscriber_claims("alice"),
        )
        .expect("signed");
        assert_eq!(
            auth.subscriber(&other).err(),
            Some(AuthError::Invalid("bad signature"))
        );

        let mut expired = subscriber_claims("alice");
        expired.exp = expiry_in(Duration::ZERO) - 3600;
        let expired = mint(SECRET, &expired).expect("signed");
        assert_eq!(auth.subscriber(&expired).err(), Some(AuthError::Expired));

        // {"alg":"none"} with the same claims and no signature.
        let valid = mint(SECRET, &subscriber_claims("alice")).expect("signed");
        let payload = valid.split('.').nth(1).expect("three parts");
        let unsigned = format!("eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.{payload}.");
        assert!(auth.subscriber(&unsigned).is_err());
        assert!(auth.subscriber("not-a-jwt").is_err());
    }

    #[test]
    fn publisher_and_subscriber_tokens_are_not_interchangeable() {
        let auth = authenticator();
        let mut publisher = subscriber_claims("svc");
        publisher.herald_publish = Some(PublishClaim::All(true));
        let publisher = mint(SECRET, &publisher).expect("signed");
        assert_eq!(
            auth.subscriber(&publisher).err(),
            Some(AuthError::PublisherOnStream)
        );
        let subscriber = mint(SECRET, &subscriber_claims("alice")).expect("signed");
        assert_eq!(
            auth.publisher(&subscriber).err(),
            Some(AuthError::NotAPublisher)
        );
    }

    #[test]
    fn a_publisher_list_allows_only_its_targets() {
        let auth = authenticator();
        let mut claims = subscriber_claims("svc");
        claims.herald_publish = Some(PublishClaim::Targets(vec![
            "user:alice".into(),
            "topic:news-*".into(),
        ]));
        let publisher = auth
            .publisher(&mint(SECRET, &claims).expect("signed"))
            .expect("valid");
        assert!(publisher.may_publish(&Target::user("alice").expect("valid")));
        assert!(!publisher.may_publish(&Target::user("bob").expect("valid")));
        assert!(publisher.may_publish(&Target::topic("news-eu").expect("valid")));
        assert!(!publisher.may_publish(&Target::topic("alice").expect("valid")));
    }
}
