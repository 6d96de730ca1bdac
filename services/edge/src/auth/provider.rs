//! The identity provider over HTTPS: OpenID Connect discovery and JWKS
//! fetches ([`Provider`], [`FetchError`]), and how long a fetched key set may
//! be kept ([`cache_lifetime`]).
//!
//! Only `https://` is ever fetched, and redirects are not followed; the server
//! is checked against the system's roots, or only against the operator's CA
//! when `jwks_ca_file` is set. The provider is reached directly
//! (`HTTPS_PROXY` is not read). A discovery document must name exactly the
//! configured issuer (OpenID Connect Discovery 1.0, section 4.3), so a
//! document served from elsewhere cannot redirect Herald to other keys.

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, LengthLimitError, Limited};
use hyper::Uri;
use hyper::header::{ACCEPT, CACHE_CONTROL, DATE, EXPIRES, HeaderMap, USER_AGENT};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde::Deserialize;

use super::KeyError;

/// Largest discovery or JWKS document read, bytes (real ones are a few KiB).
const MAX_DOCUMENT_BYTES: usize = 1 << 20;

/// Where the keys are.
#[derive(Debug)]
enum Location {
    /// A JWKS URL.
    Jwks(Uri),
    /// An OpenID Connect issuer and its discovery document's URL.
    Discovery { issuer: String, document: Uri },
}

/// A JWKS fetched from the provider.
#[derive(Debug)]
pub(crate) struct Fetched {
    /// The `keys` of the document, each as JSON: one unusable key (an
    /// algorithm Herald does not know, an encryption key) must not make the
    /// whole set unreadable.
    pub(crate) keys: Vec<serde_json::Value>,
    /// How long the response may be cached, from its headers.
    pub(crate) lifetime: Option<Duration>,
}

/// Why a fetch failed. Nothing changed: the key set keeps its last good keys.
#[derive(Debug, thiserror::Error)]
pub(crate) enum FetchError {
    /// No answer (connection, TLS, HTTP).
    #[error("GET {url}")]
    Request {
        /// The URL asked.
        url: String,
        /// hyper's error (its sources say which step failed).
        #[source]
        source: hyper_util::client::legacy::Error,
    },
    /// The body could not be read.
    #[error("GET {url}: reading the body")]
    Body {
        /// The URL asked.
        url: String,
        /// hyper's error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// No complete answer within `auth.jwks_fetch_timeout_secs`.
    #[error("GET {url}: no answer within {timeout:?}")]
    TimedOut {
        /// The URL asked.
        url: String,
        /// The limit.
        timeout: Duration,
    },
    /// The provider answered with a status other than 2xx (redirects
    /// included: they are not followed).
    #[error("GET {url}: HTTP status {status}")]
    Status {
        /// The URL asked.
        url: String,
        /// The status.
        status: u16,
    },
    /// The document is larger than [`MAX_DOCUMENT_BYTES`].
    #[error("GET {url}: the document is larger than {MAX_DOCUMENT_BYTES} bytes")]
    TooLarge {
        /// The URL asked.
        url: String,
    },
    /// The document is not what was expected.
    #[error("GET {url}: not a {what}")]
    Parse {
        /// The URL asked.
        url: String,
        /// What was expected.
        what: &'static str,
        /// The JSON error.
        #[source]
        source: serde_json::Error,
    },
    /// The discovery document names another issuer.
    #[error("GET {url}: the discovery document names issuer {found:?}, not {expected:?}")]
    IssuerMismatch {
        /// The discovery URL.
        url: String,
        /// The configured issuer.
        expected: String,
        /// The document's `issuer`.
        found: String,
    },
    /// The discovery document's `jwks_uri` is not an https:// URL.
    #[error("GET {url}: jwks_uri {jwks_uri:?} is not an https:// URL")]
    InsecureJwksUri {
        /// The discovery URL.
        url: String,
        /// The document's `jwks_uri`.
        jwks_uri: String,
    },
}

/// The part of a discovery document Herald reads.
#[derive(Deserialize)]
struct Discovery {
    issuer: String,
    jwks_uri: String,
}

/// The part of a JWKS Herald reads.
#[derive(Deserialize)]
struct KeysDocument {
    keys: Vec<serde_json::Value>,
}

/// An identity provider's keys over HTTPS.
#[derive(Debug)]
pub(crate) struct Provider {
    http: Client<HttpsConnector<HttpConnector>, Empty<Bytes>>,
    timeout: Duration,
    location: Location,
    /// The `jwks_uri` discovery found, until a fetch from it fails (the
    /// provider is then asked again).
    discovered: Mutex<Option<Uri>>,
}

impl Provider {
    /// A provider serving a JWKS at `url` (`key` names the setting).
    pub(crate) fn jwks(
        key: &str,
        url: &str,
        ca_file: Option<&str>,
        timeout: Duration,
    ) -> Result<Self, KeyError> {
        let location = Location::Jwks(https_url(key, url)?);
        Self::new(key, location, ca_file, timeout)
    }

