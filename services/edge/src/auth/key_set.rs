//! Public keys chosen by `kid` ([`KeySet`]), from a JWKS file or an identity
//! provider over HTTPS, and how they are kept fresh.
//!
//! A key set is refreshed on a schedule: a file every `auth.jwks_refresh_secs`;
//! a provider when its response's cache lifetime runs out, clamped to
//! [`auth.jwks_min_refresh_secs`, `auth.jwks_max_refresh_secs`]
//! (`auth.jwks_refresh_secs` when the response does not say). A token naming
//! a `kid` the set does not hold asks for a refresh at once, but at most one
//! fetch is made per `auth.jwks_min_refresh_secs` whatever the number of such
//! tokens, and concurrent askers share one fetch. A failed refresh keeps the
//! last good keys, is logged and counted, and is retried after 1 s, 2 s, 4 s…
//! up to `auth.jwks_min_refresh_secs`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use jsonwebtoken::DecodingKey;
use jsonwebtoken::jwk::{AlgorithmParameters, Jwk, PublicKeyUse};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::provider::{FetchError, Provider};
use crate::metrics::{IssuerLabel, KeyRefreshLabel, Metrics};

/// Where a key set's keys come from.
#[derive(Debug)]
pub(crate) enum KeySource {
    /// A JWKS file on disk.
    File(String),
    /// A JWKS URL or an OpenID Connect issuer (boxed: its HTTP client is
    /// large, and a key set holds one source for its lifetime).
    Provider(Box<Provider>),
}

/// How often a key set is refreshed (see the module doc).
#[derive(Debug, Clone, Copy)]
pub(crate) struct RefreshTiming {
    /// A file's period; a provider's when its response does not say.
    pub(crate) every: Duration,
    /// Shortest interval between two fetches from a provider.
    pub(crate) min: Duration,
    /// Longest a provider's keys are kept without a fetch.
    pub(crate) max: Duration,
}

impl RefreshTiming {
    /// How long a provider's keys are kept: the response's cache
    /// `lifetime` (else `every`), clamped to [`min`, `max`].
    ///
    /// [`min`]: RefreshTiming::min
    /// [`max`]: RefreshTiming::max
    pub(crate) fn keep_for(&self, lifetime: Option<Duration>) -> Duration {
        lifetime.unwrap_or(self.every).clamp(self.min, self.max)
    }

    /// When to try a provider again after `failures` failures in a row:
    /// 1 s, 2 s, 4 s… up to `min`.
    pub(crate) fn retry_after(&self, failures: u32) -> Duration {
        Duration::from_secs(1)
            .saturating_mul(1 << failures.saturating_sub(1).min(16))
            .min(self.min)
    }
}

/// What asked for a refresh.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Trigger {
    /// The schedule (or start-up).
    Schedule,
    /// A token named a `kid` the set does not hold.
    UnknownKid,
}

