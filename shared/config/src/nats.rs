//! `[nats]`: the NATS JetStream bus ([`NatsSettings`], [`NatsStorage`]).

use serde::{Deserialize, Serialize};

use crate::Secret;

/// Room the stream leaves for a message's headers on top of
/// `nats.max_event_bytes`, bytes. The headers Herald reads take 1,023 bytes
/// with their framing when `Herald-Event` is at its 128-byte limit,
/// `tracestate` at its 512-byte W3C limit, `traceparent` 55 bytes and
/// `Nats-Msg-Id` 256 bytes (the HTTP path stores a 64-byte digest there); the
/// rest is for a publisher's own headers (`Nats-Expected-*` and the like).
/// See [`NatsSettings::max_message_bytes`].
pub const STREAM_HEADER_ALLOWANCE_BYTES: usize = 4096;

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
    /// Largest event payload accepted, bytes: over HTTP (413 above it), and
    /// delivered from the stream (a bigger one is dropped and counted). The
    /// stream refuses messages over [`NatsSettings::max_message_bytes`], so
    /// a NATS publisher gets an error for them instead of an
    /// acknowledgement. Default 65536.
    pub max_event_bytes: usize,
    /// When an existing stream's configuration conflicts with what Herald
    /// needs (subjects, RePublish), update it instead of refusing to start;
    /// also set its message size limit when it differs from
    /// [`NatsSettings::max_message_bytes`] (without this, a differing limit
    /// is logged and left alone). Default false.
    pub update_stream: bool,
    /// How often every followed user and topic is checked against the
    /// stream for an event whose live copy never arrived, milliseconds. A
    /// lost copy reaches its clients within about twice this, even for a
    /// target that receives nothing more. Each check is one batched read per
    /// 1,000 followed targets (nats-server 2.11+). Default 2000.
    pub check_interval_ms: u64,
    /// Live copies async-nats buffers for the dispatcher, every followed
    /// user and topic together (their subscriptions share one buffer),
    /// before it drops them as a slow consumer; also the buffer of each
    /// other subscription (a batched read's answer). A drop is repaired
    /// like any lost live copy (the periodic check finds it, and the drop
    /// itself asks for a check at once) and counted in
    /// `herald_nats_slow_consumer_total`. The periodic check's batched reads
    /// ask for at most one subject fewer than this per request, so their own
    /// answer always fits. Lower it only to test the drop. At least 2.
    /// Default 65536 (async-nats' own default).
    pub subscription_capacity: usize,
    /// How long a user or topic stays followed after its last stream on
    /// this node closed, seconds. Meanwhile the node records what it
    /// receives for it (at most `linger_max_events`), so a client that comes
    /// back to the same node resumes from memory, without reading the
    /// stream. The cost: the node keeps receiving the target's events for
    /// this long. 0 releases a target at once. Default 30.
    pub linger_secs: u64,
    /// Most events recorded per lingering target; a client that missed
    /// more (or came back after the oldest was dropped) is answered from
    /// the stream, as on another node. Default 32.
    pub linger_max_events: usize,
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
            subscription_capacity: 64 * 1024,
            linger_secs: 30,
            linger_max_events: 32,
        }
    }
}

impl NatsSettings {
    /// The stream's `max_msg_size`, bytes: `max_event_bytes` plus
    /// [`STREAM_HEADER_ALLOWANCE_BYTES`]. JetStream counts a message's
    /// headers and payload against it (not its subject), so every event the
    /// edge delivers is stored when its headers fit the allowance, and every
    /// message with a payload over this limit is refused at publish time.
    /// (One with a payload just over `max_event_bytes` but within the
    /// allowance is still stored, and dropped and counted at delivery.)
    pub fn max_message_bytes(&self) -> usize {
        self.max_event_bytes
            .saturating_add(STREAM_HEADER_ALLOWANCE_BYTES)
    }

    /// Subjects, stream name, bounds, timeouts and credentials. Checked only
    /// when `bus.kind = "nats"`.
    pub(crate) fn validate(&self, problems: &mut Vec<String>) {
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
        // JetStream keeps a stream's message size limit in 32 bits.
        if i32::try_from(self.max_message_bytes()).is_err() {
            problems.push(format!(
                "nats.max_event_bytes must be at most {} (the stream's message size limit, with {STREAM_HEADER_ALLOWANCE_BYTES} bytes for headers, is a 32-bit number)",
                i32::MAX as usize - STREAM_HEADER_ALLOWANCE_BYTES
            ));
        }
        if self.subscription_capacity < 2 {
            problems.push(
                "nats.subscription_capacity must be at least 2 (a batched read's answer needs room for one event and its end)"
                    .into(),
            );
        }
        if self.linger_secs > 86_400 {
            problems.push("nats.linger_secs must be at most 86400 (a day)".into());
        }
        if !(1..=100_000).contains(&self.linger_max_events) {
            problems.push("nats.linger_max_events must be between 1 and 100000".into());
        }
        if self.user.is_some() != self.password.is_some() {
            problems.push("nats.user and nats.password go together".into());
        }
    }
}
