//! Herald's settings, loaded in layers: built-in defaults, then an optional TOML
//! file, then environment variables `HERALD__SECTION__KEY` (a double underscore
//! between every level, e.g. `HERALD__HTTP__LISTEN=127.0.0.1:8080`).
//!
//! [`Settings::load`] refuses unknown keys (a typo must not be silently ignored)
//! and runs [`Settings::validate`], which reports every problem at once, each
//! naming its key. Every field documents its unit and default; the same list is
//! in `docs/configuration.md`.

use std::fmt;
use std::net::SocketAddr;
use std::path::Path;

use serde::{Deserialize, Serialize};

/// Prefix of the environment variables read by [`Settings::load`].
pub const ENV_PREFIX: &str = "HERALD";

/// Everything a Herald edge node can be configured with.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Settings {
    /// This node's identity.
    pub node: NodeSettings,
    /// The HTTP listener and its limits.
    pub http: HttpSettings,
    /// SSE stream behaviour and per-connection limits.
    pub stream: StreamSettings,
    /// Which event bus carries events between publishers and nodes.
    pub bus: BusSettings,
    /// The embedded single-node bus (`bus.kind = "memory"`).
    pub memory: MemoryBusSettings,
    /// The NATS JetStream bus (`bus.kind = "nats"`).
    pub nats: NatsSettings,
    /// Token validation.
    pub auth: AuthSettings,
    /// Logs (and, later, traces and metrics export).
    pub telemetry: TelemetrySettings,
    /// Gossip membership: the cluster view, draining and rebalancing.
    pub gossip: GossipSettings,
    /// Moving streams off a node that holds more than its share.
    pub rebalance: RebalanceSettings,
}

/// This node's identity.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct NodeSettings {
    /// Node id shown in logs and cluster views. Default: the `HOSTNAME`
    /// environment variable, else `herald-<process id>`.
    pub id: Option<String>,
    /// The URL other nodes and operators use to reach this node's HTTP
    /// listener, shown in `/v1/cluster`, e.g. `http://edge-1:8080`. Default:
    /// `http://<gossip.advertise host>:<http.listen port>`.
    pub http_advertise: Option<String>,
}

impl NodeSettings {
    /// The configured id, or the documented fallback.
    pub fn resolved_id(&self) -> String {
        self.id
            .clone()
            .filter(|id| !id.is_empty())
            .or_else(|| std::env::var("HOSTNAME").ok().filter(|h| !h.is_empty()))
            .unwrap_or_else(|| format!("herald-{}", std::process::id()))
    }
}

/// The HTTP listener and its limits.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpSettings {
    /// Address to listen on. Default `127.0.0.1:8080`; use `0.0.0.0:8080` in
    /// containers. Port 0 picks a free port (tests).
    pub listen: String,
    /// Largest accepted request body (`POST /v1/publish`), bytes. Default 65536.
    pub max_body_bytes: u64,
    /// Time a client has to send its complete request headers, milliseconds.
    /// Closes slowloris connections. Default 10000.
    pub header_read_timeout_ms: u64,
    /// Largest request head (request line plus headers), bytes; larger requests
    /// get 431. Default 16384, minimum 8192.
    pub max_header_bytes: usize,
    /// On shutdown, how long open requests may take to finish before they are
    /// cut, milliseconds. Default 10000.
    pub shutdown_grace_ms: u64,
    /// Browser origins allowed to call Herald from another origin (CORS), e.g.
    /// `https://app.example.com`; `*` allows any origin. Credentials (the token
    /// cookie) are allowed for listed origins. Comma-separated in the
    /// environment. Default: none (no CORS headers).
    pub cors_allowed_origins: Vec<String>,
    /// Publishes accepted per second from one publisher credential over HTTP
    /// (a token bucket allowing bursts of the same size); more get 429 with
    /// `Retry-After`. Default 1000.
    pub publish_rate_per_sec: u32,
}

impl Default for HttpSettings {
    fn default() -> Self {
        HttpSettings {
            listen: "127.0.0.1:8080".into(),
            max_body_bytes: 64 * 1024,
            header_read_timeout_ms: 10_000,
            max_header_bytes: 16 * 1024,
            shutdown_grace_ms: 10_000,
            cors_allowed_origins: Vec::new(),
            publish_rate_per_sec: 1000,
        }
    }
}