/// Why keys could not be loaded. Nothing changed: the last good keys stay.
#[derive(Debug, thiserror::Error)]
pub(crate) enum LoadError {
    /// The provider could not be asked.
    #[error(transparent)]
    Fetch(#[from] FetchError),
    /// The file could not be read.
    #[error("cannot read {path:?}")]
    Read {
        /// The file.
        path: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The file is not a JWKS.
    #[error("{path:?} is not a JWKS document")]
    Parse {
        /// The file.
        path: String,
        /// The JSON error.
        #[source]
        source: serde_json::Error,
    },
    /// The provider's JWKS holds no key Herald can verify with.
    #[error("the JWKS holds no usable signing key")]
    NoUsableKey,
}

/// Public keys by `kid`.
type KeysById = HashMap<String, DecodingKey>;

/// When the set was and will be refreshed, and how the last try went.
#[derive(Debug)]
struct Schedule {
    /// Whether a key set was ever loaded.
    loaded: bool,
    /// When the last load began.
    last_attempt: Option<Instant>,
    /// When the schedule refreshes next.
    next_due: Instant,
    /// Failures in a row.
    failures: u32,
    /// Why the last load failed, while it is the latest news.
    last_error: Option<Arc<LoadError>>,
}

/// A set of public keys chosen by `kid`, kept fresh.
#[derive(Debug)]
pub(crate) struct KeySet {
    /// The issuer in logs, metrics and `/readyz`.
    issuer: String,
    source: KeySource,
    timing: RefreshTiming,
    keys: RwLock<Arc<KeysById>>,
    schedule: Mutex<Schedule>,
    /// Held while loading: concurrent askers share one fetch.
    loading: tokio::sync::Mutex<()>,
    metrics: Arc<Metrics>,
}

impl KeySet {
    /// A key set with no keys yet, due for its first load now.
    pub(crate) fn new(
        issuer: String,
        source: KeySource,
        timing: RefreshTiming,
        metrics: Arc<Metrics>,
    ) -> Self {
        KeySet {
            issuer,
            source,
            timing,
            keys: RwLock::new(Arc::new(HashMap::new())),
            schedule: Mutex::new(Schedule {
                loaded: false,
                last_attempt: None,
                next_due: Instant::now(),
                failures: 0,
                last_error: None,
            }),
            loading: tokio::sync::Mutex::new(()),
            metrics,
        }
    }

    /// The key with this `kid`, if the set holds one.
    pub(crate) fn key(&self, kid: &str) -> Option<DecodingKey> {
        self.keys
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(kid)
            .cloned()
    }

    /// Whether keys were ever loaded.
    pub(crate) fn is_loaded(&self) -> bool {
        self.schedule().loaded
    }

    /// The issuer this set serves.
    pub(crate) fn issuer(&self) -> &str {
        &self.issuer
    }

    /// Why the last load failed, if it did.
    pub(crate) fn last_error(&self) -> Option<Arc<LoadError>> {
        self.schedule().last_error.clone()
    }

    /// Whether keys come from a provider (fetched) rather than a file.
    pub(crate) fn is_remote(&self) -> bool {
        matches!(self.source, KeySource::Provider(_))
    }

    fn schedule(&self) -> std::sync::MutexGuard<'_, Schedule> {
        self.schedule.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Loads the keys now. A [`Trigger::UnknownKid`] refresh is skipped (and
    /// counted) when the last load began less than the minimum interval ago;
    /// a caller that waited for another caller's load gets its result.
    pub(crate) async fn refresh(&self, trigger: Trigger) -> Result<(), Arc<LoadError>> {
        let requested = Instant::now();
        let _loading = self.loading.lock().await;
        {
            let schedule = self.schedule();
            let last = schedule.last_attempt;
            // Another caller loaded while this one waited: that load is the
            // answer. Else an unknown kid waits for the minimum interval.
            let shared = last.is_some_and(|at| at >= requested);
            let throttled = trigger == Trigger::UnknownKid
                && last.is_some_and(|at| at.elapsed() < self.timing.min);
            if shared || throttled {
                let outcome = schedule.last_error.clone().map_or(Ok(()), Err);
                drop(schedule);
                if trigger == Trigger::UnknownKid {
                    self.metrics
                        .jwks_refresh_throttled
                        .get_or_create(&IssuerLabel::new(&self.issuer))
                        .inc();
                }
                return outcome;
            }
        }
        let started = Instant::now();
        self.schedule().last_attempt = Some(started);
        match self.load().await {
            Ok((keys, lifetime)) => {
                self.loaded(keys, lifetime, started);
                Ok(())
            }
            Err(err) => Err(self.failed(err, trigger, started)),
        }
    }

    /// Reads a file source now (start-up, where a bad file stops the node).
    pub(crate) fn load_file_now(&self) -> Result<(), LoadError> {
        let KeySource::File(path) = &self.source else {
            return Ok(());
        };
        let keys = read_file(path)?;
        self.schedule().last_attempt = Some(Instant::now());
        self.loaded(keys, None, Instant::now());
        Ok(())
    }

    /// The keys and cache lifetime from the source.
    async fn load(&self) -> Result<(KeysById, Option<Duration>), LoadError> {
        match &self.source {
            KeySource::File(path) => Ok((read_file(path)?, None)),
            KeySource::Provider(provider) => {
                let fetched = provider.fetch().await?;
                let keys = usable_keys(fetched.keys);
                if keys.is_empty() {
                    return Err(LoadError::NoUsableKey);
                }
                Ok((keys, fetched.lifetime))
            }
        }
    }

    fn loaded(&self, keys: KeysById, lifetime: Option<Duration>, started: Instant) {
        let count = keys.len();
        let old = std::mem::replace(
            &mut *self.keys.write().unwrap_or_else(|p| p.into_inner()),
            Arc::new(keys),
        );
        let interval = match self.source {
            KeySource::File(_) => self.timing.every,
            KeySource::Provider(_) => self.timing.keep_for(lifetime),
        };
        {
            let mut schedule = self.schedule();
            schedule.loaded = true;
            schedule.failures = 0;
            schedule.last_error = None;
            schedule.next_due = started + interval;
        }
        let label = IssuerLabel::new(&self.issuer);
        self.metrics
            .jwks_refreshes
            .get_or_create(&KeyRefreshLabel::new(&self.issuer, "ok"))
            .inc();
        self.metrics
            .jwks_keys
            .get_or_create(&label)
            .set(i64::try_from(count).unwrap_or(i64::MAX));
        let new = self.keys.read().unwrap_or_else(|p| p.into_inner()).clone();
        let added = new.keys().filter(|kid| !old.contains_key(*kid)).count();
        let removed = old.keys().filter(|kid| !new.contains_key(*kid)).count();
        if added + removed > 0 {
            tracing::info!(
                issuer = %self.issuer,
                keys = count,
                added,
                removed,
                next_refresh_secs = interval.as_secs(),
                "signing keys loaded"
            );
        } else {
            tracing::debug!(issuer = %self.issuer, keys = count, "signing keys unchanged");
        }
    }

    fn failed(&self, err: LoadError, trigger: Trigger, started: Instant) -> Arc<LoadError> {
        let err = Arc::new(err);
        let (loaded, retry) = {
            let mut schedule = self.schedule();
            schedule.failures = schedule.failures.saturating_add(1);
            let retry = match self.source {
                KeySource::File(_) => self.timing.every,
                KeySource::Provider(_) => self.timing.retry_after(schedule.failures),
            };
            schedule.next_due = started + retry;
            schedule.last_error = Some(Arc::clone(&err));
            (schedule.loaded, retry)
        };
        self.metrics
            .jwks_refreshes
            .get_or_create(&KeyRefreshLabel::new(&self.issuer, "failed"))
            .inc();
        tracing::warn!(
            issuer = %self.issuer,
            error = %ErrorChain(&*err),
            ?trigger,
            had_keys = loaded,
            retry_secs = retry.as_secs(),
            "signing key refresh failed; keeping the last good keys"
        );
        err
    }

    /// Loads until keys are there or `within` has passed (start-up).
    pub(crate) async fn wait_loaded(&self, within: Duration) {
        let attempts = async {
            while !self.is_loaded() {
                if self.refresh(Trigger::Schedule).await.is_ok() {
                    return;
                }
                let due = self.schedule().next_due;
                tokio::time::sleep_until(due).await;
            }
        };
        if tokio::time::timeout(within, attempts).await.is_err() {
            tracing::warn!(
                issuer = %self.issuer,
                wait_secs = within.as_secs(),
                "no signing keys yet: serving unready (/readyz) and retrying"
            );
        }
    }

    /// Refreshes on the schedule until `shutdown`.
    pub(crate) async fn keep_fresh(self: Arc<Self>, shutdown: CancellationToken) {
        loop {
            let due = self.schedule().next_due;
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep_until(due) => {}
            }
            // An unknown-kid refresh may have moved the schedule meanwhile.
            if self.schedule().next_due > Instant::now() {
                continue;
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = self.refresh(Trigger::Schedule) => {}
            }
        }
    }
}

/// The usable keys of the JWKS file at `path` (an empty set is valid).
fn read_file(path: &str) -> Result<KeysById, LoadError> {
    let text = std::fs::read_to_string(path).map_err(|source| LoadError::Read {
        path: path.to_owned(),
        source,
    })?;
    #[derive(serde::Deserialize)]
    struct KeysDocument {
        keys: Vec<serde_json::Value>,
    }
    let document: KeysDocument =
        serde_json::from_str(&text).map_err(|source| LoadError::Parse {
            path: path.to_owned(),
            source,
        })?;
    Ok(usable_keys(document.keys))
}

/// The signing keys of a JWKS that Herald can use, by `kid`: keys without a
/// `kid`, encryption keys (`"use": "enc"`), symmetric keys (a public key must
/// never become an HMAC secret) and keys of unknown types are left out.
fn usable_keys(keys: Vec<serde_json::Value>) -> KeysById {
    keys.into_iter()
        .filter_map(|value| serde_json::from_value::<Jwk>(value).ok())
        .filter(|jwk| !matches!(jwk.algorithm, AlgorithmParameters::OctetKey(_)))
        .filter(|jwk| jwk.common.public_key_use != Some(PublicKeyUse::Encryption))
        .filter_map(|jwk| {
            let kid = jwk.common.key_id.clone()?;
            Some((kid, DecodingKey::from_jwk(&jwk).ok()?))
        })
        .collect()
}

/// An error and its causes on one line (`a: b: c`), for logs and `/readyz`.
pub(crate) struct ErrorChain<'a>(pub(crate) &'a (dyn std::error::Error + 'static));

impl std::fmt::Display for ErrorChain<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)?;
        let mut source = self.0.source();
        while let Some(cause) = source {
            write!(f, ": {cause}")?;
            source = cause.source();
        }
        Ok(())
    }
}

