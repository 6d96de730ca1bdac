//! `[stream]`: SSE stream behaviour and per-connection limits
//! ([`StreamSettings`]).

use serde::{Deserialize, Serialize};

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