impl HttpSettings {
    /// The listen address. Valid after [`Settings::validate`].
    pub fn listen_addr(&self) -> Result<SocketAddr, std::net::AddrParseError> {
        self.listen.parse()
    }
}

/// SSE stream behaviour and per-connection limits.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct StreamSettings {
    /// Interval between heartbeat comments on an idle stream, milliseconds.
    /// Keep it below every proxy's idle timeout. Default 15000.
    pub heartbeat_ms: u64,
    /// Base of the `retry:` reconnection hint sent to clients, milliseconds.
    /// Default 1000.
    pub retry_ms: u64,
    /// Random extra added to `retry_ms` per connection, up to this many
    /// milliseconds, so clients of a closed node do not reconnect in lockstep.
    /// Default 2000.
    pub retry_jitter_ms: u64,
    /// Events that may wait in one connection's queue. When a client reads so
    /// slowly that its queue fills, it is disconnected (it resumes from its last
    /// id). Default 256.
    pub queue_capacity: usize,
    /// Most bytes written to a socket in one go when events are queued. Default
    /// 65536.
    pub max_batch_bytes: usize,
    /// Most `topic=` parameters on one stream. Default 32.
    pub max_topics: usize,
    /// Most events replayed to one reconnecting client; a client owed more gets
    /// `herald.reset` instead. Default 10000.
    pub max_replay_events: usize,
    /// Most open streams on this node. Default 100000.
    pub max_connections: usize,
    /// Most open streams of one user on this node. Default 32.
    pub max_connections_per_user: usize,
    /// On shutdown, open streams are closed (each with a `retry:` hint) at
    /// random moments spread over this window, milliseconds, so their clients
    /// do not all reconnect elsewhere at once. Default 3000.
    pub drain_ms: u64,
}

impl Default for StreamSettings {
    fn default() -> Self {
        StreamSettings {
            heartbeat_ms: 15_000,
            retry_ms: 1_000,
            retry_jitter_ms: 2_000,
            queue_capacity: 256,
            max_batch_bytes: 64 * 1024,
            max_topics: 32,
            max_replay_events: 10_000,
            max_connections: 100_000,
            max_connections_per_user: 32,
            drain_ms: 3_000,
        }
    }
}

/// Gossip membership (chitchat: scuttlebutt with a phi-accrual failure
/// detector). Delivery never depends on it; it gives every node a view of its
/// peers for `/v1/cluster`, draining and rebalancing.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct GossipSettings {
    /// Run gossip at all. Default `true`; without it the node knows no peers,
    /// `/v1/cluster` lists only itself and rebalancing is off.
    pub enabled: bool,
    /// UDP address to gossip on. Default `127.0.0.1:7946`; use `0.0.0.0:7946`
    /// in containers. Port 0 picks a free port (tests).
    pub listen: String,
    /// `host:port` peers use to reach this node's gossip (NAT, containers);
    /// the host may be a DNS name, resolved at start. Default: `gossip.listen`
    /// (with `127.0.0.1` for an unspecified address, which only works on one
    /// machine).
    pub advertise: Option<String>,
    /// Peers to join through, `host:port` each (comma-separated in the
    /// environment). DNS names are re-resolved every 60 s, so a Kubernetes
    /// headless Service finds every pod. Default: none (the node runs alone).
    pub seeds: Vec<String>,
    /// Nodes only gossip with nodes of the same cluster id, so two clusters on
    /// one network never merge. Default `herald`.
    pub cluster_id: String,
    /// Milliseconds between gossip rounds (each round talks to up to three
    /// peers). Default 500.
    pub interval_ms: u64,
    /// Phi-accrual threshold: a peer is suspected when the time since its last
    /// heartbeat exceeds this many mean heartbeat intervals. Default 8.0 (about
    /// 4 to 5 s with the default interval).
    pub phi_threshold: f64,
    /// Milliseconds a suspected peer stays `suspect` (since it was last heard)
    /// before it is shown as `dead`. Default 30000.
    pub dead_after_ms: u64,
    /// Seconds after which a dead or departed peer is forgotten. Default 3600.
    pub forget_after_secs: u64,
    /// Milliseconds between updates of this node's gossiped load (open
    /// connections, users held); an update is sent only when a value changed.
    /// Default 1000.
    pub state_update_ms: u64,
    /// At start, how long to keep retrying seed DNS names that resolve to
    /// nothing (pods starting together), milliseconds. Default 5000.
    pub seed_resolve_timeout_ms: u64,
}

