//! Moving long-lived streams off a node that holds more than its share.
//!
//! SSE connections stay where they first landed, so a node added to a running
//! cluster would get only new streams while the old nodes stay full. Every
//! `rebalance.interval_ms` each node compares its streams with the mean of the
//! members that take new streams; above `mean + max(slack, min_excess)` it asks
//! some of its streams (chosen at random) to move: each ends after what is
//! already queued with a jittered `retry:` and resumes from its last id
//! wherever the load balancer sends it. A node never sheds below the mean, and
//! never more than `max_moved_per_minute_percent` of its streams per minute.

use std::sync::Arc;
use std::time::Duration;

use herald_config::RebalanceSettings;
use tokio_util::sync::CancellationToken;

use super::{Cluster, ClusterView};
use crate::metrics::Metrics;
use crate::registry::Registry;

/// How many streams this node (holding `own`) should move now.
pub(crate) fn streams_to_move(own: u64, view: &ClusterView, settings: &RebalanceSettings) -> u64 {
    let serving: Vec<u64> = view.serving().map(|m| m.connections).collect();
    let me_serving = view.serving().any(|m| m.is_self);
    if !me_serving || serving.len() < 2 {
        return 0;
    }
    let mean = serving.iter().sum::<u64>() / serving.len() as u64;
    let slack = (mean * u64::from(settings.slack_percent) / 100).max(settings.min_excess as u64);
    if own <= mean + slack {
        return 0;
    }
    let per_minute = own * u64::from(settings.max_moved_per_minute_percent) / 100;
    let per_tick = (per_minute as u128 * u128::from(settings.interval_ms) / 60_000) as u64;
    (own - mean).min(per_tick.max(1))
}

/// Runs the rebalancing loop until `shutdown`.
pub(crate) async fn run(
    cluster: Arc<Cluster>,
    registry: Arc<Registry>,
    metrics: Arc<Metrics>,
    settings: RebalanceSettings,
    shutdown: CancellationToken,
) {
    if !settings.enabled || cluster.gossip_addr().is_none() {
        return;
    }
    let every = Duration::from_millis(settings.interval_ms);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
        let own = registry.connection_count() as u64;
        let view = cluster.view();
        let count = streams_to_move(own, &view, &settings);
        if count == 0 {
            continue;
        }
        let asked = registry.move_streams(count as usize);
        metrics.streams_moved.inc_by(asked as u64);
        tracing::info!(
            connections = own,
            cluster_connections = view.totals.connections,
            serving = view.serving().count(),
            moving = asked,
            "rebalancing: moving streams to less loaded nodes"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::member::{NodeInfo, Observation};

    fn view(loads: &[(u64, bool)]) -> ClusterView {
        let observations = loads
            .iter()
            .enumerate()
            .map(|(i, (connections, ready))| Observation {
                id: format!("node-{i}"),
                generation: 1,
                gossip: "127.0.0.1:7946".parse().expect("addr"),
                info: NodeInfo {
                    connections: *connections,
                    ready: *ready,
                    ..NodeInfo::default()
                },
                live: true,
                last_heard: Duration::ZERO,
                is_self: i == 0,
            })
            .collect();
        ClusterView::new(
            "herald",
            "node-0",
            true,
            observations,
            Duration::from_secs(30),
        )
    }

    fn settings() -> RebalanceSettings {
        RebalanceSettings {
            enabled: true,
            slack_percent: 10,
            min_excess: 20,
            max_moved_per_minute_percent: 10,
            interval_ms: 6_000,
        }
    }

    #[test]
    fn a_node_within_its_share_moves_nothing() {
        assert_eq!(
            streams_to_move(
                1000,
                &view(&[(1000, true), (1000, true), (950, true)]),
                &settings()
            ),
            0
        );
        // 1100 is the mean (1033) plus less than the 10 % slack.
        assert_eq!(
            streams_to_move(
                1100,
                &view(&[(1100, true), (1000, true), (1000, true)]),
                &settings()
            ),
            0
        );
    }

    #[test]
    fn after_scale_out_a_full_node_moves_a_bounded_share_per_tick() {
        // Two nodes of 1000 and a new, empty one: mean 666.
        let moved = streams_to_move(
            1000,
            &view(&[(1000, true), (1000, true), (0, true)]),
            &settings(),
        );
        // 10 % per minute at one tick every 6 s = 1 % of 1000 per tick.
        assert_eq!(moved, 10);
    }

    #[test]
    fn a_node_never_moves_below_the_mean() {
        let mut all_at_once = settings();
        all_at_once.max_moved_per_minute_percent = 100;
        all_at_once.interval_ms = 60_000;
        let moved = streams_to_move(
            1000,
            &view(&[(1000, true), (1000, true), (0, true)]),
            &all_at_once,
        );
        assert_eq!(moved, 1000 - 666);
    }

    #[test]
    fn small_clusters_do_not_churn_over_a_handful_of_streams() {
        assert_eq!(
            streams_to_move(30, &view(&[(30, true), (0, true)]), &settings()),
            0
        );
    }

    #[test]
    fn nothing_moves_when_there_is_nowhere_to_go_or_the_node_is_not_serving() {
        // The only other node is not ready.
        assert_eq!(
            streams_to_move(1000, &view(&[(1000, true), (0, false)]), &settings()),
            0
        );
        // This node is draining (not ready): the drain moves its streams.
        assert_eq!(
            streams_to_move(
                1000,
                &view(&[(1000, false), (0, true), (0, true)]),
                &settings()
            ),
            0
        );
    }
}