    /// A provider found through `issuer`'s discovery document.
    pub(crate) fn discovery(
        key: &str,
        issuer: &str,
        ca_file: Option<&str>,
        timeout: Duration,
    ) -> Result<Self, KeyError> {
        let document = format!(
            "{}/.well-known/openid-configuration",
            issuer.trim_end_matches('/')
        );
        let location = Location::Discovery {
            issuer: issuer.to_owned(),
            document: https_url(key, &document)?,
        };
        Self::new(key, location, ca_file, timeout)
    }

    fn new(
        key: &str,
        location: Location,
        ca_file: Option<&str>,
        timeout: Duration,
    ) -> Result<Self, KeyError> {
        let tls = tls_config(key, ca_file)?;
        let mut connector = HttpConnector::new();
        connector.enforce_http(false);
        connector.set_connect_timeout(Some(timeout));
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_only()
            .enable_http1()
            .wrap_connector(connector);
        Ok(Provider {
            http: Client::builder(TokioExecutor::new()).build(https),
            timeout,
            location,
            discovered: Mutex::new(None),
        })
    }

    /// Fetches the current JWKS (discovering where it is first, when needed).
    pub(crate) async fn fetch(&self) -> Result<Fetched, FetchError> {
        let url = match &self.location {
            Location::Jwks(url) => url.clone(),
            Location::Discovery { issuer, document } => {
                let known = self.discovered_jwks().clone();
                match known {
                    Some(url) => url,
                    None => {
                        let url = self.discover(issuer, document).await?;
                        *self.discovered_jwks() = Some(url.clone());
                        url
                    }
                }
            }
        };
        let fetched = self.fetch_jwks(&url).await;
        if fetched.is_err() {
            // The provider may have moved its keys: ask discovery again.
            *self.discovered_jwks() = None;
        }
        fetched
    }

    fn discovered_jwks(&self) -> std::sync::MutexGuard<'_, Option<Uri>> {
        self.discovered.lock().unwrap_or_else(|p| p.into_inner())
    }

    async fn discover(&self, issuer: &str, document: &Uri) -> Result<Uri, FetchError> {
        let (body, _) = self.get(document).await?;
        let found: Discovery =
            serde_json::from_slice(&body).map_err(|source| FetchError::Parse {
                url: document.to_string(),
                what: "OpenID Connect discovery document",
                source,
            })?;
        if found.issuer != issuer {
            return Err(FetchError::IssuerMismatch {
                url: document.to_string(),
                expected: issuer.to_owned(),
                found: found.issuer,
            });
        }
        parse_https(&found.jwks_uri).ok_or(FetchError::InsecureJwksUri {
            url: document.to_string(),
            jwks_uri: found.jwks_uri,
        })
    }