impl Default for GossipSettings {
    fn default() -> Self {
        GossipSettings {
            enabled: true,
            listen: "127.0.0.1:7946".into(),
            advertise: None,
            seeds: Vec::new(),
            cluster_id: "herald".into(),
            interval_ms: 500,
            phi_threshold: 8.0,
            dead_after_ms: 30_000,
            forget_after_secs: 3_600,
            state_update_ms: 1_000,
            seed_resolve_timeout_ms: 5_000,
        }
    }
}

impl GossipSettings {
    fn validate(&self, problems: &mut Vec<String>) {
        if let Err(err) = self.listen.parse::<SocketAddr>() {
            problems.push(format!(
                "gossip.listen: {:?} is not an address like 0.0.0.0:7946 ({err})",
                self.listen
            ));
        }
        let host_port = |value: &str| {
            value
                .rsplit_once(':')
                .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok())
        };
        if let Some(advertise) = &self.advertise {
            if !host_port(advertise) {
                problems.push(format!("gossip.advertise: {advertise:?} is not host:port"));
            }
        }
        for seed in &self.seeds {
            if !host_port(seed) {
                problems.push(format!("gossip.seeds: {seed:?} is not host:port"));
            }
        }
        if self.cluster_id.is_empty() {
            problems.push("gossip.cluster_id must not be empty".into());
        }
        if !(self.phi_threshold.is_finite() && self.phi_threshold > 1.0) {
            problems.push("gossip.phi_threshold must be greater than 1.0".into());
        }
        for (key, value) in [
            ("gossip.interval_ms", self.interval_ms),
            ("gossip.dead_after_ms", self.dead_after_ms),
            ("gossip.forget_after_secs", self.forget_after_secs),
            ("gossip.state_update_ms", self.state_update_ms),
        ] {
            if value == 0 {
                problems.push(format!("{key} must be greater than 0"));
            }
        }
    }
}

/// Moving streams off a node that holds more than its share, so a node added
/// to a running cluster gets its part of the long-lived connections. A moved
/// stream ends with a jittered `retry:` and resumes, from its last id, wherever
/// the load balancer sends it.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RebalanceSettings {
    /// Default `true` (needs gossip). `false`: a node never moves streams.
    pub enabled: bool,
    /// A node sheds streams only above the mean of the ready members plus this
    /// share of the mean, percent. Default 10.
    pub slack_percent: u32,
    /// ... and only when it holds at least this many more than the mean (small
    /// clusters do not churn over a handful of streams). Default 20.
    pub min_excess: usize,
    /// At most this share of its streams a node moves per minute, percent.
    /// Default 10.
    pub max_moved_per_minute_percent: u32,
    /// Milliseconds between rebalancing decisions. Default 5000.
    pub interval_ms: u64,
}

impl Default for RebalanceSettings {
    fn default() -> Self {
        RebalanceSettings {
            enabled: true,
            slack_percent: 10,
            min_excess: 20,
            max_moved_per_minute_percent: 10,
            interval_ms: 5_000,
        }
    }
}

/// The available event buses.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum BusKind {
    /// Embedded in the process: one node, history in memory. For trying Herald.
    #[default]
    Memory,
    /// NATS JetStream: many nodes, durable history. What production runs.
    Nats,
}

/// Which event bus carries events.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct BusSettings {
    /// `memory` (default): embedded, single node; `nats`: NATS JetStream.
    pub kind: BusKind,
}

/// The embedded bus: bounded history kept in memory.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct MemoryBusSettings {
    /// Most events kept for replay. Default 100000.
    pub max_events: usize,
    /// Most bytes of event data kept for replay. Default 67108864 (64 MiB).
    pub max_bytes: usize,
    /// Oldest event kept for replay, seconds. Default 86400 (one day).
    pub max_age_secs: u64,
    /// How long a publish `msg_id` is remembered for deduplication, seconds.
    /// Default 120.
    pub duplicate_window_secs: u64,
}

impl Default for MemoryBusSettings {
    fn default() -> Self {
        MemoryBusSettings {
            max_events: 100_000,
            max_bytes: 64 * 1024 * 1024,
            max_age_secs: 86_400,
            duplicate_window_secs: 120,
        }
    }
}

/// JetStream storage backends.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum NatsStorage {
    /// On disk (default): survives server restarts.
    #[default]
    File,
    /// In memory: fast, lost when the server restarts.
    Memory,
}

