//! `[gossip]`: gossip membership ([`GossipSettings`]); its keys are decoded
//! in `gossip_key.rs`.

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

use crate::Secret;

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
    /// The cluster's gossip key: base64 of 32 random bytes (`openssl rand
    /// -base64 32`). Every datagram is sealed with it (XChaCha20-Poly1305),
    /// so only key holders can join, change or read the cluster view. During
    /// a rotation, several keys separated by commas: the first seals, every
    /// one is accepted. Required when `gossip.listen` is not a loopback
    /// address. Default: none. Prefer `gossip.secret_file` outside tests.
    pub secret: Option<Secret>,
    /// A file holding the gossip key(s), one per line, read at start (a
    /// mounted Kubernetes or Docker secret). Exclusive with `gossip.secret`.
    /// Default: none.
    pub secret_file: Option<String>,
    /// Milliseconds a sealed datagram's timestamp may differ from this node's
    /// clock before it is dropped as stale; within it, each datagram is
    /// accepted once. Larger tolerates more clock skew between hosts; smaller
    /// shortens how long a captured datagram could be replayed to a node that
    /// just restarted. Default 30000.
    pub replay_window_ms: u64,
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
            secret: None,
            secret_file: None,
            replay_window_ms: 30_000,
        }
    }
}

impl GossipSettings {
    /// Addresses, seeds, cluster id, failure detector, intervals and keys.
    pub(crate) fn validate(&self, problems: &mut Vec<String>) {
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
            ("gossip.replay_window_ms", self.replay_window_ms),
        ] {
            if value == 0 {
                problems.push(format!("{key} must be greater than 0"));
            }
        }
        self.validate_keys(problems);
    }
}