    async fn fetch_jwks(&self, url: &Uri) -> Result<Fetched, FetchError> {
        let (body, headers) = self.get(url).await?;
        let document: KeysDocument =
            serde_json::from_slice(&body).map_err(|source| FetchError::Parse {
                url: url.to_string(),
                what: "JWKS document",
                source,
            })?;
        Ok(Fetched {
            keys: document.keys,
            lifetime: cache_lifetime(&headers, SystemTime::now()),
        })
    }

    /// The body (at most [`MAX_DOCUMENT_BYTES`]) and headers of a 2xx
    /// answer, within the timeout.
    async fn get(&self, url: &Uri) -> Result<(Bytes, HeaderMap), FetchError> {
        tokio::time::timeout(self.timeout, self.get_now(url))
            .await
            .map_err(|_| FetchError::TimedOut {
                url: url.to_string(),
                timeout: self.timeout,
            })?
    }

    async fn get_now(&self, url: &Uri) -> Result<(Bytes, HeaderMap), FetchError> {
        let mut request = hyper::Request::new(Empty::new());
        *request.uri_mut() = url.clone();
        let headers = request.headers_mut();
        headers.insert(
            ACCEPT,
            hyper::header::HeaderValue::from_static("application/json"),
        );
        headers.insert(
            USER_AGENT,
            hyper::header::HeaderValue::from_static(concat!(
                "herald-edge/",
                env!("CARGO_PKG_VERSION")
            )),
        );
        let response = self
            .http
            .request(request)
            .await
            .map_err(|source| FetchError::Request {
                url: url.to_string(),
                source,
            })?;
        if !response.status().is_success() {
            return Err(FetchError::Status {
                url: url.to_string(),
                status: response.status().as_u16(),
            });
        }
        let (parts, body) = response.into_parts();
        let body = Limited::new(body, MAX_DOCUMENT_BYTES)
            .collect()
            .await
            .map_err(|source| {
                if source.is::<LengthLimitError>() {
                    FetchError::TooLarge {
                        url: url.to_string(),
                    }
                } else {
                    FetchError::Body {
                        url: url.to_string(),
                        source,
                    }
                }
            })?
            .to_bytes();
        Ok((body, parts.headers))
    }
}

/// `url` parsed, when it is `https://` with a host.
fn parse_https(url: &str) -> Option<Uri> {
    url.parse::<Uri>().ok().filter(|uri| {
        uri.scheme_str() == Some("https") && uri.host().is_some_and(|h| !h.is_empty())
    })
}

/// `url` parsed, when it is https:// (else the setting `key` is invalid).
fn https_url(key: &str, url: &str) -> Result<Uri, KeyError> {
    parse_https(url).ok_or_else(|| KeyError::Invalid {
        key: key.to_owned(),
        path: url.to_owned(),
        what: "https:// URL",
    })
}