/// The NATS JetStream bus.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct NatsSettings {
    /// Server URL(s), comma-separated. Default `nats://127.0.0.1:4222`.
    pub url: String,
    /// JetStream stream holding every event. Default `HERALD`.
    pub stream: String,
    /// Subject prefix publishers use: `<prefix>.user.<id>`,
    /// `<prefix>.topic.<name>`. Default `herald`.
    pub subject_prefix: String,
    /// Subject prefix the stream republishes stored events under, for live
    /// delivery to edge nodes. Must not overlap `subject_prefix`. Default
    /// `herald-live`.
    pub live_prefix: String,
    /// User name for user/password authentication. Default: none.
    pub user: Option<String>,
    /// Password for user/password authentication. Default: none.
    pub password: Option<Secret>,
    /// Token authentication. Default: none.
    pub token: Option<Secret>,
    /// NKey seed authentication. Default: none.
    pub nkey_seed: Option<Secret>,
    /// Credentials file (JWT + NKey). Default: none.
    pub creds_file: Option<String>,
    /// CA certificate (PEM) to verify the server's TLS certificate. Default: none.
    pub tls_ca_file: Option<String>,
    /// Require TLS. Default false.
    pub tls_required: bool,
    /// Time allowed to connect at start-up, milliseconds. Default 5000.
    pub connect_timeout_ms: u64,
    /// How often the edge pings its NATS server, milliseconds. A connection
    /// that leaves three pings unanswered is dropped and re-established, so a
    /// silent network partition is noticed within about three intervals.
    /// Default 10000.
    pub ping_interval_ms: u64,
    /// Connect only to the servers in `url`, never to the addresses the
    /// cluster advertises (set when those are not reachable from the edge:
    /// NAT, proxies). Default false.
    pub ignore_discovered_servers: bool,
    /// How long `GET /v1/presence/{user}` waits for the nodes' answers when not
    /// every alive member answered, milliseconds. Default 500.
    pub presence_timeout_ms: u64,
    /// Stream storage: `file` (default) or `memory`.
    pub storage: NatsStorage,
    /// Stream replicas (1, 3 or 5 in a cluster). Default 1.
    pub replicas: usize,
    /// Oldest event kept, seconds. Default 86400.
    pub max_age_secs: u64,
    /// Most bytes kept in the stream. Default 1073741824 (1 GiB).
    pub max_bytes: i64,
    /// Most events kept per user or topic. Default 10000.
    pub max_messages_per_subject: i64,
    /// Window in which a repeated `Nats-Msg-Id` is recognised, seconds. Default 120.
    pub duplicate_window_secs: u64,
    /// Largest event payload accepted, bytes. Default 65536.
    pub max_event_bytes: usize,
    /// When an existing stream's configuration conflicts with what Herald
    /// needs, update it instead of refusing to start. Default false.
    pub update_stream: bool,
    /// How often every followed user and topic is checked against the
    /// stream for an event whose live copy never arrived, milliseconds. A
    /// lost copy reaches its clients within about twice this, even for a
    /// target that receives nothing more. Each check is one batched read per
    /// 1,000 followed targets (nats-server 2.11+). Default 2000.
    pub check_interval_ms: u64,
}

impl Default for NatsSettings {
    fn default() -> Self {
        NatsSettings {
            url: "nats://127.0.0.1:4222".into(),
            stream: "HERALD".into(),
            subject_prefix: "herald".into(),
            live_prefix: "herald-live".into(),
            user: None,
            password: None,
            token: None,
            nkey_seed: None,
            creds_file: None,
            tls_ca_file: None,
            tls_required: false,
            connect_timeout_ms: 5_000,
            ping_interval_ms: 10_000,
            ignore_discovered_servers: false,
            presence_timeout_ms: 500,
            storage: NatsStorage::File,
            replicas: 1,
            max_age_secs: 86_400,
            max_bytes: 1 << 30,
            max_messages_per_subject: 10_000,
            duplicate_window_secs: 120,
            max_event_bytes: 64 * 1024,
            update_stream: false,
            check_interval_ms: 2_000,
        }
    }
}

