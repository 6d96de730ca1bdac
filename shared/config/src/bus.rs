//! `[bus]` and `[memory]`: which event bus carries events ([`BusSettings`],
//! [`BusKind`]) and the embedded one's bounds ([`MemoryBusSettings`]). The NATS
//! bus has its own section, in `nats.rs`.

use serde::{Deserialize, Serialize};

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