/// TLS for the provider: rustls with the ring provider, trusting the CA in
/// `ca_file` only, or else the system's roots.
fn tls_config(key: &str, ca_file: Option<&str>) -> Result<rustls::ClientConfig, KeyError> {
    use rustls_pki_types::CertificateDer;
    use rustls_pki_types::pem::PemObject;

    let mut roots = rustls::RootCertStore::empty();
    match ca_file {
        Some(path) => {
            let pem_error = |source| KeyError::Pem {
                key: format!("{key} (jwks_ca_file)"),
                path: path.to_owned(),
                source,
            };
            let certificates = CertificateDer::pem_file_iter(path)
                .map_err(pem_error)?
                .collect::<Result<Vec<_>, _>>()
                .map_err(pem_error)?;
            let (added, _) = roots.add_parsable_certificates(certificates);
            if added == 0 {
                return Err(KeyError::Invalid {
                    key: format!("{key} (jwks_ca_file)"),
                    path: path.to_owned(),
                    what: "PEM file with at least one CA certificate",
                });
            }
        }
        None => {
            let found = rustls_native_certs::load_native_certs();
            let (added, _) = roots.add_parsable_certificates(found.certs);
            if added == 0 {
                tracing::warn!(
                    setting = key,
                    problems = found.errors.len(),
                    "no system CA certificates found: signing keys cannot be fetched over HTTPS \
                     unless jwks_ca_file names the provider's CA"
                );
            }
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|source| KeyError::Tls {
            key: key.to_owned(),
            source,
        })?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(config)
}

/// How long a response may be cached, from `Cache-Control` (`no-cache` and
/// `no-store`: zero; `max-age`), else `Expires` against the response's `Date`
/// (or `now`); `None` when the headers do not say. The caller clamps it.
pub(crate) fn cache_lifetime(headers: &HeaderMap, now: SystemTime) -> Option<Duration> {
    let directives = headers
        .get_all(CACHE_CONTROL)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .map(str::trim);
    let mut max_age = None;
    for directive in directives {
        let directive = directive.to_ascii_lowercase();
        if directive == "no-cache" || directive == "no-store" {
            return Some(Duration::ZERO);
        }
        if let Some(seconds) = directive.strip_prefix("max-age=") {
            max_age = seconds
                .trim_matches('"')
                .parse()
                .ok()
                .map(Duration::from_secs);
        }
    }
    if max_age.is_some() {
        return max_age;
    }
    let date = |name| {
        headers
            .get(name)
            .and_then(|value| value.to_str().ok())
            .and_then(|value| httpdate::parse_http_date(value).ok())
    };
    let expires = date(EXPIRES)?;
    let now = date(DATE).unwrap_or(now);
    Some(expires.duration_since(now).unwrap_or(Duration::ZERO))
}

#[cfg(test)]
mod tests {
    use super::*;
    use hyper::header::{HeaderName, HeaderValue};

    fn headers(pairs: &[(HeaderName, &'static str)]) -> HeaderMap {
        let mut headers = HeaderMap::new();
        for (name, value) in pairs {
            headers.append(name.clone(), HeaderValue::from_static(value));
        }
        headers
    }

    #[test]
    fn max_age_gives_the_lifetime_and_no_cache_gives_zero() {
        let now = SystemTime::now();
        let auth0 = headers(&[(
            CACHE_CONTROL,
            "public, max-age=15, stale-while-revalidate=15, stale-if-error=86400",
        )]);
        assert_eq!(cache_lifetime(&auth0, now), Some(Duration::from_secs(15)));
        let keycloak = headers(&[(CACHE_CONTROL, "no-cache")]);
        assert_eq!(cache_lifetime(&keycloak, now), Some(Duration::ZERO));
        assert_eq!(cache_lifetime(&HeaderMap::new(), now), None);
        let garbage = headers(&[(CACHE_CONTROL, "max-age=soon")]);
        assert_eq!(cache_lifetime(&garbage, now), None);
    }

    #[test]
    fn expires_counts_from_the_response_date_and_a_past_date_is_zero() {
        let now = SystemTime::now();
        let fixed = headers(&[
            (DATE, "Wed, 02 Dec 2026 08:00:00 GMT"),
            (EXPIRES, "Wed, 02 Dec 2026 09:00:00 GMT"),
        ]);
        assert_eq!(cache_lifetime(&fixed, now), Some(Duration::from_secs(3600)));
        let past = headers(&[(EXPIRES, "Thu, 01 Jan 1970 00:00:00 GMT")]);
        assert_eq!(cache_lifetime(&past, now), Some(Duration::ZERO));
        let both = headers(&[
            (CACHE_CONTROL, "max-age=60"),
            (EXPIRES, "Thu, 01 Jan 1970 00:00:00 GMT"),
        ]);
        assert_eq!(
            cache_lifetime(&both, now),
            Some(Duration::from_secs(60)),
            "max-age wins over Expires"
        );
    }

    #[test]
    fn only_https_urls_are_accepted() {
        assert!(https_url("auth.jwks_url", "https://idp.example.com/keys").is_ok());
        for bad in ["http://idp.example.com/keys", "idp.example.com", "https://"] {
            assert!(https_url("auth.jwks_url", bad).is_err(), "{bad}");
        }
    }
}