impl NatsSettings {
    fn validate(&self, problems: &mut Vec<String>) {
        let token_ok = |s: &str| {
            !s.is_empty()
                && s.split('.').all(|t| {
                    !t.is_empty()
                        && t.bytes()
                            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
                })
        };
        for (key, value) in [
            ("nats.subject_prefix", &self.subject_prefix),
            ("nats.live_prefix", &self.live_prefix),
        ] {
            if !token_ok(value) {
                problems.push(format!(
                    "{key}: {value:?} must be dot-separated tokens of [A-Za-z0-9_-]"
                ));
            }
        }
        let overlaps = |a: &str, b: &str| {
            a == b || a.starts_with(&format!("{b}.")) || b.starts_with(&format!("{a}."))
        };
        if overlaps(&self.subject_prefix, &self.live_prefix) {
            problems.push("nats.live_prefix must not overlap nats.subject_prefix".into());
        }
        if self.stream.is_empty() || self.stream.contains(['.', '*', '>', ' ']) {
            problems.push(format!(
                "nats.stream: {:?} is not a valid stream name",
                self.stream
            ));
        }
        if self.url.trim().is_empty() {
            problems.push("nats.url is required".into());
        }
        if !matches!(self.replicas, 1..=5) {
            problems.push("nats.replicas must be between 1 and 5".into());
        }
        for (key, value) in [
            ("nats.max_bytes", self.max_bytes),
            (
                "nats.max_messages_per_subject",
                self.max_messages_per_subject,
            ),
        ] {
            if value <= 0 {
                problems.push(format!(
                    "{key} must be greater than 0 (history must stay bounded)"
                ));
            }
        }
        for (key, value) in [
            ("nats.max_age_secs", self.max_age_secs),
            ("nats.duplicate_window_secs", self.duplicate_window_secs),
            ("nats.connect_timeout_ms", self.connect_timeout_ms),
            ("nats.ping_interval_ms", self.ping_interval_ms),
            ("nats.presence_timeout_ms", self.presence_timeout_ms),
            ("nats.max_event_bytes", self.max_event_bytes as u64),
            ("nats.check_interval_ms", self.check_interval_ms),
        ] {
            if value == 0 {
                problems.push(format!("{key} must be greater than 0"));
            }
        }
        if self.user.is_some() != self.password.is_some() {
            problems.push("nats.user and nats.password go together".into());
        }
    }
}

/// A secret value: never printed, logged or serialized in clear.
#[derive(Clone, Default, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret value.
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }

    /// The secret itself: call only where it is used.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("\"[redacted]\"")
    }
}

impl Serialize for Secret {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str("[redacted]")
    }
}

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
        }
    }
}

/// The token algorithms Herald can verify.
pub const KNOWN_ALGORITHMS: [&str; 12] = [
    "HS256", "HS384", "HS512", "RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256",
    "ES384", "EdDSA",
];

impl AuthSettings {
    fn validate(&self, problems: &mut Vec<String>) {
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
    }
}

/// Shortest accepted HS256 secret, bytes (the HMAC-SHA256 output size).
pub const MIN_SECRET_BYTES: usize = 32;

/// Log output formats.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines (default).
    #[default]
    Text,
    /// One JSON object per line, for log pipelines.
    Json,
}

/// OTLP transports.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
pub enum OtlpProtocol {
    /// OTLP over gRPC (collector port 4317).
    #[serde(rename = "grpc")]
    Grpc,
    /// OTLP protobuf over HTTP (collector port 4318, path `/v1/traces`). Default.
    #[default]
    #[serde(rename = "http/protobuf")]
    HttpProtobuf,
}

/// How a user id appears in traces.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum UserIdInTraces {
    /// As is.
    Raw,
    /// A stable hash of it (default): correlate without exposing it.
    #[default]
    Hashed,
    /// Not recorded.
    Omitted,
}

/// Logs and traces.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct TelemetrySettings {
    /// `text` (default) or `json`.
    pub log_format: LogFormat,
    /// Log filter in `RUST_LOG` syntax; `RUST_LOG` wins when set. Default `info`.
    pub log_level: String,
    /// OTLP collector endpoint, e.g. `http://127.0.0.1:4318` (HTTP) or
    /// `http://127.0.0.1:4317` (gRPC). Unset (default): no traces are
    /// exported, unless `OTEL_EXPORTER_OTLP_ENDPOINT` is set.
    pub otlp_endpoint: Option<String>,
    /// `http/protobuf` (default) or `grpc`.
    pub otlp_protocol: OtlpProtocol,
    /// Extra headers sent to the collector, `key=value` each (comma-separated
    /// in the environment), e.g. an API key. Default: none.
    pub otlp_headers: Vec<String>,
    /// Share of deliveries traced when the publisher sent no trace context,
    /// 0.0 to 1.0; a publisher's sampled/unsampled decision is always followed
    /// (parent-based). Default 0.01.
    pub sample_ratio: f64,
    /// How user ids appear in spans: `hashed` (default), `raw` or `omitted`.
    pub user_id: UserIdInTraces,
    /// `service.name` of the exported spans. Default `herald-edge`.
    pub service_name: String,
}

