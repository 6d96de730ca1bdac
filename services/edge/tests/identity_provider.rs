//! Signing keys from an identity provider over HTTPS (`auth.oidc_issuer`,
//! `auth.jwks_url`, `[[auth.issuers]]`).
//!
//! Keycloak and Auth0 cannot run here; a real OpenID Connect provider can:
//! panva's node-oidc-provider (OpenID Certified, from npm, installed by
//! `make sse-clients`) issues the access token of
//! [`an_access_token_from_a_real_openid_provider_opens_a_stream`]. What a
//! provider cannot be made to do on cue (rotate mid-stream, fail, go down,
//! count requests) is done by [`Provider`]: a real HTTPS server on a loopback
//! port run by the test, serving an OpenID Connect discovery document and a
//! JWKS the test rotates, takes down (connections dropped, or 503) and counts
//! requests on. Every provider has a CA and certificate generated for the test
//! (the node trusts only that CA, through `jwks_ca_file`); tokens are ES256,
//! signed with keys generated per test. The node is the real edge node on a
//! real socket; streams are real SSE.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use herald_config::{IssuerSettings, Settings};
use herald_edge::{Claims, expiry_in};
use herald_testkit::{EdgeNode, PATIENCE, SseClient, publish_to_user};
use http_body_util::Full;
use jsonwebtoken::jwk::{Jwk, JwkSet};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// How the provider answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Discovery and JWKS are served.
    Up,
    /// Every connection is closed at once (the provider is down).
    Refusing,
    /// Every request gets 503 (the provider is up but failing).
    Failing,
}

/// What the provider serves; the test changes it while the node runs.
struct Served {
    mode: Mode,
    keys: Vec<Jwk>,
    cache_control: &'static str,
}

/// An HTTPS identity provider run by the test.
struct Provider {
    /// `https://127.0.0.1:<port>/realms/test`: the discovery base and `iss`.
    issuer: String,
    /// The PEM file of the CA that signed the server's certificate.
    ca_file: std::path::PathBuf,
    served: Arc<Mutex<Served>>,
    jwks_fetches: Arc<AtomicUsize>,
    stop: CancellationToken,
    _dir: TempDir,
}

impl Provider {
    /// Starts a provider serving `keys`.
    async fn start(keys: &[&SigningKey]) -> Provider {
        let dir = TempDir::new("herald-idp");
        let certificates = Certificates::write(&dir.0);
        let ca_file = certificates.ca_file.clone();
        let tls = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("TLS versions")
        .with_no_client_auth()
        .with_single_cert(vec![certificates.cert], certificates.key)
        .expect("TLS config");
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let issuer = format!("https://{addr}/realms/test");
        let served = Arc::new(Mutex::new(Served {
            mode: Mode::Up,
            keys: keys.iter().map(|key| key.jwk.clone()).collect(),
            // Long: in these tests only unknown kids and failures refresh.
            cache_control: "public, max-age=3600",
        }));
        let jwks_fetches = Arc::new(AtomicUsize::new(0));
        let stop = CancellationToken::new();
        tokio::spawn(serve(
            listener,
            acceptor,
            Routes {
                addr,
                issuer: issuer.clone(),
                served: Arc::clone(&served),
                jwks_fetches: Arc::clone(&jwks_fetches),
            },
            stop.clone(),
        ));
        Provider {
            issuer,
            ca_file,
            served,
            jwks_fetches,
            stop,
            _dir: dir,
        }
    }

    fn set_mode(&self, mode: Mode) {
        self.served.lock().expect("lock").mode = mode;
    }

    fn set_keys(&self, keys: &[&SigningKey]) {
        self.served.lock().expect("lock").keys = keys.iter().map(|key| key.jwk.clone()).collect();
    }

    fn set_cache_control(&self, value: &'static str) {
        self.served.lock().expect("lock").cache_control = value;
    }

    /// Changes the keys and the cache lifetime at once.
    fn set_keys_and_cache_control(&self, keys: &[&SigningKey], cache_control: &'static str) {
        let mut served = self.served.lock().expect("lock");
        served.keys = keys.iter().map(|key| key.jwk.clone()).collect();
        served.cache_control = cache_control;
    }

    /// The provider's JWKS URL (what discovery names).
    fn jwks_url(&self) -> String {
        format!("{}/certs", self.issuer)
    }

