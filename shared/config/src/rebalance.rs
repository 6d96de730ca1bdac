//! `[rebalance]`: moving streams off a node that holds more than its share
//! ([`RebalanceSettings`]).

use serde::{Deserialize, Serialize};

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

impl RebalanceSettings {
    /// The decision interval and the share moved per minute.
    pub(crate) fn validate(&self, problems: &mut Vec<String>) {
        if self.interval_ms == 0 {
            problems.push("rebalance.interval_ms must be greater than 0".into());
        }
        if !(1..=100).contains(&self.max_moved_per_minute_percent) {
            problems
                .push("rebalance.max_moved_per_minute_percent must be between 1 and 100".into());
        }
    }
}