impl Default for TelemetrySettings {
    fn default() -> Self {
        TelemetrySettings {
            log_format: LogFormat::Text,
            log_level: "info".into(),
            otlp_endpoint: None,
            otlp_protocol: OtlpProtocol::HttpProtobuf,
            otlp_headers: Vec::new(),
            sample_ratio: 0.01,
            user_id: UserIdInTraces::Hashed,
            service_name: "herald-edge".into(),
        }
    }
}

/// Why settings could not be loaded. Loading changes no state.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read, or a value has the wrong type or an unknown key.
    #[error("invalid configuration: {0}")]
    Load(#[from] config::ConfigError),
    /// Values parsed but are not usable; every problem is listed.
    #[error("invalid configuration:\n  - {}", .0.join("\n  - "))]
    Invalid(Vec<String>),
}

impl Settings {
    /// Loads defaults, then `file` (TOML) if given, then `HERALD__*` variables
    /// from the process environment, and validates the result.
    pub fn load(file: Option<&Path>) -> Result<Settings, ConfigError> {
        Self::load_from(file, None)
    }

    /// As [`Settings::load`], with the environment given explicitly (tests).
    pub fn load_from(
        file: Option<&Path>,
        env: Option<config::Map<String, String>>,
    ) -> Result<Settings, ConfigError> {
        let mut builder = config::Config::builder();
        if let Some(file) = file {
            builder = builder.add_source(config::File::from(file).format(config::FileFormat::Toml));
        }
        builder = builder.add_source(
            config::Environment::with_prefix(ENV_PREFIX)
                .prefix_separator("__")
                .separator("__")
                .try_parsing(true)
                .list_separator(",")
                .with_list_parse_key("http.cors_allowed_origins")
                .with_list_parse_key("auth.algorithms")
                .with_list_parse_key("telemetry.otlp_headers")
                .with_list_parse_key("gossip.seeds")
                .source(env),
        );
        let settings: Settings = builder.build()?.try_deserialize()?;
        settings.validate()?;
        Ok(settings)
    }

    /// Checks every rule that types alone do not express; reports all problems.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let mut problems = Vec::new();
        let mut positive = |key: &str, value: u64| {
            if value == 0 {
                problems.push(format!("{key} must be greater than 0"));
            }
        };
        positive("http.max_body_bytes", self.http.max_body_bytes);
        positive(
            "http.header_read_timeout_ms",
            self.http.header_read_timeout_ms,
        );
        positive("stream.heartbeat_ms", self.stream.heartbeat_ms);
        positive("stream.queue_capacity", self.stream.queue_capacity as u64);
        positive("stream.max_batch_bytes", self.stream.max_batch_bytes as u64);
        positive("stream.max_connections", self.stream.max_connections as u64);
        positive(
            "stream.max_connections_per_user",
            self.stream.max_connections_per_user as u64,
        );
        positive("memory.max_events", self.memory.max_events as u64);
        positive("memory.max_bytes", self.memory.max_bytes as u64);
        positive("memory.max_age_secs", self.memory.max_age_secs);