    fn jwks_fetches(&self) -> usize {
        self.jwks_fetches.load(Ordering::SeqCst)
    }

    /// `[[auth.issuers]]` for this provider, found by discovery.
    fn issuer_settings(&self, audience: &str) -> IssuerSettings {
        IssuerSettings {
            oidc_issuer: Some(self.issuer.clone()),
            audience: Some(audience.into()),
            algorithms: vec!["ES256".into()],
            jwks_ca_file: Some(self.ca_file.display().to_string()),
            ..Default::default()
        }
    }

    /// A subscriber token for `user` from this provider, signed with `key`.
    fn token(&self, key: &SigningKey, user: &str, audience: &str) -> String {
        key.sign(&Claims {
            sub: Some(user.into()),
            iss: Some(self.issuer.clone()),
            aud: Some(audience.into()),
            exp: expiry_in(Duration::from_secs(600)),
            ..Default::default()
        })
    }
}

impl Drop for Provider {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

#[derive(Clone)]
struct Routes {
    addr: SocketAddr,
    issuer: String,
    served: Arc<Mutex<Served>>,
    jwks_fetches: Arc<AtomicUsize>,
}

impl Routes {
    fn answer(&self, path: &str) -> hyper::Response<Full<Bytes>> {
        let served = self.served.lock().expect("lock");
        if served.mode == Mode::Failing {
            return response(503, "no-store", json!({"error": "temporarily_unavailable"}));
        }
        match path {
            "/realms/test/.well-known/openid-configuration" => response(
                200,
                "no-cache",
                json!({
                    "issuer": self.issuer,
                    "jwks_uri": format!("https://{}/realms/test/certs", self.addr),
                }),
            ),
            "/realms/test/certs" => {
                self.jwks_fetches.fetch_add(1, Ordering::SeqCst);
                let set = JwkSet {
                    keys: served.keys.clone(),
                };
                response(200, served.cache_control, json!(set))
            }
            _ => response(404, "no-store", json!({"error": "not_found"})),
        }
    }
}

fn response(status: u16, cache_control: &str, body: Value) -> hyper::Response<Full<Bytes>> {
    hyper::Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .header("cache-control", cache_control)
        .body(Full::new(Bytes::from(body.to_string())))
        .expect("valid response")
}

/// Accepts connections until `stop`: drops them while refusing, else serves
/// HTTP/1.1 over TLS.
async fn serve(
    listener: TcpListener,
    acceptor: tokio_rustls::TlsAcceptor,
    routes: Routes,
    stop: CancellationToken,
) {
    loop {
        let socket = tokio::select! {
            _ = stop.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok((socket, _)) => socket,
                Err(_) => continue,
            },
        };
        if routes.served.lock().expect("lock").mode == Mode::Refusing {
            drop(socket);
            continue;
        }
        let acceptor = acceptor.clone();
        let routes = routes.clone();
        tokio::spawn(async move {
            let Ok(tls) = acceptor.accept(socket).await else {
                return;
            };
            let service = hyper::service::service_fn(move |request: hyper::Request<_>| {
                let answer = routes.answer(request.uri().path());
                async move { Ok::<_, std::convert::Infallible>(answer) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(tls), service)
                .await;
        });
    }
}

/// A CA made for the test and a certificate it signed for 127.0.0.1, also
/// written as PEM files (`ca.pem`, `server.pem`, `server-key.pem`).
struct Certificates {
    ca_file: std::path::PathBuf,
    cert_file: std::path::PathBuf,
    key_file: std::path::PathBuf,
    cert: rustls_pki_types::CertificateDer<'static>,
    key: rustls_pki_types::PrivateKeyDer<'static>,
}

impl Certificates {
    fn write(dir: &std::path::Path) -> Certificates {
        let ca_key = rcgen::KeyPair::generate().expect("CA key");
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "herald test CA");
        let ca = rcgen::CertifiedIssuer::self_signed(ca_params, ca_key).expect("CA");
        let server_key = rcgen::KeyPair::generate().expect("server key");
        let server_cert = rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned()])
            .expect("params")
            .signed_by(&server_key, &*ca)
            .expect("server certificate");
        let certificates = Certificates {
            ca_file: dir.join("ca.pem"),
            cert_file: dir.join("server.pem"),
            key_file: dir.join("server-key.pem"),
            cert: server_cert.der().clone(),
            key: rustls_pki_types::PrivateKeyDer::try_from(server_key.serialize_der())
                .expect("server key DER"),
        };
        std::fs::write(&certificates.ca_file, ca.pem()).expect("write CA");
        std::fs::write(&certificates.cert_file, server_cert.pem()).expect("write certificate");
        std::fs::write(&certificates.key_file, server_key.serialize_pem()).expect("write key");
        certificates
    }
}

