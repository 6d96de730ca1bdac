//! One trusted token issuer ([`Issuer`]): the `iss` it signs as, the audience
//! its tokens must name, its algorithm allowlist and its keys, and the full
//! verification of a token against them.

use std::sync::Arc;
use std::time::Duration;

use herald_config::{AuthSettings, IssuerSettings};
use jsonwebtoken::{Algorithm, DecodingKey, Header, Validation};

use super::key_set::{KeySet, KeySource, RefreshTiming};
use super::provider::Provider;
use super::{AuthError, Claims, KeyError};
use crate::metrics::Metrics;

/// A trusted issuer and its keys.
#[derive(Debug)]
pub(crate) struct Issuer {
    /// The `iss` its tokens carry; `None`: any (the top-level issuer of a
    /// deployment that does not check `iss`).
    iss: Option<String>,
    audience: Option<String>,
    algorithms: Vec<Algorithm>,
    hmac: Option<DecodingKey>,
    public_key: Option<DecodingKey>,
    keys: Option<Arc<KeySet>>,
}

impl Issuer {
    /// The issuer `settings` describes (`key` names it in errors: `auth` or
    /// `auth.issuers[N]`), reading key files now; provider keys load later.
    pub(crate) fn new(
        settings: &IssuerSettings,
        key: &str,
        auth: &AuthSettings,
        metrics: &Arc<Metrics>,
    ) -> Result<Self, KeyError> {
        let iss = settings.expected_iss().map(str::to_owned);
        let name = iss.clone().unwrap_or_else(|| "default".into());
        let timing = RefreshTiming {
            every: Duration::from_secs(auth.jwks_refresh_secs),
            min: Duration::from_secs(auth.jwks_min_refresh_secs),
            max: Duration::from_secs(auth.jwks_max_refresh_secs),
        };
        let timeout = Duration::from_secs(auth.jwks_fetch_timeout_secs);
        let ca_file = settings.jwks_ca_file.as_deref();
        let source =
            match (
                &settings.jwks_file,
                &settings.jwks_url,
                &settings.oidc_issuer,
            ) {
                (Some(path), _, _) => Some(KeySource::File(path.clone())),
                (None, Some(url), _) => Some(KeySource::Provider(Box::new(Provider::jwks(
                    &format!("{key}.jwks_url"),
                    url,
                    ca_file,
                    timeout,
                )?))),
                (None, None, Some(issuer)) => Some(KeySource::Provider(Box::new(
                    Provider::discovery(&format!("{key}.oidc_issuer"), issuer, ca_file, timeout)?,
                ))),
                (None, None, None) => None,
            };
        let keys = match source {
            None => None,
            Some(source) => {
                let set = KeySet::new(name, source, timing, Arc::clone(metrics));
                set.load_file_now().map_err(|err| err.into_key_error(key))?;
                Some(Arc::new(set))
            }
        };
        let public_key = match &settings.public_key_file {
            None => None,
            Some(path) => Some(read_pem_key(&format!("{key}.public_key_file"), path)?),
        };
        Ok(Issuer {
            iss,
            audience: settings.audience.clone(),
            algorithms: settings
                .algorithms
                .iter()
                .filter_map(|name| name.parse::<Algorithm>().ok())
                .collect(),
            hmac: settings
                .hs256_secret
                .as_ref()
                .map(|secret| DecodingKey::from_secret(secret.expose().as_bytes())),
            public_key,
            keys,
        })
    }

    /// The `iss` this issuer's tokens carry (`None`: any).
    pub(crate) fn iss(&self) -> Option<&str> {
        self.iss.as_deref()
    }

    /// Its key set chosen by `kid`, if it has one.
    pub(crate) fn key_set(&self) -> Option<&Arc<KeySet>> {
        self.keys.as_ref()
    }

    /// Whether tokens signed with `algorithm` may come from this issuer.
    pub(crate) fn accepts(&self, algorithm: Algorithm) -> bool {
        self.algorithms.contains(&algorithm)
    }

    /// Whether any key is configured.
    pub(crate) fn has_keys(&self) -> bool {
        self.hmac.is_some() || self.public_key.is_some() || self.keys.is_some()
    }

    /// Verifies `token` (whose header is `header`) with this issuer's keys
    /// and rules. The key is chosen by the algorithm's family, never by the
    /// token alone.
    pub(crate) fn verify(
        &self,
        token: &str,
        header: &Header,
        leeway: u64,
    ) -> Result<Claims, AuthError> {
        use jsonwebtoken::errors::ErrorKind;
        if !self.accepts(header.alg) {
            return Err(AuthError::Invalid("algorithm not allowed"));
        }
        let from_set;
        let key = match header.alg {
            Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512 => self.hmac.as_ref(),
            _ => match (&header.kid, &self.keys) {
                (Some(kid), Some(keys)) => {
                    if !keys.is_loaded() {
                        return Err(AuthError::KeysUnavailable);
                    }
                    from_set = keys.key(kid).ok_or(AuthError::UnknownKey)?;
                    Some(&from_set)
                }
                (Some(_), None) => return Err(AuthError::UnknownKey),
                (None, _) => self.public_key.as_ref(),
            },
        }
        .ok_or(AuthError::Invalid("no key for this algorithm"))?;

        let mut validation = Validation::new(header.alg);
        validation.leeway = leeway;
        validation.validate_nbf = true;
        validation.set_required_spec_claims(&["exp"]);
        match &self.audience {
            Some(audience) => validation.set_audience(&[audience]),
            None => validation.validate_aud = false,
        }
        if let Some(iss) = &self.iss {
            validation.set_issuer(&[iss]);
        }
        jsonwebtoken::decode::<Claims>(token, key, &validation)
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
                ErrorKind::MissingRequiredClaim(claim) if claim == "iss" => {
                    AuthError::Invalid("wrong issuer")
                }
                ErrorKind::MissingRequiredClaim(claim) if claim == "aud" => {
                    AuthError::Invalid("wrong audience")
                }
                ErrorKind::MissingRequiredClaim(_) => AuthError::Invalid("missing exp claim"),
                _ => AuthError::Invalid("malformed token"),
            })
    }
}

/// Reads a PEM public key of any supported family.
fn read_pem_key(key: &str, path: &str) -> Result<DecodingKey, KeyError> {
    let pem = std::fs::read(path).map_err(|source| KeyError::Read {
        key: key.to_owned(),
        path: path.to_owned(),
        source,
    })?;
    DecodingKey::from_rsa_pem(&pem)
        .or_else(|_| DecodingKey::from_ec_pem(&pem))
        .or_else(|_| DecodingKey::from_ed_pem(&pem))
        .map_err(|_| KeyError::Invalid {
            key: key.to_owned(),
            path: path.to_owned(),
            what: "PEM public key (RSA, EC or Ed25519)",
        })
}