        if let Err(err) = self.http.listen_addr() {
            problems.push(format!(
                "http.listen: {:?} is not an address like 127.0.0.1:8080 ({err})",
                self.http.listen
            ));
        }
        for origin in &self.http.cors_allowed_origins {
            let valid = origin == "*"
                || ((origin.starts_with("http://") || origin.starts_with("https://"))
                    && !origin.ends_with('/'));
            if !valid {
                problems.push(format!(
                    "http.cors_allowed_origins: {origin:?} is not an origin like https://app.example.com (or *)"
                ));
            }
        }
        if self.http.max_header_bytes < 8192 {
            problems.push("http.max_header_bytes must be at least 8192".into());
        }
        self.auth.validate(&mut problems);
        self.gossip.validate(&mut problems);
        if self.rebalance.interval_ms == 0 {
            problems.push("rebalance.interval_ms must be greater than 0".into());
        }
        if !(1..=100).contains(&self.rebalance.max_moved_per_minute_percent) {
            problems
                .push("rebalance.max_moved_per_minute_percent must be between 1 and 100".into());
        }
        if let Some(url) = &self.node.http_advertise {
            if !(url.starts_with("http://") || url.starts_with("https://")) {
                problems.push(format!(
                    "node.http_advertise: {url:?} is not a URL like http://edge-1:8080"
                ));
            }
        }
        if self.bus.kind == BusKind::Nats {
            self.nats.validate(&mut problems);
        }
        if !(0.0..=1.0).contains(&self.telemetry.sample_ratio) {
            problems.push("telemetry.sample_ratio must be between 0.0 and 1.0".into());
        }
        for header in &self.telemetry.otlp_headers {
            let key = header.split_once('=').map(|(key, _)| key.trim());
            if key.is_none_or(str::is_empty) {
                problems.push(format!(
                    "telemetry.otlp_headers: {header:?} is not key=value"
                ));
            }
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(ConfigError::Invalid(problems))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &str = "0123456789abcdef0123456789abcdef";

    fn env(pairs: &[(&str, &str)]) -> Option<config::Map<String, String>> {
        Some(
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        )
    }

    fn load(pairs: &[(&str, &str)]) -> Result<Settings, ConfigError> {
        Settings::load_from(None, env(pairs))
    }

    #[test]
    fn defaults_plus_a_secret_are_valid() {
        let settings = load(&[("HERALD__AUTH__HS256_SECRET", SECRET)]).expect("valid");
        assert_eq!(settings.http.listen, "127.0.0.1:8080");
        assert_eq!(settings.stream.heartbeat_ms, 15_000);
        assert_eq!(settings.bus.kind, BusKind::Memory);
    }

    #[test]
    fn environment_variables_override_nested_keys() {
        let settings = load(&[
            ("HERALD__AUTH__HS256_SECRET", SECRET),
            ("HERALD__HTTP__LISTEN", "0.0.0.0:9000"),
            ("HERALD__STREAM__QUEUE_CAPACITY", "8"),
        ])
        .expect("valid");
        assert_eq!(settings.http.listen, "0.0.0.0:9000");
        assert_eq!(settings.stream.queue_capacity, 8);
    }

    #[test]
    fn cors_origins_are_a_comma_separated_list_in_the_environment() {
        let settings = load(&[
            ("HERALD__AUTH__HS256_SECRET", SECRET),
            (
                "HERALD__HTTP__CORS_ALLOWED_ORIGINS",
                "https://a.example.com,http://localhost:3000",
            ),
        ])
        .expect("valid");
        assert_eq!(
            settings.http.cors_allowed_origins,
            ["https://a.example.com", "http://localhost:3000"]
        );
        let err = load(&[
            ("HERALD__AUTH__HS256_SECRET", SECRET),
            ("HERALD__HTTP__CORS_ALLOWED_ORIGINS", "a.example.com/"),
        ])
        .expect_err("invalid");
        assert!(
            err.to_string().contains("http.cors_allowed_origins"),
            "{err}"
        );
    }

    #[test]
    fn gossip_seeds_are_a_comma_separated_list_and_each_must_be_host_port() {
        let settings = load(&[
            ("HERALD__AUTH__HS256_SECRET", SECRET),
            ("HERALD__GOSSIP__SEEDS", "edge-1:7946,10.0.0.7:7946"),
            ("HERALD__GOSSIP__ADVERTISE", "edge-2:7946"),
        ])
        .expect("valid");
        assert_eq!(settings.gossip.seeds, ["edge-1:7946", "10.0.0.7:7946"]);
        assert_eq!(settings.gossip.advertise.as_deref(), Some("edge-2:7946"));
        let err = load(&[
            ("HERALD__AUTH__HS256_SECRET", SECRET),
            ("HERALD__GOSSIP__SEEDS", "edge-1"),
            ("HERALD__GOSSIP__LISTEN", "everywhere"),
            ("HERALD__NODE__HTTP_ADVERTISE", "edge-1:8080"),
        ])
        .expect_err("invalid");
        let message = err.to_string();
        for key in ["gossip.seeds", "gossip.listen", "node.http_advertise"] {
            assert!(message.contains(key), "{key} not named in: {message}");
        }
    }

    #[test]
    fn a_file_is_read_and_the_environment_wins_over_it() {
        let dir = std::env::temp_dir().join(format!("herald-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let path = dir.join("herald.toml");
        std::fs::write(
            &path,
            format!("[http]\nlisten = \"127.0.0.1:7000\"\nmax_body_bytes = 10\n[auth]\nhs256_secret = \"{SECRET}\"\n"),
        )
        .expect("write");
        let settings =
            Settings::load_from(Some(&path), env(&[("HERALD__HTTP__MAX_BODY_BYTES", "20")]))
                .expect("valid");
        assert_eq!(settings.http.listen, "127.0.0.1:7000");
        assert_eq!(settings.http.max_body_bytes, 20);
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn every_problem_is_reported_at_once_naming_its_key() {
        let err = load(&[
            ("HERALD__HTTP__LISTEN", "not-an-address"),
            ("HERALD__STREAM__QUEUE_CAPACITY", "0"),
        ])
        .expect_err("invalid");
        let message = err.to_string();
        assert!(message.contains("http.listen"), "{message}");
        assert!(message.contains("stream.queue_capacity"), "{message}");
        assert!(
            message.contains("auth.hs256_secret is required"),
            "{message}"
        );
    }

    #[test]
    fn an_unknown_bus_kind_is_refused_naming_the_key() {
        let err = load(&[
            ("HERALD__AUTH__HS256_SECRET", SECRET),
            ("HERALD__BUS__KIND", "carrier-pigeon"),
        ])
        .expect_err("invalid");
        let message = err.to_string();
        assert!(message.contains("bus.kind"), "{message}");
        assert!(message.contains("carrier-pigeon"), "{message}");
    }

    #[test]
    fn an_unknown_key_is_refused_rather_than_ignored() {
        let err = load(&[
            ("HERALD__AUTH__HS256_SECRET", SECRET),
            ("HERALD__HTTP__LISTNE", "127.0.0.1:1"),
        ])
        .expect_err("invalid");
        assert!(err.to_string().contains("listne"), "{err}");
    }

    #[test]
    fn algorithms_are_an_allowlist_that_needs_matching_keys() {
        let err = load(&[
            ("HERALD__AUTH__HS256_SECRET", SECRET),
            ("HERALD__AUTH__ALGORITHMS", "HS256,RS256,none"),
        ])
        .expect_err("invalid");
        let message = err.to_string();
        assert!(
            message.contains("RS256, which needs auth.public_key_file"),
            "{message}"
        );
        assert!(message.contains("unknown algorithm \"none\""), "{message}");
        let err = load(&[
            ("HERALD__AUTH__ALGORITHMS", "ES256"),
            ("HERALD__AUTH__JWKS_FILE", "/nonexistent/jwks.json"),
        ])
        .expect_err("invalid");
        assert!(err.to_string().contains("auth.jwks_file"), "{err}");
    }

    #[test]
    fn the_nats_bus_is_configured_from_the_environment_and_checked() {
        let settings = load(&[
            ("HERALD__AUTH__HS256_SECRET", SECRET),
            ("HERALD__BUS__KIND", "nats"),
            ("HERALD__NATS__URL", "nats://10.0.0.1:4222"),
            ("HERALD__NATS__REPLICAS", "3"),
        ])
        .expect("valid");
        assert_eq!(settings.bus.kind, BusKind::Nats);
        assert_eq!(settings.nats.url, "nats://10.0.0.1:4222");
        assert_eq!(settings.nats.replicas, 3);
        let err = load(&[
            ("HERALD__AUTH__HS256_SECRET", SECRET),
            ("HERALD__BUS__KIND", "nats"),
            ("HERALD__NATS__LIVE_PREFIX", "herald.live"),
            ("HERALD__NATS__MAX_BYTES", "0"),
        ])
        .expect_err("invalid");
        let message = err.to_string();
        assert!(
            message.contains("nats.live_prefix must not overlap"),
            "{message}"
        );
        assert!(message.contains("nats.max_bytes"), "{message}");
    }

    #[test]
    fn a_short_secret_is_refused_and_secrets_never_print() {
        let err = load(&[("HERALD__AUTH__HS256_SECRET", "short")]).expect_err("invalid");
        assert!(err.to_string().contains("at least 32 bytes"), "{err}");

        let settings = load(&[("HERALD__AUTH__HS256_SECRET", SECRET)]).expect("valid");
        assert!(!format!("{settings:?}").contains(SECRET));
        let json = serde_json::to_string(&settings).expect("serializes");
        assert!(!json.contains(SECRET), "{json}");
    }
}