/// An ES256 signing key generated for the test, with its public JWK.
struct SigningKey {
    kid: String,
    key: EncodingKey,
    jwk: Jwk,
}

impl SigningKey {
    fn generate(kid: &str) -> SigningKey {
        let pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("P-256 key");
        let key = EncodingKey::from_ec_pem(pair.serialize_pem().as_bytes()).expect("PKCS#8 key");
        let mut jwk = Jwk::from_encoding_key(&key, Algorithm::ES256).expect("JWK");
        jwk.common.key_id = Some(kid.into());
        SigningKey {
            kid: kid.into(),
            key,
            jwk,
        }
    }

    fn sign(&self, claims: &Claims) -> String {
        self.sign_as(&self.kid, claims)
    }

    /// Signs naming any `kid` (a forgery when it is not this key's).
    fn sign_as(&self, kid: &str, claims: &Claims) -> String {
        let mut header = Header::new(Algorithm::ES256);
        header.kid = Some(kid.into());
        jsonwebtoken::encode(&header, claims, &self.key).expect("signed")
    }
}

/// A directory removed on drop.
struct TempDir(std::path::PathBuf);

impl TempDir {
    fn new(prefix: &str) -> TempDir {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let path = std::env::temp_dir().join(format!(
            "{prefix}-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::SeqCst)
        ));
        std::fs::create_dir_all(&path).expect("temp dir");
        TempDir(path)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Node settings: the test's HS256 secret (any `iss`, for the publisher
/// credential the tests publish with) plus `issuers`; one second between
/// fetches at least, and a short start-up wait.
fn with_issuers(settings: &mut Settings, issuers: Vec<IssuerSettings>) {
    settings.auth.issuers = issuers;
    settings.auth.jwks_min_refresh_secs = 1;
    settings.auth.jwks_start_wait_secs = 5;
}

/// A node trusting `provider` (audience `herald`) and the HS256 test
/// secret, started (its keys loaded), and when that was.
async fn node_trusting(provider: &Provider) -> (EdgeNode, tokio::time::Instant) {
    let node = EdgeNode::start(|s| with_issuers(s, vec![provider.issuer_settings("herald")]))
        .await
        .expect("node starts");
    (node, tokio::time::Instant::now())
}

/// Waits until `auth.jwks_min_refresh_secs` (1 s here) has passed since the
/// keys were loaded at `loaded_at`: from then on, an unknown `kid` may make
/// one fetch. (A precondition, not a race: the rate limit is time itself.)
async fn past_min_interval(loaded_at: tokio::time::Instant) {
    tokio::time::sleep_until(loaded_at + Duration::from_millis(1_100)).await;
}

/// Asks for a stream with `token`: the status, and the JSON error body of a
/// refusal (`null` for a 200, whose stream is then closed).
async fn attempt(node: &EdgeNode, token: &str) -> (u16, Value) {
    let response = reqwest::Client::new()
        .get(node.url("/v1/stream"))
        .bearer_auth(token)
        .send()
        .await
        .expect("request");
    let status = response.status().as_u16();
    if status == 200 {
        return (status, Value::Null);
    }
    let body = response.bytes().await.expect("body");
    (
        status,
        serde_json::from_slice(&body).expect("a JSON error body"),
    )
}

/// Opens a stream with `token`, which must be accepted.
async fn open(node: &EdgeNode, token: &str) -> SseClient {
    let stream = SseClient::connect(
        &node.url("/v1/stream"),
        &[("authorization", &format!("Bearer {token}"))],
    )
    .await
    .expect("request");
    assert_eq!(stream.status, 200, "stream refused");
    stream
}

async fn readyz(node: &EdgeNode) -> (u16, Value) {
    let response = reqwest::get(node.admin_url("/readyz"))
        .await
        .expect("readyz");
    let status = response.status().as_u16();
    let body = serde_json::from_slice(&response.bytes().await.expect("body")).expect("JSON");
    (status, body)
}

/// The value of the counter line starting with `prefix` in `/metrics`.
fn counter(node: &EdgeNode, prefix: &str) -> u64 {
    node.handle
        .metrics_text()
        .lines()
        .find(|line| line.starts_with(prefix))
        .and_then(|line| line.rsplit(' ').next())
        .and_then(|value| value.parse().ok())
        .unwrap_or(0)
}

/// A token and the user whose stream it opens, from the OIDC issuer set at the
/// top level (`auth.oidc_issuer`): discovery at start, the iss required, and
/// a token from any other issuer refused with a 401 naming the problem.
#[tokio::test]
async fn keys_are_discovered_from_the_issuer_and_tokens_of_another_issuer_are_refused() {
    let key = SigningKey::generate("2026-a");
    let provider = Provider::start(&[&key]).await;
    let node = EdgeNode::start(|s| {
        s.auth.hs256_secret = None;
        s.auth.algorithms = vec!["ES256".into()];
        s.auth.oidc_issuer = Some(provider.issuer.clone());
        s.auth.jwks_ca_file = Some(provider.ca_file.display().to_string());
    })
    .await
    .expect("node starts");
    assert_eq!(
        readyz(&node).await.0,
        200,
        "keys were loaded before serving"
    );
    assert_eq!(provider.jwks_fetches(), 1);

    let (status, body) = attempt(&node, &provider.token(&key, "alice", "any")).await;
    assert_eq!(status, 200, "{body}");

    // Signed by the provider's own key, but claiming another issuer.
    let claims = Claims {
        sub: Some("alice".into()),
        iss: Some("https://evil.example.com/".into()),
        exp: expiry_in(Duration::from_secs(600)),
        ..Default::default()
    };
    let (status, body) = attempt(&node, &key.sign(&claims)).await;
    assert_eq!(status, 401, "{body}");
    assert_eq!(body["error"], "unauthorized");
    assert_eq!(body["message"], "invalid token: wrong issuer");

    // A token from another provider altogether (its own key and iss).
    let stranger_key = SigningKey::generate("2026-a");
    let stranger = Provider::start(&[&stranger_key]).await;
    let (status, body) = attempt(&node, &stranger.token(&stranger_key, "alice", "any")).await;
    assert_eq!(status, 401, "{body}");
    assert_eq!(body["message"], "invalid token: wrong issuer");
}

/// The provider rotates to a new key mid-stream: the open stream keeps
/// receiving events, a token with the new `kid` is accepted after one
/// immediate fetch, and the retired key's tokens are refused.
#[tokio::test]
async fn a_rotated_key_is_fetched_when_a_token_names_it_and_open_streams_keep_going() {
    let old = SigningKey::generate("2026-a");
    let new = SigningKey::generate("2026-b");
    let provider = Provider::start(&[&old]).await;
    let (node, loaded_at) = node_trusting(&provider).await;
    let mut stream = open(&node, &provider.token(&old, "alice", "herald")).await;

    provider.set_keys(&[&new]);
    publish_to_user(&node, "alice", "after rotation")
        .await
        .expect("publish");
    let event = stream.next_event(PATIENCE).await.expect("stream goes on");
    assert_eq!(event.data, "after rotation");

    past_min_interval(loaded_at).await;
    let fetches = provider.jwks_fetches();
    let mut bob = open(&node, &provider.token(&new, "bob", "herald")).await;
    assert_eq!(
        provider.jwks_fetches(),
        fetches + 1,
        "one fetch for the new kid"
    );
    publish_to_user(&node, "bob", "hello bob")
        .await
        .expect("publish");
    assert_eq!(
        bob.next_event(PATIENCE).await.expect("event").data,
        "hello bob"
    );

    let (status, body) = attempt(&node, &provider.token(&old, "alice", "herald")).await;
    assert_eq!(status, 401, "{body}");
    assert_eq!(body["message"], "invalid token: unknown key id");
    publish_to_user(&node, "alice", "still here")
        .await
        .expect("publish");
    assert_eq!(
        stream.next_event(PATIENCE).await.expect("event").data,
        "still here"
    );
}

/// Keys are fetched again when the response's cache lifetime ends
/// (`Cache-Control: max-age`, here 1 s, the configured minimum), with no
/// token asking: a rotation reaches the node on schedule.
#[tokio::test]
async fn keys_are_fetched_again_when_their_cache_lifetime_ends() {
    let old = SigningKey::generate("2026-a");
    let new = SigningKey::generate("2026-b");
    let provider = Provider::start(&[&old]).await;
    provider.set_cache_control("public, max-age=1");
    let (node, _) = node_trusting(&provider).await;
    // Rotate; the next answer also says to keep the keys an hour.
    provider.set_keys_and_cache_control(&[&old, &new], "public, max-age=3600");
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while counter(&node, "herald_jwks_keys{") != 2 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the rotation never arrived: {}",
            node.handle.metrics_text()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let throttled = counter(&node, "herald_jwks_refresh_throttled_total{");
    let fetches = provider.jwks_fetches();
    let (status, body) = attempt(&node, &provider.token(&new, "bob", "herald")).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        provider.jwks_fetches(),
        fetches,
        "the new kid was already there: no fetch for it"
    );
    assert_eq!(
        counter(&node, "herald_jwks_refresh_throttled_total{"),
        throttled
    );
}

/// Hundreds of tokens naming made-up `kid`s are all refused, and make at
/// most one fetch per `auth.jwks_min_refresh_secs` (counted at the provider).
#[tokio::test]
async fn a_flood_of_unknown_kids_makes_at_most_one_fetch_per_minimum_interval() {
    let key = SigningKey::generate("real");
    let attacker = SigningKey::generate("attacker");
    let provider = Provider::start(&[&key]).await;
    let (node, loaded_at) = node_trusting(&provider).await;
    past_min_interval(loaded_at).await;

    let before = provider.jwks_fetches();
    let started = tokio::time::Instant::now();
    let client = reqwest::Client::new();
    let url = node.url("/v1/stream");
    let claims = Claims {
        sub: Some("mallory".into()),
        iss: Some(provider.issuer.clone()),
        aud: Some("herald".into()),
        exp: expiry_in(Duration::from_secs(600)),
        ..Default::default()
    };
    const FORGED: usize = 300;
    let mut requests = tokio::task::JoinSet::new();
    for n in 0..FORGED {
        let token = attacker.sign_as(&format!("forged-{n}"), &claims);
        let (client, url) = (client.clone(), url.clone());
        requests.spawn(async move {
            let response = client
                .get(url)
                .bearer_auth(token)
                .send()
                .await
                .expect("request");
            let status = response.status().as_u16();
            let body: Value =
                serde_json::from_slice(&response.bytes().await.expect("body")).expect("JSON error");
            (status, body)
        });
    }
    while let Some(answer) = requests.join_next().await {
        let (status, body) = answer.expect("request task");
        assert_eq!(status, 401, "{body}");
        assert_eq!(body["message"], "invalid token: unknown key id");
    }
    let elapsed = started.elapsed();
    let fetches = provider.jwks_fetches() - before;
    let allowed = elapsed.as_secs() as usize + 1;
    eprintln!("{FORGED} forged kids in {elapsed:?}: {fetches} JWKS fetch(es)");
    assert!(
        fetches >= 1,
        "an unknown kid after the interval refreshes once"
    );
    assert!(
        fetches <= allowed,
        "{FORGED} forged kids in {elapsed:?} made {fetches} fetches; at most {allowed} allowed"
    );
    let throttled = counter(&node, "herald_jwks_refresh_throttled_total{");
    assert!(
        throttled >= (FORGED - fetches) as u64,
        "every forged kid without a fetch is counted: {throttled}"
    );
}

/// With the provider down at start, the node starts after the bounded wait,
/// `/readyz` answers 503 naming the missing keys and why, a stream is told to
/// come back later (not a 401 that would send the user to sign in again);
/// when the provider comes up the node becomes ready by itself.
#[tokio::test]
async fn a_provider_down_at_start_leaves_the_node_unready_until_it_comes_up() {
    let key = SigningKey::generate("2026-a");
    let provider = Provider::start(&[&key]).await;
    provider.set_mode(Mode::Refusing);
    let started = tokio::time::Instant::now();
    let node = EdgeNode::start(|s| {
        with_issuers(s, vec![provider.issuer_settings("herald")]);
        s.auth.jwks_start_wait_secs = 1;
    })
    .await
    .expect("node starts without keys");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "start-up waited {:?}",
        started.elapsed()
    );
    let (status, body) = readyz(&node).await;
    assert_eq!(status, 503, "{body}");
    assert!(
        body["reasons"]
            .as_array()
            .expect("reasons")
            .contains(&json!("signing_keys_unavailable")),
        "{body}"
    );
    assert_eq!(body["signing_keys"][0]["issuer"], provider.issuer.as_str());
    eprintln!("/readyz while the provider is down: {body}");
    let error = body["signing_keys"][0]["error"].as_str().expect("why");
    assert!(
        error.contains("/.well-known/openid-configuration"),
        "{error}"
    );

