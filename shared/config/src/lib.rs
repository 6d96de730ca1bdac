//! Herald's settings, loaded in layers: built-in defaults, then an optional TOML
//! file, then environment variables `HERALD__SECTION__KEY` (a double underscore
//! between every level, e.g. `HERALD__HTTP__LISTEN=127.0.0.1:8080`).
//!
//! [`Settings::load`] refuses unknown keys (a typo must not be silently ignored)
//! and runs [`Settings::validate`], which reports every problem at once, each
//! naming its key. Every field documents its unit and default; the same list is
//! in `docs/configuration.md`.
//!
//! # Layout
//!
//! - [`Settings`] (this file): every section, as the TOML file and the
//!   environment name them.
//! - One file per section, each with its settings type, its defaults and its
//!   own rules: `node.rs` ([`NodeSettings`]), `http.rs` ([`HttpSettings`]),
//!   `admin.rs` ([`AdminSettings`]),
//!   `stream.rs` ([`StreamSettings`]), `bus.rs` ([`BusSettings`],
//!   [`MemoryBusSettings`]), `nats.rs` ([`NatsSettings`]), `auth.rs`
//!   ([`AuthSettings`], [`IssuerSettings`]), `telemetry.rs`
//!   ([`TelemetrySettings`]), `gossip.rs` ([`GossipSettings`]; `gossip_key.rs`
//!   decodes its keys), `rebalance.rs` ([`RebalanceSettings`]).
//! - `secret.rs`: [`Secret`], a value that never prints.
//! - `load.rs`: the layers ([`Settings::load`], [`ENV_PREFIX`]), read one key
//!   at a time so that every unknown key and mistyped value is reported.
//! - `validate.rs`: [`Settings::validate`], every problem at once.
//! - `error.rs`: [`ConfigError`] and each [`Problem`] it lists.

mod admin;
mod auth;
mod bus;
mod error;
mod gossip;
mod gossip_key;
mod http;
mod load;
mod nats;
mod node;
mod rebalance;
mod secret;
mod stream;
mod telemetry;
mod validate;

use serde::{Deserialize, Serialize};

pub use admin::AdminSettings;
pub use auth::{AuthSettings, IssuerSettings, KNOWN_ALGORITHMS, MIN_SECRET_BYTES};
pub use bus::{BusKind, BusSettings, MemoryBusSettings};
pub use error::{ConfigError, Problem};
pub use gossip::GossipSettings;
pub use gossip_key::{GOSSIP_KEY_BYTES, GOSSIP_KEY_HOWTO, GossipKeyError};
pub use http::HttpSettings;
pub use load::ENV_PREFIX;
pub use nats::{NatsSettings, NatsStorage, STREAM_HEADER_ALLOWANCE_BYTES};
pub use node::NodeSettings;
pub use rebalance::RebalanceSettings;
pub use secret::Secret;
pub use stream::StreamSettings;
pub use telemetry::{LogFormat, OtlpProtocol, TelemetrySettings, UserIdInTraces};

/// Everything a Herald edge node can be configured with.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Settings {
    /// This node's identity.
    pub node: NodeSettings,
    /// The HTTP listener and its limits.
    pub http: HttpSettings,
    /// The admin listener: metrics, cluster view, health probes.
    pub admin: AdminSettings,
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