impl LoadError {
    /// The start-up error for a JWKS file of the issuer `key` names.
    pub(crate) fn into_key_error(self, key: &str) -> super::KeyError {
        let key = format!("{key}.jwks_file");
        match self {
            LoadError::Read { path, source } => super::KeyError::Read { key, path, source },
            LoadError::Parse { path, .. } => super::KeyError::Invalid {
                key,
                path,
                what: "JWKS document",
            },
            LoadError::Fetch(_) | LoadError::NoUsableKey => super::KeyError::Invalid {
                key,
                path: String::new(),
                what: "JWKS document",
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEFAULTS: RefreshTiming = RefreshTiming {
        every: Duration::from_secs(60),
        min: Duration::from_secs(30),
        max: Duration::from_secs(3600),
    };

    #[test]
    fn a_cache_lifetime_is_honoured_within_the_bounds() {
        let secs = |s| Some(Duration::from_secs(s));
        // Auth0 (max-age=15) and Keycloak (no-cache): the minimum.
        assert_eq!(DEFAULTS.keep_for(secs(15)), Duration::from_secs(30));
        assert_eq!(DEFAULTS.keep_for(secs(0)), Duration::from_secs(30));
        assert_eq!(DEFAULTS.keep_for(secs(600)), Duration::from_secs(600));
        // Google's hours-long max-age: the maximum.
        assert_eq!(DEFAULTS.keep_for(secs(21_000)), Duration::from_secs(3600));
        assert_eq!(DEFAULTS.keep_for(None), Duration::from_secs(60));
    }

    #[test]
    fn retries_after_failures_back_off_up_to_the_minimum_interval() {
        let delays: Vec<u64> = (1..=8)
            .map(|failures| DEFAULTS.retry_after(failures).as_secs())
            .collect();
        assert_eq!(delays, [1, 2, 4, 8, 16, 30, 30, 30]);
        assert_eq!(DEFAULTS.retry_after(u32::MAX), Duration::from_secs(30));
    }

    #[test]
    fn only_signing_keys_with_a_kid_are_usable() {
        let rsa = |kid: Option<&str>, usage: Option<&str>| {
            let mut key = serde_json::json!({
                "kty": "RSA",
                "n": "sXchDaQebHnPiGvyDOAT4saGEUetSyo9MKLOoWFsueri23bOdgWp4Dy1WlUzewbgBHod5pcM9H95GQRV3JDXboIRROSBigeC5yjU1hGzHHyXss8UDprecbAYxknTcQkhslANGRUZmdTOQ5qTRsLAt6BTYuyvVRdhS8exSZEy_c4gs_7svlJJQ4H9_NxsiIoLwAEk7-Q3UXERGYw_75IDrGA84-lA_-Ct4eTlXHBIY2EaV7t7LjJaynVJCpkv4LKjTTAumiGUIuQhrNhZLuF_RJLqHpM2kgWFLU7-VTdL1VbC2tejvcI2BlMkEpk1BzBZI0KQB0GaDWFLN-aEAw3vRw",
                "e": "AQAB",
            });
            if let Some(kid) = kid {
                key["kid"] = kid.into();
            }
            if let Some(usage) = usage {
                key["use"] = usage.into();
            }
            key
        };
        let keys = usable_keys(vec![
            rsa(Some("signing"), Some("sig")),
            rsa(Some("any-use"), None),
            rsa(Some("encryption"), Some("enc")),
            rsa(None, Some("sig")),
            serde_json::json!({"kty": "oct", "kid": "secret", "k": "c2VjcmV0"}),
            serde_json::json!({"kty": "future-type", "kid": "unknown"}),
        ]);
        let mut kids: Vec<&str> = keys.keys().map(String::as_str).collect();
        kids.sort_unstable();
        assert_eq!(kids, ["any-use", "signing"]);
    }
}