    let token = provider.token(&key, "alice", "herald");
    let mut refused = open(&node, &token).await;
    let items = refused.until_end(PATIENCE).await.expect("a short answer");
    assert_eq!(
        items.first(),
        Some(&herald_protocol::sse::Item::Comment(
            "keys_unavailable".into()
        )),
        "{items:?}"
    );
    assert!(
        items
            .iter()
            .any(|item| matches!(item, herald_protocol::sse::Item::Retry(_))),
        "the browser is told when to come back: {items:?}"
    );

    provider.set_mode(Mode::Up);
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while readyz(&node).await.0 != 200 {
        assert!(tokio::time::Instant::now() < deadline, "never became ready");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (status, body) = attempt(&node, &token).await;
    assert_eq!(status, 200, "{body}");
    assert!(counter(&node, "herald_jwks_refreshes_total{issuer=") >= 1);
}

/// The provider fails while it rotates: the unknown `kid` cannot be fetched,
/// the failure is logged and counted, the last good keys keep working and the
/// node stays ready; when the provider recovers, the new key is accepted.
#[tokio::test]
async fn a_provider_down_during_a_rotation_keeps_the_last_good_keys() {
    let old = SigningKey::generate("2026-a");
    let new = SigningKey::generate("2026-b");
    let provider = Provider::start(&[&old]).await;
    let (node, loaded_at) = node_trusting(&provider).await;
    provider.set_mode(Mode::Failing);
    provider.set_keys(&[&old, &new]);
    past_min_interval(loaded_at).await;

    let (status, body) = attempt(&node, &provider.token(&new, "bob", "herald")).await;
    assert_eq!(status, 401, "{body}");
    let failed = format!(
        "herald_jwks_refreshes_total{{issuer=\"{}\",outcome=\"failed\"}}",
        provider.issuer
    );
    assert!(
        counter(&node, &failed) >= 1,
        "{}",
        node.handle.metrics_text()
    );
    let (status, body) = attempt(&node, &provider.token(&old, "alice", "herald")).await;
    assert_eq!(status, 200, "the last good keys still verify: {body}");
    assert_eq!(readyz(&node).await.0, 200, "a node with keys stays ready");

    provider.set_mode(Mode::Up);
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let (status, _) = attempt(&node, &provider.token(&new, "bob", "herald")).await;
        if status == 200 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "new key never accepted"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Two issuers at once (multi-tenant; one found by discovery, one by its
/// JWKS URL): each token is verified by the issuer its `iss` names, with that
/// issuer's keys and audience only.
#[tokio::test]
async fn two_issuers_each_with_its_own_keys_and_audience() {
    let key_a = SigningKey::generate("shared-kid");
    let key_b = SigningKey::generate("shared-kid");
    let tenant_a = Provider::start(&[&key_a]).await;
    let tenant_b = Provider::start(&[&key_b]).await;
    // Tenant B by its JWKS URL rather than discovery.
    let by_url = IssuerSettings {
        issuer: Some(tenant_b.issuer.clone()),
        oidc_issuer: None,
        jwks_url: Some(tenant_b.jwks_url()),
        ..tenant_b.issuer_settings("herald-b")
    };
    let node =
        EdgeNode::start(|s| with_issuers(s, vec![tenant_a.issuer_settings("herald-a"), by_url]))
            .await
            .expect("node starts");
    assert_eq!(readyz(&node).await.0, 200);

    for (tenant, key, audience) in [
        (&tenant_a, &key_a, "herald-a"),
        (&tenant_b, &key_b, "herald-b"),
    ] {
        let (status, body) = attempt(&node, &tenant.token(key, "alice", audience)).await;
        assert_eq!(status, 200, "{} {body}", tenant.issuer);
    }
    let (status, body) = attempt(&node, &tenant_a.token(&key_a, "alice", "herald-b")).await;
    assert_eq!(status, 401);
    assert_eq!(body["message"], "invalid token: wrong audience");
    // Tenant A's key, same kid, claiming to be tenant B.
    let (status, body) = attempt(&node, &tenant_b.token(&key_a, "alice", "herald-b")).await;
    assert_eq!(status, 401);
    assert_eq!(body["message"], "invalid token: bad signature");
}

/// The folder holding the npm tools (`HERALD_SSE_CLIENTS`, set by the
/// Makefile), with node-oidc-provider installed.
fn npm_tools_dir() -> std::path::PathBuf {
    let dir = std::env::var_os("HERALD_SSE_CLIENTS")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| {
            std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tools/sse-clients")
        });
    assert!(
        dir.join("node_modules/oidc-provider").is_dir(),
        "node-oidc-provider is not installed in {}: run `make sse-clients`",
        dir.display()
    );
    dir
}

/// A real OpenID Connect provider: panva's node-oidc-provider (OpenID
/// Certified), run with Node.js over HTTPS with the test's certificate. Its
/// access token (ES256, its own `kid`, `iss`, `aud`, `sub` = the client id)
/// opens a stream on a node configured only with its issuer URL; the node
/// found the keys through the provider's own discovery document. The HS256
/// secret beside it keeps verifying the backend's publisher credential.
#[tokio::test]
async fn an_access_token_from_a_real_openid_provider_opens_a_stream() {
    use tokio::io::AsyncBufReadExt;
    const AUDIENCE: &str = "https://herald.example.com/";
    let dir = TempDir::new("herald-oidc-provider");
    let certificates = Certificates::write(&dir.0);
    let mut provider = tokio::process::Command::new("node")
        .arg(npm_tools_dir().join("oidc-provider.mjs"))
        .arg(&certificates.cert_file)
        .arg(&certificates.key_file)
        .arg(&certificates.ca_file)
        .arg(AUDIENCE)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("node runs");
    let stdout = provider.stdout.take().expect("stdout");
    let mut lines = tokio::io::BufReader::new(stdout).lines();
    // node-oidc-provider prints its notices on stdout too: the answer is the
    // JSON line.
    let started: Value = tokio::time::timeout(PATIENCE, async {
        loop {
            let line = lines.next_line().await.expect("stdout");
            let line = line.expect("the provider printed its issuer and a token");
            if let Ok(started) = serde_json::from_str::<Value>(&line) {
                return started;
            }
        }
    })
    .await
    .expect("the provider starts in time");
    let issuer = started["issuer"].as_str().expect("issuer").to_owned();
    let token = started["token"].as_str().expect("token").to_owned();

    let node = EdgeNode::start(|s| {
        s.auth.algorithms = vec!["HS256".into(), "ES256".into()];
        s.auth.oidc_issuer = Some(issuer.clone());
        s.auth.audience = Some(AUDIENCE.into());
        s.auth.jwks_ca_file = Some(certificates.ca_file.display().to_string());
    })
    .await
    .expect("node starts");
    assert_eq!(readyz(&node).await.0, 200, "keys discovered at start");

    let mut stream = open(&node, &token).await;
    publish_to_user(&node, "herald-test-client", "from the provider's client")
        .await
        .expect("publish with the backend's HS256 credential");
    assert_eq!(
        stream.next_event(PATIENCE).await.expect("event").data,
        "from the provider's client"
    );
    // Same token, another audience's node: refused, naming the problem.
    let other = EdgeNode::start(|s| {
        s.auth.hs256_secret = None;
        s.auth.algorithms = vec!["ES256".into()];
        s.auth.oidc_issuer = Some(issuer.clone());
        s.auth.audience = Some("https://other.example.com/".into());
        s.auth.jwks_ca_file = Some(certificates.ca_file.display().to_string());
    })
    .await
    .expect("node starts");
    let (status, body) = attempt(&other, &token).await;
    assert_eq!(status, 401, "{body}");
    assert_eq!(body["message"], "invalid token: wrong audience");
    drop(provider);
}
